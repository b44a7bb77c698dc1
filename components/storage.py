"""The only module that talks to an object store: list and read a labelled image source.

A source is a local folder or an S3-compatible bucket prefix laid out as `<class>/<file>`:

    /data/flowers               local folder
    s3://bucket/prefix          any S3-compatible endpoint (MinIO, SeaweedFS, AWS)
    minio://bucket/prefix       the same; the name Kubeflow users know
    gs://bucket/prefix          Google Cloud Storage
    tfds:NAME[:VERSION]         a TensorFlow Datasets dataset with a ClassLabel label

Endpoint and credentials come from the environment, never from parameters (they would be
written into the compiled pipeline):

    AWS_ENDPOINT_URL or MINIO_ENDPOINT   e.g. http://minio-service.kubeflow:9000; a bare
                                         host:port means TLS; unset means AWS S3
    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
    AWS_REGION (optional)

Google Cloud Storage uses Application Default Credentials (workload identity on GKE, or
GOOGLE_APPLICATION_CREDENTIALS); STORAGE_EMULATOR_HOST points it at an emulator.

A TFDS dataset is read from `tfds_data_dir` (a volume or gs:// path where it was prepared,
for clusters without internet) or TFDS's default folder, and downloaded and prepared there
if TFDS knows how and it is not there yet.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

import requests
import urllib3
from google.api_core import exceptions as gcs_errors
from google.api_core.exceptions import GoogleAPIError
from google.auth.exceptions import DefaultCredentialsError
from google.cloud import storage as gcs
from minio import Minio
from minio.error import S3Error

OBJECT_STORE_SCHEMES = ("s3", "minio")
TFDS_PREFIX = "tfds:"

log = logging.getLogger(__name__)


class StorageError(RuntimeError):
    """A source cannot be listed or read; the message says what to fix."""


@dataclass(frozen=True)
class SourceObject:
    key: str  # path below the source root, "/"-separated: "<class>/<name>"
    size: int
    etag: str  # the store's content tag ("" for local files)


class Source(Protocol):
    uri: str

    def list(self) -> list[SourceObject]: ...

    def read(self, key: str) -> bytes: ...

    def class_folders(self) -> list[str]: ...

    @property
    def worker_uri(self) -> str:
        """What a worker process passes to `open_source` to read the listed keys."""
        ...

    def close(self) -> None: ...


def _dangling(path: Path) -> bool:
    return path.is_symlink() and not path.exists()


# Folders of metadata that tools leave inside image folders: macOS's zip archiver (`._name`
# resource forks) and Synology's photo indexer (a set of thumbnails per photo, which would be
# read as more images of the class, and near-duplicates of the originals across splits).
METADATA_FOLDERS = ("__MACOSX", "@eaDir")


def _skipped_name(name: str) -> bool:
    """Hidden files and folders, and METADATA_FOLDERS: never part of a dataset."""
    return name.startswith(".") or name in METADATA_FOLDERS


def _skipped(key: str) -> bool:
    return any(_skipped_name(part) for part in key.split("/"))


class LocalSource:
    def __init__(self, root: Path):
        self.root = root
        self.uri = str(root)
        self.skipped: set[str] = set()  # hidden and metadata folders at the top, not read

    @property
    def worker_uri(self) -> str:
        return self.uri

    def close(self) -> None:
        pass

    def list(self) -> list[SourceObject]:
        if not self.root.exists():
            raise StorageError(f"source folder {self.root} does not exist")
        if not self.root.is_dir():
            raise StorageError(f"source {self.root} is not a folder; expected a folder of class sub-folders")
        found = []
        for path in self._walk(self.root, frozenset()):
            key = path.relative_to(self.root).as_posix()
            if path.is_file():
                found.append(SourceObject(key=key, size=path.stat().st_size, etag=""))
            elif _dangling(path):
                # Listed, so that the read fails and the file is reported, not silently missing.
                found.append(SourceObject(key=key, size=0, etag=""))
        # Path order (component by component), as the listing has always been: the fingerprint
        # of an unchanged folder stays the same.
        return sorted(found, key=lambda item: item.key.split("/"))

    def _walk(self, folder: Path, ancestors: frozenset[str]) -> Iterator[Path]:
        """Every non-hidden entry below `folder` that is not a folder, following links to
        folders: a class folder is often a link to where the images live (`pathlib`'s `rglob`
        does not follow them, and such a class looked empty). A link back to a folder above
        is not followed again, so a loop ends instead of recursing forever."""
        real = os.path.realpath(folder)
        if real in ancestors:
            log.warning("not following %s: a link back to %s, which is already being read", folder, real)
            return
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError as error:
            raise StorageError(f"cannot list folder {folder}: {error.strerror or error}") from None
        for entry in entries:
            if _skipped_name(entry.name):
                if folder == self.root and entry.is_dir():
                    self.skipped.add(entry.name)
                continue
            path = Path(entry.path)
            if entry.is_dir():  # follows a link
                yield from self._walk(path, ancestors | {real})
            else:
                yield path

    def read(self, key: str) -> bytes:
        path = self.root / key
        try:
            return path.read_bytes()
        except OSError as error:  # gone since the listing, unreadable, a dangling link
            why = " (a symbolic link to a missing file)" if _dangling(path) else ""
            raise StorageError(f"{key}: {error.strerror or error}{why}") from None

    def class_folders(self) -> list[str]:
        """Sub-folders, including empty ones, so that an empty class folder can be reported."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not _skipped_name(p.name))


@dataclass(frozen=True)
class Endpoint:
    host: str  # host:port
    secure: bool
    access_key: str
    secret_key: str = field(repr=False)  # never in a log line or a traceback's locals
    region: str | None = None


def endpoint_from_env(environ: dict[str, str] | None = None) -> Endpoint:
    env = os.environ if environ is None else environ
    raw = env.get("AWS_ENDPOINT_URL") or env.get("MINIO_ENDPOINT") or "https://s3.amazonaws.com"
    parsed = urlparse(raw if "://" in raw else f"https://{raw}")
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise StorageError(f"object store endpoint {raw!r} is not http(s)://host[:port] or host[:port]")
    access_key = env.get("AWS_ACCESS_KEY_ID", "")
    secret_key = env.get("AWS_SECRET_ACCESS_KEY", "")
    if not access_key or not secret_key:
        raise StorageError(
            "no object store credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(on Kubeflow, from the mlpipeline-minio-artifact secret)"
        )
    return Endpoint(
        host=parsed.netloc,
        secure=parsed.scheme == "https",
        access_key=access_key,
        secret_key=secret_key,
        region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
    )


def make_client(endpoint: Endpoint):
    # A few quick retries: the client's default (5 with long back-off) makes an unreachable
    # endpoint look like a hang for minutes before any message.
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=5, read=60),
        retries=urllib3.Retry(total=3, backoff_factor=0.2, status_forcelist=(500, 502, 503, 504)),
        maxsize=8,
    )
    return Minio(
        endpoint.host,
        access_key=endpoint.access_key,
        secret_key=endpoint.secret_key,
        secure=endpoint.secure,
        region=endpoint.region,
        http_client=http,
    )


class _BucketSource:
    """What every bucket-prefix source shares: the URI's parts, key <-> object name, and the
    checks on a finished listing. Subclasses talk to their store."""

    def __init__(self, uri: str):
        parsed = urlparse(uri)
        if not parsed.netloc:
            raise StorageError(f"{uri} names no bucket; expected {parsed.scheme}://bucket/prefix")
        self.uri = uri
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.skipped: set[str] = set()  # hidden and metadata folders at the top, not read

    @property
    def worker_uri(self) -> str:
        return self.uri

    def close(self) -> None:
        pass

    @property
    def list_prefix(self) -> str:
        return f"{self.prefix}/" if self.prefix else ""

    def object_name(self, key: str) -> str:
        return self.list_prefix + key

    def note_skipped(self, key: str) -> None:
        first, _, rest = key.partition("/")
        if rest and _skipped_name(first):
            self.skipped.add(first)

    def listed(self, found: list[SourceObject], where: str = "") -> list[SourceObject]:
        if not found:
            raise StorageError(f"no objects under {self.uri}{where}; expected <prefix>/<class>/<image>")
        return sorted(found, key=lambda o: o.key)

    def class_folders(self) -> list[str]:
        return []  # an object store has no empty folders


class ObjectStoreSource(_BucketSource):
    def __init__(self, uri: str, environ: dict[str, str] | None = None):
        super().__init__(uri)
        self.endpoint = endpoint_from_env(environ)
        self.client = make_client(self.endpoint)

    def _where(self) -> str:
        scheme = "https" if self.endpoint.secure else "http"
        return f"{scheme}://{self.endpoint.host}"

    def _explain(self, error: Exception) -> StorageError:
        if isinstance(error, S3Error):
            if error.code == "NoSuchBucket":
                return StorageError(f"bucket {self.bucket!r} does not exist at {self._where()}")
            if error.code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"):
                return StorageError(
                    f"{self._where()} refused the credentials for bucket {self.bucket!r} "
                    f"({error.code}): check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
                )
            return StorageError(f"{self._where()}: {error.code}: {error.message}")
        return StorageError(
            f"cannot reach the object store at {self._where()}: {type(error).__name__}: {str(error)[:300]}"
        )

    def list(self) -> list[SourceObject]:
        prefix = self.list_prefix
        found = []
        try:
            for item in self.client.list_objects(self.bucket, prefix=prefix, recursive=True):
                if item.is_dir or item.object_name.endswith("/"):
                    continue  # folder markers some tools create
                key = item.object_name[len(prefix) :]
                if _skipped(key):
                    self.note_skipped(key)
                else:
                    found.append(
                        SourceObject(key=key, size=int(item.size or 0), etag=(item.etag or "").strip('"'))
                    )
        except (S3Error, urllib3.exceptions.HTTPError, OSError) as error:
            raise self._explain(error) from None
        return self.listed(found, f" at {self._where()}")

    def read(self, key: str) -> bytes:
        try:
            response = self.client.get_object(self.bucket, self.object_name(key))
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()
        except (S3Error, urllib3.exceptions.HTTPError, OSError) as error:
            raise self._explain(error) from None


class ObjectStoreFolder(ObjectStoreSource):
    """A prefix of an S3-compatible bucket used as a folder: put, get, list and remove files."""

    def _call(self, action, *args):
        try:
            return action(*args)
        except (S3Error, urllib3.exceptions.HTTPError, OSError) as error:
            raise self._explain(error) from None

    def put_file(self, key: str, path: Path) -> None:
        self._call(self.client.fput_object, self.bucket, self.object_name(key), str(path))

    def get_file(self, key: str, path: Path) -> None:
        self._call(self.client.fget_object, self.bucket, self.object_name(key), str(path))

    def names(self) -> list[str]:
        """Every key under the prefix (an empty list for none; a missing bucket is an error)."""
        return sorted(self.sizes())

    def sizes(self) -> dict[str, int]:
        """Size of every object under the prefix, by key (empty for none; a missing bucket is an error)."""
        prefix = self.list_prefix
        items = self._call(lambda: list(self.client.list_objects(self.bucket, prefix=prefix, recursive=True)))
        return {item.object_name[len(prefix) :]: int(item.size or 0) for item in items if not item.is_dir}

    def remove(self, key: str) -> None:
        self._call(self.client.remove_object, self.bucket, self.object_name(key))

    def put_bytes(self, key: str, data: bytes) -> None:
        """One PUT: S3 replaces an object atomically, so a reader sees the old or the new bytes."""
        self._call(self.client.put_object, self.bucket, self.object_name(key), io.BytesIO(data), len(data))

    def get_bytes(self, key: str) -> bytes | None:
        """The object's bytes, or None when there is no such object."""
        found = self.get_tagged(key)
        return None if found is None else found[0]

    def get_tagged(self, key: str) -> tuple[bytes, str] | None:
        """(bytes, ETag) of the object, or None: the tag `replace_bytes` compares against."""
        try:
            response = self.client.get_object(self.bucket, self.object_name(key))
        except S3Error as error:
            if error.code == "NoSuchKey":
                return None
            raise self._explain(error) from None
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise self._explain(error) from None
        try:
            return response.read(), response.headers.get("ETag", "")
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise self._explain(error) from None
        finally:
            response.close()
            response.release_conn()

    def create_bytes(self, key: str, data: bytes) -> bool:
        """Write `key` only if no object has it (`If-None-Match: *`, one atomic check on the
        server); False when one does. Two writers racing for one key: exactly one wins."""
        return self._conditional_put(key, data, {"If-None-Match": "*"})

    def replace_bytes(self, key: str, data: bytes, tag: str | None) -> bool:
        """Replace `key` only if it is still the object whose ETag `tag` was read (`If-Match`),
        or create it only if there was none (`tag` None); False when it changed meanwhile."""
        return self._conditional_put(key, data, {"If-Match": tag} if tag else {"If-None-Match": "*"})

    def _conditional_put(self, key: str, data: bytes, condition: dict[str, str]) -> bool:
        # put_object would send the condition as user metadata (X-Amz-Meta-...); the plain
        # PutObject call sends headers as given.
        headers = {"Content-Type": "application/octet-stream", **condition}
        try:
            self.client._put_object(self.bucket, self.object_name(key), data, headers=headers)
        except S3Error as error:
            # 412 when the condition fails; 409 when another conditional write to the key was
            # in flight at the same moment (S3): either way this writer lost.
            if error.code in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise self._explain(error) from None
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise self._explain(error) from None
        return True

    def check(self) -> None:
        """Fail now, with a clear message, if the bucket is missing or the credentials are refused."""
        if not self._call(self.client.bucket_exists, self.bucket):
            raise StorageError(f"bucket {self.bucket!r} does not exist at {self._where()}")


PARTIAL = ".partial"  # a file being written, renamed into place when whole
_UMASK = os.umask(0o022)  # read once, at import (os.umask can only be read by setting it)
os.umask(_UMASK)
LOCK = ".lock"  # taken by every conditional writer of the key beside it


@contextlib.contextmanager
def _local_errors(path: Path) -> Iterator[None]:
    """A local folder's OSError (permissions, a full disk, a file where a folder should be)
    as the StorageError every caller handles, naming the path."""
    try:
        yield
    except StorageError:
        raise
    except OSError as error:
        raise StorageError(f"{path}: {error.strerror or error}") from None


class LocalFolder:
    """A local folder with the `ObjectStoreFolder` interface; every write is atomic (a file is
    written aside and renamed), as an object PUT is."""

    def __init__(self, root: Path):
        self.root = root
        self.uri = str(root)

    def _path(self, key: str) -> Path:
        return self.root / key

    def _aside(self, key: str, write) -> Path:
        """A new file beside `key`'s path, written by `write`: a name of its own, so that two
        processes writing the same key never write into one file."""
        target = self._path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=PARTIAL)
            # mkstemp's 0600 would make a registry folder unreadable to anyone else: a model
            # server in a container, a colleague. A file as open() would create it instead.
            os.fchmod(handle, 0o666 & ~_UMASK)
            os.close(handle)
            partial = Path(name)
            try:
                write(partial)
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
        except OSError as error:
            raise StorageError(f"cannot write {target}: {error.strerror or error}") from None
        return partial

    def _write(self, key: str, write) -> None:
        partial = self._aside(key, write)
        with _local_errors(self._path(key)):
            os.replace(partial, self._path(key))

    def put_file(self, key: str, path: Path) -> None:
        self._write(key, lambda partial: shutil.copyfile(path, partial))

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write(key, lambda partial: partial.write_bytes(data))

    def create_bytes(self, key: str, data: bytes) -> bool:
        """Write `key` only if it does not exist; False if it does. A hard link of a complete
        file is created or fails as one step, so the winner's bytes are whole when seen."""
        partial = self._aside(key, lambda path: path.write_bytes(data))
        try:
            os.link(partial, self._path(key))
            return True
        except FileExistsError:
            return False
        except OSError as error:
            raise StorageError(f"cannot write {self._path(key)}: {error.strerror or error}") from None
        finally:
            partial.unlink(missing_ok=True)

    def get_tagged(self, key: str) -> tuple[bytes, str] | None:
        """(bytes, their sha256) or None: the tag `replace_bytes` compares against."""
        data = self.get_bytes(key)
        return None if data is None else (data, hashlib.sha256(data).hexdigest())

    def replace_bytes(self, key: str, data: bytes, tag: str | None) -> bool:
        """Replace `key` only if its bytes still hash to `tag` (or, `tag` None, it is still
        absent); False otherwise. The read, the check and the rename happen under an exclusive
        lock on a file beside it, which every writer of the key takes."""
        target = self._path(key)
        with _local_errors(target):
            target.parent.mkdir(parents=True, exist_ok=True)
            lock = open(target.with_name(f".{target.name}{LOCK}"), "a")  # noqa: SIM115 (closed below)
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = self.get_tagged(key)
            if (current[1] if current else None) != tag:
                return False
            self._write(key, lambda partial: partial.write_bytes(data))
            return True

    def get_file(self, key: str, path: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise StorageError(f"{source} does not exist")
        with _local_errors(source):
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, path)

    def get_bytes(self, key: str) -> bytes | None:
        source = self._path(key)
        with _local_errors(source):
            return source.read_bytes() if source.is_file() else None

    def names(self) -> list[str]:
        with _local_errors(self.root):
            if not self.root.is_dir():
                return []
            return sorted(
                path.relative_to(self.root).as_posix()
                for path in self.root.rglob("*")
                if path.is_file() and not path.name.endswith((PARTIAL, LOCK))
            )

    def remove(self, key: str) -> None:
        """Remove one file, then its folders left empty (as an object store has no folders)."""
        path = self._path(key)
        with _local_errors(path):
            path.unlink(missing_ok=True)
            for parent in path.parents:
                if parent == self.root or not parent.is_relative_to(self.root) or any(parent.iterdir()):
                    break
                parent.rmdir()

    def check(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise StorageError(f"{self.root} exists and is not a folder")


class GCSSource(_BucketSource):
    def __init__(self, uri: str):
        super().__init__(uri)
        try:
            self.client = gcs.Client()
        except DefaultCredentialsError:
            raise StorageError(
                "no Google Cloud credentials: set GOOGLE_APPLICATION_CREDENTIALS, or run "
                "with workload identity"
            ) from None

    def _explain(self, error: Exception) -> StorageError:
        if isinstance(error, gcs_errors.NotFound):
            return StorageError(f"bucket {self.bucket!r} (or an object in it) does not exist: {error}")
        if isinstance(error, gcs_errors.Forbidden | gcs_errors.Unauthorized):
            return StorageError(f"Google Cloud Storage refused access to bucket {self.bucket!r}: {error}")
        return StorageError(f"cannot read gs://{self.bucket}: {type(error).__name__}: {str(error)[:300]}")

    def _errors(self) -> tuple[type[BaseException], ...]:
        return (GoogleAPIError, requests.RequestException, OSError)

    def list(self) -> list[SourceObject]:
        prefix = self.list_prefix
        found = []
        try:
            for blob in self.client.list_blobs(self.bucket, prefix=prefix):
                key = blob.name[len(prefix) :]
                if key and _skipped(key):
                    self.note_skipped(key)
                elif key and not blob.name.endswith("/"):
                    found.append(
                        SourceObject(key=key, size=int(blob.size or 0), etag=blob.etag or blob.md5_hash or "")
                    )
        except self._errors() as error:
            raise self._explain(error) from None
        return self.listed(found)

    def read(self, key: str) -> bytes:
        try:
            return self.client.bucket(self.bucket).blob(self.object_name(key)).download_as_bytes()
        except self._errors() as error:
            raise self._explain(error) from None


class TFDSSource:
    """Every split of a TensorFlow Datasets dataset, as `<label name>/<split>-<index>.<ext>` keys.

    The encoded images are streamed out of the TFDS files once, undecoded, into `scratch` (a
    folder beside the output, removed by `close`), so that the worker processes check and
    resize them in parallel like the files of a folder; memory holds one image at a time.
    Our own content-hash split replaces the dataset's splits, as for any other source.
    """

    def __init__(self, uri: str, data_dir: str | None = None, scratch: Path | None = None):
        name, _, version = uri[len(TFDS_PREFIX) :].partition(":")
        if not name:
            raise StorageError(f"{uri} names no dataset; expected tfds:NAME or tfds:NAME:VERSION")
        self.uri = uri
        self.spec = f"{name}:{version}" if version else name
        self.data_dir = data_dir or None
        self.scratch = Path(tempfile.mkdtemp(prefix="tfds-")) if scratch is None else scratch

    @property
    def worker_uri(self) -> str:
        return str(self.scratch)

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)

    def _builder(self):
        import tensorflow_datasets as tfds

        where = f" in {self.data_dir}" if self.data_dir else ""
        try:
            builder = tfds.builder(self.spec, data_dir=self.data_dir)
        except tfds.core.registered.DatasetNotFoundError as error:
            first = str(error).strip().splitlines()[0]
            raise StorageError(
                f"TFDS dataset {self.spec!r} not found{where}: {first} "
                "(a prepared dataset lives in <data dir>/<name>/<version>/)"
            ) from None
        except (AssertionError, ValueError) as error:  # a version it does not have, a malformed one
            why = str(error).strip().splitlines()[0].rpartition('}": ')[2]
            raise StorageError(f"TFDS dataset {self.spec!r} cannot be opened{where}: {why}") from None
        if not builder.is_prepared():
            log.info("TFDS dataset %s is not prepared%s: downloading and preparing it", self.spec, where)
            try:
                builder.download_and_prepare()
            except Exception as error:  # tfds raises many kinds (network, checksums, manual data)
                raise StorageError(
                    f"TFDS dataset {self.spec!r} is not prepared{where} and preparing it failed: "
                    f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''} "
                    "(without internet, run `tfds build` elsewhere and pass its folder as "
                    "--tfds-data-dir)"
                ) from None
        return builder

    @staticmethod
    def _feature_keys(info) -> tuple[str, str]:
        import tensorflow_datasets as tfds

        features = info.features
        if (
            info.supervised_keys
            and len(info.supervised_keys) == 2
            and all(isinstance(k, str) for k in info.supervised_keys)
        ):
            image_key, label_key = info.supervised_keys
        else:
            images = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
            labels = [k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)]
            if len(images) != 1 or len(labels) != 1:
                raise StorageError(
                    f"TFDS dataset {info.full_name} has no single image and label "
                    f"feature to train on (features: {', '.join(features.keys())})"
                )
            image_key, label_key = images[0], labels[0]
        if not isinstance(features[image_key], tfds.features.Image):
            raise StorageError(f"TFDS dataset {info.full_name}: feature {image_key!r} is not an image")
        if not isinstance(features[label_key], tfds.features.ClassLabel):
            raise StorageError(f"TFDS dataset {info.full_name}: feature {label_key!r} is not a class label")
        return image_key, label_key

    def list(self) -> list[SourceObject]:
        import tensorflow_datasets as tfds

        builder = self._builder()
        image_key, label_key = self._feature_keys(builder.info)
        names = [name.replace("/", "_") for name in builder.info.features[label_key].names]
        self.scratch.mkdir(parents=True, exist_ok=True)
        found: list[SourceObject] = []
        last_report = time.monotonic()
        for split in sorted(builder.info.splits.keys()):
            dataset = builder.as_dataset(
                split=split,
                shuffle_files=False,
                decoders={image_key: tfds.decode.SkipDecoding()},
                read_config=tfds.ReadConfig(try_autocache=False),
            )  # stream, never hold it all
            for index, example in enumerate(dataset.as_numpy_iterator()):
                data = example[image_key]
                extension = "png" if data.startswith(b"\x89PNG") else "jpg"
                key = f"{names[int(example[label_key])]}/{split}-{index:07d}.{extension}"
                path = self.scratch / key
                path.parent.mkdir(exist_ok=True)
                path.write_bytes(data)
                found.append(SourceObject(key=key, size=len(data), etag=hashlib.md5(data).hexdigest()))
                if time.monotonic() - last_report > 10:
                    log.info("copied %d images out of TFDS %s", len(found), builder.info.full_name)
                    last_report = time.monotonic()
        if not found:
            raise StorageError(f"TFDS dataset {builder.info.full_name} has no examples")
        log.info("copied %d images out of TFDS %s into %s", len(found), builder.info.full_name, self.scratch)
        return sorted(found, key=lambda o: o.key)

    def read(self, key: str) -> bytes:
        return (self.scratch / key).read_bytes()

    def class_folders(self) -> list[str]:
        return []  # a label with no examples is simply absent, as in an object store


def open_folder(uri: str) -> LocalFolder | ObjectStoreFolder:
    """A read-write folder: a local path, or an `s3://` / `minio://` bucket prefix."""
    scheme = urlparse(uri).scheme if "://" in uri else ""
    if not scheme:
        return LocalFolder(Path(uri))
    if scheme in OBJECT_STORE_SCHEMES:
        return ObjectStoreFolder(uri)
    raise StorageError(
        f"unsupported location {uri!r}: use a local folder, s3://bucket/prefix or minio://bucket/prefix"
    )


def open_source(uri: str, tfds_data_dir: str | None = None, scratch: Path | None = None) -> Source:
    """A `Source` for a local path, an `s3://`, `minio://` or `gs://` URI, or `tfds:NAME[:VERSION]`.

    `scratch` is where a TFDS source copies its images (default: a new temporary folder)."""
    if uri.startswith(TFDS_PREFIX):
        return TFDSSource(uri, data_dir=tfds_data_dir, scratch=scratch)
    scheme = urlparse(uri).scheme if "://" in uri else ""
    if not scheme:
        return LocalSource(Path(uri))
    if scheme in OBJECT_STORE_SCHEMES:
        return ObjectStoreSource(uri)
    if scheme == "gs":
        return GCSSource(uri)
    raise StorageError(
        f"unsupported source {uri!r}: use a local folder, s3://bucket/prefix, "
        "minio://bucket/prefix, gs://bucket/prefix or tfds:NAME[:VERSION]"
    )
