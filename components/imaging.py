"""Decode and resize an encoded image: the one definition that preprocess and serving share.

`preprocess` runs these functions eagerly on every input file before writing shards, and the
exported model runs the very same functions inside its `serving_default` signature, so the
pixels a served model sees are computed exactly as the pixels it was trained on.
"""

from __future__ import annotations

# Formats TensorFlow's `decode_image` reads; checked from the header before any decoding, so
# that a TIFF (which Pillow opens but TF cannot) is rejected in preprocess, not at serving.
DECODABLE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP")


def decode(encoded):
    """Encoded bytes (scalar string tensor) -> uint8 RGB tensor of shape [H, W, 3].

    Grayscale, palette, RGBA and CMYK come out as 3-channel RGB; an animated GIF gives its
    first frame.
    """
    import tensorflow as tf

    image = tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def resize(image, size: int):
    """uint8 [H, W, 3] -> uint8 [size, size, 3], stretched to a square.

    Antialiased bilinear: a large photo shrunk to 224 px keeps its detail instead of aliasing.
    Rounded back to uint8 so that resizing an image already at `size` is the identity.
    """
    import tensorflow as tf

    resized = tf.image.resize(image, [size, size], method="bilinear", antialias=True)
    return tf.cast(tf.round(tf.clip_by_value(resized, 0.0, 255.0)), tf.uint8)


def decode_and_resize(encoded, size: int):
    return resize(decode(encoded), size)
