"""Messages between ranks are JSON: canonical bytes out, strictly parsed in, a malformed one refused in one line,
and nothing in the project crosses ranks through torch's pickling collectives."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from hypothesis import given
from hypothesis import strategies as st

from trainguard.ranks import MAX_BYTES, RankError, arrive, broadcast_json, decode, encode, gather_json

REPO = Path(__file__).resolve().parents[1]
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(json_values)
def test_what_one_rank_encodes_another_decodes_to_the_same_document(document: Any) -> None:
    data = encode(document)
    assert decode(data, 1) == document
    assert encode(decode(data, 1)) == data, "canonical: the same document always crosses as the same bytes"


@pytest.mark.parametrize(
    "data",
    [
        b'{"plan": 1, "plan": 2}',
        b'{"loss": NaN}',
        b"\x80\x81",
        b'{"allow": [',
        b"\xef\xbb\xbf{}",
        b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00]\x94.",  # a pickle
    ],
    ids=["duplicate-key", "nan", "not-utf8", "truncated", "bom", "pickle"],
)
def test_a_malformed_message_is_refused_in_one_line_naming_its_sender(data: bytes) -> None:
    with pytest.raises(RankError, match=r"^the message from rank 3 is not strict JSON: ") as refused:
        decode(data, 3)
    assert "\n" not in str(refused.value) and refused.value.reason == "rank-message"


def test_what_is_not_json_is_never_sent() -> None:
    for document in ({"rows": {1, 2}}, {"loss": float("nan")}, object()):
        with pytest.raises(RankError, match="cannot send a message between ranks"):
            encode(document)
    with pytest.raises(RankError, match="over the"):
        encode("x" * (MAX_BYTES + 1))


def test_no_project_code_crosses_ranks_through_a_pickling_collective() -> None:
    pickling = re.compile(r"\.(broadcast_object_list|all_gather_object|gather_object|scatter_object_list)\(")
    sources = [
        p for folder in ("trainguard", "provenance", "defenses", "pipeline") for p in (REPO / folder).rglob("*.py")
    ]
    assert sources
    assert [str(p) for p in sources if pickling.search(p.read_text())] == []


def _rank(rank: int, store: str, out: str) -> None:
    """One rank of a 2-process gloo job: a broadcast, a gather, a malformed broadcast and a message not sent."""
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    seen: dict[str, Any] = {}
    seen["broadcast"] = broadcast_json({"plan": {"cycle": 3, "rows": [1, 2]}} if rank == 0 else None)
    seen["gathered"] = gather_json({"ready": True, "rank": rank})
    raw = b'{"plan": 1, "plan": 2}'  # rank 0 sends bytes that are not one strict JSON document
    length = torch.tensor([len(raw)], dtype=torch.int64)
    torch.distributed.broadcast(length, src=0)
    payload = (
        torch.frombuffer(bytearray(raw), dtype=torch.uint8) if rank == 0 else torch.empty(len(raw), dtype=torch.uint8)
    )
    torch.distributed.broadcast(payload, src=0)
    try:
        decode(payload.numpy().tobytes(), 0)
    except RankError as error:
        seen["malformed"] = str(error)
    try:
        gather_json({"rows": {1, 2}} if rank == 1 else {"ready": True})
    except RankError as error:
        seen["not_sent"] = str(error)
    torch.distributed.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(seen))


def test_two_gloo_ranks_exchange_json_and_refuse_what_is_not(tmp_path: Path) -> None:
    # Ranks forked from this process: a spawned one imports torch and this module again (~3 CPU s) for the same job.
    mp.start_processes(_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, start_method="fork")
    zero, one = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert zero["broadcast"] == one["broadcast"] == {"plan": {"cycle": 3, "rows": [1, 2]}}
    assert zero["gathered"] == one["gathered"] == [{"ready": True, "rank": 0}, {"ready": True, "rank": 1}]
    assert one["malformed"].startswith("the message from rank 0 is not strict JSON: duplicate key 'plan'")
    assert zero["not_sent"] == "rank 1 could not send its message (it says why)"
    assert one["not_sent"].startswith("cannot send a message between ranks: Object of type set")


def _roll_call(rank: int, store: str, out: str) -> None:
    """One rank of a 3-process job: a roll call every rank answers, then one rank 2 stays away from."""
    roll = torch.distributed.FileStore(store, 3)
    arrive(roll, "everyone", rank, 3, timedelta(seconds=60))
    if rank == 2:
        return
    try:
        arrive(roll, "without-2", rank, 3, timedelta(seconds=2))
    except RankError as error:
        Path(out, f"rank{rank}.json").write_text(json.dumps({"error": str(error), "reason": error.reason}))


def test_a_rank_that_does_not_arrive_in_time_is_named_on_every_rank_that_did(tmp_path: Path) -> None:
    mp.start_processes(_roll_call, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=3, start_method="fork")
    zero, one = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert zero["error"] == one["error"] == "rank 2 did not arrive within 0:00:02"
    assert zero["reason"] == one["reason"] == "rank-wait"
