"""Plan-time checks of the train step that need no training: the too-short warning."""

from __future__ import annotations

import pytest

from components.train import MIN_SCRATCH_UPDATES, too_few_updates


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


@pytest.mark.parametrize("args", [
    (96, 32, 1, 8, "imagenet"),  # pretrained: fine-tuning needs far fewer
    (1600, 32, 1, 10, "none"),  # the built-in dataset: 500 updates
    (96, 8, 1, 24, "none"),  # the measured recipe that learnt: 288 updates
])
def test_runs_long_enough_get_no_warning(args):
    assert too_few_updates(*args) is None


def test_accumulation_counts_updates_not_batches():
    # 64 x 4 = an effective 256: 1600 images are 7 updates an epoch, not 25.
    assert too_few_updates(1600, 64, 4, 10, "none") is not None
    assert too_few_updates(1600, 64, 1, 10, "none") is None
