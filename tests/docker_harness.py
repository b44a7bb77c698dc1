"""Build the project's images on this machine for the docker tier (`make test-docker`).

No image registry is reachable here, so the base image is made locally (debootstrap of Debian
bookworm with its Python 3.11, imported into the engine) and passed as BASE_IMAGE; the
Dockerfile's public default is not pulled. Both images, the GPU one included, are built on that
CPU-only base: the GPU image gets its CUDA from the pinned wheels, not from the base, so the
same recipe is exercised. The packages come from docker/wheels (`make wheels`), so the build
itself is offline, by both of the Dockerfile's wheel inputs: the CPU image from the wheel
folder in the build context, the GPU image from a wheel server on this host (PIP_FIND_LINKS),
which also keeps its 3.4 GB of wheels out of the build context and out of a layer. What one
run built stays in the engine: the base image and the dependency layers are reused by the next
run on the same machine.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BASE_IMAGE = "retrain-test-base:bookworm"
CPU_IMAGE = "efficientnet-retrain:test-cpu"
GPU_IMAGE = "efficientnet-retrain:test-gpu"
WHEEL_PORT = 18999
# Measured peak of a build from nothing (base, wheels, both images with their dependency stages),
# plus a margin; bench/RESULTS.md has the measurement.
NEEDED_GIB = 30


@dataclass(frozen=True)
class Built:
    cpu: str
    gpu: str
    revision: str
    canary: str


def docker(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], check=check, text=True, capture_output=True, **kwargs)


def require_engine() -> None:
    if not shutil.which("docker"):
        raise RuntimeError("no docker client: install docker.io (.ci/run does)")
    result = docker("info", "--format", "{{.ServerVersion}}", check=False)
    if result.returncode:
        raise RuntimeError(
            f"no Docker engine answers: {result.stderr.strip()[:300]} (start dockerd: .ci/run does)"
        )


def image_exists(name: str) -> bool:
    return docker("image", "inspect", name, check=False).returncode == 0


def ensure_base_image() -> None:
    if image_exists(BASE_IMAGE):
        return
    if not shutil.which("debootstrap"):
        raise RuntimeError("debootstrap is needed to make the local base image (apt-get install debootstrap)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "rootfs"
        subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                "--include=python3,python3-venv,ca-certificates,passwd",
                "bookworm",
                str(root),
            ],
            check=True,
            capture_output=True,
        )
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(
            ["docker", "import", "-", BASE_IMAGE], stdin=tar.stdout, check=True, capture_output=True
        )
        tar.wait()


def ensure_wheels() -> Path:
    """docker/wheels filled from both lock files (what `make wheels` does; pip reuses the wheels
    already in the folder, so reruns are quick). One pip call per lock file: the two images may
    pin different versions of a package (psutil: 5.x under KServe in the CPU image, 7.x in the
    GPU image), which one resolution would refuse; `flavor_wheels` picks each image's own."""
    wheels = REPO / "docker" / "wheels"
    for flavor in ("cpu", "gpu"):
        # No pip cache: the wheel folder is the cache, and a second 3.4 GB copy can fill the disk.
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "--quiet",
                "--no-cache-dir",
                "-r",
                str(REPO / "docker" / f"requirements-{flavor}.txt"),
                "-w",
                str(wheels),
            ],
            capture_output=True,
            text=True,
        )
        if result.returncode:
            raise RuntimeError(
                f"pip wheel of requirements-{flavor}.txt into {wheels} failed (exit {result.returncode}; "
                f"{free_gib(wheels):.1f} GiB free there):\n{result.stderr[-3000:]}"
            )
    return wheels


def free_gib(path: Path | str) -> float:
    return shutil.disk_usage(path).free / 2**30


def disk_shortfall() -> str | None:
    """Why there is too little disk to build from nothing, or None. `.ci/run` asks this too."""
    root = docker("info", "--format", "{{.DockerRootDir}}").stdout.strip()
    places = {"the Docker engine's " + root: root, "docker/wheels": REPO / "docker" / "wheels"}
    if os.stat(root).st_dev == os.stat(REPO / "docker" / "wheels").st_dev:
        places = {f"{root} and docker/wheels (one file system)": root}
    for name, path in places.items():
        free = free_gib(path)
        if free < NEEDED_GIB:
            return (
                f"the docker tier needs about {NEEDED_GIB} GiB free for {name}; {free:.1f} GiB are free "
                "(docker image prune -a frees old images)"
            )
    return None


def require_disk() -> None:
    """Fail before an hour of building ends in 'no space left on device' halfway through a layer."""
    shortfall = disk_shortfall()
    if shortfall:
        raise RuntimeError(shortfall)


def revision() -> str:
    return subprocess.run(
        ["git", "describe", "--always", "--dirty", "--abbrev=12"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def flavor_wheels(wheels: Path, flavor: str) -> list[Path]:
    """The wheels of one lock file: the CPU build need not ship the GPU's 3 GB of CUDA to the engine."""
    import re

    def normal(name: str) -> str:
        return re.sub(r"[-_.]+", "_", name).lower()

    lock = (REPO / "docker" / f"requirements-{flavor}.txt").read_text().splitlines()
    pins = {
        (normal(name), version)
        for name, _, version in (line.partition("==") for line in lock if not line.startswith("#"))
        if version
    }
    chosen = [
        wheel
        for wheel in wheels.glob("*.whl")
        if (normal(wheel.name.split("-")[0]), wheel.name.split("-")[1]) in pins
    ]
    if len(chosen) != len(pins):
        raise RuntimeError(
            f"docker/wheels has {len(chosen)} of the {len(pins)} wheels of requirements-{flavor}.txt"
        )
    return chosen


@contextlib.contextmanager
def wheel_server(folder: Path) -> Iterator[str]:
    """The wheel folder over HTTP on 127.0.0.1 (a build with --network host reaches it).

    On a fixed port when it is free: the URL is a build argument, so a new port each run
    would miss the build cache of the 7 GB dependency layer.
    """
    handler = functools.partial(QuietHandler, directory=str(folder))
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", WHEEL_PORT), handler)
    except OSError:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/"
    finally:
        server.shutdown()
        server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


def build_context(target: Path, wheels: list[Path], canary: str) -> Path:
    """The checkout's files (tracked and not ignored), the wheels hard-linked, and canary secrets
    where careless recipes leak them: a .env, a cloud credentials file and the CA folder."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    (target / "docker" / "wheels").mkdir(parents=True, exist_ok=True)
    for wheel in wheels:
        os.link(wheel, target / "docker" / "wheels" / wheel.name)
    (target / ".env").write_text(f"AWS_SECRET_ACCESS_KEY={canary}\n")
    (target / ".aws").mkdir()
    (target / ".aws" / "credentials").write_text(f"[default]\naws_secret_access_key = {canary}\n")
    system_bundle = Path("/etc/ssl/certs/ca-certificates.crt").read_text()
    (target / "docker" / "certs" / "proxy-ca.pem").write_text(f"# {canary}\n{system_bundle}")
    return target


def build_images(canary: str) -> Built:
    require_engine()
    if not (image_exists(CPU_IMAGE) and image_exists(GPU_IMAGE)):
        require_disk()
    ensure_base_image()
    wheels = ensure_wheels()
    rev = revision()
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": canary, "DOCKER_BUILDKIT": "0"}
    for flavor, tag in (("cpu", CPU_IMAGE), ("gpu", GPU_IMAGE)):
        with contextlib.ExitStack() as stack:
            # Inside the wheel folder's file system, so that the wheels can be hard-linked.
            context = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=wheels)))
            args = [
                "--build-arg",
                f"BASE_IMAGE={BASE_IMAGE}",
                "--build-arg",
                f"FLAVOR={flavor}",
                "--build-arg",
                f"REVISION={rev}",
                "--build-arg",
                f"PIP_INDEX_URL=https://ci:{canary}@pypi.invalid/simple",
            ]
            if flavor == "cpu":
                build_context(context, flavor_wheels(wheels, flavor), canary)
            else:
                build_context(context, [], canary)
                url = stack.enter_context(wheel_server(wheels))
                args += ["--network", "host", "--build-arg", f"PIP_FIND_LINKS={url}"]
            result = subprocess.run(
                ["docker", "build", "-f", "docker/Dockerfile", *args, "-t", tag, "."],
                cwd=context,
                env=env,
                capture_output=True,
                text=True,
            )
            if result.returncode:
                raise RuntimeError(
                    f"docker build ({flavor}) failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
                )
    return Built(cpu=CPU_IMAGE, gpu=GPU_IMAGE, revision=rev, canary=canary)
