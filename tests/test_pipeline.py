"""The pipeline's wiring, checked on the compiled KFP IR YAML (the contract a cluster runs)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import pipeline

REPO = Path(__file__).resolve().parent.parent
STEPS = ["preprocess", "train", "evaluate", "export"]


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("compiled") / "pipeline.yaml"
    pipeline.compile_pipeline(path, image="registry.example/retrain:1",
                              gpu_image="registry.example/retrain-gpu:1")
    return yaml.safe_load(path.read_text())


def test_four_tasks_in_order(spec):
    tasks = spec["root"]["dag"]["tasks"]
    assert sorted(tasks) == sorted(STEPS)
    assert tasks["preprocess"].get("dependentTasks", []) == []
    assert tasks["train"]["dependentTasks"] == ["preprocess"]
    assert sorted(tasks["evaluate"]["dependentTasks"]) == ["preprocess", "train"]
    assert sorted(tasks["export"]["dependentTasks"]) == ["preprocess", "train"]


def _artifact_source(spec, task: str, name: str) -> tuple[str, str]:
    source = spec["root"]["dag"]["tasks"][task]["inputs"]["artifacts"][name]["taskOutputArtifact"]
    return source["producerTask"], source["outputArtifactKey"]


def test_artifacts_flow_between_steps(spec):
    assert _artifact_source(spec, "train", "dataset") == ("preprocess", "dataset")
    assert _artifact_source(spec, "evaluate", "dataset") == ("preprocess", "dataset")
    assert _artifact_source(spec, "evaluate", "model") == ("train", "model")
    assert _artifact_source(spec, "export", "model") == ("train", "model")
    assert _artifact_source(spec, "export", "dataset") == ("preprocess", "dataset")
    components = spec["components"]
    assert components["comp-preprocess"]["outputDefinitions"]["artifacts"]["dataset"][
        "artifactType"]["schemaTitle"] == "system.Dataset"
    assert components["comp-train"]["outputDefinitions"]["artifacts"]["model"][
        "artifactType"]["schemaTitle"] == "system.Model"
    evaluate_outputs = components["comp-evaluate"]["outputDefinitions"]["artifacts"]
    assert evaluate_outputs["confusion"]["artifactType"]["schemaTitle"] == "system.ClassificationMetrics"
    assert evaluate_outputs["metrics"]["artifactType"]["schemaTitle"] == "system.Metrics"


def test_pipeline_outputs_accuracy_and_exported_model(spec):
    outputs = spec["root"]["dag"]["outputs"]
    assert outputs["parameters"]["test_accuracy"]["valueFromParameter"]["producerSubtask"] == "evaluate"
    assert outputs["artifacts"]["exported_model"]["artifactSelectors"][0] == {
        "outputArtifactKey": "servable", "producerSubtask": "export"}


def test_only_train_runs_in_the_gpu_image(spec):
    executors = spec["deploymentSpec"]["executors"]
    images = {name.removeprefix("exec-"): body["container"]["image"] for name, body in executors.items()}
    assert images == {"preprocess": "registry.example/retrain:1", "train": "registry.example/retrain-gpu:1",
                      "evaluate": "registry.example/retrain:1", "export": "registry.example/retrain:1"}
    for body in executors.values():
        # install_kfp_package=False: the image brings kfp, nothing is pip-installed at start.
        assert "pip install" not in " ".join(body["container"]["command"])


def test_parameters_and_defaults(spec):
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["source"]["parameterType"] == "STRING"
    assert params["image_size"]["defaultValue"] == 224
    assert params["weights"]["defaultValue"] == "none"


def test_step_modules_do_not_import_kfp():
    for module in sorted((REPO / "components").glob("*.py")):
        tree = ast.parse(module.read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module}
        assert "kfp" not in imported, module.name


def test_compile_cli_writes_yaml(tmp_path):
    out = tmp_path / "p.yaml"
    result = subprocess.run([sys.executable, "pipeline.py", "compile", "--output", str(out)],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout
    assert yaml.safe_load(out.read_text())["pipelineInfo"]["name"] == "efficientnet-retrain"


def test_every_step_has_a_cli():
    for step in STEPS:
        result = subprocess.run([sys.executable, "-m", f"components.{step}", "--help"], cwd=REPO,
                                capture_output=True, text=True)
        assert result.returncode == 0, (step, result.stderr)
        assert f"python -m components.{step}" in result.stdout


def test_preprocess_publishes_a_markdown_report(spec):
    outputs = spec["components"]["comp-preprocess"]["outputDefinitions"]["artifacts"]
    assert outputs["report"]["artifactType"]["schemaTitle"] == "system.Markdown"
