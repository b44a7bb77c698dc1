"""What `run-local --runner docker` does around the engine, checked without one: .env reading,
what enters a container, data staging in a real HTTP S3 endpoint, and the errors a user meets
first. The docker tier (tests/test_docker.py) runs it for real."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import pytest

from components import docker_local
from components.cli import load_env_file
from components.sample_data import CLASSES
from components.storage import StorageError
from tests.conftest import make_image_folder

REPO = Path(__file__).resolve().parent.parent


def test_env_file_fills_only_unset_variables(tmp_path, monkeypatch):
    env = tmp_path / ".env"
    env.write_text(
        "# comment\n\nRETRAIN_T_A=from-file\nexport RETRAIN_T_B='quoted value'\nRETRAIN_T_C=\"x=y\"\n"
    )
    monkeypatch.setenv("RETRAIN_T_A", "from-shell")
    for name in ("RETRAIN_T_B", "RETRAIN_T_C"):
        monkeypatch.delenv(name, raising=False)
    assert load_env_file(env) == 2
    assert os.environ["RETRAIN_T_A"] == "from-shell"
    assert os.environ["RETRAIN_T_B"] == "quoted value"
    assert os.environ["RETRAIN_T_C"] == "x=y"
    assert load_env_file(tmp_path / "missing.env") == 0


def test_env_file_with_a_broken_line_names_it(tmp_path):
    env = tmp_path / ".env"
    env.write_text("GOOD=1\nthis is not a setting\n")
    with pytest.raises(SystemExit, match=r"\.env:2: expected KEY=VALUE"):
        load_env_file(env)


def test_env_example_holds_every_setting_the_docker_run_and_compose_read(monkeypatch):
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RETRAIN_BUCKET"):
        monkeypatch.delenv(name, raising=False)
    assert load_env_file(REPO / ".env.example") == 4
    compose = (REPO / "docker" / "compose.yaml").read_text()
    for name in set(re.findall(r"\$\{(\w+)", compose)) - {"MINIO_PORT", "MINIO_CONSOLE_PORT"}:
        assert name in os.environ, name


def test_only_the_store_settings_enter_a_container():
    env = {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
        "HOME": "/root",
        "GITHUB_TOKEN": "t",
        "AWS_REGION": "",
    }
    assert docker_local.container_env(env) == {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
    }


def test_staging_uploads_a_folder_once(s3_env, tmp_path, monkeypatch):
    images = make_image_folder(tmp_path / "images", images_per_class=3)
    s3_env.client().make_bucket("stage")
    uri = docker_local.stage_folder(images, "stage", "tiny")
    assert uri == "s3://stage/datasets/tiny"
    names = sorted(
        item.object_name
        for item in s3_env.client().list_objects("stage", prefix="datasets/tiny/", recursive=True)
    )
    local = sorted(
        f"datasets/tiny/{path.relative_to(images).as_posix()}" for path in images.rglob("*") if path.is_file()
    )
    assert names == local
    (images / "dots" / "new.jpg").write_bytes(next((images / "dots").glob("*.jpg")).read_bytes())
    uploads = []
    real_put = docker_local.ObjectStoreFolder.put_file

    def counting_put(self, key, path):
        uploads.append(key)
        real_put(self, key, path)

    monkeypatch.setattr(docker_local.ObjectStoreFolder, "put_file", counting_put)
    docker_local.stage_folder(images, "stage", "tiny")
    assert uploads == ["dots/new.jpg"]  # only what is not there yet


def test_staging_uploads_what_preprocess_reads_from_the_folder(s3_env, tmp_path):
    """A class folder that is a link to the images is uploaded (it is a class to preprocess);
    macOS's __MACOSX and hidden folders are not (preprocess skips them)."""
    images = make_image_folder(tmp_path / "images", images_per_class=3)
    elsewhere = tmp_path / "elsewhere"
    (images / "dots").rename(elsewhere)
    (images / "dots").symlink_to(elsewhere, target_is_directory=True)
    for junk in ("__MACOSX/dots/._a.jpg", ".thumbnails/a.jpg"):
        (images / junk).parent.mkdir(parents=True)
        (images / junk).write_bytes(b"junk")
    s3_env.client().make_bucket("stage")
    docker_local.stage_folder(images, "stage", "linked")
    names = sorted(
        item.object_name.removeprefix("datasets/linked/")
        for item in s3_env.client().list_objects("stage", prefix="datasets/linked/", recursive=True)
    )
    assert names == sorted(f"{cls}/{path.name}" for cls in CLASSES for path in (images / cls).iterdir())
    assert sum(name.startswith("dots/") for name in names) == 3


def test_staging_into_a_missing_bucket_says_so(s3_env, tmp_path):
    images = make_image_folder(tmp_path / "images", images_per_class=3)
    with pytest.raises(StorageError, match="bucket 'nope' does not exist"):
        docker_local.stage_folder(images, "nope", "tiny")


def test_docker_run_without_an_engine_is_a_clear_error(monkeypatch, tmp_path, caplog):
    import commands

    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-such.sock")
    with pytest.raises(SystemExit) as exited:
        commands.main(
            [
                "run-local",
                "--runner",
                "docker",
                "--workdir",
                str(tmp_path / "run"),
                "--env-file",
                str(tmp_path / "none.env"),
            ]
        )
    assert exited.value.code == 2
    assert "no Docker engine answers" in caplog.text
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


def test_lock_files_pin_every_direct_dependency_at_pyprojects_version():
    """`make lock` keeps them in step; this catches a pyproject.toml edit without it (offline)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    # The gpu image only trains: export, and so the ONNX converter, runs in the cpu image.
    wanted = {
        "cpu": project["dependencies"] + extras["cpu"] + extras["onnx"],
        "gpu": project["dependencies"] + extras["gpu"],
    }
    for flavor, requirements in wanted.items():
        lines = (REPO / "docker" / f"requirements-{flavor}.txt").read_text().splitlines()
        locked = {
            re.sub(r"[-_.]+", "-", name).lower(): version
            for name, _, version in (line.partition("==") for line in lines if not line.startswith("#"))
        }
        for requirement in requirements:
            spec, _, marker = requirement.partition(";")
            if "platform_machine != 'x86_64'" in marker:
                continue  # the images are built for x86_64
            name, version = re.match(r"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==(\S+)", spec.strip()).groups()
            assert locked.get(re.sub(r"[-_.]+", "-", name).lower()) == version, (flavor, name)


def test_a_step_container_s_exit_code_is_read_before_it_is_removed(capsys):
    """Contract test of `local_run.run_container` (the docker tier runs it for real): kfp.local's own
    version lets docker auto-remove the container and takes a container gone before its exit
    code was read for success; ours asks for the code first and removes the container after."""
    from kfp.local import docker_task_handler

    import local_run

    events = []

    class Container:
        def logs(self, stream):
            events.append("logs")
            return iter([b"Traceback ...\\n", b"PreprocessError: no objects under s3://empty/flowers\\n"])

        def wait(self):
            events.append("wait")
            return {"StatusCode": 1}

        def remove(self, force):
            events.append("remove")

    class Images:
        def list(self):
            return [type("Image", (), {"tags": ["step:cpu"], "attrs": {"RepoDigests": []}})()]

    class Client:
        images = Images()

        class containers:  # noqa: N801 (docker-py's attribute name)
            @staticmethod
            def run(**kwargs):
                assert "auto_remove" not in kwargs
                events.append("run")
                return Container()

    assert local_run.run_container(Client(), "step:cpu", ["python3"], {}, network_mode="host") == 1
    assert events == ["run", "logs", "wait", "remove"]
    assert "no objects under s3://empty/flowers" in capsys.readouterr().out
    original = docker_task_handler.run_docker_container
    try:
        local_run.use_exit_codes()
        assert docker_task_handler.run_docker_container is local_run.run_container
    finally:
        docker_task_handler.run_docker_container = original
