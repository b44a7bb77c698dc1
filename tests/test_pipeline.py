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


def _tasks(spec) -> dict:
    """Every task by name, the export inside its condition's sub-DAG included."""
    root = spec["root"]["dag"]["tasks"]
    tasks = {name: body for name, body in root.items() if not name.startswith("condition-")}
    for name, body in root.items():
        if name.startswith("condition-"):
            tasks |= spec["components"][body["componentRef"]["name"]]["dag"]["tasks"]
    return tasks


def test_four_tasks_in_order(spec):
    tasks = _tasks(spec)
    assert sorted(tasks) == sorted(STEPS)
    assert tasks["preprocess"].get("dependentTasks", []) == []
    assert tasks["train"]["dependentTasks"] == ["preprocess"]
    assert sorted(tasks["evaluate"]["dependentTasks"]) == ["preprocess", "train"]
    condition = spec["root"]["dag"]["tasks"]["condition-1"]
    assert condition["dependentTasks"] == ["evaluate", "preprocess", "train"]


def test_export_runs_only_when_evaluate_blesses_the_model(spec):
    root = spec["root"]["dag"]["tasks"]
    assert "export" not in root  # never unconditionally
    condition = root["condition-1"]
    assert condition["taskInfo"]["name"] == "blessed"
    assert condition["triggerPolicy"]["condition"] == \
        "inputs.parameter_values['pipelinechannel--evaluate-Output'] == true"
    assert condition["inputs"]["parameters"]["pipelinechannel--evaluate-Output"]["taskOutputParameter"] == {
        "outputParameterKey": "Output", "producerTask": "evaluate"}
    outputs = spec["components"]["comp-evaluate"]["outputDefinitions"]["parameters"]
    assert outputs["Output"]["parameterType"] == "BOOLEAN"


def _artifact_source(spec, task: str, name: str) -> tuple[str, str]:
    source = _tasks(spec)[task]["inputs"]["artifacts"][name]
    if "taskOutputArtifact" in source:
        source = source["taskOutputArtifact"]
        return source["producerTask"], source["outputArtifactKey"]
    # Inside the condition: a channel from the parent DAG, named pipelinechannel--<task>-<key>.
    channel = source["componentInputArtifact"]
    parent = spec["root"]["dag"]["tasks"]["condition-1"]["inputs"]["artifacts"][channel]["taskOutputArtifact"]
    return parent["producerTask"], parent["outputArtifactKey"]


def test_artifacts_flow_between_steps(spec):
    assert _artifact_source(spec, "train", "dataset") == ("preprocess", "dataset")
    assert _artifact_source(spec, "evaluate", "dataset") == ("preprocess", "dataset")
    assert _artifact_source(spec, "evaluate", "model") == ("train", "model")
    assert _artifact_source(spec, "export", "model") == ("train", "model")
    assert _artifact_source(spec, "export", "dataset") == ("preprocess", "dataset")
    assert _artifact_source(spec, "export", "evaluation") == ("evaluate", "evaluation")
    components = spec["components"]
    assert components["comp-preprocess"]["outputDefinitions"]["artifacts"]["dataset"][
        "artifactType"]["schemaTitle"] == "system.Dataset"
    assert components["comp-train"]["outputDefinitions"]["artifacts"]["model"][
        "artifactType"]["schemaTitle"] == "system.Model"
    evaluate_outputs = components["comp-evaluate"]["outputDefinitions"]["artifacts"]
    assert evaluate_outputs["confusion"]["artifactType"]["schemaTitle"] == "system.ClassificationMetrics"
    assert evaluate_outputs["metrics"]["artifactType"]["schemaTitle"] == "system.Metrics"
    assert evaluate_outputs["report"]["artifactType"]["schemaTitle"] == "system.Markdown"
    export_outputs = components["comp-export"]["outputDefinitions"]["artifacts"]
    assert export_outputs["metrics"]["artifactType"]["schemaTitle"] == "system.Metrics"


def test_pipeline_outputs_the_decision_and_the_report(spec):
    outputs = spec["root"]["dag"]["outputs"]
    assert outputs["parameters"]["blessed"]["valueFromParameter"] == {
        "outputParameterKey": "Output", "producerSubtask": "evaluate"}
    assert outputs["artifacts"]["evaluation_report"]["artifactSelectors"][0] == {
        "outputArtifactKey": "report", "producerSubtask": "evaluate"}


def test_export_records_the_pipeline_run_in_the_registry(spec):
    export = _tasks(spec)["export"]["inputs"]["parameters"]
    assert export["run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_name}}"
    for name in ("registry", "model_name", "formats"):
        assert "componentInputParameter" in export[name]


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
    assert params["registry"]["defaultValue"] == ""
    assert params["margin"]["defaultValue"] == 0.01
    assert params["max_class_drop"]["defaultValue"] == 0.1
    assert params["min_accuracy"]["defaultValue"] == 0.0


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
