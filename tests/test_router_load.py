"""Load bias on the real local stack: a saturated pool sheds traffic within seconds and gets it back.

The stack serves two experts with one generator replica each (`bard-small`, `milton-small`,
the same model under two names; the experts config's descriptions make the Shakespeare-like
prompts below prefer `bard-small`). The router polls the pools every 0.2 s, the replicas
heartbeat every 0.25 s, and a pool counts as saturated above one waiting sequence per replica.
Each generator runs at most `MAX_NUM_SEQS` sequences at once, so a flood of long requests pinned
to `bard-small` makes its queue (`waiting`) grow, which is what the load bias reacts to.

Three phases, on one open-loop stream of unpinned requests (a fixed arrival rate, so the
measured share does not depend on how long each request takes):

1. baseline: `bard-small` takes most of the unpinned requests;
2. saturation: closed-loop workers keep `FLOOD_STREAMS` long requests pinned to `bard-small` in
   flight; its share of unpinned requests falls below half its baseline within seconds, and the
   router's metrics say why (`switchboard_router_load_bias` < 0, `switchboard_router_pool_pressure`
   > 1);
3. recovery: the flood stops (its requests finish, none is cancelled); the share comes back above
   half its baseline and the bias returns to 0.

Every request of every phase must end with a complete answer (no error status, finish reason
length or end of sequence). The per-second timeline is printed (`-s`) and saved as JSON under the
test's tmp dir. Shares are computed from the time each request was sent and the expert its first
message names, after the requests finish: a request queued on the saturated replica names its
expert only when it gets its first token, so a live count would under-count `bard-small`.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import pytest
from switchboard.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

from .conftest import RunningStack, start_stack

pytestmark = pytest.mark.slow

HOT, OTHER = "bard-small", "milton-small"
MAX_NUM_SEQS = 4  # batch slots per replica: the flood below overfills bard-small's
FAST_ENV = {
    "ROUTER_LOAD_POLL_SECONDS": "0.2",
    "SCHEDULER_HEARTBEAT_SECONDS": "0.25",  # the generators heartbeat at the interval Register answers
    "ROUTER_SATURATION_WAITING": "1",
    "GENERATOR_MAX_NUM_SEQS": str(MAX_NUM_SEQS),
}

# Shakespeare-like prompts whose n-gram similarity to bard-small's description beats
# milton-small's by 0.13-0.33 (at the rule's temperature 0.05, e^2.6 or more in probability).
PROMPTS = [
    "Enter Hamlet, my lord",
    "O Romeo, Romeo, wherefore art thou Romeo?",
    "My lord, the king doth call thee",
    "Thou art a lord of kings, good Hamlet",
    "Romeo and thee, my lords",
    "What say thou, my lord Hamlet?",
    "The king and his lords, thou knowest",
]
UNPINNED_RATE = 3.0  # unpinned requests sent per second, whatever their latency
UNPINNED = common_pb2.SamplingParams(max_tokens=8, temperature=0.0)
FLOOD_STREAMS = 10  # pinned requests kept in flight: 6 of them wait for a batch slot
FLOOD = common_pb2.SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True, min_tokens=128)

BASELINE_SECONDS = 6.0
FLOOD_SECONDS = 16.0
SHED_DEADLINE = 12.0  # the share must have fallen within this long of the flood's start
DRAIN_LIMIT = 90.0  # the pinned requests in flight when the flood stops must finish within this
# The bias climbs back at most ROUTER_LOAD_BIAS_STEP per poll (2.0 / 0.2 = 10 polls of 0.2 s from
# the floor, once the queue has drained); the limits leave room for a loaded 2-core machine.
RECOVERY_LIMIT = 40.0  # from the flood drained: the bias back at 0
RECOVERY_DEADLINE = 30.0  # from the flood drained: the share back above half its baseline
TAIL_SECONDS = 4.0  # traffic kept going after the bias is back at 0, to measure the recovered share
WINDOW = 2.0  # sliding window of the share, by send time
MIN_WINDOW_REQUESTS = 4
REQUEST_TIMEOUT = 120.0
MAX_UNPINNED = int(UNPINNED_RATE * (BASELINE_SECONDS + FLOOD_SECONDS + DRAIN_LIMIT + RECOVERY_LIMIT)) + 10
MAX_PINNED_PER_STREAM = 200


@pytest.fixture
def stack(tmp_path: Path, model_dir: Path) -> Iterator[RunningStack]:
    """Two experts with one replica each, fast load polling and small batches."""
    running = start_stack(tmp_path, model_dir, {HOT: 1, OTHER: 1}, env=FAST_ENV)
    try:
        yield running
    finally:
        running.stack.stop()


@dataclass
class Outcome:
    """How one Generate call through the gateway ended."""

    pinned: bool
    sent: float  # seconds since the test's clock started
    ended: float = 0.0
    expert: str = ""
    finish_reason: str = ""
    completion_tokens: int = 0
    error: str = ""

    @property
    def complete(self) -> bool:
        """A whole answer: no error status and a finish reason of length or end of sequence."""
        return not self.error and self.finish_reason in ("FINISH_REASON_LENGTH", "FINISH_REASON_EOS")


class Clock:
    """Seconds since the test started."""

    def __init__(self) -> None:
        self.zero = time.monotonic()

    def now(self) -> float:
        """Seconds since start."""
        return time.monotonic() - self.zero


def generate(
    stub: gateway_pb2_grpc.GatewayStub,
    stack: RunningStack,
    clock: Clock,
    prompt: str,
    sampling: common_pb2.SamplingParams,
    model: str = "",
) -> Outcome:
    """One Generate call; every failure is recorded, never raised."""
    outcome = Outcome(pinned=bool(model), sent=clock.now())
    request = gateway_pb2.GenerateRequest(
        prompt=prompt, sampling=sampling, model=model, request_id=f"load-{uuid.uuid4().hex[:12]}"
    )
    try:
        for message in stub.Generate(request, metadata=stack.auth(), timeout=REQUEST_TIMEOUT):
            outcome.expert = outcome.expert or message.model
            if message.finish_reason:
                outcome.finish_reason = common_pb2.FinishReason.Name(message.finish_reason)
                outcome.completion_tokens = message.usage.completion_tokens
    except grpc.RpcError as error:
        outcome.error = f"{error.code().name}: {error.details()}"
    except Exception as error:  # any other failure is a dropped request too, reported as such
        outcome.error = repr(error)
    outcome.ended = clock.now()
    return outcome


@dataclass
class Sample:
    """One look at the router's metrics and the scheduler's pools."""

    t: float
    bias: dict[str, float] = field(default_factory=dict)
    pressure: dict[str, float] = field(default_factory=dict)
    waiting: dict[str, int] = field(default_factory=dict)
    running: dict[str, int] = field(default_factory=dict)
    kv: dict[str, float] = field(default_factory=dict)
    heartbeat_age: float = 0.0  # the oldest replica heartbeat the scheduler holds


def router_gauges(stack: RunningStack) -> tuple[dict[str, float], dict[str, float]]:
    """(load bias, pool pressure) per expert, from the router's metrics endpoint."""
    url = f"http://127.0.0.1:{stack.stack.plan.router_metrics}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()

    def gauge(name: str) -> dict[str, float]:
        return {e: float(v) for e, v in re.findall(rf'^{name}\{{expert="([^"]+)"\}} (\S+)$', text, re.M)}

    return gauge("switchboard_router_load_bias"), gauge("switchboard_router_pool_pressure")


class Monitor:
    """Samples the router's gauges and the scheduler's view of the pools every 0.25 s."""

    def __init__(self, stack: RunningStack, clock: Clock) -> None:
        self.stack, self.clock = stack, clock
        self.samples: list[Sample] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load-monitor", daemon=True)

    def _run(self) -> None:
        with self.stack.stack.plan.channel(self.stack.stack.plan.scheduler_addr, "scheduler") as channel:
            scheduler = scheduler_pb2_grpc.SchedulerStub(channel)
            while not self._stop.wait(0.25):
                try:
                    bias, pressure = router_gauges(self.stack)
                    cluster = scheduler.GetCluster(scheduler_pb2.GetClusterRequest(), timeout=5)
                except Exception:  # a missed look is only a gap in the timeline
                    self.errors += 1
                    continue
                sample = Sample(self.clock.now(), bias, pressure)
                sample.heartbeat_age = max((r.seconds_since_heartbeat for r in cluster.replicas), default=0.0)
                for replica in cluster.replicas:
                    load = replica.load
                    sample.waiting[replica.expert] = sample.waiting.get(replica.expert, 0) + load.waiting
                    sample.running[replica.expert] = sample.running.get(replica.expert, 0) + load.running
                    if load.kv_blocks_total:
                        sample.kv[replica.expert] = round(load.kv_blocks_used / load.kv_blocks_total, 3)
                self.samples.append(sample)

    def latest(self) -> Sample | None:
        """The last sample taken."""
        return self.samples[-1] if self.samples else None

    def __enter__(self) -> Monitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


class UnpinnedTraffic:
    """Unpinned Shakespeare-like requests at a fixed rate (open loop), until stopped."""

    def __init__(self, stub: gateway_pb2_grpc.GatewayStub, stack: RunningStack, clock: Clock) -> None:
        self.stub, self.stack, self.clock = stub, stack, clock
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # Enough workers that requests queued on a saturated replica never delay the next send.
        self._pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="unpinned")
        self._thread = threading.Thread(target=self._dispatch, name="unpinned-dispatch", daemon=True)

    def _one(self, prompt: str) -> None:
        outcome = generate(self.stub, self.stack, self.clock, prompt, UNPINNED)
        with self._lock:
            self.outcomes.append(outcome)

    def _dispatch(self) -> None:
        started = time.monotonic()
        for n in range(MAX_UNPINNED):
            delay = started + n / UNPINNED_RATE - time.monotonic()
            if self._stop.wait(max(0.0, delay)):
                return
            self._pool.submit(self._one, PROMPTS[n % len(PROMPTS)])

    def snapshot(self) -> list[Outcome]:
        """The finished requests so far."""
        with self._lock:
            return list(self.outcomes)

    def __enter__(self) -> UnpinnedTraffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._pool.shutdown(wait=True)  # every request sent ends (each has a deadline)


class PinnedFlood:
    """`FLOOD_STREAMS` closed-loop workers keeping long requests pinned to HOT in flight."""

    def __init__(self, stub: gateway_pb2_grpc.GatewayStub, stack: RunningStack, clock: Clock) -> None:
        self.stub, self.stack, self.clock = stub, stack, clock
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._worker, args=(i,), name=f"flood-{i}", daemon=True)
            for i in range(FLOOD_STREAMS)
        ]
        self.started = False
        self.started_at = self.stopped_at = self.drained_at = 0.0

    def _worker(self, index: int) -> None:
        for n in range(MAX_PINNED_PER_STREAM):
            if self._stop.is_set():
                return
            outcome = generate(
                self.stub, self.stack, self.clock, PROMPTS[(index + n) % len(PROMPTS)], FLOOD, HOT
            )
            with self._lock:
                self.outcomes.append(outcome)

    def start(self) -> None:
        """Start every worker."""
        self.started, self.started_at = True, self.clock.now()
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float) -> bool:
        """Send no more; let the requests in flight finish. False when they did not within `timeout`."""
        self.stopped_at = self.clock.now()
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self.drained_at = self.clock.now()
        return not any(thread.is_alive() for thread in self._threads)


def hot_share(outcomes: list[Outcome], start: float, end: float) -> tuple[float | None, int]:
    """(share of HOT among unpinned requests sent in [start, end), how many), None if too few."""
    sent = [o for o in outcomes if start <= o.sent < end and o.expert]
    if len(sent) < MIN_WINDOW_REQUESTS:
        return None, len(sent)
    return sum(o.expert == HOT for o in sent) / len(sent), len(sent)


def first_window(
    outcomes: list[Outcome], start: float, end: float, condition: Callable[[float], bool]
) -> tuple[float, float] | None:
    """(window start, share) of the first WINDOW-long window in [start, end] whose share meets `condition`."""
    t = start
    while t + WINDOW <= end + 1e-9:
        share, _ = hot_share(outcomes, t, t + WINDOW)
        if share is not None and condition(share):
            return t, share
        t += 0.25
    return None


def timeline(
    unpinned: list[Outcome],
    pinned: list[Outcome],
    samples: list[Sample],
    phases: dict[str, float],
    end: float,
) -> list[dict]:
    """One row per second: phase, HOT's share of unpinned requests sent then, bias, pressure, queue."""
    rows = []
    second = int(phases["baseline"])
    while second < end:
        phase = max(
            (p for p, at in phases.items() if at <= second), key=lambda p: phases[p], default="warmup"
        )
        sent = [o for o in unpinned if second <= o.sent < second + 1]
        in_second = [s for s in samples if second <= s.t < second + 1]
        last = in_second[-1] if in_second else None
        rows.append(
            {
                "t": second,
                "phase": phase,
                "unpinned_sent": len(sent),
                "hot_share": round(sum(o.expert == HOT for o in sent) / len(sent), 2) if sent else None,
                "pinned_sent": sum(1 for o in pinned if second <= o.sent < second + 1),
                "bias": last.bias if last else None,
                "pressure": {k: round(v, 2) for k, v in last.pressure.items()} if last else None,
                "waiting": last.waiting if last else None,
                "running": last.running if last else None,
                "kv": last.kv if last else None,
            }
        )
        second += 1
    return rows


def print_timeline(rows: list[dict]) -> None:
    """A compact table of the timeline (shown with -s)."""
    print(
        f"\n{'t':>4} {'phase':<10} {'sent':>4} {'hot%':>5} {'bias':>6} {'press':>6} {'wait':>4} {'run':>3} {'kv':>5}"
        f" | {OTHER}: {'bias':>6} {'press':>6} {'wait':>4}"
    )
    for row in rows:
        share = "-" if row["hot_share"] is None else f"{100 * row['hot_share']:.0f}"
        bias, pressure = row["bias"] or {}, row["pressure"] or {}
        waiting, running, kv = row["waiting"] or {}, row["running"] or {}, row["kv"] or {}
        print(
            f"{row['t']:>4} {row['phase']:<10} {row['unpinned_sent']:>4} {share:>5} {bias.get(HOT, 0):>6.2f}"
            f" {pressure.get(HOT, 0):>6.2f} {waiting.get(HOT, 0):>4} {running.get(HOT, 0):>3} {kv.get(HOT, 0):>5.2f}"
            f" | {OTHER}: {bias.get(OTHER, 0):>6.2f} {pressure.get(OTHER, 0):>6.2f} {waiting.get(OTHER, 0):>4}"
        )


def latency_summary(outcomes: list[Outcome], start: float, end: float) -> dict[str, object]:
    """Per expert: how many requests sent in [start, end) it served, with median and max seconds."""
    out: dict[str, object] = {}
    for expert in (HOT, OTHER):
        seconds = sorted(o.ended - o.sent for o in outcomes if start <= o.sent < end and o.expert == expert)
        if seconds:
            out[expert] = {
                "n": len(seconds),
                "median_s": round(seconds[len(seconds) // 2], 2),
                "max_s": round(seconds[-1], 2),
            }
    return out


def wait_until(predicate: Callable[[], bool], timeout: float, step: float = 0.2) -> bool:
    """Poll `predicate` until true or `timeout` seconds pass (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return False


def test_saturated_pool_sheds_traffic_and_gets_it_back(stack: RunningStack, tmp_path: Path) -> None:
    clock = Clock()
    with grpc.insecure_channel(stack.gateway_addr) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        # Warm both replicas so the first measured requests do not pay for first-call setup.
        for expert in (HOT, OTHER):
            warm = generate(stub, stack, clock, PROMPTS[0], UNPINNED, expert)
            assert warm.complete and warm.expert == expert, warm
        with Monitor(stack, clock) as monitor:
            # The router has looked at both pools and neither is penalized.
            assert wait_until(
                lambda: (
                    (s := monitor.latest()) is not None
                    and s.bias.get(HOT) == 0.0
                    and s.bias.get(OTHER) == 0.0
                ),
                timeout=20,
            ), monitor.latest()
            phases = {"baseline": clock.now()}
            flood = PinnedFlood(stub, stack, clock)
            recovered_bias_at: float | None = None
            drained = False
            traffic = UnpinnedTraffic(stub, stack, clock)
            with traffic:
                try:
                    time.sleep(BASELINE_SECONDS)
                    phases["saturation"] = clock.now()
                    flood.start()
                    time.sleep(FLOOD_SECONDS)
                    drained = flood.stop(timeout=DRAIN_LIMIT)
                    phases["drain"] = flood.stopped_at
                    phases["recovery"] = flood.drained_at
                    # Keep the unpinned traffic going until the bias is back at 0, then a little longer.
                    if wait_until(
                        lambda: (s := monitor.latest()) is not None and s.bias.get(HOT) == 0.0, RECOVERY_LIMIT
                    ):
                        recovered_bias_at = clock.now()
                    time.sleep(TAIL_SECONDS)
                finally:
                    if flood.started and not flood.drained_at:  # the body failed mid-flood: stop it, bounded
                        flood.stop(timeout=DRAIN_LIMIT)
            end = clock.now()
            time.sleep(0.5)  # one more look at the pools after the last request

    unpinned, pinned = traffic.snapshot(), list(flood.outcomes)
    rows = timeline(unpinned, pinned, monitor.samples, phases, end)
    print_timeline(rows)
    baseline_share, baseline_n = hot_share(unpinned, phases["baseline"], phases["saturation"])
    half = baseline_share / 2 if baseline_share is not None else 0.0
    shed = first_window(unpinned, phases["saturation"], phases["drain"], lambda s: s < half)
    back = first_window(unpinned, phases["recovery"], end, lambda s: s > half)
    saturated = [s for s in monitor.samples if phases["saturation"] <= s.t < phases["drain"]]
    during_flood, during_n = hot_share(unpinned, shed[0] if shed else phases["saturation"], phases["drain"])
    ages = sorted(s.heartbeat_age for s in monitor.samples)
    bounds = [*phases.values(), end]
    report = {
        "settings": {
            **FAST_ENV,
            "flood_streams": FLOOD_STREAMS,
            "flood_max_tokens": FLOOD.max_tokens,
            "unpinned_rate": UNPINNED_RATE,
            "window_seconds": WINDOW,
        },
        "phases": {k: round(v, 2) for k, v in phases.items()} | {"end": round(end, 2)},
        "baseline_share": baseline_share,
        "shed_window": (
            {"after_flood_start": round(shed[0] - phases["saturation"], 2), "share": shed[1]}
            if shed
            else None
        ),
        "recovered_window": (
            {"after_drain": round(back[0] - phases["recovery"], 2), "share": back[1]} if back else None
        ),
        "bias_zero_after_drain": (
            round(recovered_bias_at - phases["recovery"], 2) if recovered_bias_at is not None else None
        ),
        "share_during_flood_after_shed": during_flood,
        "bias_negative_after_flood_start": next(
            (round(s.t - phases["saturation"], 2) for s in saturated if s.bias.get(HOT, 0.0) < 0), None
        ),
        "first_unpinned_to_other_after_flood_start": next(
            (
                round(o.sent - phases["saturation"], 2)
                for o in sorted(unpinned, key=lambda o: o.sent)
                if o.sent >= phases["saturation"] and o.expert == OTHER
            ),
            None,
        ),
        "min_bias": min((s.bias.get(HOT, 0.0) for s in saturated), default=None),
        "max_pressure": max((s.pressure.get(HOT, 0.0) for s in saturated), default=None),
        "max_waiting": max((s.waiting.get(HOT, 0) for s in saturated), default=None),
        "other_max_pressure": max((s.pressure.get(OTHER, 0.0) for s in saturated), default=None),
        "other_min_bias": min((s.bias.get(OTHER, 0.0) for s in saturated), default=None),
        "median_heartbeat_age": ages[len(ages) // 2] if ages else None,
        "requests": {"unpinned": len(unpinned), "pinned": len(pinned)},
        "unpinned_latency": {
            phase: latency_summary(unpinned, bounds[i], bounds[i + 1]) for i, phase in enumerate(phases)
        },
        "monitor_errors": monitor.errors,
        "timeline": rows,
    }
    (tmp_path / "router_load_timeline.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "timeline"}, indent=2))

    # No request dropped: every one of every phase ended with a complete answer.
    failed = [asdict(o) for o in unpinned + pinned if not o.complete]
    assert not failed, (
        f"{len(failed)} of {len(unpinned) + len(pinned)} requests did not complete: {failed[:5]}"
    )
    assert drained, f"the pinned requests did not finish within {DRAIN_LIMIT} s of the flood's end"
    assert all(o.expert == HOT and o.completion_tokens == FLOOD.max_tokens for o in pinned)
    # Baseline: the Shakespeare-like prompts go to bard-small.
    assert baseline_share is not None and baseline_share >= 0.8, (baseline_share, baseline_n)
    # The replicas heartbeat at the scheduler's 0.25 s, not their 1 s default: the router sees fresh loads.
    assert report["median_heartbeat_age"] is not None and report["median_heartbeat_age"] < 0.5, report
    # Saturation is what the router saw: a queue on bard-small, pressure over 1, a negative bias.
    assert report["max_waiting"] and report["max_waiting"] > 1, (
        "the flood never made bard-small's requests wait"
    )
    assert report["max_pressure"] > 1.0 and report["min_bias"] < 0.0, report
    # ... and its share of unpinned traffic fell within seconds of the flood's start.
    assert shed is not None, "bard-small's share never fell below half its baseline during the flood"
    assert shed[0] - phases["saturation"] <= SHED_DEADLINE, shed
    # ... and it stayed down while the flood lasted (milton-small, the next best, has headroom).
    # Both generators share this machine's two cores, so the flood slows milton-small too and it
    # may count as saturated as well; the far hotter pool must still keep the larger penalty.
    assert during_flood is not None and during_flood < half, (during_flood, during_n, report)
    # Recovery: the bias returns to 0 and the share comes back once the flood has drained.
    assert recovered_bias_at is not None, f"bard-small's bias was not back at 0 within {RECOVERY_LIMIT} s"
    assert back is not None, "bard-small's share did not come back above half its baseline"
    assert back[0] - phases["recovery"] <= RECOVERY_DEADLINE, back
