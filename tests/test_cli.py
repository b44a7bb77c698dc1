"""What every step's command line shares."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from components.cli import local_path


@pytest.mark.parametrize(
    ("module", "argv"),
    [
        ("preprocess", ["--source", "data", "--output", "s3://bucket/prepared"]),
        ("train", ["--data", "minio://bucket/prepared", "--output", "/tmp/model"]),
        ("evaluate", ["--model", "/tmp/model", "--data", "/tmp/prepared", "--output", "gs://bucket/eval"]),
        ("export", ["--model", "s3://bucket/model", "--data", "/tmp/prepared", "--output", "/tmp/servable"]),
        ("sample_data", ["--output", "s3://bucket/sample"]),
    ],
)
def test_a_bucket_url_where_a_local_path_is_expected_is_refused(module, argv, capsys):
    step = importlib.import_module(f"components.{module}")
    with pytest.raises(SystemExit) as exit_info:
        step.main(argv)
    assert exit_info.value.code == 2
    assert "is a URL, and this takes a path on this machine" in capsys.readouterr().err


@pytest.mark.parametrize(
    "value", ["/tmp/out", "relative/out", "/minio/mlpipeline/v2/artifacts/x", "C:/data", "a:b"]
)
def test_local_paths_pass(value):
    assert local_path(value) == Path(value)
