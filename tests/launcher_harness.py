"""Plays the KFP v2 launcher's part for a compiled pipeline, with artifacts in a real S3 endpoint.

What a cluster's launcher does around each step, and no more: resolve the task's inputs from
the compiled YAML (pipeline parameters, upstream output parameters, constants with the
`{{$.pipeline_job_name}}` placeholder), give every output artifact a `minio://<bucket>/...` URI
under the pipeline root, download the input artifacts from the bucket to the `/minio/...`
local paths the KFP executor derives from those URIs, run the container's command and args
exactly as compiled (with the executor input in place of `{{$}}`), then upload the outputs and
delete the local copies, so the next step can only get them from the bucket. The container's
environment is the compiled `env` plus the secret's keys as `secretAsEnv` maps them.

It runs the steps as local processes (no containers, no Kubernetes), honours `dsl.If`
conditions of the form the pipeline compiles to, `dsl.ParallelFor` over a task's output list
(one iteration after another, each task named `<task>-<i>`, the item's fields picked as the
YAML's `parseJson(...)["field"]` says) with `dsl.Collected` outputs, and `dsl.ExitHandler`
(the exit task runs after its group whatever happened, with the group's final status in the
backend's JSON form; a failure is raised after it), mounts an optional secret only when it
exists, and ignores resources, node selectors and retries (they need a cluster). Needs write
access to /minio (CI runs as root).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

LOCAL_MOUNT = Path("/minio")


@dataclass
class Harness:
    spec_path: Path
    bucket: str
    root_prefix: str  # pipeline root under the bucket
    client: Any  # minio client for the S3 endpoint
    secrets: dict[str, dict[str, str]]  # secret name -> {key: value}
    workdir: Path
    job_name: str = "harness-run-1"
    env: dict[str, str] = field(default_factory=dict)  # extra process environment (PATH, PYTHONPATH)
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    parameters: dict[tuple[str, str], Any] = field(default_factory=dict)  # (task, name) -> value
    artifacts: dict[tuple[str, str], dict] = field(default_factory=dict)  # (task, name) -> artifact JSON
    failed: dict[str, str] = field(default_factory=dict)  # task or group -> why

    def __post_init__(self):
        documents = list(yaml.safe_load_all(self.spec_path.read_text()))
        self.spec = documents[0]
        self.platform = (
            documents[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
            if len(documents) > 1
            else {}
        )

    def run(self, params: dict[str, Any]) -> None:
        declared = self.spec["root"]["inputDefinitions"]["parameters"]
        # The YAML holds every number as a double (1.0); the backend's JSON (Go's protojson)
        # writes a whole one as 1, which the component's json.loads reads back as an int.
        values = {
            name: int(d["defaultValue"])
            if d.get("parameterType") == "NUMBER_INTEGER" and "defaultValue" in d
            else d.get("defaultValue")
            for name, d in declared.items()
        }
        values.update(params)
        self._run_dag(self.spec["root"]["dag"], {"parameters": values, "artifacts": {}})

    def _order(self, tasks: dict) -> list[str]:
        done, order = set(), []
        while len(order) < len(tasks):
            ready = [
                n
                for n, t in sorted(tasks.items())
                if n not in done and set(t.get("dependentTasks", [])) <= done
            ]
            if not ready:
                raise RuntimeError(f"cycle among {set(tasks) - done}")
            order += ready
            done |= set(ready)
        return order

    def _resolve_parameter(self, spec: dict, scope: dict) -> Any:
        if "componentInputParameter" in spec:
            value = scope["parameters"][spec["componentInputParameter"]]
            selector = spec.get("parameterExpressionSelector")
            if selector:
                match = re.fullmatch(r'parseJson\(string_value\)\["(\w+)"\]', selector)
                if not match:
                    raise NotImplementedError(f"parameter selector {selector!r}")
                value = (json.loads(value) if isinstance(value, str) else value)[match.group(1)]
            return value
        if "taskOutputParameter" in spec:
            source = spec["taskOutputParameter"]
            return self.parameters[
                (source["producerTask"] + scope.get("suffix", ""), source["outputParameterKey"])
            ]
        if "taskFinalStatus" in spec:
            producer = spec["taskFinalStatus"]["producerTask"]
            failure = self.failed.get(producer)
            return {
                "state": "FAILED" if failure else "SUCCEEDED",
                "pipelineJobResourceName": self.job_name,
                "pipelineTaskName": producer,
                "error": {"code": 1, "message": failure} if failure else {},
            }
        constant = spec["runtimeValue"]["constant"]
        return (
            constant.replace("{{$.pipeline_job_name}}", self.job_name)
            if isinstance(constant, str)
            else constant
        )

    def _resolve_artifact(self, spec: dict, scope: dict) -> dict:
        if "componentInputArtifact" in spec:
            return scope["artifacts"][spec["componentInputArtifact"]]
        source = spec["taskOutputArtifact"]
        return self.artifacts[(source["producerTask"] + scope.get("suffix", ""), source["outputArtifactKey"])]

    def _run_dag(self, dag: dict, scope: dict) -> None:
        first_failure = None
        for name in self._order(dag["tasks"]):
            task = dag["tasks"][name]
            upstream_failed = any(dependency in self.failed for dependency in task.get("dependentTasks", []))
            exit_task = task.get("triggerPolicy", {}).get("strategy") == "ALL_UPSTREAM_TASKS_COMPLETED"
            if upstream_failed and not exit_task:
                self.failed[name] = "an upstream task failed"
                continue
            try:
                self._run_one(name, task, scope)
            except RuntimeError as error:
                name += scope.get("suffix", "")
                self.failed[name] = str(error).splitlines()[0]
                first_failure = first_failure or error
        if first_failure is not None:
            raise first_failure

    def _run_one(self, name: str, task: dict, scope: dict) -> None:
        component = self.spec["components"][task["componentRef"]["name"]]
        inputs = task.get("inputs", {})
        parameters = {k: self._resolve_parameter(v, scope) for k, v in inputs.get("parameters", {}).items()}
        artifacts = {k: self._resolve_artifact(v, scope) for k, v in inputs.get("artifacts", {}).items()}
        if "dag" in component:
            condition = task.get("triggerPolicy", {}).get("condition", "")
            if condition and not self._condition(condition, parameters):
                self.skipped.append(task["taskInfo"]["name"])
                return
            if "parameterIterator" in task:
                self._run_loop(name, task["parameterIterator"], component["dag"], parameters, artifacts)
                return
            suffix = scope.get("suffix", "")
            self._run_dag(
                component["dag"], {"parameters": parameters, "artifacts": artifacts, "suffix": suffix}
            )
        else:
            self._run_task(name + scope.get("suffix", ""), component, parameters, artifacts)

    def _run_loop(self, name: str, iterator: dict, dag: dict, parameters: dict, artifacts: dict) -> None:
        """Each item through the loop's DAG, then each DAG output collected over the iterations."""
        items = parameters[iterator["items"]["inputParameter"]]
        for index, item in enumerate(items):
            scope = {"parameters": {**parameters, iterator["itemInput"]: item}, "artifacts": artifacts}
            self._run_dag(dag, {**scope, "suffix": f"-{index}"})
        for key, output in dag.get("outputs", {}).get("artifacts", {}).items():
            (selector,) = output["artifactSelectors"]
            self.artifacts[(name, key)] = [
                self.artifacts[(selector["producerSubtask"] + f"-{index}", selector["outputArtifactKey"])]
                for index in range(len(items))
            ]

    @staticmethod
    def _condition(condition: str, parameters: dict) -> bool:
        match = re.fullmatch(r"inputs\.parameter_values\['([^']+)'\] == (true|false)", condition.strip())
        if not match:
            raise NotImplementedError(f"condition {condition!r}")
        return parameters[match.group(1)] is (match.group(2) == "true")

    def _uri(self, task: str, name: str) -> str:
        return f"minio://{self.bucket}/{self.root_prefix}/{self.job_name}/{task}/{name}"

    @staticmethod
    def _local(uri: str) -> Path:
        return LOCAL_MOUNT / uri.removeprefix("minio://")

    def _download(self, uri: str) -> None:
        key = uri.removeprefix(f"minio://{self.bucket}/")
        for item in self.client.list_objects(self.bucket, prefix=key, recursive=True):
            if item.object_name == key or item.object_name.startswith(key + "/"):
                target = LOCAL_MOUNT / self.bucket / item.object_name
                target.parent.mkdir(parents=True, exist_ok=True)
                self.client.fget_object(self.bucket, item.object_name, str(target))

    def _upload(self, uri: str) -> None:
        local = self._local(uri)
        key = uri.removeprefix(f"minio://{self.bucket}/")
        if local.is_file():
            self.client.fput_object(self.bucket, key, str(local))
        elif local.is_dir():
            for path in sorted(local.rglob("*")):
                if path.is_file():
                    name = f"{key}/{path.relative_to(local).as_posix()}"
                    self.client.fput_object(self.bucket, name, str(path))

    def _run_task(self, name: str, component: dict, parameters: dict, artifacts: dict) -> None:
        executor = self.spec["deploymentSpec"]["executors"][component["executorLabel"]]["container"]
        platform = self.platform.get(component["executorLabel"], {})
        folder = self.workdir / name
        folder.mkdir(parents=True, exist_ok=True)
        outputs = component.get("outputDefinitions", {})
        output_artifacts = {}
        for key, definition in outputs.get("artifacts", {}).items():
            output_artifacts[key] = {
                "name": key,
                "uri": self._uri(name, key),
                "metadata": {},
                "type": {"schemaTitle": definition["artifactType"]["schemaTitle"]},
            }
        executor_input = {
            "inputs": {
                "parameterValues": parameters,
                "artifacts": {
                    k: {"artifacts": v if isinstance(v, list) else [v]} for k, v in artifacts.items()
                },
            },
            "outputs": {
                "artifacts": {k: {"artifacts": [v]} for k, v in output_artifacts.items()},
                "parameters": {
                    k: {"outputFile": str(folder / f"param-{k}")} for k in outputs.get("parameters", {})
                },
                "outputFile": str(folder / "executor_output.json"),
            },
        }
        for artifact in artifacts.values():
            for each in artifact if isinstance(artifact, list) else [artifact]:
                self._download(each["uri"])
        env = {**os.environ, **self.env}
        env.update({item["name"]: item["value"] for item in executor.get("env", [])})
        for secret in platform.get("secretAsEnv", []):
            if secret["secretName"] not in self.secrets and secret.get("optional"):
                continue
            for mapping in secret["keyToEnv"]:
                env[mapping["envVar"]] = self.secrets[secret["secretName"]][mapping["secretKey"]]
        command = [
            part.replace("{{$}}", json.dumps(executor_input))
            for part in executor["command"] + executor["args"]
        ]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
        (folder / "log.txt").write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            raise RuntimeError(f"step {name} failed ({result.returncode}):\n{result.stderr[-3000:]}")
        executor_output = (
            json.loads((folder / "executor_output.json").read_text())
            if (folder / "executor_output.json").exists()
            else {}
        )
        for key, value in executor_output.get("parameterValues", {}).items():
            self.parameters[(name, key)] = value
        for key, artifact in output_artifacts.items():
            written = executor_output.get("artifacts", {}).get(key, {}).get("artifacts", [{}])[0]
            artifact["metadata"] = written.get("metadata", {})
            self._upload(artifact["uri"])
            self.artifacts[(name, key)] = artifact
        # Nothing stays on "this pod's" disk: the next step must fetch its inputs from the bucket.
        shutil.rmtree(LOCAL_MOUNT / self.bucket, ignore_errors=True)
        self.ran.append(name)


def python_path_env(repo: Path) -> dict[str, str]:
    """`python3` in the compiled command must be this interpreter, with this checkout importable."""
    return {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(repo),
    }
