"""Batch fitting: the probe sequence, accumulation, the cache, real probe processes, and the
step-down when training runs out of memory (injected: no GPU here)."""

from __future__ import annotations

import json
import math

import keras
import pytest
import tensorflow as tf

from components import batchfit, records
from components.batchfit import BatchFitError, Gpu, ProbeSpec, plan, search
from components.train import train
from tests.conftest import scratch_config


def recording(limit: int):
    probed: list[int] = []

    def fits(batch: int) -> bool:
        probed.append(batch)
        return batch <= limit

    return fits, probed


@pytest.mark.parametrize(
    "limit, requested, expected_probes, found",
    [
        (100, 256, [256, 128, 64, 96, 112, 104], 96),  # the request, halve, then bisect to a multiple of 8
        (100, 40, [40], 40),  # the request fits: one probe
        (5, 256, [256, 128, 64, 32, 16, 8, 4, 6, 5], 5),  # halve down to 4, then bisect by 1
        (256, 256, [256], 256),
        (300, 1000, [1000, 500, 250, 368, 304, 272, 288, 296], 296),
    ],
)
def test_search_probes_this_exact_sequence(limit, requested, expected_probes, found):
    fits, probed = recording(limit)
    assert search(fits, requested) == found
    assert probed == expected_probes


def test_search_gives_up_clearly_when_nothing_fits():
    fits, probed = recording(0)
    with pytest.raises(BatchFitError, match="not even a batch of 1"):
        search(fits, 64)
    assert probed == [64, 32, 16, 8, 4, 2, 1]


def test_a_failure_that_is_not_memory_is_not_swallowed():
    def fits(batch: int) -> bool:
        raise RuntimeError("CUDA driver version is insufficient")

    with pytest.raises(RuntimeError, match="driver"):
        search(fits, 64)


@pytest.mark.parametrize(
    "requested, largest, step, accumulation",
    [
        (256, 96, 86, 3),  # 3 x 86 = 258: the fewest steps, spread evenly
        (256, 256, 256, 1),
        (100, 512, 100, 1),
        (256, 128, 128, 2),
        (7, 3, 3, 3),
    ],
)
def test_plan_reaches_the_requested_batch_with_accumulation(requested, largest, step, accumulation):
    result = plan(requested, largest)
    assert (result.step_batch, result.accumulation) == (step, accumulation)
    assert result.step_batch <= largest
    assert requested <= result.effective_batch < requested + accumulation


def test_out_of_memory_is_recognised_for_each_backend():
    assert batchfit.is_out_of_memory(tf.errors.ResourceExhaustedError(None, None, "OOM when allocating"))
    assert batchfit.is_out_of_memory(
        RuntimeError(
            "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9.87GiB with allocator GPU_0_bfc"
        )
    )
    assert not batchfit.is_out_of_memory(ValueError("Input 0 is incompatible with the layer"))


GPU = Gpu(name="NVIDIA GeForce RTX 2070", total_mib=8192)
SPEC = ProbeSpec(image_size=224, precision="mixed_float16", num_classes=5, memory_limit_mib=7142)


def test_the_result_is_cached_per_gpu_and_settings(tmp_path):
    cache = tmp_path / "batch-fit.json"
    fits, probed = recording(100)
    assert batchfit.largest_batch(256, SPEC, GPU, cache, fits) == 96
    assert len(probed) == 6
    assert batchfit.largest_batch(64, SPEC, GPU, cache, fits) == 64  # known limit: no probe
    assert batchfit.largest_batch(512, SPEC, GPU, cache, fits) == 96
    assert len(probed) == 6
    other = ProbeSpec(image_size=192, precision="mixed_float16", num_classes=5, memory_limit_mib=7142)
    batchfit.largest_batch(256, other, GPU, cache, fits)  # another image size: probed afresh
    assert len(probed) == 12
    entry = json.loads(cache.read_text())[batchfit.cache_key(GPU, SPEC)]
    assert entry["largest"] == 96 and entry["limit_probed"] == 256

    fits_all, probed_all = recording(10_000)
    assert batchfit.largest_batch(32, SPEC, Gpu("H100", 81559), cache, fits_all) == 32
    assert batchfit.largest_batch(128, SPEC, Gpu("H100", 81559), cache, fits_all) == 128  # beyond: probe
    assert probed_all == [32, 128]

    batchfit.record_out_of_memory(cache, GPU, SPEC, 88)  # training ran out at 88 after all
    assert batchfit.largest_batch(256, SPEC, GPU, cache, fits) == 87


def test_a_real_probe_process_trains_our_model_on_the_cpu():
    spec = ProbeSpec(image_size=32, precision="float32", num_classes=3, memory_limit_mib=0)
    assert batchfit.probe(spec, 4) is True


def test_a_probe_that_fails_for_another_reason_raises_with_its_message():
    spec = ProbeSpec(image_size=32, precision="float8", num_classes=3, memory_limit_mib=0)
    with pytest.raises(BatchFitError, match="not for memory"):
        batchfit.probe(spec, 4)


@pytest.mark.slow
def test_running_out_of_memory_mid_training_steps_down_and_finishes(
    prepared_dataset, tmp_path, monkeypatch, caplog
):
    real_fit = keras.Model.fit
    calls = []

    def fit_that_runs_out_once(self, *args, **kwargs):
        calls.append(kwargs["steps_per_epoch"])
        if len(calls) == 2:  # the second epoch, before its first step
            raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor [16,32,32,3]")
        return real_fit(self, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", fit_that_runs_out_once)
    summary = train(
        scratch_config(
            data=prepared_dataset,
            output=tmp_path / "model",
            epochs=3,
            batch_size=16,
            augment=False,
            batch_fit="off",
            checkpoint_every=1,
        )
    )
    assert "out of memory at a per-GPU batch of 16" in caplog.text
    assert (summary["step_batch"], summary["accumulation"], summary["effective_batch"]) == (8, 2, 16)
    assert summary["epochs_trained"] == 3
    history = json.loads((tmp_path / "model" / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2, 3]
    images = records.load(prepared_dataset).count("train")
    # epoch 1 at 16 per step; epoch 2 runs out before its first step; epochs 2 and 3 at 8.
    assert calls == [math.ceil(images / 16)] * 2 + [math.ceil(images / 8)] * 2


def test_a_batch_that_fits_only_by_slowing_down_is_not_chosen():
    speeds = {64: 5000.0, 128: 6900.0, 256: 7000.0, 512: 5200.0, 1024: 3100.0}
    assert batchfit.choose(1024, speeds) == 256  # 128 and 256 within 5% of the fastest: the larger
    assert batchfit.choose(128, speeds) == 128
    assert batchfit.choose(96, {}) == 96  # nothing measured (injected probes): the largest that fits


def test_when_probes_measure_speed_smaller_batches_are_timed_while_they_are_faster(tmp_path):
    measured = {1024: 3100.0, 512: 5200.0, 256: 7000.0, 128: 6900.0, 64: 5000.0}
    probed, speeds = [], {}

    def fits(batch: int) -> bool:  # everything fits, as under XLA; the speed is what differs
        probed.append(batch)
        speeds[batch] = measured[batch]
        return True

    assert batchfit.largest_batch(1024, SPEC, GPU, tmp_path / "c.json", fits, speeds=speeds) == 256
    assert probed == [1024, 512, 256, 128]  # 128 is not faster than 256: no further halving
    probed.clear()
    assert batchfit.largest_batch(1024, SPEC, GPU, tmp_path / "c.json", fits, speeds=speeds) == 256
    assert probed == []  # cached
