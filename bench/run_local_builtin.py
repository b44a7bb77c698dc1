"""Time `make run`'s job: the whole pipeline through kfp.local on the built-in dataset.

    .venv/bin/python bench/run_local_builtin.py [--repeats 1]

Prints one JSON line per run (wall seconds, test accuracy, the machine) for bench/RESULTS.md.
The issue's bar: under 10 minutes on 2 CPU cores with test accuracy >= 0.90.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as workdir:
            started = time.monotonic()
            result = subprocess.run(
                [sys.executable, "pipeline.py", "run-local", "--workdir", workdir],
                cwd=REPO,
                capture_output=True,
                text=True,
            )
            wall = time.monotonic() - started
            if result.returncode != 0:
                sys.stderr.write(result.stdout[-3000:] + result.stderr[-3000:])
                return 1
            summary = json.loads((Path(workdir) / "run-summary.json").read_text())
        print(
            json.dumps(
                {
                    "wall_seconds": round(wall, 1),
                    "test_accuracy": summary["test_accuracy"],
                    "epochs": summary["epochs"],
                    "image_size": summary["image_size"],
                    "cpus": os.cpu_count(),
                    "cpu": cpu_model(),
                }
            ),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
