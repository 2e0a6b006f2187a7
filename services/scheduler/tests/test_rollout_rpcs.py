"""The rollout RPCs over a real scheduler server: each refusal's status and field, the revision in
GetCluster and Place, heartbeat outcomes feeding the gates, and the state file across a restart."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY
from switchboard.common.channels import open_channel
from switchboard.common.errors import error_details
from switchboard.v1 import scheduler_pb2, scheduler_pb2_grpc

from .conftest import running_scheduler


def register(replica_id: str, revision: str, port: int) -> scheduler_pb2.RegisterRequest:
    return scheduler_pb2.RegisterRequest(
        replica_id=replica_id, expert="bard-small", address=f"127.0.0.1:{port}", revision=revision
    )


def rollout_spec(**fields: object) -> scheduler_pb2.RolloutSpec:
    values: dict[str, object] = {
        "expert": "bard-small",
        "from_revision": "v1",
        "to_revision": "v2",
        "steps": [scheduler_pb2.RolloutStep(weight=1.0, duration_seconds=60.0)],
        "gates": scheduler_pb2.RolloutGates(min_requests=5),
    }
    values.update(fields)
    return scheduler_pb2.RolloutSpec(**values)  # type: ignore[arg-type]


async def expect_error(call, code: grpc.StatusCode) -> dict:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    return error_details(info.value) | {"details": info.value.details()}


async def test_rollout_rpcs_refuse_what_they_cannot_do(tmp_path: Path) -> None:
    async with running_scheduler(rollout_state_file=tmp_path / "rollouts.json") as app:
        channel = open_channel(f"127.0.0.1:{app.service.port}")
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        try:
            await stub.Register(register("old", "v1", 50061))
            error = await expect_error(
                stub.GetRollout(scheduler_pb2.GetRolloutRequest(expert="bard-small")),
                grpc.StatusCode.NOT_FOUND,
            )
            assert error["reason"] == "ROLLOUT_NOT_FOUND"
            await expect_error(
                stub.GetRollout(scheduler_pb2.GetRolloutRequest()), grpc.StatusCode.INVALID_ARGUMENT
            )
            await expect_error(
                stub.StartRollout(scheduler_pb2.StartRolloutRequest()), grpc.StatusCode.INVALID_ARGUMENT
            )
            for spec, field in (
                (rollout_spec(expert="nope"), "spec.expert"),
                (rollout_spec(to_revision="v1"), "spec.to_revision"),
                (
                    rollout_spec(steps=[scheduler_pb2.RolloutStep(weight=2.0, duration_seconds=1.0)]),
                    "spec.steps[0].weight",
                ),
                (rollout_spec(strategy=99), "spec.strategy"),
                (
                    rollout_spec(gates=scheduler_pb2.RolloutGates(max_error_ratio=-1.0)),
                    "spec.gates.max_error_ratio",
                ),
            ):
                error = await expect_error(
                    stub.StartRollout(scheduler_pb2.StartRolloutRequest(spec=spec)),
                    grpc.StatusCode.INVALID_ARGUMENT,
                )
                assert error["field_violations"][0][0] == field
            # v2 has no ready replica yet.
            error = await expect_error(
                stub.StartRollout(scheduler_pb2.StartRolloutRequest(spec=rollout_spec())),
                grpc.StatusCode.FAILED_PRECONDITION,
            )
            assert error["reason"] == "ROLLOUT_CONFLICT" and "no ready replica" in error["details"]
            await stub.Register(register("new", "v2", 50062))
            started = (await stub.StartRollout(scheduler_pb2.StartRolloutRequest(spec=rollout_spec()))).rollout
            assert started.state == scheduler_pb2.ROLLOUT_STATE_RUNNING and started.weight == 1.0
            assert started.spec.gates.max_ttft_p95_ratio == pytest.approx(1.5)  # defaults filled in
            await expect_error(
                stub.StartRollout(scheduler_pb2.StartRolloutRequest(spec=rollout_spec())),
                grpc.StatusCode.FAILED_PRECONDITION,
            )
            await expect_error(
                stub.ResumeRollout(scheduler_pb2.ResumeRolloutRequest(expert="bard-small")),
                grpc.StatusCode.FAILED_PRECONDITION,
            )
            await expect_error(
                stub.PauseRollout(scheduler_pb2.PauseRolloutRequest(expert="bard-small", reason="x" * 2000)),
                grpc.StatusCode.INVALID_ARGUMENT,
            )
            await expect_error(
                stub.AbortRollout(scheduler_pb2.AbortRolloutRequest(expert="milton-small")),
                grpc.StatusCode.NOT_FOUND,
            )
            paused = (
                await stub.PauseRollout(scheduler_pb2.PauseRolloutRequest(expert="bard-small", reason="hold"))
            ).rollout
            assert paused.state == scheduler_pb2.ROLLOUT_STATE_PAUSED and paused.reason == "hold"
            # Placement follows the weight (1.0: the new revision first, the old one as the alternate).
            place = await stub.Place(
                scheduler_pb2.PlaceRequest(request_id="r1", experts=["bard-small"], max_alternates=1)
            )
            assert place.placements[0].replica.revision == "v2"
            assert [a.revision for a in place.placements[0].alternates] == ["v1"]
            cluster = await stub.GetCluster(scheduler_pb2.GetClusterRequest())
            assert {r.replica_id: r.revision for r in cluster.replicas} == {"old": "v1", "new": "v2"}
            aborted = (
                await stub.AbortRollout(scheduler_pb2.AbortRolloutRequest(expert="bard-small", reason="drill"))
            ).rollout
            assert aborted.state == scheduler_pb2.ROLLOUT_STATE_ABORTED and aborted.weight == 0.0
            listed = await stub.ListRollouts(scheduler_pb2.ListRolloutsRequest())
            assert [r.spec.expert for r in listed.rollouts] == ["bard-small"]
            assert (
                REGISTRY.get_sample_value(
                    "switchboard_scheduler_rollout_state", {"expert": "bard-small", "state": "aborted"}
                )
                == 1.0
            )
        finally:
            await channel.close()
    # A restarted scheduler reads the rollout back from its state file.
    async with running_scheduler(rollout_state_file=tmp_path / "rollouts.json") as app:
        channel = open_channel(f"127.0.0.1:{app.service.port}")
        try:
            back = (
                await scheduler_pb2_grpc.SchedulerStub(channel).GetRollout(
                    scheduler_pb2.GetRolloutRequest(expert="bard-small")
                )
            ).rollout
            assert back.state == scheduler_pb2.ROLLOUT_STATE_ABORTED and back.reason == "drill"
        finally:
            await channel.close()


async def test_heartbeat_outcomes_roll_a_failing_revision_back() -> None:
    async with running_scheduler(rollout_tick_seconds=0.05) as app:
        channel = open_channel(f"127.0.0.1:{app.service.port}")
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        try:
            await stub.Register(register("old", "v1", 50061))
            await stub.Register(register("new", "v2", 50062))
            await stub.StartRollout(scheduler_pb2.StartRolloutRequest(spec=rollout_spec()))
            # The new replica ended 10 requests, 4 of them failed (cumulative counters).
            for ended, failed in ((4, 1), (10, 4)):
                await stub.ReportLoad(
                    scheduler_pb2.ReportLoadRequest(
                        replica_id="new",
                        load=scheduler_pb2.ReplicaLoad(requests_ended=ended, requests_failed=failed),
                    )
                )
            app.servicer.tick_rollouts()
            rollout = (await stub.GetRollout(scheduler_pb2.GetRolloutRequest(expert="bard-small"))).rollout
            assert rollout.state == scheduler_pb2.ROLLOUT_STATE_ROLLED_BACK, rollout
            assert "error ratio 0.400" in rollout.reason
            new = next(s for s in rollout.stats if s.revision == "v2")
            assert (new.requests, new.failed) == (10, 4)
            place = await stub.Place(scheduler_pb2.PlaceRequest(request_id="r2", experts=["bard-small"]))
            assert place.placements[0].replica.revision == "v1"
        finally:
            await channel.close()


async def test_a_revision_label_is_bounded() -> None:
    async with running_scheduler() as app:
        channel = open_channel(f"127.0.0.1:{app.service.port}")
        try:
            error = await expect_error(
                scheduler_pb2_grpc.SchedulerStub(channel).Register(register("a", "x" * 200, 50061)),
                grpc.StatusCode.INVALID_ARGUMENT,
            )
            assert error["field_violations"][0][0] == "revision"
        finally:
            await channel.close()


async def test_a_new_revision_takes_traffic_only_through_a_rollout() -> None:
    async with running_scheduler() as app:
        channel = open_channel(f"127.0.0.1:{app.service.port}")
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        try:
            await stub.Register(register("old", "v1", 50061))
            await stub.Register(register("new", "v2", 50062))
            for i in range(6):
                place = await stub.Place(scheduler_pb2.PlaceRequest(request_id=f"p{i}", experts=["bard-small"], max_alternates=1))
                assert place.placements[0].replica.replica_id == "old"
                assert [a.replica_id for a in place.placements[0].alternates] == ["new"]  # fallback only
            await stub.Deregister(scheduler_pb2.DeregisterRequest(replica_id="old"))
            place = await stub.Place(scheduler_pb2.PlaceRequest(request_id="p9", experts=["bard-small"]))
            assert place.placements[0].replica.replica_id == "new"
            assert "bard-small" not in app.servicer.rollouts.splits  # one revision left: the pin is gone
        finally:
            await channel.close()
