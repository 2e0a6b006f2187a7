"""The Generator RPCs over a real channel to an in-process server with a tiny real model.

Covers streaming, both prompt forms, every validation failure (INVALID_ARGUMENT naming the
field), client cancellation and deadlines (the sequence leaves the batch and its KV blocks return
to the pool), Info, draining, and the settings.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from engine_fixtures import build_llama
from service_fixtures import generator_settings, running_generator, wait_for
from switchboard.common.channels import open_channel
from switchboard.common.errors import error_details
from switchboard.common.settings import (
    SettingsError,
    load_server_settings,
    load_settings,
    method_message_limits,
    server_defaults,
)
from switchboard.generator.app import GeneratorApp
from switchboard.generator.config import (
    DEFAULT_METRICS_PORT,
    DEFAULT_PORT,
    SERVER_PREFIX,
    GeneratorSettings,
    default_advertise_addr,
    resolve_model_path,
)
from switchboard.generator.loader import LoadedModel, load_model
from switchboard.v1 import common_pb2, generator_pb2, generator_pb2_grpc

PROMPT = "To be, or not to be, that is the question."
LONG_CONTEXT = 8192


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with a long context (so a stream can outlive a short deadline)."""
    return build_llama(tmp_path_factory.mktemp("service") / "tiny-llama", max_positions=LONG_CONTEXT)


@pytest.fixture(scope="module")
def loaded(model_dir: Path) -> LoadedModel:
    """The tiny Llama loaded once for the module."""
    return load_model(model_dir, "cpu", "float32")


@pytest.fixture
async def app(loaded: LoadedModel, model_dir: Path) -> AsyncIterator[GeneratorApp]:
    """A running generator replica without a scheduler."""
    async with running_generator(loaded, generator_settings(str(model_dir))) as running:
        yield running


@pytest.fixture
async def stub(app: GeneratorApp) -> AsyncIterator[generator_pb2_grpc.GeneratorStub]:
    """A client stub over a real channel to `app`."""
    channel = open_channel(f"127.0.0.1:{app.service.port}")
    try:
        yield generator_pb2_grpc.GeneratorStub(channel)
    finally:
        await channel.close()


def greedy(max_tokens: int, **fields: object) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, **fields)


async def collect(call: object) -> list[generator_pb2.GeneratorGenerateResponse]:
    return [message async for message in call]  # type: ignore[attr-defined]


async def test_generate_streams_tokens_with_usage_on_the_last_message(
    stub: generator_pb2_grpc.GeneratorStub, loaded: LoadedModel
) -> None:
    request = generator_pb2.GeneratorGenerateRequest(
        request_id="r1", prompt=PROMPT, sampling=greedy(12, ignore_eos=True)
    )
    messages = await collect(stub.Generate(request))
    assert len(messages) >= 2  # streamed, not one blob
    assert all(m.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED for m in messages[:-1])
    assert not any(m.HasField("usage") for m in messages[:-1])
    last = messages[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    token_ids = [t for m in messages for t in m.token_ids]
    assert len(token_ids) == 12
    prompt_ids = list(loaded.tokenizer.encode(PROMPT))
    assert last.usage.prompt_tokens == len(prompt_ids)
    assert last.usage.completion_tokens == 12
    # Greedy decoding is deterministic, and the token-id form of the prompt gives the same tokens.
    again = await collect(
        stub.Generate(
            generator_pb2.GeneratorGenerateRequest(
                request_id="r2", prompt_token_ids=prompt_ids, sampling=greedy(12, ignore_eos=True)
            )
        )
    )
    assert [t for m in again for t in m.token_ids] == token_ids
    assert "".join(m.text for m in again) == "".join(m.text for m in messages)


async def test_default_max_tokens_applies_when_zero(stub: generator_pb2_grpc.GeneratorStub) -> None:
    messages = await collect(
        stub.Generate(
            generator_pb2.GeneratorGenerateRequest(prompt=PROMPT, sampling=greedy(0, ignore_eos=True))
        )
    )
    assert messages[-1].usage.completion_tokens == 8  # GENERATOR_DEFAULT_MAX_TOKENS of the test settings


async def test_seeded_sampling_repeats(stub: generator_pb2_grpc.GeneratorStub) -> None:
    sampling = common_pb2.SamplingParams(max_tokens=10, temperature=1.0, top_k=50, seed=1234, ignore_eos=True)
    first = await collect(
        stub.Generate(generator_pb2.GeneratorGenerateRequest(prompt=PROMPT, sampling=sampling))
    )
    second = await collect(
        stub.Generate(generator_pb2.GeneratorGenerateRequest(prompt=PROMPT, sampling=sampling))
    )
    assert [t for m in first for t in m.token_ids] == [t for m in second for t in m.token_ids]


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"sampling": common_pb2.SamplingParams(max_tokens=-3)}, "sampling.max_tokens"),
        ({"sampling": common_pb2.SamplingParams(max_tokens=4, temperature=2.5)}, "sampling.temperature"),
        ({"sampling": common_pb2.SamplingParams(max_tokens=4, top_p=0.0)}, "sampling.top_p"),
        ({"sampling": common_pb2.SamplingParams(max_tokens=4, top_k=-1)}, "sampling.top_k"),
        (
            {"sampling": common_pb2.SamplingParams(max_tokens=4, repetition_penalty=3.0)},
            "sampling.repetition_penalty",
        ),
        ({"sampling": common_pb2.SamplingParams(max_tokens=4, stop=["x"] * 9)}, "sampling.stop"),
        ({"sampling": common_pb2.SamplingParams(max_tokens=4, stop=[""])}, "sampling.stop"),
        ({"sampling": common_pb2.SamplingParams(max_tokens=4, min_tokens=5)}, "sampling.min_tokens"),
        # Prompt + max_tokens over the model's context length.
        ({"sampling": common_pb2.SamplingParams(max_tokens=LONG_CONTEXT)}, "sampling.max_tokens"),
        ({"prompt_token_ids": [10**6]}, "prompt_token_ids"),
        ({"request_id": "x" * 300}, "request_id"),
    ],
)
async def test_invalid_requests_name_the_field(
    stub: generator_pb2_grpc.GeneratorStub, request_fields: dict, field: str
) -> None:
    request = generator_pb2.GeneratorGenerateRequest(prompt=PROMPT, sampling=greedy(4))
    for key, value in request_fields.items():
        if isinstance(value, common_pb2.SamplingParams):
            request.sampling.CopyFrom(value)
        elif isinstance(value, list):
            request.ClearField("prompt")
            getattr(request, key).extend(value)
        else:
            setattr(request, key, value)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(stub.Generate(request))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    details = error_details(info.value)
    assert details["field_violations"][0][0] == field
    assert field in details["message"]


async def test_prompt_longer_than_the_kv_pool_is_rejected(loaded: LoadedModel, model_dir: Path) -> None:
    # A 1-block pool (kv_cache_mb is MiB, so use the smallest pool the engine allows via block size).
    settings = generator_settings(str(model_dir), kv_cache_mb=1, block_size=512, max_num_seqs=1)
    async with running_generator(loaded, settings) as app:
        blocks = app.engine.info.kv_blocks_total
        channel = open_channel(f"127.0.0.1:{app.service.port}")
        try:
            stub = generator_pb2_grpc.GeneratorStub(channel)
            too_long = list(range(1, 200)) * ((blocks * 512) // 199 + 2)
            request = generator_pb2.GeneratorGenerateRequest(
                prompt_token_ids=too_long[: LONG_CONTEXT - 8], sampling=greedy(4)
            )
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await collect(stub.Generate(request))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error_details(info.value)["field_violations"][0][0] == "prompt"
        finally:
            await channel.close()


async def test_cancelling_the_call_frees_the_kv_blocks(
    app: GeneratorApp, stub: generator_pb2_grpc.GeneratorStub
) -> None:
    request = generator_pb2.GeneratorGenerateRequest(
        prompt=PROMPT, sampling=greedy(LONG_CONTEXT - 64, ignore_eos=True)
    )
    call = stub.Generate(request)
    received = 0
    async for _ in call:
        received += 1
        if received == 3:
            break
    assert app.engine.load().kv_blocks_used > 0
    call.cancel()
    freed = await wait_for(lambda: app.engine.load().kv_blocks_used == 0 and app.engine.load().running == 0)
    assert freed, app.engine.load()
    # The replica still serves after the cancellation.
    messages = await collect(
        stub.Generate(generator_pb2.GeneratorGenerateRequest(prompt=PROMPT, sampling=greedy(3)))
    )
    assert messages[-1].finish_reason in (common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_EOS)


async def test_deadline_exceeded_frees_the_kv_blocks(
    app: GeneratorApp, stub: generator_pb2_grpc.GeneratorStub
) -> None:
    request = generator_pb2.GeneratorGenerateRequest(
        prompt=PROMPT, sampling=greedy(LONG_CONTEXT - 64, ignore_eos=True)
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(stub.Generate(request, timeout=0.5))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    freed = await wait_for(lambda: app.engine.load().kv_blocks_used == 0 and app.engine.load().running == 0)
    assert freed, app.engine.load()


async def test_info_describes_the_replica(app: GeneratorApp, stub: generator_pb2_grpc.GeneratorStub) -> None:
    info = await stub.Info(generator_pb2.InfoRequest())
    assert info.replica_id == app.identity.replica_id and info.replica_id.endswith(f"-{app.service.port}")
    assert info.expert == "bard-small"
    assert info.model_name == "tiny-llama" and info.architecture == "llama"
    assert info.device == "cpu" and info.dtype == "float32"
    assert info.max_model_len == LONG_CONTEXT
    assert info.kv_block_size == 16 and info.kv_blocks_total == app.engine.info.kv_blocks_total > 0
    assert info.vocab_size > 0 and info.parameter_count > 0
    assert info.quantization == "none"
    assert info.revision == app.revision and info.revision.startswith("sha-")  # derived from the model folder


async def test_draining_replica_refuses_new_requests(
    app: GeneratorApp, stub: generator_pb2_grpc.GeneratorStub
) -> None:
    app.servicer.draining = True
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await collect(
            stub.Generate(generator_pb2.GeneratorGenerateRequest(prompt=PROMPT, sampling=greedy(2)))
        )
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "draining" in (info.value.details() or "")


async def test_generate_beyond_the_waiting_bound_is_resource_exhausted(
    loaded: LoadedModel, model_dir: Path
) -> None:
    """One running, one waiting with GENERATOR_MAX_WAITING=1: the next call is refused with
    RESOURCE_EXHAUSTED, RetryInfo and reason REPLICA_QUEUE_FULL, and its message names the bound."""
    settings = generator_settings(str(model_dir), max_num_seqs=1, max_waiting=1)
    async with running_generator(loaded, settings) as app:
        channel = open_channel(f"127.0.0.1:{app.service.port}")
        try:
            stub = generator_pb2_grpc.GeneratorStub(channel)
            long_request = generator_pb2.GeneratorGenerateRequest(
                prompt=PROMPT, sampling=greedy(LONG_CONTEXT - 64, ignore_eos=True)
            )
            running = stub.Generate(long_request)
            await running.read()
            waiting = stub.Generate(generator_pb2.GeneratorGenerateRequest(prompt=PROMPT, sampling=greedy(2)))
            assert await wait_for(lambda: app.engine.load().waiting == 1), app.engine.load()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await collect(
                    stub.Generate(generator_pb2.GeneratorGenerateRequest(prompt=PROMPT, sampling=greedy(2)))
                )
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
            details = error_details(info.value)
            assert details["reason"] == "REPLICA_QUEUE_FULL"
            assert details["retry_after"] is not None and details["retry_after"] > 0
            assert "waiting queue is full" in details["message"] and "bound 1" in details["message"]
            assert app.identity.replica_id in details["message"]
            running.cancel()
            messages = await collect(waiting)
            assert messages[-1].finish_reason in (
                common_pb2.FINISH_REASON_LENGTH,
                common_pb2.FINISH_REASON_EOS,
            )
        finally:
            await channel.close()
    assert app.announce().max_waiting == 1


async def test_info_over_its_message_bound_is_refused_naming_the_setting(loaded: LoadedModel, model_dir: Path) -> None:
    """With the generator's own per-method defaults (GENERATOR_MAX_METHOD_MESSAGE_BYTES), an Info
    request over its bound is refused with RESOURCE_EXHAUSTED (reason MESSAGE_TOO_LARGE) before it
    is decoded; a Generate of the same size is within its (server-wide) limit and is served."""
    server = load_server_settings(
        SERVER_PREFIX, 0, 0, environ={"GENERATOR_DRAIN_SECONDS": "0.5"}, defaults=server_defaults(GeneratorSettings)
    )
    bound = method_message_limits(server)["Generator/Info"]
    assert "Generator/Generate" not in method_message_limits(server)
    async with running_generator(loaded, dataclasses.replace(generator_settings(str(model_dir)), server=server)) as app:
        channel = open_channel(f"127.0.0.1:{app.service.port}")
        try:
            info = channel.unary_unary("/switchboard.v1.Generator/Info", request_serializer=None, response_deserializer=None)
            oversized = b"\xfa\x3f" + bytes([0x80 | ((bound - 1) & 0x7F), (bound - 1) >> 7]) + b"x" * (bound - 1)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await info(oversized, timeout=10)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value.details()
            details = error_details(caught.value)
            assert details["reason"] == "MESSAGE_TOO_LARGE"
            assert f"{bound}-byte bound of Generator/Info" in details["message"]
            assert "GENERATOR_MAX_METHOD_MESSAGE_BYTES" in details["message"]
            assert generator_pb2.InfoResponse.FromString(await info(b"", timeout=10)).replica_id == app.identity.replica_id
            stub = generator_pb2_grpc.GeneratorStub(channel)
            request = generator_pb2.GeneratorGenerateRequest(prompt=PROMPT * (bound // len(PROMPT) + 1), sampling=greedy(1))
            assert request.ByteSize() > bound
            messages = await collect(stub.Generate(request, timeout=60))
            assert messages[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        finally:
            await channel.close()


def test_settings_defaults_and_errors(tmp_path: Path) -> None:
    def load(environ: dict[str, str]) -> GeneratorSettings:
        return load_settings(
            GeneratorSettings,
            server_prefix=SERVER_PREFIX,
            default_port=DEFAULT_PORT,
            default_metrics_port=DEFAULT_METRICS_PORT,
            environ={"GENERATOR_MODEL": str(tmp_path), **environ},
        )

    with pytest.raises(SettingsError, match="GENERATOR_MODEL: required"):
        load_settings(GeneratorSettings, server_prefix=SERVER_PREFIX, environ={})
    settings = load({})
    assert settings.server.port == 50061 and settings.server.metrics_port == 9111
    assert (
        settings.device == "auto"
        and settings.dtype == "auto"
        and settings.scheduler_addr == "127.0.0.1:50053"
    )
    assert load({"GENERATOR_DEVICE": "cuda:1"}).device == "cuda:1"
    for environ, variable in [
        ({"GENERATOR_DEVICE": "gpu"}, "GENERATOR_DEVICE"),
        ({"GENERATOR_DTYPE": "int8"}, "GENERATOR_DTYPE"),
        ({"GENERATOR_MAX_NUM_SEQS": "0"}, "GENERATOR_MAX_NUM_SEQS"),
        ({"SCHEDULER_ADDR": "nowhere"}, "SCHEDULER_ADDR"),
        ({"GENERATOR_ADVERTISE_ADDR": "host:port"}, "GENERATOR_ADVERTISE_ADDR"),
    ]:
        with pytest.raises(SettingsError, match=variable):
            load(environ)
    assert resolve_model_path(str(tmp_path)) == tmp_path
    with pytest.raises(SettingsError, match="GENERATOR_MODEL"):
        resolve_model_path(str(tmp_path / "missing"))
    with pytest.raises(SettingsError, match="GENERATOR_MODEL"):
        resolve_model_path("no-such-expert")
    assert default_advertise_addr("127.0.0.1", 50061) == "127.0.0.1:50061"
    assert default_advertise_addr("::1", 50061) == "[::1]:50061"
    assert not default_advertise_addr("0.0.0.0", 50061).startswith("0.0.0.0")


async def test_generate_spans_are_children_of_the_server_span(stub: generator_pb2_grpc.GeneratorStub) -> None:
    from switchboard.common.telemetry import SpanAttributes, in_memory_span_exporter

    exporter = in_memory_span_exporter()
    request = generator_pb2.GeneratorGenerateRequest(
        request_id="traced", prompt=PROMPT, sampling=greedy(5, ignore_eos=True)
    )
    await collect(stub.Generate(request))
    spans = [
        s for s in exporter.get_finished_spans() if s.attributes.get(SpanAttributes.REQUEST_ID) == "traced"
    ]  # type: ignore[attr-defined]
    by_name = {s.name: s for s in spans}
    server = next(s for s in spans if s.name.endswith("Generator/Generate"))
    for child in ("generator.queue", "generator.prefill", "generator.decode"):
        assert by_name[child].parent is not None and by_name[child].parent.span_id == server.context.span_id
        assert by_name[child].context.trace_id == server.context.trace_id
    # queue (arrival to admission), then prefill (admission to first token), then decode
    assert by_name["generator.queue"].end_time == by_name["generator.prefill"].start_time
    assert by_name["generator.queue"].start_time <= by_name["generator.queue"].end_time
    assert by_name["generator.prefill"].end_time <= by_name["generator.decode"].start_time
    assert by_name["generator.queue"].attributes[SpanAttributes.QUEUE_SECONDS] >= 0
    assert server.attributes[SpanAttributes.GEN_AI_REQUEST_MAX_TOKENS] == 5
    assert server.attributes[SpanAttributes.GEN_AI_USAGE_OUTPUT_TOKENS] == 5
    assert tuple(server.attributes[SpanAttributes.GEN_AI_RESPONSE_FINISH_REASONS]) == ("length",)
    assert by_name["generator.decode"].attributes[SpanAttributes.GEN_AI_USAGE_OUTPUT_TOKENS] == 5


def test_readme_documents_every_variable() -> None:
    """The README's configuration table lists exactly the variables the settings read, with their defaults."""
    from switchboard.common.settings import settings_reference

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    docs = settings_reference(
        GeneratorSettings,
        server_prefix=SERVER_PREFIX,
        default_port=DEFAULT_PORT,
        default_metrics_port=DEFAULT_METRICS_PORT,
    )
    for doc in docs:
        shown = f"`{doc.default}`" if doc.default else "(empty)"
        assert f"| `{doc.env}` | {shown} |" in readme, doc.env


async def test_fatal_engine_error_fails_the_request_and_exits_non_zero(
    loaded: LoadedModel, model_dir: Path
) -> None:
    """A step that raises (as CUDA OOM would) fails in-flight calls with UNAVAILABLE; the process exits 1."""
    async with running_generator(loaded, generator_settings(str(model_dir))) as app:
        # Fault injection: break the engine's KV cache so the next model step raises inside the loop.
        app.engine.cache = None  # type: ignore[assignment]
        channel = open_channel(f"127.0.0.1:{app.service.port}")
        try:
            stub = generator_pb2_grpc.GeneratorStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await collect(
                    stub.Generate(generator_pb2.GeneratorGenerateRequest(prompt=PROMPT, sampling=greedy(4)))
                )
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "failed" in (info.value.details() or "")
        finally:
            await channel.close()
        exit_code = await app.run_task  # type: ignore[attr-defined]
        assert exit_code == 1
        assert app.engine.failed is not None
