"""The reader refuses a prepared dataset that is incomplete or altered."""

from __future__ import annotations

import json

import pytest

from components import records
from components.preprocess import PreprocessConfig, preprocess
from tests.conftest import TINY_SIZE


@pytest.fixture
def prepared(image_folder, tmp_path):
    out = tmp_path / "prepared"
    preprocess(PreprocessConfig(source=image_folder, output=out, image_size=TINY_SIZE))
    return out


def test_a_complete_dataset_loads(prepared):
    dataset = records.load(prepared)
    assert dataset.image_size == TINY_SIZE
    assert dataset.count("train") + dataset.count("validation") + dataset.count("test") == 32


def test_missing_manifest_means_incomplete(prepared):
    (prepared / "manifest.json").unlink()
    with pytest.raises(records.DatasetError, match="no manifest.json: preprocessing did not finish"):
        records.load(prepared)


def test_missing_folder(tmp_path):
    with pytest.raises(records.DatasetError, match="does not exist"):
        records.load(tmp_path / "nope")


def test_altered_shard_is_refused(prepared):
    shard = prepared / "train-00000.tfrecord"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(records.DatasetError, match="sha256 .* does not match"):
        records.load(prepared)


def test_truncated_shard_is_refused(prepared):
    shard = prepared / "train-00000.tfrecord"
    shard.write_bytes(shard.read_bytes()[:-50])
    with pytest.raises(records.DatasetError, match="bytes, the manifest says"):
        records.load(prepared)


def test_record_count_is_checked_not_trusted(prepared):
    # A manifest that is complete and consistent with its marker, but promises one record too
    # many: only counting the records finds it.
    manifest = json.loads((prepared / "manifest.json").read_text())
    manifest["shards"]["train"][0]["records"] += 1
    records.write_manifest(prepared, manifest)
    with pytest.raises(records.DatasetError, match="holds .* records, the manifest says"):
        records.load(prepared)


def test_edited_manifest_does_not_match_its_marker(prepared):
    manifest = json.loads((prepared / "manifest.json").read_text())
    manifest["totals"]["train"] += 1
    (prepared / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(records.DatasetError, match="does not match its _COMPLETE marker"):
        records.load(prepared)


def test_missing_marker_means_incomplete(prepared):
    (prepared / "_COMPLETE").unlink()
    with pytest.raises(records.DatasetError, match="no _COMPLETE: preprocessing did not finish"):
        records.load(prepared)


def test_zero_byte_shard_is_refused(prepared):
    (prepared / "train-00000.tfrecord").write_bytes(b"")
    with pytest.raises(records.DatasetError, match="has 0 bytes, the manifest says"):
        records.load(prepared)


def test_shards_roll_over_at_the_target_size(image_folder, tmp_path):
    manifest = preprocess(
        PreprocessConfig(
            source=image_folder, output=tmp_path / "small-shards", image_size=TINY_SIZE, shard_size_mb=0.002
        )
    )
    train_shards = manifest["shards"]["train"]
    assert len(train_shards) > 1
    assert sum(s["records"] for s in train_shards) == manifest["totals"]["train"]
    records.load(tmp_path / "small-shards")


RECORDS = [b"", b"x", bytes(range(256)) * 300, "unicode é ✓".encode()]


def test_our_tfrecord_writer_writes_what_tensorflows_writes(tmp_path):
    import tensorflow as tf

    with tf.io.TFRecordWriter(str(tmp_path / "tf.tfrecord")) as writer:
        for record in RECORDS:
            writer.write(record)
    ours = records.TFRecordFile(tmp_path / "ours.tfrecord")
    for record in RECORDS:
        ours.write(record)
    ours.close()
    written = (tmp_path / "ours.tfrecord").read_bytes()
    assert written == (tmp_path / "tf.tfrecord").read_bytes()
    assert ours.bytes == len(written)
    assert ours.sha256.hexdigest() == records.sha256_file(tmp_path / "ours.tfrecord")
    assert [r.numpy() for r in tf.data.TFRecordDataset(str(tmp_path / "ours.tfrecord"))] == RECORDS


def test_our_tfrecord_reader_reads_tensorflows_files_and_refuses_damage(tmp_path):
    import tensorflow as tf

    path = tmp_path / "tf.tfrecord"
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in RECORDS:
            writer.write(record)
    assert list(records.read_tfrecord_file(path)) == RECORDS

    original = path.read_bytes()
    flipped = bytearray(original)
    flipped[100] ^= 0x01  # inside the third record's data (it starts at byte 45)
    path.write_bytes(bytes(flipped))
    with pytest.raises(records.DatasetError, match="damaged record$"):
        list(records.read_tfrecord_file(path))
    path.write_bytes(original[:-3])  # the last record's checksum cut short
    with pytest.raises(records.DatasetError, match="damaged record$"):
        list(records.read_tfrecord_file(path))
