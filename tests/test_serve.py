"""The model server: real HTTP requests to `components.serve` in its own process, over a real
registry (a folder, and moto's S3 server), while the production pointer moves."""

from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from components import registry as reg
from components.export import write_saved_model
from components.serve import ServeConfig, ServeError, decode_instances

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "owl"]
SIZE = 16


def constant_model(answer: int):
    """A network that gives class `answer` 0.9 of the probability whatever the image: which
    version answered is then plain from the label."""
    inputs = keras.Input((SIZE, SIZE, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    logits = keras.layers.Dense(len(CLASSES))(pooled)
    model = keras.Model(inputs, keras.layers.Softmax()(logits))
    bias = np.full(len(CLASSES), 0.0, np.float32)
    bias[answer] = np.log(0.9 / 0.05)
    model.layers[-2].set_weights([np.zeros((3, len(CLASSES)), np.float32), bias])
    return model


def push_version(registry: reg.Registry, answer: int, root: Path) -> int:
    folder = root / f"export-{answer}"
    write_saved_model(constant_model(answer), CLASSES, SIZE, folder / "saved_model", max_images=8)
    return registry.push(folder, {"metrics": {"accuracy": 0.5}})


def cat_in_production_dog_pushed(uri: str, model: str, root: Path) -> reg.Registry:
    """A registry whose version 1 (answers "cat") serves and version 2 (answers "dog") waits."""
    registry = reg.Registry(uri, model)
    registry.promote(push_version(registry, 0, root))
    push_version(registry, 1, root)
    return registry


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def image(colour=(200, 30, 30), fmt="JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buffer, format=fmt)
    return buffer.getvalue()


class Client:
    """HTTP to a model server on this machine: V1 predict and readiness."""

    def __init__(self, port: int, model: str):
        self.port, self.model = port, model

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def predict(self, images: list[bytes], timeout: float = 30) -> tuple[int, dict, str]:
        """(status, body, the x-model-version header)."""
        body = {"instances": [{"image_bytes": {"b64": base64.b64encode(data).decode()}} for data in images]}
        request = urllib.request.Request(
            self.url(f"/v1/models/{self.model}:predict"),
            data=json.dumps(body).encode(),
            headers={"content-type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as answer:
                return answer.status, json.loads(answer.read()), answer.headers.get("x-model-version", "")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}"), ""

    def wait_ready(self, timeout: float = 120, alive=lambda: None) -> None:
        """Until the readiness route says ready; `alive()` raises if the server has died."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            alive()
            try:
                with urllib.request.urlopen(self.url(f"/v1/models/{self.model}"), timeout=2) as answer:
                    if json.loads(answer.read())["ready"]:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise AssertionError(f"the server on port {self.port} did not become ready")


class Server(Client):
    """`python -m components.serve` in its own process, its log in a file."""

    def __init__(self, registry_uri: str, model: str, logs: Path, env: dict | None = None, poll: float = 0.3):
        super().__init__(free_port(), model)
        self.log = open(logs / f"serve-{self.port}.log", "w")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "components.serve",
                "--registry",
                registry_uri,
                "--model-name",
                model,
                "--port",
                str(self.port),
                "--poll-seconds",
                str(poll),
            ],  # fmt: skip
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def alive(self) -> None:
        assert self.process.poll() is None, Path(self.log.name).read_text()[-3000:]

    def wait_ready(self, timeout: float = 120, alive=None) -> None:
        super().wait_ready(timeout, self.alive)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


class Traffic:
    """Requests sent back to back from a thread: every answer's status and version kept."""

    def __init__(self, server: Server):
        self.server, self.answers, self.stop = server, [], threading.Event()
        self.thread = threading.Thread(target=self.run)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                status, body, version = self.server.predict([image(), image((20, 200, 20), "PNG")])
            except Exception as error:  # a refused connection or a timeout is a failed request too
                self.answers.append(("error", repr(error), ""))
                continue
            labels = [row["labels"] for row in body.get("predictions", [])]
            self.answers.append((status, labels, version))

    def until(self, version: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.answers and self.answers[-1][2] == version:
                return
            time.sleep(0.1)
        raise AssertionError(f"never served version {version}: {self.answers[-5:]}")

    def finish(self) -> list:
        self.stop.set()
        self.thread.join()
        return self.answers


def follows_the_pointer(registry: reg.Registry, server: Server, change_pointer) -> None:
    """Serves version 1; while traffic runs, `change_pointer(n)` moves production to n (2, then
    back to 1 by rollback): every request answered 200, by one version or the other, whole."""
    server.wait_ready()
    status, body, version = server.predict([image()])
    assert (status, version) == (200, "1"), body
    assert body["predictions"][0]["labels"] == "cat"
    assert body["predictions"][0]["probabilities"] == pytest.approx([0.9, 0.05, 0.05], abs=1e-5)
    traffic = Traffic(server)
    change_pointer("promote")
    traffic.until("2")
    change_pointer("rollback")
    traffic.until("1")
    answers = traffic.finish()
    assert len(answers) > 10
    expected = {"1": ["cat", "cat"], "2": ["dog", "dog"]}
    failed = [answer for answer in answers if answer[0] != 200 or expected.get(answer[2]) != answer[1]]
    assert not failed, failed[:5]
    versions = [answer[2] for answer in answers]
    assert versions.index("2") < len(versions) - 1 - versions[::-1].index("2")  # 2 served, then 1 again


@pytest.mark.slow
def test_the_server_follows_promotion_and_rollback_without_a_failed_request(tmp_path):
    registry = cat_in_production_dog_pushed(str(tmp_path / "registry"), "pets", tmp_path)
    server = Server(str(tmp_path / "registry"), "pets", tmp_path)

    def change_pointer(action: str) -> None:
        # Another process, as `models promote` / `models rollback` are run by a person.
        argv = ["--registry", str(tmp_path / "registry"), "--model", "pets"]
        argv = [action, *argv, "--version", "2"] if action == "promote" else [action, *argv]
        subprocess.run([sys.executable, "-m", "components.registry", *argv], cwd=ROOT, check=True)

    try:
        follows_the_pointer(registry, server, change_pointer)
        # Readiness and metadata routes, and a bad request answered 400 with the reason.
        with urllib.request.urlopen(server.url("/v2/models/pets")) as answer:
            metadata = json.loads(answer.read())
        assert metadata["inputs"][0]["name"] == "image_bytes"
        assert {output["name"] for output in metadata["outputs"]} == {"labels", "probabilities"}
        status, body, _ = server.predict([b"not an image at all"])
        assert (status, body) == (400, {"error": "Unknown image file format. One of JPEG, JPEG XL, PNG, "
                                                 "GIF, BMP, WebP required."}), body  # fmt: skip
        status, body, _ = server.predict([image()] * 9)  # over this model's cap of 8
        assert (status, body) == (400, {"error": "request refused: more images than the cap of 8 per "
                                                 "request: 9"}), body  # fmt: skip
    finally:
        server.stop()


@pytest.mark.slow
def test_the_server_follows_the_pointer_in_an_s3_registry(s3_env, tmp_path):
    import os

    s3_env.client().make_bucket("models")
    registry = cat_in_production_dog_pushed("s3://models/serving", "birds", tmp_path)
    server = Server("s3://models/serving", "birds", tmp_path, env=dict(os.environ))

    def change_pointer(action: str) -> None:
        if action == "promote":
            registry.promote(2)
        else:
            registry.rollback()

    try:
        follows_the_pointer(registry, server, change_pointer)
    finally:
        server.stop()


@pytest.mark.slow
def test_a_version_that_fails_its_hashes_is_not_served_and_the_old_one_stays(tmp_path):
    registry = cat_in_production_dog_pushed(str(tmp_path / "registry"), "pets", tmp_path)
    server = Server(str(tmp_path / "registry"), "pets", tmp_path)
    try:
        server.wait_ready()
        registry.promote(2)
        # Damaged after promotion (promote itself verifies): the server's fetch must refuse it.
        variables = next((tmp_path / "registry" / "pets" / "2" / "saved_model" / "variables").glob("*.data*"))
        variables.write_bytes(variables.read_bytes()[::-1])
        time.sleep(2)
        status, body, version = server.predict([image()])
        assert (status, version, body["predictions"][0]["labels"]) == (200, "1", "cat")
        log = Path(server.log.name).read_text()
        assert "does not match its manifest" in log
        assert log.count("version 2 could not be loaded, still serving version 1") == 1  # not every poll
    finally:
        server.stop()


def test_without_a_production_version_the_server_says_so_and_exits(tmp_path):
    registry = reg.Registry(str(tmp_path / "registry"), "pets")
    push_version(registry, 0, tmp_path)  # pushed, never promoted
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "components.serve",
            "--registry",
            str(tmp_path / "registry"),
            "--model-name",
            "pets",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "pets has no production version" in done.stderr


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({}, "expected"),
        ({"instances": []}, "expected"),
        ({"instances": [{"image_bytes": "raw"}]}, "instance 0"),
        ({"instances": [{"image_bytes": {"b64": "***"}}]}, "not valid base64"),
    ],
)
def test_a_malformed_request_is_refused_with_what_was_expected(payload, message):
    from kserve.errors import InvalidInput

    with pytest.raises(InvalidInput, match=message):
        decode_instances(payload)


def test_both_request_forms_of_the_v1_protocol_are_read():
    data = base64.b64encode(b"abc").decode()
    assert decode_instances({"instances": [{"image_bytes": {"b64": data}}, {"b64": data}]}) == [
        b"abc",
        b"abc",
    ]


def test_the_config_refuses_nonsense():
    with pytest.raises(ServeError, match="--poll-seconds"):
        ServeConfig(registry="r", model_name="m", poll_seconds=0)
    with pytest.raises(ServeError, match="not a valid model name"):
        ServeConfig(registry="r", model_name="m\n")
