"""The retraining pipeline: preprocess -> train -> evaluate -> export, as a KFP v2 pipeline.

This file is the pipeline: the DAG (`build_pipeline`), its steps' thin KFP adapters and the
placement helpers (`on_cluster`, `on_rtx2070`). Each step adapter imports inside the function
(KFP ships only the function's source into the container), makes one call into
`components.<step>` and logs metrics. What runs it lives beside it: `local_run.py` (kfp.local,
in subprocesses or docker), `cluster.py` (a KFP API and a cluster) and `commands.py` (the
command line, also reached as `python pipeline.py COMMAND`):

    python pipeline.py compile [--output pipeline.yaml]
    python pipeline.py run-local [--data SOURCE] [--image-size N] [--epochs N] [--param NAME=VALUE]
    python pipeline.py run-local --runner docker [--image IMG --gpu-image IMG] [--bucket NAME]
    python pipeline.py submit --host URL --namespace NS --param source=minio://data/flowers [--wait]
    python pipeline.py schedule apply|list|pause|resume|delete [NAME] --host URL --namespace NS ...
    python pipeline.py doctor --host URL --namespace NS [--bucket models]
    python pipeline.py models list --registry URI --model-name NAME
    python pipeline.py promote --registry URI --model-name NAME --version N
    python pipeline.py rollback --registry URI --model-name NAME
"""

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from kfp import compiler, dsl, kubernetes
from kfp.dsl import Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

from components.blessing import BlessingConfig
from components.evaluate import EvaluateConfig
from components.notify import WEBHOOK_ENV
from components.preprocess import PreprocessConfig
from components.train import TrainConfig

log = logging.getLogger("pipeline")

PIPELINE_NAME = "efficientnet-retrain"
# Images our components run in (docker/Dockerfile, FLAVOR cpu and gpu; `make images`); override
# with --image / --gpu-image to point at your own registry.
DEFAULT_IMAGE = "efficientnet-retrain:cpu"
DEFAULT_GPU_IMAGE = "efficientnet-retrain:gpu"
DEFAULT_MODEL_NAME = EvaluateConfig.model_name


def fingerprint(source: str, tfds_data_dir: str, partitions: int) -> list[dict]:
    """The data's slices, each with the fingerprint of its files' listing: the loop's items."""
    from components import preprocess as step
    from components.cli import configure_logging

    configure_logging()
    digests = step.slice_fingerprints(source, partitions, tfds_data_dir)
    return [{"partition": index, "fingerprint": digest} for index, digest in enumerate(digests)]


def preprocess_slice(
    source: str,
    slice_fingerprint: str,
    partition: int,
    partitions: int,
    image_size: int,
    resize: str,
    tfds_data_dir: str,
    part: Output[Artifact],
):
    """One slice's files read, checked and resized. `slice_fingerprint` is not read: as an
    input it puts the slice's identity into the cache key, so a slice whose files changed is
    read again and the others are not."""
    from pathlib import Path

    from components import preprocess as step
    from components.cli import configure_logging

    configure_logging()
    step.preprocess_partition(
        step.PreprocessConfig(
            source=source,
            output=Path(part.path),
            image_size=image_size,
            resize=resize,
            tfds_data_dir=tfds_data_dir,
            partition=partition,
            partitions=partitions,
        )
    )


def preprocess(
    parts: Input[list[Artifact]],
    dataset: Output[Dataset],
    report: Output[Markdown],
    metrics: Output[Metrics],
):
    """The slices merged into one dataset: splits, shards, manifest and report."""
    from pathlib import Path

    from components import preprocess as step
    from components.cli import configure_logging

    configure_logging()
    manifest = step.merge(
        step.MergeConfig(parts=tuple(Path(part.path) for part in parts), output=Path(dataset.path))
    )
    image_size = manifest["image_size"]
    dataset.metadata.update(
        {
            "classes": manifest["classes"],
            "image_size": image_size,
            "fingerprint": manifest["fingerprint"],
            "duplicates": manifest["duplicates"],
            "label_conflicts": len(manifest["label_conflicts"]),
            "rejected": len(manifest["rejected"]),
            **manifest["totals"],
        }
    )
    with open(report.path, "w") as handle:
        handle.write((Path(dataset.path) / step.REPORT).read_text())
    # The counts as KFP Metrics: the run's page shows them without opening the report.
    for split, count in manifest["totals"].items():
        metrics.log_metric(f"{split}_images", count)
    metrics.log_metric("rejected", len(manifest["rejected"]))
    metrics.log_metric("duplicates", manifest["duplicates"])
    metrics.log_metric("classes", len(manifest["classes"]))


def train(
    dataset: Input[Dataset],
    epochs: int,
    batch_size: int,
    learning_rate: float,
    weights: str,
    weights_cache: str,
    min_updates: int,
    precision: str,
    checkpoint_dir: str,
    gpu_memory_limit_mib: int,
    backend: str,
    gpus: int,
    model: Output[Model],
    metrics: Output[Metrics],
    curves: Output[Markdown],
):
    import base64
    from pathlib import Path

    from components import train as step
    from components.cli import configure_logging

    configure_logging()
    summary = step.train(
        step.TrainConfig(
            data=Path(dataset.path),
            output=Path(model.path),
            epochs=epochs,
            batch_size=batch_size,
            learning_rate=learning_rate or None,
            weights=weights,
            weights_cache=weights_cache,
            min_updates=min_updates,
            precision=precision,
            checkpoint_dir=checkpoint_dir,
            gpu_memory_limit_mib=gpu_memory_limit_mib,
            backend=backend,
            gpus=gpus,
        )
    )
    model.metadata.update(
        {
            "framework": "keras",
            "classes": summary["classes"],
            "image_size": summary["image_size"],
            "precision": summary["precision"],
            "step_batch": summary["step_batch"],
            "accumulation": summary["accumulation"],
            "gpu": summary["gpu"],
            "gpus": summary["gpus"],
            "device_batch": summary["device_batch"],
            "backend": summary["backend"],
            "gpu_memory_limit_mib": summary["gpu_memory_limit_mib"],
        }
    )
    if summary["best_val_accuracy"] is not None:
        metrics.log_metric("best_val_accuracy", summary["best_val_accuracy"])
        metrics.log_metric("best_epoch", summary["best_epoch"])
    metrics.log_metric("train_seconds", summary["train_seconds"])
    picture = base64.b64encode((Path(model.path) / step.CURVES_PNG).read_bytes()).decode()
    Path(curves.path).write_text(
        f"# Training curves\n\n![loss and accuracy per epoch](data:image/png;base64,{picture})\n"
    )


def evaluate(
    dataset: Input[Dataset],
    model: Input[Model],
    registry: str,
    model_name: str,
    min_accuracy: float,
    margin: float,
    max_class_drop: float,
    run_id: str,
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
    report: Output[Markdown],
    evaluation: Output[Artifact],
) -> bool:
    """Returns whether the candidate is blessed; accuracy and reasons are in `evaluation`."""
    import shutil
    from pathlib import Path

    from components import evaluate as step
    from components.cli import configure_logging

    configure_logging()
    result = step.evaluate(
        step.EvaluateConfig(
            model=Path(model.path),
            data=Path(dataset.path),
            output=Path(evaluation.path),
            registry=registry,
            model_name=model_name,
            min_accuracy=min_accuracy,
            margin=margin,
            max_class_drop=max_class_drop,
            run_id=run_id,
        )
    )
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


def export(
    model: Input[Model],
    dataset: Input[Dataset],
    evaluation: Input[Artifact],
    formats: str,
    registry: str,
    model_name: str,
    run_id: str,
    servable: Output[Model],
    metrics: Output[Metrics],
):
    from pathlib import Path

    from components import export as step
    from components.cli import configure_logging

    configure_logging()
    info = step.export(
        step.ExportConfig(
            model=Path(model.path),
            data=Path(dataset.path),
            output=Path(servable.path),
            evaluation=Path(evaluation.path),
            formats=step.parse_formats(formats),
            registry=registry,
            model_name=model_name,
            run_id=run_id,
        )
    )
    verification = info["verification"]
    servable.metadata.update(
        {
            "format": "tf_saved_model",
            "signature": "serving_default",
            "classes": info["classes"],
            "formats": ["saved_model", *info["formats"]],
            "registry": info.get("registry"),
        }
    )
    metrics.log_metric("max_abs_difference", verification["max_abs_difference"])
    for row in verification["latency"]["batches"]:
        metrics.log_metric(f"cpu_latency_batch{row['batch']}_p50_ms_per_image", row["p50_ms_per_image"])
        metrics.log_metric(f"cpu_latency_batch{row['batch']}_p95_ms_per_image", row["p95_ms_per_image"])
    if "registry" in info:
        metrics.log_metric("registry_version", info["registry"]["version"])


def notify(
    status: dsl.PipelineTaskFinalStatus,
    registry: str,
    model_name: str,
    run_id: str,
    summary: Output[Artifact],
    report: Output[Markdown],
) -> bool:
    """The exit handler: the run's summary, posted to $RETRAIN_WEBHOOK_URL when set. Returns
    whether the run's model was blessed; `report` is evaluate's report when the run got there."""
    import os
    from pathlib import Path

    from components import notify as step
    from components.cli import configure_logging

    configure_logging()
    result = step.notify(
        step.NotifyConfig(
            status=status.state,
            run_name=run_id,
            registry=registry,
            model_name=model_name,
            error=status.error_message or "",
            output=Path(summary.path),
            webhook_url=os.environ.get(step.WEBHOOK_ENV, ""),
        )
    )
    written = Path(summary.path) / step.REPORT
    Path(report.path).write_text(written.read_text() if written.is_file() else f"{result['text']}\n")
    return bool(result["blessed"])


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
    # The run summary's webhook URL (Slack-compatible), key `url`; optional: without the secret
    # the exit handler only logs the summary.
    webhook_secret: str = "retrain-webhook"


# Per step: requests sized for an RTX 2070 workstation node (8 cores, 32 GB), limits for
# peaks. train: TF + the input pipeline's decode threads + a 10k-record shuffle buffer.
RESOURCES = {
    "fingerprint": Resources("250m", "1", "512Mi", "1Gi", 15 * 60),
    "preprocess-slice": Resources("2", "4", "4Gi", "8Gi", 6 * 3600),  # decodes: the CPU-bound part
    "preprocess": Resources("1", "2", "4Gi", "8Gi", 6 * 3600),  # merges: splits and copies records
    "train": Resources("4", "8", "12Gi", "16Gi", 24 * 3600),
    "evaluate": Resources("2", "4", "4Gi", "8Gi", 2 * 3600),
    "export": Resources("2", "4", "6Gi", "8Gi", 2 * 3600),  # tf2onnx holds the graph twice
    "notify": Resources("100m", "500m", "256Mi", "512Mi", 10 * 60),
}


def on_cluster(task, step: str, cluster: Cluster):
    """Resources, timeout, non-root user and object-store access for one step's pod."""
    limits = RESOURCES[step]
    (
        task.set_cpu_request(limits.cpu_request)
        .set_cpu_limit(limits.cpu_limit)
        .set_memory_request(limits.memory_request)
        .set_memory_limit(limits.memory_limit)
    )
    kubernetes.set_timeout(task, limits.timeout_seconds)
    kubernetes.set_security_context(
        task, run_as_user=cluster.run_as_user, run_as_group=cluster.run_as_user, run_as_non_root=True
    )
    kubernetes.use_secret_as_env(
        task,
        cluster.secret_name,
        {
            cluster.secret_access_key_key: "AWS_ACCESS_KEY_ID",
            cluster.secret_secret_key_key: "AWS_SECRET_ACCESS_KEY",
        },
    )
    task.set_env_variable("AWS_ENDPOINT_URL", cluster.s3_endpoint)  # an address, not a secret
    return task


def on_rtx2070(task, cluster: Cluster, gpus=1):
    """The train step, and only it: `gpus` GPUs (a number or the pipeline parameter) of one RTX
    2070 node, shared memory, retries."""
    task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(gpus)
    kubernetes.add_node_selector(task, cluster.gpu_label_key, cluster.gpu_label_value)
    # The NVIDIA GPU operator taints GPU nodes so that only pods asking for a GPU land there.
    kubernetes.add_toleration(task, key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")
    kubernetes.empty_dir_mount(
        task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=cluster.shm_size
    )
    # 1 min, 2 min, 4 min: long enough for a node to come back or the pod to be rescheduled.
    task.set_retry(
        num_retries=cluster.train_retries,
        backoff_duration="60s",
        backoff_factor=2,
        backoff_max_duration="600s",
    )
    return task


def build_pipeline(
    image: str = DEFAULT_IMAGE, gpu_image: str = DEFAULT_GPU_IMAGE, cluster: Cluster | None = None
):
    """The pipeline function, with components bound to the given container images.

    `cluster` adds the Kubernetes settings (placement, resources, secrets); without it the
    pipeline is for `kfp.local`, which would otherwise apply the cluster's object-store
    address to every local step.
    """

    def place(task, step: str, gpus=1):
        if cluster is not None:
            on_cluster(task, step, cluster)
            if step == "train":
                on_rtx2070(task, cluster, gpus)
            if step == "notify":
                kubernetes.use_secret_as_env(
                    task, cluster.webhook_secret, {"url": WEBHOOK_ENV}, optional=True
                )
        return task

    def component(func, base_image):
        # Our images carry kfp and this project already: installing kfp at start-up would
        # need the network and could pull a version other than the one we compiled with.
        return dsl.component(func, base_image=base_image, install_kfp_package=False)

    fingerprint_op = component(fingerprint, image)
    preprocess_slice_op = component(preprocess_slice, image)
    preprocess_op = component(preprocess, image)
    train_op = component(train, gpu_image)
    evaluate_op = component(evaluate, image)
    export_op = component(export, image)
    notify_op = component(notify, image)

    # From the exit handler, the one task outside it: KFP takes pipeline outputs only from the
    # top level, and the steps inside report through their run records (components/notify.py).
    class Outputs(NamedTuple):
        blessed: bool
        summary: Artifact  # summary.json: status, failed step, decision, accuracies, version
        evaluation_report: Markdown

    # Every default is the step config's own (tests/test_pipeline.py holds them equal);
    # learning_rate 0 stands for TrainConfig's None (pick by weights), as KFP has no null float.
    # Kept dense by hand, unformatted: the whole DAG reads on one screen.
    # fmt: off
    @dsl.pipeline(name=PIPELINE_NAME,
                  description="Retrain an EfficientNet-B0 image classifier: preprocess, train, "
                              "evaluate against production, export and push only a blessed model.",
                  pipeline_root=(cluster.pipeline_root if cluster else "") or None)
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
                max_class_drop: float = BlessingConfig.max_class_drop, export_formats: str = "",
                partitions: int = PreprocessConfig.partitions, gpus: int = TrainConfig.gpus) -> Outputs:
        # 0. notify, the exit handler: runs last whatever happened, posts the run's summary
        notified = place(notify_op(registry=registry, model_name=model_name,
                                   run_id=dsl.PIPELINE_JOB_NAME_PLACEHOLDER), "notify")
        notified.set_caching_options(False)
        with dsl.ExitHandler(notified, name="retrain"):
            # 1. preprocess: images -> checked, resized, sharded TFRecords + manifest, read in
            #    `partitions` slices at once; each slice is cached by its files' fingerprint, taken
            #    fresh (never cached) from the listing each run; the merge decides the splits.
            listed = place(fingerprint_op(source=source, tfds_data_dir=tfds_data_dir, partitions=partitions),
                           "fingerprint")
            listed.set_caching_options(False)
            with dsl.ParallelFor(listed.output, name="slices") as item:
                sliced = place(preprocess_slice_op(source=source, slice_fingerprint=item.fingerprint,
                                                   partition=item.partition, partitions=partitions,
                                                   image_size=image_size, resize=resize,
                                                   tfds_data_dir=tfds_data_dir), "preprocess-slice")
            prepared = place(preprocess_op(parts=dsl.Collected(sliced.outputs["part"])), "preprocess")
            # 2. train: EfficientNet-B0 on the shards (learning_rate 0 = pick by weights), on `gpus`
            #    GPUs of an RTX 2070 node, data-parallel
            trained = train_op(dataset=prepared.outputs["dataset"], epochs=epochs,
                               batch_size=batch_size, learning_rate=learning_rate, weights=weights,
                               weights_cache=weights_cache, min_updates=min_updates, precision=precision,
                               checkpoint_dir=checkpoint_dir,
                               gpu_memory_limit_mib=gpu_memory_limit_mib, backend=backend, gpus=gpus)
            place(trained, "train", gpus)
            # 3. evaluate: held-out test split, candidate and production side by side -> blessed?
            evaluated = place(evaluate_op(dataset=prepared.outputs["dataset"], model=trained.outputs["model"],
                                          registry=registry, model_name=model_name, min_accuracy=min_accuracy,
                                          margin=margin, max_class_drop=max_class_drop,
                                          run_id=dsl.PIPELINE_JOB_NAME_PLACEHOLDER), "evaluate")
            evaluated.set_retry(num_retries=1, backoff_duration="60s")  # a registry read that timed out
            # Evaluate and export read and write the registry: never replayed from KFP's cache (a
            # cached evaluate would repeat last week's blessing after a rollback).
            evaluated.set_caching_options(False)
            # 4. export: only a blessed model is exported, verified, pushed and made production
            # (evaluate's single return value, `Output`: kfp.local 2.17.3 resolves a condition on a
            # task output only under that name, and silently skips the branch for any other.)
            with dsl.If(evaluated.outputs["Output"] == True, name="blessed"):  # noqa: E712 (KFP condition)
                # No retry: a push that half-failed leaves an incomplete version, and a retry would
                # push a second copy; the next scheduled run is the retry.
                exported = place(export_op(model=trained.outputs["model"],
                                           dataset=prepared.outputs["dataset"],
                                           evaluation=evaluated.outputs["evaluation"], formats=export_formats,
                                           registry=registry, model_name=model_name,
                                           run_id=dsl.PIPELINE_JOB_NAME_PLACEHOLDER), "export")
                exported.set_caching_options(False)
        return Outputs(blessed=notified.outputs["Output"], summary=notified.outputs["summary"],
                       evaluation_report=notified.outputs["report"])
    # fmt: on

    return retrain


def compile_pipeline(
    output: Path,
    image: str = DEFAULT_IMAGE,
    gpu_image: str = DEFAULT_GPU_IMAGE,
    cluster: Cluster | None = None,
) -> Path:
    """Write the IR YAML for a cluster (default `Cluster()` settings)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(image, gpu_image, cluster or Cluster()), str(output))
    return output


if __name__ == "__main__":
    from commands import main

    sys.exit(main())
