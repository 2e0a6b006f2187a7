"""Scheduler driven by a fake model runner: token budget, chunked prefill, preemption, prefix hits.

The runner is not part of this package, so a stand-in is legitimate here: it returns, for
every request the step samples, a token that is a pure function of that request's tokens so
far (as a greedy model's would be), so recomputing a preempted request reproduces its output.
"""

from __future__ import annotations

from switchboard.replica import (
    BlockPool,
    ModelRunnerOutput,
    Request,
    RequestStatus,
    Scheduler,
    SchedulerOutput,
    hash_seed,
    prompt_block_hashes,
)


def fake_token(token_ids: list[int]) -> int:
    """A deterministic "next token" of a token history."""
    return (sum((i + 1) * t for i, t in enumerate(token_ids)) % 89) + 10


def fake_runner(output: SchedulerOutput) -> ModelRunnerOutput:
    """Sample a token for every request this step brings up to date."""
    sampled = [s for s in output.scheduled if s.sample]
    return ModelRunnerOutput(tuple(s.request_id for s in sampled), tuple(fake_token(s.request.token_ids) for s in sampled))


def make(arrival: int, prompt: list[int], max_tokens: int = 8) -> Request:
    return Request(f"r{arrival}", arrival, len(prompt), list(prompt), max_tokens=max_tokens)


def run_to_completion(scheduler: Scheduler, requests: list[Request], max_steps: int = 1000) -> list[SchedulerOutput]:
    for r in requests:
        scheduler.add(r)
    steps = []
    while scheduler.has_work():
        out = scheduler.schedule()
        assert not out.is_empty
        scheduler.update(out, fake_runner(out))
        steps.append(out)
        assert len(steps) < max_steps
    return steps


def reference(prompt: list[int], max_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(fake_token(tokens))
    return tokens[len(prompt) :]


def test_every_step_keeps_the_token_budget_and_the_sequence_cap() -> None:
    scheduler = Scheduler(BlockPool(256), 4, max_num_seqs=3, max_tokens_per_step=12, enable_prefix_caching=False)
    requests = [make(i, list(range(i, i + 5 + 3 * i)), max_tokens=4) for i in range(1, 7)]
    steps = run_to_completion(scheduler, requests)
    assert all(0 < out.num_scheduled_tokens <= 12 for out in steps)
    assert all(len(out.scheduled) <= 3 for out in steps)
    for r in requests:
        assert r.status is RequestStatus.FINISHED and r.finish_reason == "length"
        assert r.token_ids[r.prompt_len :] == reference(r.token_ids[: r.prompt_len], 4)
    assert scheduler.pool.num_used == 0


def test_a_long_prompt_is_prefilled_in_chunks_while_decodes_run_every_step() -> None:
    scheduler = Scheduler(BlockPool(64), 4, max_num_seqs=8, max_tokens_per_step=8, enable_prefix_caching=False)
    short = make(1, [1, 2, 3], max_tokens=20)
    scheduler.add(short)
    first = scheduler.schedule()
    assert [(s.request_id, s.num_new_tokens, s.sample) for s in first.scheduled] == [("r1", 3, True)]
    scheduler.update(first, fake_runner(first))
    long = make(2, list(range(10, 40)), max_tokens=2)  # 30 tokens
    scheduler.add(long)
    chunks = []
    for _ in range(5):
        out = scheduler.schedule()
        assert out.scheduled[0].request_id == "r1" and out.scheduled[0].num_new_tokens == 1  # decode first
        for s in out.scheduled[1:]:
            assert s.request_id == "r2" and s.new_token_ids == tuple(long.token_ids[s.num_computed_tokens :][: s.num_new_tokens])
            assert s.block_ids == tuple(long.block_table)
            chunks.append((s.num_computed_tokens, s.num_new_tokens, s.sample))
        scheduler.update(out, fake_runner(out))
    assert chunks == [(0, 7, False), (7, 7, False), (14, 7, False), (21, 7, False), (28, 2, True)]
    assert long.num_generated == 1


def test_preemption_recomputes_and_keeps_every_output() -> None:
    prompts = [list(range(i * 3, i * 3 + 7)) for i in range(1, 6)]
    roomy = Scheduler(BlockPool(100), 4, max_num_seqs=8, max_tokens_per_step=64, enable_prefix_caching=False)
    roomy_reqs = [make(i + 1, p, max_tokens=9) for i, p in enumerate(prompts)]
    run_to_completion(roomy, roomy_reqs)
    assert roomy.num_preemptions == 0
    tight = Scheduler(BlockPool(8), 4, max_num_seqs=8, max_tokens_per_step=64, enable_prefix_caching=False)
    tight_reqs = [make(i + 1, p, max_tokens=9) for i, p in enumerate(prompts)]
    steps = run_to_completion(tight, tight_reqs)
    assert tight.num_preemptions > 0 and any(out.preempted for out in steps)
    for a, b in zip(roomy_reqs, tight_reqs, strict=True):
        assert a.token_ids == b.token_ids == a.token_ids[: a.prompt_len] + reference(a.token_ids[: a.prompt_len], 9)
    assert tight.pool.num_used == 0


def test_newest_running_request_is_preempted_and_requeued_at_the_head() -> None:
    pool = BlockPool(4)
    scheduler = Scheduler(pool, 4, max_num_seqs=8, max_tokens_per_step=64, enable_prefix_caching=False)
    old, new = make(1, [1, 2, 3, 4, 5, 6, 7]), make(2, [9, 9, 9, 9, 9, 9, 9])
    scheduler.add(old)
    scheduler.add(new)
    for _ in range(2):  # prefill (2 blocks each: pool full), then the 8th token of each
        out = scheduler.schedule()
        scheduler.update(out, fake_runner(out))
    out = scheduler.schedule()  # the 9th token needs a third block: the newer one yields
    assert [s.request_id for s in out.scheduled] == ["r1"]
    assert out.preempted_requests == (new,) and new.status is RequestStatus.WAITING
    assert scheduler.waiting[0] is new and new.block_table == [] and new.num_computed == 0


def test_caller_finish_reasons_win_and_free_blocks() -> None:
    scheduler = Scheduler(BlockPool(16), 4, max_num_seqs=8, max_tokens_per_step=64, enable_prefix_caching=False)
    a, b = make(1, [1, 2, 3, 4, 5], max_tokens=1), make(2, [6, 7, 8], max_tokens=5)
    scheduler.add(a)
    scheduler.add(b)
    out = scheduler.schedule()
    results = scheduler.update(out, fake_runner(out), {"r2": "stop_sequence"})
    assert [(r.request.request_id, r.finish_reason) for r in results] == [("r1", "length"), ("r2", "stop_sequence")]
    assert not scheduler.has_work() and scheduler.pool.num_used == 0


def test_max_model_len_ends_a_request_with_length() -> None:
    scheduler = Scheduler(BlockPool(16), 4, 8, 64, False, max_model_len=7)
    r = make(1, [1, 2, 3, 4, 5], max_tokens=None)
    run_to_completion(scheduler, [r])
    assert len(r.token_ids) == 7 and r.finish_reason == "length"


def test_prefix_hits_across_requests_and_their_loss_on_eviction() -> None:
    pool = BlockPool(6)
    scheduler = Scheduler(pool, 4, max_num_seqs=8, max_tokens_per_step=64, enable_prefix_caching=True)
    prompt = list(range(1, 13))  # 3 full blocks
    first = make(1, prompt, max_tokens=1)
    run_to_completion(scheduler, [first])
    assert first.cached_prompt_tokens == 0
    assert set(prompt_block_hashes(prompt, 4)) <= set(pool.cached_hashes())
    again, longer = make(2, prompt, max_tokens=1), make(3, [*prompt, 50, 51], max_tokens=1)
    scheduler.add(again)
    scheduler.add(longer)
    out = scheduler.schedule()
    assert [(s.request_id, s.num_computed_tokens, s.num_new_tokens) for s in out.scheduled] == [("r2", 8, 4), ("r3", 12, 2)]
    assert again.cached_prompt_tokens == 8 and longer.cached_prompt_tokens == 12
    assert again.block_table[:2] == longer.block_table[:2] and pool.refcount[longer.block_table[0]] == 2
    scheduler.update(out, fake_runner(out))
    assert pool.num_used == 0
    # Another prompt that needs every block evicts the cached prefix.
    run_to_completion(scheduler, [make(4, list(range(100, 123)), max_tokens=1)])
    assert pool.lookup(prompt_block_hashes(prompt, 4)[0]) is None
    late = make(5, prompt, max_tokens=1)
    run_to_completion(scheduler, [late])
    assert late.cached_prompt_tokens == 0


def test_hash_chain_is_computed_once_per_request_and_kept_across_preemption() -> None:
    scheduler = Scheduler(BlockPool(16), 4, 8, 64, True)
    r = make(1, list(range(1, 11)), max_tokens=3)
    run_to_completion(scheduler, [r])
    assert r.hash_chain == prompt_block_hashes(r.token_ids, 4)


def test_a_scheduler_seeded_with_another_model_identity_gets_no_hit() -> None:
    pool = BlockPool(16)
    prompt = list(range(1, 13))
    bard = Scheduler(pool, 4, 8, 64, True, hash_seed=hash_seed("llama/bard-small"))
    run_to_completion(bard, [make(1, prompt, max_tokens=1)])
    assert set(prompt_block_hashes(prompt, 4, hash_seed("llama/bard-small"))) <= set(pool.cached_hashes())
    milton = Scheduler(pool, 4, 8, 64, True, hash_seed=hash_seed("llama/milton-small"))
    other = make(2, prompt, max_tokens=1)
    run_to_completion(milton, [other])
    assert other.cached_prompt_tokens == 0
    same = make(3, prompt, max_tokens=1)
    run_to_completion(bard, [same])
    assert same.cached_prompt_tokens == 8


def test_without_step_inputs_the_steps_are_the_same_less_the_block_and_token_ids() -> None:
    """`step_inputs=False` (the cluster simulator's setting) changes nothing but the two copies."""

    def steps_of(step_inputs: bool) -> tuple[list[SchedulerOutput], list[Request]]:
        pool = BlockPool(24)  # small: preemptions and evictions happen
        scheduler = Scheduler(
            pool, 4, max_num_seqs=4, max_tokens_per_step=10, enable_prefix_caching=True, step_inputs=step_inputs
        )
        requests = [make(i, [1, 2, 3, 4, 5, 6, 7, 8, *range(i, i + 3 + 2 * i)], max_tokens=6) for i in range(1, 8)]
        return run_to_completion(scheduler, requests), requests

    full, full_requests = steps_of(True)
    lean, lean_requests = steps_of(False)
    assert len(full) == len(lean)
    for a, b in zip(full, lean, strict=True):
        assert [(s.request_id, s.num_new_tokens, s.num_computed_tokens, s.sample) for s in a.scheduled] == [
            (s.request_id, s.num_new_tokens, s.num_computed_tokens, s.sample) for s in b.scheduled
        ]
        assert all(s.block_ids == () and s.new_token_ids == () for s in b.scheduled)
        assert [r.request_id for r in a.preempted] == [r.request_id for r in b.preempted]
    assert [r.token_ids for r in full_requests] == [r.token_ids for r in lean_requests]


def test_the_hot_path_constructors_build_the_dataclasses_own_instances() -> None:
    from switchboard.replica.outputs import (
        RequestOutput,
        ScheduledRequest,
        model_runner_output,
        request_output,
        scheduled_request,
        scheduler_output,
    )

    req = make(1, [1, 2, 3])
    fast = scheduled_request(req, 3, 0, (0,), (1, 2, 3), True)
    slow = ScheduledRequest(req, 3, 0, (0,), (1, 2, 3), True)
    assert fast == slow and hash(fast) == hash(slow) and repr(fast) == repr(slow) and type(fast) is ScheduledRequest
    assert scheduler_output((fast,), ()) == SchedulerOutput((slow,), ())
    assert model_runner_output(("r1",), (7,)) == ModelRunnerOutput(("r1",), (7,))
    assert request_output(req, 7, None) == RequestOutput(req, 7, None)
