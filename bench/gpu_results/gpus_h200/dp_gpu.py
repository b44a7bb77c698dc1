"""Keras DataParallel over the devices JAX sees, with the product's model and compile (mixed
precision, accumulation 2, 4 steps a call), beside the same model with no distribution: their
losses and weights side by side. Run from the repository root (issue 20, bench/RESULTS.md):

    KERAS_BACKEND=jax python3 bench/gpu_results/gpus_h200/dp_gpu.py
"""

import json
import os
import sys
import time

os.environ["KERAS_BACKEND"] = "jax"
sys.path.insert(0, os.getcwd())

import jax  # noqa: E402 (after the backend is chosen)
import keras  # noqa: E402
import numpy as np  # noqa: E402

from components.model import Recipe, build_model, compile_for_training  # noqa: E402


def compiled():
    model = build_model(4, 64, "none")
    recipe = Recipe(
        learning_rate=1e-3, epochs=1, weight_decay=1e-4, warmup_epochs=0, label_smoothing=0.1, xla="auto"
    )
    compile_for_training(model, recipe, 8, accumulation=2, steps_per_execution=4, fixed_shapes=True)
    return model


def timed_fit(model, x, y):
    started = time.time()
    history = model.fit(x, y, batch_size=32, epochs=2, verbose=0, shuffle=False).history
    return history, round(time.time() - started, 1)


def main() -> None:
    print("devices", jax.devices())
    keras.mixed_precision.set_global_policy("mixed_float16")
    keras.utils.set_random_seed(1)
    plain = compiled()
    distribution = keras.distribution.DataParallel(devices=jax.devices())
    keras.utils.set_random_seed(1)
    with distribution.scope():
        parallel = compiled()
        parallel.set_weights(plain.get_weights())
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (256, 64, 64, 3), dtype="uint8")
    y = np.eye(4, dtype="float32")[rng.integers(0, 4, 256)]
    plain_history, plain_seconds = timed_fit(plain, x, y)
    with distribution.scope():
        parallel_history, parallel_seconds = timed_fit(parallel, x, y)
    difference = max(
        float(np.abs(np.asarray(p, "float32") - np.asarray(q, "float32")).max())
        for p, q in zip(plain.get_weights(), parallel.get_weights(), strict=True)
    )
    print(
        json.dumps(
            {
                "plain": plain_history,
                "data_parallel": parallel_history,
                "max_weight_diff": difference,
                "seconds": [plain_seconds, parallel_seconds],
                "sharding": str(parallel.trainable_variables[0].value.sharding),
            }
        )
    )


if __name__ == "__main__":
    main()
