"""scikit-learn's two sample photos (china.jpg and flower.jpg, 427x640), without scikit-learn.

The photos are read from the scikit-learn wheel, which `pip download` fetches once into
`bench/.photos/`. Installing scikit-learn into the project's environment would change what is
measured: TensorFlow's import loads Keras, whose scikit-learn wrapper then imports it and
SciPy, 0.6 s more of CPU in every process (2.0 s to 2.6 s), which the product's environment
does not pay.
"""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from pathlib import Path

CACHE = Path(__file__).resolve().parent / ".photos"
WHEEL = "scikit-learn==1.9.1"
NAMES = ("china.jpg", "flower.jpg")


def load() -> list:
    """The two photos as RGB `PIL.Image`s, as `sklearn.datasets.load_sample_images` has them."""
    from PIL import Image

    if not all((CACHE / name).is_file() for name in NAMES):
        CACHE.mkdir(exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(CACHE), WHEEL],
            check=True,
        )
        (wheel,) = CACHE.glob("scikit_learn-*.whl")
        with zipfile.ZipFile(wheel) as archive:
            for name in NAMES:
                (CACHE / name).write_bytes(archive.read(f"sklearn/datasets/images/{name}"))
        wheel.unlink()
    return [Image.open(io.BytesIO((CACHE / name).read_bytes())).convert("RGB") for name in NAMES]
