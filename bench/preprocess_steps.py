"""What each step of preprocessing one photo costs on one core, and what the alternatives cost.

    .venv/bin/python bench/preprocess_steps.py [--copies 40] [--rounds 5]

The question it answers: can any decoder, resize or encoder available here bring the whole
per-image work on 427x640 photos to 60% of the decode-only floor (issue 3's goal)? Per image,
milliseconds, one core, best of `--rounds` interleaved passes over the same photos that
bench/preprocess.py uses:

  decode   TF's decode_jpeg (as ours, default DCT), TF's with INTEGER_ACCURATE, Pillow's
  resize   the 427x640 -> 224x224 shrink: TF area (ours), TF antialiased bilinear, Pillow BOX,
           Pillow BILINEAR, Pillow reduce((2, 1)) then BOX, OpenCV INTER_AREA and INTER_LINEAR
           (OpenCV only when `cv2` is importable: it is not a dependency)
  encode   224x224 JPEG q95 4:4:4: TF's encode_jpeg (ours), Pillow's
  in_graph ours' TF graph built up step by step, each mapped over chunks of CHUNK photos in one
           call as preprocess runs it: the cost of each TF step without a call per photo
  overhead one call of a traced TF graph that does nothing (included in each TF figure above)
  whole    ours (check_and_resize_many, as preprocess runs it), and a Pillow-only pipeline
           (decode, BOX resize, sha256, encode): the fastest full pipeline found here

The budget line compares 60% of the floor with the sum of the cheapest decode, the cheapest
antialiased resize and the cheapest encode (separate calls), and with TF's decode and area
resize in one graph, before anything else a record needs.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SIZE = 224
IMAGE = [None, None, 3]


def pass_ms(function, items: list, photos: int) -> float:
    """Milliseconds per photo of one pass over `items` (photos, or chunks of `photos` in all)."""
    function(items[0])  # warm-up: a graph's first call, lazily loaded libraries
    started = time.perf_counter()
    for item in items:
        function(item)
    return (time.perf_counter() - started) * 1000 / photos


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    import tensorflow as tf
    from PIL import Image
    from preprocess import photos

    from components import imaging
    from components.preprocess import CHUNK, PreprocessConfig
    from components.verdict import check_and_resize_many

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:
        cv2 = None
    items = photos(args.copies)["427x640"]
    config = PreprocessConfig(source="", output=Path(), image_size=SIZE)
    chunks = [items[start : start + CHUNK] for start in range(0, len(items), CHUNK)]

    def graph(function, dtype, shape=None):
        return tf.function(
            function, input_signature=[tf.TensorSpec(shape, dtype)], autograph=False
        ).get_concrete_function()

    tf_decode = graph(lambda data: tf.io.decode_jpeg(data, channels=3), tf.string)
    tf_decode_accurate = graph(
        lambda data: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"), tf.string
    )
    tf_area = graph(lambda image: tf.image.resize(image, [SIZE, SIZE], method="area"), tf.uint8, IMAGE)
    tf_bilinear = graph(lambda image: tf.image.resize(image, [SIZE, SIZE], antialias=True), tf.uint8, IMAGE)
    tf_encode = graph(
        lambda image: tf.io.encode_jpeg(image, quality=95, chroma_downsampling=False), tf.uint8, IMAGE
    )

    tf_identity = graph(tf.identity, tf.uint8, IMAGE)

    def pillow_decode(data: bytes):
        image = Image.open(io.BytesIO(data))
        image.draft("RGB", (SIZE, SIZE))
        image.load()
        return image

    def pillow_encode(image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=95, subsampling=0)
        return buffer.getvalue()

    def pillow_pipeline(data: bytes) -> None:
        small = pillow_decode(data).resize((SIZE, SIZE), Image.BOX)
        hashlib.sha256(small.tobytes()).hexdigest()
        pillow_encode(small)

    def mapped(function, output):
        """`function` mapped over a chunk of photos in one call, as ours runs: no per-photo call cost."""
        return graph(
            lambda datas: tf.map_fn(function, datas, parallel_iterations=1, fn_output_signature=output),
            tf.string,
            [None],
        )

    one_pixel = tf.TensorSpec([3], tf.uint8)  # a cheap output, so that only the named steps are timed
    in_graph = {
        "decode": mapped(lambda data: tf.io.decode_jpeg(data, channels=3)[0, 0], one_pixel),
        "+ exif, format switch (imaging.decode)": mapped(
            lambda data: imaging.decode(data, SIZE)[0, 0], one_pixel
        ),
        "+ area resize (imaging.resize)": mapped(
            lambda data: imaging.decode_and_resize(data, SIZE)[0, 0], one_pixel
        ),
        "+ encode (ours' graph)": mapped(
            lambda data: tf.io.encode_jpeg(
                imaging.decode_and_resize(data, SIZE), quality=95, chroma_downsampling=False
            ),
            tf.TensorSpec([], tf.string),
        ),
    }
    chunk_tensors = [tf.constant(chunk) for chunk in chunks]
    tensors = [tf.constant(data) for data in items]
    decoded = [tf_decode(data) for data in tensors]
    pillows = [pillow_decode(data) for data in items]
    arrays = [image.numpy() for image in decoded]
    small = [tf.cast(tf.round(tf_area(image)), tf.uint8) for image in decoded]
    small_pillows = [Image.fromarray(image.numpy()) for image in small]

    contenders = {
        "decode": {
            "tf": (lambda data: tf_decode(data).numpy(), tensors),
            "tf_integer_accurate": (lambda data: tf_decode_accurate(data).numpy(), tensors),
            "pillow": (pillow_decode, items),
        },
        "resize": {
            "tf_area (ours)": (lambda image: tf_area(image).numpy(), decoded),
            "tf_bilinear_antialias": (lambda image: tf_bilinear(image).numpy(), decoded),
            "pillow_box": (lambda image: image.resize((SIZE, SIZE), Image.BOX), pillows),
            "pillow_bilinear": (lambda image: image.resize((SIZE, SIZE), Image.BILINEAR), pillows),
            "pillow_reduce_2x1_box": (
                lambda image: image.reduce((2, 1)).resize((SIZE, SIZE), Image.BOX),
                pillows,
            ),
        },
        "encode": {
            "tf (ours)": (lambda image: tf_encode(image).numpy(), small),
            "pillow": (pillow_encode, small_pillows),
        },
        "in_graph": {name: (function, chunk_tensors) for name, function in in_graph.items()},
        # What every TF number above includes once and ours pays once per chunk of CHUNK photos.
        "overhead": {"tf_graph_call": (lambda image: tf_identity(image).numpy(), small)},
        "whole": {
            "ours": (lambda chunk: check_and_resize_many(chunk, config), chunks),
            "pillow_pipeline": (pillow_pipeline, items),
        },
    }
    if cv2 is not None:
        contenders["resize"]["opencv_area"] = (
            lambda image: cv2.resize(image, (SIZE, SIZE), interpolation=cv2.INTER_AREA),
            arrays,
        )
        contenders["resize"]["opencv_linear_aliased"] = (
            lambda image: cv2.resize(image, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR),
            arrays,
        )

    results: dict[str, dict[str, float]] = {group: {} for group in contenders}
    for _ in range(args.rounds):  # interleaved: a neighbour's burst hits every contender alike
        for group, members in contenders.items():
            for name, (function, work) in members.items():
                per_photo = pass_ms(function, work, len(items))
                results[group][name] = round(min(results[group].get(name, float("inf")), per_photo), 3)

    floor_ms = min(*results["decode"].values(), results["in_graph"]["decode"])
    goal_ms = floor_ms / 0.6
    antialiased = {name: ms for name, ms in results["resize"].items() if "aliased" not in name}
    cheapest = min(results["decode"].values()) + min(antialiased.values()) + min(results["encode"].values())
    report = {
        "cpus": os.cpu_count(),
        "photos": len(items),
        "rounds": args.rounds,
        "opencv": getattr(cv2, "__version__", "not installed"),
        "ms_per_image": results,
        "budget": {
            "floor_ms (fastest decode, in a graph or not)": floor_ms,
            "goal_ms (floor / 0.6)": round(goal_ms, 3),
            "cheapest decode + antialiased resize + encode, ms": round(cheapest, 3),
            "in_graph decode + area resize, ms": results["in_graph"]["+ area resize (imaging.resize)"],
            "ours_ms": results["whole"]["ours"],
            "ours_over_floor": round(floor_ms / results["whole"]["ours"], 2),
            "pillow_pipeline_over_floor": round(floor_ms / results["whole"]["pillow_pipeline"], 2),
        },
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
