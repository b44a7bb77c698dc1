"""export: a servable model, verified after reload in a fresh process, pushed to the registry.

    python -m components.export --model /tmp/model --data /tmp/prepared --output /tmp/servable \
        [--evaluation /tmp/eval] [--formats litert,onnx] [--registry s3://models --model-name flowers]

Writes `<output>` laid out as a registry version:
    saved_model/           TensorFlow SavedModel; `serving_default` takes `image_bytes` (a batch
                           of encoded JPEG, PNG, GIF, BMP or WebP files, dtype string) and returns
                           `probabilities` (float32, one column per class) and `labels`
    saved_model/export_info.json   classes (column order), image size, resize policy, and the
                           verification: agreement, CPU latency p50/p95 at batch 1 and 32
    litert/model.tflite    optional (--formats litert): the network alone, float32 pixels
    onnx/model.onnx        optional (--formats onnx): the network alone, float32 pixels
                           [N, size, size, 3] in 0-255; decode and resize as preprocess does
    model_card.md          data fingerprint, classes, metrics, training config, run id, date
    evaluation/            evaluate's evaluation.json, report.md, confusion_matrix.png

Decoding and resizing inside the SavedModel signature are `components.imaging`, the code
preprocess ran, so serving sees the pixels training saw. LiteRT and ONNX cannot hold those
string-decoding ops (LiteRT only with the Flex delegate; ONNX not at all), so they take pixels.

Verification: the Keras model's probabilities on test records are compared with each exported
format's, after loading it in a new Python process (no Keras model object, only the file).
A mismatch fails the step. With `--registry`, the folder is pushed as a new version (its
manifest last) and, if evaluate blessed it, made the production version; an unblessed model
is refused.

    python -m components.export verify --saved-model DIR --examples examples.npz
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from components import imaging, records
from components import registry as model_registry
from components.cli import configure_logging, exit_on_user_error, local_path
from components.model import ModelError, load_trained

log = logging.getLogger(__name__)

INPUT_NAME = "image_bytes"
SAVED_MODEL = "saved_model"
INFO = "export_info.json"
FORMATS = ("litert", "onnx")
LATENCY_BATCHES = (1, 32)


class ExportError(RuntimeError):
    """The model could not be exported, or the exported model does not match the trained one."""


@dataclass(frozen=True)
class ExportConfig:
    model: Path  # output folder of train
    data: Path  # output folder of preprocess: its test records verify the export
    output: Path
    evaluation: Path | None = None  # output folder of evaluate: its report goes with the model
    formats: tuple[str, ...] = ()  # extra formats besides the SavedModel: "litert", "onnx"
    registry: str = ""  # push here (s3://bucket[/prefix], minio://... or a folder); "" = no push
    model_name: str = "image-classifier"
    run_id: str = ""  # the pipeline run, recorded in the model card and the registry manifest
    verify_examples: int = 64  # test records compared between Keras and each reloaded format
    # Same float32 math in a graph instead of eagerly: only summation order differs, so
    # probabilities agree to ~1e-6; 1e-4 leaves room for oneDNN, XNNPACK and ONNX Runtime
    # kernel choices.
    tolerance: float = 1e-4
    latency_runs: int = 20  # timed calls per batch size, after one warm-up call
    # The served model refuses an image whose header declares more pixels than this (width x
    # height x GIF frames) before decoding it, as preprocess does: one decompression bomb
    # must not take a model server down.
    max_pixels: int = imaging.MAX_PIXELS
    max_images: int = 256  # images per request; more is refused before any is decoded

    def __post_init__(self) -> None:
        # Caught here, not in the exported graph: a cap of 0 would make a model that refuses
        # every request, found only once it serves.
        for flag, value, least in (
            ("--max-pixels", self.max_pixels, 1),
            ("--max-images", self.max_images, 1),
            ("--verify-examples", self.verify_examples, 1),
            ("--latency-runs", self.latency_runs, 0),
        ):
            if value < least:
                raise ExportError(f"{flag} must be {least} or more, got {value}")
        if not self.tolerance > 0:
            raise ExportError(f"--tolerance must be positive, got {self.tolerance}")


def write_saved_model(
    model,
    classes: list[str],
    image_size: int,
    path: Path,
    resize_policy: str = "stretch",
    max_pixels: int = imaging.MAX_PIXELS,
    max_images: int = 256,
) -> None:
    import keras
    import tensorflow as tf

    class_names = tf.constant(classes)

    def one(encoded):
        with tf.control_dependencies([imaging.check_pixels(encoded, max_pixels)]):
            return tf.cast(imaging.decode_and_resize(encoded, image_size, resize_policy), tf.float32)

    def serve(image_bytes):
        count = tf.debugging.Assert(
            tf.size(image_bytes) <= max_images,
            [
                "request refused: more images than the cap of",
                max_images,
                "per request:",
                tf.size(image_bytes),
            ],
        )
        with tf.control_dependencies([count]):
            image_bytes = tf.identity(image_bytes)
        images = tf.map_fn(
            one, image_bytes, fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32)
        )
        probabilities = tf.cast(model(images, training=False), tf.float32)
        return {
            "probabilities": probabilities,
            "labels": tf.gather(class_names, tf.argmax(probabilities, axis=1)),
        }

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serving_default", serve, input_signature=[tf.TensorSpec([None], tf.string, name=INPUT_NAME)]
    )
    archive.write_out(str(path), verbose=False)


def test_examples(dataset: records.PreparedDataset, limit: int) -> tuple[list[bytes], np.ndarray]:
    """Up to `limit` encoded test images and their decoded pixels, as the trainer saw them."""
    import tensorflow as tf

    split = "test" if dataset.count("test") else "validation"
    encoded, pixels = [], []
    for serialized in tf.data.TFRecordDataset(dataset.files(split)).take(limit):
        example = records.parse_example(serialized)
        encoded.append(example["image/encoded"].numpy())
        pixels.append(imaging.decode(example["image/encoded"]).numpy())
    if not encoded:
        raise ExportError(f"{dataset.folder} has no test or validation records to verify the export with")
    return encoded, np.stack(pixels).astype(np.float32)


def write_litert(model, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    model.export(str(path), format="litert", verbose=False)


def write_onnx(model, image_size: int, path: Path) -> None:
    """ONNX through tf2onnx, with captured constants folded in.

    Keras's own ONNX export (3.15) leaves EfficientNet's Normalization mean and variance as
    extra graph *inputs* (they are captured eager tensors, not variables), so the file cannot
    be run with the image alone; here they become initializers.
    """
    try:
        import onnx
        import tensorflow as tf
        import tf2onnx
        from onnx import numpy_helper
    except ImportError as error:
        raise ExportError(f"ONNX export needs the onnx extra (pip install '.[onnx]'): {error}") from None

    spec = [tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name="pixels")]
    function = tf.function(lambda pixels: model(pixels, training=False), input_signature=spec)
    captured = {
        inner.name: outer
        for outer, inner in function.get_concrete_function().graph.captures
        if outer.dtype != tf.resource
    }
    proto, _ = tf2onnx.convert.from_function(function, input_signature=spec, opset=17)
    for graph_input in list(proto.graph.input):
        if graph_input.name in captured:
            proto.graph.initializer.append(
                numpy_helper.from_array(captured[graph_input.name].numpy(), graph_input.name)
            )
            proto.graph.input.remove(graph_input)
    extra = [i.name for i in proto.graph.input][1:]
    if extra:
        raise ExportError(f"the ONNX graph needs inputs besides the image: {extra}")
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))


def _percentiles(seconds: list[float], batch: int) -> dict[str, float]:
    values = np.asarray(seconds) * 1000.0
    return {
        "batch": batch,
        "runs": len(values),
        "p50_ms": round(float(np.percentile(values, 50)), 3),
        "p95_ms": round(float(np.percentile(values, 95)), 3),
        "p50_ms_per_image": round(float(np.percentile(values, 50)) / batch, 3),
        "p95_ms_per_image": round(float(np.percentile(values, 95)) / batch, 3),
    }


def verify_exports(folder: Path, examples: Path, latency_runs: int, max_images: int) -> dict[str, Any]:
    """Load each exported format with its own runtime and compare with the expected outputs.

    Runs in the fresh process (`verify` subcommand): nothing the export step built in memory
    is reachable from here, only the files. Requests hold at most `max_images`, the served
    model's own cap.
    """
    import tensorflow as tf

    data = np.load(examples, allow_pickle=False)
    ends = np.cumsum(data["lengths"])
    blob = data["blob"].tobytes()
    encoded = [blob[end - length : end] for end, length in zip(ends, data["lengths"], strict=True)]
    expected = data["probabilities"]
    expected_labels = [str(label) for label in data["labels"]]

    loaded = tf.saved_model.load(str(folder / SAVED_MODEL))
    serve = loaded.signatures["serving_default"]
    answers = [
        serve(**{INPUT_NAME: tf.constant(encoded[start : start + max_images], dtype=tf.string)})
        for start in range(0, len(encoded), max_images)
    ]
    probabilities = np.concatenate([answer["probabilities"].numpy() for answer in answers])
    labels = [label.decode() for answer in answers for label in answer["labels"].numpy()]
    result: dict[str, Any] = {
        "examples": int(len(expected)),
        "max_abs_difference": float(np.abs(probabilities - expected).max()),
        "labels_match": labels == expected_labels,
        "probabilities_dtype": str(probabilities.dtype),
        "signature_inputs": sorted(serve.structured_input_signature[1].keys()),
        "signature_outputs": sorted(serve.structured_outputs.keys()),
    }

    # CPU latency of the whole serving path (decode, resize, network) on raw bytes.
    latency = []
    for batch in sorted({min(batch, max_images) for batch in LATENCY_BATCHES}):
        inputs = tf.constant([encoded[i % len(encoded)] for i in range(batch)], dtype=tf.string)
        serve(**{INPUT_NAME: inputs})  # warm-up: the first call traces and plans
        times = []
        for _ in range(latency_runs):
            started = time.perf_counter()
            serve(**{INPUT_NAME: inputs})["probabilities"].numpy()
            times.append(time.perf_counter() - started)
        latency.append(_percentiles(times, batch))
    result["latency"] = {"cpu_cores": os.cpu_count(), "input": "encoded test records", "batches": latency}

    # LiteRT and ONNX take pixels: the records' images decoded as the trainer read them.
    pixels = np.stack(
        [tf.io.decode_image(e, channels=3, expand_animations=False).numpy() for e in encoded]
    ).astype(np.float32)
    litert = folder / "litert" / "model.tflite"
    if litert.is_file():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tf.lite.Interpreter's notice about ai_edge_litert
            interpreter = tf.lite.Interpreter(model_path=str(litert))
        source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
        interpreter.resize_tensor_input(source["index"], list(pixels.shape))
        interpreter.allocate_tensors()
        interpreter.set_tensor(source["index"], pixels)
        interpreter.invoke()
        got = interpreter.get_tensor(target["index"])
        result["litert"] = {
            "max_abs_difference": float(np.abs(got - expected).max()),
            "labels_match": bool((got.argmax(1) == expected.argmax(1)).all()),
        }
    onnx_file = folder / "onnx" / "model.onnx"
    if onnx_file.is_file():
        import onnxruntime

        session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: pixels})[0]
        result["onnx"] = {
            "max_abs_difference": float(np.abs(got - expected).max()),
            "labels_match": bool((got.argmax(1) == expected.argmax(1)).all()),
            "onnxruntime": onnxruntime.__version__,
        }
    return result


def model_card(
    info: dict[str, Any],
    train_summary: dict[str, Any],
    dataset: records.PreparedDataset,
    evaluation: dict[str, Any] | None,
    run_id: str,
    model_name: str,
) -> str:
    """The Markdown card stored with every version: what it is, what it was trained on, how good."""
    created = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    manifest = dataset.manifest
    lines = [
        f"# {model_name}",
        "",
        "EfficientNet-B0 image classifier, exported as a TensorFlow SavedModel "
        f"(`serving_default`: `{INPUT_NAME}` -> `probabilities`, `labels`).",
        "",
        f"- created: {created}",
        f"- pipeline run: {run_id or '(not run by a pipeline)'}",
        f"- data: `{manifest.get('source', '?')}`, fingerprint `{manifest.get('fingerprint', '?')}`",
        f"- images: {', '.join(f'{split} {dataset.count(split)}' for split in records.SPLITS)}",
        f"- image size: {info['image_size']} px, resize policy `{info['resize']}`",
        f"- classes ({len(info['classes'])}, output column order): "
        + ", ".join(f"`{name}`" for name in info["classes"]),
        f"- formats: saved_model{''.join(', ' + f for f in info['formats'])}",
        "",
    ]
    if evaluation:
        candidate, decision = evaluation["candidate"], evaluation["decision"]
        k = candidate["top_k"]
        lines += [
            "## Test metrics",
            "",
            f"- accuracy {candidate['accuracy']:.4f}, top-{k} {candidate[f'top_{k}_accuracy']:.4f}, "
            f"macro F1 {candidate['macro_f1']:.4f}, expected calibration error "
            f"{candidate['expected_calibration_error']:.4f} on {candidate['examples']} images",
            f"- blessing: {'blessed' if decision['blessed'] else 'NOT blessed'}: "
            + "; ".join(decision["reasons"]),
            "",
            "Full report: `evaluation/report.md`.",
            "",
        ]
    verification = info["verification"]
    lines += [
        "## Verification",
        "",
        f"- reloaded in a fresh process: max |difference| {verification['max_abs_difference']:.2e} "
        f"on {verification['examples']} test images (tolerance {verification['tolerance']})",
    ]
    for row in verification["latency"]["batches"]:
        lines.append(
            f"- CPU latency, batch {row['batch']}: p50 {row['p50_ms']:.1f} ms, "
            f"p95 {row['p95_ms']:.1f} ms "
            f"({verification['latency']['cpu_cores']} cores)"
        )
    config = train_summary.get("config", {})
    lines += [
        "",
        "## Training",
        "",
        "```json",
        json.dumps(
            {
                key: train_summary.get(key)
                for key in (
                    "precision",
                    "step_batch",
                    "accumulation",
                    "effective_batch",
                    "epochs_trained",
                    "best_epoch",
                    "best_val_accuracy",
                    "learning_rate",
                    "gpu",
                    "keras_version",
                    "backend",
                )
            }
            | {"weights": config.get("weights"), "epochs": config.get("epochs"), "seed": config.get("seed")},
            indent=2,
        ),
        "```",
        "",
    ]
    return "\n".join(lines)


def _check_blessed(evaluation: dict[str, Any] | None) -> None:
    if evaluation is None:
        raise ExportError(
            "pushing to the registry needs --evaluation (the output of evaluate): only a "
            "blessed model may become a version"
        )
    decision = evaluation["decision"]
    if not decision["blessed"]:
        raise ExportError(
            "evaluate did not bless this model, so it is not pushed: " + "; ".join(decision["reasons"])
        )


def export(config: ExportConfig) -> dict[str, Any]:
    model_registry.record_step(config.registry, config.model_name, config.run_id, "export", "started")
    unknown = sorted(set(config.formats) - set(FORMATS))
    if unknown:
        raise ExportError(f"unknown export format(s) {unknown}; choose from {list(FORMATS)}")
    evaluation = None
    if config.evaluation is not None:
        path = config.evaluation / "evaluation.json"
        if not path.is_file():
            raise ExportError(f"{config.evaluation} holds no evaluation.json: pass evaluate's output folder")
        evaluation = json.loads(path.read_text())
    if config.registry:
        _check_blessed(evaluation)
        try:
            model_registry.Registry(config.registry, config.model_name)  # checks the URI and name now
        except model_registry.RegistryError as error:
            raise ExportError(str(error)) from None
    try:
        dataset = records.load(config.data, verify=False)
        model, summary = load_trained(config.model)
    except (records.DatasetError, ModelError) as error:
        raise ExportError(str(error)) from None
    classes, image_size = summary["classes"], summary["image_size"]
    resize_policy = summary.get("resize", "stretch")

    if config.output.exists():
        shutil.rmtree(config.output)  # a re-run must not mix files of two exports
    config.output.mkdir(parents=True)
    write_saved_model(
        model,
        classes,
        image_size,
        config.output / SAVED_MODEL,
        resize_policy,
        max_pixels=config.max_pixels,
        max_images=config.max_images,
    )
    log.info("wrote SavedModel to %s", config.output / SAVED_MODEL)
    if "litert" in config.formats:
        write_litert(model, config.output / "litert" / "model.tflite")
        log.info("wrote LiteRT model to %s", config.output / "litert")
    if "onnx" in config.formats:
        write_onnx(model, image_size, config.output / "onnx" / "model.onnx")
        log.info("wrote ONNX model to %s", config.output / "onnx")

    encoded, pixels = test_examples(dataset, config.verify_examples)
    expected = np.asarray(model.predict_on_batch(pixels), dtype=np.float32)
    with tempfile.TemporaryDirectory() as scratch:
        examples = Path(scratch) / "examples.npz"
        # Images as one byte blob plus lengths: numpy's fixed-width bytes type would strip
        # trailing zero bytes, and pickled arrays are refused on load.
        np.savez(
            examples,
            blob=np.frombuffer(b"".join(encoded), dtype=np.uint8),
            lengths=np.array([len(e) for e in encoded], dtype=np.int64),
            probabilities=expected,
            labels=np.array([classes[i] for i in expected.argmax(axis=1)]),
        )
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "components.export",
                "verify",
                "--folder",
                str(config.output),
                "--examples",
                str(examples),
                "--latency-runs",
                str(config.latency_runs),
                "--max-images",
                str(config.max_images),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
    if result.returncode != 0:
        raise ExportError(f"reloading the exported model in a fresh process failed:\n{result.stderr[-3000:]}")
    verification = json.loads(result.stdout.strip().splitlines()[-1])
    verification["tolerance"] = config.tolerance
    failures = []
    if not verification["labels_match"] or verification["max_abs_difference"] > config.tolerance:
        failures.append(
            f"saved_model: max |difference| {verification['max_abs_difference']:.2e}, "
            f"labels match: {verification['labels_match']}"
        )
    for fmt in config.formats:
        check = verification[fmt]
        if not check["labels_match"] or check["max_abs_difference"] > config.tolerance:
            failures.append(
                f"{fmt}: max |difference| {check['max_abs_difference']:.2e}, "
                f"labels match: {check['labels_match']}"
            )
    verification["passed"] = not failures
    info = {
        "classes": classes,
        "image_size": image_size,
        "resize": resize_policy,
        "input": INPUT_NAME,
        "outputs": ["probabilities", "labels"],
        "formats": list(config.formats),
        "max_pixels": config.max_pixels,
        "max_images_per_request": config.max_images,
        "verification": verification,
    }
    (config.output / SAVED_MODEL / INFO).write_text(json.dumps(info, indent=2) + "\n")
    if failures:
        raise ExportError("the reloaded export disagrees with the Keras model: " + "; ".join(failures))
    batch1 = verification["latency"]["batches"][0]
    log.info(
        "verified in a fresh process: %d examples, max |difference| %.2e, labels match%s; "
        "CPU latency at batch 1: p50 %.1f ms, p95 %.1f ms",
        verification["examples"],
        verification["max_abs_difference"],
        "".join(
            f"; {f} max |difference| {verification[f]['max_abs_difference']:.2e}" for f in config.formats
        ),
        batch1["p50_ms"],
        batch1["p95_ms"],
    )

    if config.evaluation is not None:
        shutil.copytree(config.evaluation, config.output / "evaluation")
    (config.output / "model_card.md").write_text(
        model_card(info, summary, dataset, evaluation, config.run_id, config.model_name)
    )

    if config.registry:
        registry = model_registry.Registry(config.registry, config.model_name)
        candidate = evaluation["candidate"]
        metadata = {
            "run_id": config.run_id,
            "classes": classes,
            "image_size": image_size,
            "data_fingerprint": dataset.manifest.get("fingerprint"),
            "formats": list(config.formats),
            "metrics": {
                key: candidate[key]
                for key in ("accuracy", "macro_f1", "expected_calibration_error", "examples")
            },
            "blessing": evaluation["decision"],
        }
        # Promoted only over the version evaluate compared against (an evaluation from before
        # this check has no record of it, and is promoted over whatever serves).
        seen = evaluation.get("production_seen", model_registry.ANY)
        promoted = True
        try:
            version = registry.push(config.output, metadata)
            reason = "blessed: " + "; ".join(evaluation["decision"]["reasons"])
            try:
                registry.promote(version, reason, if_production_is=seen)
            except model_registry.RegistryMoved as moved:
                log.warning("%s", moved)
                promoted = False
        except model_registry.RegistryError as error:
            raise ExportError(f"pushing to the registry failed: {error}") from None
        info["registry"] = {
            "uri": config.registry,
            "model": config.model_name,
            "version": version,
            "promoted": promoted,
        }
        model_registry.record_step(
            config.registry,
            config.model_name,
            config.run_id,
            "export",
            "succeeded",
            version=version,
            promoted=promoted,
            formats=list(config.formats),
        )
    return info


def build_parser() -> argparse.ArgumentParser:
    defaults = ExportConfig(model=Path(), data=Path(), output=Path())
    parser = argparse.ArgumentParser(
        prog="python -m components.export",
        description="Export a trained model, verify it after reload, and push it to the model registry.",
    )
    parser.add_argument("--model", type=local_path, help="output folder of train")
    parser.add_argument("--data", type=local_path, help="output folder of preprocess (for verification)")
    parser.add_argument("--output", type=local_path, help="folder for the exported model (replaced)")
    parser.add_argument(
        "--evaluation",
        type=local_path,
        default=None,
        help="output folder of evaluate: its report goes with the model; needed to push",
    )
    parser.add_argument(
        "--formats",
        default="",
        help=f"comma-separated extra formats: {', '.join(FORMATS)} (SavedModel always)",
    )
    parser.add_argument(
        "--registry",
        default="",
        help="push to this registry (s3://bucket[/prefix], minio://... or a folder) and, "
        "if blessed, make it production",
    )
    parser.add_argument("--model-name", default=defaults.model_name)
    parser.add_argument("--run-id", default="")
    parser.add_argument("--verify-examples", type=int, default=defaults.verify_examples)
    parser.add_argument("--tolerance", type=float, default=defaults.tolerance)
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=defaults.max_pixels,
        help="the served model refuses an image declaring more pixels (width x height x GIF frames)",
    )
    parser.add_argument(
        "--max-images",
        type=int,
        default=defaults.max_images,
        help="the served model's cap on images per request",
    )
    parser.add_argument("--latency-runs", type=int, default=defaults.latency_runs)
    subcommands = parser.add_subparsers(dest="command")
    verify = subcommands.add_parser("verify", help="reload an export and compare (internal)")
    verify.add_argument("--folder", type=Path, required=True)
    verify.add_argument("--examples", type=Path, required=True)
    verify.add_argument("--latency-runs", type=int, default=defaults.latency_runs)
    verify.add_argument("--max-images", type=int, default=defaults.max_images)
    return parser


def parse_formats(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging()
    if args.command == "verify":
        print(json.dumps(verify_exports(args.folder, args.examples, args.latency_runs, args.max_images)))
        return 0
    missing = [flag for flag in ("model", "data", "output") if getattr(args, flag) is None]
    if missing:
        parser.error("the following arguments are required: " + ", ".join(f"--{m}" for m in missing))
    with exit_on_user_error(ExportError):
        info = export(
            ExportConfig(
                model=args.model,
                data=args.data,
                output=args.output,
                evaluation=args.evaluation,
                formats=parse_formats(args.formats),
                registry=args.registry,
                model_name=args.model_name,
                run_id=args.run_id,
                verify_examples=args.verify_examples,
                tolerance=args.tolerance,
                latency_runs=args.latency_runs,
                max_pixels=args.max_pixels,
                max_images=args.max_images,
            )
        )
    if "registry" in info:
        state = "is in production" if info["registry"]["promoted"] else "is pushed, not promoted"
        print(f"{args.model_name} version {info['registry']['version']} {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
