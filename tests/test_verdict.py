"""One file's verdict (components.verdict): what each kind of unusable file is called, from its
own bytes, and the batched path giving what one by one gives."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from components import imaging, verdict
from components.preprocess import PreprocessConfig
from components.verdict import Rejected, check_and_resize, check_and_resize_many
from tests.conftest import TINY_SIZE, damaged_jpeg, make_image_folder
from tests.test_imaging import encode


def test_a_broken_jpeg_that_pillow_tolerates_is_called_corrupt_not_unsupported(tmp_path):
    source = make_image_folder(tmp_path / "images", images_per_class=30, broken=True)
    data = (source / "horizontal-stripes" / "damaged-scan.jpg").read_bytes()
    with pytest.raises(tf.errors.InvalidArgumentError):
        tf.io.decode_jpeg(data)
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # garbled scan bytes that Pillow decodes anyway: still a broken JPEG
    with pytest.raises(Rejected) as rejection:
        check_and_resize(data, PreprocessConfig(source="", output=tmp_path, image_size=TINY_SIZE))
    assert rejection.value.reason.startswith("corrupt or truncated image data (JPEG)")


def _mixed_files() -> list[bytes]:
    rng = np.random.default_rng(3)

    def encoded(image: Image.Image, fmt: str, **options) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **options)
        return buffer.getvalue()

    photo = Image.fromarray(rng.integers(0, 256, (120, 90, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    cut = encoded(Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)), "JPEG")
    return [
        encoded(photo, "JPEG", quality=90),
        encoded(photo.resize((700, 500)), "JPEG"),  # decoded at a reduced scale
        encoded(photo.convert("RGBA"), "PNG"),
        encoded(photo.convert("L"), "PNG"),
        encoded(photo, "JPEG", exif=exif.tobytes()),
        b"",
        b"<!DOCTYPE html><html>403</html>",
        cut[: len(cut) // 2],
        damaged_jpeg(),
        encoded(photo, "TIFF"),
        encoded(photo.resize((1, 40)), "PNG"),
        encoded(photo.resize((64, 64)), "GIF"),
    ]


def _outcome(result):
    return ("rejected", result.reason) if isinstance(result, Rejected) else result


@pytest.mark.parametrize("encoding", ["jpeg", "png"])
def test_many_at_once_gives_what_one_by_one_gives(tmp_path, encoding):
    config = PreprocessConfig(
        source=tmp_path, output=tmp_path / "out", image_size=TINY_SIZE, encoding=encoding
    )
    files = _mixed_files()
    one_by_one = []
    for data in files:
        try:
            one_by_one.append(check_and_resize(data, config))
        except Rejected as rejection:
            one_by_one.append(rejection)
    assert [_outcome(r) for r in check_and_resize_many(files, config)] == [_outcome(r) for r in one_by_one]
    assert sum(isinstance(r, Rejected) for r in one_by_one) == 6  # empty, HTML, cut, damaged, TIFF, 1 px


def test_many_good_files_are_decoded_in_one_call(tmp_path, monkeypatch):
    """The batched path is taken when every file decodes cleanly: nothing falls back to the
    one-by-one path (made to fail here), and the results are still those of one by one."""
    config = PreprocessConfig(source=tmp_path, output=tmp_path / "out", image_size=TINY_SIZE)
    good = _mixed_files()[:5]
    expected = [check_and_resize(data, config) for data in good]

    def not_expected(*_):
        raise AssertionError("fell back to one image at a time")

    monkeypatch.setattr(verdict, "check_and_resize", not_expected)
    assert check_and_resize_many(good, config) == expected


def _jpeg_declaring(frame_marker: int | None = None, precision: int | None = None) -> bytes:
    """A baseline JPEG whose frame header is rewritten to declare another JPEG process or sample
    precision: the bytes by which such a file is recognised (Pillow cannot write the real ones)."""
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    at = data.index(b"\xff\xc0")
    if frame_marker is not None:
        data[at + 1] = frame_marker
    if precision is not None:
        data[at + 4] = precision
    return bytes(data)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (
            b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64),
            "unsupported image format HEIF (HEIC, as iPhones save photos)",
        ),
        (
            b"\x00\x00\x00\x14ftypqt  \x00\x00\x00\x00qt  " + bytes(64),
            "not an image: a video or other ISO media file",
        ),
        (
            b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>',
            "not an image: unrecognised file format (it looks like an SVG drawing: export it as PNG)",
        ),
        (
            b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n",
            "not an image: unrecognised file format (it looks like a PDF document)",
        ),
        (
            b"PK\x03\x04\x14\x00\x00\x00",
            "not an image: unrecognised file format (it looks like a ZIP archive",
        ),
        (
            b"\xef\xbb\xbf  <!DOCTYPE html><html>404</html>",
            "not an image: unrecognised file format (it looks like an HTML page)",
        ),
        (
            b"GIF89a\x0a\x00\x0a\x00\x00\x00\x00;",
            "corrupt or truncated image header: a GIF file whose header",
        ),
        (b"just some text", "not an image: unrecognised file format"),
        (_jpeg_declaring(precision=12), "unsupported JPEG variant (12-bit samples): TensorFlow"),
        (_jpeg_declaring(frame_marker=0xC3), "unsupported JPEG variant (lossless): TensorFlow"),
        (
            _jpeg_declaring(frame_marker=0xC7, precision=16),
            "unsupported JPEG variant (lossless, hierarchical, 16-bit samples)",
        ),
    ],
    ids=[
        "heic",
        "mov",
        "svg",
        "pdf",
        "zip",
        "html-with-bom",
        "gif-without-frames",
        "text",
        "jpeg-12-bit",
        "jpeg-lossless",
        "jpeg-lossless-hierarchical-16-bit",
    ],
)
def test_a_file_that_is_not_a_usable_image_says_what_it_is(data, reason, tmp_path):
    with pytest.raises(Rejected) as rejection:
        check_and_resize(data, PreprocessConfig(source="", output=tmp_path, image_size=TINY_SIZE))
    assert rejection.value.reason.startswith(reason), rejection.value.reason


def test_an_ordinary_jpeg_declares_no_unsupported_variant():
    assert verdict._jpeg_variant(_jpeg_declaring()) == ""
    assert verdict._jpeg_variant(_jpeg_declaring(frame_marker=0xC2)) == ""  # progressive


def _encoded(image_format: str, **options) -> bytes:
    noise = np.random.default_rng(1).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format=image_format, **options)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("image_format", "options", "reason"),
    [
        ("PNG", {}, "truncated image data (PNG): the file ends before the IEND chunk that closes every PNG"),
        (
            "GIF",
            {},
            "truncated image data (GIF): the file ends before the trailer byte that closes every GIF",
        ),
        (
            "WEBP",
            {"quality": 80},
            "truncated image data (WEBP): the header declares {full:,} bytes and the file has {cut:,}",
        ),
        (
            "BMP",
            {},
            "truncated image data (BMP): the header declares {full:,} bytes and the file has {cut:,}",
        ),
        (
            "JPEG",
            {"progressive": True},
            "truncated image data (JPEG): the file ends before the end-of-image marker that closes "
            "every JPEG",
        ),
    ],
)
def test_a_file_cut_short_is_called_truncated_with_the_evidence(image_format, options, reason, tmp_path):
    data = _encoded(image_format, **options)
    cut = int(len(data) * 0.6)
    with pytest.raises(Rejected) as rejection:
        check_and_resize(data[:cut], PreprocessConfig(source="", output=tmp_path, image_size=TINY_SIZE))
    assert rejection.value.reason == reason.format(full=len(data), cut=cut)


def test_a_png_with_damaged_bytes_names_the_chunk_that_fails_its_crc(tmp_path):
    data = bytearray(_encoded("PNG"))
    data[len(data) // 2] ^= 0xFF
    with pytest.raises(Rejected) as rejection:
        check_and_resize(bytes(data), PreprocessConfig(source="", output=tmp_path, image_size=TINY_SIZE))
    assert rejection.value.reason == "corrupt image data (PNG): chunk 'IDAT' at byte 33 fails its CRC check"


def test_an_animated_webp_gives_its_first_frame_alpha_on_white(tmp_path):
    first = Image.new("RGBA", (64, 64), (200, 10, 10, 255))
    first.paste((0, 0, 0, 0), (8, 8, 56, 56))  # a transparent hole: white once composited
    second = Image.new("RGBA", (64, 64), (10, 10, 200, 255))
    buffer = io.BytesIO()
    first.save(buffer, format="WEBP", save_all=True, append_images=[second], lossless=True)
    data = buffer.getvalue()
    assert imaging.is_animated_webp(data) and data[20] & 0x10  # animated, with alpha
    config = PreprocessConfig(source="", output=tmp_path, image_size=TINY_SIZE, encoding="png")
    encoded, _, size = check_and_resize(data, config)
    pixels = tf.io.decode_png(encoded).numpy().astype(int)
    assert size == (64, 64)
    assert np.abs(pixels[6:-6, 6:-6] - [255, 255, 255]).max() == 0
    assert np.abs(pixels[:2, :] - [200, 10, 10]).max() <= 1
    # The batched path gives the same bytes, with still images in the same chunk.
    still = tmp_path / "still.jpg"
    Image.new("RGB", (40, 30), (0, 120, 0)).save(still)
    assert check_and_resize_many([still.read_bytes(), data, still.read_bytes()], config)[1][0] == encoded


def _gif(frames: int, size: int = 100, **options) -> bytes:
    # Frames that differ, so that Pillow does not merge them into one.
    images = [Image.new("RGB", (size, size), (index * 5 % 256, 80, 160)) for index in range(frames)]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], **options)
    return buffer.getvalue()


@pytest.mark.parametrize("options", [{}, {"transparency": 3, "comment": b"x" * 600, "loop": 0}])
@pytest.mark.parametrize("frames", [1, 2, 7, 40])
def test_gif_frames_are_counted_from_the_blocks_as_pillow_counts_them(frames, options):
    data = _gif(frames, **options)
    with Image.open(io.BytesIO(data)) as image:
        assert verdict._gif_frames(data, stop_after=1000) == image.n_frames == frames
    assert verdict._gif_frames(data, stop_after=3) == min(frames, 3)


def test_a_gif_whose_frames_add_up_to_too_many_pixels_is_refused_from_its_blocks(tmp_path):
    config = PreprocessConfig(source="", output=tmp_path, image_size=TINY_SIZE, max_pixels=100_000)
    check_and_resize(_gif(10), config)  # 10 frames of 100x100: at the cap, kept
    with pytest.raises(Rejected) as rejection:
        check_and_resize(_gif(11), config)
    assert rejection.value.reason == (
        "too many pixels: more than 10 frames of 100x100, over the cap of 100000 in all (TensorFlow "
        "decodes every frame of a GIF to take the first)"
    )


def test_a_file_whose_decoding_would_not_fit_the_memory_budget_is_refused_from_its_header(tmp_path):
    """The budget a worker has (from the pod's memory limit) against the file's own header:
    refused before decoding, with the estimate; with no budget, decoded as before."""
    transparent = encode(Image.new("RGBA", (2000, 2000), (0, 0, 0, 0)), "PNG")
    tight = PreprocessConfig(source="", output=tmp_path, image_size=TINY_SIZE, max_decode_mb=20)
    with pytest.raises(
        Rejected, match=r"too large to decode in the memory a worker has here: 2000x2000 PNG with "
    ):
        check_and_resize(transparent, tight)
    check_and_resize(transparent, PreprocessConfig(source="", output=tmp_path, image_size=TINY_SIZE))


def test_the_decode_estimate_follows_what_the_decoder_does():
    # A JPEG far larger than the target is decoded at 1/8 scale inside libjpeg.
    assert verdict.decode_bytes("JPEG", 6000, 4000, 1, False, False, 224) == 6000 * 4000 // 64 * 5
    assert verdict.decode_bytes("JPEG", 6000, 4000, 1, False, False, 4000) == 6000 * 4000 * 5
    # RGBA decodes to 4 bytes a pixel, plus the float bands of the premultiplied resize.
    assert verdict.decode_bytes("PNG", 9000, 9000, 1, True, False, 224) == 81_000_000 * 6
    assert verdict.decode_bytes("PNG", 9000, 9000, 1, False, False, 224) == 81_000_000 * 5
    # Every frame of a GIF is decoded to take the first.
    assert verdict.decode_bytes("GIF", 100, 100, 10, False, False, 224) == 10_000 * (30 + 5)
