"""The shared decoder: upright, 8-bit RGB, alpha composited, whatever the file holds."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageOps

from components import imaging


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def quadrants() -> np.ndarray:
    """An image whose every rotation and mirror image differs from the others."""
    pixels = np.zeros((40, 60, 3), np.uint8)
    pixels[:20, :30], pixels[:20, 30:] = (255, 0, 0), (0, 255, 0)
    pixels[20:, :30], pixels[20:, 30:] = (0, 0, 255), (255, 255, 0)
    return pixels


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow_exif_transpose(orientation):
    image = Image.fromarray(quadrants())
    exif = image.getexif()
    exif[0x0112] = orientation
    data = encode(image, "JPEG", quality=95, exif=exif.tobytes())

    assert int(imaging.exif_orientation(tf.constant(data))) == orientation
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"), dtype=int)
    decoded = imaging.decode(tf.constant(data)).numpy().astype(int)
    assert decoded.shape == expected.shape
    assert np.abs(decoded - expected).mean() < 3  # two JPEG decoders: rounding only


def test_jpeg_without_exif_and_garbage_exif_stay_as_stored():
    plain = encode(Image.fromarray(quadrants()), "JPEG")
    assert int(imaging.exif_orientation(tf.constant(plain))) == 1
    broken = plain[:2] + b"\xff\xe1\x00\x10Exif\x00\x00MM\x00\x2a\xff\xff\xff\xff" + plain[2:]
    assert int(imaging.exif_orientation(tf.constant(broken))) == 1


def test_alpha_is_composited_onto_white():
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[:5, :, 0], rgba[:5, :, 3] = 200, 255  # top half opaque red, bottom fully transparent
    decoded = imaging.decode(tf.constant(encode(Image.fromarray(rgba, "RGBA"), "PNG"))).numpy()
    assert decoded[0, 0].tolist() == [200, 0, 0]
    assert decoded[9, 0].tolist() == [255, 255, 255]


def composited_first(pixels: np.ndarray) -> np.ndarray:
    """Alpha composited onto white at full size, unrounded: the reference for compositing late."""
    colour, alpha = pixels[..., :-1].astype(np.float32), pixels[..., -1:].astype(np.float32) / 255
    return np.repeat(colour * alpha + 255 * (1 - alpha), 3 // colour.shape[-1], axis=-1)


@pytest.mark.parametrize("policy", imaging.RESIZE_POLICIES)
@pytest.mark.parametrize(
    ("height", "width", "channels"), [(300, 200, 4), (64, 64, 2), (37, 1000, 4), (9, 20, 4)]
)
def test_transparency_composited_after_resizing_gives_the_pixels_of_compositing_first(
    monkeypatch, policy, height, width, channels
):
    """Resized premultiplied, a band of rows at a time (a few rows per band here, so that many
    bands are joined), then composited: the full-size float image is never made, and the pixels
    are those of compositing first and resizing the float result, to float rounding (an output
    exactly half-way between two levels may round either way)."""
    monkeypatch.setattr(imaging, "BAND_PIXELS", 3 * width)
    rng = np.random.default_rng(height * width)
    pixels = rng.integers(0, 256, (height, width, channels)).astype(np.uint8)
    pixels[..., -1][rng.random((height, width)) < 0.3] = 0  # fully transparent holes
    for size in (8, 32, 224):  # shrinking, mixed, enlarging
        late = imaging.resize(tf.constant(pixels), size, policy).numpy().astype(int)
        first = imaging.resize(tf.constant(composited_first(pixels)), size, policy).numpy().astype(int)
        assert late.shape == (size, size, 3)
        assert np.abs(late - first).max() <= 1
        assert (late != first).mean() < 0.005


def test_a_gray_image_becomes_rgb_after_resizing_with_the_same_pixels():
    gray = np.random.default_rng(1).integers(0, 256, (50, 70, 1)).astype(np.uint8)
    for size in (16, 128):
        resized = imaging.resize(tf.constant(gray), size).numpy()
        expected = imaging.resize(tf.constant(np.repeat(gray, 3, axis=-1)), size).numpy()
        np.testing.assert_array_equal(resized, expected)


def test_gray_with_alpha_16_bit_palette_cmyk_and_gif_become_rgb():
    gray_alpha = np.stack([np.full((4, 4), 10, np.uint8), np.full((4, 4), 128, np.uint8)], axis=-1)
    cases = {
        "LA": encode(Image.fromarray(gray_alpha, "LA"), "PNG"),
        "I;16": encode(Image.fromarray(np.full((4, 4), 40000, np.uint16)), "PNG"),
        "P": encode(Image.new("P", (4, 4), 3), "PNG"),
        "CMYK": encode(Image.new("CMYK", (4, 4), (0, 0, 0, 0)), "JPEG"),
    }
    frames = [Image.new("RGB", (4, 4), (255, 0, 0)), Image.new("RGB", (4, 4), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    cases["GIF"] = buffer.getvalue()
    decoded = {mode: imaging.decode(tf.constant(data)).numpy() for mode, data in cases.items()}
    assert all(image.shape == (4, 4, 3) and image.dtype == np.uint8 for image in decoded.values())
    assert decoded["LA"][0, 0].tolist() == [132] * 3  # 10 x 128/255 + 255 x 127/255
    assert decoded["I;16"][0, 0].tolist() == [156] * 3  # 40000 / 65535 x 255
    assert decoded["CMYK"][0, 0].tolist() == [255, 255, 255]  # no ink = white
    assert decoded["GIF"][0, 0, 0] > 200 and decoded["GIF"][0, 0, 2] < 50  # first frame: red


def test_resize_to_the_same_size_is_the_identity():
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(imaging.resize(tf.constant(pixels), 32).numpy(), pixels)


def _halves(height: int, width: int) -> np.ndarray:
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = 255  # white left half, black right half
    return pixels


def test_pad_keeps_the_whole_image_and_its_aspect_ratio():
    out = imaging.resize(tf.constant(_halves(20, 40)), 32, "pad").numpy().astype(int)
    assert out.shape == (32, 32, 3)
    # 40 -> 32 wide, 20 -> 16 high, centred: 8 rows of bars above and below.
    assert out[:7].max() == 0 and out[25:].max() == 0
    assert out[12, :14].min() > 240 and out[12, 18:].max() < 15


def test_crop_fills_the_frame_from_the_centre():
    out = imaging.resize(tf.constant(_halves(20, 40)), 32, "crop").numpy().astype(int)
    # 20 -> 32 high, 40 -> 64 wide, centre 32 columns kept: still half white, half black.
    assert out[:, :14].min() > 240 and out[:, 18:].max() < 15


def test_stretch_fills_the_square():
    out = imaging.resize(tf.constant(_halves(20, 40)), 32, "stretch").numpy().astype(int)
    assert out[:, :14].min() > 240 and out[:, 18:].max() < 15


@pytest.mark.parametrize("policy", imaging.RESIZE_POLICIES)
def test_every_policy_is_the_identity_on_a_square_at_size(policy):
    pixels = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(imaging.resize(tf.constant(pixels), 32, policy).numpy(), pixels)


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="resize policy must be one of"):
        imaging.resize(tf.constant(_halves(4, 4)), 32, "squash")


def animated_webp() -> bytes:
    frames = [Image.fromarray(quadrants()), Image.fromarray(255 - quadrants())]
    return encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)


def test_an_animated_webp_is_refused_with_an_error_not_a_crash(tmp_path):
    """TF's own decoder corrupts the heap on it and the process aborts: run in a child process,
    so that a regression fails this test instead of killing the test run."""
    import subprocess
    import sys

    sample = tmp_path / "animated.webp"
    sample.write_bytes(animated_webp())
    assert imaging.is_animated_webp(sample.read_bytes())
    assert not imaging.is_animated_webp(encode(Image.fromarray(quadrants()), "WEBP", lossless=True))
    script = (
        "import tensorflow as tf\n"
        "from components import imaging\n"
        "decode = tf.function(lambda data: imaging.decode_and_resize(data, 32))\n"
        "try:\n"
        f"    decode(tf.constant(open({str(sample)!r}, 'rb').read()))\n"
        "except tf.errors.InvalidArgumentError as error:\n"
        "    print('refused:', imaging.ANIMATED_WEBP in error.message)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "refused: True"
    # A still WebP still decodes (one with alpha is served in test_export).
    still = imaging.decode(tf.constant(encode(Image.fromarray(quadrants()), "WEBP", lossless=True)))
    np.testing.assert_array_equal(still.numpy(), quadrants())


def _header_cases() -> dict[str, bytes]:
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8))
    frames = [Image.new("RGB", (53, 37), (index * 20, 0, 0)) for index in range(6)]
    return {
        "jpeg": encode(photo, "JPEG"),
        "jpeg-progressive": encode(photo, "JPEG", progressive=True),
        "png": encode(photo, "PNG"),
        "png-rgba": encode(photo.convert("RGBA"), "PNG"),
        "bmp": encode(photo, "BMP"),
        "bmp-rgba": encode(photo.convert("RGBA"), "BMP"),
        "webp-lossy": encode(photo, "WEBP", quality=80),
        "webp-lossless": encode(photo, "WEBP", lossless=True),
        "webp-alpha": encode(photo.convert("RGBA"), "WEBP", quality=80),
        "gif": encode(photo, "GIF"),
        "gif-animated": encode(photo, "GIF", save_all=True, append_images=frames),
    }


@pytest.mark.parametrize("name", list(_header_cases()))
def test_the_header_size_in_tf_ops_is_what_pillow_reads(name):
    """The serving guard reads sizes with TF string ops; Pillow (preprocess's guard) is the
    reference for every format the signature accepts."""
    data = _header_cases()[name]
    with Image.open(io.BytesIO(data)) as image:
        expected = (*image.size, getattr(image, "n_frames", 1) if image.format == "GIF" else 1)
    assert tuple(int(value) for value in imaging.header_size(tf.constant(data))) == expected


def _png_header(width: int, height: int) -> bytes:
    """A PNG's signature and IHDR declaring `width` x `height`, and no pixel data: what a
    decompression bomb shows before its few hundred KB of zlib expand into gigabytes."""
    import struct
    import zlib

    body = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + body + struct.pack(">I", zlib.crc32(body))


def _gif_of(frames: int, size: int) -> bytes:
    images = [Image.new("P", (size, size), index % 200) for index in range(frames)]
    return encode(images[0], "GIF", save_all=True, append_images=images[1:])


def test_the_pixel_check_refuses_what_declares_too_many_pixels_before_decoding():
    with pytest.raises(tf.errors.InvalidArgumentError, match="image refused before decoding"):
        imaging.check_pixels(tf.constant(_png_header(23000, 23000)), imaging.MAX_PIXELS)
    imaging.check_pixels(tf.constant(_png_header(9000, 9000)), imaging.MAX_PIXELS)  # 81 MP: under
    bomb = _gif_of(30, 2000)  # 30 frames of 4 MP: 120 MP, each frame decoded
    assert int(imaging.header_size(tf.constant(bomb), max_pixels=10**12)[2]) == 30
    with pytest.raises(tf.errors.InvalidArgumentError, match="image refused before decoding"):
        imaging.check_pixels(tf.constant(bomb), imaging.MAX_PIXELS)
    # Counting stops once the cap is passed: 22 frames of 4 MP fit under 89.5 MP, the 23rd not.
    assert int(imaging.header_size(tf.constant(bomb))[2]) == 23
