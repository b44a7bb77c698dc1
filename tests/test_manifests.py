"""manifests/: every kustomization renders, and every object is valid for the Kubernetes API."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"
KUBERNETES_VERSION = "1.32"
KUSTOMIZATIONS = sorted(p.parent for p in MANIFESTS.rglob("kustomization.yaml"))

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not installed")


def render(folder: Path) -> list[dict]:
    result = subprocess.run(
        ["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def test_validation_catches_a_wrong_field():
    """The schema check is real: a misspelt field and a wrong type are both refused."""
    deployment = next(o for o in render(MANIFESTS / "minio") if o["kind"] == "Deployment")
    deployment["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    deployment["spec"]["replicas"] = 1
    deployment["spec"]["template"]["spec"]["containers"][0]["imagee"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_there_are_kustomizations():
    assert [p.name for p in KUSTOMIZATIONS] == ["ci-access", "minio"]


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_kustomization_renders_valid_objects(folder):
    objects = render(folder)
    assert objects
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("path", sorted((MANIFESTS / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_are_valid_objects(path):
    for obj in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_the_secret_template_holds_no_values():
    (secret,) = yaml.safe_load_all((MANIFESTS / "examples" / "s3-credentials.yaml").read_text())
    assert secret["metadata"]["name"] == "mlpipeline-minio-artifact"
    assert secret["stringData"] == {"accesskey": "", "secretkey": ""}
    assert "data" not in secret


def test_no_kustomization_ships_a_secret():
    for folder in KUSTOMIZATIONS:
        assert all(obj["kind"] != "Secret" for obj in render(folder)), folder.name


def test_ci_account_is_bound_in_its_own_namespace():
    objects = {(o["kind"], o["metadata"]["name"]): o for o in render(MANIFESTS / "ci-access")}
    namespace = objects[("ServiceAccount", "retrain-ci")]["metadata"]["namespace"]
    binding = objects[("ClusterRoleBinding", "retrain-ci-node-reader")]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "retrain-ci", "namespace": namespace}]
    rules = objects[("Role", "retrain-ci")]["rules"]
    assert {"runs", "recurringruns", "pipelines/versions"} <= set(rules[0]["resources"])
    assert rules[1] == {
        "apiGroups": [""],
        "resources": ["secrets"],
        "resourceNames": ["mlpipeline-minio-artifact"],
        "verbs": ["get"],
    }


def test_minio_matches_what_the_pipeline_expects():
    import pipeline

    objects = {(o["kind"], o["metadata"]["name"]): o for o in render(MANIFESTS / "minio")}
    service = objects[("Service", "minio-service")]
    assert pipeline.Cluster().s3_endpoint == f"http://minio-service.{service['metadata']['namespace']}:9000"
    container = objects[("Deployment", "minio")]["spec"]["template"]["spec"]["containers"][0]
    secrets = {env["valueFrom"]["secretKeyRef"]["name"] for env in container["env"]}
    assert secrets == {pipeline.Cluster().secret_name}
