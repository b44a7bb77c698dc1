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

from components.export import ExportConfig, ExportError, export

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(trained_model, prepared_dataset, tmp_path_factory):
    output = tmp_path_factory.mktemp("export") / "servable"
    info = export(ExportConfig(model=trained_model, data=prepared_dataset, output=output))
    return output, info


def test_export_is_verified_after_reload(exported):
    output, info = exported
    verification = json.loads((output / "export_info.json").read_text())["verification"]
    assert verification == info["verification"]
    assert verification["passed"] and verification["labels_match"]
    assert verification["max_abs_difference"] <= 1e-4
    assert verification["signature_inputs"] == ["image_bytes"]
    assert verification["signature_outputs"] == ["labels", "probabilities"]


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
        samples = list(np.load({str(tmp_path / 'bytes.npy')!r}, allow_pickle=True))
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
    from components.train import load_trained

    model, summary = load_trained(trained_model)
    write_saved_model(model, summary["classes"], summary["image_size"], tmp_path / "padded", "pad")
    image = np.zeros((20, 60, 3), np.uint8)
    image[:, :30] = 255
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    served = tf.saved_model.load(str(tmp_path / "padded")).signatures["serving_default"](
        image_bytes=tf.constant([buffer.getvalue()]))["probabilities"].numpy()
    padded = imaging.resize(tf.constant(image), summary["image_size"], "pad")
    expected = np.asarray(model(tf.cast(padded, tf.float32)[None], training=False))
    np.testing.assert_allclose(served, expected, atol=1e-5)
