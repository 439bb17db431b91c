"""Images from verified bytes: Pillow reads the header lazily, so the declared size is checked against a pixel
limit before a single pixel is decoded (a small file declaring 30000 x 30000 pixels is a decompression bomb).
"""

from __future__ import annotations

import io
import warnings
from typing import TYPE_CHECKING, Literal

from trainguard.provenance.errors import ShardError

if TYPE_CHECKING:
    import numpy as np

ImageMode = Literal["L", "RGB"]
MAX_PIXELS = 4096 * 4096
"""The most pixels one image may declare by default."""
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
"""The Pillow plugins an image member may use; any other format is refused before its plugin parses a byte."""


def decode_image(
    name: str, member: str, data: bytes, *, max_pixels: int = MAX_PIXELS, mode: ImageMode = "RGB"
) -> np.ndarray:
    """The image in `data` as (C, H, W) float32 in [0, 1], C = 1 for `L` and 3 for `RGB`; refuses undecodable
    bytes (`format`) and images declaring more than `max_pixels` pixels (`decode-limit`), naming shard and member."""
    import numpy as np
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise _too_large(name, member, width, height, max_pixels)
            pixels = np.asarray(image.convert(mode), dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        message = f"shard {name}: member {member} is a decompression bomb: {error}"
        raise ShardError(message, shard=name, reason="decode-limit") from None
    except ShardError:
        raise
    except Exception as error:  # Pillow's plugins raise many kinds of error on malformed input; all mean the same
        raise ShardError(
            f"shard {name}: member {member} is not a decodable {'/'.join(IMAGE_FORMATS)} image: {error}",
            shard=name,
            reason="format",
        ) from None
    channels_last = pixels[:, :, None] if pixels.ndim == 2 else pixels
    return channels_last.transpose(2, 0, 1).astype(np.float32) * np.float32(1 / 255)


def _too_large(name: str, member: str, width: int, height: int, max_pixels: int) -> ShardError:
    return ShardError(
        f"shard {name}: member {member} declares {width} x {height} pixels, over the limit of {max_pixels}",
        shard=name,
        reason="decode-limit",
    )
