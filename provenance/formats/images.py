"""Images from verified bytes: Pillow reads the header lazily, so the declared size is checked against a pixel
limit before a single pixel is decoded (a small file declaring 30000 x 30000 pixels is a decompression bomb).
"""

from __future__ import annotations

import io
import warnings
from typing import TYPE_CHECKING, Literal

from trainguard.provenance.errors import DecodeLimitError, ShardError, ShardFormatError

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

ImageMode = Literal["L", "LA", "RGB", "RGBA"]
"""Grayscale, grayscale with alpha, colour, colour with alpha: an alpha channel can carry a model's input mask."""
NATIVE_MODES = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}
"""Image modes decoded with their own channels when no mode is asked for."""
MAX_PIXELS = 4096 * 4096
"""The most pixels one image may declare by default."""
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
"""The Pillow plugins an image may use; any other format is refused before its plugin parses a byte."""


def decode_image(
    name: str, where: str, data: bytes, *, max_pixels: int = MAX_PIXELS, mode: ImageMode = "RGB"
) -> np.ndarray:
    """The image in `data` as (C, H, W) float32 in [0, 1], C = 1 for `L`, 2 `LA`, 3 `RGB`, 4 `RGBA`; refuses undecodable
    bytes (`format`) and images declaring more than `max_pixels` pixels (`decode-limit`), naming the shard and
    `where` in it (`member 000001.png`, `column 'image' row 3`)."""
    return image_pixels(name, where, open_image(name, where, data, max_pixels=max_pixels), mode)


def open_image(name: str, where: str, data: bytes, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The image's header, not its pixels: refuses formats other than IMAGE_FORMATS, unreadable headers, and
    images declaring more than `max_pixels` pixels, so a caller can check many headers before decoding any."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        message = f"shard {name}: {where} is a decompression bomb: {error}"
        raise DecodeLimitError(message, shard=name) from None
    except Exception as error:  # Pillow's plugins raise many kinds of error on malformed input; all mean the same
        raise _undecodable(name, where, error) from None
    width, height = image.size
    if width * height > max_pixels:
        raise _too_large(name, where, width, height, max_pixels)
    return image


def image_pixels(name: str, where: str, image: Image.Image, mode: ImageMode | None = None) -> np.ndarray:
    """The decoded pixels as (C, H, W) float32 in [0, 1], converted to `mode` (None: the image's own L, LA, RGB
    or RGBA channels; any other mode as RGB)."""
    import numpy as np

    target = mode or (image.mode if image.mode in NATIVE_MODES else "RGB")
    try:
        pixels = np.asarray(image.convert(target), dtype=np.uint8)
    except Exception as error:  # the header parsed, the pixel data does not
        raise _undecodable(name, where, error) from None
    channels_last = pixels[:, :, None] if pixels.ndim == 2 else pixels
    return channels_last.transpose(2, 0, 1).astype(np.float32) / np.float32(255)


def _undecodable(name: str, where: str, error: Exception) -> ShardError:
    return ShardFormatError(
        f"shard {name}: {where} is not a decodable {'/'.join(IMAGE_FORMATS)} image: {error}",
        shard=name,
    )


def _too_large(name: str, where: str, width: int, height: int, max_pixels: int) -> ShardError:
    return DecodeLimitError(
        f"shard {name}: {where} declares {width} x {height} pixels, over the limit of {max_pixels}",
        shard=name,
    )
