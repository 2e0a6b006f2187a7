"""Malformed input gets a clean status on the real scheduler: undecodable bytes answer
INVALID_ARGUMENT naming the message type (no Python exception text), and a finish reason newer
than this build in a Complete is read as unspecified, not an INTERNAL."""

from __future__ import annotations

import grpc
import pytest
from switchboard.common.channels import open_channel
from switchboard.common.errors import error_details
from switchboard.scheduler.app import SchedulerApp
from switchboard.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc


async def test_undecodable_bytes_answer_invalid_argument(scheduler: SchedulerApp) -> None:
    channel = open_channel(f"127.0.0.1:{scheduler.service.port}")
    try:
        for method, message_type in (
            ("Place", "switchboard.v1.PlaceRequest"),
            ("Register", "switchboard.v1.RegisterRequest"),
            ("ReportLoad", "switchboard.v1.ReportLoadRequest"),
            ("Complete", "switchboard.v1.SchedulerCompleteRequest"),
        ):
            call = channel.unary_unary(f"/switchboard.v1.Scheduler/{method}", request_serializer=None, response_deserializer=None)
            for garbage in (b"\xff\xff\xff\xff", b"\x0a\x10short", b"\x0a\x02\xc3\x28"):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call(garbage, timeout=5)
                error = caught.value
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, error.code(), error.details())
                assert message_type in (error.details() or "")
                assert not any(leak in (error.details() or "") for leak in ("DecodeError", "Error parsing", "<class", "Unexpected"))
                assert error_details(error)["reason"] == "MALFORMED_REQUEST"
        # The scheduler still answers normally afterwards.
        cluster = await scheduler_pb2_grpc.SchedulerStub(channel).GetCluster(scheduler_pb2.GetClusterRequest(), timeout=5)
        assert list(cluster.replicas) == []
    finally:
        await channel.close()


async def test_unknown_finish_reason_is_no_internal_error(stub: scheduler_pb2_grpc.SchedulerStub) -> None:
    newer = scheduler_pb2.SchedulerCompleteRequest(request_id="r1", replica_id="x", success=True, finish_reason=99)
    assert newer.finish_reason == 99
    await stub.Complete(newer, timeout=5)
    await stub.Complete(
        scheduler_pb2.SchedulerCompleteRequest(request_id="r2", finish_reason=common_pb2.FINISH_REASON_EOS), timeout=5
    )
