"""Faults across real processes: dead replicas, failover before the first token, expiry.

The stack serves `bard-small` with two generator replicas. The scheduler's
least-loaded policy breaks ties by replica id, so with both idle `bard-small-0`
is always the primary: killing it makes the next request meet a dead primary.
Expiry is 3 s with 0.5 s heartbeats (see conftest.TEST_ENV).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from switchboard.common.errors import error_details
from switchboard.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

from .conftest import TEST_ENV, RunningStack, start_stack

pytestmark = pytest.mark.slow
EXPIRY_SECONDS = float(TEST_ENV["SCHEDULER_EXPIRY_SECONDS"])


@pytest.fixture
def stack(tmp_path: Path, model_dir: Path) -> Iterator[RunningStack]:
    """A stack with two replicas of bard-small."""
    running = start_stack(tmp_path, model_dir, {"bard-small": 2})
    try:
        yield running
    finally:
        running.stack.stop()


def replicas(stack: RunningStack) -> dict[str, scheduler_pb2.Replica]:
    """The scheduler's view: {replica_id: replica}."""
    with stack.stack.plan.channel(stack.stack.plan.scheduler_addr, "scheduler") as channel:
        cluster = scheduler_pb2_grpc.SchedulerStub(channel).GetCluster(scheduler_pb2.GetClusterRequest(), timeout=5)
    return {r.replica_id: r for r in cluster.replicas}


def max_tokens(stack: RunningStack, replica_id: str) -> int:
    """A max_tokens far beyond what generates in a few seconds, within the replica's context."""
    return min(4000, replicas(stack)[replica_id].max_model_len - 16)


def request(stack: RunningStack, timeout: float = 30) -> list[gateway_pb2.GenerateResponse]:
    """One Generate call through the gateway."""
    with grpc.insecure_channel(stack.gateway_addr) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        call = stub.Generate(
            gateway_pb2.GenerateRequest(prompt="Now is the winter", sampling=common_pb2.SamplingParams(max_tokens=8)),
            metadata=stack.auth(),
            timeout=timeout,
        )
        return list(call)


def wait_dropped(stack: RunningStack, replica_id: str) -> float:
    """Seconds until the scheduler no longer lists `replica_id` (fails after 3x the expiry)."""
    started = time.monotonic()
    while replica_id in replicas(stack):
        assert time.monotonic() - started < 3 * EXPIRY_SECONDS, f"{replica_id} never expired"
        time.sleep(0.1)
    return time.monotonic() - started


def gateway_failovers(stack: RunningStack) -> float:
    """switchboard_gateway_failovers_total summed over labels, from the gateway's metrics endpoint."""
    import urllib.request

    text = urllib.request.urlopen(
        f"http://127.0.0.1:{stack.stack.plan.gateway_metrics}/metrics", timeout=10
    ).read().decode()
    return sum(float(v) for v in re.findall(r"^switchboard_gateway_failovers_total\{[^}]*\} (\S+)$", text, re.M))


def test_dead_primary_fails_over_then_expires_then_unavailable(stack: RunningStack) -> None:
    assert set(replicas(stack)) == {"bard-small-0", "bard-small-1"}
    # 1. Kill the replica the scheduler prefers; it is still registered (heartbeats have not lapsed yet).
    stack.stack.group.kill("generator-bard-small-0")
    assert "bard-small-0" in replicas(stack)
    messages = request(stack)
    assert messages[-1].finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
    assert messages[-1].usage.completion_tokens > 0
    assert gateway_failovers(stack) >= 1  # the dead primary was tried first, then the alternate served
    # 2. The scheduler drops the silent replica within its expiry (plus one sweep).
    dropped_after = wait_dropped(stack, "bard-small-0")
    assert dropped_after <= EXPIRY_SECONDS + 1.5, dropped_after
    assert request(stack)[-1].usage.completion_tokens > 0  # the survivor serves alone
    # 3. Kill the last replica in the middle of a stream: the stream ends with a clear status.
    with grpc.insecure_channel(stack.gateway_addr) as channel:
        long_call = gateway_pb2_grpc.GatewayStub(channel).Generate(
            gateway_pb2.GenerateRequest(
                prompt="Now is the winter",
                sampling=common_pb2.SamplingParams(max_tokens=max_tokens(stack, "bard-small-1"), ignore_eos=True),
            ),
            metadata=stack.auth(),
            timeout=60,
        )
        assert all(next(long_call).token_count for _ in range(3))
        stack.stack.group.kill("generator-bard-small-1")
        with pytest.raises(grpc.RpcError) as info:
            list(long_call)
    details = error_details(info.value)
    assert details["code"] == grpc.StatusCode.UNAVAILABLE and details["reason"] == "REPLICA_FAILED_MID_STREAM", details
    # The next request fails fast with UNAVAILABLE, never hangs.
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        request(stack, timeout=30)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
    assert time.monotonic() - started < 25
    # 4. Once it has expired too, the router says there is no healthy replica, with RetryInfo.
    wait_dropped(stack, "bard-small-1")
    with pytest.raises(grpc.RpcError) as info:
        request(stack, timeout=30)
    details = error_details(info.value)
    assert details["code"] == grpc.StatusCode.UNAVAILABLE and details["reason"] == "NO_HEALTHY_REPLICA"
    assert details["retry_after"] is not None


def test_graceful_stop_deregisters_and_traffic_moves(stack: RunningStack) -> None:
    # SIGTERM: the replica drains and deregisters, so it leaves at once (no expiry wait).
    stack.stack.group.stop("generator-bard-small-0", grace=15)
    assert "bard-small-0" not in replicas(stack)
    assert request(stack)[-1].usage.completion_tokens > 0
    assert gateway_failovers(stack) == 0


def test_gateway_default_deadline_applies_without_a_client_deadline(tmp_path: Path, model_dir: Path) -> None:
    running = start_stack(tmp_path, model_dir, {"bard-small": 1}, env={"GATEWAY_DEFAULT_TIMEOUT_SECONDS": "0.5"})
    try:
        replica = replicas(running)["bard-small-0"]
        with grpc.insecure_channel(running.gateway_addr) as channel:
            call = gateway_pb2_grpc.GatewayStub(channel).Generate(
                gateway_pb2.GenerateRequest(
                    prompt="Now is the winter",
                    sampling=common_pb2.SamplingParams(max_tokens=min(4000, replica.max_model_len - 16), ignore_eos=True),
                ),
                metadata=running.auth(),  # no client deadline: the gateway's 0.5 s default applies
            )
            with pytest.raises(grpc.RpcError) as info:
                list(call)
        details = error_details(info.value)
        assert details["code"] == grpc.StatusCode.DEADLINE_EXCEEDED, details
        assert "deadline" in details["message"]
    finally:
        running.stack.stop()


def test_a_scheduler_restart_loses_no_replica_for_longer_than_a_report_period(stack: RunningStack) -> None:
    """A crashed scheduler comes back empty; every replica's next heartbeat hears `known=false`
    and registers again (with a fresh KV snapshot), so the pools are whole within about one
    heartbeat period, and requests flow again."""
    heartbeat = float(TEST_ENV["SCHEDULER_HEARTBEAT_SECONDS"])
    before = set(replicas(stack))
    assert len(before) == 2
    group = stack.stack.group
    group.kill("scheduler")
    group.start(stack.stack.specs["scheduler"])
    group.wait_healthy(["scheduler"], timeout=60)
    healthy_at = time.monotonic()
    while set(replicas(stack)) != before:
        # One heartbeat to hear "unknown", one Register: allow two periods plus scheduling slack.
        assert time.monotonic() - healthy_at < 2 * heartbeat + 2.0, f"replicas back: {sorted(replicas(stack))}"
        time.sleep(0.05)
    back_after = time.monotonic() - healthy_at
    assert back_after < 2 * heartbeat + 2.0
    messages = request(stack)
    assert messages[-1].finish_reason in (common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_EOS)


def test_a_killed_replicas_queued_work_is_re_placed_and_its_streams_end_clearly(
    tmp_path: Path, model_dir: Path
) -> None:
    # One sequence at a time per replica: a second request placed on a replica waits in its queue.
    # The queued requests wait behind a long stream, which on a loaded machine takes longer than the
    # gateway's per-attempt first-token budget: with it, the survivor's queued request would be
    # cancelled and retried on the dead replica. This test is about re-placement, so the budget is off
    # (0: only the request's deadline); services/gateway/tests/test_failover.py covers the budget.
    running = start_stack(
        tmp_path,
        model_dir,
        {"bard-small": 2},
        env={"GENERATOR_MAX_NUM_SEQS": "1", "GATEWAY_ATTEMPT_FIRST_TOKEN_SECONDS": "0"},
    )
    try:
        limit = max_tokens(running, "bard-small-0")
        with grpc.insecure_channel(running.gateway_addr) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)

            def call(n: int):
                return stub.Generate(
                    gateway_pb2.GenerateRequest(
                        request_id=f"queued-{n}",
                        prompt="Now is the winter",
                        sampling=common_pb2.SamplingParams(max_tokens=limit if n < 2 else 8, ignore_eos=True),
                    ),
                    metadata=running.auth(),
                    timeout=60,
                )

            # Two long streams, one per replica (least-loaded spreads them), then two short requests
            # that queue behind them, one per replica.
            streams = [call(0), call(1)]
            assert all(next(s).token_count for s in streams)
            # Wait until both replicas have reported their long stream in a heartbeat: placement reads
            # reported load as well as its own in-flight count, so a replica whose heartbeat is late
            # would look idler and take both short requests (on a loaded machine it happened).
            deadline = time.monotonic() + 10
            while not all(r.load.running >= 1 for r in replicas(running).values()):
                assert time.monotonic() < deadline, f"the long streams were never reported: {replicas(running)}"
                time.sleep(0.05)
            queued = [call(2), call(3)]
            deadline = time.monotonic() + 10
            while sum(r.inflight for r in replicas(running).values()) < 4:
                assert time.monotonic() < deadline, "the short requests were never placed"
                time.sleep(0.05)
            placed = {name: r.inflight for name, r in replicas(running).items()}
            assert all(count == 2 for count in placed.values()), placed
            running.stack.group.kill("generator-bard-small-0")
            # The short request queued on the dead replica had no token yet: the gateway re-places
            # it on the survivor, where it runs once that replica's long stream has ended.
            outcomes = []
            for s in streams:
                try:
                    for _ in s:
                        pass
                    outcomes.append("finished")
                except grpc.RpcError as exc:
                    outcomes.append(error_details(exc)["reason"] or exc.code().name)
                    if exc.code() != grpc.StatusCode.UNAVAILABLE:
                        raise
            assert sorted(outcomes) == ["REPLICA_FAILED_MID_STREAM", "finished"]
            for q in queued:
                messages = list(q)
                assert messages[-1].usage.completion_tokens == 8
        assert gateway_failovers(running) >= 1
        wait_dropped(running, "bard-small-0")
    finally:
        running.stack.stop()
