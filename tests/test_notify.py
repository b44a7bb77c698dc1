"""The exit handler's summary (components/notify.py): built from the run's records in a real
registry (a folder, and moto's S3 server), posted over real HTTP to a local receiver standing in
for a Slack incoming webhook. The whole pipeline posting it is in tests/test_run_local.py."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from components import blessing, notify, registry
from tests.webhook_receiver import WebhookReceiver

REPO = Path(__file__).resolve().parent.parent
RUN = "efficientnet-retrain-2026-12-01-10-00-00-000001"


def per_class(recalls: dict[str, float]) -> dict:
    return {name: {"recall": recall, "support": 10} for name, recall in recalls.items()}


def evaluation(accuracy: float, production_accuracy: float | None) -> dict:
    candidate = {
        "accuracy": accuracy,
        "classes": ["cat", "dog"],
        "per_class": per_class({"cat": accuracy, "dog": accuracy}),
    }
    production = (
        {
            "accuracy": production_accuracy,
            "per_class": per_class({"cat": production_accuracy, "dog": production_accuracy}),
        }
        if production_accuracy is not None
        else None
    )
    decision = blessing.decide(candidate, production, blessing.BlessingConfig())
    return {
        "candidate": candidate,
        "production": {"version": 4, "metrics": production} if production else None,
        "decision": decision,
    }


def record(
    uri: str,
    run: str = RUN,
    *,
    evaluated: dict | None = None,
    evaluate_started: bool = False,
    export: str = "",
) -> None:
    if evaluate_started or evaluated:
        registry.record_step(uri, "pets", run, "evaluate", "started")
    if evaluated:
        registry.record_step(uri, "pets", run, "evaluate", "succeeded", evaluation=evaluated)
        registry.Registry(uri, "pets").record_run(run, notify.REPORT, b"# Evaluation\n")
    if export:
        registry.record_step(uri, "pets", run, "export", "started")
    if export == "succeeded":
        registry.record_step(uri, "pets", run, "export", "succeeded", version=5, promoted=True, formats=[])


def config(uri: str, status: str = "SUCCEEDED", url: str = "", **more) -> notify.NotifyConfig:
    return notify.NotifyConfig(
        status=status, run_name=RUN, registry=uri, model_name="pets", webhook_url=url, **more
    )


def test_a_blessed_run_posts_its_accuracy_decision_and_version_as_json_with_a_slack_text(tmp_path):
    uri = str(tmp_path / "registry")
    record(uri, evaluated=evaluation(0.95, 0.90), export="succeeded")
    with WebhookReceiver() as hook:
        summary = notify.notify(config(uri, url=hook.url, output=tmp_path / "out"))
    assert hook.received == [{key: value for key, value in summary.items() if key != "delivered"}]
    assert hook.content_types == ["application/json"]
    assert summary["delivered"] is True
    posted = hook.received[0]
    assert posted["run"] == RUN and posted["status"] == "SUCCEEDED" and posted["failed_step"] is None
    assert posted["blessed"] is True and posted["accuracy"] == 0.95 and posted["production_accuracy"] == 0.90
    assert posted["production_version_compared"] == 4
    assert posted["version_pushed"] == 5 and posted["promoted"] is True
    assert posted["reasons"] == ["every check passed (compared with production on the same test images)"]
    assert posted["text"].splitlines() == [
        f"retraining run {RUN} (pets): SUCCEEDED",
        "test accuracy 0.9500 vs production 0.9000 (version 4)",
        "BLESSED: every check passed (compared with production on the same test images)",
        "version 5 in production",
    ]
    assert json.loads((tmp_path / "out" / notify.SUMMARY).read_text()) == summary
    assert (tmp_path / "out" / notify.REPORT).read_text() == "# Evaluation\n"


def test_an_unblessed_run_says_why_and_that_production_is_unchanged(tmp_path):
    uri = str(tmp_path / "registry")
    record(uri, evaluated=evaluation(0.70, 0.90))
    with WebhookReceiver() as hook:
        notify.notify(config(uri, url=hook.url))
    posted = hook.received[0]
    assert posted["status"] == "SUCCEEDED" and posted["blessed"] is False and posted["version_pushed"] is None
    assert "accuracy 0.7000 vs production 0.9000: worse than the margin" in posted["text"]
    assert posted["text"].splitlines()[-1] == "not exported: production unchanged"


@pytest.mark.parametrize(
    ("records", "step"),
    [
        ({}, "fingerprint, preprocess or train"),
        ({"evaluate_started": True}, "evaluate"),
        ({"evaluated": evaluation(0.95, None), "export": "started"}, "export"),
        ({"evaluated": evaluation(0.95, None)}, "export"),  # its pod never started
    ],
)
def test_a_failed_run_names_the_step_it_failed_in_from_the_records(tmp_path, records, step):
    uri = str(tmp_path / "registry")
    record(uri, **records)
    with WebhookReceiver() as hook:
        notify.notify(config(uri, status="FAILED", url=hook.url, error="Task exit-handler-1 failed."))
    posted = hook.received[0]
    assert posted["status"] == "FAILED" and posted["failed_step"] == step
    assert posted["text"].splitlines()[1] == f"failed in {step}: Task exit-handler-1 failed."
    assert posted["version_pushed"] is None


def test_another_run_s_records_are_not_this_run_s(tmp_path):
    uri = str(tmp_path / "registry")
    record(uri, run="efficientnet-retrain-last-week", evaluated=evaluation(0.95, None), export="succeeded")
    summary = notify.notify(config(uri, status="FAILED"))
    assert summary["failed_step"] == "fingerprint, preprocess or train" and summary["accuracy"] is None


def test_without_a_webhook_the_summary_is_only_logged(tmp_path, caplog):
    uri = str(tmp_path / "registry")
    record(uri, evaluated=evaluation(0.95, None), export="succeeded")
    with caplog.at_level(logging.INFO, logger="components.notify"):
        summary = notify.notify(config(uri))
    assert summary["delivered"] is False
    assert caplog.messages[0] == summary["text"]
    assert summary["text"].startswith(f"retraining run {RUN} (pets): SUCCEEDED\n")
    assert "no webhook configured (RETRAIN_WEBHOOK_URL): the summary is only logged" in caplog.messages


def test_a_busy_webhook_is_retried_and_a_refusing_one_is_not(tmp_path):
    uri = str(tmp_path / "registry")
    with WebhookReceiver(fail_first=2) as hook:
        assert notify.notify(config(uri, status="FAILED", url=hook.url))["delivered"] is True
    assert hook.attempts == 3 and len(hook.received) == 1
    with WebhookReceiver(status=403) as hook:
        assert notify.notify(config(uri, status="FAILED", url=hook.url))["delivered"] is False
    assert hook.attempts == 1


def test_an_unreachable_webhook_is_an_error_in_the_log_not_a_failed_step_and_its_secret_path_stays_out(
    tmp_path,
):
    with WebhookReceiver() as hook:
        url = hook.url  # the port is closed once the receiver stops
    result = subprocess.run(
        [sys.executable, "-m", "components.notify", "--status", "FAILED", "--run-name", RUN,
         "--registry", str(tmp_path / "registry"), "--model-name", "pets", "--output", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**_env(), notify.WEBHOOK_ENV: url},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    host = url.split("/services")[0]
    assert (
        f"the run's summary was not delivered: {host} could not be reached after 3 attempt(s)"
        in result.stderr
    )
    assert "s3cr3t" not in result.stderr + result.stdout
    assert json.loads((tmp_path / "out" / notify.SUMMARY).read_text())["delivered"] is False


def test_a_webhook_that_is_not_an_http_url_is_refused_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "components.notify", "--status", "SUCCEEDED", "--run-name", RUN],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**_env(), notify.WEBHOOK_ENV: "hooks.slack.com/services/T0/B0/s3cr3t"},
    )  # fmt: skip
    assert result.returncode == 2
    assert "RETRAIN_WEBHOOK_URL must be an http(s):// URL, got one starting 'hooks.sl'" in result.stderr
    assert "s3cr3t" not in result.stderr


def test_records_in_an_s3_registry_and_a_run_name_with_odd_characters(s3_env):
    s3_env.client().make_bucket("notify-records")
    uri = "s3://notify-records/models"
    run = "retrain run #7/../x"
    record(uri, run=run, evaluated=evaluation(0.95, None), export="succeeded")
    names = registry.Registry(uri, "pets").folder.names()
    assert sorted(names) == [
        "pets/runs/retrain_run__7_.._x/evaluate.json",
        "pets/runs/retrain_run__7_.._x/export.json",
        "pets/runs/retrain_run__7_.._x/report.md",
    ]
    assert registry.Registry(uri, "pets").versions() == []  # records are never versions
    summary = notify.notify(
        notify.NotifyConfig(status="SUCCEEDED", run_name=run, registry=uri, model_name="pets")
    )
    assert summary["version_pushed"] == 5 and summary["blessed"] is True


def test_an_unreadable_registry_still_gives_the_status(s3_env):
    summary = notify.notify(config("s3://no-such-bucket-here/models", status="FAILED"))
    assert summary["status"] == "FAILED" and summary["failed_step"] == "fingerprint, preprocess or train"
    assert summary["records"].startswith("the run's records could not be read")


def _env() -> dict[str, str]:
    import os

    return {key: value for key, value in os.environ.items() if key != notify.WEBHOOK_ENV}
