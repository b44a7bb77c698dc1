"""train: fine-tune (or train from scratch) EfficientNet-B0 on prepared TFRecord shards.

    python -m components.train --data /tmp/prepared --output /tmp/model --epochs 10 \
        --weights imagenet --batch-size 256 --gpu-memory-limit 7680 --checkpoint-dir /mnt/ckpt

Writes to `--output`: `model.keras` (the weights that scored best on validation),
`train_config.json` (the resolved config: precision actually used, per-step batch and
accumulation, classes, image size), `history.json` (per epoch: metrics, images/s, phase,
peak GPU memory) and `tensorboard/`.

Weights: `imagenet`, the default (Keras' `efficientnetb0_notop.h5`, verified by its published
MD5 and cached where the next run finds it: components/pretrained.py), a path or an s3://,
minio://, gs:// URI of any EfficientNet-B0 no-top weights file, or `none` (from scratch: what
tests and the built-in dataset use; small data then gets `--min-updates`). Pretrained weights
train in two phases: the new head alone, then the top blocks too. The network itself, its
optimizer and schedule are components/model.py.

Backend: on a GPU Keras trains on JAX (`--backend auto`, components/backend.py), with the
memory cap applied before JAX starts and XLA's compiled programs kept beside the checkpoints;
on a CPU on TensorFlow. The model file is the same either way.

On a GPU the per-step batch is fitted to the memory budget (`components.batchfit`) and the
requested batch reached by gradient accumulation; running out of memory mid-run halves the
per-step batch and goes on from the last checkpoint. `--gpus N` trains data-parallel on N GPUs
of the node (Keras' distribution API on JAX): each GPU takes a fitted per-GPU batch, and the
effective batch, per-GPU batch x GPUs x accumulation, stays the requested one, so the
learning rate and its schedule mean the same for any N. Checkpoints (`components.checkpoints`)
every `--checkpoint-every` steps and at each epoch end make a killed run resumable: run the
same command again.
"""

from __future__ import annotations

import argparse
import collections
import gc
import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from components import backend as backend_lib
from components import batchfit, checkpoints, pretrained, records, report, storage
from components.cli import configure_logging, exit_on_user_error, json_config, local_path
from components.model import (
    PRECISIONS,
    SCRATCH_BN_MOMENTUM,
    Recipe,
    build_model,
    compile_for_training,
    configure_precision,
    gpu_available,
    set_phase,
)

log = logging.getLogger(__name__)

PROGRESS_SECONDS = 30.0  # a progress line within an epoch at most this often
BEST_WEIGHTS = "best.weights.h5"  # in the run's checkpoint folder: the best epoch so far
# From scratch, fewer optimizer updates than this leave EfficientNet-B0 answering at chance,
# measured on 120 photos of three plain colours at 64 px (bench/small_data.py, RESULTS.md):
# 24 updates (batch 32, 8 epochs) scored 0.33 on test and fresh images, 288 (batch 8, 24
# epochs) 0.92 and 0.92. The default floor of TrainConfig.min_updates; bench/quality.py
# measures it on several small datasets, with and without.
MIN_SCRATCH_UPDATES = 200


class TrainError(ValueError):
    """The configuration or the data cannot be trained on; the message says why."""


@dataclass(frozen=True)
class TrainConfig:
    data: Path
    output: Path
    epochs: int = 10
    # The effective batch: per step when it fits, otherwise reached by gradient accumulation
    # (batch_fit). 32 also suits the small datasets this is often run on.
    batch_size: int = 32
    # None picks by weights: 1e-3 from scratch, 1e-4 when fine-tuning pretrained weights
    # (larger steps would wreck the ImageNet features in the first epoch).
    learning_rate: float | None = None
    weight_decay: float = 1e-4  # AdamW, decoupled
    warmup_epochs: float = 1.0  # linear warm-up, then cosine decay to 0 at the last step
    # none | imagenet | path or URI of EfficientNet-B0 no-top weights. ImageNet weights are what
    # fine-tuning in this field starts from; the built-in demo and the tests ask for none.
    weights: str = "imagenet"
    # Where the ImageNet weights file is kept and looked for, verified by its published MD5
    # (components/pretrained.py): a folder or an s3:// / minio:// prefix. "" = <checkpoint_dir>/
    # weights when checkpoint_dir is set (it outlives the pod), else Keras' own ~/.keras/models.
    weights_cache: str = ""
    # From scratch, each epoch passes over the training images as many times as it takes for
    # the run to make at least this many optimizer updates (0 = off): small data otherwise
    # ends training before the network learns anything (MIN_SCRATCH_UPDATES says what was
    # measured). Pretrained weights need far fewer and are left alone.
    min_updates: int = MIN_SCRATCH_UPDATES
    # Fine-tuning pretrained weights in two phases (the Keras transfer-learning recipe): first
    # the new head alone for head_epochs (random head gradients would wreck the features),
    # then the top unfreeze_blocks of EfficientNet-B0's 16 blocks too, whole, BatchNorm frozen.
    head_epochs: int = 2
    unfreeze_blocks: int = 5
    precision: str = "auto"  # auto: mixed_float16 on a GPU, float32 on CPU
    dropout: float = 0.2  # before the new classification head, as in EfficientNet-B0
    bn_momentum: float = SCRATCH_BN_MOMENTUM  # BatchNorm's, from scratch (model.py says why)
    label_smoothing: float = 0.1
    augment: bool = True  # random horizontal flip + random shift (pad 1/8 and crop)
    # > 0: random resized crops (at least this share of the image's area, aspect 3:4 to 4:3,
    # resized back) instead of the shift, as photo pipelines use; 0 = off (bench/quality.py).
    crop_min_area: float = 0.0
    seed: int = 42
    verify_data: bool = True  # check shard hashes and record counts before training
    # Where checkpoints go ("" = <output>/checkpoints): a folder, or an s3:// / minio:// prefix
    # (mirrored after each save). Give one that outlives the pod, so a KFP retry resumes.
    checkpoint_dir: str = ""
    checkpoint_every: int = 50  # steps; a kill loses at most this many
    early_stopping_patience: int = 0  # epochs without a better val_accuracy; 0 = train them all
    # MiB of GPU memory the framework may use (0 = the card's memory less backend.HEADROOM_MIB):
    # 7680 reproduces an RTX 2070's budget on any larger card. With several GPUs, on each.
    gpu_memory_limit_mib: int = 0
    # GPUs of this node to train on, data-parallel (Keras' DataParallel on JAX): each step's
    # batch is split evenly across them and their gradients averaged. The effective batch
    # (batch_size) and so the learning rate and schedule do not change with it.
    gpus: int = 1
    # Keras backend: auto = jax when a GPU is used (and JAX with its CUDA plugin is installed),
    # tensorflow on a CPU (components/backend.py says why); jax or tensorflow to force one.
    backend: str = "auto"
    # Training steps queued per Keras call (0 = auto: 4 under JAX, 1 under TensorFlow). Under
    # JAX, pipelined_callbacks lets one call run ahead of the one waited for, so up to 2 x 4 + 1
    # input batches sit on the GPU (9 x 38 MB at 256 x 224 px), inside batchfit's 7% margin
    # (on the H200 the peak stayed at 7,312 MiB, bench/RESULTS.md).
    steps_per_execution: int = 0
    # auto: on a GPU, probe for the largest per-step batch up to batch_size (components.batchfit)
    # and reach batch_size by gradient accumulation; off: batch_size per step, as given.
    batch_fit: str = "auto"
    # "" = <checkpoint dir>/batch-fit.json (kept in the bucket for a bucket prefix), else
    # ~/.cache/efficientnet-retrain/batch-fit.json
    batch_fit_cache: str = ""
    # XLA compilation of the training step: auto = Keras' choice (on for a GPU, off on a CPU,
    # where it measured 5x slower: bench/RESULTS.md), on, off.
    xla: str = "auto"
    # Weight the loss by the manifest's inverse-frequency class weights, so that a rare class
    # counts as much as a common one; near 1 everywhere on balanced data.
    class_weights: bool = True

    def validate(self) -> None:
        if self.epochs < 1:
            raise TrainError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise TrainError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.precision not in PRECISIONS:
            raise TrainError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise TrainError(f"--learning-rate must be positive, got {self.learning_rate}")
        if (
            self.weights not in ("none", "imagenet")
            and not is_remote(self.weights)
            and not Path(self.weights).is_file()
        ):
            raise TrainError(
                f"--weights must be none, imagenet, an existing weights file or an "
                f"s3://, minio:// or gs:// URI of one; {self.weights} does not exist"
            )
        if self.min_updates < 0:
            raise TrainError(f"--min-updates must be 0 (off) or more, got {self.min_updates}")
        if self.head_epochs < 0 or not 0 <= self.unfreeze_blocks <= 16:
            raise TrainError("--head-epochs must be 0 or more and --unfreeze-blocks in 0..16")
        if self.xla not in ("auto", "on", "off"):
            raise TrainError(f"--xla must be auto, on or off, got {self.xla!r}")
        if self.backend not in backend_lib.BACKENDS:
            raise TrainError(
                f"--backend must be one of {', '.join(backend_lib.BACKENDS)}, got {self.backend!r}"
            )
        if self.batch_fit not in ("auto", "off"):
            raise TrainError(f"--batch-fit must be auto or off, got {self.batch_fit!r}")
        if self.gpus < 1:
            raise TrainError(f"--gpus must be at least 1, got {self.gpus}")
        if self.gpu_memory_limit_mib < 0:
            raise TrainError("--gpu-memory-limit must be 0 (the card less a headroom) or more MiB")
        if self.steps_per_execution < 0:
            raise TrainError("--steps-per-execution must be 0 (auto) or more")
        if self.checkpoint_every < 1:
            raise TrainError(f"--checkpoint-every must be at least 1 step, got {self.checkpoint_every}")
        if self.early_stopping_patience < 0:
            raise TrainError("--early-stopping-patience must be 0 (off) or more")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise TrainError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0.0 < self.bn_momentum < 1.0:
            raise TrainError(f"--bn-momentum must be in (0, 1), got {self.bn_momentum}")
        if not 0.0 <= self.crop_min_area <= 1.0:
            raise TrainError(f"--crop-min-area must be in [0, 1], got {self.crop_min_area}")

    @property
    def pretrained(self) -> bool:
        return self.weights != "none"

    def passes_per_epoch(self, train_images: int) -> int:
        """How many times an epoch goes over the training images: enough, from scratch, for
        `min_updates` optimizer updates at the requested (effective) batch over all epochs. Fixed
        by the settings and the data alone, so a resumed run (or one on another GPU, with
        another per-step batch) counts epochs the same way."""
        updates = math.ceil(train_images / self.batch_size) * self.epochs
        if self.pretrained or updates >= self.min_updates:
            return 1
        # The fewest p with ceil(train_images * p / batch) >= ceil(min_updates / epochs).
        return self.batch_size * (math.ceil(self.min_updates / self.epochs) - 1) // train_images + 1

    def resolved_learning_rate(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 1e-4 if self.pretrained else 1e-3

    def phase(self, epoch: int) -> int:
        """0: from scratch, everything trains; 1: pretrained, the new head alone (backbone
        frozen); 2: pretrained, the head and the top `unfreeze_blocks` blocks."""
        if not self.pretrained:
            return 0
        return 1 if epoch < self.head_epochs else 2

    def recipe(self, epochs: int | None = None, learning_rate: float | None = None) -> Recipe:
        """How a phase of `epochs` (default: all) at peak `learning_rate` (default: resolved) trains."""
        return Recipe(
            learning_rate=learning_rate or self.resolved_learning_rate(),
            epochs=epochs or self.epochs,
            weight_decay=self.weight_decay,
            warmup_epochs=self.warmup_epochs,
            label_smoothing=self.label_smoothing,
            xla=self.xla,
        )

    def phase_plan(self, phase: int) -> tuple[int, float]:
        """(epochs, peak learning rate) of a phase: its own warm-up + cosine schedule."""
        if phase == 1:
            return min(self.head_epochs, self.epochs), HEAD_LEARNING_RATE
        if phase == 2:
            return self.epochs - min(self.head_epochs, self.epochs), self.resolved_learning_rate()
        return self.epochs, self.resolved_learning_rate()


REMOTE_SCHEMES = ("s3://", "minio://", "gs://")
CURVES_PNG = "training_curves.png"  # loss and accuracy per epoch, beside model.keras
HEAD_LEARNING_RATE = 1e-3  # phase 1: a new, randomly initialised head


def is_remote(location: str) -> bool:
    return location.startswith(REMOTE_SCHEMES)


def resolve_weights(config: TrainConfig, checkpoint_dir: Path) -> str:
    """What `build_model` loads: "none", or a local weights file (ImageNet's from the verified
    cache, or the user's own, fetched from an object store)."""
    if config.weights == "imagenet":
        cache = config.weights_cache or pretrained.default_cache(config.checkpoint_dir)
        try:
            return str(pretrained.resolve(cache, checkpoint_dir.parent / "weights"))
        except pretrained.WeightsError as error:
            raise TrainError(str(error)) from None
    if is_remote(config.weights):
        return fetch_weights(config.weights, checkpoint_dir.parent / "weights")
    return config.weights


def fetch_weights(uri: str, folder: Path) -> str:
    """Download a weights file from an object store (for air-gapped clusters that keep
    `efficientnetb0_notop.h5` in a bucket) into `folder`; the local path. Keras needs the file
    name's extension, so it is kept."""
    parent, _, name = uri.rstrip("/").rpartition("/")
    if not name or parent.endswith(":/"):
        raise TrainError(f"--weights {uri} names no file; expected scheme://bucket/path/file.h5")
    try:
        data = storage.open_source(parent).read(name)
    except storage.StorageError as error:
        raise TrainError(f"cannot read --weights {uri}: {error}") from None
    folder.mkdir(parents=True, exist_ok=True)
    local = folder / name
    local.write_bytes(data)
    log.info("fetched weights %s (%.1f MB)", uri, len(data) / 1e6)
    return str(local)


def training_dataset(
    dataset: records.PreparedDataset,
    config: TrainConfig,
    num_classes: int,
    epoch: int = 0,
    skip: int = 0,
    batch_size: int | None = None,
    steps: int | None = None,
    full_batches: bool = True,
    passes: int = 1,
):
    """One epoch of training batches, in an order fixed by (seed, epoch): a resumed epoch skips
    the `skip` images it already trained on and sees the rest in the same order. An epoch is
    `passes` passes over the training images, each in its own order.

    `full_batches` (for XLA, where a partial batch would be a second compile of the whole
    step): the last batch of an epoch is topped up from the start of the next pass (a few
    images trained twice that epoch). Otherwise (TensorFlow without XLA, where a new shape costs
    little and the top-up would cost images) the last batch is partial. `steps`: that many
    batches, then the end (Keras' steps_per_execution needs the end to stop at); None: all."""
    import tensorflow as tf

    size = dataset.image_size
    pad = size // 8

    def _augment(image, label):
        image = tf.image.random_flip_left_right(image)
        if config.crop_min_area > 0:
            begin, extent, _ = tf.image.sample_distorted_bounding_box(
                tf.shape(image),
                bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
                min_object_covered=0.0,
                aspect_ratio_range=(3 / 4, 4 / 3),
                area_range=(config.crop_min_area, 1.0),
                max_attempts=10,
            )
            crop = tf.image.resize(tf.slice(image, begin, extent), [size, size], method="bilinear")
            return tf.cast(tf.round(tf.clip_by_value(crop, 0.0, 255.0)), tf.uint8), label
        image = tf.image.pad_to_bounding_box(image, pad, pad, size + 2 * pad, size + 2 * pad)
        image = tf.image.random_crop(image, [size, size, 3])
        return image, label

    def _finish(images, labels):
        # Images stay uint8 to the model, whose input layer casts them on the device: a
        # quarter of the bytes to copy to the GPU every step (150 KB an image at 224 px).
        return images, tf.one_hot(labels, num_classes)

    # A buffer of the whole split when it is small (exact shuffle), capped so large sets stay
    # within memory (encoded records are shuffled: 10k x ~20 KB at 224 px).
    data = records.read_split(
        dataset,
        "train",
        shuffle_buffer=min(dataset.count("train"), 10_000),
        seed=config.seed * 100_003 + epoch,
        passes=passes,
        skip=skip,
    )
    if full_batches:
        data = data.repeat()
    if config.augment:
        data = data.map(_augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    batches = data.batch(
        batch_size or config.batch_size,
        drop_remainder=full_batches,
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=False,
    )
    if steps is not None:
        batches = batches.take(steps)
    return batches.map(_finish, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False).prefetch(
        tf.data.AUTOTUNE
    )


def eval_dataset(
    dataset: records.PreparedDataset, split: str, batch_size: int, num_classes: int, pad: bool = True
):
    """(batches of (images, one-hot labels, weights), padding). With `pad` (for XLA) every batch
    is `batch_size` images, the last one padded with copies of a real image at weight 0, so that
    validation is compiled once: weighted metrics (compile_for_training's, under `fixed_shapes`)
    ignore the padding, and Keras' loss divides each batch's sum by the batch size, so the mean
    loss is the true one times (count + padding) / count."""
    import tensorflow as tf

    count = dataset.count(split)
    padding = -count % batch_size if pad else 0
    weighted = records.read_split(dataset, split).map(lambda image, label: (image, label, 1.0))
    if padding:
        filler = weighted.take(1).map(lambda image, label, _: (image, label, 0.0)).repeat(padding)
        weighted = weighted.concatenate(filler)
    data = (
        weighted.batch(batch_size)
        .map(
            lambda images, labels, weights: (images, tf.one_hot(labels, num_classes), weights),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        .prefetch(tf.data.AUTOTUNE)
    )
    return data, padding


def _epoch_logger(epochs: int):
    import keras

    class EpochLogger(keras.callbacks.Callback):
        """One log line per epoch with images/s: the figure that tells whether input keeps up.
        The caller sets `images` (what this fit call trains on), `resumed_from_step` and
        `val_loss_factor` (eval_dataset's padding correction).

        Two rates: `images_per_sec` over the whole epoch (validation and the first step's
        compile included) and `train_images_per_sec` over its steps after the first, which is
        what the training step sustains. `first_step_seconds`: from the fit call to the end of
        the first step of this process, tracing and compiling (or loading from the
        compilation cache) included."""

        images = 0
        step_batch = 0
        resumed_from_step = 0
        val_loss_factor = 1.0
        fit_started: float | None = None
        checkpoint_seconds = 0.0
        first_step_seconds: float | None = None

        def __init__(self):
            super().__init__()
            self.rows: list[dict[str, float]] = []

        def on_epoch_begin(self, epoch, logs=None):
            self.checkpoint_seconds = 0.0
            self.started = self.last_report = time.monotonic()
            self.epoch = epoch
            self.first_batch_end = self.last_batch_end = None
            self.first_batch = self.last_batch = 0
            self.validation_seconds = None

        def on_test_begin(self, logs=None):
            self.validation_started = time.monotonic()

        def on_test_end(self, logs=None):
            self.validation_seconds = time.monotonic() - self.validation_started

        def on_train_batch_end(self, batch, logs=None):
            # On an epoch's first and last call Keras (TensorFlow) or pipelined_callbacks (JAX)
            # has waited for the device: there `now` is when the steps finished, not when they
            # were queued. Between them, under JAX, it may be a call early.
            now = time.monotonic()
            self.last_batch = batch
            if self.first_batch_end is None:
                self.first_batch_end, self.first_batch = now, batch
                if self.first_step_seconds is None and self.fit_started is not None:
                    self.first_step_seconds = round(now - self.fit_started, 2)
                    log.info(
                        "first training step after %.1f s (tracing and compiling included)",
                        self.first_step_seconds,
                    )
            self.last_batch_end = now
            # A CPU epoch at 224 px can take many minutes: say that it is moving.
            if now - self.last_report >= PROGRESS_SECONDS:
                self.last_report = now
                steps = self.params.get("steps")
                log.info(
                    "epoch %d: step %d/%s, loss %.4f",
                    self.epoch + 1,
                    min(batch + 1, steps or batch + 1),
                    steps or "?",
                    float((logs or {}).get("loss", math.nan)),
                )

        def on_epoch_end(self, epoch, logs=None):
            seconds = time.monotonic() - self.started
            row = {
                "epoch": epoch + 1,
                "seconds": round(seconds, 2),
                "images_per_sec": round(self.images / seconds, 1),
            }
            if self.last_batch > self.first_batch and self.last_batch_end > self.first_batch_end:
                steps = min(self.last_batch + 1, self.params.get("steps") or self.last_batch + 1)
                row["train_images_per_sec"] = round(
                    (steps - self.first_batch - 1)
                    * self.step_batch
                    / (self.last_batch_end - self.first_batch_end),
                    1,
                )
            if self.first_batch_end is not None:  # the input's set-up and the first call's steps
                row["first_call_seconds"] = round(self.first_batch_end - self.started, 3)
            if self.validation_seconds is not None:
                row["validation_seconds"] = round(self.validation_seconds, 3)
            if self.resumed_from_step:
                row["resumed_from_step"] = self.resumed_from_step
            if self.checkpoint_seconds:  # mid-epoch saves; the epoch-end one comes after this row
                row["checkpoint_seconds"] = round(self.checkpoint_seconds, 2)
            peak = batchfit.peak_memory_mib()
            if peak is not None:
                row["peak_gpu_memory_mib"] = round(peak, 1)
            row.update({key: float(value) for key, value in (logs or {}).items()})
            if "val_loss" in row:
                row["val_loss"] *= self.val_loss_factor
            self.rows.append(row)
            log.info(
                "epoch %d/%d: loss %.4f accuracy %.4f val_loss %.4f val_accuracy %.4f (%.0f img/s%s)",
                epoch + 1,
                epochs,
                row.get("loss", math.nan),
                row.get("accuracy", math.nan),
                row.get("val_loss", math.nan),
                row.get("val_accuracy", math.nan),
                row["images_per_sec"],
                f", peak GPU memory {peak:.0f} MiB" if peak is not None else "",
            )

    return EpochLogger()


def pipelined_callbacks(callbacks: list, model, epochs: int, steps: int, ahead: int = 1):
    """The callback list `model.fit` gets under JAX: callbacks run in the training thread, on
    the step's logs as device arrays, without waiting for each call to finish.

    Keras' own list converts every call's logs to floats before its callbacks run (unless all
    of them are marked thread-safe, and ours write checkpoints), which waits for the device:
    the GPU then idles while the host fetches, copies and dispatches the next call. This one
    lets `ahead` calls run ahead of the one waited for, enough to keep the GPU fed, few
    enough that the input batches queued on it stay small (each call holds its
    `steps_per_execution` batches there until it runs). It waits for the call it was given on
    an epoch's first and last call, so that the step times callbacks take there are the
    device's. Callbacks that read `logs` convert them themselves (which waits, if they do)."""
    import jax
    import keras

    class PipelinedCallbackList(keras.callbacks.CallbackList):
        def on_epoch_begin(self, epoch, logs=None):
            self.queued = collections.deque()
            self.calls = 0
            super().on_epoch_begin(epoch, logs)

        def on_train_batch_end(self, batch, logs=None):
            self.queued.append(logs)
            total = self.params.get("steps")
            edge = self.calls == 0 or (total is not None and batch + 1 >= total)
            self.calls += 1
            while self.queued and (edge or len(self.queued) > ahead):
                jax.block_until_ready(self.queued.popleft())
            for callback in self.callbacks:
                callback.on_train_batch_end(batch, logs=logs)

    return PipelinedCallbackList(
        callbacks, add_history=True, add_progbar=False, model=model, verbose=0, epochs=epochs, steps=steps
    )


def too_few_updates(
    train_images: int, step_batch: int, accumulation: int, epochs: int, weights: str, passes: int = 1
) -> str | None:
    """The warning a from-scratch run too short to learn gets before it starts (with the numbers
    and what to do), or None. `passes`: passes over the images an epoch (min_updates)."""
    per_epoch = math.ceil(math.ceil(train_images * passes / step_batch) / accumulation)
    updates = per_epoch * epochs
    if weights != "none" or updates >= MIN_SCRATCH_UPDATES:
        return None
    batch = step_batch * accumulation
    smaller = max(1, min(batch, train_images * passes * epochs // MIN_SCRATCH_UPDATES))
    over = f" ({passes} passes an epoch)" if passes > 1 else ""
    return (
        f"{train_images} training images at an effective batch of {batch} for {epochs} epochs{over} "
        f"are {updates} optimizer updates: from scratch (--weights none) EfficientNet-B0 needs about "
        f"{MIN_SCRATCH_UPDATES} to learn anything, and this model will probably answer at chance. "
        f"Use --epochs {math.ceil(MIN_SCRATCH_UPDATES / per_epoch)} at this batch, or --batch-size "
        f"{smaller} for these epochs, or --min-updates {MIN_SCRATCH_UPDATES} (the default: more "
        "passes over the images an epoch), or --weights imagenet (pretrained weights need far "
        "fewer), or more images."
    )


def run_checkpoint_dir(config: TrainConfig, dataset: records.PreparedDataset) -> Path:
    """`<checkpoint dir>/<run key>`: the key hashes the data fingerprint and every setting that
    shapes training, so a restart of the same run resumes, while next week's run on new data
    (or with other settings) sharing the same volume starts fresh instead of "resuming" a
    finished model."""
    root = (
        Path(config.checkpoint_dir)
        if config.checkpoint_dir and not is_remote(config.checkpoint_dir)
        else config.output / "checkpoints"
    )
    settings = json_config(config)
    # Not the backend, the steps per call, the memory cap or the GPU count: a run may resume
    # under the other backend (the arrays are the same; TrainingState.backend records which
    # wrote them), on a node with less memory (the checkpoint's batch, stepped down if it no
    # longer fits) or on fewer or more GPUs (resume_plan).
    for name in (
        "gpus",
        "data",
        "output",
        "checkpoint_dir",
        "checkpoint_every",
        "verify_data",
        "backend",
        "steps_per_execution",
        "gpu_memory_limit_mib",
        "batch_fit_cache",
    ):
        settings.pop(name, None)
    key = hashlib.sha256(
        json.dumps(
            {
                "data": dataset.manifest.get("fingerprint"),
                "shards": {
                    split: [shard["sha256"] for shard in shards]
                    for split, shards in dataset.manifest["shards"].items()
                },
                "settings": settings,
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()[:16]
    return root / f"run-{key}"


def compilation_cache(config: TrainConfig, checkpoint_dir: Path, memory_limit: int | None) -> Path:
    """Switch on JAX's persistent compilation cache in `<checkpoint root>/xla-cache/<cap>`: beside
    the checkpoints, so that what outlives a pod (a volume, or the bucket) also keeps the
    compiled step, and a resumed pod or next week's run on the same settings skips the compile.
    Entries are keyed by the program, the compiler and the device kind, but not by the memory
    XLA compiled against: a step compiled under 7680 MiB, reused under 2048, asked for 6.99 GiB
    and ran out (bench/RESULTS.md), where a fresh compile rematerializes to fit. Hence one
    folder per memory cap. With a bucket for checkpoints, its copy is fetched here and sent back
    after each epoch."""
    name = f"cap-{memory_limit}MiB" if memory_limit else "no-cap"
    folder = checkpoint_dir.parent / "xla-cache" / name
    if is_remote(config.checkpoint_dir):
        uri = f"{config.checkpoint_dir.rstrip('/')}/xla-cache/{name}"
        try:
            fetched = checkpoints.pull_folder(uri, folder)
        except storage.StorageError as error:
            raise TrainError(f"cannot use --checkpoint-dir {config.checkpoint_dir}: {error}") from None
        if fetched:
            log.info("fetched %d compiled program(s) from %s", fetched, uri)
    backend_lib.enable_compilation_cache(folder)
    entries = sum(1 for path in folder.iterdir() if path.is_file())
    log.info("XLA compilation cache: %s (%d entries)", folder, entries)
    return folder


class Interrupted(RuntimeError):
    """SIGTERM arrived; a checkpoint was written and the run stops so that it can be resumed."""


def _checkpointer(save, every: int, state: checkpoints.TrainingState, train_images: int):
    import keras

    class Checkpointer(keras.callbacks.Callback):
        """Counts steps into `state`; writes a checkpoint each time the step count passes a
        multiple of `every`, and at once (then stops training) when SIGTERM has arrived.

        Keras calls it once per `steps_per_execution` steps, with the index of the last one."""

        terminate = False

        def on_train_begin(self, logs=None):
            self.base = (state.step, state.global_step, state.images_in_epoch)

        def on_train_batch_end(self, batch, logs=None):
            done = min(batch + 1, self.params.get("steps") or batch + 1)
            step, global_step, images = self.base
            before = state.global_step
            state.step, state.global_step = step + done, global_step + done
            state.images_in_epoch = min(images + done * state.step_batch, train_images)
            # An epoch's last step is saved by the epoch-end checkpoint, after validation, so
            # that no checkpoint ever says "epoch finished, not yet validated".
            last_step = state.images_in_epoch >= train_images
            if not last_step and (self.terminate or state.global_step // every > before // every):
                save(self.model)
            if self.terminate:
                self.model.stop_training = True

    return Checkpointer()


BATCH_FIT_CACHE = "batch-fit.json"


def _remove_finished_runs(config: TrainConfig, checkpoint_dir: Path) -> None:
    """Earlier runs' checkpoints on the same root, once their runs finished: only space now."""
    remote = is_remote(config.checkpoint_dir)
    root = config.checkpoint_dir.rstrip("/") if remote else checkpoint_dir.parent
    try:
        gone = checkpoints.remove_finished_runs(root, checkpoint_dir.name)
    except storage.StorageError as error:
        raise TrainError(f"cannot use --checkpoint-dir {config.checkpoint_dir}: {error}") from None
    if gone:
        log.info(
            "removed the checkpoints of %d finished run(s) from %s: %s", len(gone), root, ", ".join(gone)
        )


def _fit_cache_remote(config: TrainConfig) -> str:
    """The bucket prefix of --checkpoint-dir when the batch-fit cache is kept there between
    pods, beside the runs' checkpoints (a pod's own ~/.cache is gone with it), else ""."""
    if config.batch_fit_cache or not is_remote(config.checkpoint_dir):
        return ""
    return config.checkpoint_dir.rstrip("/")


def _pull_fit_cache(remote: str, cache_file: Path) -> None:
    try:
        data = storage.open_folder(remote).get_bytes(BATCH_FIT_CACHE)
    except storage.StorageError as error:
        raise TrainError(f"cannot read the batch-fit cache in {remote}: {error}") from None
    if data is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_bytes(data)
        log.info("batch-fit cache from %s/%s", remote, BATCH_FIT_CACHE)


def _push_fit_cache(cache_file: Path, remote: str) -> None:
    if not cache_file.is_file():
        return
    try:
        storage.open_folder(remote).put_bytes(BATCH_FIT_CACHE, cache_file.read_bytes())
    except storage.StorageError as error:
        # The fit itself stands; the next run only probes again.
        log.warning("could not keep the batch-fit cache in %s: %s", remote, error)


@dataclass
class _Run:
    """A prepared run: what `_prepare_run` resolved, and the model it builds or resumes."""

    config: TrainConfig
    backend: str
    gpu: Any  # batchfit.Gpu or None
    memory_limit: int | None
    dataset: records.PreparedDataset
    passes: int  # passes over the training images an epoch (min_updates)
    checkpoint_dir: Path
    weights: str  # what build_model loads
    compile_cache: Path | None
    precision: str
    mirror: checkpoints.RemoteMirror | None
    cache_file: Path  # the batch-fit cache
    probe_spec: batchfit.ProbeSpec
    batch_plan: batchfit.BatchPlan | None  # None when resuming: the checkpoint has one
    steps_per_execution: int
    fixed_shapes: bool  # JAX compiles every new shape with XLA: full batches, padded validation
    devices: int  # GPUs (JAX devices) each step's batch is split across

    @property
    def classes(self) -> list[str]:
        return self.dataset.classes

    @property
    def train_images(self) -> int:
        return self.dataset.count("train")

    @property
    def epoch_images(self) -> int:
        """What one epoch trains on."""
        return self.train_images * self.passes

    def prepare(self, model, step_batch: int, accumulation: int, epoch: int):
        """Set the phase of `epoch` and compile with that phase's schedule (a fresh optimizer)."""
        config = self.config
        phase = config.phase(epoch)
        set_phase(model, phase, config.unfreeze_blocks)
        phase_epochs, phase_rate = config.phase_plan(phase)
        compile_for_training(
            model,
            config.recipe(phase_epochs, phase_rate),
            math.ceil(self.epoch_images / step_batch),
            accumulation,
            steps_per_execution=self.steps_per_execution,
            fixed_shapes=self.fixed_shapes,
        )
        model.optimizer.build(model.trainable_variables)
        if phase:
            log.info(
                "phase %d: %s, %d epoch(s) at a peak learning rate of %g",
                phase,
                "the new head alone" if phase == 1 else f"head + top {config.unfreeze_blocks} blocks",
                phase_epochs,
                phase_rate,
            )
        return model

    def build(self, step_batch: int, accumulation: int, epoch: int = 0):
        model = build_model(
            len(self.classes),
            self.dataset.image_size,
            self.weights,
            self.config.dropout,
            bn_momentum=self.config.bn_momentum,
        )
        return self.prepare(model, step_batch, accumulation, epoch)


def _step_down(error: BaseException, model, state: checkpoints.TrainingState, run: _Run) -> Any:
    """Out of memory mid-training: halve the per-step batch (raising accumulation to keep the
    effective batch), remember it, and go on from the newest checkpoint. Returns the new model
    and updates `state` in place (the checkpoint callback holds it)."""
    per_device = state.step_batch // run.devices
    smaller = per_device // 2
    smaller -= smaller % 8 if smaller >= 8 else 0
    if smaller < 1:
        raise TrainError(f"out of memory even at a per-GPU batch of 1: {error}") from None
    new_plan = batchfit.plan(run.config.batch_size, smaller, run.devices)
    log.warning(
        "out of memory at a per-GPU batch of %d (%s): going on from the last checkpoint with "
        "%d x %d accumulation steps",
        per_device,
        str(error).splitlines()[0][:200],
        new_plan.step_batch,
        new_plan.accumulation,
    )
    if run.gpu is not None:
        batchfit.record_out_of_memory(run.cache_file, run.gpu, run.probe_spec, per_device)
        if remote := _fit_cache_remote(run.config):
            _push_fit_cache(run.cache_file, remote)
    del model

    gc.collect()
    try:
        model, saved = checkpoints.load_latest(
            run.checkpoint_dir,
            lambda saved: run.build(new_plan.step_batch, new_plan.accumulation, saved.epoch if saved else 0),
        )
    except checkpoints.CheckpointError as failure:
        raise TrainError(f"{failure}; delete {run.checkpoint_dir} to start over") from None
    backend = state.backend
    vars(state).update(vars(saved or checkpoints.TrainingState()))
    state.step_batch, state.accumulation, state.backend = new_plan.step_batch, new_plan.accumulation, backend
    return model


def train(config: TrainConfig) -> dict[str, Any]:
    """Run the step; returns the summary also written to `train_config.json`.

    Resumable: checkpoints go to `config.checkpoint_dir` every `checkpoint_every` steps and at
    every epoch end; a run started with the same directory continues from the newest usable
    one (mid-epoch: the images of that epoch already trained on are skipped)."""
    config.validate()
    run = _prepare_run(config)
    model, state = _load_or_build(run)
    started = time.monotonic()
    model, epoch_logger = _train_epochs(run, model, state)
    return _finish(run, model, state, epoch_logger, time.monotonic() - started)


def _prepare_run(config: TrainConfig) -> _Run:
    """Backend, data, checkpoint folder, weights, precision and batch plan, in that order."""
    # Before anything imports keras (TensorFlow does) or starts the GPU: Keras reads its backend
    # once, JAX reads its memory cap and compilation cache when it starts, and the batch probes
    # need the memory that a framework would otherwise reserve in this process.
    gpu = batchfit.detect_gpu()
    try:
        backend = backend_lib.resolve(config.backend, gpu_present=gpu is not None)
        backend_lib.activate(backend)
    except backend_lib.BackendError as error:
        raise TrainError(str(error)) from None
    log.info(
        "Keras backend: %s (--backend %s%s)",
        backend,
        config.backend,
        f"; GPU {gpu.name}" if gpu else "; no GPU",
    )
    gpu = _use_gpus(config, backend, gpu)
    memory_limit = batchfit.apply_memory_limit(config.gpu_memory_limit_mib, gpu)
    try:
        dataset = records.load(config.data, verify=config.verify_data)
    except records.DatasetError as error:
        raise TrainError(str(error)) from None
    train_images = dataset.count("train")
    if train_images == 0:
        raise TrainError(f"{config.data} has no training images")

    checkpoint_dir = run_checkpoint_dir(config, dataset)
    if config.checkpoint_dir:
        _remove_finished_runs(config, checkpoint_dir)
    # Before the batch-fit probes, which take minutes: an offline machine learns now.
    weights = resolve_weights(config, checkpoint_dir)
    compile_cache = compilation_cache(config, checkpoint_dir, memory_limit) if backend == "jax" else None

    # Whether training runs on the GPU, known without starting a framework there: the process
    # must hold no GPU memory while the batch-fit probes run (measured on an H200: 528 MiB of
    # CUDA context, which an 8 GB card cannot spare beside a probe's 7.1 GiB pool).
    on_gpu = gpu is not None and (backend_lib.jax_gpu_installed() if backend == "jax" else gpu_available())
    import keras

    precision = configure_precision(config.precision, on_gpu)
    mirror = None
    if is_remote(config.checkpoint_dir):
        if config.checkpoint_dir.startswith("gs://"):
            raise TrainError(
                "--checkpoint-dir: gs:// is not supported for checkpoints; use a volume "
                "path or an s3:// / minio:// prefix"
            )
        # A local working copy under the output folder, mirrored to the bucket after each save.
        remote = f"{config.checkpoint_dir.rstrip('/')}/{checkpoint_dir.name}"
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        try:
            mirror = checkpoints.RemoteMirror(remote)
            mirror.pull(checkpoint_dir)
        except storage.StorageError as error:
            raise TrainError(f"cannot use --checkpoint-dir {remote}: {error}") from None
    cache_file = (
        Path(config.batch_fit_cache)
        if config.batch_fit_cache
        else checkpoint_dir.parent / BATCH_FIT_CACHE
        if config.checkpoint_dir
        else batchfit.default_cache_file()
    )
    fit_cache_remote = _fit_cache_remote(config)
    if fit_cache_remote:
        _pull_fit_cache(fit_cache_remote, cache_file)
    probe_spec = batchfit.ProbeSpec(
        image_size=dataset.image_size,
        precision=precision,
        num_classes=len(dataset.classes),
        memory_limit_mib=int((memory_limit or 0) * (1 - batchfit.MARGIN)),
    )
    if checkpoints.complete(checkpoint_dir):
        batch_plan = None  # resuming: the checkpoint says which batch and accumulation
    elif config.batch_fit == "auto" and on_gpu:
        try:
            # Per GPU: each takes its share of the step's batch, and the probes run on one.
            largest = batchfit.largest_batch(
                math.ceil(config.batch_size / config.gpus), probe_spec, gpu, cache_file
            )
        except batchfit.BatchFitError as error:
            raise TrainError(str(error)) from None
        if fit_cache_remote:
            _push_fit_cache(cache_file, fit_cache_remote)
        batch_plan = batchfit.plan(config.batch_size, largest, config.gpus)
    else:
        batch_plan = batchfit.plan(config.batch_size, config.batch_size, config.gpus)

    # After the probes: under JAX, seeding starts the framework on the GPU.
    keras.utils.set_random_seed(config.seed)
    if config.gpus > 1:
        data_parallel(config.gpus)
    return _Run(
        config=config,
        backend=backend,
        gpu=gpu,
        memory_limit=memory_limit,
        dataset=dataset,
        passes=config.passes_per_epoch(train_images),
        checkpoint_dir=checkpoint_dir,
        weights=weights,
        compile_cache=compile_cache,
        precision=precision,
        mirror=mirror,
        cache_file=cache_file,
        probe_spec=probe_spec,
        batch_plan=batch_plan,
        steps_per_execution=config.steps_per_execution or (4 if backend == "jax" else 1),
        fixed_shapes=backend == "jax",
        devices=config.gpus,
    )


def _use_gpus(config: TrainConfig, backend: str, gpu: batchfit.Gpu | None) -> batchfit.Gpu | None:
    """Check `--gpus` against the backend and the GPUs this process sees, and narrow
    CUDA_VISIBLE_DEVICES to the first `gpus` of them before JAX starts: JAX would otherwise
    take its memory share on every visible card. Returns `gpu` with the count that trains."""
    if config.gpus > 1 and backend != "jax":
        raise TrainError(
            f"--gpus {config.gpus} trains data-parallel with Keras' distribution API, which this "
            f"project runs on JAX; the backend here is {backend}"
            + ("" if gpu else " (no GPU found: nvidia-smi lists none)")
            + ". Use --backend auto on a GPU node, or --gpus 1"
        )
    if gpu is None:
        return None  # a CPU: data_parallel checks JAX's CPU devices (how the tests run N > 1)
    if gpu.count < config.gpus:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise TrainError(
            f"--gpus {config.gpus}: this process sees {gpu.count} GPU(s) ({gpu.name}"
            + (f"; CUDA_VISIBLE_DEVICES={visible}" if visible is not None else "")
            + f"); give the pod {config.gpus} (the pipeline's gpus parameter) or lower --gpus"
        )
    if gpu.count > config.gpus:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        entries = visible.split(",") if visible is not None else [str(index) for index in range(gpu.count)]
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(entries[: config.gpus])
        log.info(
            "training on %d of the %d GPUs visible (CUDA_VISIBLE_DEVICES=%s)",
            config.gpus,
            gpu.count,
            os.environ["CUDA_VISIBLE_DEVICES"],
        )
    return replace(gpu, count=config.gpus)


def data_parallel(gpus: int) -> list:
    """Train on the first `gpus` JAX devices with Keras' DataParallel: the weights replicated on
    each, every step's batch split along its first axis, the gradients averaged across devices
    inside the compiled step. Set before the model is built (variables made earlier would stay
    on one device). Returns the devices."""
    import jax
    import keras

    devices = jax.devices()
    if len(devices) < gpus:
        platform = devices[0].platform if devices else "none"
        raise TrainError(
            f"--gpus {gpus}: JAX sees {len(devices)} {platform} device(s)"
            + (
                " (no GPU: on a CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N makes N "
                "devices, which is how the tests check this path)"
                if platform == "cpu"
                else ""
            )
        )
    chosen = devices[:gpus]
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=chosen))
    log.info("data-parallel on %d devices: %s", gpus, ", ".join(str(device) for device in chosen))
    return chosen


def resume_plan(config: TrainConfig, saved: checkpoints.TrainingState, devices: int) -> batchfit.BatchPlan:
    """The batch plan a checkpoint goes on with on `devices` GPUs: its own when it was trained on
    as many; otherwise its per-GPU batch (what fitted on one card) on each of them, with the
    accumulation chosen again to keep the requested effective batch (2 GPUs x 16 -> 1 x 16 x 2)."""
    saved_devices = max(saved.gpus, 1)
    if saved_devices == devices:
        return batchfit.BatchPlan(saved.step_batch, saved.accumulation, config.batch_size, devices)
    return batchfit.plan(config.batch_size, max(saved.step_batch // saved_devices, 1), devices)


def _load_or_build(run: _Run) -> tuple[Any, checkpoints.TrainingState]:
    """The newest usable checkpoint of this run, or a fresh model at the planned batch."""
    plan = run.batch_plan

    def build(saved):
        if saved is None:
            return run.build(plan.step_batch, plan.accumulation)
        going_on = resume_plan(run.config, saved, run.devices)
        return run.build(going_on.step_batch, going_on.accumulation, saved.epoch)

    try:
        model, state = checkpoints.load_latest(run.checkpoint_dir, build)
    except checkpoints.CheckpointError as error:
        raise TrainError(f"{error}; delete {run.checkpoint_dir} to start over") from None
    if state is not None and state.backend and state.backend != run.backend:
        log.warning(
            "the checkpoint was written under the %s backend; resuming it under %s (weights "
            "and optimizer variables are plain arrays, the same under both)",
            state.backend,
            run.backend,
        )
    if state is not None and max(state.gpus, 1) != run.devices:
        going_on = resume_plan(run.config, state, run.devices)
        log.warning(
            "the checkpoint was trained on %d GPU(s) at %d a GPU x %d accumulation step(s); going "
            "on on %d at %d a GPU x %d: the same effective batch, so the schedule goes on from "
            "the same update",
            max(state.gpus, 1),
            state.step_batch // max(state.gpus, 1),
            state.accumulation,
            run.devices,
            going_on.device_batch,
            going_on.accumulation,
        )
        state.step_batch, state.accumulation = going_on.step_batch, going_on.accumulation
    state = state or checkpoints.TrainingState(step_batch=plan.step_batch, accumulation=plan.accumulation)
    state.backend, state.gpus = run.backend, run.devices
    log.info(
        "per-step batch %d%s x %d accumulation step(s) = effective batch %d (requested %d); "
        "the learning rate and its schedule are per update of the effective batch",
        state.step_batch,
        f" ({state.step_batch // run.devices} a GPU x {run.devices} GPUs)" if run.devices > 1 else "",
        state.accumulation,
        state.step_batch * state.accumulation,
        run.config.batch_size,
    )
    return model, state


def _log_plan(run: _Run, state: checkpoints.TrainingState) -> None:
    """What a fresh run is about to do, and the warning if it is too short to learn."""
    config = run.config
    warning = too_few_updates(
        run.train_images, state.step_batch, state.accumulation, config.epochs, config.weights, run.passes
    )
    if warning:
        log.warning("%s", warning)
    if run.passes > 1:
        log.info(
            "from scratch, %d training images x %d epochs at a batch of %d would be %d "
            "optimizer updates, fewer than --min-updates %d: each epoch passes over the "
            "images %d times (if validation accuracy stays low, raise --min-updates: 800 took "
            "a harder small set from 0.33 to 0.62 on fresh images, bench/RESULTS.md)",
            run.train_images,
            config.epochs,
            config.batch_size,
            math.ceil(run.train_images / config.batch_size) * config.epochs,
            config.min_updates,
            run.passes,
        )
    log.info(
        "training EfficientNet-B0 (weights %s, %s) on %d images of %d classes at %d px: "
        "%d epochs x %d steps of %d, learning rate %g; checkpoints every %d steps in %s",
        config.weights,
        run.precision,
        run.train_images,
        len(run.classes),
        run.dataset.image_size,
        config.epochs,
        math.ceil(run.epoch_images / state.step_batch),
        state.step_batch,
        config.resolved_learning_rate(),
        config.checkpoint_every,
        run.checkpoint_dir,
    )


def _train_epochs(run: _Run, model, state: checkpoints.TrainingState):
    """The epoch loop, from `state` to the last epoch (or an early stop): a checkpoint every
    `checkpoint_every` steps and at each epoch end, the best epoch's weights kept, a step down
    to a smaller batch on running out of memory, a clean stop on SIGTERM. Returns the model
    and the epoch logger (its rows are also in `state.history`)."""
    import keras

    config, dataset, checkpoint_dir = run.config, run.dataset, run.checkpoint_dir
    config.output.mkdir(parents=True, exist_ok=True)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    has_validation = dataset.count("validation") > 0
    best_weights = checkpoint_dir / BEST_WEIGHTS
    epoch_logger = _epoch_logger(config.epochs)

    def save_checkpoint(current_model) -> None:
        saving = time.monotonic()
        folder = checkpoints.save(checkpoint_dir, current_model, state)
        if run.mirror is not None:
            run.mirror.push(folder, best_weights)
        epoch_logger.checkpoint_seconds += time.monotonic() - saving

    checkpointer = _checkpointer(save_checkpoint, config.checkpoint_every, state, run.epoch_images)
    previous_handler = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):
        log.warning("SIGTERM: writing a checkpoint after the current step, then stopping")
        checkpointer.terminate = True

    signal.signal(signal.SIGTERM, on_sigterm)
    manifest_weights = dataset.manifest.get("class_weights") or {}
    class_weight = (
        {index: float(manifest_weights.get(name, 1.0)) for index, name in enumerate(run.classes)}
        if config.class_weights and manifest_weights
        else None
    )
    extra_callbacks = []
    if all(importlib.util.find_spec(name) for name in ("tensorflow", "tensorboard")):  # via tf.summary
        extra_callbacks.append(
            keras.callbacks.TensorBoard(
                log_dir=str(config.output / "tensorboard"), update_freq="epoch", write_graph=False
            )
        )
    if state.global_step == 0:
        _log_plan(run, state)
    try:
        while state.epoch < config.epochs:
            remaining = run.epoch_images - state.images_in_epoch
            steps = math.ceil(remaining / state.step_batch)
            validation, padding = (
                eval_dataset(dataset, "validation", state.step_batch, len(run.classes), pad=run.fixed_shapes)
                if has_validation
                else (None, 0)
            )
            epoch_logger.images = steps * state.step_batch if run.fixed_shapes else remaining
            epoch_logger.step_batch = state.step_batch
            epoch_logger.resumed_from_step = state.step
            if has_validation:
                count = dataset.count("validation")
                epoch_logger.val_loss_factor = (count + padding) / count
            epoch_logger.fit_started = time.monotonic()
            callbacks = [epoch_logger, checkpointer, *extra_callbacks]
            try:
                model.fit(
                    training_dataset(
                        dataset,
                        config,
                        len(run.classes),
                        epoch=state.epoch,
                        skip=state.images_in_epoch,
                        batch_size=state.step_batch,
                        steps=steps,
                        full_batches=run.fixed_shapes,
                        passes=run.passes,
                    ),
                    initial_epoch=state.epoch,
                    epochs=state.epoch + 1,
                    steps_per_epoch=steps,
                    validation_data=validation,
                    callbacks=(
                        pipelined_callbacks(callbacks, model, state.epoch + 1, steps)
                        if run.backend == "jax"
                        else callbacks
                    ),
                    class_weight=class_weight,
                    shuffle=False,  # tf.data shuffles (above); Keras would only warn that it cannot
                    verbose=0,
                )
            except checkpoints.DiskFullError as error:
                raise TrainError(str(error)) from None
            except Exception as error:
                if not batchfit.is_out_of_memory(error):
                    raise
                model = _step_down(error, model, state, run)
                continue
            if checkpointer.terminate and state.images_in_epoch < run.epoch_images:
                raise Interrupted(
                    f"stopped by SIGTERM at epoch {state.epoch + 1}, step {state.step}; "
                    f"run again with the same checkpoint directory ({checkpoint_dir}) "
                    "to resume"
                )
            row = epoch_logger.rows[-1]
            state.history.append(row)
            score = row.get("val_accuracy")
            if score is not None and (state.best_val_accuracy is None or score > state.best_val_accuracy):
                state.best_val_accuracy, state.best_epoch = score, state.epoch + 1
                partial = best_weights.with_name(".best.partial.weights.h5")
                try:
                    checkpoints.ensure_space(checkpoint_dir, checkpoints.needed_bytes(checkpoint_dir, model))
                except checkpoints.DiskFullError as error:
                    raise TrainError(str(error)) from None
                model.save_weights(partial)
                partial.replace(best_weights)
            row["phase"] = config.phase(state.epoch)
            state.epoch, state.step, state.images_in_epoch = state.epoch + 1, 0, 0
            if state.epoch < config.epochs and config.phase(state.epoch) != config.phase(state.epoch - 1):
                # Before the checkpoint, so that it holds the optimizer of the phase it resumes in.
                model = run.prepare(model, state.step_batch, state.accumulation, state.epoch)
            save_checkpoint(model)
            if run.compile_cache is not None and is_remote(config.checkpoint_dir):
                checkpoints.push_folder(
                    run.compile_cache,
                    f"{config.checkpoint_dir.rstrip('/')}/xla-cache/{run.compile_cache.name}",
                )
            if checkpointer.terminate:
                raise Interrupted(
                    f"stopped by SIGTERM at the end of epoch {state.epoch}; run again with "
                    f"the same checkpoint directory ({checkpoint_dir}) to resume"
                )
            if (
                config.early_stopping_patience
                and state.best_epoch is not None
                and state.epoch - state.best_epoch >= config.early_stopping_patience
            ):
                log.info(
                    "early stop after epoch %d: validation accuracy has not improved for %d epochs "
                    "(best %.4f at epoch %d)",
                    state.epoch,
                    config.early_stopping_patience,
                    state.best_val_accuracy,
                    state.best_epoch,
                )
                break
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    return model, epoch_logger


def _finish(
    run: _Run, model, state: checkpoints.TrainingState, epoch_logger, seconds: float
) -> dict[str, Any]:
    """The best epoch's weights saved as `model.keras`, the checkpoints of a finished local run
    removed (on a --checkpoint-dir, marked finished: the next run there removes them), and the
    summary written (`train_config.json`, `history.json`) and returned."""
    import keras

    config = run.config
    best_weights = run.checkpoint_dir / BEST_WEIGHTS
    if run.dataset.count("validation") > 0 and best_weights.exists():
        with warnings.catch_warnings():  # its optimizer variables may be another phase's: not needed
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            model.load_weights(best_weights)
    model.save(config.output / "model.keras")
    try:
        checkpoints.mark_finished(run.mirror or run.checkpoint_dir)
    except (OSError, storage.StorageError) as error:  # the model is saved: only cleanup is lost
        log.warning("could not mark the checkpoints of this finished run for removal: %s", error)
    if not config.checkpoint_dir or run.mirror is not None:
        # Inside the model artifact they would triple its size; a finished run needs none.
        shutil.rmtree(run.checkpoint_dir.parent, ignore_errors=True)

    history = state.history
    best = max(history, key=lambda row: row.get("val_accuracy", -1.0))
    summary = {
        "config": json_config(config),
        "learning_rate": config.resolved_learning_rate(),
        "precision": run.precision,
        "classes": run.classes,
        "image_size": run.dataset.image_size,
        "resize": run.dataset.manifest.get("resize", "stretch"),
        "train_images": run.train_images,
        "passes_per_epoch": run.passes,
        "step_batch": state.step_batch,
        "accumulation": state.accumulation,
        "effective_batch": state.step_batch * state.accumulation,
        "gpus": run.devices,
        "device_batch": state.step_batch // run.devices,
        "gpu": run.gpu.name if run.gpu else None,
        "gpu_memory_limit_mib": run.memory_limit,
        "steps_per_execution": run.steps_per_execution,
        "first_step_seconds": epoch_logger.first_step_seconds,
        "compilation_cache": str(run.compile_cache) if run.compile_cache else None,
        "epochs_trained": state.epoch,
        "best_epoch": best["epoch"],
        "best_val_accuracy": best.get("val_accuracy"),
        "train_seconds": round(seconds, 1),
        "keras_version": keras.__version__,
        "backend": keras.backend.backend(),
    }
    (config.output / "train_config.json").write_text(json.dumps(summary, indent=2) + "\n")
    (config.output / "history.json").write_text(json.dumps(history, indent=2) + "\n")
    (config.output / CURVES_PNG).write_bytes(report.curves_png(history))
    log.info(
        "saved %s (best epoch %d, val_accuracy %s)",
        config.output / "model.keras",
        best["epoch"],
        best.get("val_accuracy"),
    )
    return summary


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig(data=Path(), output=Path())
    parser = argparse.ArgumentParser(
        prog="python -m components.train", description="Train EfficientNet-B0 on prepared TFRecord shards."
    )
    parser.add_argument("--data", type=local_path, required=True, help="output folder of preprocess")
    parser.add_argument("--output", type=local_path, required=True, help="folder for model.keras and logs")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=None,
        help="peak learning rate (default: 1e-3 from scratch; pretrained: 1e-4 after the head epochs)",
    )
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--warmup-epochs", type=float, default=defaults.warmup_epochs)
    parser.add_argument(
        "--weights",
        default=defaults.weights,
        help="none | imagenet | path or s3://, minio://, gs:// URI of EfficientNet-B0 no-top weights",
    )
    parser.add_argument(
        "--weights-cache",
        default=defaults.weights_cache,
        help="folder or s3:// / minio:// prefix keeping the verified ImageNet weights "
        "(default: <checkpoint-dir>/weights if given, else ~/.keras/models)",
    )
    parser.add_argument(
        "--min-updates",
        type=int,
        default=defaults.min_updates,
        help="from scratch: pass over the images more times an epoch until the run "
        "makes this many optimizer updates (0 = off)",
    )
    parser.add_argument(
        "--head-epochs",
        type=int,
        default=defaults.head_epochs,
        help="pretrained weights: epochs training the new head alone first",
    )
    parser.add_argument(
        "--unfreeze-blocks",
        type=int,
        default=defaults.unfreeze_blocks,
        help="pretrained weights: top EfficientNet-B0 blocks trained after the head epochs",
    )
    parser.add_argument("--precision", choices=PRECISIONS, default=defaults.precision)
    parser.add_argument("--dropout", type=float, default=defaults.dropout)
    parser.add_argument(
        "--bn-momentum",
        type=float,
        default=defaults.bn_momentum,
        help="BatchNorm momentum when training from scratch (Keras' own is 0.99)",
    )
    parser.add_argument("--label-smoothing", type=float, default=defaults.label_smoothing)
    parser.add_argument("--no-augment", dest="augment", action="store_false")
    parser.add_argument(
        "--crop-min-area",
        type=float,
        default=defaults.crop_min_area,
        help="random resized crops of at least this share of the image instead of shifts (0 = off)",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--no-verify-data",
        dest="verify_data",
        action="store_false",
        help="skip the shard hash and record-count check",
    )
    parser.add_argument(
        "--checkpoint-dir",
        default=defaults.checkpoint_dir,
        help="folder or s3:// / minio:// prefix where checkpoints go and a restart "
        "resumes from (default <output>/checkpoints, removed when done)",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=defaults.checkpoint_every,
        help="steps between checkpoints: a kill loses at most this many",
    )
    parser.add_argument(
        "--gpus",
        type=int,
        default=defaults.gpus,
        help="GPUs of this node to train on, data-parallel (JAX backend); the effective batch "
        "stays --batch-size, split across them",
    )
    parser.add_argument(
        "--gpu-memory-limit",
        dest="gpu_memory_limit_mib",
        type=int,
        default=defaults.gpu_memory_limit_mib,
        help="MiB of GPU memory the framework may use (0 = the card's memory less "
        f"{backend_lib.HEADROOM_MIB} MiB; 7680 = an RTX 2070's budget on a larger card)",
    )
    parser.add_argument(
        "--backend",
        choices=backend_lib.BACKENDS,
        default=defaults.backend,
        help="Keras backend: auto = jax on a GPU (the measured path), tensorflow on a CPU",
    )
    parser.add_argument(
        "--steps-per-execution",
        type=int,
        default=defaults.steps_per_execution,
        help="training steps queued per Keras call (0 = 4 under JAX, 1 under TensorFlow)",
    )
    parser.add_argument(
        "--batch-fit",
        choices=("auto", "off"),
        default=defaults.batch_fit,
        help="auto: largest per-step batch that fits (probed), accumulation for the rest",
    )
    parser.add_argument(
        "--batch-fit-cache",
        default=defaults.batch_fit_cache,
        help="file remembering fitted batches per GPU and settings",
    )
    parser.add_argument(
        "--xla",
        choices=("auto", "on", "off"),
        default=defaults.xla,
        help="XLA-compile the training step (auto: on a GPU only)",
    )
    parser.add_argument(
        "--no-class-weights",
        dest="class_weights",
        action="store_false",
        help="do not weight the loss by the manifest's class weights",
    )
    parser.add_argument(
        "--early-stopping-patience",
        type=int,
        default=defaults.early_stopping_patience,
        help="stop after this many epochs without a better val_accuracy (0 = off)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    with exit_on_user_error(TrainError):
        try:
            train(TrainConfig(**vars(args)))
        except Interrupted as stop:
            log.warning("%s", stop)
            return 128 + signal.SIGTERM  # what a process killed by SIGTERM reports
    return 0


if __name__ == "__main__":
    sys.exit(main())
