"""blessing: may a candidate model replace production? Plain functions over metric dicts.

Checks, each reported with its numbers whether it passed or not:

- `min_accuracy`: the candidate's test accuracy is at least this (always applied);
- `beats_majority`: it is better than always answering the most common test class, so a model
  that collapsed onto one class is never blessed, whatever `min_accuracy` says;
- with a production model evaluated on the same test images:
  `margin`: candidate accuracy >= production accuracy - margin;
  `max_class_drop`: no class's recall falls by more than this against production.

The first run (no production model) is judged by the first two alone. A production model
trained on other classes cannot be scored on these labels; that is reported, and the candidate
is judged by the first two (a class added or removed is a reason to retrain, not to block).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class BlessingConfig:
    min_accuracy: float = 0.0  # fraction of test images; 0 leaves only the majority-class check
    # 0.01 = one image in 100: test sets of a few hundred images move by more than that between
    # equally good models, so a smaller margin would reject retrains at random.
    margin: float = 0.01
    # A drop in one class's recall of more than 0.10 is a regression users notice even when
    # overall accuracy holds (the class-imbalance case).
    max_class_drop: float = 0.10


def _check(name: str, passed: bool, detail: str) -> dict[str, Any]:
    return {"check": name, "passed": bool(passed), "detail": detail}


def decide(
    candidate: dict[str, Any],
    production: dict[str, Any] | None,
    config: BlessingConfig,
    production_note: str = "",
) -> dict[str, Any]:
    """{"blessed": bool, "reasons": [...], "checks": [...]} for `candidate` metrics.

    `production`: the production model's metrics on the same test images (same class order),
    or None when there is none or it cannot be compared (`production_note` says why).
    """
    accuracy = candidate["accuracy"]
    supports = [c["support"] for c in candidate["per_class"].values()]
    majority = max(supports) / sum(supports) if sum(supports) else 0.0
    checks = [
        _check(
            "min_accuracy",
            accuracy >= config.min_accuracy,
            f"accuracy {accuracy:.4f} {'>=' if accuracy >= config.min_accuracy else '<'} "
            f"minimum {config.min_accuracy:.4f}",
        ),
        _check(
            "beats_majority",
            accuracy > majority,
            f"accuracy {accuracy:.4f} {'>' if accuracy > majority else '<='} {majority:.4f}, the share "
            "of the most common test class (what always answering it would score)",
        ),
    ]
    if production is not None:
        floor = production["accuracy"] - config.margin
        checks.append(
            _check(
                "margin",
                accuracy >= floor - 1e-12,
                f"accuracy {accuracy:.4f} vs production {production['accuracy']:.4f}: "
                f"{'within' if accuracy >= floor - 1e-12 else 'worse than'} "
                f"the margin of {config.margin:.4f}",
            )
        )
        drops = []
        for name, stats in candidate["per_class"].items():
            before = production["per_class"].get(name)
            if before is not None and stats["support"]:
                drops.append((before["recall"] - stats["recall"], name, before["recall"], stats["recall"]))
        worst = max(drops, default=(0.0, "", 0.0, 0.0))
        checks.append(
            _check(
                "max_class_drop",
                worst[0] <= config.max_class_drop + 1e-12,
                f"largest per-class recall drop {max(worst[0], 0.0):.4f}"
                + (f" (class {worst[1]!r}: {worst[2]:.4f} -> {worst[3]:.4f})" if worst[0] > 0 else "")
                + f", allowed {config.max_class_drop:.4f}",
            )
        )
    blessed = all(check["passed"] for check in checks)
    reasons = [check["detail"] for check in checks if not check["passed"]]
    if production is None:
        basis = production_note or "no production model yet: judged by the thresholds alone"
    else:
        basis = "compared with production on the same test images"
    return {
        "blessed": blessed,
        "basis": basis,
        "reasons": reasons or [f"every check passed ({basis})"],
        "checks": checks,
    }


def summary_line(decision: dict[str, Any]) -> str:
    verdict = "BLESSED" if decision["blessed"] else "NOT BLESSED"
    return f"{verdict}: " + "; ".join(decision["reasons"])
