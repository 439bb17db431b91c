"""A Merkle tree over a cycle's shards, as RFC 9162 (Certificate Transparency 2.0, section 2.1) defines it, so an
attestation or report names any number of shards by one 32-byte root and a verifier checks one shard with a proof of
log2(n) hashes.

The construction (the one RFC 6962 and RFC 9162 share): with SHA-256, a leaf's hash is `SHA-256(0x00 || leaf)`, an
inner node's `SHA-256(0x01 || left || right)` (the prefixes keep a leaf from passing for a node), the empty tree's
`SHA-256("")`, and a tree of n > 1 leaves splits at the largest power of two below n. A shard's leaf is the canonical
JSON array `[name, sha256]` (UTF-8, no spaces), and a set of shards is hashed in sorted (name, sha256) order, so the
root depends on the set alone. No maintained library for it is installed (sigstore's Rekor check is internal).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

ALGORITHM = "rfc9162-sha256"
"""What `merkle_root` computes, as attestations and reports name it."""

_LEAF = b"\x00"
_NODE = b"\x01"


@dataclass(frozen=True)
class InclusionProof:
    """That the leaf at `index` is in a tree of `size` leaves: the sibling hashes from the leaf up (RFC 9162 2.1.3).

    Attributes:
        index: The leaf's place among the tree's leaves (0-based).
        size: How many leaves the tree has.
        path: The audit path: the sibling subtree hashes, nearest the leaf first.
    """

    index: int
    size: int
    path: tuple[bytes, ...]


def shard_leaf(name: str, sha256: str) -> bytes:
    """The leaf of one shard: the canonical JSON array `[name, sha256]`, which no two distinct shards share.

    Args:
        name: The shard's name as the cycle records it.
        sha256: Its content digest (hex).

    Returns:
        The leaf's bytes.
    """
    return json.dumps([name, sha256], separators=(",", ":"), ensure_ascii=False).encode()


def shard_leaves(shards: Iterable[tuple[str, str]]) -> list[bytes]:
    """The leaves of a set of shards in the tree's order: sorted by (name, sha256), each once.

    Args:
        shards: (name, sha256) pairs, in any order.

    Returns:
        The leaves to hash.
    """
    return [shard_leaf(name, sha256) for name, sha256 in sorted(set(shards))]


def leaf_hash(leaf: bytes) -> bytes:
    """`SHA-256(0x00 || leaf)`.

    Args:
        leaf: The leaf's bytes.

    Returns:
        Its 32-byte hash.
    """
    return hashlib.sha256(_LEAF + leaf).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """`SHA-256(0x01 || left || right)`.

    Args:
        left: The left child's hash.
        right: The right child's hash.

    Returns:
        The node's 32-byte hash.
    """
    return hashlib.sha256(_NODE + left + right).digest()


def merkle_root(leaves: Iterable[bytes]) -> bytes:
    """The tree head of the leaves in order, in one pass and log2(n) hashes of memory.

    Adjacent subtrees of equal size are merged as they complete; the ragged right edge is folded at the end,
    right to left, which gives the RFC's split at the largest power of two below n.

    Args:
        leaves: The leaves' bytes, in the tree's order.

    Returns:
        The 32-byte root (`SHA-256("")` for no leaves).
    """
    stack: list[tuple[int, bytes]] = []  # (leaf count, hash) of complete subtrees, sizes strictly decreasing
    for leaf in leaves:
        size, digest = 1, leaf_hash(leaf)
        while stack and stack[-1][0] == size:
            below, left = stack.pop()
            size, digest = below + size, node_hash(left, digest)
        stack.append((size, digest))
    if not stack:
        return hashlib.sha256(b"").digest()
    digest = stack.pop()[1]
    while stack:
        digest = node_hash(stack.pop()[1], digest)
    return digest


def inclusion_proof(leaves: Sequence[bytes], index: int) -> InclusionProof:
    """The audit path of the leaf at `index` (RFC 9162 2.1.3.1), nearest sibling first.

    Args:
        leaves: Every leaf's bytes, in the tree's order.
        index: Which leaf.

    Returns:
        The proof.

    Raises:
        IndexError: `index` is not a leaf of the tree.
    """
    if not 0 <= index < len(leaves):
        raise IndexError(f"leaf {index} is not in a tree of {len(leaves)} leaves")
    hashes = [leaf_hash(leaf) for leaf in leaves]
    path: list[bytes] = []
    start, end, at = 0, len(hashes), index
    while end - start > 1:
        split = _split(end - start)
        if at - start < split:
            path.append(_subtree(hashes, start + split, end))
            end = start + split
        else:
            path.append(_subtree(hashes, start, start + split))
            start += split
    return InclusionProof(index, len(leaves), tuple(reversed(path)))


def verify_inclusion(leaf: bytes, proof: InclusionProof, root: bytes) -> bool:
    """Whether `leaf` is at `proof.index` of the tree whose head is `root` (RFC 9162 2.1.3.2).

    Args:
        leaf: The leaf's bytes (e.g. `shard_leaf(name, sha256)`).
        proof: Its audit path.
        root: The tree head the attestation or report names.

    Returns:
        True only if the path leads from the leaf to the root in a tree of `proof.size` leaves.
    """
    if not 0 <= proof.index < proof.size:
        return False
    fn, sn, digest = proof.index, proof.size - 1, leaf_hash(leaf)
    for sibling in proof.path:
        if sn == 0:
            return False
        if fn % 2 == 1 or fn == sn:
            digest = node_hash(sibling, digest)
            if fn % 2 == 0:
                while fn % 2 == 0 and fn != 0:
                    fn, sn = fn >> 1, sn >> 1
        else:
            digest = node_hash(digest, sibling)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and digest == root


def _split(size: int) -> int:
    """The largest power of two below `size` (> 1)."""
    return 1 << ((size - 1).bit_length() - 1)


def _subtree(hashes: Sequence[bytes], start: int, end: int) -> bytes:
    """The head of the subtree over leaf hashes [start, end)."""
    if end - start == 1:
        return hashes[start]
    split = _split(end - start)
    return node_hash(_subtree(hashes, start, start + split), _subtree(hashes, start + split, end))
