"""notify: every pipeline run's summary, logged and posted to a webhook.

    RETRAIN_WEBHOOK_URL=https://hooks.slack.com/services/... \\
    python -m components.notify --status FAILED --run-name NAME --registry s3://models \\
        --model-name flowers [--error MESSAGE] [--output /tmp/summary]

The pipeline's exit handler: KFP runs it after the run's steps, whether they succeeded or not,
and hands it the run's final state only (`dsl.PipelineTaskFinalStatus` names the exit handler's
group, not the step that failed, and an exit task cannot read the steps' outputs). What the run
did comes from the records its steps wrote under `<registry>/<model>/runs/<run>/`
(`registry.record_step`): evaluate's decision and accuracies, export's version. A step that
recorded "started" and not "succeeded" is the one that failed; with no record at all the run
failed before evaluate, in fingerprint, preprocess or train (run-local's output names which).

The summary is JSON: run, status, failed step, error, blessed, the decision's reasons, accuracy
against production, the version pushed, and `text`, the same in a few lines, which is what a
Slack (or Mattermost, Teams workflow, Discord `/slack`) incoming webhook shows. The URL comes
from `RETRAIN_WEBHOOK_URL` (on a cluster, from a Kubernetes secret: `pipeline.Cluster`); none
set means the summary is only logged. Webhook URLs carry their credential in the path, so only
the scheme and host are ever logged. A webhook that cannot be reached after retries is an
error in the log and `"delivered": false` in the summary, not a failed step: the run's outcome
is its model, and a notification outage must not turn a good run red (on a cluster, KFP runs
the exit handler as an Argo exit hook, outside the run's own status, either way).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

from components import blessing, registry
from components.cli import configure_logging, exit_on_user_error, local_path

log = logging.getLogger(__name__)

WEBHOOK_ENV = "RETRAIN_WEBHOOK_URL"
SUMMARY = "summary.json"
REPORT = "report.md"  # evaluate's report, copied beside the summary when the run recorded one
SUCCEEDED = "SUCCEEDED"
CANCELED = "CANCELED"  # KFP's spelling, and run-local's for a Ctrl-C
RETRIED_STATUS = (429, 500, 502, 503, 504)
# The steps that record into the run (`registry.record_step`). Fingerprint, preprocess and
# train record nothing: KFP caches them across runs by their inputs, and a run name among those
# inputs would end the caching.
RECORDED_STEPS = ("evaluate", "export")
BEFORE_EVALUATE = "fingerprint, preprocess or train"


class NotifyError(ValueError):
    """The notification's own settings are wrong (the webhook URL)."""


@dataclass(frozen=True)
class NotifyConfig:
    status: str  # the run's final state as KFP reports it: SUCCEEDED, FAILED, CANCELED, ...
    run_name: str
    registry: str = ""
    model_name: str = "image-classifier"
    error: str = ""  # KFP's error message for a failed run, if any
    output: Path | None = None  # folder for summary.json (and the run's report.md)
    webhook_url: str = ""  # "" = log only
    timeout_seconds: float = 10.0
    attempts: int = 3  # connection errors, 429 and 5xx are retried, with 1 s, 2 s back-off

    def __post_init__(self):
        if self.webhook_url:
            parts = urlsplit(self.webhook_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise NotifyError(
                    f"{WEBHOOK_ENV} must be an http(s):// URL, got one starting {self.webhook_url[:8]!r}"
                )
        if self.attempts < 1 or self.timeout_seconds <= 0:
            raise NotifyError("attempts must be 1 or more and the timeout above 0")


def where(url: str) -> str:
    """The part of a webhook URL that may be logged: its scheme and host."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def read_records(config: NotifyConfig) -> tuple[dict[str, dict[str, Any]], bytes | None, str | None]:
    """(step -> its record, the report's bytes, why the records could not be read)."""
    if not config.registry:
        return {}, None, "no registry: the run recorded nothing"
    try:
        store = registry.Registry(config.registry, config.model_name)
        found = {}
        for step in RECORDED_STEPS:
            data = store.run_record(config.run_name, f"{step}.json")
            if data is not None:
                found[step] = json.loads(data)
        return found, store.run_record(config.run_name, REPORT), None
    except (registry.RegistryError, ValueError) as error:
        return {}, None, f"the run's records could not be read: {error}"


def failed_step(status: str, records: dict[str, dict[str, Any]]) -> str | None:
    if status == SUCCEEDED:
        return None
    evaluated = records.get("evaluate", {})
    if evaluated.get("state") != "succeeded":
        # Started and not finished; or never started (a pod that could not even start, like
        # every failure before it, leaves no record).
        return "evaluate" if evaluated else BEFORE_EVALUATE
    exported = records.get("export", {}).get("state") == "succeeded"
    if evaluated["evaluation"]["decision"]["blessed"] and not exported:
        return "export"
    return "unknown (every step that ran recorded its success)"


def summarize(config: NotifyConfig) -> tuple[dict[str, Any], bytes | None]:
    """The run's summary, and evaluate's report when the run recorded one."""
    records, report, unread = read_records(config)
    evaluation = records.get("evaluate", {}).get("evaluation")
    exported = records.get("export", {})
    summary: dict[str, Any] = {
        "run": config.run_name,
        "status": config.status,
        "failed_step": failed_step(config.status, records),
        "error": config.error or None,
        "model_name": config.model_name,
        "registry": config.registry or None,
        "blessed": None,
        "decision": None,
        "reasons": [],
        "accuracy": None,
        "production_accuracy": None,
        "production_version_compared": None,
        "classes": None,
        "version_pushed": exported.get("version") if exported.get("state") == "succeeded" else None,
        "promoted": exported.get("promoted") if exported.get("state") == "succeeded" else None,
        "records": unread or f"{config.registry}/{config.model_name}/{registry.RUNS}/{config.run_name}",
    }
    if evaluation:
        production = evaluation.get("production") or {}
        decision = evaluation["decision"]
        summary.update(
            blessed=bool(decision["blessed"]),
            decision=blessing.summary_line(decision),
            reasons=list(decision["reasons"]),
            accuracy=evaluation["candidate"]["accuracy"],
            production_accuracy=(production.get("metrics") or {}).get("accuracy"),
            production_version_compared=production.get("version"),
            classes=evaluation["candidate"]["classes"],
        )
    summary["text"] = text(summary)
    return summary, report


def text(summary: dict[str, Any]) -> str:
    """A few lines for a person: what happened, and what serves now."""
    head = f"retraining run {summary['run']} ({summary['model_name']}): {summary['status']}"
    lines = [head]
    if summary["failed_step"]:
        error = f": {summary['error']}" if summary["error"] else ""
        ended = "stopped" if summary["status"] == CANCELED else "failed"
        lines.append(f"{ended} in {summary['failed_step']}{error}")
    if summary["accuracy"] is not None:
        production = summary["production_accuracy"]
        versus = (
            f" vs production {production:.4f} (version {summary['production_version_compared']})"
            if production is not None
            else " (no production model to compare)"
        )
        lines.append(f"test accuracy {summary['accuracy']:.4f}{versus}")
        lines.append(summary["decision"])
    if summary["version_pushed"] is not None:
        moved = "pushed, not promoted (production moved meanwhile)"
        state = "in production" if summary["promoted"] else moved
        lines.append(f"version {summary['version_pushed']} {state}")
    elif summary["blessed"] is False:
        lines.append("not exported: production unchanged")
    return "\n".join(lines)


def post(url: str, summary: dict[str, Any], timeout: float, attempts: int) -> str | None:
    """POST the summary as JSON; None when delivered, else why not (the URL's path left out).

    Connection errors, timeouts, 429 and 5xx are tried again after 1 s, 2 s, ... (or the
    answer's Retry-After, up to 30 s). The loop is ours rather than urllib3's Retry, which logs
    each retry with the URL's path: the webhook's credential."""
    problem = None
    for attempt in range(attempts):
        wait = float(2**attempt)
        try:
            answer = requests.post(url, json=summary, timeout=timeout)
        except requests.RequestException as error:
            # The exception's text holds the whole URL: name its kind only.
            kind = type(error).__name__
            problem = f"{where(url)} could not be reached after {attempt + 1} attempt(s) ({kind})"
        else:
            if answer.status_code < 300:
                return None
            problem = f"{where(url)} answered HTTP {answer.status_code}: {answer.text[:200]!r}"
            if answer.status_code not in RETRIED_STATUS:
                return problem
            retry_after = answer.headers.get("Retry-After", "")
            wait = min(float(retry_after), 30.0) if retry_after.isdigit() else wait
        if attempt + 1 < attempts:
            time.sleep(wait)
    return problem


def notify(config: NotifyConfig) -> dict[str, Any]:
    summary, report = summarize(config)
    level = logging.INFO if config.status == SUCCEEDED else logging.ERROR
    # One record: its first line is what run-local shows, the rest goes to its log file.
    log.log(level, "%s", summary["text"])
    if config.webhook_url:
        problem = post(config.webhook_url, summary, config.timeout_seconds, config.attempts)
        summary["delivered"] = problem is None
        if problem:
            log.error("the run's summary was not delivered: %s", problem)
        else:
            log.info("summary posted to %s", where(config.webhook_url))
    else:
        summary["delivered"] = False
        log.info("no webhook configured (%s): the summary is only logged", WEBHOOK_ENV)
    if config.output is not None:
        config.output.mkdir(parents=True, exist_ok=True)
        (config.output / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        if report is not None:
            (config.output / REPORT).write_bytes(report)
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m components.notify",
        description=f"Summarize a pipeline run and post it to the webhook in ${WEBHOOK_ENV}.",
    )
    parser.add_argument("--status", required=True, help="the run's final state: SUCCEEDED, FAILED, ...")
    parser.add_argument("--run-name", required=True, help="the pipeline run, as its steps recorded it")
    parser.add_argument("--registry", default="", help="the registry the run's steps recorded into")
    parser.add_argument("--model-name", default=NotifyConfig.model_name)
    parser.add_argument("--error", default="", help="the run's error message, if any")
    parser.add_argument("--output", type=local_path, default=None, help="folder for summary.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    with exit_on_user_error(NotifyError):
        notify(NotifyConfig(**vars(args), webhook_url=os.environ.get(WEBHOOK_ENV, "")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
