"""Iteration-level scheduler: which requests run in the next step, with how many tokens.

Each step has a token budget. Running requests go first: decodes (one token
each), then unfinished prefills (their next chunk), oldest first; then
waiting requests are admitted in arrival order while budget, request slots
and KV blocks last (chunked prefill: a long prompt takes several steps). When a
running request needs a block and none is free, the newest running request
is preempted: its blocks go back to the pool and it is recomputed later from
its prompt plus the tokens it already produced, so its output is unchanged.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from types import MappingProxyType

from switchboard.replica.block_pool import BlockPool
from switchboard.replica.hashing import ROOT_HASH
from switchboard.replica.kv_cache_manager import KVCacheManager
from switchboard.replica.outputs import (
    ModelRunnerOutput,
    RequestOutput,
    ScheduledRequest,
    SchedulerOutput,
    request_output,
    scheduled_request,
    scheduler_output,
)
from switchboard.replica.request import Request, RequestStatus


class Scheduler:
    """Owns the waiting queue, the running list and (through its KV-cache manager) the block pool's use."""

    def __init__(
        self,
        pool: BlockPool,
        block_size: int,
        max_num_seqs: int,
        max_tokens_per_step: int,
        enable_prefix_caching: bool,
        hash_seed: int = ROOT_HASH,
        max_model_len: int | None = None,
        step_inputs: bool = True,
    ) -> None:
        self.pool = pool
        # False: the scheduled entries carry empty `block_ids` and `new_token_ids`. For a caller
        # that runs no model on them (the cluster simulator, which only times steps), copying the
        # block table and the token slice of every entry of every step is wasted work; the engine
        # keeps the default.
        self.step_inputs = step_inputs
        self.kv = KVCacheManager(pool, block_size, enable_prefix_caching, hash_seed)
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_tokens_per_step = max_tokens_per_step
        self.enable_prefix_caching = enable_prefix_caching
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def has_work(self) -> bool:
        """Whether any request waits or runs."""
        return bool(self.waiting or self.running)

    def add(self, req: Request) -> None:
        """Queue a new request."""
        self.waiting.append(req)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens."""
        return self.kv.blocks_for(num_tokens)

    def free(self, req: Request) -> None:
        """Return every block of `req` to the pool (tail first, so shared prefixes are evicted last)."""
        self.kv.free(req)

    def finish(self, req: Request, reason: str) -> None:
        """Remove a request from the queues and free its blocks."""
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status is RequestStatus.WAITING:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        self.kv.free(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.status = RequestStatus.WAITING
        # Back to the head of the queue, keeping arrival order among preempted ones.
        index = 0
        while index < len(self.waiting) and self.waiting[index].arrival < req.arrival:
            index += 1
        self.waiting.insert(index, req)
        self.num_preemptions += 1

    def schedule(self) -> SchedulerOutput:
        """Choose this step's requests and token counts, allocating their blocks."""
        # Hot path (every engine step, and every simulated one): attributes are read through
        # locals, `KVCacheManager.new_blocks_needed` is inlined, a request's blocks are allocated
        # from the `need` already computed (what `allocate_slots` would compute again), and the
        # pool's free count is only read when a request needs a block (most decodes need none).
        kv = self.kv
        pool = self.pool
        bs = kv.block_size
        running = self.running
        waiting = self.waiting
        budget = self.max_tokens_per_step
        entries: list[tuple[Request, int]] = []
        preempted: list[Request] = []
        scheduled: set[Request] = set()
        is_running = RequestStatus.RUNNING
        # Decodes first (one token each, so a long prefill chunk cannot starve them), oldest first
        # (a batch of one is in that order already: no key to compute).
        for req in sorted(running, key=_decodes_first) if len(running) > 1 else running[:]:
            if budget <= 0:
                break
            if req.status is not is_running:
                continue  # preempted earlier in this pass
            computed = req.num_computed
            pending = len(req.token_ids) - computed
            num_new = pending if pending < budget else budget
            need = (computed + num_new + bs - 1) // bs - len(req.block_table)
            if need > 0:
                while need > pool.num_free:
                    victim = next((r for r in reversed(running) if r is not req and r not in scheduled), None)
                    if victim is None:
                        break
                    self._preempt(victim)
                    preempted.append(victim)
                if need > pool.num_free:
                    self._preempt(req)
                    preempted.append(req)
                    break
                req.block_table.extend(pool.allocate_many(need))
            entries.append((req, num_new))
            scheduled.add(req)
            budget -= num_new

        while not preempted and waiting and budget > 0 and len(running) < self.max_num_seqs:
            req = waiting[0]
            if self.enable_prefix_caching and not req.block_table:
                kv.match_prefix(req)
            computed = req.num_computed
            pending = len(req.token_ids) - computed
            num_new = pending if pending < budget else budget
            need = (computed + num_new + bs - 1) // bs - len(req.block_table)
            if need > 0:
                if need > pool.num_free:
                    kv.free(req)
                    break
                req.block_table.extend(pool.allocate_many(need))
            waiting.popleft()
            if req.cached_prompt_tokens is None:
                req.cached_prompt_tokens = min(req.num_computed, req.prompt_len)
            req.status = is_running
            running.append(req)
            entries.append((req, num_new))
            budget -= num_new

        # Single-token entries first: the runner's attention batches them together.
        if len(entries) > 1:
            entries.sort(key=_multi_token)
        if not self.step_inputs:
            # No block ids or token ids to copy (see `step_inputs`), and the hot-path constructors.
            lean = [
                scheduled_request(req, n, req.num_computed, (), (), req.num_computed + n == len(req.token_ids))
                for req, n in entries
            ]
            return scheduler_output(tuple(lean), tuple(preempted))
        scheduled_out: list[ScheduledRequest] = []
        for req, n in entries:
            computed = req.num_computed
            tokens = req.token_ids
            scheduled_out.append(
                ScheduledRequest(
                    req,
                    n,
                    computed,
                    tuple(req.block_table),
                    tuple(tokens[computed : computed + n]),
                    computed + n == len(tokens),
                )
            )
        return SchedulerOutput(tuple(scheduled_out), tuple(preempted))

    def after_step(self, req: Request, num_new: int) -> None:
        """Advance a request's computed count and publish its newly full blocks to the prefix cache."""
        req.num_computed += num_new
        self.kv.cache_full_blocks(req)

    def update(
        self,
        output: SchedulerOutput,
        runner_output: ModelRunnerOutput,
        finish_reasons: Mapping[str, str] | None = None,
    ) -> list[RequestOutput]:
        """Apply one computed step: advance every scheduled request, then append the sampled tokens.

        `finish_reasons` are stop decisions the caller made on the sampled tokens (an EOS token,
        a stop string); a request that has none finishes with "length" once it has `max_tokens`
        generated tokens or `max_model_len` tokens in all. Finished requests leave the batch and
        free their blocks, in sampling order.
        """
        cache_full_blocks = self.kv.cache_full_blocks
        by_id: dict[str, Request] = {}  # the sampling requests
        for s in output.scheduled:
            req = s.request
            req.num_computed += s.num_new_tokens  # `after_step`, inlined (every request, every step)
            cache_full_blocks(req)
            if s.sample:
                by_id[req.request_id] = req
        reasons = finish_reasons or _NO_REASONS
        max_model_len = self.max_model_len
        results: list[RequestOutput] = []
        for rid, token in zip(runner_output.req_ids, runner_output.sampled_token_ids, strict=True):
            req = by_id[rid]
            tokens = req.token_ids
            tokens.append(token)
            reason = reasons.get(rid)
            if reason is None and (
                (req.max_tokens is not None and len(tokens) - req.prompt_len >= req.max_tokens)
                or (max_model_len is not None and len(tokens) >= max_model_len)
            ):
                reason = "length"
            if reason is not None:
                self.finish(req, reason)
            results.append(request_output(req, token, reason))  # `RequestOutput(...)`, built faster
        return results


_NO_REASONS: Mapping[str, str] = MappingProxyType({})


def _decodes_first(req: Request) -> tuple[bool, int]:
    """The running batch's order in a step: decodes (one pending token) first, then by arrival."""
    return (len(req.token_ids) - req.num_computed != 1, req.arrival)


def _multi_token(entry: tuple[Request, int]) -> bool:
    return entry[1] != 1
