"""The only module that talks to an object store: list and read a labelled image source.

A source is a local folder or an S3-compatible bucket prefix laid out as `<class>/<file>`:

    /data/flowers               local folder
    s3://bucket/prefix          any S3-compatible endpoint (MinIO, SeaweedFS, AWS)
    minio://bucket/prefix       the same; the name Kubeflow users know
    gs://bucket/prefix          Google Cloud Storage

Endpoint and credentials come from the environment, never from parameters (they would be
written into the compiled pipeline):

    AWS_ENDPOINT_URL or MINIO_ENDPOINT   e.g. http://minio-service.kubeflow:9000; a bare
                                         host:port means TLS; unset means AWS S3
    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
    AWS_REGION (optional)

Google Cloud Storage uses Application Default Credentials (workload identity on GKE, or
GOOGLE_APPLICATION_CREDENTIALS); STORAGE_EMULATOR_HOST points it at an emulator.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

OBJECT_STORE_SCHEMES = ("s3", "minio")


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


def _hidden(key: str) -> bool:
    return any(part.startswith(".") for part in key.split("/"))


class LocalSource:
    def __init__(self, root: Path):
        self.root = root
        self.uri = str(root)

    def list(self) -> list[SourceObject]:
        if not self.root.exists():
            raise StorageError(f"source folder {self.root} does not exist")
        if not self.root.is_dir():
            raise StorageError(f"source {self.root} is not a folder; expected a folder of class sub-folders")
        found = []
        for path in sorted(self.root.rglob("*")):
            key = path.relative_to(self.root).as_posix()
            if path.is_file() and not _hidden(key):
                found.append(SourceObject(key=key, size=path.stat().st_size, etag=""))
        return found

    def read(self, key: str) -> bytes:
        return (self.root / key).read_bytes()

    def class_folders(self) -> list[str]:
        """Sub-folders, including empty ones, so that an empty class folder can be reported."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))


@dataclass(frozen=True)
class Endpoint:
    host: str  # host:port
    secure: bool
    access_key: str
    secret_key: str
    region: str | None


def endpoint_from_env(environ: dict[str, str] | None = None) -> Endpoint:
    env = os.environ if environ is None else environ
    raw = env.get("AWS_ENDPOINT_URL") or env.get("MINIO_ENDPOINT") or "https://s3.amazonaws.com"
    parsed = urlparse(raw if "://" in raw else f"https://{raw}")
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise StorageError(f"object store endpoint {raw!r} is not http(s)://host[:port] or host[:port]")
    access_key = env.get("AWS_ACCESS_KEY_ID", "")
    secret_key = env.get("AWS_SECRET_ACCESS_KEY", "")
    if not access_key or not secret_key:
        raise StorageError("no object store credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                           "(on Kubeflow, from the mlpipeline-minio-artifact secret)")
    return Endpoint(host=parsed.netloc, secure=parsed.scheme == "https", access_key=access_key,
                    secret_key=secret_key, region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"))


def make_client(endpoint: Endpoint):
    import urllib3
    from minio import Minio

    # A few quick retries: the client's default (5 with long back-off) makes an unreachable
    # endpoint look like a hang for minutes before any message.
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=5, read=60),
        retries=urllib3.Retry(total=3, backoff_factor=0.2, status_forcelist=(500, 502, 503, 504)),
        maxsize=8,
    )
    return Minio(endpoint.host, access_key=endpoint.access_key, secret_key=endpoint.secret_key,
                 secure=endpoint.secure, region=endpoint.region, http_client=http)


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

    @property
    def list_prefix(self) -> str:
        return f"{self.prefix}/" if self.prefix else ""

    def object_name(self, key: str) -> str:
        return self.list_prefix + key

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
        from minio.error import S3Error

        if isinstance(error, S3Error):
            if error.code == "NoSuchBucket":
                return StorageError(f"bucket {self.bucket!r} does not exist at {self._where()}")
            if error.code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"):
                return StorageError(f"{self._where()} refused the credentials for bucket {self.bucket!r} "
                                    f"({error.code}): check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
            return StorageError(f"{self._where()}: {error.code}: {error.message}")
        return StorageError(f"cannot reach the object store at {self._where()}: {type(error).__name__}: "
                            f"{str(error)[:300]}")

    def list(self) -> list[SourceObject]:
        import urllib3
        from minio.error import S3Error

        prefix = self.list_prefix
        found = []
        try:
            for item in self.client.list_objects(self.bucket, prefix=prefix, recursive=True):
                if item.is_dir or item.object_name.endswith("/"):
                    continue  # folder markers some tools create
                key = item.object_name[len(prefix):]
                if not _hidden(key):
                    found.append(SourceObject(key=key, size=int(item.size or 0),
                                              etag=(item.etag or "").strip('"')))
        except (S3Error, urllib3.exceptions.HTTPError, OSError) as error:
            raise self._explain(error) from None
        return self.listed(found, f" at {self._where()}")

    def read(self, key: str) -> bytes:
        import urllib3
        from minio.error import S3Error

        try:
            response = self.client.get_object(self.bucket, self.object_name(key))
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()
        except (S3Error, urllib3.exceptions.HTTPError, OSError) as error:
            raise self._explain(error) from None


class GCSSource(_BucketSource):
    def __init__(self, uri: str):
        from google.auth.exceptions import DefaultCredentialsError
        from google.cloud import storage as gcs

        super().__init__(uri)
        try:
            self.client = gcs.Client()
        except DefaultCredentialsError:
            raise StorageError("no Google Cloud credentials: set GOOGLE_APPLICATION_CREDENTIALS, or run "
                               "with workload identity") from None

    def _explain(self, error: Exception) -> StorageError:
        from google.api_core import exceptions

        if isinstance(error, exceptions.NotFound):
            return StorageError(f"bucket {self.bucket!r} (or an object in it) does not exist: {error}")
        if isinstance(error, exceptions.Forbidden | exceptions.Unauthorized):
            return StorageError(f"Google Cloud Storage refused access to bucket {self.bucket!r}: "
                                f"{error}")
        return StorageError(f"cannot read gs://{self.bucket}: {type(error).__name__}: "
                            f"{str(error)[:300]}")

    def _errors(self) -> tuple[type[BaseException], ...]:
        import requests
        from google.api_core.exceptions import GoogleAPIError

        return (GoogleAPIError, requests.RequestException, OSError)

    def list(self) -> list[SourceObject]:
        prefix = self.list_prefix
        found = []
        try:
            for blob in self.client.list_blobs(self.bucket, prefix=prefix):
                key = blob.name[len(prefix):]
                if key and not blob.name.endswith("/") and not _hidden(key):
                    found.append(SourceObject(key=key, size=int(blob.size or 0),
                                              etag=blob.etag or blob.md5_hash or ""))
        except self._errors() as error:
            raise self._explain(error) from None
        return self.listed(found)

    def read(self, key: str) -> bytes:
        try:
            return self.client.bucket(self.bucket).blob(self.object_name(key)).download_as_bytes()
        except self._errors() as error:
            raise self._explain(error) from None


def open_source(uri: str) -> Source:
    """A `Source` for a local path or an `s3://`, `minio://` or `gs://` URI."""
    scheme = urlparse(uri).scheme if "://" in uri else ""
    if not scheme:
        return LocalSource(Path(uri))
    if scheme in OBJECT_STORE_SCHEMES:
        return ObjectStoreSource(uri)
    if scheme == "gs":
        return GCSSource(uri)
    raise StorageError(f"unsupported source {uri!r}: use a local folder, s3://bucket/prefix, "
                       "minio://bucket/prefix or gs://bucket/prefix")
