"""Messages between the ranks of a job, as JSON: a document crosses as its canonical JSON bytes in a uint8 tensor
(its length first) and is parsed on arrival by the strict parser, so nothing one process tells another is ever
unpickled (`broadcast_object_list` and `all_gather_object` pickle). Every collective here waits at most `TIMEOUT`,
unless the caller says otherwise; `arrive` names the ranks that did not come in time.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta
from typing import Any

import torch

from trainguard import strictjson
from trainguard.errors import TrainguardError

TIMEOUT = timedelta(minutes=30)
"""The longest one rank waits for the others in a collective, unless the caller says otherwise (the group's own
timeout, which the backend may enforce too, must be at least as long)."""
MAX_BYTES = 256 * 1024 * 1024
"""The largest message: an allow-list of a million shards fits; a corrupted length is refused before allocation."""
NOT_SENT = -1
"""The length a rank announces when it has no message to send (it failed to encode one), so no rank waits on it."""
ARRIVAL_POLL = (0.01, 1.0)
"""How often `arrive` looks for the other ranks, in seconds: first, then at most (doubling in between)."""


class RankError(TrainguardError):
    """A message between ranks was malformed or not sent (`reason` rank-message); `RankWaitError`: not answered in
    time."""

    reason = "rank-message"


class RankWaitError(RankError):
    """A rank did not arrive, or a collective between ranks did not complete, in time."""

    reason = "rank-wait"


def encode(document: Any) -> bytes:
    """`document` as canonical JSON bytes (sorted keys, no NaN); raises RankError if it is not JSON or too large."""
    try:
        data = json.dumps(document, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as error:
        raise RankError(f"cannot send a message between ranks: {_line(error)}") from None
    encoded = data.encode()
    if len(encoded) > MAX_BYTES:
        raise RankError(f"a message between ranks of {len(encoded)} bytes is over the {MAX_BYTES}-byte limit")
    return encoded


def decode(data: bytes, sender: int) -> Any:
    """The document in the bytes rank `sender` sent; refuses anything but one strict JSON document, in one line."""
    try:
        return strictjson.loads(data)
    except strictjson.StrictJSONError as error:
        raise RankError(f"the message from rank {sender} is not strict JSON: {_line(error)}") from None


def broadcast_json(document: Any = None, *, group: Any = None, timeout: timedelta = TIMEOUT) -> Any:
    """Rank 0's `document` (the others pass nothing), as every rank parses it from the bytes sent, rank 0 too;
    over `group` (default: the whole job's)."""
    device = _device(group)
    data, failure = _encoded(document) if torch.distributed.get_rank() == 0 else (b"", None)
    length = torch.tensor([NOT_SENT if failure else len(data)], dtype=torch.int64, device=device)
    _wait(torch.distributed.broadcast(length, src=0, group=group, async_op=True), timeout)
    if failure is not None:
        raise failure
    payload = _tensor(data, _size(int(length.item()), 0), device)
    _wait(torch.distributed.broadcast(payload, src=0, group=group, async_op=True), timeout)
    return decode(payload.cpu().numpy().tobytes(), 0)


def gather_json(document: Any, *, group: Any = None, timeout: timedelta = TIMEOUT) -> list[Any]:
    """Every rank's `document`, in rank order, on every rank; a rank whose message is refused is refused on all.
    Over `group` (default: the whole job's)."""
    device = _device(group)
    world = torch.distributed.get_world_size(group)
    data, failure = _encoded(document)
    length = torch.tensor([NOT_SENT if failure else len(data)], dtype=torch.int64, device=device)
    lengths = [torch.empty_like(length) for _ in range(world)]
    _wait(torch.distributed.all_gather(lengths, length, group=group, async_op=True), timeout)
    if failure is not None:
        raise failure
    sizes = [_size(int(t.item()), rank) for rank, t in enumerate(lengths)]
    payload = _tensor(data, max(sizes), device)
    payloads = [torch.empty_like(payload) for _ in range(world)]
    _wait(torch.distributed.all_gather(payloads, payload, group=group, async_op=True), timeout)
    received = zip(payloads, sizes, strict=True)
    return [decode(p[:size].cpu().numpy().tobytes(), rank) for rank, (p, size) in enumerate(received)]


def arrive(store: Any, name: str, rank: int, world: int, timeout: timedelta = TIMEOUT) -> None:
    """Returns once each of the job's `world` ranks has arrived at the roll call `name` (each rank calls this with
    the same `name`); else raises RankError (rank-wait) naming the ranks that did not within `timeout` of this
    rank's arrival. Through the job's key-value `store`, not a process group: a collective that timed out leaves
    its gloo group broken, never the store."""
    keys = [f"{name}/{peer}" for peer in range(world)]
    store.set(keys[rank], "here")
    deadline = time.monotonic() + timeout.total_seconds()
    pause = ARRIVAL_POLL[0]
    while not store.check(keys):  # polled: the store's own timed wait logs a warning of its own
        if time.monotonic() >= deadline:
            missing = [peer for peer, key in enumerate(keys) if not store.check([key])]
            if not missing:  # the last came just now
                return
            named = f"rank {missing[0]}" if len(missing) == 1 else "ranks " + ", ".join(map(str, missing))
            raise RankWaitError(f"{named} did not arrive within {timeout}")
        time.sleep(min(pause, max(deadline - time.monotonic(), 0.0)))
        pause = min(2 * pause, ARRIVAL_POLL[1])


def _encoded(document: Any) -> tuple[bytes, RankError | None]:
    """The bytes to send, or the reason none can be (sent on as NOT_SENT, raised once the others know)."""
    try:
        return encode(document), None
    except RankError as error:
        return b"", error


def _size(announced: int, sender: int) -> int:
    if announced == NOT_SENT:
        raise RankError(f"rank {sender} could not send its message (it says why)")
    if not 0 <= announced <= MAX_BYTES:
        raise RankError(f"rank {sender} announced a message of {announced} bytes (limit {MAX_BYTES})")
    return announced


def _tensor(data: bytes, size: int, device: torch.device) -> torch.Tensor:
    """`size` bytes to send or receive: `data` zero-padded."""
    payload = torch.zeros(size, dtype=torch.uint8)
    if data:
        payload[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return payload.to(device)


def _wait(work: Any, timeout: timedelta) -> None:
    """Waits for a collective at most `timeout`; a timeout or a lost peer becomes a one-line RankError."""
    try:
        work.wait(timeout)
    except RuntimeError as error:
        message = f"a collective between ranks failed (each waits at most {timeout}): {_line(error)}"
        raise RankWaitError(message) from None


def _device(group: Any) -> torch.device:
    """Where the group's collectives take tensors: the current GPU under NCCL, else the CPU."""
    if torch.distributed.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _line(error: BaseException) -> str:
    return " ".join(str(error).split())[:500]
