"""`python -m components.train` whose second `fit` call fails the way JAX fails when the GPU's
memory is exhausted: there is no GPU here to exhaust. Run with KERAS_BACKEND=jax.

    KERAS_BACKEND=jax python -m tests.jax_oom_once --data ... --backend jax ...
"""

from __future__ import annotations

import sys

import jax
import keras

from components import train

# What XLA raised on the H200 under a 2 GiB cap (bench/gpu_results/train_h200/warm-oom.log).
MESSAGE = (
    "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 6.99GiB with allocator GPU_0_bfc "
    "on device 0. [executable_name='jit_train_step']"
)


def main() -> int:
    real_fit = keras.Model.fit
    calls = []

    def fit_that_runs_out_once(self, *args, **kwargs):
        calls.append(kwargs["steps_per_epoch"])
        if len(calls) == 2:  # the second epoch, before its first step
            raise jax.errors.JaxRuntimeError(MESSAGE)
        return real_fit(self, *args, **kwargs)

    keras.Model.fit = fit_that_runs_out_once
    status = train.main(sys.argv[1:])
    print("FIT CALLS", calls, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
