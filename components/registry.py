"""registry: versioned models in an object store (or a local folder), and a production pointer.

    python -m components.registry list     --registry s3://models --model flowers
    python -m components.registry promote  --registry s3://models --model flowers --version 3
    python -m components.registry rollback --registry s3://models --model flowers
    python -m components.registry fetch    --registry s3://models --model flowers --output /tmp/m

Layout under the registry URI (an `s3://` / `minio://` bucket prefix or a local folder):

    <model>/<version>/...              the export folder as written: saved_model/, model_card.md,
                                       evaluation/, optional litert/ and onnx/
    <model>/<version>/RESERVATION.json written first: the number is taken
    <model>/<version>/MANIFEST.json    written last: every file with its size and sha256, and
                                       the version's metrics; a version without it is incomplete
    <model>/production.json            {"version": N, "history": [...]}: what serves
    <model>/runs/<run>/<step>.json     what a pipeline run's steps recorded (evaluate's decision,
                                       export's version) for its exit handler, `components.notify`

Versions are integers counted up from 1 and immutable: a push first reserves its number with
`RESERVATION.json`, created only if absent (`If-None-Match: *` on an object store, an exclusive
hard link in a folder), so two pushes at once get two numbers; the manifest is created the
same way, last. A failed upload leaves an incomplete version, listed as such and skipped. The
pointer is one object replaced only if it is still what was read (`If-Match` on its ETag; in a
folder, under an exclusive lock, by one rename), and only ever names a version whose every file
was read back against its sha256, so a reader sees the old model or the new one, never a mix,
and no promotion is lost to another. `promote(if_production_is=N)` promotes only while N serves:
export uses it with the version evaluate compared against.

Stores without conditional writes (older MinIO releases, some S3 look-alikes) ignore the
conditions: then two pushes at the same moment can take one number, and the second to write
its manifest fails with a clear error instead of completing a mix; the pointer falls back to
last-writer-wins. Downloads check every file against the manifest's sha256 and refuse keys
that could escape the target folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import socket
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
RESERVATION = "RESERVATION.json"  # created first, only if absent: the version number is taken
POINTER = "production.json"
RUNS = "runs"  # <model>/runs/<run>/: a pipeline run's records, never a version (not digits)
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class RegistryError(RuntimeError):
    """The registry cannot do what was asked; the message says why."""


class RegistryMoved(RegistryError):
    """Production is no longer the version a promotion was conditional on."""


ANY = object()  # promote(if_production_is=ANY): whatever production is
RESERVE_ATTEMPTS = 1000
POINTER_ATTEMPTS = 20


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
        if not isinstance(model, str) or not MODEL_NAME.fullmatch(model):
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
        return self._get_tagged_json(key)[0]

    def _get_tagged_json(self, key: str) -> tuple[dict[str, Any] | None, str | None]:
        """(parsed object or None, the tag a conditional replace compares against)."""
        found = self._storage(self.folder.get_tagged, key)
        if found is None:
            return None, None
        try:
            return json.loads(found[0]), found[1]
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

    def _run_key(self, run_id: str, name: str) -> str:
        # A run name is the pipeline's, not ours to refuse: anything outside a plain key
        # becomes "_", so an odd name still has its records.
        cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", run_id).lstrip(".")[:200]
        if not cleaned:
            raise RegistryError(f"run name {run_id!r} leaves nothing to name its records by")
        return self._key(RUNS, cleaned, name)

    def record_run(self, run_id: str, name: str, data: bytes) -> None:
        """Write `<model>/runs/<run_id>/<name>`, replacing what a retried step wrote."""
        self._storage(self.folder.put_bytes, self._run_key(run_id, name), data)

    def run_record(self, run_id: str, name: str) -> bytes | None:
        """What a step of run `run_id` recorded as `name`, or None."""
        return self._storage(self.folder.get_bytes, self._run_key(run_id, name))

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
        return self._pointer()[0]

    def push(self, folder: Path, metadata: dict[str, Any]) -> int:
        """Upload every file of `folder` as a new version; the manifest goes last. Returns it."""
        links = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_symlink())
        if links:
            # A link would upload whatever it points at (a link to /etc/passwd was, once).
            raise RegistryError(f"{folder} holds symbolic links ({', '.join(links[:5])}): refusing to push")
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        if not files:
            raise RegistryError(f"{folder} holds no files to push")
        self._storage(self.folder.check)
        version = self._reserve()
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
        # Written last: its presence is what makes the version complete. Created, never
        # replaced: on a store that ignored the reservation's condition, a second pusher of the
        # same number fails here instead of completing a mix of two models.
        written = self._storage(
            self.folder.create_bytes,
            self._key(version, MANIFEST),
            (json.dumps(manifest, indent=2) + "\n").encode(),
        )
        if not written:
            raise RegistryError(
                f"version {version} of {self.model} was completed by another push at the same "
                f"time: this store ignored the reservation's condition; push again"
            )
        log.info("%s version %d is complete", self.model, version)
        return version

    def _reserve(self) -> int:
        """The next free version number, taken atomically: a reservation object created only
        if absent (`If-None-Match: *` on an object store, an exclusive link in a folder). Two
        pushes at once get two numbers; a number is never reused, complete or not."""
        version = max(self._listed(), default=0) + 1
        for _ in range(RESERVE_ATTEMPTS):
            claim = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()})
            if self._storage(self.folder.create_bytes, self._key(version, RESERVATION), claim.encode()):
                return version
            version += 1
        raise RegistryError(
            f"could not reserve a version of {self.model} in {RESERVE_ATTEMPTS} tries: "
            "too many pushes at once"
        )

    def _pointer(self) -> tuple[dict[str, Any] | None, str | None]:
        """(production pointer or None, its tag)."""
        return self._get_tagged_json(self._key(POINTER))

    def _replace_pointer(self, tag: str | None, version: int, history: list[int], reason: str) -> dict | None:
        """Write the pointer only if it is still the one read with `tag`; None if it moved."""
        pointer = {
            "model": self.model,
            "version": version,
            "history": history,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "reason": reason,
        }
        data = (json.dumps(pointer, indent=2) + "\n").encode()
        return pointer if self._storage(self.folder.replace_bytes, self._key(POINTER), data, tag) else None

    def verify(self, version: int) -> dict[str, Any]:
        """The manifest of `version`, after every file it lists was read back and matched its
        sha256 (not only listed): a version with a missing or altered file is refused."""
        with tempfile.TemporaryDirectory(prefix="verify-") as scratch:
            try:
                return self.fetch(version, Path(scratch))
            except RegistryError as error:
                raise RegistryError(f"refusing version {version}: {error}") from None

    def promote(
        self, version: int, reason: str = "promoted by hand", if_production_is: object = ANY
    ) -> dict[str, Any]:
        """Point production at `version`, once every file of it matches its manifest's sha256.

        With `if_production_is` (a version number, or None for "no production yet"), only if
        production is still that version: export passes the version evaluate compared against,
        so a model is never promoted over one it was not judged against (RegistryMoved)."""
        self.verify(version)

        def change(current: dict[str, Any] | None) -> tuple[int, list[int], str] | None:
            serving = current["version"] if current else None
            if if_production_is is not ANY and serving != if_production_is:
                raise RegistryMoved(
                    f"{self.model} production is version {serving} now, not version "
                    f"{if_production_is} that this model was evaluated against: version {version} "
                    "is pushed but not promoted; evaluate it again, or promote it by hand"
                )
            if serving == version:
                log.info("%s version %d is already in production", self.model, version)
                return None
            return version, (list(current["history"]) if current else []) + [version], reason

        return self._move_pointer("promotion", change)

    def rollback(self) -> dict[str, Any]:
        """Point production back at the version that served before the current one."""

        def change(current: dict[str, Any] | None) -> tuple[int, list[int], str]:
            if current is None:
                raise RegistryError(
                    f"{self.model} has no production version in {self.uri}: nothing to roll back"
                )
            history = list(current["history"])
            if len(history) < 2:
                raise RegistryError(
                    f"{self.model} version {current['version']} is the first production version: "
                    "there is nothing earlier to roll back to"
                )
            history.pop()
            self.verify(history[-1])
            return history[-1], history, f"rollback from version {current['version']}"

        return self._move_pointer("rollback", change)

    def _move_pointer(self, doing: str, change) -> dict[str, Any]:
        """Read the pointer, ask `change` where it should point ((version, history, reason), or
        None to leave it), and replace it only if it is still what was read; a concurrent
        change is read again, up to POINTER_ATTEMPTS times."""
        for _ in range(POINTER_ATTEMPTS):
            current, tag = self._pointer()
            target = change(current)
            if target is None:
                return current
            pointer = self._replace_pointer(tag, *target)
            if pointer is not None:
                old = current["version"] if current else "none"
                log.info("%s production: %s -> %d (%s)", self.model, old, target[0], target[2])
                return pointer
        raise RegistryError(f"{self.model} production kept changing during the {doing}: try again")

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


# An incomplete version younger than this may be a push still uploading: never pruned.
STALE_PUSH_SECONDS = 24 * 3600


@dataclass(frozen=True)
class Pruning:
    remove: dict[int, str]  # version -> why it goes
    keep: dict[int, str]  # version -> why it stays


def plan_pruning(registry: Registry, keep: int, now: float | None = None) -> Pruning:
    """Which versions `prune --keep N` removes: every complete version but the newest `keep`,
    the production version and the last `keep` versions of production's history (where a
    rollback goes), and incomplete versions (failed pushes) reserved more than a day ago."""
    if keep < 1:
        raise RegistryError(f"--keep must be 1 or more, got {keep}")
    now = time.time() if now is None else now
    pointer = registry.production()
    serving = pointer["version"] if pointer else None
    history = pointer.get("history", []) if pointer else []
    listed = registry._listed()
    complete = sorted(number for number, done in listed.items() if done)
    kept: dict[int, str] = {}
    for number in complete[-keep:]:
        kept[number] = f"one of the newest {keep}"
    for number in history[-keep:]:
        kept.setdefault(number, "in production's recent history (a rollback may return to it)")
    if serving is not None:
        kept[serving] = "production"
    removed: dict[int, str] = {}
    for number, done in sorted(listed.items()):
        if number in kept:
            continue
        if done:
            removed[number] = f"older than the newest {keep}"
            continue
        claim = registry._get_json(registry._key(number, RESERVATION)) or {}
        age = now - float(claim.get("time", now))
        if age > STALE_PUSH_SECONDS:
            removed[number] = f"incomplete (a push that did not finish, {age / 3600:.0f} h ago)"
        else:
            kept[number] = "incomplete, maybe a push still uploading"
    return Pruning(remove=removed, keep=kept)


def prune(registry: Registry, plan: Pruning) -> None:
    """Remove the versions of `plan`: the manifest first (the version reads as incomplete from
    then on, never as complete with files missing), the reservation last. Production is read
    again just before each version goes, and one that has become production is left alone."""
    for number in sorted(plan.remove):
        current = registry.production()
        if current and current["version"] == number:
            log.warning("%s version %d became production meanwhile: kept", registry.model, number)
            continue
        prefix = registry._key(number) + "/"
        names = [name for name in registry._storage(registry.folder.names) if name.startswith(prefix)]
        first = [prefix + MANIFEST] if prefix + MANIFEST in names else []
        last = [prefix + RESERVATION] if prefix + RESERVATION in names else []
        middle = [name for name in names if name not in (*first, *last)]
        for name in [*first, *middle, *last]:
            registry._storage(registry.folder.remove, name)
        log.info("%s version %d removed (%s)", registry.model, number, plan.remove[number])


def record(uri: str, model: str, run_id: str, name: str, data: bytes) -> None:
    """Write `<model>/runs/<run_id>/<name>` for the exit handler. Without a registry or a run
    name nothing is recorded, and a record that cannot be written is a warning: the step's own
    work does not depend on it."""
    if not uri or not run_id:
        return
    try:
        Registry(uri, model).record_run(run_id, name, data)
    except RegistryError as error:
        log.warning("could not record %s for run %s: %s", name, run_id, error)


def record_step(uri: str, model: str, run_id: str, step: str, state: str, **fields: Any) -> None:
    """Record that pipeline run `run_id`'s `step` has `state` ("started", "succeeded"), with
    `fields`, as `<step>.json`: the exit handler reads these to say how far the run got."""
    entry = json.dumps({"step": step, "state": state, "time": time.time(), **fields}, indent=2) + "\n"
    record(uri, model, run_id, f"{step}.json", entry.encode())


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
        ("prune", "remove old versions (dry run unless --apply); never production or its recent history"),
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
        if name == "prune":
            command.add_argument(
                "--keep", type=int, required=True, help="how many of the newest versions stay"
            )
            command.add_argument("--apply", action="store_true", help="remove them (default: only print)")
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
    elif args.command == "prune":
        plan = plan_pruning(registry, args.keep)
        for number, why in sorted(plan.keep.items()):
            print(f"keep    version {number}: {why}")
        for number, why in sorted(plan.remove.items()):
            print(f"{'remove' if args.apply else 'would remove'} version {number}: {why}")
        if args.apply:
            prune(registry, plan)
        elif plan.remove:
            print("dry run: nothing removed; add --apply to remove them")
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
