"""What every step shares: logging set-up, user errors as one clear line, configs saved as JSON."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("components")

# Exit status for "your input cannot work" (argparse uses 2 for bad flags, we match it).
USER_ERROR_EXIT = 2


def configure_logging(level: str | None = None) -> None:
    """Called once, by entry points only. `LOG_LEVEL` overrides the default INFO."""
    logging.basicConfig(
        level=(level or os.environ.get("LOG_LEVEL", "INFO")).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # TensorFlow's C++ start-up chatter (CUDA probing) hides our own lines.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@contextlib.contextmanager
def exit_on_user_error(*errors: type[BaseException]) -> Iterator[None]:
    """Report an expected error as `error: <message>` and exit 2, without a traceback."""
    try:
        yield
    except errors as error:
        log.error("error: %s", error)
        raise SystemExit(USER_ERROR_EXIT) from None


def local_path(value: str) -> Path:
    """argparse type of a path on this machine. A bucket URL given instead would become a local
    folder named "s3:" (`Path` folds the "//"), and the step would write there without a word."""
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", value):
        raise argparse.ArgumentTypeError(
            f"{value} is a URL, and this takes a path on this machine (in a pipeline, KFP moves "
            "each step's folders to and from the artifact store)"
        )
    return Path(value)


def load_env_file(path: Path) -> int:
    """Set the variables of a `.env` file (KEY=VALUE lines) that are not set already.

    The environment wins, as with docker compose; quotes around a value are dropped. Returns how
    many were set. A missing file is not an error: the file is optional.
    """
    if not path.is_file():
        return 0
    count = 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key.isidentifier():
            raise SystemExit(f"error: {path}:{number}: expected KEY=VALUE")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        if key not in os.environ:
            os.environ[key] = value
            count += 1
    if count:
        log.info("read %d setting(s) from %s", count, path)
    return count


def json_config(config: Any) -> dict[str, Any]:
    """A step's resolved dataclass config as JSON-ready values, to save beside its output."""
    return {
        key: (str(value) if isinstance(value, Path) else value)
        for key, value in dataclasses.asdict(config).items()
    }
