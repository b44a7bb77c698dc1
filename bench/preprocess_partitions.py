"""Preprocess fanned out: N partitions at once against 1, on the same files, in the same run.

    .venv/bin/python bench/preprocess_partitions.py [--files 3000] [--partitions 2] [--rounds 2]

What a cluster does with `partitions=N`: N pods, each `python -m components.preprocess
--partitions N --partition i` with one decoding worker (`--workers 1`, a pod's CPU), started
together, then one `--merge` pod. The baseline is one pod, `--workers 1`, over every file.
Each is a fresh process, as a pod is; the wall time of the fan-out includes its merge. The
files are the 427x640 sample photos of `bench/preprocess.py`, in 4 classes. The datasets are
then compared byte for byte (shards, rejected.json, report.md; the manifest but its config).

Efficiency per worker = (baseline time / fan-out time) / N. N must not exceed the machine's
cores, or the pods would share them.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


def make_files(folder: Path, files: int) -> None:
    import sample_photos

    originals = sample_photos.load()
    for index in range(files):
        photo = originals[index % len(originals)]
        # A one-pixel shift per copy: distinct files and digests, the same decode cost.
        shifted = photo.crop((index % 5, index % 3, photo.width, photo.height)).resize(photo.size)
        target = folder / f"class-{index % 4}" / f"photo-{index:06d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        shifted.save(buffer, format="JPEG", quality=90)
        target.write_bytes(buffer.getvalue())


def preprocess(*args: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "components.preprocess", "--image-size", "224", "--workers", "1", *args]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> None:
    _, errors = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"preprocess failed:\n{errors[-3000:]}")


def one(source: Path, output: Path) -> float:
    started = time.perf_counter()
    finish(preprocess("--source", str(source), "--output", str(output)))
    return time.perf_counter() - started


def fanned(source: Path, work: Path, partitions: int) -> tuple[float, float]:
    started = time.perf_counter()
    parts = [work / f"part-{index}" for index in range(partitions)]
    running = [
        preprocess("--source", str(source), "--partitions", str(partitions), "--partition", str(index),
                   "--output", str(part))
        for index, part in enumerate(parts)
    ]  # fmt: skip
    for process in running:
        finish(process)
    merging = time.perf_counter()
    finish(preprocess("--merge", *map(str, parts), "--output", str(work / "merged")))
    ended = time.perf_counter()
    return ended - started, ended - merging


def same(one: Path, other: Path) -> bool:
    a, b = (json.loads((folder / "manifest.json").read_text()) for folder in (one, other))
    a.pop("config"), b.pop("config")
    names = sorted(
        p.name for p in one.iterdir() if p.suffix == ".tfrecord" or p.name in ("rejected.json", "report.md")
    )
    return a == b and all((one / n).read_bytes() == (other / n).read_bytes() for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=3000)
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best of each kept")
    args = parser.parse_args()
    if args.partitions > (os.cpu_count() or 1):
        raise SystemExit(f"--partitions {args.partitions} exceeds this machine's {os.cpu_count()} cores")
    work = Path(tempfile.mkdtemp(prefix="bench-partitions-"))
    try:
        source = work / "photos"
        make_files(source, args.files)
        baseline, fan_out, merge = [], [], []
        for round_ in range(args.rounds):
            for folder in (work / "one", work / "fan"):
                shutil.rmtree(folder, ignore_errors=True)
            (work / "fan").mkdir()
            baseline.append(one(source, work / "one"))
            total, merged = fanned(source, work / "fan", args.partitions)
            fan_out.append(total)
            merge.append(merged)
            print(f"round {round_ + 1}: 1 partition {baseline[-1]:.1f} s, {args.partitions} partitions "
                  f"{total:.1f} s (merge {merged:.1f} s)", flush=True)  # fmt: skip
        identical = same(work / "one", work / "fan" / "merged")
        speedup = min(baseline) / min(fan_out)
        print(
            json.dumps(
                {
                    "files": args.files,
                    "cores": os.cpu_count(),
                    "partitions": args.partitions,
                    "one_partition_s": round(min(baseline), 2),
                    "fanned_out_s": round(min(fan_out), 2),
                    "merge_s": round(min(merge), 2),
                    "speedup": round(speedup, 3),
                    "efficiency_per_worker": round(speedup / args.partitions, 3),
                    "identical_dataset": identical,
                },
                indent=2,
            )
        )
        if not identical:
            raise SystemExit("the fanned-out dataset differs from the one-partition dataset")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
