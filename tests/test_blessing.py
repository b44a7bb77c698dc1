"""Blessing: only a model that is good enough, and not worse than production, is blessed."""

from __future__ import annotations

import pytest

from components.blessing import BlessingConfig, decide, summary_line


def metrics(accuracy: float, recalls: dict[str, float], support: int = 50) -> dict:
    return {
        "accuracy": accuracy,
        "per_class": {name: {"recall": recall, "support": support} for name, recall in recalls.items()},
    }


PRODUCTION = metrics(0.90, {"cat": 0.90, "dog": 0.90})
CONFIG = BlessingConfig(min_accuracy=0.5, margin=0.01, max_class_drop=0.10)


def failed(decision: dict) -> list[str]:
    return [check["check"] for check in decision["checks"] if not check["passed"]]


def test_better_than_production_is_blessed():
    decision = decide(metrics(0.93, {"cat": 0.92, "dog": 0.94}), PRODUCTION, CONFIG)
    assert decision["blessed"] and failed(decision) == []
    assert decision["basis"] == "compared with production on the same test images"


def test_equal_to_production_is_blessed():
    assert decide(metrics(0.90, {"cat": 0.90, "dog": 0.90}), PRODUCTION, CONFIG)["blessed"]


def test_slightly_worse_within_the_margin_is_blessed():
    decision = decide(metrics(0.89, {"cat": 0.88, "dog": 0.90}), PRODUCTION, CONFIG)
    assert decision["blessed"], decision


def test_worse_than_the_margin_is_not_blessed_and_says_by_how_much():
    decision = decide(metrics(0.85, {"cat": 0.85, "dog": 0.85}), PRODUCTION, CONFIG)
    assert not decision["blessed"]
    assert failed(decision) == ["margin"]
    assert decision["reasons"] == ["accuracy 0.8500 vs production 0.9000: worse than the margin of 0.0100"]
    assert summary_line(decision).startswith("NOT BLESSED: accuracy 0.8500 vs production 0.9000")


def test_one_class_collapsing_is_not_blessed_even_when_accuracy_holds():
    decision = decide(metrics(0.91, {"cat": 0.70, "dog": 1.00}), PRODUCTION, CONFIG)
    assert failed(decision) == ["max_class_drop"]
    assert "class 'cat': 0.9000 -> 0.7000" in decision["reasons"][0]


def test_first_run_uses_the_thresholds_alone():
    good = decide(metrics(0.80, {"cat": 0.8, "dog": 0.8}), None, CONFIG)
    assert good["blessed"] and [c["check"] for c in good["checks"]] == ["min_accuracy", "beats_majority"]
    assert "judged by the thresholds alone" in good["basis"]
    low = decide(metrics(0.40, {"cat": 0.4, "dog": 0.4}), None, CONFIG)
    assert failed(low) == ["min_accuracy", "beats_majority"]


def test_a_model_answering_the_majority_class_is_never_blessed():
    # 60 cats and 40 dogs: always answering "cat" scores 0.60, above min_accuracy 0.5.
    collapsed = {
        "accuracy": 0.60,
        "per_class": {"cat": {"recall": 1.0, "support": 60}, "dog": {"recall": 0.0, "support": 40}},
    }
    decision = decide(collapsed, None, CONFIG)
    assert failed(decision) == ["beats_majority"]


@pytest.mark.parametrize("margin, blessed", [(0.0, False), (0.02, True)])
def test_margin_is_configurable(margin, blessed):
    config = BlessingConfig(min_accuracy=0.0, margin=margin, max_class_drop=1.0)
    assert decide(metrics(0.885, {"cat": 0.9, "dog": 0.87}), PRODUCTION, config)["blessed"] is blessed
