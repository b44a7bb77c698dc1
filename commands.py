"""The command line of `python pipeline.py`: compile, run-local, submit, schedule, doctor, serve,
and the registry's models list / prune, promote, rollback. Each command parses its flags and
calls one function of `pipeline`, `local_run`, `cluster`, `components.registry` or
`components.serve`."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

import cluster as kube
from components import docker_local, registry
from components.blessing import BlessingConfig
from components.cli import configure_logging, exit_on_user_error, load_env_file
from components.docker_local import DockerRunConfig
from components.preprocess import PreprocessConfig
from components.storage import StorageError
from components.train import PRECISIONS, TrainConfig
from local_run import (
    BUILTIN_EPOCHS,
    BUILTIN_IMAGE_SIZE,
    BUILTIN_MODEL_NAME,
    LocalRun,
    StepProgress,
    run_local,
)
from pipeline import (
    DEFAULT_GPU_IMAGE,
    DEFAULT_IMAGE,
    DEFAULT_MODEL_NAME,
    PIPELINE_NAME,
    Cluster,
    compile_pipeline,
)

log = logging.getLogger("pipeline")


def _kfp_local_line(record: logging.LogRecord) -> bool:
    """kfp.local's own lines: it logs through the root logger ("Skipping conditional task",
    "Cleaned up workspace")."""
    return record.name == "root" and record.levelno < logging.WARNING


def _not_kfp_local_line(record: logging.LogRecord) -> bool:
    return not _kfp_local_line(record)


@contextlib.contextmanager
def kfp_logs_to(progress: StepProgress):
    """Send kfp.local's INFO lines to `progress` (its log file, and the screen when a pattern
    asks) instead of the screen; our own log lines and every warning stay on stderr."""
    root = logging.getLogger()
    screen = list(root.handlers)
    to_progress = logging.StreamHandler(progress)
    to_progress.addFilter(_kfp_local_line)
    if screen:
        to_progress.setFormatter(screen[0].formatter)
    for handler in screen:
        handler.addFilter(_not_kfp_local_line)
    root.addHandler(to_progress)
    try:
        yield
    finally:
        root.removeHandler(to_progress)
        for handler in screen:
            handler.removeFilter(_not_kfp_local_line)


def add_cluster_options(command: argparse.ArgumentParser) -> None:
    """What `compile` binds into the YAML: images and the Kubernetes settings of `Cluster`."""
    defaults = Cluster()
    command.add_argument("--image", default=DEFAULT_IMAGE, help="CPU step image (tag or @sha256 digest)")
    command.add_argument("--gpu-image", default=DEFAULT_GPU_IMAGE, help="train step image")
    command.add_argument(
        "--gpu-label",
        default=f"{defaults.gpu_label_key}={defaults.gpu_label_value}",
        help="KEY=VALUE node label that selects the training GPU node",
    )
    command.add_argument(
        "--secret",
        default=defaults.secret_name,
        help="Kubernetes secret holding the object-store credentials",
    )
    command.add_argument(
        "--secret-keys",
        default=f"{defaults.secret_access_key_key},{defaults.secret_secret_key_key}",
        help="ACCESS,SECRET: the secret's keys for the access and secret key",
    )
    command.add_argument(
        "--s3-endpoint",
        default=defaults.s3_endpoint,
        help="object-store endpoint the pods reach (AWS_ENDPOINT_URL)",
    )
    command.add_argument(
        "--pipeline-root", default="", help="where KFP puts artifacts (default: the namespace's own)"
    )
    command.add_argument("--train-retries", type=int, default=defaults.train_retries)
    command.add_argument(
        "--webhook-secret",
        default=defaults.webhook_secret,
        help="optional Kubernetes secret whose key `url` is the webhook each run's summary is posted to",
    )


def add_connection_options(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--host",
        default=os.environ.get("KFP_HOST", ""),
        help="KFP API address, e.g. http://localhost:8080 (env KFP_HOST)",
    )
    command.add_argument(
        "--namespace",
        default=os.environ.get("KFP_NAMESPACE", "kubeflow"),
        help="Kubeflow profile namespace (env KFP_NAMESPACE)",
    )
    command.add_argument("--token-file", default="", help="file holding a bearer token (or env KFP_TOKEN)")
    command.add_argument("--ca-bundle", default="", help="CA certificates for a private TLS certificate")
    command.add_argument(
        "--pipeline-name", default=PIPELINE_NAME, help="the KFP pipeline to add a version to"
    )
    command.add_argument("--experiment", default=PIPELINE_NAME)
    command.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a pipeline parameter (repeat); numbers and true/false are typed",
    )


def cluster_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Cluster:
    label_key, _, label_value = args.gpu_label.partition("=")
    access, _, secret = args.secret_keys.partition(",")
    if not label_key or not label_value or not access or not secret:
        parser.error("--gpu-label takes KEY=VALUE and --secret-keys ACCESS,SECRET")
    return Cluster(
        gpu_label_key=label_key,
        gpu_label_value=label_value,
        secret_name=args.secret,
        secret_access_key_key=access,
        secret_secret_key_key=secret,
        s3_endpoint=args.s3_endpoint,
        pipeline_root=args.pipeline_root,
        train_retries=args.train_retries,
        webhook_secret=args.webhook_secret,
    )


def pipeline_params(pairs: list[str], package: Path, required: tuple[str, ...] | None = None) -> dict:
    """`NAME=VALUE` flags checked against the compiled pipeline's parameters, typed as declared.
    `required`: the parameters that must be given (default: those without a default)."""
    declared = next(yaml.safe_load_all(package.read_text()))["root"]["inputDefinitions"]["parameters"]
    params = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or name not in declared:
            raise SystemExit(
                f"error: --param {pair!r}: expected NAME=VALUE with NAME one of {', '.join(sorted(declared))}"
            )
        kind = declared[name]["parameterType"]
        try:
            convert = {
                "NUMBER_INTEGER": int,
                "NUMBER_DOUBLE": float,
                "BOOLEAN": lambda v: {"true": True, "false": False}[v.lower()],
            }.get(kind, str)
            params[name] = convert(value)
        except (ValueError, KeyError):
            raise SystemExit(f"error: --param {name}={value!r} is not a valid {kind.lower()}") from None
    if required is None:
        required = tuple(
            name
            for name, spec in declared.items()
            if "defaultValue" not in spec and not spec.get("isOptional")
        )
    missing = sorted(n for n in required if n not in params)
    if missing:
        raise SystemExit(f"error: the pipeline needs --param {missing[0]}=... (no default)")
    return params


# run-local's own flags for pipeline parameters (the parameter's name with dashes).
LOCAL_FLAGS = (
    "image_size",
    "resize",
    "epochs",
    "batch_size",
    "learning_rate",
    "weights",
    "min_updates",
    "precision",
    "tfds_data_dir",
    "registry",
    "model_name",
    "min_accuracy",
    "margin",
    "max_class_drop",
    "export_formats",
)


def local_params(args: argparse.Namespace) -> dict[str, Any]:
    """The pipeline parameters a run-local command line sets: its named flags, then `--param`
    pairs, typed and checked against the compiled pipeline exactly as `submit` does."""
    params = {name: getattr(args, name) for name in LOCAL_FLAGS if getattr(args, name) is not None}
    if args.param:
        with tempfile.TemporaryDirectory() as scratch:
            package = compile_pipeline(Path(scratch) / "pipeline.yaml")
            params |= pipeline_params(args.param, package, required=())
    return params


def run_on_cluster(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
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
        package = compile_pipeline(
            Path(scratch) / "pipeline.yaml", args.image, args.gpu_image, cluster_from_args(parser, args)
        )
        params = pipeline_params(args.param, package)
        if args.command == "submit":
            stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
            result = kube.submit(
                conn,
                kube.SubmitConfig(
                    package=package,
                    pipeline_name=args.pipeline_name,
                    experiment=args.experiment,
                    run_name=args.run_name or f"{args.pipeline_name}-{stamp}",
                    params=params,
                    wait=args.wait,
                    poll_seconds=args.poll,
                    timeout_seconds=args.timeout,
                ),
            )
            print(f"run {result['run_id']}: {result['state']}")
            return kube.TERMINAL_STATES.get(result["state"], 0) if args.wait else 0
        result = kube.apply_schedule(
            conn,
            kube.ScheduleConfig(
                name=args.name,
                package=package,
                pipeline_name=args.pipeline_name,
                experiment=args.experiment,
                params=params,
                cron=args.cron,
                timezone=args.timezone,
                every=args.every,
            ),
        )
    trigger = (
        f"cron {result['cron_utc']} UTC ({result['note']})"
        if result["cron_utc"]
        else f"every {result['interval_second']} s"
    )
    print(
        f"schedule {args.name} ({result['recurring_run_id']}): {trigger}"
        + (f"; replaced {', '.join(result['replaced'])}" if result["replaced"] else "")
    )
    return 0


def run_doctor(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    settings = cluster_from_args(parser, args)
    with exit_on_user_error(kube.ClusterError):
        conn = kube.connection(args.host, args.namespace, args.token_file, args.ca_bundle)
    checks = kube.doctor(
        conn,
        kube.DoctorConfig(
            secret_name=settings.secret_name,
            secret_keys=(settings.secret_access_key_key, settings.secret_secret_key_key),
            gpu_label_key=settings.gpu_label_key,
            gpu_label_value=settings.gpu_label_value,
            bucket=args.bucket,
            s3_endpoint=args.s3_endpoint_here or args.s3_endpoint,
            kube_context=args.kube_context,
            gpus=args.gpus,
        ),
    )
    for check in checks:
        print(f"{'ok  ' if check.ok else 'FAIL'} {check.name:<15} {check.detail}")
    failed = [check.name for check in checks if not check.ok]
    print(
        f"{len(checks) - len(failed)} of {len(checks)} checks passed"
        + (f"; fix: {', '.join(failed)}" if failed else "")
    )
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
    schedule_cmd = commands.add_parser(
        "schedule", help="recurring runs: apply | list | pause | resume | delete"
    )
    schedule_cmd.add_argument("action", choices=("apply", "list", "pause", "resume", "delete"))
    schedule_cmd.add_argument("name", nargs="?", default="", help="the schedule's name (all but list)")
    add_cluster_options(schedule_cmd)
    add_connection_options(schedule_cmd)
    schedule_cmd.add_argument(
        "--cron", default="", help='"MIN HOUR DAY MONTH WEEKDAY" (or 6 fields, seconds first), in --timezone'
    )
    schedule_cmd.add_argument(
        "--timezone",
        default="UTC",
        help="IANA zone the cron is meant in, e.g. Europe/Berlin (converted to UTC)",
    )
    schedule_cmd.add_argument("--every", default="", help="an interval instead of cron: 30m, 6h, 1d")
    doctor_cmd = commands.add_parser("doctor", help="pre-flight checks of a cluster before the first run")
    add_cluster_options(doctor_cmd)
    add_connection_options(doctor_cmd)
    doctor_cmd.add_argument(
        "--bucket",
        default="",
        help="also check this bucket with the pipeline's credentials (e.g. the registry's)",
    )
    doctor_cmd.add_argument(
        "--s3-endpoint-here",
        default="",
        help="the object store as reachable from this machine (default: --s3-endpoint)",
    )
    doctor_cmd.add_argument("--kube-context", default="", help="kubeconfig context (default: current)")
    doctor_cmd.add_argument(
        "--gpus",
        type=int,
        default=1,
        help="the runs' gpus parameter: a labelled node must have this many allocatable GPUs",
    )
    run_cmd = commands.add_parser("run-local", help="run the pipeline here through kfp.local")
    run_cmd.add_argument(
        "--data",
        default=None,
        help="folder of class sub-folders, s3://, minio:// or gs://bucket/prefix, "
        "or tfds:NAME[:VERSION] (default: the built-in patterns dataset)",
    )
    run_cmd.add_argument(
        "--tfds-data-dir",
        default=None,
        help="folder or gs:// path holding prepared TFDS data (tfds: sources)",
    )
    run_cmd.add_argument(
        "--image-size",
        type=int,
        default=None,
        help=f"px (default {PreprocessConfig.image_size}; {BUILTIN_IMAGE_SIZE} for the built-in dataset)",
    )
    run_cmd.add_argument(
        "--resize",
        choices=("stretch", "pad", "crop"),
        default=None,
        help=f"how a non-square image becomes square (default {PreprocessConfig.resize})",
    )
    run_cmd.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"default {TrainConfig.epochs}; {BUILTIN_EPOCHS} for the built-in dataset",
    )
    run_cmd.add_argument("--batch-size", type=int, default=None, help=f"default {TrainConfig.batch_size}")
    run_cmd.add_argument("--learning-rate", type=float, default=None, help="default 0 = pick by --weights")
    run_cmd.add_argument(
        "--weights",
        default=None,
        help=f"none | {TrainConfig.weights} | path to EfficientNet-B0 no-top weights "
        "(default: imagenet for --data, none for the built-in dataset)",
    )
    run_cmd.add_argument(
        "--min-updates",
        type=int,
        default=None,
        help="from scratch: pass over the images more times an epoch until training "
        "makes this many optimizer updates "
        f"(0 = off; default {TrainConfig.min_updates})",
    )
    run_cmd.add_argument("--precision", default=None, choices=PRECISIONS)
    run_cmd.add_argument("--workdir", type=Path, default=LocalRun.workdir)
    run_cmd.add_argument(
        "--verbose",
        action="store_true",
        help="print kfp.local's and every step's full output here (default: one line per step and "
        "its key figures; the full output goes to <workdir>/run-local.log)",
    )
    run_cmd.add_argument(
        "--registry",
        default=None,
        help="model registry: s3://bucket[/prefix], minio://... or a folder (default: <workdir>/registry)",
    )
    run_cmd.add_argument(
        "--model-name",
        default=None,
        help=f"name in the registry (default {DEFAULT_MODEL_NAME}; "
        f"{BUILTIN_MODEL_NAME} for the built-in dataset)",
    )
    run_cmd.add_argument(
        "--min-accuracy",
        type=float,
        default=None,
        help=f"bless only at or above this (default {BlessingConfig.min_accuracy})",
    )
    run_cmd.add_argument(
        "--margin",
        type=float,
        default=None,
        help=f"bless only if accuracy >= production accuracy - margin (default {BlessingConfig.margin})",
    )
    run_cmd.add_argument(
        "--max-class-drop",
        type=float,
        default=None,
        help="bless only if no class's recall falls more than this against production "
        f"(default {BlessingConfig.max_class_drop})",
    )
    run_cmd.add_argument("--export-formats", default=None, help="extra export formats: litert,onnx")
    run_cmd.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="any other pipeline parameter (repeat), typed and checked as submit does: "
        "e.g. --param checkpoint_dir=/mnt/ckpt --param gpu_memory_limit_mib=7680",
    )
    run_cmd.add_argument(
        "--runner",
        choices=("subprocess", "docker"),
        default="subprocess",
        help="docker: every step in its image; data and registry through the S3 store",
    )
    run_cmd.add_argument("--image", default=DEFAULT_IMAGE, help="docker: the CPU steps' image")
    run_cmd.add_argument("--gpu-image", default=DEFAULT_GPU_IMAGE, help="docker: the train step's image")
    run_cmd.add_argument(
        "--bucket",
        default=None,
        help="docker: bucket for the staged dataset and the registry (default $RETRAIN_BUCKET, else retrain)",
    )
    run_cmd.add_argument(
        "--gpus",
        choices=("auto", "all", "none"),
        default="auto",
        help="docker: pass the host's GPUs (kfp.local gives them to every step)",
    )
    run_cmd.add_argument(
        "--docker-network",
        default="host",
        help="docker: the containers' network (host: the store as this host sees it)",
    )
    run_cmd.add_argument(
        "--env-file",
        type=Path,
        default=Path(".env"),
        help="read unset variables (S3 endpoint, credentials, bucket) from this file, if it exists",
    )
    # Listed here for --help; main() hands its flags to components.serve's own parser.
    commands.add_parser(
        "serve",
        add_help=False,
        help="serve the registry's production model over HTTP (V1 protocol), following promotions",
    )
    for name, text in (
        ("promote", "point a model's production at a complete registry version"),
        ("rollback", "point a model's production back at the version before"),
        ("models", "list a model's registry versions with their metrics"),
    ):
        command = commands.add_parser(name, help=text)
        if name == "models":
            command.add_argument("action", choices=("list", "prune"))
            command.add_argument("--keep", type=int, default=None, help="prune: how many of the newest stay")
            command.add_argument("--apply", action="store_true", help="prune: remove (default: only print)")
        command.add_argument(
            "--registry",
            required=True,
            help="s3://bucket[/prefix], minio://... or a folder (e.g. local-run/registry)",
        )
        command.add_argument("--model-name", required=True, dest="model")
        if name == "promote":
            command.add_argument("--version", type=int, required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        import components.serve as serve_step

        return serve_step.main(argv[1:], prog=f"{parser.prog} serve")
    args = parser.parse_args(argv)

    configure_logging()
    if args.command == "compile":
        path = compile_pipeline(args.output, args.image, args.gpu_image, cluster_from_args(parser, args))
        print(f"wrote {path}")
        return 0
    if args.command in ("submit", "schedule"):
        with exit_on_user_error(kube.ClusterError):
            return run_on_cluster(parser, args)
    if args.command == "doctor":
        return run_doctor(parser, args)
    if args.command in ("promote", "rollback", "models"):
        if args.command == "models":
            args.command = args.action
            if args.action == "prune" and args.keep is None:
                parser.error("models prune needs --keep N")
        with exit_on_user_error(registry.RegistryError):
            return registry.run_command(args)

    load_env_file(args.env_file)
    docker = None
    if args.runner == "docker":
        docker = DockerRunConfig(
            images=(args.image, args.gpu_image),
            gpus=args.gpus,
            network=args.docker_network,
            bucket=args.bucket or os.environ.get("RETRAIN_BUCKET") or "retrain",
        )
    settings = LocalRun(data=args.data, workdir=args.workdir, docker=docker, params=local_params(args))
    progress = None
    if not args.verbose:
        progress = StepProgress(args.workdir / "run-local.log", sys.stdout)
    try:
        with exit_on_user_error(docker_local.DockerError, StorageError), contextlib.ExitStack() as stack:
            if progress is not None:
                stack.enter_context(contextlib.redirect_stdout(progress))
                stack.callback(progress.close)
                stack.enter_context(kfp_logs_to(progress))
            summary = run_local(settings=settings)
    except RuntimeError as error:
        # kfp.local raises RuntimeError("Task ... finished with status FAILURE"); the step's
        # own error line is in the log above it (or, without --verbose, its last lines).
        log.error("error: %s", error)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted: the run stopped where it was")
        return 130
    print(f"test accuracy {summary['test_accuracy']:.4f}")
    print(summary["decision"])
    if summary["blessed"]:
        print(
            f"exported and pushed: {summary['model_name']} version {summary['production_version']} is in "
            f"production ({summary['exported_model'] or summary['registry']})"
        )
    else:
        serving = summary["production_version"]
        print(
            f"not exported; production stays at "
            f"{'version ' + str(serving) if serving else 'no version'} of {summary['model_name']}"
        )
    print(f"evaluation report: {summary['evaluation_report']}")
    print(f"run summary: {summary['summary_path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
