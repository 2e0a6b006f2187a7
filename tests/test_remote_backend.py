"""The remote backend against a real `transformers serve --continuous-batching` on the test model.

A remote-mode generator (no model loaded here) streams completions through its gRPC API from the
engine; a cancelled call closes the engine stream; the engine killed mid-stream ends the call with
UNAVAILABLE, and a call after that fails with UNAVAILABLE before any token (so the gateway fails
over). Through the whole stack (gateway -> router -> scheduler -> remote replica, mutual TLS inside):
token accounting settled from the engine's usage, cancellation, and failover from a replica whose
engine is down. The engine-killing test runs last: it kills the module's engine. Skipped, saying
why, when the engine does not start and answer a completion within a bounded time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from switchboard.common.channels import open_channel
from switchboard.common.service import wait_started
from switchboard.common.settings import ServerSettings
from switchboard.generator.app import GeneratorApp
from switchboard.generator.config import GeneratorSettings
from switchboard.generator.remote import remote_engine
from switchboard.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, generator_pb2, generator_pb2_grpc

from .conftest import RunningStack, free_port, start_stack

pytestmark = pytest.mark.slow

START_SECONDS = 240.0  # engine start plus its first (warm-up) completion, on a loaded 2-core machine
PROMPT = "To be, or not"


async def wait_for(predicate: Callable[[], bool], attempts: int = 200, interval: float = 0.05) -> bool:
    for _ in range(attempts):
        if predicate():
            return True
        await asyncio.sleep(interval)
    return False


def test_the_remote_backend_does_not_import_torch() -> None:
    code = (
        "import sys; import switchboard.generator.app, switchboard.generator.remote; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.fixture(scope="module")
def engine_server(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`transformers serve` on the test model (make test installs it: transformers[serving] in requirements/dev.txt).

    A missing executable or an engine that does not answer a completion in time fails the test: the
    backend must be exercised against the real engine in CI, never skipped.
    """
    executable = shutil.which("transformers", path=str(Path(sys.executable).parent))
    if executable is None:
        pytest.fail("transformers serve is not installed: requirements/dev.txt installs transformers[serving]")
    port = free_port()
    log = tmp_path_factory.mktemp("engine") / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [executable, "serve", str(model_dir), "--continuous-batching"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_SECONDS
        warmed = False
        while time.monotonic() < deadline and process.poll() is None and not warmed:
            try:
                # The first completion initializes continuous batching (slow); warm it up here.
                body = {"model": str(model_dir), "prompt": PROMPT, "max_tokens": 2, "temperature": 0.0}
                answer = httpx.post(f"{url}/v1/completions", json=body, timeout=deadline - time.monotonic())
                warmed = answer.status_code == 200
            except httpx.HTTPError:
                time.sleep(0.5)
        if not warmed:
            tail = log.read_text(errors="replace")[-1500:]
            pytest.fail(f"transformers serve did not answer a completion within {START_SECONDS:g} s: {tail}")
        yield url, process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@contextlib.asynccontextmanager
async def remote_generator(url: str, model_dir: Path) -> AsyncIterator[GeneratorApp]:
    settings = GeneratorSettings(
        server=ServerSettings(host="127.0.0.1", port=0, metrics_port=0, drain_seconds=0.5),
        backend="remote",
        remote_url=url,
        model=str(model_dir),
        expert="bard-small",
        remote_poll_seconds=0.2,
        default_max_tokens=8,
        scheduler_addr="",
    )
    app = GeneratorApp(settings, remote_engine(settings))  # type: ignore[arg-type]
    task = asyncio.create_task(app.run(handle_signals=False))
    await wait_started(task, app.ready)
    try:
        yield app
    finally:
        if not task.done():
            app.service.stop()
        await task


def request(max_tokens: int) -> generator_pb2.GeneratorGenerateRequest:
    sampling = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return generator_pb2.GeneratorGenerateRequest(prompt=PROMPT, sampling=sampling)


async def test_streams_a_completion_from_the_engine(
    engine_server: tuple[str, subprocess.Popen], model_dir: Path
) -> None:
    url, _ = engine_server
    async with remote_generator(url, model_dir) as app:
        channel = open_channel(f"127.0.0.1:{app.service.port}")
        try:
            stub = generator_pb2_grpc.GeneratorStub(channel)
            messages = [m async for m in stub.Generate(request(6))]
            info = await stub.Info(generator_pb2.InfoRequest())
        finally:
            await channel.close()
    assert len(messages) >= 2
    assert "".join(m.text for m in messages)
    last = messages[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert last.usage.completion_tokens == 6 and last.usage.prompt_tokens > 0
    # transformers serve streams no token ids: counts come from the final usage.
    assert all(not m.token_ids for m in messages)
    assert info.architecture == "remote" and info.max_model_len > 0
    assert info.quantization == "" and info.revision  # the engine does not say; the revision is announced
    assert app.engine.load().running == 0


async def test_cancelling_the_call_closes_the_engine_stream(
    engine_server: tuple[str, subprocess.Popen], model_dir: Path
) -> None:
    url, _ = engine_server
    async with remote_generator(url, model_dir) as app:
        channel = open_channel(f"127.0.0.1:{app.service.port}")
        try:
            stub = generator_pb2_grpc.GeneratorStub(channel)
            call = stub.Generate(request(2000))
            first = await call.read()
            assert first.text
            assert app.engine.load().running == 1  # the in-flight count (transformers serve has no /metrics)
            call.cancel()
            assert await wait_for(lambda: app.engine.in_flight == 0)
            # The engine serves on: the next call completes.
            messages = [m async for m in stub.Generate(request(3))]
            assert messages[-1].usage.completion_tokens == 3
        finally:
            await channel.close()


async def test_sampling_the_engine_cannot_honour_is_refused_not_dropped(
    engine_server: tuple[str, subprocess.Popen], model_dir: Path
) -> None:
    """transformers serve exports no vLLM metrics: GENERATOR_REMOTE_ENGINE=auto sends OpenAI's fields
    only and refuses top_k, repetition_penalty, min_tokens and ignore_eos with INVALID_ARGUMENT."""
    url, _ = engine_server
    async with remote_generator(url, model_dir) as app:
        assert app.engine.flavour == "openai"
        channel = open_channel(f"127.0.0.1:{app.service.port}")
        try:
            stub = generator_pb2_grpc.GeneratorStub(channel)
            for field, value in (("top_k", 40), ("repetition_penalty", 1.2), ("min_tokens", 1), ("ignore_eos", True)):
                sampling = common_pb2.SamplingParams(max_tokens=4, temperature=0.0, **{field: value})
                call = stub.Generate(generator_pb2.GeneratorGenerateRequest(prompt=PROMPT, sampling=sampling))
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    _ = [m async for m in call]
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
                assert f"sampling.{field}" in caught.value.details() and "cannot honour" in caught.value.details()
            assert app.engine.in_flight == 0
            messages = [m async for m in stub.Generate(request(2))]  # the engine serves on
            assert messages[-1].usage.completion_tokens == 2
        finally:
            await channel.close()


def replica_finish(stack: RunningStack, replica_id: str, request_id: str) -> dict:
    """The generator's `generate finished` log event of one request (waits up to 15 s for it)."""
    log_path = stack.log_dir / f"generator-{replica_id}.log"
    deadline = time.monotonic() + 15
    while True:
        for line in filter(str.strip, log_path.read_text().splitlines()):
            event = json.loads(line)
            if event.get("request_id") == request_id and event.get("event") == "generate finished":
                return event
        assert time.monotonic() < deadline, f"{replica_id} never finished request {request_id}"
        time.sleep(0.2)


def test_the_whole_stack_serves_through_the_remote_replica(
    engine_server: tuple[str, subprocess.Popen], model_dir: Path, tmp_path: Path
) -> None:
    """gateway -> router -> scheduler -> remote replica -> transformers serve, with mutual TLS inside;
    token accounting settles from the engine's usage; a cancelled call ends the engine request."""
    url, _ = engine_server
    env = {"GENERATOR_BACKEND": "remote", "GENERATOR_REMOTE_URL": url, "GENERATOR_REMOTE_POLL_SECONDS": "0.2"}
    running = start_stack(tmp_path, model_dir, {"bard-small": 1}, env=env)
    try:
        with grpc.insecure_channel(running.gateway_addr) as channel:
            gateway = gateway_pb2_grpc.GatewayStub(channel)
            sampling = common_pb2.SamplingParams(max_tokens=6, temperature=0.0)
            request_ = gateway_pb2.GenerateRequest(prompt=PROMPT, sampling=sampling)
            messages = list(gateway.Generate(request_, metadata=running.auth(), timeout=120))
            assert messages[0].model == "bard-small"
            assert "".join(m.text for m in messages)
            last = messages[-1]
            assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
            assert last.usage.completion_tokens == 6
            # No token ids from this engine: the count is settled from the final usage.
            assert sum(m.token_count for m in messages) == 6

            long = gateway_pb2.GenerateRequest(
                prompt=PROMPT, sampling=common_pb2.SamplingParams(max_tokens=400, temperature=0.0)
            )
            call = gateway.Generate(long, metadata=running.auth(), timeout=120)
            first = next(call)
            call.cancel()
            event = replica_finish(running, "bard-small-0", first.request_id)
            assert event["finish_reason"] == "cancelled"
            # The engine serves on after the cancelled stream.
            again = list(gateway.Generate(request_, metadata=running.auth(), timeout=120))
            assert again[-1].usage.completion_tokens == 6
    finally:
        running.stack.stop()


def gateway_failovers(stack: RunningStack) -> float:
    """switchboard_gateway_failovers_total summed over labels, from the gateway's metrics endpoint."""
    text = httpx.get(f"http://127.0.0.1:{stack.stack.plan.gateway_metrics}/metrics", timeout=10).text
    return sum(
        float(v) for v in re.findall(r"^switchboard_gateway_failovers_total\{[^}]*\} (\S+)$", text, re.M)
    )


def test_a_dead_remote_engine_fails_over_before_the_first_token(
    engine_server: tuple[str, subprocess.Popen], model_dir: Path, tmp_path: Path
) -> None:
    """Two remote replicas of one expert: the preferred one's engine is down (nothing listens at its
    URL), so its Generate answers UNAVAILABLE before any token and the gateway serves from the other."""
    url, _ = engine_server
    remote = {"GENERATOR_BACKEND": "remote", "GENERATOR_REMOTE_POLL_SECONDS": "0.2"}
    replica_env = {
        "bard-small-0": {**remote, "GENERATOR_REMOTE_URL": f"http://127.0.0.1:{free_port()}"},
        "bard-small-1": {**remote, "GENERATOR_REMOTE_URL": url},
    }
    running = start_stack(tmp_path, model_dir, {"bard-small": 2}, replica_env=replica_env)
    try:
        with grpc.insecure_channel(running.gateway_addr) as channel:
            gateway = gateway_pb2_grpc.GatewayStub(channel)
            sampling = common_pb2.SamplingParams(max_tokens=4, temperature=0.0)
            for _ in range(3):
                request_ = gateway_pb2.GenerateRequest(prompt=PROMPT, sampling=sampling)
                messages = list(gateway.Generate(request_, metadata=running.auth(), timeout=120))
                assert messages[-1].usage.completion_tokens == 4
        assert gateway_failovers(running) >= 1  # the dead engine's replica was tried, then the other served
    finally:
        running.stack.stop()


async def test_engine_killed_mid_stream_ends_the_call_unavailable(
    engine_server: tuple[str, subprocess.Popen], model_dir: Path
) -> None:
    """Runs last in this module: it kills the engine."""
    url, process = engine_server
    async with remote_generator(url, model_dir) as app:
        channel = open_channel(f"127.0.0.1:{app.service.port}")
        try:
            stub = generator_pb2_grpc.GeneratorStub(channel)
            call = stub.Generate(request(2000))
            assert (await call.read()).text
            os.killpg(process.pid, signal.SIGKILL)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                while True:
                    message = await call.read()
                    assert message is not grpc.aio.EOF, "the stream ended normally after the engine died"
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            # Before any token: UNAVAILABLE, which the gateway fails over on.
            with pytest.raises(grpc.aio.AioRpcError) as info:
                _ = [m async for m in stub.Generate(request(3))]
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert await wait_for(lambda: not app.engine.healthy)
        finally:
            await channel.close()
