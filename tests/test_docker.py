"""The docker tier (`make test-docker`, run by .ci/run as root with dockerd started): both images
built from docker/Dockerfile on a local base image (tests/docker_harness.py says why), each step
run in its container, the whole pipeline through kfp.local's DockerRunner against a real HTTP S3
endpoint (moto's server standing in for MinIO), and a look inside the images."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import docker_harness
from tests.conftest import TINY_SIZE, make_image_folder

pytestmark = pytest.mark.docker
REPO = Path(__file__).resolve().parent.parent
IMAGE_UID = 1000


# A fixed value, so that the build cache (keyed on the build inputs it is planted in) still
# serves a second run on the same machine.
CANARY = "canary-3f9c1e7a5b2d48e6a0c4"


@pytest.fixture(scope="module")
def built():
    return docker_harness.build_images(canary=CANARY)


def run_in(
    image: str,
    *command: str,
    mounts: dict[Path, str] | None = None,
    network: str = "none",
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    args = ["run", "--rm", "--network", network]
    for host, inside in (mounts or {}).items():
        args += ["-v", f"{host}:{inside}"]
    for key, value in (env or {}).items():
        args += ["-e", f"{key}={value}"]
    result = docker_harness.docker(*args, image, *command, check=False)
    assert result.returncode == 0, (
        f"{' '.join(command)} failed in {image}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


def shard_digests(dataset: Path) -> dict:
    manifest = json.loads((dataset / "manifest.json").read_text())
    return {"classes": manifest["classes"], "counts": manifest["counts"], "shards": manifest["shards"]}


def test_images_run_as_non_root_with_the_sdks_kfp_and_the_git_revision(built):
    import kfp

    for image in (built.cpu, built.gpu):
        config = json.loads(docker_harness.docker("image", "inspect", image).stdout)[0]["Config"]
        assert config["User"] == str(IMAGE_UID)
        assert config["Labels"]["org.opencontainers.image.revision"] == built.revision
        out = run_in(
            image,
            "sh",
            "-c",
            'id -u; python3 -c "import kfp; print(kfp.__version__)"; '
            "python3 -m kfp.dsl.executor_main --help >/dev/null "
            "&& echo executor-ok",
        ).stdout
        assert out.split() == [str(IMAGE_UID), kfp.__version__, "executor-ok"], out


def test_gpu_image_carries_jax_for_cuda_12_and_neither_image_a_cuda_build_of_tensorflow(built):
    """Keras trains on JAX on the GPU; TensorFlow reads records only and must take no GPU memory."""
    probe = (
        "import tensorflow as tf; b = tf.sysconfig.get_build_info(); "
        "print(b['is_cuda_build'], tf.__version__)"
    )
    gpu = run_in(built.gpu, "python3", "-c", probe).stdout.split()
    cpu = run_in(built.cpu, "python3", "-c", probe).stdout.split()
    assert gpu == cpu == ["False", "2.21.0"], (gpu, cpu)
    jax_probe = (
        "import importlib.metadata as m, jax, jax_cuda12_plugin; "
        "print(jax.__version__, m.version('jax-cuda12-plugin'), m.version('nvidia-cudnn-cu12'), "
        "m.version('nvidia-cuda-runtime-cu12'))"
    )
    versions = run_in(built.gpu, "python3", "-c", jax_probe).stdout.split()
    assert versions[0] == versions[1] == "0.10.2", versions
    assert versions[2].startswith("9.") and versions[3].startswith("12."), versions
    missing = run_in(built.cpu, "python3", "-c", "import importlib.util as u; print(u.find_spec('jax'))")
    assert missing.stdout.split() == ["None"]


def test_no_canary_credential_in_history_config_or_any_layer(built, tmp_path):
    """The canary was in the build context's .env and .aws/credentials, in the CA folder, in a
    build argument (a mirror URL with a token) and in the environment of `docker build`."""
    canary = built.canary.encode()
    for image in (built.cpu, built.gpu):
        history = docker_harness.docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", image).stdout
        assert built.canary not in history
        assert built.canary not in docker_harness.docker("image", "inspect", image).stdout
        # Every byte of every layer, deleted files included: `docker save` streams the layer tars.
        save = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE)
        tail, total = b"", 0
        while chunk := save.stdout.read(8 << 20):
            window = tail + chunk
            assert canary not in window, f"canary found in {image}'s layers"
            tail, total = window[-len(canary) :], total + len(chunk)
        assert save.wait() == 0 and total > 100 << 20  # the image really was read


def test_each_step_runs_in_its_container_and_matches_the_run_without_docker(built, tmp_path):
    """preprocess, train, evaluate, export by hand with `docker run`, offline, on mounted paths
    (as the README shows); preprocess and evaluate give the same results as on this machine."""
    work = tmp_path / "work"
    make_image_folder(work / "images", images_per_class=12)
    shutil.chown(work, IMAGE_UID, IMAGE_UID)
    mount = {work: "/work"}
    size = str(TINY_SIZE)
    run_in(
        built.cpu,
        "python3",
        "-m",
        "components.preprocess",
        "--source",
        "/work/images",
        "--output",
        "/work/dataset",
        "--image-size",
        size,
        "--validation-fraction",
        "0.2",
        "--test-fraction",
        "0.2",
        mounts=mount,
    )
    # The GPU image's backend, forced here (no GPU: auto would pick TensorFlow): JAX writes the
    # model file that the CPU image evaluates and exports under TensorFlow.
    run_in(
        built.gpu,
        "python3",
        "-m",
        "components.train",
        "--data",
        "/work/dataset",
        "--output",
        "/work/model",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--backend",
        "jax",
        "--weights",
        "none",
        "--min-updates",
        "0",
        mounts=mount,
    )
    run_in(
        built.cpu,
        "python3",
        "-m",
        "components.evaluate",
        "--model",
        "/work/model",
        "--data",
        "/work/dataset",
        "--output",
        "/work/evaluation",
        mounts=mount,
    )
    run_in(
        built.cpu,
        "python3",
        "-m",
        "components.export",
        "--model",
        "/work/model",
        "--data",
        "/work/dataset",
        "--evaluation",
        "/work/evaluation",
        "--output",
        "/work/servable",
        mounts=mount,
    )
    assert (work / "servable" / "saved_model" / "saved_model.pb").is_file()
    assert json.loads((work / "model" / "train_config.json").read_text())["backend"] == "jax"
    owners = {path.stat().st_uid for path in (work / "dataset").rglob("*")} | {
        path.stat().st_uid for path in (work / "servable").rglob("*")
    }
    assert owners == {IMAGE_UID}  # written by the image's user, not root

    host = tmp_path / "host"
    python = [sys.executable, "-m"]
    subprocess.run(
        [
            *python,
            "components.preprocess",
            "--source",
            str(work / "images"),
            "--output",
            str(host / "dataset"),
            "--image-size",
            size,
            "--validation-fraction",
            "0.2",
            "--test-fraction",
            "0.2",
        ],
        check=True,
        capture_output=True,
    )
    assert shard_digests(host / "dataset") == shard_digests(work / "dataset")  # byte-identical shards
    subprocess.run(
        [
            *python,
            "components.evaluate",
            "--model",
            str(work / "model"),
            "--data",
            str(work / "dataset"),
            "--output",
            str(host / "evaluation"),
        ],
        check=True,
        capture_output=True,
    )
    ours, theirs = (
        json.loads((folder / "evaluation.json").read_text())["candidate"]
        for folder in (host / "evaluation", work / "evaluation")
    )
    assert ours["confusion_matrix"] == theirs["confusion_matrix"]
    assert ours["accuracy"] == pytest.approx(theirs["accuracy"])


def test_whole_pipeline_through_kfp_local_docker_runner_with_data_and_registry_in_s3(
    built, s3_env, tmp_path, webhook
):
    from components.registry import Registry

    s3 = s3_env  # its endpoint and credentials are in this process's environment too
    images = make_image_folder(tmp_path / "flowers", images_per_class=40)
    client = s3.client()
    client.make_bucket("retrain")
    workdir = tmp_path / "run"
    env = {**os.environ, **s3.env(), "RETRAIN_BUCKET": "retrain", "PYTHONPATH": str(REPO)}
    env["RETRAIN_WEBHOOK_URL"] = webhook.url  # reached from the notify container (host network)
    env.pop("MINIO_ENDPOINT", None)
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "pipeline.py"),
            "run-local",
            "--runner",
            "docker",
            "--image",
            built.cpu,
            "--gpu-image",
            built.gpu,
            "--data",
            str(images),
            "--image-size",
            str(TINY_SIZE),
            "--epochs",
            "2",
            "--batch-size",
            "16",
            "--weights",
            "none",
            "--min-updates",
            "0",
            "--workdir",
            str(workdir),
            "--model-name",
            "flowers",
        ],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    summary = json.loads((workdir / "run-summary.json").read_text())
    assert summary["runner"] == "docker" and summary["registry"] == "s3://retrain/registry"

    staged = list(client.list_objects("retrain", prefix="datasets/flowers/", recursive=True))
    assert len(staged) == sum(1 for path in images.rglob("*") if path.is_file())

    # The containers wrote kfp.local's outputs as the image's non-root user.
    written = [path for path in Path(summary["pipeline_root"]).rglob("*") if path.is_file()]
    assert written and {path.stat().st_uid for path in written} == {IMAGE_UID}

    # preprocess in the pipeline (reading the bucket) made the same shards as on this machine.
    manifests = list(Path(summary["pipeline_root"]).glob("*/preprocess/dataset/manifest.json"))
    assert len(manifests) == 1
    host = tmp_path / "host-dataset"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "components.preprocess",
            "--source",
            str(images),
            "--output",
            str(host),
            "--image-size",
            str(TINY_SIZE),
        ],
        check=True,
        capture_output=True,
        cwd=REPO,
    )
    assert shard_digests(manifests[0].parent) == shard_digests(host)

    # The export branch followed the decision, and the registry in the bucket says the same.
    production = Registry("s3://retrain/registry", "flowers").production()
    if summary["blessed"]:
        assert production and production["version"] == summary["production_version"] == 1
    else:
        assert production is None and summary["production_version"] is None
    (posted,) = webhook.received  # the exit handler's container posted the run's summary
    assert (posted["status"], posted["blessed"], posted["run"]) == (
        "SUCCEEDED",
        summary["blessed"],
        summary["run"],
    )


def test_a_step_failing_in_its_container_fails_the_run_with_its_reason(built, s3_env, tmp_path, webhook):
    s3_env.client().make_bucket("empty")
    env = {**os.environ, "PYTHONPATH": str(REPO), "RETRAIN_WEBHOOK_URL": webhook.url}
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "pipeline.py"),
            "run-local",
            "--runner",
            "docker",
            "--image",
            built.cpu,
            "--gpu-image",
            built.gpu,
            "--data",
            "s3://empty/flowers",
            "--bucket",
            "empty",
            "--weights",
            "none",
            "--workdir",
            str(tmp_path / "run"),
        ],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "no objects under s3://empty/flowers" in result.stdout + result.stderr
    assert not (tmp_path / "run" / "run-summary.json").exists()
    (posted,) = webhook.received
    assert (posted["status"], posted["failed_step"]) == ("FAILED", "fingerprint, preprocess or train")


def test_the_cpu_image_serves_the_production_model_and_follows_a_promotion(built, tmp_path):
    """`python3 -m components.serve` in the CPU image (KServe's server, host network), a
    registry folder mounted read-only: real HTTP requests answered by version 1, then by
    version 2 once it is promoted from outside the container."""
    import time

    from tests.test_serve import Client, cat_in_production_dog_pushed, free_port, image

    registry = cat_in_production_dog_pushed(str(tmp_path / "registry"), "pets", tmp_path)
    for path in [tmp_path, *tmp_path.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)  # readable by the image's user
    server = Client(free_port(), "pets")
    name = f"serve-{server.port}"
    docker_harness.docker(
        "run", "-d", "--rm", "--name", name, "--network", "host",
        "-v", f"{tmp_path / 'registry'}:/registry:ro", built.cpu,
        "python3", "-m", "components.serve", "--registry", "/registry", "--model-name", "pets",
        "--port", str(server.port), "--poll-seconds", "0.5",
    )  # fmt: skip
    try:
        try:
            server.wait_ready()
        except AssertionError:
            raise AssertionError(docker_harness.docker("logs", name, check=False).stderr[-3000:]) from None
        status, body, version = server.predict([image()])
        assert (status, version) == (200, "1"), body
        assert body["predictions"][0]["labels"] == "cat"
        registry.promote(2)
        deadline = time.monotonic() + 60
        while version != "2" and time.monotonic() < deadline:
            status, body, version = server.predict([image()])
            assert status == 200, body
        assert body["predictions"][0]["labels"] == "dog"
    finally:
        docker_harness.docker("rm", "-f", name, check=False)


def test_build_stage_install_trusts_the_ca_folder(tmp_path):
    """docker/pip-install.sh (the Dockerfile's install) online, as behind a TLS-inspecting proxy:
    this machine's egress is re-signed by its own CA, which containers do not trust by default.
    A `.crt` alone, as users' proxies hand it out, must be enough."""
    docker_harness.require_engine()
    docker_harness.ensure_base_image()
    build = tmp_path / "build"
    (build / "certs").mkdir(parents=True)
    (build / "wheels").mkdir()
    shutil.copy(REPO / "docker" / "pip-install.sh", build)
    (build / "requirements.txt").write_text("six==1.17.0\n")
    shutil.copy("/etc/ssl/certs/ca-certificates.crt", build / "certs" / "proxy.crt")
    result = docker_harness.docker(
        "run",
        "--rm",
        "--network",
        "host",
        "-v",
        f"{build}:/build",
        docker_harness.BASE_IMAGE,
        "sh",
        "/build/pip-install.sh",
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "pip trusts the certificates in /build/certs/proxy.crt" in result.stdout
    assert "Successfully installed six-1.17.0" in result.stdout


def test_compose_file_is_valid_and_pins_minio_by_digest(tmp_path):
    """The MinIO stack is checked, not started: no image registry is reachable here to pull MinIO."""
    import yaml

    compose = shutil.which("docker-compose")
    assert compose, "docker-compose is needed (apt-get install docker-compose; .ci/run does)"
    env_file = tmp_path / ".env"
    shutil.copy(REPO / ".env.example", env_file)
    # Compose lets the shell's variables win over the file: only the file's may count here.
    clean = {
        key: value for key, value in os.environ.items() if not key.startswith(("AWS_", "RETRAIN_", "MINIO_"))
    }
    rendered = subprocess.run(
        [
            compose,
            "-p",
            "efficientnet-retrain",
            "--env-file",
            str(env_file),
            "-f",
            str(REPO / "docker" / "compose.yaml"),
            "config",
        ],
        capture_output=True,
        text=True,
        env=clean,
    )
    assert rendered.returncode == 0, rendered.stderr
    services = yaml.safe_load(rendered.stdout)["services"]
    assert {service["image"] for service in services.values()} == {services["minio"]["image"]}
    assert "@sha256:" in services["minio"]["image"]
    assert services["minio"]["environment"]["MINIO_ROOT_USER"] == "retrain-admin"
    assert services["make-bucket"]["environment"]["BUCKET"] == "retrain"
    # docker-compose v1 prints ports as strings, v2 as mappings
    assert all(
        (port["host_ip"] if isinstance(port, dict) else port.split(":")[0]) == "127.0.0.1"
        for port in services["minio"]["ports"]
    )

    env_file.write_text("RETRAIN_BUCKET=x\n")  # no credentials: compose must refuse, not start empty
    refused = subprocess.run(
        [compose, "--env-file", str(env_file), "-f", str(REPO / "docker" / "compose.yaml"), "config"],
        capture_output=True,
        text=True,
        env=clean,
    )
    assert refused.returncode != 0 and "AWS_ACCESS_KEY_ID" in refused.stderr
