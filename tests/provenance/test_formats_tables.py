"""Parquet shards: tensor, fixed_size_list and image-bytes columns decode to their shapes; plain numeric columns
keep decoding as features; every refusal names the shard, the column and (for images) the row."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from trainguard.provenance import ShardError, ShardReader, open_manifest
from trainguard.provenance.formats import DecodeBound, Samples, default_decoders
from trainguard.provenance.formats.tables import ParquetDecoder


def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (bunch.images[:60] / 16.0).astype(np.float32), bunch.target[:60].astype(np.int64)


def parquet(table: pa.Table) -> bytes:
    stream = io.BytesIO()
    pq.write_table(table, stream)
    return stream.getvalue()


def png(pixels: np.ndarray, mode: str = "L") -> bytes:
    stream = io.BytesIO()
    Image.fromarray(pixels, mode).save(stream, "PNG")
    return stream.getvalue()


def image_table(blobs: list[bytes]) -> bytes:
    return parquet(pa.table({"image": pa.array(blobs, pa.binary()), "label": np.arange(len(blobs))}))


def test_a_fixed_shape_tensor_column_decodes_to_n_by_its_shape(tmp_path: Path, key_pairs: Any, signer: Any) -> None:
    images, labels = digits()
    images = images.reshape(60, 1, 8, 8).copy()  # a view's zero stride would give pyarrow a permuted shape
    tensor = pa.FixedShapeTensorArray.from_numpy_ndarray(images)
    root = tmp_path / "data"
    root.mkdir()
    (root / "digits.parquet").write_bytes(parquet(pa.table({"pixels": tensor, "label": labels})))
    reader = ShardReader(
        open_manifest(signer(root, key_pairs.alice, tmp_path / "m.json"), key_pairs.trust("alice"), data_dir=root)
    )
    samples = reader.read_samples("digits.parquet", default_decoders({".parquet": ParquetDecoder(inputs="pixels")}))
    assert samples.inputs.shape == (60, 1, 8, 8)
    np.testing.assert_array_equal(samples.inputs, images)
    np.testing.assert_array_equal(samples.targets, labels)


def test_a_fixed_size_list_column_takes_its_declared_shape() -> None:
    images, labels = digits()
    flat = pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1)), 64)
    data = parquet(pa.table({"pixels": flat, "label": labels}))
    samples = ParquetDecoder(inputs="pixels", shape=(1, 8, 8))("d.parquet", data)
    np.testing.assert_array_equal(samples.inputs, images[:, None])
    assert ParquetDecoder(inputs="pixels")("d.parquet", data).inputs.shape == (60, 64)
    with pytest.raises(ShardError, match=r"'pixels' holds 64 values per row, declared shape \(3, 8, 8\)") as caught:
        ParquetDecoder(inputs="pixels", shape=(3, 8, 8))("d.parquet", data)
    assert caught.value.reason == "format"


def test_png_and_jpeg_columns_decode_to_float_images_in_the_unit_range() -> None:
    images = digits()[0]
    grey = [png((image * 255).round().astype(np.uint8)) for image in images]
    samples = ParquetDecoder(inputs="image")("g.parquet", image_table(grey))
    assert samples.inputs.shape == (60, 1, 8, 8) and samples.inputs.dtype == np.float32
    np.testing.assert_allclose(samples.inputs[:, 0], images, atol=1 / 255)
    colour = np.random.default_rng(0).integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
    rgb = ParquetDecoder(inputs="image")("c.parquet", image_table([png(c, "RGB") for c in colour]))
    np.testing.assert_array_equal(rgb.inputs, colour.transpose(0, 3, 1, 2) / np.float32(255))
    stream = io.BytesIO()
    Image.fromarray(np.full((6, 4, 3), 200, np.uint8)).save(stream, "JPEG", quality=95)
    jpeg = ParquetDecoder(inputs="image")("j.parquet", image_table([stream.getvalue()]))
    assert jpeg.inputs.shape == (1, 3, 6, 4) and abs(float(jpeg.inputs.mean()) - 200 / 255) < 0.02


def test_undecodable_image_bytes_in_a_parquet_column_are_refused_naming_the_row() -> None:
    blobs = [png(np.zeros((64, 64), np.uint8))] * 3
    broken = png(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8))
    with pytest.raises(ShardError, match="column 'image' row 1 is not a decodable PNG/JPEG/WEBP image") as caught:
        ParquetDecoder(inputs="image")("i.parquet", image_table([blobs[0], b"GIF89a not an image", blobs[2]]))
    assert (caught.value.reason, caught.value.shard) == ("format", "i.parquet")
    with pytest.raises(ShardError, match="column 'image' row 2 is not a decodable") as caught:
        ParquetDecoder(inputs="image")("i.parquet", image_table([*blobs[:2], broken[: len(broken) // 2]]))
    assert caught.value.reason == "format"


def test_an_image_over_the_pixel_cap_is_refused_from_its_header() -> None:
    bomb = png(np.zeros((5000, 5000), np.uint8))
    assert len(bomb) < 64 * 1024
    with pytest.raises(ShardError, match="row 0 declares 5000 x 5000 pixels, over the limit of 16777216") as caught:
        ParquetDecoder(inputs="image")("b.parquet", image_table([bomb]))
    assert caught.value.reason == "decode-limit"


def test_images_together_over_the_decode_limit_are_refused_before_decoding(
    tmp_path: Path, key_pairs: Any, signer: Any
) -> None:
    root = tmp_path / "data"
    root.mkdir()
    (root / "i.parquet").write_bytes(image_table([png(np.zeros((64, 64), np.uint8))] * 10))
    reader = ShardReader(
        open_manifest(signer(root, key_pairs.alice, tmp_path / "m.json"), key_pairs.trust("alice"), data_dir=root),
        bound=DecodeBound(ceiling=100_000),
    )
    with pytest.raises(ShardError, match="163840 bytes, over the 100000-byte limit") as caught:
        reader.read_samples("i.parquet", {".parquet": ParquetDecoder(inputs="image")})
    assert caught.value.reason == "decode-limit"


def test_images_of_different_shapes_in_one_column_are_refused() -> None:
    blobs = [png(np.zeros((8, 8), np.uint8)), png(np.zeros((8, 8, 3), np.uint8), "RGB")]
    with pytest.raises(ShardError, match=r"row 0 is \(1, 8, 8\), row 1 is \(3, 8, 8\)") as caught:
        ParquetDecoder(inputs="image")("i.parquet", image_table(blobs))
    assert caught.value.reason == "format"


def test_numeric_feature_columns_and_a_label_column_keep_decoding_as_rows() -> None:
    images, labels = digits()
    frame = pd.DataFrame(images.reshape(60, -1), columns=[f"pixel_{i:02d}" for i in range(64)])
    frame["label"] = labels
    samples = ParquetDecoder()("d.parquet", parquet(pa.Table.from_pandas(frame, preserve_index=False)))
    assert samples.inputs.shape == (60, 64) and samples.inputs.dtype == np.float32
    np.testing.assert_array_equal(samples.targets, labels)


def test_a_text_feature_column_is_refused_naming_it() -> None:
    data = parquet(pa.table({"x": [1.0, 2.0], "note": ["a", "b"], "label": [0, 1]}))
    with pytest.raises(ShardError, match="column 'note' is string") as caught:
        ParquetDecoder()("t.parquet", data)
    assert caught.value.reason == "format"


def test_a_parquet_shard_with_other_rows_than_signed_is_refused_by_the_decoder(
    tmp_path: Path, key_pairs: Any, signer: Any
) -> None:
    from trainguard.provenance import PAYLOAD_TYPE, sign_envelope, write_manifest
    from trainguard.provenance.manifest import parse_statement, statement_bytes
    from trainguard.provenance.verify import read_envelope

    images, labels = digits()
    root = tmp_path / "data"
    root.mkdir()
    tensor = pa.FixedShapeTensorArray.from_numpy_ndarray(images)
    (root / "d.parquet").write_bytes(parquet(pa.table({"pixels": tensor, "label": labels})))
    manifest = signer(root, key_pairs.alice, tmp_path / "m.json")
    signed = parse_statement(read_envelope(manifest)[1].payload)
    shards = tuple(replace(s, records=50) for s in signed.shards)
    write_manifest(
        sign_envelope(PAYLOAD_TYPE, statement_bytes(replace(signed, shards=shards)), key_pairs.alice), manifest
    )
    reader = ShardReader(open_manifest(manifest, key_pairs.trust("alice"), data_dir=root))
    with pytest.raises(ShardError, match="60 rows, signed 50 records") as caught:
        reader.read_samples("d.parquet", ParquetDecoder(inputs="pixels"))
    assert caught.value.reason == "records-mismatch"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=200), min_size=1, max_size=3))
def test_any_bytes_in_an_image_column_decode_or_fail_closed(blobs: list[bytes]) -> None:
    header = png(np.zeros((2, 2), np.uint8))
    try:
        samples = ParquetDecoder(inputs="image")("f.parquet", image_table([header[:16] + b for b in blobs]))
    except ShardError as error:
        assert error.shard == "f.parquet"
    else:
        assert isinstance(samples, Samples)


def test_a_small_signed_parquet_whose_dictionary_column_expands_hugely_is_refused_before_it_is_expanded(
    tmp_path: Path, key_pairs: Any, signer: Any
) -> None:
    import subprocess
    import sys

    root = tmp_path / "data"
    root.mkdir()
    blob = pa.array([bytes(100_000)] * 2000, pa.binary())  # one dictionary value on 2000 rows: 200 MB decoded
    pq.write_table(pa.table({"blob": blob, "label": np.arange(2000)}), root / "d.parquet", compression="zstd")
    assert (root / "d.parquet").stat().st_size < 16 * 1024
    manifest = signer(root, key_pairs.alice, tmp_path / "m.json")
    read = (  # a fresh process, so the memory pool's peak is this read's alone
        "import sys, pyarrow as pa\n"
        "from pathlib import Path\n"
        "from trainguard.provenance import ShardError, ShardReader, open_manifest\n"
        "reader = ShardReader(open_manifest(Path(sys.argv[1]), Path(sys.argv[2]), data_dir=Path(sys.argv[3])))\n"
        "for read in (lambda: reader.read_frame('d.parquet'), lambda: list(reader.frames(['d.parquet']))):\n"
        "    try:\n"
        "        read()\n"
        "    except ShardError as error:\n"
        "        print(error.reason, error.shard)\n"
        "print(pa.default_memory_pool().max_memory())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", read, str(manifest), str(key_pairs.trust("alice")), str(root)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    *refusals, peak = done.stdout.split("\n")[:-1]
    assert refusals == ["decode-limit d.parquet"] * 2, done.stderr
    assert int(peak) < 16 * 1024**2
