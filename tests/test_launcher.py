"""The compiled pipeline with its artifacts in an S3 bucket, as on a cluster: a launcher harness.

`tests/launcher_harness.py` plays the KFP launcher around each step of the compiled YAML:
artifact URIs `minio://<bucket>/...`, inputs downloaded to the `/minio/...` paths the KFP
executor reads, outputs uploaded after the step and the local copies deleted, credentials
from the secret as the YAML maps them. The S3 endpoint is moto's server (standing in for
MinIO). No Kubernetes: resources, placement and retries are not exercised here.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

import pipeline
from tests import launcher_harness

REPO = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.launcher,
    pytest.mark.skipif(
        os.geteuid() != 0 and not os.access("/", os.W_OK),
        reason="the KFP executor's /minio mount needs root (CI runs as root)",
    ),
]


def _harness(s3, tmp_path: Path, webhook_secret: dict[str, str] | None = None) -> launcher_harness.Harness:
    """The compiled pipeline for this S3 endpoint, a fresh pipeline-root bucket, and the secrets
    as `kubectl create secret` would hold them (the webhook's only when given)."""
    client = s3.client()
    bucket = f"mlpipeline-{uuid.uuid4().hex[:12]}"
    client.make_bucket(bucket)
    secrets = {"mlpipeline-minio-artifact": {"accesskey": s3.access_key, "secretkey": s3.secret_key}}
    if webhook_secret is not None:
        secrets["retrain-webhook"] = webhook_secret
    spec = pipeline.compile_pipeline(tmp_path / "pipeline.yaml", cluster=pipeline.Cluster(s3_endpoint=s3.url))
    return launcher_harness.Harness(
        spec_path=spec,
        bucket=bucket,
        root_prefix="v2/artifacts",
        client=client,
        secrets=secrets,
        workdir=tmp_path / "launcher",
        env=launcher_harness.python_path_env(REPO),
    )


def test_compiled_pipeline_runs_with_every_artifact_passing_through_the_bucket(
    s3, tmp_path, monkeypatch, webhook
):
    from components.registry import Registry
    from components.sample_data import SampleDataConfig, generate

    harness = _harness(s3, tmp_path, webhook_secret={"url": webhook.url})
    client, bucket = harness.client, harness.bucket
    for name in ("datasets", "models"):
        client.make_bucket(name)
    # The data of the blessed first run of tests/test_run_local.py: 100 images per class,
    # 64 px, 20 epochs (test accuracy 0.67 to 0.82 there against a bar of 0.33), so every step runs.
    source = generate(SampleDataConfig(output=tmp_path / "images", images_per_class=100, seed=1))
    s3.upload_folder(source, "datasets", "patterns")
    harness.run(
        {
            "source": "minio://datasets/patterns",
            "image_size": 64,
            "resize": "pad",
            "epochs": 20,
            "batch_size": 16,
            "weights": "none",
            "registry": "minio://models",
            "model_name": "patterns",
            "partitions": 2,
        }
    )

    slices = ["preprocess-slice-0", "preprocess-slice-1"]  # partitions=2: the loop ran twice
    assert harness.ran == ["fingerprint", *slices, "preprocess", "train", "evaluate", "export", "notify"]
    (posted,) = webhook.received  # the exit handler, with the URL from the webhook secret
    assert (posted["run"], posted["status"], posted["blessed"]) == (harness.job_name, "SUCCEEDED", True)
    assert (posted["version_pushed"], posted["promoted"]) == (1, True)
    assert harness.parameters[("evaluate", "Output")] is True
    slices = harness.parameters[("fingerprint", "Output")]  # each slice with its listing's sha256
    assert [item["partition"] for item in slices] == [0, 1]
    assert all(len(item["fingerprint"]) == 64 for item in slices)

    root = f"v2/artifacts/{harness.job_name}"
    stored = {item.object_name for item in client.list_objects(bucket, prefix=root, recursive=True)}
    for key in (
        "preprocess-slice-0/part/partial.json",
        "preprocess-slice-1/part/partial.json",
        "preprocess/dataset/manifest.json",
        "preprocess/dataset/_COMPLETE",
        "preprocess/report",
        "train/model/model.keras",
        "train/model/train_config.json",
        "evaluate/evaluation/evaluation.json",
        "evaluate/report",
        "export/servable/saved_model/saved_model.pb",
        "export/servable/model_card.md",
        "notify/summary/summary.json",
    ):
        assert f"{root}/{key}" in stored, key
    assert not (launcher_harness.LOCAL_MOUNT / bucket).exists()  # every input came from the bucket

    manifest = json.loads(client.get_object(bucket, f"{root}/preprocess/dataset/manifest.json").read())
    assert manifest["source"] == "minio://datasets/patterns"
    assert harness.artifacts[("preprocess", "dataset")]["metadata"]["fingerprint"] == manifest["fingerprint"]

    for key, value in s3.env().items():  # this test process reads the registry too
        monkeypatch.setenv(key, value)
    registry = Registry("minio://models", "patterns")
    assert registry.production()["version"] == 1
    assert registry.manifest(1)["run_id"] == harness.job_name  # the {{$.pipeline_job_name}} placeholder


def test_a_run_that_fails_still_runs_its_exit_handler_which_without_the_secret_only_logs(s3, tmp_path):
    harness = _harness(s3, tmp_path)
    client, bucket = harness.client, harness.bucket
    with pytest.raises(RuntimeError, match="step fingerprint failed"):
        harness.run({"source": f"minio://{bucket}/no-such-dataset", "registry": f"minio://{bucket}/models"})
    assert harness.ran == ["notify"]  # the optional secret is absent: the step starts all the same
    key = f"v2/artifacts/{harness.job_name}/notify/summary/summary.json"
    summary = json.loads(client.get_object(bucket, key).read())
    assert (summary["status"], summary["failed_step"]) == ("FAILED", "fingerprint, preprocess or train")
    assert summary["delivered"] is False
    assert "notify" not in harness.failed
