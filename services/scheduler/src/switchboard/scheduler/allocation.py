"""Allocation across expert pools (issue 17): how many replicas each pool gets out of a fixed budget.

Pure functions and small state objects, no gRPC, no simulator imports. Two drivers run the very
same objects every control period: the cluster simulator (`switchboard.simulation.cluster.Simulation`
with an `AllocationRun`, in the tools package) and the scheduler's `controller.ScalingController`,
which builds the observations from its registry and acts through an actuator (`actuators/`: dry
run, local processes, Kubernetes).

Every period an allocator reads one `PoolObservation` per pool (arrival rate in tokens/s over the
last period, queue depth, running sequences, KV use, SLO misses, current and ready replicas) and
proposes a raw `desired` count per pool. `constrain` then applies the safety rules every allocator
shares, in this order:

1. bounds: each pool within its `PoolBounds` (min, max);
2. cool-down: a pool scales down only when its last change is at least `scale_down_cooldown_seconds`
   old (scale-up is never delayed; a scale-up restarts the clock, as the HPA's stabilization window
   keeps the highest recent recommendation);
3. budget: the total never exceeds `budget`: no pool is shrunk to make room, the room left is
   shared among the pools that asked for more, in proportion to how much more (largest remainder).

The baselines:

| name | desired replicas of a pool |
|---|---|
| `static` | the budget split equally (largest remainder), fixed |
| `proportional` | the budget split by arrival tokens/s (each pool at least its minimum) |
| `hpa` | Kubernetes HPA on tokens/s per replica: `ceil(current * (metric / target))`, unchanged while `abs(metric / target - 1) <= tolerance` (0.1) |
| `keda` | KEDA queue scaling: `ceil(queue / target per replica)`, queue = requests waiting or running (a work queue's unacknowledged messages) |

The learned allocator (`LearnedAllocator`) is a learned control law around the HPA formula: a
small MLP (numpy inference; trained by `switchboard scheduler alloc-train`, tools'
`allocation_run.py`) reads each pool's `FEATURE_NAMES` (the baselines' signals plus the demand's
trend and shape) and outputs two numbers per pool: a margin `y`, which scales the demand the HPA
formula sizes the pool for (`ceil(tokens/s x exp(y) / target)`, within the HPA's tolerance), and a
step `d`, how far the pool moves from its current count toward that recommendation this period
(`a = clip(1 + d, 0, 1)`: 1 goes all the way, 0 holds). All-zero weights are exactly
`hpa`, the training's starting point; `d = -1` is a fixed split (`static`); between them are
damped (a fraction `a` of the way, at least one replica), anticipating, per-pool policies (a rising demand ahead of the start-up delay, long prompts,
queues building). Its versioned file falls back to `FALLBACK` (the HPA baseline) with a warning
when missing, corrupt or made for another schema.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolObservation:
    """What an allocator sees of one pool at a control tick (rates over the last period)."""

    expert: str
    tokens_per_second: float  # demand: prompt tokens + output budget of the requests that arrived, per second
    requests_per_second: float
    queue_depth: int  # requests waiting at its replicas
    running: int  # sequences running at its replicas
    kv_utilization: float  # mean used / total KV blocks over its ready replicas
    slo_misses: int  # requests that missed their SLO (rejected, dropped or late) in the period
    finished: int  # requests that ended (met or missed) in the period
    replicas: int  # current replicas: ready or starting, not draining
    ready: int  # of those, serving


@dataclass(frozen=True)
class PoolBounds:
    """How few and how many replicas a pool may have."""

    min_replicas: int = 1
    max_replicas: int = 1 << 20

    def __post_init__(self) -> None:
        if self.min_replicas < 0 or self.max_replicas < self.min_replicas:
            raise ValueError(f"need 0 <= min_replicas <= max_replicas, got {self.min_replicas}, {self.max_replicas}")


@dataclass(frozen=True)
class AllocationConfig:
    """The budget, bounds, control period, cool-down and the baselines' targets."""

    budget: int
    bounds: Mapping[str, PoolBounds]
    period_seconds: float = 10.0
    scale_down_cooldown_seconds: float = 60.0
    # HPA: the target tokens/s per replica, and its tolerance (Kubernetes' default 0.1).
    hpa_target_tokens_per_replica: float = 1000.0
    hpa_tolerance: float = 0.1
    # KEDA: the target requests (waiting + running) per replica.
    keda_target_queue: float = 4.0

    def __post_init__(self) -> None:
        if self.budget < 1:
            raise ValueError(f"the budget must be at least 1 replica, got {self.budget}")
        if not self.bounds:
            raise ValueError("allocation needs at least one pool")
        floor = sum(b.min_replicas for b in self.bounds.values())
        if floor > self.budget:
            raise ValueError(f"the pools' minimums ({floor} replicas) exceed the budget of {self.budget}")
        if self.period_seconds <= 0 or self.scale_down_cooldown_seconds < 0:
            raise ValueError("need period_seconds > 0 and scale_down_cooldown_seconds >= 0")
        if self.hpa_target_tokens_per_replica <= 0 or self.keda_target_queue <= 0 or self.hpa_tolerance < 0:
            raise ValueError("the HPA and KEDA targets must be positive, the tolerance non-negative")

    @property
    def pools(self) -> list[str]:
        return sorted(self.bounds)


# ----------------------------------------------------------------------------- shared arithmetic


def split(total: int, weights: Mapping[str, float]) -> dict[str, int]:
    """`total` split by `weights` with the largest-remainder method (ties: name); zero weights: equal."""
    names = sorted(weights)
    w = [max(0.0, float(weights[n])) for n in names]
    if sum(w) <= 0:
        w = [1.0] * len(names)
    s = sum(w)
    exact = [total * x / s for x in w]
    out = [math.floor(x) for x in exact]
    left = total - sum(out)
    order = sorted(range(len(names)), key=lambda i: (-(exact[i] - out[i]), names[i]))
    for i in order[:left]:
        out[i] += 1
    return dict(zip(names, out, strict=True))


def bounded_split(total: int, weights: Mapping[str, float], bounds: Mapping[str, PoolBounds]) -> dict[str, int]:
    """`total` split by `weights`, every pool within its bounds (minimums first, then the rest)."""
    out = {n: bounds[n].min_replicas for n in weights}
    room = total - sum(out.values())
    while room > 0:
        open_ = {n: weights[n] for n in out if out[n] < bounds[n].max_replicas}
        if not open_:
            break
        share = split(room, open_)
        moved = 0
        for n, k in share.items():
            add = min(k, bounds[n].max_replicas - out[n])
            out[n] += add
            moved += add
        if moved == 0:
            break
        room -= moved
    return out


@dataclass
class CooldownState:
    """When each pool's replica count last changed (seconds; -inf: never)."""

    last_change: dict[str, float] = field(default_factory=dict)

    def since(self, expert: str, now: float) -> float:
        return now - self.last_change.get(expert, -math.inf)


def constrain(
    desired: Mapping[str, int],
    current: Mapping[str, int],
    config: AllocationConfig,
    cooldown: CooldownState,
    now: float,
) -> dict[str, int]:
    """The counts to apply: `desired` within bounds, cool-down and budget (module docstring).

    Updates `cooldown` for every pool whose count changes.
    """
    target: dict[str, int] = {}
    for name in config.pools:
        b = config.bounds[name]
        cur = int(current.get(name, 0))
        want = min(max(int(desired.get(name, cur)), b.min_replicas), b.max_replicas)
        if want < cur and cur <= b.max_replicas and cooldown.since(name, now) < config.scale_down_cooldown_seconds:
            want = max(cur, b.min_replicas)  # held: the cool-down has not passed
        target[name] = want
    if sum(target.values()) > config.budget:
        # Nobody shrinks to make room (beyond what they asked): floors are min(target, current).
        floor = {n: min(target[n], max(int(current.get(n, 0)), config.bounds[n].min_replicas)) for n in target}
        room = config.budget - sum(floor.values())
        if room < 0:  # only when the current counts already exceed the budget: cut the largest first
            while sum(floor.values()) > config.budget:
                n = max(floor, key=lambda k: (floor[k] - config.bounds[k].min_replicas, k))
                floor[n] -= 1
            room = 0
        extra = {n: target[n] - floor[n] for n in target if target[n] > floor[n]}
        share = split(room, extra) if extra and room > 0 else {}
        target = {n: floor[n] + min(share.get(n, 0), extra.get(n, 0)) for n in target}
    for name, count in target.items():
        if count != int(current.get(name, 0)):
            cooldown.last_change[name] = now
    return target


# Why a pool's applied count is what it is (`explain`), for metrics, logs and span events.
REASON_STEADY = "steady"  # the allocator asked for the current count
REASON_SCALE_UP = "scale_up"  # up, as asked
REASON_SCALE_DOWN = "scale_down"  # down, as asked (the cool-down had passed)
REASON_BOUNDS = "bounds"  # the allocator asked for a count outside the pool's bounds: clamped
REASON_COOLDOWN = "cooldown"  # a scale-down held by the cool-down
REASON_BUDGET = "budget"  # less than asked (up, or held), for lack of room in the budget
REASONS = (REASON_STEADY, REASON_SCALE_UP, REASON_SCALE_DOWN, REASON_BOUNDS, REASON_COOLDOWN, REASON_BUDGET)


def explain(
    desired: Mapping[str, int],
    applied: Mapping[str, int],
    current: Mapping[str, int],
    config: AllocationConfig,
) -> dict[str, str]:
    """Per pool, the reason (`REASONS`) `constrain` turned `desired` into `applied` from `current`."""
    out: dict[str, str] = {}
    for name in config.pools:
        b = config.bounds[name]
        cur = int(current.get(name, 0))
        raw = int(desired.get(name, cur))
        want = min(max(raw, b.min_replicas), b.max_replicas)
        got = int(applied.get(name, cur))
        if got > cur:
            out[name] = REASON_BUDGET if got < want else (REASON_BOUNDS if want != raw else REASON_SCALE_UP)
        elif got < cur:
            out[name] = REASON_BUDGET if got < want else (REASON_BOUNDS if want != raw else REASON_SCALE_DOWN)
        elif want < cur:
            out[name] = REASON_COOLDOWN
        elif want > cur:
            out[name] = REASON_BUDGET
        else:
            out[name] = REASON_BOUNDS if want != raw else REASON_STEADY
    return out


# ----------------------------------------------------------------------------- allocators


class Allocator(Protocol):
    """Proposes each pool's replica count from the observations (before `constrain`)."""

    name: str

    def desired(self, observations: Sequence[PoolObservation], config: AllocationConfig) -> dict[str, int]: ...


class StaticAllocator:
    """The budget split equally, within bounds, whatever the load."""

    name = "static"

    def desired(self, observations: Sequence[PoolObservation], config: AllocationConfig) -> dict[str, int]:
        return bounded_split(config.budget, {n: 1.0 for n in config.pools}, config.bounds)


class ProportionalAllocator:
    """The budget split by each pool's arrival tokens/s of the last period."""

    name = "proportional"

    def desired(self, observations: Sequence[PoolObservation], config: AllocationConfig) -> dict[str, int]:
        weights = {o.expert: o.tokens_per_second for o in observations}
        for n in config.pools:
            weights.setdefault(n, 0.0)
        return bounded_split(config.budget, weights, config.bounds)


def hpa_desired(current: int, metric_per_replica: float, target: float, tolerance: float = 0.1) -> int:
    """Kubernetes' HPA formula: `ceil(current * metric / target)`, or `current` within the tolerance.

    `metric_per_replica` is the average over the current replicas (tokens/s per replica). With no
    replica (nothing to average over) the demand alone sets it: `ceil(total metric / target)`.
    """
    if current <= 0:
        return math.ceil(metric_per_replica / target) if metric_per_replica > 0 else 0
    ratio = metric_per_replica / target
    if abs(ratio - 1.0) <= tolerance:
        return current
    return math.ceil(current * ratio)


def keda_desired(queue: float, target_per_replica: float) -> int:
    """KEDA's queue-length scaling: `ceil(queue / target per replica)`."""
    return math.ceil(queue / target_per_replica) if queue > 0 else 0


class HpaAllocator:
    """The Kubernetes HPA on tokens/s per replica."""

    name = "hpa"

    def desired(self, observations: Sequence[PoolObservation], config: AllocationConfig) -> dict[str, int]:
        return {
            o.expert: hpa_desired(o.replicas, _tokens_per_replica(o), config.hpa_target_tokens_per_replica,
                                  config.hpa_tolerance)
            for o in observations
        }


def _tokens_per_replica(o: PoolObservation) -> float:
    """The HPA's metric: tokens/s averaged over the current replicas (the total with none)."""
    return o.tokens_per_second / o.replicas if o.replicas else o.tokens_per_second


class KedaAllocator:
    """KEDA-style scaling on queue depth (requests waiting or running)."""

    name = "keda"

    def desired(self, observations: Sequence[PoolObservation], config: AllocationConfig) -> dict[str, int]:
        return {o.expert: keda_desired(o.queue_depth + o.running, config.keda_target_queue) for o in observations}


# ----------------------------------------------------------------------------- the learned allocator

ALLOCATION_FORMAT = "switchboard-allocation-policy"
ALLOCATION_FORMAT_VERSION = 2
ALLOCATION_SCHEMA = "allocation-v2"
# Per pool, in vector order (log1p of counts and rates; ratios to the HPA/KEDA targets so the
# network sees the baselines' own signals; the trend needs the previous period's observation).
FEATURE_NAMES: tuple[str, ...] = (
    "tokens_per_second",  # log1p
    "tokens_per_replica_over_target",  # tokens/s / replicas / the HPA target
    "queue_per_replica",  # waiting / replicas (log1p)
    "inflight_per_replica_over_target",  # (waiting + running) / replicas / the KEDA target
    "kv_utilization",
    "miss_rate",  # misses / finished in the period (0 when none finished)
    "replicas",  # log1p
    "starting_fraction",  # (replicas - ready) / replicas
    "budget_share",  # replicas / budget
    "demand_trend",  # log((tokens/s + 1) / (previous period's + 1)), clipped to +-3; 0 in the first period
    "tokens_per_request",  # log1p(tokens/s / requests/s): long prompts cost more per token of demand
)
# What the allocator falls back to without a usable file (the best heuristic of the README's table).
FALLBACK = "hpa"
# The network's outputs per pool: y, the margin on the demand the HPA formula sizes for (clipped to
# +-LOG_RANGE), and d, the step toward that recommendation (a = clip(1 + d, 0, 1)).
OUTPUTS = ("margin", "step")
LOG_RANGE = math.log(4.0)
TREND_RANGE = 3.0
MISSING, CORRUPT, SCHEMA = "missing", "corrupt", "schema"


class AllocationPolicyError(Exception):
    """An allocation policy file that cannot be used; `reason` is MISSING, CORRUPT or SCHEMA."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def features(o: PoolObservation, config: AllocationConfig, previous_tokens_per_second: float | None = None) -> np.ndarray:
    """`FEATURE_NAMES` of one pool's observation (`previous_tokens_per_second`: the last period's)."""
    r = max(o.replicas, 1)
    trend = 0.0
    if previous_tokens_per_second is not None:
        trend = math.log((o.tokens_per_second + 1.0) / (previous_tokens_per_second + 1.0))
        trend = max(-TREND_RANGE, min(TREND_RANGE, trend))
    return np.array(
        [
            math.log1p(o.tokens_per_second),
            o.tokens_per_second / r / config.hpa_target_tokens_per_replica,
            math.log1p(o.queue_depth / r),
            (o.queue_depth + o.running) / r / config.keda_target_queue,
            o.kv_utilization,
            o.slo_misses / o.finished if o.finished else 0.0,
            math.log1p(o.replicas),
            (o.replicas - o.ready) / r if o.replicas else 0.0,
            o.replicas / config.budget,
            trend,
            math.log1p(o.tokens_per_second / o.requests_per_second) if o.requests_per_second > 0 else 0.0,
        ],
        dtype=np.float64,
    )


@dataclass(frozen=True)
class AllocationNetwork:
    """MLP over one pool's features (tanh hidden layers, `OUTPUTS` out); numpy only."""

    mean: np.ndarray
    std: np.ndarray
    layers: tuple[tuple[np.ndarray, np.ndarray], ...]
    training: Mapping[str, Any] = field(default_factory=dict)

    def outputs(self, x: np.ndarray) -> np.ndarray:
        """[n, len(OUTPUTS)]: the outputs of each row of `x` ([n, len(FEATURE_NAMES)])."""
        h = (x - self.mean) / self.std
        last = len(self.layers) - 1
        for i, (w, b) in enumerate(self.layers):
            h = h @ w + b
            if i < last:
                h = np.tanh(h)
        return h


def desired_from_output(o: PoolObservation, y: float, d: float, config: AllocationConfig) -> int:
    """A pool's desired count from the network's margin `y` and step `d` (both 0: exactly `hpa`).

    The HPA formula on the pool's tokens/s scaled by exp(y) gives the recommendation; the count
    moves a fraction a = clip(1 + d, 0, 1) of the way there, rounded toward it (so any a > 0 moves
    at least one replica; a = 1: the recommendation itself; a = 0: the current count).
    """
    scale = math.exp(max(-LOG_RANGE, min(LOG_RANGE, float(y))))
    recommended = hpa_desired(o.replicas, _tokens_per_replica(o) * scale, config.hpa_target_tokens_per_replica,
                              config.hpa_tolerance)
    a = max(0.0, min(1.0, 1.0 + float(d)))
    if a <= 0.0:
        return o.replicas
    moved = o.replicas + a * (recommended - o.replicas)
    return math.ceil(moved - 1e-9) if recommended > o.replicas else math.floor(moved + 1e-9)


def write_allocation_file(path: str | Path, network: AllocationNetwork, training: Mapping[str, Any] | None = None) -> Path:
    """Write the versioned policy file atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": ALLOCATION_FORMAT,
        "version": ALLOCATION_FORMAT_VERSION,
        "schema": ALLOCATION_SCHEMA,
        "features": list(FEATURE_NAMES),
        "outputs": {"margin": "log of the demand multiplier the HPA formula sizes the pool for, clipped to +-log(4)",
                    "step": "d: the pool moves clip(1 + d, 0, 1) of the way toward that recommendation, rounded toward it"},
        "normalization": {"mean": [float(v) for v in network.mean], "std": [float(v) for v in network.std]},
        "activation": "tanh",
        "layers": [{"weight": w.tolist(), "bias": b.tolist()} for w, b in network.layers],
        "training": dict(training if training is not None else network.training),
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload) + "\n")
    os.replace(tmp, path)
    return path


def load_allocation_file(path: str | Path) -> AllocationNetwork:
    """Read and check an allocation policy file; raises AllocationPolicyError naming the problem."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise AllocationPolicyError(MISSING, f"allocation policy file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AllocationPolicyError(CORRUPT, f"allocation policy file {path} cannot be read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise AllocationPolicyError(CORRUPT, f"allocation policy file {path} is not JSON ({exc.msg})") from None
    if not isinstance(data, dict) or data.get("format") != ALLOCATION_FORMAT:
        raise AllocationPolicyError(CORRUPT, f"allocation policy file {path} is not a {ALLOCATION_FORMAT} file")
    if data.get("version") != ALLOCATION_FORMAT_VERSION or data.get("features") != list(FEATURE_NAMES):
        raise AllocationPolicyError(
            SCHEMA,
            f"allocation policy file {path} is version {data.get('version')!r} / schema {data.get('schema')!r}; "
            f"this reads version {ALLOCATION_FORMAT_VERSION} / {ALLOCATION_SCHEMA} ({len(FEATURE_NAMES)} features)",
        )
    try:
        n = len(FEATURE_NAMES)
        mean = np.asarray(data["normalization"]["mean"], dtype=np.float64)
        std = np.asarray(data["normalization"]["std"], dtype=np.float64)
        if mean.shape != (n,) or std.shape != (n,) or not np.all(std > 0) or not np.all(np.isfinite(mean)):
            raise ValueError("normalization needs finite means and positive stds per feature")
        layers = []
        width = n
        for i, layer in enumerate(data["layers"]):
            w = np.asarray(layer["weight"], dtype=np.float64)
            b = np.asarray(layer["bias"], dtype=np.float64)
            if w.ndim != 2 or w.shape[0] != width or b.shape != (w.shape[1],):
                raise ValueError(f"layer {i} does not chain from width {width}")
            if not (np.all(np.isfinite(w)) and np.all(np.isfinite(b))):
                raise ValueError(f"layer {i} has non-finite weights")
            layers.append((w, b))
            width = w.shape[1]
        if not layers or width != len(OUTPUTS):
            raise ValueError(f"the last layer must have {len(OUTPUTS)} outputs ({', '.join(OUTPUTS)})")
    except (KeyError, TypeError, ValueError) as exc:
        raise AllocationPolicyError(CORRUPT, f"allocation policy file {path} has malformed weights: {exc}") from None
    training = data.get("training")
    return AllocationNetwork(mean, std, tuple(layers), training if isinstance(training, dict) else {})


class LearnedAllocator:
    """The learned allocator; without a usable file (or network) it allocates as `FALLBACK` and says so."""

    name = "learned"

    def __init__(self, path: str | Path | None = None, network: AllocationNetwork | None = None) -> None:
        self.network = network
        self.fallback_reason = ""
        if network is None:
            try:
                if path is None:
                    raise AllocationPolicyError(MISSING, "no allocation policy file given")
                self.network = load_allocation_file(path)
            except AllocationPolicyError as exc:
                self.fallback_reason = exc.reason
                log.warning("learned allocator falls back to %s (%s): %s", FALLBACK, exc.reason, exc)
        self._fallback = HpaAllocator()
        self._previous: dict[str, float] = {}  # each pool's tokens/s of the last period (the trend feature)

    @property
    def status(self) -> str:
        return "learned" if self.network is not None else f"fallback to {FALLBACK} ({self.fallback_reason})"

    def desired(self, observations: Sequence[PoolObservation], config: AllocationConfig) -> dict[str, int]:
        if self.network is None or not observations:
            return self._fallback.desired(observations, config)
        x = np.stack([features(o, config, self._previous.get(o.expert)) for o in observations])
        self._previous = {o.expert: o.tokens_per_second for o in observations}
        out = self.network.outputs(x)
        return {o.expert: desired_from_output(o, row[0], row[1], config) for o, row in zip(observations, out, strict=True)}


ALLOCATOR_NAMES = ("static", "proportional", "hpa", "keda", "learned")


def make_allocator(name: str, policy_file: str | Path | None = None) -> Allocator:
    """A fresh allocator by name (`learned` reads `policy_file`, falling back as its class says)."""
    if name == "static":
        return StaticAllocator()
    if name == "proportional":
        return ProportionalAllocator()
    if name == "hpa":
        return HpaAllocator()
    if name == "keda":
        return KedaAllocator()
    if name == "learned":
        return LearnedAllocator(policy_file)
    raise ValueError(f"unknown allocator {name!r}; choose from {', '.join(ALLOCATOR_NAMES)}")


@dataclass
class AllocationController:
    """One allocator with its cool-down state: `step(observations, now)` -> the counts to apply."""

    allocator: Allocator
    config: AllocationConfig
    cooldown: CooldownState = field(default_factory=CooldownState)
    decisions: list[dict[str, Any]] = field(default_factory=list)
    # The counts to start from; None: the budget split equally within bounds.
    initial_counts: Mapping[str, int] | None = None

    def initial(self) -> dict[str, int]:
        """The counts to start from (`initial_counts`, or the budget split equally within bounds)."""
        if self.initial_counts is not None:
            return {n: int(self.initial_counts.get(n, 0)) for n in self.config.pools}
        return bounded_split(self.config.budget, {n: 1.0 for n in self.config.pools}, self.config.bounds)

    def step(self, observations: Sequence[PoolObservation], now: float) -> dict[str, int]:
        current = {o.expert: o.replicas for o in observations}
        raw = self.allocator.desired(observations, self.config)
        applied = constrain(raw, current, self.config, self.cooldown, now)
        self.decisions.append({"at": now, "current": current, "desired": raw, "applied": applied})
        return applied
