"""registry: versioned models in an object store (or a local folder), and a production pointer.

    python -m components.registry list     --registry s3://models --model flowers
    python -m components.registry promote  --registry s3://models --model flowers --version 3
    python -m components.registry rollback --registry s3://models --model flowers
    python -m components.registry fetch    --registry s3://models --model flowers --output /tmp/m

Layout under the registry URI (an `s3://` / `minio://` bucket prefix or a local folder):

    <model>/<version>/...              the export folder as written: saved_model/, model_card.md,
                                       evaluation/, optional litert/ and onnx/
    <model>/<version>/MANIFEST.json    written last: every file with its size and sha256, and
                                       the version's metrics; a version without it is incomplete
    <model>/production.json            {"version": N, "history": [...]}: what serves

Versions are integers counted up from 1 and immutable: a push never writes into a version
that has any object, complete or not (a failed upload leaves an incomplete version, listed as
such and skipped). The pointer is one object replaced by one PUT (one rename locally), and only
ever names a complete version, so a reader sees the old model or the new one, never a mix.
Downloads check every file against the manifest's sha256 and refuse keys that could escape the
target folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components import storage
from components.cli import configure_logging, exit_on_user_error
from components.records import sha256_file

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
POINTER = "production.json"
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class RegistryError(RuntimeError):
    """The registry cannot do what was asked; the message says why."""


def safe_key(key: str) -> str:
    """`key` if it is a plain relative "/"-separated path, else RegistryError.

    A manifest is data from a bucket: a key like `../../home/x` or `/etc/x` must never become a
    local path outside the target folder.
    """
    if (
        not key
        or "\\" in key
        or "\x00" in key
        or key.startswith("/")
        or re.match(r"^[A-Za-z]:", key)
        or any(part in ("", ".", "..") for part in key.split("/"))
    ):
        raise RegistryError(f"refusing unsafe file name {key!r} in a registry manifest")
    return key


@dataclass(frozen=True)
class Version:
    number: int
    complete: bool
    manifest: dict[str, Any] | None


class Registry:
    def __init__(self, uri: str, model: str):
        if not MODEL_NAME.match(model):
            raise RegistryError(
                f"model name {model!r} must be letters, digits, '.', '_' or '-' "
                "(at most 128, starting with a letter or digit)"
            )
        self.uri = uri.rstrip("/")
        self.model = model
        try:
            self.folder = storage.open_folder(self.uri)
        except storage.StorageError as error:
            raise RegistryError(str(error)) from None

    def _key(self, *parts: object) -> str:
        return "/".join([self.model, *map(str, parts)])

    def _get_json(self, key: str) -> dict[str, Any] | None:
        data = self._storage(self.folder.get_bytes, key)
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError:
            raise RegistryError(f"{self.uri}/{key} is not valid JSON") from None

    def _storage(self, action, *args):
        try:
            return action(*args)
        except storage.StorageError as error:
            raise RegistryError(str(error)) from None

    def _listed(self) -> dict[int, bool]:
        """Version number -> complete (its manifest present), from one listing, no reads."""
        prefix = self.model + "/"
        listed: dict[int, bool] = {}
        for name in self._storage(self.folder.names):
            if not name.startswith(prefix):
                continue
            first, _, rest = name[len(prefix) :].partition("/")
            if first.isdigit() and rest:
                number = int(first)
                listed[number] = listed.get(number, False) or rest == MANIFEST
        return listed

    def versions(self) -> list[Version]:
        return [
            Version(n, complete, self._get_json(self._key(n, MANIFEST)) if complete else None)
            for n, complete in sorted(self._listed().items())
        ]

    def manifest(self, version: int) -> dict[str, Any]:
        manifest = self._get_json(self._key(version, MANIFEST))
        if manifest is None:
            if version in self._listed():
                raise RegistryError(
                    f"version {version} of {self.model} is incomplete (its upload did not "
                    "finish): it cannot be used"
                )
            raise RegistryError(f"{self.model} has no version {version} in {self.uri}")
        return manifest

    def production(self) -> dict[str, Any] | None:
        return self._get_json(self._key(POINTER))

    def push(self, folder: Path, metadata: dict[str, Any]) -> int:
        """Upload every file of `folder` as a new version; the manifest goes last. Returns it."""
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        if not files:
            raise RegistryError(f"{folder} holds no files to push")
        self._storage(self.folder.check)
        # Counted from the listing alone: complete or not, a number is never reused.
        version = max(self._listed(), default=0) + 1
        entries = {}
        for path in files:
            key = safe_key(path.relative_to(folder).as_posix())
            entries[key] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
        log.info(
            "pushing %d files (%.1f MB) to %s/%s",
            len(files),
            sum(e["size"] for e in entries.values()) / 1e6,
            self.uri,
            self._key(version),
        )
        for path in files:
            self._storage(self.folder.put_file, self._key(version, path.relative_to(folder).as_posix()), path)
        manifest = {
            "model": self.model,
            "version": version,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **metadata,
            "files": entries,
        }
        # Written last: its presence is what makes the version complete.
        self._storage(
            self.folder.put_bytes,
            self._key(version, MANIFEST),
            (json.dumps(manifest, indent=2) + "\n").encode(),
        )
        log.info("%s version %d is complete", self.model, version)
        return version

    def _set_pointer(self, version: int, history: list[int], reason: str) -> dict[str, Any]:
        pointer = {
            "model": self.model,
            "version": version,
            "history": history,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "reason": reason,
        }
        data = (json.dumps(pointer, indent=2) + "\n").encode()
        self._storage(self.folder.put_bytes, self._key(POINTER), data)
        return pointer

    def promote(self, version: int, reason: str = "promoted by hand") -> dict[str, Any]:
        """Point production at `version`, which must be complete with every listed file present."""
        manifest = self.manifest(version)
        present = set(self._storage(self.folder.names))
        missing = [key for key in manifest["files"] if self._key(version, key) not in present]
        if missing:
            raise RegistryError(
                f"version {version} of {self.model} lacks {len(missing)} of its files "
                f"(e.g. {missing[0]}): refusing to promote it"
            )
        current = self.production()
        history = list(current["history"]) if current else []
        if current and current["version"] == version:
            log.info("%s version %d is already in production", self.model, version)
            return current
        pointer = self._set_pointer(version, history + [version], reason)
        log.info(
            "%s production: %s -> %d (%s)",
            self.model,
            current["version"] if current else "none",
            version,
            reason,
        )
        return pointer

    def rollback(self) -> dict[str, Any]:
        """Point production back at the version that served before the current one."""
        current = self.production()
        if current is None:
            raise RegistryError(f"{self.model} has no production version in {self.uri}: nothing to roll back")
        history = list(current["history"])
        if len(history) < 2:
            raise RegistryError(
                f"{self.model} version {current['version']} is the first production version: "
                "there is nothing earlier to roll back to"
            )
        history.pop()
        previous = history[-1]
        self.manifest(previous)  # still complete
        pointer = self._set_pointer(previous, history, f"rollback from version {current['version']}")
        log.info("%s production: %d -> %d (rollback)", self.model, current["version"], previous)
        return pointer

    def fetch(self, version: int, target: Path, subfolder: str = "") -> dict[str, Any]:
        """Download `version` (or only `subfolder` of it) into `target`, checking every sha256."""
        manifest = self.manifest(version)
        prefix = f"{subfolder.strip('/')}/" if subfolder else ""
        wanted = {safe_key(k): v for k, v in manifest["files"].items() if k.startswith(prefix)}
        if not wanted:
            raise RegistryError(f"version {version} of {self.model} has no files under {subfolder!r}")
        target.mkdir(parents=True, exist_ok=True)
        for key, entry in wanted.items():
            path = target / key[len(prefix) :]
            self._storage(self.folder.get_file, self._key(version, key), path)
            if path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
                path.unlink()
                raise RegistryError(
                    f"{self.uri}/{self._key(version, key)} does not match its manifest "
                    "(sha256 differs): the registry copy was altered or damaged; refusing it"
                )
        return manifest


def list_versions(registry: Registry) -> list[dict[str, Any]]:
    """One row per version: number, state, date, headline metrics, and whether it serves."""
    current = registry.production()
    serving = current["version"] if current else None
    rows = []
    for version in registry.versions():
        manifest = version.manifest or {}
        metrics = manifest.get("metrics", {})
        rows.append(
            {
                "version": version.number,
                "state": "complete" if version.complete else "incomplete",
                "production": version.number == serving,
                "created": manifest.get("created", ""),
                "accuracy": metrics.get("accuracy"),
                "macro_f1": metrics.get("macro_f1"),
                "run_id": manifest.get("run_id", ""),
            }
        )
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    def number(value):
        return "-" if value is None else f"{value:.4f}"

    lines = [
        f"{'version':>7}  {'state':<10} {'serving':<7} {'created':<20} {'accuracy':>8} {'macro_f1':>8}  run"
    ]
    for row in rows:
        lines.append(
            f"{row['version']:>7}  {row['state']:<10} {'*' if row['production'] else '':<7} "
            f"{row['created']:<20} {number(row['accuracy']):>8} {number(row['macro_f1']):>8}  "
            f"{row['run_id']}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m components.registry",
        description="List, promote, roll back and fetch registry models.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("list", "versions with their metrics; * marks production"),
        ("promote", "point production at a complete version"),
        ("rollback", "point production back at the version before it"),
        ("fetch", "download a version, checking every file's sha256"),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument(
            "--registry", required=True, help="s3://bucket[/prefix], minio://... or a folder"
        )
        command.add_argument("--model", required=True, help="model name (a folder in the registry)")
        if name == "promote":
            command.add_argument("--version", type=int, required=True)
        if name == "fetch":
            command.add_argument("--version", type=int, default=None, help="default: production")
            command.add_argument("--output", type=Path, required=True)
    return parser


def run_command(args: argparse.Namespace) -> int:
    registry = Registry(args.registry, args.model)
    if args.command == "list":
        rows = list_versions(registry)
        print(format_rows(rows) if rows else f"{args.model} has no versions in {args.registry}")
    elif args.command == "promote":
        pointer = registry.promote(args.version)
        print(f"{args.model} production: version {pointer['version']}")
    elif args.command == "rollback":
        pointer = registry.rollback()
        print(f"{args.model} production: version {pointer['version']}")
    elif args.command == "fetch":
        version = args.version
        if version is None:
            current = registry.production()
            if current is None:
                raise RegistryError(f"{args.model} has no production version; pass --version")
            version = current["version"]
        registry.fetch(version, args.output)
        print(f"{args.model} version {version} -> {args.output} (sha256 verified)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    with exit_on_user_error(RegistryError):
        return run_command(args)


def fetch_production(uri: str, model: str, subfolder: str = "saved_model") -> tuple[Path, dict] | None:
    """(local folder, manifest) of the production version's `subfolder`, or None if there is none.

    The folder is a new temporary directory; the caller removes it.
    """
    registry = Registry(uri, model)
    current = registry.production()
    if current is None:
        return None
    target = Path(tempfile.mkdtemp(prefix="production-"))
    manifest = registry.fetch(current["version"], target, subfolder)
    return target, manifest


if __name__ == "__main__":
    sys.exit(main())
