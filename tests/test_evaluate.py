"""evaluate: metrics checked against hand-computed values, and a real run on a trained model."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from components.evaluate import (
    EvaluateConfig,
    EvaluateError,
    calibration,
    classification_metrics,
    confused_pairs,
    evaluate,
)


def test_metrics_match_a_hand_computed_case():
    # true:      a  a  b  c
    # predicted: a  b  b  a   (top-2 adds the second-highest column)
    labels = np.array([0, 0, 1, 2])
    probabilities = np.array(
        [
            [0.7, 0.2, 0.1],
            [0.4, 0.5, 0.1],
            [0.1, 0.8, 0.1],
            [0.5, 0.1, 0.4],
        ]
    )
    metrics = classification_metrics(labels, probabilities, ["a", "b", "c"], top_k=2)

    assert metrics["accuracy"] == pytest.approx(0.5)
    assert metrics["top_2_accuracy"] == pytest.approx(1.0)
    assert metrics["confusion_matrix"] == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]
    assert metrics["per_class"]["a"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert metrics["per_class"]["b"]["precision"] == pytest.approx(0.5)
    assert metrics["per_class"]["b"]["recall"] == pytest.approx(1.0)
    assert metrics["per_class"]["b"]["f1"] == pytest.approx(2 / 3)
    assert metrics["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert metrics["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 0.0) / 3)


def test_top_k_is_capped_at_the_number_of_classes():
    metrics = classification_metrics(np.array([1]), np.array([[0.6, 0.4]]), ["a", "b"], top_k=5)
    assert metrics["top_2_accuracy"] == 1.0


def test_missing_model_is_a_clear_error(tmp_path, prepared_dataset):
    with pytest.raises(EvaluateError, match="holds no model.keras"):
        evaluate(EvaluateConfig(model=tmp_path / "none", data=prepared_dataset, output=tmp_path / "e"))


def test_expected_calibration_error_by_hand():
    # Two bins (0-0.5, 0.5-1]: confidences 0.9, 0.8 (one right) and 0.6 (right), 0.4 (wrong).
    probabilities = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.4, 0.6]])
    labels = np.array([0, 1, 0, 1])
    # Confidence is the max probability: 0.9, 0.8, 0.6, 0.6 -> all in the upper bin.
    # Predictions 0, 0, 0, 1: correct, wrong, correct, correct -> accuracy 0.75.
    # ECE = |0.75 - mean(0.9, 0.8, 0.6, 0.6)| = |0.75 - 0.725| = 0.025.
    result = calibration(labels, probabilities, bins=2)
    assert result["expected_calibration_error"] == pytest.approx(0.025)
    assert result["table"] == [
        {"low": 0.5, "high": 1.0, "count": 4, "accuracy": 0.75, "confidence": pytest.approx(0.725)}
    ]


def test_a_perfectly_calibrated_model_has_zero_error():
    probabilities = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert calibration(np.array([0, 1]), probabilities, 15)["expected_calibration_error"] == 0.0


def test_confused_pairs_are_the_largest_off_diagonal_cells():
    confusion = np.array([[5, 3, 0], [1, 6, 0], [0, 4, 2]])
    pairs = confused_pairs(confusion, ["a", "b", "c"], limit=2)
    assert [(p["true"], p["predicted"], p["count"]) for p in pairs] == [("c", "b", 4), ("a", "b", 3)]
    assert pairs[0]["share"] == pytest.approx(4 / 6)
    assert confused_pairs(np.eye(3, dtype=int), ["a", "b", "c"], limit=5) == []


@pytest.mark.slow
def test_evaluates_a_trained_model(trained_model, prepared_dataset, tmp_path):
    result = evaluate(EvaluateConfig(model=trained_model, data=prepared_dataset, output=tmp_path / "eval"))
    written = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    metrics = result["candidate"]
    assert written["candidate"]["accuracy"] == metrics["accuracy"]
    manifest = json.loads((prepared_dataset / "manifest.json").read_text())
    test_count = sum(shard["records"] for shard in manifest["shards"]["test"])
    assert metrics["examples"] == test_count
    assert np.sum(metrics["confusion_matrix"]) == test_count
    assert 0.0 <= metrics["accuracy"] <= metrics["top_3_accuracy"] <= 1.0
    assert 0.0 <= metrics["expected_calibration_error"] <= 1.0
    assert written["decision"]["blessed"] == result["decision"]["blessed"]
    assert "production_seen" not in written  # no registry, nothing to be conditional on
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "## Confusion matrix" in report and "data:image/png;base64," in report
    assert (tmp_path / "eval" / "confusion_matrix.png").read_bytes().startswith(b"\x89PNG")
    reliability = (tmp_path / "eval" / "reliability_diagram.png").read_bytes()
    assert reliability.startswith(b"\x89PNG")
    assert f"![reliability diagram](data:image/png;base64,{base64.b64encode(reliability).decode()})" in report
    for pair in metrics["confused_pairs"]:
        assert f"**{pair['true']}** taken for **{pair['predicted']}**" in report


@pytest.mark.slow
def test_production_is_scored_through_its_serving_signature_on_the_same_images(
    trained_model, prepared_dataset, tmp_path, s3_env
):
    """The same model, once as the Keras candidate and once as the exported production
    SavedModel in an S3 registry, fed raw record bytes: identical scores, so the comparison is
    like for like."""
    import io

    from components import registry
    from components.export import ExportConfig, export

    s3_env.client().make_bucket("models")
    exported = tmp_path / "exported"
    export(ExportConfig(model=trained_model, data=prepared_dataset, output=exported, latency_runs=2))
    store = registry.Registry("s3://models/registry", "tiny")
    store.promote(store.push(exported, {}))

    config = EvaluateConfig(
        model=trained_model,
        data=prepared_dataset,
        output=tmp_path / "eval",
        registry="s3://models/registry",
        model_name="tiny",
    )
    result = evaluate(config)
    production = result["production"]
    assert production["version"] == 1
    # What export's promotion is conditional on: production as evaluate found it.
    assert json.loads((tmp_path / "eval" / "evaluation.json").read_text())["production_seen"] == 1
    assert production["metrics"]["confusion_matrix"] == result["candidate"]["confusion_matrix"]
    assert production["metrics"]["accuracy"] == result["candidate"]["accuracy"]
    assert [c["check"] for c in result["decision"]["checks"]] == [
        "min_accuracy",
        "beats_majority",
        "margin",
        "max_class_drop",
    ]
    margin = next(c for c in result["decision"]["checks"] if c["check"] == "margin")
    assert margin["passed"]  # equal to production is within any margin

    # A production file altered in the bucket: evaluation refuses to go on rather than skip it.
    key = "registry/tiny/1/saved_model/saved_model.pb"
    altered = s3_env.client().get_object("models", key).read() + b"\0"
    s3_env.client().put_object("models", key, io.BytesIO(altered), len(altered))
    with pytest.raises(EvaluateError, match="does not match its manifest"):
        evaluate(config)
