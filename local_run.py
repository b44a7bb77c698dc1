"""Run the pipeline on this machine through `kfp.local`: each step a subprocess running exactly
the component code a cluster runs, or with `--runner docker` each step in its container image,
data and registry in the S3-compatible store (components/docker_local.py). Writes
`<workdir>/run-summary.json`. Without data it generates the built-in "patterns" dataset
(components/sample_data.py) and trains on it at 64 px, from scratch: no download, no GPU.

    python pipeline.py run-local [--data SOURCE] [--param NAME=VALUE ...]
"""

from __future__ import annotations

import builtins
import collections
import inspect
import io
import json
import logging
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from kfp import local
from kfp.local import docker_task_handler

from components import docker_local, notify, pretrained
from components.docker_local import DockerRunConfig
from components.preprocess import MIN_IMAGE_SIZE
from components.registry import Registry
from components.sample_data import SampleDataConfig, generate
from pipeline import PIPELINE_NAME, build_pipeline

log = logging.getLogger("pipeline")

BUILTIN_MODEL_NAME = "patterns"
# Built-in dataset: 64 px keeps the patterns clear and a 2-core CPU run within minutes.
BUILTIN_IMAGE_SIZE = 64
BUILTIN_EPOCHS = 15


@dataclass(frozen=True)
class LocalRun:
    """One `run-local`: the data, the work folder and the pipeline parameters it sets; the rest
    take `retrain`'s defaults (the step configs' own), or for the built-in dataset the demo's."""

    data: str | None = None  # None: the built-in patterns dataset
    workdir: Path = Path("local-run")
    params: dict[str, Any] = field(default_factory=dict)  # retrain's parameters, by name (not source)
    docker: DockerRunConfig | None = None  # every step in its image, data and registry in the bucket


# The built-in demo: 64 px keeps the patterns clear and a 2-core CPU run within minutes; from
# scratch because it must run offline.
BUILTIN_PARAMS = {
    "image_size": BUILTIN_IMAGE_SIZE,
    "epochs": BUILTIN_EPOCHS,
    "weights": "none",
    "model_name": BUILTIN_MODEL_NAME,
}


def pipeline_defaults() -> dict[str, Any]:
    """`retrain`'s parameters that have a default, with it."""
    parameters = inspect.signature(build_pipeline().pipeline_func).parameters
    return {
        name: parameter.default
        for name, parameter in parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }


ANSI = re.compile(r"\x1b\[[0-9;]*m")
STARTED = re.compile(r"Executing task '([^']+)'")
FINISHED = re.compile(r"Task '([^']+)' finished with status (\w+)")
# A line of our steps' logging: KFP's executor format inside a task ("[KFP Executor <time>
# LEVEL]: message"), components/cli.configure_logging's elsewhere ("<time> LEVEL logger: message").
OUR_LINE = re.compile(
    r"^\s*(?:\[KFP Executor \S+ \S+ (?P<kfp>[A-Z]+)\]|\d{4}-\d\d-\d\d \S+ (?P<ours>[A-Z]+) [\w.]+)"
    r": (?P<message>.*)$"
)
# The messages worth a person's eye while a step runs: progress with its rate, each epoch,
# the step's key figure. Every warning and error is shown too.
SHOWN = re.compile(
    r"^(found \d+ files|\w+: \d+/\d+ \(\d+%\)|wrote .*rejected \d+ file|epoch \d+/\d+:|test accuracy|"
    r"production version|BLESSED|NOT BLESSED|verified in a fresh process|\S+ version \d+ is complete|"
    r"\S+ production:|retraining run |summary posted to|no webhook configured)"
)
EPOCH = re.compile(r"^epoch (\d+)/(\d+):")


class StepProgress(io.TextIOBase):
    """What `run-local` prints while kfp.local runs, in place of its ~700 lines: one line as each
    step starts and ends (status, time), the step's progress and key figures, an ETA during
    training, and on a failure the step's last lines. Everything kfp.local and the steps print
    goes to `log_path` whole. Stands in for sys.stdout (kfp.local prints there, and relays each
    step process's output there)."""

    def __init__(self, log_path: Path, terminal: TextIO):
        self.log_path = log_path
        self.log: TextIO | None = None  # opened at the first output: a run refused before it writes nothing
        self.terminal = terminal
        self.partial = ""
        self.started: dict[str, float] = {}
        self.step = ""
        self.recent: collections.deque[str] = collections.deque(maxlen=25)

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if self.log is None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self.log = open(self.log_path, "w", encoding="utf-8")  # noqa: SIM115 (closed in close())
            self._say(f"full logs: {self.log_path} (--verbose prints them here)")
        self.log.write(text)
        self.partial += text
        *lines, self.partial = self.partial.split("\n")
        for line in lines:
            self._line(ANSI.sub("", line).rstrip())
        return len(text)

    def flush(self) -> None:
        if self.log is not None:
            self.log.flush()
        self.terminal.flush()

    def close(self) -> None:
        if not self.closed:
            super().close()  # flushes first, through flush() above, while the log is open
            if self.log is not None:
                self.log.close()

    def _say(self, text: str) -> None:
        self.terminal.write(text + "\n")
        self.terminal.flush()

    def _line(self, line: str) -> None:
        if started := STARTED.search(line):
            self.step = started[1]
            self.started[self.step] = time.monotonic()
            self.recent.clear()
            self._say(f"{self.step:<12} started")
            return
        if finished := FINISHED.search(line):
            name, state = finished[1], finished[2]
            seconds = time.monotonic() - self.started.get(name, time.monotonic())
            self._say(f"{name:<12} {state.lower()} in {seconds:,.0f} s")
            if state != "SUCCESS":
                for kept in self.recent:
                    self._say(f"{'':12} | {kept}")
            return
        if line.strip():
            self.recent.append(line.strip())
        ours = OUR_LINE.match(line)
        if ours:
            level, message = ours["kfp"] or ours["ours"], ours["message"]
            if level in ("WARNING", "ERROR") or SHOWN.match(message):
                self._say(f"{'':12} {message[:160]}{self._eta(message)}")

    def _eta(self, message: str) -> str:
        epoch = EPOCH.match(message)
        if not epoch or self.step not in self.started:
            return ""
        done, total = int(epoch[1]), int(epoch[2])
        elapsed = time.monotonic() - self.started[self.step]
        return f"  [ETA {elapsed / done * (total - done):,.0f} s]" if done < total else ""


def run_container(client, image: str, command: list[str], volumes: dict, **container_run_args) -> int:
    """kfp.local's `run_docker_container` (2.17.3), except that the container is removed only
    after its exit code is read. kfp starts it with auto_remove=True and asks for the exit
    code after streaming its logs; a step that fails within a second is often removed by then,
    and kfp takes the NotFound for success: the failed step is reported SUCCESS and the next
    one fails on a missing output, its reason lost (seen in CI with a missing bucket prefix)."""
    image = docker_task_handler.add_latest_tag_if_not_present(image=image)
    if not any(image in (found.tags + found.attrs["RepoDigests"]) for found in client.images.list()):
        print(f"Pulling image {image!r}")
        client.images.pull(image)
    container = client.containers.run(
        image=image,
        command=command,
        detach=True,
        stdout=True,
        stderr=True,
        volumes=volumes,
        **container_run_args,
    )
    try:
        for line in container.logs(stream=True):
            print(line.decode(), end="")
        return container.wait()["StatusCode"]
    finally:
        container.remove(force=True)


def use_exit_codes() -> None:
    """Make kfp.local's DockerRunner read every step's real exit code (`run_container`)."""
    docker_task_handler.run_docker_container = run_container


def report_interrupted(pipeline_root: Path, registry: str, model_name: str) -> None:
    """The exit handler's summary for a run stopped with Ctrl-C, which takes kfp.local down with
    its steps: the run is the newest one in `pipeline_root` (kfp.local names its folder)."""
    runs = sorted(
        (path for path in pipeline_root.glob(f"{PIPELINE_NAME}-*") if path.is_dir()),
        key=lambda path: path.stat().st_mtime,
    )
    try:
        notify.notify(
            notify.NotifyConfig(
                status=notify.CANCELED,
                run_name=runs[-1].name if runs else PIPELINE_NAME,
                registry=registry,
                model_name=model_name,
                error="run-local was interrupted",
                webhook_url=os.environ.get(notify.WEBHOOK_ENV, ""),
            )
        )
    except notify.NotifyError as error:
        log.error("error: %s", error)


def run_local(*, settings: LocalRun) -> dict:
    """Run the whole pipeline through kfp.local and return the run summary.

    ImageNet weights (the default with `data`) are fetched and verified before any step
    starts, into Keras' cache folder, or with `docker` into the bucket where the train
    container finds them. The model registry defaults to `<workdir>/registry`, so consecutive
    runs in one workdir compare each new model with the one the previous blessed run put in
    production. With `docker`, every step runs in its image (kfp.local's DockerRunner) and data
    and registry go through the object store: see components/docker_local.py.
    """
    data, docker = settings.data, settings.docker
    builtin = data is None
    if "source" in settings.params:
        raise SystemExit("error: run-local takes the source as --data, not --param source=...")
    values = pipeline_defaults() | (BUILTIN_PARAMS if builtin else {}) | settings.params
    image_size, epochs, weights = values["image_size"], values["epochs"], values["weights"]
    # Checked here too so that a typo fails in a second, not after a kfp.local start-up.
    if image_size < MIN_IMAGE_SIZE:
        raise SystemExit(f"error: --image-size must be at least {MIN_IMAGE_SIZE} px, got {image_size}")
    if epochs < 1:
        raise SystemExit(f"error: --epochs must be at least 1, got {epochs}")
    if values["partitions"] < 1:
        raise SystemExit(f"error: --param partitions must be at least 1, got {values['partitions']}")
    if values["min_updates"] < 0:
        raise SystemExit(f"error: --min-updates must be 0 (off) or more, got {values['min_updates']}")
    local_folder = not builtin and "://" not in data and not data.startswith("tfds:")
    if local_folder and not Path(data).is_dir():
        raise SystemExit(f"error: --data {data} is not a folder of class sub-folders")

    registry, tfds_data_dir = values["registry"], values["tfds_data_dir"]
    if docker:
        engine = docker_local.client()
        docker_local.check_images(engine, docker.images)
        docker_local.check_store(docker.bucket)
        if registry and "://" not in registry:
            raise SystemExit(
                f"error: --registry {registry}: the containers cannot see a local folder; "
                "give s3://... or leave it out for s3://<bucket>/registry"
            )
        if tfds_data_dir and "://" not in tfds_data_dir:
            raise SystemExit(
                f"error: --tfds-data-dir {tfds_data_dir}: the containers cannot see a local "
                "folder; give gs://... or prepare the dataset in the image's reach"
            )
    workdir = settings.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    summary_path = workdir / "run-summary.json"
    summary_path.unlink(missing_ok=True)  # a failed run must not leave an older run's summary
    if builtin:
        data_dir = workdir / "builtin-patterns"
        if not data_dir.exists():
            # Generated aside and renamed, so an interrupted run never leaves half a dataset
            # that the next run would take for the whole one.
            partial = workdir / ".builtin-patterns.partial"
            shutil.rmtree(partial, ignore_errors=True)
            generate(SampleDataConfig(output=partial))
            partial.rename(data_dir)
        data = str(data_dir)
        log.info("no --data given: using the built-in patterns dataset in %s", data_dir)
    elif local_folder:
        data = str(Path(data).resolve())

    model_name = values["model_name"]
    if docker and (builtin or local_folder):
        data = docker_local.stage_folder(
            Path(data), docker.bucket, BUILTIN_MODEL_NAME if builtin else Path(data).name
        )
    if not registry:
        registry = f"s3://{docker.bucket}/registry" if docker else str(workdir / "registry")
    elif "://" not in registry:
        registry = str(Path(registry).resolve())
    values["registry"] = registry
    if docker and not values["weights_cache"]:
        values["weights_cache"] = f"s3://{docker.bucket}/weights"
    if weights == "imagenet":
        # Now, not minutes later in the train step: an offline machine gets the one line at once.
        try:
            pretrained.resolve(
                values["weights_cache"] or pretrained.default_cache(values["checkpoint_dir"]),
                workdir / "weights",
            )
        except pretrained.WeightsError as error:
            raise SystemExit(f"error: {error}") from None

    # The step subprocesses import `components` from this checkout, installed or not.
    repo = str(Path(__file__).resolve().parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))
    pipeline_root = workdir / "pipeline-root"
    if docker:
        runner = local.DockerRunner(**docker_local.runner_args(engine, docker, pipeline_root))
        use_exit_codes()
        retrain = build_pipeline(*docker.images)
    else:
        runner = local.SubprocessRunner(use_venv=False)
        retrain = build_pipeline()
    local.init(runner=runner, pipeline_root=str(pipeline_root), raise_on_error=True)
    started = time.monotonic()
    with warnings.catch_warnings():
        # Once per step: the subprocess runner's notice that the component names a container
        # image (ours) while it runs in this environment, which is what run-local intends.
        warnings.filterwarnings(
            "ignore", message="You may be attemping to run a task", category=RuntimeWarning
        )
        printer = builtins.print
        try:
            task = retrain(source=data, **values)
        except KeyboardInterrupt:
            # kfp.local dies with its steps, before the exit handler: report here instead.
            report_interrupted(pipeline_root, registry, model_name)
            raise
        finally:
            # kfp.local 2.17.3 indents a step's output by swapping builtins.print, which tasks
            # running at once (the preprocess slices) leave swapped: every later line indented.
            builtins.print = printer

    production = Registry(registry, model_name).production()
    production_version = production["version"] if production else None
    # The exit handler's summary (components/notify.py), what a webhook received.
    run = json.loads((Path(task.outputs["summary"].path) / notify.SUMMARY).read_text())
    summary = {
        "run": run["run"],
        "test_accuracy": run["accuracy"],
        "blessed": bool(task.outputs["blessed"]),
        "decision": run["decision"],
        "production_accuracy": run["production_accuracy"],
        "version_pushed": run["version_pushed"],
        "notified": run["delivered"],
        "evaluation_report": task.outputs["evaluation_report"].path,
        "registry": registry,
        "model_name": model_name,
        "production_version": production_version,
        # The production version as stored in a local registry: what serves after this run.
        "exported_model": (
            str(Path(registry) / model_name / str(production_version))
            if production_version and "://" not in registry
            else None
        ),
        "classes": run["classes"],
        "source": data,
        "image_size": image_size,
        "resize": values["resize"],
        "epochs": epochs,
        "weights": weights,
        "min_updates": values["min_updates"],
        "pipeline_root": str(pipeline_root),
        "runner": "docker" if docker else "subprocess",
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    summary["summary_path"] = str(summary_path)
    return summary
