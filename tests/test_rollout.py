"""Canary rollouts on the real local stack: a good revision is promoted step by step, a failing one
and a slow one are rolled back within their first step, and no client request fails meanwhile.

One stack serves `bard-small`: replica `bard-small-0` serves revision v1 from the start. The new
revisions' replicas start later, as a deploy would start them (`start_deferred`): while the expert
serves one revision, a replica of another takes traffic only as a fallback until a rollout moves
traffic to it. The bad revisions are real generators with the drill faults on
(`GENERATOR_FAULT_ERROR_RATIO`: half their calls refused before any work;
`GENERATOR_FAULT_FIRST_TOKEN_DELAY_SECONDS`: every call waits before it starts). The last rollout
deploys its revision itself (the scheduler's local deployer starts the generator process, from a
damaged copy of the weights: noise on every matrix): the quality probe catches it before any
traffic reaches it, and the deployer stops the process again. Clients keep
sending requests through the gateway the whole time; every one must succeed.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from switchboard.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

from .conftest import RunningStack, start_stack

pytestmark = pytest.mark.slow

REVISIONS = {
    "bard-small-0": "v1",
    "bard-small-1": "v2",
    "bard-small-2": "v3-failing",
    "bard-small-3": "v4-slow",
}
FAULTS = {
    "bard-small-2": {"GENERATOR_FAULT_ERROR_RATIO": "0.5"},
    "bard-small-3": {"GENERATOR_FAULT_FIRST_TOKEN_DELAY_SECONDS": "4"},
}
# The quality probe's texts (scored by one replica of each revision before traffic moves).
PROBE_TEXTS = [
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
    "Now is the winter of our discontent made glorious summer by this sun of York;",
    "Of Man's first disobedience, and the fruit of that forbidden tree, whose mortal taste",
]
# The bad rollouts' steps are long: a rollback must come from a gate, within the first step.
BAD_STEP_SECONDS = 90.0


class Traffic:
    """Client threads sending short requests through the gateway until stopped; every status counted."""

    def __init__(self, stack: RunningStack, clients: int = 2) -> None:
        self.stack = stack
        self.codes: Counter[str] = Counter()
        self.models: Counter[str] = Counter()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def _run(self, index: int) -> None:
        with grpc.insecure_channel(self.stack.gateway_addr) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            sent = 0
            while not self._stop.is_set():
                sent += 1
                try:
                    stub.Complete(
                        gateway_pb2.CompleteRequest(
                            model="bard-small",
                            prompt=f"Now is the winter {index} {sent}",
                            sampling=common_pb2.SamplingParams(max_tokens=4),
                        ),
                        metadata=self.stack.auth(),
                        timeout=60,
                    )
                    code = "OK"
                except grpc.RpcError as error:
                    code = f"{error.code().name}: {error.details()}"  # type: ignore[attr-defined]
                with self._lock:
                    self.codes[code] += 1

    def count(self) -> int:
        with self._lock:
            return sum(self.codes.values())

    def wait_for(self, requests: int, timeout: float = 120.0) -> None:
        """Until `requests` more calls have ended."""
        target = self.count() + requests
        deadline = time.monotonic() + timeout
        while self.count() < target:
            assert time.monotonic() < deadline, f"only {self.count()} of {target} requests in {timeout:g} s"
            time.sleep(0.1)


def scheduler(stack: RunningStack) -> tuple[grpc.Channel, scheduler_pb2_grpc.SchedulerStub]:
    plan = stack.stack.plan
    channel = plan.channel(plan.scheduler_addr, "scheduler")  # the operator's identity: mutual TLS
    return channel, scheduler_pb2_grpc.SchedulerStub(channel)


def run_rollout(
    stub: scheduler_pb2_grpc.SchedulerStub, spec: scheduler_pb2.RolloutSpec, timeout: float
) -> list[scheduler_pb2.Rollout]:
    """Start a rollout and follow it until it ends; returns every distinct (state, step) seen."""
    seen = [stub.StartRollout(scheduler_pb2.StartRolloutRequest(spec=spec), timeout=10).rollout]
    deadline = time.monotonic() + timeout
    ended = (scheduler_pb2.ROLLOUT_STATE_PROMOTED, scheduler_pb2.ROLLOUT_STATE_ROLLED_BACK, scheduler_pb2.ROLLOUT_STATE_ABORTED)
    while seen[-1].state not in ended:
        assert time.monotonic() < deadline, f"the rollout did not end in {timeout:g} s: {seen[-1]}"
        time.sleep(0.2)
        now = stub.GetRollout(scheduler_pb2.GetRolloutRequest(expert=spec.expert), timeout=10).rollout
        if (now.state, now.step) != (seen[-1].state, seen[-1].step):
            seen.append(now)
        else:
            seen[-1] = now
    return seen


def spec(
    from_revision: str, to_revision: str, steps: list[tuple[float, float]], probe: bool = False, **gates: float
) -> scheduler_pb2.RolloutSpec:
    return scheduler_pb2.RolloutSpec(
        quality_probe=scheduler_pb2.RolloutQualityProbe(texts=PROBE_TEXTS) if probe else None,
        expert="bard-small",
        from_revision=from_revision,
        to_revision=to_revision,
        strategy=scheduler_pb2.ROLLOUT_STRATEGY_CANARY,
        steps=[scheduler_pb2.RolloutStep(weight=w, duration_seconds=d) for w, d in steps],
        gates=scheduler_pb2.RolloutGates(min_requests=6, **gates),
    )


def damaged_copy(model_dir: Path, folder: Path) -> Path:
    """The model with multiplicative noise on every weight matrix: the same shapes and tokenizer, worse text."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, folder)
    generator = torch.Generator().manual_seed(0)
    for path in folder.glob("*.safetensors"):
        tensors = load_file(path)
        for name, tensor in tensors.items():
            if tensor.dim() == 2:
                noise = torch.randn(tensor.shape, generator=generator).to(tensor.dtype)
                tensors[name] = (tensor * (1 + noise)).contiguous()
        save_file(tensors, path, metadata={"format": "pt"})
    return folder


@pytest.fixture
def stack(tmp_path: Path, model_dir: Path) -> Iterator[RunningStack]:
    damaged_copy(model_dir, tmp_path / "damaged")
    running = start_stack(
        tmp_path,
        model_dir,
        {"bard-small": len(REVISIONS)},
        env={"SCHEDULER_ROLLOUT_DEPLOYER": "local"},
        replica_env={rid: {"GENERATOR_REVISION": rev, **FAULTS.get(rid, {})} for rid, rev in REVISIONS.items()},
        deferred=[rid for rid in REVISIONS if rid != "bard-small-0"],
    )
    try:
        yield running
    finally:
        running.stack.stop()


def test_canary_promotes_a_good_revision_and_rolls_back_bad_ones(stack: RunningStack, tmp_path: Path) -> None:
    channel, stub = scheduler(stack)
    with channel, Traffic(stack) as traffic:
        traffic.wait_for(12)  # v1's baseline
        stack.start_deferred("bard-small-1")
        # The new revision is registered but takes no traffic before its rollout (only fallback).
        placed_before = placements_on(stack, "v2")
        traffic.wait_for(8)
        assert placements_on(stack, "v2") == placed_before

        # A good revision (the same weights): promoted through both steps. The latency gates are
        # loose here: two shared cores make p95s noisy, and the bad rollouts below miss by far more.
        good = run_rollout(
            stub,
            spec("v1", "v2", [(0.5, 3.0), (1.0, 3.0)], probe=True, max_ttft_p95_ratio=4.0, max_tpot_p95_ratio=4.0),
            timeout=180,
        )
        assert good[-1].stats and all(s.probe_nll > 0 for s in good[-1].stats)
        assert [(r.state, r.step) for r in good] == [
            (scheduler_pb2.ROLLOUT_STATE_RUNNING, 0),
            (scheduler_pb2.ROLLOUT_STATE_RUNNING, 1),
            (scheduler_pb2.ROLLOUT_STATE_PROMOTED, 1),
        ], good[-1].reason
        assert good[-1].weight == 1.0
        traffic.wait_for(12)  # v2's figures as the serving revision

        # A revision that fails half its calls: rolled back in its first step.
        stack.start_deferred("bard-small-2")
        failing = run_rollout(stub, spec("v2", "v3-failing", [(0.5, BAD_STEP_SECONDS), (1.0, BAD_STEP_SECONDS)]), timeout=120)
        last = failing[-1]
        assert last.state == scheduler_pb2.ROLLOUT_STATE_ROLLED_BACK and last.step == 0, last
        assert "error ratio" in last.reason
        assert last.ended_unix_seconds - last.started_unix_seconds < BAD_STEP_SECONDS

        # A revision whose every call waits 4 s: rolled back on TTFT in its first step (the old
        # revision's TTFT p95 was 1.4 s with the machine's 2 cores loaded 5x over, 0.2-0.4 s quiet).
        stack.start_deferred("bard-small-3")
        slow = run_rollout(stub, spec("v2", "v4-slow", [(0.5, BAD_STEP_SECONDS), (1.0, BAD_STEP_SECONDS)], max_ttft_p95_ratio=2.0), timeout=120)
        last = slow[-1]
        assert last.state == scheduler_pb2.ROLLOUT_STATE_ROLLED_BACK and last.step == 0, last
        assert "TTFT p95" in last.reason
        assert last.ended_unix_seconds - last.started_unix_seconds < BAD_STEP_SECONDS

        # Damaged weights, deployed by the scheduler: the quality probe rolls it back before any request
        # reaches it, and the deployer stops the process it started.
        damaged_spec = spec("v2", "v5-damaged", [(0.5, BAD_STEP_SECONDS)], probe=True)
        damaged_spec.deploy.CopyFrom(scheduler_pb2.RolloutDeploy(model=str(tmp_path / "damaged"), replicas=1))
        damaged = run_rollout(stub, damaged_spec, timeout=240)
        last = damaged[-1]
        assert last.state == scheduler_pb2.ROLLOUT_STATE_ROLLED_BACK and "quality probe" in last.reason, last
        probed = {s.revision: s.probe_nll for s in last.stats}
        assert probed["v5-damaged"] > probed["v2"] > 0
        assert placements_on(stack, "v5-damaged") == 0
        deadline = time.monotonic() + 60
        while any(r.revision == "v5-damaged" for r in stub.GetCluster(scheduler_pb2.GetClusterRequest(), timeout=10).replicas):
            assert time.monotonic() < deadline, "the deployed replica of the rolled-back revision is still registered"
            time.sleep(0.5)
        traffic.wait_for(6)
    # No client request failed because of any of the three rollouts.
    assert set(traffic.codes) == {"OK"}, traffic.codes
    assert traffic.codes["OK"] >= 50


def placements_on(stack: RunningStack, revision: str) -> float:
    """switchboard_scheduler_revision_placements_total of bard-small's `revision`, from the scheduler's metrics."""
    import re
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{stack.stack.plan.scheduler_metrics}/metrics", timeout=10).read().decode()
    pattern = rf'^switchboard_scheduler_revision_placements_total\{{expert="bard-small",revision="{re.escape(revision)}"\}} (\S+)$'
    return sum(float(v) for v in re.findall(pattern, text, re.M))
