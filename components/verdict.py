"""One file's verdict: accepted, as its record's encoded bytes at the training size, or
`Rejected` with a reason a person can act on.

The header is read first (format, size, frame count: `check_header`), so that nothing that
would exhaust memory is ever decoded; then TensorFlow decodes, resizes (`components.imaging`,
the code the exported model runs) and encodes, one graph per chunk of files
(`check_and_resize_many`). What a file is when it is not a usable image (HEIC, a Live Photo's
video, an HTML page, a truncated upload, a JPEG variant TF cannot read, damaged scan data) is
told from its own bytes, and libjpeg's warnings, which it only prints, are captured from
native stderr and pinned on the file they belong to.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import re
import sys
import tempfile
import zlib
from collections.abc import Iterator
from typing import Protocol

from PIL import Image, UnidentifiedImageError

from components import imaging


class ImageRules(Protocol):
    """What a verdict depends on; `PreprocessConfig` is one, and owns the defaults."""

    image_size: int  # px, square
    resize: str  # imaging.RESIZE_POLICIES
    encoding: str  # jpeg or png
    jpeg_quality: int
    max_pixels: int  # width x height (x frames, for a GIF) over this is refused unread
    min_side: int  # px
    allow_damaged: bool  # keep JPEGs that decode only with libjpeg's corruption warnings
    max_decode_mb: int  # refuse a file whose decoding would take more memory; 0 = no limit


class Rejected(Exception):
    """One input file cannot be used; `reason` says why in words."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _tf_message(error) -> str:
    """The decoder's own words, without TF's op, device and traceback decoration around them."""
    lines = [line.strip() for line in (error.message or "").splitlines()]
    lines = [
        line
        for line in lines
        if line
        and not line.startswith(("File ", "Detected at node", "[["))
        and line != "Graph execution error:"
    ]
    message = lines[-1] if lines else type(error).__name__
    message = re.sub(r"^\{\{[^}]*\}\}\s*", "", message)
    return re.sub(r"\s*\[Op:[^\]]*\].*$", "", message)


def check_header(data: bytes, rules: ImageRules) -> tuple[str, int, int]:
    """(format, width, height) from the file's header alone, or `Rejected` before any decoding."""
    if not data:
        raise Rejected("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as header:  # reads the header only, no pixels
            image_format, (width, height) = header.format, header.size
            alpha = header.mode in ALPHA_MODES or "transparency" in header.info
            deep = header.mode.startswith("I")  # 16-bit samples
    except Image.DecompressionBombError as error:
        raise Rejected(f"too many pixels: {error}") from None
    except UnidentifiedImageError:
        raise Rejected(_unidentified(data)) from None
    except OSError as error:
        fmt = _signature(data)
        if fmt and (cut := _cut_short(fmt, data)):
            raise Rejected(f"truncated image data ({fmt}): {cut}") from None
        raise Rejected(f"corrupt or truncated image header: {error}") from None
    if image_format not in imaging.DECODABLE_FORMATS:
        raise Rejected(
            f"unsupported image format {image_format}; accepted: {', '.join(imaging.DECODABLE_FORMATS)}"
        )
    if width * height > rules.max_pixels:
        raise Rejected(f"too many pixels: {width}x{height} is over the cap of {rules.max_pixels}")
    if min(width, height) < rules.min_side:
        raise Rejected(f"too small: {width}x{height}, a side under --min-side {rules.min_side} px")
    frames = 1
    if image_format == "GIF":
        most = rules.max_pixels // (width * height)  # frames that fit under the cap
        frames = _gif_frames(data, stop_after=most + 1)
        if frames > most:
            raise Rejected(
                f"too many pixels: more than {most} frames of {width}x{height}, over the "
                f"cap of {rules.max_pixels} in all (TensorFlow decodes every frame of a "
                "GIF to take the first)"
            )
    if rules.max_decode_mb:
        needed = decode_bytes(image_format, width, height, frames, alpha, deep, rules.image_size)
        if needed > rules.max_decode_mb * 2**20:
            raise Rejected(
                f"too large to decode in the memory a worker has here: {width}x{height} {image_format}"
                f"{' with transparency' if alpha else ''} takes about {needed / 2**20:,.0f} MB, over "
                f"{rules.max_decode_mb:,} MB (--max-decode-mb; the pod's memory limit sets it)"
            )
    return image_format, width, height


# Modes whose decoding carries an alpha channel (composited onto white after resizing).
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# Bytes per pixel at the peak of decode + resize (+ composite), with a margin: measured on a
# 9000x9000 RGBA PNG (bench/decode_memory.py, bench/RESULTS.md): 325 MB for the decode and an
# area resize (4.0 a pixel), 374 MB for the whole path with its bands of float rows (4.6).
ALPHA_BYTES_PER_PIXEL = 6
PLAIN_BYTES_PER_PIXEL = 5


def decode_bytes(
    image_format: str, width: int, height: int, frames: int, alpha: bool, deep: bool, image_size: int
) -> int:
    """About how much memory decoding one file takes at its peak, from its header: what the
    per-worker budget is checked against. A JPEG is decoded at 1/2, 1/4 or 1/8 scale when it is
    far larger than the target (imaging.decode); every frame of a GIF is decoded."""
    pixels = width * height
    if image_format == "JPEG":
        ratio = max(r for r in imaging.JPEG_RATIOS if min(width, height) // r >= image_size or r == 1)
        return pixels // (ratio * ratio) * PLAIN_BYTES_PER_PIXEL
    if image_format == "GIF":
        return pixels * (3 * frames + PLAIN_BYTES_PER_PIXEL)
    per_pixel = ALPHA_BYTES_PER_PIXEL if alpha else PLAIN_BYTES_PER_PIXEL
    return pixels * per_pixel * (2 if deep else 1)


SIGNATURES = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG", b"GIF87a": "GIF", b"GIF89a": "GIF"}
# ISO media brands (bytes 8-12, after "ftyp") of HEIF stills: what iPhones save photos as.
HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1")


def _gif_frames(data: bytes, stop_after: int) -> int:
    """How many frames a GIF holds, from its block structure alone (no decoding), counting no
    further than `stop_after`. A GIF of thousands of frames of one colour is a few hundred KB
    that TF's decoder (giflib's DGifSlurp) expands into every frame's pixels at once."""
    at = 13
    if len(data) > 10 and data[10] & 0x80:  # the global colour table
        at += 3 << ((data[10] & 7) + 1)
    frames = 0
    while at < len(data) and frames < stop_after:
        block = data[at]
        if block == 0x2C:  # an image: its descriptor, a local colour table, the LZW code size
            packed = data[at + 9] if at + 9 < len(data) else 0
            at += 10 + ((3 << ((packed & 7) + 1)) if packed & 0x80 else 0) + 1
            frames += 1
        elif block == 0x21:  # an extension: its label
            at += 2
        else:  # the trailer, or bytes that are no GIF block: TF's decoder will judge the rest
            break
        while at < len(data) and data[at]:  # data sub-blocks, each led by its size
            at += data[at] + 1
        at += 1
    return frames


def _signature(data: bytes) -> str | None:
    """The accepted format a file's first bytes announce, whatever follows them."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:2] == b"BM" and len(data) >= 18 and int.from_bytes(data[14:18], "little") in BMP_HEADER_SIZES:
        return "BMP"
    return next((name for magic, name in SIGNATURES.items() if data.startswith(magic)), None)


BMP_HEADER_SIZES = (12, 40, 52, 56, 64, 108, 124)  # the DIB header versions


def _unidentified(data: bytes) -> str:
    """Why a file Pillow cannot identify is refused, in words that say what to do about it:
    the files found next to photos (iPhone HEIC stills and Live Photo videos, SVG drawings,
    saved web pages, PDFs, archives) and image files whose header is broken are told apart by
    their first bytes."""
    fmt = _signature(data)
    if fmt == "JPEG" and (variant := _jpeg_variant(data)):
        return _unsupported_jpeg(variant, "read from its frame header")
    if fmt:
        return f"corrupt or truncated image header: a {fmt} file whose header cannot be parsed"
    if data[4:8] == b"ftyp":
        if data[8:12] in HEIF_BRANDS:
            return (
                "unsupported image format HEIF (HEIC, as iPhones save photos): TensorFlow, which "
                "the served model decodes with, cannot read it; convert the file to JPEG"
            )
        return "not an image: a video or other ISO media file (MP4, QuickTime: a Live Photo's video?)"
    start = data[:1024].removeprefix(b"\xef\xbb\xbf").lstrip().lower()
    hint = ""
    if start.startswith((b"<html", b"<!doctype html")):
        hint = " (it looks like an HTML page)"
    elif start.startswith((b"<?xml", b"<svg", b"<!--")) and b"<svg" in start:
        hint = " (it looks like an SVG drawing: export it as PNG)"
    elif start.startswith(b"%pdf"):
        hint = " (it looks like a PDF document)"
    elif data.startswith(b"PK\x03\x04"):
        hint = " (it looks like a ZIP archive: extract it into the class folder)"
    return f"not an image: unrecognised file format{hint}"


# SOFn markers (ITU T.81, table B.1) of the frames TF's libjpeg cannot decode.
LOSSLESS_FRAMES = (0xC3, 0xC7, 0xCB, 0xCF)
HIERARCHICAL_FRAMES = (0xC5, 0xC6, 0xC7, 0xCD, 0xCE, 0xCF)


def _jpeg_variant(data: bytes) -> str:
    """The JPEG variant a file declares in its frame header that TF cannot decode (lossless,
    hierarchical, other than 8-bit samples, as medical and scientific cameras write), or ""
    for the 8-bit baseline and progressive JPEGs it reads, and for anything unparseable."""
    at = 2
    while at + 4 < len(data) and data[at] == 0xFF:
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            kinds = ["lossless"] if marker in LOSSLESS_FRAMES else []
            kinds += ["hierarchical"] if marker in HIERARCHICAL_FRAMES else []
            kinds += [f"{data[at + 4]}-bit samples"] if data[at + 4] != 8 else []
            return ", ".join(kinds)
        if marker == 0xDA:  # a scan before any frame header
            return ""
        at += 2 + int.from_bytes(data[at + 2 : at + 4], "big")
    return ""


def _unsupported_jpeg(variant: str, detail: str) -> str:
    return (
        f"unsupported JPEG variant ({variant}): TensorFlow, which the served model decodes with, "
        f"cannot read it ({detail}); converting the file to PNG keeps it"
    )


# TF's BMP reader is its own and reads only some BMP variants (not 1-bit, say). For the other
# formats TF uses the very libraries Pillow does (libjpeg-turbo, libpng, giflib, libwebp), and
# a file that Pillow reads but TF refuses is damaged data Pillow tolerates: a JPEG with garbled
# scan bytes, seen called an "unsupported JPEG variant" when every format was asked.
PARTLY_SUPPORTED_FORMATS = ("BMP",)


def _pillow_decodes(data: bytes) -> bool:
    """Whether Pillow reads every pixel: tells a file of a PARTLY_SUPPORTED_FORMATS variant TF
    cannot decode from a broken one. Only asked after TF has failed, so it costs nothing on
    good files."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
        return True
    except Exception:  # noqa: BLE001 - any failure means "broken" here
        return False


def _digest(pixels) -> str:
    """sha256 of the pixels a record holds, before encoding. The same decoded pixels give the
    same digest whatever the file name, format or metadata, and two files that differ only in
    detail the resize removes would be the same training example anyway. Hashing these rather
    than the full decode costs 0.08 ms instead of 0.46 (427x640 input, bench/RESULTS.md)."""
    return hashlib.sha256(pixels.tobytes()).hexdigest()


def check_and_resize(data: bytes, rules: ImageRules) -> tuple[bytes, str, tuple[int, int]]:
    """Validate one encoded image; return (JPEG bytes at image_size, sha256 of its resized
    pixels, its original (width, height)).

    Raises `Rejected` with a reason a person can act on.
    """
    import tensorflow as tf

    image_format, width, height = check_header(data, rules)
    if image_format == "WEBP" and imaging.is_animated_webp(data):
        data = _first_frame(data)
    run = _decode_resize_encode(rules.image_size, rules.resize, rules.encoding, rules.jpeg_quality)
    failure = None
    with _native_stderr().capture() as printed:
        try:
            # An explicit tensor: handed the bytes, the traced function converts them by a path
            # that costs 0.8 ms on a 1.5 MB photo where this takes 0.14 ms (bench/RESULTS.md).
            pixels, encoded = run(tf.constant(data))
        except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as error:
            failure = error
        except (tf.errors.ResourceExhaustedError, MemoryError) as error:
            # This file's decode did not fit in memory: it is refused, the run goes on.
            raise Rejected(
                f"too large to decode in the memory available ({width}x{height} {image_format}): "
                f"{_tf_message(error) if isinstance(error, tf.errors.OpError) else 'MemoryError'}"
            ) from None
    if failure is not None:
        raise Rejected(_decode_failure(image_format, data, failure)) from None
    damage = [line.strip() for line in printed if line.strip().startswith(DAMAGED_JPEG_WARNINGS)]
    if damage and not rules.allow_damaged:
        raise Rejected(
            f"damaged image data, decodable only with defects ({image_format}): "
            f"{damage[0]}; --allow-damaged keeps such files"
        )
    other = [line for line in printed if line.strip() and line.strip() not in damage]
    if other:  # not ours to judge: pass on whatever else native code printed
        print("\n".join(other), file=sys.stderr)
    return encoded.numpy(), _digest(pixels.numpy()), (width, height)


def _first_frame(data: bytes) -> bytes:
    """An animated WebP's first frame as a lossless PNG (alpha kept, composited by the TF path
    like any other). TF's WebP decoder cannot read animations (imaging.decode), so Pillow's
    libwebp takes the frame out; the served model refuses animated WebPs with a clear error."""
    try:
        with Image.open(io.BytesIO(data)) as animation:
            animation.seek(0)
            frame = animation.convert("RGBA")
    except Exception as error:  # noqa: BLE001 - whatever libwebp says, the file is broken
        raise Rejected(f"corrupt or truncated image data (WEBP, animated): {error}") from None
    buffer = io.BytesIO()
    frame.save(buffer, format="PNG", compress_level=1)  # read back at once: speed over size
    return buffer.getvalue()


def _decode_failure(image_format: str, data: bytes, error) -> str:
    """Why TF could not decode a file whose header is fine, as precisely as the file tells."""
    if image_format == "JPEG" and (variant := _jpeg_variant(data)):
        return _unsupported_jpeg(variant, _tf_message(error))
    if image_format in PARTLY_SUPPORTED_FORMATS and _pillow_decodes(data):
        return (
            f"unsupported {image_format} variant: TensorFlow, which the served model decodes with, "
            f"cannot read it ({_tf_message(error)}); converting the file to PNG keeps it"
        )
    # From the file's structure alone: TF also logs how far libjpeg got, but whether that line
    # is printed depends on TF's log level, and a re-run must give the same manifest.
    if cut := _cut_short(image_format, data):
        return f"truncated image data ({image_format}): {cut}"
    if image_format == "PNG" and (bad := _png_bad_chunk(data)):
        return f"corrupt image data (PNG): {bad}"
    return f"corrupt or truncated image data ({image_format}): {_tf_message(error)}"


PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def _cut_short(image_format: str, data: bytes) -> str:
    """How a file shows it was cut short (an interrupted upload or copy), from the structure its
    format gives it: the size its header declares, the marker it must end with. "" if it does
    not show."""
    declared = 0
    if image_format == "WEBP" and len(data) >= 8:
        declared = int.from_bytes(data[4:8], "little") + 8
    elif image_format == "BMP" and len(data) >= 6:
        declared = int.from_bytes(data[2:6], "little")
    if declared > len(data):
        return f"the header declares {declared:,} bytes and the file has {len(data):,}"
    if image_format == "PNG" and PNG_END not in data[-64:]:
        return "the file ends before the IEND chunk that closes every PNG"
    if image_format == "JPEG" and not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        return "the file ends before the end-of-image marker that closes every JPEG"
    if image_format == "GIF" and not data.rstrip(b"\x00").endswith(b";"):
        return "the file ends before the trailer byte that closes every GIF"
    return ""


def _png_bad_chunk(data: bytes) -> str:
    """The first PNG chunk whose CRC does not match its bytes, or ""."""
    at = 8
    while at + 12 <= len(data):
        length = int.from_bytes(data[at : at + 4], "big")
        kind = data[at + 4 : at + 8]
        body_end = at + 8 + length
        if body_end + 4 > len(data):
            return ""
        if zlib.crc32(data[at + 4 : body_end]) != int.from_bytes(data[body_end : body_end + 4], "big"):
            return f"chunk {kind.decode('latin-1')!r} at byte {at:,} fails its CRC check"
        if kind == b"IEND":
            return ""
        at = body_end + 4
    return ""


Checked = tuple[bytes, str, tuple[int, int]] | Rejected


def check_and_resize_many(datas: list[bytes], rules: ImageRules) -> list[Checked]:
    """`check_and_resize` of each item, a `Rejected` in place of an exception: the same results,
    byte for byte, with the images that pass the header checks decoded in one TF call. Each
    call costs ~0.2 ms of overhead on this project's 2-core machine, a tenth of a 427x640
    photo's whole work (bench/RESULTS.md). When that call fails or native code prints anything,
    the batch is redone one image at a time, so that each error and each libjpeg warning is
    pinned on the file it belongs to."""
    import tensorflow as tf

    results: list[Checked | None] = [None] * len(datas)
    passed: list[tuple[int, tuple[int, int]]] = []
    animations: list[int] = []  # animated WebPs: Pillow takes out their first frame, one by one
    for index, data in enumerate(datas):
        try:
            image_format, width, height = check_header(data, rules)
        except Rejected as rejection:
            results[index] = rejection
            continue
        if image_format == "WEBP" and imaging.is_animated_webp(data):
            animations.append(index)
        else:
            passed.append((index, (width, height)))
    if len(passed) > 1:
        run = _decode_resize_encode_many(rules.image_size, rules.resize, rules.encoding, rules.jpeg_quality)
        with _native_stderr().capture() as printed:
            try:
                pixels, encoded = run(tf.constant([datas[index] for index, _ in passed]))
            except (tf.errors.OpError, MemoryError):  # which file, and why: the one-by-one pass says
                pixels = encoded = None
        if encoded is not None and not any(line.strip() for line in printed):
            pixels, encoded = pixels.numpy(), encoded.numpy()
            for position, (index, size) in enumerate(passed):
                results[index] = (encoded[position], _digest(pixels[position]), size)
            passed = []
    for index in [index for index, _ in passed] + animations:
        try:
            results[index] = check_and_resize(datas[index], rules)
        except Rejected as rejection:
            results[index] = rejection
    return results  # type: ignore[return-value]


# libjpeg's warnings (jerror.h, JWRN_*) for scan data it decoded anyway, filling what it could
# not read with grey or garbage. Benign warnings (an unknown JFIF revision, say) are not here.
DAMAGED_JPEG_WARNINGS = (
    "Corrupt JPEG data",
    "Premature end of JPEG file",
    "Inconsistent progression sequence",
)


class _NativeStderr:
    """Collects what native code writes to file descriptor 2 while a block runs.

    libjpeg reports damaged-but-decodable data only by printing a warning from C, and TF and
    Pillow both return the pixels as if nothing were wrong, so the warning text is the only
    signal there is. One capture file per process, reused for every image."""

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the process)

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[str]]:
        lines: list[str] = []
        sys.stderr.flush()
        saved = os.dup(2)
        fd = self._file.fileno()
        os.dup2(fd, 2)
        try:
            yield lines
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            size = os.fstat(fd).st_size
            if size:
                lines.extend(os.pread(fd, size, 0).decode(errors="replace").splitlines())
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)


@functools.cache
def _native_stderr() -> _NativeStderr:
    return _NativeStderr()


def _decode_resize_encode_one(image_size: int, policy: str, encoding: str, jpeg_quality: int):
    import tensorflow as tf

    def one(data):
        pixels = imaging.decode_and_resize(data, image_size, policy)
        if encoding == "png":
            return pixels, tf.io.encode_png(pixels)
        return pixels, tf.io.encode_jpeg(pixels, quality=jpeg_quality, chroma_downsampling=False)

    return one


@functools.cache
def _decode_resize_encode(image_size: int, policy: str, encoding: str, jpeg_quality: int):
    """The per-image TF work as one graph, traced once: run eagerly, the decoder's dozens of
    small ops (format switch, EXIF parsing) cost more than the decoding itself (measured:
    74 img/s eager against 524 for a plain decode-resize-encode, bench/preprocess.py)."""
    import tensorflow as tf

    one = _decode_resize_encode_one(image_size, policy, encoding, jpeg_quality)
    return tf.function(
        one, input_signature=[tf.TensorSpec([], tf.string)], autograph=False
    ).get_concrete_function()


@functools.cache
def _decode_resize_encode_many(image_size: int, policy: str, encoding: str, jpeg_quality: int):
    """The same graph mapped over a vector of encoded images. One image at a time
    (parallel_iterations=1): memory stays that of one decode, as in the single-image path."""
    import tensorflow as tf

    one = _decode_resize_encode_one(image_size, policy, encoding, jpeg_quality)

    def many(datas):
        return tf.map_fn(
            one,
            datas,
            parallel_iterations=1,
            fn_output_signature=(
                tf.TensorSpec([image_size, image_size, 3], tf.uint8),
                tf.TensorSpec([], tf.string),
            ),
        )

    # Without AutoGraph: the graph has no Python control flow to convert (its branches are
    # explicit tf.cond), and converting it cost every worker process 1.1 s of CPU at start,
    # the work of about 500 photos (bench/RESULTS.md).
    return tf.function(
        many, input_signature=[tf.TensorSpec([None], tf.string)], autograph=False
    ).get_concrete_function()
