"""Pretrained weights: fetched over real HTTP, verified by MD5, cached in a folder or a bucket,
and one clear line when the machine is offline.

Keras' real file cannot be downloaded here (no network), so a local HTTP server publishes a
genuine EfficientNet-B0 no-top weights file under its own MD5; the published name, address and
MD5 of Keras' file are held to the installed Keras instead."""

from __future__ import annotations

import hashlib
import http.server
import json
import logging
import socket
import threading
from pathlib import Path

import pytest

from components import pretrained
from components.pretrained import Published, WeightsError
from tests.conftest import TINY_SIZE, scratch_config


def test_the_published_file_is_the_one_installed_keras_downloads_and_checks():
    from keras.src.applications import efficientnet

    assert pretrained.IMAGENET_URL == efficientnet.BASE_WEIGHTS_PATH + pretrained.IMAGENET_FILE
    assert efficientnet.WEIGHTS_HASHES["b0"][1] == pretrained.IMAGENET_MD5


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    """A real no-top EfficientNet-B0 weights file in Keras' legacy .h5 layout, as Keras publishes
    `efficientnetb0_notop.h5` (Keras 3's `save_weights` writes only its own `.weights.h5`)."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    from components.model import build_model

    path = tmp_path_factory.mktemp("published") / pretrained.IMAGENET_FILE
    with h5py.File(path, "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, build_model(4, TINY_SIZE, "none").layers[1])
    return path


class _Server:
    def __init__(self, folder: Path):
        handler = lambda *args: _Handler(*args, directory=str(folder))  # noqa: E731
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.requests = 0
        _Handler.server_state = self
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(http.server.SimpleHTTPRequestHandler):
    server_state: _Server

    def do_GET(self):
        self.server_state.requests += 1
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def server(weights_file):
    running = _Server(weights_file.parent)
    yield running
    running.stop()


def _published(server, weights_file, md5: str | None = None) -> Published:
    return Published(
        weights_file.name,
        server.url(weights_file.name),
        md5 or hashlib.md5(weights_file.read_bytes()).hexdigest(),
    )


def _closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/{pretrained.IMAGENET_FILE}"


def test_downloaded_once_verified_then_found_in_the_folder_cache(server, weights_file, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    published = _published(server, weights_file)
    first = pretrained.resolve(str(tmp_path / "cache"), tmp_path / "scratch", published)
    assert first == tmp_path / "cache" / weights_file.name
    assert first.read_bytes() == weights_file.read_bytes()
    assert "MD5 verified" in caplog.text and server.requests == 1
    server.stop()  # the next run finds the file without the network
    again = pretrained.resolve(str(tmp_path / "cache"), tmp_path / "scratch", published)
    assert again == first and server.requests == 1
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [weights_file.name]


def test_a_download_with_the_wrong_md5_is_refused_and_leaves_nothing(server, weights_file, tmp_path):
    published = _published(server, weights_file, md5="0" * 32)
    with pytest.raises(
        WeightsError,
        match=f"MD5 {hashlib.md5(weights_file.read_bytes()).hexdigest()}, "
        f"not the published {'0' * 32}: refusing it",
    ):
        pretrained.resolve(str(tmp_path / "cache"), tmp_path / "scratch", published)
    assert list((tmp_path / "cache").iterdir()) == []  # no partial file, no bad file


def test_a_corrupted_cached_file_is_downloaded_again(server, weights_file, tmp_path, caplog):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / weights_file.name).write_bytes(b"truncated")
    found = pretrained.resolve(str(cache), tmp_path / "scratch", _published(server, weights_file))
    assert found.read_bytes() == weights_file.read_bytes()
    assert "downloading it again" in caplog.text and server.requests == 1


def test_offline_says_in_one_line_which_file_to_put_where(tmp_path):
    published = Published(pretrained.IMAGENET_FILE, _closed_port_url(), pretrained.IMAGENET_MD5)
    with pytest.raises(WeightsError) as raised:
        pretrained.resolve(str(tmp_path / "cache"), tmp_path / "scratch", published)
    message = str(raised.value)
    assert "\n" not in message
    assert (
        f"Put {pretrained.IMAGENET_FILE} (MD5 {pretrained.IMAGENET_MD5}, from {published.url}) at "
        f"{tmp_path / 'cache' / pretrained.IMAGENET_FILE}" in message
    )
    assert "--weights none" in message


def test_a_bucket_cache_is_filled_once_and_read_by_the_next_pod(server, weights_file, tmp_path, s3_env):
    s3_env.client().make_bucket("weights")
    published = _published(server, weights_file)
    pretrained.resolve("s3://weights/cache", tmp_path / "pod1", published)
    stored = s3_env.client().get_object("weights", f"cache/{weights_file.name}").read()
    assert stored == weights_file.read_bytes()
    server.stop()
    found = pretrained.resolve("s3://weights/cache", tmp_path / "pod2", published)
    assert found == tmp_path / "pod2" / weights_file.name
    assert found.read_bytes() == weights_file.read_bytes() and server.requests == 1


def test_the_default_cache_outlives_the_pod_when_checkpoints_do(monkeypatch, tmp_path):
    assert pretrained.default_cache("s3://ckpt/retrain") == "s3://ckpt/retrain/weights"
    assert pretrained.default_cache("/mnt/ckpt/") == "/mnt/ckpt/weights"
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    assert pretrained.default_cache("") == str(tmp_path / "keras" / "models")


@pytest.mark.slow
def test_imagenet_training_fetches_verifies_caches_and_fine_tunes_in_two_phases(
    server, weights_file, prepared_dataset, tmp_path, monkeypatch
):
    from components.train import train

    monkeypatch.setattr(pretrained, "IMAGENET", _published(server, weights_file))
    summary = train(
        scratch_config(
            weights="imagenet",
            weights_cache=str(tmp_path / "cache"),
            data=prepared_dataset,
            output=tmp_path / "m",
            epochs=2,
            head_epochs=1,
            augment=False,
        )
    )
    assert (tmp_path / "cache" / weights_file.name).read_bytes() == weights_file.read_bytes()
    history = json.loads((tmp_path / "m" / "history.json").read_text())
    assert [row["phase"] for row in history] == [1, 2]
    assert summary["passes_per_epoch"] == 1  # the update floor is for from-scratch runs only


def test_training_offline_fails_before_the_batch_fit_with_the_one_line(
    prepared_dataset, tmp_path, monkeypatch
):
    from components.train import TrainError, train

    monkeypatch.setattr(
        pretrained,
        "IMAGENET",
        Published(pretrained.IMAGENET_FILE, _closed_port_url(), pretrained.IMAGENET_MD5),
    )
    with pytest.raises(TrainError, match=f"Put {pretrained.IMAGENET_FILE} .* at {tmp_path / 'cache'}/"):
        train(
            scratch_config(
                weights="imagenet",
                weights_cache=str(tmp_path / "cache"),
                data=prepared_dataset,
                output=tmp_path / "m",
            )
        )
    assert not (tmp_path / "m" / "model.keras").exists()


def test_run_local_checks_the_weights_before_any_step(tmp_path, monkeypatch, capsys):
    import commands
    from tests.conftest import make_image_folder

    source = make_image_folder(tmp_path / "images")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setattr(
        pretrained,
        "IMAGENET",
        Published(pretrained.IMAGENET_FILE, _closed_port_url(), pretrained.IMAGENET_MD5),
    )
    with pytest.raises(SystemExit) as exited:  # --data given: ImageNet weights by default
        commands.main(
            [
                "run-local",
                "--data",
                str(source),
                "--workdir",
                str(tmp_path / "run"),
                "--env-file",
                str(tmp_path / "none.env"),
            ]
        )
    assert f"Put {pretrained.IMAGENET_FILE}" in str(exited.value)
    assert str(tmp_path / "keras" / "models" / pretrained.IMAGENET_FILE) in str(exited.value)
    assert not (tmp_path / "run" / "pipeline-root").exists()  # no step started
