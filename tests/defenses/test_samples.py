"""Checks on decoded samples: each kind of bad shard gets its own check and a reason saying where; good ones pass."""

from __future__ import annotations

import numpy as np
import pytest

from trainguard.defenses.samples import SampleSchema, validate_samples
from trainguard.provenance.formats import Samples

SCHEMA = SampleSchema(shape=(1, 8, 8), channels=1)


@pytest.fixture(scope="module")
def digits() -> Samples:
    """The first 50 digits as (N, 1, 8, 8) float32 images in [0, 1] with their labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images[:50, None] / 16).astype(np.float32)
    return Samples(images, bunch.target[:50].astype(np.int64))


def test_well_formed_digit_samples_pass(digits: Samples) -> None:
    verdict = validate_samples("part-0.tar", digits, SCHEMA, source="alice")
    assert (verdict.accepted, verdict.check, verdict.source) == (True, "", "alice")


def test_digits_decoded_from_a_webdataset_tar_pass() -> None:
    import io
    import tarfile

    from PIL import Image
    from sklearn.datasets import load_digits

    from trainguard.provenance.formats.webdataset import WebDatasetDecoder

    bunch = load_digits()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for row in range(10):
            image = io.BytesIO()
            Image.fromarray((bunch.images[row] * 255 / 16).astype(np.uint8)).save(image, "PNG")
            for suffix, data in (("png", image.getvalue()), ("cls", str(bunch.target[row]).encode())):
                info = tarfile.TarInfo(f"{row:06d}.{suffix}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    samples = WebDatasetDecoder(mode="L")("part-0.tar", buffer.getvalue())
    assert validate_samples("part-0.tar", samples, SCHEMA).accepted


def bad(digits: Samples, kind: str) -> Samples:
    inputs, targets = digits.inputs.copy(), digits.targets.copy()
    if kind == "shape":
        return Samples(np.repeat(inputs, 3, axis=1), targets)
    if kind == "dtype":
        return Samples(inputs.astype(np.float64), targets)
    if kind == "finite":
        inputs[7, 0, 3, 3] = np.nan
        inputs[9, 0, 0, 0] = np.inf
        return Samples(inputs, targets)
    if kind == "range":
        inputs[4, 0, 2, 2] = 1.5
        return Samples(inputs, targets)
    if kind == "labels":
        targets[[11, 12]] = [10, 42]
        return Samples(inputs, targets)
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("shape", "inputs of shape (3, 8, 8) per sample, expected (1, 8, 8)"),
        ("dtype", "inputs are float64, expected float32"),
        ("finite", "2 of 50 samples with NaN or infinite values (first at 7, 9)"),
        ("range", "1 of 50 samples outside [0, 1] (values in [0, 1.5]) (first at 4)"),
        ("labels", "2 of 50 samples with labels not in the allowed set (10, 42) (first at 11, 12)"),
    ],
)
def test_each_kind_of_bad_shard_is_quarantined_with_its_reason(digits: Samples, kind: str, says: str) -> None:
    verdict = validate_samples("part-3.tar", bad(digits, kind), SCHEMA, source="mallory")
    assert (verdict.accepted, verdict.check) == (False, kind)
    assert verdict.reason == f"shard part-3.tar from mallory: {kind} check failed: {says}"


def test_a_channel_count_alone_refuses_rgb_where_grey_is_expected(digits: Samples) -> None:
    verdict = validate_samples("s", bad(digits, "shape"), SampleSchema(channels=1))
    assert "inputs of 3 channels (shape (3, 8, 8) per sample), expected 1" in verdict.reason


def test_the_first_failed_check_in_order_is_the_one_reported(digits: Samples) -> None:
    both = Samples(bad(digits, "range").inputs, bad(digits, "labels").targets)
    assert validate_samples("s", both, SCHEMA).check == "range"


def test_multi_label_targets_pass_when_labels_are_not_checked(digits: Samples) -> None:
    multi = Samples(digits.inputs, np.eye(10, dtype=np.float32)[digits.targets])
    assert not validate_samples("s", multi, SCHEMA).accepted
    assert validate_samples("s", multi, SampleSchema(shape=(1, 8, 8), allowed_labels=None)).accepted


def test_an_empty_shard_is_quarantined(digits: Samples) -> None:
    empty = Samples(digits.inputs[:0], digits.targets[:0])
    verdict = validate_samples("s", empty, SCHEMA)
    assert (verdict.check, verdict.reason) == ("shape", "shard s: shape check failed: holds no samples")


def test_real_targets_are_checked_against_their_declared_shape_and_range(digits: Samples) -> None:
    """Regression and multi-label shards: targets of the declared per-sample shape, finite, within the range."""
    real = SampleSchema(shape=(1, 8, 8), allowed_labels=None, target_shape=(2,), target_min=0.0, target_max=1.0)
    targets = np.full((len(digits), 2), 0.5, np.float32)
    assert validate_samples("s", Samples(digits.inputs, targets), real).accepted
    verdict = validate_samples("s", Samples(digits.inputs, targets[:, 0]), real)
    assert verdict.check == "targets" and "expected (2,)" in verdict.reason
    targets[[3, 7], 1] = [1.5, np.nan]
    verdict = validate_samples("s", Samples(digits.inputs, targets), real)
    assert verdict.check == "targets" and "2 of 50 samples" in verdict.reason and "(first at 3, 7)" in verdict.reason
