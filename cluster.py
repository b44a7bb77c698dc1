"""Where the pipeline runs: submit a run to a Kubeflow Pipelines API, and schedule recurring runs.

    python pipeline.py submit --host URL --namespace NS [--param source=minio://data/flowers] [--wait]
    python pipeline.py schedule apply NAME --host URL --namespace NS --cron "0 3 * * 1" \
        --timezone Europe/Berlin
    python pipeline.py schedule list|pause|resume|delete [NAME] --host URL --namespace NS

Authentication, never from a command-line value (it would show in `ps` and shell history):
    KFP_TOKEN                 a bearer token (e.g. `kubectl create token retrain-ci -n NS`)
    --token-file PATH         a file holding one; inside a pod, the projected service-account
                              token at /var/run/secrets/kubeflow/pipelines/token is used by default
    KFP_COOKIE                a session cookie from the central dashboard, e.g.
                              "authservice_session=..." (Dex / oauth2-proxy installs)

Every submit and `schedule apply` uploads the compiled pipeline as a new version of one named
pipeline (created on first use), so the KFP UI keeps the history. KFP pins a recurring run to
the version it was created with, so each upload also re-points this pipeline's schedules in
the experiment at the new version (`repoint_schedules`): a schedule always runs the newest.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import subprocess
import time
import warnings
import zoneinfo
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kfp
import kfp_server_api
import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from components import storage

log = logging.getLogger("cluster")

IN_CLUSTER_TOKEN = Path("/var/run/secrets/kubeflow/pipelines/token")
TERMINAL_STATES = {"SUCCEEDED": 0, "SKIPPED": 0, "FAILED": 1, "CANCELED": 1, "CANCELING": 1}
DAYS = {"SUN": 0, "MON": 1, "TUE": 2, "WED": 3, "THU": 4, "FRI": 5, "SAT": 6}


class ClusterError(RuntimeError):
    """The cluster cannot be reached or refused the request; the message says what to fix."""


@dataclass(frozen=True)
class Connection:
    host: str  # e.g. http://localhost:8080 (port-forward) or https://kubeflow.example.com/pipeline
    namespace: str  # the Kubeflow profile namespace runs go to
    token: str = field(default="", repr=False)
    cookie: str = field(default="", repr=False)
    ssl_ca_cert: str = ""  # a CA bundle for a private TLS certificate


def connection(
    host: str,
    namespace: str,
    token_file: str = "",
    ssl_ca_cert: str = "",
    environ: dict[str, str] | None = None,
) -> Connection:
    env = os.environ if environ is None else environ
    if not host:
        raise ClusterError(
            "no KFP API address: pass --host (e.g. http://localhost:8080 after "
            "`kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80`)"
        )
    if not re.match(r"^https?://", host):
        raise ClusterError(f"--host {host!r} must start with http:// or https://")
    token = env.get("KFP_TOKEN", "")
    path = Path(token_file) if token_file else (IN_CLUSTER_TOKEN if IN_CLUSTER_TOKEN.is_file() else None)
    if not token and path is not None:
        try:
            token = path.read_text().strip()
        except OSError as error:
            raise ClusterError(f"cannot read the token file {path}: {error.strerror}") from None
    return Connection(
        host=host.rstrip("/"),
        namespace=namespace,
        token=token,
        cookie=env.get("KFP_COOKIE", ""),
        ssl_ca_cert=ssl_ca_cert,
    )


def check_reachable(conn: Connection) -> None:
    """One quick request before the SDK's own (which retries a dead host for 25 s and then
    raises a generic error): a clear message for each way it fails."""
    headers = {}
    if conn.token:
        headers["Authorization"] = f"Bearer {conn.token}"
    if conn.cookie:
        headers["Cookie"] = conn.cookie
    http = urllib3.PoolManager(ca_certs=conn.ssl_ca_cert or None)
    url = f"{conn.host}/apis/v2beta1/healthz"
    try:
        response = http.request(
            "GET",
            url,
            headers=headers,
            timeout=urllib3.Timeout(connect=5, read=15),
            retries=False,
            redirect=False,
        )
    except urllib3.exceptions.HTTPError as error:
        reason = getattr(error, "reason", None) or error
        raise ClusterError(
            f"cannot reach the KFP API at {conn.host}: {reason}. Check --host; from a "
            "laptop: kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80"
        ) from None
    if response.status in (401, 403) or (
        response.status in (302, 303) and "auth" in response.headers.get("Location", "")
    ):
        raise ClusterError(
            f"{conn.host} refused the request (HTTP {response.status}): "
            + (
                "the token or cookie was not accepted or has expired"
                if conn.token or conn.cookie
                else "it needs credentials: set KFP_TOKEN, --token-file or KFP_COOKIE"
            )
        )
    if response.status == 404:
        raise ClusterError(
            f"{conn.host} has no KFP v2beta1 API (HTTP 404 for /apis/v2beta1/healthz): "
            "check --host (behind the central dashboard it ends in /pipeline)"
        )
    if response.status >= 400:
        raise ClusterError(
            f"the KFP API at {conn.host} answered HTTP {response.status}: "
            f"{response.data[:300].decode(errors='replace')}"
        )


def client(conn: Connection):
    check_reachable(conn)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "only works with KFP >= 2.0.0-beta.2"
        return kfp.Client(
            host=conn.host,
            namespace=conn.namespace,
            existing_token=conn.token or None,
            cookies=conn.cookie or None,
            ssl_ca_cert=conn.ssl_ca_cert or None,
        )


def explain(error: Exception, doing: str) -> ClusterError:
    """A kfp_server_api error as one line: the HTTP status and the server's own message."""
    status = getattr(error, "status", None)
    body = getattr(error, "body", None) or ""
    try:
        message = json.loads(body).get("message") or json.loads(body).get("error") or body
    except (ValueError, AttributeError):
        message = body or str(error)
    hint = {401: " (credentials refused)", 403: " (not allowed in this namespace)", 404: " (not found)"}.get(
        status, ""
    )
    return ClusterError(f"{doing} failed: HTTP {status}{hint}: {str(message)[:300]}")


def revision() -> str:
    """The git revision of this checkout, or "" outside one: goes into version names."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return result.stdout.strip() if result.returncode == 0 else ""


def upload_version(kfp_client, package: Path, pipeline_name: str, namespace: str) -> tuple[str, str]:
    """(pipeline id, version id): the package as a new version of `pipeline_name`."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    version_name = "-".join(filter(None, [pipeline_name, stamp, revision()]))
    try:
        pipeline_id = kfp_client.get_pipeline_id(pipeline_name)
        if pipeline_id is None:
            pipeline = kfp_client.upload_pipeline(
                str(package),
                pipeline_name=pipeline_name,
                description="EfficientNet-B0 retraining",
                namespace=namespace,
            )
            pipeline_id = pipeline.pipeline_id
            versions = kfp_client.list_pipeline_versions(pipeline_id, sort_by="created_at desc", page_size=1)
            version_id = versions.pipeline_versions[0].pipeline_version_id
            log.info("created pipeline %s (%s)", pipeline_name, pipeline_id)
        else:
            version = kfp_client.upload_pipeline_version(
                str(package), pipeline_version_name=version_name, pipeline_id=pipeline_id
            )
            version_id = version.pipeline_version_id
            log.info("uploaded %s as version %s of pipeline %s", package, version_name, pipeline_name)
    except kfp_server_api.ApiException as error:
        raise explain(error, f"uploading the pipeline {pipeline_name!r}") from None
    return pipeline_id, version_id


def experiment_id(kfp_client, name: str, namespace: str) -> str:
    try:
        return kfp_client.create_experiment(name, namespace=namespace).experiment_id
    except kfp_server_api.ApiException as error:
        raise explain(
            error, f"finding or creating the experiment {name!r} in namespace {namespace!r}"
        ) from None


def find_experiment(kfp_client, name: str, namespace: str) -> str | None:
    """The id of experiment `name`, or None: listing must not create one."""
    try:
        return kfp_client.get_experiment(experiment_name=name, namespace=namespace).experiment_id
    except ValueError:
        return None
    except kfp_server_api.ApiException as error:
        raise explain(error, f"finding the experiment {name!r} in namespace {namespace!r}") from None


@dataclass(frozen=True)
class SubmitConfig:
    package: Path  # compiled pipeline YAML
    pipeline_name: str
    experiment: str
    run_name: str
    params: dict[str, Any]
    wait: bool = False
    poll_seconds: float = 10.0
    timeout_seconds: float = 0  # 0 = wait as long as the run takes


def submit(conn: Connection, config: SubmitConfig) -> dict[str, Any]:
    """Upload, start a run; with `wait`, follow it to the end. Returns the run's id and state."""
    kfp_client = client(conn)
    pipeline_id, version_id = upload_version(kfp_client, config.package, config.pipeline_name, conn.namespace)
    experiment = experiment_id(kfp_client, config.experiment, conn.namespace)
    repointed = repoint_schedules(kfp_client, experiment, conn.namespace, pipeline_id, version_id)
    try:
        run = kfp_client.run_pipeline(
            experiment_id=experiment,
            job_name=config.run_name,
            params=config.params,
            pipeline_id=pipeline_id,
            version_id=version_id,
        )
    except kfp_server_api.ApiException as error:
        raise explain(error, "starting the run") from None
    log.info("started run %s (%s) in experiment %s", config.run_name, run.run_id, config.experiment)
    result = {
        "run_id": run.run_id,
        "pipeline_id": pipeline_id,
        "version_id": version_id,
        "experiment_id": experiment,
        "state": run.state,
        "repointed_schedules": repointed,
    }
    if config.wait:
        result["state"] = follow(kfp_client, run.run_id, config.poll_seconds, config.timeout_seconds)
    return result


def follow(kfp_client, run_id: str, poll_seconds: float, timeout_seconds: float) -> str:
    """Poll the run, logging each change of state, until it ends; returns the final state."""
    started, last = time.monotonic(), None
    while True:
        try:
            state = kfp_client.get_run(run_id).state or "PENDING"
        except kfp_server_api.ApiException as error:
            raise explain(error, f"reading run {run_id}") from None
        if state != last:
            log.info("run %s: %s (%.0f s)", run_id, state, time.monotonic() - started)
            last = state
        if state in TERMINAL_STATES:
            return state
        if timeout_seconds and time.monotonic() - started > timeout_seconds:
            raise ClusterError(
                f"run {run_id} still {state} after {timeout_seconds:.0f} s (it goes on; "
                "--timeout only stops waiting)"
            )
        time.sleep(poll_seconds)


def _numbers(field_text: str, name: str, names: dict[str, int] | None = None) -> list[int]:
    values = []
    for part in field_text.split(","):
        token = (names or {}).get(part.upper(), part)
        if not str(token).isdigit():
            raise ClusterError(
                f"cannot convert the cron {name} field {field_text!r} to UTC (only plain "
                "numbers and lists like 0,30 can be shifted); write the expression in UTC "
                "and pass --timezone UTC"
            )
        values.append(int(token))
    return values


def to_utc_cron(expression: str, tz_name: str, now: datetime | None = None) -> tuple[str, str]:
    """(6-field UTC cron for KFP, a note) from a 5-field (or 6-field, seconds first) expression
    meant in `tz_name`. The KFP backend runs every schedule in UTC.

    The offset of `now` is used; where the zone has daylight saving time, the note says that
    the local run time moves by the difference when the clocks change.
    """
    fields = expression.split()
    if len(fields) == 5:
        fields = ["0", *fields]
    if len(fields) != 6:
        raise ClusterError(
            f"cron {expression!r} must have 5 fields (minute hour day month weekday) or 6 (seconds first)"
        )
    if tz_name.upper() in ("UTC", "ETC/UTC", "Z"):
        return " ".join(fields), "UTC"
    try:
        zone = zoneinfo.ZoneInfo(tz_name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ClusterError(f"unknown time zone {tz_name!r}; use an IANA name such as Europe/Berlin") from None
    now = now or datetime.now(UTC)
    offset = int(now.astimezone(zone).utcoffset().total_seconds() // 60)
    seconds, minutes, hours, day, month, weekday = fields
    pairs = [(h, m) for h in _numbers(hours, "hour") for m in _numbers(minutes, "minute")]
    shifted = [(h * 60 + m - offset) for h, m in pairs]
    day_shifts = {total // 1440 for total in shifted}
    if len(day_shifts) != 1:
        raise ClusterError(
            f"cron {expression!r} in {tz_name} falls on different UTC days for different "
            "hours; write it in UTC and pass --timezone UTC"
        )
    (day_shift,) = day_shifts
    utc_pairs = {((total % 1440) // 60, total % 60) for total in shifted}
    utc_hours = sorted({h for h, _ in utc_pairs})
    utc_minutes = sorted({m for _, m in utc_pairs})
    if {(h, m) for h in utc_hours for m in utc_minutes} != utc_pairs:
        raise ClusterError(
            f"cron {expression!r} in {tz_name} has no exact UTC equivalent (the offset is "
            f"{offset:+d} min); write it in UTC and pass --timezone UTC"
        )
    if day_shift:
        if day != "*":
            raise ClusterError(
                f"cron {expression!r} in {tz_name} crosses midnight in UTC, which would move "
                "its day of month; write it in UTC and pass --timezone UTC"
            )
        if weekday != "*":
            weekday = ",".join(str((d + day_shift) % 7) for d in _numbers(weekday, "weekday", DAYS))
    utc = " ".join(
        [seconds, ",".join(map(str, utc_minutes)), ",".join(map(str, utc_hours)), day, month, weekday]
    )
    january = datetime(now.year, 1, 15, tzinfo=UTC).astimezone(zone).utcoffset()
    july = datetime(now.year, 7, 15, tzinfo=UTC).astimezone(zone).utcoffset()
    note = f"{tz_name} is UTC{offset / 60:+g} now"
    if january != july:
        offsets = {int(january.total_seconds() // 60), int(july.total_seconds() // 60)}
        (other,) = offsets - {offset}
        # local = UTC + offset: moving to a larger offset shows the same UTC time later.
        note += (
            f"; the backend keeps this UTC time, so after the next daylight-saving change the run "
            f"starts {abs(other - offset)} min {'later' if other > offset else 'earlier'} in local "
            "time (re-apply the schedule then to keep the local time)"
        )
    return utc, note


def interval_seconds(text: str) -> int:
    """ "30m", "6h", "1d", "3600" -> seconds."""
    match = re.fullmatch(r"(\d+)([smhd]?)", text.strip())
    if not match or int(match.group(1)) == 0:
        raise ClusterError(f"--every {text!r} must be a positive number with an optional unit s, m, h or d")
    return int(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


@dataclass(frozen=True)
class ScheduleConfig:
    name: str
    package: Path
    pipeline_name: str
    experiment: str
    params: dict[str, Any]
    cron: str = ""
    timezone: str = "UTC"
    every: str = ""


def _recurring_runs(kfp_client, experiment: str, namespace: str) -> list:
    found, token = [], ""
    try:
        while True:
            page = kfp_client.list_recurring_runs(
                page_token=token, page_size=100, experiment_id=experiment, namespace=namespace
            )
            found.extend(page.recurring_runs or [])
            token = page.next_page_token or ""
            if not token:
                return found
    except kfp_server_api.ApiException as error:
        raise explain(error, "listing recurring runs") from None


def repoint_schedules(
    kfp_client, experiment: str, namespace: str, pipeline_id: str, version_id: str
) -> list[str]:
    """Point every recurring run of `pipeline_id` in the experiment at `version_id`; their names.

    The API has no update for a recurring run: each is created again with its own name,
    trigger, parameters, concurrency, catch-up and enabled state, then the old one deleted
    (created first: a failure leaves the old schedule running, never none)."""
    moved = []
    for old in _recurring_runs(kfp_client, experiment, namespace):
        reference = old.pipeline_version_reference
        if (
            reference is None
            or reference.pipeline_id != pipeline_id
            or reference.pipeline_version_id == version_id
        ):
            continue
        trigger = old.trigger
        cron = trigger.cron_schedule.cron if trigger and trigger.cron_schedule else None
        interval = (
            trigger.periodic_schedule.interval_second if trigger and trigger.periodic_schedule else None
        )
        try:
            kfp_client.create_recurring_run(
                experiment_id=experiment,
                job_name=old.display_name,
                cron_expression=cron,
                interval_second=int(interval) if interval else None,  # int64 arrives as a string
                max_concurrency=int(old.max_concurrency or 1),
                no_catchup=bool(old.no_catchup),
                params=(old.runtime_config.parameters if old.runtime_config else None) or {},
                pipeline_id=pipeline_id,
                version_id=version_id,
                enabled=old.status != "DISABLED",
            )
            kfp_client.delete_recurring_run(old.recurring_run_id)
        except kfp_server_api.ApiException as error:
            raise explain(
                error, f"re-pointing the schedule {old.display_name!r} at the new version"
            ) from None
        log.info("schedule %s now runs the new pipeline version %s", old.display_name, version_id)
        moved.append(old.display_name)
    return moved


def apply_schedule(conn: Connection, config: ScheduleConfig) -> dict[str, Any]:
    """Create the recurring run `name`, replacing one of that name (never a second copy)."""
    if bool(config.cron) == bool(config.every):
        raise ClusterError("give exactly one of --cron and --every")
    cron, note = to_utc_cron(config.cron, config.timezone) if config.cron else ("", "")
    seconds = interval_seconds(config.every) if config.every else None
    kfp_client = client(conn)
    pipeline_id, version_id = upload_version(kfp_client, config.package, config.pipeline_name, conn.namespace)
    experiment = experiment_id(kfp_client, config.experiment, conn.namespace)
    replaced = [
        r for r in _recurring_runs(kfp_client, experiment, conn.namespace) if r.display_name == config.name
    ]
    try:
        for old in replaced:
            kfp_client.delete_recurring_run(old.recurring_run_id)
            log.info("deleted the previous schedule %s (%s)", config.name, old.recurring_run_id)
        # max_concurrency 1: a slow run is never overlapped by the next; no_catchup: after a
        # pause, one run, not one per missed slot.
        created = kfp_client.create_recurring_run(
            experiment_id=experiment,
            job_name=config.name,
            cron_expression=cron or None,
            interval_second=seconds,
            max_concurrency=1,
            no_catchup=True,
            params=config.params,
            pipeline_id=pipeline_id,
            version_id=version_id,
            enabled=True,
        )
    except kfp_server_api.ApiException as error:
        raise explain(error, f"creating the schedule {config.name!r}") from None
    log.info(
        "schedule %s (%s): %s",
        config.name,
        created.recurring_run_id,
        f"cron {cron} UTC ({note})" if cron else f"every {seconds} s",
    )
    repointed = repoint_schedules(kfp_client, experiment, conn.namespace, pipeline_id, version_id)
    return {
        "repointed_schedules": repointed,
        "recurring_run_id": created.recurring_run_id,
        "cron_utc": cron,
        "interval_second": seconds,
        "note": note,
        "replaced": [r.recurring_run_id for r in replaced],
        "version_id": version_id,
    }


def list_schedules(conn: Connection, experiment: str) -> list[dict[str, Any]]:
    kfp_client = client(conn)
    rows = []
    found = find_experiment(kfp_client, experiment, conn.namespace)
    for run in _recurring_runs(kfp_client, found, conn.namespace) if found else []:
        trigger = run.trigger
        cron = trigger.cron_schedule.cron if trigger and trigger.cron_schedule else ""
        periodic = trigger.periodic_schedule if trigger else None
        interval = periodic.interval_second if periodic else None
        rows.append(
            {
                "name": run.display_name,
                "id": run.recurring_run_id,
                "status": run.status,
                "trigger": f"cron {cron} (UTC)" if cron else f"every {interval} s",
                "version_id": run.pipeline_version_reference.pipeline_version_id
                if run.pipeline_version_reference
                else "",
            }
        )
    return rows


def change_schedule(conn: Connection, experiment: str, name: str, action: str) -> list[str]:
    """pause | resume | delete every recurring run called `name`; returns their ids."""
    kfp_client = client(conn)
    found = find_experiment(kfp_client, experiment, conn.namespace)
    matches = [
        r
        for r in (_recurring_runs(kfp_client, found, conn.namespace) if found else [])
        if r.display_name == name
    ]
    if not matches:
        raise ClusterError(
            f"no schedule named {name!r} in experiment {experiment!r} "
            f"(namespace {conn.namespace}); `schedule list` shows them"
        )
    method = {
        "pause": kfp_client.disable_recurring_run,
        "resume": kfp_client.enable_recurring_run,
        "delete": kfp_client.delete_recurring_run,
    }[action]
    try:
        for run in matches:
            method(run.recurring_run_id)
    except kfp_server_api.ApiException as error:
        raise explain(error, f"{action} of schedule {name!r}") from None
    return [r.recurring_run_id for r in matches]


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str  # what was found, or how to fix it


@dataclass(frozen=True)
class DoctorConfig:
    secret_name: str = "mlpipeline-minio-artifact"
    secret_keys: tuple[str, str] = ("accesskey", "secretkey")
    gpu_label_key: str = "nvidia.com/gpu.product"
    gpu_label_value: str = "NVIDIA-GeForce-RTX-2070"
    bucket: str = ""  # e.g. "models" (the registry's) or "mlpipeline"; "" skips the bucket check
    s3_endpoint: str = ""  # as reachable from here, e.g. http://localhost:9000 after a port-forward
    kube_context: str = ""
    gpus: int = 1  # the run's `gpus`: a labelled node must have this many allocatable


def doctor(conn: Connection, config: DoctorConfig, environ: dict[str, str] | None = None) -> list[Check]:
    """Pre-flight checks before the first run on a cluster; each failure says how to fix it.

    Uses the KFP API (as `submit` does) and the Kubernetes API through the user's kubeconfig.
    """
    checks = []
    try:
        check_reachable(conn)
        checks.append(Check("kfp-api", True, f"{conn.host} answers with the KFP v2beta1 API"))
    except ClusterError as error:
        checks.append(Check("kfp-api", False, str(error)))
    try:
        core = _kubernetes(config.kube_context)
    except ClusterError as error:
        return checks + [Check("kubernetes-api", False, str(error))]
    checks += _kubernetes_checks(core, conn.namespace, config)
    if config.bucket:
        checks.append(_bucket_check(core, conn.namespace, config, os.environ if environ is None else environ))
    return checks


def _kubernetes(context: str):
    try:
        k8s_config.load_kube_config(context=context or None)
    except (ConfigException, FileNotFoundError, TypeError) as error:
        raise ClusterError(
            f"no usable kubeconfig ({error}): set KUBECONFIG or run `kubectl config use-context`"
        ) from None
    return k8s.CoreV1Api()


def _api_failure(error: Exception, what: str, fix: str) -> str:
    status = getattr(error, "status", None)
    if status in (401, 403):
        return f"{what}: the Kubernetes API refused (HTTP {status}); {fix}"
    if status is None:
        return f"{what}: cannot reach the Kubernetes API ({str(error)[:200]}); check the kubeconfig's server"
    return f"{what}: HTTP {status}: {getattr(error, 'reason', '')}"


def _kubernetes_checks(core, namespace: str, config: DoctorConfig) -> list[Check]:
    errors = (ApiException, urllib3.exceptions.HTTPError)
    checks = []
    try:
        core.read_namespace(namespace)
        checks.append(Check("namespace", True, f"namespace {namespace} exists"))
    except errors as error:
        if getattr(error, "status", None) == 404:
            checks.append(
                Check(
                    "namespace",
                    False,
                    f"namespace {namespace} does not exist: create a "
                    "Kubeflow profile for it, or pass the right --namespace",
                )
            )
        elif getattr(error, "status", None) == 403:
            checks.append(
                Check(
                    "namespace",
                    True,
                    f"namespace {namespace}: not readable with these "
                    "credentials (normal for a namespaced account)",
                )
            )
        else:
            checks.append(
                Check("namespace", False, _api_failure(error, "namespace", "check the kubeconfig user"))
            )
    try:
        secret = core.read_namespaced_secret(config.secret_name, namespace)
        missing = [key for key in config.secret_keys if key not in (secret.data or {})]
        found = f"secret {config.secret_name} has keys {', '.join(config.secret_keys)}"
        lacking = (
            f"secret {config.secret_name} lacks the key(s) {', '.join(missing)}: see "
            "manifests/examples/s3-credentials.yaml"
        )
        checks.append(Check("secret", not missing, lacking if missing else found))
    except errors as error:
        if getattr(error, "status", None) == 404:
            checks.append(
                Check(
                    "secret",
                    False,
                    f"no secret {config.secret_name} in {namespace}: fill in "
                    "manifests/examples/s3-credentials.yaml and apply it there",
                )
            )
        else:
            checks.append(
                Check(
                    "secret",
                    False,
                    _api_failure(
                        error,
                        "secret",
                        f"the account needs `get` on secret {config.secret_name} (manifests/ci-access)",
                    ),
                )
            )
    try:
        nodes = core.list_node(label_selector=f"{config.gpu_label_key}={config.gpu_label_value}").items
        gpus = {
            node.metadata.name: int((node.status.allocatable or {}).get("nvidia.com/gpu", "0"))
            for node in nodes
        }
        usable = [name for name, count in gpus.items() if count >= config.gpus]
        too_small = {name: count for name, count in gpus.items() if 0 < count < config.gpus}
        if usable:
            checks.append(
                Check(
                    "gpu-node",
                    True,
                    f"{', '.join(usable)}: {config.gpu_label_key}="
                    f"{config.gpu_label_value}, allocatable nvidia.com/gpu"
                    + (f" >= {config.gpus}" if config.gpus > 1 else ""),
                )
            )
        elif too_small:
            checks.append(
                Check(
                    "gpu-node",
                    False,
                    ", ".join(f"{name} has {count}" for name, count in too_small.items())
                    + f" allocatable nvidia.com/gpu, fewer than gpus={config.gpus}: such a run's "
                    "train pod would stay Pending; run with fewer gpus or give the node more cards",
                )
            )
        elif gpus:
            checks.append(
                Check(
                    "gpu-node",
                    False,
                    f"{', '.join(gpus)} carry the label but no allocatable "
                    "nvidia.com/gpu: install the NVIDIA device plugin or GPU "
                    "operator (manifests/README.md)",
                )
            )
        else:
            checks.append(
                Check(
                    "gpu-node",
                    False,
                    f"no node is labelled {config.gpu_label_key}="
                    f"{config.gpu_label_value}: label the RTX 2070 node "
                    "(manifests/README.md) or compile with --gpu-label",
                )
            )
    except errors as error:
        checks.append(
            Check(
                "gpu-node",
                False,
                _api_failure(error, "nodes", "the account needs `list` on nodes (manifests/ci-access)"),
            )
        )
    return checks


def _bucket_check(core, namespace: str, config: DoctorConfig, environ: dict[str, str]) -> Check:
    """The bucket, reached with the credentials the pods get (from the secret), or with
    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from this environment when they are set."""
    env = dict(environ)
    if config.s3_endpoint:
        env["AWS_ENDPOINT_URL"] = config.s3_endpoint
    if not env.get("AWS_ACCESS_KEY_ID"):
        try:
            data = core.read_namespaced_secret(config.secret_name, namespace).data or {}
            env["AWS_ACCESS_KEY_ID"] = base64.b64decode(data[config.secret_keys[0]]).decode()
            env["AWS_SECRET_ACCESS_KEY"] = base64.b64decode(data[config.secret_keys[1]]).decode()
        except Exception:  # reported by the secret check already
            return Check(
                "bucket",
                False,
                f"bucket {config.bucket}: no credentials to try it with (see the "
                "secret check, or set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)",
            )
    try:
        folder = storage.ObjectStoreFolder(f"s3://{config.bucket}", environ=env)
        folder.check()
    except storage.StorageError as error:
        hint = (
            ""
            if config.s3_endpoint
            else (
                " (from outside the cluster: kubectl port-forward -n kubeflow "
                "svc/minio-service 9000:9000 and --s3-endpoint http://localhost:9000)"
            )
        )
        return Check("bucket", False, f"{error}{hint}")
    return Check("bucket", True, f"bucket {config.bucket} is reachable with the pipeline's credentials")
