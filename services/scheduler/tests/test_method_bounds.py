"""The scheduler's per-method message bounds (SCHEDULER_MAX_METHOD_MESSAGE_BYTES) on the real server.

The defaults are sized to each request's contract: the largest Register and ReportLoad the
scheduler accepts (4,096 KV events and 4,096 block hashes, every id at its length limit) and the
largest Complete fit their bounds, and one byte of padding past a bound is refused with
RESOURCE_EXHAUSTED naming the bound and the setting, before the request is decoded.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from switchboard.common.channels import open_channel
from switchboard.common.errors import error_details
from switchboard.common.service import wait_started
from switchboard.common.settings import load_settings, method_message_limits
from switchboard.scheduler.app import SchedulerApp
from switchboard.scheduler.config import SERVER_PREFIX, SchedulerSettings
from switchboard.scheduler.prefix_index import MAX_KV_EVENTS_PER_REPORT, MAX_KV_HASHES_PER_REPORT
from switchboard.scheduler.servicer import MAX_FINGERPRINT_LENGTH, MAX_ID_LENGTH
from switchboard.v1 import common_pb2, scheduler_pb2

WIDE = "\U0001f600"  # 4 bytes in UTF-8, the most a character takes
SETTING = "SCHEDULER_MAX_METHOD_MESSAGE_BYTES"


def settings() -> SchedulerSettings:
    """The scheduler's settings as the process reads them (so its own per-method defaults apply)."""
    environ = {"SCHEDULER_PORT": "0", "SCHEDULER_METRICS_PORT": "0", "SCHEDULER_DRAIN_SECONDS": "0.5"}
    return load_settings(SchedulerSettings, server_prefix=SERVER_PREFIX, environ=environ)


def largest_kv_events() -> scheduler_pb2.KvEvents:
    """The most KV events and hashes a report may carry, every number at its widest varint."""
    events = [scheduler_pb2.KvEvent(sequence=2**64 - 1 - i, cleared=True) for i in range(MAX_KV_EVENTS_PER_REPORT)]
    for i in range(MAX_KV_HASHES_PER_REPORT):
        events[i % len(events)].stored_block_hashes.append(2**64 - 1 - i)
    return scheduler_pb2.KvEvents(events=events, reset=True)


def largest_load() -> scheduler_pb2.ReplicaLoad:
    return scheduler_pb2.ReplicaLoad(
        running=2**32 - 1, waiting=2**32 - 1, kv_blocks_used=2**32 - 1, kv_blocks_total=2**32 - 1, tokens_per_second=1e300
    )


def largest_register() -> scheduler_pb2.RegisterRequest:
    wide_id = WIDE * MAX_ID_LENGTH
    return scheduler_pb2.RegisterRequest(
        replica_id=wide_id,
        expert=wide_id,
        address=wide_id,
        device=wide_id,
        model_name=wide_id,
        max_model_len=2**32 - 1,
        load=largest_load(),
        kv_events=largest_kv_events(),
        kv_block_size=2**32 - 1,
        kv_hash_seed=2**64 - 1,
        tokenizer_fingerprint=WIDE * MAX_FINGERPRINT_LENGTH,
        cost_model=scheduler_pb2.StepCostModel(base_ms=1e300, prefill_token_ms=1e300, decode_seq_ms=1e300, context_token_ms=1e300),
        max_waiting=2**32 - 1,
    )


def largest_report() -> scheduler_pb2.ReportLoadRequest:
    return scheduler_pb2.ReportLoadRequest(
        replica_id=WIDE * MAX_ID_LENGTH, load=largest_load(), draining=True, kv_events=largest_kv_events()
    )


def largest_complete() -> scheduler_pb2.SchedulerCompleteRequest:
    return scheduler_pb2.SchedulerCompleteRequest(
        request_id=WIDE * MAX_ID_LENGTH,
        replica_id=WIDE * MAX_ID_LENGTH,
        success=True,
        finish_reason=common_pb2.FINISH_REASON_STOP_SEQUENCE,
        usage=common_pb2.Usage(prompt_tokens=2**32 - 1, completion_tokens=2**32 - 1, cached_prompt_tokens=2**32 - 1),
        time_to_first_token_seconds=1e300,
        latency_seconds=1e300,
    )


def test_the_default_bounds_carry_the_largest_valid_requests() -> None:
    limits = method_message_limits(settings().server)
    assert largest_register().ByteSize() <= limits["Scheduler/Register"]
    assert largest_report().ByteSize() <= limits["Scheduler/ReportLoad"]
    assert largest_complete().ByteSize() <= limits["Scheduler/Complete"]
    deregister = scheduler_pb2.DeregisterRequest(replica_id=WIDE * MAX_ID_LENGTH)
    assert deregister.ByteSize() <= limits["Scheduler/Deregister"]
    assert scheduler_pb2.GetClusterRequest().ByteSize() <= limits["Scheduler/GetCluster"]
    # Place keeps the server-wide limit (131,072 token ids); the control RPCs are far smaller.
    assert "Scheduler/Place" not in limits
    assert limits["Scheduler/ReportLoad"] * 8 <= settings().server.max_receive_message_bytes


@pytest.fixture
async def scheduler_with_its_bounds() -> AsyncIterator[SchedulerApp]:
    app = SchedulerApp(settings(), ("bard-small",))
    task = asyncio.create_task(app.run(handle_signals=False))
    await wait_started(task, app.service.started)
    try:
        yield app
    finally:
        app.service.stop()
        await task


def padded(message: scheduler_pb2.ReportLoadRequest | scheduler_pb2.RegisterRequest | scheduler_pb2.DeregisterRequest | scheduler_pb2.SchedulerCompleteRequest, size: int) -> bytes:
    """`message`'s bytes padded to exactly `size` with an unknown field (the size is what is tested)."""
    data = message.SerializeToString()
    pad = size - len(data) - 4
    while True:
        extra = b"\xfa\x3f" + _varint(pad) + b"x" * pad  # field 1023, length-delimited: unknown to every message
        if len(data) + len(extra) == size:
            return data + extra
        pad += size - len(data) - len(extra)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


async def test_a_control_message_over_its_bound_is_refused_naming_the_setting(scheduler_with_its_bounds: SchedulerApp) -> None:
    app = scheduler_with_its_bounds
    limits = method_message_limits(app.settings.server)
    channel = open_channel(f"127.0.0.1:{app.service.port}")
    try:
        for method, message in (
            ("ReportLoad", largest_report()),
            ("Register", largest_register()),
            ("Deregister", scheduler_pb2.DeregisterRequest(replica_id="r1")),
            ("Complete", scheduler_pb2.SchedulerCompleteRequest(request_id="q1")),
        ):
            call = channel.unary_unary(f"/switchboard.v1.Scheduler/{method}", request_serializer=None, response_deserializer=None)
            limit = limits[f"Scheduler/{method}"]
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call(padded(message, limit + 1), timeout=10)
            error = caught.value
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (method, error.code(), error.details())
            assert f"{limit}-byte bound of Scheduler/{method}" in (error.details() or "") and SETTING in (error.details() or "")
            assert error_details(error)["reason"] == "MESSAGE_TOO_LARGE"
            # At the bound the scheduler reads the request and answers for its content, not its size.
            try:
                await call(padded(message, limit), timeout=10)
            except grpc.aio.AioRpcError as answered:
                assert error_details(answered)["reason"] != "MESSAGE_TOO_LARGE", (method, answered.details())
    finally:
        await channel.close()
