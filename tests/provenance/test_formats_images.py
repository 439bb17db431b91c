"""Images from verified bytes: decoded to (C, H, W) floats in [0, 1]; bombs and undecodable bytes refused."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from trainguard.provenance.errors import ShardError
from trainguard.provenance.formats.images import decode_image


def encoded(pixels: np.ndarray, kind: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, kind, **options)
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A PNG of a few dozen bytes whose header declares `width` x `height` RGB pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


RGB = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)


def test_an_rgb_png_decodes_to_three_channels_by_height_by_width_in_unit_range() -> None:
    image = decode_image("s.tar", "member 000001.png", encoded(RGB))
    assert image.shape == (3, 6, 5)
    assert image.dtype == np.float32
    np.testing.assert_allclose(image, RGB.transpose(2, 0, 1) / 255, atol=1e-6)


def test_mode_l_decodes_to_one_channel_whatever_the_stored_mode() -> None:
    image = decode_image("s.tar", "member 000001.png", encoded(RGB), mode="L")
    expected = np.asarray(Image.fromarray(RGB).convert("L"))
    assert image.shape == (1, 6, 5)
    np.testing.assert_allclose(image[0], expected / 255, atol=1e-6)


@pytest.mark.parametrize(("kind", "options"), [("JPEG", {"quality": 95}), ("WEBP", {"lossless": True})])
def test_jpeg_and_webp_members_decode_too(kind: str, options: dict[str, object]) -> None:
    image = decode_image("s.tar", "member 000001.img", encoded(RGB, kind, **options))
    assert image.shape == (3, 6, 5)
    assert 0.0 <= image.min() <= image.max() <= 1.0


def test_a_small_png_declaring_30000_by_30000_pixels_is_refused_as_a_decompression_bomb() -> None:
    bomb = png_declaring(30000, 30000)
    assert len(bomb) < 100
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ShardError) as caught:
            decode_image("s.tar", "member 000003.png", bomb)
    assert (caught.value.reason, caught.value.shard) == ("decode-limit", "s.tar")
    assert "000003.png" in str(caught.value)


def test_an_image_over_the_pixel_limit_is_refused_before_it_is_decoded() -> None:
    with pytest.raises(ShardError) as caught:
        decode_image("s.tar", "member 000004.png", png_declaring(100, 100), max_pixels=64 * 64)
    assert caught.value.reason == "decode-limit"
    assert "000004.png declares 100 x 100 pixels, over the limit of 4096" in str(caught.value)


@pytest.mark.parametrize(
    "data",
    [
        b"not an image at all",
        encoded(RGB)[:60],
        encoded(RGB, "GIF"),
        encoded(RGB, "BMP"),
    ],
    ids=["text", "truncated-png", "gif-not-allowed", "bmp-not-allowed"],
)
def test_undecodable_or_unlisted_image_formats_are_refused_naming_shard_and_member(data: bytes) -> None:
    with pytest.raises(ShardError) as caught:
        decode_image("s.tar", "member 000005.png", data)
    assert (caught.value.reason, caught.value.shard) == ("format", "s.tar")
    assert "shard s.tar: member 000005.png is not a decodable" in str(caught.value)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 120))
def test_any_corruption_of_a_png_decodes_or_is_refused_with_a_shard_error(noise: bytes, at: int) -> None:
    original = encoded(RGB)
    data = original[:at] + noise + original[at + len(noise) :]
    try:
        image = decode_image("s.tar", "member m.png", data, max_pixels=10_000)
    except ShardError as error:
        assert error.reason in ("format", "decode-limit")
    else:
        assert image.dtype == np.float32
        assert 0.0 <= image.min() <= image.max() <= 1.0
