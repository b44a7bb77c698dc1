"""The product's train step on 2 GPUs against 1, same data, same per-GPU batch, in one run.

    python3 bench/train_gpus.py --work /tmp/train_gpus --out $OUT          # a node with 2+ GPUs
    python3 bench/train_gpus.py --work /tmp/dry --images-per-class 12 --image-size 32 \
        --per-gpu-batch 8 --epochs 2 --cpu-devices 2                        # a dry run on a CPU

Each run is `python -m components.train --gpus N` in its own process, as the pod runs it: the
built-in patterns (bench/gpu_train.py's data phase), mixed precision, every GPU capped at
`--cap-mib` (7,680 MiB: the RTX 2070 stand-in), batch fit off so that both runs take exactly
`--per-gpu-batch` images a GPU a step (the 2-GPU run's effective batch is then twice the
1-GPU one's: this measures throughput, not a recipe), checkpoints at epoch ends only.
Figures: the steady-state training rate (`train_images_per_sec` of the epochs after the first,
which compiles), its ratio 2 GPUs / 1 GPU (issue 20: minimum 1.7, goal 1.9), the framework's
peak memory (the highest GPU) and, by nvidia-smi, each GPU's memory in use at its highest.

`--cpu-devices N` runs the same commands on N JAX CPU devices (XLA_FLAGS) to check the script
on a machine without GPUs; its rates say nothing about GPUs and are not reported as figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_train import ROOT, Bench, poll_nvidia_smi  # noqa: E402 (bench/ is a folder of scripts, not a package)

from components.batchfit import detect_gpu  # noqa: E402


def sample_memory(peaks: dict[int, int], stop: threading.Event) -> None:
    """Each GPU's memory in use at its highest, by nvidia-smi (the pool and what lies outside)."""
    for rows in poll_nvidia_smi("--query-gpu=index,memory.used", stop):
        for row in rows:
            index, _, used = row.partition(",")
            if index.strip().isdigit() and used.strip().isdigit():
                peaks[int(index)] = max(peaks.get(int(index), 0), int(used))


def train(bench: Bench, args, gpus: int) -> dict:
    output = bench.work / f"model-{gpus}"
    command = bench.train_command(
        output,
        seed=7,
        cap=args.cap_mib,
        extra=["--gpus", str(gpus), "--batch-fit", "off", "--min-updates", "0"],
        every=10**6,
    )
    command[command.index("--batch-size") + 1] = str(args.per_gpu_batch * gpus)
    command[command.index("--checkpoint-dir") + 1] = str(bench.work / f"checkpoints-{gpus}")
    env = bench.env()
    if args.cpu_devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.cpu_devices}"
    peaks: dict[int, int] = {}
    stop = threading.Event()
    sampler = threading.Thread(target=sample_memory, args=(peaks, stop), daemon=True)
    sampler.start()
    try:
        seconds = bench.run(f"train-{gpus}gpu", command, env=env)
    finally:
        stop.set()
        sampler.join()
    summary = json.loads((output / "train_config.json").read_text())
    history = json.loads((output / "history.json").read_text())
    # The rate between the epoch's first and last Keras call; an epoch too short for that (a
    # dry run) falls back to the whole epoch's rate.
    steady = [row.get("train_images_per_sec") or row["images_per_sec"] for row in history[1:]]
    return {
        "gpus": summary["gpus"],
        "step_batch": summary["step_batch"],
        "device_batch": summary["device_batch"],
        "accumulation": summary["accumulation"],
        "precision": summary["precision"],
        "gpu_memory_limit_mib": summary["gpu_memory_limit_mib"],
        "steady_images_per_sec": round(sum(steady) / len(steady), 1) if steady else None,
        "epochs": [
            {key: row.get(key) for key in ("epoch", "seconds", "train_images_per_sec", "peak_gpu_memory_mib")}
            for row in history
        ],
        "peak_gpu_memory_mib": max((row.get("peak_gpu_memory_mib") or 0) for row in history) or None,
        "nvidia_smi_peak_mib_by_gpu": {str(index): used for index, used in sorted(peaks.items())},
        "process_seconds": round(seconds, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/train_gpus"))
    parser.add_argument("--out", type=Path, default=None, help="folder for the report and logs")
    parser.add_argument("--images-per-class", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--per-gpu-batch", type=int, default=128)
    parser.add_argument("--precision", default="mixed_float16")
    parser.add_argument("--cap-mib", type=int, default=7680, help="the RTX 2070 stand-in, on each GPU")
    parser.add_argument("--cpu-devices", type=int, default=0, help="a dry run on N JAX CPU devices")
    args = parser.parse_args()
    gpu = detect_gpu()  # the GPUs this process may use (CUDA_VISIBLE_DEVICES applied)
    if not args.cpu_devices and (gpu is None or gpu.count < 2):
        print(
            f"this benchmark needs 2 GPUs; this machine has {gpu.count if gpu else 0}"
            f"{f' ({gpu.name})' if gpu else ''}. --cpu-devices 2 checks the script on a CPU, "
            "without figures.",
            file=sys.stderr,
        )
        return 2
    # The options gpu_train.Bench's data phase and train_command read.
    args.backend = "jax"
    args.batch_size = args.per_gpu_batch
    if args.cpu_devices:
        args.precision, args.cap_mib = "float32", 0
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    bench = Bench(args)
    if not (bench.work / "dataset" / "manifest.json").exists():
        bench.data()
    report = {
        "machine": {
            "gpus": f"{gpu.count} x {gpu.name}" if gpu else None,
            "cpu_devices": args.cpu_devices,
            "cpus": os.cpu_count(),
            "host": platform.node(),
        },
        "data": json.loads((bench.work / "dataset" / "manifest.json").read_text())["totals"],
        "runs": {},
    }
    for gpus in (1, 2):
        print(f"training on {gpus} {'CPU device' if args.cpu_devices else 'GPU'}(s) ...", flush=True)
        report["runs"][str(gpus)] = train(bench, args, gpus)
    one, two = (report["runs"][key]["steady_images_per_sec"] for key in ("1", "2"))
    report["ratio_2_over_1"] = round(two / one, 3) if one and two else None
    report["note"] = "CPU devices: a check of the script, not a figure" if args.cpu_devices else ""
    text = json.dumps(report, indent=2)
    print(text)
    (bench.work / "train_gpus.json").write_text(text + "\n")
    if args.out:
        (args.out / "train_gpus.json").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
