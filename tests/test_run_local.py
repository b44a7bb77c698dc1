"""The whole pipeline through kfp.local (SubprocessRunner): real steps, real training, tiny data."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import make_image_folder

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_run_local_end_to_end_and_the_export_serves_raw_bytes(tmp_path):
    source = make_image_folder(tmp_path / "images", images_per_class=10, broken=True)
    workdir = tmp_path / "work"
    result = subprocess.run(
        [sys.executable, "pipeline.py", "run-local", "--data", str(source), "--image-size", "32",
         "--resize", "pad", "--epochs", "2", "--batch-size", "8", "--workdir", str(workdir)],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary_path = workdir / "run-summary.json"
    assert f"run summary: {summary_path}" in result.stdout
    summary = json.loads(summary_path.read_text())
    assert isinstance(summary["test_accuracy"], float) and 0.0 <= summary["test_accuracy"] <= 1.0
    exported = Path(summary["exported_model"])
    assert (exported / "saved_model.pb").is_file()
    info = json.loads((exported / "export_info.json").read_text())
    assert info["verification"]["passed"]
    assert summary["resize"] == info["resize"] == "pad"  # the serving signature pads as preprocess did

    raw = sorted((source / "dots").glob("*.jpg"))[0]
    raw = raw if raw.name != "broken-truncated.jpg" else sorted((source / "dots").glob("*.jpg"))[1]
    png = sorted((source / "checkerboard").glob("*.png"))[0]
    script = textwrap.dedent(f"""
        import json, tensorflow as tf
        model = tf.saved_model.load({str(exported)!r})
        data = [open(p, "rb").read() for p in ({str(raw)!r}, {str(png)!r})]
        out = model.signatures["serving_default"](image_bytes=tf.constant(data))
        print(json.dumps([l.decode() for l in out["labels"].numpy()]))
    """)
    served = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert served.returncode == 0, served.stderr[-2000:]
    labels = json.loads(served.stdout.strip().splitlines()[-1])
    assert len(labels) == 2 and set(labels) <= set(summary["classes"])


def test_run_local_with_a_missing_folder_fails_clearly(tmp_path):
    result = subprocess.run(
        [sys.executable, "pipeline.py", "run-local", "--data", str(tmp_path / "missing"),
         "--workdir", str(tmp_path / "work")], cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0
    assert "is not a folder of class sub-folders" in result.stderr
    assert not (tmp_path / "work" / "run-summary.json").exists()


@pytest.mark.parametrize("flags, message", [
    (["--image-size", "0"], "error: --image-size must be at least 32 px, got 0"),
    (["--epochs", "0"], "error: --epochs must be at least 1, got 0"),
])
def test_run_local_refuses_bad_settings_before_starting(tmp_path, flags, message):
    result = subprocess.run([sys.executable, "pipeline.py", "run-local", "--workdir", str(tmp_path / "w"),
                             *flags], cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0
    assert message in result.stderr
    assert not (tmp_path / "w").exists()


def test_run_local_with_one_class_fails_in_preprocess_and_writes_no_summary(tmp_path):
    source = tmp_path / "one-class"
    make_image_folder(tmp_path / "images", images_per_class=4)
    (source / "dots").mkdir(parents=True)
    for path in (tmp_path / "images" / "dots").iterdir():
        (source / "dots" / path.name).write_bytes(path.read_bytes())
    result = subprocess.run(
        [sys.executable, "pipeline.py", "run-local", "--data", str(source), "--image-size", "32",
         "--workdir", str(tmp_path / "work")], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert "only one class (dots)" in output
    assert "preprocess" in output and "FAILURE" in output
    assert not (tmp_path / "work" / "run-summary.json").exists()
