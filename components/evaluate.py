"""evaluate: measure a trained model on the held-out test split.

    python -m components.evaluate --model /tmp/model --data /tmp/prepared --output /tmp/eval

Writes `<output>/metrics.json`: accuracy, top-k accuracy, per-class precision/recall/F1 and
support, macro averages, and the confusion matrix (rows: true class, columns: predicted).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from components import records

log = logging.getLogger(__name__)


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


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray, classes: list[str],
                           top_k: int) -> dict[str, Any]:
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
        per_class[name] = {"precision": float(precision), "recall": float(recall),
                           "f1": float(f1), "support": int(actual)}
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


def predict_split(model, dataset: records.PreparedDataset, split: str, batch_size: int):
    """(labels, probabilities) for every record of `split`, in file order."""
    import tensorflow as tf

    data = (records.read_split(dataset, split)
            .map(lambda image, label: (tf.cast(image, tf.float32), label))
            .batch(batch_size)
            .prefetch(tf.data.AUTOTUNE))
    labels, probabilities = [], []
    for images, batch_labels in data:
        probabilities.append(np.asarray(model.predict_on_batch(images), dtype=np.float32))
        labels.append(batch_labels.numpy())
    if not labels:
        return np.zeros((0,), np.int64), np.zeros((0, len(dataset.classes)), np.float32)
    return np.concatenate(labels).astype(np.int64), np.concatenate(probabilities)


def evaluate(config: EvaluateConfig) -> dict[str, Any]:
    from components.train import TrainError, load_trained

    try:
        dataset = records.load(config.data, verify=False)
        model, summary = load_trained(config.model)
    except (records.DatasetError, TrainError) as error:
        raise EvaluateError(str(error)) from None
    if summary["classes"] != dataset.classes:
        raise EvaluateError(f"the model was trained on classes {summary['classes']}, "
                            f"the data has {dataset.classes}")
    if dataset.count(config.split) == 0:
        raise EvaluateError(f"split {config.split!r} of {config.data} is empty: nothing to evaluate")
    labels, probabilities = predict_split(model, dataset, config.split, config.batch_size)
    metrics = classification_metrics(labels, probabilities, dataset.classes, config.top_k)
    metrics["split"] = config.split
    config.output.mkdir(parents=True, exist_ok=True)
    (config.output / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("%s accuracy %.4f (top-%d %.4f, macro F1 %.4f) on %d images", config.split,
             metrics["accuracy"], min(config.top_k, len(dataset.classes)),
             metrics[f"top_{min(config.top_k, len(dataset.classes))}_accuracy"], metrics["macro_f1"],
             metrics["examples"])
    return metrics


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m components.evaluate",
                                     description="Evaluate a trained model on held-out shards.")
    parser.add_argument("--model", type=Path, required=True, help="output folder of train")
    parser.add_argument("--data", type=Path, required=True, help="output folder of preprocess")
    parser.add_argument("--output", type=Path, required=True, help="folder for metrics.json")
    parser.add_argument("--split", choices=records.SPLITS, default="test")
    parser.add_argument("--top-k", type=int, default=EvaluateConfig.top_k)
    parser.add_argument("--batch-size", type=int, default=EvaluateConfig.batch_size)
    return parser


def main(argv: list[str] | None = None) -> int:
    from components.cli import configure_logging, exit_on_user_error

    args = build_parser().parse_args(argv)
    configure_logging()
    with exit_on_user_error(EvaluateError):
        evaluate(EvaluateConfig(**vars(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
