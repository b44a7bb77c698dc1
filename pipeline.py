"""The retraining pipeline: preprocess -> train -> evaluate -> export, as a KFP v2 pipeline.

    python pipeline.py compile [--output pipeline.yaml]
    python pipeline.py run-local [--data SOURCE] [--image-size N] [--epochs N] [--workdir DIR]
    python pipeline.py run-local --runner docker [--image IMG --gpu-image IMG] [--bucket NAME]
    python pipeline.py submit --host URL --namespace NS --param source=minio://data/flowers [--wait]
    python pipeline.py schedule apply|list|pause|resume|delete [NAME] --host URL --namespace NS ...
    python pipeline.py doctor --host URL --namespace NS [--bucket models]
    python pipeline.py models list --registry URI --model-name NAME
    python pipeline.py promote --registry URI --model-name NAME --version N
    python pipeline.py rollback --registry URI --model-name NAME

`run-local` runs the whole pipeline on this machine through `kfp.local` (each step a
subprocess, exactly the component code a cluster runs; with `--runner docker`, each step in
its container image, data and registry in the S3-compatible store) and writes
`<workdir>/run-summary.json`. Without `--data` it generates the built-in "patterns" dataset
(`components/sample_data.py`) and trains on it at 64 px, no download, no GPU.

Each step is a thin adapter: imports inside the function (KFP ships only the function's
source into the container), one call into `components.<step>`, metrics logged.
"""


import argparse
import inspect
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from kfp import compiler, dsl
from kfp.dsl import Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

from components import docker_local
from components.blessing import BlessingConfig
from components.docker_local import DockerRunConfig
from components.evaluate import EvaluateConfig
from components.preprocess import PreprocessConfig
from components.train import PRECISIONS, TrainConfig

log = logging.getLogger("pipeline")

PIPELINE_NAME = "efficientnet-retrain"
# Images our components run in (docker/Dockerfile, FLAVOR cpu and gpu; `make images`); override
# with --image / --gpu-image to point at your own registry.
DEFAULT_IMAGE = "efficientnet-retrain:cpu"
DEFAULT_GPU_IMAGE = "efficientnet-retrain:gpu"
DEFAULT_MODEL_NAME = EvaluateConfig.model_name
BUILTIN_MODEL_NAME = "patterns"
# Built-in dataset: 64 px keeps the patterns clear and a 2-core CPU run within minutes.
BUILTIN_IMAGE_SIZE = 64
BUILTIN_EPOCHS = 15


def fingerprint(source: str, tfds_data_dir: str) -> str:
    from components import preprocess as step
    from components.cli import configure_logging

    configure_logging()
    return step.source_fingerprint(source, tfds_data_dir)


def preprocess(source: str, source_fingerprint: str, image_size: int, resize: str, tfds_data_dir: str,
               dataset: Output[Dataset], report: Output[Markdown]):
    """`source_fingerprint` is not read: as an input it puts the data's identity into the
    cache key, so a changed bucket is preprocessed again and an unchanged one is not."""
    from pathlib import Path

    from components import preprocess as step
    from components.cli import configure_logging

    configure_logging()
    manifest = step.preprocess(step.PreprocessConfig(source=source, output=Path(dataset.path),
                                                     image_size=image_size, resize=resize,
                                                     tfds_data_dir=tfds_data_dir))
    dataset.metadata.update({"classes": manifest["classes"], "image_size": image_size,
                             "fingerprint": manifest["fingerprint"],
                             "duplicates": manifest["duplicates"],
                             "label_conflicts": len(manifest["label_conflicts"]),
                             "rejected": len(manifest["rejected"]), **manifest["totals"]})
    with open(report.path, "w") as handle:
        handle.write((Path(dataset.path) / step.REPORT).read_text())


def train(dataset: Input[Dataset], epochs: int, batch_size: int, learning_rate: float,
               weights: str, weights_cache: str, min_updates: int, precision: str, checkpoint_dir: str,
               gpu_memory_limit_mib: int, backend: str, model: Output[Model], metrics: Output[Metrics]):
    from pathlib import Path

    from components import train as step
    from components.cli import configure_logging

    configure_logging()
    summary = step.train(step.TrainConfig(data=Path(dataset.path), output=Path(model.path), epochs=epochs,
                                batch_size=batch_size, learning_rate=learning_rate or None,
                                weights=weights, weights_cache=weights_cache, min_updates=min_updates,
                                precision=precision, checkpoint_dir=checkpoint_dir,
                                gpu_memory_limit_mib=gpu_memory_limit_mib, backend=backend))
    model.metadata.update({"framework": "keras", "classes": summary["classes"],
                           "image_size": summary["image_size"], "precision": summary["precision"],
                           "step_batch": summary["step_batch"], "accumulation": summary["accumulation"],
                           "gpu": summary["gpu"], "backend": summary["backend"],
                           "gpu_memory_limit_mib": summary["gpu_memory_limit_mib"]})
    if summary["best_val_accuracy"] is not None:
        metrics.log_metric("best_val_accuracy", summary["best_val_accuracy"])
        metrics.log_metric("best_epoch", summary["best_epoch"])
    metrics.log_metric("train_seconds", summary["train_seconds"])


def evaluate(dataset: Input[Dataset], model: Input[Model], registry: str, model_name: str,
             min_accuracy: float, margin: float, max_class_drop: float, metrics: Output[Metrics],
             confusion: Output[ClassificationMetrics], report: Output[Markdown],
             evaluation: Output[Artifact]) -> bool:
    """Returns whether the candidate is blessed; accuracy and reasons are in `evaluation`."""
    import shutil
    from pathlib import Path

    from components import evaluate as step
    from components.cli import configure_logging

    configure_logging()
    result = step.evaluate(step.EvaluateConfig(
        model=Path(model.path), data=Path(dataset.path), output=Path(evaluation.path), registry=registry,
        model_name=model_name, min_accuracy=min_accuracy, margin=margin, max_class_drop=max_class_drop))
    candidate = result["candidate"]
    for key, value in candidate.items():
        if isinstance(value, float):
            metrics.log_metric(key, value)
    if result["production"] and result["production"]["metrics"]:
        metrics.log_metric("production_accuracy", result["production"]["metrics"]["accuracy"])
    metrics.log_metric("blessed", float(result["decision"]["blessed"]))
    confusion.log_confusion_matrix(candidate["classes"], candidate["confusion_matrix"])
    shutil.copyfile(Path(evaluation.path) / step.REPORT, report.path)
    return result["decision"]["blessed"]


def export(model: Input[Model], dataset: Input[Dataset], evaluation: Input[Artifact], formats: str,
           registry: str, model_name: str, run_id: str, servable: Output[Model], metrics: Output[Metrics]):
    from pathlib import Path

    from components import export as step
    from components.cli import configure_logging

    configure_logging()
    info = step.export(step.ExportConfig(
        model=Path(model.path), data=Path(dataset.path), output=Path(servable.path),
        evaluation=Path(evaluation.path), formats=step.parse_formats(formats), registry=registry,
        model_name=model_name, run_id=run_id))
    verification = info["verification"]
    servable.metadata.update({"format": "tf_saved_model", "signature": "serving_default",
                              "classes": info["classes"], "formats": ["saved_model", *info["formats"]],
                              "registry": info.get("registry")})
    metrics.log_metric("max_abs_difference", verification["max_abs_difference"])
    for row in verification["latency"]["batches"]:
        metrics.log_metric(f"cpu_latency_batch{row['batch']}_p50_ms_per_image", row["p50_ms_per_image"])
        metrics.log_metric(f"cpu_latency_batch{row['batch']}_p95_ms_per_image", row["p95_ms_per_image"])
    if "registry" in info:
        metrics.log_metric("registry_version", info["registry"]["version"])


@dataclass(frozen=True)
class Resources:
    cpu_request: str
    cpu_limit: str
    memory_request: str
    memory_limit: str
    timeout_seconds: int


@dataclass(frozen=True)
class Cluster:
    """Where the steps run on Kubernetes; compile-time settings (`python pipeline.py compile`)."""

    # The GPU feature discovery label of the training node, and its value for the RTX 2070.
    gpu_label_key: str = "nvidia.com/gpu.product"
    gpu_label_value: str = "NVIDIA-GeForce-RTX-2070"
    # Object-store credentials: only the secret's name and keys go into the YAML.
    secret_name: str = "mlpipeline-minio-artifact"  # Kubeflow's own MinIO credentials
    secret_access_key_key: str = "accesskey"
    secret_secret_key_key: str = "secretkey"
    s3_endpoint: str = "http://minio-service.kubeflow:9000"  # Kubeflow's in-cluster MinIO
    run_as_user: int = 1000  # the image's USER
    # /dev/shm for the input pipeline's worker processes and TF's shared memory: Docker's
    # 64 MB default is too small for batches of 224 px images.
    shm_size: str = "2Gi"
    train_retries: int = 3  # a lost node or an eviction: the retry resumes from checkpoints
    pipeline_root: str = ""  # "" = the namespace's default (multi-user clusters set their own)


# Per step: requests sized for an RTX 2070 workstation node (8 cores, 32 GB), limits for
# peaks. train: TF + the input pipeline's decode threads + a 10k-record shuffle buffer.
RESOURCES = {
    "fingerprint": Resources("250m", "1", "512Mi", "1Gi", 15 * 60),
    "preprocess": Resources("2", "4", "4Gi", "8Gi", 6 * 3600),
    "train": Resources("4", "8", "12Gi", "16Gi", 24 * 3600),
    "evaluate": Resources("2", "4", "4Gi", "8Gi", 2 * 3600),
    "export": Resources("2", "4", "6Gi", "8Gi", 2 * 3600),  # tf2onnx holds the graph twice
}


def on_cluster(task, step: str, cluster: Cluster):
    """Resources, timeout, non-root user and object-store access for one step's pod."""
    from kfp import kubernetes

    limits = RESOURCES[step]
    (task.set_cpu_request(limits.cpu_request).set_cpu_limit(limits.cpu_limit)
         .set_memory_request(limits.memory_request).set_memory_limit(limits.memory_limit))
    kubernetes.set_timeout(task, limits.timeout_seconds)
    kubernetes.set_security_context(task, run_as_user=cluster.run_as_user, run_as_group=cluster.run_as_user,
                                    run_as_non_root=True)
    kubernetes.use_secret_as_env(task, cluster.secret_name,
                                 {cluster.secret_access_key_key: "AWS_ACCESS_KEY_ID",
                                  cluster.secret_secret_key_key: "AWS_SECRET_ACCESS_KEY"})
    task.set_env_variable("AWS_ENDPOINT_URL", cluster.s3_endpoint)  # an address, not a secret
    return task


def on_rtx2070(task, cluster: Cluster):
    """The train step, and only it: one GPU on the RTX 2070 node, shared memory, retries."""
    from kfp import kubernetes

    task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
    kubernetes.add_node_selector(task, cluster.gpu_label_key, cluster.gpu_label_value)
    # The NVIDIA GPU operator taints GPU nodes so that only pods asking for a GPU land there.
    kubernetes.add_toleration(task, key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                               size_limit=cluster.shm_size)
    # 1 min, 2 min, 4 min: long enough for a node to come back or the pod to be rescheduled.
    task.set_retry(num_retries=cluster.train_retries, backoff_duration="60s", backoff_factor=2,
                   backoff_max_duration="600s")
    return task


def build_pipeline(image: str = DEFAULT_IMAGE, gpu_image: str = DEFAULT_GPU_IMAGE,
                   cluster: Cluster | None = None):
    """The pipeline function, with components bound to the given container images.

    `cluster` adds the Kubernetes settings (placement, resources, secrets); without it the
    pipeline is for `kfp.local`, which would otherwise apply the cluster's object-store
    address to every local step.
    """

    def place(task, step: str):
        if cluster is not None:
            on_cluster(task, step, cluster)
            if step == "train":
                on_rtx2070(task, cluster)
        return task

    def component(func, base_image):
        # Our images carry kfp and this project already: installing kfp at start-up would
        # need the network and could pull a version other than the one we compiled with.
        return dsl.component(func, base_image=base_image, install_kfp_package=False)

    fingerprint_op = component(fingerprint, image)
    preprocess_op = component(preprocess, image)
    train_op = component(train, gpu_image)
    evaluate_op = component(evaluate, image)
    export_op = component(export, image)

    class Outputs(NamedTuple):
        blessed: bool
        evaluation: Artifact  # evaluation.json: metrics, production comparison, decision
        evaluation_report: Markdown

    @dsl.pipeline(name=PIPELINE_NAME,
                  description="Retrain an EfficientNet-B0 image classifier: preprocess, train, "
                              "evaluate against production, export and push only a blessed model.",
                  pipeline_root=(cluster.pipeline_root if cluster else "") or None)
    # Every default is the step config's own (tests/test_pipeline.py holds them equal);
    # learning_rate 0 stands for TrainConfig's None (pick by weights), as KFP has no null float.
    def retrain(source: str, image_size: int = PreprocessConfig.image_size,
                resize: str = PreprocessConfig.resize, epochs: int = TrainConfig.epochs,
                batch_size: int = TrainConfig.batch_size, learning_rate: float = 0.0,
                weights: str = TrainConfig.weights, weights_cache: str = TrainConfig.weights_cache,
                min_updates: int = TrainConfig.min_updates, precision: str = TrainConfig.precision,
                tfds_data_dir: str = PreprocessConfig.tfds_data_dir,
                checkpoint_dir: str = TrainConfig.checkpoint_dir,
                gpu_memory_limit_mib: int = TrainConfig.gpu_memory_limit_mib,
                backend: str = TrainConfig.backend,
                registry: str = EvaluateConfig.registry, model_name: str = DEFAULT_MODEL_NAME,
                min_accuracy: float = BlessingConfig.min_accuracy, margin: float = BlessingConfig.margin,
                max_class_drop: float = BlessingConfig.max_class_drop, export_formats: str = "") -> Outputs:
        # 1. preprocess: images -> checked, resized, sharded TFRecords + manifest. Cached by the
        #    data's fingerprint, taken fresh (never cached) from the listing each run.
        listed = place(fingerprint_op(source=source, tfds_data_dir=tfds_data_dir), "fingerprint")
        listed.set_caching_options(False)
        prepared = place(preprocess_op(source=source, source_fingerprint=listed.output,
                                       image_size=image_size, resize=resize, tfds_data_dir=tfds_data_dir),
                         "preprocess")
        # 2. train: EfficientNet-B0 on the shards (learning_rate 0 = pick by weights), on the RTX 2070
        trained = train_op(dataset=prepared.outputs["dataset"], epochs=epochs,
                           batch_size=batch_size, learning_rate=learning_rate, weights=weights,
                           weights_cache=weights_cache, min_updates=min_updates, precision=precision,
                           checkpoint_dir=checkpoint_dir,
                           gpu_memory_limit_mib=gpu_memory_limit_mib, backend=backend)
        place(trained, "train")
        # 3. evaluate: held-out test split, candidate and production side by side -> blessed?
        evaluated = place(evaluate_op(dataset=prepared.outputs["dataset"], model=trained.outputs["model"],
                                      registry=registry, model_name=model_name, min_accuracy=min_accuracy,
                                      margin=margin, max_class_drop=max_class_drop), "evaluate")
        evaluated.set_retry(num_retries=1, backoff_duration="60s")  # a registry read that timed out
        # 4. export: only a blessed model is exported, verified, pushed and made production
        # (evaluate's single return value, `Output`: kfp.local 2.17.3 resolves a condition on a
        # task output only under that name, and silently skips the branch for any other.)
        with dsl.If(evaluated.outputs["Output"] == True, name="blessed"):  # noqa: E712 (KFP condition)
            # No retry: a push that half-failed leaves an incomplete version, and a retry would
            # push a second copy; the next scheduled run is the retry.
            place(export_op(model=trained.outputs["model"], dataset=prepared.outputs["dataset"],
                            evaluation=evaluated.outputs["evaluation"], formats=export_formats,
                            registry=registry, model_name=model_name,
                            run_id=dsl.PIPELINE_JOB_NAME_PLACEHOLDER), "export")
        return Outputs(blessed=evaluated.outputs["Output"], evaluation=evaluated.outputs["evaluation"],
                       evaluation_report=evaluated.outputs["report"])

    return retrain


def compile_pipeline(output: Path, image: str = DEFAULT_IMAGE, gpu_image: str = DEFAULT_GPU_IMAGE,
                     cluster: Cluster | None = None) -> Path:
    """Write the IR YAML for a cluster (default `Cluster()` settings)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(image, gpu_image, cluster or Cluster()), str(output))
    return output


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
BUILTIN_PARAMS = {"image_size": BUILTIN_IMAGE_SIZE, "epochs": BUILTIN_EPOCHS, "weights": "none",
                  "model_name": BUILTIN_MODEL_NAME}


def pipeline_defaults() -> dict[str, Any]:
    """`retrain`'s parameters that have a default, with it."""
    parameters = inspect.signature(build_pipeline().pipeline_func).parameters
    return {name: parameter.default for name, parameter in parameters.items()
            if parameter.default is not inspect.Parameter.empty}


def run_local(*, settings: LocalRun) -> dict:
    """Run the whole pipeline through kfp.local and return the run summary.

    ImageNet weights (the default with `data`) are fetched and verified before any step
    starts, into Keras' cache folder, or with `docker` into the bucket where the train
    container finds them. The model registry defaults to `<workdir>/registry`, so consecutive
    runs in one workdir compare each new model with the one the previous blessed run put in
    production. With `docker`, every step runs in its image (kfp.local's DockerRunner) and data
    and registry go through the object store: see components/docker_local.py.
    """
    from kfp import local

    from components import pretrained
    from components.preprocess import MIN_IMAGE_SIZE

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
            raise SystemExit(f"error: --registry {registry}: the containers cannot see a local folder; "
                             "give s3://... or leave it out for s3://<bucket>/registry")
        if tfds_data_dir and "://" not in tfds_data_dir:
            raise SystemExit(f"error: --tfds-data-dir {tfds_data_dir}: the containers cannot see a local "
                             "folder; give gs://... or prepare the dataset in the image's reach")
    workdir = settings.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    summary_path = workdir / "run-summary.json"
    summary_path.unlink(missing_ok=True)  # a failed run must not leave an older run's summary
    if builtin:
        from components.sample_data import SampleDataConfig, generate

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
        data = docker_local.stage_folder(Path(data), docker.bucket,
                                         BUILTIN_MODEL_NAME if builtin else Path(data).name)
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
            pretrained.resolve(values["weights_cache"] or pretrained.default_cache(values["checkpoint_dir"]),
                               workdir / "weights")
        except pretrained.WeightsError as error:
            raise SystemExit(f"error: {error}") from None

    # The step subprocesses import `components` from this checkout, installed or not.
    repo = str(Path(__file__).resolve().parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))
    pipeline_root = workdir / "pipeline-root"
    if docker:
        runner = local.DockerRunner(**docker_local.runner_args(engine, docker, pipeline_root))
        retrain = build_pipeline(*docker.images)
    else:
        runner = local.SubprocessRunner(use_venv=False)
        retrain = build_pipeline()
    local.init(runner=runner, pipeline_root=str(pipeline_root), raise_on_error=True)
    started = time.monotonic()
    task = retrain(source=data, **values)
    from components import blessing
    from components.evaluate import EVALUATION
    from components.registry import Registry

    production = Registry(registry, model_name).production()
    production_version = production["version"] if production else None
    evaluation = json.loads((Path(task.outputs["evaluation"].path) / EVALUATION).read_text())
    summary = {
        "test_accuracy": evaluation["candidate"]["accuracy"],
        "blessed": bool(task.outputs["blessed"]),
        "decision": blessing.summary_line(evaluation["decision"]),
        "production_accuracy": ((evaluation.get("production") or {}).get("metrics") or {}).get("accuracy"),
        "evaluation_report": task.outputs["evaluation_report"].path,
        "registry": registry,
        "model_name": model_name,
        "production_version": production_version,
        # The production version as stored in a local registry: what serves after this run.
        "exported_model": (str(Path(registry) / model_name / str(production_version))
                           if production_version and "://" not in registry else None),
        "classes": evaluation["candidate"]["classes"],
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


def add_cluster_options(command: argparse.ArgumentParser) -> None:
    """What `compile` binds into the YAML: images and the Kubernetes settings of `Cluster`."""
    defaults = Cluster()
    command.add_argument("--image", default=DEFAULT_IMAGE, help="CPU step image (tag or @sha256 digest)")
    command.add_argument("--gpu-image", default=DEFAULT_GPU_IMAGE, help="train step image")
    command.add_argument("--gpu-label", default=f"{defaults.gpu_label_key}={defaults.gpu_label_value}",
                         help="KEY=VALUE node label that selects the training GPU node")
    command.add_argument("--secret", default=defaults.secret_name,
                         help="Kubernetes secret holding the object-store credentials")
    command.add_argument("--secret-keys", default=f"{defaults.secret_access_key_key},"
                                                  f"{defaults.secret_secret_key_key}",
                         help="ACCESS,SECRET: the secret's keys for the access and secret key")
    command.add_argument("--s3-endpoint", default=defaults.s3_endpoint,
                         help="object-store endpoint the pods reach (AWS_ENDPOINT_URL)")
    command.add_argument("--pipeline-root", default="",
                         help="where KFP puts artifacts (default: the namespace's own)")
    command.add_argument("--train-retries", type=int, default=defaults.train_retries)


def add_connection_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--host", default=os.environ.get("KFP_HOST", ""),
                         help="KFP API address, e.g. http://localhost:8080 (env KFP_HOST)")
    command.add_argument("--namespace", default=os.environ.get("KFP_NAMESPACE", "kubeflow"),
                         help="Kubeflow profile namespace (env KFP_NAMESPACE)")
    command.add_argument("--token-file", default="", help="file holding a bearer token (or env KFP_TOKEN)")
    command.add_argument("--ca-bundle", default="", help="CA certificates for a private TLS certificate")
    command.add_argument("--pipeline-name", default=PIPELINE_NAME,
                         help="the KFP pipeline to add a version to")
    command.add_argument("--experiment", default=PIPELINE_NAME)
    command.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                         help="a pipeline parameter (repeat); numbers and true/false are typed")


def cluster_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Cluster:
    label_key, _, label_value = args.gpu_label.partition("=")
    access, _, secret = args.secret_keys.partition(",")
    if not label_key or not label_value or not access or not secret:
        parser.error("--gpu-label takes KEY=VALUE and --secret-keys ACCESS,SECRET")
    return Cluster(gpu_label_key=label_key, gpu_label_value=label_value, secret_name=args.secret,
                   secret_access_key_key=access, secret_secret_key_key=secret,
                   s3_endpoint=args.s3_endpoint, pipeline_root=args.pipeline_root,
                   train_retries=args.train_retries)


def pipeline_params(pairs: list[str], package: Path, required: tuple[str, ...] | None = None) -> dict:
    """`NAME=VALUE` flags checked against the compiled pipeline's parameters, typed as declared.
    `required`: the parameters that must be given (default: those without a default)."""
    import yaml

    declared = next(yaml.safe_load_all(package.read_text()))["root"]["inputDefinitions"]["parameters"]
    params = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or name not in declared:
            raise SystemExit(f"error: --param {pair!r}: expected NAME=VALUE with NAME one of "
                             f"{', '.join(sorted(declared))}")
        kind = declared[name]["parameterType"]
        try:
            convert = {"NUMBER_INTEGER": int, "NUMBER_DOUBLE": float,
                       "BOOLEAN": lambda v: {"true": True, "false": False}[v.lower()]}.get(kind, str)
            params[name] = convert(value)
        except (ValueError, KeyError):
            raise SystemExit(f"error: --param {name}={value!r} is not a valid {kind.lower()}") from None
    if required is None:
        required = tuple(name for name, spec in declared.items()
                         if "defaultValue" not in spec and not spec.get("isOptional"))
    missing = sorted(n for n in required if n not in params)
    if missing:
        raise SystemExit(f"error: the pipeline needs --param {missing[0]}=... (no default)")
    return params


# run-local's own flags for pipeline parameters (the parameter's name with dashes).
LOCAL_FLAGS = ("image_size", "resize", "epochs", "batch_size", "learning_rate", "weights", "min_updates",
               "precision", "tfds_data_dir", "registry", "model_name", "min_accuracy", "margin",
               "max_class_drop", "export_formats")


def local_params(args: argparse.Namespace) -> dict[str, Any]:
    """The pipeline parameters a run-local command line sets: its named flags, then `--param`
    pairs, typed and checked against the compiled pipeline exactly as `submit` does."""
    import tempfile

    params = {name: getattr(args, name) for name in LOCAL_FLAGS if getattr(args, name) is not None}
    if args.param:
        with tempfile.TemporaryDirectory() as scratch:
            package = compile_pipeline(Path(scratch) / "pipeline.yaml")
            params |= pipeline_params(args.param, package, required=())
    return params


def run_on_cluster(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import tempfile

    import cluster as kube

    if args.command == "schedule" and args.action != "list" and not args.name:
        parser.error(f"schedule {args.action} needs a NAME")
    conn = kube.connection(args.host, args.namespace, args.token_file, args.ca_bundle)
    if args.command == "schedule" and args.action == "list":
        rows = kube.list_schedules(conn, args.experiment)
        for row in rows:
            print(f"{row['name']}\t{row['status']}\t{row['trigger']}\t{row['id']}")
        if not rows:
            print(f"no schedules in experiment {args.experiment} (namespace {args.namespace})")
        return 0
    if args.command == "schedule" and args.action in ("pause", "resume", "delete"):
        ids = kube.change_schedule(conn, args.experiment, args.name, args.action)
        print(f"{args.action}: schedule {args.name} ({', '.join(ids)})")
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        package = compile_pipeline(Path(scratch) / "pipeline.yaml", args.image, args.gpu_image,
                                   cluster_from_args(parser, args))
        params = pipeline_params(args.param, package)
        if args.command == "submit":
            stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
            result = kube.submit(conn, kube.SubmitConfig(
                package=package, pipeline_name=args.pipeline_name, experiment=args.experiment,
                run_name=args.run_name or f"{args.pipeline_name}-{stamp}", params=params, wait=args.wait,
                poll_seconds=args.poll, timeout_seconds=args.timeout))
            print(f"run {result['run_id']}: {result['state']}")
            return kube.TERMINAL_STATES.get(result["state"], 0) if args.wait else 0
        result = kube.apply_schedule(conn, kube.ScheduleConfig(
            name=args.name, package=package, pipeline_name=args.pipeline_name, experiment=args.experiment,
            params=params, cron=args.cron, timezone=args.timezone, every=args.every))
    trigger = f"cron {result['cron_utc']} UTC ({result['note']})" if result["cron_utc"] else \
        f"every {result['interval_second']} s"
    print(f"schedule {args.name} ({result['recurring_run_id']}): {trigger}"
          + (f"; replaced {', '.join(result['replaced'])}" if result["replaced"] else ""))
    return 0


def run_doctor(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import cluster as kube
    from components.cli import exit_on_user_error

    settings = cluster_from_args(parser, args)
    with exit_on_user_error(kube.ClusterError):
        conn = kube.connection(args.host, args.namespace, args.token_file, args.ca_bundle)
    checks = kube.doctor(conn, kube.DoctorConfig(
        secret_name=settings.secret_name,
        secret_keys=(settings.secret_access_key_key, settings.secret_secret_key_key),
        gpu_label_key=settings.gpu_label_key, gpu_label_value=settings.gpu_label_value,
        bucket=args.bucket, s3_endpoint=args.s3_endpoint_here or args.s3_endpoint,
        kube_context=args.kube_context))
    for check in checks:
        print(f"{'ok  ' if check.ok else 'FAIL'} {check.name:<15} {check.detail}")
    failed = [check.name for check in checks if not check.ok]
    print(f"{len(checks) - len(failed)} of {len(checks)} checks passed"
          + (f"; fix: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python pipeline.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    compile_cmd = commands.add_parser("compile", help="write the KFP IR YAML")
    compile_cmd.add_argument("--output", type=Path, default=Path("pipeline.yaml"))
    add_cluster_options(compile_cmd)
    submit_cmd = commands.add_parser("submit", help="compile, upload as a new pipeline version, start a run")
    add_cluster_options(submit_cmd)
    add_connection_options(submit_cmd)
    submit_cmd.add_argument("--run-name", default="", help="default: <pipeline name>-<UTC time>")
    submit_cmd.add_argument("--wait", action="store_true", help="follow the run; exit 1 unless it succeeds")
    submit_cmd.add_argument("--timeout", type=float, default=0, help="with --wait: stop waiting after N s")
    submit_cmd.add_argument("--poll", type=float, default=10.0, help="with --wait: seconds between checks")
    schedule_cmd = commands.add_parser("schedule",
                                       help="recurring runs: apply | list | pause | resume | delete")
    schedule_cmd.add_argument("action", choices=("apply", "list", "pause", "resume", "delete"))
    schedule_cmd.add_argument("name", nargs="?", default="", help="the schedule's name (all but list)")
    add_cluster_options(schedule_cmd)
    add_connection_options(schedule_cmd)
    schedule_cmd.add_argument("--cron", default="",
                              help='"MIN HOUR DAY MONTH WEEKDAY" (or 6 fields, seconds first), in --timezone')
    schedule_cmd.add_argument("--timezone", default="UTC", help="IANA zone the cron is meant in, e.g. "
                                                                "Europe/Berlin (converted to UTC)")
    schedule_cmd.add_argument("--every", default="", help="an interval instead of cron: 30m, 6h, 1d")
    doctor_cmd = commands.add_parser("doctor", help="pre-flight checks of a cluster before the first run")
    add_cluster_options(doctor_cmd)
    add_connection_options(doctor_cmd)
    doctor_cmd.add_argument("--bucket", default="", help="also check this bucket with the pipeline's "
                                                         "credentials (e.g. the registry's)")
    doctor_cmd.add_argument("--s3-endpoint-here", default="",
                            help="the object store as reachable from this machine (default: --s3-endpoint)")
    doctor_cmd.add_argument("--kube-context", default="", help="kubeconfig context (default: current)")
    run_cmd = commands.add_parser("run-local", help="run the pipeline here through kfp.local")
    run_cmd.add_argument("--data", default=None,
                         help="folder of class sub-folders, s3://, minio:// or gs://bucket/prefix, "
                              "or tfds:NAME[:VERSION] (default: the built-in patterns dataset)")
    run_cmd.add_argument("--tfds-data-dir", default=None,
                         help="folder or gs:// path holding prepared TFDS data (tfds: sources)")
    run_cmd.add_argument("--image-size", type=int, default=None,
                         help=f"px (default {PreprocessConfig.image_size}; {BUILTIN_IMAGE_SIZE} for the "
                              "built-in dataset)")
    run_cmd.add_argument("--resize", choices=("stretch", "pad", "crop"), default=None,
                         help=f"how a non-square image becomes square (default {PreprocessConfig.resize})")
    run_cmd.add_argument("--epochs", type=int, default=None,
                         help=f"default {TrainConfig.epochs}; {BUILTIN_EPOCHS} for the built-in dataset")
    run_cmd.add_argument("--batch-size", type=int, default=None, help=f"default {TrainConfig.batch_size}")
    run_cmd.add_argument("--learning-rate", type=float, default=None, help="default 0 = pick by --weights")
    run_cmd.add_argument("--weights", default=None,
                         help=f"none | {TrainConfig.weights} | path to EfficientNet-B0 no-top weights "
                              "(default: imagenet for --data, none for the built-in dataset)")
    run_cmd.add_argument("--min-updates", type=int, default=None,
                         help="from scratch: pass over the images more times an epoch until training "
                              "makes this many optimizer updates "
                              f"(0 = off; default {TrainConfig.min_updates})")
    run_cmd.add_argument("--precision", default=None, choices=PRECISIONS)
    run_cmd.add_argument("--workdir", type=Path, default=LocalRun.workdir)
    run_cmd.add_argument("--registry", default=None,
                         help="model registry: s3://bucket[/prefix], minio://... or a folder "
                              "(default: <workdir>/registry)")
    run_cmd.add_argument("--model-name", default=None,
                         help=f"name in the registry (default {DEFAULT_MODEL_NAME}; "
                              f"{BUILTIN_MODEL_NAME} for the built-in dataset)")
    run_cmd.add_argument("--min-accuracy", type=float, default=None,
                         help=f"bless only at or above this (default {BlessingConfig.min_accuracy})")
    run_cmd.add_argument("--margin", type=float, default=None,
                         help="bless only if accuracy >= production accuracy - margin "
                              f"(default {BlessingConfig.margin})")
    run_cmd.add_argument("--max-class-drop", type=float, default=None,
                         help="bless only if no class's recall falls more than this against production "
                              f"(default {BlessingConfig.max_class_drop})")
    run_cmd.add_argument("--export-formats", default=None, help="extra export formats: litert,onnx")
    run_cmd.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                         help="any other pipeline parameter (repeat), typed and checked as submit does: "
                              "e.g. --param checkpoint_dir=/mnt/ckpt --param gpu_memory_limit_mib=7680")
    run_cmd.add_argument("--runner", choices=("subprocess", "docker"), default="subprocess",
                         help="docker: every step in its image; data and registry through the S3 store")
    run_cmd.add_argument("--image", default=DEFAULT_IMAGE, help="docker: the CPU steps' image")
    run_cmd.add_argument("--gpu-image", default=DEFAULT_GPU_IMAGE, help="docker: the train step's image")
    run_cmd.add_argument("--bucket", default=None,
                         help="docker: bucket for the staged dataset and the registry "
                              "(default $RETRAIN_BUCKET, else retrain)")
    run_cmd.add_argument("--gpus", choices=("auto", "all", "none"), default="auto",
                         help="docker: pass the host's GPUs (kfp.local gives them to every step)")
    run_cmd.add_argument("--docker-network", default="host",
                         help="docker: the containers' network (host: the store as this host sees it)")
    run_cmd.add_argument("--env-file", type=Path, default=Path(".env"),
                         help="read unset variables (S3 endpoint, credentials, bucket) from this file, "
                              "if it exists")
    for name, text in (("promote", "point a model's production at a complete registry version"),
                       ("rollback", "point a model's production back at the version before"),
                       ("models", "list a model's registry versions with their metrics")):
        command = commands.add_parser(name, help=text)
        if name == "models":
            command.add_argument("action", choices=("list",))
        command.add_argument("--registry", required=True,
                             help="s3://bucket[/prefix], minio://... or a folder (e.g. local-run/registry)")
        command.add_argument("--model-name", required=True, dest="model")
        if name == "promote":
            command.add_argument("--version", type=int, required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    from components.cli import configure_logging, exit_on_user_error

    configure_logging()
    if args.command == "compile":
        path = compile_pipeline(args.output, args.image, args.gpu_image, cluster_from_args(parser, args))
        print(f"wrote {path}")
        return 0
    if args.command in ("submit", "schedule"):
        import cluster as kube

        with exit_on_user_error(kube.ClusterError):
            return run_on_cluster(parser, args)
    if args.command == "doctor":
        return run_doctor(parser, args)
    if args.command in ("promote", "rollback", "models"):
        from components import registry

        args.command = "list" if args.command == "models" else args.command
        with exit_on_user_error(registry.RegistryError):
            return registry.run_command(args)
    from components.cli import load_env_file
    from components.storage import StorageError

    load_env_file(args.env_file)
    docker = None
    if args.runner == "docker":
        docker = DockerRunConfig(images=(args.image, args.gpu_image), gpus=args.gpus,
                                 network=args.docker_network,
                                 bucket=args.bucket or os.environ.get("RETRAIN_BUCKET") or "retrain")
    try:
        with exit_on_user_error(docker_local.DockerError, StorageError):
            summary = run_local(settings=LocalRun(data=args.data, workdir=args.workdir, docker=docker,
                                                  params=local_params(args)))
    except RuntimeError as error:
        # kfp.local raises RuntimeError("Task ... finished with status FAILURE"); the step's
        # own error line is in the log above it.
        log.error("error: %s", error)
        return 1
    print(f"test accuracy {summary['test_accuracy']:.4f}")
    print(summary["decision"])
    if summary["blessed"]:
        print(f"exported and pushed: {summary['model_name']} version {summary['production_version']} is in "
              f"production ({summary['exported_model'] or summary['registry']})")
    else:
        serving = summary["production_version"]
        print(f"not exported; production stays at "
              f"{'version ' + str(serving) if serving else 'no version'} of {summary['model_name']}")
    print(f"evaluation report: {summary['evaluation_report']}")
    print(f"run summary: {summary['summary_path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
