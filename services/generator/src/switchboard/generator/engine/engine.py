"""The engine: an asyncio-driven loop of continuous batching over the paged KV cache.

One loop task per replica. Each iteration runs one step: take in new and
cancelled requests, schedule, run the model once over every scheduled token,
sample, detokenize, and check stop conditions. The loop then delivers the
step's outputs to each request's queue. Steps run on the step executor the
engine is given (the server's one compute thread, which also loaded the model);
without one, on a worker thread of its own on CUDA and on the loop's thread on
CPU (see `EngineConfig.step_in_thread` for why). New requests join at the next step;
finished and cancelled ones leave it and free their blocks there.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import torch
from switchboard.generator.engine.kv_cache import KVCache, bytes_per_block
from switchboard.generator.engine.model_runner import ModelRunner
from switchboard.generator.engine.output import OutputState
from switchboard.generator.engine.types import (
    EngineConfig,
    EngineInfo,
    EngineLoad,
    EngineOutput,
    EngineRequest,
    QueueFull,
    RequestRejected,
    Usage,
)
from switchboard.generator.models.packed_linear import packing_available
from switchboard.generator.sampling import Sampler, make_generator
from switchboard.replica import ROOT_HASH, BlockPool, KvEventJournal, Scheduler, hash_seed
from switchboard.replica import Request as Sequence
from switchboard.replica import RequestStatus as SequenceStatus
from switchboard.replica.outputs import ModelRunnerOutput, RequestOutput, SchedulerOutput

_T = TypeVar("_T")

DEFAULT_CPU_KV_BYTES = 1 << 30
CUDA_KV_FRACTION = 0.6  # of the memory free after the weights are loaded


def kv_geometry(config: Any) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) from a Llama- or GPT-2-style config."""
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_size", None) or getattr(config, "head_dim", None)
    if not head_dim:
        hidden = getattr(config, "hidden_size", None) or config.n_embd
        head_dim = hidden // heads
    return int(layers), int(kv_heads), int(head_dim)


def model_fingerprint(loaded: Any) -> str:
    """The identity string that seeds a served model's prefix-block hashes.

    Replicas serving the same model (same name, architecture, size, vocabulary and
    context length) compute the same hashes; different models never share one.
    """
    vocab = int(loaded.model.config.vocab_size)
    return f"{loaded.architecture}/{loaded.name}/params={int(loaded.parameter_count)}/vocab={vocab}/ctx={int(loaded.max_model_len)}"


class Engine:
    """Continuous-batching inference engine for one loaded model (see engine_api.md)."""

    def __init__(
        self,
        loaded: Any,
        config: EngineConfig | None = None,
        step_executor: concurrent.futures.Executor | None = None,
    ) -> None:
        """Prepare the model for serving and allocate the KV cache (torch work on the calling thread).

        `step_executor`: a single-thread executor to run every step on, owned by the caller;
        a server that loaded the model and built this engine on that same thread keeps all
        torch compute on one thread while its event loop stays free (as `__main__` does).
        """
        self.loaded = loaded
        self.config = config or EngineConfig()
        self.model = loaded.model
        self.device = torch.device(loaded.device)
        self.dtype = loaded.dtype
        self.tokenizer = loaded.tokenizer
        self.eos_token_ids = set(loaded.eos_token_ids)
        self.max_model_len = int(loaded.max_model_len)
        self.vocab_size = int(self.model.config.vocab_size)
        cfg = self.config
        if cfg.block_size < 1 or cfg.max_num_seqs < 1 or cfg.max_tokens_per_step < 1 or cfg.max_waiting < 1:
            raise ValueError("block_size, max_num_seqs, max_tokens_per_step and max_waiting must be positive")
        pack = cfg.pack_weights
        if pack is None:
            pack = self.device.type == "cpu" and packing_available()
        if pack and self.device.type != "cpu":
            raise ValueError(f"pack_weights needs a CPU model, this one is on {self.device}")
        self.model.prepare_for_serving(pack=pack)
        layers, kv_heads, head_dim = kv_geometry(self.model.config)
        per_block = bytes_per_block(layers, kv_heads, head_dim, cfg.block_size, self.dtype)
        num_blocks = cfg.num_blocks or self._blocks_from_budget(per_block)
        # No point holding more than every sequence slot at full length could use.
        useful = cfg.max_num_seqs * ((self.max_model_len + cfg.block_size - 1) // cfg.block_size)
        num_blocks = max(1, min(num_blocks, useful))
        self.pool = BlockPool(num_blocks)
        cache = KVCache(layers, num_blocks, cfg.block_size, kv_heads, head_dim, self.dtype, self.device)
        self.hash_seed = ROOT_HASH if cfg.model_identity is None else hash_seed(cfg.model_identity)
        self.scheduler = Scheduler(
            self.pool,
            cfg.block_size,
            cfg.max_num_seqs,
            cfg.max_tokens_per_step,
            cfg.enable_prefix_caching,
            hash_seed=self.hash_seed,
            max_model_len=self.max_model_len,
        )
        self.sampler = Sampler(self.eos_token_ids)
        self.runner = ModelRunner(self.model, cache, self.sampler, self.device)
        self.info = EngineInfo(
            model_name=loaded.name,
            architecture=loaded.architecture,
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
            max_model_len=self.max_model_len,
            vocab_size=self.vocab_size,
            block_size=cfg.block_size,
            kv_blocks_total=num_blocks,
            parameter_count=int(loaded.parameter_count),
        )
        self.failed: BaseException | None = None
        self._inbox: collections.deque[Sequence] = collections.deque()
        self._aborts: collections.deque[str] = collections.deque()
        self._live: dict[str, Sequence] = {}
        self._arrivals = 0
        self._executor: concurrent.futures.Executor | None = step_executor
        self._owns_executor = False
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._stopping = False
        self._rate_window: collections.deque[tuple[float, int]] = collections.deque()
        self.steps = 0

    @property
    def cache(self) -> KVCache:
        """The KV tensors (held by the model runner)."""
        return self.runner.cache

    @cache.setter
    def cache(self, value: KVCache) -> None:
        self.runner.cache = value

    def _blocks_from_budget(self, per_block: int) -> int:
        """Blocks that fit in kv_cache_bytes (default: 1 GiB on CPU, 60% of free memory on CUDA)."""
        budget = self.config.kv_cache_bytes
        if budget is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = int(free * CUDA_KV_FRACTION)
            else:
                budget = DEFAULT_CPU_KV_BYTES
        if budget < per_block:
            raise ValueError(
                f"kv_cache_bytes={budget} holds no KV block: one block of {self.config.block_size} tokens "
                f"takes {per_block} bytes for this model"
            )
        return budget // per_block

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start the engine loop on the running event loop."""
        if self._task is not None:
            return
        self._wake = asyncio.Event()
        in_thread = self.config.step_in_thread
        if in_thread is None:
            in_thread = self.device.type != "cpu"
        if self._executor is None and in_thread:
            self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-step")
            self._owns_executor = True
        self._task = asyncio.get_running_loop().create_task(self._run(), name="engine-loop")

    async def stop(self) -> None:
        """Cancel everything in flight and stop the loop."""
        self._stopping = True
        if self._wake is not None:
            self._wake.set()
        if self._task is not None:
            try:
                await self._task
            finally:
                self._task = None
        # Streams still open end with finish_reason "cancelled".
        for seq in list(self._live.values()):
            seq.state.queue.put_nowait(self._final_output(seq, "cancelled", ""))
        self._live.clear()
        if self._executor is not None and self._owns_executor:
            self._executor.shutdown(wait=True)
            self._executor = None

    # ------------------------------------------------------------------ requests

    def _num_waiting(self) -> int:
        """Requests accepted and not running: the scheduler's waiting queue (preempted ones
        included) and those not yet taken in by the loop."""
        return len(self.scheduler.waiting) + len(self._inbox)

    def check_admission(self) -> None:
        """Raise QueueFull when the waiting queue is at its bound (cheap: call before any work)."""
        waiting = self._num_waiting()
        if waiting >= self.config.max_waiting:
            raise QueueFull(waiting, self.config.max_waiting)

    def _tokenize(self, request: EngineRequest) -> list[int]:
        if request.prompt_token_ids is not None:
            ids = [int(t) for t in request.prompt_token_ids]
            bad = next((t for t in ids if t < 0 or t >= self.vocab_size), None)
            if bad is not None:
                raise RequestRejected("prompt_token_ids", f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
            return ids
        if request.prompt is None:
            raise RequestRejected("prompt", "a prompt or prompt_token_ids is required")
        return list(self.tokenizer.encode(request.prompt))

    def _validate(self, request: EngineRequest, prompt_ids: list[int]) -> None:
        if not request.request_id:
            raise RequestRejected("request_id", "must not be empty")
        if request.request_id in self._live:
            raise RequestRejected("request_id", f"{request.request_id!r} is already in flight")
        if not prompt_ids:
            raise RequestRejected("prompt", "the prompt is empty (it encodes to zero tokens)")
        max_tokens = request.sampling.max_tokens
        if max_tokens < 1:
            raise RequestRejected("sampling.max_tokens", f"must be at least 1, got {max_tokens}")
        total = len(prompt_ids) + max_tokens
        if total > self.max_model_len:
            raise RequestRejected(
                "sampling.max_tokens",
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) = {total} exceeds the "
                f"model's context length {self.max_model_len}",
            )
        # The last sampled token is never fed back, so it needs no KV slot.
        blocks = self.scheduler.blocks_for(total - 1)
        if blocks > self.pool.num_blocks:
            raise RequestRejected(
                "prompt",
                f"prompt + max_tokens needs {blocks} KV blocks but the whole pool has {self.pool.num_blocks}",
            )

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        """Stream the outputs of one request; leaving the loop early cancels it.

        Raises QueueFull before the first output when the waiting queue is at its bound
        (`EngineConfig.max_waiting`; checked before the request is tokenized or queued), and
        RequestRejected for a request that can never run.
        """
        if self.failed is not None:
            raise RuntimeError(f"engine failed: {self.failed!r}")
        if self._task is None or self._stopping:
            raise RuntimeError("engine is not running (call await engine.start())")
        self.check_admission()
        prompt_ids = self._tokenize(request)
        self._validate(request, prompt_ids)
        params = request.sampling
        generator = make_generator(params.seed, self.device)
        self._arrivals += 1
        seq = Sequence(
            request_id=request.request_id,
            arrival=self._arrivals,
            prompt_len=len(prompt_ids),
            token_ids=list(prompt_ids),
            params=params,
            generator=generator,
            max_tokens=params.max_tokens,
        )
        state = OutputState(self.tokenizer, prompt_ids, params.stop)
        seq.state = state
        self._live[seq.request_id] = seq
        self._inbox.append(seq)
        assert self._wake is not None
        self._wake.set()
        done = False
        try:
            while True:
                item = await state.queue.get()
                if isinstance(item, BaseException):
                    done = True
                    raise item
                if item.finish_reason is not None:
                    done = True
                yield item
                if done:
                    return
        finally:
            if not done:
                self._aborts.append(seq.request_id)
                if self._wake is not None:
                    self._wake.set()

    def _deliver_error(self, seq: Sequence, error: BaseException) -> None:
        seq.state.queue.put_nowait(error)

    # ------------------------------------------------------------------ load

    def load(self) -> EngineLoad:
        """Snapshot of the replica's load (safe to call from the event loop at any time)."""
        now = time.monotonic()
        window = list(self._rate_window)
        tokens = sum(n for t, n in window if now - t <= 10.0)
        span = min(10.0, now - window[0][0]) if window else 0.0
        return EngineLoad(
            running=len(self.scheduler.running),
            waiting=self._num_waiting(),
            kv_blocks_used=self.pool.num_used,
            kv_blocks_total=self.pool.num_blocks,
            tokens_per_second=tokens / span if span > 0.5 else float(tokens),
        )

    @property
    def kv_events(self) -> KvEventJournal:
        """The block pool's KV event journal (thread-safe: the registrar drains it from the event loop)."""
        return self.pool.events

    # ------------------------------------------------------------------ loop

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        while not self._stopping:
            if not self.scheduler.has_work() and not self._inbox and not self._aborts:
                await self._wake.wait()
                self._wake.clear()
                continue
            try:
                outputs = await self._run_step(loop, self._step)
            except Exception as exc:  # a fatal step error (e.g. CUDA OOM) fails every request
                self.failed = exc
                for seq in list(self._live.values()):
                    self._deliver_error(seq, RuntimeError(f"engine failed: {exc!r}"))
                self._live.clear()
                return
            for seq, out in outputs:
                seq.state.queue.put_nowait(out)
                if out.finish_reason is not None:
                    self._live.pop(seq.request_id, None)
        # Stopping: free what is still held.
        await self._run_step(loop, self._drain_all)

    async def _run_step(self, loop: asyncio.AbstractEventLoop, work: Callable[[], _T]) -> _T:
        """Run step work on the worker thread, or on this thread and then yield to the loop once."""
        if self._executor is not None:
            return await loop.run_in_executor(self._executor, work)
        result = work()
        await asyncio.sleep(0)  # gRPC handlers and stream consumers run between steps
        return result

    def _drain_all(self) -> None:
        while self._inbox:
            self.scheduler.add(self._inbox.popleft())
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            self.scheduler.finish(seq, "cancelled")

    def _take_inbox(self) -> None:
        while self._inbox:
            self.scheduler.add(self._inbox.popleft())
        while self._aborts:
            seq = self._live.pop(self._aborts.popleft(), None)
            if seq is not None and seq.status is not SequenceStatus.FINISHED:
                self.scheduler.finish(seq, "cancelled")

    @torch.inference_mode()
    def _step(self) -> list[tuple[Sequence, EngineOutput]]:
        """One engine iteration (runs in the worker thread): schedule, run the model, update."""
        self._take_inbox()
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return []
        now_ns = time.time_ns()
        for s in plan.scheduled:
            if s.request.first_scheduled_ns is None:
                s.request.first_scheduled_ns = now_ns
        sampled = self.runner.execute(plan)
        self.steps += 1
        texts, stops = self._check_stops(plan, sampled)
        updates = self.scheduler.update(plan, sampled, stops)
        results = [(out.request, self._output(out, texts[out.request.request_id])) for out in updates]
        if sampled.req_ids:
            self._rate_window.append((time.monotonic(), len(sampled.req_ids)))
            while len(self._rate_window) > 4096:
                self._rate_window.popleft()
        return results

    def _check_stops(self, plan: SchedulerOutput, sampled: ModelRunnerOutput) -> tuple[dict[str, str], dict[str, str]]:
        """Detokenize each sampled token and check EOS and stop strings: (text per request, stop reasons)."""
        requests = {s.request_id: s.request for s in plan.scheduled if s.sample}
        texts: dict[str, str] = {}
        stops: dict[str, str] = {}
        for rid, token in zip(sampled.req_ids, sampled.sampled_token_ids, strict=True):
            seq = requests[rid]
            state: OutputState = seq.state
            if token in self.eos_token_ids and not seq.params.ignore_eos:
                stops[rid] = "eos"
                texts[rid] = state.finish()
                continue
            text, stopped = state.push(token)
            texts[rid] = text
            if stopped:
                stops[rid] = "stop_sequence"
        return texts, stops

    def _output(self, out: RequestOutput, text: str) -> EngineOutput:
        """The output to stream for one sampled token (the scheduler has appended it and decided the finish)."""
        seq, reason = out.request, out.finish_reason
        if reason == "length":
            text += seq.state.finish()
        first_scheduled_ns = seq.first_scheduled_ns if seq.num_generated == 1 else None
        if reason is None:
            return EngineOutput(seq.request_id, text, [out.token_id], first_scheduled_ns=first_scheduled_ns)
        return self._final_output(seq, reason, text, [out.token_id], first_scheduled_ns)

    def _final_output(
        self, seq: Sequence, reason: str, text: str, token_ids: list[int] | None = None, first_scheduled_ns: int | None = None
    ) -> EngineOutput:
        usage = Usage(
            prompt_tokens=seq.prompt_len,
            completion_tokens=seq.num_generated,
            cached_prompt_tokens=seq.cached_prompt_tokens or 0,
        )
        return EngineOutput(seq.request_id, text, token_ids or [], reason, usage, first_scheduled_ns)
