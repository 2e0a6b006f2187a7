"""The engine: an asyncio-driven loop of continuous batching over the paged KV cache.

One loop task per replica. Each iteration runs one step: take in new and
cancelled requests, schedule, run the model once over every scheduled token,
sample, detokenize, and check stop conditions. The loop then delivers the
step's outputs to each request's queue. Steps run on the step executor the
engine is given (the server's one compute thread, which also loaded the model);
without one, on a worker thread of its own on CUDA and on the loop's thread on
CPU (see `EngineConfig.step_in_thread` for why). New requests join at the next step;
finished and cancelled ones leave it and free their blocks there.

Failure isolation: when the model step raises, the engine looks for the request(s) that caused
it before failing the replica. It re-runs the step's model work on halves of the batch (bisection,
each half that passes keeps its sampled tokens) until the failing entries are single requests;
those are taken out of the batch, their blocks freed, and their streams end with
`RequestFailedInEngine`; everyone else's step completes as if nothing happened. The failure is
fatal (the engine fails every request and sets `failed`, as before) when it cannot be pinned on
a request: a device error (CUDA out of memory, illegal memory access, ...), a one-token canary
step with none of the suspects fails too, the bisection needs more than its bound of extra model
passes, or steps keep failing with nothing passing (`MAX_FAILED_STEPS_IN_A_ROW`). The normal path
pays nothing for this: the bisection runs only after an exception.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import torch
from switchboard.common.logging import get_logger
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
    RequestFailedInEngine,
    RequestRejected,
    Usage,
)
from switchboard.generator.models.packed_linear import packing_available
from switchboard.generator.sampling import Sampler, make_generator
from switchboard.replica import ROOT_HASH, BlockPool, KvEventJournal, Scheduler, hash_seed
from switchboard.replica import Request as Sequence
from switchboard.replica import RequestStatus as SequenceStatus
from switchboard.replica.outputs import ModelRunnerOutput, RequestOutput, ScheduledRequest, SchedulerOutput

_T = TypeVar("_T")
log = get_logger(__name__)

DEFAULT_CPU_KV_BYTES = 1 << 30
CUDA_KV_FRACTION = 0.6  # of the memory free after the weights are loaded

# Failure isolation (see the module docstring). Steps in a row that raised with no model pass
# succeeding (a canary does not count) before the failure is taken to be the replica's own.
MAX_FAILED_STEPS_IN_A_ROW = 3
# Substrings (lower case) of the messages of device errors: the device or its context is broken,
# whichever request was running, so the replica fails (and is restarted) instead of isolating.
DEVICE_ERROR_MARKERS = (
    "out of memory",
    "cuda error",
    "illegal memory access",
    "device-side assert",
    "cublas_status",
    "cudnn_status",
    "cusparse_status",
    "nccl error",
    "hip error",
    "unspecified launch failure",
    "uncorrectable ecc error",
)


def is_device_error(error: BaseException) -> bool:
    """Whether a step's exception says the device itself failed (never attributed to a request)."""
    if isinstance(error, MemoryError | torch.cuda.OutOfMemoryError):
        return True
    accelerator_error = getattr(torch, "AcceleratorError", None)  # torch >= 2.8: CUDA runtime errors
    if accelerator_error is not None and isinstance(error, accelerator_error):
        return True
    text = str(error).lower()
    return any(marker in text for marker in DEVICE_ERROR_MARKERS)


def isolation_budget(batch: int) -> int:
    """Extra model passes the bisection of a failed step of `batch` requests may run: enough to
    find two failing requests (one takes at most 2 * ceil(log2(batch)))."""
    return 4 * max(0, (batch - 1).bit_length()) + 2


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
            quantization=loaded.quantization,
        )
        self.failed: BaseException | None = None
        # Failure isolation: requests failed by the last step (delivered by the loop), how many
        # steps in a row raised with no model pass succeeding, requests isolated in all.
        self._isolated: list[tuple[Sequence, RequestFailedInEngine]] = []
        self._failed_steps_in_a_row = 0
        self.requests_failed_in_engine = 0
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

    async def score(self, texts: list[list[int]]) -> list[tuple[float, int]]:
        """(log-likelihood, tokens scored) of each token sequence: one dense causal pass per text on
        the thread the steps run on, between steps (a quality probe's few texts, not serving traffic;
        the KV cache is not touched)."""
        return await self._run_step(asyncio.get_running_loop(), lambda: self._score(texts))

    @torch.inference_mode()
    def _score(self, texts: list[list[int]]) -> list[tuple[float, int]]:
        scores: list[tuple[float, int]] = []
        for ids in texts:
            tokens = torch.tensor([ids], dtype=torch.long, device=self.device)
            logits = self.model(tokens)[0, :-1].float()
            logprobs = torch.log_softmax(logits, dim=-1).gather(1, tokens[0, 1:, None])
            scores.append((float(logprobs.sum()), len(ids) - 1))
        return scores

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
            if self._isolated:
                for seq, error in self._isolated:
                    if self._live.pop(seq.request_id, None) is not None:
                        self._deliver_error(seq, error)
                self._isolated = []
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
        try:
            sampled = self.runner.execute(plan)
        except Exception as error:
            plan, sampled = self._isolate(plan, error)  # raises when the failure is not a request's
        else:
            if self._failed_steps_in_a_row:
                self._failed_steps_in_a_row = 0
        self.steps += 1
        texts, stops = self._check_stops(plan, sampled)
        updates = self.scheduler.update(plan, sampled, stops)
        results = [(out.request, self._output(out, texts[out.request.request_id])) for out in updates]
        if sampled.req_ids:
            self._rate_window.append((time.monotonic(), len(sampled.req_ids)))
            while len(self._rate_window) > 4096:
                self._rate_window.popleft()
        return results

    def _isolate(self, plan: SchedulerOutput, error: Exception) -> tuple[SchedulerOutput, ModelRunnerOutput]:
        """After `runner.execute(plan)` raised `error`: find the failing requests, fail them, and
        return the rest of the step (its plan and sampled tokens) to complete as usual.

        Re-raises `error` (the replica fails) when the failure cannot be pinned on requests; see
        the module docstring. Runs only after an exception, on the step's thread.
        """
        if is_device_error(error):
            raise error
        budget = isolation_budget(len(plan.scheduled))
        sampled: dict[str, int] = {}
        culprits: list[tuple[ScheduledRequest, Exception]] = []
        passed = False

        def bisect(group: tuple[ScheduledRequest, ...], group_error: Exception) -> None:
            # `group` failed with `group_error`: a single entry is a culprit, else try each half.
            nonlocal budget, passed
            if len(group) == 1:
                culprits.append((group[0], group_error))
                return
            mid = len(group) // 2
            for half in (group[:mid], group[mid:]):
                if budget <= 0:
                    raise error
                budget -= 1
                try:
                    out = self.runner.execute(SchedulerOutput(half))
                except Exception as half_error:
                    if is_device_error(half_error):
                        raise
                    bisect(half, half_error)
                else:
                    passed = True
                    sampled.update(zip(out.req_ids, out.sampled_token_ids, strict=True))

        bisect(plan.scheduled, error)
        if passed:
            self._failed_steps_in_a_row = 0
        else:
            self._failed_steps_in_a_row += 1
            if self._failed_steps_in_a_row >= MAX_FAILED_STEPS_IN_A_ROW:
                raise error
        for entry, _ in culprits:
            self.scheduler.finish(entry.request, "failed")  # out of the batch, blocks back to the pool
        if not passed and not self._canary_passes():
            raise error  # a step without any of the suspects fails too: the engine is broken
        if not culprits:
            log.warning("an engine step failed and passed when re-run in parts", error_type=type(error).__name__)
        for entry, culprit_error in culprits:
            failure = RequestFailedInEngine(entry.request_id, type(culprit_error).__name__)
            self._isolated.append((entry.request, failure))
            self.requests_failed_in_engine += 1
            log.error(
                "request failed inside the engine; taken out of the batch, the replica serves on",
                request_id=entry.request_id,
                error_type=failure.error_type,
                batch=len(plan.scheduled),
            )
        failed = {entry.request_id for entry, _ in culprits}
        rest = tuple(s for s in plan.scheduled if s.request_id not in failed)
        order = [s.request_id for s in rest if s.sample]
        return (
            SchedulerOutput(rest, plan.preempted_requests),
            ModelRunnerOutput(tuple(order), tuple(sampled[rid] for rid in order)),
        )

    def _canary_passes(self) -> bool:
        """Run a one-token step of no request (token 0 at position 0 in a free block, no sampling):
        whether the model still runs at all when none of a failed step's requests is in it."""
        if self.pool.num_free < 1:
            return True  # nothing to run it in (the culprits just freed theirs; not expected)
        block = self.pool.allocate()
        try:
            probe = Sequence(request_id="(canary)", arrival=0, prompt_len=1, token_ids=[0])
            canary = ScheduledRequest(probe, 1, 0, (block,), (0,), False)
            self.runner.execute(SchedulerOutput((canary,)))
        except Exception:
            return False
        finally:
            self.pool.release(block)
        return True

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
