"""Decode and resize an encoded image: the one definition that preprocess and serving share.

`preprocess` runs these functions eagerly on every input file before writing shards, and the
exported model runs the very same functions inside its `serving_default` signature, so the
pixels a served model sees are computed exactly as the pixels it was trained on.
"""

from __future__ import annotations

# Formats TensorFlow's `decode_image` reads; checked from the header before any decoding, so
# that a TIFF (which Pillow opens but TF cannot) is rejected in preprocess, not at serving.
DECODABLE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP")


# Transparent pixels are composited onto white: what an image viewer shows, and what product
# photos with cut-out backgrounds are meant to look like. (Dropping alpha would expose
# whatever colour the transparent pixels happen to store, often black.)
ALPHA_BACKGROUND = 255.0


JPEG_RATIOS = (1, 2, 4, 8)  # the reduced-size decodings libjpeg offers


def decode(encoded, target_size: int | None = None):
    """Encoded bytes (scalar string tensor) -> uint8 RGB tensor of shape [H, W, 3], upright.

    Grayscale, palette, 16-bit and CMYK come out as 8-bit RGB; alpha is composited onto white
    (here at full size: `decode_and_resize` composites after resizing, which is what preprocess
    and the served model run); an animated GIF gives its first frame; a JPEG's EXIF
    orientation is applied (phone photos store pixels sideways and say so only in EXIF).

    With `target_size`, a JPEG much larger than the target is decoded at 1/2, 1/4 or 1/8
    scale inside libjpeg (the largest reduction that keeps the short side >= target_size):
    a 12-megapixel photo bound for 224 px then costs a fraction of a full decode.
    """
    image = _to_rgb(decode_channels(encoded, target_size))
    image.set_shape([None, None, 3])
    return image


def decode_channels(encoded, target_size: int | None = None):
    """`decode` without the colour conversion: uint8 [H, W, C], C = 1 (gray), 2 (gray and
    alpha), 3 (RGB) or 4 (RGBA), as the file stores it (palette and 16-bit made 8-bit)."""
    import tensorflow as tf

    is_jpeg = tf.strings.substr(encoded, 0, 3) == b"\xff\xd8\xff"

    def _jpeg():
        # channels=3 also converts CMYK JPEGs to RGB.
        if target_size is None:
            image = tf.io.decode_jpeg(encoded, channels=3)
        else:
            short_side = tf.reduce_min(tf.io.extract_jpeg_shape(encoded)[:2])
            fits = tf.stack([short_side // ratio >= target_size for ratio in JPEG_RATIOS])
            choice = tf.reduce_max(tf.where(fits, tf.range(len(JPEG_RATIOS)), 0))
            image = tf.switch_case(
                choice,
                [
                    lambda ratio=ratio: tf.io.decode_jpeg(encoded, channels=3, ratio=ratio)
                    for ratio in JPEG_RATIOS
                ],
            )
        return _apply_orientation(image, exif_orientation(encoded))

    def _other():
        # TF 2.21's WebP decoder corrupts the heap on an animated WebP (the process aborts:
        # "corrupted size vs. prev_size") and cannot decode one with any channel count: refuse
        # it with an error instead, so that one such upload cannot take a model server down.
        still = tf.debugging.Assert(tf.logical_not(_is_animated_webp(encoded)), [ANIMATED_WEBP])
        with tf.control_dependencies([still]):
            return tf.io.decode_image(encoded, channels=0, dtype=tf.uint8, expand_animations=False)

    image = tf.cond(is_jpeg, _jpeg, _other)
    image.set_shape([None, None, None])
    return image


# No apostrophe: tf.debugging.Assert escapes one in the error text.
ANIMATED_WEBP = "animated WebP: the WebP decoder of TensorFlow cannot read animations; send a still image"


def is_animated_webp(data: bytes) -> bool:
    """The animation flag of a WebP's VP8X header (what `_is_animated_webp` reads in TF ops)."""
    return data[:4] == b"RIFF" and data[8:16] == b"WEBPVP8X" and len(data) > 20 and bool(data[20] & 0x02)


def _is_animated_webp(encoded):
    import tensorflow as tf

    head = tf.strings.substr(encoded, 0, 21)

    def flagged():
        flags = tf.io.decode_raw(tf.strings.substr(head, 20, 1), tf.uint8)[0]
        return tf.logical_and(
            tf.logical_and(
                tf.strings.substr(head, 0, 4) == b"RIFF", tf.strings.substr(head, 8, 8) == b"WEBPVP8X"
            ),
            tf.bitwise.bitwise_and(flags, 2) > 0,
        )

    return tf.cond(tf.strings.length(head) == 21, flagged, lambda: tf.constant(False))


def _to_rgb(image):
    """uint8 [H, W, C] with C in 1..4 -> uint8 RGB, alpha composited onto ALPHA_BACKGROUND."""
    import tensorflow as tf

    channels = tf.shape(image)[-1]
    gray_or_rgb = tf.cond(channels <= 2, lambda: tf.tile(image[..., :1], [1, 1, 3]), lambda: image[..., :3])
    has_alpha = tf.logical_or(tf.equal(channels, 2), tf.equal(channels, 4))

    def _composite():
        alpha = tf.cast(image[..., -1:], tf.float32) / 255.0
        blended = tf.cast(gray_or_rgb, tf.float32) * alpha + ALPHA_BACKGROUND * (1.0 - alpha)
        return tf.cast(tf.round(blended), tf.uint8)

    return tf.cond(has_alpha, _composite, lambda: gray_or_rgb)


def exif_orientation(encoded):
    """The EXIF orientation tag (1..8) of a JPEG, or 1 when there is none or it is unreadable.

    Plain TensorFlow ops, so that the serving signature can run it: find the APP1 "Exif" header
    in the first 64 KiB, read the TIFF byte order and the first IFD, and look for tag 0x0112.
    Every read is clipped to the buffer, and any nonsense result falls back to 1.
    """
    import tensorflow as tf

    def read():
        # The text before the first "Exif\0\0" is as long as the header's offset: one C++
        # substring search, ~20x cheaper than comparing byte windows in TF ops.
        head = tf.strings.substr(encoded, 0, 65536)
        pieces = tf.strings.split(head, sep="Exif\x00\x00", maxsplit=1)
        found = tf.reshape(tf.strings.length(pieces[0]), [1])[: tf.size(pieces) - 1]

        def parse():
            data = tf.cast(tf.io.decode_raw(head, tf.uint8), tf.int32)
            size = tf.shape(data)[0]

            def byte(index):
                return tf.gather(data, tf.clip_by_value(index, 0, size - 1))

            tiff = found[0] + 6
            little = tf.logical_and(byte(tiff) == 0x49, byte(tiff + 1) == 0x49)

            def u16(at):
                return tf.where(little, byte(at) + 256 * byte(at + 1), 256 * byte(at) + byte(at + 1))

            def u32(at):
                return tf.where(little, u16(at) + 65536 * u16(at + 2), 65536 * u16(at) + u16(at + 2))

            ifd = tiff + u32(tiff + 4)
            entries = tf.minimum(u16(ifd), 64)
            starts = ifd + 2 + 12 * tf.range(entries)
            tags = u16(starts)
            hits = tf.where(tags == 0x0112)[:, 0]
            value = tf.cond(
                tf.size(hits) > 0, lambda: u16(tf.gather(starts, hits[0]) + 8), lambda: tf.constant(1)
            )
            return tf.where(tf.logical_and(value >= 1, value <= 8), value, 1)

        return tf.cond(tf.size(found) > 0, parse, lambda: tf.constant(1))

    return tf.cond(tf.strings.length(encoded) > 12, read, lambda: tf.constant(1))


def _apply_orientation(image, orientation):
    """Rotate/flip `image` upright for EXIF `orientation`, as Pillow's `exif_transpose` does."""
    import tensorflow as tf

    def transpose(x):
        return tf.transpose(x, [1, 0, 2])

    branches = [
        lambda: image,  # 1: upright
        lambda: tf.reverse(image, [1]),  # 2: mirrored
        lambda: tf.reverse(image, [0, 1]),  # 3: upside down
        lambda: tf.reverse(image, [0]),  # 4: mirrored upside down
        lambda: transpose(image),  # 5: mirrored, 90 degrees
        lambda: tf.reverse(transpose(image), [1]),  # 6: rotated 90 degrees clockwise
        lambda: tf.reverse(transpose(image), [0, 1]),  # 7: mirrored, 270 degrees
        lambda: tf.reverse(transpose(image), [0]),  # 8: rotated 90 counter-clockwise
    ]
    return tf.switch_case(orientation - 1, branches)


RESIZE_POLICIES = ("stretch", "pad", "crop")
PAD_VALUE = 0  # black bars for "pad", as letterboxing usually is


def resize(image, size: int, policy: str = "stretch"):
    """uint8 [H, W, C] -> uint8 RGB [size, size, 3], for C = 1 (gray), 2 (gray and alpha),
    3 (RGB) or 4 (RGBA): what `decode_channels` gives.

    stretch: scale each axis to `size` (keeps all content, distorts the aspect ratio);
    pad:     scale the long side to `size`, centre, fill the rest with PAD_VALUE;
    crop:    scale the short side to `size`, keep the centre square.
    Area averaging when shrinking, antialiased bilinear otherwise: a large photo shrunk to
    224 px keeps its detail instead of aliasing. Rounded back to uint8 so that resizing a
    square image already at `size` is the identity. Gray becomes RGB after resizing, and alpha
    is composited onto white after resizing too (see `_resize_premultiplied`).
    """
    import tensorflow as tf

    if policy not in RESIZE_POLICIES:
        raise ValueError(f"resize policy must be one of {RESIZE_POLICIES}, got {policy!r}")
    if policy == "stretch":
        target = tf.constant([size, size])
    else:
        shape = tf.cast(tf.shape(image)[:2], tf.float32)
        side = tf.reduce_max(shape) if policy == "pad" else tf.reduce_min(shape)
        target = tf.maximum(tf.cast(tf.round(shape * (size / side)), tf.int32), 1)
    # Shrinking: area averaging, a box filter over each output pixel's footprint. It keeps a
    # large photo's detail instead of aliasing, at 0.86 ms for 427x640 -> 224 px where
    # antialiased bilinear takes 2.1 ms (one core, bench/preprocess.py). Enlarging (or one
    # axis each way): antialiased bilinear, where area averaging would give blocky pixels.
    shrinking = tf.reduce_all(target <= tf.shape(image)[:2])

    def scaled(pixels, to):
        return tf.cond(
            shrinking,
            lambda: tf.image.resize(pixels, to, method="area"),
            lambda: tf.image.resize(pixels, to, method="bilinear", antialias=True),
        )

    channels = tf.shape(image)[-1]
    resized = tf.cond(
        tf.logical_or(tf.equal(channels, 2), tf.equal(channels, 4)),
        lambda: _resize_premultiplied(image, target, scaled),
        lambda: scaled(image, target),
    )
    resized = tf.cast(tf.round(tf.clip_by_value(resized, 0.0, 255.0)), tf.uint8)
    resized = tf.cond(
        tf.shape(resized)[-1] == 1, lambda: tf.tile(resized, [1, 1, 3]), lambda: resized[..., :3]
    )
    if policy == "pad":
        offset = (size - target) // 2
        resized = tf.pad(
            resized,
            [[offset[0], size - target[0] - offset[0]], [offset[1], size - target[1] - offset[1]], [0, 0]],
            constant_values=PAD_VALUE,
        )
    elif policy == "crop":
        offset = (target - size) // 2
        resized = resized[offset[0] : offset[0] + size, offset[1] : offset[1] + size]
    return tf.ensure_shape(resized, [size, size, 3])


# Rows of a transparent image made float at a time: about 4 MiB of float32 RGBA per band.
BAND_PIXELS = 2**18


def _resize_premultiplied(image, target, scaled):
    """uint8 [H, W, C+1] (colour then alpha) -> float32 [h, w, C], composited onto white.

    Compositing is affine in premultiplied colour (colour x alpha) and alpha, and both resize
    filters are linear with weights summing to 1, so resizing the premultiplied image and
    compositing the small result gives the pixels of compositing first, without ever holding
    the full-size image in float32 (16 bytes a pixel: 1.3 GB for a 9000 x 9000 PNG, where its
    decoded bytes are 324 MB). Both filters are separable: rows are premultiplied and resized
    across a band at a time, and the narrow result is then resized down its columns."""
    import tensorflow as tf

    height, width = tf.shape(image)[0], tf.shape(image)[1]
    rows = tf.maximum(BAND_PIXELS // width, 1)
    bands = (height + rows - 1) // rows

    def across(index, done):
        band = tf.cast(image[index * rows : (index + 1) * rows], tf.float32)
        alpha = band[..., -1:] / 255.0
        premultiplied = tf.concat([band[..., :-1] * alpha, alpha], axis=-1)
        return index + 1, done.write(index, scaled(premultiplied, [tf.shape(band)[0], target[1]]))

    _, done = tf.while_loop(
        lambda index, _: index < bands,
        across,
        [
            tf.constant(0),
            tf.TensorArray(tf.float32, size=bands, infer_shape=False, element_shape=[None, None, None]),
        ],
    )
    resized = scaled(done.concat(), target)
    return resized[..., :-1] + ALPHA_BACKGROUND * (1.0 - resized[..., -1:])


def decode_and_resize(encoded, size: int, policy: str = "stretch"):
    return resize(decode_channels(encoded, target_size=size), size, policy)


# Pillow's decompression-bomb threshold: a 218 KB PNG can decode to 675 MB. Preprocess refuses
# more (PreprocessConfig.max_pixels) and the served model does too (ExportConfig.max_pixels).
MAX_PIXELS = 89_478_485


def header_size(encoded, max_pixels: int = MAX_PIXELS):
    """(width, height, frames) of an encoded image from its header alone, in TensorFlow ops, so
    that the serving signature can refuse a decompression bomb before decoding it: JPEG (its
    SOF), PNG (IHDR), BMP (the DIB header), WebP (VP8, VP8L or VP8X) and GIF (the logical
    screen, and its image blocks counted without decoding, only as far as it takes to exceed
    `max_pixels`). (0, 0, 1)
    for anything else, which the decoder then refuses on its own. int64 scalars."""
    import tensorflow as tf

    head = tf.cast(
        tf.io.decode_raw(tf.strings.substr(tf.strings.join([encoded, "\0" * 32]), 0, 32), tf.uint8), tf.int64
    )

    def le(at, width):
        return tf.add_n([head[at + i] * (256**i) for i in range(width)])

    def be(at, width):
        return tf.add_n([head[at + i] * (256 ** (width - 1 - i)) for i in range(width)])

    def signed32(value):
        return tf.where(value >= 2**31, 2**32 - value, value)  # |two's complement|: BMP heights

    def starts(magic: bytes, at: int = 0):
        return tf.strings.substr(encoded, at, len(magic)) == magic

    one = tf.constant(1, tf.int64)

    def jpeg():
        shape = tf.cast(tf.io.extract_jpeg_shape(encoded), tf.int64)
        return shape[1], shape[0], one

    def png():
        return be(16, 4), be(20, 4), one

    def bmp():
        core = le(14, 4) == 12  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        return (
            tf.where(core, le(18, 2), signed32(le(18, 4))),
            tf.where(core, le(20, 2), signed32(le(22, 4))),
            one,
        )

    def webp():
        vp8x, vp8l = starts(b"VP8X", 12), starts(b"VP8L", 12)
        bits = le(21, 4)
        width = tf.where(vp8x, le(24, 3) + 1, tf.where(vp8l, bits % 16384 + 1, le(26, 2) % 16384))
        height = tf.where(vp8x, le(27, 3) + 1, tf.where(vp8l, bits // 16384 % 16384 + 1, le(28, 2) % 16384))
        return width, height, one

    def gif():
        width, height = le(6, 2), le(8, 2)
        return width, height, gif_frames(encoded, max_pixels // tf.maximum(width * height, 1) + 1)

    def other():
        return tf.constant(0, tf.int64), tf.constant(0, tf.int64), one

    return tf.case(
        [
            (starts(b"\xff\xd8\xff"), jpeg),
            (starts(b"\x89PNG\r\n\x1a\n"), png),
            (tf.logical_or(starts(b"GIF87a"), starts(b"GIF89a")), gif),
            (tf.logical_and(starts(b"RIFF"), starts(b"WEBP", 8)), webp),
            (starts(b"BM"), bmp),
        ],
        default=other,
        exclusive=True,
    )


def gif_frames(encoded, stop_after):
    """Image blocks in a GIF, from its block structure alone, counting no further than
    `stop_after`: what `verdict` counts in Python, as TF ops. TensorFlow's decoder expands every
    frame to take the first, so a few hundred KB of one-colour frames is a memory bomb."""
    import tensorflow as tf

    data = tf.cast(tf.io.decode_raw(encoded, tf.uint8), tf.int64)
    size = tf.size(data, out_type=tf.int64)

    def byte(at):
        at = tf.cast(at, tf.int64)
        return tf.where(
            at < size, tf.gather(data, tf.minimum(at, tf.maximum(size - 1, 0))), tf.constant(0, tf.int64)
        )

    def skip_sub_blocks(at):
        at = tf.while_loop(
            lambda at: tf.logical_and(at < size, byte(at) > 0), lambda at: [at + byte(at) + 1], [at]
        )
        return at[0] + 1 if isinstance(at, list) else at + 1

    def step(at, frames, done):
        block = byte(at)

        def image():
            packed = byte(at + 9)
            table = tf.where(
                packed >= 128, 3 * tf.bitwise.left_shift(tf.constant(2, tf.int64), packed % 8), 0
            )
            return skip_sub_blocks(at + 10 + table + 1), frames + 1, done

        def extension():
            return skip_sub_blocks(at + 2), frames, done

        def end():
            return at, frames, tf.constant(True)

        return tf.case([(block == 0x2C, image), (block == 0x21, extension)], default=end, exclusive=True)

    screen = byte(10)
    start = 13 + tf.where(screen >= 128, 3 * tf.bitwise.left_shift(tf.constant(2, tf.int64), screen % 8), 0)
    _, frames, _ = tf.while_loop(
        lambda at, frames, done: tf.logical_and(
            tf.logical_and(at < size, frames < stop_after), tf.logical_not(done)
        ),
        step,
        [start, tf.constant(0, tf.int64), tf.constant(False)],
    )
    return frames


def check_pixels(encoded, max_pixels: int):
    """An op that fails (InvalidArgumentError) when the image's header declares more than
    `max_pixels` pixels (width x height x frames), before anything is decoded."""
    import tensorflow as tf

    width, height, frames = header_size(encoded, max_pixels)
    total = width * height * frames
    return tf.debugging.Assert(
        total <= max_pixels,
        [
            "image refused before decoding: width, height and frames (GIF) multiply to more than the cap of",
            max_pixels,
            "pixels:",
            width,
            height,
            frames,
        ],
        summarize=8,
    )
