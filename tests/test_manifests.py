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


# KServe's InferenceService is a custom resource, outside kubernetes-validate's schemas: its
# v1beta1 schema is taken from KServe's own CRD (the "source" inside says which commit).
ISVC_SCHEMA = Path(__file__).resolve().parent / "schemas" / "inferenceservice-v1beta1.json.gz"
INFERENCE_SERVICE = MANIFESTS / "serving" / "inferenceservice.yaml"


def strict(schema):
    """The CRD schema refusing fields it does not name, as `kubectl apply --validate=strict`
    does (a structural schema alone would drop a misspelt field without a word)."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


def validate_inference_service(obj: dict) -> None:
    import gzip
    import json

    import jsonschema

    schema = json.loads(gzip.decompress(ISVC_SCHEMA.read_bytes()))["openAPIV3Schema"]
    jsonschema.validate(obj, strict(schema))


def test_the_inference_service_is_valid_for_kserves_v1beta1_schema():
    (service,) = yaml.safe_load_all(INFERENCE_SERVICE.read_text())
    assert (service["apiVersion"], service["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    validate_inference_service(service)


def test_the_inference_service_runs_our_server_with_the_pipelines_credentials_and_routes():
    """What the schema cannot know: the command is components.serve with flags it accepts,
    the readiness probe is the V1 route of the model it serves, the secret is the pipeline's."""
    from components.serve import build_parser
    from pipeline import Cluster

    (service,) = yaml.safe_load_all(INFERENCE_SERVICE.read_text())
    (container,) = service["spec"]["predictor"]["containers"]
    assert container["command"] == ["python3", "-m", "components.serve"]
    args = build_parser().parse_args(container["args"])
    assert container["readinessProbe"]["httpGet"] == {
        "path": f"/v1/models/{args.model_name}",
        "port": args.port,
    }
    assert container["ports"][0]["containerPort"] == args.port
    secrets = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    cluster = Cluster()
    assert secrets == {
        "AWS_ACCESS_KEY_ID": {"name": cluster.secret_name, "key": cluster.secret_access_key_key},
        "AWS_SECRET_ACCESS_KEY": {"name": cluster.secret_name, "key": cluster.secret_secret_key_key},
    }


def test_the_inference_service_check_refuses_a_misspelt_field_and_a_wrong_type():
    import jsonschema

    (service,) = yaml.safe_load_all(INFERENCE_SERVICE.read_text())
    service["spec"]["predictor"]["containers"][0]["imagee"] = "x"
    with pytest.raises(jsonschema.ValidationError, match="imagee"):
        validate_inference_service(service)
    (service,) = yaml.safe_load_all(INFERENCE_SERVICE.read_text())
    service["spec"]["predictor"]["minReplicas"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        validate_inference_service(service)


def test_the_artifact_expiry_job_runs_the_lifecycle_command_with_flags_it_accepts():
    from components.lifecycle import build_parser

    (job,) = yaml.safe_load_all((MANIFESTS / "examples" / "artifact-expiry-job.yaml").read_text())
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["python3", "-m", "components.lifecycle"]
    args = build_parser().parse_args(container["args"])
    assert args.days == 30 and args.protect and not args.show
