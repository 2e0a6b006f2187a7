"""The revision a replica announces, its ended/failed counters, and the drill faults (GENERATOR_FAULT_*)."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import grpc
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from engine_fixtures import build_llama
from service_fixtures import generator_settings, running_generator
from switchboard.common.channels import open_channel
from switchboard.common.errors import INJECTED_FAULT, error_details
from switchboard.generator.engine import EngineLoad
from switchboard.generator.loader import LoadedModel, load_model
from switchboard.generator.registration import load_to_proto
from switchboard.generator.revision import derived_revision, replica_revision
from switchboard.v1 import common_pb2, generator_pb2, generator_pb2_grpc


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_llama(tmp_path_factory.mktemp("revision") / "tiny-llama")


@pytest.fixture(scope="module")
def loaded(model_dir: Path) -> LoadedModel:
    return load_model(model_dir, "cpu", "float32")


def test_the_derived_revision_follows_the_files(model_dir: Path, tmp_path: Path) -> None:
    revision = derived_revision(model_dir)
    assert revision.startswith("sha-") and len(revision) == 16
    copy = shutil.copytree(model_dir, tmp_path / "copy")
    assert derived_revision(copy) == revision  # the same files elsewhere: the same revision
    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # the last tensor's last byte
    weights.write_bytes(bytes(data))
    assert derived_revision(copy) != revision
    assert replica_revision("  v7 ", str(model_dir)) == "v7"
    assert replica_revision("", str(model_dir)) == revision
    assert replica_revision("", "") == "" and derived_revision(tmp_path / "missing") == ""


def test_the_heartbeat_carries_the_counters() -> None:
    load = load_to_proto(EngineLoad(running=1, waiting=0, kv_blocks_used=1, kv_blocks_total=8, tokens_per_second=0.0), (7, 2))
    assert (load.requests_ended, load.requests_failed) == (7, 2)


async def test_counters_and_injected_faults(loaded: LoadedModel, model_dir: Path) -> None:
    settings = generator_settings(str(model_dir), revision="v2", fault_error_ratio=0.5)
    async with running_generator(loaded, settings) as app:
        assert app.announce().revision == "v2"
        channel = open_channel(f"127.0.0.1:{app.service.port}")
        stub = generator_pb2_grpc.GeneratorStub(channel)
        refused = served = 0
        try:
            for i in range(40):
                call = stub.Generate(
                    generator_pb2.GeneratorGenerateRequest(
                        request_id=f"r{i}", prompt="To be", sampling=common_pb2.SamplingParams(max_tokens=2, temperature=0.0)
                    )
                )
                try:
                    async for _ in call:
                        pass
                    served += 1
                except grpc.aio.AioRpcError as error:
                    assert error.code() == grpc.StatusCode.UNAVAILABLE
                    assert error_details(error)["reason"] == INJECTED_FAULT
                    assert "GENERATOR_FAULT_ERROR_RATIO" in error.details()
                    refused += 1
            # An invalid request is the client's: neither ended nor failed by the replica.
            with pytest.raises(grpc.aio.AioRpcError):
                async for _ in stub.Generate(generator_pb2.GeneratorGenerateRequest(request_id="x" * 300, prompt="To be")):
                    pass
        finally:
            await channel.close()
        assert refused > 5 and served > 5  # a share, not all or none (P(5 or fewer of 40) < 1e-6)
        assert (app.servicer.outcomes.ended, app.servicer.outcomes.failed) == (40, refused)


async def test_an_injected_delay_holds_the_first_token(loaded: LoadedModel, model_dir: Path) -> None:
    settings = generator_settings(str(model_dir), fault_first_token_delay_seconds=0.3)
    async with running_generator(loaded, settings) as app:
        channel = open_channel(f"127.0.0.1:{app.service.port}")
        try:
            started = time.monotonic()
            call = generator_pb2_grpc.GeneratorStub(channel).Generate(
                generator_pb2.GeneratorGenerateRequest(prompt="To be", sampling=common_pb2.SamplingParams(max_tokens=1))
            )
            async for _ in call:
                break
            # A lower bound only: the delay is a sleep before the work, so the first token cannot come sooner.
            assert time.monotonic() - started >= 0.3
        finally:
            await channel.close()


SCORED = ["To be, or not to be, that is the question:", "Of Man's first disobedience, and the fruit"]


async def test_score_matches_transformers_and_refuses_bad_texts(loaded: LoadedModel, model_dir: Path) -> None:
    import torch
    import transformers
    from tokenizers import Tokenizer

    async with running_generator(loaded, generator_settings(str(model_dir))) as app:
        channel = open_channel(f"127.0.0.1:{app.service.port}")
        stub = generator_pb2_grpc.GeneratorStub(channel)
        try:
            reply = await stub.Score(generator_pb2.ScoreRequest(texts=SCORED))
            for texts, field in (([], "texts"), (["x"] * 65, "texts"), ([SCORED[0], "T"], "texts[1]")):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.Score(generator_pb2.ScoreRequest(texts=texts))
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert error_details(caught.value)["field_violations"][0][0] == field
        finally:
            await channel.close()
    # The reference: transformers' loss over the same ids (mean NLL of the tokens after the first).
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    for text, score in zip(SCORED, reply.scores, strict=True):
        ids = torch.tensor([tokenizer.encode(text).ids])
        with torch.no_grad():
            loss = float(reference(ids, labels=ids).loss)
        assert score.tokens == ids.shape[1] - 1
        assert -score.log_likelihood / score.tokens == pytest.approx(loss, abs=1e-4)


async def test_the_last_message_carries_the_replica_time(loaded: LoadedModel, model_dir: Path) -> None:
    async with running_generator(loaded, generator_settings(str(model_dir))) as app:
        channel = open_channel(f"127.0.0.1:{app.service.port}")
        try:
            started = time.monotonic()
            messages = [
                m
                async for m in generator_pb2_grpc.GeneratorStub(channel).Generate(
                    generator_pb2.GeneratorGenerateRequest(
                        prompt="To be", sampling=common_pb2.SamplingParams(max_tokens=4, temperature=0.0)
                    )
                )
            ]
            wall = time.monotonic() - started
        finally:
            await channel.close()
    assert all(not m.HasField("usage") for m in messages[:-1])
    # Alone on the replica, its share is the whole time it was in flight: more than 0, within the call.
    assert 0.0 < messages[-1].usage.replica_seconds <= wall
    assert app.servicer.replica_time.in_flight == 0
