"""The work-aware placement policies (prefix-load, predicted-latency) on hand-made views and real registries."""

from __future__ import annotations

import math
import random
from collections import Counter
from pathlib import Path

import pytest
from switchboard.common.experts_config import ExpertSLO
from switchboard.common.settings import ServerSettings, SettingsError, load_settings
from switchboard.replica.cost_model import CostModel
from switchboard.replica.hashing import hash_seed, prompt_block_hashes
from switchboard.scheduler.app import SchedulerApp
from switchboard.scheduler.config import DEFAULT_METRICS_PORT, DEFAULT_PORT, SERVER_PREFIX, SchedulerSettings
from switchboard.scheduler.placement import PlacementRequest, Placer
from switchboard.scheduler.policies import (
    DEFAULT_COST_MODEL,
    DEFAULT_PROMPT_TOKENS,
    MATCH_STEP_BLOCKS,
    POLICY_NAMES,
    PREDICTED_LATENCY,
    PREFIX_LOAD,
    LeastLoadedPolicy,
    PlacementQuery,
    PolicyOptions,
    PredictedLatencyPolicy,
    PrefixLoadPolicy,
    cached_prompt_tokens,
    estimate_queue,
    make_policy,
)
from switchboard.scheduler.prefix_index import KvEventIn, KvEventsIn, PrefixIndex
from switchboard.scheduler.registry import (
    LoadSnapshot,
    ReplicaInfo,
    ReplicaRegistry,
    ReplicaState,
    ReplicaView,
)

BLOCK = 16
SEED = hash_seed("model-a")
FAST = CostModel(base_ms=2.0, prefill_token_ms=0.02, decode_seq_ms=0.1, context_token_ms=0.0)
SLOW = CostModel(base_ms=10.0, prefill_token_ms=0.2, decode_seq_ms=1.0, context_token_ms=0.0)

rng = random.Random(7)
SHARED = tuple(rng.randrange(1, 50_000) for _ in range(1024))  # a popular system prompt: 64 blocks


def prompt(suffix_seed: int, shared: int = 1024, length: int = 1536) -> tuple[int, ...]:
    """`shared` tokens of the popular prefix, then a suffix of its own up to `length` tokens."""
    tail = random.Random(suffix_seed)
    return SHARED[:shared] + tuple(tail.randrange(1, 50_000) for _ in range(length - shared))


def index_of(*token_lists: tuple[int, ...]) -> PrefixIndex:
    """A prefix index (in sync) holding every full block of the given prompts."""
    index = PrefixIndex()
    hashes = [h for tokens in token_lists for h in prompt_block_hashes(tokens, BLOCK, SEED)]
    index.apply(KvEventsIn((KvEventIn(1, tuple(dict.fromkeys(hashes))),), reset=True))
    return index


def view(
    replica_id: str,
    *,
    cached: tuple[tuple[int, ...], ...] = (),
    inflight: int = 0,
    inflight_prompt: int = 0,
    inflight_max: int = 0,
    running: int = 0,
    waiting: int = 0,
    kv_used: int = 0,
    cost_model: CostModel | None = None,
    block_size: int = BLOCK,
    fingerprint: str = "",
) -> ReplicaView:
    """A hand-made view of a replica of expert "a" (KV pool of 100 blocks)."""
    info = ReplicaInfo(
        replica_id,
        "a",
        "10.0.0.1:50061",
        max_model_len=8192,
        kv_block_size=block_size,
        kv_hash_seed=SEED,
        tokenizer_fingerprint=fingerprint,
        cost_model=cost_model,
    )
    load = LoadSnapshot(running=running, waiting=waiting, kv_blocks_used=kv_used, kv_blocks_total=100)
    return ReplicaView(
        replica_id,
        "a",
        info,
        load,
        ReplicaState.READY,
        inflight,
        0.2,
        True,
        index_of(*cached) if cached else PrefixIndex(),
        inflight_prompt,
        inflight_max,
    )


def query(
    tokens: tuple[int, ...] = (), max_tokens: int = 64, request_id: str = "r", fingerprint: str = ""
) -> PlacementQuery:
    return PlacementQuery(
        request_id,
        "a",
        prompt_tokens=len(tokens),
        max_tokens=max_tokens,
        prompt_token_ids=tokens,
        tokenizer_fingerprint=fingerprint,
    )


def ids(ranked: list[ReplicaView]) -> list[str]:
    return [v.replica_id for v in ranked]


# --- the shared estimates ---------------------------------------------------------------------


def test_queue_estimate_counts_work_placed_since_the_heartbeat() -> None:
    # 6 in flight (6,000 prompt tokens, 600 output), the last heartbeat saw 2 running and 1 waiting:
    # 4 of the 6 are not admitted yet (placed since the heartbeat, or waiting).
    est = estimate_queue(
        view("a1", inflight=6, inflight_prompt=6000, inflight_max=600, running=2, waiting=1), 300, 30
    )
    assert (est.queued_requests, est.queued_prompt_tokens, est.decoding_seqs) == (4, 4000.0, 2)
    assert est.context_per_seq == 1000 + 50
    # Waiting work from elsewhere (more waiting than this scheduler has placed) counts too, sized by
    # the request being placed when nothing is in flight.
    est = estimate_queue(view("a2", waiting=3, running=1), 300, 30)
    assert (est.queued_requests, est.queued_prompt_tokens, est.decoding_seqs) == (3, 900.0, 1)


def test_cached_prompt_tokens_is_matched_blocks_times_block_size() -> None:
    tokens = prompt(1)
    assert cached_prompt_tokens(query(tokens), view("a1", cached=(SHARED,)), len(tokens)) == 1024
    assert (
        cached_prompt_tokens(query(tokens), view("a1", cached=(SHARED[:500],)), len(tokens)) == 496
    )  # 31 blocks
    assert cached_prompt_tokens(query(tokens), view("a1", cached=(tokens,)), len(tokens)) == 1536
    # No token ids, no block size, another tokenizer: no credit.
    assert cached_prompt_tokens(query(), view("a1", cached=(SHARED,)), 1536) == 0
    assert cached_prompt_tokens(query(tokens), view("a1", cached=(SHARED,), block_size=0), len(tokens)) == 0
    other = view("a1", cached=(SHARED,), fingerprint="tok-b")
    assert cached_prompt_tokens(query(tokens, fingerprint="tok-a"), other, len(tokens)) == 0
    assert cached_prompt_tokens(query(tokens, fingerprint="tok-b"), other, len(tokens)) == 1024


def test_the_request_chain_is_hashed_only_as_far_as_some_candidate_matches() -> None:
    tokens = prompt(1, length=2048)  # 128 blocks, the first 64 of them the shared prefix
    full = prompt_block_hashes(tokens, BLOCK, SEED)
    q = query(tokens)
    assert cached_prompt_tokens(q, view("a1", cached=(SHARED,)), len(tokens)) == 1024
    assert len(q._hashes[(BLOCK, SEED)]) == 64 + MATCH_STEP_BLOCKS  # one step past the match
    assert q._hashes[(BLOCK, SEED)] == full[: 64 + MATCH_STEP_BLOCKS]
    assert cached_prompt_tokens(q, view("a2", cached=(tokens,)), len(tokens)) == 2048
    assert q.block_hashes(BLOCK, SEED) == full  # completed, never hashed twice
    # The same count as matched_blocks on the whole chain, whatever the index holds.
    rng_ = random.Random(3)
    for _ in range(30):
        held = tokens[: rng_.randrange(0, 2049)]
        v = view("a3", cached=(held, prompt(rng_.randrange(99)))) if held else view("a3", cached=(prompt(5),))
        expected = v.prefix.matched_blocks(full) * BLOCK
        assert cached_prompt_tokens(query(tokens), v, len(tokens)) == expected


def test_an_index_that_dropped_hashes_is_matched_block_by_block() -> None:
    """Bisection needs every held block's parent held; the index's bound drops parents first, so
    such an index gets the exact walk (`matched_blocks`) instead."""
    tokens = prompt(1)
    full = prompt_block_hashes(tokens, BLOCK, SEED)
    index = PrefixIndex(max_hashes=90)
    index.apply(KvEventsIn((KvEventIn(1, tuple(full)),), reset=True))  # 96 blocks: the first 6 dropped
    assert index.dropped == 6 and index.matched_blocks(full) == 0
    v = view("a1")._replace(prefix=index)
    assert cached_prompt_tokens(query(tokens), v, len(tokens)) == 0
    whole = PrefixIndex()
    whole.apply(KvEventsIn((KvEventIn(1, tuple(full)),), reset=True))
    assert cached_prompt_tokens(query(tokens), view("a1")._replace(prefix=whole), len(tokens)) == 1536


def test_a_chain_given_by_the_caller_is_used_without_token_ids() -> None:
    tokens = prompt(1)
    given = PlacementQuery(
        "r", "a", prompt_tokens=len(tokens), _hashes={(BLOCK, SEED): prompt_block_hashes(tokens, BLOCK, SEED)}
    )
    assert given.prompt_blocks(BLOCK, SEED) == 96 and given.prompt_blocks(BLOCK, SEED + 1) == 0
    assert cached_prompt_tokens(given, view("a1", cached=(SHARED,)), len(tokens)) == 1024
    ranked = PrefixLoadPolicy().rank(given, [view("a1"), view("a2", cached=(SHARED,))])
    assert ids(ranked) == ["a2", "a1"]


# --- prefix-load ------------------------------------------------------------------------------


def test_prefix_load_a_cached_prefix_wins_at_equal_load() -> None:
    candidates = [
        view("a1", running=2),
        view("a2", running=2, cached=(SHARED[:256],)),
        view("a3", running=2, cached=(SHARED,)),
        view("a4", running=2, cached=(prompt(99),)),  # the same shared prefix plus another suffix
    ]
    ranked = ids(PrefixLoadPolicy().rank(query(prompt(1)), candidates))
    # a3 and a4 both hold the 1,024 shared tokens: the tie goes to the id; then the shorter match.
    assert ranked == ["a3", "a4", "a2", "a1"]


def test_prefix_load_trades_cached_tokens_against_extra_load() -> None:
    policy = PrefixLoadPolicy()  # load_weight 0.5: 1,024 cached tokens are worth 2,048 tokens of work
    tokens = prompt(1)
    near = [view("a1", cached=(SHARED,), inflight=1, inflight_prompt=2000), view("a2")]
    assert ids(policy.rank(query(tokens), near)) == ["a1", "a2"]  # 2,000 tokens ahead: still worth it
    far = [view("a1", cached=(SHARED,), inflight=1, inflight_prompt=2100), view("a2")]
    assert ids(policy.rank(query(tokens), far)) == ["a2", "a1"]  # 2,100: not any more
    # Decoding sequences are work too (32 prompt-token equivalents each by default).
    busy = [view("a1", cached=(SHARED,), running=70), view("a2")]
    assert ids(policy.rank(query(tokens), busy)) == ["a2", "a1"]


def test_prefix_load_guard_falls_back_to_the_least_loaded_when_imbalanced() -> None:
    long_prompt = SHARED * 8  # 8,192 tokens, all cached on a1
    hot = view("a1", cached=(long_prompt,), inflight=3, inflight_prompt=3 * 4000)  # 12,000 tokens queued
    candidates = [
        hot,
        view("a2", inflight=1, inflight_prompt=2500),
        view("a3", inflight=1, inflight_prompt=1000),
    ]
    # Without the guard the 8,192 cached tokens would outweigh 0.5 x 11,000 tokens of extra work.
    unguarded = PrefixLoadPolicy(balance_abs_tokens=1e9)
    assert ids(unguarded.rank(query(long_prompt), candidates))[0] == "a1"
    # With it a1 is 11,000 > 8,192 tokens over a3 and 12x its load: overloaded, ranked last.
    assert ids(PrefixLoadPolicy().rank(query(long_prompt), candidates)) == ["a3", "a2", "a1"]
    # Only past both thresholds: with a relative threshold of 20 the 12x is not imbalanced.
    assert ids(PrefixLoadPolicy(balance_rel=20.0).rank(query(long_prompt), candidates))[0] == "a1"


def test_prefix_load_overloaded_replicas_come_last_by_work_with_this_request() -> None:
    policy = PrefixLoadPolicy(balance_abs_tokens=100.0, balance_rel=1.0)
    tokens = prompt(1)
    candidates = [
        view("a1", inflight=1, inflight_prompt=1000),  # overloaded, would add 1,536 uncached tokens
        view("a2", inflight=1, inflight_prompt=1200, cached=(SHARED,)),  # overloaded, adds only 512
        view("a3"),
    ]
    # a2's work with this request (1,200 + 512) is below a1's (1,000 + 1,536).
    assert ids(policy.rank(query(tokens), candidates)) == ["a3", "a2", "a1"]


def test_prefix_load_without_token_ids_is_least_work_first() -> None:
    candidates = [
        view("a1", cached=(SHARED,), inflight=2, inflight_prompt=3000),  # its cache cannot count
        view("a2", inflight=2, inflight_prompt=600),
        view("a3", running=4),  # 4 decoding: 128 token-equivalents
        view("a4", waiting=1),  # one waiting request of unknown size: the default prompt
        view("a5", inflight=1, running=1, inflight_prompt=1000),  # admitted: only decoding
    ]
    ranked = ids(PrefixLoadPolicy().rank(query(max_tokens=0), candidates))
    assert ranked == ["a5", "a3", "a4", "a2", "a1"]
    assert DEFAULT_PROMPT_TOKENS == 256  # a4's 256 sits between a3's 128 and a2's 600
    # Same with a block size nobody announced.
    no_blocks = [view(v.replica_id, cached=(SHARED,), block_size=0) for v in candidates[:2]]
    assert ids(PrefixLoadPolicy().rank(query(prompt(1)), no_blocks)) == ["a1", "a2"]  # equal: by id


def test_prefix_load_ties_go_by_work_then_kv_utilization_then_id() -> None:
    policy = PrefixLoadPolicy()
    same = [view(f"a{n}", running=1) for n in (3, 1, 4, 2)]
    assert ids(policy.rank(query(prompt(1)), same)) == ["a1", "a2", "a3", "a4"]
    kv = [view("a1", kv_used=50), view("a2", kv_used=10)]
    assert ids(policy.rank(query(prompt(1)), kv)) == ["a2", "a1"]
    assert policy.rank(query(), []) == []
    single = [view("a9")]
    assert policy.rank(query(prompt(1)), single) == single


def registry_with_cache(replicas: int, cached_on: str, **info_fields: object) -> ReplicaRegistry:
    """Replicas a0..a{n-1} of expert "a"; `cached_on` holds the popular prefix."""
    registry = ReplicaRegistry(expiry_seconds=3600.0)
    for n in range(replicas):
        rid = f"a{n}"
        registry.register(
            ReplicaInfo(
                rid, "a", f"10.0.0.{n + 1}:50061", kv_block_size=BLOCK, kv_hash_seed=SEED, **info_fields
            ),  # type: ignore[arg-type]
            LoadSnapshot(kv_blocks_total=1000),
        )
        if rid == cached_on:
            hashes = tuple(prompt_block_hashes(SHARED, BLOCK, SEED))
            registry.apply_kv_events(rid, KvEventsIn((KvEventIn(1, hashes),), reset=True))
    return registry


@pytest.mark.parametrize("name", [PREFIX_LOAD, PREDICTED_LATENCY])
def test_a_burst_with_a_popular_prefix_is_not_all_sent_to_one_replica(name: str) -> None:
    """Placements between heartbeats: only `inflight` and its token sums move, and they spread the burst."""
    registry = registry_with_cache(4, "a2", cost_model=FAST)
    placer = Placer(registry, make_policy(name), ["a"])
    chosen = []
    for i in range(16):
        tokens = prompt(i)
        result = placer.place(PlacementRequest(f"r{i}", ("a",), len(tokens), 64, prompt_token_ids=tokens))
        assert result.primary is not None
        chosen.append(result.primary.replica.replica_id)
    counts = Counter(chosen)
    assert chosen[0] == "a2"  # the cached replica takes the first one
    assert counts["a2"] >= 2 and set(counts) == {"a0", "a1", "a2", "a3"}  # favoured, but not all
    assert counts["a2"] <= 8
    # A least-loaded policy spreads it evenly and ignores the cache.
    registry = registry_with_cache(4, "a2")
    placer = Placer(registry, LeastLoadedPolicy(), ["a"])
    first = placer.place(PlacementRequest("x", ("a",), prompt_token_ids=prompt(0))).primary
    assert first is not None and first.replica.replica_id == "a0"


# --- predicted-latency ------------------------------------------------------------------------


def test_predicted_latency_follows_its_formulas() -> None:
    model = CostModel(base_ms=4.0, prefill_token_ms=0.1, decode_seq_ms=0.5, context_token_ms=0.001)
    policy = PredictedLatencyPolicy(step_tokens=512)
    tokens = prompt(1)  # 1,536 tokens, 1,024 cached
    v = view(
        "a1",
        cost_model=model,
        cached=(SHARED,),
        inflight=3,
        inflight_prompt=3000,
        inflight_max=300,
        running=2,
    )
    p = policy.predict(query(tokens, max_tokens=100), v)
    # q = 3 - 2 = 1 queued (1,000 tokens), D = 2 decoding at 1,000 + 50 context each.
    prefill = 1000 + (1536 - 1024)
    steps = math.ceil(prefill / (512 - 2))
    ttft = steps * (4.0 + 0.5 * 2 + 0.001 * 2 * 1050) + 0.1 * prefill
    tpot = 4.0 + 0.5 * 4 + 0.001 * (3 * 1050 + 1536 + 50)
    assert p.cached_tokens == 1024
    assert p.ttft_ms == pytest.approx(ttft) and p.tpot_ms == pytest.approx(tpot)


def test_predicted_latency_prefers_the_replica_that_meets_the_slo() -> None:
    tokens = prompt(1)
    # a1: a fast replica behind a queue of 8 long prompts; a2: a slower one, idle.
    queued = view("a1", cost_model=FAST, inflight=8, inflight_prompt=8 * 8000, running=0)
    idle = view("a2", cost_model=SLOW)
    fast_p = PredictedLatencyPolicy().predict(query(tokens), queued)
    slow_p = PredictedLatencyPolicy().predict(query(tokens), idle)
    assert fast_p.ttft_ms > 1000.0 > slow_p.ttft_ms  # a1 misses a 1 s TTFT objective, a2 meets it
    assert slow_p.tpot_ms > fast_p.tpot_ms
    with_slo = PredictedLatencyPolicy({"a": ExpertSLO(ttft_seconds=1.0)})
    assert ids(with_slo.rank(query(tokens), [queued, idle])) == ["a2", "a1"]
    # A TPOT objective only the fast replica meets makes it the better one despite its queue.
    tight_tpot = PredictedLatencyPolicy({"a": ExpertSLO(ttft_seconds=2.0, tpot_seconds=0.005)})
    assert ids(tight_tpot.rank(query(tokens), [queued, idle])) == ["a1", "a2"]
    # Without an SLO: the lower TTFT + 16 x TPOT.
    assert ids(PredictedLatencyPolicy().rank(query(tokens), [queued, idle])) == ["a2", "a1"]
    # Another expert's SLO does not apply.
    assert ids(
        PredictedLatencyPolicy({"b": ExpertSLO(tpot_seconds=0.005)}).rank(query(tokens), [queued, idle])
    ) == [
        "a2",
        "a1",
    ]


def test_predicted_latency_counts_the_cache_hit() -> None:
    tokens = SHARED * 4  # 4,096 tokens
    cached = view("a1", cost_model=SLOW, cached=(tokens,), running=1)
    cold = view("a2", cost_model=SLOW)
    policy = PredictedLatencyPolicy({"a": ExpertSLO(ttft_seconds=0.5)})
    assert ids(policy.rank(query(tokens), [cold, cached])) == ["a1", "a2"]
    # Without token ids there is no hit to count: the idle replica wins.
    assert ids(policy.rank(query(max_tokens=64), [cold, cached])) == ["a2", "a1"]


def test_predicted_latency_without_a_cost_model_borrows_a_siblings_or_the_default() -> None:
    tokens = prompt(1)
    policy = PredictedLatencyPolicy()
    announced = view("a2", cost_model=SLOW)
    silent = view("a1", inflight=1, inflight_prompt=500)
    # a1 is predicted with a2's (slow) model, not the default.
    borrowed = policy.predict(query(tokens), silent, SLOW)
    assert borrowed == policy.predict(
        query(tokens), view("a1", cost_model=SLOW, inflight=1, inflight_prompt=500)
    )
    assert ids(policy.rank(query(tokens), [silent, announced])) == ["a2", "a1"]
    # None announced: the default model; the order is still by work.
    none = [view("a1", inflight=2, inflight_prompt=2000), view("a2", running=3), view("a3")]
    assert ids(policy.rank(query(tokens), none)) == ["a3", "a2", "a1"]
    assert policy.predict(query(tokens), none[2]).ttft_ms == pytest.approx(
        DEFAULT_COST_MODEL.step_ms(0, 0, 0) * math.ceil(1536 / 512)
        + DEFAULT_COST_MODEL.prefill_token_ms * 1536
    )


def test_predicted_latency_ties_go_to_the_replica_id() -> None:
    same = [view(f"a{n}", cost_model=FAST, running=2) for n in (2, 4, 1, 3)]
    for policy in (PredictedLatencyPolicy(), PredictedLatencyPolicy({"a": ExpertSLO(ttft_seconds=1.0)})):
        assert ids(policy.rank(query(prompt(1)), same)) == ["a1", "a2", "a3", "a4"]
        assert policy.rank(query(), []) == []


@pytest.mark.parametrize("name", [PREFIX_LOAD, PREDICTED_LATENCY])
def test_work_aware_policies_rank_every_candidate_once_and_are_deterministic(name: str) -> None:
    candidates = [
        view(
            f"a{n}",
            cached=(prompt(n),) if n % 2 else (),
            inflight=n % 3,
            inflight_prompt=700 * (n % 3),
            running=n % 4,
            waiting=n % 2,
            cost_model=FAST if n % 3 else None,
        )
        for n in range(12)
    ]
    policy = make_policy(name, slos={"a": ExpertSLO(ttft_seconds=0.2, tpot_seconds=0.01)})
    for i in range(8):
        q = query(prompt(i), request_id=f"r{i}")
        ranked = policy.rank(q, candidates)
        assert sorted(ids(ranked)) == sorted(ids(candidates))
        assert all(any(r is c for c in candidates) for r in ranked)
        assert ids(policy.rank(q, list(reversed(candidates)))) == ids(ranked)


# --- make_policy and the settings ---------------------------------------------------------------


def test_make_policy_knows_the_new_names_and_options() -> None:
    assert POLICY_NAMES[-2:] == (PREFIX_LOAD, PREDICTED_LATENCY)
    options = PolicyOptions(
        prefix_load_weight=1.0,
        prefix_balance_abs_tokens=100.0,
        prefix_balance_rel=2.0,
        latency_step_tokens=256,
        latency_tpot_weight=4.0,
    )
    prefix = make_policy("prefix-load", options=options)
    assert isinstance(prefix, PrefixLoadPolicy) and prefix.name == "prefix-load"
    assert (prefix.load_weight, prefix.balance_abs_tokens, prefix.balance_rel) == (1.0, 100.0, 2.0)
    slos = {"a": ExpertSLO(ttft_seconds=1.0), "b": None}
    latency = make_policy("predicted-latency", slos=slos, options=options)
    assert isinstance(latency, PredictedLatencyPolicy) and latency.name == "predicted-latency"
    assert dict(latency.slos) == slos and (latency.step_tokens, latency.tpot_weight) == (256, 4.0)
    with pytest.raises(ValueError, match=r"unknown placement policy 'prefix'; choose one of .*prefix-load"):
        make_policy("prefix")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (PolicyOptions(prefix_balance_rel=0.5), "balance_rel: must be a finite number >= 1"),
        (PolicyOptions(prefix_load_weight=-1.0), "load_weight: must be a finite number >= 0"),
        (PolicyOptions(prefix_balance_abs_tokens=math.nan), "balance_abs_tokens: must be a finite number"),
        (PolicyOptions(latency_step_tokens=0), "step_tokens: must be a positive integer"),
        (PolicyOptions(latency_tpot_weight=math.inf), "tpot_weight: must be a finite number"),
    ],
)
def test_make_policy_refuses_bad_options(options: PolicyOptions, message: str) -> None:
    name = PREDICTED_LATENCY if "step" in message or "tpot" in message else PREFIX_LOAD
    with pytest.raises(ValueError, match=message):
        make_policy(name, options=options)


def load(environ: dict[str, str]) -> SchedulerSettings:
    return load_settings(
        SchedulerSettings,
        server_prefix=SERVER_PREFIX,
        default_port=DEFAULT_PORT,
        default_metrics_port=DEFAULT_METRICS_PORT,
        environ=environ,
    )


def test_policy_settings_from_the_environment() -> None:
    assert load({}).policy_options() == PolicyOptions()
    settings = load(
        {
            "SCHEDULER_PLACEMENT_POLICY": "Prefix-Load",
            "SCHEDULER_PREFIX_LOAD_WEIGHT": "1.5",
            "SCHEDULER_PREFIX_BALANCE_ABS_TOKENS": "4096",
            "SCHEDULER_PREFIX_BALANCE_REL": "2",
            "SCHEDULER_LATENCY_STEP_TOKENS": "1024",
            "SCHEDULER_LATENCY_TPOT_WEIGHT": "0",
        }
    )
    assert settings.placement_policy == "prefix-load"
    assert settings.policy_options() == PolicyOptions(1.5, 4096.0, 2.0, 1024, 0.0)


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"SCHEDULER_PREFIX_BALANCE_REL": "0.9"}, "SCHEDULER_PREFIX_BALANCE_REL"),
        ({"SCHEDULER_PREFIX_LOAD_WEIGHT": "-0.1"}, "SCHEDULER_PREFIX_LOAD_WEIGHT"),
        ({"SCHEDULER_PREFIX_LOAD_WEIGHT": "nan"}, "SCHEDULER_PREFIX_LOAD_WEIGHT"),
        ({"SCHEDULER_PREFIX_BALANCE_ABS_TOKENS": "lots"}, "SCHEDULER_PREFIX_BALANCE_ABS_TOKENS"),
        ({"SCHEDULER_LATENCY_STEP_TOKENS": "0"}, "SCHEDULER_LATENCY_STEP_TOKENS"),
        ({"SCHEDULER_LATENCY_STEP_TOKENS": "1.5"}, "SCHEDULER_LATENCY_STEP_TOKENS"),
        ({"SCHEDULER_LATENCY_TPOT_WEIGHT": "nan"}, "SCHEDULER_LATENCY_TPOT_WEIGHT"),
    ],
)
def test_bad_policy_settings_name_the_variable(environ: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        load(environ)


async def test_the_app_passes_slos_and_options_to_the_policy() -> None:
    # SchedulerApp makes asyncio objects: build it on the running loop, as the service does.
    settings = SchedulerSettings(
        server=ServerSettings(port=0, metrics_port=0),
        placement_policy=PREDICTED_LATENCY,
        latency_step_tokens=128,
        experts_config=Path("unused.yaml"),
    )
    slos = {"a": ExpertSLO(ttft_seconds=0.5, tpot_seconds=0.05)}
    policy = SchedulerApp(settings, ["a"], slos=slos).servicer.policy
    assert isinstance(policy, PredictedLatencyPolicy)
    assert dict(policy.slos) == slos and policy.step_tokens == 128
    prefix = SchedulerApp(
        SchedulerSettings(
            server=ServerSettings(port=0, metrics_port=0),
            placement_policy=PREFIX_LOAD,
            prefix_balance_rel=3.0,
        ),
        ["a"],
    ).servicer.policy
    assert isinstance(prefix, PrefixLoadPolicy) and prefix.balance_rel == 3.0
