"""evaluate: measure a trained model on the held-out test split and decide whether it is blessed.

    python -m components.evaluate --model /tmp/model --data /tmp/prepared --output /tmp/eval \
        [--registry s3://models --model-name flowers] [--min-accuracy 0.8] [--margin 0.01]

Writes into `<output>`:
    evaluation.json       everything: the candidate's accuracy, top-k, macro and per-class
                          precision/recall/F1, confusion matrix, expected calibration error,
                          most-confused class pairs; the production model's metrics on the same
                          images; the blessing decision with every check and its numbers
    report.md             the same for people, with the confusion matrix, the reliability
                          diagram and example images
    confusion_matrix.png
    reliability_diagram.png  accuracy against confidence per bin (what the ECE sums up)

With `--registry`, the production model (`components.registry`) is downloaded (every file
checked against its manifest) and run through its own serving signature on the same encoded
test images in the same step, so both models are scored on identical inputs.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from components import blessing, records, registry, report
from components.cli import configure_logging, exit_on_user_error, local_path
from components.model import ModelError, load_trained

log = logging.getLogger(__name__)

EVALUATION = "evaluation.json"
REPORT = "report.md"
CONFUSION_PNG = "confusion_matrix.png"
RELIABILITY_PNG = "reliability_diagram.png"


class EvaluateError(ValueError):
    """The model or the data cannot be evaluated; the message says why."""


@dataclass(frozen=True)
class EvaluateConfig:
    model: Path  # output folder of train
    data: Path  # output folder of preprocess
    output: Path
    split: str = "test"
    top_k: int = 3  # also reported: top-1 alone hides "right class, second guess"
    batch_size: int = 64
    registry: str = ""  # s3://bucket[/prefix], minio://... or a folder; "" = no production comparison
    model_name: str = "image-classifier"
    min_accuracy: float = blessing.BlessingConfig.min_accuracy
    margin: float = blessing.BlessingConfig.margin
    max_class_drop: float = blessing.BlessingConfig.max_class_drop
    calibration_bins: int = 15  # the usual choice in the calibration literature (Guo et al. 2017)
    confused_pairs: int = 5
    examples_per_pair: int = 3
    run_id: str = ""  # the pipeline run: its decision is recorded in the registry for the exit handler

    def blessing(self) -> blessing.BlessingConfig:
        return blessing.BlessingConfig(
            min_accuracy=self.min_accuracy, margin=self.margin, max_class_drop=self.max_class_drop
        )


def classification_metrics(
    labels: np.ndarray, probabilities: np.ndarray, classes: list[str], top_k: int
) -> dict[str, Any]:
    """Plain-numpy metrics so they can be checked by hand on a 3-example case."""
    predicted = probabilities.argmax(axis=1)
    n = len(classes)
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    k = min(top_k, n)
    top = np.argsort(-probabilities, axis=1)[:, :k]
    per_class = {}
    for index, name in enumerate(classes):
        true_positive = confusion[index, index]
        predicted_as = confusion[:, index].sum()
        actual = confusion[index, :].sum()
        precision = true_positive / predicted_as if predicted_as else 0.0
        recall = true_positive / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {
            "precision": float(precision),
            "recall": float(recall),
            "f1": float(f1),
            "support": int(actual),
        }
    return {
        "examples": int(len(labels)),
        "accuracy": float((predicted == labels).mean()) if len(labels) else 0.0,
        f"top_{k}_accuracy": float((top == labels[:, None]).any(axis=1).mean()) if len(labels) else 0.0,
        "macro_precision": float(np.mean([c["precision"] for c in per_class.values()])),
        "macro_recall": float(np.mean([c["recall"] for c in per_class.values()])),
        "macro_f1": float(np.mean([c["f1"] for c in per_class.values()])),
        "per_class": per_class,
        "classes": classes,
        "confusion_matrix": confusion.tolist(),
    }


def calibration(labels: np.ndarray, probabilities: np.ndarray, bins: int) -> dict[str, Any]:
    """Expected calibration error: the gap between confidence and accuracy, averaged over
    equal-width confidence bins weighted by how many predictions fall in each."""
    confidence = probabilities.max(axis=1) if len(labels) else np.zeros(0)
    correct = probabilities.argmax(axis=1) == labels if len(labels) else np.zeros(0, bool)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    table, error = [], 0.0
    for b in range(bins):
        members = which == b
        count = int(members.sum())
        if count:
            gap = abs(float(correct[members].mean()) - float(confidence[members].mean()))
            error += gap * count / len(labels)
            table.append(
                {
                    "low": float(edges[b]),
                    "high": float(edges[b + 1]),
                    "count": count,
                    "accuracy": float(correct[members].mean()),
                    "confidence": float(confidence[members].mean()),
                }
            )
    return {"expected_calibration_error": float(error), "bins": bins, "table": table}


def confused_pairs(confusion: np.ndarray, classes: list[str], limit: int) -> list[dict[str, Any]]:
    """The `limit` largest off-diagonal cells: which class is most often taken for which."""
    off = confusion.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:limit]
    pairs = []
    for flat in order:
        true, predicted = np.unravel_index(flat, off.shape)
        count = int(off[true, predicted])
        if count == 0:
            break
        support = int(confusion[true].sum())
        pairs.append(
            {
                "true": classes[true],
                "predicted": classes[predicted],
                "count": count,
                "support": support,
                "share": count / support,
            }
        )
    return pairs


def full_metrics(
    labels: np.ndarray, probabilities: np.ndarray, classes: list[str], config: EvaluateConfig
) -> dict[str, Any]:
    metrics = classification_metrics(labels, probabilities, classes, config.top_k)
    metrics["top_k"] = min(config.top_k, len(classes))
    metrics["split"] = config.split
    ece = calibration(labels, probabilities, config.calibration_bins)
    metrics["expected_calibration_error"] = ece.pop("expected_calibration_error")
    metrics["calibration"] = ece
    metrics["confused_pairs"] = confused_pairs(
        np.asarray(metrics["confusion_matrix"]), classes, config.confused_pairs
    )
    return metrics


class ProductionModel:
    """The registry's production SavedModel, called through its own serving signature."""

    def __init__(self, folder: Path, manifest: dict[str, Any], classes: list[str]):
        import tensorflow as tf

        info = json.loads((folder / "export_info.json").read_text())
        self.version = manifest["version"]
        self.classes = info["classes"]
        self.image_size = info["image_size"]
        self.comparable = sorted(self.classes) == sorted(classes)
        # Columns of the production output, in the candidate's class order.
        self.columns = [self.classes.index(name) for name in classes] if self.comparable else []
        self.serve = None
        if self.comparable:
            self.serve = tf.saved_model.load(str(folder)).signatures["serving_default"]

    def predict(self, encoded) -> np.ndarray:
        probabilities = self.serve(image_bytes=encoded)["probabilities"].numpy()
        return probabilities[:, self.columns]


@dataclass
class Production:
    """What evaluate found in the registry: the model to score (None when there is none or it
    cannot be scored on these labels), a note saying so, the version that served when it
    looked (export promotes only if production is still that one), and its scratch folder."""

    model: ProductionModel | None
    note: str
    seen: int | None = None
    folder: Path | None = None


def load_production(config: EvaluateConfig, classes: list[str]) -> Production:
    if not config.registry:
        return Production(None, "no registry given: judged by the thresholds alone")
    try:
        fetched = registry.fetch_production(config.registry, config.model_name)
    except registry.RegistryError as error:
        raise EvaluateError(f"cannot read the production model from the registry: {error}") from None
    if fetched is None:
        return Production(
            None,
            f"{config.model_name} has no production version in {config.registry} yet (first run): "
            "judged by the thresholds alone",
        )
    folder, manifest = fetched
    production = ProductionModel(folder, manifest, classes)
    if not production.comparable:
        note = (
            f"production version {production.version} was trained on classes {production.classes}, "
            f"the test data has {classes}: it cannot be scored on these labels, so the candidate is "
            "judged by the thresholds alone"
        )
        return Production(None, note, production.version, folder)
    note = f"production version {production.version}, scored on the same test images"
    return Production(production, note, production.version, folder)


def predict(
    model, production: ProductionModel | None, dataset: records.PreparedDataset, split: str, batch_size: int
):
    """(labels, candidate probabilities, production probabilities or None, sources), file order.

    The candidate gets the decoded pixels it was trained on; production gets the encoded bytes,
    as a client would send them, through its serving signature.
    """
    import tensorflow as tf

    def parse(serialized):
        example = records.parse_example(serialized)
        return example["image/encoded"], example["image/class/label"], example["image/source"]

    def decode(encoded):
        return records.decode_image(encoded, dataset.image_size)

    data = tf.data.TFRecordDataset(dataset.files(split)).map(parse).batch(batch_size)
    labels, candidate, baseline, sources = [], [], [], []
    for encoded, batch_labels, batch_sources in data:
        pixels = tf.cast(tf.map_fn(decode, encoded, fn_output_signature=tf.uint8), tf.float32)
        candidate.append(np.asarray(model.predict_on_batch(pixels), dtype=np.float32))
        if production is not None:
            baseline.append(production.predict(encoded))
        labels.append(batch_labels.numpy())
        sources.extend(s.decode() for s in batch_sources.numpy())
    return (
        np.concatenate(labels).astype(np.int64),
        np.concatenate(candidate),
        np.concatenate(baseline) if production is not None else None,
        sources,
    )


def pair_examples(
    dataset: records.PreparedDataset,
    split: str,
    labels: np.ndarray,
    probabilities: np.ndarray,
    sources: list[str],
    pairs: list[dict[str, Any]],
    per_pair: int,
) -> dict[tuple[str, str], list]:
    """Up to `per_pair` misclassified images of each confused pair, most confident mistakes first."""
    import tensorflow as tf

    classes = dataset.classes
    predicted = probabilities.argmax(axis=1)
    wanted: dict[int, tuple[str, str]] = {}
    for pair in pairs:
        t, p = classes.index(pair["true"]), classes.index(pair["predicted"])
        hits = np.flatnonzero((labels == t) & (predicted == p))
        hits = hits[np.argsort(-probabilities[hits, p], kind="stable")][:per_pair]
        for index in hits:
            wanted[int(index)] = (pair["true"], pair["predicted"])
    examples: dict[tuple[str, str], list] = {}
    if not wanted:
        return examples
    for index, serialized in enumerate(tf.data.TFRecordDataset(dataset.files(split))):
        if index in wanted:
            encoded = records.parse_example(serialized)["image/encoded"].numpy()
            examples.setdefault(wanted[index], []).append(
                {
                    "index": index,
                    "source": sources[index],
                    "confidence": float(probabilities[index, predicted[index]]),
                    "thumbnail": report.thumbnail_jpeg(encoded),
                }
            )
        if index >= max(wanted):
            break
    for items in examples.values():
        items.sort(key=lambda e: -e["confidence"])
    return examples


def evaluate(config: EvaluateConfig) -> dict[str, Any]:
    registry.record_step(config.registry, config.model_name, config.run_id, "evaluate", "started")
    try:
        dataset = records.load(config.data, verify=False)
        model, summary = load_trained(config.model)
    except (records.DatasetError, ModelError) as error:
        raise EvaluateError(str(error)) from None
    if summary["classes"] != dataset.classes:
        raise EvaluateError(
            f"the model was trained on classes {summary['classes']}, the data has {dataset.classes}"
        )
    if dataset.count(config.split) == 0:
        raise EvaluateError(f"split {config.split!r} of {config.data} is empty: nothing to evaluate")

    found = load_production(config, dataset.classes)
    production, note, scratch = found.model, found.note, found.folder
    try:
        labels, probabilities, baseline, sources = predict(
            model, production, dataset, config.split, config.batch_size
        )
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    candidate = full_metrics(labels, probabilities, dataset.classes, config)
    production_result: dict[str, Any] | None = None
    if production is not None:
        production_result = {
            "version": production.version,
            "note": note,
            "image_size": production.image_size,
            "metrics": full_metrics(labels, baseline, dataset.classes, config),
        }
        if production.image_size != dataset.image_size:
            production_result["note"] += (
                f" (it resizes the {dataset.image_size} px test images to its own {production.image_size} px)"
            )
    elif config.registry:
        production_result = {"version": None, "note": note, "metrics": None}
    decision = blessing.decide(
        candidate,
        production_result["metrics"] if production_result else None,
        config.blessing(),
        production_note=note,
    )
    evaluation = {
        "candidate": candidate,
        "production": production_result,
        "decision": decision,
        "thresholds": asdict(config.blessing()),
        "model_name": config.model_name,
        "registry": config.registry,
        "data_fingerprint": dataset.manifest.get("fingerprint"),
    }
    if config.registry:
        evaluation["production_seen"] = found.seen  # None: no production when evaluate looked

    config.output.mkdir(parents=True, exist_ok=True)
    png = report.confusion_png(candidate["confusion_matrix"], dataset.classes)
    (config.output / CONFUSION_PNG).write_bytes(png)
    examples = pair_examples(
        dataset,
        config.split,
        labels,
        probabilities,
        sources,
        candidate["confused_pairs"],
        config.examples_per_pair,
    )
    calibrated = candidate["calibration"]
    reliability = report.reliability_png(calibrated["table"], calibrated["bins"])
    (config.output / RELIABILITY_PNG).write_bytes(reliability)
    markdown = report.markdown(evaluation, png, examples, reliability)
    (config.output / REPORT).write_text(markdown)
    (config.output / EVALUATION).write_text(json.dumps(evaluation, indent=2) + "\n")

    k = candidate["top_k"]
    log.info(
        "%s accuracy %.4f (top-%d %.4f, macro F1 %.4f, ECE %.4f) on %d images",
        config.split,
        candidate["accuracy"],
        k,
        candidate[f"top_{k}_accuracy"],
        candidate["macro_f1"],
        candidate["expected_calibration_error"],
        candidate["examples"],
    )
    if production is not None:
        log.info(
            "production version %s on the same images: accuracy %.4f",
            production.version,
            production_result["metrics"]["accuracy"],
        )
    log.info("%s", blessing.summary_line(decision))
    registry.record(config.registry, config.model_name, config.run_id, REPORT, markdown.encode())
    registry.record_step(
        config.registry, config.model_name, config.run_id, "evaluate", "succeeded", evaluation=evaluation
    )
    return evaluation


def build_parser() -> argparse.ArgumentParser:
    defaults = EvaluateConfig(model=Path(), data=Path(), output=Path())
    parser = argparse.ArgumentParser(
        prog="python -m components.evaluate",
        description="Evaluate a trained model on held-out shards and decide "
        "whether it may replace production.",
    )
    parser.add_argument("--model", type=local_path, required=True, help="output folder of train")
    parser.add_argument("--data", type=local_path, required=True, help="output folder of preprocess")
    parser.add_argument(
        "--output", type=local_path, required=True, help="folder for evaluation.json and report.md"
    )
    parser.add_argument("--split", choices=records.SPLITS, default=defaults.split)
    parser.add_argument("--top-k", type=int, default=defaults.top_k)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument(
        "--registry",
        default="",
        help="model registry holding the production model to compare with "
        "(s3://bucket[/prefix], minio://... or a folder)",
    )
    parser.add_argument("--model-name", default=defaults.model_name, help="model name in the registry")
    parser.add_argument("--min-accuracy", type=float, default=defaults.min_accuracy)
    parser.add_argument(
        "--margin",
        type=float,
        default=defaults.margin,
        help="bless only if accuracy >= production accuracy - margin",
    )
    parser.add_argument(
        "--max-class-drop",
        type=float,
        default=defaults.max_class_drop,
        help="largest allowed fall of one class's recall against production",
    )
    parser.add_argument(
        "--run-id",
        default="",
        help="the pipeline run: the decision and report are recorded under <registry>/<model>/runs/<run-id>/",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    with exit_on_user_error(EvaluateError):
        evaluate(EvaluateConfig(**vars(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
