"""NumPy shards: `.npz` inputs of any shape with their targets and `.npy` tables, decoded from verified bytes with
every header checked (members, dtype, signed records, decode limits) before any data is read; never unpickled."""

from __future__ import annotations

import io
import tracemalloc
import zipfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainguard.provenance import ShardError, ShardReader, open_manifest
from trainguard.provenance.formats import DecodeBound, Samples, default_decoders
from trainguard.provenance.formats.arrays import NpyDecoder, NpzDecoder


def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (bunch.images[:100] / 16.0).astype(np.float32)[:, None], bunch.target[:100].astype(np.int64)


def npz(**arrays: np.ndarray) -> bytes:
    stream = io.BytesIO()
    np.savez(stream, **arrays)
    return stream.getvalue()


def signed_reader(
    root: Path, key_pairs: Any, signer: Any, records: Callable[[Any], int | None] | None = None, **options: Any
) -> ShardReader:
    """A reader over every file in `root`, signed by alice (with `records` rewritten per shard when given)."""
    manifest = signer(root, key_pairs.alice, root.parent / "m.json")
    if records is not None:
        from trainguard.provenance import PAYLOAD_TYPE, sign_envelope, write_manifest
        from trainguard.provenance.manifest import parse_statement, statement_bytes
        from trainguard.provenance.verify import read_envelope

        signed = parse_statement(read_envelope(manifest)[1].payload)
        shards = tuple(replace(s, records=records(s)) for s in signed.shards)
        envelope = sign_envelope(PAYLOAD_TYPE, statement_bytes(replace(signed, shards=shards)), key_pairs.alice)
        write_manifest(envelope, manifest)
    return ShardReader(open_manifest(manifest, key_pairs.trust("alice"), data_dir=root), **options)


def shards(tmp_path: Path, **files: bytes) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    for name, data in files.items():
        (root / name.replace("__", ".")).write_bytes(data)
    return root


def test_an_npz_of_images_decodes_to_n_c_h_w_inputs_and_their_labels(
    tmp_path: Path, key_pairs: Any, signer: Any
) -> None:
    images, labels = digits()
    root = shards(tmp_path, digits__npz=npz(inputs=images, targets=labels))
    reader = signed_reader(root, key_pairs, signer, records=lambda s: 100)
    samples = reader.read_samples("digits.npz", default_decoders())
    assert samples.inputs.shape == (100, 1, 8, 8) and samples.inputs.dtype == np.float32
    np.testing.assert_array_equal(samples.inputs, images)
    np.testing.assert_array_equal(samples.targets, labels)
    assert [r.name for r in reader.log.records] == ["digits.npz"]


def test_an_npz_may_name_its_arrays_x_and_y_or_as_configured() -> None:
    images, labels = digits()
    assert NpzDecoder()("a.npz", npz(x=images, y=labels)).inputs.shape == (100, 1, 8, 8)
    multi = np.eye(10, dtype=np.float32)[labels]
    named = NpzDecoder(names=(("images", "onehot"),))("b.npz", npz(images=images, onehot=multi))
    assert named.targets.shape == (100, 10)


def test_an_npz_with_an_unexpected_member_is_refused_naming_it() -> None:
    images, labels = digits()
    with pytest.raises(ShardError, match=r"unexpected members \['meta.npy'\]") as caught:
        NpzDecoder()("a.npz", npz(inputs=images, targets=labels, meta=np.zeros(1)))
    assert (caught.value.reason, caught.value.shard) == ("format", "a.npz")


def test_an_npz_holding_an_object_array_is_refused_without_unpickling() -> None:
    stream = io.BytesIO()
    np.savez(stream, inputs=np.array([{"a": 1}] * 3, dtype=object), targets=np.zeros(3))
    with pytest.raises(ShardError, match=r"inputs\.npy.*pickle") as caught:
        NpzDecoder()("a.npz", stream.getvalue())
    assert caught.value.reason == "format"


def test_an_npz_of_text_targets_is_refused_naming_the_dtype() -> None:
    with pytest.raises(ShardError, match=r"targets\.npy is <U3") as caught:
        NpzDecoder()("a.npz", npz(inputs=np.zeros((2, 3)), targets=np.array(["cat", "dog"])))
    assert caught.value.reason == "format"


def test_an_npz_whose_rows_differ_from_its_signed_records_is_refused(
    tmp_path: Path, key_pairs: Any, signer: Any
) -> None:
    images, labels = digits()
    root = shards(tmp_path, digits__npz=npz(inputs=images, targets=labels))
    reader = signed_reader(root, key_pairs, signer, records=lambda s: 99)
    with pytest.raises(ShardError, match="100 rows, signed 99 records") as caught:
        reader.read_samples("digits.npz", default_decoders())
    assert caught.value.reason == "records-mismatch"


def test_an_npz_with_fewer_targets_than_inputs_is_refused() -> None:
    images, labels = digits()
    with pytest.raises(ShardError, match=r"100 inputs .* but 99 targets") as caught:
        NpzDecoder()("a.npz", npz(inputs=images, targets=labels[:99]))
    assert caught.value.reason == "records-mismatch"


def test_a_compressed_npz_bomb_is_refused_from_its_headers_without_decompressing() -> None:
    stream = io.BytesIO()
    np.savez_compressed(stream, inputs=np.zeros((20_000, 1000), np.float32), targets=np.zeros(20_000, np.int64))
    data = stream.getvalue()
    assert len(data) < 200_000  # 80 MB of zeros
    tracemalloc.start()
    try:
        with pytest.raises(ShardError, match="over the") as caught:
            NpzDecoder()("bomb.npz", data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert caught.value.reason == "decode-limit"
    assert peak < 4 * 1024 * 1024


def test_an_npz_member_whose_zip_size_disagrees_with_its_npy_header_is_refused() -> None:
    small = io.BytesIO()
    np.save(small, np.zeros(10, np.float32))
    header = small.getvalue()[:128].replace(b"(10,)", b"(99,)")
    stream = io.BytesIO()
    with zipfile.ZipFile(stream, "w") as archive:
        archive.writestr("inputs.npy", header + small.getvalue()[128:])
        archive.writestr("targets.npy", small.getvalue())
    with pytest.raises(ShardError, match=r"inputs\.npy declares") as caught:
        NpzDecoder()("a.npz", stream.getvalue())
    assert caught.value.reason == "format"


def test_a_2d_npy_table_decodes_with_its_label_column_as_targets() -> None:
    images, labels = digits()
    table = np.column_stack([images.reshape(100, -1), labels]).astype(np.float64)
    stream = io.BytesIO()
    np.save(stream, table)
    samples = NpyDecoder()("t.npy", stream.getvalue())
    assert samples.inputs.shape == (100, 64) and samples.inputs.dtype == np.float32
    np.testing.assert_array_equal(samples.targets, labels)


def test_a_structured_npy_table_decodes_its_label_field_as_targets() -> None:
    table = np.zeros(5, dtype=[("a", "<f4"), ("b", "<i2"), ("label", "<i8")])
    table["b"], table["label"] = [1, 2, 3, 4, 5], [0, 1, 0, 1, 0]
    stream = io.BytesIO()
    np.save(stream, table)
    samples = NpyDecoder()("t.npy", stream.getvalue())
    np.testing.assert_array_equal(samples.inputs, [[0, 1], [0, 2], [0, 3], [0, 4], [0, 5]])
    assert samples.targets.tolist() == [0, 1, 0, 1, 0]


def test_an_npy_of_images_is_refused_pointing_to_npz() -> None:
    stream = io.BytesIO()
    np.save(stream, digits()[0])
    with pytest.raises(ShardError, match=r"of shape \(100, 1, 8, 8\).*\.npz") as caught:
        NpyDecoder()("t.npy", stream.getvalue())
    assert caught.value.reason == "format"


def test_an_npy_decodes_within_the_readers_decode_limit(tmp_path: Path, key_pairs: Any, signer: Any) -> None:
    stream = io.BytesIO()
    np.save(stream, np.zeros((100, 3)))
    root = shards(tmp_path, t__npy=stream.getvalue())
    with pytest.raises(ShardError, match="1000-byte limit") as caught:
        signed_reader(root, key_pairs, signer, bound=DecodeBound(ceiling=1000)).read_samples(
            "t.npy", default_decoders()
        )
    assert caught.value.reason == "decode-limit"


VALID = npz(inputs=np.arange(24, dtype=np.float32).reshape(4, 2, 3), targets=np.arange(4))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.data())
def test_any_corruption_of_an_npz_decodes_or_fails_closed(data: st.DataObject) -> None:
    corrupt = bytearray(VALID)
    for _ in range(data.draw(st.integers(1, 4))):
        corrupt[data.draw(st.integers(0, len(corrupt) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(corrupt)))
    try:
        samples = NpzDecoder()("fuzz.npz", bytes(corrupt[:cut]))
    except ShardError as error:
        assert error.shard == "fuzz.npz"
    else:
        assert isinstance(samples, Samples) and len(samples) == len(samples.inputs)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_as_npy_decode_or_fail_closed(data: bytes) -> None:
    try:
        NpyDecoder()("fuzz.npy", b"\x93NUMPY\x01\x00" + data)
    except ShardError as error:
        assert error.shard == "fuzz.npy"
