"""Preprocess fanned out (issue 20): slices by a hash of each key, partial outputs, one merge.

The dataset's content must not depend on the number of partitions: the shards, rejected.json
and report.md are compared byte for byte with one task over every file, and the manifest field
by field (its `config` records the run's own settings). Real files, a real S3 endpoint."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from components import preprocess as step
from components.preprocess import MergeConfig, PreprocessConfig, PreprocessError
from tests.conftest import TINY_SIZE, make_image_folder

REPO = Path(__file__).resolve().parent.parent
CONTENT = ("rejected.json", "report.md")


def partitioned(source, work: Path, partitions: int, **settings) -> tuple[dict, list[Path]]:
    parts = []
    for index in reversed(range(partitions)):  # any order
        out = work / f"part-{index}"
        step.preprocess_partition(
            PreprocessConfig(
                source=source,
                output=out,
                image_size=TINY_SIZE,
                partition=index,
                partitions=partitions,
                **settings,
            )
        )
        parts.append(out)
    return step.merge(MergeConfig(parts=tuple(parts), output=work / "merged")), parts


def same_dataset(one: Path, other: Path) -> None:
    a, b = (json.loads((folder / "manifest.json").read_text()) for folder in (one, other))
    assert a.pop("config")["partitions"] == 1 and b.pop("config")["partitions"] == 1
    assert a == b
    files = sorted(path.name for path in one.iterdir())
    assert files == sorted(path.name for path in other.iterdir())
    for name in files:
        if name.endswith(".tfrecord") or name in CONTENT:
            assert (one / name).read_bytes() == (other / name).read_bytes(), name


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    # Broken files (rejected with reasons) and a duplicate across classes (a label conflict).
    root = make_image_folder(tmp_path_factory.mktemp("data") / "images", images_per_class=12, broken=True)
    shutil.copy(sorted((root / "dots").glob("dots-*.jpg"))[0], root / "checkerboard" / "copied-dot.jpg")
    return root


@pytest.fixture(scope="module")
def whole(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole") / "dataset"
    step.preprocess(PreprocessConfig(source=folder, output=out, image_size=TINY_SIZE))
    return out


@pytest.mark.parametrize("partitions", [1, 3])
def test_the_dataset_is_the_same_byte_for_byte_whatever_the_partitions(folder, whole, tmp_path, partitions):
    manifest, parts = partitioned(folder, tmp_path, partitions)
    same_dataset(whole, tmp_path / "merged")
    assert manifest["label_conflicts"] and manifest["rejected"]  # the hard cases are in it
    read = [json.loads((part / step.PARTIAL).read_text()) for part in parts]
    counted = sum(len(partial["processed"]) + len(partial["rejected"]) for partial in read)
    assert counted == sum(1 for path in folder.rglob("*") if path.is_file())  # each file read once
    if partitions > 1:
        assert all(partial["processed"] for partial in read)  # every slice had work


def test_a_bucket_source_partitioned_matches_too(folder, whole, s3_env, tmp_path):
    s3_env.client().make_bucket("sliced")
    s3_env.upload_folder(folder, "sliced", "images")
    partitioned("s3://sliced/images", tmp_path, 2)
    one = tmp_path / "one"
    step.preprocess(PreprocessConfig(source="s3://sliced/images", output=one, image_size=TINY_SIZE))
    same_dataset(one, tmp_path / "merged")


def test_a_new_file_changes_only_its_own_slice_s_fingerprint_and_a_new_class_every_slice(folder, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(folder, data)
    before = step.slice_fingerprints(str(data), 4)
    added = data / "dots" / "one-more.jpg"
    shutil.copy(sorted((data / "dots").glob("dots-*.jpg"))[1], added)
    after = step.slice_fingerprints(str(data), 4)
    changed = [index for index in range(4) if before[index] != after[index]]
    assert changed == [step.partition_of("dots/one-more.jpg", 4)]
    (data / "zebra").mkdir()
    shutil.copy(added, data / "zebra" / "z.jpg")
    assert all(a != b for a, b in zip(after, step.slice_fingerprints(str(data), 4), strict=True))
    # One partition: the fingerprint the pipeline cached preprocess by before partitions existed.
    assert step.slice_fingerprints(str(data), 1) == [step.source_fingerprint(str(data))]


def test_slices_are_fixed_by_the_key_and_even(folder):
    keys = [f"class-{i % 7}/image-{i:05d}.jpg" for i in range(4000)]
    slices = [step.partition_of(key, 4) for key in keys]
    assert slices == [step.partition_of(key, 4) for key in keys]
    assert all(900 < slices.count(index) < 1100 for index in range(4))


def test_merge_refuses_a_missing_or_repeated_partition_and_other_settings(folder, tmp_path):
    _, parts = partitioned(folder, tmp_path, 2)
    with pytest.raises(PreprocessError, match=r"each of the 2 partitions once, got partitions \[1\]"):
        step.merge(MergeConfig(parts=(parts[0],), output=tmp_path / "m1"))
    with pytest.raises(PreprocessError, match=r"got partitions \[0, 0\]"):
        step.merge(MergeConfig(parts=(parts[1], parts[1]), output=tmp_path / "m2"))
    other = tmp_path / "other"
    step.preprocess_partition(
        PreprocessConfig(source=folder, output=other, image_size=TINY_SIZE + 8, partition=0, partitions=2)
    )
    with pytest.raises(PreprocessError, match="made with other settings: image_size"):
        step.merge(MergeConfig(parts=(parts[0], other), output=tmp_path / "m3"))
    with pytest.raises(PreprocessError, match="is not a complete partition output"):
        step.merge(MergeConfig(parts=(parts[0], tmp_path), output=tmp_path / "m4"))
    assert not any((tmp_path / name).exists() for name in ("m1", "m2", "m3", "m4"))


def test_merge_refuses_partitions_that_read_files_since_changed(folder, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(folder, data)
    parts = []
    for index in range(2):
        parts.append(tmp_path / f"p{index}")
        step.preprocess_partition(
            PreprocessConfig(
                source=data, output=parts[-1], image_size=TINY_SIZE, partition=index, partitions=2
            )
        )
    key = next(f"dots/late-{i}.jpg" for i in range(100) if step.partition_of(f"dots/late-{i}.jpg", 2) == 1)
    shutil.copy(sorted((data / "dots").glob("dots-*.jpg"))[0], data / key)
    with pytest.raises(
        PreprocessError, match=r"the files of partition 2 of 2 .* changed in .* after it read them"
    ):
        step.merge(MergeConfig(parts=tuple(parts), output=tmp_path / "merged"))


def test_the_command_line_partitions_and_merges_and_refuses_a_bad_partition(folder, tmp_path):
    command = [sys.executable, "-m", "components.preprocess", "--source", str(folder), "--image-size", "32"]
    for index in range(2):
        subprocess.run(
            [*command, "--partitions", "2", "--partition", str(index), "--output", tmp_path / f"p{index}"],
            cwd=REPO, check=True, capture_output=True,
        )  # fmt: skip
    merged = subprocess.run(
        [sys.executable, "-m", "components.preprocess", "--merge", str(tmp_path / "p0"), str(tmp_path / "p1"),
         "--output", str(tmp_path / "merged")],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert merged.returncode == 0, merged.stderr
    assert "merging 2 partition(s)" in merged.stderr and (tmp_path / "merged" / "_COMPLETE").is_file()
    bad = subprocess.run(
        [*command, "--partitions", "2", "--partition", "2", "--output", str(tmp_path / "bad")],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 2
    assert "--partition must be in 0..1 and --partitions at least 1, got 2 of 2" in bad.stderr
    tfds = subprocess.run(
        [sys.executable, "-m", "components.preprocess", "--source", "tfds:beans", "--partitions", "2",
         "--output", str(tmp_path / "t")],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert tfds.returncode == 2 and "a tfds: source is read by one task" in tfds.stderr
