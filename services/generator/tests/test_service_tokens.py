"""Upstream token ids over a real channel: used as they are when their tokenizer fingerprint is the
replica's own (the replica does not tokenize again), the text tokenized here otherwise, bad ids
refused with INVALID_ARGUMENT; the prompt tokenization metric; and what the replica announces
(KV block size, hash seed, tokenizer fingerprint, cost model) when it registers."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY

sys.path.insert(0, str(Path(__file__).parent))
from engine_fixtures import build_llama
from service_fixtures import generator_settings, running_generator, wait_for
from switchboard.common.channels import open_channel
from switchboard.common.errors import error_details
from switchboard.common.settings import SettingsError
from switchboard.common.tokenizer_fingerprint import fingerprint_file
from switchboard.generator.app import GeneratorApp
from switchboard.generator.config import load_cost_profile
from switchboard.generator.loader import LoadedModel, load_model
from switchboard.generator.tokenizer import Tokenizer
from switchboard.replica import CostModel
from switchboard.v1 import common_pb2, generator_pb2, generator_pb2_grpc, scheduler_pb2

from .test_registration import cluster, running_scheduler

PROMPT = "To be, or not to be, that is the question."
CONTEXT = 256


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_llama(tmp_path_factory.mktemp("tokens") / "tiny-llama", max_positions=CONTEXT)


@pytest.fixture(scope="module")
def loaded(model_dir: Path) -> LoadedModel:
    return load_model(model_dir, "cpu", "float32")


@pytest.fixture
async def app(loaded: LoadedModel, model_dir: Path) -> AsyncIterator[GeneratorApp]:
    async with running_generator(loaded, generator_settings(str(model_dir))) as running:
        yield running


@pytest.fixture
async def stub(app: GeneratorApp) -> AsyncIterator[generator_pb2_grpc.GeneratorStub]:
    channel = open_channel(f"127.0.0.1:{app.service.port}")
    try:
        yield generator_pb2_grpc.GeneratorStub(channel)
    finally:
        await channel.close()


def tokenization(source: str) -> float:
    return REGISTRY.get_sample_value("switchboard_generator_prompt_tokenization_total", {"source": source}) or 0.0


async def run(stub: generator_pb2_grpc.GeneratorStub, **fields: object) -> tuple[list[int], common_pb2.Usage]:
    """(sampled ids, usage) of one greedy request."""
    request = generator_pb2.GeneratorGenerateRequest(
        sampling=common_pb2.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), **fields
    )
    messages = [m async for m in stub.Generate(request)]
    return [t for m in messages for t in m.token_ids], messages[-1].usage


async def rejected(stub: generator_pb2_grpc.GeneratorStub, **fields: object) -> dict:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await run(stub, **fields)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    return error_details(info.value)


def test_the_fingerprint_is_the_shared_one_of_the_model_folder(loaded: LoadedModel, model_dir: Path) -> None:
    assert loaded.tokenizer.fingerprint == fingerprint_file(model_dir)
    # A tokenizer built in memory has one too, from its own serialization.
    assert len(Tokenizer(loaded.tokenizer.inner).fingerprint) == 64


async def test_upstream_ids_of_its_own_tokenizer_are_not_tokenized_again(
    app: GeneratorApp, stub: generator_pb2_grpc.GeneratorStub, loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = loaded.tokenizer.encode(PROMPT)
    local_tokens, local_usage = await run(stub, prompt=PROMPT)

    def no_tokenizing(*args: object, **kwargs: object) -> list[int]:
        raise AssertionError("the replica tokenized a prompt that came with its own tokenizer's ids")

    monkeypatch.setattr(app.engine.tokenizer, "encode", no_tokenizing)
    before = tokenization("upstream"), tokenization("local")
    # The text goes along but the ids decide: a different text does not change the output.
    tokens, usage = await run(
        stub, prompt="something else entirely", prompt_token_ids=ids, tokenizer_fingerprint=app.servicer.tokenizer_fingerprint
    )
    assert tokens == local_tokens and usage.prompt_tokens == local_usage.prompt_tokens == len(ids)
    assert (tokenization("upstream"), tokenization("local")) == (before[0] + 1, before[1])


@pytest.mark.parametrize("fingerprint", ["0" * 64, ""])
async def test_ids_of_another_or_no_tokenizer_give_way_to_the_text(
    stub: generator_pb2_grpc.GeneratorStub, loaded: LoadedModel, fingerprint: str
) -> None:
    expected, _ = await run(stub, prompt=PROMPT)
    before = tokenization("local")
    wrong_ids = loaded.tokenizer.encode("Of man's first disobedience")
    tokens, usage = await run(stub, prompt=PROMPT, prompt_token_ids=wrong_ids, tokenizer_fingerprint=fingerprint)
    assert tokens == expected and usage.prompt_tokens == len(loaded.tokenizer.encode(PROMPT))
    assert tokenization("local") == before + 1


async def test_bad_upstream_ids_are_invalid_argument(app: GeneratorApp, stub: generator_pb2_grpc.GeneratorStub) -> None:
    own = app.servicer.tokenizer_fingerprint
    vocab = app.engine.vocab_size
    details = await rejected(stub, prompt=PROMPT, prompt_token_ids=[1, vocab + 5], tokenizer_fingerprint=own)
    assert details["field_violations"][0][0] == "prompt_token_ids" and "vocabulary" in details["message"]
    details = await rejected(stub, prompt=PROMPT, prompt_token_ids=[1] * CONTEXT, tokenizer_fingerprint=own)
    assert details["field_violations"][0][0] == "prompt_token_ids" and "shorten the prompt" in details["message"]
    details = await rejected(stub, prompt_token_ids=[1, 2], tokenizer_fingerprint="0" * 64)
    assert details["field_violations"][0][0] == "tokenizer_fingerprint" and "send the prompt text" in details["message"]
    # The replica keeps serving.
    tokens, _ = await run(stub, prompt=PROMPT)
    assert len(tokens) == 8


def write_profile(path: Path, model: str = "tiny-llama", **fit: float) -> Path:
    base = {"base_ms": 2.5, "prefill_token_ms": 0.04, "decode_seq_ms": 0.3, "context_token_ms": 0.001}
    path.write_text(json.dumps({"model": model, "fit": {**base, **fit}, "samples": []}))
    return path


async def test_registration_announces_kv_hashing_tokenizer_and_cost_model(
    loaded: LoadedModel, model_dir: Path, tmp_path: Path
) -> None:
    profile = write_profile(tmp_path / "cost.json")
    async with running_scheduler() as scheduler:
        settings = generator_settings(
            str(model_dir), scheduler_addr=f"127.0.0.1:{scheduler.service.port}", cost_profile=profile
        )
        async with running_generator(loaded, settings) as generator:

            async def registered() -> bool:
                return bool(await cluster(scheduler))

            assert await wait_for(registered)
            (replica,) = await cluster(scheduler)
            assert replica.kv_block_size == generator.engine.info.block_size == settings.block_size
            assert replica.kv_hash_seed == generator.engine.hash_seed
            assert replica.tokenizer_fingerprint == fingerprint_file(model_dir)
            assert replica.max_waiting == settings.max_waiting == generator.engine.config.max_waiting
            assert replica.cost_model == scheduler_pb2.StepCostModel(
                base_ms=2.5, prefill_token_ms=0.04, decode_seq_ms=0.3, context_token_ms=0.001
            )
            info = scheduler.registry.get(replica.replica_id).info
            assert info.cost_model == CostModel(2.5, 0.04, 0.3, 0.001)
            assert info.max_waiting == settings.max_waiting


async def test_without_a_cost_profile_no_cost_model_is_announced(loaded: LoadedModel, model_dir: Path) -> None:
    async with running_generator(loaded, generator_settings(str(model_dir))) as generator:
        announced = generator.announce()
    assert not announced.HasField("cost_model") and announced.tokenizer_fingerprint == fingerprint_file(model_dir)


def test_cost_profile_setting_errors_name_the_variable(tmp_path: Path) -> None:
    assert load_cost_profile(None) is None
    model, profiled = load_cost_profile(write_profile(tmp_path / "ok.json"))
    assert model == CostModel(2.5, 0.04, 0.3, 0.001) and profiled == "tiny-llama"
    (tmp_path / "not-json.json").write_text("{")
    (tmp_path / "no-fit.json").write_text(json.dumps({"samples": []}))
    for path in (
        tmp_path / "absent.json",
        tmp_path / "not-json.json",
        tmp_path / "no-fit.json",
        write_profile(tmp_path / "negative.json", base_ms=-1.0),
        write_profile(tmp_path / "nan.json", decode_seq_ms=float("nan")),
    ):
        with pytest.raises(SettingsError, match="GENERATOR_COST_PROFILE"):
            load_cost_profile(path)
