"""Scheduler placement benchmark: decision time of every placement policy against least-loaded.

Times `Placer.place` (validate, one `ClusterSnapshot` of the registry, the policy's ranking of each
requested expert, the result, the reservation of the primary: what the `Place` handler calls) at 8,
64 and 256 replicas spread evenly over 4 experts, p50/p99 per policy. The peer is `least-loaded`
(the default policy) over the same registry, measured in the same run; ratios are policy / peer.
Also times `ReplicaRegistry.snapshot()` alone, the part of the decision that grows with the cluster.

Each request names two candidate experts (as the router sends them) with 2 alternates and carries
realistic prompt token ids (`Workload`): the next turn of one of 256 live conversations, its whole
history, 1,024-2,048 tokens, 80% of them starting with one of 16 shared system prompts (256-1,024
tokens); and an output budget of 64-512 tokens. Every replica announces a block size of 16, its
expert's hash seed and (7 in 8 of them) a step-cost model; its prefix index starts with 4 system
prompts and 24 finished conversations and, at every heartbeat, stores the blocks of the prompts
placed on it since the last one (KV events, untimed), so the work-aware policies match real chains:
the system prompt on many replicas, a conversation's earlier turns where they ran. `--hot` draws
from a fixed pool of 512 prompts instead, soon cached whole on every replica: the worst case, where
every candidate's match walks the whole 64-128-block chain. A request
is completed (untimed) one replica-count of placements after it was placed, so about one request
is in flight per replica and the in-flight token sums are never empty. Between blocks every
replica reports a new load (untimed), as heartbeats would. Policies alternate in blocks over the
run, because the machine is shared and noisy. Also times the hash chain of one prompt alone
(`PlacementQuery.block_hashes`, once per expert in a Place that needs it).

Run: .venv/bin/python bench/scheduler_bench.py [--iterations N] [--sizes 8,64,256] [--json OUT] [--quick] [--hot]
Target (issue "Scheduler I"): decision p99 <= 1 ms at 64 replicas; printed, not asserted.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import random
import time
from collections import deque
from pathlib import Path
from typing import Any

from bench_common import machine, quantiles_ms
from switchboard.common.experts_config import ExpertSLO
from switchboard.replica.cost_model import CostModel
from switchboard.replica.hashing import extend_block_hashes, hash_seed, prompt_block_hashes
from switchboard.scheduler.learned_policy import LearnedPlacementPolicy, PolicyNetwork
from switchboard.scheduler.placement import PlacementRequest, Placer
from switchboard.scheduler.policies import (
    LEARNED,
    LEAST_LOADED,
    POLICY_NAMES,
    PlacementPolicy,
    PlacementQuery,
    make_policy,
)
from switchboard.scheduler.prefix_index import KvEventIn, KvEventsIn
from switchboard.scheduler.registry import LoadSnapshot, ReplicaInfo, ReplicaRegistry

EXPERTS = ("expert-0", "expert-1", "expert-2", "expert-3")
DEFAULT_SIZES = (8, 64, 256)
TARGET_REPLICAS, TARGET_P99_MS = 64, 1.0
BLOCK = 200  # decisions of one policy before the next policy's turn
KV_BLOCKS = 1000
SEED = 1234
BLOCK_SIZE = 16
VOCAB = 50_000
SYSTEM_PROMPTS = 16
POOL = 512  # prompts of the --hot workload
LIVE = 256  # conversations going on at a time
MAX_KV_HASHES = 4096  # per report (prefix_index.MAX_KV_HASHES_PER_REPORT)
# Objectives for half the experts, so predicted-latency ranks by headroom there and by latency elsewhere.
SLOS = {EXPERTS[0]: ExpertSLO(ttft_seconds=0.5, tpot_seconds=0.05), EXPERTS[1]: ExpertSLO(ttft_seconds=1.0)}


class Conversation:
    """One chat: its prompt so far (a system prompt, then turns) and each expert's hash chain of it."""

    def __init__(self, rng: random.Random, systems: list[list[int]]) -> None:
        head = list(rng.choice(systems)) if rng.random() < 0.8 else []
        first = rng.randrange(1024, 1537)  # system prompt + the first user message
        self.tokens = head + [rng.randrange(1, VOCAB) for _ in range(max(first - len(head), 16))]
        self.chains: dict[str, list[int]] = {}

    def chain(self, expert: str, seed: int, length: int) -> list[int]:
        """The block hashes of the first `length` tokens for `expert`'s replicas (each block hashed once)."""
        chain = self.chains.setdefault(expert, [])
        extend_block_hashes(chain, self.tokens[:length], BLOCK_SIZE, seed)
        return chain[: length // BLOCK_SIZE]


class Workload:
    """The requests' prompts, the chains replicas store, and every replica's KV-event sequence.

    Default: `LIVE` conversations at a time; a request continues a random one (its whole history
    is the prompt, 1,024-2,048 tokens) and the conversation then grows by 128-512 tokens (the reply
    and the next message); past 2,048 tokens it ends and a new one starts. 80% of conversations
    start with one of 16 system prompts (256-1,024 tokens), shared by every replica's cache.
    `hot`: a fixed pool of 512 such prompts drawn again and again, so after a while every replica
    caches every prompt whole (the worst case for matching: every candidate walks the full chain).
    """

    def __init__(self, rng: random.Random, hot: bool = False) -> None:
        self.rng = rng
        self.hot = hot
        self.systems = [
            [rng.randrange(1, VOCAB) for _ in range(rng.randrange(256, 1025))] for _ in range(SYSTEM_PROMPTS)
        ]
        self.seeds = {expert: hash_seed(expert) for expert in EXPERTS}
        self.live = [self._grown(Conversation(rng, self.systems)) for _ in range(POOL if hot else LIVE)]
        self.sequence: dict[str, int] = {}
        # replica id -> (conversation, prompt length) placed on it since its last heartbeat
        self.placed: dict[str, list[tuple[Conversation, int]]] = {}

    def _grown(self, conversation: Conversation) -> Conversation:
        """A fixed-pool prompt is a conversation of 1,024-2,048 tokens that never grows."""
        if self.hot:
            target = self.rng.randrange(1024, 2049)
            extra = target - len(conversation.tokens)
            conversation.tokens += [self.rng.randrange(1, VOCAB) for _ in range(max(extra, 0))]
        return conversation

    def next_request(self) -> tuple[Conversation, tuple[int, ...]]:
        """The next request's conversation and prompt (the conversation moves on)."""
        rng = self.rng
        slot = rng.randrange(len(self.live))
        conversation = self.live[slot]
        prompt = tuple(conversation.tokens)
        if not self.hot:
            conversation.tokens += [rng.randrange(1, VOCAB) for _ in range(rng.randrange(128, 513))]
            if len(conversation.tokens) > 2048:
                self.live[slot] = Conversation(rng, self.systems)
        return conversation, prompt

    def warm(self, expert: str) -> list[int]:
        """What a replica caches at the start: 4 system prompts and 24 finished conversations."""
        seed = self.seeds[expert]
        hashes = [h for system in self.rng.sample(self.systems, 4) for h in prompt_block_hashes(system, BLOCK_SIZE, seed)]
        for _ in range(24):
            old = self.rng.choice(self.live) if self.hot else self._grown(Conversation(self.rng, self.systems))
            hashes += old.chain(expert, seed, len(old.tokens))
        return hashes

    def store(self, registry: ReplicaRegistry, replica_id: str, hashes: list[int], reset: bool = False) -> None:
        """One KV report storing `hashes` (capped at one report's bound)."""
        unique = tuple(dict.fromkeys(hashes))[:MAX_KV_HASHES]
        sequence = self.sequence.get(replica_id, 0) + 1
        self.sequence[replica_id] = sequence
        registry.apply_kv_events(replica_id, KvEventsIn((KvEventIn(sequence, unique),), reset=reset))


def cost_model(rng: random.Random) -> CostModel:
    """A plausible fitted step-cost model, with some spread between replicas."""
    return CostModel(
        base_ms=rng.uniform(4.0, 8.0), prefill_token_ms=rng.uniform(0.03, 0.08),
        decode_seq_ms=rng.uniform(0.1, 0.4), context_token_ms=rng.uniform(0.0002, 0.001),
    )


def random_load(rng: random.Random) -> LoadSnapshot:
    """A plausible heartbeat: a few running and waiting sequences, part of the KV pool in use."""
    return LoadSnapshot(
        running=rng.randrange(0, 16), waiting=rng.randrange(0, 4),
        kv_blocks_used=rng.randrange(0, KV_BLOCKS), kv_blocks_total=KV_BLOCKS,
        tokens_per_second=rng.uniform(50.0, 500.0),
    )


def build_registry(replicas: int, rng: random.Random, work: Workload) -> ReplicaRegistry:
    """`replicas` replicas spread evenly over the experts, with random loads and warm prefix indexes;
    none ever expires here."""
    registry = ReplicaRegistry(expiry_seconds=3600.0)
    for n in range(replicas):
        expert = EXPERTS[n % len(EXPERTS)]
        rid = f"{expert}-r{n:03d}"
        registry.register(
            ReplicaInfo(rid, expert, f"10.0.{n // 250}.{n % 250 + 1}:50061",
                        device="cuda:0", model_name=expert, max_model_len=4096,
                        kv_block_size=BLOCK_SIZE, kv_hash_seed=work.seeds[expert],
                        cost_model=None if n % 8 == 7 else cost_model(rng)),
            random_load(rng),
        )
        warm = work.warm(expert)
        work.store(registry, rid, warm[:MAX_KV_HASHES], reset=True)
        work.store(registry, rid, warm[MAX_KV_HASHES:])
    return registry


def heartbeat(registry: ReplicaRegistry, rng: random.Random, work: Workload) -> None:
    """Every replica reports a new load and stores the blocks of the prompts placed on it since the last one."""
    for record in registry.replicas():
        registry.report_load(record.replica_id, random_load(rng))
        placed = work.placed.pop(record.replica_id, [])
        if placed:
            seed = work.seeds[record.expert]
            hashes = [h for conversation, length in placed for h in conversation.chain(record.expert, seed, length)]
            work.store(registry, record.replica_id, hashes)


# Every heuristic, and the learned policy (issue 17) with an untrained network of the trained size:
# its decision cost (features + numpy MLP) does not depend on the weights, and no file is needed.
BENCH_POLICIES = (*POLICY_NAMES, LEARNED)


def bench_policy(name: str) -> PlacementPolicy:
    """The policy `name` as the scheduler would make it (the learned one with random weights)."""
    if name == LEARNED:
        return LearnedPlacementPolicy(network=PolicyNetwork.random(SEED, hidden=32), slos=SLOS)
    return make_policy(name, seed=SEED, slos=SLOS)


def measure(replicas: int, iterations: int, warmup: int, hot: bool = False) -> dict[str, Any]:
    """Place and snapshot samples of every policy at one cluster size."""
    rng = random.Random(SEED + replicas)
    work = Workload(rng, hot)
    registry = build_registry(replicas, rng, work)
    placers = {name: Placer(registry, bench_policy(name), EXPERTS) for name in BENCH_POLICIES}
    clock = time.perf_counter
    samples: dict[str, list[float]] = {name: [] for name in BENCH_POLICIES}
    samples["snapshot"] = []
    samples["hashes"] = []
    counter = 0
    in_flight: deque[str] = deque()

    def place(placer: Placer) -> float:
        nonlocal counter
        counter += 1
        first = EXPERTS[counter % len(EXPERTS)]
        second = EXPERTS[(counter + 1) % len(EXPERTS)]
        conversation, tokens = work.next_request()
        max_tokens = rng.randrange(64, 513)
        request = PlacementRequest(
            request_id=f"req-{counter}", experts=(first, second), prompt_tokens=len(tokens),
            max_tokens=max_tokens, max_alternates=2, min_model_len=len(tokens) + max_tokens,
            prompt_token_ids=tokens,
        )
        t = clock()
        result = placer.place(request)
        seconds = clock() - t
        assert result.primary is not None
        work.placed.setdefault(result.primary.replica.replica_id, []).append((conversation, len(tokens)))
        in_flight.append(request.request_id)
        if len(in_flight) > replicas:
            registry.complete(in_flight.popleft())
        return seconds

    for placer in placers.values():
        for _ in range(warmup):
            place(placer)
    done = 0
    while done < iterations:
        heartbeat(registry, rng, work)
        gc.collect()
        block = min(BLOCK, iterations - done)
        # Rotate which policy goes first, so none always runs right after the heartbeat.
        order = list(BENCH_POLICIES)
        shift = (done // BLOCK) % len(order)
        for name in order[shift:] + order[:shift]:
            for _ in range(block):
                samples[name].append(place(placers[name]))
        for _ in range(block):
            t = clock()
            registry.snapshot()
            samples["snapshot"].append(clock() - t)
        for _ in range(block):
            query = PlacementQuery("h", EXPERTS[0], prompt_token_ids=tuple(rng.choice(work.live).tokens[:2048]))
            t = clock()
            query.block_hashes(BLOCK_SIZE, work.seeds[EXPERTS[0]])
            samples["hashes"].append(clock() - t)
        done += block
    return {name: quantiles_ms(s) for name, s in samples.items()}


def main(argv: list[str] | None = None) -> int:
    """Measure every size and print one table per size."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=5000, help="timed decisions per policy and size")
    parser.add_argument("--sizes", default=",".join(str(n) for n in DEFAULT_SIZES),
                        help="replica counts, comma-separated (spread over 4 experts)")
    parser.add_argument("--json", type=Path, default=None, help="also write every number here")
    parser.add_argument("--quick", action="store_true", help="few iterations (a smoke run; the numbers mean little)")
    parser.add_argument("--hot", action="store_true",
                        help="the worst case for prefix matching: a fixed pool of 512 prompts, soon cached whole everywhere")
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    iterations, warmup = (300, 50) if args.quick else (args.iterations, 500)

    started = datetime.datetime.now(datetime.UTC)
    results: dict[str, Any] = {
        "machine": machine(), "python": platform.python_version(), "date": started.isoformat(timespec="seconds"),
        "iterations": iterations, "warmup": warmup, "experts": len(EXPERTS), "quick": args.quick,
        "workload": {"kind": "hot" if args.hot else "conversations", "prompt_tokens": [1024, 2048],
                     "max_tokens": [64, 512], "block_size": BLOCK_SIZE, "system_prompts": SYSTEM_PROMPTS,
                     "live_conversations": LIVE, "hot_pool": POOL, "slos": sorted(SLOS)},
        "sizes": {},
    }
    print(f"machine: {results['machine']}; Python {results['python']}; {results['date']}")
    print(f"Placer.place (snapshot + policy + result + reservation), {iterations} decisions per policy and size, "
          f"2 candidate experts and 2 alternates per request, {len(EXPERTS)} experts, 1,024-2,048-token prompts "
          f"with shared prefixes ({'hot pool' if args.hot else 'conversations'}), warm prefix indexes; ms; "
          f"peer = {LEAST_LOADED}")
    print("| replicas | policy | p50 | p99 | max | ratio policy / peer p50 / p99 | target p99 |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for replicas in sizes:
        stats = measure(replicas, iterations, warmup, args.hot)
        peer = stats[LEAST_LOADED]
        entry: dict[str, Any] = {"snapshot": stats["snapshot"], "policies": {}}
        for name in BENCH_POLICIES:
            s = stats[name]
            ratio = {k: s[k] / peer[k] for k in ("p50", "p99")}
            met = None
            cell = ""
            if replicas == TARGET_REPLICAS:
                met = s["p99"] <= TARGET_P99_MS
                cell = f"<= {TARGET_P99_MS:g} ({'met' if met else 'MISSED'})"
            entry["policies"][name] = {**s, "ratio_over_peer": ratio, "target_met": met}
            label = f"{name} (peer)" if name == LEAST_LOADED else name
            print(f"| {replicas} | {label} | {s['p50']:.4f} | {s['p99']:.4f} | {s['max']:.3f} | "
                  f"{ratio['p50']:.2f}x / {ratio['p99']:.2f}x | {cell} |")
        snap = stats["snapshot"]
        share = snap["p50"] / peer["p50"]
        entry["snapshot_share_of_peer_p50"] = share
        print(f"| {replicas} | snapshot() alone | {snap['p50']:.4f} | {snap['p99']:.4f} | {snap['max']:.3f} | "
              f"{share:.0%} of the peer's p50 | |")
        hashes = stats["hashes"]
        entry["hashes"] = hashes
        print(f"| {replicas} | block_hashes() of one prompt alone | {hashes['p50']:.4f} | {hashes['p99']:.4f} | "
              f"{hashes['max']:.3f} | | |")
        results["sizes"][str(replicas)] = entry
    results["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    print(f"load average after: {' '.join(f'{x:.2f}' for x in results['load_average_after'] or [])}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
