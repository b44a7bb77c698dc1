"""XLA on or off for CPU training: compile time and steady-state images/s, side by side.

    .venv/bin/python bench/cpu_xla.py --data /tmp/prepared --epochs 3

Trains our own model (components.model.build_model, float32) on the same prepared shards,
once with `jit_compile=True` and once with False, in one process, each with a fresh model.
Keras' `jit_compile="auto"` (what train uses) turns XLA off on a CPU-only machine and on
where a GPU is present; this checks that the CPU half of that choice is right for
EfficientNet-B0. Reports the first epoch (tracing + compilation + one pass) and the mean of
the later epochs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def run(data: Path, epochs: int, jit: bool, batch_size: int) -> dict:
    import keras

    from components import records
    from components.model import build_model
    from components.train import TrainConfig, training_dataset

    keras.utils.set_random_seed(0)
    dataset = records.load(data, verify=False)
    config = TrainConfig(weights="none", data=data, output=Path("/nonexistent"), batch_size=batch_size)
    model = build_model(len(dataset.classes), dataset.image_size)
    model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss="categorical_crossentropy", jit_compile=jit)
    train = training_dataset(dataset, config, len(dataset.classes))  # endless: full batches only
    steps = math.ceil(dataset.count("train") / batch_size)
    seconds = []
    for _ in range(epochs):
        started = time.monotonic()
        model.fit(train, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False)
        seconds.append(time.monotonic() - started)
    images = steps * batch_size
    steady = sum(seconds[1:]) / max(len(seconds) - 1, 1)
    return {
        "jit_compile": jit,
        "first_epoch_s": round(seconds[0], 1),
        "steady_epoch_s": round(steady, 2),
        "steady_img_per_s": round(images / steady, 1),
        "total_s": round(sum(seconds), 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    results = [run(args.data, args.epochs, jit, args.batch_size) for jit in (True, False)]
    on, off = results
    print(
        json.dumps(
            {
                "cpus": os.cpu_count(),
                "results": results,
                "steady_speed_ratio_xla_over_no_xla": round(
                    on["steady_img_per_s"] / off["steady_img_per_s"], 2
                ),
                "first_epoch_ratio_xla_over_no_xla": round(on["first_epoch_s"] / off["first_epoch_s"], 2),
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
