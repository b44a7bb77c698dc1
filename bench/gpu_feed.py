"""Where the train step's time goes on a GPU: one compiled step, fed several ways, in one process.

    python3 bench/gpu_feed.py --data /tmp/gt/dataset --out $OUT/gpu_feed.json     # on a GPU
    python3 bench/gpu_feed.py --data /tmp/dry/dataset --batch 16 --cap-mib 0 --steps 8   # CPU dry run

The model, optimizer and precision are the train step's (`components.train`), compiled once.
Each `fit` variant is timed at two lengths (`--steps` and twice that, same steps per call), and
its rate is the difference: what a step costs once an epoch is under way, set-up excluded.

- device: the batch already on the device, the step called in a loop with no callbacks and no
  host sync (bench/gpu_memory.py's step, the baseline the issue sets);
- memory: `model.fit` on one real batch repeated from host memory: Keras' feeding (numpy, then
  a copy to the device one batch ahead) without decoding;
- pipeline: `model.fit` on `training_dataset` (decode, augment, batch on the CPUs);

each of the last two with the callbacks Keras waits for after every call (`wait`: any callback
with `on_train_batch_end`, as the product had), with `pipelined_callbacks` (the product's
now), and with none (`free`: Keras runs callbacks on a thread and nothing bounds how far the
host runs ahead). Peak device memory is read after each variant (JAX's peak only grows, so the
variants run from the least queued to the most).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a prepared dataset (components.preprocess)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--cap-mib", type=int, default=7680)
    parser.add_argument("--steps", type=int, default=24, help="the short fit; the long one is twice")
    parser.add_argument("--calls", default="1,4,8", help="steps per Keras call to try")
    parser.add_argument("--callbacks", default="wait,pipelined,free", help="callback variants to try")
    parser.add_argument("--precision", default="mixed_float16")
    args = parser.parse_args()

    from components import backend, batchfit, records

    backend.activate("jax")
    gpu = batchfit.detect_gpu()
    cap = batchfit.apply_memory_limit(args.cap_mib or None, gpu) if gpu else None
    backend.enable_compilation_cache(Path(os.environ.get("FEED_XLA_CACHE", "/tmp/feed-xla")))

    import jax
    import keras
    import numpy as np
    import tensorflow as tf

    from components.model import build_model, compile_for_training, configure_precision
    from components.train import TrainConfig, pipelined_callbacks, training_dataset

    dataset = records.load(args.data, verify=False)
    classes = len(dataset.classes)
    config = TrainConfig(
        weights="none",
        data=dataset.folder,
        output=Path("/nonexistent"),
        batch_size=args.batch,
        precision=args.precision,
    )
    precision = configure_precision(args.precision, gpu is not None)
    keras.utils.set_random_seed(0)
    model = build_model(classes, dataset.image_size, "none")
    compile_for_training(model, config.recipe(), steps_per_epoch=10 * args.steps, fixed_shapes=True)
    report: dict = {
        "device": str(jax.devices()[0].device_kind),
        "cap_mib": cap,
        "batch": args.batch,
        "precision": precision,
        "image_size": dataset.image_size,
        "cpus": os.cpu_count(),
        "train_images": dataset.count("train"),
        "steps": args.steps,
        "rows": [],
    }

    def peak_mib() -> float | None:
        stats = jax.devices()[0].memory_stats() or {}
        return round(stats["peak_bytes_in_use"] / 2**20, 1) if "peak_bytes_in_use" in stats else None

    def save() -> None:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2) + "\n")

    real = next(
        iter(training_dataset(dataset, config, classes, batch_size=args.batch, steps=1, full_batches=True))
    )
    real = tuple(np.asarray(part) for part in real)

    def source(kind: str, steps: int):
        if kind == "memory":
            return tf.data.Dataset.from_tensors(real).repeat(steps)
        return training_dataset(
            dataset, config, classes, epoch=steps, batch_size=args.batch, steps=steps, full_batches=True
        )

    class Waits(keras.callbacks.Callback):
        """Overrides on_train_batch_end, so Keras converts the logs (waits) after every call."""

        def on_train_batch_end(self, batch, logs=None):
            pass

    def fit_seconds(kind: str, callbacks: str, steps: int) -> float:
        listed = [Waits()] if callbacks == "wait" else []
        if callbacks == "pipelined":
            listed = pipelined_callbacks(listed, model, 1, steps)
        data = source(kind, steps)
        started = time.perf_counter()
        model.fit(data, epochs=1, steps_per_epoch=steps, callbacks=listed, verbose=0, shuffle=False)
        jax.block_until_ready(model.trainable_variables[0].value)
        return time.perf_counter() - started

    def device_rate(calls: int) -> float:
        images = jax.device_put(real[0])
        labels = jax.device_put(real[1])

        def batches():
            while True:
                yield images, labels, None

        model.make_train_function()
        state = model._get_jax_state(
            trainable_variables=True,
            non_trainable_variables=True,
            optimizer_variables=True,
            metrics_variables=True,
            purge_model_variables=True,
        )
        iterator = batches()
        for _ in range(2):
            _, state = model.train_function(state, iterator)
        jax.block_until_ready(state)
        started = time.perf_counter()
        for _ in range(args.steps // calls):
            _, state = model.train_function(state, iterator)
        jax.block_until_ready(state)
        rate = (args.steps // calls) * calls * args.batch / (time.perf_counter() - started)
        model._jax_state = dict(
            zip(
                (
                    "trainable_variables",
                    "non_trainable_variables",
                    "optimizer_variables",
                    "metrics_variables",
                ),
                state,
                strict=True,
            )
        )
        model._jax_state_synced = False
        model.jax_state_sync()
        return rate

    # Compile (or load) the step and the first fit's set-up once, outside every timing.
    fit_seconds("memory", "wait", 2)
    for calls in (int(c) for c in args.calls.split(",")):
        model.steps_per_execution = calls
        model.make_train_function(force=True)  # Keras reads steps_per_execution when it makes it
        steps = -(-args.steps // calls) * calls
        row = {
            "steps_per_execution": calls,
            "variant": "device",
            "img_per_s": round(device_rate(calls), 1),
            "peak_mib": peak_mib(),
        }
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
        for callbacks in args.callbacks.split(","):
            for kind in ("memory", "pipeline"):
                # The fastest of two: a fit's set-up varies by tenths of a second.
                short = min(fit_seconds(kind, callbacks, steps) for _ in range(2))
                long = min(fit_seconds(kind, callbacks, 2 * steps) for _ in range(2))
                row = {
                    "steps_per_execution": calls,
                    "variant": f"{kind}/{callbacks}",
                    "img_per_s": round(steps * args.batch / (long - short), 1),
                    "fit_seconds": [round(short, 3), round(long, 3)],
                    "peak_mib": peak_mib(),
                }
                report["rows"].append(row)
                print(json.dumps(row), flush=True)
                save()
    device = {
        row["steps_per_execution"]: row["img_per_s"] for row in report["rows"] if row["variant"] == "device"
    }
    best = max(device.values())
    for row in report["rows"]:
        row["vs_device"] = round(row["img_per_s"] / best, 3)
    save()
    print(json.dumps({"device_img_per_s": device}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
