"""evaluate: metrics checked against hand-computed values, and a real run on a trained model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from components.evaluate import EvaluateConfig, EvaluateError, classification_metrics, evaluate


def test_metrics_match_a_hand_computed_case():
    # true:      a  a  b  c
    # predicted: a  b  b  a   (top-2 adds the second-highest column)
    labels = np.array([0, 0, 1, 2])
    probabilities = np.array([
        [0.7, 0.2, 0.1],
        [0.4, 0.5, 0.1],
        [0.1, 0.8, 0.1],
        [0.5, 0.1, 0.4],
    ])
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


@pytest.mark.slow
def test_evaluates_a_trained_model(trained_model, prepared_dataset, tmp_path):
    metrics = evaluate(EvaluateConfig(model=trained_model, data=prepared_dataset, output=tmp_path / "eval"))
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["accuracy"] == metrics["accuracy"]
    assert metrics["examples"] == 8  # 4 classes x round(12 images x 0.2)
    assert np.sum(metrics["confusion_matrix"]) == 8
    assert 0.0 <= metrics["accuracy"] <= metrics["top_3_accuracy"] <= 1.0
