"""preprocess: labelled images -> checked, resized, sharded TFRecords + manifest.

    python -m components.preprocess --source data/flowers --output /tmp/prepared --image-size 224
    python -m components.preprocess --source s3://bucket/flowers --output /tmp/prepared
    python -m components.preprocess --source s3://bucket/flowers --fingerprint-only
    python -m components.preprocess --source tfds:beans --tfds-data-dir /mnt/tfds --output /tmp/prepared

The source is a local folder, an S3-compatible prefix or a GCS prefix (`components.storage`),
laid out as `<class>/<file>`, or a TensorFlow Datasets dataset. Every file is read once, by a
pool of worker processes; a file that is not a decodable image (empty, truncated, an HTML page
saved as .jpg, an unsupported format, too many pixels, JPEG data that decodes only with
corruption warnings) is rejected with its reason (`rejected.json`), never a crash. Valid images are
converted to RGB, resized by `components.imaging` (the code the exported model runs) and split
train/validation/test per class, each class's share of each split exact within one image,
by a hash of their resized pixels (`assign_splits`): a re-run gives byte-identical output,
adding an image moves at most one other into each split, and exact duplicates always land in
the same split. The output folder appears only when complete: everything is written to a
staging folder that is renamed at the end, the `_COMPLETE` marker written last.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import functools
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time
import unicodedata
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components import imaging, records, storage
from components.cli import json_config, local_path

log = logging.getLogger(__name__)

# EfficientNet-B0 downsamples by 32: below 32 px its last feature map would be empty.
MIN_IMAGE_SIZE = 32


class PreprocessError(ValueError):
    """The input cannot make a usable dataset; the message names the problem and the files."""


@dataclass(frozen=True)
class PreprocessConfig:
    source: str | Path  # local folder, s3://, minio:// or gs://bucket/prefix, or tfds:NAME[:VERSION]
    output: Path
    image_size: int = 224  # px, square; EfficientNet-B0's native resolution
    # How a non-square image becomes square: stretch (keeps everything, distorts shapes),
    # pad (keeps everything and the aspect ratio, adds bars), crop (fills the frame, loses edges).
    resize: str = "stretch"
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    # A class needs an image in each of the three splits to be trained, tuned and tested.
    min_images_per_class: int = 3
    # Shards store JPEG by default: 224 px at q95 is ~20 KB and near-lossless; PNG is exact
    # (for pixel-precise data such as diagrams or medical scans) at several times the size.
    encoding: str = "jpeg"
    jpeg_quality: int = 95
    shard_size_mb: float = 100.0  # target per shard (TF guidance: 100-200 MB)
    # Pillow's own decompression-bomb threshold: a 218 KB PNG can decode to 675 MB.
    max_pixels: int = 89_478_485
    workers: int = 0  # processes decoding images; 0 = one per CPU core
    # Smallest accepted side in px. Low-resolution datasets (32 px icons, CIFAR-like crops)
    # are legitimate, so by default only degenerate 1-pixel-wide strips are refused.
    min_side: int = 2
    # JPEGs whose scan data libjpeg reports as corrupt while still decoding them (part of the
    # picture grey or garbled) are refused unless this is set.
    allow_damaged: bool = False
    # Where a tfds: source is prepared (a volume or gs:// path); "" = TFDS's default folder.
    tfds_data_dir: str = ""

    def validate(self) -> None:
        if self.image_size < MIN_IMAGE_SIZE:
            raise PreprocessError(
                f"--image-size must be at least {MIN_IMAGE_SIZE} px (EfficientNet-B0 downsamples "
                f"by 32), got {self.image_size}")
        for name in ("validation_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 0.5:
                raise PreprocessError(f"--{name.replace('_', '-')} must be in [0, 0.5), got {value}")
        if self.resize not in imaging.RESIZE_POLICIES:
            raise PreprocessError(f"--resize must be one of {', '.join(imaging.RESIZE_POLICIES)}, "
                                  f"got {self.resize!r}")
        if self.min_images_per_class < 1:
            raise PreprocessError("--min-images-per-class must be at least 1")
        if self.encoding not in ("jpeg", "png"):
            raise PreprocessError(f"--encoding must be jpeg or png, got {self.encoding!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise PreprocessError(f"--jpeg-quality must be in 1..100, got {self.jpeg_quality}")
        if self.shard_size_mb <= 0:
            raise PreprocessError("--shard-size-mb must be positive")
        if self.workers < 0:
            raise PreprocessError("--workers must be 0 (all cores) or more")
        if self.min_side < 1:
            raise PreprocessError("--min-side must be at least 1")


def class_of(key: str) -> str:
    """The class of a source key: its first path component (`<class>/<file>`)."""
    return key.split("/", 1)[0]


def reason_kind(reason: str) -> str:
    """A rejection reason without its specifics ("too small: 1x50, ..." -> "too small")."""
    return reason.split(":")[0]


class Rejected(Exception):
    """One input file cannot be used; `reason` says why in words."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class SourceListing:
    classes: list[str]
    objects: list[storage.SourceObject]  # class files only, sorted by key
    fingerprint: str


def source_fingerprint(source: str, tfds_data_dir: str = "") -> str:
    """The data fingerprint of `source` from its listing alone: what keys a cached preprocess.

    A TFDS dataset is fingerprinted by its name, version and data folder (a prepared TFDS
    version does not change, and listing it would mean copying every image out of it).
    """
    if source.startswith(storage.TFDS_PREFIX):
        return hashlib.sha256(f"{source}|{tfds_data_dir}".encode()).hexdigest()
    try:
        opened = storage.open_source(source)
    except storage.StorageError as error:
        raise PreprocessError(str(error)) from None
    try:
        return list_source(opened).fingerprint
    finally:
        opened.close()


def printable(key: str) -> str:
    """`key` as UTF-8 text: a local file name that is not UTF-8 (an archive made on an old
    Windows, say) with its undecodable bytes written as \\xNN escapes."""
    return key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _folded(name: str) -> str:
    """A class name as a person reads it: "Cats", "cats " and a macOS-decomposed "café" are the
    folders someone meant as one class."""
    return unicodedata.normalize("NFKC", name).casefold().strip()


def list_source(source: storage.Source) -> SourceListing:
    """Classes, their files and the data fingerprint, from the listing alone (no image read)."""
    try:
        objects = source.list()
    except storage.StorageError as error:
        raise PreprocessError(str(error)) from None
    stray = [o.key for o in objects if "/" not in o.key]
    if stray:
        log.warning("ignoring %d file(s) directly under %s (only class sub-folders are read): %s",
                    len(stray), source.uri, ", ".join(stray[:5]))
    objects = [o for o in objects if "/" in o.key]
    classes = sorted({class_of(o.key) for o in objects})
    unnamed = [shown for name in classes if (shown := printable(name)) != name]
    if unnamed:
        raise PreprocessError(f"class folder name(s) not valid UTF-8 in {source.uri}: {', '.join(unnamed)}; "
                              "rename them (class names are stored as UTF-8 text)")
    folded = Counter(_folded(name) for name in classes)
    alike = [name for name in classes if folded[_folded(name)] > 1]
    if alike:
        # ascii(): 'cafe\u0301' and 'caf\xe9' print alike otherwise, as do trailing spaces.
        log.warning("class folders whose names differ only in case, spacing or Unicode form are "
                    "separate classes: %s", ", ".join(ascii(name) for name in alike))
    folders = source.class_folders()
    empty = sorted(set(folders) - set(classes))
    if not classes and not empty:
        raise PreprocessError(
            f"source {source.uri} has no class sub-folders; expected {source.uri}/<class>/<image>")
    if empty:
        raise PreprocessError(f"class folder(s) with no files in {source.uri}: {', '.join(empty)}")
    if len(classes) < 2:
        raise PreprocessError(
            f"source {source.uri} has only one class ({classes[0]}); "
            "a classifier needs at least two class sub-folders")
    digest = hashlib.sha256()
    for item in objects:
        # surrogateescape: a local file name that is not UTF-8 is hashed as the bytes it is.
        digest.update(f"{item.key}\t{item.size}\t{item.etag}\n".encode("utf-8", "surrogateescape"))
    return SourceListing(classes=classes, objects=objects, fingerprint=digest.hexdigest())


def _tf_message(error) -> str:
    """The decoder's own words, without TF's op, device and traceback decoration around them."""
    lines = [line.strip() for line in (error.message or "").splitlines()]
    lines = [line for line in lines if line and not line.startswith(("File ", "Detected at node", "[["))
             and line != "Graph execution error:"]
    message = lines[-1] if lines else type(error).__name__
    message = re.sub(r"^\{\{[^}]*\}\}\s*", "", message)
    return re.sub(r"\s*\[Op:[^\]]*\].*$", "", message)


def _check_header(data: bytes, config: PreprocessConfig) -> tuple[str, int, int]:
    """(format, width, height) from the file's header alone, or `Rejected` before any decoding."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise Rejected("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as header:  # reads the header only, no pixels
            image_format, (width, height) = header.format, header.size
    except Image.DecompressionBombError as error:
        raise Rejected(f"too many pixels: {error}") from None
    except UnidentifiedImageError:
        raise Rejected(_unidentified(data)) from None
    except OSError as error:
        fmt = _signature(data)
        if fmt and (cut := _cut_short(fmt, data)):
            raise Rejected(f"truncated image data ({fmt}): {cut}") from None
        raise Rejected(f"corrupt or truncated image header: {error}") from None
    if image_format not in imaging.DECODABLE_FORMATS:
        raise Rejected(f"unsupported image format {image_format}; accepted: "
                       f"{', '.join(imaging.DECODABLE_FORMATS)}")
    if width * height > config.max_pixels:
        raise Rejected(f"too many pixels: {width}x{height} is over the cap of {config.max_pixels}")
    if min(width, height) < config.min_side:
        raise Rejected(f"too small: {width}x{height}, a side under --min-side {config.min_side} px")
    if image_format == "GIF":
        most = config.max_pixels // (width * height)  # frames that fit under the cap
        if _gif_frames(data, stop_after=most + 1) > most:
            raise Rejected(f"too many pixels: more than {most} frames of {width}x{height}, over the "
                           f"cap of {config.max_pixels} in all (TensorFlow decodes every frame of a "
                           "GIF to take the first)")
    return image_format, width, height


SIGNATURES = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG", b"GIF87a": "GIF", b"GIF89a": "GIF"}
# ISO media brands (bytes 8-12, after "ftyp") of HEIF stills: what iPhones save photos as.
HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1")


def _gif_frames(data: bytes, stop_after: int) -> int:
    """How many frames a GIF holds, from its block structure alone (no decoding), counting no
    further than `stop_after`. A GIF of thousands of frames of one colour is a few hundred KB
    that TF's decoder (giflib's DGifSlurp) expands into every frame's pixels at once."""
    at = 13
    if len(data) > 10 and data[10] & 0x80:  # the global colour table
        at += 3 << ((data[10] & 7) + 1)
    frames = 0
    while at < len(data) and frames < stop_after:
        block = data[at]
        if block == 0x2C:  # an image: its descriptor, a local colour table, the LZW code size
            packed = data[at + 9] if at + 9 < len(data) else 0
            at += 10 + ((3 << ((packed & 7) + 1)) if packed & 0x80 else 0) + 1
            frames += 1
        elif block == 0x21:  # an extension: its label
            at += 2
        else:  # the trailer, or bytes that are no GIF block: TF's decoder will judge the rest
            break
        while at < len(data) and data[at]:  # data sub-blocks, each led by its size
            at += data[at] + 1
        at += 1
    return frames


def _signature(data: bytes) -> str | None:
    """The accepted format a file's first bytes announce, whatever follows them."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:2] == b"BM" and len(data) >= 18 and int.from_bytes(data[14:18], "little") in BMP_HEADER_SIZES:
        return "BMP"
    return next((name for magic, name in SIGNATURES.items() if data.startswith(magic)), None)


BMP_HEADER_SIZES = (12, 40, 52, 56, 64, 108, 124)  # the DIB header versions


def _unidentified(data: bytes) -> str:
    """Why a file Pillow cannot identify is refused, in words that say what to do about it:
    the files found next to photos (iPhone HEIC stills and Live Photo videos, SVG drawings,
    saved web pages, PDFs, archives) and image files whose header is broken are told apart by
    their first bytes."""
    fmt = _signature(data)
    if fmt == "JPEG" and (variant := _jpeg_variant(data)):
        return _unsupported_jpeg(variant, "read from its frame header")
    if fmt:
        return f"corrupt or truncated image header: a {fmt} file whose header cannot be parsed"
    if data[4:8] == b"ftyp":
        if data[8:12] in HEIF_BRANDS:
            return ("unsupported image format HEIF (HEIC, as iPhones save photos): TensorFlow, which "
                    "the served model decodes with, cannot read it; convert the file to JPEG")
        return "not an image: a video or other ISO media file (MP4, QuickTime: a Live Photo's video?)"
    start = data[:1024].removeprefix(b"\xef\xbb\xbf").lstrip().lower()
    hint = ""
    if start.startswith((b"<html", b"<!doctype html")):
        hint = " (it looks like an HTML page)"
    elif start.startswith((b"<?xml", b"<svg", b"<!--")) and b"<svg" in start:
        hint = " (it looks like an SVG drawing: export it as PNG)"
    elif start.startswith(b"%pdf"):
        hint = " (it looks like a PDF document)"
    elif data.startswith(b"PK\x03\x04"):
        hint = " (it looks like a ZIP archive: extract it into the class folder)"
    return f"not an image: unrecognised file format{hint}"


# SOFn markers (ITU T.81, table B.1) of the frames TF's libjpeg cannot decode.
LOSSLESS_FRAMES = (0xC3, 0xC7, 0xCB, 0xCF)
HIERARCHICAL_FRAMES = (0xC5, 0xC6, 0xC7, 0xCD, 0xCE, 0xCF)


def _jpeg_variant(data: bytes) -> str:
    """The JPEG variant a file declares in its frame header that TF cannot decode (lossless,
    hierarchical, other than 8-bit samples, as medical and scientific cameras write), or ""
    for the 8-bit baseline and progressive JPEGs it reads, and for anything unparseable."""
    at = 2
    while at + 4 < len(data) and data[at] == 0xFF:
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            kinds = ["lossless"] if marker in LOSSLESS_FRAMES else []
            kinds += ["hierarchical"] if marker in HIERARCHICAL_FRAMES else []
            kinds += [f"{data[at + 4]}-bit samples"] if data[at + 4] != 8 else []
            return ", ".join(kinds)
        if marker == 0xDA:  # a scan before any frame header
            return ""
        at += 2 + int.from_bytes(data[at + 2:at + 4], "big")
    return ""


def _unsupported_jpeg(variant: str, detail: str) -> str:
    return (f"unsupported JPEG variant ({variant}): TensorFlow, which the served model decodes with, "
            f"cannot read it ({detail}); converting the file to PNG keeps it")


# TF's BMP reader is its own and reads only some BMP variants (not 1-bit, say). For the other
# formats TF uses the very libraries Pillow does (libjpeg-turbo, libpng, giflib, libwebp), and
# a file that Pillow reads but TF refuses is damaged data Pillow tolerates: a JPEG with garbled
# scan bytes, seen called an "unsupported JPEG variant" when every format was asked.
PARTLY_SUPPORTED_FORMATS = ("BMP",)


def _pillow_decodes(data: bytes) -> bool:
    """Whether Pillow reads every pixel: tells a file of a PARTLY_SUPPORTED_FORMATS variant TF
    cannot decode from a broken one. Only asked after TF has failed, so it costs nothing on
    good files."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
        return True
    except Exception:  # noqa: BLE001 - any failure means "broken" here
        return False


def _digest(pixels) -> str:
    """sha256 of the pixels a record holds, before encoding. The same decoded pixels give the
    same digest whatever the file name, format or metadata, and two files that differ only in
    detail the resize removes would be the same training example anyway. Hashing these rather
    than the full decode costs 0.08 ms instead of 0.46 (427x640 input, bench/RESULTS.md)."""
    return hashlib.sha256(pixels.tobytes()).hexdigest()


def check_and_resize(data: bytes, config: PreprocessConfig) -> tuple[bytes, str, tuple[int, int]]:
    """Validate one encoded image; return (JPEG bytes at image_size, sha256 of its resized
    pixels, its original (width, height)).

    Raises `Rejected` with a reason a person can act on.
    """
    import tensorflow as tf

    image_format, width, height = _check_header(data, config)
    if image_format == "WEBP" and imaging.is_animated_webp(data):
        data = _first_frame(data)
    run = _decode_resize_encode(config.image_size, config.resize, config.encoding, config.jpeg_quality)
    failure = None
    with _native_stderr().capture() as printed:
        try:
            # An explicit tensor: handed the bytes, the traced function converts them by a path
            # that costs 0.8 ms on a 1.5 MB photo where this takes 0.14 ms (bench/RESULTS.md).
            pixels, encoded = run(tf.constant(data))
        except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as error:
            failure = error
    if failure is not None:
        raise Rejected(_decode_failure(image_format, data, failure)) from None
    damage = [line.strip() for line in printed if line.strip().startswith(DAMAGED_JPEG_WARNINGS)]
    if damage and not config.allow_damaged:
        raise Rejected(f"damaged image data, decodable only with defects ({image_format}): "
                       f"{damage[0]}; --allow-damaged keeps such files")
    other = [line for line in printed if line.strip() and line.strip() not in damage]
    if other:  # not ours to judge: pass on whatever else native code printed
        print("\n".join(other), file=sys.stderr)
    return encoded.numpy(), _digest(pixels.numpy()), (width, height)


def _first_frame(data: bytes) -> bytes:
    """An animated WebP's first frame as a lossless PNG (alpha kept, composited by the TF path
    like any other). TF's WebP decoder cannot read animations (imaging.decode), so Pillow's
    libwebp takes the frame out; the served model refuses animated WebPs with a clear error."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as animation:
            animation.seek(0)
            frame = animation.convert("RGBA")
    except Exception as error:  # noqa: BLE001 - whatever libwebp says, the file is broken
        raise Rejected(f"corrupt or truncated image data (WEBP, animated): {error}") from None
    buffer = io.BytesIO()
    frame.save(buffer, format="PNG", compress_level=1)  # read back at once: speed over size
    return buffer.getvalue()


def _decode_failure(image_format: str, data: bytes, error) -> str:
    """Why TF could not decode a file whose header is fine, as precisely as the file tells."""
    if image_format == "JPEG" and (variant := _jpeg_variant(data)):
        return _unsupported_jpeg(variant, _tf_message(error))
    if image_format in PARTLY_SUPPORTED_FORMATS and _pillow_decodes(data):
        return (f"unsupported {image_format} variant: TensorFlow, which the served model decodes with, "
                f"cannot read it ({_tf_message(error)}); converting the file to PNG keeps it")
    # From the file's structure alone: TF also logs how far libjpeg got, but whether that line
    # is printed depends on TF's log level, and a re-run must give the same manifest.
    if cut := _cut_short(image_format, data):
        return f"truncated image data ({image_format}): {cut}"
    if image_format == "PNG" and (bad := _png_bad_chunk(data)):
        return f"corrupt image data (PNG): {bad}"
    return f"corrupt or truncated image data ({image_format}): {_tf_message(error)}"


PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def _cut_short(image_format: str, data: bytes) -> str:
    """How a file shows it was cut short (an interrupted upload or copy), from the structure its
    format gives it: the size its header declares, the marker it must end with. "" if it does
    not show."""
    declared = 0
    if image_format == "WEBP" and len(data) >= 8:
        declared = int.from_bytes(data[4:8], "little") + 8
    elif image_format == "BMP" and len(data) >= 6:
        declared = int.from_bytes(data[2:6], "little")
    if declared > len(data):
        return f"the header declares {declared:,} bytes and the file has {len(data):,}"
    if image_format == "PNG" and PNG_END not in data[-64:]:
        return "the file ends before the IEND chunk that closes every PNG"
    if image_format == "JPEG" and not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        return "the file ends before the end-of-image marker that closes every JPEG"
    if image_format == "GIF" and not data.rstrip(b"\x00").endswith(b";"):
        return "the file ends before the trailer byte that closes every GIF"
    return ""


def _png_bad_chunk(data: bytes) -> str:
    """The first PNG chunk whose CRC does not match its bytes, or ""."""
    at = 8
    while at + 12 <= len(data):
        length = int.from_bytes(data[at:at + 4], "big")
        kind = data[at + 4:at + 8]
        body_end = at + 8 + length
        if body_end + 4 > len(data):
            return ""
        if zlib.crc32(data[at + 4:body_end]) != int.from_bytes(data[body_end:body_end + 4], "big"):
            return f"chunk {kind.decode('latin-1')!r} at byte {at:,} fails its CRC check"
        if kind == b"IEND":
            return ""
        at = body_end + 4
    return ""


Checked = tuple[bytes, str, tuple[int, int]] | Rejected


def check_and_resize_many(datas: list[bytes], config: PreprocessConfig) -> list[Checked]:
    """`check_and_resize` of each item, a `Rejected` in place of an exception: the same results,
    byte for byte, with the images that pass the header checks decoded in one TF call. Each
    call costs ~0.2 ms of overhead on this project's 2-core machine, a tenth of a 427x640
    photo's whole work (bench/RESULTS.md). When that call fails or native code prints anything,
    the batch is redone one image at a time, so that each error and each libjpeg warning is
    pinned on the file it belongs to."""
    import tensorflow as tf

    results: list[Checked | None] = [None] * len(datas)
    passed: list[tuple[int, tuple[int, int]]] = []
    animations: list[int] = []  # animated WebPs: Pillow takes out their first frame, one by one
    for index, data in enumerate(datas):
        try:
            image_format, width, height = _check_header(data, config)
        except Rejected as rejection:
            results[index] = rejection
            continue
        if image_format == "WEBP" and imaging.is_animated_webp(data):
            animations.append(index)
        else:
            passed.append((index, (width, height)))
    if len(passed) > 1:
        run = _decode_resize_encode_many(config.image_size, config.resize, config.encoding,
                                         config.jpeg_quality)
        with _native_stderr().capture() as printed:
            try:
                pixels, encoded = run(tf.constant([datas[index] for index, _ in passed]))
            except tf.errors.OpError:  # which file, and why: the one-by-one pass says
                pixels = encoded = None
        if encoded is not None and not any(line.strip() for line in printed):
            pixels, encoded = pixels.numpy(), encoded.numpy()
            for position, (index, size) in enumerate(passed):
                results[index] = (encoded[position], _digest(pixels[position]), size)
            passed = []
    for index in [index for index, _ in passed] + animations:
        try:
            results[index] = check_and_resize(datas[index], config)
        except Rejected as rejection:
            results[index] = rejection
    return results  # type: ignore[return-value]


# libjpeg's warnings (jerror.h, JWRN_*) for scan data it decoded anyway, filling what it could
# not read with grey or garbage. Benign warnings (an unknown JFIF revision, say) are not here.
DAMAGED_JPEG_WARNINGS = ("Corrupt JPEG data", "Premature end of JPEG file",
                         "Inconsistent progression sequence")


class _NativeStderr:
    """Collects what native code writes to file descriptor 2 while a block runs.

    libjpeg reports damaged-but-decodable data only by printing a warning from C, and TF and
    Pillow both return the pixels as if nothing were wrong, so the warning text is the only
    signal there is. One capture file per process, reused for every image."""

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the process)

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[str]]:
        lines: list[str] = []
        sys.stderr.flush()
        saved = os.dup(2)
        fd = self._file.fileno()
        os.dup2(fd, 2)
        try:
            yield lines
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            size = os.fstat(fd).st_size
            if size:
                lines.extend(os.pread(fd, size, 0).decode(errors="replace").splitlines())
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)


@functools.cache
def _native_stderr() -> _NativeStderr:
    return _NativeStderr()


def _decode_resize_encode_one(image_size: int, policy: str, encoding: str, jpeg_quality: int):
    import tensorflow as tf

    def one(data):
        decoded = imaging.decode(data, target_size=image_size)
        pixels = imaging.resize(decoded, image_size, policy)
        if encoding == "png":
            return pixels, tf.io.encode_png(pixels)
        return pixels, tf.io.encode_jpeg(pixels, quality=jpeg_quality, chroma_downsampling=False)

    return one


@functools.cache
def _decode_resize_encode(image_size: int, policy: str, encoding: str, jpeg_quality: int):
    """The per-image TF work as one graph, traced once: run eagerly, the decoder's dozens of
    small ops (format switch, EXIF parsing) cost more than the decoding itself (measured:
    74 img/s eager against 524 for a plain decode-resize-encode, bench/preprocess.py)."""
    import tensorflow as tf

    one = _decode_resize_encode_one(image_size, policy, encoding, jpeg_quality)
    return tf.function(one, input_signature=[tf.TensorSpec([], tf.string)],
                       autograph=False).get_concrete_function()


@functools.cache
def _decode_resize_encode_many(image_size: int, policy: str, encoding: str, jpeg_quality: int):
    """The same graph mapped over a vector of encoded images. One image at a time
    (parallel_iterations=1): memory stays that of one decode, as in the single-image path."""
    import tensorflow as tf

    one = _decode_resize_encode_one(image_size, policy, encoding, jpeg_quality)

    def many(datas):
        return tf.map_fn(one, datas, parallel_iterations=1, fn_output_signature=(
            tf.TensorSpec([image_size, image_size, 3], tf.uint8), tf.TensorSpec([], tf.string)))

    # Without AutoGraph: the graph has no Python control flow to convert (its branches are
    # explicit tf.cond), and converting it cost every worker process 1.1 s of CPU at start,
    # the work of about 500 photos (bench/RESULTS.md).
    return tf.function(many, input_signature=[tf.TensorSpec([None], tf.string)],
                       autograph=False).get_concrete_function()


@dataclass(frozen=True)
class Processed:
    key: str
    label: int
    digest: str  # of the resized pixels

    @property
    def position(self) -> float:
        """A number in [0, 1) fixed by the content alone: it decides the split."""
        return int(self.digest[:13], 16) / 16**13


def assign_splits(images: list[Processed], config: PreprocessConfig) -> dict[str, str]:
    """key -> split, exact per class and stable.

    Each class gets `round(n * fraction)` of its n images for test and for validation, at
    least one each (while a distinct image is left for training), so that class shares match
    the data within one image. Which images: a class's distinct images ranked by their content
    hash, the lowest to test, the highest to validation, the middle to training. The same
    input gives the same split, and adding an image moves at most one other into each split
    (test and validation grow from the training middle, never from each other). Duplicates
    (the same resized pixels) are one unit and share a split, across classes too: a unit
    another class has placed keeps its split and counts towards this class's shares."""
    placed: dict[str, str] = {}  # digest -> split, across classes
    by_class: dict[int, dict[str, list[Processed]]] = {}
    for image in images:
        by_class.setdefault(image.label, {}).setdefault(image.digest, []).append(image)
    for label in sorted(by_class):
        units = sorted(by_class[label].items(), key=lambda unit: (unit[1][0].position, unit[0]))
        total = sum(len(members) for _, members in units)
        quota = {split: max(1, math.floor(total * fraction + 0.5)) if fraction > 0 else 0
                 for split, fraction in (("test", config.test_fraction),
                                         ("validation", config.validation_fraction))}
        filled = Counter()
        for digest, members in units:
            if digest in placed:
                filled[placed[digest]] += len(members)
        free = [(digest, len(members)) for digest, members in units if digest not in placed]
        keep = 0 if filled["train"] else 1  # a distinct image left for training
        low, high = 0, len(free) - 1
        wants_validation = filled["validation"] < quota["validation"]
        while filled["test"] < quota["test"] and high - low + 1 > keep + wants_validation:
            placed[free[low][0]] = "test"
            filled["test"] += free[low][1]
            low += 1
        while filled["validation"] < quota["validation"] and high - low + 1 > keep:
            placed[free[high][0]] = "validation"
            filled["validation"] += free[high][1]
            high -= 1
        for digest, _ in free[low:high + 1]:
            placed[digest] = "train"
    return {image.key: placed[image.digest] for image in images}


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


# (key, record or None, digest or rejection reason, original (width, height) or None)
WorkResult = tuple[str, bytes | None, str, tuple[int, int] | None]

# Worker-process state: one source client and config per process, set by _init_worker.
_WORKER: dict[str, Any] = {}


def _init_worker(source_uri: str, config: PreprocessConfig, classes: list[str]) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    # One thread per process: the processes are the parallelism, and TF's own thread pools
    # would fight over the same cores. In-process (a single worker) TF may already be running,
    # in a notebook say, and then its pools stay as they are.
    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        pass
    _WORKER["source"] = storage.open_source(source_uri)
    _WORKER["config"] = config
    _WORKER["labels"] = {name: index for index, name in enumerate(classes)}


def _work(keys: list[str]) -> list[WorkResult]:
    """(key, serialised record or None, pixel digest or rejection reason, size) per source file.

    The records are built here, not in the parent: the parent only routes bytes to disk, so it
    does not become the bottleneck as workers are added."""
    config = _WORKER["config"]
    readable: dict[str, bytes] = {}
    unreadable: dict[str, str] = {}
    for key in keys:
        try:
            readable[key] = _WORKER["source"].read(key)
        except storage.StorageError as error:
            unreadable[key] = f"unreadable: {error}"
    checked = dict(zip(readable, check_and_resize_many(list(readable.values()), config), strict=True))
    results: list[WorkResult] = []
    for key in keys:
        outcome = checked.get(key)
        if outcome is None:
            results.append((key, None, unreadable[key], None))
        elif isinstance(outcome, Rejected):
            results.append((key, None, outcome.reason, None))
        else:
            encoded, digest, size = outcome
            class_name = class_of(key)
            record = records.make_example(encoded, _WORKER["labels"][class_name], class_name,
                                          config.image_size, config.image_size, printable(key),
                                          config.encoding)
            results.append((key, record, digest, size))
    return results


def _resolved_workers(config: PreprocessConfig, files: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    wanted = config.workers or cores
    # Each worker imports TensorFlow and traces its graph (~2.5 s of CPU): not worth it for a
    # handful of files.
    return max(1, min(wanted, math.ceil(files / 100)))


# Files per unit of work: one TF call decodes them all (check_and_resize_many).
CHUNK = 16


def _process_all(source_uri: str, keys: list[str], config: PreprocessConfig,
                 classes: list[str]) -> Iterator[WorkResult]:
    """Every file's result, in the order of `keys` whatever the number of workers."""
    workers = _resolved_workers(config, len(keys))
    chunks = [keys[start:start + CHUNK] for start in range(0, len(keys), CHUNK)]
    if workers == 1:
        _init_worker(source_uri, config, classes)
        for chunk in chunks:
            yield from _work(chunk)
        return
    log.info("decoding with %d worker processes", workers)
    yield from _in_processes(chunks, workers, (source_uri, config, classes))


def _pool(workers: int, initargs: tuple) -> concurrent.futures.ProcessPoolExecutor:
    return concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"),  # fork would copy TF's threads and locks
        initializer=_init_worker, initargs=initargs)


def _in_processes(chunks: list[list[str]], workers: int, initargs: tuple,
                  work=_work) -> Iterator[WorkResult]:
    """The chunks' results in order, from `workers` processes with at most 2 chunks each queued.

    A file that kills its process (a decoder bug: TF 2.21 aborts on some inputs) must not hang
    the run, as it would with multiprocessing.Pool, which waits forever for the lost task; the
    executor reports it instead, and the chunks that were in flight are redone one file per
    task, so that the culprit is rejected with its reason and every other file is kept."""
    executor = _pool(workers, initargs)
    in_flight: collections.deque[tuple[list[str], concurrent.futures.Future]] = collections.deque()
    submitted = 0
    finished = False
    try:
        while in_flight or submitted < len(chunks):
            while submitted < len(chunks) and len(in_flight) < 2 * workers:
                in_flight.append((chunks[submitted], executor.submit(work, chunks[submitted])))
                submitted += 1
            chunk, future = in_flight.popleft()
            try:
                results = future.result()
            except concurrent.futures.process.BrokenProcessPool:
                executor.shutdown(wait=True, cancel_futures=True)
                lost = [key for lost_chunk in [chunk, *(c for c, _ in in_flight)] for key in lost_chunk]
                in_flight.clear()
                log.warning("a worker process died; redoing its %d files one at a time to find which",
                            len(lost))
                yield from _one_file_per_process_task(lost, initargs, work)
                executor = _pool(workers, initargs)
                continue
            yield from results
        finished = True
    finally:
        # Done: the workers exit (TF's teardown, ~1 s) while this process writes the shards.
        executor.shutdown(wait=not finished, cancel_futures=True)


def _one_file_per_process_task(keys: list[str], initargs: tuple, work) -> Iterator[WorkResult]:
    executor = _pool(1, initargs)
    try:
        for key in keys:
            try:
                yield from executor.submit(work, [key]).result()
            except concurrent.futures.process.BrokenProcessPool:
                yield key, None, "crashed the image decoder (its process died while decoding this file)", None
                executor.shutdown(wait=True)
                executor = _pool(1, initargs)
    finally:
        executor.shutdown(wait=True)


SPILL_BUCKETS = 16  # records are spilled by digest prefix: memory holds 1/16 of the data at once


def preprocess(config: PreprocessConfig) -> dict[str, Any]:
    """Run the step; returns the manifest (also written to `<output>/manifest.json`)."""
    config.validate()
    try:
        source = storage.open_source(str(config.source), tfds_data_dir=config.tfds_data_dir or None,
                                     scratch=config.output.parent / f".{config.output.name}.tfds")
    except storage.StorageError as error:
        raise PreprocessError(str(error)) from None
    try:
        if isinstance(source, storage.LocalSource) and \
                Path(os.path.realpath(config.output)).is_relative_to(os.path.realpath(source.root)):
            raise PreprocessError(
                f"--output {config.output} is inside --source {source.root}: the next run would read "
                "the shards as images; choose an output folder outside the source")
        listing = list_source(source)
        log.info("found %d files in %d classes under %s (data fingerprint %s)", len(listing.objects),
                 len(listing.classes), source.uri, listing.fingerprint[:16])
        staging = _staging_folder(config.output)
        try:
            manifest = _build(config, source, listing, staging)
            if config.output.exists():
                config.output.rmdir()  # an empty folder made for us (as KFP does)
            staging.rename(config.output)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    finally:
        source.close()
    log.info("wrote %s: %s; rejected %d file(s)", config.output,
             ", ".join(f"{split} {n}" for split, n in manifest["totals"].items()), len(manifest["rejected"]))
    for split in ("validation", "test"):  # what the scores will rest on, class by class
        per_class = manifest["counts"][split]
        shown = ", ".join(f"{name} {n}" for name, n in list(per_class.items())[:20])
        log.info("%s: %d image(s): %s%s", split, manifest["totals"][split], shown,
                 f", ... ({len(per_class) - 20} more classes)" if len(per_class) > 20 else "")
    return manifest


# 16-bit RGBA stored uncompressed (PNG, BMP) is the most any accepted format spends on a pixel.
MAX_BYTES_PER_PIXEL = 8
METADATA_ALLOWANCE = 64 * 1024 * 1024  # EXIF, ICC profiles, a phone's motion-photo video


def max_file_bytes(config: PreprocessConfig) -> int:
    """The largest file that can hold an accepted image: anything larger (a video, an archive
    of the dataset left inside it) is refused from the listing's size, without reading it into
    a worker's memory."""
    return config.max_pixels * MAX_BYTES_PER_PIXEL + METADATA_ALLOWANCE


def _build(config: PreprocessConfig, source: storage.Source, listing: SourceListing,
           staging: Path) -> dict[str, Any]:
    label_of = {name: index for index, name in enumerate(listing.classes)}
    spill_dir = staging / ".spill"
    spill_dir.mkdir()
    # No TensorFlow in this process unless it decodes too (one worker): with worker processes
    # its import here would only delay them (bench/RESULTS.md).
    spills = [records.TFRecordFile(spill_dir / f"{b:02d}.tfrecord", hashed=False)
              for b in range(SPILL_BUCKETS)]
    spilled_keys: list[list[str]] = [[] for _ in range(SPILL_BUCKETS)]  # write order per bucket
    processed: list[Processed] = []
    short_sides: list[int] = []
    rejected: list[dict[str, str]] = []
    progress = _Progress(len(listing.objects), "preprocess")
    try:
        def reject(key: str, reason: str) -> None:
            progress.step()
            log.warning("rejected %s: %s", printable(key), printable(reason))
            rejected.append({"path": printable(key), "reason": printable(reason)})

        cap = max_file_bytes(config)
        for item in listing.objects:
            if item.size > cap:
                reject(item.key, f"too large: {item.size:,} bytes, more than an accepted image of at most "
                                 f"--max-pixels {config.max_pixels:,} can be ({cap:,}); not read")
        keys = [item.key for item in listing.objects if item.size <= cap]
        for key, record, detail, size in _process_all(source.worker_uri, keys, config, listing.classes):
            if record is None:
                reject(key, detail)
                continue
            progress.step()
            class_name = class_of(key)
            item = Processed(key=key, label=label_of[class_name], digest=detail)
            processed.append(item)
            short_sides.append(min(size))
            bucket = int(detail[0], 16)
            spills[bucket].write(record)
            spilled_keys[bucket].append(key)
    finally:
        for writer in spills:
            writer.close()

    valid = Counter(listing.classes[p.label] for p in processed)
    too_few = {name: valid.get(name, 0) for name in listing.classes
               if valid.get(name, 0) < config.min_images_per_class}
    if too_few:
        details = "; ".join(
            f"{name}: {n} valid" + "".join(
                f"\n    rejected {r['path']}: {r['reason']}"
                for r in rejected if r["path"].startswith(name + "/"))
            for name, n in too_few.items())
        raise PreprocessError(
            f"class(es) with fewer than {config.min_images_per_class} valid images "
            f"(--min-images-per-class): {details}")

    splits = assign_splits(processed, config)
    writers = {split: records.ShardWriter(staging, split, int(config.shard_size_mb * 1024 * 1024))
               for split in records.SPLITS}
    digest_of = {p.key: p.digest for p in processed}
    for bucket in range(SPILL_BUCKETS):
        path = spill_dir / f"{bucket:02d}.tfrecord"
        batch = list(zip(spilled_keys[bucket], records.read_tfrecord_file(path), strict=True))
        # Shards in content-hash order: classes interleaved, so a reader's shuffle buffer
        # never sees a run of one class.
        for key, raw in sorted(batch, key=lambda item: (digest_of[item[0]], item[0])):
            writers[splits[key]].write(raw)
        path.unlink()
    spill_dir.rmdir()
    shards = {split: writer.close() for split, writer in writers.items()}

    counts = {split: {name: 0 for name in listing.classes} for split in records.SPLITS}
    for item in processed:
        counts[splits[item.key]][listing.classes[item.label]] += 1
    duplicates = len(processed) - len({p.digest for p in processed})
    conflicts = _label_conflicts(processed)
    if conflicts:
        log.warning("%d image(s) are in more than one class with identical pixels (contradictory "
                    "labels), e.g. %s; all are kept and listed in the manifest's label_conflicts",
                    len(conflicts), " = ".join(conflicts[0]))
    train_counts = counts["train"]
    total_train = sum(train_counts.values())
    # Inverse-frequency weights, mean 1 over training images: the usual Keras `class_weight`.
    class_weights = {name: round(total_train / (len(listing.classes) * n), 6) if n else 0.0
                     for name, n in train_counts.items()}
    rejected.sort(key=lambda r: r["path"])
    manifest = {
        "format_version": records.FORMAT_VERSION,
        "source": source.uri,
        "fingerprint": listing.fingerprint,
        "image_size": config.image_size,
        "resize": config.resize,
        "encoding": config.encoding,
        "decoding": {"exif_orientation": "applied", "alpha_background": "white", "animation": "first frame"},
        "classes": listing.classes,
        "counts": counts,
        "totals": {split: sum(counts[split].values()) for split in records.SPLITS},
        "shards": shards,
        "class_weights": class_weights,
        "imbalance_ratio": round(max(valid.values()) / max(min(valid.values()), 1), 3),
        "duplicates": duplicates,
        "label_conflicts": conflicts,
        "rejected": rejected,
        "rejected_by_reason": dict(sorted(Counter(reason_kind(r["reason"]) for r in rejected).items())),
        "config": json_config(config),
    }
    if manifest["imbalance_ratio"] > 3:
        log.warning("class imbalance: the largest class has %.1fx the images of the smallest; "
                    "class weights are in the manifest", manifest["imbalance_ratio"])
    manifest["short_side_histogram"] = _histogram(short_sides)
    (staging / "rejected.json").write_text(json.dumps(rejected, indent=2) + "\n")
    (staging / REPORT).write_text(render_report(manifest))
    records.write_manifest(staging, manifest)
    return manifest


def _label_conflicts(processed: list[Processed]) -> list[list[str]]:
    """Files with the same pixels filed under more than one class, a sorted list of paths per
    image. Kept: which label is right is for a person to say, and dropping both would lose a
    good example; but training on them teaches the model a contradiction, so they are told."""
    by_digest: dict[str, list[Processed]] = defaultdict(list)
    for item in processed:
        by_digest[item.digest].append(item)
    return sorted(sorted(printable(item.key) for item in items) for items in by_digest.values()
                  if len({item.label for item in items}) > 1)


REPORT = "report.md"
REPORT_EXAMPLES = 10  # conflicting files listed in the report; the manifest has them all
SIZE_BINS = (32, 64, 128, 224, 512, 1024, 2048)  # px, short side of the original image


def _histogram(short_sides: list[int]) -> dict[str, int]:
    edges = (0, *SIZE_BINS)
    labels = [f"{low}-{high - 1}" for low, high in zip(edges, SIZE_BINS, strict=False)]
    labels.append(f">={SIZE_BINS[-1]}")
    counts = dict.fromkeys(labels, 0)
    for side in short_sides:
        index = sum(side >= edge for edge in SIZE_BINS)
        counts[labels[index]] += 1
    return counts


def render_report(manifest: dict[str, Any]) -> str:
    """A Markdown page a person reads before trusting the data (KFP shows it as a Markdown artifact)."""
    classes = manifest["classes"]
    lines = [
        "# Preprocess report", "",
        f"Source `{manifest['source']}`, fingerprint `{manifest['fingerprint'][:16]}`, "
        f"{manifest['image_size']} px ({manifest['resize']}).", "",
        "## Images per split and class", "",
        "| class | " + " | ".join(records.SPLITS) + " | total | class weight |",
        "|---|" + "---:|" * (len(records.SPLITS) + 2),
    ]
    for name in classes:
        per_split = [manifest["counts"][split][name] for split in records.SPLITS]
        lines.append(f"| {name} | " + " | ".join(map(str, per_split))
                     + f" | {sum(per_split)} | {manifest['class_weights'][name]:.3f} |")
    totals = [manifest["totals"][split] for split in records.SPLITS]
    lines += ["| **all** | " + " | ".join(map(str, totals)) + f" | {sum(totals)} | |", "",
              f"Largest / smallest class: {manifest['imbalance_ratio']}x. "
              "Exact duplicates (the same pixels once decoded and resized, kept in one split): "
              f"{manifest['duplicates']}.", ""]
    conflicts = manifest["label_conflicts"]
    if conflicts:
        lines += [f"## The same image in more than one class: {len(conflicts)}", "",
                  "Identical pixels with different labels. All are kept; keep each in one class.", ""]
        lines += [f"- {' = '.join(f'`{path}`' for path in group)}" for group in conflicts[:REPORT_EXAMPLES]]
        if len(conflicts) > REPORT_EXAMPLES:
            more = len(conflicts) - REPORT_EXAMPLES
            lines.append(f"- ... {more} more in `manifest.json` (label_conflicts)")
        lines.append("")
    lines += [f"## Rejected: {len(manifest['rejected'])}", ""]
    if manifest["rejected"]:
        lines += ["| reason | files | examples |", "|---|---:|---|"]
        for reason, count in manifest["rejected_by_reason"].items():
            examples = [r["path"] for r in manifest["rejected"] if reason_kind(r["reason"]) == reason][:3]
            lines.append(f"| {reason} | {count} | " + ", ".join(f"`{e}`" for e in examples) + " |")
        lines += ["", "Every rejected file with its full reason: `rejected.json`."]
    lines += ["", "## Original image sizes (short side, px)", "", "| short side | images |", "|---|---:|"]
    lines += [f"| {label} | {count} |" for label, count in manifest["short_side_histogram"].items()]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m components.preprocess",
        description="Check, resize and shard a folder of labelled images into TFRecords.")
    defaults = PreprocessConfig(source=Path(), output=Path())
    parser.add_argument("--source", required=True,
                        help="folder of class sub-folders, s3://, minio:// or gs://bucket/prefix, "
                             "or tfds:NAME[:VERSION]")
    parser.add_argument("--output", type=local_path, help="new folder for shards + manifest.json")
    parser.add_argument("--fingerprint-only", action="store_true",
                        help="print the data fingerprint (from the listing, no image read) and exit")
    parser.add_argument("--image-size", type=int, default=defaults.image_size, help="square side in px")
    parser.add_argument("--resize", choices=imaging.RESIZE_POLICIES, default=defaults.resize,
                        help="how a non-square image becomes square")
    parser.add_argument("--validation-fraction", type=float, default=defaults.validation_fraction)
    parser.add_argument("--test-fraction", type=float, default=defaults.test_fraction)
    parser.add_argument("--min-images-per-class", type=int, default=defaults.min_images_per_class)
    parser.add_argument("--encoding", choices=("jpeg", "png"), default=defaults.encoding,
                        help="how resized images are stored in the shards")
    parser.add_argument("--jpeg-quality", type=int, default=defaults.jpeg_quality)
    parser.add_argument("--shard-size-mb", type=float, default=defaults.shard_size_mb)
    parser.add_argument("--max-pixels", type=int, default=defaults.max_pixels,
                        help="refuse images with more pixels than this (decompression bombs)")
    parser.add_argument("--workers", type=int, default=defaults.workers, help="0 = one per CPU core")
    parser.add_argument("--min-side", type=int, default=defaults.min_side,
                        help="refuse images with a side shorter than this (px)")
    parser.add_argument("--tfds-data-dir", default=defaults.tfds_data_dir,
                        help="folder or gs:// path holding prepared TFDS data (for tfds: sources)")
    parser.add_argument("--allow-damaged", action="store_true",
                        help="keep JPEGs that decode only with corrupt-data warnings (refused by default)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from components.cli import configure_logging, exit_on_user_error

    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging()
    settings = vars(args)
    if settings.pop("fingerprint_only"):
        with exit_on_user_error(PreprocessError, storage.StorageError):
            source = storage.open_source(args.source, tfds_data_dir=args.tfds_data_dir or None)
            try:
                print(list_source(source).fingerprint)
            finally:
                source.close()
        return 0
    if args.output is None:
        parser.error("the following arguments are required: --output")
    with exit_on_user_error(PreprocessError):
        preprocess(PreprocessConfig(**settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
