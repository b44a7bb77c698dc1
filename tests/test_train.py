"""train: the model's shape and precision, config checks, weights from a file, a real short run."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from components.model import build_model, configure_precision
from components.train import TrainConfig, TrainError, train
from tests.conftest import TINY_SIZE, scratch_config


@pytest.fixture
def restore_policy():
    yield
    keras.mixed_precision.set_global_policy("float32")


def test_mixed_precision_model_outputs_float32(restore_policy):
    configure_precision("mixed_float16")
    model = build_model(num_classes=3, image_size=TINY_SIZE)
    assert model.layers[1].dtype_policy.name == "mixed_float16"
    output = model(np.zeros((2, TINY_SIZE, TINY_SIZE, 3), np.float32), training=False)
    assert keras.backend.standardize_dtype(output.dtype) == "float32"
    assert output.shape == (2, 3)
    np.testing.assert_allclose(np.asarray(output).sum(axis=1), 1.0, rtol=1e-5)


def test_auto_precision_is_float32_without_a_gpu(restore_policy):
    assert configure_precision("auto") == "float32"
    assert keras.mixed_precision.global_policy().name == "float32"


def test_from_scratch_speeds_up_batchnorm_and_pretrained_freezes_it(tmp_path):
    scratch = build_model(2, TINY_SIZE, "none")
    batchnorms = [
        layer for layer in scratch.layers[1].layers if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert batchnorms and all(layer.momentum == 0.9 and layer.trainable for layer in batchnorms)
    slower = build_model(2, TINY_SIZE, "none", bn_momentum=0.99)
    assert {layer.momentum for layer in slower.layers[1].layers if hasattr(layer, "moving_mean")} == {0.99}

    weights = tmp_path / "backbone.weights.h5"
    scratch.layers[1].save_weights(str(weights))
    pretrained = build_model(2, TINY_SIZE, str(weights))
    for ours, theirs in zip(scratch.layers[1].weights, pretrained.layers[1].weights, strict=True):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    assert not any(
        layer.trainable
        for layer in pretrained.layers[1].layers
        if isinstance(layer, keras.layers.BatchNormalization)
    )


@pytest.mark.parametrize(
    "change, message",
    [
        ({"epochs": 0}, "--epochs must be at least 1"),
        ({"batch_size": 0}, "--batch-size must be at least 1"),
        ({"precision": "fp8"}, "--precision must be one of"),
        ({"weights": "/no/such/file.h5"}, "/no/such/file.h5 does not exist"),
        ({"learning_rate": -1.0}, "--learning-rate must be positive"),
        ({"bn_momentum": 1.0}, r"--bn-momentum must be in \(0, 1\), got 1.0"),
        ({"gpus": 0}, "--gpus must be at least 1, got 0"),
    ],
)
def test_bad_settings_are_refused(tmp_path, change, message):
    config = scratch_config(data=tmp_path, output=tmp_path / "m", **change)
    with pytest.raises(TrainError, match=message):
        train(config)


def test_unfinished_dataset_is_refused(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(TrainError, match="no manifest.json"):
        train(scratch_config(data=tmp_path / "data", output=tmp_path / "m"))


@pytest.mark.slow
def test_training_writes_model_config_history_and_the_loss_goes_down(trained_model):
    """A real (tiny) training run: the loss must fall well below where it started."""
    assert (trained_model / "model.keras").is_file()
    assert not (trained_model / "best.weights.h5").exists()
    summary = json.loads((trained_model / "train_config.json").read_text())
    assert summary["precision"] == "float32"
    assert summary["classes"] == ["checkerboard", "dots", "horizontal-stripes", "vertical-stripes"]
    assert summary["config"]["epochs"] == 12
    history = json.loads((trained_model / "history.json").read_text())
    assert [row["epoch"] for row in history] == list(range(1, 13))
    last_three = np.mean([row["loss"] for row in history[-3:]])
    assert last_three < 0.7 * history[0]["loss"], [row["loss"] for row in history]
    assert all(row["images_per_sec"] > 0 for row in history)
    assert list((trained_model / "tensorboard").rglob("events.out.tfevents.*"))
    assert not (trained_model / "checkpoints").exists()  # not shipped inside the model artifact
    curves = Image.open(trained_model / "training_curves.png")  # loss and accuracy per epoch
    assert curves.format == "PNG" and curves.size == (480, 240)


class _StopBeforeTraining(Exception):
    pass


@pytest.mark.parametrize("enabled", [True, False])
def test_class_weights_from_the_manifest_reach_fit(prepared_dataset, tmp_path, monkeypatch, enabled):
    from components import records

    seen = {}

    def fit(self, *args, **kwargs):
        seen.update(kwargs, jit_compile=self.jit_compile)
        raise _StopBeforeTraining

    monkeypatch.setattr(keras.Model, "fit", fit)
    with pytest.raises(_StopBeforeTraining):
        train(scratch_config(data=prepared_dataset, output=tmp_path / "m", class_weights=enabled, xla="off"))
    manifest = records.load(prepared_dataset).manifest
    expected = {i: manifest["class_weights"][name] for i, name in enumerate(manifest["classes"])}
    assert seen["class_weight"] == (expected if enabled else None)
    assert seen["jit_compile"] is False


def test_weights_from_an_s3_uri_load_like_the_local_file(tmp_path, s3_env):
    from components.train import fetch_weights

    scratch = build_model(2, TINY_SIZE, "none")
    folder = tmp_path / "weights"
    folder.mkdir()
    scratch.layers[1].save_weights(str(folder / "backbone.weights.h5"))
    s3_env.upload_folder(folder, "models", "efficientnet")
    local = fetch_weights("s3://models/efficientnet/backbone.weights.h5", tmp_path / "fetched")
    assert Path(local).read_bytes() == (folder / "backbone.weights.h5").read_bytes()
    pretrained = build_model(2, TINY_SIZE, local)
    for ours, theirs in zip(scratch.layers[1].weights, pretrained.layers[1].weights, strict=True):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    with pytest.raises(TrainError, match="cannot read --weights s3://models/efficientnet/missing.h5"):
        fetch_weights("s3://models/efficientnet/missing.h5", tmp_path / "fetched")


def _backbone_weights(model) -> dict[str, np.ndarray]:
    """By layer position (auto-named layers such as normalization_5 differ between models)."""
    return {
        f"{index:03d} {layer.name}/{j}": np.asarray(weight).copy()
        for index, layer in enumerate(model.layers[1].layers)
        for j, weight in enumerate(layer.weights)
    }


def test_fine_tuning_phases_choose_whole_blocks_and_keep_batchnorm_frozen(tmp_path):
    from components.model import set_phase

    weights = tmp_path / "backbone.weights.h5"
    build_model(2, TINY_SIZE, "none").layers[1].save_weights(str(weights))
    model = build_model(2, TINY_SIZE, str(weights))
    set_phase(model, 1, 2)
    assert [w.path for w in model.trainable_weights] == ["probabilities/kernel", "probabilities/bias"]
    set_phase(model, 2, 2)
    trainable = {layer.name for layer in model.layers[1].layers if layer.trainable and layer.weights}
    assert trainable == {
        "block6d_expand_conv",
        "block6d_dwconv",
        "block6d_se_reduce",
        "block6d_se_expand",
        "block6d_project_conv",
        "block7a_expand_conv",
        "block7a_dwconv",
        "block7a_se_reduce",
        "block7a_se_expand",
        "block7a_project_conv",
        "top_conv",
    }


@pytest.mark.slow
def test_pretrained_training_runs_head_then_top_blocks(prepared_dataset, tmp_path):
    weights = tmp_path / "backbone.weights.h5"
    build_model(4, TINY_SIZE, "none").layers[1].save_weights(str(weights))
    before = _backbone_weights(build_model(4, TINY_SIZE, str(weights)))
    summary = train(
        TrainConfig(
            data=prepared_dataset,
            output=tmp_path / "m",
            epochs=3,
            batch_size=32,
            weights=str(weights),
            head_epochs=1,
            unfreeze_blocks=2,
            augment=False,
            checkpoint_dir=str(tmp_path / "ckpt"),
        )
    )
    history = json.loads((tmp_path / "m" / "history.json").read_text())
    assert [row["phase"] for row in history] == [1, 2, 2]
    # The final weights (model.keras holds the best epoch's, which may be the head-only one).
    from components import checkpoints

    last = checkpoints.complete(next((tmp_path / "ckpt").glob("run-*")))[-1]
    model = build_model(4, TINY_SIZE, str(weights))
    model.load_weights(last / checkpoints.WEIGHTS)
    after = _backbone_weights(model)
    assert [key.split(" ")[0] for key in before] == [key.split(" ")[0] for key in after]
    changed = {
        key.split(" ")[1]
        for (key, old), (_, new) in zip(after.items(), before.items(), strict=True)
        if not np.array_equal(old, new)
    }
    assert changed and all(name.startswith(("block6d", "block7a", "top_conv")) for name in changed), changed
    assert not any("bn" in name for name in changed)  # BatchNorm, moving statistics included
    assert summary["epochs_trained"] == 3
