"""Small data, from scratch: does the train step learn 120 photos of three plain colours?

    python3 bench/small_data.py --work /tmp/small --epochs 8 --batch-size 32    # the issue's case
    python3 bench/small_data.py --work /tmp/small --epochs 24 --batch-size 8    # 288 updates

Makes 40 JPEGs a class of red, green and blue (noise, random sizes 48-160 px) and 30 fresh
ones a class from another seed, preprocesses the 120 at 64 px, trains with `--weights none`,
then reports accuracy on train, validation, test and the fresh images (resized as the served
model does), before and after recomputing BatchNorm's moving statistics over the training
images (the candidate fix for "accurate in training, random in inference").
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}


def make_colours(folder: Path, per_class: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for name, rgb in COLOURS.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            size = int(rng.integers(48, 160))
            pixels = np.array(rgb) + rng.normal(0, 25, (size, size, 3)) + rng.normal(0, 30, 3)
            Image.fromarray(np.clip(pixels, 0, 255).astype("uint8")).save(
                folder / name / f"{index}.jpg", quality=90
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/small"))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    from components import model as model_lib
    from components import preprocess, records, train

    work = args.work
    if not (work / "prepared").exists():
        make_colours(work / "images", 40, seed=1)
        make_colours(work / "fresh", 30, seed=99)
        preprocess.preprocess(
            preprocess.PreprocessConfig(source=str(work / "images"), output=work / "prepared", image_size=64)
        )
    model_dir = work / f"model-{args.epochs}x{args.batch_size}"
    shutil.rmtree(model_dir, ignore_errors=True)
    started = time.monotonic()
    train.train(
        train.TrainConfig(
            weights="none",
            min_updates=0,
            data=work / "prepared",
            output=model_dir,
            epochs=args.epochs,
            batch_size=args.batch_size,
        )
    )
    seconds = time.monotonic() - started

    import keras
    import tensorflow as tf

    model = model_lib.load_trained(model_dir)[0]
    dataset = records.load(work / "prepared")
    classes = dataset.classes

    def split_accuracy(split: str) -> float:
        batches, _ = train.eval_dataset(dataset, split, 32, len(classes), pad=False)
        right = total = 0
        for images, labels, _ in batches:
            predicted = model.predict_on_batch(images).argmax(1)
            right += int((predicted == labels.numpy().argmax(1)).sum())
            total += len(predicted)
        return round(right / total, 3)

    def fresh_accuracy() -> float:
        right = total = 0
        for index, name in enumerate(classes):
            for file in sorted((work / "fresh" / name).glob("*.jpg")):
                pixels = np.asarray(Image.open(file).convert("RGB").resize((64, 64)))[None]
                right += int(model.predict_on_batch(pixels).argmax() == index)
                total += 1
        return round(right / total, 3)

    def scores() -> dict:
        return {split: split_accuracy(split) for split in records.SPLITS} | {"fresh": fresh_accuracy()}

    before = scores()
    layers = [
        layer
        for layer in model_lib._all_layers(model)
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable
    ]
    momenta = [layer.momentum for layer in layers]
    batches, _ = train.eval_dataset(dataset, "train", 32, len(classes), pad=False)
    for index, (images, _, _) in enumerate(batches):
        for layer in layers:  # a running mean over the batches: batch k weighs 1 / (k + 1)
            layer.momentum = index / (index + 1)
        model(tf.cast(images, "float32"), training=True)
    for layer, momentum in zip(layers, momenta, strict=True):
        layer.momentum = momentum
    summary = json.loads((model_dir / "train_config.json").read_text())
    report = {
        "images": 120,
        "image_size": 64,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "updates": args.epochs * -(-dataset.count("train") // args.batch_size),
        "train_seconds": round(seconds, 1),
        "best_val_accuracy": summary.get("best_val_accuracy"),
        "accuracy": before,
        "accuracy_batchnorm_recomputed": scores(),
    }
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
