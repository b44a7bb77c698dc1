"""serve: the registry's production model over HTTP, following the production pointer.

    python -m components.serve --registry s3://models --model-name flowers [--port 8080]
    python pipeline.py serve   --registry ./registry --model-name flowers

Built on KServe's Python model server (the one a KServe InferenceService runs), speaking the
V1 prediction protocol that TF Serving and KServe share:

    POST /v1/models/<model-name>:predict   {"instances": [{"image_bytes": {"b64": "..."}}]}
      -> {"predictions": [{"labels": "tulip", "probabilities": [0.01, ...]}]}
    GET  /v1/models/<model-name>           readiness: {"name": ..., "ready": true}
    GET  /v2/models/<model-name>           metadata: the signature's inputs and outputs
    GET  /v2/health/live, /v2/health/ready

Each answer carries the version that made it in the `x-model-version` header. The server
loads the version `production.json` names (every file checked against the manifest's
sha256), then reads the pointer every `--poll-seconds`: when it moves (a promotion or a
rollback), the new version is fetched, verified, loaded and warmed up beside the old one, and
only then swapped in, so no request fails or waits during the switch. A version that cannot
be fetched or loaded is logged and the old one keeps serving.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import io
import logging
import re
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kserve
from kserve.errors import InvalidInput
from PIL import Image

from components import registry as registry_module
from components.cli import configure_logging, exit_on_user_error

log = logging.getLogger(__name__)

INPUT_NAME = "image_bytes"  # the serving signature's input (components/export.py)


class ServeError(RuntimeError):
    """The server cannot start: no production version, or it cannot be loaded."""


@dataclass(frozen=True)
class ServeConfig:
    registry: str  # s3://bucket[/prefix], minio://..., gs:// or a folder: where export pushes
    model_name: str
    port: int = 8080
    poll_seconds: float = 10.0  # how often the production pointer is read
    cache: Path | None = None  # where versions are downloaded; None = a temporary folder

    def __post_init__(self) -> None:
        if not registry_module.MODEL_NAME.fullmatch(self.model_name):
            raise ServeError(f"--model-name {self.model_name!r} is not a valid model name")
        if not 0 < self.port < 65536:
            raise ServeError(f"--port must be 1-65535, got {self.port}")
        if not self.poll_seconds > 0:
            raise ServeError(f"--poll-seconds must be positive, got {self.poll_seconds}")


@dataclass(frozen=True)
class Loaded:
    """One version in memory: what a request reads once, so a swap mid-request is harmless."""

    version: int
    serve: Any  # the SavedModel's serving_default signature
    folder: Path
    keep: Any  # the loaded SavedModel object: the signature's variables live as long as it


def load_version(registry: registry_module.Registry, version: int, cache: Path) -> Loaded:
    """Fetch `version`'s SavedModel (sha256 verified), load it and answer one request with it."""
    import tensorflow as tf

    folder = cache / f"v{version}"
    if folder.exists():
        shutil.rmtree(folder)
    registry.fetch(version, folder, "saved_model")
    model = tf.saved_model.load(str(folder))
    serve = model.signatures["serving_default"]
    # The first call traces and plans the graph (hundreds of ms): paid here, not by a client.
    serve(**{INPUT_NAME: tf.constant([_warm_up_image()])})
    return Loaded(version=version, serve=serve, folder=folder, keep=model)


def _warm_up_image() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (128, 128, 128)).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_instances(payload: dict[str, Any]) -> list[bytes]:
    """The V1 request body's images: {"instances": [{"image_bytes": {"b64": ...}}, ...]}. A bare
    {"b64": ...} per instance is accepted too (TF Serving's shorthand for a one-input model)."""
    instances = payload.get("instances") if isinstance(payload, dict) else None
    if not isinstance(instances, list) or not instances:
        raise InvalidInput('expected {"instances": [{"image_bytes": {"b64": "<base64 image>"}}, ...]}')
    images = []
    for index, instance in enumerate(instances):
        value = instance.get(INPUT_NAME, instance) if isinstance(instance, dict) else None
        encoded = value.get("b64") if isinstance(value, dict) else None
        if not isinstance(encoded, str):
            raise InvalidInput(f'instance {index}: expected {{"{INPUT_NAME}": {{"b64": "<base64 image>"}}}}')
        try:
            images.append(base64.b64decode(encoded, validate=True))
        except (binascii.Error, ValueError):
            raise InvalidInput(f"instance {index}: {INPUT_NAME}.b64 is not valid base64") from None
    return images


class ProductionModel(kserve.Model):
    """The production version of one registry model, swapped when the pointer moves."""

    def __init__(self, config: ServeConfig):
        super().__init__(config.model_name, return_response_headers=True)
        self.config = config
        self.registry = registry_module.Registry(config.registry, config.model_name)
        self._owned_cache = config.cache is None
        self.cache = config.cache or Path(tempfile.mkdtemp(prefix="serve-"))
        self.current: Loaded | None = None
        self._refused: int | None = None  # a version that failed to load, not tried again
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    def load(self) -> bool:
        pointer = self.registry.production()
        if pointer is None:
            raise ServeError(
                f"{self.config.model_name} has no production version in {self.config.registry}: "
                "run the pipeline (export promotes a blessed model) or `models promote`"
            )
        self.current = load_version(self.registry, pointer["version"], self.cache)
        log.info("serving %s version %d", self.config.model_name, self.current.version)
        self.ready = True
        self._poller = threading.Thread(target=self._follow, name="follow-production", daemon=True)
        self._poller.start()
        return self.ready

    def _follow(self) -> None:
        while not self._stop.wait(self.config.poll_seconds):
            try:
                self.refresh()
            except Exception as error:  # the follower must outlive any one poll
                log.error("following production failed this time, will try again: %s", error)

    def refresh(self) -> bool:
        """Read the pointer once; load and swap in the version it names if that is new. False
        when nothing changed or the new version could not be loaded (the old one serves on)."""
        try:
            pointer = self.registry.production()
        except registry_module.RegistryError as error:
            log.warning(
                "could not read the production pointer, still serving version %d: %s",
                self.current.version,
                error,
            )
            return False
        wanted = None if pointer is None else pointer["version"]
        if wanted != self._refused:
            self._refused = None  # the pointer moved since: a later return to it is tried again
        if wanted is None or self.current is None or wanted in (self.current.version, self._refused):
            return False
        old = self.current
        try:
            new = load_version(self.registry, wanted, self.cache)
        except Exception as error:  # a bad version must not stop the one that serves
            # Not fetched again on every poll while the pointer stays on it (a log line each time).
            self._refused = wanted
            log.error(
                "version %d could not be loaded, still serving version %d: %s", wanted, old.version, error
            )
            return False
        self.current = new
        log.info("production moved: now serving version %d (was %d)", new.version, old.version)
        # In-flight requests hold their own reference to the old signature; its files on disk
        # are not read again once loaded.
        shutil.rmtree(old.folder, ignore_errors=True)
        return True

    def stop(self) -> None:
        self._stop.set()
        if self._owned_cache:
            shutil.rmtree(self.cache, ignore_errors=True)
        super().stop()

    async def predict(self, payload, headers=None, response_headers=None) -> dict[str, Any]:
        images = decode_instances(payload)
        loaded = self.current  # read once: a swap during this request does not affect it
        outputs = await asyncio.to_thread(_run, loaded, images)
        if response_headers is not None:
            response_headers["x-model-version"] = str(loaded.version)
        return {"predictions": outputs}

    def get_input_types(self) -> list[dict]:
        return [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}]

    def get_output_types(self) -> list[dict]:
        classes = (
            -1
            if self.current is None
            else int(self.current.serve.structured_outputs["probabilities"].shape[-1])
        )
        return [
            {"name": "labels", "datatype": "BYTES", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, classes]},
        ]


def _run(loaded: Loaded, images: list[bytes]) -> list[dict[str, Any]]:
    import tensorflow as tf

    try:
        outputs = loaded.serve(**{INPUT_NAME: tf.constant(images, dtype=tf.string)})
    except tf.errors.InvalidArgumentError as error:
        # The model's own refusals (an undecodable image, a decompression bomb, too many images
        # per request) are the client's error, answered 400 with the model's reason.
        raise InvalidInput(refusal(error.message)) from None
    labels = [label.decode() for label in outputs["labels"].numpy()]
    probabilities = outputs["probabilities"].numpy().tolist()
    return [{"labels": label, "probabilities": row} for label, row in zip(labels, probabilities, strict=True)]


def refusal(message: str) -> str:
    """The reason in a TF error from the serving graph, without its node names and traces:
    "Unknown image file format. ..." or, from a tf.debugging.Assert, its parts joined
    ("request refused: more images than the cap of 256 per request: 300")."""
    reason = message.split("<stack traces unavailable>", 1)[-1].split("[[{{", 1)[0].strip()
    if reason.startswith("assertion failed:"):
        reason = " ".join(part.strip() for part in re.findall(r"\[([^\[\]]*)\]", reason))
    return " ".join(reason.split())[:1000]


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    defaults = ServeConfig(registry="", model_name="image-classifier")
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--registry", required=True, help="where export pushes: s3://, minio://, gs:// or a folder"
    )
    parser.add_argument("--model-name", required=True)
    parser.add_argument("--port", type=int, default=defaults.port)
    parser.add_argument(
        "--poll-seconds", type=float, default=defaults.poll_seconds, help="how often the pointer is read"
    )
    parser.add_argument("--cache", type=Path, default=None, help="where versions are downloaded")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    configure_logging()
    with exit_on_user_error(ServeError, registry_module.RegistryError):
        model = ProductionModel(
            ServeConfig(
                registry=args.registry,
                model_name=args.model_name,
                port=args.port,
                poll_seconds=args.poll_seconds,
                cache=args.cache,
            )
        )
        model.load()
    # gRPC off: the V1 protocol is REST, and a second port would need its own route in a pod.
    kserve.ModelServer(http_port=model.config.port, enable_grpc=False, workers=1).start([model])
    return 0


if __name__ == "__main__":
    sys.exit(main())
