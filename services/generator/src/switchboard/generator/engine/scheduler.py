"""Iteration-level scheduler: which sequences run in the next step, with how many tokens.

Each step has a token budget. Running sequences go first: decodes (one token
each), then unfinished prefills (their next chunk), oldest first; then
waiting sequences are admitted in arrival order while budget, sequence slots
and KV blocks last (chunked prefill: a long prompt takes several steps). When a
running sequence needs a block and none is free, the newest running sequence
is preempted: its blocks go back to the pool and it is recomputed later from
its prompt plus the tokens it already produced, so its output is unchanged.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from switchboard.generator.engine.kv_cache import BlockPool, block_hash


class SequenceStatus(enum.Enum):
    """Where a sequence is in its life."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One request's tokens, KV blocks and progress."""

    request_id: str
    arrival: int
    prompt_len: int
    token_ids: list[int]  # prompt followed by the generated tokens
    params: Any  # SamplingParams
    generator: torch.Generator
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # hashes of the leading full blocks
    num_computed: int = 0  # tokens whose keys/values are in the cache
    cached_prompt_tokens: int | None = None  # prompt tokens served by the prefix cache (first admission)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    state: Any = None  # the engine's per-request output state (detokenizer, stop matcher, queue)
    first_scheduled_ns: int | None = None  # wall clock when its prefill first ran (ends its queue wait)

    @property
    def num_generated(self) -> int:
        """Tokens produced so far."""
        return len(self.token_ids) - self.prompt_len

    @property
    def num_pending(self) -> int:
        """Tokens that still need a forward pass before the next sample."""
        return len(self.token_ids) - self.num_computed


@dataclass
class StepPlan:
    """What one step runs: (sequence, tokens this step), decodes first."""

    entries: list[tuple[Sequence, int]]
    preempted: list[Sequence]


class Scheduler:
    """Owns the waiting queue, the running list and the block pool's use."""

    def __init__(
        self,
        pool: BlockPool,
        block_size: int,
        max_num_seqs: int,
        max_tokens_per_step: int,
        enable_prefix_caching: bool,
    ) -> None:
        self.pool = pool
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_tokens_per_step = max_tokens_per_step
        self.enable_prefix_caching = enable_prefix_caching
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def has_work(self) -> bool:
        """Whether any sequence waits or runs."""
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence."""
        self.waiting.append(seq)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens."""
        return (num_tokens + self.block_size - 1) // self.block_size

    def _new_blocks_needed(self, seq: Sequence, num_new: int) -> int:
        return max(0, self.blocks_for(seq.num_computed + num_new) - len(seq.block_table))

    def _grow(self, seq: Sequence, num_new: int) -> None:
        for _ in range(self._new_blocks_needed(seq, num_new)):
            seq.block_table.append(self.pool.allocate())

    def free(self, seq: Sequence) -> None:
        """Return every block of `seq` to the pool (tail first, so shared prefixes are evicted last)."""
        for block in reversed(seq.block_table):
            self.pool.release(block)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed = 0

    def finish(self, seq: Sequence, reason: str) -> None:
        """Remove a sequence from the queues and free its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.free(seq)
        seq.status = SequenceStatus.WAITING
        # Back to the head of the queue, keeping arrival order among preempted ones.
        index = 0
        while index < len(self.waiting) and self.waiting[index].arrival < seq.arrival:
            index += 1
        self.waiting.insert(index, seq)
        self.num_preemptions += 1

    def _match_prefix(self, seq: Sequence) -> None:
        """Reuse cached full blocks for the leading tokens (never the very last token: it must be computed)."""
        bs = self.block_size
        limit = (len(seq.token_ids) - 1) // bs
        parent = 0
        for i in range(limit):
            h = block_hash(parent, seq.token_ids[i * bs : (i + 1) * bs])
            block = self.pool.lookup(h)
            if block is None:
                break
            self.pool.acquire(block)
            seq.block_table.append(block)
            seq.block_hashes.append(h)
            parent = h
        seq.num_computed = len(seq.block_table) * bs

    def schedule(self) -> StepPlan:
        """Choose this step's sequences and token counts, allocating their blocks."""
        budget = self.max_tokens_per_step
        entries: list[tuple[Sequence, int]] = []
        preempted: list[Sequence] = []
        scheduled: set[Sequence] = set()
        # Decodes first (one token each, so a long prefill chunk cannot starve them), oldest first.
        for seq in sorted(self.running, key=lambda s: (s.num_pending != 1, s.arrival)):
            if budget <= 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this pass
            num_new = min(seq.num_pending, budget)
            need = self._new_blocks_needed(seq, num_new)
            while need > self.pool.num_free:
                victim = next((s for s in reversed(self.running) if s is not seq and s not in scheduled), None)
                if victim is None:
                    break
                self._preempt(victim)
                preempted.append(victim)
            if need > self.pool.num_free:
                self._preempt(seq)
                preempted.append(seq)
                break
            self._grow(seq, num_new)
            entries.append((seq, num_new))
            scheduled.add(seq)
            budget -= num_new

        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if self.enable_prefix_caching and not seq.block_table:
                self._match_prefix(seq)
            num_new = min(seq.num_pending, budget)
            if self._new_blocks_needed(seq, num_new) > self.pool.num_free:
                self.free(seq)
                break
            self._grow(seq, num_new)
            self.waiting.popleft()
            if seq.cached_prompt_tokens is None:
                seq.cached_prompt_tokens = min(seq.num_computed, seq.prompt_len)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            entries.append((seq, num_new))
            budget -= num_new

        # Single-token entries first: the attention context batches them together.
        entries.sort(key=lambda e: e[1] != 1)
        return StepPlan(entries, preempted)

    def after_step(self, seq: Sequence, num_new: int) -> None:
        """Advance a sequence's computed count and publish its newly full blocks to the prefix cache."""
        seq.num_computed += num_new
        bs = self.block_size
        if not self.enable_prefix_caching:
            return
        while (len(seq.block_hashes) + 1) * bs <= seq.num_computed:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else 0
            h = block_hash(parent, seq.token_ids[i * bs : (i + 1) * bs])
            self.pool.register(seq.block_table[i], h)
            seq.block_hashes.append(h)
