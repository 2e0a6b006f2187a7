"""`switchboard rollout`: start, inspect, pause, resume and abort model-revision rollouts.

A thin client of the scheduler's rollout RPCs (services/scheduler/README.md, "Rollouts"). It
talks to SCHEDULER_ADDR (or --scheduler) with the operator identity of SWITCHBOARD_TLS_* when set
(`switchboard up` prints where its operator certificate is), plaintext otherwise.

    switchboard rollout start bard-small --from v1 --to v2 --step 0.1:60 --step 0.5:60 --step 1:60 --wait
    switchboard rollout status bard-small
    switchboard rollout list
    switchboard rollout pause bard-small --reason "checking dashboards"
    switchboard rollout resume bard-small
    switchboard rollout abort bard-small --reason "bad answers"
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToDict
from switchboard.common.tls import TlsError, blocking_channel, load_tls_identity
from switchboard.v1 import scheduler_pb2, scheduler_pb2_grpc

DEFAULT_SCHEDULER = "127.0.0.1:50053"
RPC_TIMEOUT_SECONDS = 10.0
_ENDED = {
    scheduler_pb2.ROLLOUT_STATE_PROMOTED: 0,
    scheduler_pb2.ROLLOUT_STATE_ROLLED_BACK: 1,
    scheduler_pb2.ROLLOUT_STATE_ABORTED: 1,
}


def parse_step(text: str) -> scheduler_pb2.RolloutStep:
    """WEIGHT:SECONDS, e.g. 0.25:60."""
    weight, sep, seconds = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return scheduler_pb2.RolloutStep(weight=float(weight), duration_seconds=float(seconds))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a step is WEIGHT:SECONDS (e.g. 0.25:60), got {text!r}") from None


def describe(rollout: scheduler_pb2.Rollout) -> str:
    """One rollout for people: state, step, weight, reason and both revisions' figures."""
    spec = rollout.spec
    state = scheduler_pb2.RolloutState.Name(rollout.state).removeprefix("ROLLOUT_STATE_").lower()
    lines = [
        f"{spec.expert}: {spec.from_revision} -> {spec.to_revision} "
        f"({scheduler_pb2.RolloutStrategy.Name(spec.strategy).removeprefix('ROLLOUT_STRATEGY_').lower()})",
        f"  state {state}, step {rollout.step + 1}/{len(spec.steps)}, weight {rollout.weight:g}, "
        f"{rollout.step_elapsed_seconds:.0f} s in this step",
    ]
    if rollout.reason:
        lines.append(f"  reason: {rollout.reason}")
    for stats in rollout.stats:
        error_ratio = stats.failed / stats.requests if stats.requests else 0.0
        lines.append(
            f"  {stats.revision}: {stats.requests} requests, {stats.failed} failed ({error_ratio:.1%}), "
            f"TTFT p95 {stats.ttft_p95_seconds * 1000:.0f} ms, TPOT p95 {stats.tpot_p95_seconds * 1000:.1f} ms, "
            f"{stats.ready_replicas} ready"
        )
    return "\n".join(lines)


def _probe(path: str | None, max_nll_increase: float) -> scheduler_pb2.RolloutQualityProbe | None:
    """The quality probe from a text file (one text per non-empty line), or None."""
    if path is None:
        return None
    texts = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    return scheduler_pb2.RolloutQualityProbe(texts=texts, max_nll_increase=max_nll_increase)


def _stub(args: argparse.Namespace) -> tuple[grpc.Channel, scheduler_pb2_grpc.SchedulerStub]:
    channel = blocking_channel(args.scheduler, load_tls_identity(os.environ), "scheduler")
    return channel, scheduler_pb2_grpc.SchedulerStub(channel)


def _show(args: argparse.Namespace, rollout: scheduler_pb2.Rollout) -> None:
    if args.json:
        print(json.dumps(MessageToDict(rollout, preserving_proto_field_name=True), indent=2))
    else:
        print(describe(rollout), flush=True)


def run(args: argparse.Namespace) -> int:
    """Run one rollout subcommand; gRPC errors become one line on stderr and exit code 2."""
    try:
        channel, stub = _stub(args)
    except TlsError as error:
        print(f"switchboard rollout: {error}", file=sys.stderr)
        return 2
    try:
        with channel:
            return _dispatch(args, stub)
    except grpc.RpcError as error:
        print(f"switchboard rollout: {error.code().name}: {error.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 2
    except OSError as error:  # the probe file
        print(f"switchboard rollout: {error}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace, stub: scheduler_pb2_grpc.SchedulerStub) -> int:
    action = args.action
    if action == "list":
        reply = stub.ListRollouts(scheduler_pb2.ListRolloutsRequest(), timeout=RPC_TIMEOUT_SECONDS)
        if args.json:
            print(json.dumps(MessageToDict(reply, preserving_proto_field_name=True), indent=2))
        else:
            print("\n".join(describe(r) for r in reply.rollouts) or "no rollouts")
        return 0
    if action == "status":
        reply = stub.GetRollout(scheduler_pb2.GetRolloutRequest(expert=args.expert), timeout=RPC_TIMEOUT_SECONDS)
        _show(args, reply.rollout)
        return 0
    if action in ("pause", "resume", "abort"):
        method, message = {
            "pause": (stub.PauseRollout, scheduler_pb2.PauseRolloutRequest),
            "resume": (stub.ResumeRollout, scheduler_pb2.ResumeRolloutRequest),
            "abort": (stub.AbortRollout, scheduler_pb2.AbortRolloutRequest),
        }[action]
        _show(args, method(message(expert=args.expert, reason=args.reason), timeout=RPC_TIMEOUT_SECONDS).rollout)
        return 0
    spec = scheduler_pb2.RolloutSpec(
        expert=args.expert,
        from_revision=args.from_revision,
        to_revision=args.to_revision,
        strategy=scheduler_pb2.ROLLOUT_STRATEGY_BLUE_GREEN
        if args.strategy == "blue-green"
        else scheduler_pb2.ROLLOUT_STRATEGY_CANARY,
        steps=args.step or [],
        gates=scheduler_pb2.RolloutGates(
            max_error_ratio=args.max_error_ratio,
            max_ttft_p95_ratio=args.max_ttft_ratio,
            max_tpot_p95_ratio=args.max_tpot_ratio,
            min_requests=args.min_requests,
        ),
        quality_probe=_probe(args.probe_file, args.max_nll_increase),
        deploy=scheduler_pb2.RolloutDeploy(model=args.deploy_model or "", replicas=args.deploy_replicas or 1)
        if args.deploy_model is not None or args.deploy_replicas
        else None,
    )
    rollout = stub.StartRollout(scheduler_pb2.StartRolloutRequest(spec=spec), timeout=RPC_TIMEOUT_SECONDS).rollout
    _show(args, rollout)
    if not args.wait:
        return 0
    last = (rollout.state, rollout.step)
    while rollout.state not in _ENDED:
        time.sleep(args.poll_seconds)
        rollout = stub.GetRollout(
            scheduler_pb2.GetRolloutRequest(expert=args.expert), timeout=RPC_TIMEOUT_SECONDS
        ).rollout
        if (rollout.state, rollout.step) != last:
            last = (rollout.state, rollout.step)
            _show(args, rollout)
    return _ENDED[rollout.state]


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register `switchboard rollout`."""
    parser = subparsers.add_parser(
        "rollout", help="start, inspect, pause, resume and abort model-revision rollouts"
    )
    parser.add_argument(
        "--scheduler",
        default=os.environ.get("SCHEDULER_ADDR", DEFAULT_SCHEDULER),
        help=f"the scheduler's host:port (default: SCHEDULER_ADDR or {DEFAULT_SCHEDULER})",
    )
    parser.add_argument("--json", action="store_true", help="print the rollout as JSON")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    start = actions.add_parser("start", help="start a rollout of an expert to a new revision")
    start.add_argument("expert")
    start.add_argument("--from", dest="from_revision", required=True, help="the revision serving now")
    start.add_argument(
        "--to", dest="to_revision", required=True, help="the new revision (its replicas registered)"
    )
    start.add_argument("--strategy", choices=("canary", "blue-green"), default="canary")
    start.add_argument(
        "--step",
        type=parse_step,
        action="append",
        metavar="WEIGHT:SECONDS",
        help="a step (repeat; default canary 0.1:60 0.5:60 1:60, blue-green 1:60)",
    )
    start.add_argument(
        "--max-error-ratio",
        type=float,
        default=0.0,
        help="gate: the new revision's error ratio (default 0.05)",
    )
    start.add_argument(
        "--max-ttft-ratio",
        type=float,
        default=0.0,
        help="gate: TTFT p95 against the old revision's (default 1.5)",
    )
    start.add_argument(
        "--max-tpot-ratio",
        type=float,
        default=0.0,
        help="gate: TPOT p95 against the old revision's (default 1.5)",
    )
    start.add_argument(
        "--min-requests", type=int, default=0, help="requests per step before judging (default 20)"
    )
    start.add_argument(
        "--probe-file", help="quality probe: a text file, one text per line, scored by both revisions before traffic moves"
    )
    start.add_argument("--max-nll-increase", type=float, default=0.0, help="quality probe bound in nats (default 0.05)")
    start.add_argument(
        "--deploy-model",
        help="let the scheduler start the new revision's replicas from this model folder ('' for the pool's own); "
        "needs SCHEDULER_ROLLOUT_DEPLOYER on the scheduler",
    )
    start.add_argument("--deploy-replicas", type=int, default=0, help="how many replicas to deploy (default 1)")
    start.add_argument(
        "--wait",
        action="store_true",
        help="follow it until it ends: exit 0 promoted, 1 rolled back or aborted",
    )
    start.add_argument("--poll-seconds", type=float, default=1.0, help=argparse.SUPPRESS)
    for name, text in (
        ("status", "show an expert's rollout"),
        ("pause", "hold a rollout"),
        ("resume", "continue a paused rollout"),
        ("abort", "stop a rollout, all traffic back to the old revision"),
    ):
        sub = actions.add_parser(name, help=text)
        sub.add_argument("expert")
        if name != "status":
            sub.add_argument("--reason", default="", help="why (kept in the rollout and the log)")
    actions.add_parser("list", help="every expert's current or last rollout")
    parser.set_defaults(func=run)
