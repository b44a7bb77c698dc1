"""Training on several GPUs of one node, the parts that need no GPU: the batch plan per GPU,
which GPUs a process sees, the checks before anything starts, and the plan a checkpoint goes
on with on another GPU count. The data-parallel training itself runs under JAX on two CPU
devices in tests/test_jax_backend.py; on real GPUs, bench/train_gpus.py."""

from __future__ import annotations

import os

import pytest

from components import batchfit, checkpoints
from components.batchfit import Gpu, parse_gpus, plan
from components.train import TrainConfig, TrainError, _use_gpus, resume_plan
from components.train import main as train_main

NVIDIA_SMI = """0, GPU-aaaa1111-0000-0000-0000-000000000000, NVIDIA GeForce RTX 2070, 8192
1, GPU-bbbb2222-0000-0000-0000-000000000000, NVIDIA GeForce RTX 2070, 8192
2, GPU-cccc3333-0000-0000-0000-000000000000, NVIDIA GeForce RTX 2070, 8192
"""


@pytest.mark.parametrize(
    "requested, largest, devices, expected",
    [
        (32, 32, 2, (32, 1, 16)),  # 16 a GPU, no accumulation
        (256, 96, 2, (128, 2, 64)),  # 128 a GPU is over 96: 2 steps of 64 a GPU
        (256, 64, 4, (256, 1, 64)),
        (30, 30, 4, (32, 1, 8)),  # not a multiple of 4: the next one up, 8 a GPU
        (256, 40, 1, (37, 7, 37)),  # one GPU: as before (7 x 37 = 259)
    ],
)
def test_the_plan_splits_the_effective_batch_evenly_across_gpus(requested, largest, devices, expected):
    result = plan(requested, largest, devices)
    assert (result.step_batch, result.accumulation, result.device_batch) == expected
    assert result.step_batch % devices == 0 and result.device_batch <= largest
    assert requested <= result.effective_batch < requested + devices * result.accumulation


def test_the_one_gpu_plan_is_unchanged():
    for requested in (1, 7, 32, 100, 256, 1000):
        for largest in (1, 5, 16, 96, 512):
            assert plan(requested, largest) == plan(requested, largest, 1)
            assert plan(requested, largest).effective_batch >= requested


def test_nvidia_smi_rows_are_narrowed_as_cuda_narrows_them():
    assert parse_gpus(NVIDIA_SMI, None) == Gpu("NVIDIA GeForce RTX 2070", 8192, count=3)
    assert parse_gpus(NVIDIA_SMI, "1,2").count == 2
    assert parse_gpus(NVIDIA_SMI, "GPU-cccc3333").count == 1  # a UUID prefix, as CUDA takes it
    assert parse_gpus(NVIDIA_SMI, "0,7,1").count == 1  # CUDA stops at the first unknown entry
    assert parse_gpus(NVIDIA_SMI, "") is None  # no GPU at all
    assert parse_gpus(NVIDIA_SMI, "-1") is None
    assert parse_gpus("", None) is None
    assert parse_gpus("NVIDIA-SMI has failed\n", None) is None


def test_a_probe_runs_on_one_gpu(monkeypatch):
    seen = {}

    def fake_run(command, **kwargs):
        seen["visible"] = kwargs["env"]["CUDA_VISIBLE_DEVICES"]
        raise batchfit.subprocess.TimeoutExpired(command, 1)

    monkeypatch.setattr(batchfit.subprocess, "run", fake_run)
    spec = batchfit.ProbeSpec(image_size=32, precision="float32", num_classes=2, memory_limit_mib=0)
    for visible, first in ((None, "0"), ("3,1", "3")):
        if visible is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        with pytest.raises(batchfit.BatchFitError):
            batchfit.probe(spec, 16, timeout=1)
        assert seen["visible"] == first


def config(tmp_path, gpus: int) -> TrainConfig:
    return TrainConfig(data=tmp_path, output=tmp_path / "out", gpus=gpus, weights="none")


def test_several_gpus_need_jax_and_that_many_cards(tmp_path, monkeypatch):
    card = Gpu("NVIDIA GeForce RTX 2070", 8192, count=1)
    refused = "--gpus 2 trains data-parallel .* JAX; the backend here is tensorflow"
    with pytest.raises(TrainError, match=refused):
        _use_gpus(config(tmp_path, 2), "tensorflow", card)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    too_few = r"--gpus 2: this process sees 1 GPU\(s\) .*CUDA_VISIBLE_DEVICES=1\)"
    with pytest.raises(TrainError, match=too_few):
        _use_gpus(config(tmp_path, 2), "jax", card)
    assert _use_gpus(config(tmp_path, 1), "tensorflow", card) == card
    assert _use_gpus(config(tmp_path, 2), "jax", None) is None  # a CPU: JAX's devices decide


def test_fewer_gpus_than_visible_narrows_what_jax_will_see(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    four = Gpu("NVIDIA GeForce RTX 2070", 8192, count=4)
    assert _use_gpus(config(tmp_path, 2), "jax", four).count == 2
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,6,7")
    assert _use_gpus(config(tmp_path, 1), "jax", Gpu("x", 1, count=3)).count == 1
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"


@pytest.mark.parametrize(
    "saved, devices, expected",
    [
        ((2, 32, 1), 1, (16, 2)),  # 2 GPUs x 16 -> 1 GPU: 16 x 2 accumulation, effective 32
        ((1, 16, 2), 2, (32, 1)),  # and back
        ((2, 32, 1), 2, (32, 1)),  # the same count: the checkpoint's own plan
        ((4, 64, 2), 2, (32, 4)),  # 4 GPUs x 16 x 2 -> 2 GPUs x 16 x 4
        ((1, 32, 1), 4, (32, 1)),  # 1 GPU x 32 -> 4 GPUs x 8
    ],
)
def test_a_checkpoint_goes_on_with_its_per_gpu_batch_on_another_gpu_count(tmp_path, saved, devices, expected):
    gpus, step_batch, accumulation = saved
    batch_size = step_batch * accumulation
    state = checkpoints.TrainingState(step_batch=step_batch, accumulation=accumulation, gpus=gpus)
    going_on = resume_plan(TrainConfig(data=tmp_path, output=tmp_path, batch_size=batch_size), state, devices)
    assert (going_on.step_batch, going_on.accumulation) == expected
    assert going_on.device_batch <= step_batch // gpus  # never more a GPU than fitted
    assert going_on.effective_batch == batch_size


def test_the_cli_refuses_gpus_below_one(tmp_path, caplog):
    with pytest.raises(SystemExit) as exit_:
        train_main(["--data", str(tmp_path), "--output", str(tmp_path / "o"), "--gpus", "0"])
    assert exit_.value.code == 2
    assert "error: --gpus must be at least 1, got 0" in caplog.text
