"""Failure isolation: a step that raises because of one request fails that request, not the replica.

A real engine on the tiny random Llama, with a fault injected into its model step: a poison
request (a token id in its prompt, or its request id) makes the step raise whenever it is in the
batch. The engine bisects the batch, fails only the poison request (RequestFailedInEngine; over
gRPC INTERNAL with reason REQUEST_FAILED_IN_ENGINE), frees its KV blocks, and every other request
gets exactly the greedy tokens it gets without the poison. A failure that happens whatever the
batch still fails the replica as before.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from prometheus_client import REGISTRY

sys.path.insert(0, str(Path(__file__).parent))
from engine_fixtures import VOCAB, build_llama
from service_fixtures import generator_settings, running_generator
from switchboard.common.channels import open_channel
from switchboard.common.errors import REQUEST_FAILED_IN_ENGINE, error_details
from switchboard.generator.engine import Engine, EngineConfig, EngineRequest, RequestFailedInEngine
from switchboard.generator.engine.engine import MAX_FAILED_STEPS_IN_A_ROW, is_device_error, isolation_budget
from switchboard.generator.loader import LoadedModel, load_model
from switchboard.generator.sampling import SamplingParams
from switchboard.v1 import common_pb2, generator_pb2, generator_pb2_grpc

PROMPTS = [
    "To be, or not to be",
    "The quick brown fox jumps over the lazy dog again and again",
    "Of",
    "Whether 'tis nobler in the mind to suffer the slings and arrows",
    "Café naïve façade, déjà vu",
]
METRIC = "switchboard_generator_requests_failed_in_engine_total"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny random grouped-query Llama."""
    return build_llama(tmp_path_factory.mktemp("isolation") / "tiny-llama")


@pytest.fixture(scope="module")
def llama(model_dir: Path) -> LoadedModel:
    """The tiny Llama loaded once for the module."""
    return load_model(model_dir, "cpu", "float32")


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


async def running_engine(loaded: LoadedModel) -> Engine:
    engine = Engine(loaded, EngineConfig(block_size=4, num_blocks=128))
    await engine.start()
    return engine


async def tokens_of(engine: Engine, request: EngineRequest) -> list[int]:
    return [t async for out in engine.generate(request) for t in out.token_ids]


async def run_all(engine: Engine, requests: list[EngineRequest]) -> list[Any]:
    """Run the requests concurrently (they enter the same first step); token lists or exceptions."""
    return await asyncio.gather(*(tokens_of(engine, r) for r in requests), return_exceptions=True)


def others(max_tokens: int = 10) -> list[EngineRequest]:
    return [EngineRequest(f"ok-{i}", prompt=p, sampling=greedy(max_tokens)) for i, p in enumerate(PROMPTS)]


@contextmanager
def patched(target: Any, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Iterator[None]:
    """Wrap `target.name` (an instance attribute over the class's method) for the block's duration."""
    original = getattr(target, name)
    setattr(target, name, make(original))
    try:
        yield
    finally:
        delattr(target, name)


def poison_token(loaded: LoadedModel, seen: list[list[int]]) -> int:
    """A token id in the model's vocabulary that no prompt encodes to and no baseline output has."""
    used = {t for ids in seen for t in ids}
    for prompt in PROMPTS:
        used.update(loaded.tokenizer.encode(prompt))
    return next(t for t in range(VOCAB - 1, 0, -1) if t not in used)


def raising_on_token(poison: int) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """forward_step that raises whenever the poison token is among the step's input ids."""

    def make(forward: Callable[..., Any]) -> Callable[..., Any]:
        def forward_step(input_ids: torch.Tensor, *args: Any) -> torch.Tensor:
            if bool((input_ids == poison).any()):
                raise IndexError("poisoned input")
            return forward(input_ids, *args)

        return forward_step

    return make


def raising_for_request(request_id: str, after_tokens: int = 0) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """runner.execute that raises whenever `request_id` is scheduled with `after_tokens` generated."""

    def make(execute: Callable[..., Any]) -> Callable[..., Any]:
        def run(plan: Any) -> Any:
            if any(s.request_id == request_id and s.request.num_generated >= after_tokens for s in plan.scheduled):
                raise ValueError("poisoned request")
            return execute(plan)

        return run

    return make


async def test_a_poison_prompt_fails_only_itself_and_the_rest_get_their_tokens(llama: LoadedModel) -> None:
    engine = await running_engine(llama)
    try:
        baseline = await run_all(engine, others())
        assert all(isinstance(ids, list) and len(ids) == 10 for ids in baseline), baseline
        poison = poison_token(llama, baseline)
        bad = EngineRequest("poison", prompt_token_ids=[5, 17, poison, 9], sampling=greedy(10))
        requests = others()
        requests.insert(2, bad)
        with patched(engine.model, "forward_step", raising_on_token(poison)):
            results = await run_all(engine, requests)
            assert isinstance(results[2], RequestFailedInEngine), results[2]
            assert results[2].request_id == "poison" and results[2].error_type == "IndexError"
            assert "poisoned input" not in str(results[2])  # the exception's text is not passed on
            assert results[:2] + results[3:] == baseline
            assert engine.failed is None and engine.requests_failed_in_engine == 1
            assert engine.pool.num_used == 0  # the poison request's blocks went back to the pool
            # The replica serves on, with the fault still in place.
            assert await tokens_of(engine, others()[0]) == baseline[0]
    finally:
        await engine.stop()


async def test_a_request_failing_mid_stream_ends_after_its_tokens(llama: LoadedModel) -> None:
    engine = await running_engine(llama)
    try:
        baseline = await run_all(engine, others())
        bad = EngineRequest("poison", prompt=PROMPTS[1], sampling=greedy(10))
        streamed: list[int] = []

        async def poison_stream() -> None:
            async for out in engine.generate(bad):
                streamed.extend(out.token_ids)

        with patched(engine.runner, "execute", raising_for_request("poison", after_tokens=3)):
            results = await asyncio.gather(
                poison_stream(), *(tokens_of(engine, r) for r in others()), return_exceptions=True
            )
        assert isinstance(results[0], RequestFailedInEngine), results[0]
        assert streamed == baseline[1][:3]  # the same prompt as ok-1: the same tokens until it failed
        assert list(results[1:]) == baseline
        assert engine.failed is None and engine.pool.num_used == 0
    finally:
        await engine.stop()


async def test_a_failure_whatever_the_batch_fails_the_replica(llama: LoadedModel) -> None:
    engine = await running_engine(llama)

    def broken(forward: Callable[..., Any]) -> Callable[..., Any]:
        def forward_step(*args: Any) -> torch.Tensor:
            raise ValueError("the model is broken")

        return forward_step

    try:
        with patched(engine.model, "forward_step", broken):
            results = await run_all(engine, others()[:3])
        assert all(isinstance(r, RuntimeError) and "engine failed" in str(r) for r in results), results
        assert isinstance(engine.failed, ValueError)
        assert engine.requests_failed_in_engine == 0
    finally:
        await engine.stop()


async def test_steps_failing_in_a_row_with_nothing_passing_fail_the_replica(llama: LoadedModel) -> None:
    """One request at a time, each failing in the sampler (which the canary does not run): the
    first ones are taken for poison, then the streak says the replica is broken."""
    engine = await running_engine(llama)

    def broken(sample: Callable[..., Any]) -> Callable[..., Any]:
        def always(*args: Any, **kwargs: Any) -> torch.Tensor:
            raise ValueError("the sampler is broken")

        return always

    try:
        with patched(engine.runner.sampler, "sample", broken):
            for attempt in range(MAX_FAILED_STEPS_IN_A_ROW - 1):
                with pytest.raises(RequestFailedInEngine):
                    await tokens_of(engine, EngineRequest(f"r{attempt}", prompt=PROMPTS[0], sampling=greedy(4)))
            with pytest.raises(RuntimeError, match="engine failed"):
                await tokens_of(engine, EngineRequest("last", prompt=PROMPTS[0], sampling=greedy(4)))
        assert engine.failed is not None
    finally:
        await engine.stop()


def test_device_errors_are_never_attributed_to_a_request() -> None:
    assert is_device_error(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_device_error(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert is_device_error(RuntimeError("CUDA error: device-side assert triggered"))
    assert is_device_error(MemoryError())
    assert not is_device_error(IndexError("index 400 is out of bounds for dimension 0 with size 320"))
    assert not is_device_error(ValueError("nan in logits"))
    assert [isolation_budget(n) for n in (1, 2, 3, 4, 8, 64)] == [2, 6, 10, 10, 14, 26]


async def test_the_call_of_a_poison_request_ends_with_internal_and_the_reason(
    llama: LoadedModel, model_dir: Path
) -> None:
    async with running_generator(llama, generator_settings(str(model_dir))) as app:
        channel = open_channel(f"127.0.0.1:{app.service.port}")
        stub = generator_pb2_grpc.GeneratorStub(channel)

        async def call(request_id: str, prompt: str) -> list[int]:
            request = generator_pb2.GeneratorGenerateRequest(
                request_id=request_id,
                prompt=prompt,
                sampling=common_pb2.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
            )
            return [t async for message in stub.Generate(request) for t in message.token_ids]

        try:
            baseline = await asyncio.gather(*(call(f"b{i}", p) for i, p in enumerate(PROMPTS[:3])))
            before = REGISTRY.get_sample_value(METRIC) or 0.0
            with patched(app.engine.runner, "execute", raising_for_request("poison")):
                results = await asyncio.gather(
                    call("o0", PROMPTS[0]),
                    call("poison", PROMPTS[1]),
                    call("o2", PROMPTS[2]),
                    return_exceptions=True,
                )
            error = results[1]
            assert isinstance(error, grpc.aio.AioRpcError), error
            details = error_details(error)
            assert details["code"] == grpc.StatusCode.INTERNAL
            assert details["reason"] == REQUEST_FAILED_IN_ENGINE
            assert "poison" in details["message"] and "retrying it unchanged will fail again" in details["message"]
            assert "poisoned request" not in details["message"] and "ValueError" not in details["message"]
            assert [results[0], results[2]] == [baseline[0], baseline[2]]
            assert REGISTRY.get_sample_value(METRIC) == before + 1
            # The replica serves on: still running, not failed, and the next call completes.
            assert await call("after", PROMPTS[1]) == baseline[1]
            assert app.engine.failed is None and not app.run_task.done()  # type: ignore[attr-defined]
            assert app.engine.pool.num_used == 0
        finally:
            await channel.close()
