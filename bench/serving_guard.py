"""The served model against decompression bombs: time to answer and memory, with the guard
(refused from the header before decoding) and, for the one bomb that a guard-less server
survives here, without it, each request in a fresh process.

    .venv/bin/python bench/serving_guard.py [--out /tmp/serving-guard]

Exports EfficientNet-B0 (64 px, untrained: the network's weights do not change what the
decoder does) twice with `components.export.write_saved_model`: once as exported (max_pixels
89,478,485), once with the guard lifted (max_pixels 10**15). For each bomb, a fresh Python
loads one of them, serves one ordinary JPEG (warm-up), then the bomb, and reports the wall time
of the bomb request and how far resident memory rose above the warm process during it
(sampled every 5 ms). Prints one JSON line
per case; figures in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import io
import json
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SERVE = """
import json, os, sys, threading, time
import tensorflow as tf

def rss_mb():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

serve = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
serve(image_bytes=tf.constant([open(sys.argv[3], "rb").read()]))
bomb = tf.constant([open(sys.argv[2], "rb").read()])
before, peak, done = rss_mb(), [0.0], threading.Event()

def sample():  # resident memory every 5 ms while the request runs
    while not done.is_set():
        peak[0] = max(peak[0], rss_mb())
        time.sleep(0.005)

sampler = threading.Thread(target=sample)
sampler.start()
started = time.perf_counter()
try:
    serve(image_bytes=bomb)
    answer = "served"
except tf.errors.InvalidArgumentError as error:
    message = " ".join(error.message.split())
    answer = "refused: " + message[message.find("assertion failed"):][:150]
seconds = time.perf_counter() - started
done.set()
sampler.join()
print(json.dumps({"seconds": round(seconds, 3), "rss_before_mb": round(before), "peak_growth_mb":
                  round(max(peak[0], rss_mb()) - before, 1), "answer": answer}))
"""


def png_bomb(size: int) -> bytes:
    """A fully transparent RGBA PNG of size x size: a few hundred KB of zlib, written row by
    row so that making it costs no more memory than one row."""
    row = b"\x00" + bytes(4 * size)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(size)) + compressor.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", size, size, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def gif_bomb(frames: int, size: int) -> bytes:
    from PIL import Image

    images = [Image.new("P", (size, size), index % 200) for index in range(frames)]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:])
    return buffer.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="serving-guard-")))
    args = parser.parse_args()
    from PIL import Image

    from components import imaging
    from components.export import write_saved_model
    from components.model import build_model

    args.out.mkdir(parents=True, exist_ok=True)
    model = build_model(num_classes=3, image_size=64, weights="none")
    guarded, open_door = args.out / "guarded", args.out / "unguarded"
    write_saved_model(model, ["a", "b", "c"], 64, guarded)
    write_saved_model(model, ["a", "b", "c"], 64, open_door, max_pixels=10**15)
    ordinary = args.out / "ordinary.jpg"
    Image.new("RGB", (640, 427), (90, 140, 200)).save(ordinary, quality=90)
    bombs = {
        "png 12000x12000 RGBA": png_bomb(12000),
        "png 23000x23000 RGBA": png_bomb(23000),
        "gif 1500 frames of 2000x2000": gif_bomb(1500, 2000),
    }
    # Without the guard, only the first is survivable on this machine (the second ran a server
    # out of memory, the third took 46 s and 6.5 GB in the measurement).
    cases = [(name, guarded) for name in bombs] + [("png 12000x12000 RGBA", open_door)]
    print(json.dumps({"max_pixels": imaging.MAX_PIXELS, "bomb_bytes": {k: len(v) for k, v in bombs.items()}}))
    for name, folder in cases:
        path = args.out / f"{name.split()[0]}-{len(bombs[name])}.bin"
        path.write_bytes(bombs[name])
        result = subprocess.run(
            [sys.executable, "-c", SERVE, str(folder), str(path), str(ordinary)],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        line = result.stdout.strip().splitlines()[-1] if result.returncode == 0 else result.stderr[-300:]
        print(json.dumps({"bomb": name, "guard": folder.name, "result": line}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
