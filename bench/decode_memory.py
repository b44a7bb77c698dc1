"""Where the memory of decoding one large transparent PNG goes: the decode alone, the decode and
an area resize, the product's path (`imaging.decode_and_resize`: resized premultiplied, a band
of rows at a time, then composited onto white) and its baseline, the path before issue 18
(`imaging.decode` composites at full size in float32, then `imaging.resize`), each in a fresh
process.

    .venv/bin/python bench/decode_memory.py [--size 9000]

Resident memory is sampled every 5 ms during the call, above the warm process (both graphs
traced and run once on a small image). Figures in bench/RESULTS.md (issue 18).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

MEASURE = """
import io, json, os, sys, threading, time
import tensorflow as tf
from PIL import Image
sys.path.insert(0, sys.argv[3])
from components import imaging
from bench.serving_guard import png_bomb

def rss_mb():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

mode, size = sys.argv[1], int(sys.argv[2])
data = tf.constant(png_bomb(size))
spec = [tf.TensorSpec([], tf.string)]
product = tf.function(lambda e: imaging.decode_and_resize(e, 224), input_signature=spec)
baseline = tf.function(lambda e: imaging.resize(imaging.decode(e, 224), 224), input_signature=spec)
small = io.BytesIO()
Image.new("RGBA", (300, 200), (0, 0, 0, 0)).save(small, format="PNG")
product(tf.constant(small.getvalue()))
baseline(tf.constant(small.getvalue()))
before, peak, done = rss_mb(), [0.0], threading.Event()

def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss_mb())
        time.sleep(0.005)

sampler = threading.Thread(target=sample)
sampler.start()
started = time.perf_counter()
if mode == "decode":
    tf.io.decode_image(data, channels=0, expand_animations=False)
elif mode == "decode+area resize":
    tf.image.resize(tf.io.decode_image(data, channels=0, expand_animations=False), [224, 224], method="area")
elif mode.startswith("composited at full size"):
    baseline(data)
else:
    product(data)
seconds = time.perf_counter() - started
done.set()
sampler.join()
print(json.dumps({"mode": mode, "seconds": round(seconds, 2), "peak_growth_mb": round(peak[0] - before)}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=9000, help="side of the square RGBA PNG, px")
    args = parser.parse_args()
    modes = (
        "decode",
        "decode+area resize",
        "composited at full size, then resized (the baseline)",
        "decode_and_resize (the product)",
    )
    for mode in modes:
        result = subprocess.run(
            [sys.executable, "-c", MEASURE, mode, str(args.size), str(REPO)], capture_output=True, text=True
        )
        print(result.stdout.strip().splitlines()[-1] if result.returncode == 0 else result.stderr[-300:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
