"""Scheduler and block-pool behaviour without a model: budgets, chunking, preemption order, prefix hits."""

from __future__ import annotations

import torch
from switchboard.generator.engine.kv_cache import BlockPool, block_hash, prompt_block_hashes
from switchboard.generator.engine.scheduler import Scheduler, Sequence, SequenceStatus
from switchboard.generator.sampling import SamplingParams


def make_seq(arrival: int, prompt: list[int]) -> Sequence:
    """A waiting sequence with greedy parameters."""
    return Sequence(
        request_id=f"r{arrival}",
        arrival=arrival,
        prompt_len=len(prompt),
        token_ids=list(prompt),
        params=SamplingParams(max_tokens=8, temperature=0.0),
        generator=torch.Generator(),
    )


def run_plan(scheduler: Scheduler) -> list[tuple[str, int]]:
    """Schedule one step, pretend it ran, and append a sampled token where a sequence completed."""
    plan = scheduler.schedule()
    for seq, n in plan.entries:
        scheduler.after_step(seq, n)
        if seq.num_computed == len(seq.token_ids):
            seq.token_ids.append(7)
    return [(seq.request_id, n) for seq, n in plan.entries]


def test_chunked_prefill_never_starves_decodes() -> None:
    """Under a token budget a decoding sequence runs every step while a long prompt is chunked."""
    scheduler = Scheduler(BlockPool(64), 4, max_num_seqs=8, max_tokens_per_step=8, enable_prefix_caching=False)
    scheduler.add(make_seq(1, [1, 2, 3]))
    assert run_plan(scheduler) == [("r1", 3)]
    scheduler.add(make_seq(2, list(range(10, 40))))  # 30 tokens
    steps = [run_plan(scheduler) for _ in range(5)]
    assert steps[0] == [("r1", 1), ("r2", 7)]
    assert all(step[0] == ("r1", 1) for step in steps)
    assert sum(n for step in steps for rid, n in step if rid == "r2") == 30


def test_newest_running_sequence_is_preempted_and_requeued_first() -> None:
    """When blocks run out the newest running sequence gives its blocks back and waits at the head."""
    pool = BlockPool(4)
    scheduler = Scheduler(pool, 4, max_num_seqs=8, max_tokens_per_step=64, enable_prefix_caching=False)
    old, new = make_seq(1, [1, 2, 3, 4, 5, 6, 7]), make_seq(2, [9, 9, 9, 9, 9, 9, 9])
    scheduler.add(old)
    scheduler.add(new)
    run_plan(scheduler)  # both prefill 7 tokens: 2 blocks each, pool full
    assert pool.num_free == 0
    run_plan(scheduler)  # both decode their 8th token into their own second block
    plan = scheduler.schedule()  # the 9th token needs a third block: the newer one yields
    assert [s.request_id for s, _ in plan.entries] == ["r1"]
    assert plan.preempted == [new] and new.status is SequenceStatus.WAITING
    assert scheduler.waiting[0] is new and new.block_table == [] and new.num_computed == 0
    assert scheduler.num_preemptions == 1


def test_prefix_hit_skips_cached_blocks_but_computes_the_last_token() -> None:
    """A prompt whose full blocks are cached starts after them; an identical prompt still computes one token."""
    pool = BlockPool(16)
    scheduler = Scheduler(pool, 4, max_num_seqs=8, max_tokens_per_step=64, enable_prefix_caching=True)
    prompt = list(range(1, 13))  # 3 full blocks
    first = make_seq(1, prompt)
    scheduler.add(first)
    run_plan(scheduler)
    assert first.block_hashes == prompt_block_hashes(prompt, 4)
    scheduler.finish(first, "length")
    again = make_seq(2, prompt)
    longer = make_seq(3, [*prompt, 50, 51])
    scheduler.add(again)
    scheduler.add(longer)
    assert run_plan(scheduler) == [("r2", 4), ("r3", 2)]
    assert again.cached_prompt_tokens == 8 and longer.cached_prompt_tokens == 12
    assert again.block_table[:2] == longer.block_table[:2]
    assert pool.refcount[longer.block_table[0]] == 2


def test_block_hashes_chain_on_the_whole_prefix() -> None:
    """The same block content after a different prefix hashes differently."""
    a = prompt_block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4)
    b = prompt_block_hashes([9, 9, 9, 9, 5, 6, 7, 8], 4)
    assert a[1] != b[1]
    assert a[0] == block_hash(0, [1, 2, 3, 4])
    assert 0 <= a[1] < 2**64
