"""The pipeline's wiring, checked on the compiled KFP IR YAML (the contract a cluster runs)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import commands
import pipeline
from components.blessing import BlessingConfig
from components.evaluate import EvaluateConfig
from components.export import ExportConfig
from components.preprocess import PreprocessConfig
from components.train import TrainConfig

REPO = Path(__file__).resolve().parent.parent
STEPS = ["preprocess", "train", "evaluate", "export"]
TASKS = ["fingerprint", "preprocess-slice", *STEPS]


def load_spec(text: str) -> dict:
    """The pipeline spec, with the platform (Kubernetes) spec KFP writes as a second document."""
    documents = list(yaml.safe_load_all(text))
    spec = documents[0]
    for extra in documents[1:]:
        spec.update(extra)
    return spec


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("compiled") / "pipeline.yaml"
    pipeline.compile_pipeline(
        path, image="registry.example/retrain:1", gpu_image="registry.example/retrain-gpu:1"
    )
    return load_spec(path.read_text())


GROUPS = ("exit-handler-", "for-loop-", "condition-")


def _dag(spec, group: str) -> dict:
    """The tasks of the sub-DAG whose task name starts with `group`, and that task."""
    for dag in [spec["root"]["dag"], *(c["dag"] for c in spec["components"].values() if "dag" in c)]:
        for name, body in dag["tasks"].items():
            if name.startswith(group):
                return body, spec["components"][body["componentRef"]["name"]]["dag"]["tasks"]
    raise AssertionError(f"no {group}* group")


def _tasks(spec) -> dict:
    """Every step's task by name, inside the exit handler's and the condition's sub-DAGs too."""
    tasks = dict(spec["root"]["dag"]["tasks"])
    for group in GROUPS:
        tasks |= _dag(spec, group)[1]
    return {name: body for name, body in tasks.items() if not name.startswith(GROUPS)}


def test_tasks_in_order(spec):
    tasks = _tasks(spec)
    assert sorted(tasks) == sorted([*TASKS, "notify"])
    assert tasks["fingerprint"].get("dependentTasks", []) == []
    loop, _ = _dag(spec, "for-loop-")
    assert loop["dependentTasks"] == ["fingerprint"]
    assert loop["taskInfo"]["name"] == "slices"
    assert tasks["preprocess"]["dependentTasks"] == ["for-loop-2"]
    assert tasks["train"]["dependentTasks"] == ["preprocess"]
    assert sorted(tasks["evaluate"]["dependentTasks"]) == ["preprocess", "train"]
    condition, _ = _dag(spec, "condition-")
    assert condition["dependentTasks"] == ["evaluate", "preprocess", "train"]


def test_every_step_runs_inside_the_exit_handler_and_notify_runs_last_whatever_happened(spec):
    root = spec["root"]["dag"]["tasks"]
    assert sorted(root) == ["exit-handler-1", "notify"]
    _, inside = _dag(spec, "exit-handler-")
    assert sorted(inside) == ["condition-3", "evaluate", "fingerprint", "for-loop-2", "preprocess", "train"]
    notify = root["notify"]
    assert notify["triggerPolicy"] == {"strategy": "ALL_UPSTREAM_TASKS_COMPLETED"}
    assert notify["dependentTasks"] == ["exit-handler-1"]
    parameters = notify["inputs"]["parameters"]
    assert parameters["status"] == {"taskFinalStatus": {"producerTask": "exit-handler-1"}}
    assert parameters["run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_name}}"
    assert parameters["registry"] == {"componentInputParameter": "registry"}
    assert notify["cachingOptions"] == {}  # a cached summary would report last week's run
    # The run's steps record under the same run name, in the same registry, for notify to read.
    evaluate = inside["evaluate"]["inputs"]["parameters"]
    assert evaluate["run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_name}}"
    assert evaluate["registry"] == {"componentInputParameter": "pipelinechannel--registry"}


def test_the_webhook_url_comes_from_an_optional_secret_and_only_to_notify(spec):
    kubernetes = _kubernetes(spec)
    webhook = [s for s in kubernetes["notify"]["secretAsEnv"] if s["secretName"] == "retrain-webhook"]
    assert webhook == [
        {
            "keyToEnv": [{"envVar": "RETRAIN_WEBHOOK_URL", "secretKey": "url"}],
            "optional": True,  # no secret: the summary is only logged, the run goes on
            "secretName": "retrain-webhook",
            "secretNameParameter": {"runtimeValue": {"constant": "retrain-webhook"}},
        }
    ]
    for task in TASKS:
        assert all(s["secretName"] != "retrain-webhook" for s in kubernetes[task]["secretAsEnv"]), task


def test_export_runs_only_when_evaluate_blesses_the_model(spec):
    root = spec["root"]["dag"]["tasks"]
    assert "export" not in root and "export" not in _dag(spec, "exit-handler-")[1]  # never unconditionally
    condition, _ = _dag(spec, "condition-")
    assert condition["taskInfo"]["name"] == "blessed"
    assert (
        condition["triggerPolicy"]["condition"]
        == "inputs.parameter_values['pipelinechannel--evaluate-Output'] == true"
    )
    assert condition["inputs"]["parameters"]["pipelinechannel--evaluate-Output"]["taskOutputParameter"] == {
        "outputParameterKey": "Output",
        "producerTask": "evaluate",
    }
    outputs = spec["components"]["comp-evaluate"]["outputDefinitions"]["parameters"]
    assert outputs["Output"]["parameterType"] == "BOOLEAN"


def _artifact_source(spec, task: str, name: str) -> tuple[str, str]:
    source = _tasks(spec)[task]["inputs"]["artifacts"][name]
    if "taskOutputArtifact" in source:
        source = source["taskOutputArtifact"]
        return source["producerTask"], source["outputArtifactKey"]
    # Inside the condition: a channel from the parent DAG, named pipelinechannel--<task>-<key>.
    channel = source["componentInputArtifact"]
    parent = _dag(spec, "condition-")[0]["inputs"]["artifacts"][channel]["taskOutputArtifact"]
    return parent["producerTask"], parent["outputArtifactKey"]


def test_artifacts_flow_between_steps(spec):
    assert _artifact_source(spec, "train", "dataset") == ("preprocess", "dataset")
    assert _artifact_source(spec, "evaluate", "dataset") == ("preprocess", "dataset")
    assert _artifact_source(spec, "evaluate", "model") == ("train", "model")
    assert _artifact_source(spec, "export", "model") == ("train", "model")
    assert _artifact_source(spec, "export", "dataset") == ("preprocess", "dataset")
    assert _artifact_source(spec, "export", "evaluation") == ("evaluate", "evaluation")
    components = spec["components"]
    assert (
        components["comp-preprocess"]["outputDefinitions"]["artifacts"]["dataset"]["artifactType"][
            "schemaTitle"
        ]
        == "system.Dataset"
    )
    assert (
        components["comp-train"]["outputDefinitions"]["artifacts"]["model"]["artifactType"]["schemaTitle"]
        == "system.Model"
    )
    evaluate_outputs = components["comp-evaluate"]["outputDefinitions"]["artifacts"]
    assert evaluate_outputs["confusion"]["artifactType"]["schemaTitle"] == "system.ClassificationMetrics"
    assert evaluate_outputs["metrics"]["artifactType"]["schemaTitle"] == "system.Metrics"
    assert evaluate_outputs["report"]["artifactType"]["schemaTitle"] == "system.Markdown"
    export_outputs = components["comp-export"]["outputDefinitions"]["artifacts"]
    assert export_outputs["metrics"]["artifactType"]["schemaTitle"] == "system.Metrics"


def test_pipeline_outputs_the_decision_and_the_report_from_the_exit_handler(spec):
    outputs = spec["root"]["dag"]["outputs"]
    assert outputs["parameters"]["blessed"]["valueFromParameter"] == {
        "outputParameterKey": "Output",
        "producerSubtask": "notify",
    }
    for name, key in (("evaluation_report", "report"), ("summary", "summary")):
        assert outputs["artifacts"][name]["artifactSelectors"] == [
            {"outputArtifactKey": key, "producerSubtask": "notify"}
        ]


def test_export_records_the_pipeline_run_in_the_registry(spec):
    export = _tasks(spec)["export"]["inputs"]["parameters"]
    assert export["run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_name}}"
    for name in ("registry", "model_name", "formats"):
        assert "componentInputParameter" in export[name]


def test_only_train_runs_in_the_gpu_image(spec):
    executors = spec["deploymentSpec"]["executors"]
    images = {name.removeprefix("exec-"): body["container"]["image"] for name, body in executors.items()}
    assert images == {
        "fingerprint": "registry.example/retrain:1",
        "preprocess": "registry.example/retrain:1",
        "train": "registry.example/retrain-gpu:1",
        "evaluate": "registry.example/retrain:1",
        "export": "registry.example/retrain:1",
        "notify": "registry.example/retrain:1",
        "preprocess-slice": "registry.example/retrain:1",
    }
    for body in executors.values():
        # install_kfp_package=False: the image brings kfp, nothing is pip-installed at start.
        assert "pip install" not in " ".join(body["container"]["command"])


def test_parameters_and_defaults(spec):
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["source"]["parameterType"] == "STRING"
    assert params["image_size"]["defaultValue"] == 224
    # ImageNet weights for real data (issue 16); the demo and the tests ask for none.
    assert params["weights"]["defaultValue"] == "imagenet"
    assert params["weights"]["defaultValue"] == TrainConfig.weights
    assert params["min_updates"]["defaultValue"] == TrainConfig.min_updates
    assert params["registry"]["defaultValue"] == ""
    assert params["margin"]["defaultValue"] == 0.01
    assert params["max_class_drop"]["defaultValue"] == 0.1
    assert params["min_accuracy"]["defaultValue"] == 0.0


# Each retrain parameter's step config and field; learning_rate (0 for the config's None: KFP
# has no null float) and export_formats (a string for the config's tuple) are the exceptions.
OWNERS = {
    "image_size": (PreprocessConfig, "image_size"),
    "resize": (PreprocessConfig, "resize"),
    "tfds_data_dir": (PreprocessConfig, "tfds_data_dir"),
    "partitions": (PreprocessConfig, "partitions"),
    "epochs": (TrainConfig, "epochs"),
    "batch_size": (TrainConfig, "batch_size"),
    "weights": (TrainConfig, "weights"),
    "weights_cache": (TrainConfig, "weights_cache"),
    "min_updates": (TrainConfig, "min_updates"),
    "precision": (TrainConfig, "precision"),
    "checkpoint_dir": (TrainConfig, "checkpoint_dir"),
    "gpu_memory_limit_mib": (TrainConfig, "gpu_memory_limit_mib"),
    "backend": (TrainConfig, "backend"),
    "gpus": (TrainConfig, "gpus"),
    "registry": (EvaluateConfig, "registry"),
    "model_name": (EvaluateConfig, "model_name"),
    "min_accuracy": (BlessingConfig, "min_accuracy"),
    "margin": (BlessingConfig, "margin"),
    "max_class_drop": (BlessingConfig, "max_class_drop"),
}


def test_every_pipeline_default_is_its_step_configs_own(spec):
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert set(params) == set(OWNERS) | {"source", "learning_rate", "export_formats"}
    for name, (config, field) in OWNERS.items():
        assert params[name]["defaultValue"] == getattr(config, field), name
    assert params["learning_rate"]["defaultValue"] == 0.0 and TrainConfig.learning_rate is None
    assert params["export_formats"]["defaultValue"] == "" and ExportConfig.formats == ()
    assert ExportConfig.model_name == EvaluateConfig.model_name


@pytest.mark.parametrize("command", ["run-local", "submit"])
def test_every_pipeline_parameter_is_reachable_from_run_local_and_submit(spec, tmp_path, command):
    params = spec["root"]["inputDefinitions"]["parameters"]
    values = {"STRING": "x", "NUMBER_INTEGER": "7", "NUMBER_DOUBLE": "0.5", "BOOLEAN": "true"}
    typed = {"STRING": "x", "NUMBER_INTEGER": 7, "NUMBER_DOUBLE": 0.5, "BOOLEAN": True}
    pairs = [f"{name}={values[p['parameterType']]}" for name, p in params.items() if name != "source"]
    flags = [flag for pair in pairs for flag in ("--param", pair)]
    if command == "run-local":  # the source is --data there
        args = commands.build_parser().parse_args(["run-local", *flags])
        got = commands.local_params(args)
    else:
        package = tmp_path / "pipeline.yaml"
        pipeline.compile_pipeline(package)
        got = commands.pipeline_params([*pairs, "source=s3://b/p"], package)
        assert got.pop("source") == "s3://b/p"
    assert got == {name: typed[p["parameterType"]] for name, p in params.items() if name != "source"}


def test_run_local_types_and_checks_params_as_submit_does():
    parser = commands.build_parser()
    with pytest.raises(SystemExit, match="is not a valid number_integer"):
        commands.local_params(parser.parse_args(["run-local", "--param", "epochs=ten"]))
    with pytest.raises(SystemExit, match="expected NAME=VALUE with NAME one of"):
        commands.local_params(parser.parse_args(["run-local", "--param", "epoch=10"]))
    # Its named flags are the same parameters: the later --param wins.
    args = parser.parse_args(["run-local", "--epochs", "3", "--param", "epochs=4", "--weights", "none"])
    assert commands.local_params(args) == {"epochs": 4, "weights": "none"}


def test_step_modules_do_not_import_kfp():
    for module in sorted((REPO / "components").glob("*.py")):
        tree = ast.parse(module.read_text())
        imported = {
            alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        }
        imported |= {
            node.module.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module
        }
        assert "kfp" not in imported, module.name


@pytest.mark.parametrize("adapter", ["fingerprint", "preprocess", "train", "evaluate", "export"])
def test_each_kfp_adapter_imports_everything_it_uses_in_its_own_body(adapter):
    """KFP ships only the function's source to the pod: a module-level import of pipeline.py is
    not there, and the step fails at run time with a NameError (as evaluate once did)."""
    import builtins
    import inspect
    import symtable
    import textwrap

    source = textwrap.dedent(inspect.getsource(getattr(pipeline, adapter)))
    body = next(
        table
        for table in symtable.symtable(source, adapter, "exec").get_children()
        if table.get_name() == adapter
    )
    free = {s.get_name() for s in body.get_symbols() if s.is_global() and not hasattr(builtins, s.get_name())}
    assert not free, f"{adapter} uses {sorted(free)} without importing them in its body"


def readme_parameter_table() -> dict[str, str]:
    """name -> default as the README's "Pipeline parameters" table writes them."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Pipeline parameters\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:3] for line in section.splitlines() if line.startswith("| `")]
    return {name.strip().strip("`"): default.strip().strip("`") for name, default in rows}


def test_the_readme_parameter_table_is_the_pipelines(spec):
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    expected = {}
    for name, parameter in parameters.items():
        if "defaultValue" not in parameter:
            expected[name] = "required"
        elif parameter["parameterType"] == "NUMBER_INTEGER":
            expected[name] = str(int(parameter["defaultValue"]))
        elif parameter["parameterType"] == "STRING":
            expected[name] = parameter["defaultValue"] or '""'
        else:
            expected[name] = repr(float(parameter["defaultValue"]))
    assert readme_parameter_table() == expected


def test_compile_cli_writes_yaml(tmp_path):
    out = tmp_path / "p.yaml"
    result = subprocess.run(
        [sys.executable, "pipeline.py", "compile", "--output", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout
    assert load_spec(out.read_text())["pipelineInfo"]["name"] == "efficientnet-retrain"


def test_every_step_has_a_cli():
    for step in STEPS:
        result = subprocess.run(
            [sys.executable, "-m", f"components.{step}", "--help"], cwd=REPO, capture_output=True, text=True
        )
        assert result.returncode == 0, (step, result.stderr)
        assert f"python -m components.{step}" in result.stdout


def test_preprocess_publishes_a_markdown_report(spec):
    outputs = spec["components"]["comp-preprocess"]["outputDefinitions"]["artifacts"]
    assert outputs["report"]["artifactType"]["schemaTitle"] == "system.Markdown"


def _kubernetes(spec) -> dict:
    executors = spec["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    return {name.removeprefix("exec-"): body for name, body in executors.items()}


def _containers(spec) -> dict:
    executors = spec["deploymentSpec"]["executors"]
    return {name.removeprefix("exec-"): body["container"] for name, body in executors.items()}


def test_only_train_asks_for_a_gpu_on_the_rtx2070_node(spec):
    containers, kubernetes = _containers(spec), _kubernetes(spec)
    assert containers["train"]["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    # As many GPUs as the `gpus` run parameter (default 1) says, resolved when the run starts.
    assert containers["train"]["resources"]["accelerator"]["resourceCount"] == (
        "{{$.inputs.parameters['pipelinechannel--gpus']}}"
    )
    train_inputs = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]["train"]["inputs"]["parameters"]
    assert train_inputs["pipelinechannel--gpus"] == {"componentInputParameter": "pipelinechannel--gpus"}
    assert train_inputs["gpus"] == {"componentInputParameter": "pipelinechannel--gpus"}
    assert spec["root"]["inputDefinitions"]["parameters"]["gpus"]["defaultValue"] == 1
    train = kubernetes["train"]
    assert train["nodeSelector"]["labels"] == {"nvidia.com/gpu.product": "NVIDIA-GeForce-RTX-2070"}
    assert train["tolerations"] == [{"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}]
    assert train["emptyDirMounts"] == [
        {"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": "2Gi", "volumeName": "dshm"}
    ]
    for task in TASKS:
        if task != "train":
            assert "accelerator" not in containers[task].get("resources", {}), task
            assert not {"nodeSelector", "tolerations", "emptyDirMounts"} & set(kubernetes[task]), task


def test_every_task_has_limits_a_timeout_and_runs_as_non_root(spec):
    containers, kubernetes = _containers(spec), _kubernetes(spec)
    for task in TASKS:
        resources = containers[task]["resources"]
        for key in ("resourceCpuRequest", "resourceCpuLimit", "resourceMemoryRequest", "resourceMemoryLimit"):
            assert resources[key], (task, key)
        assert kubernetes[task]["securityContext"] == {
            "runAsUser": "1000",
            "runAsGroup": "1000",
            "runAsNonRoot": True,
        }, task
        assert int(kubernetes[task]["activeDeadlineSeconds"]) > 0, task
    assert containers["train"]["resources"]["resourceMemoryLimit"] == "16Gi"


def test_train_retries_with_backoff_and_preprocess_does_not(spec):
    tasks = _tasks(spec)
    assert tasks["train"]["retryPolicy"] == {
        "backoffDuration": "60s",
        "backoffFactor": 2.0,
        "backoffMaxDuration": "600s",
        "maxRetryCount": 3,
    }
    for task in ("fingerprint", "preprocess", "export"):
        assert "retryPolicy" not in tasks[task], task


def test_credentials_come_only_from_the_secret(spec):
    containers, kubernetes = _containers(spec), _kubernetes(spec)
    for task in TASKS:
        (secret,) = kubernetes[task]["secretAsEnv"]
        assert secret["secretName"] == "mlpipeline-minio-artifact"
        assert secret["keyToEnv"] == [
            {"envVar": "AWS_ACCESS_KEY_ID", "secretKey": "accesskey"},
            {"envVar": "AWS_SECRET_ACCESS_KEY", "secretKey": "secretkey"},
        ]
        assert containers[task]["env"] == [
            {"name": "AWS_ENDPOINT_URL", "value": "http://minio-service.kubeflow:9000"}
        ]


def test_preprocess_reads_slices_in_parallel_each_cached_by_its_files_fingerprint_taken_fresh_each_run(spec):
    tasks = _tasks(spec)
    assert tasks["fingerprint"]["cachingOptions"] == {}  # caching off: the listing runs every time
    partitions = tasks["fingerprint"]["inputs"]["parameters"]["partitions"]
    assert partitions == {"componentInputParameter": "pipelinechannel--partitions"}
    loop, _ = _dag(spec, "for-loop-")
    iterator = loop["parameterIterator"]
    items = iterator["items"]["inputParameter"]
    assert loop["inputs"]["parameters"][items]["taskOutputParameter"] == {
        "outputParameterKey": "Output",
        "producerTask": "fingerprint",
    }
    sliced = tasks["preprocess-slice"]
    assert sliced["cachingOptions"] == {"enableCache": True}
    for name, field in (("slice_fingerprint", "fingerprint"), ("partition", "partition")):
        assert sliced["inputs"]["parameters"][name] == {
            "componentInputParameter": iterator["itemInput"],
            "parameterExpressionSelector": f'parseJson(string_value)["{field}"]',
        }
    # The merge takes every slice's output at once (dsl.Collected), and is cached too.
    assert tasks["preprocess"]["cachingOptions"] == {"enableCache": True}
    parts = tasks["preprocess"]["inputs"]["artifacts"]["parts"]["taskOutputArtifact"]
    assert parts == {
        "outputArtifactKey": "pipelinechannel--preprocess-slice-part",
        "producerTask": "for-loop-2",
    }
    merge_inputs = spec["components"]["comp-preprocess"]["inputDefinitions"]["artifacts"]["parts"]
    assert merge_inputs["isArtifactList"] is True


def test_evaluate_and_export_are_never_replayed_from_the_cache(spec):
    """They read and write the registry: a cached evaluate would repeat last week's blessing
    after a rollback, a cached export would skip the push."""
    tasks = _tasks(spec)
    assert tasks["evaluate"]["cachingOptions"] == {}
    assert tasks["export"]["cachingOptions"] == {}
    assert tasks["train"]["cachingOptions"] == {"enableCache": True}


def test_no_canary_credential_reaches_the_yaml(tmp_path):
    """Compiled with credentials in the environment, as on a developer's laptop."""
    import os
    import secrets

    canaries = {
        "AWS_ACCESS_KEY_ID": "AKIA" + secrets.token_hex(8).upper(),
        "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30),
        "MINIO_ACCESS_KEY": secrets.token_hex(10),
        "MINIO_SECRET_KEY": secrets.token_hex(20),
    }
    out = tmp_path / "p.yaml"
    result = subprocess.run(
        [sys.executable, "pipeline.py", "compile", "--output", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, **canaries},
    )
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    assert "AWS_SECRET_ACCESS_KEY" in text  # the variable is wired, by name only
    for value in canaries.values():
        assert value not in text


def test_compile_options_change_the_cluster_settings(tmp_path):
    out = tmp_path / "p.yaml"
    result = subprocess.run(
        [
            sys.executable,
            "pipeline.py",
            "compile",
            "--output",
            str(out),
            "--gpu-label",
            "node.example/gpu=rtx2070",
            "--secret",
            "team-s3",
            "--secret-keys",
            "id,key",
            "--s3-endpoint",
            "https://s3.example:9000",
            "--pipeline-root",
            "minio://team/pipelines",
            "--image",
            "reg.example/retrain@sha256:" + "a" * 64,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    spec = load_spec(out.read_text())
    kubernetes = _kubernetes(spec)
    assert kubernetes["train"]["nodeSelector"]["labels"] == {"node.example/gpu": "rtx2070"}
    assert kubernetes["evaluate"]["secretAsEnv"][0]["secretName"] == "team-s3"
    assert kubernetes["evaluate"]["secretAsEnv"][0]["keyToEnv"][0]["secretKey"] == "id"
    assert _containers(spec)["export"]["env"][0]["value"] == "https://s3.example:9000"
    assert _containers(spec)["export"]["image"] == "reg.example/retrain@sha256:" + "a" * 64
    assert spec["defaultPipelineRoot"] == "minio://team/pipelines"


def test_pipeline_root_is_left_to_the_cluster_by_default(spec):
    assert "defaultPipelineRoot" not in spec


def test_the_local_pipeline_carries_no_cluster_settings(tmp_path):
    """kfp.local would apply the in-cluster store address to local steps."""
    from kfp import compiler

    out = tmp_path / "local.yaml"
    compiler.Compiler().compile(pipeline.build_pipeline(), str(out))
    spec = load_spec(out.read_text())
    assert "platforms" not in spec
    assert all("env" not in container for container in _containers(spec).values())


def test_pipeline_py_is_the_pipeline_and_its_runners_live_beside_it():
    """The DAG file holds no command line and no local runner (issue: files that show the design)."""
    tree = ast.parse((REPO / "pipeline.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"argparse", "kfp.local", "local_run", "cluster"}
    defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef | ast.ClassDef)}
    assert {"build_pipeline", "compile_pipeline", "on_cluster", "on_rtx2070", "train"} <= defined
    assert not defined & {"run_local", "main", "build_parser"}
