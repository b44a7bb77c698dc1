"""Training input pipeline speed at 224 px: read shards, decode, shuffle, augment, batch.

    .venv/bin/python bench/input_pipeline.py [--images 3000] [--batches 150]

Makes a prepared dataset with `components.preprocess` from random crops of scikit-learn's two
sample photos (real photo content, so the stored JPEGs have realistic sizes), then times, in
the same process, one after the other:
  baseline  the pipeline as it was before this benchmark (the general `imaging.decode` per
            record, shuffling decoded images, per-image augmentation, cast per image)
  ours      `components.train.training_dataset`, what `train` feeds the model
Each is timed over `--batches` batches of 64 after 20 warm-up batches, on every core.
"""

from __future__ import annotations

import argparse
import atexit
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SIZE = 224
BATCH = 64


def make_folder(root: Path, images: int) -> Path:
    import numpy as np
    import sample_photos

    photos = sample_photos.load()
    rng = np.random.default_rng(0)
    for index in range(images):
        photo = photos[index % len(photos)]
        side = int(rng.integers(200, 427))
        left, top = int(rng.integers(0, photo.width - side)), int(rng.integers(0, photo.height - side))
        crop = photo.crop((left, top, left + side, top + side))
        target = root / f"class-{index % 2}" / f"{index:05d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        crop.save(buffer, format="JPEG", quality=90)
        target.write_bytes(buffer.getvalue())
    return root


def baseline_dataset(dataset, num_classes: int, seed: int = 42):
    """The training input pipeline before this benchmark, kept verbatim as the baseline."""
    import tensorflow as tf

    from components import imaging, records

    size = dataset.image_size
    pad = size // 8

    def _decode(serialized):
        example = records.parse_example(serialized)
        image = imaging.decode(example["image/encoded"])
        image = tf.ensure_shape(image, [size, size, 3])
        return image, tf.cast(example["image/class/label"], tf.int32)

    def _augment(image, label):
        image = tf.image.random_flip_left_right(image)
        image = tf.image.pad_to_bounding_box(image, pad, pad, size + 2 * pad, size + 2 * pad)
        image = tf.image.random_crop(image, [size, size, 3])
        return image, label

    def _finish(image, label):
        return tf.cast(image, tf.float32), tf.one_hot(label, num_classes)

    data = tf.data.TFRecordDataset(dataset.files("train"), num_parallel_reads=tf.data.AUTOTUNE).map(
        _decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    data = data.shuffle(min(dataset.count("train"), 10_000), seed=seed, reshuffle_each_iteration=True)
    data = data.map(_augment, num_parallel_calls=tf.data.AUTOTUNE)
    return data.map(_finish, num_parallel_calls=tf.data.AUTOTUNE).batch(BATCH).prefetch(tf.data.AUTOTUNE)


def rate(data, batches: int, warmup: int = 20) -> float:
    iterator = iter(data.repeat())
    for _ in range(warmup):
        next(iterator)
    started = time.perf_counter()
    images = 0
    for _ in range(batches):
        images += int(next(iterator)[0].shape[0])
    return images / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--batches", type=int, default=150)
    args = parser.parse_args()

    from components import records
    from components.preprocess import PreprocessConfig, preprocess
    from components.train import TrainConfig, training_dataset

    scratch = Path(tempfile.mkdtemp())
    # Gigabytes of copies and outputs: gone when the run ends, however it ends.
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    folder = make_folder(scratch / "images", args.images)
    preprocess(PreprocessConfig(source=folder, output=scratch / "prepared", image_size=SIZE))
    dataset = records.load(scratch / "prepared")
    stored = sum(shard["bytes"] for shard in dataset.manifest["shards"]["train"]) / dataset.count("train")

    config = TrainConfig(
        weights="none", data=scratch / "prepared", output=scratch / "model", batch_size=BATCH
    )
    results = {
        "cpus": os.cpu_count(),
        "image_size": SIZE,
        "batch": BATCH,
        "train_images": dataset.count("train"),
        "mean_record_kb": round(stored / 1024, 1),
    }
    results["baseline_img_per_s"] = round(rate(baseline_dataset(dataset, 2), args.batches), 1)
    results["ours_img_per_s"] = round(rate(training_dataset(dataset, config, 2), args.batches), 1)
    results["ours_over_baseline"] = round(results["ours_img_per_s"] / results["baseline_img_per_s"], 2)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
