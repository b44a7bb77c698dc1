"""export: the SavedModel serves raw image bytes and agrees with the Keras model."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from components.export import SAVED_MODEL, ExportConfig, ExportError, export

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(trained_model, prepared_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    info = export(
        ExportConfig(
            model=trained_model,
            data=prepared_dataset,
            output=root / "servable",
            formats=("litert", "onnx"),
            latency_runs=3,
        )
    )
    return root / "servable" / SAVED_MODEL, info


def test_export_is_verified_after_reload_in_every_format(exported):
    output, info = exported
    verification = json.loads((output / "export_info.json").read_text())["verification"]
    assert verification == info["verification"]
    assert verification["passed"] and verification["labels_match"]
    assert verification["max_abs_difference"] <= 1e-4
    assert verification["signature_inputs"] == ["image_bytes"]
    assert verification["signature_outputs"] == ["labels", "probabilities"]
    for fmt in ("litert", "onnx"):
        assert verification[fmt]["labels_match"] and verification[fmt]["max_abs_difference"] <= 1e-4
    assert (output.parent / "litert" / "model.tflite").is_file()
    assert (output.parent / "onnx" / "model.onnx").is_file()


def test_latency_is_measured_at_batch_1_and_32(exported):
    _, info = exported
    rows = info["verification"]["latency"]["batches"]
    assert [row["batch"] for row in rows] == [1, 32]
    for row in rows:
        assert row["runs"] == 3
        assert 0 < row["p50_ms"] <= row["p95_ms"]
        assert row["p50_ms_per_image"] == pytest.approx(row["p50_ms"] / row["batch"], abs=1e-3)


def test_a_model_capped_under_the_verification_batch_is_verified_in_requests_it_accepts(
    trained_model, prepared_dataset, tmp_path
):
    """--max-images 4: the 64-example verification and the latency batch go in requests of at
    most 4 images (a request of 32 would be refused by the model's own cap)."""
    info = export(
        ExportConfig(
            model=trained_model,
            data=prepared_dataset,
            output=tmp_path / "capped",
            latency_runs=1,
            max_images=4,
        )
    )
    verification = info["verification"]
    assert verification["passed"] and verification["examples"] > 4
    assert [row["batch"] for row in verification["latency"]["batches"]] == [1, 4]
    recorded = json.loads((tmp_path / "capped" / SAVED_MODEL / "export_info.json").read_text())
    assert recorded["max_images_per_request"] == 4


def test_model_card_describes_the_model(exported, prepared_dataset):
    output, info = exported
    card = (output.parent / "model_card.md").read_text()
    manifest = json.loads((prepared_dataset / "manifest.json").read_text())
    assert manifest["fingerprint"] in card
    assert ", ".join(f"`{name}`" for name in info["classes"]) in card
    assert "formats: saved_model, litert, onnx" in card
    assert "CPU latency, batch 32" in card


def test_onnx_file_takes_the_image_alone(exported):
    import onnx

    output, info = exported
    graph = onnx.load(str(output.parent / "onnx" / "model.onnx")).graph
    assert [i.name for i in graph.input] == ["pixels"]
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim][1:] == [
        info["image_size"],
        info["image_size"],
        3,
    ]


def test_saved_model_serves_raw_jpeg_and_png_of_any_size(exported, tmp_path):
    output, info = exported
    samples = []
    for fmt, size, mode in (("JPEG", (120, 80), "RGB"), ("PNG", (17, 45), "RGBA"), ("PNG", (64, 64), "L")):
        buffer = io.BytesIO()
        Image.new(mode, size, 128).save(buffer, format=fmt)
        samples.append(buffer.getvalue())
    np.save(tmp_path / "bytes.npy", np.array(samples, dtype=object), allow_pickle=True)
    # A fresh interpreter with TensorFlow alone: the SavedModel must not need our code.
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np, tensorflow as tf
        sys.modules["components"] = None  # any import of our package would now fail
        model = tf.saved_model.load({str(output)!r})
        samples = list(np.load({str(tmp_path / "bytes.npy")!r}, allow_pickle=True))
        out = model.signatures["serving_default"](image_bytes=tf.constant(samples))
        print(json.dumps({{"shape": list(out["probabilities"].shape),
                          "dtype": out["probabilities"].dtype.name,
                          "sums": out["probabilities"].numpy().sum(axis=1).tolist(),
                          "labels": [l.decode() for l in out["labels"].numpy()]}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    served = json.loads(result.stdout.strip().splitlines()[-1])
    assert served["shape"] == [3, len(info["classes"])]
    assert served["dtype"] == "float32"
    np.testing.assert_allclose(served["sums"], 1.0, rtol=1e-5)
    assert set(served["labels"]) <= set(info["classes"])


def test_the_served_model_refuses_decompression_bombs_before_decoding(exported, tmp_path):
    """Each bomb is refused with the guard's message in a fresh interpreter whose memory stays
    small; an ordinary image in the next request is still served, and the caps are in
    export_info.json. Time and memory per bomb: bench/serving_guard.py."""
    from tests.test_imaging import _gif_of, _png_header

    output, info = exported
    recorded = json.loads((output / "export_info.json").read_text())
    assert (recorded["max_pixels"], recorded["max_images_per_request"]) == (89_478_485, 256)
    ordinary = io.BytesIO()
    Image.new("RGB", (120, 80), 128).save(ordinary, format="JPEG")
    bombs = {
        "png-23000": _png_header(23000, 23000),
        "png-12000": _png_header(12000, 12000),
        "gif": _gif_of(40, 2000),
    }
    np.save(tmp_path / "bombs.npy", np.array(list(bombs.values()), dtype=object), allow_pickle=True)
    script = textwrap.dedent(f"""
        import json, resource
        import numpy as np, tensorflow as tf
        serve = tf.saved_model.load({str(output)!r}).signatures["serving_default"]
        ordinary = tf.constant([{ordinary.getvalue()!r}])
        serve(image_bytes=ordinary)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        answers = []
        for bomb in np.load({str(tmp_path / "bombs.npy")!r}, allow_pickle=True):
            try:
                serve(image_bytes=tf.constant([bomb]))
                answers.append("served")
            except tf.errors.InvalidArgumentError as error:
                answers.append(" ".join(error.message.split()))
        too_many = tf.constant([{ordinary.getvalue()!r}] * 257)
        try:
            serve(image_bytes=too_many)
            answers.append("served")
        except tf.errors.InvalidArgumentError as error:
            answers.append(" ".join(error.message.split()))
        labels = serve(image_bytes=ordinary)["labels"].numpy().tolist()
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(json.dumps({{"answers": answers, "grown_kib": grown, "labels": len(labels)}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    served = json.loads(result.stdout.strip().splitlines()[-1])
    assert all("image refused before decoding" in answer for answer in served["answers"][:3]), served
    assert "more images than the cap of" in served["answers"][3]
    assert served["labels"] == 1
    # Decoding the smallest of them (12000 x 12000 RGBA) would take 550 MB for its pixels alone.
    assert served["grown_kib"] < 200 * 1024, served


def test_export_does_not_promote_over_a_production_it_was_not_evaluated_against(
    exported, trained_model, prepared_dataset, tmp_path, monkeypatch
):
    """Evaluate compared the candidate with version 1; another run made version 2 production
    before this export: the candidate is pushed, production stays at 2, and it says so.
    The tiny model's blessing is not the subject (8 test images): the decision is made
    blessed, everything else is the real evaluate, export and registry."""
    from components import blessing
    from components.evaluate import EvaluateConfig, evaluate
    from components.registry import Registry

    decide = blessing.decide
    monkeypatch.setattr(
        blessing, "decide", lambda *args, **kwargs: decide(*args, **kwargs) | {"blessed": True}
    )

    servable, _ = exported
    root = str(tmp_path / "registry")
    registry = Registry(root, "tiny")
    registry.promote(registry.push(servable.parent, {}))
    evaluation = tmp_path / "evaluation"
    result = evaluate(
        EvaluateConfig(
            model=trained_model, data=prepared_dataset, output=evaluation, registry=root, model_name="tiny"
        )
    )
    assert result["production_seen"] == 1
    registry.promote(registry.push(servable.parent, {}))  # another run, meanwhile
    info = export(
        ExportConfig(
            model=trained_model,
            data=prepared_dataset,
            output=tmp_path / "servable",
            evaluation=evaluation,
            registry=root,
            model_name="tiny",
            latency_runs=1,
        )
    )
    assert info["registry"] == {"uri": root, "model": "tiny", "version": 3, "promoted": False}
    assert registry.production()["version"] == 2


def test_export_without_a_trained_model_is_a_clear_error(prepared_dataset, tmp_path):
    with pytest.raises(ExportError, match="holds no model.keras"):
        export(ExportConfig(model=tmp_path / "missing", data=prepared_dataset, output=tmp_path / "out"))


def test_served_model_applies_exif_orientation_like_training(exported):
    import tensorflow as tf

    output, _ = exported
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (24, 48, 3), dtype=np.uint8))
    exif = image.getexif()
    exif[0x0112] = 6  # stored sideways: "rotate 90 degrees clockwise to display"
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes())
    sideways = buffer.getvalue()
    # The upright pixels computed independently: the raw decode, rotated by numpy.
    upright = np.rot90(tf.io.decode_jpeg(sideways).numpy(), k=-1)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(upright)).save(buffer, format="PNG")

    serve = tf.saved_model.load(str(output)).signatures["serving_default"]
    out = serve(image_bytes=tf.constant([sideways, buffer.getvalue()]))["probabilities"].numpy()
    np.testing.assert_allclose(out[0], out[1], atol=1e-6)


def test_serving_signature_uses_the_datasets_resize_policy(trained_model, tmp_path):
    import tensorflow as tf

    from components import imaging
    from components.export import write_saved_model
    from components.model import load_trained

    model, summary = load_trained(trained_model)
    write_saved_model(model, summary["classes"], summary["image_size"], tmp_path / "padded", "pad")
    image = np.zeros((20, 60, 3), np.uint8)
    image[:, :30] = 255
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    served = (
        tf.saved_model.load(str(tmp_path / "padded"))
        .signatures["serving_default"](image_bytes=tf.constant([buffer.getvalue()]))["probabilities"]
        .numpy()
    )
    padded = imaging.resize(tf.constant(image), summary["image_size"], "pad")
    expected = np.asarray(model(tf.cast(padded, tf.float32)[None], training=False))
    np.testing.assert_allclose(served, expected, atol=1e-5)


def _raw_images() -> dict[str, bytes]:
    """One file of each kind preprocess accepts, with the traps the field notes list."""
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    kinds = {}

    def save(name, image, fmt, **options):
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **options)
        kinds[name] = buffer.getvalue()

    save("rgb.jpg", Image.fromarray(pixels), "JPEG", quality=90)
    alpha = rng.integers(0, 256, (40, 56), dtype=np.uint8)
    save("rgba.png", Image.fromarray(np.dstack([pixels, alpha])), "PNG")
    save("gray.png", Image.fromarray(pixels[..., 0]), "PNG")
    save("gray.jpg", Image.fromarray(pixels[..., 1]), "JPEG")
    save("cmyk.jpg", Image.fromarray(pixels).convert("CMYK"), "JPEG")
    save("palette.gif", Image.fromarray(pixels).convert("P"), "GIF")
    save("photo.bmp", Image.fromarray(pixels), "BMP")
    save("photo.webp", Image.fromarray(pixels), "WEBP", lossless=True)
    save("sixteen-bit.png", Image.fromarray(pixels[..., 0].astype(np.uint16) * 257), "PNG")
    for orientation in (2, 3, 6, 8):  # mirrored, upside down, sideways either way
        exif = Image.Exif()
        exif[0x0112] = orientation
        save(f"exif-{orientation}.jpg", Image.fromarray(pixels[:, :30]), "JPEG", exif=exif.tobytes())
    save("progressive.jpg", Image.fromarray(pixels), "JPEG", progressive=True)
    save("gray-alpha.png", Image.fromarray(np.dstack([pixels[..., 2], alpha]), mode="LA"), "PNG")
    save("palette-transparent.png", Image.fromarray(pixels).convert("P"), "PNG", transparency=0)
    frames = [Image.fromarray(pixels).convert("P"), Image.fromarray(255 - pixels).convert("P")]
    save("animated.gif", frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    save("rgba.webp", Image.fromarray(np.dstack([pixels, alpha])), "WEBP", lossless=True)
    save("rgba.bmp", Image.fromarray(np.dstack([pixels, alpha])), "BMP")
    save("large.jpg", Image.fromarray(rng.integers(0, 256, (600, 900, 3), dtype=np.uint8)), "JPEG")
    return kinds


def test_exported_model_on_raw_bytes_matches_keras_on_the_preprocessed_records(
    exported, trained_model, tmp_path
):
    """No train/serve skew: every kind of raw file, through the SavedModel, gives what the Keras
    model gives on the record preprocess made of that file (PNG records: exact pixels)."""
    import tensorflow as tf

    from components import records
    from components.model import load_trained
    from components.preprocess import PreprocessConfig, preprocess

    output, info = exported
    raw = _raw_images()
    source = tmp_path / "raw"
    for index, (name, data) in enumerate(raw.items()):
        # Every file in every class folder, so each split gets one of each kind.
        for label in ("a", "b"):
            (source / label).mkdir(parents=True, exist_ok=True)
            (source / label / f"{index}-{name}").write_bytes(data)
    prepared = tmp_path / "prepared"
    preprocess(
        PreprocessConfig(
            source=source,
            output=prepared,
            image_size=info["image_size"],
            encoding="png",
            resize=info["resize"],
            min_images_per_class=1,
            validation_fraction=0.0,
            test_fraction=0.0,
        )
    )
    model, _ = load_trained(trained_model)
    serve = tf.saved_model.load(str(output)).signatures["serving_default"]
    dataset = records.load(prepared)
    compared = set()
    for serialized in tf.data.TFRecordDataset(dataset.files("train")):
        example = records.parse_example(serialized)
        name = example["image/source"].numpy().decode().split("/")[-1].split("-", 1)[1]
        if name in compared:
            continue
        record_pixels = tf.io.decode_png(example["image/encoded"], channels=3)
        expected = np.asarray(model(tf.cast(record_pixels, tf.float32)[None], training=False))
        served = serve(image_bytes=tf.constant([raw[name]]))["probabilities"].numpy()
        np.testing.assert_allclose(served, expected, atol=1e-4, err_msg=name)
        compared.add(name)
    assert compared == set(raw)
