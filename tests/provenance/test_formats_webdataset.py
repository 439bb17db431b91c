"""WebDataset tar shards: one input and one target per sample, decoded from verified bytes only; every malformed
or tampered tar is refused with its own reason, end to end through a signed manifest and the ShardReader."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from trainguard.provenance.errors import ShardError
from trainguard.provenance.formats import DecodeBound, decoder_for
from trainguard.provenance.formats.webdataset import WebDatasetDecoder, read_webdataset
from trainguard.provenance.reader import ShardReader
from trainguard.provenance.signing import sign_dataset, write_manifest
from trainguard.provenance.verify import open_manifest

from .test_formats_images import png_declaring

Members = list[tuple[str, bytes]]


def tar_of(members: Members) -> bytes:
    """An uncompressed tar holding `members` in this order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """The 8 x 8 digits as uint8 images (0..255) and their labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (bunch.images * 255 / 16).round().astype(np.uint8), bunch.target.astype(np.int64)


def digit_members(digits: tuple[np.ndarray, np.ndarray], rows: range) -> Members:
    images, labels = digits
    members: Members = []
    for row in rows:
        members += [(f"{row:06d}.png", png(images[row])), (f"{row:06d}.cls", str(labels[row]).encode())]
    return members


def refusal(data: bytes, decoder: WebDatasetDecoder | None = None) -> ShardError:
    with pytest.raises(ShardError) as caught:
        (decoder or WebDatasetDecoder(mode="L"))("part-0.tar", data)
    assert caught.value.shard == "part-0.tar"
    return caught.value


def test_a_tar_of_digit_pngs_decodes_to_images_and_their_labels(digits) -> None:
    samples = WebDatasetDecoder(mode="L")("part-0.tar", tar_of(digit_members(digits, range(20))))
    assert samples.inputs.shape == (20, 1, 8, 8)
    assert samples.inputs.dtype == np.float32
    np.testing.assert_allclose(samples.inputs[:, 0], digits[0][:20] / 255, atol=1e-6)
    np.testing.assert_array_equal(samples.targets, digits[1][:20])


def test_npy_inputs_with_json_labels_decode_to_tensors_and_int_labels() -> None:
    tensors = np.random.default_rng(1).random((4, 2, 3, 5), dtype=np.float32)
    members: Members = []
    for row in range(4):
        members += [(f"{row:06d}.npy", npy(tensors[row])), (f"{row:06d}.json", f'{{"label": {row}}}'.encode())]
    samples = WebDatasetDecoder()("t.tar", tar_of(members))
    np.testing.assert_array_equal(samples.inputs, tensors)
    np.testing.assert_array_equal(samples.targets, np.arange(4))


def test_json_lists_decode_to_multi_label_targets(digits) -> None:
    members = digit_members(digits, range(3))
    members = [(n, b"[0, 1, 1]" if n.endswith(".cls") else d) for n, d in members]
    members = [(n.replace(".cls", ".json"), d) for n, d in members]
    samples = WebDatasetDecoder(mode="L")("t.tar", tar_of(members))
    assert samples.targets.shape == (3, 3)
    assert samples.targets.dtype == np.float32


def test_a_sample_without_a_target_is_refused_naming_it(digits) -> None:
    members = [m for m in digit_members(digits, range(10)) if m[0] != "000007.cls"]
    error = refusal(tar_of(members))
    assert error.reason == "format"
    assert "sample 000007 has no target" in str(error)


def test_a_target_without_an_input_is_refused_naming_it(digits) -> None:
    members = [m for m in digit_members(digits, range(10)) if m[0] != "000004.png"]
    error = refusal(tar_of(members))
    assert (error.reason, "sample 000004 has no input" in str(error)) == ("format", True)


@pytest.mark.parametrize("extra", ["000002.txt", "000002.seg.png", "README"])
def test_a_member_with_an_unknown_suffix_is_refused(digits, extra: str) -> None:
    members = digit_members(digits, range(5))
    members.insert(6, (extra, b"anything"))
    error = refusal(tar_of(members))
    assert error.reason == "format"
    assert f"member {extra}: unknown suffix" in str(error)


def test_a_sample_with_two_inputs_is_refused(digits) -> None:
    members = digit_members(digits, range(3))
    members.insert(1, ("000000.npy", npy(np.zeros((1, 8, 8), np.float32))))
    assert "sample 000000 has 2 inputs" in str(refusal(tar_of(members)))


def test_a_sample_whose_members_are_not_adjacent_is_refused(digits) -> None:
    members = [*digit_members(digits, range(3)), ("000000.json", b'{"label": 0}')]
    assert "sample 000000 appears twice" in str(refusal(tar_of(members)))


def test_an_undecodable_image_member_is_refused_naming_it(digits) -> None:
    members = digit_members(digits, range(5))
    members[6] = ("000003.png", b"\x89PNG\r\n\x1a\n but not really")
    error = refusal(tar_of(members))
    assert (error.reason, "member 000003.png is not a decodable" in str(error)) == ("format", True)


def test_a_decompression_bomb_member_is_refused_before_decoding(digits) -> None:
    members = digit_members(digits, range(5))
    members[4] = ("000002.png", png_declaring(30000, 30000))
    error = refusal(tar_of(members))
    assert (error.reason, "000002.png" in str(error)) == ("decode-limit", True)


def test_an_npy_member_of_the_wrong_dtype_is_refused() -> None:
    members = [("000000.npy", npy(np.zeros((2, 2), np.float64))), ("000000.cls", b"1")]
    error = refusal(tar_of(members), WebDatasetDecoder())
    assert error.reason == "format"
    assert "member 000000.npy holds float64 values, expected float32" in str(error)


def test_an_npy_member_needing_pickle_is_refused() -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    members = [("000000.npy", buffer.getvalue()), ("000000.cls", b"1")]
    assert refusal(tar_of(members), WebDatasetDecoder(npy_dtype="object")).reason == "format"


def test_an_npy_member_declaring_more_values_than_it_holds_is_refused() -> None:
    buffer = io.BytesIO()
    header = {"descr": "<f4", "fortran_order": False, "shape": (99999, 99999)}
    np.lib.format.write_array_header_1_0(buffer, header)
    members = [("000000.npy", buffer.getvalue() + bytes(16)), ("000000.cls", b"1")]
    error = refusal(tar_of(members), WebDatasetDecoder())
    assert (error.reason, "declares (99999, 99999) values, more than it holds" in str(error)) == ("format", True)


def test_inputs_of_different_shapes_are_refused_naming_the_member(digits) -> None:
    members = digit_members(digits, range(4))
    members[4] = ("000002.png", png(np.zeros((9, 8), np.uint8)))
    error = refusal(tar_of(members))
    assert "member 000002.png has shape (1, 9, 8), expected (1, 8, 8)" in str(error)


def test_an_expected_shape_refuses_the_first_sample_of_another(digits) -> None:
    error = refusal(tar_of(digit_members(digits, range(2))), WebDatasetDecoder(mode="RGB", shape=(3, 32, 32)))
    assert "member 000000.png has shape (3, 8, 8), expected (3, 32, 32)" in str(error)


@pytest.mark.parametrize("label", [b"seven", b"1.5", b"", b"99999999999999999999"])
def test_a_class_label_that_is_not_an_integer_is_refused(digits, label: bytes) -> None:
    members = digit_members(digits, range(2))
    members[1] = ("000000.cls", label)
    assert "member 000000.cls is not an integer class label" in str(refusal(tar_of(members)))


@pytest.mark.parametrize("document", [b'{"label": 1, "label": 2}', b'{"label": true}', b'{"y": 1}', b'["a"]'])
def test_a_json_target_of_another_form_is_refused(document: bytes) -> None:
    members = [("000000.npy", npy(np.zeros(3, np.float32))), ("000000.json", document)]
    assert refusal(tar_of(members), WebDatasetDecoder()).reason == "format"


def test_more_or_fewer_samples_than_the_signed_records_are_refused(digits) -> None:
    data = tar_of(digit_members(digits, range(5)))
    assert len(WebDatasetDecoder(mode="L", records=5)("part-0.tar", data)) == 5
    for records in (3, 7):
        assert refusal(data, WebDatasetDecoder(mode="L", records=records)).reason == "records-mismatch"


def test_decoding_past_the_decode_limit_is_refused(digits) -> None:
    with pytest.raises(ShardError) as caught:
        WebDatasetDecoder(mode="L")(
            "part-0.tar", tar_of(digit_members(digits, range(5))), bound=DecodeBound(ceiling=1000)
        )
    assert (caught.value.reason, caught.value.shard) == ("decode-limit", "part-0.tar")


@pytest.mark.parametrize("cut", [512, 1000, 1536, 4096, "after-the-last-member"])
def test_a_truncated_tar_is_refused(digits, cut: int | str) -> None:
    data = tar_of(digit_members(digits, range(5)))
    if cut == "after-the-last-member":
        with tarfile.open(fileobj=io.BytesIO(data)) as archive:
            last = archive.getmembers()[-1]
        cut = last.offset_data + -(-last.size // 512) * 512
    assert refusal(data[: int(cut)]).reason == "format"


def test_a_gzip_compressed_tar_is_refused(digits) -> None:
    error = refusal(gzip.compress(tar_of(digit_members(digits, range(3)))))
    assert (error.reason, "compressed" in str(error)) == ("format", True)


def test_an_empty_tar_is_refused() -> None:
    assert "holds no samples" in str(refusal(tar_of([])))


def test_decoder_for_picks_the_webdataset_decoder_by_suffix() -> None:
    decoder = WebDatasetDecoder()
    assert decoder_for("train/part-3.tar", {".tar": decoder, ".parquet": print}) is decoder


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(at=st.integers(0, 6000), noise=st.binary(min_size=1, max_size=64))
def test_any_corruption_of_a_tar_decodes_or_is_refused_with_a_shard_error(digits, at: int, noise: bytes) -> None:
    original = tar_of(digit_members(digits, range(3)))
    data = original[:at] + noise + original[at + len(noise) :]
    try:
        samples = WebDatasetDecoder(mode="L", max_pixels=10_000)("t.tar", data)
    except ShardError as error:
        assert error.reason in ("format", "decode-limit")
    else:
        assert samples.inputs.ndim == 4


# End to end: signed tars, verified, read through the ShardReader.


@pytest.fixture
def signed_tars(tmp_path: Path, key_pairs: Any, digits) -> tuple[Path, Path]:
    """Tars of 40, 40 and 120 digits (only the last over 128 KiB, so it alone carries chunk digests), signed."""
    root = tmp_path / "wds"
    root.mkdir()
    for part, rows in enumerate([range(0, 40), range(40, 80), range(80, 200)]):
        (root / f"part-{part}.tar").write_bytes(tar_of(digit_members(digits, rows)))
    envelope, _ = sign_dataset(root, key_pairs.alice, dataset="digits-wds", source="alice", chunk_size=128 * 1024)
    return root, write_manifest(envelope, tmp_path / "manifest.json")


def reader_of(signed: tuple[Path, Path], key_pairs: Any) -> ShardReader:
    root, manifest = signed
    return ShardReader(open_manifest(manifest, key_pairs.trust("alice"), data_dir=root))


def test_signed_tars_read_through_the_reader_decode_and_are_logged(signed_tars, key_pairs, digits) -> None:
    reader = reader_of(signed_tars, key_pairs)
    decoder = WebDatasetDecoder(mode="L")
    whole = decoder("part-0.tar", reader.read_bytes("part-0.tar"))
    streamed = read_webdataset(reader, "part-2.tar", decoder)
    np.testing.assert_array_equal(whole.targets, digits[1][:40])
    np.testing.assert_array_equal(streamed.targets, digits[1][80:200])
    assert [r.name for r in reader.log.records] == ["part-0.tar", "part-2.tar"]
    assert len(reader.entry("part-2.tar").chunks) > 1
    assert reader.entry("part-0.tar").chunks == ()


def test_streamed_and_whole_reads_of_a_chunked_tar_decode_the_same_samples(signed_tars, key_pairs) -> None:
    reader = reader_of(signed_tars, key_pairs)
    decoder = WebDatasetDecoder(mode="L")
    streamed = read_webdataset(reader, "part-2.tar", decoder)
    whole = decoder("part-2.tar", reader.read_bytes("part-2.tar"))
    np.testing.assert_array_equal(streamed.inputs, whole.inputs)
    np.testing.assert_array_equal(streamed.targets, whole.targets)


def test_a_tar_with_a_flipped_byte_is_refused_by_the_reader(signed_tars, key_pairs) -> None:
    reader = reader_of(signed_tars, key_pairs)
    shard = signed_tars[0] / "part-1.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError) as caught:
        read_webdataset(reader, "part-1.tar")
    assert (caught.value.reason, caught.value.shard) == ("digest-mismatch", "part-1.tar")
    assert reader.log.records == ()


def test_a_tar_with_a_swapped_member_is_refused(signed_tars, key_pairs, digits) -> None:
    members = digit_members(digits, range(40, 80))
    members[0], members[2] = (members[0][0], members[2][1]), (members[2][0], members[0][1])
    (signed_tars[0] / "part-1.tar").write_bytes(tar_of(members))
    reader = reader_of(signed_tars, key_pairs)
    with pytest.raises(ShardError) as caught:
        WebDatasetDecoder(mode="L")("part-1.tar", reader.read_bytes("part-1.tar"))
    assert caught.value.reason == "digest-mismatch"


def test_a_tampered_large_tar_stops_at_its_first_bad_chunk(signed_tars, key_pairs) -> None:
    reader = reader_of(signed_tars, key_pairs)
    shard = signed_tars[0] / "part-2.tar"
    data = bytearray(shard.read_bytes())
    data[128 * 1024 + 100] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError) as caught:
        read_webdataset(reader, "part-2.tar", WebDatasetDecoder(mode="L"))
    assert caught.value.reason == "chunk"
    assert str(caught.value) == "shard part-2.tar: chunk 1 differs from its signed digest"
    assert reader.log.records == ()


def test_a_signed_tar_with_a_bad_member_is_refused_after_verification(tmp_path, key_pairs, digits) -> None:
    root = tmp_path / "wds"
    root.mkdir()
    members = [m for m in digit_members(digits, range(10)) if m[0] != "000007.cls"]
    (root / "part-0.tar").write_bytes(tar_of(members))
    envelope, _ = sign_dataset(root, key_pairs.alice, dataset="digits-wds", source="alice")
    manifest = write_manifest(envelope, tmp_path / "manifest.json")
    reader = ShardReader(open_manifest(manifest, key_pairs.trust("alice"), data_dir=root))
    with pytest.raises(ShardError) as caught:
        read_webdataset(reader, "part-0.tar", WebDatasetDecoder(mode="L"))
    assert str(caught.value) == "shard part-0.tar: sample 000007 has no target (expected one .cls or .json)"


def test_a_small_signed_tar_of_compressible_images_is_refused_at_its_first_image_before_any_pixel_is_decoded(
    tmp_path: Path, key_pairs: Any
) -> None:
    root = tmp_path / "bomb"
    root.mkdir()
    black = png(np.zeros((2048, 2048), np.uint8))  # a few kB that decode to 16 MiB of float32
    members = [m for row in range(2) for m in [(f"{row:06d}.png", black), (f"{row:06d}.cls", b"0")]]
    (root / "part-0.tar").write_bytes(tar_of(members))
    envelope, _ = sign_dataset(root, key_pairs.alice, dataset="bomb", source="alice")
    reader = reader_of((root, write_manifest(envelope, tmp_path / "manifest.json")), key_pairs)
    size = reader.entry("part-0.tar").size
    assert size < 64 * 1024 and DecodeBound().limit(size) < 4 * 2048 * 2048
    for read in (
        lambda: read_webdataset(reader, "part-0.tar", WebDatasetDecoder(mode="L")),
        lambda: reader.read_samples("part-0.tar", WebDatasetDecoder(mode="L")),
    ):
        with pytest.raises(ShardError) as caught:
            read()
        assert (caught.value.reason, caught.value.shard) == ("decode-limit", "part-0.tar")
        assert f"at member 000000.png, over the {DecodeBound().limit(size)}-byte limit" in str(caught.value)
    generous = ShardReader(reader.verified, bound=DecodeBound(ratio=4096))
    assert read_webdataset(generous, "part-0.tar", WebDatasetDecoder(mode="L")).inputs.shape == (2, 1, 2048, 2048)
