"""Largest batch that trains EfficientNet-B0 at 224 px under a GPU memory cap, and its speed.

    python bench/gpu_memory.py --cap-mib 7680 --out results.json        # on a GPU machine

Our training step (`components.model.build_model` + `compile_for_training`, Keras 3 on the JAX
backend, since TensorFlow with CUDA cannot be installed on the GPU machines we rent) side by
side with the peer a user would pick instead: PyTorch + torchvision `efficientnet_b0` with
autocast fp16 + GradScaler + channels_last (and fp32). 7.5 GiB (7680 MiB) stands in for the
usable memory of an RTX 2070.

Every probe is a fresh process (a framework does not give memory back after running out),
capped with the framework's own limit: JAX `XLA_PYTHON_CLIENT_MEM_FRACTION`, PyTorch
`torch.cuda.set_per_process_memory_fraction`. Phase 1 finds each setting's largest batch
with the product's search (`components.batchfit.search`: the upper limit first, halving, then
bisecting to a multiple of 16); the settings' searches run side by side
(each process under its own cap). Phase 2 times each setting's largest batch alone on the GPU:
5 warm-up steps, then 15 timed steps of random data already on the device.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SIZE = 224
CLASSES = 10

# name -> (framework, precision, remat)
# remat: a Keras RematScope mode for the backbone's layers, or "save-convs": the whole loss
# under one `jax.checkpoint` whose policy keeps only convolution outputs for the backward pass
# (BatchNorm, swish and squeeze-excite are recomputed from them). Keras' own "full" and
# "larger_than" modes fail on this model under JAX (BatchNorm's `training` flag becomes a
# tracer inside the per-layer checkpoint), measured in the first run of this script.
SETTINGS = {
    "keras-mixed": ("keras", "mixed_float16", "none"),
    "keras-mixed-remat-activations": ("keras", "mixed_float16", "activations"),
    "keras-mixed-save-convs": ("keras", "mixed_float16", "save-convs"),
    "keras-float32": ("keras", "float32", "none"),
    "keras-float32-save-convs": ("keras", "float32", "save-convs"),
    "torch-amp": ("torch", "mixed_float16", "none"),
    "torch-float32": ("torch", "float32", "none"),
}


def save_conv_outputs_only(model) -> None:
    """Checkpoint the whole forward pass, keeping only convolution outputs (JAX backend)."""
    import jax

    original = model.compute_loss_and_updates

    def policy(primitive, *_, **__) -> bool:
        return primitive.name == "conv_general_dilated"

    def compute_loss_and_updates(
        trainable, non_trainable, metrics, x, y, sample_weight, training=False, optimizer_variables=None
    ):
        def forward(trainable, non_trainable, metrics, x, y, sample_weight, optimizer_variables):
            return original(
                trainable,
                non_trainable,
                metrics,
                x,
                y,
                sample_weight,
                training=training,
                optimizer_variables=optimizer_variables,
            )

        return jax.checkpoint(forward, policy=policy)(
            trainable, non_trainable, metrics, x, y, sample_weight, optimizer_variables
        )

    model.compute_loss_and_updates = compute_loss_and_updates


def total_gpu_mib() -> int:
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(out.split()[0])


# ---------------------------------------------------------------- one probe, in its own process


def _probe_keras(precision: str, remat: str, batch: int, steps: int, warmup: int) -> dict:
    import jax
    import keras
    import numpy as np

    from components.model import build_model, compile_for_training
    from components.train import TrainConfig

    keras.mixed_precision.set_global_policy(precision)
    model = build_model(CLASSES, SIZE, "none", remat="none" if remat == "save-convs" else remat)
    config = TrainConfig(weights="none", data=Path(), output=Path(), epochs=1, batch_size=batch)
    compile_for_training(model, config.recipe(), steps_per_epoch=warmup + steps)
    if remat == "save-convs":
        save_conv_outputs_only(model)
    rng = np.random.default_rng(0)
    images = jax.device_put(rng.uniform(0, 255, (batch, SIZE, SIZE, 3)).astype("float32"))
    labels = jax.device_put(np.eye(CLASSES, dtype="float32")[rng.integers(0, CLASSES, batch)])

    def batches():
        while True:
            yield images, labels, None

    # The loop `model.fit` runs on the JAX backend (keras/src/backend/jax/trainer.py): the jitted
    # step on the state, no host sync between steps. `train_on_batch` would add one per step.
    model._symbolic_build(data_batch=(images, labels, None))  # what fit() does first
    model.make_train_function()
    state = model._get_jax_state(
        trainable_variables=True,
        non_trainable_variables=True,
        optimizer_variables=True,
        metrics_variables=True,
        purge_model_variables=True,
    )
    iterator = batches()
    for _ in range(warmup):
        logs, state = model.train_function(state, iterator)
    jax.block_until_ready(state)
    started = time.perf_counter()
    for _ in range(steps):
        logs, state = model.train_function(state, iterator)
    jax.block_until_ready(state)
    elapsed = time.perf_counter() - started
    stats = jax.devices()[0].memory_stats() or {}
    return {
        "img_per_s": batch * steps / elapsed,
        "peak_mib": stats.get("peak_bytes_in_use", 0) / 2**20,
        "loss": float(np.asarray(logs["loss"])),
    }


def _probe_torch(precision: str, batch: int, steps: int, warmup: int, fraction: float) -> dict:
    import torch
    import torchvision

    torch.cuda.set_per_process_memory_fraction(fraction)
    torch.backends.cudnn.benchmark = True
    device = torch.device("cuda")
    model = torchvision.models.efficientnet_b0(num_classes=CLASSES)
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(enabled=precision == "mixed_float16")
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    images = torch.rand(batch, 3, SIZE, SIZE, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, CLASSES, (batch,), device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16, enabled=precision == "mixed_float16"):
            loss = loss_fn(model(images), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    return {
        "img_per_s": batch * steps / elapsed,
        "peak_mib": torch.cuda.max_memory_allocated() / 2**20,
        "loss": float(loss),
    }


def probe_main(args) -> int:
    framework, precision, remat = SETTINGS[args.setting]
    try:
        if framework == "keras":
            result = _probe_keras(precision, remat, args.batch, args.steps, args.warmup)
        else:
            result = _probe_torch(precision, args.batch, args.steps, args.warmup, args.fraction)
        result["ok"] = True
    except Exception as error:  # noqa: BLE001 - classified below, never swallowed silently
        text = f"{type(error).__name__}: {error}"
        oom = any(s in text for s in ("RESOURCE_EXHAUSTED", "out of memory", "OutOfMemory", "Out of memory"))
        result = {"ok": False, "oom": oom, "error": text[-600:]}
    print("RESULT " + json.dumps(result), flush=True)
    return 0


# ---------------------------------------------------------------- the search, in the parent


def run_probe(
    setting: str, batch: int, cap_mib: int, total_mib: int, steps: int, warmup: int, timeout: float, log: list
) -> dict:
    fraction = cap_mib / total_mib
    env = dict(
        os.environ,
        KERAS_BACKEND="jax",
        XLA_PYTHON_CLIENT_MEM_FRACTION=f"{fraction:.4f}",
        XLA_PYTHON_CLIENT_PREALLOCATE="true",
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    command = [
        sys.executable,
        __file__,
        "--probe",
        setting,
        "--batch",
        str(batch),
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
        "--fraction",
        f"{fraction:.4f}",
    ]
    started = time.monotonic()
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if lines:
            result = json.loads(lines[-1][len("RESULT ") :])
        else:  # killed by the OOM path of a native library, or crashed
            tail = (done.stderr or "")[-600:]
            oom = any(s in tail for s in ("RESOURCE_EXHAUSTED", "out of memory", "Out of memory"))
            result = {"ok": False, "oom": oom, "error": f"exit {done.returncode}: {tail}"}
    except subprocess.TimeoutExpired:
        result = {"ok": False, "oom": False, "error": f"timeout after {timeout} s"}
    result.update(setting=setting, batch=batch, seconds=round(time.monotonic() - started, 1))
    log.append(result)
    print(
        json.dumps(
            {k: v for k, v in result.items() if k != "error"}
            | ({"error": result["error"][-200:]} if "error" in result else {})
        ),
        flush=True,
    )
    return result


def largest_batch(
    setting: str, cap_mib: int, total_mib: int, log: list, limit: int = 384, granularity: int = 16
) -> int:
    """The product's own search (`components.batchfit.search`: `limit` first, then halving,
    then bisecting to `granularity`); 0 when not even a batch of 1 fits. (The 2026-11-25 run
    in RESULTS.md used the earlier search, doubling from 64.)"""
    from components.batchfit import BatchFitError, search

    def fits(batch: int) -> bool:
        result = run_probe(setting, batch, cap_mib, total_mib, steps=2, warmup=1, timeout=420, log=log)
        if not result["ok"] and not result.get("oom"):
            raise RuntimeError(
                f"{setting} at batch {batch} failed for a reason other than memory: {result['error']}"
            )
        return result["ok"]

    try:
        return search(fits, limit, granularity)
    except BatchFitError:
        return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cap-mib", type=int, default=7680)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--out", type=Path, default=Path("gpu_memory.json"))
    parser.add_argument("--parallel", type=int, default=7)
    parser.add_argument(
        "--times-only",
        type=Path,
        default=None,
        help="skip the search: time the largest batches in this earlier report",
    )
    parser.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=32, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=15, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=5, help=argparse.SUPPRESS)
    parser.add_argument("--fraction", type=float, default=1.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        args.setting = args.probe
        return probe_main(args)

    total = total_gpu_mib()
    settings = args.settings.split(",")
    report = {
        "cap_mib": args.cap_mib,
        "gpu_total_mib": total,
        "image_size": SIZE,
        "settings": {},
        "probes": [],
    }
    lock = threading.Lock()

    def save() -> None:
        with lock:
            args.out.write_text(json.dumps(report, indent=2) + "\n")

    def search(setting: str) -> None:
        best = largest_batch(setting, args.cap_mib, total, report["probes"])
        report["settings"][setting] = {"largest_batch": best}
        save()

    if args.times_only:  # phase 2 alone, on the largest batches a phase-1 run found
        report = json.loads(args.times_only.read_text())
    else:
        with ThreadPoolExecutor(args.parallel) as pool:
            for future in [pool.submit(search, s) for s in settings]:
                future.result()
    for setting in settings:  # timed alone: nothing else on the GPU
        best = report["settings"].get(setting, {}).get("largest_batch")
        if best:
            timed = run_probe(
                setting, best, args.cap_mib, total, steps=15, warmup=5, timeout=420, log=report["probes"]
            )
            report["settings"][setting].update(
                {k: timed.get(k) for k in ("ok", "img_per_s", "peak_mib", "loss", "error") if k in timed}
            )
            save()
    save()
    print(json.dumps(report["settings"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
