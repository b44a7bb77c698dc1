"""tfds: sources, offline, from a tiny dataset prepared in the test (no download)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import tensorflow as tf

from components import records
from components.preprocess import PreprocessConfig, PreprocessError, preprocess

ROOT = Path(__file__).resolve().parents[1]


def _records(folder: Path, split: str) -> list[dict]:
    dataset = records.load(folder)
    return [
        {k: v.numpy() for k, v in records.parse_example(serialized).items()}
        for serialized in tf.data.TFRecordDataset(dataset.files(split))
    ]


def test_tfds_source_offline_from_a_prepared_data_dir(tmp_path):
    from tests import tiny_tfds

    data_dir = tmp_path / "tfds"
    examples = tiny_tfds.prepare(data_dir)
    # A separate process, as on a cluster: the builder's code is not importable there, TFDS
    # reads the prepared files alone.
    out = tmp_path / "work" / "prepared"
    out.parent.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "components.preprocess",
            "--source",
            f"tfds:{tiny_tfds.NAME}:1.0.0",
            "--tfds-data-dir",
            str(data_dir),
            "--output",
            str(out),
            "--image-size",
            "32",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["classes"] == list(tiny_tfds.CLASSES)
    assert manifest["source"] == f"tfds:{tiny_tfds.NAME}:1.0.0"
    assert manifest["rejected"] == []
    assert sum(manifest["totals"].values()) == examples == 24
    sources = sorted(row["image/source"].decode() for split in records.SPLITS for row in _records(out, split))
    # <label name>/<TFDS split>-<index in TFDS's own reading order>: every example once, under
    # its own label (TFDS stores examples shuffled, so the order is read back from TFDS here).
    builder = tiny_tfds.TinyTextures(data_dir=str(data_dir))
    expected = sorted(
        f"{tiny_tfds.CLASSES[int(label)]}/{split}-{index:07d}.jpg"
        for split in ("train", "test")
        for index, (_, label) in enumerate(
            builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
        )
    )
    assert sources == expected
    assert Counter(s.split("/")[0] for s in sources) == {"coarse": 12, "fine": 12}
    assert sorted(p.name for p in out.parent.iterdir()) == ["prepared"]  # the copy is gone


def test_tfds_source_that_is_not_there_is_a_clear_error(tmp_path):
    with pytest.raises(PreprocessError, match=r"TFDS dataset 'no_such_dataset' not found in "):
        preprocess(
            PreprocessConfig(
                source="tfds:no_such_dataset", output=tmp_path / "out", tfds_data_dir=str(tmp_path)
            )
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_tfds_version_that_is_not_there_is_a_clear_error(tmp_path):
    from tests import tiny_tfds

    tiny_tfds.prepare(tmp_path / "tfds")
    with pytest.raises(
        PreprocessError,
        match=rf"TFDS dataset '{tiny_tfds.NAME}:9.9.9' cannot be opened in "
        r".*cannot be loaded at version 9.9.9, only: 1.0.0",
    ):
        preprocess(
            PreprocessConfig(
                source=f"tfds:{tiny_tfds.NAME}:9.9.9",
                output=tmp_path / "out",
                tfds_data_dir=str(tmp_path / "tfds"),
            )
        )
    assert not (tmp_path / "out").exists()
