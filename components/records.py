"""The TFRecord format of this project, written and read in one place.

A prepared dataset is a folder:

    train-00000.tfrecord ...      # shards per split
    validation-00000.tfrecord ...
    test-00000.tfrecord ...
    rejected.json                 # every refused input with its reason
    manifest.json                 # classes, counts, shards (records, bytes, sha256), config
    _COMPLETE                     # written last: the manifest's sha256

Each record is a `tf.train.Example` with `image/encoded` (JPEG or PNG bytes, already resized to
`image_size` x `image_size`), `image/format`, `image/class/label` (int64 index into the
manifest's `classes`), `image/class/text`, `image/height`, `image/width` and
`image/source` (the input path, so a bad prediction can be traced back to its file).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import google_crc32c

MANIFEST = "manifest.json"
MARKER = "_COMPLETE"
FORMAT_VERSION = 2
SPLITS = ("train", "validation", "test")


class DatasetError(RuntimeError):
    """A prepared dataset is missing, incomplete or does not match its manifest."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def make_example(
    encoded: bytes,
    label: int,
    class_name: str,
    height: int,
    width: int,
    source: str,
    image_format: str = "jpeg",
) -> bytes:
    """Serialise one image as a `tf.train.Example`."""
    import tensorflow as tf

    def _bytes(value: bytes) -> tf.train.Feature:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    def _int(value: int) -> tf.train.Feature:
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))

    features = {
        "image/encoded": _bytes(encoded),
        "image/format": _bytes(image_format.encode()),
        "image/class/label": _int(label),
        "image/class/text": _bytes(class_name.encode()),
        "image/height": _int(height),
        "image/width": _int(width),
        "image/source": _bytes(source.encode()),
    }
    # deterministic: the features are a protobuf map, whose entries are otherwise serialised in
    # an order that differs between processes (seen: same records, other bytes, other sha256).
    example = tf.train.Example(features=tf.train.Features(feature=features))
    return example.SerializeToString(deterministic=True)


def parse_example(serialized):
    """Parse one serialised record into a dict of tensors (used inside `tf.data`)."""
    import tensorflow as tf

    spec = {
        "image/encoded": tf.io.FixedLenFeature([], tf.string),
        "image/format": tf.io.FixedLenFeature([], tf.string, default_value="jpeg"),
        "image/class/label": tf.io.FixedLenFeature([], tf.int64),
        "image/class/text": tf.io.FixedLenFeature([], tf.string),
        "image/height": tf.io.FixedLenFeature([], tf.int64),
        "image/width": tf.io.FixedLenFeature([], tf.int64),
        "image/source": tf.io.FixedLenFeature([], tf.string, default_value=""),
    }
    return tf.io.parse_single_example(serialized, spec)


def _masked_crc(data: bytes) -> bytes:
    """The TFRecord checksum: CRC-32C, rotated and offset ("masked", as TF's crc32c::Mask)."""
    crc = google_crc32c.value(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


class TFRecordFile:
    """Writes an uncompressed TFRecord file, byte for byte what `tf.io.TFRecordWriter` writes,
    without TensorFlow: the preprocess parent process only routes records to disk, and importing
    TensorFlow there cost 2-2.7 s of CPU before any worker could start (bench/RESULTS.md). The
    sha256 is computed on the way, so that a shard is not read back to hash it."""

    def __init__(self, path: Path, hashed: bool = True):
        self.sha256 = hashlib.sha256() if hashed else None
        self.bytes = 0
        self._file = open(path, "wb")  # noqa: SIM115 (closed by close())

    def write(self, record: bytes) -> None:
        header = struct.pack("<Q", len(record))
        framed = b"".join((header, _masked_crc(header), record, _masked_crc(record)))
        self._file.write(framed)
        if self.sha256 is not None:
            self.sha256.update(framed)
        self.bytes += len(framed)

    def close(self) -> None:
        self._file.close()


def read_tfrecord_file(path: Path) -> Iterator[bytes]:
    """The records of an uncompressed TFRecord file, checksums verified, without TensorFlow."""
    with open(path, "rb") as handle:
        while header := handle.read(8):
            if len(header) < 8 or handle.read(4) != _masked_crc(header):
                raise DatasetError(f"{path}: damaged record header")
            (length,) = struct.unpack("<Q", header)
            record = handle.read(length)
            if len(record) < length or handle.read(4) != _masked_crc(record):
                raise DatasetError(f"{path}: damaged record")
            yield record


class ShardWriter:
    """Writes records of one split into shards of about `target_bytes` each."""

    def __init__(self, folder: Path, split: str, target_bytes: int):
        self.folder = folder
        self.split = split
        self.target_bytes = target_bytes
        self.shards: list[dict[str, Any]] = []
        self._writer: TFRecordFile | None = None
        self._records = 0
        self._bytes = 0

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}.tfrecord"
        self.shards.append({"file": name})
        self._writer = TFRecordFile(self.folder / name)
        self._records = 0
        self._bytes = 0

    def write(self, record: bytes) -> None:
        if self._writer is None:
            self._open()
        self._writer.write(record)
        self._records += 1
        self._bytes += len(record)
        if self._bytes >= self.target_bytes:
            self._close()

    def _close(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        shard = self.shards[-1]
        shard["records"] = self._records
        shard["bytes"] = self._writer.bytes
        shard["sha256"] = self._writer.sha256.hexdigest()
        self._writer = None

    def close(self) -> list[dict[str, Any]]:
        self._close()
        return self.shards


@dataclass(frozen=True)
class PreparedDataset:
    """A verified, prepared dataset folder and what its manifest says about it."""

    folder: Path
    manifest: dict[str, Any] = field(repr=False)

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def image_size(self) -> int:
        return int(self.manifest["image_size"])

    def count(self, split: str) -> int:
        return sum(shard["records"] for shard in self.manifest["shards"][split])

    def files(self, split: str) -> list[str]:
        return [str(self.folder / shard["file"]) for shard in self.manifest["shards"][split]]


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest, then the completion marker that names its hash: a reader that finds
    the marker knows the manifest (and so every shard it lists) was finished."""
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    (folder / MANIFEST).write_text(text)
    (folder / MARKER).write_text(hashlib.sha256(text.encode()).hexdigest() + "\n")


def load(folder: Path | str, verify: bool = True) -> PreparedDataset:
    """Open a prepared dataset, refusing one that is incomplete or altered.

    With `verify`, every shard's size and sha256 are checked against the manifest, and its
    records are counted: a truncated or zero-byte shard reads as fewer records without any
    error from TensorFlow, so the count is the only reliable check.
    """
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not folder.is_dir():
        raise DatasetError(f"prepared dataset folder {folder} does not exist")
    marker_path = folder / MARKER
    if not manifest_path.is_file() or not marker_path.is_file():
        missing = MANIFEST if not manifest_path.is_file() else MARKER
        raise DatasetError(
            f"{folder} has no {missing}: preprocessing did not finish there; run preprocess again"
        )
    text = manifest_path.read_text()
    if hashlib.sha256(text.encode()).hexdigest() != marker_path.read_text().strip():
        raise DatasetError(
            f"{manifest_path} does not match its {MARKER} marker: it was altered or "
            "half-written; run preprocess again"
        )
    manifest = json.loads(text)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DatasetError(
            f"{manifest_path}: format_version {manifest.get('format_version')!r}, "
            f"this code reads {FORMAT_VERSION}"
        )
    dataset = PreparedDataset(folder=folder, manifest=manifest)
    if verify:
        for split in SPLITS:
            for shard in manifest["shards"][split]:
                _verify_shard(folder / shard["file"], shard)
    return dataset


def _verify_shard(path: Path, shard: dict[str, Any]) -> None:
    import tensorflow as tf

    if not path.is_file():
        raise DatasetError(f"shard {path} listed in the manifest is missing")
    size = path.stat().st_size
    if size != shard["bytes"]:
        raise DatasetError(f"shard {path} has {size} bytes, the manifest says {shard['bytes']}")
    digest = sha256_file(path)
    if digest != shard["sha256"]:
        raise DatasetError(f"shard {path} sha256 {digest[:12]}... does not match the manifest")
    records = sum(1 for _ in tf.data.TFRecordDataset(str(path)))
    if records != shard["records"]:
        raise DatasetError(f"shard {path} holds {records} records, the manifest says {shard['records']}")


def decode_image(encoded, size: int):
    """A record's encoded image -> uint8 [size, size, 3], the pixels training reads.

    Records hold our own RGB JPEG/PNG at the final size, with no EXIF: the plain decoder gives
    the same pixels as `imaging.decode` at a fraction of its ops.
    """
    import tensorflow as tf

    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    return tf.ensure_shape(image, [size, size, 3])


def serialized_split(
    dataset: PreparedDataset,
    split: str,
    parallel_reads: int | None = None,
    shuffle_buffer: int = 0,
    seed: int | None = None,
    passes: int = 1,
    skip: int = 0,
):
    """`tf.data.Dataset` of one split's still-encoded records: `passes` passes one after the
    other, each shuffled by its own seed derived from `seed` (with `shuffle_buffer`), then the
    first `skip` records dropped. Deterministic: the same arguments give the same records in
    the same order, which is what lets a resumed epoch skip exactly what it trained on.

    Shards are read in parallel (in a fixed order). The records are shuffled still encoded:
    about 20 KB each at 224 px instead of 150 KB decoded, so a buffer of 10,000 costs 200 MB,
    not 1.5 GB."""
    import tensorflow as tf

    files = dataset.files(split)
    if not files:
        raise DatasetError(f"split {split!r} of {dataset.folder} has no shards")
    # The manifest's count, asserted: Keras then knows the epoch length, and a shard holding
    # fewer records than promised fails the run instead of silently shortening every epoch.
    records = tf.data.TFRecordDataset(files, num_parallel_reads=parallel_reads or tf.data.AUTOTUNE).apply(
        tf.data.experimental.assert_cardinality(dataset.count(split))
    )

    def one_pass(index: int):
        if not shuffle_buffer:
            return records
        # Each pass its own seeded, non-reshuffling shuffle: tf.data's repeat of a reshuffling
        # dataset orders later passes differently from one run to the next.
        return records.shuffle(
            shuffle_buffer,
            seed=None if seed is None else seed * 1_009 + index,
            reshuffle_each_iteration=False,
        )

    data = one_pass(0)
    for index in range(1, passes):
        data = data.concatenate(one_pass(index))
    return data.skip(skip) if skip else data


def read_split(
    dataset: PreparedDataset,
    split: str,
    parallel_reads: int | None = None,
    shuffle_buffer: int = 0,
    seed: int | None = None,
    passes: int = 1,
    skip: int = 0,
):
    """`tf.data.Dataset` of (uint8 image [size, size, 3], int32 label) for one split: the records
    of `serialized_split` (same arguments), decoded. Without `shuffle_buffer` they come in file
    order. Augmentation and batching are the reader's business."""
    import tensorflow as tf

    size = dataset.image_size

    def _decode(serialized):
        example = parse_example(serialized)
        return decode_image(example["image/encoded"], size), tf.cast(example["image/class/label"], tf.int32)

    data = serialized_split(dataset, split, parallel_reads, shuffle_buffer, seed, passes, skip)
    return data.map(_decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=not shuffle_buffer)
