"""Plan-time checks of the train step: the too-short warning and the update floor."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from components.train import MIN_SCRATCH_UPDATES, too_few_updates
from tests.conftest import scratch_config


def test_the_issue_case_120_images_is_warned_with_its_numbers_and_the_way_out():
    """96 training images, batch 32, 8 epochs: 24 updates, measured to answer at chance."""
    warning = too_few_updates(96, 32, 1, 8, "none")
    assert warning is not None
    assert "96 training images" in warning and "24 optimizer updates" in warning
    assert f"--epochs {-(-MIN_SCRATCH_UPDATES // 3)}" in warning  # 3 updates an epoch at batch 32
    assert "--batch-size 3" in warning  # 32 updates an epoch: 256 in 8 epochs
    assert "--weights imagenet" in warning


def test_the_suggested_batch_reaches_the_floor():
    for images, epochs in ((96, 8), (500, 3), (40, 10)):
        warning = too_few_updates(images, 32, 1, epochs, "none")
        batch = int(warning.split("--batch-size ")[1].split()[0])
        assert too_few_updates(images, batch, 1, epochs, "none") is None or batch == 1


@pytest.mark.parametrize(
    "args",
    [
        (96, 32, 1, 8, "imagenet"),  # pretrained: fine-tuning needs far fewer
        (1600, 32, 1, 10, "none"),  # the built-in dataset: 500 updates
        (96, 8, 1, 24, "none"),  # the measured recipe that learnt: 288 updates
    ],
)
def test_runs_long_enough_get_no_warning(args):
    assert too_few_updates(*args) is None


def test_accumulation_counts_updates_not_batches():
    # 64 x 4 = an effective 256: 1600 images are 7 updates an epoch, not 25.
    assert too_few_updates(1600, 64, 4, 10, "none") is not None
    assert too_few_updates(1600, 64, 1, 10, "none") is None


def _updates(images: int, batch: int, epochs: int, passes: int) -> int:
    return math.ceil(images * passes / batch) * epochs


@pytest.mark.parametrize(
    ("images", "batch", "epochs"),
    [(96, 32, 8), (112, 32, 10), (40, 16, 3), (7, 32, 1), (199, 1, 1), (150, 8, 24)],
)
def test_the_update_floor_takes_the_fewest_passes_that_reach_it(images, batch, epochs):
    config = scratch_config(
        data=Path(), output=Path(), batch_size=batch, epochs=epochs, min_updates=MIN_SCRATCH_UPDATES
    )
    passes = config.passes_per_epoch(images)
    assert _updates(images, batch, epochs, passes) >= MIN_SCRATCH_UPDATES
    assert passes == 1 or _updates(images, batch, epochs, passes - 1) < MIN_SCRATCH_UPDATES


def test_the_issue_case_gets_nine_passes_an_epoch_and_no_warning():
    """96 training images, batch 32, 8 epochs: 24 updates without the floor, 216 with it."""
    config = scratch_config(
        data=Path(), output=Path(), batch_size=32, epochs=8, min_updates=MIN_SCRATCH_UPDATES
    )
    assert config.passes_per_epoch(96) == 9
    assert too_few_updates(96, 32, 1, 8, "none", passes=9) is None
    assert too_few_updates(96, 32, 1, 8, "none", passes=1) is not None


@pytest.mark.parametrize("settings", [{"weights": "imagenet"}, {"min_updates": 0}, {"epochs": 40}])
def test_the_floor_leaves_pretrained_off_and_long_enough_runs_alone(settings):
    config = scratch_config(
        **{
            "data": Path(),
            "output": Path(),
            "batch_size": 32,
            "epochs": 8,
            "min_updates": MIN_SCRATCH_UPDATES,
            **settings,
        }
    )
    assert config.passes_per_epoch(160) == 1  # 40 epochs x 5 = 200 updates: enough


def test_a_resumed_epoch_of_several_passes_skips_exactly_what_it_trained_on(prepared_dataset):
    from components import records

    dataset = records.load(prepared_dataset)
    count = dataset.count("train")

    def epoch(skip: int = 0, seed: int = 7) -> list[bytes]:
        return [
            record.numpy()
            for record in records.serialized_split(
                dataset, "train", shuffle_buffer=count, seed=seed, passes=3, skip=skip
            )
        ]

    whole = epoch()
    assert len(whole) == 3 * count and whole == epoch()  # the same order on every run
    passes = [whole[index * count : (index + 1) * count] for index in range(3)]
    assert all(sorted(one) == sorted(passes[0]) for one in passes)  # each pass: every image once
    assert passes[0] != passes[1] != passes[2]  # each in its own order
    assert epoch(skip=count + 5) == whole[count + 5 :]  # resumed mid second pass
    assert epoch(seed=8) != whole


@pytest.mark.slow
def test_training_from_scratch_makes_at_least_min_updates(prepared_dataset, tmp_path, monkeypatch):
    import keras

    from components.train import train

    steps = []
    fit = keras.Model.fit

    def counting_fit(self, *args, **kwargs):
        steps.append(kwargs["steps_per_epoch"])
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", counting_fit)
    # 32 training images at a batch of 8 for 2 epochs: 8 updates; a floor of 20 takes 3 passes.
    summary = train(
        scratch_config(
            data=prepared_dataset,
            output=tmp_path / "m",
            epochs=2,
            batch_size=8,
            min_updates=20,
            augment=False,
            xla="off",
        )
    )
    assert summary["passes_per_epoch"] == 3
    assert steps == [12, 12]


def test_the_batch_fit_cache_is_kept_beside_the_checkpoints_in_the_bucket(s3_env, tmp_path):
    """A scheduled run's pod is gone next week, and its ~/.cache with it: the fit found on the
    GPU goes to the bucket and the next pod starts from it instead of probing again."""
    from components import train

    s3_env.client().make_bucket("ckpt")
    config = scratch_config(data=tmp_path, output=tmp_path / "out", checkpoint_dir="s3://ckpt/runs")
    remote = train._fit_cache_remote(config)
    assert remote == "s3://ckpt/runs"
    named = scratch_config(
        data=tmp_path, output=tmp_path, checkpoint_dir="s3://ckpt/runs", batch_fit_cache="/c.json"
    )
    assert train._fit_cache_remote(named) == ""  # a cache file named by hand stays where it was named
    assert (
        train._fit_cache_remote(scratch_config(data=tmp_path, output=tmp_path, checkpoint_dir="/mnt")) == ""
    )
    first = tmp_path / "pod-1" / "batch-fit.json"
    train._pull_fit_cache(remote, first)  # nothing there yet: nothing written
    assert not first.exists()
    first.parent.mkdir()
    first.write_text('{"gpu-key": {"largest": 96}}\n')
    train._push_fit_cache(first, remote)
    second = tmp_path / "pod-2" / "batch-fit.json"
    train._pull_fit_cache(remote, second)
    assert second.read_text() == first.read_text()


def test_random_resized_crops_give_full_size_images_that_differ_from_the_shift(prepared_dataset, tmp_path):
    """--crop-min-area: every batch image is a resized crop at the training size (uint8),
    and a crop covering at least the given share is not the padded shift's black border."""
    import numpy as np

    from components import records
    from components.train import TrainError, training_dataset

    dataset = records.load(prepared_dataset)
    size = dataset.image_size
    config = scratch_config(data=prepared_dataset, output=tmp_path, batch_size=8, crop_min_area=0.5)
    images, _ = next(iter(training_dataset(dataset, config, len(dataset.classes))))
    assert images.dtype.name == "uint8" and tuple(images.shape) == (8, size, size, 3)
    plain = scratch_config(data=prepared_dataset, output=tmp_path, batch_size=8, augment=False)
    originals, _ = next(iter(training_dataset(dataset, plain, len(dataset.classes))))
    assert not np.array_equal(np.sort(images.numpy(), axis=None), np.sort(originals.numpy(), axis=None))
    with pytest.raises(TrainError, match="--crop-min-area must be in"):
        scratch_config(data=prepared_dataset, output=tmp_path, crop_min_area=1.5).validate()
