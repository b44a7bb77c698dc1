"""The GPU image's backend, Keras on JAX, trained on the CPU (JAX's CPU wheel), with the same
assertions as the TensorFlow path: the loss falls, SIGTERM and resume lose no step, running out
of memory steps down with accumulation, and the model file JAX writes is evaluated, exported
and served under TensorFlow. Each run is its own process (`python -m components.train
--backend jax`): Keras reads its backend once per process, and this one runs TensorFlow.

`make test-jax` (CI runs it); a few minutes on 2 cores, most of it XLA compiling the step once:
the runs share one checkpoint root, so later runs load the step from its compilation cache."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from components import checkpoints, records

pytestmark = [pytest.mark.slow, pytest.mark.jax]

ROOT = Path(__file__).resolve().parents[1]
EPOCHS, BATCH = 12, 32  # the trained_model fixture's recipe: one full batch of the 32 images an epoch


@pytest.fixture(scope="module")
def checkpoint_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("jax-checkpoints")


def train_command(
    data: Path, output: Path, root: Path, seed: int, *extra: str, module: str = "components.train"
) -> list[str]:
    # The trained_model fixture's recipe: no augmentation, no warm-up.
    return [
        sys.executable,
        "-m",
        module,
        "--data",
        str(data),
        "--output",
        str(output),
        "--epochs",
        str(EPOCHS),
        "--batch-size",
        str(BATCH),
        "--no-augment",
        "--warmup-epochs",
        "0",
        "--checkpoint-dir",
        str(root),
        "--checkpoint-every",
        "3",
        "--seed",
        str(seed),
        "--weights",
        "none",
        "--min-updates",
        "0",
        *extra,
    ]


def jax_env() -> dict:
    return dict(os.environ, KERAS_BACKEND="jax", PYTHONUNBUFFERED="1")


def steps_per_epoch(data: Path) -> int:
    return -(-records.load(data).count("train") // BATCH)


def run_dir(log_text: str) -> Path:
    """The run's checkpoint folder, as its log names it."""
    return Path(re.search(r"checkpoints every \d+ steps in (\S+)", log_text)[1])


def stop_after_first_checkpoint(command: list[str], root: Path, log: Path, env: dict) -> str:
    """Start a run, SIGTERM it once it has written a checkpoint; its log."""
    before = set(root.glob("run-*/step-*"))
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while not set(root.glob("run-*/step-*")) - before:
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 600 s"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=300) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    text = log.read_text()
    assert "SIGTERM: writing a checkpoint" in text and "stopped by SIGTERM" in text
    return text


def finish(command: list[str], log: Path, env: dict) -> str:
    with log.open("w") as out:
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=900)
    assert done.returncode == 0, log.read_text()[-3000:]
    return log.read_text()


def test_jax_training_resumes_after_sigterm_and_its_model_is_evaluated_exported_and_served_by_tensorflow(
    prepared_dataset, checkpoint_root, tmp_path
):
    import tensorflow as tf

    from components.evaluate import EvaluateConfig, evaluate
    from components.export import ExportConfig, export
    from components.model import load_trained

    output = tmp_path / "model"
    # mixed_float16, as on the GPU: the model file then holds float16 compute policies, which
    # evaluate and export (on CPUs) turn back into float32.
    command = train_command(
        prepared_dataset, output, checkpoint_root, 1, "--backend", "jax", "--precision", "mixed_float16"
    )
    first = stop_after_first_checkpoint(command, checkpoint_root, tmp_path / "run1.log", jax_env())
    assert "Keras backend: jax (--backend jax; no GPU)" in first
    second = finish(command, tmp_path / "run2.log", jax_env())
    assert "resuming from step-" in second

    summary = json.loads((output / "train_config.json").read_text())
    assert (summary["backend"], summary["precision"]) == ("jax", "mixed_float16")
    assert summary["steps_per_execution"] == 4
    history = json.loads((output / "history.json").read_text())
    assert [row["epoch"] for row in history] == list(range(1, EPOCHS + 1))
    last_three = np.mean([row["loss"] for row in history[-3:]])
    assert last_three < 0.7 * history[0]["loss"], [row["loss"] for row in history]
    per_epoch = steps_per_epoch(prepared_dataset)
    state = json.loads((checkpoints.complete(run_dir(first))[-1] / checkpoints.STATE).read_text())
    assert state["global_step"] == EPOCHS * per_epoch and state["backend"] == "jax"  # none lost, none twice

    evaluation = evaluate(EvaluateConfig(model=output, data=prepared_dataset, output=tmp_path / "evaluation"))
    assert evaluation["candidate"]["examples"] == records.load(prepared_dataset).count("test")
    info = export(
        ExportConfig(
            model=output,
            data=prepared_dataset,
            output=tmp_path / "exported",
            evaluation=tmp_path / "evaluation",
        )
    )
    assert info["verification"]["passed"] and info["verification"]["max_abs_difference"] <= 1e-4

    # Served: the test split's encoded images, as a client would send them, against Keras on
    # the same pixels.
    model, _ = load_trained(output)
    assert {layer.dtype_policy.name for layer in model.layers} == {"float32"}
    serve = tf.saved_model.load(str(tmp_path / "exported" / "saved_model")).signatures["serving_default"]
    dataset = records.load(prepared_dataset)
    encoded, pixels = [], []
    for serialized in tf.data.TFRecordDataset(dataset.files("test")):
        example = records.parse_example(serialized)
        encoded.append(example["image/encoded"].numpy())
        pixels.append(tf.io.decode_image(example["image/encoded"], channels=3).numpy())
    served = serve(image_bytes=tf.constant(encoded))
    expected = np.asarray(model(np.stack(pixels).astype("float32"), training=False))
    np.testing.assert_allclose(served["probabilities"].numpy(), expected, atol=1e-4)
    labels = [label.decode() for label in served["labels"].numpy()]
    assert labels == [dataset.classes[i] for i in expected.argmax(axis=1)]


def test_a_checkpoint_written_under_jax_resumes_under_tensorflow(prepared_dataset, checkpoint_root, tmp_path):
    output = tmp_path / "model"
    jax_run = train_command(prepared_dataset, output, checkpoint_root, 2, "--backend", "jax")
    stop_after_first_checkpoint(jax_run, checkpoint_root, tmp_path / "jax.log", jax_env())
    tf_run = train_command(prepared_dataset, output, checkpoint_root, 2, "--backend", "tensorflow")
    text = finish(tf_run, tmp_path / "tf.log", dict(os.environ, KERAS_BACKEND="tensorflow"))
    assert "the checkpoint was written under the jax backend; resuming it under tensorflow" in text
    assert "resuming from step-" in text
    summary = json.loads((output / "train_config.json").read_text())
    assert summary["backend"] == "tensorflow" and summary["epochs_trained"] == EPOCHS
    history = json.loads((output / "history.json").read_text())
    assert [row["epoch"] for row in history] == list(range(1, EPOCHS + 1))


def test_running_out_of_memory_under_jax_steps_down_with_accumulation_and_finishes(
    prepared_dataset, checkpoint_root, tmp_path
):
    output = tmp_path / "model"
    command = train_command(
        prepared_dataset, output, checkpoint_root, 3, "--backend", "jax", module="tests.jax_oom_once"
    )
    text = finish(command, tmp_path / "oom.log", jax_env())
    assert f"out of memory at a per-GPU batch of {BATCH} (RESOURCE_EXHAUSTED" in text
    summary = json.loads((output / "train_config.json").read_text())
    assert (summary["step_batch"], summary["accumulation"], summary["effective_batch"]) == (16, 2, 32)
    assert summary["epochs_trained"] == EPOCHS and summary["backend"] == "jax"
    per_epoch = steps_per_epoch(prepared_dataset)
    calls = json.loads(text.split("FIT CALLS", 1)[1].strip().splitlines()[0])
    # epoch 1 at 32 per step; epoch 2 runs out before its first step, then every epoch at 16.
    assert calls == [per_epoch] * 2 + [-(-records.load(prepared_dataset).count("train") // 16)] * (EPOCHS - 1)


def test_data_parallel_training_on_two_devices_resumes_on_one(prepared_dataset, checkpoint_root, tmp_path):
    """--gpus 2 on two JAX devices (CPU ones, forced: there is no GPU here; the same Keras
    DataParallel path a GPU node takes), stopped mid-run and finished on one device."""
    two_devices = dict(jax_env(), XLA_FLAGS="--xla_force_host_platform_device_count=2")
    output = tmp_path / "model"
    epochs = 20  # a few more updates than the other runs: the half batches learn less steeply
    command = train_command(
        prepared_dataset, output, checkpoint_root, 4, "--backend", "jax", "--epochs", str(epochs)
    )
    first = stop_after_first_checkpoint(
        [*command, "--gpus", "2"], checkpoint_root, tmp_path / "two.log", two_devices
    )
    assert "data-parallel on 2 devices: cpu:0, cpu:1" in first
    assert f"per-step batch {BATCH} ({BATCH // 2} a GPU x 2 GPUs) x 1 accumulation step(s)" in first
    stopped = json.loads((checkpoints.complete(run_dir(first))[-1] / checkpoints.STATE).read_text())
    assert (stopped["gpus"], stopped["step_batch"], stopped["accumulation"]) == (2, BATCH, 1)

    second = finish([*command, "--gpus", "1"], tmp_path / "one.log", jax_env())
    assert f"resuming from step-{stopped['global_step']:09d}" in second
    assert (
        f"the checkpoint was trained on 2 GPU(s) at {BATCH // 2} a GPU x 1 accumulation step(s); "
        f"going on on 1 at {BATCH // 2} a GPU x 2"
    ) in second
    summary = json.loads((output / "train_config.json").read_text())
    assert (summary["gpus"], summary["step_batch"], summary["accumulation"]) == (1, BATCH // 2, 2)
    assert summary["effective_batch"] == BATCH and summary["epochs_trained"] == epochs
    history = json.loads((output / "history.json").read_text())
    assert [row["epoch"] for row in history] == list(range(1, epochs + 1))
    # It learns. After the stop each update comes from two half batches (BatchNorm statistics of
    # 16 images), whose loss falls less steeply and more noisily than the whole-batch runs above
    # (one run: 1.48 at epoch 1, 0.79-1.28 over epochs 16-20, mean 0.99); a model that learnt
    # nothing stays at chance, ln(4) = 1.386.
    last_five = np.mean([row["loss"] for row in history[-5:]])
    assert last_five < 0.9 * math.log(len(records.load(prepared_dataset).classes)), [
        row["loss"] for row in history
    ]
    # None lost, none twice: the steps after the stop are at half the batch, twice as many.
    train_images = records.load(prepared_dataset).count("train")
    left = (epochs - stopped["epoch"]) * train_images - stopped["images_in_epoch"]
    final = json.loads((checkpoints.complete(run_dir(first))[-1] / checkpoints.STATE).read_text())
    assert final["global_step"] == stopped["global_step"] + left // (BATCH // 2)
    assert final["gpus"] == 1


def test_gpus_beyond_the_devices_jax_sees_is_refused_in_one_line(prepared_dataset, tmp_path):
    command = train_command(prepared_dataset, tmp_path / "model", tmp_path / "ck", 5, "--backend", "jax")
    done = subprocess.run(
        [*command, "--gpus", "2"], cwd=ROOT, env=jax_env(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "error: --gpus 2: JAX sees 1 cpu device(s) (no GPU: on a CPU, XLA_FLAGS=" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_batch_fit_probe_trains_our_model_under_jax(monkeypatch):
    from components import batchfit

    monkeypatch.setenv("KERAS_BACKEND", "jax")
    spec = batchfit.ProbeSpec(image_size=32, precision="float32", num_classes=3, memory_limit_mib=0)
    speeds: dict[int, float] = {}
    assert batchfit.probe(spec, 4, speeds=speeds) is True
    assert speeds[4] > 0
