"""Sources in an S3-compatible store, through a real HTTP endpoint (moto's server for MinIO)."""

from __future__ import annotations

import io

import pytest

from components import storage
from components.preprocess import PreprocessConfig, PreprocessError, list_source, preprocess
from tests.conftest import TINY_SIZE, make_image_folder


@pytest.fixture(scope="module")
def uploaded(s3, tmp_path_factory):
    folder = make_image_folder(tmp_path_factory.mktemp("s3src") / "images", images_per_class=6, broken=True)
    s3.upload_folder(folder, "datasets", "patterns/v1")
    return folder


@pytest.mark.parametrize("scheme", ["s3", "minio"])
def test_s3_source_gives_the_same_shards_as_the_local_folder(s3_env, uploaded, tmp_path, scheme):
    local = preprocess(PreprocessConfig(source=uploaded, output=tmp_path / "local", image_size=TINY_SIZE))
    remote = preprocess(
        PreprocessConfig(
            source=f"{scheme}://datasets/patterns/v1", output=tmp_path / "s3", image_size=TINY_SIZE
        )
    )
    assert remote["shards"] == local["shards"]  # same sha256: byte-identical records
    assert remote["rejected"] == local["rejected"]
    assert remote["source"] == f"{scheme}://datasets/patterns/v1"
    assert remote["fingerprint"] != local["fingerprint"]  # the store's etags enter the fingerprint


def test_fingerprint_is_stable_and_follows_the_data(s3_env, uploaded, s3):
    source = storage.open_source("s3://datasets/patterns/v1")
    first = list_source(source).fingerprint
    assert list_source(source).fingerprint == first
    client = s3.client()
    client.put_object("datasets", "patterns/v1/dots/extra.png", io.BytesIO(b"x" * 10), 10)
    try:
        assert list_source(source).fingerprint != first
    finally:
        client.remove_object("datasets", "patterns/v1/dots/extra.png")


def test_missing_bucket(s3_env, tmp_path):
    with pytest.raises(PreprocessError, match="bucket 'no-such-bucket' does not exist at http://127.0.0.1"):
        preprocess(PreprocessConfig(source="s3://no-such-bucket/x", output=tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_empty_prefix(s3_env, uploaded, tmp_path):
    with pytest.raises(PreprocessError, match="no objects under s3://datasets/nothing-here"):
        preprocess(PreprocessConfig(source="s3://datasets/nothing-here", output=tmp_path / "out"))


def test_wrong_credentials(s3_env, uploaded, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(PreprocessError, match="refused the credentials .*SignatureDoesNotMatch"):
        preprocess(PreprocessConfig(source="s3://datasets/patterns/v1", output=tmp_path / "out"))


def test_missing_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    with pytest.raises(PreprocessError, match="no object store credentials: set AWS_ACCESS_KEY_ID"):
        preprocess(PreprocessConfig(source="minio://datasets/x", output=tmp_path / "out"))


def test_unreachable_endpoint(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "a")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "b")
    with pytest.raises(PreprocessError, match="cannot reach the object store at http://127.0.0.1:9"):
        preprocess(PreprocessConfig(source="s3://datasets/x", output=tmp_path / "out"))


@pytest.mark.parametrize(
    "raw, host, secure",
    [
        ("http://minio-service.kubeflow:9000", "minio-service.kubeflow:9000", False),
        ("https://s3.example.com", "s3.example.com", True),
        ("minio.local:9000", "minio.local:9000", True),  # no scheme: TLS by default
    ],
)
def test_endpoint_parsing(raw, host, secure):
    endpoint = storage.endpoint_from_env(
        {"MINIO_ENDPOINT": raw, "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"}
    )
    assert (endpoint.host, endpoint.secure) == (host, secure)


def test_unknown_scheme_is_refused(tmp_path):
    with pytest.raises(PreprocessError, match="unsupported source 'ftp://x/y'"):
        preprocess(PreprocessConfig(source="ftp://x/y", output=tmp_path / "out"))


def test_odd_object_names_in_a_bucket(s3_env, s3, tmp_path):
    folder = make_image_folder(tmp_path / "images", images_per_class=3)
    for index, path in enumerate(sorted((folder / "dots").glob("*.jpg"))):
        path.rename(path.with_name(f"café #{index} with spaces.jpg"))
    s3.upload_folder(folder, "odd-names", "set")
    manifest = preprocess(
        PreprocessConfig(source="s3://odd-names/set", output=tmp_path / "out", image_size=TINY_SIZE)
    )
    assert manifest["rejected"] == []
    assert (
        manifest["counts"]["train"]["dots"]
        + manifest["counts"]["validation"]["dots"]
        + manifest["counts"]["test"]["dots"]
        == 3
    )


@pytest.fixture
def gcs(monkeypatch):
    from tests.gcs_stand_in import GCSStandIn

    stand_in = GCSStandIn()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", stand_in.url)
    yield stand_in
    stand_in.stop()


def test_gcs_source_contract_with_a_local_json_api_stand_in(gcs, tmp_path):
    folder = make_image_folder(tmp_path / "images", images_per_class=4, broken=True)
    gcs.buckets["photos"] = {
        f"sets/v1/{path.relative_to(folder).as_posix()}": path.read_bytes()
        for path in folder.rglob("*")
        if path.is_file()
    }
    local = preprocess(PreprocessConfig(source=folder, output=tmp_path / "local", image_size=TINY_SIZE))
    remote = preprocess(
        PreprocessConfig(source="gs://photos/sets/v1", output=tmp_path / "gs", image_size=TINY_SIZE)
    )
    assert remote["shards"] == local["shards"]
    assert remote["rejected"] == local["rejected"]
    assert any(
        request.startswith("/storage/v1/b/photos/o?") and "prefix=sets%2Fv1%2F" in request
        for request in gcs.requests
    )


def test_gcs_missing_bucket_and_empty_prefix(gcs, tmp_path):
    with pytest.raises(PreprocessError, match="bucket 'nope' .*does not exist"):
        preprocess(PreprocessConfig(source="gs://nope/x", output=tmp_path / "a"))
    gcs.buckets["empty"] = {}
    with pytest.raises(PreprocessError, match="no objects under gs://empty/x"):
        preprocess(PreprocessConfig(source="gs://empty/x", output=tmp_path / "b"))


def _with_metadata_folders(folder):
    """macOS's zip leftovers and a Synology thumbnail set (real JPEGs) inside a class folder."""
    photo = sorted((folder / "dots").glob("*.jpg"))[0]
    (folder / "__MACOSX" / "dots").mkdir(parents=True)
    (folder / "__MACOSX" / "dots" / f"._{photo.name}").write_bytes(b"\x00\x05\x16\x07resource fork")
    thumbnails = folder / "dots" / "@eaDir" / photo.name
    thumbnails.mkdir(parents=True)
    (thumbnails / "SYNOPHOTO_THUMB_M.jpg").write_bytes(photo.read_bytes())
    return folder


def test_metadata_folders_are_not_classes_or_images_locally_and_in_a_bucket(s3_env, s3, tmp_path):
    plain = make_image_folder(tmp_path / "plain", images_per_class=3)
    folder = _with_metadata_folders(make_image_folder(tmp_path / "images", images_per_class=3))
    s3.upload_folder(folder, "with-metadata", "set")
    expected = preprocess(PreprocessConfig(source=plain, output=tmp_path / "plain-out", image_size=TINY_SIZE))
    for source, output in ((folder, "local-out"), ("s3://with-metadata/set", "s3-out")):
        manifest = preprocess(PreprocessConfig(source=source, output=tmp_path / output, image_size=TINY_SIZE))
        assert manifest["classes"] == expected["classes"]
        assert manifest["totals"] == expected["totals"]
        assert manifest["rejected"] == [] and manifest["duplicates"] == 0
