"""Conversions between the rollout contracts (`switchboard.v1.Rollout*`) and `rollout.py`'s types."""

from __future__ import annotations

import time

from switchboard.scheduler.rollout import (
    BLUE_GREEN,
    CANARY,
    Deploy,
    Gates,
    InvalidRollout,
    QualityProbe,
    RevisionStats,
    Rollout,
    RolloutSpec,
    RolloutState,
    Step,
)
from switchboard.v1 import scheduler_pb2

_STRATEGY_FROM_PROTO = {
    scheduler_pb2.ROLLOUT_STRATEGY_UNSPECIFIED: CANARY,
    scheduler_pb2.ROLLOUT_STRATEGY_CANARY: CANARY,
    scheduler_pb2.ROLLOUT_STRATEGY_BLUE_GREEN: BLUE_GREEN,
}
_STRATEGY_TO_PROTO = {
    CANARY: scheduler_pb2.ROLLOUT_STRATEGY_CANARY,
    BLUE_GREEN: scheduler_pb2.ROLLOUT_STRATEGY_BLUE_GREEN,
}
_STATE_TO_PROTO = {
    RolloutState.RUNNING: scheduler_pb2.ROLLOUT_STATE_RUNNING,
    RolloutState.PAUSED: scheduler_pb2.ROLLOUT_STATE_PAUSED,
    RolloutState.PROMOTED: scheduler_pb2.ROLLOUT_STATE_PROMOTED,
    RolloutState.ROLLED_BACK: scheduler_pb2.ROLLOUT_STATE_ROLLED_BACK,
    RolloutState.ABORTED: scheduler_pb2.ROLLOUT_STATE_ABORTED,
}


def spec_from_proto(message: scheduler_pb2.RolloutSpec) -> RolloutSpec:
    """The domain spec (not yet validated: `RolloutSpec.validated` does that); an unknown strategy
    number (a newer client's) is InvalidRollout."""
    strategy = _STRATEGY_FROM_PROTO.get(message.strategy)
    if strategy is None:
        raise InvalidRollout(
            "spec.strategy", f"unknown strategy {message.strategy}; use CANARY or BLUE_GREEN"
        )
    defaults = Gates()
    gates = message.gates
    return RolloutSpec(
        expert=message.expert,
        from_revision=message.from_revision,
        to_revision=message.to_revision,
        strategy=strategy,
        steps=tuple(Step(s.weight, s.duration_seconds) for s in message.steps),
        gates=Gates(
            max_error_ratio=gates.max_error_ratio or defaults.max_error_ratio,
            max_ttft_p95_ratio=gates.max_ttft_p95_ratio or defaults.max_ttft_p95_ratio,
            max_tpot_p95_ratio=gates.max_tpot_p95_ratio or defaults.max_tpot_p95_ratio,
            min_requests=gates.min_requests or defaults.min_requests,
        ),
        quality_probe=_probe_from_proto(message.quality_probe) if message.HasField("quality_probe") else None,
        deploy=Deploy(message.deploy.model, message.deploy.replicas or 1) if message.HasField("deploy") else None,
    )


def _probe_from_proto(message: scheduler_pb2.RolloutQualityProbe) -> QualityProbe:
    return QualityProbe(tuple(message.texts), message.max_nll_increase or QualityProbe(()).max_nll_increase)


def spec_to_proto(spec: RolloutSpec) -> scheduler_pb2.RolloutSpec:
    gates = spec.gates
    return scheduler_pb2.RolloutSpec(
        expert=spec.expert,
        from_revision=spec.from_revision,
        to_revision=spec.to_revision,
        strategy=_STRATEGY_TO_PROTO[spec.strategy],
        steps=[
            scheduler_pb2.RolloutStep(weight=s.weight, duration_seconds=s.duration_seconds)
            for s in spec.steps
        ],
        gates=scheduler_pb2.RolloutGates(
            max_error_ratio=gates.max_error_ratio,
            max_ttft_p95_ratio=gates.max_ttft_p95_ratio,
            max_tpot_p95_ratio=gates.max_tpot_p95_ratio,
            min_requests=gates.min_requests,
        ),
        quality_probe=None
        if spec.quality_probe is None
        else scheduler_pb2.RolloutQualityProbe(
            texts=list(spec.quality_probe.texts), max_nll_increase=spec.quality_probe.max_nll_increase
        ),
        deploy=None
        if spec.deploy is None
        else scheduler_pb2.RolloutDeploy(model=spec.deploy.model, replicas=spec.deploy.replicas),
    )


def stats_to_proto(stats: RevisionStats) -> scheduler_pb2.RevisionStats:
    return scheduler_pb2.RevisionStats(
        revision=stats.revision,
        requests=stats.requests,
        failed=stats.failed,
        ttft_p95_seconds=stats.ttft_p95,
        tpot_p95_seconds=stats.tpot_p95,
        ready_replicas=stats.ready_replicas,
        probe_nll=stats.probe_nll,
    )


def rollout_to_proto(rollout: Rollout, now: float | None = None) -> scheduler_pb2.Rollout:
    """The wire form of a rollout (`now`: a reading of the manager's clock, default monotonic)."""
    return scheduler_pb2.Rollout(
        spec=spec_to_proto(rollout.spec),
        state=_STATE_TO_PROTO[rollout.state],
        step=rollout.step,
        weight=rollout.weight,
        step_elapsed_seconds=rollout.step_elapsed(time.monotonic() if now is None else now),
        reason=rollout.reason,
        stats=[stats_to_proto(s) for s in rollout.stats],
        started_unix_seconds=rollout.started_unix,
        ended_unix_seconds=rollout.ended_unix,
    )
