"""Registration of a real generator replica with a real in-process scheduler.

Register at start, heartbeats that carry the engine's load, re-registration after a scheduler
restart, serving on while the scheduler is down, and deregistration on drain.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from engine_fixtures import build_llama
from service_fixtures import generator_settings, running_generator, wait_for
from switchboard.common.channels import open_channel
from switchboard.common.settings import ServerSettings
from switchboard.generator.loader import LoadedModel, load_model
from switchboard.scheduler.app import SchedulerApp
from switchboard.scheduler.config import SchedulerSettings
from switchboard.v1 import common_pb2, generator_pb2, generator_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

PROMPT = "Whether 'tis nobler in the mind to suffer"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_llama(tmp_path_factory.mktemp("registration") / "tiny-llama", max_positions=4096)


@pytest.fixture(scope="module")
def loaded(model_dir: Path) -> LoadedModel:
    return load_model(model_dir, "cpu", "float32")


@asynccontextmanager
async def running_scheduler(port: int = 0) -> AsyncIterator[SchedulerApp]:
    """A real scheduler with fast heartbeats (0.1 s) and a 2 s expiry."""
    settings = SchedulerSettings(
        server=ServerSettings(host="127.0.0.1", port=port, metrics_port=0, drain_seconds=0.2),
        heartbeat_seconds=0.1,
        expiry_seconds=2.0,
    )
    app = SchedulerApp(settings, ["bard-small", "milton-small"])
    task = asyncio.create_task(app.run(handle_signals=False))
    await app.service.started.wait()
    try:
        yield app
    finally:
        app.service.stop()
        await task


async def cluster(app: SchedulerApp) -> list[scheduler_pb2.Replica]:
    channel = open_channel(f"127.0.0.1:{app.service.port}")
    try:
        reply = await scheduler_pb2_grpc.SchedulerStub(channel).GetCluster(scheduler_pb2.GetClusterRequest())
        return list(reply.replicas)
    finally:
        await channel.close()


async def test_register_heartbeat_load_and_deregister_on_drain(loaded: LoadedModel, model_dir: Path) -> None:
    async with running_scheduler() as scheduler:
        settings = generator_settings(str(model_dir), scheduler_addr=f"127.0.0.1:{scheduler.service.port}")
        async with running_generator(loaded, settings) as generator:
            assert await wait_for(lambda: _has_replica(scheduler, generator.identity.replica_id))
            (replica,) = await cluster(scheduler)
            assert replica.expert == "bard-small"
            assert replica.address == f"127.0.0.1:{generator.service.port}"
            assert replica.model_name == "tiny-llama" and replica.max_model_len == 4096
            assert replica.load.kv_blocks_total == generator.engine.info.kv_blocks_total
            assert generator.registrar is not None
            # The scheduler's heartbeat interval (0.1 s) was adopted.
            assert generator.registrar.heartbeat_seconds == pytest.approx(0.1)

            # Heartbeats carry the live load: a long stream shows up as one running sequence.
            channel = open_channel(f"127.0.0.1:{generator.service.port}")
            stub = generator_pb2_grpc.GeneratorStub(channel)
            call = stub.Generate(
                generator_pb2.GeneratorGenerateRequest(
                    prompt=PROMPT,
                    sampling=common_pb2.SamplingParams(max_tokens=4000, temperature=0.0, ignore_eos=True),
                )
            )
            await call.read()

            async def busy() -> bool:
                replicas = await cluster(scheduler)
                return (
                    bool(replicas) and replicas[0].load.running == 1 and replicas[0].load.kv_blocks_used > 0
                )

            assert await wait_for(busy)
            call.cancel()

            async def idle() -> bool:
                replicas = await cluster(scheduler)
                return (
                    bool(replicas) and replicas[0].load.running == 0 and replicas[0].load.kv_blocks_used == 0
                )

            assert await wait_for(idle)
            await channel.close()
            # Drain (what SIGTERM does): the replica deregisters before the server stops.
            generator.service.stop()
            await generator.run_task  # type: ignore[attr-defined]
            assert await cluster(scheduler) == []


async def _has_replica(scheduler: SchedulerApp, replica_id: str) -> bool:
    try:
        return any(r.replica_id == replica_id for r in await cluster(scheduler))
    except grpc.aio.AioRpcError:
        # Just after a restart the shared subchannel may still be in reconnect backoff.
        return False


async def test_serves_while_scheduler_down_and_reregisters_after_restart(
    loaded: LoadedModel, model_dir: Path
) -> None:
    async with running_scheduler() as first:
        port = first.service.port
        settings = generator_settings(str(model_dir), scheduler_addr=f"127.0.0.1:{port}")
        async with running_generator(loaded, settings) as generator:
            replica_id = generator.identity.replica_id
            assert await wait_for(lambda: _has_replica(first, replica_id))
            registrar = generator.registrar
            assert registrar is not None and registrar.registrations == 1
            # The scheduler goes away (its state with it) ...
            first.service.stop()
            await first.service.server.wait_for_termination()
            assert await wait_for(lambda: registrar.failures > 0)
            # ... and the replica keeps serving meanwhile.
            channel = open_channel(f"127.0.0.1:{generator.service.port}")
            try:
                stub = generator_pb2_grpc.GeneratorStub(channel)
                messages = [
                    m
                    async for m in stub.Generate(
                        generator_pb2.GeneratorGenerateRequest(
                            prompt=PROMPT, sampling=common_pb2.SamplingParams(max_tokens=3, temperature=0.0)
                        )
                    )
                ]
                assert messages[-1].finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
            finally:
                await channel.close()
            # A new scheduler on the same address knows nothing: the heartbeat gets known=false and
            # the replica registers again.
            async with running_scheduler(port=port) as second:
                assert await wait_for(lambda: _has_replica(second, replica_id))
                assert registrar.registrations == 2


async def test_heartbeats_carry_kv_events_and_resync_when_asked(loaded: LoadedModel, model_dir: Path) -> None:
    """A request fills the prefix cache; the heartbeats' KV events put its blocks in the scheduler's
    index of the replica; when the scheduler loses that index, the replica sends a reset snapshot."""
    from switchboard.replica import prompt_block_hashes
    from switchboard.scheduler.prefix_index import PrefixIndex

    async with running_scheduler() as scheduler:
        settings = generator_settings(str(model_dir), scheduler_addr=f"127.0.0.1:{scheduler.service.port}")
        async with running_generator(loaded, settings) as generator:
            replica_id = generator.identity.replica_id
            assert await wait_for(lambda: _has_replica(scheduler, replica_id))
            registrar = generator.registrar
            assert registrar is not None and registrar.kv_resets == 1  # the registration's snapshot
            engine = generator.engine
            prompt = " ".join([PROMPT] * 6)
            hashes = prompt_block_hashes(engine.tokenizer.encode(prompt), engine.info.block_size, engine.hash_seed)
            assert len(hashes) >= 2
            registry = scheduler.registry
            assert registry.matched_blocks(replica_id, hashes) == 0

            channel = open_channel(f"127.0.0.1:{generator.service.port}")
            try:
                stub = generator_pb2_grpc.GeneratorStub(channel)
                request = generator_pb2.GeneratorGenerateRequest(
                    prompt=prompt, sampling=common_pb2.SamplingParams(max_tokens=2, temperature=0.0)
                )
                _ = [m async for m in stub.Generate(request)]
            finally:
                await channel.close()
            assert await wait_for(lambda: registry.matched_blocks(replica_id, hashes) == len(hashes))
            assert registrar.kv_acked_sequence >= 1 and registrar.kv_resets == 1

            # The scheduler loses its index of the replica: the next answer asks for a resync, and
            # the snapshot brings the cached blocks back.
            record = registry.get(replica_id)
            assert record is not None
            record.prefix = PrefixIndex()
            assert await wait_for(lambda: registrar.kv_resets == 2)
            assert await wait_for(lambda: registry.matched_blocks(replica_id, hashes) == len(hashes))
            assert not record.prefix.ack().resync_needed


def test_kv_reports_are_chunked_and_an_unacknowledged_snapshot_is_sent_again() -> None:
    """Without a network: the registrar's KV reports stay within the per-report bound, a snapshot
    is resent until acknowledged, and a resync answer brings a fresh one."""
    from switchboard.generator.registration import MAX_KV_HASHES_PER_REPORT, Registrar
    from switchboard.replica import KvEventJournal

    journal = KvEventJournal()
    for h in range(1, 5001):
        journal.stored(h)
    registrar = Registrar("127.0.0.1:1", scheduler_pb2.RegisterRequest, lambda: None, kv_events=journal)  # type: ignore[arg-type]

    def hashes(kv: scheduler_pb2.KvEvents) -> int:
        return sum(len(e.stored_block_hashes) + len(e.evicted_block_hashes) for e in kv.events)

    first = registrar._kv_batch()
    assert first is not None and first.reset and 0 < hashes(first) <= MAX_KV_HASHES_PER_REPORT
    again = registrar._kv_batch()  # no answer came (the report failed): the same snapshot again
    assert again == first
    registrar._kv_answer(first.events[-1].sequence, resync_needed=False)
    assert registrar._kv_hurry  # the rest is pending: the next report goes at once
    rest = registrar._kv_batch()
    assert rest is not None and not rest.reset and rest.events[0].sequence == first.events[-1].sequence + 1
    assert hashes(first) + hashes(rest) == 5000
    registrar._kv_answer(rest.events[-1].sequence, resync_needed=False)
    assert not registrar._kv_hurry and registrar.kv_resets == 1
    registrar._kv_answer(rest.events[-1].sequence, resync_needed=True)
    fresh = registrar._kv_batch()
    assert fresh is not None and fresh.reset and registrar.kv_resets == 2
