"""The network: EfficientNet-B0 with a new head, its training phases and precision, the
optimizer and schedule it trains with, and loading a trained model back.

Train, batch fit, evaluate and export all use this module; none of them imports another step
to reach a helper.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "float32", "mixed_float16")


class ModelError(ValueError):
    """The model cannot be built or loaded; the message says why."""


@dataclass(frozen=True)
class Recipe:
    """How one phase trains: explicit, with no defaults of its own (TrainConfig owns those)."""

    learning_rate: float  # peak, reached after the warm-up
    epochs: int  # of this phase: the schedule decays to 0 at its last step
    weight_decay: float  # AdamW, decoupled
    warmup_epochs: float
    label_smoothing: float
    xla: str  # auto | on | off


def gpu_available() -> bool:
    import keras

    if keras.backend.backend() == "jax":
        import jax

        return any(device.platform == "gpu" for device in jax.devices())
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def configure_precision(requested: str, on_gpu: bool | None = None) -> str:
    """Set Keras' global dtype policy; the one place mixed precision is switched on. `on_gpu`
    None: ask the framework (which, under JAX, starts it on the GPU)."""
    import keras

    if requested == "auto":
        precision = "mixed_float16" if (gpu_available() if on_gpu is None else on_gpu) else "float32"
        if precision == "float32":
            log.info("no GPU found: training in float32 (mixed_float16 only pays off on a GPU)")
    else:
        precision = requested
    keras.mixed_precision.set_global_policy(precision)
    return precision


def set_phase(model, phase: int, unfreeze_blocks: int) -> None:
    """Make the layers of `phase` trainable (see TrainConfig.phase); BatchNorm of pretrained
    weights stays frozen in every phase. Recompile afterwards."""
    import keras

    if phase == 0:
        return
    backbone = model.layers[1]
    if phase == 1:
        backbone.trainable = False
        return
    blocks = list(
        dict.fromkeys(layer.name.split("_")[0] for layer in backbone.layers if layer.name.startswith("block"))
    )
    top = set(blocks[len(blocks) - unfreeze_blocks :]) if unfreeze_blocks else set()
    backbone.trainable = True
    for layer in backbone.layers:
        in_top = layer.name.split("_")[0] in top or layer.name.startswith("top_")
        layer.trainable = in_top and not isinstance(layer, keras.layers.BatchNormalization)


REMAT_MODES = ("none", "activations", "larger_than", "full")


# BatchNorm momentum from scratch. Keras' 0.99 leaves the moving statistics ~100 steps behind
# the weights, and a few hundred images give only a few hundred steps: validation accuracy then
# falls far below training accuracy. 0.9 tracks within ~10 steps; 0.99 and 0.8 were measured
# against it on small data (bench/quality.py, bench/RESULTS.md).
SCRATCH_BN_MOMENTUM = 0.9


def build_model(
    num_classes: int,
    image_size: int,
    weights: str = "none",
    dropout: float = 0.2,
    remat: str = "none",
    bn_momentum: float = SCRATCH_BN_MOMENTUM,
):
    """EfficientNet-B0 backbone + a new softmax head. Input: float RGB in 0..255.

    From scratch (`weights` "none") BatchNorm layers get `bn_momentum`; with pretrained weights
    they are frozen.

    `remat` (Keras `RematScope` mode, applied to the backbone's layers) trades recomputation in
    the backward pass for activation memory."""
    import keras

    if remat not in REMAT_MODES:
        raise ModelError(f"remat must be one of {', '.join(REMAT_MODES)}, got {remat!r}")
    with keras.RematScope(mode=None if remat == "none" else remat):
        backbone = keras.applications.EfficientNetB0(
            include_top=False,
            weights=None if weights == "none" else weights,
            input_shape=(image_size, image_size, 3),
            pooling="avg",
        )
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            if weights == "none":
                layer.momentum = bn_momentum
            else:
                # Pretrained statistics are better than any a small dataset can estimate:
                # frozen BatchNorm runs in inference mode (the Keras fine-tuning recipe).
                layer.trainable = False
    inputs = keras.Input((image_size, image_size, 3), name="image")
    features = backbone(inputs)
    features = keras.layers.Dropout(dropout, name="head_dropout")(features)
    # Softmax in float32: under mixed_float16 the logits can overflow and NaN the loss.
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities")(
        features
    )
    return keras.Model(inputs, outputs, name="efficientnet_b0_classifier")


def compile_for_training(
    model,
    recipe: Recipe,
    steps_per_epoch: int,
    accumulation: int = 1,
    steps_per_execution: int = 1,
    fixed_shapes: bool = False,
) -> None:
    """The optimizer, schedule and loss of every training run (and of bench/gpu_memory.py):
    AdamW, linear warm-up then cosine decay to 0 at the last step, label-smoothed
    cross-entropy. Under mixed_float16 Keras wraps the optimizer in a LossScaleOptimizer.

    With `accumulation` > 1 the optimizer sums that many steps' gradients per update. The
    schedule is planned in updates but given to Keras in steps: Keras calls a schedule with its
    raw step counter (`optimizer._iterations`, one per batch), not with `iterations` (updates),
    so a schedule of N updates would end, its rate 0 from there on, after N / accumulation
    updates."""
    import keras

    total_updates = max(math.ceil(steps_per_epoch / accumulation) * recipe.epochs, 1)
    warmup_updates = max(
        min(int(recipe.warmup_epochs * steps_per_epoch / accumulation), total_updates - 1), 0
    )
    learning_rate = recipe.learning_rate
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup_updates else learning_rate,
        decay_steps=(total_updates - warmup_updates) * accumulation,
        warmup_target=learning_rate if warmup_updates else None,
        warmup_steps=warmup_updates * accumulation,
    )
    optimizer = keras.optimizers.AdamW(
        learning_rate=schedule,
        weight_decay=recipe.weight_decay,
        gradient_accumulation_steps=accumulation if accumulation > 1 else None,
    )
    model.compile(
        jit_compile={"auto": "auto", "on": True, "off": False}[recipe.xla],
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=recipe.label_smoothing),
        # Padded validation (`fixed_shapes`) needs accuracy weighted by sample weight, which
        # Keras applies only to `weighted_metrics`; training accuracy is then weighted by the
        # class weights too, as the loss is.
        metrics=[] if fixed_shapes else ["accuracy"],
        weighted_metrics=["accuracy"] if fixed_shapes else None,
        steps_per_execution=steps_per_execution,
    )


def load_trained(model_dir: Path | str):
    """(Keras model, train summary) from a `train` output folder."""
    import keras

    model_dir = Path(model_dir)
    model_path = model_dir / "model.keras"
    if not model_path.is_file():
        raise ModelError(f"{model_dir} holds no model.keras: did train finish?")
    summary = json.loads((model_dir / "train_config.json").read_text())
    model = keras.saving.load_model(str(model_path), safe_mode=True)
    if any(layer.dtype_policy.compute_dtype != "float32" for layer in _all_layers(model)):
        model = as_float32(model)
    return model, summary


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)


def as_float32(model):
    """The same network and weights computing in float32. A model trained in mixed precision
    keeps float32 weights, but its layers compute in float16: on a CPU that is emulated, slow,
    and its results depend on the kernel (1.7e-2 apart between Keras and the exported
    SavedModel of a JAX-trained model at 224 px, bench/RESULTS.md). Evaluate, export and serve
    run on CPUs, in float32."""
    import keras

    def to_float32(node):
        if isinstance(node, dict):
            if node.get("class_name") == "DTypePolicy" and isinstance(node.get("config"), dict):
                return {**node, "config": {**node["config"], "name": "float32"}}
            return {key: to_float32(value) for key, value in node.items()}
        if isinstance(node, list):
            return [to_float32(value) for value in node]
        return node

    config = to_float32(keras.saving.serialize_keras_object(model))
    converted = keras.saving.deserialize_keras_object(config, safe_mode=True)
    converted.set_weights(model.get_weights())
    return converted
