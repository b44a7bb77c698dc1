"""Serving latency over HTTP (`components.serve`, KServe's model server, V1 protocol) at batch 1
and 32, against its baseline: the same SavedModel's signature called in-process on the same
image bytes, in the same run.

    .venv/bin/python bench/serving_latency.py [--image-size 224] [--runs 30]

EfficientNet-B0 (untrained: the weights do not change the work) is exported with
`components.export.write_saved_model`, pushed to a registry folder and promoted; the server is
started on it as a user starts it. The images are JPEG photos of 480x640 made here (noise
over gradients, about 100 KB each). Each request is timed from send to parsed answer (base64,
JSON, HTTP, decode, resize, network); the baseline times the signature call alone. After
3 warm-up calls per batch size, `--runs` timed calls; p50 and p95 in ms. Prints JSON and a
Markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from components import registry as reg  # noqa: E402 (bench/ is run as a script)
from components.export import write_saved_model  # noqa: E402
from tests.test_serve import Client, free_port  # noqa: E402

BATCHES = (1, 32)


def photos(count: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        ramp = np.linspace(0, 255, 640)[None, :, None] * rng.uniform(0.3, 1, 3)
        pixels = np.clip(ramp + rng.normal(0, 25, (480, 640, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
        out.append(buffer.getvalue())
    return out


def percentiles(times: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(float(np.percentile(times, 50)) * 1000, 1),
        "p95_ms": round(float(np.percentile(times, 95)) * 1000, 1),
    }


def timed(call, runs: int) -> dict[str, float]:
    for _ in range(3):
        call()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return percentiles(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()

    import tensorflow as tf

    from components.model import build_model

    work = Path(tempfile.mkdtemp(prefix="serving-latency-"))
    classes = [f"class{i}" for i in range(5)]
    write_saved_model(
        build_model(len(classes), args.image_size), classes, args.image_size, work / "export" / "saved_model"
    )
    registry = reg.Registry(str(work / "registry"), "bench")
    registry.promote(registry.push(work / "export", {"metrics": {}}))
    images = photos(max(BATCHES))

    client = Client(free_port(), "bench")
    log = open(work / "serve.log", "w")  # noqa: SIM115 (closed below)
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "components.serve",
            "--registry",
            str(work / "registry"),
            "--model-name",
            "bench",
            "--port",
            str(client.port),
        ],  # fmt: skip
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    rows = []
    try:
        client.wait_ready()
        serve = tf.saved_model.load(str(work / "export" / "saved_model")).signatures["serving_default"]
        for batch in BATCHES:
            chosen = images[:batch]

            def over_http(chosen=chosen):
                status, body, _ = client.predict(chosen, timeout=120)
                assert status == 200 and len(body["predictions"]) == len(chosen), body

            def in_process(chosen=chosen):
                serve(image_bytes=tf.constant(chosen))["probabilities"].numpy()

            http, direct = timed(over_http, args.runs), timed(in_process, args.runs)
            row = {"batch": batch, "http": http, "in_process": direct}
            row["p50_ratio"] = round(http["p50_ms"] / direct["p50_ms"], 2)
            print(json.dumps(row), flush=True)
            rows.append(row)
    finally:
        server.terminate()
        server.wait()
        log.close()
    print(
        f"\n{os.cpu_count()} CPU cores, {args.image_size} px, {args.runs} runs, {time.strftime('%Y-%m-%d')}\n"
    )
    print("| batch | HTTP p50 / p95 ms | in-process p50 / p95 ms | HTTP / in-process (p50) |")
    print("|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['batch']} | {row['http']['p50_ms']} / {row['http']['p95_ms']} | "
            f"{row['in_process']['p50_ms']} / {row['in_process']['p95_ms']} | {row['p50_ratio']}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
