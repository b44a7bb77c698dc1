"""preprocess: labelled images -> checked, resized, sharded TFRecords + manifest.

    python -m components.preprocess --source data/flowers --output /tmp/prepared --image-size 224
    python -m components.preprocess --source s3://bucket/flowers --output /tmp/prepared
    python -m components.preprocess --source s3://bucket/flowers --fingerprint-only
    python -m components.preprocess --source tfds:beans --tfds-data-dir /mnt/tfds --output /tmp/prepared
    python -m components.preprocess --source s3://bucket/flowers --partitions 4 --partition 0 --output /tmp/p0
    python -m components.preprocess --merge /tmp/p0 /tmp/p1 /tmp/p2 /tmp/p3 --output /tmp/prepared

The source is a local folder, an S3-compatible prefix or a GCS prefix (`components.storage`),
laid out as `<class>/<file>`, or a TensorFlow Datasets dataset. Every file is read once, by a
pool of worker processes that survives a decoder crash (`components.pool`), and judged by
`components.verdict`: a file that is not a decodable image (empty, truncated, an HTML page
saved as .jpg, an unsupported format, too many pixels, JPEG data that decodes only with
corruption warnings) is rejected with its reason (`rejected.json`), never a crash. Valid images are
converted to RGB, resized by `components.imaging` (the code the exported model runs) and split
train/validation/test per class, each class's share of each split exact within one image,
by a hash of their resized pixels (`assign_splits`): a re-run gives byte-identical output,
adding an image moves at most one other into each split, and exact duplicates always land in
the same split. The output folder appears only when complete: everything is written to a
staging folder that is renamed at the end, the `_COMPLETE` marker written last.

Fan-out: with `--partitions N`, a run reads only the files of its slice (`--partition`, by a
hash of each key, so a new file moves no other) and writes their verdicts and resized records
as a partial output; `--merge` then decides the splits over all of them and writes the shards,
manifest and report: the same records, labels, splits and shards as one run over every file.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components import imaging, pool, records, storage, verdict
from components.cli import configure_logging, exit_on_user_error, json_config, local_path

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
    max_pixels: int = imaging.MAX_PIXELS
    workers: int = 0  # processes decoding images; 0 = one per CPU the pod may use
    # Seconds one file may take in a worker before the worker is stopped and the file rejected
    # as timed out (a decoder that spins never stalls the step); 0 = no limit.
    file_timeout: float = 60.0
    # Smallest accepted side in px. Low-resolution datasets (32 px icons, CIFAR-like crops)
    # are legitimate, so by default only degenerate 1-pixel-wide strips are refused.
    min_side: int = 2
    # JPEGs whose scan data libjpeg reports as corrupt while still decoding them (part of the
    # picture grey or garbled) are refused unless this is set.
    allow_damaged: bool = False
    # A file whose decoding would take more memory than this (MB, estimated from its header)
    # is refused instead of taking the worker, or the pod, down; 0 = the pod's memory limit
    # shared among the workers, or no limit where there is none.
    max_decode_mb: int = 0
    # Where a tfds: source is prepared (a volume or gs:// path); "" = TFDS's default folder.
    tfds_data_dir: str = ""
    # Fan-out: this task reads only slice `partition` of `partitions` (by a hash of each file's
    # key) and writes a partial output; `merge` makes the dataset of all partials.
    partition: int = 0
    partitions: int = 1

    def validate(self) -> None:
        if self.image_size < MIN_IMAGE_SIZE:
            raise PreprocessError(
                f"--image-size must be at least {MIN_IMAGE_SIZE} px (EfficientNet-B0 downsamples "
                f"by 32), got {self.image_size}"
            )
        for name in ("validation_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 0.5:
                raise PreprocessError(f"--{name.replace('_', '-')} must be in [0, 0.5), got {value}")
        if self.resize not in imaging.RESIZE_POLICIES:
            raise PreprocessError(
                f"--resize must be one of {', '.join(imaging.RESIZE_POLICIES)}, got {self.resize!r}"
            )
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
        if self.max_decode_mb < 0:
            raise PreprocessError("--max-decode-mb must be 0 (from the memory limit) or more")
        if self.file_timeout < 0:
            raise PreprocessError("--file-timeout must be 0 (no limit) or more seconds")
        if self.min_side < 1:
            raise PreprocessError("--min-side must be at least 1")
        if self.partitions < 1 or not 0 <= self.partition < self.partitions:
            raise PreprocessError(
                f"--partition must be in 0..{self.partitions - 1} and --partitions at least 1, "
                f"got {self.partition} of {self.partitions}"
            )
        if self.partitions > 1 and str(self.source).startswith(storage.TFDS_PREFIX):
            raise PreprocessError("a tfds: source is read by one task: give --partitions 1")


def class_of(key: str) -> str:
    """The class of a source key: its first path component (`<class>/<file>`)."""
    return key.split("/", 1)[0]


def reason_kind(reason: str) -> str:
    """A rejection reason without its specifics ("too small: 1x50, ..." -> "too small")."""
    return reason.split(":")[0]


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
    return listed(source)[0].fingerprint


def listed(source: str, tfds_data_dir: str = "") -> tuple[SourceListing, str]:
    """`source` opened, listed and closed: its listing and its URI as the storage layer names it."""
    try:
        opened = storage.open_source(source, tfds_data_dir=tfds_data_dir or None)
    except storage.StorageError as error:
        raise PreprocessError(str(error)) from None
    try:
        return list_source(opened), opened.uri
    finally:
        opened.close()


def partition_of(key: str, partitions: int) -> int:
    """The slice a file belongs to: fixed by its key alone, so a new file moves no other."""
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % partitions


def slice_fingerprints(source: str, partitions: int, tfds_data_dir: str = "") -> list[str]:
    """One fingerprint per slice, from the listing of that slice's files alone: what keys each
    slice's cached preprocess, so that a new file re-runs its own slice only."""
    if partitions < 1:
        raise PreprocessError(f"partitions must be at least 1, got {partitions}")
    if partitions == 1:
        return [source_fingerprint(source, tfds_data_dir)]
    if source.startswith(storage.TFDS_PREFIX):
        raise PreprocessError("a tfds: source is read by one task: set partitions to 1")
    return _slice_digests(listed(source)[0], partitions)


def _slice_digests(listing: SourceListing, partitions: int) -> list[str]:
    # The class list is in each: a slice's labels are indices into it, so a class added
    # anywhere changes what every slice writes; a file added to a class changes its own slice.
    classes = "\0".join(listing.classes).encode("utf-8", "surrogateescape")
    digests = [hashlib.sha256(f"{i}/{partitions}|".encode() + classes + b"|") for i in range(partitions)]
    for item in listing.objects:
        line = f"{item.key}\t{item.size}\t{item.etag}\n".encode("utf-8", "surrogateescape")
        digests[partition_of(item.key, partitions)].update(line)
    return [digest.hexdigest() for digest in digests]


# Control characters and Unicode line breaks: a file name holding one would write raw lines
# into the log and a heading into report.md.
UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")


def printable(key: str) -> str:
    """`key` as one line of UTF-8 text: a local file name that is not UTF-8 (an archive made on
    an old Windows, say) with its undecodable bytes written as \\xNN escapes, and control
    characters (a newline in a file name) as \\xNN or \\uNNNN escapes."""
    text = key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


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
    if getattr(source, "skipped", None):
        log.info(
            "skipped hidden or tool metadata folder(s) at the top of %s, not read as classes: %s",
            source.uri,
            ", ".join(sorted(printable(name) for name in source.skipped)),
        )
    stray = [o.key for o in objects if "/" not in o.key]
    if stray:
        log.warning(
            "ignoring %d file(s) directly under %s (only class sub-folders are read): %s",
            len(stray),
            source.uri,
            ", ".join(printable(key) for key in stray[:5]),
        )
    objects = [o for o in objects if "/" in o.key]
    classes = sorted({class_of(o.key) for o in objects})
    unnamed = [shown for name in classes if (shown := printable(name)) != name]
    if unnamed:
        raise PreprocessError(
            f"class folder name(s) not valid UTF-8 or holding control characters in {source.uri}: "
            f"{', '.join(unnamed)}; rename them (class names are stored as one line of UTF-8 text)"
        )
    folded = Counter(_folded(name) for name in classes)
    alike = [name for name in classes if folded[_folded(name)] > 1]
    if alike:
        # ascii(): 'cafe\u0301' and 'caf\xe9' print alike otherwise, as do trailing spaces.
        log.warning(
            "class folders whose names differ only in case, spacing or Unicode form are separate classes: %s",
            ", ".join(ascii(name) for name in alike),
        )
    folders = source.class_folders()
    empty = sorted(set(folders) - set(classes))
    if not classes and not empty:
        raise PreprocessError(
            f"source {source.uri} has no class sub-folders; expected {source.uri}/<class>/<image>"
        )
    if empty:
        raise PreprocessError(f"class folder(s) with no files in {source.uri}: {', '.join(empty)}")
    if len(classes) < 2:
        raise PreprocessError(
            f"source {source.uri} has only one class ({classes[0]}); "
            "a classifier needs at least two class sub-folders"
        )
    digest = hashlib.sha256()
    for item in objects:
        # surrogateescape: a local file name that is not UTF-8 is hashed as the bytes it is.
        digest.update(f"{item.key}\t{item.size}\t{item.etag}\n".encode("utf-8", "surrogateescape"))
    return SourceListing(classes=classes, objects=objects, fingerprint=digest.hexdigest())


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
        quota = {
            split: max(1, math.floor(total * fraction + 0.5)) if fraction > 0 else 0
            for split, fraction in (
                ("test", config.test_fraction),
                ("validation", config.validation_fraction),
            )
        }
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
        for digest, _ in free[low : high + 1]:
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
            log.info(
                "%s: %d/%d (%.0f%%) %.0f img/s",
                self.what,
                self.done,
                self.total,
                100.0 * self.done / max(self.total, 1),
                rate,
            )


def _staging_folder(output: Path) -> Path:
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise PreprocessError(
            f"output {output} already exists and is not an empty folder; choose a new --output or remove it"
        )
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
    checked = dict(zip(readable, verdict.check_and_resize_many(list(readable.values()), config), strict=True))
    results: list[WorkResult] = []
    for key in keys:
        outcome = checked.get(key)
        if outcome is None:
            results.append((key, None, unreadable[key], None))
        elif isinstance(outcome, verdict.Rejected):
            results.append((key, None, outcome.reason, None))
        else:
            encoded, digest, size = outcome
            class_name = class_of(key)
            record = records.make_example(
                encoded,
                _WORKER["labels"][class_name],
                class_name,
                config.image_size,
                config.image_size,
                printable(key),
                config.encoding,
            )
            results.append((key, record, digest, size))
    return results


# What one worker may use at its peak: TensorFlow itself (~0.85 GB warm, bench/serving_guard.py)
# and a large decode under the pixel cap (a 9000x9000 transparent PNG: 2,059 MB more,
# bench/decode_memory.py; the issue reported 3 GB for one).
WORKER_MEMORY_BYTES = 3 * 2**30


def _resolved_workers(config: PreprocessConfig, files: int) -> int:
    """Worker processes: as asked, else one per CPU the pod may use (the cgroup's quota, not
    the node's cores), no more than its memory limit holds, and not more than the files need."""
    cpus = pool.cpu_budget()
    memory = pool.memory_budget()
    wanted = config.workers or max(1, math.floor(cpus))
    if memory is not None and memory // WORKER_MEMORY_BYTES < wanted:
        log.info(
            "%d worker(s), not %d: the memory limit of %.1f GiB holds %.0f GiB per worker",
            max(1, memory // WORKER_MEMORY_BYTES),
            wanted,
            memory / 2**30,
            WORKER_MEMORY_BYTES / 2**30,
        )
        wanted = max(1, memory // WORKER_MEMORY_BYTES)
    # Each worker imports TensorFlow and traces its graph (~2.5 s of CPU): not worth it for a
    # handful of files.
    return max(1, min(wanted, math.ceil(files / 100)))


# What a worker holds before any image: Python, TensorFlow and its traced graph.
WORKER_BASE_BYTES = 600 * 2**20


def _with_decode_budget(config: PreprocessConfig, workers: int) -> PreprocessConfig:
    """`config` with max_decode_mb from the pod's memory limit when it was left at 0: each
    worker's share, less what a worker holds before any image (at least 256 MB)."""
    memory = pool.memory_budget()
    if config.max_decode_mb or memory is None:
        return config
    share = max(256, (memory // workers - WORKER_BASE_BYTES) // 2**20)
    log.info(
        "each worker may decode files of up to about %d MB (the memory limit, %d worker(s))", share, workers
    )
    return dataclasses.replace(config, max_decode_mb=share)


# Files per unit of work: one TF call decodes them all (check_and_resize_many).
CHUNK = 16


def _process_all(
    source_uri: str, keys: list[str], config: PreprocessConfig, classes: list[str]
) -> Iterator[WorkResult]:
    """Every file's result, in the order of `keys` whatever the number of workers."""
    workers = _resolved_workers(config, len(keys))
    config = _with_decode_budget(config, workers)
    chunks = [keys[start : start + CHUNK] for start in range(0, len(keys), CHUNK)]
    if workers == 1:
        # In this process (a few hundred files at most): no worker to stop, so no time limit.
        try:
            _init_worker(source_uri, config, classes)
        except (ImportError, storage.StorageError) as error:
            raise PreprocessError(f"cannot start decoding: {type(error).__name__}: {error}") from None
        for chunk in chunks:
            yield from _work(chunk)
        return
    log.info("decoding with %d worker processes", workers)
    limits = pool.Limits(item_seconds=config.file_timeout)
    try:
        yield from pool.map_chunks(
            _work,
            chunks,
            workers,
            _init_worker,
            (source_uri, config, classes),
            crashed=_crashed,
            timed_out=functools.partial(_timed_out, config.file_timeout),
            limits=limits,
        )
    except pool.WorkerStartError as error:
        raise PreprocessError(f"the worker processes cannot start: {error}") from None


def _crashed(key: str) -> WorkResult:
    return key, None, "crashed the image decoder (its process died while decoding this file)", None


def _timed_out(seconds: float, key: str) -> WorkResult:
    return (
        key,
        None,
        f"timed out: decoding took more than {seconds:g} s (--file-timeout); its worker was stopped",
        None,
    )


SPILL_BUCKETS = 16  # records are spilled by digest prefix: memory holds 1/16 of the data at once


def preprocess(config: PreprocessConfig) -> dict[str, Any]:
    """Run the step; returns the manifest (also written to `<output>/manifest.json`), or with
    `partitions` > 1 this slice's partial output (`<output>/partial.json`), for `merge`."""
    return _run(config, partial=config.partitions > 1)


def preprocess_partition(config: PreprocessConfig) -> dict[str, Any]:
    """The pipeline's fan-out task: always a partial output, for `merge`, one partition or many."""
    return _run(config, partial=True)


def _run(config: PreprocessConfig, partial: bool) -> dict[str, Any]:
    config.validate()
    try:
        source = storage.open_source(
            str(config.source),
            tfds_data_dir=config.tfds_data_dir or None,
            scratch=config.output.parent / f".{config.output.name}.tfds",
        )
    except storage.StorageError as error:
        raise PreprocessError(str(error)) from None
    try:
        if isinstance(source, storage.LocalSource) and Path(os.path.realpath(config.output)).is_relative_to(
            os.path.realpath(source.root)
        ):
            raise PreprocessError(
                f"--output {config.output} is inside --source {source.root}: the next run would read "
                "the shards as images; choose an output folder outside the source"
            )
        listing = list_source(source)
        log.info(
            "found %d files in %d classes under %s (data fingerprint %s)",
            len(listing.objects),
            len(listing.classes),
            source.uri,
            listing.fingerprint[:16],
        )
        with _staged(config.output) as staging:
            if partial:
                return _write_partial(config, source, listing, staging)
            decoded = _decode(config, source, listing.objects, listing.classes, staging / ".spill")
            manifest = _finish(config, source.uri, listing, [decoded], staging)
            shutil.rmtree(decoded.spill_dir)
    finally:
        source.close()
    _log_written(config.output, manifest)
    return manifest


@contextlib.contextmanager
def _staged(output: Path) -> Iterator[Path]:
    """A staging folder renamed to `output` when the block ends well, removed when it does not."""
    staging = _staging_folder(output)
    try:
        yield staging
        if output.exists():
            output.rmdir()  # an empty folder made for us (as KFP does)
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _log_written(output: Path, manifest: dict[str, Any]) -> None:
    log.info(
        "wrote %s: %s; rejected %d file(s)",
        output,
        ", ".join(f"{split} {n}" for split, n in manifest["totals"].items()),
        len(manifest["rejected"]),
    )
    for split in ("validation", "test"):  # what the scores will rest on, class by class
        per_class = manifest["counts"][split]
        shown = ", ".join(f"{name} {n}" for name, n in list(per_class.items())[:20])
        log.info(
            "%s: %d image(s): %s%s",
            split,
            manifest["totals"][split],
            shown,
            f", ... ({len(per_class) - 20} more classes)" if len(per_class) > 20 else "",
        )


PARTIAL = "partial.json"  # a partition's verdicts and spill layout; written last
# Settings a partition may differ in from the others without changing what it writes.
PER_TASK_SETTINGS = ("output", "partition", "workers")


def _write_partial(
    config: PreprocessConfig, source: storage.Source, listing: SourceListing, staging: Path
) -> dict[str, Any]:
    mine = [item for item in listing.objects if partition_of(item.key, config.partitions) == config.partition]
    log.info(
        "partition %d of %d: %d of the %d files",
        config.partition + 1,
        config.partitions,
        len(mine),
        len(listing.objects),
    )
    decoded = _decode(config, source, mine, listing.classes, staging / "spill")
    partial = {
        "format_version": records.FORMAT_VERSION,
        "source": source.uri,
        "partition": config.partition,
        "partitions": config.partitions,
        "slice_fingerprint": _slice_digests(listing, config.partitions)[config.partition],
        "fingerprint": listing.fingerprint,
        "classes": listing.classes,
        "config": json_config(config),
        **decoded.to_json(),
    }
    (staging / PARTIAL).write_text(json.dumps(partial) + "\n")
    log.info(
        "wrote partition %d of %d to %s: %d image(s), rejected %d file(s)",
        config.partition + 1,
        config.partitions,
        config.output,
        len(decoded.processed),
        len(decoded.rejected),
    )
    return partial


@dataclass(frozen=True)
class MergeConfig:
    parts: tuple[Path, ...]  # the partitions' outputs, in any order
    output: Path


def merge(config: MergeConfig) -> dict[str, Any]:
    """The dataset of every partition's partial output: the same manifest, splits and shards,
    byte for byte, as one task reading all the files (the config in the manifest aside)."""
    partials = []
    for path in config.parts:
        try:
            partials.append((path, json.loads((path / PARTIAL).read_text())))
        except (OSError, ValueError) as error:
            raise PreprocessError(f"{path} is not a complete partition output ({PARTIAL}: {error})") from None
    first = partials[0][1]
    count = first["partitions"]
    found = sorted(partial["partition"] for _, partial in partials)
    if found != list(range(count)):
        raise PreprocessError(f"merge needs each of the {count} partitions once, got partitions {found}")
    shared = {k: v for k, v in first["config"].items() if k not in PER_TASK_SETTINGS}
    for path, partial in partials:
        theirs = {k: v for k, v in partial["config"].items() if k not in PER_TASK_SETTINGS}
        if partial["format_version"] != records.FORMAT_VERSION or theirs != shared:
            differ = sorted(k for k in shared if theirs.get(k) != shared[k]) or ["format_version"]
            raise PreprocessError(
                f"partition output {path} was made with other settings: {', '.join(differ)}"
            )
    settings = PreprocessConfig(**{**shared, "output": config.output, "partition": 0, "partitions": 1})
    if count == 1:  # one task read every file: its listing is the dataset's
        listing = SourceListing(classes=first["classes"], objects=[], fingerprint=first["fingerprint"])
        return _merged(config, settings, first["source"], listing, partials)
    # Listed again: the manifest's fingerprint is the whole listing's, and each partition must
    # have read its slice as the source is now (a cached partition from an older run included).
    listing, source_uri = listed(str(settings.source))
    expected = _slice_digests(listing, count)
    for path, partial in partials:
        if (
            partial["classes"] != listing.classes
            or partial["slice_fingerprint"] != expected[partial["partition"]]
        ):
            raise PreprocessError(
                f"the files of partition {partial['partition'] + 1} of {count} ({path}) changed in "
                f"{source_uri} after it read them; run the pipeline again"
            )
    return _merged(config, settings, source_uri, listing, partials)


def _merged(
    config: MergeConfig,
    settings: PreprocessConfig,
    source_uri: str,
    listing: SourceListing,
    partials: list[tuple[Path, dict[str, Any]]],
) -> dict[str, Any]:
    parts = [Decoded.from_json(path / "spill", partial) for path, partial in partials]
    log.info("merging %d partition(s): %d images", len(parts), sum(len(part.processed) for part in parts))
    with _staged(config.output) as staging:
        manifest = _finish(settings, source_uri, listing, parts, staging)
    _log_written(config.output, manifest)
    return manifest


# 16-bit RGBA stored uncompressed (PNG, BMP) is the most any accepted format spends on a pixel.
MAX_BYTES_PER_PIXEL = 8
METADATA_ALLOWANCE = 64 * 1024 * 1024  # EXIF, ICC profiles, a phone's motion-photo video


def max_file_bytes(config: PreprocessConfig) -> int:
    """The largest file that can hold an accepted image: anything larger (a video, an archive
    of the dataset left inside it) is refused from the listing's size, without reading it into
    a worker's memory."""
    return config.max_pixels * MAX_BYTES_PER_PIXEL + METADATA_ALLOWANCE


@dataclass
class Decoded:
    """What reading one set of files gave, before any split is decided: the records spilled to
    `spill_dir` by digest prefix (in `spilled_keys` order), and each file's verdict."""

    spill_dir: Path
    processed: list[Processed]
    short_sides: list[int]
    rejected: list[dict[str, str]]
    spilled_keys: list[list[str]]

    def to_json(self) -> dict[str, Any]:
        return {
            "processed": [[p.key, p.label, p.digest] for p in self.processed],
            "short_sides": self.short_sides,
            "rejected": self.rejected,
            "spilled_keys": self.spilled_keys,
        }

    @classmethod
    def from_json(cls, spill_dir: Path, data: dict[str, Any]) -> Decoded:
        return cls(
            spill_dir=spill_dir,
            processed=[Processed(key=k, label=label, digest=d) for k, label, d in data["processed"]],
            short_sides=list(data["short_sides"]),
            rejected=list(data["rejected"]),
            spilled_keys=[list(keys) for keys in data["spilled_keys"]],
        )


def _decode(
    config: PreprocessConfig,
    source: storage.Source,
    objects: list[storage.SourceObject],
    classes: list[str],
    spill_dir: Path,
) -> Decoded:
    """Phase one: every file of `objects` read, judged, resized and spilled."""
    label_of = {name: index for index, name in enumerate(classes)}
    spill_dir.mkdir()
    # No TensorFlow in this process unless it decodes too (one worker): with worker processes
    # its import here would only delay them (bench/RESULTS.md).
    spills = [
        records.TFRecordFile(spill_dir / f"{b:02d}.tfrecord", hashed=False) for b in range(SPILL_BUCKETS)
    ]
    decoded = Decoded(spill_dir, [], [], [], [[] for _ in range(SPILL_BUCKETS)])
    progress = _Progress(len(objects), "preprocess")
    try:

        def reject(key: str, reason: str) -> None:
            progress.step()
            log.warning("rejected %s: %s", printable(key), printable(reason))
            decoded.rejected.append({"path": printable(key), "reason": printable(reason)})

        cap = max_file_bytes(config)
        for item in objects:
            if item.size > cap:
                reject(
                    item.key,
                    f"too large: {item.size:,} bytes, more than an accepted image of at most "
                    f"--max-pixels {config.max_pixels:,} can be ({cap:,}); not read",
                )
        keys = [item.key for item in objects if item.size <= cap]
        for key, record, detail, size in _process_all(source.worker_uri, keys, config, classes):
            if record is None:
                reject(key, detail)
                continue
            progress.step()
            decoded.processed.append(Processed(key=key, label=label_of[class_of(key)], digest=detail))
            decoded.short_sides.append(min(size))
            bucket = int(detail[0], 16)
            spills[bucket].write(record)
            decoded.spilled_keys[bucket].append(key)
    finally:
        for writer in spills:
            writer.close()
    return decoded


def _finish(
    config: PreprocessConfig,
    source_uri: str,
    listing: SourceListing,
    parts: list[Decoded],
    staging: Path,
) -> dict[str, Any]:
    """Phase two, over every part's files: the class floor, the splits, the shards in
    content-hash order, the manifest and report. The same files give the same bytes whatever
    the parts: splits and shard order depend on the files' contents alone."""
    processed = [item for part in parts for item in part.processed]
    short_sides = [side for part in parts for side in part.short_sides]
    rejected = [entry for part in parts for entry in part.rejected]
    classes = listing.classes
    valid = Counter(classes[p.label] for p in processed)
    too_few = {
        name: valid.get(name, 0) for name in classes if valid.get(name, 0) < config.min_images_per_class
    }
    if too_few:
        details = "; ".join(
            f"{name}: {n} valid"
            + "".join(
                f"\n    rejected {r['path']}: {r['reason']}"
                for r in rejected
                if r["path"].startswith(name + "/")
            )
            for name, n in too_few.items()
        )
        raise PreprocessError(
            f"class(es) with fewer than {config.min_images_per_class} valid images "
            f"(--min-images-per-class): {details}"
        )

    splits = assign_splits(processed, config)
    writers = {
        split: records.ShardWriter(staging, split, int(config.shard_size_mb * 1024 * 1024))
        for split in records.SPLITS
    }
    digest_of = {p.key: p.digest for p in processed}
    for bucket in range(SPILL_BUCKETS):
        batch = []
        for part in parts:
            path = part.spill_dir / f"{bucket:02d}.tfrecord"
            batch += zip(part.spilled_keys[bucket], records.read_tfrecord_file(path), strict=True)
        # Shards in content-hash order: classes interleaved, so a reader's shuffle buffer
        # never sees a run of one class.
        for key, raw in sorted(batch, key=lambda item: (digest_of[item[0]], item[0])):
            writers[splits[key]].write(raw)
    shards = {split: writer.close() for split, writer in writers.items()}

    counts = {split: {name: 0 for name in classes} for split in records.SPLITS}
    for item in processed:
        counts[splits[item.key]][classes[item.label]] += 1
    duplicates = len(processed) - len({p.digest for p in processed})
    conflicts = _label_conflicts(processed)
    if conflicts:
        log.warning(
            "%d image(s) are in more than one class with identical pixels (contradictory "
            "labels), e.g. %s; all are kept and listed in the manifest's label_conflicts",
            len(conflicts),
            " = ".join(conflicts[0]),
        )
    train_counts = counts["train"]
    total_train = sum(train_counts.values())
    # Inverse-frequency weights, mean 1 over training images: the usual Keras `class_weight`.
    class_weights = {
        name: round(total_train / (len(classes) * n), 6) if n else 0.0 for name, n in train_counts.items()
    }
    rejected.sort(key=lambda r: r["path"])
    manifest = {
        "format_version": records.FORMAT_VERSION,
        "source": source_uri,
        "fingerprint": listing.fingerprint,
        "image_size": config.image_size,
        "resize": config.resize,
        "encoding": config.encoding,
        "decoding": {"exif_orientation": "applied", "alpha_background": "white", "animation": "first frame"},
        "classes": classes,
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
        log.warning(
            "class imbalance: the largest class has %.1fx the images of the smallest; "
            "class weights are in the manifest",
            manifest["imbalance_ratio"],
        )
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
    return sorted(
        sorted(printable(item.key) for item in items)
        for items in by_digest.values()
        if len({item.label for item in items}) > 1
    )


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


def _code(text: str) -> str:
    """`text` as inline Markdown code that nothing in it can break out of: a "|" would end a
    table cell, a backtick the code span."""
    text = text.replace("|", "\\|")
    fence = "``" if "`" in text else "`"
    return f"{fence} {text} {fence}" if fence == "``" else f"`{text}`"


def render_report(manifest: dict[str, Any]) -> str:
    """A Markdown page a person reads before trusting the data (KFP shows it as a Markdown artifact)."""
    classes = manifest["classes"]
    lines = [
        "# Preprocess report",
        "",
        f"Source `{manifest['source']}`, fingerprint `{manifest['fingerprint'][:16]}`, "
        f"{manifest['image_size']} px ({manifest['resize']}).",
        "",
        "## Images per split and class",
        "",
        "| class | " + " | ".join(records.SPLITS) + " | total | class weight |",
        "|---|" + "---:|" * (len(records.SPLITS) + 2),
    ]
    for name in classes:
        per_split = [manifest["counts"][split][name] for split in records.SPLITS]
        lines.append(
            f"| {name} | "
            + " | ".join(map(str, per_split))
            + f" | {sum(per_split)} | {manifest['class_weights'][name]:.3f} |"
        )
    totals = [manifest["totals"][split] for split in records.SPLITS]
    lines += [
        "| **all** | " + " | ".join(map(str, totals)) + f" | {sum(totals)} | |",
        "",
        f"Largest / smallest class: {manifest['imbalance_ratio']}x. "
        "Exact duplicates (the same pixels once decoded and resized, kept in one split): "
        f"{manifest['duplicates']}.",
        "",
    ]
    conflicts = manifest["label_conflicts"]
    if conflicts:
        lines += [
            f"## The same image in more than one class: {len(conflicts)}",
            "",
            "Identical pixels with different labels. All are kept; keep each in one class.",
            "",
        ]
        lines += [f"- {' = '.join(_code(path) for path in group)}" for group in conflicts[:REPORT_EXAMPLES]]
        if len(conflicts) > REPORT_EXAMPLES:
            more = len(conflicts) - REPORT_EXAMPLES
            lines.append(f"- ... {more} more in `manifest.json` (label_conflicts)")
        lines.append("")
    lines += [f"## Rejected: {len(manifest['rejected'])}", ""]
    if manifest["rejected"]:
        lines += ["| reason | files | examples |", "|---|---:|---|"]
        for reason, count in manifest["rejected_by_reason"].items():
            examples = [r["path"] for r in manifest["rejected"] if reason_kind(r["reason"]) == reason][:3]
            lines.append(f"| {reason} | {count} | " + ", ".join(_code(e) for e in examples) + " |")
        lines += ["", "Every rejected file with its full reason: `rejected.json`."]
    lines += ["", "## Original image sizes (short side, px)", "", "| short side | images |", "|---|---:|"]
    lines += [f"| {label} | {count} |" for label, count in manifest["short_side_histogram"].items()]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m components.preprocess",
        description="Check, resize and shard a folder of labelled images into TFRecords.",
    )
    defaults = PreprocessConfig(source=Path(), output=Path())
    parser.add_argument(
        "--source",
        help="folder of class sub-folders, s3://, minio:// or gs://bucket/prefix, or tfds:NAME[:VERSION]",
    )
    parser.add_argument("--output", type=local_path, help="new folder for shards + manifest.json")
    parser.add_argument(
        "--fingerprint-only",
        action="store_true",
        help="print the data fingerprint (from the listing, no image read) and exit",
    )
    parser.add_argument("--image-size", type=int, default=defaults.image_size, help="square side in px")
    parser.add_argument(
        "--resize",
        choices=imaging.RESIZE_POLICIES,
        default=defaults.resize,
        help="how a non-square image becomes square",
    )
    parser.add_argument("--validation-fraction", type=float, default=defaults.validation_fraction)
    parser.add_argument("--test-fraction", type=float, default=defaults.test_fraction)
    parser.add_argument("--min-images-per-class", type=int, default=defaults.min_images_per_class)
    parser.add_argument(
        "--encoding",
        choices=("jpeg", "png"),
        default=defaults.encoding,
        help="how resized images are stored in the shards",
    )
    parser.add_argument("--jpeg-quality", type=int, default=defaults.jpeg_quality)
    parser.add_argument("--shard-size-mb", type=float, default=defaults.shard_size_mb)
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=defaults.max_pixels,
        help="refuse images with more pixels than this (decompression bombs)",
    )
    parser.add_argument(
        "--workers", type=int, default=defaults.workers, help="0 = one per CPU the pod or machine may use"
    )
    parser.add_argument(
        "--max-decode-mb",
        type=int,
        default=defaults.max_decode_mb,
        help="refuse a file whose decoding would take more memory (MB); 0 = from the memory limit",
    )
    parser.add_argument(
        "--file-timeout",
        type=float,
        default=defaults.file_timeout,
        help="seconds one file may take before it is rejected as timed out; 0 = no limit",
    )
    parser.add_argument(
        "--min-side",
        type=int,
        default=defaults.min_side,
        help="refuse images with a side shorter than this (px)",
    )
    parser.add_argument(
        "--tfds-data-dir",
        default=defaults.tfds_data_dir,
        help="folder or gs:// path holding prepared TFDS data (for tfds: sources)",
    )
    parser.add_argument(
        "--partitions",
        type=int,
        default=defaults.partitions,
        help="fan-out: the files are cut into this many slices by a hash of their keys",
    )
    parser.add_argument(
        "--partition",
        type=int,
        default=defaults.partition,
        help="the slice (0-based) this run reads; it writes a partial output for --merge",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        type=local_path,
        metavar="PART",
        help="make the dataset at --output from every partition's partial output (no --source)",
    )
    parser.add_argument(
        "--allow-damaged",
        action="store_true",
        help="keep JPEGs that decode only with corrupt-data warnings (refused by default)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging()
    settings = vars(args)
    if settings.pop("fingerprint_only"):
        if args.source is None:
            parser.error("the following arguments are required: --source")
        with exit_on_user_error(PreprocessError, storage.StorageError):
            print(listed(args.source, args.tfds_data_dir)[0].fingerprint)
        return 0
    if args.output is None:
        parser.error("the following arguments are required: --output")
    parts = settings.pop("merge")
    with exit_on_user_error(PreprocessError):
        if parts:
            merge(MergeConfig(parts=tuple(parts), output=args.output))
        elif args.source is None:
            parser.error("the following arguments are required: --source (or --merge)")
        else:
            preprocess(PreprocessConfig(**settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
