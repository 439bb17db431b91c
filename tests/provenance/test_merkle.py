"""The shard Merkle tree: RFC 9162 tree heads, and inclusion proofs that verify for every leaf and nothing else."""

from __future__ import annotations

import hashlib
from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from trainguard.provenance.merkle import (
    inclusion_proof,
    leaf_hash,
    merkle_root,
    node_hash,
    shard_leaf,
    shard_leaves,
    verify_inclusion,
)

SHARDS = st.lists(st.tuples(st.text(max_size=12), st.text("0123456789abcdef", min_size=1, max_size=8)), max_size=40)


def test_the_tree_head_is_rfc_9162s_for_small_trees() -> None:
    a, b, c = b"a", b"b", b"c"
    assert merkle_root([]) == hashlib.sha256(b"").digest()
    assert merkle_root([a]) == hashlib.sha256(b"\x00a").digest()
    assert merkle_root([a, b, c]) == node_hash(node_hash(leaf_hash(a), leaf_hash(b)), leaf_hash(c))


def test_the_root_names_the_set_of_shards_whatever_their_order() -> None:
    shards = [("alice/s1.parquet", "ab"), ("alice/s0.parquet", "cd"), ("bob/s0.parquet", "ef")]
    assert merkle_root(shard_leaves(shards)) == merkle_root(shard_leaves(reversed(shards)))
    assert merkle_root(shard_leaves(shards)) != merkle_root(shard_leaves([*shards[:2], ("bob/s0.parquet", "ee")]))


@given(SHARDS)
def test_every_leafs_proof_verifies_against_the_root(shards: list[tuple[str, str]]) -> None:
    leaves = shard_leaves(shards)
    root = merkle_root(leaves)
    for index, leaf in enumerate(leaves):
        assert verify_inclusion(leaf, inclusion_proof(leaves, index), root)


@given(SHARDS.filter(lambda shards: len(set(shards)) > 1), st.data())
def test_a_changed_leaf_sibling_index_or_size_does_not_verify(
    shards: list[tuple[str, str]], data: st.DataObject
) -> None:
    leaves = shard_leaves(shards)
    root = merkle_root(leaves)
    index = data.draw(st.integers(0, len(leaves) - 1))
    proof = inclusion_proof(leaves, index)
    name, sha256 = sorted(set(shards))[index]
    assert not verify_inclusion(shard_leaf(name, sha256 + "0"), proof, root)
    assert not verify_inclusion(leaves[(index + 1) % len(leaves)], proof, root)
    at = data.draw(st.integers(0, len(proof.path) - 1))
    flipped = bytes([proof.path[at][0] ^ 1]) + proof.path[at][1:]
    assert not verify_inclusion(
        leaves[index], replace(proof, path=(*proof.path[:at], flipped, *proof.path[at + 1 :])), root
    )
    assert not verify_inclusion(leaves[index], replace(proof, path=proof.path[:-1]), root)
    assert not verify_inclusion(leaves[index], replace(proof, size=len(leaves) * 2 + 1), root)
