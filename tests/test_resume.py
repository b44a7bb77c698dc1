"""Checkpoints and resuming: atomic saves, fallback from a damaged checkpoint, and real training
runs killed with SIGTERM and SIGKILL, then restarted to the same final epoch."""

from __future__ import annotations

import json
import logging
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest

from components import checkpoints
from components.model import compile_for_training
from components.train import run_checkpoint_dir
from tests.conftest import scratch_config

ROOT = Path(__file__).resolve().parents[1]


def tiny_model(accumulation: int = 1):
    """2 epochs of 4 updates: with accumulation, of 4 x `accumulation` batches (a per-step batch
    `accumulation` times smaller, as after a step-down)."""
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    compile_for_training(
        model,
        scratch_config(data=Path(), output=Path(), epochs=2).recipe(),
        steps_per_epoch=4 * accumulation,
        accumulation=accumulation,
    )
    model.optimizer.build(model.trainable_variables)
    return model


def fit_steps(model, steps: int) -> None:
    rng = np.random.default_rng(steps)
    for _ in range(steps):
        model.train_on_batch(rng.random((8, 4)), np.eye(3)[rng.integers(0, 3, 8)])


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    model = tiny_model()
    fit_steps(model, 3)
    checkpoints.save(tmp_path, model, checkpoints.TrainingState(global_step=3, step=3, step_batch=8))
    kept = [np.asarray(w).copy() for w in model.get_weights()]
    fit_steps(model, 3)
    newest = checkpoints.save(tmp_path, model, checkpoints.TrainingState(global_step=6, step=6, step_batch=8))
    with (newest / checkpoints.WEIGHTS).open("r+b") as handle:  # flip bytes inside the file
        handle.seek(2000)
        handle.write(b"\x00" * 64)

    restored, state = checkpoints.load_latest(tmp_path, lambda state: tiny_model())
    assert state.global_step == 3
    for ours, saved in zip(restored.get_weights(), kept, strict=True):
        np.testing.assert_array_equal(ours, saved)
    assert "step-000000006 is not usable" in caplog.text

    (tmp_path / "step-000000003" / checkpoints.STATE).write_text("{")
    with pytest.raises(checkpoints.CheckpointError, match="no usable checkpoint"):
        checkpoints.load_latest(tmp_path, lambda state: tiny_model())


def test_only_the_two_newest_are_kept_and_a_partial_one_is_ignored(tmp_path):
    model = tiny_model()
    for step in (2, 4, 6):
        checkpoints.save(tmp_path, model, checkpoints.TrainingState(global_step=step))
    (tmp_path / ".step-000000008.partial").mkdir()  # a save killed half-way
    assert [p.name for p in checkpoints.complete(tmp_path)] == ["step-000000004", "step-000000006"]
    _, state = checkpoints.load_latest(tmp_path, lambda state: tiny_model())
    assert state.global_step == 6


def test_a_full_disk_is_refused_before_writing_with_the_space_needed(tmp_path, monkeypatch):
    """Contract test (no disk is filled here): the free space the volume reports decides. A
    weights file that hits a full disk can take the process down with no message, so the
    check comes first; the checkpoints already there stay usable."""
    model = tiny_model()
    checkpoints.save(tmp_path, model, checkpoints.TrainingState(global_step=2))
    needed = checkpoints.needed_bytes(tmp_path, model)
    usage = checkpoints.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda path: usage._replace(free=needed - 1))
    with pytest.raises(
        checkpoints.DiskFullError, match=rf"in {re.escape(str(tmp_path))}: .* MiB needed, .* MiB free"
    ):
        checkpoints.save(tmp_path, model, checkpoints.TrainingState(global_step=4))
    assert not list(tmp_path.glob(".*partial"))
    _, state = checkpoints.load_latest(tmp_path, lambda state: tiny_model())
    assert state.global_step == 2


def test_a_disk_that_fills_during_the_save_leaves_no_partial_folder(tmp_path, monkeypatch):
    import errno
    import os

    model = tiny_model()

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoints.np, "savez", no_space)
    with pytest.raises(checkpoints.DiskFullError, match="the disk filled while writing a checkpoint"):
        checkpoints.save(tmp_path, model, checkpoints.TrainingState(global_step=2))
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def small_disk(tmp_path):
    """A real 16 MiB volume (tmpfs) that the test fills with real files."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs root (CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def fill(disk: Path, leave: int) -> None:
    """Take all but `leave` bytes of the volume with a real file."""
    free = checkpoints.shutil.disk_usage(disk).free
    subprocess.run(["fallocate", "-l", str(free - leave), str(disk / f"filler-{free}")], check=True)


def test_on_a_really_full_volume_the_save_is_refused_and_the_last_checkpoint_stays(small_disk, monkeypatch):
    """A real volume filled with a real file: the check before writing refuses with the space
    needed; then with the check bypassed and not one byte left, the write's own ENOSPC (from
    HDF5) is a DiskFullError too, no partial folder stays, and the last checkpoint loads."""
    model = tiny_model()
    folder = small_disk / "checkpoints"
    checkpoints.save(folder, model, checkpoints.TrainingState(global_step=2))
    fill(small_disk, leave=4 * 2**20)
    with pytest.raises(checkpoints.DiskFullError, match=r"8 MiB needed, 4 MiB free"):
        checkpoints.save(folder, model, checkpoints.TrainingState(global_step=4))
    fill(small_disk, leave=0)
    monkeypatch.setattr(checkpoints, "ensure_space", lambda directory, needed: None)
    with pytest.raises(checkpoints.DiskFullError, match="the disk filled while writing a checkpoint"):
        checkpoints.save(folder, model, checkpoints.TrainingState(global_step=6))
    assert [path.name for path in folder.iterdir()] == ["step-000000002"]
    _, state = checkpoints.load_latest(folder, lambda state: tiny_model())
    assert state.global_step == 2


def test_stale_partial_folders_are_removed_by_the_next_save(tmp_path):
    model = tiny_model()
    stale = tmp_path / ".step-000000007.partial"
    stale.mkdir(parents=True)
    (stale / checkpoints.WEIGHTS).write_bytes(b"x" * 1000)
    checkpoints.save(tmp_path, model, checkpoints.TrainingState(global_step=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000002"]


def test_a_full_disk_is_not_taken_for_running_out_of_gpu_memory():
    from components.batchfit import is_out_of_memory

    class ResourceExhaustedError(Exception):  # TF's class name, as is_out_of_memory reads it
        pass

    assert is_out_of_memory(ResourceExhaustedError("OOM when allocating tensor with shape[256,112,112,32]"))
    assert not is_out_of_memory(ResourceExhaustedError("/ckpt/model.weights.h5; No space left on device"))
    assert not is_out_of_memory(OSError(28, "No space left on device"))


def test_optimizer_state_survives_a_change_of_accumulation(tmp_path):
    model = tiny_model()
    fit_steps(model, 5)
    folder = checkpoints.save(tmp_path, model, checkpoints.TrainingState(global_step=5))
    restored = tiny_model(accumulation=2)
    checkpoints.restore(folder, restored, saved_accumulation=1, accumulation=2)
    assert int(restored.optimizer.iterations.numpy()) == 5  # updates: the schedule goes on from there
    moments = [v for v in restored.optimizer.variables if "momentum" in v.path]
    assert moments and all(np.abs(np.asarray(v.numpy())).sum() > 0 for v in moments)


def _rates_per_update(model, steps: int) -> list[float]:
    """The learning rate at which each update of `steps` batches was applied."""
    accumulation = model.optimizer.gradient_accumulation_steps or 1
    rates = []
    for step in range(steps):
        if (step + 1) % accumulation == 0:  # this batch's step applies the update
            rates.append(float(model.optimizer.learning_rate))
        fit_steps(model, 1)  # the rate does not depend on the batch
    return rates


@pytest.mark.parametrize("accumulation", [2, 4])
def test_the_schedule_counts_updates_under_accumulation(accumulation):
    """Keras calls the schedule with its step counter, not its update counter: planned in
    updates, a schedule ran `accumulation` times too fast and left the rate at 0 for the rest
    of the run (seen on the GPU: a run stepped down to 64 x 4 stalled at 0.65 accuracy)."""
    plain = tiny_model()
    accumulated = tiny_model(accumulation=accumulation)
    updates = 8  # tiny_model's plan: 2 epochs x 4 updates
    expected = _rates_per_update(plain, updates + 1)  # one past the end: the rate there is 0
    assert expected[-1] == 0 and min(expected[:-1][1:]) > 0
    got = _rates_per_update(accumulated, updates * accumulation)
    # Keras moves the rate at every batch, so an update's rate is a few batches further along
    # the same curve: between the unaccumulated run's rates at that update and the next.
    for update, rate in enumerate(got):
        low, high = sorted(expected[update : update + 2])
        assert low - 1e-9 <= rate <= high + 1e-9, (update, rate, expected)
    assert int(accumulated.optimizer.iterations.numpy()) == updates


def test_after_a_step_down_the_schedule_goes_on_from_the_same_update(tmp_path):
    model = tiny_model()
    fit_steps(model, 3)
    rate_at_4 = float(tiny_model_at(4).optimizer.learning_rate)
    folder = checkpoints.save(tmp_path, model, checkpoints.TrainingState(global_step=3))
    fit_steps(model, 1)
    assert float(model.optimizer.learning_rate) == pytest.approx(rate_at_4)
    restored = tiny_model(accumulation=2)
    checkpoints.restore(folder, restored, saved_accumulation=1, accumulation=2)
    fit_steps(restored, 2)  # one update of 2 x the smaller batch
    assert int(restored.optimizer.iterations.numpy()) == 4
    assert float(restored.optimizer.learning_rate) == pytest.approx(rate_at_4)


def tiny_model_at(updates: int):
    model = tiny_model()
    model.optimizer.iterations.assign(updates)
    return model


def test_checkpoints_are_keyed_by_data_and_settings(prepared_dataset, tmp_path):
    from components import records

    dataset = records.load(prepared_dataset)
    base = scratch_config(data=prepared_dataset, output=tmp_path / "a", checkpoint_dir=str(tmp_path / "c"))
    same = scratch_config(
        data=prepared_dataset, output=tmp_path / "b", checkpoint_dir=str(tmp_path / "c"), checkpoint_every=7
    )
    other = scratch_config(
        data=prepared_dataset, output=tmp_path / "a", checkpoint_dir=str(tmp_path / "c"), epochs=11
    )
    assert run_checkpoint_dir(base, dataset) == run_checkpoint_dir(same, dataset)
    assert run_checkpoint_dir(base, dataset) != run_checkpoint_dir(other, dataset)
    assert run_checkpoint_dir(base, dataset).parent == tmp_path / "c"


def _newest(folder: Path) -> int:
    found = [int(p.name.split("-")[1]) for run in folder.glob("run-*") for p in checkpoints.complete(run)]
    return max(found, default=0)


def _wait_for_checkpoint(process: subprocess.Popen, folder: Path, at_least: int, timeout: float = 240) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "training ended before it could be interrupted"
        if _newest(folder) >= at_least:
            return _newest(folder)
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint at step >= {at_least} within {timeout} s")


@pytest.mark.slow
def test_training_killed_by_sigterm_then_sigkill_resumes_to_the_same_end(prepared_dataset, tmp_path):
    # Batch 2: ~16 steps an epoch, 4 epochs; a checkpoint every 3 steps.
    from components import records

    per_epoch = -(-records.load(prepared_dataset).count("train") // 2)
    ckpt, out = tmp_path / "ckpt", tmp_path / "model"
    command = [
        sys.executable,
        "-m",
        "components.train",
        "--data",
        str(prepared_dataset),
        "--output",
        str(out),
        "--epochs",
        "4",
        "--batch-size",
        "2",
        "--checkpoint-every",
        "3",
        "--checkpoint-dir",
        str(ckpt),
        "--no-augment",
        "--weights",
        "none",
        "--min-updates",
        "0",
    ]
    logs = [tmp_path / f"run{i}.log" for i in range(3)]

    with logs[0].open("w") as log:  # 1: SIGTERM mid-epoch -> a checkpoint at that very step, exit 143
        first = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        _wait_for_checkpoint(first, ckpt, 6)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 128 + signal.SIGTERM
    text = logs[0].read_text()
    assert "SIGTERM: writing a checkpoint" in text
    stopped_at = _newest(ckpt)
    assert stopped_at >= 6
    stop = re.search(r"stopped by SIGTERM at epoch (\d+), step (\d+)", text) or re.search(
        r"stopped by SIGTERM at the end of epoch (\d+)()", text
    )
    assert (int(stop[1]) - 1) * per_epoch + int(stop[2] or per_epoch) == stopped_at

    with logs[1].open("w") as log:  # 2: resumes exactly there; then SIGKILL: no chance to save
        second = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        _wait_for_checkpoint(second, ckpt, stopped_at + 20)
        second.kill()
        second.wait(timeout=60)
    assert f"resuming from step-{stopped_at:09d}" in logs[1].read_text()
    killed_at = _newest(ckpt)  # the newest complete checkpoint: at most 3 steps behind the kill

    with logs[2].open("w") as log:  # 3: resumes from the newest complete checkpoint and finishes
        done = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=600)
    assert done.returncode == 0, logs[2].read_text()[-2000:]
    assert f"resuming from step-{killed_at:09d}" in logs[2].read_text()

    history = json.loads((out / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2, 3, 4]
    resumed = {row["epoch"]: row["resumed_from_step"] for row in history if "resumed_from_step" in row}
    expected = {at // per_epoch + 1: at % per_epoch for at in (stopped_at, killed_at) if at % per_epoch}
    assert resumed == expected
    summary = json.loads((out / "train_config.json").read_text())
    assert summary["epochs_trained"] == 4
    run = next(ckpt.glob("run-*"))
    final = json.loads((checkpoints.complete(run)[-1] / checkpoints.STATE).read_text())
    assert final["global_step"] == 4 * per_epoch and final["epoch"] == 4  # none skipped or done twice
    assert (out / "model.keras").is_file()


@pytest.mark.slow
def test_checkpoints_in_an_s3_bucket_let_a_new_pod_resume(prepared_dataset, tmp_path, s3_env, caplog):
    from components.train import train

    s3_env.client().make_bucket("training")
    settings = dict(
        data=prepared_dataset,
        epochs=2,
        batch_size=8,
        augment=False,
        checkpoint_every=2,
        checkpoint_dir="s3://training/checkpoints",
    )
    first = train(scratch_config(output=tmp_path / "pod1", **settings))
    names = sorted(o.object_name for o in s3_env.client().list_objects("training", recursive=True))
    steps = sorted({name.split("/")[2] for name in names if "/step-" in name})
    run = names[0].split("/")[1]
    assert len(steps) == 2 and all(f"checkpoints/{run}/{step}/state.json" in names for step in steps)
    assert any(name.endswith("/best.weights.h5") for name in names)
    assert not (tmp_path / "pod1" / "checkpoints").exists()  # the local copy is removed

    # Another pod, nothing on its disk: the bucket says the run is done; nothing is retrained.
    caplog.clear()
    caplog.set_level(logging.INFO)
    second = train(scratch_config(output=tmp_path / "pod2", **settings))
    assert f"resuming from {steps[-1]}" in caplog.text
    assert second["epochs_trained"] == 2 and second["best_epoch"] == first["best_epoch"]
    assert json.loads((tmp_path / "pod2" / "history.json").read_text()) == json.loads(
        (tmp_path / "pod1" / "history.json").read_text()
    )

    with pytest.raises(Exception, match="does not exist"):
        train(scratch_config(output=tmp_path / "pod3", **dict(settings, checkpoint_dir="s3://nope/c")))


def finished_and_unfinished_runs(write) -> None:
    """Three runs' folders on one checkpoint root: `old` finished, `killed` not, `current`
    finished too (a retry of it must still resume); plus the weights cache beside them."""
    for run in ("old", "killed", "current"):
        write(f"{run}/step-000000004/{checkpoints.STATE}", b"{}")
        write(f"{run}/step-000000004/{checkpoints.WEIGHTS}", b"w" * 100)
    write(f"old/{checkpoints.FINISHED}", b"{}")
    write(f"current/{checkpoints.FINISHED}", b"{}")
    write("weights/efficientnetb0_notop.h5", b"imagenet")


def test_the_next_run_removes_finished_runs_checkpoints_on_a_volume(tmp_path):
    def write(name: str, data: bytes) -> None:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)

    finished_and_unfinished_runs(write)
    assert checkpoints.remove_finished_runs(tmp_path, "current") == ["old"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["current", "killed", "weights"]
    assert (tmp_path / "current" / "step-000000004" / checkpoints.WEIGHTS).exists()


def test_the_next_run_removes_finished_runs_checkpoints_in_a_bucket(s3_env):
    s3_env.client().make_bucket("ckpt")
    folder = checkpoints.storage.ObjectStoreFolder("s3://ckpt/runs")
    finished_and_unfinished_runs(folder.put_bytes)
    assert checkpoints.remove_finished_runs("s3://ckpt/runs", "current") == ["old"]
    assert sorted({name.split("/")[0] for name in folder.names()}) == ["current", "killed", "weights"]


def test_a_finished_run_marks_its_checkpoints_and_the_mark_survives_in_the_mirror(tmp_path, s3_env):
    s3_env.client().make_bucket("marks")
    mirror = checkpoints.RemoteMirror("s3://marks/runs/key")
    checkpoints.mark_finished(mirror)
    checkpoints.mark_finished(tmp_path)
    assert mirror.folder.names() == [checkpoints.FINISHED]
    assert (tmp_path / checkpoints.FINISHED).is_file()
