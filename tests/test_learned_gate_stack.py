"""The learned gate through the whole stack: gateway -> router (the default gate) -> scheduler ->
replicas of the three demo experts, real processes on free loopback ports.

The router serves the default gate of config/experts.yaml (`make gate` builds it; built here if
missing). A prompt from a held-out Milton work goes to the large expert when cost is free (the
gate predicts its higher quality) and to a small one when cost dominates, so the client's
`cost_weight` reaches the router and moves the operating point.
"""

from __future__ import annotations

import itertools
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from switchboard.cli.localstack import StackPlan
from switchboard.common.errors import error_details
from switchboard.common.tls import blocking_channel
from switchboard.experts import ensure_experts
from switchboard.routing.gate_cli import build_default_gate
from switchboard.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, router_pb2, router_pb2_grpc

from .conftest import RunningStack, start_stack_from_config

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "config" / "experts.yaml"
# Paradise Regained, Book IV (a held-out work of the demo experts).
MILTON = (
    "Perplexed and troubled at his bad success\n"
    "The Tempter stood, nor had what to reply,\n"
    "Discovered in his fraud, thrown from his hope\n"
)
SAMPLING = common_pb2.SamplingParams(max_tokens=8, temperature=0.0)


@pytest.fixture(scope="module")
def gate() -> Path:
    return build_default_gate(CONFIG, progress=lambda _: None)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, gate: Path) -> Iterator[RunningStack]:
    """The three demo experts, one replica each, behind a router that serves the default gate."""
    folders = ensure_experts()
    models = {name: str(folder) for name, folder in folders.items()}
    running = start_stack_from_config(
        tmp_path_factory.mktemp("gate-stack"), CONFIG, models, env={"ROUTER_GATE_PATH": str(gate)}
    )
    try:
        wait_until_the_router_sees_every_pool(running.stack.plan)
        yield running
    finally:
        running.stack.stop()


def wait_until_the_router_sees_every_pool(plan: StackPlan, timeout: float = 30.0) -> None:
    """The stack is up when every replica has registered; the router learns of them at its next
    look at the cluster (ROUTER_LOAD_POLL_SECONDS), so wait until a decision finds every expert
    eligible, then complete the probes so they hold no placement. The probes call the router as the
    gateway does, so they use the gateway's identity (only the gateway may Route)."""
    with blocking_channel(plan.router_addr, plan.identities.get("gateway"), "router") as channel:
        router = router_pb2_grpc.RouterStub(channel)
        deadline = time.monotonic() + timeout
        for attempt in itertools.count():
            request_id = f"probe-{attempt}"
            reply = router.Route(router_pb2.RouteRequest(request_id=request_id, prompt=MILTON), timeout=10)
            primary = reply.candidates[0]
            router.Feedback(
                router_pb2.FeedbackRequest(
                    request_id=request_id, expert=primary.expert, replica_id=primary.replica_id, success=True,
                    finish_reason=common_pb2.FINISH_REASON_LENGTH,
                ),
                timeout=10,
            )
            if all(score.eligible for score in reply.scores):
                return
            assert time.monotonic() < deadline, [(s.expert, s.ineligible_reason) for s in reply.scores]
            time.sleep(0.1)


@pytest.fixture(scope="module")
def gateway(stack: RunningStack) -> Iterator[gateway_pb2_grpc.GatewayStub]:
    with grpc.insecure_channel(stack.gateway_addr) as channel:
        yield gateway_pb2_grpc.GatewayStub(channel)


def served_by(gateway: gateway_pb2_grpc.GatewayStub, stack: RunningStack, **fields: object) -> str:
    request = gateway_pb2.GenerateRequest(prompt=MILTON, sampling=SAMPLING, **fields)
    messages = list(gateway.Generate(request, metadata=stack.auth(), timeout=60))
    assert messages[-1].finish_reason in (common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_EOS)
    assert "".join(m.text for m in messages).strip()
    return messages[0].model


def test_the_router_serves_the_learned_gate(stack: RunningStack, gateway: gateway_pb2_grpc.GatewayStub, gate: Path) -> None:
    served_by(gateway, stack)  # one decision, so the per-decision series exist
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.stack.plan.router_metrics}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    version = re.search(r'switchboard_router_gate_info\{kind="learned",version="(\w+)"\} 1\.0', text)
    assert version is not None, "the router is not serving a learned gate"
    assert (gate / "gate.json").read_text().count(version.group(1)) == 1
    assert "switchboard_router_gate_fallback 0.0" in text
    assert "switchboard_router_decision_seconds_count" in text


def test_cost_weight_moves_the_choice_between_quality_and_cost(
    stack: RunningStack, gateway: gateway_pb2_grpc.GatewayStub
) -> None:
    assert served_by(gateway, stack, cost_weight=0.0) == "scribe-large"  # quality first
    assert served_by(gateway, stack, cost_weight=100.0) in ("bard-small", "milton-small")  # cost first
    with pytest.raises(grpc.RpcError) as info:
        served_by(gateway, stack, cost_weight=-1.0)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(info.value)["field_violations"][0][0] == "cost_weight"
