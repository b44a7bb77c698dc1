"""Choosing the Keras backend and the GPU settings made before it starts (no GPU here: the
choice is checked against what this machine has; the JAX runs themselves are in
test_jax_backend.py)."""

from __future__ import annotations

import os
from pathlib import Path

import keras
import numpy as np
import pytest

from components import backend, batchfit
from components.model import build_model, load_trained
from components.train import TrainError, run_checkpoint_dir, train
from tests.conftest import scratch_config


def test_auto_is_jax_only_with_a_gpu_and_jax_for_cuda(monkeypatch):
    assert backend.resolve("auto", gpu_present=False) == "tensorflow"
    monkeypatch.setattr(backend, "jax_gpu_installed", lambda: True)
    assert backend.resolve("auto", gpu_present=True) == "jax"
    assert backend.resolve("auto", gpu_present=False) == "tensorflow"
    monkeypatch.setattr(backend, "jax_gpu_installed", lambda: False)  # e.g. JAX's CPU wheel
    assert backend.resolve("auto", gpu_present=True) == "tensorflow"
    assert backend.resolve("jax", gpu_present=False) == "jax"  # forced: trains on JAX's CPU
    with pytest.raises(backend.BackendError, match="must be one of auto, jax, tensorflow"):
        backend.resolve("torch", gpu_present=False)


def test_jax_cuda_plugin_is_not_installed_here():
    assert backend.jax_gpu_installed() is False  # the dev venv has JAX's CPU wheel only


def test_another_backend_than_the_one_keras_runs_is_refused_clearly(prepared_dataset, tmp_path):
    assert keras.backend.backend() == "tensorflow"
    with pytest.raises(backend.BackendError, match="already imported with the tensorflow backend"):
        backend.activate("jax")
    with pytest.raises(TrainError, match="run the step in a new process to train with jax"):
        train(scratch_config(data=prepared_dataset, output=tmp_path / "model", backend="jax"))
    assert not (tmp_path / "model").exists()


def test_the_default_memory_cap_is_the_card_less_the_measured_headroom(monkeypatch):
    assert backend.memory_limit_mib(0, 8192) == 8192 - backend.HEADROOM_MIB
    assert backend.memory_limit_mib(7680, 8192) == 7680
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    card = batchfit.Gpu(name="NVIDIA GeForce RTX 2070", total_mib=8192)
    assert batchfit.apply_memory_limit(0, card) == 8192 - backend.HEADROOM_MIB
    assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == f"{(8192 - backend.HEADROOM_MIB) / 8192:.4f}"
    assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "true"
    assert batchfit.apply_memory_limit(0, None) is None


def test_a_run_resumes_whatever_the_backend_steps_per_call_or_memory_cap(prepared_dataset):
    from components import records

    dataset = records.load(prepared_dataset)
    base = scratch_config(data=prepared_dataset, output=Path("/tmp/x"))
    same = [
        scratch_config(data=prepared_dataset, output=Path("/tmp/x"), backend="jax"),
        scratch_config(data=prepared_dataset, output=Path("/tmp/x"), steps_per_execution=1),
        scratch_config(data=prepared_dataset, output=Path("/tmp/x"), gpu_memory_limit_mib=2048),
    ]
    assert {run_checkpoint_dir(config, dataset) for config in same} == {run_checkpoint_dir(base, dataset)}
    other = scratch_config(data=prepared_dataset, output=Path("/tmp/x"), batch_size=64)
    assert run_checkpoint_dir(other, dataset) != run_checkpoint_dir(base, dataset)


def test_a_mixed_precision_model_file_is_loaded_to_compute_in_float32(tmp_path):
    """On CPUs float16 is emulated and kernel-dependent: a JAX-trained model at 224 px gave
    Keras and its SavedModel 1.7e-2 apart. Evaluate and export load it as float32."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        mixed = build_model(3, 32)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    folder = tmp_path / "model"
    folder.mkdir()
    mixed.save(folder / "model.keras")
    (folder / "train_config.json").write_text('{"classes": ["a", "b", "c"], "image_size": 32}')
    loaded, _ = load_trained(folder)
    policies = {layer.dtype_policy.name for layer in loaded.layers}
    policies |= {layer.dtype_policy.name for layer in loaded.layers[1].layers}
    assert policies == {"float32"}
    assert loaded.count_params() == mixed.count_params()
    for ours, theirs in zip(loaded.get_weights(), mixed.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(loaded.predict_on_batch(images), mixed.predict_on_batch(images), atol=2e-2)


def test_padded_validation_gives_the_exact_accuracy_and_loss(prepared_dataset):
    """Under JAX validation runs at the training batch, padded with weight-0 copies: the
    accuracy must ignore them (a weighted metric) and the loss be corrected exactly."""
    from components import records
    from components.model import compile_for_training
    from components.train import eval_dataset

    dataset = records.load(prepared_dataset)
    classes = len(dataset.classes)
    count = dataset.count("validation")
    model = build_model(classes, dataset.image_size)
    compile_for_training(
        model,
        scratch_config(data=prepared_dataset, output=Path("/tmp/x")).recipe(),
        steps_per_epoch=1,
        fixed_shapes=True,
    )
    padded, padding = eval_dataset(dataset, "validation", count + 5, classes)
    whole, none = eval_dataset(dataset, "validation", count, classes, pad=False)
    assert (padding, none) == (5, 0)
    with_padding = model.evaluate(padded, return_dict=True, verbose=0)
    exact = model.evaluate(whole, return_dict=True, verbose=0)
    assert set(exact) == {"loss", "accuracy"}
    assert with_padding["accuracy"] == pytest.approx(exact["accuracy"])
    assert with_padding["loss"] * (count + padding) / count == pytest.approx(exact["loss"], rel=1e-5)
