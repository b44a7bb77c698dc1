"""train: fine-tune (or train from scratch) EfficientNet-B0 on prepared TFRecord shards.

    python -m components.train --data /tmp/prepared --output /tmp/model --epochs 10 \
        --weights imagenet

Writes to `--output`: `model.keras` (the weights that scored best on validation),
`train_config.json` (the resolved config: precision actually used, classes, image size) and
`history.json` (per-epoch loss/accuracy and images/s).

Weights: `imagenet` (Keras downloads `efficientnetb0_notop.h5` once; needs internet), a path to
that file or any EfficientNet-B0 no-top weights file (air-gapped clusters), or `none` (from
scratch; what tests and the built-in dataset use, since nothing may be downloaded there).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components import records
from components.cli import json_config

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "float32", "mixed_float16")
PROGRESS_SECONDS = 30.0  # a progress line within an epoch at most this often


class TrainError(ValueError):
    """The configuration or the data cannot be trained on; the message says why."""


@dataclass(frozen=True)
class TrainConfig:
    data: Path
    output: Path
    epochs: int = 10
    batch_size: int = 32  # per step; 32 x 224 px fits an 8 GB card in mixed precision
    # None picks by weights: 1e-3 from scratch, 3e-4 when fine-tuning pretrained weights
    # (larger steps would wreck the ImageNet features in the first epoch).
    learning_rate: float | None = None
    weight_decay: float = 1e-4  # AdamW, decoupled
    warmup_epochs: float = 1.0  # linear warm-up, then cosine decay to 0 at the last step
    weights: str = "none"  # none | imagenet | path to an EfficientNet-B0 no-top weights file
    precision: str = "auto"  # auto: mixed_float16 on a GPU, float32 on CPU
    dropout: float = 0.2  # before the new classification head, as in EfficientNet-B0
    label_smoothing: float = 0.1
    augment: bool = True  # random horizontal flip + random shift (pad 1/8 and crop)
    seed: int = 42
    verify_data: bool = True  # check shard hashes and record counts before training

    def validate(self) -> None:
        if self.epochs < 1:
            raise TrainError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise TrainError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.precision not in PRECISIONS:
            raise TrainError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise TrainError(f"--learning-rate must be positive, got {self.learning_rate}")
        if self.weights not in ("none", "imagenet") and not Path(self.weights).is_file():
            raise TrainError(f"--weights must be none, imagenet or an existing weights file; "
                             f"{self.weights} does not exist")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise TrainError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")

    @property
    def pretrained(self) -> bool:
        return self.weights != "none"

    def resolved_learning_rate(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 3e-4 if self.pretrained else 1e-3


def gpu_available() -> bool:
    import keras

    if keras.backend.backend() == "jax":
        import jax

        return any(device.platform == "gpu" for device in jax.devices())
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def configure_precision(requested: str) -> str:
    """Set Keras' global dtype policy; the one place mixed precision is switched on."""
    import keras

    if requested == "auto":
        precision = "mixed_float16" if gpu_available() else "float32"
        if precision == "float32":
            log.info("no GPU found: training in float32 (mixed_float16 only pays off on a GPU)")
    else:
        precision = requested
    keras.mixed_precision.set_global_policy(precision)
    return precision


REMAT_MODES = ("none", "activations", "larger_than", "full")


def build_model(num_classes: int, image_size: int, weights: str = "none", dropout: float = 0.2,
                remat: str = "none"):
    """EfficientNet-B0 backbone + a new softmax head. Input: float RGB in 0..255.

    `remat` (Keras `RematScope` mode, applied to the backbone's layers) trades recomputation in
    the backward pass for activation memory."""
    import keras

    if remat not in REMAT_MODES:
        raise TrainError(f"remat must be one of {', '.join(REMAT_MODES)}, got {remat!r}")
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
                # From scratch on a few hundred images, the default momentum 0.99 leaves the
                # moving statistics ~100 steps behind the weights and validation accuracy far
                # below training accuracy; 0.9 tracks within ~10 steps.
                layer.momentum = 0.9
            else:
                # Pretrained statistics are better than any a small dataset can estimate:
                # frozen BatchNorm runs in inference mode (the Keras fine-tuning recipe).
                layer.trainable = False
    inputs = keras.Input((image_size, image_size, 3), name="image")
    features = backbone(inputs)
    features = keras.layers.Dropout(dropout, name="head_dropout")(features)
    # Softmax in float32: under mixed_float16 the logits can overflow and NaN the loss.
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32",
                                 name="probabilities")(features)
    return keras.Model(inputs, outputs, name="efficientnet_b0_classifier")


def training_dataset(dataset: records.PreparedDataset, config: TrainConfig, num_classes: int):
    import tensorflow as tf

    size = dataset.image_size
    pad = size // 8

    def _augment(image, label):
        image = tf.image.random_flip_left_right(image)
        image = tf.image.pad_to_bounding_box(image, pad, pad, size + 2 * pad, size + 2 * pad)
        image = tf.image.random_crop(image, [size, size, 3])
        return image, label

    def _finish(images, labels):  # once per batch: one big cast instead of one per image
        return tf.cast(images, tf.float32), tf.one_hot(labels, num_classes)

    # A buffer of the whole split when it is small (exact shuffle), capped so large sets stay
    # within memory (encoded records are shuffled: 10k x ~20 KB at 224 px).
    data = records.read_split(dataset, "train", shuffle_buffer=min(dataset.count("train"), 10_000),
                              seed=config.seed)
    if config.augment:
        data = data.map(_augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    return (data.batch(config.batch_size, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
            .map(_finish, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
            .prefetch(tf.data.AUTOTUNE))


def eval_dataset(dataset: records.PreparedDataset, split: str, batch_size: int, num_classes: int):
    import tensorflow as tf

    return (records.read_split(dataset, split)
            .batch(batch_size)
            .map(lambda images, labels: (tf.cast(images, tf.float32), tf.one_hot(labels, num_classes)),
                 num_parallel_calls=tf.data.AUTOTUNE)
            .prefetch(tf.data.AUTOTUNE))


def _epoch_logger(train_images: int):
    import keras

    class EpochLogger(keras.callbacks.Callback):
        """One log line per epoch with images/s: the figure that tells whether input keeps up."""

        def __init__(self):
            super().__init__()
            self.rows: list[dict[str, float]] = []

        def on_epoch_begin(self, epoch, logs=None):
            self.started = self.last_report = time.monotonic()
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            # A CPU epoch at 224 px can take many minutes: say that it is moving.
            now = time.monotonic()
            if now - self.last_report >= PROGRESS_SECONDS:
                self.last_report = now
                log.info("epoch %d: step %d/%s, loss %.4f", self.epoch + 1, batch + 1,
                         self.params.get("steps") or "?", float((logs or {}).get("loss", math.nan)))

        def on_epoch_end(self, epoch, logs=None):
            seconds = time.monotonic() - self.started
            row = {"epoch": epoch + 1, "seconds": round(seconds, 2),
                   "images_per_sec": round(train_images / seconds, 1)}
            row.update({key: float(value) for key, value in (logs or {}).items()})
            self.rows.append(row)
            log.info("epoch %d/%d: loss %.4f accuracy %.4f val_loss %.4f val_accuracy %.4f (%.0f img/s)",
                     epoch + 1, self.params["epochs"], row.get("loss", math.nan),
                     row.get("accuracy", math.nan), row.get("val_loss", math.nan),
                     row.get("val_accuracy", math.nan), row["images_per_sec"])

    return EpochLogger()


def compile_for_training(model, config: TrainConfig, steps_per_epoch: int) -> None:
    """The optimizer, schedule and loss of every training run (and of bench/gpu_memory.py):
    AdamW, linear warm-up then cosine decay to 0 at the last step, label-smoothed
    cross-entropy. Under mixed_float16 Keras wraps the optimizer in a LossScaleOptimizer."""
    import keras

    total_steps = steps_per_epoch * config.epochs
    warmup_steps = min(int(config.warmup_epochs * steps_per_epoch), total_steps - 1)
    learning_rate = config.resolved_learning_rate()
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup_steps else learning_rate,
        decay_steps=total_steps - warmup_steps,
        warmup_target=learning_rate if warmup_steps else None,
        warmup_steps=warmup_steps,
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=schedule, weight_decay=config.weight_decay),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
        metrics=["accuracy"],
    )


def train(config: TrainConfig) -> dict[str, Any]:
    """Run the step; returns the summary also written to `train_config.json`."""
    config.validate()
    try:
        dataset = records.load(config.data, verify=config.verify_data)
    except records.DatasetError as error:
        raise TrainError(str(error)) from None
    if dataset.count("train") == 0:
        raise TrainError(f"{config.data} has no training images")

    import keras

    keras.utils.set_random_seed(config.seed)
    precision = configure_precision(config.precision)
    classes = dataset.classes
    model = build_model(len(classes), dataset.image_size, config.weights, config.dropout)

    steps_per_epoch = math.ceil(dataset.count("train") / config.batch_size)
    learning_rate = config.resolved_learning_rate()
    compile_for_training(model, config, steps_per_epoch)

    config.output.mkdir(parents=True, exist_ok=True)
    best_weights = config.output / "best.weights.h5"
    has_validation = dataset.count("validation") > 0
    epoch_logger = _epoch_logger(dataset.count("train"))
    callbacks = [epoch_logger]
    if has_validation:
        callbacks.append(keras.callbacks.ModelCheckpoint(
            str(best_weights), monitor="val_accuracy", mode="max", save_best_only=True,
            save_weights_only=True, verbose=0))
    log.info("training EfficientNet-B0 (weights %s, %s) on %d images of %d classes at %d px: "
             "%d epochs x %d steps of %d, learning rate %g",
             config.weights, precision, dataset.count("train"), len(classes), dataset.image_size,
             config.epochs, steps_per_epoch, config.batch_size, learning_rate)
    started = time.monotonic()
    model.fit(
        training_dataset(dataset, config, len(classes)),
        epochs=config.epochs,
        validation_data=eval_dataset(dataset, "validation", config.batch_size, len(classes))
        if has_validation else None,
        callbacks=callbacks,
        shuffle=False,  # tf.data shuffles (above); Keras would only warn that it cannot
        verbose=0,
    )
    if has_validation and best_weights.exists():
        model.load_weights(str(best_weights))
        best_weights.unlink()
    model.save(config.output / "model.keras")

    history = epoch_logger.rows
    best = max(history, key=lambda row: row.get("val_accuracy", -1.0))
    summary = {
        "config": json_config(config),
        "learning_rate": learning_rate,
        "precision": precision,
        "classes": classes,
        "image_size": dataset.image_size,
        "resize": dataset.manifest.get("resize", "stretch"),
        "train_images": dataset.count("train"),
        "best_epoch": best["epoch"],
        "best_val_accuracy": best.get("val_accuracy"),
        "train_seconds": round(time.monotonic() - started, 1),
        "keras_version": keras.__version__,
        "backend": keras.backend.backend(),
    }
    (config.output / "train_config.json").write_text(json.dumps(summary, indent=2) + "\n")
    (config.output / "history.json").write_text(json.dumps(history, indent=2) + "\n")
    log.info("saved %s (best epoch %d, val_accuracy %s)", config.output / "model.keras",
             best["epoch"], best.get("val_accuracy"))
    return summary


def load_trained(model_dir: Path | str):
    """(Keras model, train summary) from a `train` output folder."""
    import keras

    model_dir = Path(model_dir)
    model_path = model_dir / "model.keras"
    if not model_path.is_file():
        raise TrainError(f"{model_dir} holds no model.keras: did train finish?")
    summary = json.loads((model_dir / "train_config.json").read_text())
    return keras.saving.load_model(str(model_path), safe_mode=True), summary


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig(data=Path(), output=Path())
    parser = argparse.ArgumentParser(prog="python -m components.train",
                                     description="Train EfficientNet-B0 on prepared TFRecord shards.")
    parser.add_argument("--data", type=Path, required=True, help="output folder of preprocess")
    parser.add_argument("--output", type=Path, required=True, help="folder for model.keras and logs")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--learning-rate", type=float, default=None,
                        help="peak learning rate (default: 1e-3 from scratch, 3e-4 pretrained)")
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--warmup-epochs", type=float, default=defaults.warmup_epochs)
    parser.add_argument("--weights", default=defaults.weights,
                        help="none | imagenet | path to an EfficientNet-B0 no-top weights file")
    parser.add_argument("--precision", choices=PRECISIONS, default=defaults.precision)
    parser.add_argument("--dropout", type=float, default=defaults.dropout)
    parser.add_argument("--label-smoothing", type=float, default=defaults.label_smoothing)
    parser.add_argument("--no-augment", dest="augment", action="store_false")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--no-verify-data", dest="verify_data", action="store_false",
                        help="skip the shard hash and record-count check")
    return parser


def main(argv: list[str] | None = None) -> int:
    from components.cli import configure_logging, exit_on_user_error

    args = build_parser().parse_args(argv)
    configure_logging()
    with exit_on_user_error(TrainError):
        train(TrainConfig(**vars(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
