"""A tiny TensorFlow Datasets dataset, prepared offline, to test `tfds:` sources."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

NAME = "tiny_textures"
CLASSES = ("coarse", "fine")


class TinyTextures(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                    "label": tfds.features.ClassLabel(names=list(CLASSES)),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, 16), "test": self._generate_examples(16, 8)}

    def _generate_examples(self, start: int, count: int):
        for index in range(start, start + count):
            rng = np.random.default_rng(index)
            label = index % 2
            cell = 8 if label == 0 else 2
            noise = rng.integers(0, 256, (48 // cell, 40 // cell, 3), dtype=np.uint8)
            yield f"{index}", {"image": np.kron(noise, np.ones((cell, cell, 1), np.uint8)), "label": label}


def prepare(data_dir: Path) -> int:
    """Prepare the dataset under `data_dir`; returns its number of examples."""
    builder = TinyTextures(data_dir=str(data_dir))
    builder.download_and_prepare()
    return sum(split.num_examples for split in builder.info.splits.values())
