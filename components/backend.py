"""Which Keras backend trains, and the GPU settings that must be in place before it starts.

    python -m components.train --backend auto ...     # jax on a GPU, tensorflow on a CPU

Training on a GPU runs Keras 3 on JAX: the path measured in bench/ (XLA compiles the whole
step and, under a memory cap it can see, rematerializes activations until the batch fits).
TensorFlow keeps what only it does here, on the CPU: tf.data input, TFRecords, and the
SavedModel with its decode/resize serving signature. On a CPU the TensorFlow backend trains,
because JAX always compiles with XLA and XLA on a CPU trained this model 5x slower
(bench/cpu_xla.py).

Keras reads its backend once, when it is first imported, so `activate` runs before anything
imports keras; so does the memory cap, which JAX reads when it first touches the GPU.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

BACKENDS = ("auto", "jax", "tensorflow")
# MiB of a card that the framework's pool must leave free: the CUDA context and the cuDNN and
# cuBLAS handles live outside it. Measured in nvidia-smi on an H200 with JAX 0.11.2
# (bench/RESULTS.md): 546 MiB above the pool for training, 606 for a batch-fit probe. 640 on
# an 8 GB RTX 2070 leaves a 7552 MiB pool; a 7680 MiB pool there would not fit beside its context.
HEADROOM_MIB = 640


class BackendError(RuntimeError):
    """The backend asked for cannot be used in this process; the message says why."""


def jax_gpu_installed() -> bool:
    """JAX with an NVIDIA plugin (jax-cuda12-plugin, jax-cuda13-plugin) is installed."""
    if importlib.util.find_spec("jax") is None:
        return False
    names = {
        (dist.metadata["Name"] or "").lower().replace("_", "-") for dist in importlib.metadata.distributions()
    }
    return any(name.startswith("jax-cuda") and name.endswith("plugin") for name in names)


def resolve(requested: str, gpu_present: bool) -> str:
    """The backend `requested` ('auto', 'jax' or 'tensorflow') comes to on this machine."""
    if requested not in BACKENDS:
        raise BackendError(f"--backend must be one of {', '.join(BACKENDS)}, got {requested!r}")
    if requested != "auto":
        return requested
    return "jax" if gpu_present and jax_gpu_installed() else "tensorflow"


def activate(backend: str) -> None:
    """Make `backend` Keras' backend in this process (and in the processes it starts: batch-fit
    probes). Refused if keras was already imported with another one."""
    if backend == "jax" and importlib.util.find_spec("jax") is None:
        raise BackendError(
            "--backend jax: JAX is not installed here (pip install 'jax[cuda12]' on a "
            "GPU machine, 'jax' on a CPU)"
        )
    keras = sys.modules.get("keras")
    if keras is not None and keras.backend.backend() != backend:
        raise BackendError(
            f"keras was already imported with the {keras.backend.backend()} backend in "
            f"this process; run the step in a new process to train with {backend}"
        )
    os.environ["KERAS_BACKEND"] = backend
    if backend == "jax":
        keep_tensorflow_off_the_gpu()


def keep_tensorflow_off_the_gpu() -> None:
    """Under JAX, TensorFlow only reads records: a CUDA build of it must not take GPU memory
    (it reserves nearly all of a card on first use). tensorflow-cpu has no GPU to hide."""
    if importlib.util.find_spec("tensorflow") is None:
        return
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TensorFlow already started its devices in this process
        if tf.config.list_logical_devices("GPU"):
            log.warning("TensorFlow had already started on the GPU before JAX; it may hold GPU memory")


def memory_limit_mib(requested_mib: int, total_mib: int) -> int:
    """The cap to apply: as requested, or (0) the card's memory less HEADROOM_MIB."""
    return requested_mib or max(total_mib - HEADROOM_MIB, 1)


def enable_compilation_cache(folder: Path) -> None:
    """Keep XLA's compiled programs in `folder` (JAX's persistent compilation cache), so that a
    resumed pod or next week's run on the same settings does not compile again. Set through
    the environment, before JAX is imported: batch-fit probes, in their own processes, use it
    too."""
    folder.mkdir(parents=True, exist_ok=True)
    # JAX's defaults keep programs that took a second or more to compile: the training and
    # validation steps, not the hundreds of tiny initializer programs (caching those too made
    # the first step 80 s instead of 45 s on the 2-core CPU machine).
    settings = {"jax_compilation_cache_dir": str(folder)}
    for name, value in settings.items():
        os.environ[name.upper()] = str(value)
    if "jax" in sys.modules:  # imported already (TensorFlow imports keras, keras imports jax)
        import jax

        for name, value in settings.items():
            jax.config.update(name, value)
