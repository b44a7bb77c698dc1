"""preprocess: a folder of class sub-folders -> checked, resized, sharded TFRecords + manifest.

    python -m components.preprocess --source data/flowers --output /tmp/prepared --image-size 224

Every file under `<source>/<class>/` is read; a file that is not a decodable image (empty,
truncated, an HTML page saved as .jpg, an unsupported format, too many pixels) is rejected
with its reason and listed in the manifest, never a crash. Valid images are converted to RGB,
resized to `image_size` x `image_size` by `components.imaging` (the same code the exported
model runs) and split train/validation/test per class, by content hash: the same input gives
the same split on every run. The output folder appears only when it is complete: shards are
written to a staging folder that is renamed at the end, `manifest.json` written last.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import logging
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components import imaging, records

log = logging.getLogger(__name__)

# EfficientNet-B0 downsamples by 32: below 32 px its last feature map would be empty.
MIN_IMAGE_SIZE = 32


class PreprocessError(ValueError):
    """The input cannot make a usable dataset; the message names the problem and the files."""


@dataclass(frozen=True)
class PreprocessConfig:
    source: Path
    output: Path
    image_size: int = 224  # px, square; EfficientNet-B0's native resolution
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    # A class needs an image in each of the three splits to be trained, tuned and tested.
    min_images_per_class: int = 3
    jpeg_quality: int = 95  # shards store JPEG: 224 px at q95 is ~20 KB, near-lossless
    shard_size_mb: float = 100.0  # target per shard (TF guidance: 100-200 MB)
    # Pillow's own decompression-bomb threshold: a 218 KB PNG can decode to 675 MB.
    max_pixels: int = 89_478_485

    def validate(self) -> None:
        if self.image_size < MIN_IMAGE_SIZE:
            raise PreprocessError(
                f"--image-size must be at least {MIN_IMAGE_SIZE} px (EfficientNet-B0 downsamples "
                f"by 32), got {self.image_size}")
        for name in ("validation_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 0.5:
                raise PreprocessError(f"--{name.replace('_', '-')} must be in [0, 0.5), got {value}")
        if self.min_images_per_class < 1:
            raise PreprocessError("--min-images-per-class must be at least 1")
        if not 1 <= self.jpeg_quality <= 100:
            raise PreprocessError(f"--jpeg-quality must be in 1..100, got {self.jpeg_quality}")
        if self.shard_size_mb <= 0:
            raise PreprocessError("--shard-size-mb must be positive")


@dataclass(frozen=True)
class SourceImage:
    path: Path
    relative: str  # path below the source folder, as reported in the manifest
    label: int
    class_name: str
    digest: str  # sha256 of the file's bytes: orders the split, independent of file names


class Rejected(Exception):
    """One input file cannot be used; `reason` says why in words."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def list_source(source: Path) -> tuple[list[str], dict[str, list[Path]]]:
    """Class names (sorted folder names) and the files in each class folder."""
    if not source.exists():
        raise PreprocessError(f"source folder {source} does not exist")
    if not source.is_dir():
        raise PreprocessError(f"source {source} is not a folder; expected a folder of class sub-folders")
    class_dirs = sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
    stray = sorted(p.name for p in source.iterdir() if p.is_file() and not p.name.startswith("."))
    if stray:
        log.warning("ignoring %d file(s) directly under %s (only class sub-folders are read): %s",
                    len(stray), source, ", ".join(stray[:5]))
    if not class_dirs:
        raise PreprocessError(
            f"source folder {source} has no class sub-folders; expected {source}/<class>/<image>")
    files = {
        d.name: sorted(f for f in d.rglob("*")
                       if f.is_file() and not any(part.startswith(".") for part in f.relative_to(d).parts))
        for d in class_dirs
    }
    empty = [name for name, found in files.items() if not found]
    if empty:
        raise PreprocessError(f"class folder(s) with no files in {source}: {', '.join(empty)}")
    if len(class_dirs) < 2:
        raise PreprocessError(
            f"source folder {source} has only one class ({class_dirs[0].name}); "
            "a classifier needs at least two class sub-folders")
    return [d.name for d in class_dirs], files


def check_and_resize(data: bytes, config: PreprocessConfig) -> tuple[bytes, int, int]:
    """Validate one encoded image and return (JPEG bytes at image_size, original h, original w).

    Raises `Rejected` with a reason a person can act on.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise Rejected("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as header:  # reads the header only, no pixels
            image_format, (width, height) = header.format, header.size
    except Image.DecompressionBombError as error:
        raise Rejected(f"too many pixels: {error}") from None
    except UnidentifiedImageError:
        start = data[:64].lstrip().lower()
        hint = " (it looks like an HTML page)" if start.startswith((b"<html", b"<!doctype")) else ""
        raise Rejected(f"not an image: unrecognised file format{hint}") from None
    except OSError as error:
        raise Rejected(f"corrupt or truncated image header: {error}") from None
    if image_format not in imaging.DECODABLE_FORMATS:
        raise Rejected(f"unsupported image format {image_format}; accepted: "
                       f"{', '.join(imaging.DECODABLE_FORMATS)}")
    if width * height > config.max_pixels:
        raise Rejected(f"too many pixels: {width}x{height} is over the cap of {config.max_pixels}")
    if width < 1 or height < 1:
        raise Rejected(f"degenerate image size {width}x{height}")

    import tensorflow as tf

    try:
        pixels = imaging.decode_and_resize(tf.constant(data), config.image_size)
    except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as error:
        first_line = str(error.message).strip().splitlines()[0] if error.message else type(error).__name__
        raise Rejected(f"corrupt or truncated image data ({image_format}): {first_line}") from None
    encoded = tf.io.encode_jpeg(pixels, quality=config.jpeg_quality, chroma_downsampling=False)
    return encoded.numpy(), height, width


def assign_splits(images: list[SourceImage], config: PreprocessConfig) -> dict[str, list[SourceImage]]:
    """Stratified split by content hash: per class, the images in hash order are dealt to
    test, then validation, then train. No randomness, so re-runs give the same split."""
    by_class: dict[int, list[SourceImage]] = {}
    for image in images:
        by_class.setdefault(image.label, []).append(image)
    splits: dict[str, list[SourceImage]] = {split: [] for split in records.SPLITS}
    for members in by_class.values():
        members = sorted(members, key=lambda m: (m.digest, m.relative))
        n = len(members)
        n_test = max(1, round(n * config.test_fraction)) if config.test_fraction > 0 else 0
        n_val = max(1, round(n * config.validation_fraction)) if config.validation_fraction > 0 else 0
        # Keep at least one image for training, however small the class.
        n_test = min(n_test, max(n - 1, 0))
        n_val = min(n_val, max(n - 1 - n_test, 0))
        splits["test"] += members[:n_test]
        splits["validation"] += members[n_test:n_test + n_val]
        splits["train"] += members[n_test + n_val:]
    for split in splits:
        splits[split].sort(key=lambda m: (m.digest, m.relative))  # classes interleaved in shards
    return splits


class _Progress:
    """Logs progress at most every `interval` seconds: enough to see a long run is alive."""

    def __init__(self, total: int, what: str, interval: float = 10.0):
        self.total, self.what, self.interval = total, what, interval
        self.start = self.last = time.monotonic()
        self.done = 0

    def step(self) -> None:
        self.done += 1
        now = time.monotonic()
        if now - self.last >= self.interval or self.done == self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            log.info("%s: %d/%d (%.0f%%) %.0f img/s", self.what, self.done, self.total,
                     100.0 * self.done / max(self.total, 1), rate)


def _staging_folder(output: Path) -> Path:
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise PreprocessError(f"output {output} already exists and is not an empty folder; "
                              "choose a new --output or remove it")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.partial"
    if staging.exists():
        shutil.rmtree(staging)  # left by an interrupted earlier run: never complete, safe to drop
    staging.mkdir()
    return staging


def preprocess(config: PreprocessConfig) -> dict[str, Any]:
    """Run the step; returns the manifest (also written to `<output>/manifest.json`)."""
    config.validate()
    class_names, files = list_source(config.source)
    total_files = sum(len(found) for found in files.values())
    log.info("found %d files in %d classes under %s", total_files, len(class_names), config.source)

    images: list[SourceImage] = []
    for label, name in enumerate(class_names):
        for path in files[name]:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            images.append(SourceImage(path=path, relative=str(path.relative_to(config.source)),
                                      label=label, class_name=name, digest=digest))
    splits = assign_splits(images, config)

    staging = _staging_folder(config.output)
    try:
        manifest = _write_shards(config, class_names, splits, staging)
        (staging / records.MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if config.output.exists():
            config.output.rmdir()  # an empty folder made for us (as KFP does)
        staging.rename(config.output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("wrote %s: %s; rejected %d file(s)", config.output,
             ", ".join(f"{split} {n}" for split, n in manifest["totals"].items()), len(manifest["rejected"]))
    return manifest


def _write_shards(config: PreprocessConfig, class_names: list[str],
                  splits: dict[str, list[SourceImage]], staging: Path) -> dict[str, Any]:
    rejected: list[dict[str, str]] = []
    counts = {split: {name: 0 for name in class_names} for split in records.SPLITS}
    shards: dict[str, list[dict[str, Any]]] = {}
    progress = _Progress(sum(len(members) for members in splits.values()), "preprocess")
    for split in records.SPLITS:
        writer = records.ShardWriter(staging, split, int(config.shard_size_mb * 1024 * 1024))
        for image in splits[split]:
            progress.step()
            try:
                encoded, _, _ = check_and_resize(image.path.read_bytes(), config)
            except Rejected as rejection:
                log.warning("rejected %s: %s", image.relative, rejection.reason)
                rejected.append({"path": image.relative, "reason": rejection.reason})
                continue
            writer.write(records.make_example(
                encoded, image.label, image.class_name, config.image_size, config.image_size,
                image.relative))
            counts[split][image.class_name] += 1
        shards[split] = writer.close()

    valid = {name: sum(counts[split][name] for split in records.SPLITS) for name in class_names}
    too_few = {name: n for name, n in valid.items() if n < config.min_images_per_class}
    if too_few:
        details = "; ".join(
            f"{name}: {n} valid" + "".join(
                f"\n    rejected {r['path']}: {r['reason']}"
                for r in rejected if r["path"].startswith(name + "/"))
            for name, n in too_few.items())
        raise PreprocessError(
            f"class(es) with fewer than {config.min_images_per_class} valid images "
            f"(--min-images-per-class): {details}")
    rejected.sort(key=lambda r: r["path"])
    resolved = {key: (str(value) if isinstance(value, Path) else value)
                for key, value in dataclasses.asdict(config).items()}
    return {
        "format_version": records.FORMAT_VERSION,
        "image_size": config.image_size,
        "resize": "stretch",
        "encoding": "jpeg",
        "classes": class_names,
        "counts": counts,
        "totals": {split: sum(counts[split].values()) for split in records.SPLITS},
        "shards": shards,
        "rejected": rejected,
        "rejected_by_reason": dict(Counter(r["reason"].split(":")[0] for r in rejected)),
        "config": resolved,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m components.preprocess",
        description="Check, resize and shard a folder of labelled images into TFRecords.")
    defaults = PreprocessConfig(source=Path(), output=Path())
    parser.add_argument("--source", type=Path, required=True, help="folder of class sub-folders")
    parser.add_argument("--output", type=Path, required=True, help="new folder for shards + manifest.json")
    parser.add_argument("--image-size", type=int, default=defaults.image_size, help="square side in px")
    parser.add_argument("--validation-fraction", type=float, default=defaults.validation_fraction)
    parser.add_argument("--test-fraction", type=float, default=defaults.test_fraction)
    parser.add_argument("--min-images-per-class", type=int, default=defaults.min_images_per_class)
    parser.add_argument("--jpeg-quality", type=int, default=defaults.jpeg_quality)
    parser.add_argument("--shard-size-mb", type=float, default=defaults.shard_size_mb)
    parser.add_argument("--max-pixels", type=int, default=defaults.max_pixels,
                        help="refuse images with more pixels than this (decompression bombs)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from components.cli import configure_logging, exit_on_user_error

    args = build_parser().parse_args(argv)
    configure_logging()
    config = PreprocessConfig(**{key: value for key, value in vars(args).items()})
    with exit_on_user_error(PreprocessError):
        preprocess(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
