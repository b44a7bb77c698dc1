"""preprocess: shards, manifest, determinism, and every kind of bad input it must survive."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from components import imaging, pool, records
from components import preprocess as preprocess_module
from components.preprocess import (
    PreprocessConfig,
    PreprocessError,
    preprocess,
)
from tests.conftest import TINY_SIZE, damaged_jpeg, make_image_folder


def run(source: Path, output: Path, **overrides) -> dict:
    return preprocess(PreprocessConfig(source=source, output=output, image_size=TINY_SIZE, **overrides))


def read_all(folder: Path, split: str) -> list[dict]:
    dataset = records.load(folder)
    rows = []
    for serialized in tf.data.TFRecordDataset(dataset.files(split)):
        example = records.parse_example(serialized)
        rows.append({key: value.numpy() for key, value in example.items()})
    return rows


def test_writes_shards_and_manifest_that_match(image_folder, tmp_path):
    manifest = run(image_folder, tmp_path / "out")

    assert manifest["classes"] == ["checkerboard", "dots", "horizontal-stripes", "vertical-stripes"]
    assert sum(manifest["totals"].values()) == 32
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk == manifest
    for split in records.SPLITS:
        rows = read_all(tmp_path / "out", split)
        assert len(rows) == manifest["totals"][split]
        for row in rows:
            image = tf.io.decode_jpeg(row["image/encoded"]).numpy()
            assert image.shape == (TINY_SIZE, TINY_SIZE, 3)
            assert row["image/height"] == row["image/width"] == TINY_SIZE
            name = manifest["classes"][row["image/class/label"]]
            assert row["image/class/text"].decode() == name
            assert row["image/source"].decode().startswith(name + "/")
        per_class = Counter(row["image/class/text"].decode() for row in rows)
        assert {k: v for k, v in manifest["counts"][split].items() if v} == dict(per_class)
    for shard in manifest["shards"]["train"]:
        assert records.sha256_file(tmp_path / "out" / shard["file"]) == shard["sha256"]


def test_split_is_stratified_disjoint_and_deterministic(image_folder, tmp_path):
    first = run(image_folder, tmp_path / "a")
    second = run(image_folder, tmp_path / "b")

    assert first["shards"] == second["shards"]  # byte-identical shards (same sha256)
    sources = {
        split: {row["image/source"] for row in read_all(tmp_path / "a", split)} for split in records.SPLITS
    }
    assert not sources["train"] & sources["test"]
    assert not sources["train"] & sources["validation"]
    assert not sources["validation"] & sources["test"]
    for split in records.SPLITS:
        assert all(count >= 1 for count in first["counts"][split].values()), split


def test_bad_files_are_rejected_with_reasons_and_the_rest_kept(image_folder, tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buffer, format="JPEG")
    (image_folder / "dots" / "truncated.jpg").write_bytes(buffer.getvalue()[:200])
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="JPEG")
    # Cut in the middle of the scan data: the header reads fine, the decoder fails.
    (image_folder / "dots" / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (image_folder / "dots" / "empty.png").write_bytes(b"")
    (image_folder / "dots" / "notes.txt").write_text("not an image\n")
    (image_folder / "dots" / "page.jpg").write_bytes(b"<!DOCTYPE html><html>403</html>")
    Image.new("RGB", (40, 30)).save(image_folder / "dots" / "scan.tiff", format="TIFF")
    (image_folder / "dots" / "damaged.jpg").write_bytes(damaged_jpeg())
    frames = [Image.new("RGB", (40, 30), (200, 10, 10)), Image.new("RGB", (40, 30), (10, 10, 200))]
    frames[0].save(image_folder / "dots" / "animated.webp", save_all=True, append_images=frames[1:])
    Image.new("1", (40, 30)).save(image_folder / "dots" / "one-bit.bmp")

    manifest = run(image_folder, tmp_path / "out")

    reasons = {entry["path"]: entry["reason"] for entry in manifest["rejected"]}
    assert reasons["dots/truncated.jpg"] == (
        "truncated image data (JPEG): the file ends before the end-of-image marker that closes every JPEG"
    )
    assert reasons["dots/cut.jpg"] == reasons["dots/truncated.jpg"]  # cut in the scan data, not the header
    assert reasons["dots/empty.png"] == "empty file (0 bytes)"
    assert reasons["dots/notes.txt"].startswith("not an image")
    assert "HTML" in reasons["dots/page.jpg"]
    assert reasons["dots/scan.tiff"].startswith("unsupported image format TIFF")
    assert reasons["dots/damaged.jpg"].startswith(
        "damaged image data, decodable only with defects (JPEG): Corrupt JPEG data:"
    )
    assert "dots/animated.webp" not in reasons  # its first frame is kept
    # Not "corrupt": a valid file of a variant TF cannot decode is told apart from a broken one.
    assert reasons["dots/one-bit.bmp"].startswith(
        "unsupported BMP variant: TensorFlow, which the served model decodes with, cannot read it"
    )
    assert len(manifest["rejected"]) == 8
    assert sum(manifest["totals"].values()) == 33


def test_damaged_jpeg_is_kept_when_allowed(image_folder, tmp_path, capfd):
    (image_folder / "dots" / "damaged.jpg").write_bytes(damaged_jpeg())
    manifest = run(image_folder, tmp_path / "out", allow_damaged=True)
    assert manifest["rejected"] == []
    assert sum(manifest["totals"].values()) == 33
    # A healthy run leaves stderr as it found it: the capture is undone after each image.
    print("after", file=sys.stderr)
    assert capfd.readouterr().err.endswith("after\n")


def test_too_many_pixels_is_refused_from_the_header(image_folder, tmp_path):
    Image.new("RGB", (400, 300)).save(image_folder / "dots" / "big.png")
    manifest = run(image_folder, tmp_path / "out", max_pixels=100_000)
    assert [r["reason"] for r in manifest["rejected"]] == [
        "too many pixels: 400x300 is over the cap of 100000"
    ]


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_other_colour_modes_become_rgb(image_folder, tmp_path, mode):
    image = Image.new(mode, (50, 40))
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    image.save(image_folder / "dots" / f"odd.{fmt.lower()}", format=fmt)
    manifest = run(image_folder, tmp_path / "out")
    assert manifest["rejected"] == []
    assert sum(manifest["totals"].values()) == 33


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(PreprocessError, match="does not exist"):
        run(tmp_path / "nowhere", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_empty_source_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PreprocessError, match="no class sub-folders"):
        run(tmp_path / "empty", tmp_path / "out")


def test_one_class_is_refused(image_folder, tmp_path):
    source = tmp_path / "one"
    (source / "dots").mkdir(parents=True)
    for path in (image_folder / "dots").iterdir():
        (source / "dots" / path.name).write_bytes(path.read_bytes())
    with pytest.raises(PreprocessError, match=r"only one class \(dots\)"):
        run(source, tmp_path / "out")


def test_class_without_a_valid_image_names_the_class_and_files(image_folder, tmp_path):
    for path in (image_folder / "dots").iterdir():
        path.write_bytes(b"garbage")
    with pytest.raises(
        PreprocessError, match=r"dots: 0 valid[\s\S]*rejected dots/dots-0000.jpg: not an image"
    ):
        run(image_folder, tmp_path / "out")
    assert not (tmp_path / "out").exists(), "no partial output may be left behind"
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


def test_empty_class_folder_is_refused(image_folder, tmp_path):
    (image_folder / "empty-class").mkdir()
    with pytest.raises(PreprocessError, match="no files in .*: empty-class"):
        run(image_folder, tmp_path / "out")


@pytest.mark.parametrize("size", [0, -1, 31])
def test_image_size_below_32_is_refused(image_folder, tmp_path, size):
    with pytest.raises(PreprocessError, match="--image-size must be at least 32"):
        preprocess(PreprocessConfig(source=image_folder, output=tmp_path / "out", image_size=size))


def test_existing_output_is_not_overwritten(image_folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(PreprocessError, match="already exists"):
        run(image_folder, out)
    assert (out / "keep.txt").read_text() == "mine"


def test_cli_reports_one_clear_line_and_exit_code_2(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "components.preprocess",
            "--source",
            str(tmp_path / "missing"),
            "--output",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert f"error: source folder {tmp_path / 'missing'} does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_writes_a_dataset(tmp_path):
    source = make_image_folder(tmp_path / "images", images_per_class=4, broken=True)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "components.preprocess",
            "--source",
            str(source),
            "--output",
            str(tmp_path / "out"),
            "--image-size",
            "48",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["image_size"] == 48
    assert sorted(r["path"] for r in manifest["rejected"]) == [
        "checkerboard/error-page.jpg",
        "dots/broken-truncated.jpg",
        "horizontal-stripes/damaged-scan.jpg",
    ]
    assert np.sum(list(manifest["totals"].values())) == 16


def _split_of_each_source(folder: Path) -> dict[str, str]:
    return {
        row["image/source"].decode(): split for split in records.SPLITS for row in read_all(folder, split)
    }


def test_adding_an_image_moves_at_most_one_other_per_split(image_folder, tmp_path):
    run(image_folder, tmp_path / "a")
    before = _split_of_each_source(tmp_path / "a")
    Image.new("RGB", (32, 32), (1, 2, 3)).save(image_folder / "dots" / "new.png")
    run(image_folder, tmp_path / "b")
    after = _split_of_each_source(tmp_path / "b")
    assert set(after) == set(before) | {"dots/new.png"}
    moved = Counter(before[key] for key in before if after[key] != before[key])
    assert all(n <= 1 for n in moved.values()), moved
    assert all(key.startswith("dots/") for key in before if after[key] != before[key])


def test_exact_duplicates_never_straddle_splits(image_folder, tmp_path):
    originals = sorted((image_folder / "dots").glob("*.jpg"))[:3]
    for index, original in enumerate(originals):
        for copy in range(2):
            (image_folder / "dots" / f"copy-{index}-{copy}.png").write_bytes(original.read_bytes())
        # The same decoded pixels in another format (PNG is lossless). Decoded by TF, as
        # preprocess decodes: Pillow's JPEG decoder rounds some pixels differently.
        pixels = tf.io.decode_jpeg(original.read_bytes()).numpy()
        Image.fromarray(pixels).save(image_folder / "dots" / f"copy-{index}-2.png")
    manifest = run(image_folder, tmp_path / "out")
    assert manifest["duplicates"] == 9
    splits = _split_of_each_source(tmp_path / "out")
    for index, original in enumerate(originals):
        group = {splits[f"dots/{original.name}"]} | {splits[f"dots/copy-{index}-{c}.png"] for c in range(3)}
        assert len(group) == 1, (original.name, group)


def test_worker_processes_give_the_same_output_as_one(tmp_path):
    source = make_image_folder(tmp_path / "images", images_per_class=30, broken=True)  # 123 files
    one = run(source, tmp_path / "one", workers=1)
    many = run(source, tmp_path / "many", workers=2)
    for manifest in (one, many):
        del manifest["config"]  # differs in output and workers, by design
    assert many == one


def test_with_worker_processes_the_parent_never_imports_tensorflow(tmp_path):
    """The parent only routes records to disk; TF's import there (2.7 s of CPU) would delay the
    workers' start. A fresh interpreter: this one has imported TF long ago."""
    source = make_image_folder(tmp_path / "images", images_per_class=30, broken=True)  # 123 files
    script = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from components.preprocess import PreprocessConfig, preprocess\n"
        f"manifest = preprocess(PreprocessConfig(source=Path({str(source)!r}), "
        f"output=Path({str(tmp_path / 'out')!r}), image_size={TINY_SIZE}, workers=2))\n"
        "print(json.dumps({'tensorflow': 'tensorflow' in sys.modules, "
        "'kept': sum(manifest['totals'].values()), 'rejected': len(manifest['rejected'])}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(done.stdout.splitlines()[-1]) == {"tensorflow": False, "kept": 120, "rejected": 3}
    records.load(tmp_path / "out")


def test_outputs_a_reader_can_trust(image_folder, tmp_path):
    (image_folder / "dots" / "junk.jpg").write_bytes(b"junk")
    manifest = run(image_folder, tmp_path / "out")
    out = tmp_path / "out"
    assert json.loads((out / "rejected.json").read_text()) == manifest["rejected"]
    assert manifest["rejected_by_reason"] == {"not an image": 1}
    assert len(manifest["fingerprint"]) == 64
    assert set(manifest["class_weights"]) == set(manifest["classes"])
    assert (out / "_COMPLETE").read_text().strip() == records.sha256_file(out / "manifest.json")
    assert not (out / ".spill").exists()


def test_fingerprint_only_reads_no_image(image_folder, tmp_path):
    for path in (image_folder / "dots").iterdir():
        path.write_bytes(b"garbage")  # would fail preprocessing; the listing alone is fine
    result = subprocess.run(
        [sys.executable, "-m", "components.preprocess", "--source", str(image_folder), "--fingerprint-only"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip()) == 64


def test_too_small_images_are_refused_only_below_min_side(image_folder, tmp_path):
    Image.new("RGB", (1, 50)).save(image_folder / "dots" / "strip.png")
    Image.new("RGB", (8, 8)).save(image_folder / "dots" / "icon.png")
    manifest = run(image_folder, tmp_path / "default")
    assert [r["path"] for r in manifest["rejected"]] == ["dots/strip.png"]
    assert manifest["rejected"][0]["reason"] == "too small: 1x50, a side under --min-side 2 px"
    stricter = run(image_folder, tmp_path / "strict", min_side=16)
    assert sorted(r["path"] for r in stricter["rejected"]) == ["dots/icon.png", "dots/strip.png"]


def test_a_sideways_phone_photo_is_stored_upright(image_folder, tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = 255  # stored landscape: white left half, black right half
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image.save(image_folder / "dots" / "phone.jpg", exif=exif.tobytes(), quality=95)
    run(image_folder, tmp_path / "out")
    rows = [
        row
        for split in records.SPLITS
        for row in read_all(tmp_path / "out", split)
        if row["image/source"] == b"dots/phone.jpg"
    ]
    stored = tf.io.decode_jpeg(rows[0]["image/encoded"]).numpy().astype(int)
    # Upright (portrait, stretched to a square): the white half is now on top.
    assert stored[: TINY_SIZE // 2 - 2].mean() > 200 and stored[TINY_SIZE // 2 + 2 :].mean() < 50


ODD_NAMES = ["café ünïcødé.jpg", "with spaces.jpg", "hash#tag.jpg", "x" * 200 + ".jpg", "日本語.png"]


def test_odd_file_names_survive(image_folder, tmp_path):
    sources = sorted((image_folder / "dots").glob("*.jpg"))
    for name, source in zip(ODD_NAMES, sources, strict=False):
        (image_folder / "dots" / name).write_bytes(source.read_bytes())
        source.unlink()
    manifest = run(image_folder, tmp_path / "out")
    assert manifest["rejected"] == []
    stored = {
        row["image/source"].decode() for split in records.SPLITS for row in read_all(tmp_path / "out", split)
    }
    assert {f"dots/{name}" for name in ODD_NAMES} <= stored
    assert sum(manifest["totals"].values()) == 32


def test_a_file_name_with_a_newline_cannot_forge_log_lines_or_report_headings(image_folder, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    (image_folder / "dots" / "evil\n# Forged heading\nrejected nothing.jpg").write_bytes(b"not an image")
    (image_folder / "dots" / "pipe|and`tick.jpg").write_bytes(b"not an image either")
    manifest = run(image_folder, tmp_path / "out")
    paths = sorted(entry["path"] for entry in manifest["rejected"])
    assert paths == ["dots/evil\\n# Forged heading\\nrejected nothing.jpg", "dots/pipe|and`tick.jpg"]
    report = (tmp_path / "out" / preprocess_module.REPORT).read_text()
    assert not any(line.startswith("# Forged") for line in report.splitlines())
    row = next(line for line in report.splitlines() if line.startswith("| not an image"))
    assert row.count(" | ") == 2  # the "|" in the name did not open a fourth cell
    assert "`` dots/pipe\\|and`tick.jpg ``" in row
    assert not any(record.getMessage().count("\n") for record in caplog.records)


def test_hidden_and_metadata_folders_at_the_top_are_named_when_skipped(image_folder, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    for folder in (".git/objects", "__MACOSX/dots"):
        (image_folder / folder).mkdir(parents=True)
        (image_folder / folder / "a.jpg").write_bytes(
            next((image_folder / "dots").glob("*.jpg")).read_bytes()
        )
    manifest = run(image_folder, tmp_path / "out")
    assert manifest["classes"] == sorted(
        p.name for p in image_folder.iterdir() if not p.name.startswith((".", "_"))
    )
    assert "not read as classes: .git, __MACOSX" in caplog.text


def test_markdown_report_tells_counts_rejections_and_sizes(image_folder, tmp_path):
    (image_folder / "dots" / "junk.jpg").write_bytes(b"junk")
    Image.new("RGB", (300, 600)).save(image_folder / "dots" / "big.png")
    manifest = run(image_folder, tmp_path / "out")
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| dots | " in report and f"| **all** | {manifest['totals']['train']} |" in report
    assert "| not an image | 1 | `dots/junk.jpg` |" in report
    assert manifest["short_side_histogram"]["32-63"] == 32  # the generated 32 px images
    assert manifest["short_side_histogram"]["224-511"] == 1
    assert "| 224-511 | 1 |" in report


def test_png_storage_is_lossless_and_trains_from_the_same_reader(image_folder, tmp_path):
    manifest = run(image_folder, tmp_path / "png", encoding="png")
    assert manifest["encoding"] == "png"
    rows = read_all(tmp_path / "png", "train")
    assert rows[0]["image/format"] == b"png"
    assert rows[0]["image/encoded"].startswith(b"\x89PNG")
    original = (image_folder / rows[0]["image/source"].decode()).read_bytes()
    expected = imaging.decode_and_resize(tf.constant(original), TINY_SIZE).numpy()
    np.testing.assert_array_equal(tf.io.decode_png(rows[0]["image/encoded"]).numpy(), expected)
    images = [image for image, _ in records.read_split(records.load(tmp_path / "png"), "train")]
    assert len(images) == manifest["totals"]["train"]
    assert images[0].shape == (TINY_SIZE, TINY_SIZE, 3)


def _work_that_dies_on_boom(keys: list[str]):
    """A stand-in for a decoder bug that kills its process (module level: the workers import it)."""
    import os

    from components.preprocess import _work

    if any("boom" in key for key in keys):
        os.abort()
    return _work(keys)


def test_a_file_that_kills_its_worker_is_rejected_and_the_run_goes_on(tmp_path):
    """The step's own worker under the pool (tests/test_pool.py tests the pool alone): only the
    file that killed its process is rejected, with that reason, in input order."""
    source = make_image_folder(tmp_path / "images", images_per_class=20)
    keys = sorted(str(path.relative_to(source)) for path in source.rglob("*.jpg"))
    (source / "dots" / "boom.jpg").write_bytes((source / keys[0]).read_bytes())
    keys.insert(25, "dots/boom.jpg")
    chunks = [keys[start : start + 4] for start in range(0, len(keys), 4)]
    config = PreprocessConfig(source=source, output=tmp_path / "out", image_size=TINY_SIZE)
    classes = sorted(path.name for path in source.iterdir())
    results = list(
        pool.map_chunks(
            _work_that_dies_on_boom,
            chunks,
            2,
            preprocess_module._init_worker,
            (str(source), config, classes),
            crashed=preprocess_module._crashed,
        )
    )
    assert [key for key, *_ in results] == keys
    rejected = {key: detail for key, record, detail, _ in results if record is None}
    assert rejected == {
        "dots/boom.jpg": "crashed the image decoder (its process died while decoding this file)"
    }


def test_workers_that_cannot_import_tensorflow_stop_the_step_with_the_cause(tmp_path, monkeypatch):
    """Not every file "crashed the image decoder", one line naming what is missing. The spawned
    workers take this process's sys.path, on which a tensorflow that fails to import comes
    first (this process imported the real one long ago)."""
    broken = tmp_path / "broken-site"
    (broken / "tensorflow").mkdir(parents=True)
    (broken / "tensorflow" / "__init__.py").write_text(
        "raise ImportError('libtensorflow_cc.so.2: cannot open')\n"
    )
    monkeypatch.syspath_prepend(str(broken))
    source = make_image_folder(tmp_path / "images", images_per_class=30)  # 120 files: 2 workers
    with pytest.raises(PreprocessError, match="worker processes cannot start: ImportError: libtensorflow_cc"):
        run(source, tmp_path / "out", workers=2)
    assert not (tmp_path / "out").exists()


def test_in_a_pod_with_a_memory_limit_a_file_too_large_to_decode_is_refused_not_fatal(
    image_folder, tmp_path, monkeypatch, caplog
):
    """Contract test of the cgroup reading (tests/test_pool.py reads real files): with 856 MB
    for one worker, 256 MB is left for a file; a 7000x7000 transparent PNG (about 290 MB to
    decode, resize and composite) is refused by its header, the rest of the run goes on."""
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(pool, "memory_budget", lambda: 856 * 2**20)
    big = io.BytesIO()
    Image.new("RGBA", (7000, 7000), (0, 0, 0, 0)).save(big, format="PNG")
    (image_folder / "dots" / "huge-cutout.png").write_bytes(big.getvalue())
    manifest = run(image_folder, tmp_path / "out")
    assert [entry["path"] for entry in manifest["rejected"]] == ["dots/huge-cutout.png"]
    assert manifest["rejected"][0]["reason"].startswith("too large to decode in the memory a worker has here")
    assert "each worker may decode files of up to about 256 MB" in caplog.text
    assert sum(manifest["totals"].values()) == 32


def test_a_dangling_link_or_a_file_gone_since_the_listing_is_reported_not_fatal(
    image_folder, tmp_path, monkeypatch
):
    (image_folder / "dots" / "link.jpg").symlink_to(tmp_path / "nowhere.jpg")
    vanishing = image_folder / "dots" / "vanishing.jpg"
    vanishing.write_bytes(next((image_folder / "dots").glob("*.jpg")).read_bytes())
    listed = preprocess_module.list_source

    def list_then_delete(source):
        listing = listed(source)
        vanishing.unlink()  # deleted by someone else after the listing, before the read
        return listing

    monkeypatch.setattr(preprocess_module, "list_source", list_then_delete)
    manifest = run(image_folder, tmp_path / "out")
    reasons = {entry["path"]: entry["reason"] for entry in manifest["rejected"]}
    assert reasons == {
        "dots/link.jpg": "unreadable: dots/link.jpg: No such file or directory "
        "(a symbolic link to a missing file)",
        "dots/vanishing.jpg": "unreadable: dots/vanishing.jpg: No such file or directory",
    }
    assert sum(manifest["totals"].values()) == 32


def test_a_class_folder_that_is_a_link_is_read_and_a_link_loop_ends(image_folder, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    (image_folder / "dots").rename(elsewhere)
    (image_folder / "dots").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "loop").symlink_to(elsewhere, target_is_directory=True)  # dots/loop -> dots
    manifest = run(image_folder, tmp_path / "out")
    assert (
        manifest["counts"]["train"]["dots"]
        + manifest["counts"]["validation"]["dots"]
        + manifest["counts"]["test"]["dots"]
        == 8
    )
    assert sum(manifest["totals"].values()) == 32
    assert manifest["rejected"] == []


def test_the_same_image_in_two_classes_is_reported_and_kept(image_folder, tmp_path, caplog):
    dot = sorted((image_folder / "dots").glob("*.jpg"))[0]
    (image_folder / "checkerboard" / "misfiled.jpg").write_bytes(dot.read_bytes())
    (image_folder / "dots" / "copy.jpg").write_bytes(dot.read_bytes())  # same class: no conflict
    manifest = run(image_folder, tmp_path / "out")
    assert manifest["label_conflicts"] == [["checkerboard/misfiled.jpg", "dots/copy.jpg", f"dots/{dot.name}"]]
    assert sum(manifest["totals"].values()) == 34
    assert "identical pixels (contradictory labels)" in caplog.text
    report = (tmp_path / "out" / preprocess_module.REPORT).read_text()
    assert f"`checkerboard/misfiled.jpg` = `dots/copy.jpg` = `dots/{dot.name}`" in report


def test_a_report_without_label_conflicts_has_no_such_section(image_folder, tmp_path):
    manifest = run(image_folder, tmp_path / "out")
    assert manifest["label_conflicts"] == []
    assert "more than one class" not in (tmp_path / "out" / preprocess_module.REPORT).read_text()


@pytest.mark.parametrize("inside", ["out", "dots/out"])
def test_an_output_inside_the_source_is_refused_before_any_work(image_folder, inside):
    with pytest.raises(PreprocessError, match="is inside --source"):
        run(image_folder, image_folder / inside)
    assert not (image_folder / inside).exists()


def test_a_file_too_large_to_be_an_accepted_image_is_refused_unread(image_folder, tmp_path, monkeypatch):
    from components import storage

    huge = image_folder / "dots" / "dataset-backup.zip"
    with huge.open("wb") as handle:  # sparse: 1 GiB listed, nothing on disk
        handle.truncate(1 << 30)
    read = storage.LocalSource.read
    asked: list[str] = []

    def recording_read(self, key):
        asked.append(key)
        return read(self, key)

    monkeypatch.setattr(storage.LocalSource, "read", recording_read)
    manifest = run(image_folder, tmp_path / "out", workers=1)
    (entry,) = manifest["rejected"]
    assert entry["path"] == "dots/dataset-backup.zip"
    assert entry["reason"].startswith("too large: 1,073,741,824 bytes, more than an accepted image")
    assert "dots/dataset-backup.zip" not in asked and len(asked) == 32
    assert manifest["rejected_by_reason"] == {"too large": 1}


def test_file_names_that_are_not_utf8_are_kept_and_shown_escaped(image_folder, tmp_path):
    dots = bytes(image_folder / "dots")
    good = next((image_folder / "dots").glob("*.jpg")).read_bytes()
    with open(dots + b"/caf\xe9.jpg", "wb") as handle:  # Latin-1, as old Windows archives store names
        handle.write(good)
    with open(dots + b"/broken-\xff.jpg", "wb") as handle:
        handle.write(b"not a picture")
    (image_folder / "dots" / "two\nlines.jpg").write_bytes(good)
    manifest = run(image_folder, tmp_path / "out")
    assert sum(manifest["totals"].values()) == 34
    assert manifest["rejected"] == [
        {"path": "dots/broken-\\xff.jpg", "reason": "not an image: unrecognised file format"}
    ]
    sources = {
        row["image/source"].decode() for split in records.SPLITS for row in read_all(tmp_path / "out", split)
    }
    # Escaped as the non-UTF-8 bytes are: a source is one line wherever it is shown.
    assert {"dots/caf\\xe9.jpg", "dots/two\\nlines.jpg"} <= sources
    assert "broken-\\xff.jpg" in (tmp_path / "out" / preprocess_module.REPORT).read_text()


def test_a_class_folder_name_that_is_not_utf8_is_refused_by_name(image_folder, tmp_path):
    (image_folder / "dots").rename(bytes(image_folder).decode("utf-8", "surrogateescape") + "/d\udcf6ts")
    with pytest.raises(
        PreprocessError, match=r"not valid UTF-8 or holding control characters in .*: d\\xf6ts; rename them"
    ):
        run(image_folder, tmp_path / "out")


def test_class_folders_that_differ_only_in_case_spacing_or_unicode_form_are_warned_about(
    image_folder, tmp_path, caplog
):
    for name, source in (
        ("Dots", "dots"),
        ("dots ", "dots"),
        ("caf\u00e9", "checkerboard"),
        ("cafe\u0301", "checkerboard"),
    ):
        (image_folder / name).mkdir()
        for path in sorted((image_folder / source).glob("*.jpg"))[:2]:
            path.rename(image_folder / name / path.name)
    manifest = run(image_folder, tmp_path / "out", min_images_per_class=1)
    assert {"Dots", "dots", "dots ", "caf\u00e9", "cafe\u0301"} <= set(manifest["classes"])
    assert (
        "differ only in case, spacing or Unicode form are separate classes: "
        "'Dots', 'cafe\\u0301', 'caf\\xe9', 'dots', 'dots '"
    ) in caplog.text
