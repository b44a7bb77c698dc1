"""export: a servable TensorFlow SavedModel, verified after reload in a fresh process.

    python -m components.export --model /tmp/model --data /tmp/prepared --output /tmp/servable

The SavedModel's `serving_default` signature takes `image_bytes` (a batch of encoded JPEG,
PNG, GIF, BMP or WebP files, dtype string) and returns `probabilities` (float32, one column
per class, in `export_info.json`'s `classes` order) and `labels` (the predicted class names).
Decoding and resizing inside the signature are `components.imaging`, the code preprocess ran.

Verification: the Keras model's probabilities on the test records are compared with the
SavedModel's on the same encoded bytes, after `tf.saved_model.load` in a new Python process
(no Keras model object, only what the SavedModel holds). A mismatch fails the step.

    python -m components.export verify --saved-model /tmp/servable --examples examples.npz
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from components import records

log = logging.getLogger(__name__)

INPUT_NAME = "image_bytes"


class ExportError(RuntimeError):
    """The model could not be exported, or the exported model does not match the trained one."""


@dataclass(frozen=True)
class ExportConfig:
    model: Path  # output folder of train
    data: Path  # output folder of preprocess: its test records verify the export
    output: Path
    verify_examples: int = 64  # test records compared between Keras and the reloaded SavedModel
    # Same float32 math in a graph instead of eagerly: only summation order differs, so
    # probabilities agree to ~1e-6; 1e-4 leaves room for oneDNN kernel choices.
    tolerance: float = 1e-4


def write_saved_model(model, classes: list[str], image_size: int, path: Path,
                      resize_policy: str = "stretch") -> None:
    import keras
    import tensorflow as tf

    from components import imaging

    class_names = tf.constant(classes)

    def serve(image_bytes):
        images = tf.map_fn(
            lambda encoded: tf.cast(imaging.decode_and_resize(encoded, image_size, resize_policy),
                                    tf.float32),
            image_bytes,
            fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32),
        )
        probabilities = tf.cast(model(images, training=False), tf.float32)
        return {"probabilities": probabilities,
                "labels": tf.gather(class_names, tf.argmax(probabilities, axis=1))}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", serve,
                         input_signature=[tf.TensorSpec([None], tf.string, name=INPUT_NAME)])
    archive.write_out(str(path), verbose=False)


def test_examples(dataset: records.PreparedDataset, limit: int) -> tuple[list[bytes], np.ndarray]:
    """Up to `limit` encoded test images and their decoded pixels, as the trainer saw them."""
    import tensorflow as tf

    from components import imaging

    split = "test" if dataset.count("test") else "validation"
    encoded, pixels = [], []
    for serialized in tf.data.TFRecordDataset(dataset.files(split)).take(limit):
        example = records.parse_example(serialized)
        encoded.append(example["image/encoded"].numpy())
        pixels.append(imaging.decode(example["image/encoded"]).numpy())
    if not encoded:
        raise ExportError(f"{dataset.folder} has no test or validation records to verify the export with")
    return encoded, np.stack(pixels).astype(np.float32)


def verify_saved_model(saved_model: Path, examples: Path) -> dict[str, Any]:
    """Load the SavedModel with plain TensorFlow and compare with the expected outputs.

    Runs in the fresh process (`verify` subcommand): it must not need this project's code.
    """
    import tensorflow as tf

    data = np.load(examples, allow_pickle=False)
    ends = np.cumsum(data["lengths"])
    blob = data["blob"].tobytes()
    encoded = [blob[end - length:end] for end, length in zip(ends, data["lengths"], strict=True)]
    loaded = tf.saved_model.load(str(saved_model))
    serve = loaded.signatures["serving_default"]
    outputs = serve(**{INPUT_NAME: tf.constant(encoded, dtype=tf.string)})
    probabilities = outputs["probabilities"].numpy()
    labels = [label.decode() for label in outputs["labels"].numpy()]
    expected = data["probabilities"]
    expected_labels = [str(label) for label in data["labels"]]
    max_difference = float(np.abs(probabilities - expected).max())
    return {
        "examples": int(len(expected)),
        "max_abs_difference": max_difference,
        "labels_match": labels == expected_labels,
        "probabilities_dtype": str(probabilities.dtype),
        "signature_inputs": sorted(serve.structured_input_signature[1].keys()),
        "signature_outputs": sorted(serve.structured_outputs.keys()),
    }


def export(config: ExportConfig) -> dict[str, Any]:
    from components.train import TrainError, load_trained

    try:
        dataset = records.load(config.data, verify=False)
        model, summary = load_trained(config.model)
    except (records.DatasetError, TrainError) as error:
        raise ExportError(str(error)) from None
    classes, image_size = summary["classes"], summary["image_size"]
    resize_policy = summary.get("resize", "stretch")

    config.output.mkdir(parents=True, exist_ok=True)
    write_saved_model(model, classes, image_size, config.output, resize_policy)
    log.info("wrote SavedModel to %s", config.output)

    encoded, pixels = test_examples(dataset, config.verify_examples)
    expected = np.asarray(model.predict_on_batch(pixels), dtype=np.float32)
    with tempfile.TemporaryDirectory() as scratch:
        examples = Path(scratch) / "examples.npz"
        # Images as one byte blob plus lengths: numpy's fixed-width bytes type would strip
        # trailing zero bytes, and pickled arrays are refused on load.
        np.savez(examples, blob=np.frombuffer(b"".join(encoded), dtype=np.uint8),
                 lengths=np.array([len(e) for e in encoded], dtype=np.int64),
                 probabilities=expected, labels=np.array([classes[i] for i in expected.argmax(axis=1)]))
        result = subprocess.run(
            [sys.executable, "-m", "components.export", "verify",
             "--saved-model", str(config.output), "--examples", str(examples)],
            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ExportError(f"reloading the SavedModel in a fresh process failed:\n{result.stderr[-3000:]}")
    verification = json.loads(result.stdout.strip().splitlines()[-1])
    verification["tolerance"] = config.tolerance
    verification["passed"] = bool(verification["labels_match"]
                                  and verification["max_abs_difference"] <= config.tolerance)
    info = {"classes": classes, "image_size": image_size, "resize": resize_policy, "input": INPUT_NAME,
            "outputs": ["probabilities", "labels"], "verification": verification}
    (config.output / "export_info.json").write_text(json.dumps(info, indent=2) + "\n")
    if not verification["passed"]:
        raise ExportError(f"the reloaded SavedModel disagrees with the Keras model: {verification}")
    log.info("verified in a fresh process: %d examples, max |difference| %.2e, labels match",
             verification["examples"], verification["max_abs_difference"])
    return info


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m components.export",
                                     description="Export a trained model as a verified SavedModel.")
    parser.add_argument("--model", type=Path, help="output folder of train")
    parser.add_argument("--data", type=Path, help="output folder of preprocess (for verification)")
    parser.add_argument("--output", type=Path, help="folder for the SavedModel")
    parser.add_argument("--verify-examples", type=int, default=ExportConfig.verify_examples)
    parser.add_argument("--tolerance", type=float, default=ExportConfig.tolerance)
    subcommands = parser.add_subparsers(dest="command")
    verify = subcommands.add_parser("verify", help="reload a SavedModel and compare (internal)")
    verify.add_argument("--saved-model", type=Path, required=True)
    verify.add_argument("--examples", type=Path, required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    from components.cli import configure_logging, exit_on_user_error

    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging()
    if args.command == "verify":
        print(json.dumps(verify_saved_model(args.saved_model, args.examples)))
        return 0
    missing = [flag for flag in ("model", "data", "output") if getattr(args, flag) is None]
    if missing:
        parser.error("the following arguments are required: " + ", ".join(f"--{m}" for m in missing))
    with exit_on_user_error(ExportError):
        export(ExportConfig(model=args.model, data=args.data, output=args.output,
                            verify_examples=args.verify_examples, tolerance=args.tolerance))
    return 0


if __name__ == "__main__":
    sys.exit(main())
