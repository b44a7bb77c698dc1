"""Training checkpoints that survive a killed pod: atomic, verified, the previous one kept.

A checkpoint is a folder `step-<global step>/` under the checkpoint directory holding

    model.weights.h5     the model's weights (Keras, by structure)
    optimizer.npz        the optimizer's variables, gradient accumulators left out
    state.json           epoch, step within the epoch, images seen, best validation score,
                         history, per-step batch and accumulation, sha256 of the two files

written into `.step-<n>.partial/` and renamed when complete (`state.json` last), so a kill at
any moment leaves either the new checkpoint or none of it. The two newest are kept: if the
newest cannot be read (a disk filled up, a file was damaged), loading falls back to the
previous one, and says so.

With an `s3://` or `minio://` checkpoint location, `RemoteMirror` keeps a copy of the local
folder in the bucket (files first, `state.json` last, so a half-uploaded checkpoint is never
taken for a complete one) and brings it back before a restarted run looks for checkpoints.

Optimizer variables are restored by position among the non-accumulator variables, so a
resumed run may use a different per-step batch and accumulation (after running out of memory)
and still continue with its Adam moments, step counter and loss scale.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from components import storage
from components.records import sha256_file

log = logging.getLogger(__name__)

KEEP = 2
WEIGHTS, OPTIMIZER, STATE = "model.weights.h5", "optimizer.npz", "state.json"
# Written into a run's folder when its model is saved: from then on its checkpoints are only
# space, removed when the next run starts on the same checkpoint root. Not at once: a KFP retry
# of a run whose pod died after training, before its outputs were uploaded, resumes from them.
FINISHED = "FINISHED.json"


class CheckpointError(RuntimeError):
    """No usable checkpoint although some exist; the message names each one's problem."""


@dataclass
class TrainingState:
    epoch: int = 0  # the epoch in progress (0-based)
    step: int = 0  # steps of that epoch already done
    global_step: int = 0  # steps done in all (per-step batches, not optimizer updates)
    images_in_epoch: int = 0  # images of the epoch already trained on (skipped on resume)
    best_val_accuracy: float | None = None
    best_epoch: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    step_batch: int = 0
    accumulation: int = 1
    files: dict[str, str] = field(default_factory=dict)  # name -> sha256
    backend: str = ""  # the Keras backend that wrote it ("" before it was recorded)
    gpus: int = 1  # devices the step batch was spread over (data-parallel); 1 before it was recorded


def _is_accumulator(variable) -> bool:
    return "gradient_accumulator" in variable.path


def optimizer_arrays(optimizer) -> list:
    return [
        np.asarray(v.numpy() if hasattr(v, "numpy") else v.value)
        for v in optimizer.variables
        if not _is_accumulator(v)
    ]


def restore_optimizer(optimizer, arrays: list, saved_accumulation: int = 1, accumulation: int = 1) -> None:
    """Assign saved optimizer variables by position. Keras' raw `iteration` counters count
    steps, not updates (`iterations` is the raw count // accumulation), so when the
    accumulation changed they are rescaled: the schedule goes on from the same update."""
    targets = [v for v in optimizer.variables if not _is_accumulator(v)]
    if len(targets) != len(arrays):
        raise CheckpointError(
            f"the checkpoint holds {len(arrays)} optimizer variables, the optimizer "
            f"has {len(targets)}: not the same model or optimizer"
        )
    for variable, value in zip(targets, arrays, strict=True):
        if tuple(variable.shape) != tuple(value.shape):
            raise CheckpointError(
                f"optimizer variable {variable.path} has shape {tuple(variable.shape)}, "
                f"the checkpoint {tuple(value.shape)}"
            )
        if variable.path.endswith("/iteration") and saved_accumulation != accumulation:
            value = value // saved_accumulation * accumulation
        variable.assign(value)


class DiskFullError(CheckpointError):
    """Too little free space to write a checkpoint: checked before writing, because a weights
    file that hits a full disk can take the process down (h5py) with no message."""


# h5 headers, state.json and a rounding margin: what a checkpoint holds beyond its arrays.
OVERHEAD_BYTES = 8 * 1024 * 1024


def needed_bytes(directory: Path, model) -> int:
    """What the next checkpoint will take: the newest one's size when there is one (the same
    model), else its arrays' size; 10% on top, plus the overhead."""
    previous = complete(directory)
    if previous:
        size = sum(path.stat().st_size for path in previous[-1].iterdir() if path.is_file())
    else:
        # From the variables' shapes and types: no copy of the arrays just to count them.
        variables = [*model.weights, *(v for v in model.optimizer.variables if not _is_accumulator(v))]
        size = sum(math.prod(v.shape) * np.dtype(v.dtype).itemsize for v in variables)
    return int(size * 1.1) + OVERHEAD_BYTES


def ensure_space(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise DiskFullError(
            f"not enough free space for a checkpoint in {directory}: {needed / 2**20:,.0f} MiB "
            f"needed, {free / 2**20:,.0f} MiB free; free some space, or give --checkpoint-dir a "
            "larger volume, and run again to resume from the last checkpoint"
        )


def remove_stale_partials(directory: Path) -> None:
    """Folders of saves that were killed half-way: never complete, never read, only space."""
    for stale in directory.glob(".step-*.partial"):
        shutil.rmtree(stale, ignore_errors=True)


def _sync_folder(directory: Path) -> None:
    """fsync the folder itself, so that a rename in it survives a power loss."""
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def save(directory: Path, model, state: TrainingState) -> Path:
    """Write a checkpoint for `state` atomically; drop all but the newest KEEP.

    DiskFullError, before anything is written, when the volume lacks the space; a write that
    fails anyway (the disk filled meanwhile) removes its partial folder and raises the same."""
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(directory)
    ensure_space(directory, needed_bytes(directory, model))
    final = directory / f"step-{state.global_step:09d}"
    partial = directory / f".{final.name}.partial"
    try:
        partial.mkdir()
        model.save_weights(partial / WEIGHTS)
        np.savez(partial / OPTIMIZER, *optimizer_arrays(model.optimizer))
        state.files = {name: sha256_file(partial / name) for name in (WEIGHTS, OPTIMIZER)}
        (partial / STATE).write_text(json.dumps(asdict(state), indent=1) + "\n")
        for path in (partial / WEIGHTS, partial / OPTIMIZER, partial / STATE):
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    except OSError as error:
        shutil.rmtree(partial, ignore_errors=True)
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(
                f"the disk filled while writing a checkpoint in {directory}: {error}"
            ) from None
        raise
    if final.exists():  # the same step saved again (a SIGTERM right after a periodic save)
        shutil.rmtree(final)
    partial.rename(final)
    _sync_folder(directory)
    for old in complete(directory)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete(directory: Path) -> list[Path]:
    """Checkpoint folders, oldest first (partial ones are not listed)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith("step-"))


def _read_state(folder: Path) -> TrainingState:
    try:
        raw = json.loads((folder / STATE).read_text())
        state = TrainingState(**raw)
    except (OSError, ValueError, TypeError) as error:
        raise CheckpointError(f"{folder.name}: unreadable {STATE} ({error})") from None
    for name, expected in state.files.items():
        path = folder / name
        if not path.is_file() or sha256_file(path) != expected:
            raise CheckpointError(f"{folder.name}: {name} is missing or does not match its sha256")
    return state


def restore(folder: Path, model, saved_accumulation: int = 1, accumulation: int = 1) -> None:
    """Load a checkpoint's weights and optimizer variables into `model` (compiled, optimizer
    built), whose optimizer accumulates `accumulation` steps (the checkpoint's: `saved_accumulation`)."""
    with warnings.catch_warnings():
        # The weights file also holds the optimizer's variables, which Keras skips (with a
        # warning) when accumulators were added or removed; they come from optimizer.npz.
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        model.load_weights(folder / WEIGHTS)
    with np.load(folder / OPTIMIZER) as arrays:
        restore_optimizer(
            model.optimizer,
            [arrays[f"arr_{i}"] for i in range(len(arrays.files))],
            saved_accumulation,
            accumulation,
        )


def accumulation_of(optimizer) -> int:
    """The steps `optimizer` accumulates per update (a LossScaleOptimizer's: its inner one's)."""
    return getattr(optimizer, "inner_optimizer", optimizer).gradient_accumulation_steps or 1


def load_latest(directory: Path, build) -> tuple[Any, TrainingState | None]:
    """(model, state) from the newest usable checkpoint, falling back to older ones.

    `build(state)` makes the compiled model with its optimizer built (`state` None: a fresh
    start), at whatever accumulation the caller now wants (another per-step batch after running
    out of memory, another GPU count); the optimizer's step counters are rescaled to it.
    Without any checkpoint: (build(None), None). If checkpoints exist and none can be read,
    CheckpointError."""
    folders = complete(directory)
    problems = []
    for folder in reversed(folders):
        try:
            state = _read_state(folder)
            model = build(state)
            restore(folder, model, state.accumulation, accumulation_of(model.optimizer))
        except (CheckpointError, OSError, ValueError) as error:
            problems.append(f"{folder.name}: {error}")
            log.warning("checkpoint %s is not usable, trying the previous one: %s", folder.name, error)
            continue
        log.info(
            "resuming from %s: epoch %d, step %d (%d steps done in all)",
            folder.name,
            state.epoch + 1,
            state.step,
            state.global_step,
        )
        return model, state
    if folders:
        raise CheckpointError(f"no usable checkpoint in {directory}: " + "; ".join(problems))
    return build(None), None


class RemoteMirror:
    """The checkpoint folder mirrored under an S3-compatible prefix (a pod's disk does not
    survive a retry; a bucket does)."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.folder = storage.ObjectStoreFolder(self.uri)

    def pull(self, directory: Path) -> None:
        """Download the remote checkpoints that are complete (state.json present) and best weights."""
        names = self.folder.names()
        complete_steps = sorted({name.split("/")[0] for name in names if name.endswith("/" + STATE)})
        for step in complete_steps[-KEEP:]:
            target = directory / step
            if target.exists():
                continue
            partial = directory / f".{step}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            for name in (WEIGHTS, OPTIMIZER, STATE):
                self.folder.get_file(f"{step}/{name}", partial / name)
            partial.rename(target)
        if "best.weights.h5" in names:
            self.folder.get_file("best.weights.h5", directory / "best.weights.h5")
        if complete_steps:
            log.info("fetched checkpoints %s from %s", ", ".join(complete_steps[-KEEP:]), self.uri)

    def push(self, checkpoint: Path, best: Path | None = None) -> None:
        for name in (WEIGHTS, OPTIMIZER, STATE):  # state.json last: it marks the upload complete
            self.folder.put_file(f"{checkpoint.name}/{name}", checkpoint / name)
        if best is not None and best.exists():
            self.folder.put_file(best.name, best)
        keep = {p.name for p in complete(checkpoint.parent)}
        stale = [
            name
            for name in self.folder.names()
            if name.startswith("step-") and name.split("/")[0] not in keep
        ]
        for name in sorted(stale, key=lambda n: not n.endswith(STATE)):  # unmark complete first
            self.folder.remove(name)


def mark_finished(directory: Path | RemoteMirror) -> None:
    marker = (json.dumps({"finished": True}) + "\n").encode()
    if isinstance(directory, RemoteMirror):
        directory.folder.put_bytes(FINISHED, marker)
    else:
        (directory / FINISHED).write_bytes(marker)


def remove_finished_runs(root: Path | str, current: str) -> list[str]:
    """The run folders under a checkpoint root (a volume path, or an S3-compatible prefix as a
    string) whose
    run finished, but `current`: removed. Returns their names. Other runs' folders (still
    training, or killed) and anything else there (weights, caches) are left alone."""
    if isinstance(root, Path):
        finished = sorted(
            folder.name
            for folder in (root.iterdir() if root.is_dir() else ())
            if folder.is_dir() and folder.name != current and (folder / FINISHED).is_file()
        )
        for name in finished:
            shutil.rmtree(root / name, ignore_errors=True)
        return finished
    remote = storage.ObjectStoreFolder(root.rstrip("/"))
    names = remote.names()
    finished = sorted(
        {name.split("/")[0] for name in names if name.count("/") == 1 and name.endswith("/" + FINISHED)}
        - {current}
    )
    for run in finished:
        # The marker last: a removal cut short is finished on the next start.
        owned = sorted(
            (n for n in names if n.startswith(run + "/")), key=lambda n: n.endswith("/" + FINISHED)
        )
        for name in owned:
            remote.remove(name)
    return finished


def pull_folder(uri: str, directory: Path) -> int:
    """Copy the files under an S3-compatible prefix that `directory` lacks; how many."""
    remote = storage.ObjectStoreFolder(uri.rstrip("/"))
    directory.mkdir(parents=True, exist_ok=True)
    fetched = 0
    for name in remote.names():
        target = directory / name
        if "/" in name or target.exists():
            continue
        partial = directory / f".{name}.partial"
        remote.get_file(name, partial)
        partial.replace(target)
        fetched += 1
    return fetched


def push_folder(directory: Path, uri: str) -> int:
    """Copy the files of `directory` that the prefix lacks (a name is never rewritten: JAX's
    cache entries are named by their content's key); how many."""
    remote = storage.ObjectStoreFolder(uri.rstrip("/"))
    present = set(remote.names())
    pushed = 0
    for path in sorted(directory.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.name not in present:
            remote.put_file(path.name, path)
            pushed += 1
    return pushed
