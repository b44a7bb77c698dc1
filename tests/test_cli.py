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


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--max-pixels", "0"), ("--max-images", "0"), ("--verify-examples", "0"), ("--tolerance", "0")],
)
def test_export_refuses_a_cap_that_would_make_a_model_refuse_every_request(flag, value, tmp_path, caplog):
    """Checked before anything loads: a served model with a cap of 0 refuses every image, and
    nothing would say so until it serves."""
    from components import export

    argv = [
        "--model",
        str(tmp_path / "model"),
        "--data",
        str(tmp_path / "data"),
        "--output",
        str(tmp_path / "x"),
    ]
    with pytest.raises(SystemExit) as exit_info:
        export.main([*argv, flag, value])
    assert exit_info.value.code == 2
    assert f"error: {flag} must be" in caplog.text
    assert not (tmp_path / "x").exists()
