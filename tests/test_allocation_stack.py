"""The allocation controller on a real local stack: the local actuator scales a pool up and back down.

Real processes (scheduler, router, gateway, generators of the test model, mutual TLS with a
throwaway CA, as `switchboard up` runs them). The scheduler runs the KEDA allocator with the local
actuator (SCHEDULER_ACTUATOR=local, the generator template the stack writes next to its logs) on a
one-second period, budget 2, bounds bard-small=1:2, one sequence per replica as the KEDA target.
Three concurrent clients make it start a second generator process, which registers and serves;
one client then lets it scale back down: the new replica is drained (placement stops choosing it),
stopped once nothing is in flight on it, and its process exits. Every request succeeds throughout.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from switchboard.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

from .conftest import RunningStack, start_stack

pytestmark = pytest.mark.slow

ALLOCATION_ENV = {
    "SCHEDULER_ALLOCATOR": "keda",
    "SCHEDULER_ACTUATOR": "local",
    "SCHEDULER_ALLOCATION_BUDGET": "2",
    "SCHEDULER_ALLOCATION_BOUNDS": "bard-small=1:2",
    "SCHEDULER_ALLOCATION_PERIOD_SECONDS": "1",
    "SCHEDULER_ALLOCATION_COOLDOWN_SECONDS": "3",
    "SCHEDULER_ALLOCATION_KEDA_TARGET_QUEUE": "1",
    "SCHEDULER_ALLOCATION_START_TIMEOUT_SECONDS": "120",
}
NEW_REPLICA = "bard-small-auto-1"


def cluster(stack: RunningStack) -> dict[str, scheduler_pb2.Replica]:
    plan = stack.stack.plan
    with plan.channel(plan.scheduler_addr, "scheduler") as channel:
        reply = scheduler_pb2_grpc.SchedulerStub(channel).GetCluster(scheduler_pb2.GetClusterRequest(), timeout=5)
    return {r.replica_id: r for r in reply.replicas}


class Clients:
    """`workers` threads sending Generate calls through the gateway until stopped; every outcome kept."""

    def __init__(self, stack: RunningStack, workers: int, max_tokens: int) -> None:
        self.stack, self.max_tokens = stack, max_tokens
        self.ok = 0
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(workers)]
        for t in self.threads:
            t.start()

    def run(self) -> None:
        with grpc.insecure_channel(self.stack.gateway_addr) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            while not self.stop.is_set():
                try:
                    replies = list(
                        stub.Generate(
                            gateway_pb2.GenerateRequest(
                                prompt="Now is the winter of our discontent",
                                sampling=common_pb2.SamplingParams(max_tokens=self.max_tokens),
                            ),
                            metadata=self.stack.auth(),
                            timeout=60,
                        )
                    )
                    assert replies
                    with self.lock:
                        self.ok += 1
                except (grpc.RpcError, AssertionError) as exc:
                    with self.lock:
                        self.errors.append(repr(exc))

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=90)


def scheduler_metric(stack: RunningStack, name: str, labels: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{stack.stack.plan.scheduler_metrics}/metrics", timeout=10).read().decode()
    match = re.search(rf"^{name}\{{{labels}\}} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def log_events(path: Path) -> list[dict[str, object]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def test_local_actuator_scales_a_real_pool_up_and_back_down_with_drain(tmp_path: Path, model_dir: Path) -> None:
    stack = start_stack(tmp_path, model_dir, {"bard-small": 1}, env=ALLOCATION_ENV)
    busy = quiet = None
    try:
        assert set(cluster(stack)) == {"bard-small-0"}
        # Up: three clients keep ~3 sequences running; KEDA asks 3, the bound gives 2.
        busy = Clients(stack, workers=3, max_tokens=48)
        deadline = time.monotonic() + 180
        served_by_new = 0
        while True:
            replicas = cluster(stack)
            new = replicas.get(NEW_REPLICA)
            if new is not None and new.state == scheduler_pb2.REPLICA_STATE_READY:
                served_by_new = max(served_by_new, new.inflight + new.load.running)
                if served_by_new:
                    break
            assert time.monotonic() < deadline, f"never scaled up and served: {replicas}"
            time.sleep(0.2)
        assert scheduler_metric(stack, "switchboard_scheduler_allocation_replicas", 'expert="bard-small",kind="current"') == 2
        busy.close()
        # Down: one client with short requests; KEDA asks 1 once the cool-down has passed.
        quiet = Clients(stack, workers=1, max_tokens=8)
        deadline = time.monotonic() + 120
        while NEW_REPLICA in (replicas := cluster(stack)):
            assert time.monotonic() < deadline, f"never scaled down: {replicas}"
            time.sleep(0.1)
        # It deregistered on SIGTERM; the actuator waits for its process to exit (within the grace period).
        deadline = time.monotonic() + 30
        while True:
            events = log_events(stack.log_dir / "scheduler.log")
            names = [e.get("event") for e in events]
            if "drained replica stopped" in names:
                break
            assert time.monotonic() < deadline, names[-30:]
            time.sleep(0.2)
        quiet.close()
        assert set(cluster(stack)) == {"bard-small-0"}
        assert "replica draining for scale-down" in names
        stopped = next(e for e in events if e.get("event") == "generator process stopped")
        assert stopped["replica_id"] == NEW_REPLICA and stopped["exit_code"] == 0, stopped
        decisions = [e for e in events if e.get("event") == "allocation decision" and e.get("applied") != e.get("current")]
        # Up: KEDA asked 2 or more (bounded to 2); down: 1, or 0 (bounded to the minimum, 1).
        (up, down) = decisions[:2]
        assert (up["current"], up["applied"], down["current"], down["applied"]) == (1, 2, 2, 1), decisions
        assert up["reason"] in ("scale_up", "bounds") and down["reason"] in ("scale_down", "bounds"), decisions
        assert scheduler_metric(
            stack, "switchboard_scheduler_allocation_drains_total", 'expert="bard-small",outcome="stopped"'
        ) == 1
        # The new process wrote its own log like the stack's generators, and drained on SIGTERM.
        generator_log = stack.log_dir / f"generator-{NEW_REPLICA}.log"
        names = [e.get("event") for e in log_events(generator_log)]
        assert "registered with scheduler" in names and "deregistered from scheduler" in names, names
        assert busy.errors == [] and quiet.errors == [], (busy.errors + quiet.errors)[:5]
        assert busy.ok >= 3 and quiet.ok >= 1
    finally:
        for clients in (busy, quiet):
            if clients is not None:
                clients.close()
        stack.stack.stop()
