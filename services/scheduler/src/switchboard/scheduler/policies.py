"""Placement policies: rank one expert's candidate replicas for a request, best first.

A policy is a function of the request (`PlacementQuery`), the candidates (frozen `ReplicaView`s of
one `ClusterSnapshot`: the healthy, untried, long-enough replicas of one expert) and the policy's own
small state (a round-robin cursor, a seeded RNG). It returns every candidate exactly once, best
first: the first becomes the expert's choice and the next ones its alternates. It never reads the
registry, so it cannot see half-updated state, and a simulator or a learned policy gets the same
input by building views of its own.

`SCHEDULER_PLACEMENT_POLICY` picks one of `POLICY_NAMES` through `make_policy`. Besides the
load-only policies there are two that read the request's prompt: `prefix-load` (cached prompt
tokens against a load penalty, with a guard against hot spots) and `predicted-latency` (TTFT and
TPOT predicted from each replica's step-cost model, ranked by SLO headroom). Both measure a
replica's load in work (`estimate_queue`), not only in requests.
"""

from __future__ import annotations

import bisect
import heapq
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple, Protocol

from switchboard.common.experts_config import ExpertSLO
from switchboard.replica.cost_model import CostModel
from switchboard.replica.hashing import extend_block_hashes
from switchboard.scheduler.prefix_index import PrefixIndex
from switchboard.scheduler.registry import ReplicaView

LEAST_LOADED = "least-loaded"
LEAST_OUTSTANDING = "least-outstanding"
ROUND_ROBIN = "round-robin"
POWER_OF_TWO = "power-of-two"
PREFIX_LOAD = "prefix-load"
PREDICTED_LATENCY = "predicted-latency"
# The values of SCHEDULER_PLACEMENT_POLICY; the first is the default.
POLICY_NAMES = (LEAST_LOADED, LEAST_OUTSTANDING, ROUND_ROBIN, POWER_OF_TWO, PREFIX_LOAD, PREDICTED_LATENCY)

# The size assumed for a request whose size nobody gave (no token ids, no prompt_tokens/max_tokens):
# a short chat turn. Only ever compared against other estimates made the same way.
DEFAULT_PROMPT_TOKENS = 256
DEFAULT_OUTPUT_TOKENS = 128
# How many more blocks of a request's hash chain to hash when a candidate matches all hashed so far.
MATCH_STEP_BLOCKS = 16
# The step-cost model `predicted-latency` assumes for an expert none of whose candidates announced
# one: the order of magnitude of a small model on one GPU (200 ms per 4k-token prefill, 5 ms base
# step). Replicas should announce their own profile (the generator's profiler fits it).
DEFAULT_COST_MODEL = CostModel(base_ms=5.0, prefill_token_ms=0.05, decode_seq_ms=0.2, context_token_ms=0.0005)


@dataclass(frozen=True)
class PlacementQuery:
    """What a policy knows about the request being placed.

    `prompt_token_ids` (empty when the prompt was not tokenized upstream) come from the tokenizer
    named by `tokenizer_fingerprint`; `block_hashes` hashes them the way a replica's prefix cache
    does, once per (block size, seed) however many candidates share it, and `prefix_hashes` only
    as far as asked (a request that no candidate caches past its system prompt is never hashed
    whole). A caller that has the chains already (a simulator) may hand them over in `_hashes`.
    """

    request_id: str
    expert: str
    prompt_tokens: int = 0
    max_tokens: int = 0
    prompt_token_ids: tuple[int, ...] = ()
    tokenizer_fingerprint: str = ""
    _hashes: dict[tuple[int, int], list[int]] = field(default_factory=dict, compare=False, repr=False)

    def block_hashes(self, block_size: int, seed: int) -> list[int]:
        """The hash chain of the prompt's full blocks for a replica with this block size and seed."""
        return self.prefix_hashes(block_size, seed, self.prompt_blocks(block_size, seed))

    def prefix_hashes(self, block_size: int, seed: int, blocks: int) -> list[int]:
        """The chain of at least the prompt's first `blocks` full blocks (all, when it has fewer).

        Hashed on demand and kept, so asking again or further never hashes a block twice; the list
        may be longer than asked (an earlier question went further, or the caller gave the chain).
        """
        if block_size <= 0:
            return []
        key = (block_size, seed)
        hashes = self._hashes.get(key)
        if hashes is None:
            hashes = self._hashes[key] = []
        ids = self.prompt_token_ids
        end = min(blocks, len(ids) // block_size) * block_size
        if len(hashes) * block_size < end:
            extend_block_hashes(hashes, ids[:end], block_size, seed)
        return hashes

    def prompt_blocks(self, block_size: int, seed: int) -> int:
        """Full blocks in the prompt: from its token ids, else the length of a chain the caller gave."""
        if block_size <= 0:
            return 0
        if self.prompt_token_ids:
            return len(self.prompt_token_ids) // block_size
        return len(self._hashes.get((block_size, seed), ()))


class PlacementPolicy(Protocol):
    """Ranks candidate replicas for one request, best first.

    A policy whose state should move only when a request is really placed (round-robin's cursor)
    may also define `placed(query, replica)`: `Placer.place` calls it with the chosen primary.
    """

    name: str

    def rank(self, query: PlacementQuery, candidates: Sequence[ReplicaView]) -> list[ReplicaView]:
        """Return the candidates ordered best first (the same views, each once, none added)."""
        ...


def _by_id(view: ReplicaView) -> str:
    return view.replica_id


@dataclass(frozen=True)
class LeastLoadedPolicy:
    """Least-loaded first: the walking-skeleton policy of issue 2, and the default.

    score = inflight_weight * inflight + running_weight * running + waiting_weight * waiting

    `inflight` (placed, not yet completed) reacts at once to every placement, while running and
    waiting come from the replica's last heartbeat; a request that has reached its replica is
    counted by both, equally on every replica, so the ranking stays fair. Waiting sequences weigh
    more than running ones because they have not even been admitted to the batch. Ties go to the
    replica with the lower KV-cache utilization (more room for long prompts), then to the replica
    id, so the order is deterministic.
    """

    inflight_weight: float = 1.0
    running_weight: float = 1.0
    waiting_weight: float = 2.0
    name: str = LEAST_LOADED

    def score(self, replica: ReplicaView) -> float:
        """The load score of one replica (lower is better)."""
        load = replica.load
        return (
            self.inflight_weight * replica.inflight
            + self.running_weight * load.running
            + self.waiting_weight * load.waiting
        )

    def key(self, replica: ReplicaView) -> tuple[float, float, str]:
        """The sort key: score, then KV utilization, then replica id."""
        return (self.score(replica), replica.load.kv_utilization, replica.replica_id)

    def rank(self, query: PlacementQuery, candidates: Sequence[ReplicaView]) -> list[ReplicaView]:
        """Order candidates by load score, then KV utilization, then replica id."""
        if type(self).key is not LeastLoadedPolicy.key or type(self).score is not LeastLoadedPolicy.score:
            return sorted(candidates, key=self.key)  # a subclass scores its own way
        # `key` with `score` and `kv_utilization` inlined (the same arithmetic, so the same order):
        # one Python call per candidate instead of three, on every Place.
        inflight_w, running_w, waiting_w = self.inflight_weight, self.running_weight, self.waiting_weight

        def key(replica: ReplicaView) -> tuple[float, float, str]:
            load = replica.load
            total = load.kv_blocks_total
            return (
                inflight_w * replica.inflight + running_w * load.running + waiting_w * load.waiting,
                load.kv_blocks_used / total if total > 0 else 0.0,
                replica.replica_id,
            )

        return sorted(candidates, key=key)

    def top(self, candidates: Sequence[ReplicaView], n: int) -> list[ReplicaView]:
        """The first `n` of `rank(query, candidates)` (it never reads the query), without sorting
        every candidate: `Placer.place` only keeps the primary and `max_alternates` more, and most
        requests ask for no alternates, so one pass for the minimum replaces the sort and its key
        tuples. Keys are unique (the replica id is last), so the minimum is `rank`'s first."""
        if n != 1 or type(self).key is not LeastLoadedPolicy.key or type(self).score is not LeastLoadedPolicy.score:
            # `heapq.nsmallest` is documented as `sorted(...)[:n]`, the same views in the same order.
            return heapq.nsmallest(n, candidates, key=self.key)
        inflight_w, running_w, waiting_w = self.inflight_weight, self.running_weight, self.waiting_weight
        best: ReplicaView | None = None
        best_score = best_util = 0.0
        for replica in candidates:
            load = replica.load
            score = inflight_w * replica.inflight + running_w * load.running + waiting_w * load.waiting
            if best is not None and score > best_score:
                continue  # the usual case: decided by the score alone, no utilization computed
            total = load.kv_blocks_total
            util = load.kv_blocks_used / total if total > 0 else 0.0
            # `key(replica) < key(best)`, compared field by field as the tuples would be.
            if (
                best is None
                or score < best_score
                or util < best_util
                or (util == best_util and replica.replica_id < best.replica_id)
            ):
                best, best_score, best_util = replica, score, util
        return [] if best is None else [best]


@dataclass(frozen=True)
class LeastOutstandingPolicy:
    """Fewest in-flight placements first (what this scheduler itself counts, never a stale heartbeat).

    Ties go to the lower KV-cache utilization, then to the replica id.
    """

    name: str = LEAST_OUTSTANDING

    @staticmethod
    def key(replica: ReplicaView) -> tuple[int, float, str]:
        """The sort key: in-flight count, then KV utilization, then replica id."""
        return (replica.inflight, replica.load.kv_utilization, replica.replica_id)

    def rank(self, query: PlacementQuery, candidates: Sequence[ReplicaView]) -> list[ReplicaView]:
        """Order candidates by in-flight count, then KV utilization, then replica id."""
        return sorted(candidates, key=self.key)


class RoundRobinPolicy:
    """Each expert's replicas in turn, by id: the one after the last placed, wrapping around.

    The cursor per expert is the id of the replica last placed on (moved by `placed`, so `plan` and
    the fallback experts of a request do not move it). Starting after that id, not at an index,
    skips draining and excluded replicas and stays fair when replicas come and go. The alternates
    follow in the same cyclic order.
    """

    name = ROUND_ROBIN

    def __init__(self) -> None:
        self._last: dict[str, str] = {}

    def rank(self, query: PlacementQuery, candidates: Sequence[ReplicaView]) -> list[ReplicaView]:
        """The candidates by id, rotated to start after the expert's last placed replica."""
        ordered = sorted(candidates, key=_by_id)
        last = self._last.get(query.expert)
        if last is None:
            return ordered
        start = bisect.bisect_right([v.replica_id for v in ordered], last)
        return ordered[start:] + ordered[:start]

    def placed(self, query: PlacementQuery, replica: ReplicaView) -> None:
        """Move the expert's cursor to the replica just placed on."""
        self._last[query.expert] = replica.replica_id


class PowerOfTwoPolicy:
    """Power of two choices: two candidates drawn at random, the less loaded of them first.

    "Less loaded" is `LeastLoadedPolicy.key` (score, KV utilization, id), so the choice is never
    the worse of the two draws; the other candidates follow, least loaded first, as alternates.
    The draws come from the policy's own RNG seeded with `seed` (SCHEDULER_PLACEMENT_SEED), over
    the candidates ordered by id, so the same seed and the same calls give the same placements.
    Two random draws avoid the herd that a strict least-loaded choice sends to one replica when
    the load numbers it ranks by are stale.
    """

    name = POWER_OF_TWO

    def __init__(self, seed: int = 0, scorer: LeastLoadedPolicy | None = None) -> None:
        self.seed = seed
        self._rng = random.Random(seed)
        self._key = (scorer or LeastLoadedPolicy()).key

    def rank(self, query: PlacementQuery, candidates: Sequence[ReplicaView]) -> list[ReplicaView]:
        """The better of two random draws first, then every other candidate by load."""
        key = self._key
        n = len(candidates)
        if n < 2:
            return list(candidates)
        by_id = sorted(candidates, key=_by_id)
        first = self._rng.randrange(n)
        second = self._rng.randrange(n - 1)
        if second >= first:
            second += 1  # two distinct candidates
        winner = min(by_id[first], by_id[second], key=key)
        rest = sorted((v for v in by_id if v is not winner), key=key)
        return [winner, *rest]


# --- work-aware policies ------------------------------------------------------------------------


class QueueEstimate(NamedTuple):
    """What a replica has to do before a new request's first token, estimated from its view.

    With n = `inflight`, P = `inflight_prompt_tokens`, M = `inflight_max_tokens`, R = `load.running`
    and W = `load.waiting` (R and W from the last heartbeat, the rest exact and current):

        queued_requests      q = max(W, n - R, 0)
        queued_prompt_tokens Q = q * mean prompt       mean prompt = P / n
        decoding_seqs        D = R
        context_per_seq      c = mean prompt + mean output / 2      mean output = M / n

    Which in-flight prompts are not yet prefilled is not known exactly: the replica reported W
    sequences waiting and R running, and every request placed since that heartbeat is not in
    either count yet, so at least n - R of the in-flight requests (or W, whichever is more; W also
    counts work from elsewhere) still wait for their prefill. They are taken at the in-flight mean
    prompt length and counted in full, with no cache hit: their hits are not known (an over-estimate
    where they share a prefix). The R running sequences take a token of every step's budget each
    and weigh on its time through their context, taken at the mean prompt plus half the mean output
    budget. A replica with nothing in flight is sized with the request being placed (`prompt` and
    `output` of `estimate_queue`), so its W waiting sequences still count as work.

    A named tuple, as `ReplicaView`: one is built per candidate on every Place.
    """

    queued_requests: int
    queued_prompt_tokens: float
    decoding_seqs: int
    context_per_seq: float


def estimate_queue(view: ReplicaView, prompt: int, output: int) -> QueueEstimate:
    """The `QueueEstimate` of one candidate; `prompt`/`output` size requests of unknown size."""
    n = view.inflight
    load = view.load
    running = load.running
    mean_prompt = view.inflight_prompt_tokens / n if n and view.inflight_prompt_tokens > 0 else float(prompt)
    mean_output = view.inflight_max_tokens / n if n and view.inflight_max_tokens > 0 else float(output)
    queued = max(load.waiting, n - running, 0)
    return QueueEstimate(queued, queued * mean_prompt, running, mean_prompt + mean_output / 2)


def request_size(query: PlacementQuery) -> tuple[int, int]:
    """(prompt tokens, output tokens) of the request: its token ids or counts, else the defaults."""
    prompt = len(query.prompt_token_ids) or query.prompt_tokens or DEFAULT_PROMPT_TOKENS
    return prompt, query.max_tokens or DEFAULT_OUTPUT_TOKENS


def cached_prompt_tokens(query: PlacementQuery, view: ReplicaView, prompt: int) -> int:
    """Prompt tokens the replica already caches: its matched prefix blocks x its block size.

    0 when the request came without token ids (or hash chain), the replica announced no block
    size, its index is empty, or the token ids were made by another tokenizer than the replica's
    (both fingerprints known and different: the ids would mean other text there).

    The count is `index.matched_blocks` of the request's chain, found faster (this is most of a
    Place's time at 64 replicas with 1-2k-token prompts, see bench/scheduler_bench.py):

    - the chain is hashed `MATCH_STEP_BLOCKS` at a time, and only further while this replica (or
      an earlier candidate) holds all of it so far, so a prompt cached nowhere past its system
      prompt is never hashed whole;
    - the held run is found by bisection (about 8 lookups instead of one per block). That is exact
      when the index holds a block only with its parent, which a replica's events guarantee: blocks
      are stored in chain order (a block is hashed only after its parent), freed tail first (so
      evicted children first), and a reset is a whole, prefix-closed cache. The index's own bound
      breaks it (it drops the oldest hashes first, parents before children): an index that has
      dropped any (`dropped > 0`) is walked block by block with `matched_blocks` instead.
    """
    info = view.info
    index = view.prefix
    block_size = info.kv_block_size
    if block_size <= 0 or index is None or not len(index):
        return 0
    theirs, ours = info.tokenizer_fingerprint, query.tokenizer_fingerprint
    if theirs and ours and theirs != ours:
        return 0
    seed = info.kv_hash_seed
    total = query.prompt_blocks(block_size, seed)
    depth = 0
    exact = index.dropped > 0
    while depth < total:
        chain = query.prefix_hashes(block_size, seed, depth + MATCH_STEP_BLOCKS)
        if exact:
            depth += index.matched_blocks(chain[depth:] if depth else chain)
        else:
            depth = _leading_run(index, chain, depth)
        if depth < len(chain) or len(chain) >= total:
            break  # a miss, or the whole prompt matched
    return min(depth * block_size, prompt)


def _leading_run(index: PrefixIndex, chain: list[int], held: int) -> int:
    """How many leading hashes of `chain` the index holds, knowing it holds the first `held`, by
    bisection (exact when the index holds a block only with its parent: `cached_prompt_tokens`)."""
    lo, hi = held, len(chain)
    if lo >= hi or chain[hi - 1] in index:
        return hi
    if lo == 0 and chain[0] not in index:
        return 0
    hi -= 1  # chain[hi] is not held; the answer is in [lo, hi]
    while lo < hi:
        mid = (lo + hi) // 2
        if chain[mid] in index:
            lo = mid + 1
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class PrefixLoadPolicy:
    """Prefix-cache-aware placement with a load penalty and a guard against hot spots.

    For each candidate i, with `cached_i` the prompt tokens it already caches (matched prefix
    blocks x block size, `cached_prompt_tokens`) and `load_i` its work in tokens:

        load_i  = Q_i + decode_seq_tokens * D_i                    (`estimate_queue`)
        score_i = cached_i - load_weight * (load_i - min_j load_j)
        after_i = load_i + (prompt - cached_i)      its work with this request, whose cached part
                                                    is no prefill work

    and candidate i is overloaded when both

        load_i - min_j load_j > balance_abs_tokens   and   load_i > balance_rel * min_j load_j

    Order: the candidates that are not overloaded by score (highest first), then the overloaded
    ones by `after` (least first); ties go to the smaller `after`, the lower KV-cache utilization,
    then the replica id. The least-loaded candidate is never overloaded, so once the replica with
    a popular prefix runs that far ahead of the least loaded one it stops taking traffic until the
    others catch up: one replica never takes all of it, however long the shared prefix. With no
    token ids (or no block size, or empty indexes) every `cached_i` is 0 and the order is the
    least work first: a load-aware policy in tokens.

    Why these terms: the score is minus the tokens this request waits for and computes on i,
    (prompt - cached_i) + load_weight * load_i, up to a constant (as Dynamo's KV router costs
    overlap against active blocks); `load_weight` below 1 favours the cache, because the queue
    estimate counts queued prompts in full (their own cache hits are unknown) and a hit also saves
    the cluster the prefill. The guard is SGLang's cache-aware router's (absolute and relative
    imbalance thresholds), applied per candidate in tokens of work rather than to the whole pool in
    requests, so one straggler does not switch caching off for every other replica. `load_i` reacts
    at once to every placement (through `inflight` and its token sums), so a burst with one prefix
    spreads before any heartbeat says the favoured replica is busy.
    """

    load_weight: float = 0.5
    balance_abs_tokens: float = 8192.0
    balance_rel: float = 1.5
    decode_seq_tokens: float = 32.0
    name: str = PREFIX_LOAD

    def __post_init__(self) -> None:
        _check_finite("load_weight", self.load_weight, 0.0)
        _check_finite("balance_abs_tokens", self.balance_abs_tokens, 0.0)
        _check_finite("balance_rel", self.balance_rel, 1.0)
        _check_finite("decode_seq_tokens", self.decode_seq_tokens, 0.0)

    def load_tokens(self, view: ReplicaView, prompt: int) -> float:
        """The candidate's work in tokens (`load_i` above; `estimate_queue`'s Q and D, inlined)."""
        n = view.inflight
        load = view.load
        running = load.running
        queued = max(load.waiting, n - running, 0)
        if queued:
            mean_prompt = view.inflight_prompt_tokens / n if n and view.inflight_prompt_tokens > 0 else prompt
            return queued * mean_prompt + self.decode_seq_tokens * running
        return self.decode_seq_tokens * running

    def rank(self, query: PlacementQuery, candidates: Sequence[ReplicaView]) -> list[ReplicaView]:
        """Not-overloaded candidates by score, then overloaded ones by work (see the class docstring)."""
        if len(candidates) < 2:
            return list(candidates)
        prompt, _ = request_size(query)
        load_tokens = self.load_tokens
        rows = [
            (view, load_tokens(view, prompt), cached_prompt_tokens(query, view, prompt))
            for view in candidates
        ]
        least = min(load for _, load, _ in rows)
        limit = max(least + self.balance_abs_tokens, least * self.balance_rel)
        weight = self.load_weight

        def key(row: tuple[ReplicaView, float, int]) -> tuple[int, float, float, float, str]:
            view, load, cached = row
            after = load + (prompt - cached)
            if load > limit:
                return (1, after, after, view.load.kv_utilization, view.replica_id)
            return (0, weight * (load - least) - cached, after, view.load.kv_utilization, view.replica_id)

        return [row[0] for row in sorted(rows, key=key)]


class LatencyPrediction(NamedTuple):
    """One candidate's predicted time to first token and time per output token (ms)."""

    ttft_ms: float
    tpot_ms: float
    cached_tokens: int


class PredictedLatencyPolicy:
    """Predicted latency: TTFT and TPOT per candidate from its step-cost model, ranked by SLO headroom.

    Per candidate, with the `QueueEstimate` (q queued requests, Q queued prompt tokens, D decoding
    sequences, c context per sequence), this request's `prompt` and `output` tokens, `cached` the
    prompt tokens the candidate caches, B = `step_tokens` (the replicas' token budget per engine
    step, GENERATOR_MAX_TOKENS_PER_STEP) and `step_ms` its cost model:

        T     = Q + max(prompt - cached, 1)       tokens prefilled before this request's first
                                                  token (first come first served; at least the
                                                  last prompt token is computed)
        steps = ceil(T / max(B - D, 1))           decodes take a token of each step's budget first
        TTFT  = steps * step_ms(0, D, D * c) + step_ms(T, 0, 0) - step_ms(0, 0, 0)
        TPOT  = step_ms(0, D + q + 1, (D + q) * c + prompt + output / 2)

    TTFT is the sum of the chunked-prefill steps' times for a linear model (each step's base and
    decode cost, plus every prefill token once); TPOT is one decode step of the batch once the
    queue has joined it. Both assume the decoding batch stays as it is meanwhile, and leave out
    prefill chunks of later requests interleaved with this one's decodes.

    Order, with the expert's objectives (`slos[query.expert]`, from the experts config; seconds):
    by headroom, largest first, where

        headroom = min over its objectives of (objective - prediction) / objective

    so every candidate predicted to meet all objectives comes before any that misses one, and the
    tightest objective decides (relative, so TTFT and TPOT are on one scale). Without objectives:
    by TTFT + tpot_weight * TPOT, least first (TPOT counted for `tpot_weight` output tokens). Ties:
    lower predicted TTFT, then TPOT, then the replica id.

    A candidate that announced no cost model is predicted with the model of the expert's first
    candidate (by id) that did (replicas of one expert run the same model), else with
    `default_cost_model` (DEFAULT_COST_MODEL): the order is then still load- and cache-aware in
    work, the absolute headroom only as good as that default.
    """

    name = PREDICTED_LATENCY

    def __init__(
        self,
        slos: Mapping[str, ExpertSLO | None] | None = None,
        step_tokens: int = 512,
        tpot_weight: float = 16.0,
        default_cost_model: CostModel = DEFAULT_COST_MODEL,
    ) -> None:
        if isinstance(step_tokens, bool) or not isinstance(step_tokens, int) or step_tokens < 1:
            raise ValueError(
                f"step_tokens: must be a positive integer (tokens per engine step), got {step_tokens!r}"
            )
        _check_finite("tpot_weight", tpot_weight, 0.0)
        self.slos: Mapping[str, ExpertSLO | None] = MappingProxyType(dict(slos or {}))
        self.step_tokens = step_tokens
        self.tpot_weight = float(tpot_weight)
        self.default_cost_model = default_cost_model

    def predict(
        self, query: PlacementQuery, view: ReplicaView, cost_model: CostModel | None = None
    ) -> LatencyPrediction:
        """The prediction for one candidate (with `cost_model` when it announced none)."""
        prompt, output = request_size(query)
        return self._predict(view, cost_model, prompt, output, cached_prompt_tokens(query, view, prompt))

    def _predict(
        self, view: ReplicaView, cost_model: CostModel | None, prompt: int, output: int, cached: int
    ) -> LatencyPrediction:
        model = view.info.cost_model or cost_model or self.default_cost_model
        queued, queued_tokens, decoding, context = estimate_queue(view, prompt, output)
        prefill = queued_tokens + max(prompt - cached, 1)
        steps = math.ceil(prefill / max(self.step_tokens - decoding, 1))
        step_ms = model.step_ms
        ttft = steps * step_ms(0, decoding, decoding * context) + step_ms(prefill, 0, 0) - step_ms(0, 0, 0)
        others = decoding + queued
        tpot = step_ms(0, others + 1, others * context + prompt + output / 2)
        return LatencyPrediction(max(ttft, 0.0), max(tpot, 0.0), cached)

    def rank(self, query: PlacementQuery, candidates: Sequence[ReplicaView]) -> list[ReplicaView]:
        """Candidates by SLO headroom (or predicted latency without an SLO), best first."""
        if len(candidates) < 2:
            return list(candidates)
        announced = min((v for v in candidates if v.info.cost_model is not None), key=_by_id, default=None)
        sibling = announced.info.cost_model if announced is not None else None
        slo = self.slos.get(query.expert)
        ttft_goal = slo.ttft_seconds * 1000.0 if slo is not None and slo.ttft_seconds else None
        tpot_goal = slo.tpot_seconds * 1000.0 if slo is not None and slo.tpot_seconds else None
        weight = self.tpot_weight
        prompt, output = request_size(query)
        predict = self._predict

        def key(view: ReplicaView) -> tuple[float, float, float, str]:
            p = predict(view, sibling, prompt, output, cached_prompt_tokens(query, view, prompt))
            if ttft_goal is None and tpot_goal is None:
                return (p.ttft_ms + weight * p.tpot_ms, p.ttft_ms, p.tpot_ms, view.replica_id)
            headroom = math.inf
            if ttft_goal is not None:
                headroom = (ttft_goal - p.ttft_ms) / ttft_goal
            if tpot_goal is not None:
                headroom = min(headroom, (tpot_goal - p.tpot_ms) / tpot_goal)
            return (-headroom, p.ttft_ms, p.tpot_ms, view.replica_id)

        return sorted(candidates, key=key)


def _check_finite(name: str, value: float, minimum: float) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < minimum
    ):
        raise ValueError(f"{name}: must be a finite number >= {minimum:g}, got {value!r}")


@dataclass(frozen=True)
class PolicyOptions:
    """The tunable settings of the work-aware policies (SCHEDULER_PREFIX_* and SCHEDULER_LATENCY_*).

    `prefix_load_weight`, `prefix_balance_abs_tokens`, `prefix_balance_rel`: `PrefixLoadPolicy`'s
    load_weight, balance_abs_tokens and balance_rel; `latency_step_tokens`, `latency_tpot_weight`:
    `PredictedLatencyPolicy`'s step_tokens and tpot_weight. Checked when a policy is made from them.
    """

    prefix_load_weight: float = 0.5
    prefix_balance_abs_tokens: float = 8192.0
    prefix_balance_rel: float = 1.5
    latency_step_tokens: int = 512
    latency_tpot_weight: float = 16.0
    policy_file: str = ""  # `learned`: its policy file (SCHEDULER_POLICY_FILE)


def make_policy(
    name: str,
    seed: int = 0,
    *,
    slos: Mapping[str, ExpertSLO | None] | None = None,
    options: PolicyOptions | None = None,
) -> PlacementPolicy:
    """The policy named `name` (one of POLICY_NAMES).

    `seed` seeds the random ones; `slos` (expert -> objectives, from the experts config) and
    `options` configure the work-aware ones. Raises ValueError for an unknown name or a bad option
    (the message names it).
    """
    opts = options or PolicyOptions()
    if name == LEAST_LOADED:
        return LeastLoadedPolicy()
    if name == LEAST_OUTSTANDING:
        return LeastOutstandingPolicy()
    if name == ROUND_ROBIN:
        return RoundRobinPolicy()
    if name == POWER_OF_TWO:
        return PowerOfTwoPolicy(seed)
    if name == PREFIX_LOAD:
        return PrefixLoadPolicy(
            load_weight=opts.prefix_load_weight,
            balance_abs_tokens=opts.prefix_balance_abs_tokens,
            balance_rel=opts.prefix_balance_rel,
        )
    if name == PREDICTED_LATENCY:
        return PredictedLatencyPolicy(
            slos, step_tokens=opts.latency_step_tokens, tpot_weight=opts.latency_tpot_weight
        )
    if name == LEARNED:  # issue 17: the learned policy, in its own module (it falls back to prefix-load)
        from switchboard.scheduler.learned_policy import make_learned_policy

        return make_learned_policy(opts.policy_file, slos=slos, options=opts)
    raise ValueError(f"unknown placement policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")


# The learned placement policy (issue 17, `learned_policy.py`): an MLP over the candidates' features,
# read from a policy file (`PolicyOptions.policy_file`), ranking with prefix-load while it has none.
# Not in POLICY_NAMES (the heuristics, which need no file); SCHEDULER_PLACEMENT_POLICY takes either.
LEARNED = "learned"
SELECTABLE_POLICY_NAMES = (*POLICY_NAMES, LEARNED)
