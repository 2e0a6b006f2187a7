"""The scheduler under mutual TLS: who may call what, and a replica speaks only for itself."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from switchboard.common.channels import open_channel
from switchboard.common.errors import error_details
from switchboard.common.pki import LocalCA
from switchboard.common.service import wait_started
from switchboard.common.settings import ServerSettings
from switchboard.common.tls import TlsIdentity
from switchboard.scheduler.app import SchedulerApp
from switchboard.scheduler.config import SchedulerSettings
from switchboard.scheduler.ownership import NotYourReplica, ReplicaOwners
from switchboard.v1 import scheduler_pb2, scheduler_pb2_grpc


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TlsIdentity]:
    ca = LocalCA.create(tmp_path_factory.mktemp("pki"))
    names = ("scheduler", "router", "gateway", "operator", "generator/bard-0", "generator/bard-1", "generator")
    return {name: ca.issue(name) for name in names}


@asynccontextmanager
async def scheduler(pki: dict[str, TlsIdentity]) -> AsyncIterator[str]:
    app = SchedulerApp(
        SchedulerSettings(server=ServerSettings(port=0, metrics_port=0, drain_seconds=0.1, tls=pki["scheduler"])),
        ["bard-small"],
    )
    task = asyncio.create_task(app.run(handle_signals=False))
    await wait_started(task, app.service.started)
    try:
        yield f"127.0.0.1:{app.service.port}"
    finally:
        app.service.stop()
        await task


def register(replica_id: str, port: int = 50061) -> scheduler_pb2.RegisterRequest:
    return scheduler_pb2.RegisterRequest(
        replica_id=replica_id, expert="bard-small", address=f"127.0.0.1:{port}", device="cpu", model_name="bard"
    )


@asynccontextmanager
async def as_(address: str, identity: TlsIdentity) -> AsyncIterator[scheduler_pb2_grpc.SchedulerStub]:
    async with open_channel(address, identity, peer_role="scheduler") as channel:
        yield scheduler_pb2_grpc.SchedulerStub(channel)


async def refused(call: object) -> tuple[grpc.StatusCode, str | None, str]:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call  # type: ignore[misc]
    return error.value.code(), error_details(error.value)["reason"], error.value.details() or ""


async def test_each_rpc_answers_only_its_callers_role(pki: dict[str, TlsIdentity]) -> None:
    async with scheduler(pki) as address:
        async with as_(address, pki["generator/bard-0"]) as generator:
            await generator.Register(register("bard-0"), timeout=5)
            code, reason, _ = await refused(generator.Place(scheduler_pb2.PlaceRequest(experts=["bard-small"]), timeout=5))
            assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "IDENTITY_NOT_ALLOWED")
        async with as_(address, pki["router"]) as router:
            placed = await router.Place(scheduler_pb2.PlaceRequest(request_id="r", experts=["bard-small"]), timeout=5)
            assert placed.placements[0].replica.replica_id == "bard-0"
            code, reason, message = await refused(router.Register(register("bard-9"), timeout=5))
            assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "IDENTITY_NOT_ALLOWED")
            assert "identity router may not call Register" in message
        async with as_(address, pki["gateway"]) as gateway:
            code, _, _ = await refused(gateway.Place(scheduler_pb2.PlaceRequest(experts=["bard-small"]), timeout=5))
            assert code == grpc.StatusCode.PERMISSION_DENIED  # only the router places
        async with as_(address, pki["operator"]) as operator:
            cluster = await operator.GetCluster(scheduler_pb2.GetClusterRequest(), timeout=5)
            assert [r.replica_id for r in cluster.replicas] == ["bard-0"]
            code, _, _ = await refused(operator.Deregister(scheduler_pb2.DeregisterRequest(replica_id="bard-0"), timeout=5))
            assert code == grpc.StatusCode.PERMISSION_DENIED


async def test_a_replica_speaks_only_for_its_own_id(pki: dict[str, TlsIdentity]) -> None:
    async with scheduler(pki) as address:
        async with as_(address, pki["generator/bard-0"]) as bard0, as_(address, pki["generator/bard-1"]) as bard1:
            await bard0.Register(register("bard-0"), timeout=5)
            # Another replica's certificate can neither take over, heartbeat nor drain bard-0.
            for call in (
                bard1.Register(register("bard-0", port=50099), timeout=5),
                bard1.ReportLoad(scheduler_pb2.ReportLoadRequest(replica_id="bard-0", draining=True), timeout=5),
                bard1.Deregister(scheduler_pb2.DeregisterRequest(replica_id="bard-0"), timeout=5),
            ):
                code, reason, message = await refused(call)
                assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "NOT_YOUR_REPLICA")
                assert "speaks only for replica bard-1" in message
            await bard0.ReportLoad(scheduler_pb2.ReportLoadRequest(replica_id="bard-0"), timeout=5)
            await bard0.Deregister(scheduler_pb2.DeregisterRequest(replica_id="bard-0"), timeout=5)


async def test_a_replica_id_is_bound_to_the_identity_that_registered_it(pki: dict[str, TlsIdentity]) -> None:
    async with scheduler(pki) as address:
        async with as_(address, pki["generator"]) as shared, as_(address, pki["generator/bard-1"]) as bard1:
            # A role-only certificate registers "bard-1" first: the id is bound to it while live.
            await shared.Register(register("bard-1"), timeout=5)
            code, reason, message = await refused(
                bard1.ReportLoad(scheduler_pb2.ReportLoadRequest(replica_id="bard-1", draining=True), timeout=5)
            )
            assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "NOT_YOUR_REPLICA")
            assert "registered by another identity (generator)" in message
            await shared.Deregister(scheduler_pb2.DeregisterRequest(replica_id="bard-1"), timeout=5)
            await bard1.Register(register("bard-1"), timeout=5)  # free again after the deregistration


def test_bindings_follow_the_registry() -> None:
    live = {"a"}
    owners = ReplicaOwners(lambda replica_id: replica_id in live)
    owners.check("a", None)  # no TLS: nothing to check
    owners.bind("a", "generator")
    with pytest.raises(NotYourReplica):
        owners.check("a", "generator/x")
    live.clear()  # expired
    owners.check("a", "generator/a")
    owners.prune()
    owners.bind("a", "generator/a")
    owners.check("a", "generator/a")


async def test_plaintext_servers_need_no_policy(tmp_path: Path) -> None:
    app = SchedulerApp(SchedulerSettings(server=ServerSettings(port=0)), ["bard-small"])
    assert app.service.settings.tls is None
