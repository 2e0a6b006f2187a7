"""Tokenize once, upstream, on a real in-process stack: scheduler, router, one generator replica and
the gateway, each a real gRPC server on a free loopback port in this process, talking over real
channels (the replica's engine loads the real model of `model_dir`).

A prompt sent twice through the gateway: the router tokenizes it with the expert's tokenizer, the
replica runs those ids without tokenizing again (its metric counts both requests as `upstream`),
and the ids reached the scheduler: the replica's prefix index there, folded from its KV events,
holds every full block of the second request's hash chain (`PlacementQuery.block_hashes`, as a
prefix-aware policy computes it), and the replica served that prompt from its prefix cache.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from switchboard.common.channels import open_channel
from switchboard.common.service import GrpcService, wait_started
from switchboard.common.settings import ServerSettings
from switchboard.common.tokenizer_fingerprint import fingerprint_file
from switchboard.gateway.config import GatewaySettings
from switchboard.gateway.keys import add_key, new_key
from switchboard.gateway.server import gateway_service as make_gateway_service
from switchboard.gateway.server import serve as serve_gateway
from switchboard.generator.app import GeneratorApp, engine_config
from switchboard.generator.config import GeneratorSettings
from switchboard.generator.engine import Engine
from switchboard.generator.engine.engine import model_fingerprint
from switchboard.generator.loader import load_model
from switchboard.router.config import RouterSettings
from switchboard.router.server import serve as serve_router
from switchboard.scheduler.app import SchedulerApp
from switchboard.scheduler.config import SchedulerSettings
from switchboard.scheduler.placement import PlacementRequest
from switchboard.scheduler.policies import PlacementQuery
from switchboard.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

from .conftest import write_experts_config

pytestmark = pytest.mark.slow

EXPERT = "bard-small"
# Long enough for several full KV blocks whatever the tokenizer (16 tokens a block).
PROMPT = (
    "To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer "
    "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles "
    "and by opposing end them. To die, to sleep, no more; and by a sleep to say we end the heart-ache"
)


def server(**fields: object) -> ServerSettings:
    return ServerSettings(host="127.0.0.1", port=0, metrics_port=0, drain_seconds=0.5, **fields)


@dataclass
class InProcessStack:
    """The running services, the requests the scheduler was asked to place, and a gateway stub."""

    scheduler: SchedulerApp
    generator: GeneratorApp
    gateway: gateway_pb2_grpc.GatewayStub
    key: str
    placed: list[PlacementRequest]


@asynccontextmanager
async def in_process_stack(tmp_path: Path, model: Path) -> AsyncIterator[InProcessStack]:
    """Scheduler, router, generator and gateway in this process; everything stopped on exit."""
    config = write_experts_config(tmp_path / "experts.yaml", model, {EXPERT: 1})
    keys_file, key = tmp_path / "tenants.yaml", new_key()
    add_key(keys_file, "test-tenant", key)
    async with AsyncExitStack() as stack:

        async def start(task: asyncio.Task, service: GrpcService) -> None:
            await wait_started(task, service.started)

            async def stop() -> None:
                service.stop()
                await task

            stack.push_async_callback(stop)

        scheduler = SchedulerApp(
            SchedulerSettings(server=server(), heartbeat_seconds=0.1, expiry_seconds=3.0), [EXPERT]
        )
        await start(asyncio.create_task(scheduler.run(handle_signals=False)), scheduler.service)
        placed: list[PlacementRequest] = []
        place = scheduler.servicer.placer.place

        def recording(request: PlacementRequest):  # what the scheduler was asked, as its core sees it
            placed.append(request)
            return place(request)

        scheduler.servicer.placer.place = recording  # type: ignore[method-assign]
        scheduler_addr = f"127.0.0.1:{scheduler.service.port}"

        generator_settings = GeneratorSettings(
            server=server(), model=str(model), expert=EXPERT, kv_cache_mb=16, max_num_seqs=4, scheduler_addr=scheduler_addr
        )
        loaded = load_model(model, "cpu", "float32")
        engine = Engine(loaded, engine_config(generator_settings, model_identity=model_fingerprint(loaded)))
        generator = GeneratorApp(generator_settings, engine)
        generator_task = asyncio.create_task(generator.run(handle_signals=False))
        await wait_started(generator_task, generator.ready)

        async def stop_generator() -> None:
            generator.service.stop()
            await generator_task

        stack.push_async_callback(stop_generator)

        router_service = GrpcService("router", server())
        router_settings = RouterSettings(
            server=router_service.settings, scheduler_addr=scheduler_addr, experts_config=config, load_poll_seconds=0.1
        )
        await start(asyncio.create_task(serve_router(router_settings, router_service, False)), router_service)
        gateway_service = make_gateway_service(server())
        gateway_settings = GatewaySettings(
            server=gateway_service.settings, router_addr=f"127.0.0.1:{router_service.port}", tenants_file=keys_file, http_port=0
        )
        await start(asyncio.create_task(serve_gateway(gateway_settings, gateway_service, False)), gateway_service)
        channel = open_channel(f"127.0.0.1:{gateway_service.port}")
        stack.push_async_callback(channel.close)
        yield InProcessStack(scheduler, generator, gateway_pb2_grpc.GatewayStub(channel), key, placed)


async def until(predicate, seconds: float = 20.0) -> bool:
    """Poll `predicate` every 50 ms for up to `seconds`."""
    for _ in range(int(seconds / 0.05)):
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return False


def tokenization(source: str) -> float:
    return REGISTRY.get_sample_value("switchboard_generator_prompt_tokenization_total", {"source": source}) or 0.0


async def test_the_prompt_is_tokenized_once_upstream_and_its_ids_reach_the_scheduler(
    tmp_path: Path, model_dir: Path
) -> None:
    async with in_process_stack(tmp_path, model_dir) as stack:
        replica_id = stack.generator.identity.replica_id
        assert await until(lambda: stack.scheduler.registry.get(replica_id) is not None)
        info = stack.scheduler.registry.get(replica_id).info
        # The replica announced how it hashes blocks and which tokenizer it has.
        assert info.kv_block_size == 16 and info.kv_hash_seed == stack.generator.engine.hash_seed != 0
        assert info.tokenizer_fingerprint == fingerprint_file(model_dir)
        upstream, local = tokenization("upstream"), tokenization("local")

        async def complete(request_id: str) -> gateway_pb2.CompleteResponse:
            return await stack.gateway.Complete(
                gateway_pb2.CompleteRequest(
                    request_id=request_id, prompt=PROMPT, sampling=common_pb2.SamplingParams(max_tokens=4, temperature=0.0)
                ),
                metadata=[("authorization", f"Bearer {stack.key}")],
                timeout=60,
            )

        first = await complete("first")
        # The router's ids are what the replica's own tokenizer makes of the prompt, and they went
        # with the placement, named by the replica's tokenizer fingerprint.
        expected_ids = tuple(stack.generator.engine.tokenizer.encode(PROMPT))
        assert stack.placed[0].prompt_token_ids == expected_ids
        assert stack.placed[0].tokenizer_fingerprint == info.tokenizer_fingerprint
        assert first.usage.prompt_tokens == len(expected_ids)
        record = stack.scheduler.registry.get(replica_id)
        hashes_first = PlacementQuery("first", EXPERT, prompt_token_ids=stack.placed[0].prompt_token_ids).block_hashes(
            info.kv_block_size, info.kv_hash_seed
        )
        assert len(hashes_first) >= 3
        # The replica's KV events (heartbeats every 0.1 s) bring the prompt's blocks into its index.
        assert await until(lambda: record.prefix.matched_blocks(hashes_first) == len(hashes_first))

        second = await complete("second")
        placed = stack.placed[1]
        query = dataclasses.replace(
            PlacementQuery("second", EXPERT), prompt_token_ids=placed.prompt_token_ids, tokenizer_fingerprint=placed.tokenizer_fingerprint
        )
        hashes = query.block_hashes(info.kv_block_size, info.kv_hash_seed)
        assert hashes == hashes_first
        assert stack.scheduler.registry.matched_blocks(replica_id, hashes) == len(hashes)
        assert second.usage.cached_prompt_tokens >= len(hashes) * info.kv_block_size - info.kv_block_size
        assert second.text == first.text
        # Both prompts were tokenized upstream only: the replica never tokenized them.
        assert (tokenization("upstream"), tokenization("local")) == (upstream + 2, local)
