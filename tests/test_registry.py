"""The model registry against a real HTTP S3 endpoint (moto's server standing in for MinIO)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from components import registry as reg
from components import storage


@pytest.fixture(scope="module", autouse=True)
def models_bucket(s3):
    s3.client().make_bucket("models")


def model_folder(root: Path, marker: str, repeat: int = 1000) -> Path:
    (root / "saved_model" / "variables").mkdir(parents=True)
    (root / "saved_model" / "saved_model.pb").write_bytes(b"graph " + marker.encode())
    (root / "saved_model" / "variables" / "variables.data").write_bytes(marker.encode() * repeat)
    (root / "model_card.md").write_text(f"# model {marker}\n")
    return root


@pytest.fixture
def s3_registry(s3_env, request):
    # One model name per test: the bucket is shared by the module.
    return reg.Registry("s3://models/team", request.node.name.replace("[", "-").replace("]", ""))


def test_push_promote_rollback_and_list(s3_registry, tmp_path):
    first = s3_registry.push(model_folder(tmp_path / "a", "a"), {"metrics": {"accuracy": 0.9}})
    s3_registry.promote(first, "first run")
    second = s3_registry.push(model_folder(tmp_path / "b", "b"), {"metrics": {"accuracy": 0.95}})
    assert (first, second) == (1, 2)
    assert s3_registry.production()["version"] == 1  # pushing does not promote
    s3_registry.promote(second)
    assert s3_registry.production()["history"] == [1, 2]

    rows = reg.list_versions(s3_registry)
    assert [(r["version"], r["state"], r["production"], r["accuracy"]) for r in rows] == [
        (1, "complete", False, 0.9),
        (2, "complete", True, 0.95),
    ]

    assert s3_registry.rollback()["version"] == 1
    fetched = tmp_path / "fetched"
    manifest = s3_registry.fetch(s3_registry.production()["version"], fetched)
    assert (fetched / "model_card.md").read_text() == "# model a\n"
    assert set(manifest["files"]) == {
        "model_card.md",
        "saved_model/saved_model.pb",
        "saved_model/variables/variables.data",
    }
    with pytest.raises(reg.RegistryError, match="nothing earlier to roll back"):
        s3_registry.rollback()


def test_versions_are_immutable_and_never_reused(s3_registry, tmp_path):
    folder = model_folder(tmp_path / "a", "a")
    assert [s3_registry.push(folder, {}) for _ in range(3)] == [1, 2, 3]
    manifest = s3_registry.manifest(2)
    assert manifest["files"]["model_card.md"]["sha256"] == reg.sha256_file(folder / "model_card.md")


def test_an_upload_failing_half_way_leaves_production_on_the_last_complete_version(
    s3_registry, tmp_path, monkeypatch
):
    good = s3_registry.push(model_folder(tmp_path / "a", "a"), {})
    s3_registry.promote(good)

    real_put = storage.ObjectStoreFolder.put_file
    uploads = []

    def put_then_fail(self, key, path):
        uploads.append(key)
        if len(uploads) == 2:
            raise storage.StorageError("connection reset by peer (injected after one file was stored)")
        real_put(self, key, path)

    monkeypatch.setattr(storage.ObjectStoreFolder, "put_file", put_then_fail)
    with pytest.raises(reg.RegistryError, match="connection reset"):
        s3_registry.push(model_folder(tmp_path / "b", "b"), {})
    monkeypatch.setattr(storage.ObjectStoreFolder, "put_file", real_put)

    assert s3_registry.production()["version"] == good
    assert [(v.number, v.complete) for v in s3_registry.versions()] == [(1, True), (2, False)]
    with pytest.raises(reg.RegistryError, match="incomplete"):
        s3_registry.promote(2)
    with pytest.raises(reg.RegistryError, match="incomplete"):
        s3_registry.fetch(2, tmp_path / "x")
    # The half-written version is never written into again: the next push is version 3.
    assert s3_registry.push(model_folder(tmp_path / "c", "c"), {}) == 3


def test_a_tampered_file_is_refused_on_download(s3_registry, s3, tmp_path):
    version = s3_registry.push(model_folder(tmp_path / "a", "a"), {})
    key = f"team/{s3_registry.model}/{version}/saved_model/saved_model.pb"
    data = b"graph a but altered"
    import io

    s3.client().put_object("models", key, io.BytesIO(data), len(data))
    with pytest.raises(reg.RegistryError, match="does not match its manifest"):
        s3_registry.fetch(version, tmp_path / "fetched")
    assert not (tmp_path / "fetched" / "saved_model" / "saved_model.pb").exists()


def test_a_manifest_naming_a_path_outside_the_target_is_refused(s3_registry, s3, tmp_path):
    version = s3_registry.push(model_folder(tmp_path / "a", "a"), {})
    manifest = s3_registry.manifest(version)
    manifest["files"]["../../escaped.txt"] = {"size": 1, "sha256": "0" * 64}
    key = f"{s3_registry.model}/{version}/MANIFEST.json"
    s3_registry.folder.put_bytes(key, json.dumps(manifest).encode())
    with pytest.raises(reg.RegistryError, match="unsafe file name"):
        s3_registry.fetch(version, tmp_path / "fetched")
    assert not (tmp_path / "escaped.txt").exists()


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/etc/passwd", "a\\b", "C:/x", "a//b", "./a", ""])
def test_unsafe_keys(key):
    with pytest.raises(reg.RegistryError):
        reg.safe_key(key)


def test_safe_keys_pass():
    assert reg.safe_key("saved_model/variables/variables.index") == "saved_model/variables/variables.index"


def test_missing_bucket_and_bad_credentials_are_clear(s3_env, monkeypatch, tmp_path):
    folder = model_folder(tmp_path / "a", "a")
    with pytest.raises(reg.RegistryError, match="bucket 'no-such-bucket' does not exist"):
        reg.Registry("s3://no-such-bucket", "m").push(folder, {})
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(reg.RegistryError, match="refused the credentials"):
        reg.Registry("s3://models", "m").push(folder, {})
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    with pytest.raises(reg.RegistryError, match="no object store credentials"):
        reg.Registry("s3://models", "m")


def test_local_folder_registry_and_cli(tmp_path, capsys):
    root = tmp_path / "registry"
    registry = reg.Registry(str(root), "patterns")
    for marker in "ab":
        folder = model_folder(tmp_path / marker, marker)
        registry.promote(registry.push(folder, {"metrics": {"accuracy": 0.5}}))
    assert not list(root.rglob("*.partial"))
    assert reg.main(["rollback", "--registry", str(root), "--model", "patterns"]) == 0
    assert reg.main(["list", "--registry", str(root), "--model", "patterns"]) == 0
    out = capsys.readouterr().out
    assert "production: version 1" in out
    lines = out.splitlines()
    assert any(line.split()[:3] == ["1", "complete", "*"] for line in lines)
    assert any(line.split()[:2] == ["2", "complete"] and "*" not in line for line in lines)
    with pytest.raises(SystemExit) as exit_info:
        reg.main(["promote", "--registry", str(root), "--model", "patterns", "--version", "7"])
    assert exit_info.value.code == 2


def test_bad_model_names_are_refused(tmp_path):
    for name in ("../x", "a/b", "", ".hidden", "flowers\n", "flowers\nproduction"):
        with pytest.raises(reg.RegistryError, match="model name"):
            reg.Registry(str(tmp_path), name)


def test_pipeline_cli_lists_promotes_and_rolls_back(tmp_path):
    import subprocess
    import sys

    root = tmp_path / "registry"
    registry = reg.Registry(str(root), "flowers")
    for marker in "abc":
        registry.push(model_folder(tmp_path / marker, marker), {"metrics": {"accuracy": 0.5}})
    repo = Path(__file__).resolve().parent.parent

    def cli(*args):
        return subprocess.run(
            [sys.executable, "pipeline.py", *args, "--registry", str(root), "--model-name", "flowers"],
            cwd=repo,
            capture_output=True,
            text=True,
        )

    assert cli("promote", "--version", "1").returncode == 0
    promoted = cli("promote", "--version", "3")
    assert promoted.returncode == 0 and "flowers production: version 3" in promoted.stdout
    rolled = cli("rollback")
    assert rolled.returncode == 0 and "flowers production: version 1" in rolled.stdout
    listed = cli("models", "list")
    rows = {line.split()[0]: line for line in listed.stdout.splitlines()[1:]}
    assert sorted(rows) == ["1", "2", "3"]
    assert rows["1"].split()[1:3] == ["complete", "*"]
    assert "*" not in rows["2"] and "*" not in rows["3"]
    refused = cli("rollback")
    assert refused.returncode == 2 and "nothing earlier to roll back" in refused.stderr


def test_promote_reads_every_file_back_against_its_sha256(tmp_path):
    """Present is not enough: an altered file keeps the version out of production."""
    root = tmp_path / "registry"
    registry = reg.Registry(str(root), "m")
    registry.promote(registry.push(model_folder(tmp_path / "a", "a"), {}))
    second = registry.push(model_folder(tmp_path / "b", "b"), {})
    (root / "m" / str(second) / "saved_model" / "saved_model.pb").write_bytes(b"graph altered")
    with pytest.raises(reg.RegistryError, match="refusing version 2: .* does not match its manifest"):
        registry.promote(second)
    assert registry.production()["version"] == 1


def test_a_symbolic_link_in_the_folder_is_never_pushed(tmp_path):
    folder = model_folder(tmp_path / "a", "a")
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the registry")
    (folder / "saved_model" / "assets").mkdir()
    (folder / "saved_model" / "assets" / "vocab.txt").symlink_to(secret)
    registry = reg.Registry(str(tmp_path / "registry"), "m")
    with pytest.raises(reg.RegistryError, match=r"symbolic links \(saved_model/assets/vocab.txt\)"):
        registry.push(folder, {})
    assert registry.versions() == []


def test_a_local_registry_that_cannot_be_written_is_a_registry_error(tmp_path):
    (tmp_path / "registry").mkdir()
    (tmp_path / "registry" / "m").write_text("a file where the model's folder goes")
    registry = reg.Registry(str(tmp_path / "registry"), "m")
    with pytest.raises(reg.RegistryError, match="registry/m"):
        registry.push(model_folder(tmp_path / "a", "a"), {})


def test_the_endpoint_s_repr_never_shows_the_secret_key():
    endpoint = storage.endpoint_from_env(
        {
            "AWS_ENDPOINT_URL": "http://minio:9000",
            "AWS_ACCESS_KEY_ID": "ak",
            "AWS_SECRET_ACCESS_KEY": "s3cr3t-v4lue",
        }
    )
    assert endpoint.secret_key == "s3cr3t-v4lue"
    assert "s3cr3t" not in repr(endpoint) and "s3cr3t" not in str(endpoint)


def registry_of_many(registry: reg.Registry, tmp_path: Path) -> None:
    """Versions 1-8; production went 2 -> 5 -> 3 (so history [2, 5, 3]); version 9 is a
    push that failed a day and a half ago, version 10 one still uploading."""
    for number in range(1, 9):
        registry.push(model_folder(tmp_path / str(number), str(number), repeat=10), {})
    for number in (2, 5, 3):
        registry.promote(number)
    for number, hours in ((9, 36), (10, 0)):
        claim = {"pid": 1, "host": "elsewhere", "time": time.time() - hours * 3600}
        registry.folder.put_bytes(registry._key(number, reg.RESERVATION), json.dumps(claim).encode())
        registry.folder.put_bytes(registry._key(number, "saved_model", "saved_model.pb"), b"half")


@pytest.mark.parametrize("where", ["folder", "s3"])
def test_prune_keeps_the_newest_production_and_its_history_and_removes_the_rest(where, tmp_path, request):
    if where == "s3":
        request.getfixturevalue("s3_env")
        registry = request.getfixturevalue("s3_registry")
    else:
        registry = reg.Registry(str(tmp_path / "registry"), "many")
    registry_of_many(registry, tmp_path)
    plan = reg.plan_pruning(registry, keep=2)
    assert plan.keep == {
        3: "production",
        5: "in production's recent history (a rollback may return to it)",
        7: "one of the newest 2",
        8: "one of the newest 2",
        10: "incomplete, maybe a push still uploading",
    }
    assert sorted(plan.remove) == [1, 2, 4, 6, 9]
    assert plan.remove[9] == "incomplete (a push that did not finish, 36 h ago)"
    reg.prune(registry, plan)
    assert [(v.number, v.complete) for v in registry.versions()] == [
        (3, True), (5, True), (7, True), (8, True), (10, False)
    ]  # fmt: skip
    ours = [name.split("/")[1] for name in registry.folder.names() if name.startswith(registry.model + "/")]
    leftovers = [number for number in ours if number in ("1", "2", "4", "6", "9")]
    assert leftovers == []
    # Production still serves, verified; a rollback still has somewhere to go.
    assert registry.production()["version"] == 3
    registry.fetch(3, tmp_path / "serving")
    assert registry.rollback()["version"] == 5


def test_models_prune_is_a_dry_run_unless_applied(tmp_path):
    import subprocess
    import sys

    root = tmp_path / "registry"
    registry = reg.Registry(str(root), "flowers")
    registry_of_many(registry, tmp_path)
    repo = Path(__file__).resolve().parent.parent

    def cli(*args):
        argv = [sys.executable, "pipeline.py", "models", "prune", *args, "--registry", str(root)]
        return subprocess.run([*argv, "--model-name", "flowers"], cwd=repo, capture_output=True, text=True)

    dry = cli("--keep", "2")
    assert dry.returncode == 0, dry.stderr
    assert "would remove version 1: older than the newest 2" in dry.stdout
    assert "keep    version 3: production" in dry.stdout
    assert "dry run: nothing removed" in dry.stdout
    assert len(registry.versions()) == 10
    applied = cli("--keep", "2", "--apply")
    assert applied.returncode == 0, applied.stderr
    assert [v.number for v in registry.versions()] == [3, 5, 7, 8, 10]
    left = sorted(path.name for path in (root / "flowers").iterdir() if not path.name.startswith("."))
    assert left == ["10", "3", "5", "7", "8", "production.json"]  # no empty folder stays
    refused = cli("--keep", "0")
    assert refused.returncode == 2 and "--keep must be 1 or more" in refused.stderr


def test_a_local_registry_s_files_are_readable_by_others_as_the_umask_allows(tmp_path):
    """Written through temporary files (0600 by default): a model server running as another
    user, in a container with the folder mounted, must still read the pointer and the model."""
    registry = reg.Registry(str(tmp_path / "registry"), "shared")
    registry.promote(registry.push(model_folder(tmp_path / "a", "a"), {}))
    files = [
        path
        for path in (tmp_path / "registry").rglob("*")
        if path.is_file() and not path.name.startswith(".")
    ]
    assert {oct(path.stat().st_mode & 0o777) for path in files} == {oct(0o666 & ~storage._UMASK)}
