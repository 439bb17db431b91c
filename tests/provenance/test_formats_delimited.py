"""CSV shards against a declared schema: explicit dtypes, no inference; a value that does not fit is refused naming
the column and both dtypes, float64 data narrows to a declared float32 only without overflow (or not at all with
`cast=False`)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from trainguard.provenance import MalformedError, ShardError, ShardReader, open_manifest
from trainguard.provenance.formats import DecodeBound, default_decoders
from trainguard.provenance.formats.delimited import CsvDecoder

SCHEMA = {"a": "float32", "b": "int32", "label": "int64"}


def csv(*rows: str, header: str = "a,b,label") -> bytes:
    return "\n".join([header, *rows, ""]).encode()


def digits_csv() -> tuple[bytes, dict[str, str], np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    features, labels = (bunch.data[:80] / 16.0).astype(np.float32), bunch.target[:80].astype(np.int64)
    columns = {f"pixel_{i:02d}": "float32" for i in range(64)} | {"label": "int64"}
    lines = [",".join(columns)] + [
        ",".join([*map(repr, map(float, x)), str(y)]) for x, y in zip(features, labels, strict=True)
    ]
    return ("\n".join(lines) + "\n").encode(), columns, features, labels


def signed_reader(tmp_path: Path, key_pairs: Any, signer: Any, data: bytes, records: int | None = None) -> ShardReader:
    root = tmp_path / "data"
    root.mkdir()
    (root / "d.csv").write_bytes(data)
    manifest = signer(root, key_pairs.alice, tmp_path / "m.json")
    if records is not None:
        from trainguard.provenance import PAYLOAD_TYPE, sign_envelope, write_manifest
        from trainguard.provenance.manifest import parse_statement, statement_bytes
        from trainguard.provenance.verify import read_envelope

        signed = parse_statement(read_envelope(manifest)[1].payload)
        shards = tuple(replace(s, records=records) for s in signed.shards)
        write_manifest(
            sign_envelope(PAYLOAD_TYPE, statement_bytes(replace(signed, shards=shards)), key_pairs.alice), manifest
        )
    return ShardReader(open_manifest(manifest, key_pairs.trust("alice"), data_dir=root))


def test_a_csv_with_its_declared_schema_decodes_through_the_reader(tmp_path: Path, key_pairs: Any, signer: Any) -> None:
    data, columns, features, labels = digits_csv()
    reader = signed_reader(tmp_path, key_pairs, signer, data)
    samples = reader.read_samples("d.csv", default_decoders(csv_columns=columns))
    assert samples.inputs.shape == (80, 64) and samples.inputs.dtype == np.float32
    np.testing.assert_array_equal(samples.inputs, features)
    np.testing.assert_array_equal(samples.targets, labels)
    assert samples.targets.dtype == np.int64


def test_a_value_that_does_not_fit_its_declared_dtype_is_refused_naming_the_column_and_both_dtypes() -> None:
    with pytest.raises(ShardError, match="column 'label' holds float64 data, declared int64") as caught:
        CsvDecoder(SCHEMA)("d.csv", csv("0.5,1,2", "0.5,1,2.5"))
    assert (caught.value.reason, caught.value.shard) == ("format", "d.csv")
    with pytest.raises(ShardError, match="column 'b' holds int64 data, declared int32"):
        CsvDecoder(SCHEMA)("d.csv", csv("0.5,3000000000,2"))
    with pytest.raises(ShardError, match="column 'a' holds text data, declared float32"):
        CsvDecoder(SCHEMA)("d.csv", csv("seven,1,2"))


def test_an_empty_cell_is_refused_rather_than_read_as_missing() -> None:
    with pytest.raises(ShardError, match="column 'b'") as caught:
        CsvDecoder(SCHEMA)("d.csv", csv("0.5,,2"))
    assert caught.value.reason == "format"


def test_float64_data_declared_float32_is_cast() -> None:
    samples = CsvDecoder({"a": "float32", "label": "int64"})(
        "d.csv", csv("0.1,2", "3.141592653589793,5", header="a,label")
    )
    assert samples.inputs.dtype == np.float32
    np.testing.assert_array_equal(samples.inputs[:, 0], np.array([0.1, np.pi], np.float32))


def test_a_float64_value_that_overflows_float32_is_refused() -> None:
    with pytest.raises(ShardError, match=r"column 'a' holds float64 data, declared float32: row 1 value 1e\+300 overf"):
        CsvDecoder(SCHEMA)("d.csv", csv("0.5,1,2", "1e300,1,2"))


def test_float64_data_declared_float32_is_refused_when_the_schema_says_cast_false() -> None:
    assert CsvDecoder(SCHEMA, cast=False)("d.csv", csv("0.5,1,2", "0.25,1,2")).inputs[1, 0] == 0.25
    with pytest.raises(ShardError, match="column 'a' holds float64 data, declared float32 with cast: false") as caught:
        CsvDecoder(SCHEMA, cast=False)("d.csv", csv("0.5,1,2", "0.1,1,2"))
    assert caught.value.reason == "format"


@pytest.mark.parametrize(
    ("header", "problem"),
    [
        ("a,label", r"missing columns \['b'\]"),
        ("a,b,c,label", r"undeclared columns \['c'\]"),
        ("a,b,b,label", "repeated"),
    ],
)
def test_a_header_that_differs_from_the_schema_is_refused(header: str, problem: str) -> None:
    with pytest.raises(ShardError, match=problem) as caught:
        CsvDecoder(SCHEMA)("d.csv", csv(header=header))
    assert caught.value.reason == "format"


def test_a_csv_whose_rows_differ_from_its_signed_records_is_refused(
    tmp_path: Path, key_pairs: Any, signer: Any
) -> None:
    reader = signed_reader(tmp_path, key_pairs, signer, csv("0.5,1,2", "0.5,1,2"), records=3)
    with pytest.raises(ShardError, match="2 rows, signed 3 records") as caught:
        reader.read_samples("d.csv", {".csv": CsvDecoder(SCHEMA)})
    assert caught.value.reason == "records-mismatch"


def test_a_csv_decodes_within_the_decode_limit() -> None:
    with pytest.raises(ShardError, match="over the 16-byte limit") as caught:
        CsvDecoder(SCHEMA)("d.csv", csv("0.5,1,2", "0.5,1,2"), bound=DecodeBound(ceiling=16))
    assert caught.value.reason == "decode-limit"


def test_a_schema_with_an_unknown_dtype_is_refused_up_front() -> None:
    with pytest.raises(MalformedError, match="unsupported dtypes"):
        CsvDecoder({"a": "object", "label": "int64"})


@settings(max_examples=50, deadline=None)
@given(
    arrays(np.float32, st.tuples(st.integers(1, 20), st.integers(1, 4)), elements=st.floats(width=32, allow_nan=False))
)
def test_float32_tables_written_as_text_round_trip_exactly(table: np.ndarray) -> None:
    columns = {f"f{i}": "float32" for i in range(table.shape[1])} | {"label": "int64"}
    rows = [",".join([*map(repr, map(float, row)), str(index)]) for index, row in enumerate(table)]
    samples = CsvDecoder(columns, cast=False)("r.csv", csv(*rows, header=",".join(columns)))
    np.testing.assert_array_equal(samples.inputs, table)
    assert samples.targets.tolist() == list(range(len(table)))


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from('0123456789.,-e"\nx \t;'), max_size=80))
def test_any_text_after_the_header_decodes_or_fails_closed(body: str) -> None:
    try:
        CsvDecoder(SCHEMA)("f.csv", b"a,b,label\n" + body.encode())
    except ShardError as error:
        assert error.shard == "f.csv"
