"""`switchboard bench`'s gRPC target against the real local stack (all four services as processes).

The stack serves a tiny random Llama checkpoint made in the test (one generator replica) on
free loopback ports, with a fresh API key; it is always stopped.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from switchboard.bench.prompts import PromptSynthesizer
from switchboard.bench.runner import replay
from switchboard.bench.targets.gateway_grpc import GatewayTarget
from switchboard.bench.workload import LengthDist, synthetic
from switchboard.cli.localstack import LocalStack, plan_stack
from switchboard.gateway.keys import add_key, new_key

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    folder = tmp_path_factory.mktemp("stack")
    config = folder / "experts.yaml"
    config.write_text(
        "experts:\n"
        "  - name: tiny\n"
        "    description: tiny random llama for the benchmark client test\n"
        f"    model: {tiny_checkpoint}\n"
        "    relative_cost: 1.0\n"
        "    replicas: 1\n")
    key = new_key()
    add_key(folder / "tenants.yaml", "bench", key)
    plan = plan_stack(config, folder / "tenants.yaml", free_ports=True, metrics=False)
    with LocalStack(plan, folder / "logs"):
        yield plan.gateway_addr, key


async def test_replay_against_the_local_stack(stack: tuple[str, str], tiny_checkpoint: Path,
                                              corpus_text: str) -> None:
    address, key = stack
    requests = synthetic(20.0, 8, LengthDist.parse("uniform:5:60"), LengthDist.parse("uniform:2:12"), seed=1)
    synth = PromptSynthesizer.from_file(tiny_checkpoint / "tokenizer.json", corpus_text, block_size=16)
    prompts = [synth.build(r).text for r in requests]
    records = await replay(GatewayTarget(address, key, model="tiny", temperature=0.0), requests, prompts,
                           timeout_s=120, warmup_requests=1)
    for request, record in zip(requests, records, strict=True):
        assert record.status == "ok", record.error
        assert record.model == "tiny"
        # Exact lengths end to end: the prompt tokenizes to what we built, the output is what we asked for.
        assert record.prompt_tokens == request.input_tokens
        assert record.output_tokens == request.output_tokens
        assert sum(n for _, n in record.chunks) == request.output_tokens
        assert record.finish_reason == "FINISH_REASON_LENGTH"


async def test_wrong_key_against_the_local_stack(stack: tuple[str, str]) -> None:
    address, _ = stack
    requests = synthetic(20.0, 2, LengthDist.parse("fixed:5"), LengthDist.parse("fixed:3"), seed=2)
    records = await replay(GatewayTarget(address, "sb-wrong"), requests, ["a b c", "d e f"], timeout_s=60)
    assert [r.status for r in records] == ["UNAUTHENTICATED"] * 2
