"""The replicas' KV hashing, tokenizer and cost model in Register and GetCluster, and the prompt's
token ids in Place: mapped onto the domain objects, validated with INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import grpc
import pytest
from switchboard.common.channels import open_channel
from switchboard.common.service import wait_started
from switchboard.common.settings import ServerSettings
from switchboard.replica.cost_model import CostModel
from switchboard.scheduler.app import SchedulerApp
from switchboard.scheduler.config import SchedulerSettings
from switchboard.scheduler.policies import LeastLoadedPolicy, PlacementQuery
from switchboard.scheduler.registry import ReplicaView
from switchboard.scheduler.servicer import MAX_KV_BLOCK_SIZE, MAX_PROMPT_TOKEN_IDS
from switchboard.v1 import scheduler_pb2, scheduler_pb2_grpc

from .conftest import EXPERTS, running_scheduler
from .test_servicer import expect_error, register_request

FINGERPRINT = "ab" * 32
COST = scheduler_pb2.StepCostModel(base_ms=2.5, prefill_token_ms=0.04, decode_seq_ms=0.3, context_token_ms=0.001)


def announced(replica_id: str = "a", **fields: object) -> scheduler_pb2.RegisterRequest:
    """A RegisterRequest with KV hashing, tokenizer and cost model (override any with `fields`)."""
    request = register_request(replica_id)
    request.kv_block_size = 16
    request.kv_hash_seed = 2**64 - 5
    request.tokenizer_fingerprint = FINGERPRINT
    request.cost_model.CopyFrom(COST)
    for key, value in fields.items():
        if key == "cost_model":
            request.cost_model.CopyFrom(value)  # type: ignore[arg-type]
        else:
            setattr(request, key, value)
    return request


class RecordingPolicy:
    """Least-loaded, keeping every query it ranked (what Place handed the policy)."""

    name = "recording"

    def __init__(self) -> None:
        self.queries: list[PlacementQuery] = []

    def rank(self, query: PlacementQuery, candidates: Sequence[ReplicaView]) -> list[ReplicaView]:
        self.queries.append(query)
        return LeastLoadedPolicy().rank(query, candidates)


@asynccontextmanager
async def scheduler_with(policy: RecordingPolicy) -> AsyncIterator[scheduler_pb2_grpc.SchedulerStub]:
    """A scheduler placing with `policy`, and a stub to it."""
    settings = SchedulerSettings(server=ServerSettings(host="127.0.0.1", port=0, metrics_port=0, drain_seconds=0.2))
    app = SchedulerApp(settings, EXPERTS, policy=policy)
    task = asyncio.create_task(app.run(handle_signals=False))
    await wait_started(task, app.service.started)
    channel = open_channel(f"127.0.0.1:{app.service.port}")
    try:
        yield scheduler_pb2_grpc.SchedulerStub(channel)
    finally:
        await channel.close()
        app.service.stop()
        await task


async def test_register_fields_reach_the_registry_and_get_cluster(stub: scheduler_pb2_grpc.SchedulerStub, scheduler) -> None:
    await stub.Register(announced("a"))
    await stub.Register(register_request("plain", port=50062))
    info = scheduler.registry.get("a").info
    assert (info.kv_block_size, info.kv_hash_seed, info.tokenizer_fingerprint) == (16, 2**64 - 5, FINGERPRINT)
    assert info.cost_model == CostModel(2.5, 0.04, 0.3, 0.001)
    plain = scheduler.registry.get("plain").info
    assert (plain.kv_block_size, plain.tokenizer_fingerprint, plain.cost_model) == (0, "", None)
    cluster = {r.replica_id: r for r in (await stub.GetCluster(scheduler_pb2.GetClusterRequest())).replicas}
    replica = cluster["a"]
    assert (replica.kv_block_size, replica.kv_hash_seed, replica.tokenizer_fingerprint) == (16, 2**64 - 5, FINGERPRINT)
    assert replica.HasField("cost_model") and replica.cost_model == COST
    assert not cluster["plain"].HasField("cost_model") and cluster["plain"].kv_block_size == 0
    # Place answers carry the same replica fields.
    reply = await stub.Place(scheduler_pb2.PlaceRequest(experts=["bard-small"], max_alternates=1))
    by_id = {reply.placements[0].replica.replica_id: reply.placements[0].replica}
    by_id.update({r.replica_id: r for r in reply.placements[0].alternates})
    assert by_id["a"].tokenizer_fingerprint == FINGERPRINT and by_id["a"].cost_model == COST


async def test_re_registration_replaces_the_announced_fields(stub: scheduler_pb2_grpc.SchedulerStub, scheduler) -> None:
    await stub.Register(announced("a"))
    request = announced("a", kv_block_size=32, tokenizer_fingerprint="cd" * 32)
    request.ClearField("cost_model")
    await stub.Register(request)
    info = scheduler.registry.get("a").info
    assert (info.kv_block_size, info.tokenizer_fingerprint, info.cost_model) == (32, "cd" * 32, None)


@pytest.mark.parametrize(
    ("field", "changes"),
    [
        ("kv_block_size", {"kv_block_size": MAX_KV_BLOCK_SIZE + 1}),
        ("kv_block_size", {"kv_block_size": 2**32 - 1}),
        ("tokenizer_fingerprint", {"tokenizer_fingerprint": "f" * 257}),
        ("cost_model.base_ms", {"cost_model": scheduler_pb2.StepCostModel(base_ms=-1.0)}),
        ("cost_model.prefill_token_ms", {"cost_model": scheduler_pb2.StepCostModel(prefill_token_ms=float("nan"))}),
        ("cost_model.decode_seq_ms", {"cost_model": scheduler_pb2.StepCostModel(decode_seq_ms=float("inf"))}),
        ("cost_model.context_token_ms", {"cost_model": scheduler_pb2.StepCostModel(context_token_ms=-1e-9)}),
    ],
)
async def test_register_rejects_bad_announcements(
    stub: scheduler_pb2_grpc.SchedulerStub, scheduler, field: str, changes: dict
) -> None:
    details = await expect_error(stub.Register(announced("a", **changes)), grpc.StatusCode.INVALID_ARGUMENT)
    assert details["field_violations"][0][0] == field and field in details["message"]
    assert scheduler.registry.get("a") is None  # a refused registration registers nothing


async def test_register_accepts_the_largest_block_size_and_a_zero_cost() -> None:
    async with running_scheduler() as app:
        channel = open_channel(f"127.0.0.1:{app.service.port}")
        try:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            await stub.Register(announced("a", kv_block_size=MAX_KV_BLOCK_SIZE, cost_model=scheduler_pb2.StepCostModel()))
            assert app.registry.get("a").info.cost_model == CostModel(0.0, 0.0, 0.0, 0.0)
        finally:
            await channel.close()


async def test_place_hands_the_token_ids_and_fingerprint_to_the_policy() -> None:
    policy = RecordingPolicy()
    ids = list(range(40))
    async with scheduler_with(policy) as stub:
        await stub.Register(announced("a"))
        await stub.Place(
            scheduler_pb2.PlaceRequest(
                request_id="r1", experts=["bard-small"], prompt_token_ids=ids, tokenizer_fingerprint=FINGERPRINT
            )
        )
        await stub.Place(scheduler_pb2.PlaceRequest(request_id="r2", experts=["bard-small"]))
    first, second = policy.queries
    assert first.prompt_token_ids == tuple(ids) and first.tokenizer_fingerprint == FINGERPRINT
    assert len(first.block_hashes(16, 2**64 - 5)) == 2  # 40 ids: two full blocks of 16
    assert second.prompt_token_ids == () and second.tokenizer_fingerprint == ""


@pytest.mark.parametrize(
    ("field", "changes"),
    [
        ("prompt_token_ids", {"prompt_token_ids": [1] * (MAX_PROMPT_TOKEN_IDS + 1)}),
        ("tokenizer_fingerprint", {"tokenizer_fingerprint": "f" * 257}),
    ],
)
async def test_place_rejects_too_many_ids_or_a_long_fingerprint(
    stub: scheduler_pb2_grpc.SchedulerStub, field: str, changes: dict
) -> None:
    await stub.Register(announced("a"))
    request = scheduler_pb2.PlaceRequest(request_id="r1", experts=["bard-small"], **changes)
    details = await expect_error(stub.Place(request), grpc.StatusCode.INVALID_ARGUMENT)
    assert details["field_violations"][0][0] == field and field in details["message"]
    assert (await stub.GetCluster(scheduler_pb2.GetClusterRequest())).replicas[0].inflight == 0


async def test_place_accepts_exactly_the_limit(stub: scheduler_pb2_grpc.SchedulerStub) -> None:
    await stub.Register(announced("a"))
    reply = await stub.Place(
        scheduler_pb2.PlaceRequest(
            experts=["bard-small"], prompt_token_ids=[7] * MAX_PROMPT_TOKEN_IDS, tokenizer_fingerprint=FINGERPRINT
        )
    )
    assert reply.placements[0].replica.replica_id == "a"
