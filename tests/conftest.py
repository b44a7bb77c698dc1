"""Shared fixtures: tiny datasets made in the test, never downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# TensorFlow's C++ start-up notes (oneDNN, CUDA probing) drown pytest's output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from components.sample_data import SampleDataConfig, generate  # noqa: E402

TINY_SIZE = 32  # px: the smallest EfficientNet-B0 accepts, so tests train in seconds


def scratch_config(**settings):
    """A `TrainConfig` from scratch, epochs as given: the product's ImageNet default would need
    the network, and its update floor would multiply the tiny datasets' epochs ~20 times. Tests
    of either ask for them."""
    from components.train import TrainConfig

    return TrainConfig(**({"weights": "none", "min_updates": 0} | settings))


def make_image_folder(root: Path, images_per_class: int = 8, broken: bool = False) -> Path:
    return generate(
        SampleDataConfig(
            output=root,
            images_per_class=images_per_class,
            image_size=TINY_SIZE,
            seed=1,
            add_broken_files=broken,
        )
    )


@pytest.fixture(scope="module")
def s3():
    """A real HTTP S3 endpoint (moto's server, standing in for MinIO), one per test module."""
    from tests import s3_server

    server = s3_server.start()
    yield server
    server.process.kill()
    server.process.wait()


@pytest.fixture
def s3_env(s3, monkeypatch):
    """`s3`, with its endpoint and credentials in this process's environment."""
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MINIO_ENDPOINT", raising=False)
    return s3


@pytest.fixture
def webhook():
    """A local HTTP receiver standing in for a Slack incoming webhook (tests/webhook_receiver.py)."""
    from tests.webhook_receiver import WebhookReceiver

    with WebhookReceiver() as receiver:
        yield receiver


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """4 classes x 8 valid images, 32 px, no broken files."""
    return make_image_folder(tmp_path / "images")


@pytest.fixture(scope="session")
def prepared_dataset(tmp_path_factory) -> Path:
    """A preprocessed tiny dataset (4 classes x 12 images at 32 px: 8 train, 2 validation and
    2 test images per class), shared by the slow tests."""
    from components.preprocess import PreprocessConfig, preprocess

    root = tmp_path_factory.mktemp("prepared")
    source = make_image_folder(root / "images", images_per_class=12)
    output = root / "dataset"
    preprocess(
        PreprocessConfig(
            source=source, output=output, image_size=TINY_SIZE, validation_fraction=0.2, test_fraction=0.2
        )
    )
    return output


@pytest.fixture(scope="session")
def trained_model(prepared_dataset: Path, tmp_path_factory) -> Path:
    """A model fitted to the 32 training images of `prepared_dataset` (~40 s on 2 cores).

    One batch of 32 per epoch, 12 epochs, no augmentation, no warm-up: the "can it overfit a
    batch" check. On 3 seeds the loss fell from 1.6-2.0 to 0.66-0.83 (less than half).
    """
    from components.train import train

    output = tmp_path_factory.mktemp("trained") / "model"
    train(
        scratch_config(
            data=prepared_dataset, output=output, epochs=12, batch_size=32, augment=False, warmup_epochs=0
        )
    )
    return output


def damaged_jpeg() -> bytes:
    """A JPEG whose scan data has bytes flipped: TF and Pillow both decode it without an error,
    only libjpeg's warning on stderr says the picture is partly garbage."""
    import io

    import numpy as np
    import tensorflow as tf
    from PIL import Image

    pixels = (np.random.default_rng(0).random((96, 128, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    data = bytearray(buffer.getvalue())
    middle = (data.index(b"\xff\xda") + len(data)) // 2
    for i in range(middle, middle + 100):
        if data[i] != 0xFF and data[i - 1] != 0xFF:
            data[i] ^= 0x5A
    assert tf.io.decode_jpeg(bytes(data)).shape == (96, 128, 3)  # the decoder tolerates it
    return bytes(data)
