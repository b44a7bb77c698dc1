"""Pretrained EfficientNet-B0 weights: find them, verify them, keep them where the next run looks.

`--weights imagenet` means Keras' published no-top file, `efficientnetb0_notop.h5`. Keras
itself downloads it into `~/.keras/models` of whichever process asks, which on Kubeflow is a
pod that is gone by the next run, and offline it fails deep inside `get_file`. Here the file
lives in a cache folder that outlives the pod (a volume path or an s3:// / minio:// prefix):

1. the cache holds the file and its MD5 is Keras' published one: it is used;
2. otherwise it is downloaded from Keras' address, checked against that MD5, and put in the
   cache (an object-store cache gets a copy, so the next pod reads it from the bucket);
3. no network: one line says which file to put where.

`--weights` may also name a weights file directly (a path or an object-store URI); that file is
the user's and is not checked against a hash.

    python -m components.pretrained --cache /mnt/weights     # fetch once, e.g. on a laptop
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from components import storage
from components.cli import configure_logging, exit_on_user_error

log = logging.getLogger(__name__)

IMAGENET_FILE = "efficientnetb0_notop.h5"
# keras/src/applications/efficientnet.py: BASE_WEIGHTS_PATH + "efficientnetb0_notop.h5", and
# WEIGHTS_HASHES["b0"][1], the MD5 Keras' own get_file checks (tests/test_pretrained.py holds
# both to the installed Keras).
IMAGENET_URL = "https://storage.googleapis.com/keras-applications/" + IMAGENET_FILE
IMAGENET_MD5 = "50bc09e76180e00e4465e1a485ddc09d"
DOWNLOAD_TIMEOUT_SECONDS = 60.0
OBJECT_STORE_SCHEMES = ("s3://", "minio://", "gs://")


class WeightsError(ValueError):
    """The weights cannot be found, fetched or trusted; the message says what to do."""


@dataclass(frozen=True)
class Published:
    """A weights file's name, address and MD5, as its publisher gives them."""

    name: str
    url: str
    md5: str


IMAGENET = Published(IMAGENET_FILE, IMAGENET_URL, IMAGENET_MD5)


def keras_cache() -> Path:
    """Keras' own cache folder for application weights: a file Keras downloaded is found here."""
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras") / "models"


def default_cache(checkpoint_dir: str) -> str:
    """Where the weights are kept when no cache is given: beside the checkpoints when those have
    a home that outlives the pod (a volume or a bucket), else Keras' own folder."""
    return f"{checkpoint_dir.rstrip('/')}/weights" if checkpoint_dir else str(keras_cache())


def md5_of(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(published: Published, target: Path) -> None:
    """Download `published` to `target` (written aside, renamed once its MD5 matches)."""
    partial = target.with_name(f".{target.name}.partial")
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    log.info("downloading %s", published.url)
    try:
        with (
            urllib.request.urlopen(published.url, timeout=DOWNLOAD_TIMEOUT_SECONDS) as response,
            partial.open("wb") as stream,
        ):
            while block := response.read(1 << 20):
                stream.write(block)
    except (urllib.error.URLError, OSError) as error:
        partial.unlink(missing_ok=True)
        reason = getattr(error, "reason", None) or error
        raise WeightsError(f"cannot download {published.url} ({reason})") from None
    found = md5_of(partial)
    if found != published.md5:
        partial.unlink(missing_ok=True)
        raise WeightsError(
            f"{published.url} downloaded with MD5 {found}, not the published {published.md5}: refusing it"
        )
    partial.replace(target)
    log.info(
        "downloaded %s (%.1f MB, %.1f s), MD5 verified",
        published.name,
        target.stat().st_size / 1e6,
        time.monotonic() - started,
    )


def resolve(cache: str, scratch: Path, published: Published | None = None) -> Path:
    """A local path of the verified weights file (default: ImageNet's), from `cache` (a folder
    or an s3:// / minio:// prefix) or downloaded into it. `scratch` is where a file from an
    object store is copied."""
    published = published or IMAGENET
    remote = cache.startswith(OBJECT_STORE_SCHEMES)
    if cache.startswith("gs://"):
        raise WeightsError(
            "--weights-cache: gs:// is not supported; use a folder (a volume) or an s3:// / minio:// prefix"
        )
    local = (scratch if remote else Path(cache)) / published.name
    where = f"{cache.rstrip('/')}/{published.name}"
    try:
        folder = storage.open_folder(cache) if remote else None
        if folder is not None and published.name in folder.names():
            folder.get_file(published.name, local)
    except storage.StorageError as error:
        raise WeightsError(f"cannot read the weights cache {cache}: {error}") from None
    if local.is_file():
        found = md5_of(local)
        if found == published.md5:
            log.info("ImageNet weights from %s (MD5 verified)", where)
            return local
        log.warning("%s has MD5 %s, not the published %s: downloading it again", where, found, published.md5)
        local.unlink()
    try:
        _download(published, local)
    except WeightsError as error:
        raise WeightsError(
            f"{error}. Offline? Put {published.name} (MD5 {published.md5}, from "
            f"{published.url}) at {where}, or train from scratch with --weights none"
        ) from None
    if folder is not None:
        try:
            folder.put_file(published.name, local)
            log.info("cached the weights at %s for the next run", where)
        except storage.StorageError as error:
            log.warning(
                "could not cache the weights at %s (the next run downloads them again): %s", where, error
            )
    return local


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m components.pretrained",
        description="Fetch and verify the ImageNet weights into a cache.",
    )
    parser.add_argument(
        "--cache",
        default=str(keras_cache()),
        help="folder or s3:// / minio:// prefix (default: Keras' own cache folder)",
    )
    args = parser.parse_args(argv)
    configure_logging()
    with exit_on_user_error(WeightsError):
        print(resolve(args.cache, Path.cwd()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
