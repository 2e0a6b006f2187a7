"""Rollouts of a new model revision: traffic shifted step by step, gated on live figures, promoted
or rolled back by the scheduler on its own.

Pure core (no gRPC; the servicer converts messages and maps the exceptions below to status codes).
An expert's replicas announce the revision they serve. A rollout moves the expert's requests from
`from_revision` to `to_revision` in steps (`Step`: a weight, the share of requests placed on the
new revision, and a least duration). Placement asks `RolloutManager.split(expert)` for the
current weight (`RevisionSplit`), so the rollout never touches a request directly: a request
whose chosen revision has no open replica goes to the other one, and the other revision's
replicas are always the alternates the gateway fails over to. That is why no client request fails
because of a rollout: a canary that refuses or fails before its first token is failed over, and
the scheduler learns of the failure from the replica's own counters.

What is judged, each `tick`:

- the new revision's figures since the step began (requests ended and failed, from the replicas'
  heartbeats; TTFT and TPOT of completed requests, from `Complete`),
- against the old revision's recent ones (its last `BASELINE_SECONDS`), by `judge` with the
  rollout's `Gates`: error ratio, TTFT p95 ratio, TPOT p95 ratio, each only once the new revision
  has served `min_requests` in the step (the latency gates also need as many from the old one).

A failed gate rolls back at once (weight 0), so a bad revision is rolled back within the step it
was judged in; a step whose duration has passed and whose gates pass moves to the next; after the
last the rollout is promoted (weight 1). A new revision with no ready replica for
`NO_REPLICA_GRACE_SECONDS` rolls back. Blue-green is one step of weight 1: all traffic at once,
watched for the step's duration against the old revision's figures from before the switch (its
replicas stay registered, so a rollback is a weight change, not a redeploy).

An ended rollout keeps its final weight (1 after promotion, 0 after a rollback or an abort) until
the next rollout of that expert: the old (or the bad) revision's replicas only serve as fallback.
Every transition is handed to `on_transition` (metrics, a log line and a span event in the
servicer) and saved to the state file, which a restarted scheduler reads back (`load`).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

CANARY = "canary"
BLUE_GREEN = "blue-green"
STRATEGIES = (CANARY, BLUE_GREEN)
MAX_STEPS = 32
MAX_STEP_SECONDS = 7 * 86_400.0
MAX_REVISION_LENGTH = 128
# The old revision's figures a step is judged against: its last this many seconds.
BASELINE_SECONDS = 600.0
# Samples kept per revision (latency) and outcome batches (heartbeat deltas).
MAX_SAMPLES = 4096
# A running rollout whose new revision has had no ready replica for this long rolls back.
NO_REPLICA_GRACE_SECONDS = 15.0
STATE_SCHEMA = "switchboard.rollouts/v1"


class RolloutState(Enum):
    """Where a rollout is (mirrors `switchboard.v1.RolloutState`)."""

    RUNNING = "running"
    PAUSED = "paused"
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"

    @property
    def ended(self) -> bool:
        return self in (RolloutState.PROMOTED, RolloutState.ROLLED_BACK, RolloutState.ABORTED)


class InvalidRollout(ValueError):
    """The rollout asked for is malformed: `field` names the offending field."""

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description


class RolloutConflict(Exception):
    """The rollout cannot start or change now (one runs already, it has ended, no replica, ...)."""


class NoRollout(LookupError):
    """The expert has no rollout."""


@dataclass(frozen=True)
class Step:
    """One step: the new revision's share of requests, for at least `duration_seconds`."""

    weight: float
    duration_seconds: float


@dataclass(frozen=True)
class Gates:
    """What every step checks (see `judge`)."""

    max_error_ratio: float = 0.05
    max_ttft_p95_ratio: float = 1.5
    max_tpot_p95_ratio: float = 1.5
    min_requests: int = 20


MAX_PROBE_TEXTS = 64
MAX_PROBE_CHARS = 200_000


@dataclass(frozen=True)
class QualityProbe:
    """Fixed texts scored by both revisions before any traffic moves (see `RolloutManager.record_probe`)."""

    texts: tuple[str, ...]
    max_nll_increase: float = 0.05


MAX_DEPLOY_REPLICAS = 64
# A rollout whose deployed replicas are not all ready this long after the deploy rolls back.
DEPLOY_TIMEOUT_SECONDS = 900.0


@dataclass(frozen=True)
class Deploy:
    """The new revision's replicas a rollout starts (see revisions.py)."""

    model: str = ""
    replicas: int = 1


DEFAULT_STEPS = {
    CANARY: (Step(0.1, 60.0), Step(0.5, 60.0), Step(1.0, 60.0)),
    BLUE_GREEN: (Step(1.0, 60.0),),
}


@dataclass(frozen=True)
class RolloutSpec:
    """What to roll out; `validated` fills the defaults and checks every field."""

    expert: str
    from_revision: str
    to_revision: str
    strategy: str = CANARY
    steps: tuple[Step, ...] = ()
    gates: Gates = field(default_factory=Gates)
    quality_probe: QualityProbe | None = None
    deploy: Deploy | None = None

    def validated(self, experts: Iterable[str]) -> RolloutSpec:
        """This spec with defaults filled in; InvalidRollout naming the field otherwise."""
        known = set(experts)
        if not self.expert:
            raise InvalidRollout("spec.expert", "is required")
        if self.expert not in known:
            raise InvalidRollout(
                "spec.expert", f"{self.expert!r} is not declared; declared: {', '.join(sorted(known))}"
            )
        for name, label in (
            ("spec.from_revision", self.from_revision),
            ("spec.to_revision", self.to_revision),
        ):
            if not label:
                raise InvalidRollout(name, "is required (the revision label the replicas announce)")
            if len(label) > MAX_REVISION_LENGTH or not label.isprintable():
                raise InvalidRollout(name, f"must be at most {MAX_REVISION_LENGTH} printable characters")
        if self.from_revision == self.to_revision:
            raise InvalidRollout("spec.to_revision", f"is the revision serving now ({self.from_revision!r})")
        if self.strategy not in STRATEGIES:
            raise InvalidRollout(
                "spec.strategy", f"must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}"
            )
        steps = self.steps or DEFAULT_STEPS[self.strategy]
        if len(steps) > MAX_STEPS:
            raise InvalidRollout("spec.steps", f"at most {MAX_STEPS} steps, got {len(steps)}")
        previous = 0.0
        for index, step in enumerate(steps):
            where = f"spec.steps[{index}]"
            if not (math.isfinite(step.weight) and 0.0 < step.weight <= 1.0):
                raise InvalidRollout(f"{where}.weight", f"must be in (0, 1], got {step.weight}")
            if step.weight < previous:
                raise InvalidRollout(f"{where}.weight", f"must not be below the step before ({previous})")
            if not (math.isfinite(step.duration_seconds) and 0.0 < step.duration_seconds <= MAX_STEP_SECONDS):
                raise InvalidRollout(
                    f"{where}.duration_seconds",
                    f"must be in (0, {MAX_STEP_SECONDS:g}], got {step.duration_seconds}",
                )
            previous = step.weight
        if self.strategy == BLUE_GREEN and (len(steps) != 1 or steps[0].weight != 1.0):
            raise InvalidRollout("spec.steps", "blue-green is one step of weight 1 (all traffic at once)")
        gates = self.gates
        for name, value in (
            ("max_error_ratio", gates.max_error_ratio),
            ("max_ttft_p95_ratio", gates.max_ttft_p95_ratio),
            ("max_tpot_p95_ratio", gates.max_tpot_p95_ratio),
        ):
            if not (math.isfinite(value) and value > 0):
                raise InvalidRollout(f"spec.gates.{name}", f"must be a positive number, got {value}")
        if gates.max_error_ratio > 1:
            raise InvalidRollout(
                "spec.gates.max_error_ratio", f"must be at most 1, got {gates.max_error_ratio}"
            )
        if not 1 <= gates.min_requests <= 1_000_000:
            raise InvalidRollout(
                "spec.gates.min_requests", f"must be in [1, 1000000], got {gates.min_requests}"
            )
        if self.deploy is not None and not 1 <= self.deploy.replicas <= MAX_DEPLOY_REPLICAS:
            raise InvalidRollout(
                "spec.deploy.replicas", f"must be in [1, {MAX_DEPLOY_REPLICAS}], got {self.deploy.replicas}"
            )
        probe = self.quality_probe
        if probe is not None:
            if not 1 <= len(probe.texts) <= MAX_PROBE_TEXTS:
                raise InvalidRollout(
                    "spec.quality_probe.texts", f"give 1 to {MAX_PROBE_TEXTS} texts, got {len(probe.texts)}"
                )
            if any(not text.strip() for text in probe.texts):
                raise InvalidRollout("spec.quality_probe.texts", "a text is empty")
            if sum(len(text) for text in probe.texts) > MAX_PROBE_CHARS:
                raise InvalidRollout("spec.quality_probe.texts", f"at most {MAX_PROBE_CHARS} characters in all")
            if not (math.isfinite(probe.max_nll_increase) and probe.max_nll_increase > 0):
                raise InvalidRollout(
                    "spec.quality_probe.max_nll_increase",
                    f"must be a positive number of nats, got {probe.max_nll_increase}",
                )
        return replace(self, steps=tuple(steps))


@dataclass(frozen=True)
class RevisionStats:
    """One revision's figures over a window, as a rollout judges them."""

    revision: str
    requests: int = 0
    failed: int = 0
    ttft_p95: float = 0.0
    tpot_p95: float = 0.0
    latency_samples: int = 0
    ready_replicas: int = 0
    probe_nll: float = 0.0  # mean NLL per token on the quality probe (0: not probed)

    @property
    def error_ratio(self) -> float:
        return self.failed / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class Verdict:
    """`passed` True or False, or None while there is too little to judge; `reason` says why."""

    passed: bool | None
    reason: str


def judge(gates: Gates, new: RevisionStats, old: RevisionStats) -> Verdict:
    """The gates on the new revision's figures in the step against the old revision's recent ones."""
    if new.requests < gates.min_requests:
        return Verdict(
            None, f"waiting for {gates.min_requests - new.requests} more requests on {new.revision}"
        )
    if new.error_ratio > gates.max_error_ratio:
        return Verdict(
            False,
            f"error ratio {new.error_ratio:.3f} of {new.revision} ({new.failed}/{new.requests}) is above "
            f"{gates.max_error_ratio:g}",
        )
    if new.latency_samples >= gates.min_requests and old.latency_samples >= gates.min_requests:
        for name, mine, theirs, bound in (
            ("TTFT", new.ttft_p95, old.ttft_p95, gates.max_ttft_p95_ratio),
            ("TPOT", new.tpot_p95, old.tpot_p95, gates.max_tpot_p95_ratio),
        ):
            if theirs > 0 and mine > theirs * bound:
                return Verdict(
                    False,
                    f"{name} p95 {mine * 1000:.1f} ms of {new.revision} is {mine / theirs:.2f}x the "
                    f"{theirs * 1000:.1f} ms of {old.revision} (bound {bound:g}x)",
                )
        return Verdict(True, "error ratio, TTFT p95 and TPOT p95 within bounds")
    return Verdict(
        True, f"error ratio within bounds (too few latency samples of {old.revision} to compare latency)"
    )


def p95(values: Sequence[float]) -> float:
    """The 95th percentile (nearest rank) of `values`, 0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


class RevisionLedger:
    """Every revision's recent outcomes and latencies, by (expert, revision), with timestamps."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._outcomes: dict[tuple[str, str], deque[tuple[float, int, int]]] = {}
        self._latency: dict[tuple[str, str], deque[tuple[float, float, float]]] = {}

    def record_outcomes(self, expert: str, revision: str, ended: int, failed: int) -> None:
        """A replica's heartbeat reported `ended` more requests, `failed` of them failed."""
        if ended <= 0 and failed <= 0:
            return
        key = (expert, revision)
        self._outcomes.setdefault(key, deque(maxlen=MAX_SAMPLES)).append(
            (self._clock(), max(ended, failed), failed)
        )

    def record_latency(self, expert: str, revision: str, ttft: float, tpot: float) -> None:
        """A completed request's time to first token and time per output token (seconds)."""
        key = (expert, revision)
        self._latency.setdefault(key, deque(maxlen=MAX_SAMPLES)).append((self._clock(), ttft, tpot))

    def stats(self, expert: str, revision: str, since: float, ready_replicas: int = 0) -> RevisionStats:
        """The revision's figures from `since` (a clock reading) to now."""
        ended = failed = 0
        for at, n, bad in self._outcomes.get((expert, revision), ()):
            if at >= since:
                ended += n
                failed += bad
        ttfts: list[float] = []
        tpots: list[float] = []
        for at, ttft, tpot in self._latency.get((expert, revision), ()):
            if at >= since:
                ttfts.append(ttft)
                if tpot > 0:
                    tpots.append(tpot)
        return RevisionStats(revision, ended, failed, p95(ttfts), p95(tpots), len(ttfts), ready_replicas)


@dataclass(frozen=True)
class RevisionSplit:
    """What placement applies to an expert: `weight` of its requests go first to the replicas of
    `revision`, the rest first to those of `old`; each is the other's fallback, and replicas of any
    other revision come last (a pin has `old == revision`: one revision serves, the rest fall back)."""

    revision: str
    weight: float
    old: str = ""

    def prefers(self, request_id: str) -> bool:
        """Whether this request goes to `revision` first: a fixed bucket per request id, so the
        same request (retried, failed over) keeps its side, and the shares hold over many ids."""
        if self.weight >= 1.0:
            return True
        if self.weight <= 0.0:
            return False
        bucket = zlib.crc32(request_id.encode("utf-8", "surrogatepass")) / 4294967296.0
        return bucket < self.weight

    def order(self, request_id: str) -> tuple[str, str]:
        """The revisions this request tries first and second."""
        return (self.revision, self.old) if self.prefers(request_id) else (self.old, self.revision)


@dataclass
class Rollout:
    """One rollout and where it stands (mutable: only `RolloutManager` changes it)."""

    spec: RolloutSpec
    state: RolloutState
    step: int
    started_at: float  # clock reading
    step_started_at: float  # clock reading (while paused: the elapsed seconds are frozen in `paused_elapsed`)
    started_unix: float
    ended_unix: float = 0.0
    reason: str = ""
    paused_elapsed: float = 0.0
    stats: tuple[RevisionStats, ...] = ()
    # Since when the new revision has had no ready replica (clock reading; None: it has one).
    no_replica_since: float | None = None
    # The deploy: "" (none asked), "deploying" (the deployer is to be asked), "waiting" (it was asked;
    # until the replicas are ready), "ready".
    deploy_state: str = ""
    # The quality probe: "" (none asked), "pending", "passed"; and each revision's mean NLL per token.
    probe_state: str = ""
    probe_nll: dict[str, float] = field(default_factory=dict)
    # When the current step began (clock reading), for the new revision's figures; unlike
    # `step_started_at` a pause does not move it. None: `step_started_at`.
    window_start: float | None = None

    @property
    def weight(self) -> float:
        if self.state is RolloutState.PROMOTED:
            return 1.0
        if self.state in (RolloutState.ROLLED_BACK, RolloutState.ABORTED):
            return 0.0
        if self.probe_state == "pending" or self.deploy_state in ("deploying", "waiting"):
            return 0.0  # no traffic moves before the new replicas are ready and the probe passed
        return self.spec.steps[self.step].weight

    def step_elapsed(self, now: float) -> float:
        if self.state is RolloutState.PAUSED:
            return self.paused_elapsed
        if self.state.ended:
            return 0.0
        return max(0.0, now - self.step_started_at)


# on_transition(rollout, transition, detail): transition is started, step, paused, resumed,
# promoted, rolled_back or aborted.
TransitionHook = Callable[[Rollout, str, str], None]


class RolloutManager:
    """The rollouts of every expert: start, inspect, pause, resume, abort, and `tick` to judge.

    `ready(expert, revision)` counts that revision's ready replicas now (the registry's view).
    """

    def __init__(
        self,
        experts: Iterable[str],
        ledger: RevisionLedger,
        ready: Callable[[str, str], int],
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        state_file: Path | None = None,
        on_transition: TransitionHook | None = None,
    ) -> None:
        self.experts = frozenset(experts)
        self.ledger = ledger
        self._ready = ready
        self._clock = clock
        self._wall = wall_clock
        self.state_file = state_file
        self._on_transition = on_transition
        self._rollouts: dict[str, Rollout] = {}
        self._splits: dict[str, RevisionSplit] = {}
        self._pins: set[str] = set()  # experts whose split is a pin, not a rollout's

    # ------------------------------------------------------------------ reading

    @property
    def splits(self) -> Mapping[str, RevisionSplit]:
        """expert -> the split placement applies (experts without a rollout are absent)."""
        return self._splits

    def get(self, expert: str) -> Rollout:
        rollout = self._rollouts.get(expert)
        if rollout is None:
            raise NoRollout(f"expert {expert!r} has no rollout")
        return rollout

    def list(self) -> list[Rollout]:
        return [self._rollouts[name] for name in sorted(self._rollouts)]

    # ------------------------------------------------------------------ serving revisions

    def pin(self, expert: str, revision: str) -> bool:
        """Keep `expert`'s traffic on `revision` (the one it served) when a replica of another revision
        registers and no rollout says otherwise: a new revision's replicas take no traffic, only
        fallback, until a rollout moves it there. True when this set the pin."""
        if expert in self._splits:
            return False
        self._splits[expert] = RevisionSplit(revision, 1.0, revision)
        self._pins.add(expert)
        return True

    def unpin(self, expert: str) -> bool:
        """Drop a pin (the expert serves one revision again); a rollout's split stays. True when dropped."""
        if expert not in self._pins:
            return False
        self._pins.discard(expert)
        self._splits.pop(expert, None)
        return True

    # ------------------------------------------------------------------ commands

    def start(self, spec: RolloutSpec) -> Rollout:
        """Start a rollout; InvalidRollout for a bad spec, RolloutConflict when one is active or the
        new revision has no ready replica."""
        spec = spec.validated(self.experts)
        current = self._rollouts.get(spec.expert)
        if current is not None and not current.state.ended:
            raise RolloutConflict(
                f"expert {spec.expert!r} has a {current.state.value} rollout to {current.spec.to_revision!r}; "
                "abort it first"
            )
        if spec.deploy is None and self._ready(spec.expert, spec.to_revision) < 1:
            raise RolloutConflict(
                f"revision {spec.to_revision!r} of {spec.expert!r} has no ready replica; start its replicas "
                "(GENERATOR_REVISION) and wait until they register"
            )
        if self._ready(spec.expert, spec.from_revision) < 1:
            raise RolloutConflict(
                f"revision {spec.from_revision!r} of {spec.expert!r} has no ready replica to compare against"
            )
        now = self._clock()
        rollout = Rollout(spec, RolloutState.RUNNING, 0, now, now, self._wall(), window_start=now)
        if spec.quality_probe is not None:
            rollout.probe_state = "pending"
        if spec.deploy is not None:
            rollout.deploy_state = "deploying"
        self._rollouts[spec.expert] = rollout
        self._changed(rollout, "started", f"{spec.strategy} from {spec.from_revision} to {spec.to_revision}")
        return rollout

    def pause(self, expert: str, reason: str = "") -> Rollout:
        rollout = self.get(expert)
        if rollout.state is not RolloutState.RUNNING:
            raise RolloutConflict(f"the rollout of {expert!r} is {rollout.state.value}, not running")
        rollout.paused_elapsed = rollout.step_elapsed(self._clock())
        rollout.state = RolloutState.PAUSED
        rollout.reason = reason or "paused"
        self._changed(rollout, "paused", rollout.reason)
        return rollout

    def resume(self, expert: str, reason: str = "") -> Rollout:
        rollout = self.get(expert)
        if rollout.state is not RolloutState.PAUSED:
            raise RolloutConflict(f"the rollout of {expert!r} is {rollout.state.value}, not paused")
        rollout.state = RolloutState.RUNNING
        rollout.step_started_at = self._clock() - rollout.paused_elapsed
        rollout.reason = reason or "resumed"
        self._changed(rollout, "resumed", rollout.reason)
        return rollout

    def abort(self, expert: str, reason: str = "") -> Rollout:
        rollout = self.get(expert)
        if rollout.state.ended:
            raise RolloutConflict(f"the rollout of {expert!r} has ended ({rollout.state.value})")
        self._end(rollout, RolloutState.ABORTED, reason or "aborted by an operator")
        return rollout

    # ------------------------------------------------------------------ the quality probe

    def pending_probes(self) -> list[Rollout]:
        """Active rollouts whose quality probe is due (their new replicas are ready) and has not run."""
        return [
            r
            for r in self.list()
            if r.probe_state == "pending" and r.deploy_state not in ("deploying", "waiting") and not r.state.ended
        ]

    def pending_deploys(self) -> list[Rollout]:
        """Active rollouts whose new revision's replicas are to be started (the servicer starts each once)."""
        return [r for r in self.list() if r.deploy_state == "deploying" and not r.state.ended]

    def record_deploy_started(self, expert: str) -> None:
        """The deployer was asked (it answered): the rollout now waits for the replicas to be ready."""
        rollout = self._rollouts.get(expert)
        if rollout is not None and not rollout.state.ended and rollout.deploy_state == "deploying":
            rollout.deploy_state = "waiting"
            self.save()

    def record_deploy_failure(self, expert: str, error: str) -> Rollout | None:
        """The deployer could not start the new replicas: the rollout rolls back."""
        rollout = self._rollouts.get(expert)
        if rollout is None or rollout.state.ended or rollout.deploy_state not in ("deploying", "waiting"):
            return None
        self._end(rollout, RolloutState.ROLLED_BACK, f"the new revision could not be deployed: {error}")
        return rollout

    def record_probe(self, expert: str, nll: Mapping[str, float] | None, error: str = "") -> Rollout | None:
        """The probe's result: each revision's mean NLL per token (None with `error` when it could not
        run, which rolls back: the operator asked for the probe). The first step starts when it passes."""
        rollout = self._rollouts.get(expert)
        if rollout is None or rollout.state.ended or rollout.probe_state != "pending":
            return None
        spec = rollout.spec
        probe = spec.quality_probe
        assert probe is not None
        if nll is None:
            self._end(rollout, RolloutState.ROLLED_BACK, f"the quality probe could not run: {error}")
            return rollout
        rollout.probe_nll = dict(nll)
        self._refresh_stats(rollout, self._clock())
        old, new = nll[spec.from_revision], nll[spec.to_revision]
        if new - old > probe.max_nll_increase:
            self._end(
                rollout,
                RolloutState.ROLLED_BACK,
                f"quality probe: mean NLL {new:.3f} of {spec.to_revision} is {new - old:.3f} nats above the "
                f"{old:.3f} of {spec.from_revision} (bound {probe.max_nll_increase:g})",
            )
            return rollout
        rollout.probe_state = "passed"
        now = self._clock()
        rollout.step_started_at = rollout.window_start = now
        self._changed(rollout, "probed", f"quality probe passed: mean NLL {new:.3f} against {old:.3f}")
        return rollout

    # ------------------------------------------------------------------ judging

    def tick(self) -> list[tuple[Rollout, str]]:
        """Judge every active rollout once; returns the transitions made."""
        made: list[tuple[Rollout, str]] = []
        for rollout in list(self._rollouts.values()):
            if rollout.state.ended:
                continue
            transition = self._judge(rollout)
            if transition:
                made.append((rollout, transition))
        return made

    def _refresh_stats(self, rollout: Rollout, now: float) -> tuple[RevisionStats, RevisionStats]:
        """Both revisions' figures as the gates read them: the new one's in the step, the old one's
        recent ones (with the quality probe's NLL once it ran); kept in `rollout.stats`."""
        spec = rollout.spec
        since = rollout.step_started_at if rollout.window_start is None else rollout.window_start
        new = self.ledger.stats(spec.expert, spec.to_revision, since, self._ready(spec.expert, spec.to_revision))
        old = self.ledger.stats(
            spec.expert,
            spec.from_revision,
            min(rollout.started_at, now - BASELINE_SECONDS),
            self._ready(spec.expert, spec.from_revision),
        )
        if rollout.probe_nll:
            old = replace(old, probe_nll=rollout.probe_nll.get(spec.from_revision, 0.0))
            new = replace(new, probe_nll=rollout.probe_nll.get(spec.to_revision, 0.0))
        rollout.stats = (old, new)
        return old, new

    def _judge(self, rollout: Rollout) -> str:
        now = self._clock()
        spec = rollout.spec
        old, new = self._refresh_stats(rollout, now)
        ready_new = new.ready_replicas
        if rollout.deploy_state in ("deploying", "waiting"):
            assert spec.deploy is not None
            if ready_new >= spec.deploy.replicas:
                rollout.deploy_state = "ready"
                rollout.step_started_at = rollout.window_start = now
                self._changed(rollout, "deployed", f"{ready_new} replica(s) of {spec.to_revision} ready")
                return "deployed"
            if now - rollout.started_at >= DEPLOY_TIMEOUT_SECONDS:
                self._end(
                    rollout,
                    RolloutState.ROLLED_BACK,
                    f"{ready_new} of {spec.deploy.replicas} replica(s) of {spec.to_revision} ready after "
                    f"{DEPLOY_TIMEOUT_SECONDS:g} s",
                )
                return "rolled_back"
            rollout.reason = f"waiting for replicas of {spec.to_revision}: {ready_new} of {spec.deploy.replicas} ready"
            return ""
        if ready_new < 1:
            if rollout.no_replica_since is None:
                rollout.no_replica_since = now
            elif now - rollout.no_replica_since >= NO_REPLICA_GRACE_SECONDS:
                self._end(
                    rollout,
                    RolloutState.ROLLED_BACK,
                    f"revision {spec.to_revision} had no ready replica for {NO_REPLICA_GRACE_SECONDS:g} s",
                )
                return "rolled_back"
        else:
            rollout.no_replica_since = None
        if rollout.probe_state == "pending":
            rollout.reason = "waiting for the quality probe"
            return ""
        verdict = judge(spec.gates, new, old)
        if verdict.passed is False:
            # A failing revision is rolled back even while paused: a pause holds the weights, not the risk.
            self._end(rollout, RolloutState.ROLLED_BACK, verdict.reason)
            return "rolled_back"
        if rollout.state is RolloutState.PAUSED:
            return ""
        rollout.reason = verdict.reason
        if (
            verdict.passed is None
            or now - rollout.step_started_at < spec.steps[rollout.step].duration_seconds
        ):
            return ""
        if rollout.step + 1 >= len(spec.steps):
            self._end(rollout, RolloutState.PROMOTED, f"every step passed: {verdict.reason}")
            return "promoted"
        rollout.step += 1
        rollout.step_started_at = rollout.window_start = now
        self._changed(rollout, "step", f"step {rollout.step}: weight {rollout.weight:g} ({verdict.reason})")
        return "step"

    def _end(self, rollout: Rollout, state: RolloutState, reason: str) -> None:
        rollout.state = state
        rollout.reason = reason
        rollout.ended_unix = self._wall()
        self._changed(rollout, state.value, reason)

    def _changed(self, rollout: Rollout, transition: str, detail: str) -> None:
        spec = rollout.spec
        self._pins.discard(spec.expert)
        self._splits[spec.expert] = RevisionSplit(spec.to_revision, rollout.weight, spec.from_revision)
        self.save()
        if self._on_transition is not None:
            self._on_transition(rollout, transition, detail)

    # ------------------------------------------------------------------ persistence

    def save(self) -> None:
        """Write every rollout to the state file atomically (nothing without a state file)."""
        if self.state_file is None:
            return
        now = self._clock()
        document = {
            "schema": STATE_SCHEMA,
            "rollouts": [_to_json(r, now) for r in self.list()],
        }
        folder = self.state_file.parent
        folder.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=folder, prefix=f".{self.state_file.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(document, handle, indent=2, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, self.state_file)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise

    def load(self) -> int:
        """Read the state file back (a restarted scheduler): rollouts continue where they were, the
        current step's clock restarting. Returns how many; ValueError for a file it cannot read."""
        if self.state_file is None or not self.state_file.exists():
            return 0
        try:
            document = json.loads(self.state_file.read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"{self.state_file}: not a rollout state file ({error})") from None
        if not isinstance(document, dict) or document.get("schema") != STATE_SCHEMA:
            raise ValueError(f"{self.state_file}: schema is not {STATE_SCHEMA!r}")
        now = self._clock()
        loaded: dict[str, Rollout] = {}
        for index, entry in enumerate(document.get("rollouts") or []):
            try:
                rollout = _from_json(entry, now)
                rollout.spec = rollout.spec.validated(self.experts)
            except (KeyError, TypeError, ValueError) as error:
                raise ValueError(f"{self.state_file}: rollouts[{index}]: {error}") from None
            loaded[rollout.spec.expert] = rollout
        self._rollouts = loaded
        # In place: placement holds this very mapping.
        self._splits.clear()
        self._splits.update(
            {e: RevisionSplit(r.spec.to_revision, r.weight, r.spec.from_revision) for e, r in loaded.items()}
        )
        return len(loaded)


def _to_json(rollout: Rollout, now: float) -> dict[str, Any]:
    spec = rollout.spec
    return {
        "spec": {
            "expert": spec.expert,
            "from_revision": spec.from_revision,
            "to_revision": spec.to_revision,
            "strategy": spec.strategy,
            "steps": [asdict(s) for s in spec.steps],
            "gates": asdict(spec.gates),
            "quality_probe": None if spec.quality_probe is None else asdict(spec.quality_probe),
            "deploy": None if spec.deploy is None else asdict(spec.deploy),
        },
        "state": rollout.state.value,
        "step": rollout.step,
        "step_elapsed_seconds": rollout.step_elapsed(now),
        "started_unix": rollout.started_unix,
        "ended_unix": rollout.ended_unix,
        "reason": rollout.reason,
        "probe_state": rollout.probe_state,
        "deploy_state": rollout.deploy_state,
        "probe_nll": rollout.probe_nll,
    }


def _from_json(entry: Mapping[str, Any], now: float) -> Rollout:
    raw = entry["spec"]
    spec = RolloutSpec(
        expert=str(raw["expert"]),
        from_revision=str(raw["from_revision"]),
        to_revision=str(raw["to_revision"]),
        strategy=str(raw["strategy"]),
        steps=tuple(Step(float(s["weight"]), float(s["duration_seconds"])) for s in raw["steps"]),
        gates=Gates(**{k: v for k, v in raw["gates"].items() if k in Gates.__dataclass_fields__}),
        quality_probe=None
        if not raw.get("quality_probe")
        else QualityProbe(
            tuple(str(t) for t in raw["quality_probe"]["texts"]), float(raw["quality_probe"]["max_nll_increase"])
        ),
        deploy=None
        if not raw.get("deploy")
        else Deploy(str(raw["deploy"].get("model", "")), int(raw["deploy"].get("replicas", 1))),
    )
    state = RolloutState(entry["state"])
    step = int(entry["step"])
    if not 0 <= step < max(1, len(spec.steps)):
        raise ValueError(f"step {step} is not a step of the rollout")
    elapsed = float(entry.get("step_elapsed_seconds", 0.0))
    return Rollout(
        spec,
        state,
        step,
        started_at=now,
        step_started_at=now - elapsed if state is RolloutState.RUNNING else now,
        started_unix=float(entry.get("started_unix", 0.0)),
        ended_unix=float(entry.get("ended_unix", 0.0)),
        reason=str(entry.get("reason", "")),
        paused_elapsed=elapsed if state is RolloutState.PAUSED else 0.0,
        window_start=now,
        probe_state=str(entry.get("probe_state", "")),
        deploy_state=str(entry.get("deploy_state", "")),
        probe_nll={str(k): float(v) for k, v in (entry.get("probe_nll") or {}).items()},
    )
