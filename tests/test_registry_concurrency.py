"""Several processes pushing and promoting into one registry at once, on a folder and on a real
HTTP S3 endpoint: every push a distinct complete version of its own files, no promotion lost,
production always fetchable."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pytest

from components import registry as reg
from tests import s3_server
from tests.test_registry import model_folder

PUSHERS = 6


@pytest.fixture(scope="module")
def s3():
    server = s3_server.start(one_request_at_a_time=True)
    server.client().make_bucket("models")
    yield server
    server.process.kill()
    server.process.wait()


def push_and_promote(uri: str, model: str, folder: str, marker: str, start: str, results) -> None:
    """One pipeline run's export, in its own process: push, then promote."""
    while not Path(start).exists():  # every process starts at the same moment
        time.sleep(0.005)
    try:
        registry = reg.Registry(uri, model)
        version = registry.push(Path(folder), {"marker": marker})
        registry.promote(version, f"run {marker}")
        results.put((marker, version, None))
    except Exception as error:  # noqa: BLE001 - reported to the test, which fails on it
        results.put((marker, None, f"{type(error).__name__}: {error}"))


def run_concurrently(uri: str, model: str, tmp_path: Path, env: dict[str, str]) -> dict[str, int]:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    start = tmp_path / "start"
    processes = []
    for index in range(PUSHERS):
        marker = f"run{index}"
        # Larger files: uploads that take long enough to overlap.
        folder = model_folder(tmp_path / marker, marker, repeat=20_000)
        process = context.Process(
            target=push_and_promote, args=(uri, model, str(folder), marker, str(start), results)
        )
        processes.append(process)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        for process in processes:
            process.start()
    time.sleep(2)  # every process is up and waiting
    start.touch()
    outcomes = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=30)
    errors = [f"{marker}: {error}" for marker, _, error in outcomes if error]
    assert not errors, errors
    return {marker: version for marker, version, _ in outcomes}


def check_registry(registry: reg.Registry, pushed: dict[str, int], tmp_path: Path) -> None:
    # Every push got its own number, and each version is complete and holds its own files.
    assert sorted(pushed.values()) == list(range(1, PUSHERS + 1))
    assert [(v.number, v.complete) for v in registry.versions()] == [(n, True) for n in range(1, PUSHERS + 1)]
    for marker, version in pushed.items():
        target = tmp_path / "fetched" / str(version)
        manifest = registry.fetch(version, target)  # every file against its sha256
        assert manifest["marker"] == marker
        assert (target / "model_card.md").read_text() == f"# model {marker}\n"
        assert (target / "saved_model" / "saved_model.pb").read_bytes() == b"graph " + marker.encode()
    # No promotion was lost to another's read-modify-write: each is in the history once.
    production = registry.production()
    assert sorted(production["history"]) == sorted(pushed.values())
    assert production["version"] == production["history"][-1]
    registry.fetch(production["version"], tmp_path / "production")


def test_concurrent_pushes_and_promotions_on_a_folder(tmp_path):
    uri = str(tmp_path / "registry")
    pushed = run_concurrently(uri, "flowers", tmp_path, {})
    check_registry(reg.Registry(uri, "flowers"), pushed, tmp_path)
    assert not list((tmp_path / "registry").rglob("*.partial"))


def test_concurrent_pushes_and_promotions_on_an_s3_endpoint(s3, tmp_path):
    pushed = run_concurrently("s3://models/team", "flowers", tmp_path, s3.env())
    with pytest.MonkeyPatch.context() as patch:
        for key, value in s3.env().items():
            patch.setenv(key, value)
        check_registry(reg.Registry("s3://models/team", "flowers"), pushed, tmp_path)


@pytest.mark.parametrize("where", ["folder", "s3"])
def test_a_version_number_is_reserved_once(where, s3, tmp_path, monkeypatch):
    """The reservation itself: a second claim of a taken number fails, and push moves on."""
    if where == "s3":
        for key, value in s3.env().items():
            monkeypatch.setenv(key, value)
    uri = "s3://models/reserve" if where == "s3" else str(tmp_path / "registry")
    registry = reg.Registry(uri, "m")
    key = registry._key(1, reg.RESERVATION)
    assert registry.folder.create_bytes(key, b"first")
    assert not registry.folder.create_bytes(key, b"second")
    assert registry.folder.get_bytes(key) == b"first"
    assert registry.push(model_folder(tmp_path / "a", "a"), {}) == 2


@pytest.mark.parametrize("where", ["folder", "s3"])
def test_the_pointer_is_replaced_only_if_unchanged_since_read(where, s3, tmp_path, monkeypatch):
    if where == "s3":
        for key, value in s3.env().items():
            monkeypatch.setenv(key, value)
    uri = "s3://models/pointer" if where == "s3" else str(tmp_path / "registry")
    folder = reg.Registry(uri, "m").folder
    assert folder.replace_bytes("m/production.json", b'{"version": 1}', None)
    assert not folder.replace_bytes("m/production.json", b'{"version": 9}', None)  # exists now
    data, tag = folder.get_tagged("m/production.json")
    assert folder.replace_bytes("m/production.json", b'{"version": 2}', tag)
    assert not folder.replace_bytes("m/production.json", b'{"version": 3}', tag)  # stale tag
    assert json.loads(folder.get_bytes("m/production.json")) == {"version": 2}


def test_export_s_conditional_promotion_leaves_a_moved_production_alone(tmp_path):
    """Evaluate compared against version 1; version 2 became production meanwhile: the new
    version is pushed but not promoted over a model it was never compared with."""
    registry = reg.Registry(str(tmp_path / "registry"), "m")
    for marker in "ab":
        registry.promote(registry.push(model_folder(tmp_path / marker, marker), {}))
    third = registry.push(model_folder(tmp_path / "c", "c"), {})
    with pytest.raises(reg.RegistryMoved, match="production is version 2 now, not version 1"):
        registry.promote(third, "blessed", if_production_is=1)
    assert registry.production()["version"] == 2
    registry.promote(third, "blessed", if_production_is=2)
    assert registry.production()["history"] == [1, 2, 3]
    with pytest.raises(reg.RegistryMoved, match="production is version 3 now, not version None"):
        registry.promote(1, "first run", if_production_is=None)
