"""Prefix-block hashes: a chain over full blocks, seeded with the model's identity.

Every full block of a request is named by a 64-bit hash of its tokens chained to
the hash of the block before it, so two requests with the same first
k * block_size tokens name the same k blocks. The chain starts from a seed: the
root parent hash. `ROOT_HASH` (0) is the unseeded chain; `hash_seed(identity)`
derives a seed from a model fingerprint string, so two model identities never
name the same blocks (a prompt cached on one model is no hit for another).

Stable across processes (blake2b, not Python's salted `hash`), so anything that
knows the block size and the model identity (the scheduler's placement, the
simulator) computes the same hashes from a prompt as the replica does.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

ROOT_HASH = 0

_SEED_PERSON = b"sb-replica-seed"


def hash_seed(model_identity: str) -> int:
    """A nonzero 64-bit chain seed derived from a model fingerprint string."""
    digest = hashlib.blake2b(model_identity.encode("utf-8"), digest_size=8, person=_SEED_PERSON).digest()
    return int.from_bytes(digest, "little") or 1  # 0 is the unseeded chain


def block_hash(parent: int, tokens: Sequence[int]) -> int:
    """Stable 64-bit hash of one full block chained to its parent block's hash (or the seed)."""
    data = parent.to_bytes(8, "little") + array("q", tokens).tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def prompt_block_hashes(token_ids: Sequence[int], block_size: int, seed: int = ROOT_HASH) -> list[int]:
    """Chained hashes of every full block of `token_ids`, starting from `seed`."""
    hashes: list[int] = []
    extend_block_hashes(hashes, token_ids, block_size, seed)
    return hashes


def extend_block_hashes(hashes: list[int], token_ids: Sequence[int], block_size: int, seed: int = ROOT_HASH) -> None:
    """Append to `hashes` (the chain of `token_ids`' leading blocks so far) every further full block.

    Lets a request compute each block's hash once, as its tokens grow.
    """
    parent = hashes[-1] if hashes else seed
    for start in range(len(hashes) * block_size, len(token_ids) - block_size + 1, block_size):
        parent = block_hash(parent, token_ids[start : start + block_size])
        hashes.append(parent)
