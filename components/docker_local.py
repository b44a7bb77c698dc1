"""Everything `run-local --runner docker` needs around kfp.local's DockerRunner.

Each step runs in its image, as on the cluster. The containers see only kfp.local's pipeline
root (mounted at the same path), so data and models travel through the S3-compatible store,
as they do in Kubeflow: a local source folder is uploaded to `<bucket>/datasets/<name>/` first
and the registry lives at `<bucket>/registry`. Endpoint and credentials come from the
environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY; `.env` for the
local MinIO stack) and are handed to every container.

    python -m components.docker_local check --image efficientnet-retrain:cpu
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import docker
from components.cli import configure_logging, exit_on_user_error
from components.storage import LocalSource, ObjectStoreFolder, StorageError

log = logging.getLogger(__name__)

# The variables the steps read; nothing else from this machine's environment enters a container.
PASSED_ENV = (
    "AWS_ENDPOINT_URL",
    "MINIO_ENDPOINT",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "RETRAIN_WEBHOOK_URL",  # the exit handler's webhook (components/notify.py)
)
IMAGE_UID = 1000  # USER in docker/Dockerfile


class DockerError(RuntimeError):
    """The engine, an image or the object store is not ready for a docker run."""


@dataclass(frozen=True)
class DockerRunConfig:
    images: tuple[str, ...]
    bucket: str
    gpus: str = "auto"  # auto | all | none
    network: str = "host"
    shm_size: str = "2g"  # tf.data and Keras use /dev/shm; Docker's default is 64 MB


def client():
    try:
        engine = docker.from_env()
        engine.ping()
    except docker.errors.DockerException as error:
        raise DockerError(
            "no Docker engine answers (is dockerd or Docker Desktop running, and may this "
            f"user use it?): {error}"
        ) from None
    return engine


def check_images(engine, images: tuple[str, ...]) -> None:
    """Every image present here; pull what is missing, with a useful message when that fails."""
    for image in dict.fromkeys(images):
        try:
            engine.images.get(image)
            continue
        except docker.errors.ImageNotFound:
            pass
        log.info("image %s is not here; pulling it", image)
        try:
            engine.images.pull(image)
        except docker.errors.DockerException as error:
            raise DockerError(
                f"image {image} is neither built here nor pullable ({error}); build it with "
                "`make images` or name another with --image / --gpu-image"
            ) from None


def gpu_available(engine) -> bool:
    """True when this host has an NVIDIA GPU that Docker can hand to a container."""
    if not shutil.which("nvidia-smi"):
        return False
    try:
        subprocess.run(["nvidia-smi", "-L"], check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    info = engine.info()
    return "nvidia" in (info.get("Runtimes") or {}) or bool(info.get("CDISpecDirs"))


def container_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    env = os.environ if environ is None else environ
    return {name: env[name] for name in PASSED_ENV if env.get(name)}


def runner_args(engine, config: DockerRunConfig, pipeline_root: Path) -> dict:
    """docker-py `containers.run` arguments for every step (kfp.local has no per-task settings)."""
    args: dict = {"environment": container_env(), "network_mode": config.network, "shm_size": config.shm_size}
    uid = os.getuid()
    if uid == 0:
        # The image's own non-root user writes the outputs: give it the pipeline root.
        pipeline_root.mkdir(parents=True, exist_ok=True)
        for path in [pipeline_root, *pipeline_root.rglob("*")]:
            os.chown(path, IMAGE_UID, IMAGE_UID)
    else:
        # Run as this user so that kfp.local (this user) can read and write the same files;
        # that user has no home in the image, so Keras and TFDS get /tmp.
        args["user"] = f"{uid}:{os.getgid()}"
        args["environment"]["HOME"] = "/tmp"
    use_gpu = config.gpus == "all" or (config.gpus == "auto" and gpu_available(engine))
    if use_gpu:
        args["device_requests"] = [docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])]
    log.info(
        "docker runner: network %s, %s, %s",
        config.network,
        "GPU passed to the steps" if use_gpu else "no GPU",
        f"as uid {args.get('user', IMAGE_UID)}",
    )
    return args


def stage_folder(folder: Path, bucket: str, name: str) -> str:
    """Upload a local dataset folder to s3://bucket/datasets/<name>/, skipping files already there.

    Returns the URI the containers read. Files are compared by size; a changed file of equal
    size is not detected, so give a changed dataset a new name (its folder name).
    """
    uri = f"s3://{bucket}/datasets/{name}"
    target = ObjectStoreFolder(uri)
    target.check()
    there = target.sizes()
    # The files preprocess would read from the folder itself (class folders that are links
    # followed, hidden and metadata folders skipped); a dangling link has nothing to upload.
    files = [item for item in LocalSource(folder).list() if (folder / item.key).is_file()]
    todo = [item.key for item in files if there.get(item.key) != item.size]
    log.info("staging %s in %s: %d of %d files to upload", folder, uri, len(todo), len(files))
    for done, key in enumerate(todo, 1):
        target.put_file(key, folder / key)
        if done % 500 == 0 or done == len(todo):
            log.info("uploaded %d/%d", done, len(todo))
    return uri


def check_store(bucket: str) -> None:
    """A clear error now for missing credentials (raised by the constructor) or a missing bucket."""
    ObjectStoreFolder(f"s3://{bucket}").check()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m components.docker_local", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("action", choices=("check",), help="check the engine, the images and the bucket")
    parser.add_argument("--image", action="append", default=[], help="an image the run needs (repeatable)")
    parser.add_argument("--bucket", default=os.environ.get("RETRAIN_BUCKET", "retrain"))
    args = parser.parse_args(argv)
    configure_logging()
    with exit_on_user_error(DockerError, StorageError):
        engine = client()
        check_images(engine, tuple(args.image))
        check_store(args.bucket)
        print(
            f"engine {engine.version()['Version']}, images {', '.join(args.image) or '-'}, "
            f"bucket {args.bucket}: ready"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
