"""Simulated requests: trace rows with an expert, and the prefix-block hashes a replica would compute.

A trace row (`switchboard.bench.workload.TraceRequest`: arrival, prompt and output lengths, optional
`hash_ids`) becomes a `SimRequest` with everything a replica's prefix cache needs: the hash chain
of every full block of its final token sequence (prompt, then output).

Where the hashes come from. A replica names a block by a blake2b hash chained to the block before
it (`switchboard.replica.hashing`), seeded with its model's identity. Two requests share prefix
blocks only where their `hash_ids` agree: those blocks get the real chained hashes of synthetic
tokens that stand for each trace block (computed once per distinct prefix, in a trie), so the
scheduler's own `PlacementQuery.block_hashes` and a replica's pool agree on them. Content no other
request shares (the prompt after its shared blocks, and every generated token) gets unique hashes
from a counter instead: a unique block can never be a cache hit, so the cache behaves the same,
without hashing megabytes of tokens per simulated second.

Real traces without `hash_ids` (the Azure 2023 traces carry lengths only) can get shared prefixes
from `assign_shared_prefixes`: a synthetic, documented layer (a Zipf-popular set of system
prompts), since nothing in those traces says which prompts share text.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from switchboard.bench.workload import TraceRequest
from switchboard.replica.hashing import block_hash

# Unique-content hashes count down from the top of the 64-bit range, far from where blake2b
# outputs collide with them (probability about count / 2**64).
_UNIQUE_TOP = (1 << 64) - 1


@dataclass(frozen=True)
class SimRequest:
    """One request to simulate."""

    index: int
    arrival: float  # seconds from the start
    expert: str
    prompt_tokens: int
    output_tokens: int
    hash_ids: tuple[int, ...] = ()
    # How many leading hash_ids another request of the workload shares (`mark_shared`): only
    # those blocks can ever be a cache hit.
    shared_ids: int = 0


class HashChains:
    """Block-hash chains of simulated requests for one (block size, seed, trace block size).

    `chain(request)` returns the hashes of every full block of the request's prompt plus output;
    its first `shared_blocks(request)` are real chained hashes (they can match another request),
    the rest unique.
    """

    def __init__(self, block_size: int, seed: int, trace_block_size: int) -> None:
        if block_size < 1 or trace_block_size < 1:
            raise ValueError("block sizes must be at least 1")
        self.block_size = block_size
        self.seed = seed
        self.trace_block_size = trace_block_size
        # (parent node, hash id) -> (node id, hashes of the replica blocks that end inside it).
        self._trie: dict[tuple[int, int], tuple[int, tuple[int, ...]]] = {}
        # (shared hash ids, blocks wanted) -> `shared_hashes` of them: most requests share their
        # path with an earlier one (a system prompt), and a walk the trie has seen before only
        # reads it, so its result is kept rather than walked again (once per simulated request).
        self._paths: dict[tuple[tuple[int, ...], int], tuple[int, ...]] = {}
        self._next_unique = _UNIQUE_TOP

    def _tokens(self, hash_ids: Sequence[int], start: int, end: int) -> list[int]:
        # Synthetic tokens standing for positions start..end-1: position p of trace block
        # hash_ids[p // TB] is ((that id mod 2**40) * TB + p % TB).
        tb = self.trace_block_size
        return [(hash_ids[p // tb] % (1 << 40)) * tb + p % tb for p in range(start, end)]

    def shared_hashes(self, hash_ids: Sequence[int], prompt_tokens: int) -> list[int]:
        """Real chained hashes of the full replica blocks covered by the request's `hash_ids`."""
        bs, tb = self.block_size, self.trace_block_size
        covered = min(prompt_tokens, len(hash_ids) * tb)
        want = covered // bs
        out: list[int] = []
        node = 0
        parent = self.seed
        for depth, h in enumerate(hash_ids):
            if len(out) >= want:
                break
            key = (node, h)
            found = self._trie.get(key)
            if found is None:
                # Replica blocks that end within this trace block (end <= its last token).
                end_tok = (depth + 1) * tb
                hashes: list[int] = []
                first = len(out)
                block = first
                while (block + 1) * bs <= end_tok:
                    parent = block_hash(parent, self._tokens(hash_ids, block * bs, (block + 1) * bs))
                    hashes.append(parent)
                    block += 1
                found = (len(self._trie) + 1, tuple(hashes))
                self._trie[key] = found
            node, hashes_here = found
            out.extend(hashes_here)
            if out:
                parent = out[-1]
        return out[:want]

    def chain(self, request: SimRequest) -> tuple[list[int], int]:
        """(every full block's hash of prompt + output, how many leading ones are shared)."""
        ids = request.hash_ids[: request.shared_ids]
        if ids:
            # The blocks `shared_hashes` wants (the same arithmetic), for the key of its result.
            want = min(request.prompt_tokens, len(ids) * self.trace_block_size) // self.block_size
            key = (tuple(ids), want)
            known = self._paths.get(key)
            if known is None:
                known = self._paths[key] = tuple(self.shared_hashes(ids, request.prompt_tokens))
            shared = list(known)
        else:
            shared = []
        total = (request.prompt_tokens + request.output_tokens) // self.block_size
        n = total - len(shared)
        top = self._next_unique
        self._next_unique = top - n
        shared.extend(range(top, top - n, -1))
        return shared, total - n


def from_trace(
    rows: Sequence[TraceRequest], choose_expert: Callable[[TraceRequest], str]
) -> list[SimRequest]:
    """Trace rows as simulated requests, each with the expert `choose_expert` gives it, and how
    many of its leading `hash_ids` another request of the same expert shares."""
    experts = [choose_expert(r) for r in rows]
    # Count each prefix path (expert, id, id, ...) through a trie of node ids, then walk again.
    counts: dict[tuple[int, int], list[int]] = {}  # (parent node, id) -> [node id, requests through it]
    roots: dict[str, int] = {}
    for row, expert in zip(rows, experts, strict=True):
        node = roots.setdefault(expert, -len(roots) - 1)
        for h in row.hash_ids:
            entry = counts.get((node, h))
            if entry is None:
                entry = counts[(node, h)] = [len(counts) + 1, 0]
            entry[1] += 1
            node = entry[0]
    out: list[SimRequest] = []
    for row, expert in zip(rows, experts, strict=True):
        node = roots[expert]
        shared = 0
        for h in row.hash_ids:
            node_id, seen = counts[(node, h)]
            if seen < 2:
                break
            shared += 1
            node = node_id
        out.append(
            SimRequest(row.index, row.arrival_s, expert, row.input_tokens, row.output_tokens, row.hash_ids, shared)
        )
    return out


def expert_mix(weights: dict[str, float], seed: int = 0) -> Callable[[TraceRequest], str]:
    """An expert per row drawn by `weights` (seeded, so the same trace gets the same experts)."""
    if not weights or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"expert weights must be non-negative with a positive sum, got {weights}")
    names = sorted(weights)
    cum = list(itertools.accumulate(weights[n] for n in names))
    rng = random.Random(seed)

    def choose(_row: TraceRequest) -> str:
        x = rng.random() * cum[-1]
        for name, c in zip(names, cum, strict=True):
            if x < c:
                return name
        return names[-1]

    return choose


def parse_mix(text: str) -> dict[str, float]:
    """`name=weight,name=weight` (a bare name gets weight 1)."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, weight = part.partition("=")
        try:
            out[name.strip()] = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"bad expert weight {part!r}: use name=weight, e.g. bard-small=0.5") from None
    if not out:
        raise ValueError("no experts in the mix")
    return out


def assign_shared_prefixes(
    rows: Sequence[TraceRequest],
    groups: int,
    prefix_tokens: int,
    trace_block_size: int,
    zipf: float = 1.0,
    seed: int = 0,
) -> list[TraceRequest]:
    """Give each row a shared leading prefix (a system prompt) and unique rest, as `hash_ids`.

    Synthetic: the prefix is one of `groups` system prompts of `prefix_tokens` tokens, the k-th
    chosen with weight 1 / k**zipf (a few popular ones and a long tail, as applications sharing
    one service have). A prompt shorter than the prefix shares only what it covers, and always
    keeps its last token unique. Rows that already have `hash_ids` keep them.
    """
    if groups < 1 or prefix_tokens < 0 or trace_block_size < 1:
        raise ValueError("need groups >= 1, prefix_tokens >= 0 and trace_block_size >= 1")
    rng = random.Random(seed)
    weights = list(itertools.accumulate(1.0 / (k + 1) ** zipf for k in range(groups)))
    per_group = -(-prefix_tokens // trace_block_size)
    unique = itertools.count(1 << 41)
    out: list[TraceRequest] = []
    for row in rows:
        if row.hash_ids:
            out.append(row)
            continue
        x = rng.random() * weights[-1]
        group = next(i for i, c in enumerate(weights) if x < c)
        shared = min(per_group, (row.input_tokens - 1) // trace_block_size)
        ids = [group * per_group + i for i in range(shared)]
        total = -(-row.input_tokens // trace_block_size)
        ids += [next(unique) for _ in range(total - shared)]
        out.append(replace(row, hash_ids=tuple(ids)))
    return out
