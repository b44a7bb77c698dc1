"""Fit the training batch to the GPU: the largest per-step batch that trains, then accumulation.

    python -m components.batchfit --image-size 224 --precision mixed_float16 --requested 256
    python -m components.batchfit --gpu-memory-limit 7680 --requested 512    # an RTX 2070's budget

Each candidate batch is tried in a fresh process (a framework does not give GPU memory back
after running out, so one process cannot try twice), with the memory cap lowered by
MARGIN so that the real run keeps headroom for what probes do not exercise (validation,
checkpoint saves, fragmentation). The search tries the requested batch first (under XLA it
nearly always fits), halves until one fits, then bisects between that and the smallest that
did not. Half the batch found is timed too: of the batches that fitted it keeps the largest
that trains within 5% of the fastest images/s (XLA rematerializes to make a big batch fit, so
"fits" alone can mean "fits, slowly"). Each probe compiles the step (about 70-110 s on an
H200, bench/RESULTS.md), so a cold fit costs two probes in the usual case. The answer is
remembered per GPU model, memory budget, image size, precision, backend and library
versions, so a scheduled retraining probes once. The requested (effective) batch is then
reached with gradient accumulation: `plan(requested, largest)`.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from components import backend
from components.cli import configure_logging
from components.model import Recipe, build_model, compile_for_training

log = logging.getLogger(__name__)

MARGIN = 0.07  # probes run under the budget minus this fraction
SPEED_TOLERANCE = 0.05  # a bigger batch must train within this fraction of the fastest
MIN_SPEED_CHECK = 16  # no speed comparison below this batch: per-step overhead dominates there
OOM_EXIT = 3  # a probe's exit code for "out of memory"; any other failure is an error


class BatchFitError(RuntimeError):
    """Even the smallest batch does not fit, or a probe failed for another reason than memory."""


@dataclass(frozen=True)
class BatchPlan:
    step_batch: int  # images per forward/backward pass, over all devices
    accumulation: int  # passes per optimizer update
    requested: int
    devices: int = 1  # GPUs training data-parallel; each takes step_batch / devices

    @property
    def effective_batch(self) -> int:
        return self.step_batch * self.accumulation

    @property
    def device_batch(self) -> int:
        return self.step_batch // self.devices


def plan(requested: int, largest: int, devices: int = 1) -> BatchPlan:
    """The fewest accumulation steps that reach `requested` with per-device batches <= `largest`
    on each of `devices` GPUs, the per-device batch then spread evenly (requested 256, largest
    96, one GPU: 3 x 86, not 96+96+64). The effective batch is the per-device batch x devices x
    accumulation: `requested`, or the next multiple of `devices` above it."""
    if requested < 1 or largest < 1 or devices < 1:
        raise ValueError(
            f"batches and devices must be positive, got requested={requested}, largest={largest}, "
            f"devices={devices}"
        )
    per_device = math.ceil(requested / devices)
    accumulation = math.ceil(per_device / largest)
    return BatchPlan(
        step_batch=math.ceil(per_device / accumulation) * devices,
        accumulation=accumulation,
        requested=requested,
        devices=devices,
    )


def search(fits: Callable[[int], bool], requested: int, granularity: int = 8) -> int:
    """Largest batch <= `requested` for which `fits(batch)` is True.

    The requested batch first: under XLA nearly every batch fits (it rematerializes), so this
    is usually the only probe. If it does not fit, halving until one does, then bisecting
    between that and the smallest that did not, to a multiple of `granularity` (of 1 below it).
    `fits` returns False only for running out of memory; any other failure raises through."""
    if fits(requested):
        return requested
    high, low = requested, 0
    batch = requested
    while batch > 1:
        batch //= 2
        if fits(batch):
            low = batch
            break
        high = batch
    if low == 0:
        raise BatchFitError("not even a batch of 1 trains within the GPU memory budget")
    step = granularity if low >= granularity else 1
    while high - low > step:
        middle = (low + high) // 2
        middle -= middle % step
        if middle <= low:
            break
        if fits(middle):
            low = middle
        else:
            high = middle
    return low


# ------------------------------------------------------------------------ GPU facts and the cap


@dataclass(frozen=True)
class Gpu:
    name: str
    total_mib: int
    count: int = 1  # GPUs this process may use (the first one's name and memory stand for all)


def detect_gpu() -> Gpu | None:
    """The NVIDIA GPUs this process may use, from nvidia-smi: no framework touches the GPU
    (TensorFlow would reserve nearly all its memory on first use and starve the probes).
    nvidia-smi lists every card of the machine, so CUDA_VISIBLE_DEVICES (indices or UUIDs) is
    applied here as CUDA applies it; a Kubernetes pod sees only the cards it was given."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_gpus(out, os.environ.get("CUDA_VISIBLE_DEVICES"))


def parse_gpus(listing: str, visible: str | None) -> Gpu | None:
    """nvidia-smi's `index, uuid, name, memory.total` rows, narrowed to `visible` (the value of
    CUDA_VISIBLE_DEVICES; None: all), as one Gpu: the first visible card, and how many there are."""
    cards = []
    for row in listing.strip().splitlines():
        parts = [part.strip() for part in row.split(",")]
        if len(parts) < 4:
            continue
        index, uuid, total = parts[0], parts[1], parts[-1]
        cards.append((index, uuid, ",".join(parts[2:-1]), total))
    if visible is not None:
        # CUDA stops at the first entry it cannot match; so does this.
        wanted = []
        for entry in (entry.strip() for entry in visible.split(",")):
            match = [card for card in cards if entry and (card[0] == entry or card[1].startswith(entry))]
            if not match or match[0] in wanted:
                break
            wanted.append(match[0])
        cards = wanted
    if not cards:
        return None
    try:
        return Gpu(name=cards[0][2], total_mib=int(float(cards[0][3])), count=len(cards))
    except ValueError:
        return None


def apply_memory_limit(limit_mib: int, gpu: Gpu | None) -> int | None:
    """Cap what the framework may take of the GPU, before it starts: `limit_mib`, or (0) the
    card's memory less `backend.HEADROOM_MIB`. JAX: its allocator preallocates that share of
    the card, so XLA compiles against the cap (and rematerializes to stay under it);
    TensorFlow: a logical device with `memory_limit`. Returns the cap in MiB (None: no GPU)."""
    if gpu is None:
        return None
    limit = backend.memory_limit_mib(limit_mib, gpu.total_mib)
    if os.environ.get("KERAS_BACKEND", "tensorflow") == "jax":
        fraction = min(limit / gpu.total_mib, 1.0)
        os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{fraction:.4f}"
        os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "true"
        log.info(
            "GPU memory cap: %d of %d MiB (XLA_PYTHON_CLIENT_MEM_FRACTION=%.4f, preallocated)",
            limit,
            gpu.total_mib,
            fraction,
        )
        return limit
    import tensorflow as tf

    devices = tf.config.list_physical_devices("GPU")
    if devices:
        tf.config.set_logical_device_configuration(
            devices[0], [tf.config.LogicalDeviceConfiguration(memory_limit=limit)]
        )
        log.info("GPU memory cap: %d of %d MiB (TensorFlow logical device)", limit, gpu.total_mib)
    return limit


def peak_memory_mib() -> float | None:
    """Peak GPU memory the framework has used since the last call (then reset), or None
    without a GPU. Under JAX, the highest of the GPUs this process trains on: each has the cap."""
    try:
        if os.environ.get("KERAS_BACKEND", "tensorflow") == "jax":
            import jax

            peaks = [(device.memory_stats() or {}).get("peak_bytes_in_use") for device in jax.local_devices()]
            peaks = [peak for peak in peaks if peak is not None]
            return max(peaks) / 2**20 if peaks else None
        import tensorflow as tf

        if not tf.config.list_logical_devices("GPU"):
            return None
        peak = tf.config.experimental.get_memory_info("GPU:0")["peak"]
        tf.config.experimental.reset_memory_stats("GPU:0")
        return peak / 2**20
    except (RuntimeError, ValueError, KeyError):
        return None


# A full disk (or quota) is also reported as "resource exhausted" by TensorFlow: it must not
# halve the batch and record a false fit.
DISK_FULL = ("No space left on device", "Disk quota exceeded", "ENOSPC", "EDQUOT")


def is_out_of_memory(error: BaseException) -> bool:
    """TF's ResourceExhaustedError, JAX's RESOURCE_EXHAUSTED runtime error, or an allocator's
    "out of memory" message; never a full disk."""
    text = f"{type(error).__name__}: {error}"
    if isinstance(error, OSError) or any(marker in text for marker in DISK_FULL):
        return False
    return type(error).__name__ == "ResourceExhaustedError" or any(
        marker in text for marker in ("RESOURCE_EXHAUSTED", "out of memory", "Out of memory", "OOM when")
    )


# ------------------------------------------------------------------------------ probes and cache


@dataclass(frozen=True)
class ProbeSpec:
    image_size: int
    precision: str
    num_classes: int
    memory_limit_mib: int  # the probe's own cap (budget minus MARGIN); 0 = the card less headroom
    steps: int = 5  # the first compiles; the other 4 are timed


def probe(spec: ProbeSpec, batch: int, timeout: float = 900, speeds: dict[int, float] | None = None) -> bool:
    """Train `steps` steps of `batch` random images in a fresh process: True if it fitted, False
    if it ran out of memory; BatchFitError for any other failure. The images/s of the steps
    after the first (which compiles) go into `speeds`."""
    command = [
        sys.executable,
        "-m",
        "components.batchfit",
        "--probe",
        json.dumps(asdict(spec)),
        "--batch",
        str(batch),
    ]
    # One card: a per-GPU batch is what is probed, and JAX would preallocate every visible one.
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": visible.split(",")[0] if visible is not None else "0"}
    started = time.monotonic()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise BatchFitError(f"probing batch {batch} took over {timeout:.0f} s") from None
    seconds = time.monotonic() - started
    if done.returncode == 0:
        reported = [line for line in done.stdout.splitlines() if line.startswith("PROBE ")]
        result = json.loads(reported[-1][len("PROBE ") :]) if reported else {}
        speed, peak = result.get("img_per_s"), result.get("peak_mib")
        if speeds is not None and speed:
            speeds[batch] = speed
        log.info(
            "batch %d fits (probe %.0f s%s%s)",
            batch,
            seconds,
            f", {speed:.0f} img/s" if speed else "",
            f", peak {peak:.0f} MiB" if peak else "",
        )
        return True
    if done.returncode == OOM_EXIT:
        log.info("batch %d runs out of memory (probe %.0f s)", batch, seconds)
        return False
    raise BatchFitError(
        f"probing batch {batch} failed (exit {done.returncode}), not for memory: "
        f"{(done.stderr or done.stdout).strip()[-1500:]}"
    )


def choose(largest: int, speeds: dict[int, float]) -> int:
    """The largest fitted batch that trains within SPEED_TOLERANCE of the fastest one.

    XLA does not simply run out of memory: under a cap it rematerializes (recomputes
    activations) to make a big batch fit, and past some size every image costs more. Measured
    on an H100 under 7 GiB: batch 1024 "fits"; what it costs is in the probes' images/s."""
    fitted = {batch: speed for batch, speed in speeds.items() if batch <= largest}
    if not fitted:
        return largest
    fastest = max(fitted.values())
    chosen = max(batch for batch, speed in fitted.items() if speed >= (1 - SPEED_TOLERANCE) * fastest)
    if chosen != largest:
        log.info(
            "batch %d fits but trains at %.0f img/s; batch %d at %.0f (fastest %.0f): using %d",
            largest,
            fitted.get(largest, float("nan")),
            chosen,
            fitted[chosen],
            fastest,
            chosen,
        )
    return chosen


def _run_probe(spec: ProbeSpec, batch: int) -> int:
    """In the probe process: build our model and training step, train `spec.steps` steps."""
    apply_memory_limit(spec.memory_limit_mib, detect_gpu())
    try:
        import keras

        keras.mixed_precision.set_global_policy(spec.precision)
        model = build_model(spec.num_classes, spec.image_size)
        # The rates do not change the memory a step takes; XLA "auto" as in training.
        recipe = Recipe(
            learning_rate=1e-3,
            epochs=1,
            weight_decay=1e-4,
            warmup_epochs=0.0,
            label_smoothing=0.1,
            xla="auto",
        )
        compile_for_training(model, recipe, steps_per_epoch=spec.steps)
        rng = np.random.default_rng(0)
        # uint8, as train feeds them (the model casts on the device)
        images = rng.integers(0, 256, (batch, spec.image_size, spec.image_size, 3), dtype="uint8")
        labels = np.eye(spec.num_classes, dtype="float32")[rng.integers(0, spec.num_classes, batch)]
        model.train_on_batch(images, labels)  # compiles
        started = time.perf_counter()
        for _ in range(spec.steps - 1):
            model.train_on_batch(images, labels)  # returns numpy logs: waits for the device
        if spec.steps > 1:
            speed = batch * (spec.steps - 1) / (time.perf_counter() - started)
            print("PROBE " + json.dumps({"img_per_s": speed, "peak_mib": peak_memory_mib()}), flush=True)
    except Exception as error:  # noqa: BLE001 - sorted into memory / not memory right here
        if is_out_of_memory(error):
            return OOM_EXIT
        raise
    return 0


def cache_key(gpu: Gpu, spec: ProbeSpec) -> str:
    keras_backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    versions = []
    for package in ("keras", keras_backend):
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{package} ?")
    budget = spec.memory_limit_mib or gpu.total_mib
    return (
        f"{gpu.name} | {budget} MiB | {spec.image_size} px | {spec.precision} | {keras_backend} | "
        + ", ".join(versions)
    )


def largest_batch(
    requested: int,
    spec: ProbeSpec,
    gpu: Gpu,
    cache_file: Path | None,
    fits: Callable[[int], bool] | None = None,
    granularity: int = 8,
    speeds: dict[int, float] | None = None,
) -> int:
    """Largest per-step batch up to `requested`: from the cache, or probed and then cached.

    When the probes measured speed, half the batch found is timed too (and its half, while
    each is faster by more than SPEED_TOLERANCE): a batch that fits only by rematerializing
    can train fewer images a second than a smaller one (`choose`). `fits` (default: a real probe
    process) records the images/s it measured in `speeds`."""
    key = cache_key(gpu, spec)
    cache = _read_cache(cache_file)
    known = cache.get(key)
    if known and (known["largest"] >= requested or known["largest"] < known["limit_probed"]):
        log.info(
            "batch fit from cache %s: largest batch %d (%s)",
            cache_file,
            min(known["largest"], requested),
            key,
        )
        return min(known["largest"], requested)
    log.info("finding the largest batch that trains (%s), up to %d", key, requested)
    started = time.monotonic()
    speeds = {} if speeds is None else speeds
    fits = fits or (lambda batch: probe(spec, batch, speeds=speeds))
    largest = search(fits, requested, granularity)
    smaller = largest
    while smaller in speeds and smaller // 2 >= MIN_SPEED_CHECK and fits(smaller // 2):
        if speeds.get(smaller // 2, 0.0) <= (1 + SPEED_TOLERANCE) * speeds[smaller]:
            break
        smaller //= 2
    largest = choose(largest, speeds)
    log.info("batch fit took %.0f s: largest batch %d", time.monotonic() - started, largest)
    if cache_file:
        cache[key] = {"largest": largest, "limit_probed": requested, "date": time.strftime("%Y-%m-%d")}
        _write_cache(cache_file, cache)
    return largest


def record_out_of_memory(cache_file: Path | None, gpu: Gpu, spec: ProbeSpec, failed_batch: int) -> None:
    """Training ran out of memory at `failed_batch`: remember a smaller largest batch."""
    if not cache_file:
        return
    cache = _read_cache(cache_file)
    key = cache_key(gpu, spec)
    entry = cache.get(key, {"limit_probed": failed_batch})
    entry.update(
        largest=min(entry.get("largest", failed_batch), failed_batch - 1), date=time.strftime("%Y-%m-%d")
    )
    cache[key] = entry
    _write_cache(cache_file, cache)


def _read_cache(cache_file: Path | None) -> dict:
    if not cache_file or not cache_file.is_file():
        return {}
    try:
        return json.loads(cache_file.read_text())
    except ValueError:
        log.warning("ignoring unreadable batch-fit cache %s", cache_file)
        return {}


def _write_cache(cache_file: Path, cache: dict) -> None:
    """Written aside and renamed: a kill mid-write never leaves half a cache."""
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    partial = cache_file.with_suffix(".partial")
    partial.write_text(json.dumps(cache, indent=2, sort_keys=True) + "\n")
    partial.replace(cache_file)


def default_cache_file() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "efficientnet-retrain" / "batch-fit.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m components.batchfit", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--requested", type=int, default=256, help="the effective batch wanted")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--precision", default="mixed_float16", choices=("float32", "mixed_float16"))
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument(
        "--gpu-memory-limit",
        type=int,
        default=0,
        help="MiB the framework may use (0 = the card's memory less a headroom)",
    )
    parser.add_argument(
        "--backend",
        choices=backend.BACKENDS,
        default="auto",
        help="Keras backend of the probes (auto: jax on a GPU when installed)",
    )
    parser.add_argument("--cache", type=Path, default=default_cache_file())
    parser.add_argument("--granularity", type=int, default=8, help="bisect to a multiple of this")
    args = parser.parse_args(argv)
    if args.probe:
        return _run_probe(ProbeSpec(**json.loads(args.probe)), args.batch)

    configure_logging()
    gpu = detect_gpu()
    if gpu is None:
        print("error: no NVIDIA GPU found (nvidia-smi); batch fitting is for GPU training", file=sys.stderr)
        return 2
    try:
        backend.activate(backend.resolve(args.backend, gpu_present=True))
    except backend.BackendError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    budget = backend.memory_limit_mib(args.gpu_memory_limit, gpu.total_mib)
    spec = ProbeSpec(
        image_size=args.image_size,
        precision=args.precision,
        num_classes=args.num_classes,
        memory_limit_mib=int(budget * (1 - MARGIN)),
    )
    largest = largest_batch(args.requested, spec, gpu, args.cache, granularity=args.granularity)
    result = plan(args.requested, largest)
    print(
        json.dumps(
            {
                "gpu": gpu.name,
                "largest_batch": largest,
                **asdict(result),
                "effective_batch": result.effective_batch,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
