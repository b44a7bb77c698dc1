"""Model quality on small datasets from scratch, before and after the update floor.

    python3 bench/quality.py --work /tmp/quality                    # every dataset below
    python3 bench/quality.py --work /tmp/quality --datasets colours shapes

Each dataset is made here, with a second set of fresh files (another seed) that no step ever
sees. Per dataset the product's own steps run as a user runs them, each in its own process:
`components.preprocess` (once), then per variant `components.train --weights none`,
`components.evaluate` (test accuracy) and `components.export` (the SavedModel, verified);
the exported model then answers the fresh files, sent as raw file bytes. The variants differ
in one setting: `--min-updates 0` (before: one pass over the images an epoch) against the
default (after: as many passes as 200 optimizer updates take). ImageNet weights are not
measured: this machine is offline.

Datasets:
- colours: 120 JPEGs of three plain colours (40 a class, noise, 48-160 px) at 64 px, 8 epochs
  (the issue's first case);
- shapes: 150 PNGs of circles, squares and triangles (50 a class, random colours, sizes and
  places on noise) at 64 px, 10 epochs;
- photos: 140 crops of two real photographs (70 a class, sides 160-400 px, some flipped) at
  224 px, 10 epochs (the issue's second case). The photographs are the two JPEGs the Rust
  toolchain ships in its embedded book, or any two given with --photos;
- patterns: the built-in 2,000-image dataset at 64 px, 15 epochs, after only (the floor does
  not apply to it: 1,400 images a batch of 32 for 15 epochs are 660 updates).

Prints one JSON line per run and, at the end, a Markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from small_data import make_colours  # noqa: E402 (bench/ is the script's folder)

RUST_BOOK = (
    Path.home()
    / ".rustup/toolchains/stable-x86_64-unknown-linux-gnu/share/doc/rust/html"
    / "embedded-book/assets"
)
DEFAULT_PHOTOS = (RUST_BOOK / "verify.jpeg", RUST_BOOK / "f3.jpg")
FRESH_PER_CLASS = 30


# What each run changes from the product's defaults (train's own flags). "before" is the
# behaviour before the update floor; the others are the candidates issue 16 names.
VARIANTS = {
    "before": ("--min-updates", "0"),
    "after": (),
    "lr-3e-3": ("--learning-rate", "3e-3"),
    "lr-3e-4": ("--learning-rate", "3e-4"),
    "updates-800": ("--min-updates", "800"),
    "updates-1600": ("--min-updates", "1600"),
    "no-augment": ("--no-augment",),
    "crop-0.35": ("--crop-min-area", "0.35"),
    "crop-0.35-updates-800": ("--crop-min-area", "0.35", "--min-updates", "800"),
    "bn-0.99": ("--bn-momentum", "0.99"),  # Keras' own; the product's from scratch is 0.9
    "bn-0.8": ("--bn-momentum", "0.8"),
}


@dataclass(frozen=True)
class Case:
    name: str
    image_size: int
    epochs: int
    variants: tuple[str, ...] = ("before", "after")


CASES = {
    case.name: case
    for case in (
        Case("colours", 64, 8),
        Case("shapes", 64, 10),
        Case("photos", 224, 10),
        Case("patterns", 64, 15, variants=("after",)),
    )
}


def make_shapes(folder: Path, per_class: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for name in ("circle", "square", "triangle"):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            size = int(rng.integers(64, 129))
            background = rng.integers(0, 256, 3)
            pixels = np.clip(background + rng.normal(0, 20, (size, size, 3)), 0, 255).astype("uint8")
            image = Image.fromarray(pixels)
            side = rng.uniform(0.3, 0.7) * size
            x, y = rng.uniform(0, size - side, 2)
            colour = tuple(int(v) for v in (background + rng.integers(80, 176, 3)) % 256)
            draw = ImageDraw.Draw(image)
            if name == "circle":
                draw.ellipse((x, y, x + side, y + side), fill=colour)
            elif name == "square":
                draw.rectangle((x, y, x + side, y + side), fill=colour)
            else:
                draw.polygon([(x + side / 2, y), (x, y + side), (x + side, y + side)], fill=colour)
            image.save(folder / name / f"{index}.png")


def make_photo_crops(folder: Path, photos: tuple[Path, Path], per_class: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for photo in photos:
        source = Image.open(photo).convert("RGB")
        width, height = source.size
        (folder / photo.stem).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            side = int(rng.integers(160, min(400, width, height) + 1))
            left, top = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
            crop = source.crop((left, top, left + side, top + side))
            if rng.random() < 0.5:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            crop.save(folder / photo.stem / f"{index}.jpg", quality=int(rng.integers(75, 96)))


def make_dataset(case: Case, work: Path, photos: tuple[Path, Path]) -> None:
    images, fresh = work / "images", work / "fresh"
    if case.name == "colours":
        make_colours(images, 40, seed=1)
        make_colours(fresh, FRESH_PER_CLASS, seed=99)
    elif case.name == "shapes":
        make_shapes(images, 50, seed=1)
        make_shapes(fresh, FRESH_PER_CLASS, seed=99)
    elif case.name == "photos":
        make_photo_crops(images, photos, 70, seed=1)
        make_photo_crops(fresh, photos, FRESH_PER_CLASS, seed=99)
    else:
        from components.sample_data import SampleDataConfig, generate

        generate(SampleDataConfig(output=images))
        generate(SampleDataConfig(output=fresh, images_per_class=FRESH_PER_CLASS, seed=99))


def step(module: str, *args: str) -> float:
    """Run one product step as its own process; its wall time in seconds."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", f"components.{module}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-4000:])
        raise SystemExit(f"components.{module} failed")
    return round(time.monotonic() - started, 1)


def fresh_accuracy(saved_model: Path, fresh: Path) -> tuple[float, int]:
    """Accuracy of the exported model on raw file bytes, as a client sends them."""
    import tensorflow as tf

    serve = tf.saved_model.load(str(saved_model)).signatures["serving_default"]
    right = total = 0
    for folder in sorted(path for path in fresh.iterdir() if path.is_dir()):
        files = sorted(folder.iterdir())
        for start in range(0, len(files), 16):
            batch = [file.read_bytes() for file in files[start : start + 16]]
            labels = serve(image_bytes=tf.constant(batch))["labels"].numpy()
            right += sum(label.decode() == folder.name for label in labels)
            total += len(batch)
    return round(right / total, 3), total


def simple_recipe(prepared: Path, fresh: Path, epochs: int = 60) -> dict:
    """The reference the issue judges against: a small four-block CNN from scratch (Adam 1e-3,
    batch 16, flips and shifts), trained on the same training split the product reads, asked
    the same fresh files resized with Pillow. Where this reaches 0.9 the product must too."""
    import keras

    from components import records

    dataset = records.load(prepared)
    size = dataset.image_size
    started = time.monotonic()

    def arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
        pairs = list(records.read_split(dataset, split).as_numpy_iterator())
        return np.stack([image for image, _ in pairs]), np.array([label for _, label in pairs])

    train_x, train_y = arrays("train")
    keras.utils.set_random_seed(0)
    layers = [keras.Input((size, size, 3)), keras.layers.Rescaling(1 / 255)]
    layers += [keras.layers.RandomFlip("horizontal"), keras.layers.RandomTranslation(0.125, 0.125)]
    for width in (32, 64, 128, 256):
        layers += [
            keras.layers.Conv2D(width, 3, padding="same", use_bias=False),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.MaxPooling2D(),
        ]
    layers += [keras.layers.GlobalAveragePooling2D(), keras.layers.Dropout(0.3)]
    layers += [keras.layers.Dense(len(dataset.classes), activation="softmax")]
    model = keras.Sequential(layers)
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(train_x, train_y, batch_size=16, epochs=epochs, verbose=0)
    test_x, test_y = arrays("test")
    test = float(model.evaluate(test_x, test_y, verbose=0)[1])
    right = total = 0
    for index, name in enumerate(dataset.classes):
        files = sorted((fresh / name).iterdir())
        pixels = np.stack([np.asarray(Image.open(f).convert("RGB").resize((size, size))) for f in files])
        right += int((model.predict(pixels, verbose=0).argmax(axis=1) == index).sum())
        total += len(files)
    return {
        "updates": -(-len(train_x) // 16) * epochs,
        "train_seconds": round(time.monotonic() - started, 1),
        "test_accuracy": round(test, 3),
        "fresh_accuracy": round(right / total, 3),
        "fresh_images": total,
    }


def run_case(case: Case, work: Path, photos: tuple[Path, Path], variants: tuple[str, ...]) -> list[dict]:
    prepared = work / "prepared"
    if not prepared.exists():
        make_dataset(case, work, photos)
        step(
            "preprocess",
            "--source",
            str(work / "images"),
            "--output",
            str(prepared),
            "--image-size",
            str(case.image_size),
        )
    manifest = json.loads((prepared / "manifest.json").read_text())
    counts = manifest["totals"]
    rows = []
    for variant in variants or case.variants:
        if variant == "simple":
            row = {"dataset": case.name, "variant": variant, "image_size": case.image_size}
            row |= {"epochs": 60, "train_images": counts["train"], "passes_per_epoch": 1}
            row |= {"best_val_accuracy": None, "test_images": counts["test"]}
            row |= simple_recipe(prepared, work / "fresh")
            print(json.dumps(row), flush=True)
            rows.append(row)
            continue
        run = work / variant
        train_seconds = step(
            "train",
            "--data",
            str(prepared),
            "--output",
            str(run / "model"),
            "--weights",
            "none",
            "--epochs",
            str(case.epochs),
            "--batch-size",
            "32",
            *VARIANTS[variant],
        )
        step(
            "evaluate",
            "--model",
            str(run / "model"),
            "--data",
            str(prepared),
            "--output",
            str(run / "evaluation"),
        )
        step(
            "export", "--model", str(run / "model"), "--data", str(prepared), "--output", str(run / "export")
        )
        summary = json.loads((run / "model" / "train_config.json").read_text())
        evaluation = json.loads((run / "evaluation" / "evaluation.json").read_text())
        saved = next(path.parent for path in (run / "export").rglob("saved_model.pb"))
        fresh, fresh_count = fresh_accuracy(saved, work / "fresh")
        row = {
            "dataset": case.name,
            "variant": variant,
            "image_size": case.image_size,
            "epochs": case.epochs,
            "classes": len(summary["classes"]),
            "split": counts,
            "train_images": summary["train_images"],
            "passes_per_epoch": summary["passes_per_epoch"],
            "updates": -(-summary["train_images"] * summary["passes_per_epoch"] // 32) * case.epochs,
            "train_seconds": train_seconds,
            "best_val_accuracy": summary["best_val_accuracy"],
            "test_accuracy": round(evaluation["candidate"]["accuracy"], 3),
            "test_images": counts["test"],
            "fresh_accuracy": fresh,
            "fresh_images": fresh_count,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/quality"))
    parser.add_argument("--datasets", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument(
        "--photos",
        nargs=2,
        type=Path,
        default=DEFAULT_PHOTOS,
        help="two photographs to crop for the photos dataset",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=[*VARIANTS, "simple"],
        help="runs per dataset (default: the dataset's own); simple: the small-CNN reference",
    )
    args = parser.parse_args()
    if "photos" in args.datasets and not all(path.is_file() for path in args.photos):
        raise SystemExit(f"photos: {args.photos[0]} or {args.photos[1]} is missing; give two with --photos")
    rows = []
    for name in args.datasets:
        rows += run_case(CASES[name], args.work / name, tuple(args.photos), tuple(args.variants or ()))
    print(f"\n{os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d')}\n")
    print("| dataset | size | epochs | run | updates | train s | val | test | fresh (exported, raw files) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['dataset']} ({row['train_images']} train) | {row['image_size']} px | "
            f"{row['epochs']} | {row['variant']} ({row['passes_per_epoch']} pass/epoch) | "
            f"{row['updates']} | {row['train_seconds']} | {row['best_val_accuracy']} | "
            f"{row['test_accuracy']} ({row['test_images']}) | "
            f"{row['fresh_accuracy']} ({row['fresh_images']}) |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
