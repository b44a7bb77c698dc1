"""submit and schedule: contract tests against a local stand-in of the KFP v2beta1 REST API.

No Kubeflow cluster can run here, so the real `kfp.Client` (through `python pipeline.py`)
talks real HTTP to `tests/kfp_stand_in.py`, which records every request: these tests pin the
payloads and the behaviour we rely on, not a real backend's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

import cluster
from tests import kfp_stand_in

REPO = Path(__file__).resolve().parent.parent
TOKEN = "stand-in-token-5f1c"


@pytest.fixture
def kfp_api():
    server = kfp_stand_in.start(token=TOKEN)
    yield server
    server.close()


def cli(*args: str, token: str | None = TOKEN, **env: str) -> subprocess.CompletedProcess:
    environ = {key: value for key, value in os.environ.items() if not key.startswith("KFP_")}
    if token is not None:
        environ["KFP_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "pipeline.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**environ, **env},
    )


def test_contract_submit_uploads_a_version_and_starts_a_run_with_typed_parameters(kfp_api):
    args = [
        "submit",
        "--host",
        kfp_api.url,
        "--namespace",
        "team-a",
        "--param",
        "source=minio://data/flowers",
        "--param",
        "epochs=3",
        "--param",
        "margin=0.02",
        "--run-name",
        "nightly-1",
    ]
    first = cli(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    second = cli(*args)
    assert second.returncode == 0, second.stderr[-2000:]
    state = kfp_api.state

    assert len(state.pipelines) == 1  # the second submit added a version, not a pipeline
    (pipeline_id,) = state.pipelines
    assert len(state.versions[pipeline_id]) == 2
    uploaded = next(yaml.safe_load_all(state.uploads[-1]))
    assert uploaded["pipelineInfo"]["name"] == "efficientnet-retrain"

    runs = list(state.runs.values())
    assert [run["display_name"] for run in runs] == ["nightly-1", "nightly-1"]
    assert runs[1]["runtime_config"]["parameters"] == {
        "source": "minio://data/flowers",
        "epochs": 3,
        "margin": 0.02,
    }
    newest = state.versions[pipeline_id][1]["pipeline_version_id"]
    assert runs[1]["pipeline_version_reference"] == {
        "pipeline_id": pipeline_id,
        "pipeline_version_id": newest,
    }
    (experiment,) = state.experiments.values()
    assert experiment["display_name"] == "efficientnet-retrain" and experiment["namespace"] == "team-a"
    assert all(run["experiment_id"] == experiment["experiment_id"] for run in runs)
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in state.requests)
    assert TOKEN not in first.stdout + first.stderr  # never echoed


def test_contract_submit_wait_follows_the_run_and_fails_when_it_fails(kfp_api):
    kfp_api.state.run_states = ["PENDING", "RUNNING", "FAILED"]
    result = cli(
        "submit",
        "--host",
        kfp_api.url,
        "--namespace",
        "team-a",
        "--param",
        "source=s3://d/x",
        "--wait",
        "--poll",
        "0.05",
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert ": PENDING" in result.stderr and ": RUNNING" in result.stderr and ": FAILED" in result.stderr
    assert result.stdout.strip().endswith("FAILED")
    kfp_api.state.run_states = ["RUNNING", "SUCCEEDED"]
    ok = cli(
        "submit",
        "--host",
        kfp_api.url,
        "--namespace",
        "team-a",
        "--param",
        "source=s3://d/x",
        "--wait",
        "--poll",
        "0.05",
    )
    assert ok.returncode == 0 and ok.stdout.strip().endswith("SUCCEEDED")


def test_contract_schedule_apply_replaces_instead_of_duplicating(kfp_api):
    args = [
        "schedule",
        "apply",
        "weekly",
        "--host",
        kfp_api.url,
        "--namespace",
        "team-a",
        "--param",
        "source=minio://data/flowers",
        "--cron",
        "0 3 * * 1",
        "--timezone",
        "UTC",
    ]
    first = cli(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    second = cli(*args)
    assert second.returncode == 0, second.stderr[-2000:]
    state = kfp_api.state
    (recurring,) = state.recurring.values()  # one schedule called "weekly", not two
    assert "replaced recurring-" in second.stdout
    assert recurring["display_name"] == "weekly"
    assert recurring["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * 1"}}
    assert recurring["max_concurrency"] == "1" or recurring["max_concurrency"] == 1
    assert recurring["no_catchup"] is True
    assert recurring["mode"] == "ENABLE"
    (pipeline_id,) = state.pipelines
    newest = state.versions[pipeline_id][-1]["pipeline_version_id"]
    assert recurring["pipeline_version_reference"]["pipeline_version_id"] == newest  # the newest version

    listed = cli("schedule", "list", "--host", kfp_api.url, "--namespace", "team-a")
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert listed.stdout.splitlines()[-1].split("\t")[:3] == ["weekly", "ENABLED", "cron 0 0 3 * * 1 (UTC)"]
    assert cli("schedule", "pause", "weekly", "--host", kfp_api.url, "--namespace", "team-a").returncode == 0
    assert recurring["status"] == "DISABLED"
    assert cli("schedule", "resume", "weekly", "--host", kfp_api.url, "--namespace", "team-a").returncode == 0
    assert recurring["status"] == "ENABLED"
    assert cli("schedule", "delete", "weekly", "--host", kfp_api.url, "--namespace", "team-a").returncode == 0
    assert state.recurring == {}
    missing = cli("schedule", "pause", "weekly", "--host", kfp_api.url, "--namespace", "team-a")
    assert missing.returncode == 2 and "no schedule named 'weekly'" in missing.stderr


def test_contract_submit_re_points_the_pipeline_s_schedules_at_the_new_version(kfp_api):
    """KFP pins a recurring run to the version it was created with: after a submit, every
    schedule of this pipeline runs the version just uploaded, each otherwise as it was."""
    where = ["--host", kfp_api.url, "--namespace", "team-a"]
    weekly = [
        "schedule",
        "apply",
        "weekly",
        *where,
        "--param",
        "source=minio://data/a",
        "--cron",
        "0 3 * * 1",
    ]
    assert cli(*weekly).returncode == 0
    hourly = ["schedule", "apply", "hourly", *where, "--param", "source=minio://data/b", "--every", "1h"]
    assert cli(*hourly).returncode == 0
    assert cli("schedule", "pause", "hourly", *where).returncode == 0
    before = {r["display_name"]: r for r in kfp_api.state.recurring.values()}

    submitted = cli("submit", *where, "--param", "source=minio://data/c")
    assert submitted.returncode == 0, submitted.stderr[-2000:]
    (pipeline_id,) = kfp_api.state.pipelines
    newest = kfp_api.state.versions[pipeline_id][-1]["pipeline_version_id"]
    after = {r["display_name"]: r for r in kfp_api.state.recurring.values()}
    assert sorted(after) == ["hourly", "weekly"]  # still one of each
    for name, schedule in after.items():
        assert schedule["pipeline_version_reference"]["pipeline_version_id"] == newest
        assert schedule["recurring_run_id"] != before[name]["recurring_run_id"]
        for kept in ("trigger", "runtime_config", "no_catchup", "status"):
            assert schedule[kept] == before[name][kept], (name, kept)
    assert after["hourly"]["status"] == "DISABLED"  # a paused schedule stays paused
    assert "now runs the new pipeline version" in submitted.stderr


def test_contract_schedule_converts_the_time_zone_to_utc(kfp_api):
    result = cli(
        "schedule",
        "apply",
        "nightly",
        "--host",
        kfp_api.url,
        "--namespace",
        "team-a",
        "--param",
        "source=s3://d/x",
        "--cron",
        "30 1 * * MON",
        "--timezone",
        "Asia/Kolkata",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (recurring,) = kfp_api.state.recurring.values()
    # 01:30 Monday in India (UTC+5:30) is 20:00 Sunday UTC.
    assert recurring["trigger"]["cron_schedule"]["cron"] == "0 0 20 * * 0"
    assert "Asia/Kolkata is UTC+5.5 now" in result.stdout


def test_contract_schedule_with_an_interval(kfp_api):
    result = cli(
        "schedule",
        "apply",
        "six-hourly",
        "--host",
        kfp_api.url,
        "--namespace",
        "team-a",
        "--param",
        "source=s3://d/x",
        "--every",
        "6h",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (recurring,) = kfp_api.state.recurring.values()
    assert recurring["trigger"] == {"periodic_schedule": {"interval_second": str(6 * 3600)}} or recurring[
        "trigger"
    ] == {"periodic_schedule": {"interval_second": 6 * 3600}}


@pytest.mark.parametrize(
    "expression, zone, when, expected",
    [
        ("0 3 * * 1", "Europe/Berlin", datetime(2026, 1, 10, tzinfo=UTC), "0 0 2 * * 1"),  # CET, UTC+1
        ("0 3 * * 1", "Europe/Berlin", datetime(2026, 7, 10, tzinfo=UTC), "0 0 1 * * 1"),  # CEST, UTC+2
        ("0 1 * * 1,3", "Europe/Berlin", datetime(2026, 7, 10, tzinfo=UTC), "0 0 23 * * 0,2"),  # day before
        ("0,30 9,17 * * *", "America/New_York", datetime(2026, 1, 10, tzinfo=UTC), "0 0,30 14,22 * * *"),
        ("15 10 * * *", "UTC", datetime(2026, 1, 10, tzinfo=UTC), "0 15 10 * * *"),
        ("5 0 3 * * *", "UTC", datetime(2026, 1, 10, tzinfo=UTC), "5 0 3 * * *"),  # 6 fields: seconds first
    ],
)
def test_cron_time_zone_conversion(expression, zone, when, expected):
    assert cluster.to_utc_cron(expression, zone, when)[0] == expected


def test_daylight_saving_is_explained():
    # Winter: 03:00 CET is 02:00 UTC, which is 04:00 once summer time (UTC+2) starts.
    _, note = cluster.to_utc_cron("0 3 * * *", "Europe/Berlin", datetime(2026, 1, 10, tzinfo=UTC))
    assert "Europe/Berlin is UTC+1 now" in note and "60 min later in local time" in note
    _, summer = cluster.to_utc_cron("0 3 * * *", "Europe/Berlin", datetime(2026, 7, 10, tzinfo=UTC))
    assert "UTC+2 now" in summer and "60 min earlier in local time" in summer
    assert (
        cluster.to_utc_cron("0 3 * * *", "Asia/Kolkata", datetime(2026, 7, 10, tzinfo=UTC))[1]
        == "Asia/Kolkata is UTC+5.5 now"
    )  # no daylight saving, nothing to warn about


@pytest.mark.parametrize(
    "expression, zone, message",
    [
        ("0 3 1 * *", "Asia/Tokyo", "crosses midnight"),  # 03:00 JST is 18:00 UTC the day before
        ("*/15 3 * * *", "Europe/Berlin", "cannot convert the cron minute field"),
        ("0 3 * *", "UTC", "must have 5 fields"),
        ("0 3 * * *", "Mars/Olympus", "unknown time zone"),
    ],
)
def test_cron_conversion_refuses_what_it_cannot_do_exactly(expression, zone, message):
    with pytest.raises(cluster.ClusterError, match=message):
        cluster.to_utc_cron(expression, zone, datetime(2026, 1, 10, tzinfo=UTC))


def test_contract_refused_credentials_are_a_clear_error(kfp_api):
    wrong = cli(
        "submit",
        "--host",
        kfp_api.url,
        "--namespace",
        "team-a",
        "--param",
        "source=s3://d/x",
        token="expired",
    )
    assert wrong.returncode == 2
    assert "refused the request (HTTP 401): the token or cookie was not accepted" in wrong.stderr
    none = cli(
        "submit", "--host", kfp_api.url, "--namespace", "team-a", "--param", "source=s3://d/x", token=None
    )
    assert none.returncode == 2 and "set KFP_TOKEN, --token-file or KFP_COOKIE" in none.stderr
    assert kfp_api.state.runs == {}


def test_contract_token_file_is_used(kfp_api, tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    result = cli(
        "schedule",
        "list",
        "--host",
        kfp_api.url,
        "--namespace",
        "team-a",
        "--token-file",
        str(path),
        token=None,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert kfp_api.state.requests[-1].headers["authorization"] == f"Bearer {TOKEN}"


def test_contract_wrong_path_and_connection_refused_are_clear_errors(kfp_api):
    not_kfp = cli(
        "submit", "--host", kfp_api.url + "/not-kfp", "--namespace", "team-a", "--param", "source=s3://d/x"
    )
    assert not_kfp.returncode == 2 and "has no KFP v2beta1 API (HTTP 404" in not_kfp.stderr
    port = kfp_api.server.server_address[1]
    kfp_api.close()
    refused = cli(
        "submit", "--host", f"http://127.0.0.1:{port}", "--namespace", "team-a", "--param", "source=s3://d/x"
    )
    assert refused.returncode == 2
    assert f"cannot reach the KFP API at http://127.0.0.1:{port}" in refused.stderr


def test_parameters_are_checked_before_anything_is_sent(kfp_api):
    unknown = cli("submit", "--host", kfp_api.url, "--namespace", "team-a", "--param", "sourse=s3://d/x")
    assert unknown.returncode != 0 and "NAME one of" in unknown.stderr and "source" in unknown.stderr
    missing = cli("submit", "--host", kfp_api.url, "--namespace", "team-a")
    assert missing.returncode != 0 and "needs --param source=" in missing.stderr
    typed = cli(
        "submit",
        "--host",
        kfp_api.url,
        "--namespace",
        "team-a",
        "--param",
        "source=x",
        "--param",
        "epochs=ten",
    )
    assert typed.returncode != 0 and "epochs='ten' is not a valid number_integer" in typed.stderr
    assert kfp_api.state.calls("POST", "/runs") == []


@pytest.fixture
def k8s_api():
    from tests import k8s_stand_in

    server = k8s_stand_in.start()
    yield server
    server.close()


def test_contract_doctor_passes_on_a_ready_cluster(kfp_api, k8s_api, s3, tmp_path):
    import base64

    s3.client().make_bucket("models")
    k8s_api.cluster.namespaces.add("team-a")
    k8s_api.cluster.secrets[("team-a", "mlpipeline-minio-artifact")] = {
        "accesskey": base64.b64encode(s3.access_key.encode()).decode(),
        "secretkey": base64.b64encode(s3.secret_key.encode()).decode(),
    }
    k8s_api.cluster.nodes.append(
        {
            "name": "rtx-node",
            "allocatable": {"nvidia.com/gpu": "1"},
            "labels": {"nvidia.com/gpu.product": "NVIDIA-GeForce-RTX-2070"},
        }
    )
    result = cli(
        "doctor",
        "--host",
        kfp_api.url,
        "--namespace",
        "team-a",
        "--bucket",
        "models",
        "--s3-endpoint-here",
        s3.url,
        KUBECONFIG=str(k8s_api.kubeconfig(tmp_path / "kubeconfig")),
    )
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert [line.split()[:2] for line in lines[:-1]] == [
        ["ok", "kfp-api"],
        ["ok", "namespace"],
        ["ok", "secret"],
        ["ok", "gpu-node"],
        ["ok", "bucket"],
    ]
    assert lines[-1] == "5 of 5 checks passed"
    assert s3.secret_key not in result.stdout + result.stderr
    assert (
        "/api/v1/nodes?labelSelector=nvidia.com%2Fgpu.product%3DNVIDIA-GeForce-RTX-2070"
        in k8s_api.cluster.requests
    )


def test_contract_doctor_names_each_problem_and_its_fix(kfp_api, k8s_api, s3, tmp_path):
    k8s_api.cluster.namespaces.add("team-a")
    k8s_api.cluster.nodes.append(
        {
            "name": "rtx-node",
            "allocatable": {},  # no device plugin
            "labels": {"nvidia.com/gpu.product": "NVIDIA-GeForce-RTX-2070"},
        }
    )
    result = cli(
        "doctor",
        "--host",
        kfp_api.url,
        "--namespace",
        "team-a",
        "--bucket",
        "no-such-bucket",
        "--s3-endpoint-here",
        s3.url,
        token="wrong",
        KUBECONFIG=str(k8s_api.kubeconfig(tmp_path / "kubeconfig")),
        AWS_ACCESS_KEY_ID=s3.access_key,
        AWS_SECRET_ACCESS_KEY=s3.secret_key,
    )
    assert result.returncode == 1
    out = {line.split()[1]: line for line in result.stdout.splitlines()[:-1]}
    assert out["kfp-api"].startswith("FAIL") and "HTTP 401" in out["kfp-api"]
    assert out["namespace"].startswith("ok")
    assert out["secret"].startswith("FAIL") and "manifests/examples/s3-credentials.yaml" in out["secret"]
    assert out["gpu-node"].startswith("FAIL") and "no allocatable nvidia.com/gpu" in out["gpu-node"]
    assert out["bucket"].startswith("FAIL") and "bucket 'no-such-bucket' does not exist" in out["bucket"]
    assert result.stdout.splitlines()[-1] == "1 of 5 checks passed; fix: kfp-api, secret, gpu-node, bucket"


def test_contract_doctor_wants_as_many_gpus_on_one_node_as_the_runs_ask_for(kfp_api, k8s_api, tmp_path):
    k8s_api.cluster.namespaces.add("team-a")
    for name, cards in (("rtx-a", "1"), ("rtx-b", "1")):  # two GPUs, but not on one node
        k8s_api.cluster.nodes.append(
            {
                "name": name,
                "allocatable": {"nvidia.com/gpu": cards},
                "labels": {"nvidia.com/gpu.product": "NVIDIA-GeForce-RTX-2070"},
            }
        )
    kubeconfig = str(k8s_api.kubeconfig(tmp_path / "kubeconfig"))
    args = ("doctor", "--host", kfp_api.url, "--namespace", "team-a")
    two = cli(*args, "--gpus", "2", KUBECONFIG=kubeconfig)
    out = {line.split()[1]: line for line in two.stdout.splitlines()[:-1]}
    assert out["gpu-node"].startswith("FAIL"), two.stdout
    assert "rtx-a has 1, rtx-b has 1 allocatable nvidia.com/gpu, fewer than gpus=2" in out["gpu-node"]
    k8s_api.cluster.nodes[1]["allocatable"]["nvidia.com/gpu"] = "2"
    again = cli(*args, "--gpus", "2", KUBECONFIG=kubeconfig)
    out = {line.split()[1]: line for line in again.stdout.splitlines()[:-1]}
    assert out["gpu-node"].startswith("ok") and "rtx-b:" in out["gpu-node"] and ">= 2" in out["gpu-node"]


def test_contract_doctor_without_a_labelled_node_or_namespace(kfp_api, k8s_api, tmp_path):
    k8s_api.cluster.nodes.append({"name": "cpu-node", "allocatable": {}, "labels": {}})
    result = cli(
        "doctor",
        "--host",
        kfp_api.url,
        "--namespace",
        "team-b",
        KUBECONFIG=str(k8s_api.kubeconfig(tmp_path / "kubeconfig")),
    )
    assert result.returncode == 1
    out = {line.split()[1]: line for line in result.stdout.splitlines()[:-1]}
    assert "namespace team-b does not exist" in out["namespace"]
    assert "no node is labelled nvidia.com/gpu.product=NVIDIA-GeForce-RTX-2070" in out["gpu-node"]
    assert "bucket" not in out  # not asked for
