"""The Router RPCs over real channels, against a real in-process scheduler."""

from __future__ import annotations

import asyncio
import json
import random

import grpc
import pytest
from prometheus_client import REGISTRY
from switchboard.common.errors import error_details
from switchboard.router.artifact import write_artifact
from switchboard.v1 import common_pb2, router_pb2, scheduler_pb2

from .conftest import Stack, running_stack
from .gate_fixtures import prompt, trained_gate

BARD_PROMPT = "Enter Hamlet. My lord, the king doth wake tonight; Romeo and Juliet, thou and thee"


async def register(
    stack: Stack, replica_id: str, expert: str, port: int, running: int = 0, waiting: int = 0, max_model_len: int = 512
) -> None:
    await stack.scheduler_stub.Register(
        scheduler_pb2.RegisterRequest(
            replica_id=replica_id,
            expert=expert,
            address=f"127.0.0.1:{port}",
            device="cpu",
            model_name=expert,
            max_model_len=max_model_len,
            load=scheduler_pb2.ReplicaLoad(running=running, waiting=waiting, kv_blocks_total=100),
        )
    )


def route(prompt: str = BARD_PROMPT, **fields: object) -> router_pb2.RouteRequest:
    fields.setdefault("request_id", "req-1")
    return router_pb2.RouteRequest(prompt=prompt, sampling=common_pb2.SamplingParams(max_tokens=8), **fields)


async def expect(call: object, code: grpc.StatusCode) -> dict:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    assert info.value.code() == code, info.value.details()
    return error_details(info.value)


async def test_route_orders_primary_replicas_then_next_expert(stack: Stack) -> None:
    await register(stack, "bard-busy", "bard-small", 50061, running=5)
    await register(stack, "bard-idle", "bard-small", 50062, running=0)
    await register(stack, "milton-1", "milton-small", 50063)
    reply = await stack.router.Route(route())
    assert [c.replica_id for c in reply.candidates] == ["bard-idle", "bard-busy", "milton-1"]
    assert reply.candidates[0].address == "127.0.0.1:50062"
    assert [s.expert for s in reply.scores] == ["bard-small", "milton-small", "scribe-large"]
    assert sum(s.score for s in reply.scores) == pytest.approx(1.0)
    assert max(reply.scores, key=lambda s: s.score).expert == "bard-small"
    assert next(s for s in reply.scores if s.expert == "bard-small").selected
    # The primary is the replica the scheduler counts the request on.
    cluster = await stack.scheduler_stub.GetCluster(scheduler_pb2.GetClusterRequest())
    inflight = {r.replica_id: r.inflight for r in cluster.replicas}
    assert inflight == {"bard-idle": 1, "bard-busy": 0, "milton-1": 0}


async def test_route_falls_back_to_another_expert_and_honours_exclusions(stack: Stack) -> None:
    await register(stack, "bard-1", "bard-small", 50061)
    await register(stack, "scribe-1", "scribe-large", 50064)
    reply = await stack.router.Route(route(exclude_replica_ids=["bard-1"]))
    assert [c.replica_id for c in reply.candidates] == ["scribe-1"]


async def test_pinned_expert_gets_only_its_replicas(stack: Stack) -> None:
    await register(stack, "bard-1", "bard-small", 50061)
    await register(stack, "milton-1", "milton-small", 50063)
    reply = await stack.router.Route(route(expert="milton-small"))
    assert [c.expert for c in reply.candidates] == ["milton-small"]
    assert [s.expert for s in reply.scores if s.selected] == ["milton-small"]


async def test_a_prompt_over_the_routers_limit_is_refused_before_any_work(stack: Stack) -> None:
    details = await expect(stack.router.Route(route(prompt="b" * 200_001)), grpc.StatusCode.INVALID_ARGUMENT)
    assert details["field_violations"][0][0] == "prompt" and "at most 200000 characters" in details["message"]


async def test_allowed_experts_restrict_the_candidates(stack: Stack) -> None:
    await register(stack, "bard-1", "bard-small", 50061)
    await register(stack, "milton-1", "milton-small", 50063)
    reply = await stack.router.Route(route(allowed_experts=["milton-small"], priority=common_pb2.PRIORITY_HIGH))
    assert {c.expert for c in reply.candidates} == {"milton-small"}
    # Only experts outside the tenant's scopes: PERMISSION_DENIED, not a retryable UNAVAILABLE.
    details = await expect(stack.router.Route(route(allowed_experts=["gpt-9"])), grpc.StatusCode.PERMISSION_DENIED)
    assert details["reason"] == "NO_ALLOWED_EXPERT"
    details = await expect(stack.router.Route(route(allowed_experts=["x"] * 65)), grpc.StatusCode.INVALID_ARGUMENT)
    assert details["field_violations"][0][0] == "allowed_experts"


async def test_alternates_are_capped() -> None:
    async with running_stack(max_alternates=0) as stack:
        await register(stack, "bard-1", "bard-small", 50061)
        await register(stack, "bard-2", "bard-small", 50062)
        reply = await stack.router.Route(route())
        assert len(reply.candidates) == 1


async def test_route_errors(stack: Stack) -> None:
    details = await expect(stack.router.Route(route(prompt="")), grpc.StatusCode.INVALID_ARGUMENT)
    assert details["field_violations"][0][0] == "prompt"
    details = await expect(stack.router.Route(route(expert="gpt-9")), grpc.StatusCode.NOT_FOUND)
    assert "gpt-9" in details["message"] and "bard-small" in details["message"]
    details = await expect(stack.router.Route(route()), grpc.StatusCode.UNAVAILABLE)
    assert details["retry_after"] == pytest.approx(1.0)
    assert details["reason"] == "NO_HEALTHY_REPLICA"
    await register(stack, "bard-1", "bard-small", 50061)
    await expect(stack.router.Route(route(expert="milton-small")), grpc.StatusCode.UNAVAILABLE)


async def test_scheduler_down_is_unavailable_not_a_hang() -> None:
    async with running_stack(scheduler_alive=False) as stack:
        details = await expect(stack.router.Route(route(), timeout=10), grpc.StatusCode.UNAVAILABLE)
        assert details["reason"] == "SCHEDULER_UNAVAILABLE"
        await expect(stack.router.ListExperts(router_pb2.ListExpertsRequest(), timeout=10), grpc.StatusCode.UNAVAILABLE)


async def test_list_experts_counts_ready_replicas(stack: Stack) -> None:
    await register(stack, "bard-1", "bard-small", 50061)
    await register(stack, "bard-2", "bard-small", 50062)
    reply = await stack.router.ListExperts(router_pb2.ListExpertsRequest())
    counts = {e.name: e.ready_replicas for e in reply.experts}
    assert counts == {"bard-small": 2, "milton-small": 0, "scribe-large": 0}
    scribe = next(e for e in reply.experts if e.name == "scribe-large")
    assert scribe.relative_cost == pytest.approx(4.0) and "Shakespeare" in scribe.description


async def test_feedback_completes_the_placement(stack: Stack) -> None:
    await register(stack, "bard-1", "bard-small", 50061)
    await stack.router.Route(route())
    cluster = await stack.scheduler_stub.GetCluster(scheduler_pb2.GetClusterRequest())
    assert cluster.replicas[0].inflight == 1
    await stack.router.Feedback(
        router_pb2.FeedbackRequest(
            request_id="req-1",
            expert="bard-small",
            replica_id="bard-1",
            success=True,
            finish_reason=common_pb2.FINISH_REASON_LENGTH,
            usage=common_pb2.Usage(prompt_tokens=5, completion_tokens=8),
            time_to_first_token_seconds=0.05,
            latency_seconds=0.3,
        )
    )
    cluster = await stack.scheduler_stub.GetCluster(scheduler_pb2.GetClusterRequest())
    assert cluster.replicas[0].inflight == 0
    details = await expect(
        stack.router.Feedback(router_pb2.FeedbackRequest(expert="bard-small")), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert details["field_violations"][0][0] == "request_id"
    await expect(
        stack.router.Feedback(router_pb2.FeedbackRequest(request_id="x", expert="nope")), grpc.StatusCode.NOT_FOUND
    )


def place_calls() -> float:
    """Place RPCs the scheduler has answered in this process (its per-RPC metric)."""
    return sum(
        sample.value
        for metric in REGISTRY.collect()
        if metric.name == "switchboard_rpc_requests"
        for sample in metric.samples
        if sample.name.endswith("_total") and sample.labels.get("method") == "Place" and sample.labels.get("service") == "scheduler"
    )


async def test_one_scheduler_call_per_request_whatever_the_candidates(stack: Stack) -> None:
    await register(stack, "bard-1", "bard-small", 50061)
    await register(stack, "milton-1", "milton-small", 50063)
    await register(stack, "scribe-1", "scribe-large", 50064)
    before = place_calls()
    for i in range(5):
        reply = await stack.router.Route(
            router_pb2.RouteRequest(request_id=f"count-{i}", prompt=BARD_PROMPT, sampling=common_pb2.SamplingParams(max_tokens=8))
        )
        assert len(reply.candidates) == 3  # candidates of three experts from one call
    assert place_calls() - before == 5
    cluster = await stack.scheduler_stub.GetCluster(scheduler_pb2.GetClusterRequest())
    assert {r.replica_id: r.inflight for r in cluster.replicas} == {"bard-1": 5, "milton-1": 0, "scribe-1": 0}


async def test_response_explains_the_decision(stack: Stack) -> None:
    await register(stack, "bard-1", "bard-small", 50061)
    reply = await stack.router.Route(route())
    assert reply.gate_kind == "ngram" and reply.gate_version == ""
    assert reply.k >= 1 and reply.cost_weight == 0.0 and reply.prompt_tokens > 0
    bard = next(s for s in reply.scores if s.expert == "bard-small")
    assert bard.eligible and bard.bias == 0.0 and bard.utility == pytest.approx(bard.quality)
    reply = await stack.router.Route(route(cost_weight=0.25))
    scribe = next(s for s in reply.scores if s.expert == "scribe-large")
    assert reply.cost_weight == 0.25 and scribe.utility == pytest.approx(scribe.quality - 0.25 * 4.0)


async def test_cost_weight_out_of_range_names_the_field(stack: Stack) -> None:
    details = await expect(stack.router.Route(route(cost_weight=-1.0)), grpc.StatusCode.INVALID_ARGUMENT)
    assert details["field_violations"][0][0] == "cost_weight"


async def test_a_saturated_pool_sheds_traffic_and_gets_it_back() -> None:
    async with running_stack(load_poll_seconds=0.05, load_bias_step=0.2) as stack:
        await register(stack, "bard-1", "bard-small", 50061, waiting=30)
        await register(stack, "milton-1", "milton-small", 50063)
        shed = None
        for _ in range(100):
            reply = await stack.router.Route(route())
            if reply.candidates[0].expert != "bard-small":
                shed = reply
                break
            await asyncio.sleep(0.05)
        assert shed is not None, "the saturated expert kept the traffic"
        assert next(s for s in shed.scores if s.expert == "bard-small").bias < 0
        await stack.scheduler_stub.ReportLoad(
            scheduler_pb2.ReportLoadRequest(replica_id="bard-1", load=scheduler_pb2.ReplicaLoad(kv_blocks_total=100))
        )
        for _ in range(200):
            reply = await stack.router.Route(route())
            if reply.candidates[0].expert == "bard-small":
                break
            await asyncio.sleep(0.05)
        assert reply.candidates[0].expert == "bard-small"


async def test_a_replica_too_short_for_the_request_is_never_a_candidate(stack: Stack) -> None:
    await register(stack, "bard-short", "bard-small", 50061, max_model_len=16)
    await register(stack, "milton-1", "milton-small", 50063, max_model_len=512)
    reply = await stack.router.Route(route())  # a 20-odd token prompt plus 8 tokens does not fit in 16
    assert [c.replica_id for c in reply.candidates] == ["milton-1"]


@pytest.fixture(scope="module")
def synthetic_gate(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, object]:
    """A gate trained for sailor/soldier/scholar, and an experts config that declares them."""
    tmp = tmp_path_factory.mktemp("router-gate")
    write_artifact(trained_gate(tmp), tmp / "gate")
    config = tmp / "experts.yaml"
    config.write_text(
        "experts:\n"
        + "".join(
            f"  - name: {name}\n    description: {name}\n    model: {name}\n    relative_cost: {cost}\n"
            for name, cost in (("sailor", 1.0), ("soldier", 1.0), ("scholar", 4.0))
        )
    )
    return tmp / "gate", config


async def test_learned_gate_serves_routes_by_content_and_learns_from_feedback(synthetic_gate) -> None:
    gate, config = synthetic_gate
    async with running_stack(experts_config=config, gate_path=gate, load_poll_seconds=0.05) as stack:
        for i, name in enumerate(("sailor", "soldier", "scholar")):
            await register(stack, f"{name}-1", name, 50061 + i)
        await asyncio.sleep(0.15)
        rng = random.Random(3)
        sea, war = prompt(rng, "sea", 40), prompt(rng, "war", 40)  # prompts like the gate's training data
        reply = await stack.router.Route(route(prompt=sea, cost_weight=0.1))
        assert reply.gate_kind == "learned" and len(reply.gate_version) == 16
        assert reply.candidates[0].expert == "sailor"
        reply = await stack.router.Route(route(prompt=war, cost_weight=0.1))
        assert reply.candidates[0].expert == "soldier"
        reply = await stack.router.Route(route(prompt=war, cost_weight=0.0))
        assert reply.candidates[0].expert == "scholar"  # quality first when cost is free
        await stack.router.Feedback(
            router_pb2.FeedbackRequest(
                request_id="req-1", expert="scholar", replica_id="scholar-1", success=False,
                finish_reason=common_pb2.FINISH_REASON_ERROR, time_to_first_token_seconds=0.01,
            )
        )
        reply = await stack.router.Route(route(prompt=war, cost_weight=0.0))
        scholar = next(s for s in reply.scores if s.expert == "scholar")
        assert scholar.correction < 0  # a failure moved the online head
        # A request never served (a cached answer, a refusal after placement) is released, not learned from.
        reply = await stack.router.Route(route(prompt=war, cost_weight=0.0, request_id="req-2"))
        before = next(s for s in reply.scores if s.expert == "scholar").correction
        await stack.router.Feedback(
            router_pb2.FeedbackRequest(
                request_id="req-2", expert="scholar", replica_id="scholar-1", success=False,
                finish_reason=common_pb2.FINISH_REASON_CANCELLED,
            )
        )
        reply = await stack.router.Route(route(prompt=war, cost_weight=0.0, request_id="req-3"))
        assert next(s for s in reply.scores if s.expert == "scholar").correction == before


@pytest.mark.parametrize("damage", ["other-experts", "corrupt"])
async def test_an_unusable_gate_stops_the_router_at_start(synthetic_gate, tmp_path, damage: str) -> None:
    from switchboard.common.service import GrpcService
    from switchboard.common.settings import ServerSettings
    from switchboard.router.config import RouterSettings
    from switchboard.router.server import serve

    from .conftest import EXPERTS_CONFIG

    gate, config = synthetic_gate
    if damage == "corrupt":
        import shutil

        shutil.copytree(gate, tmp_path / "gate")
        (tmp_path / "gate" / "gate.safetensors").write_bytes(b"garbage")
        gate, experts_config = tmp_path / "gate", config
    else:
        experts_config = EXPERTS_CONFIG  # bard/milton/scribe: not what the gate was trained for
    settings = RouterSettings(
        server=ServerSettings(port=0, metrics_port=0), experts_config=experts_config, gate_path=gate
    )
    assert await serve(settings, GrpcService("router", settings.server), handle_signals=False) == 2


async def test_online_head_survives_a_restart_and_outcomes_are_logged(synthetic_gate, tmp_path) -> None:
    gate, config = synthetic_gate
    state, outcomes = tmp_path / "online.json", tmp_path / "outcomes.jsonl"
    settings = {"experts_config": config, "gate_path": gate, "online_state_path": state, "outcomes_path": outcomes}
    war = prompt(random.Random(5), "war", 40)
    async with running_stack(**settings) as stack:
        await register(stack, "scholar-1", "scholar", 50063)
        await stack.router.Route(route(prompt=war, cost_weight=0.0))
        await stack.router.Feedback(
            router_pb2.FeedbackRequest(
                request_id="req-1", expert="scholar", replica_id="scholar-1", success=False,
                finish_reason=common_pb2.FINISH_REASON_ERROR,
            )
        )
        before = next(s for s in (await stack.router.Route(route(prompt=war))).scores if s.expert == "scholar").correction
    assert json.loads(state.read_text())["updates"] == 1  # written at shutdown
    row = json.loads(outcomes.read_text().splitlines()[0])
    assert row["outcome"]["success"] is False and row["penalty"] == 1.0 and "prompt" not in row
    async with running_stack(**settings) as stack:
        await register(stack, "scholar-1", "scholar", 50063)
        after = next(s for s in (await stack.router.Route(route(prompt=war))).scores if s.expert == "scholar").correction
    assert after == pytest.approx(before) and after < 0


async def test_a_request_longer_than_every_expert_is_invalid_not_retryable(synthetic_gate) -> None:
    gate, config = synthetic_gate
    async with running_stack(experts_config=config, gate_path=gate, load_poll_seconds=0.05) as stack:
        for i, name in enumerate(("sailor", "soldier", "scholar")):
            await register(stack, f"{name}-1", name, 50061 + i, max_model_len=64)
        await asyncio.sleep(0.2)  # the router's look at the pools
        long_prompt = prompt(random.Random(9), "sea", 50)
        details = await expect(
            stack.router.Route(
                router_pb2.RouteRequest(request_id="long", prompt=long_prompt, sampling=common_pb2.SamplingParams(max_tokens=60))
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert details["field_violations"][0][0] == "prompt"
        assert "longest context any expert serves is 64" in details["message"]
        reply = await stack.router.Route(route(prompt="ship sail"))
        assert reply.candidates  # a short one still fits


async def test_a_placement_on_a_pool_the_view_missed_refreshes_the_view_at_once() -> None:
    async with running_stack(load_poll_seconds=30.0) as stack:  # no periodic look during the test
        await asyncio.sleep(0.2)  # the router's first look: an empty cluster
        await register(stack, "bard-1", "bard-small", 50061)
        await register(stack, "milton-1", "milton-small", 50063)
        first = await stack.router.Route(route())
        assert next(s for s in first.scores if s.expert == "bard-small").ineligible_reason == "no ready replica"  # stale
        assert first.candidates  # the scheduler, which has the truth, still placed it
        for _ in range(50):
            reply = await stack.router.Route(route())
            if not next(s for s in reply.scores if s.expert == "bard-small").ineligible_reason:
                break
            await asyncio.sleep(0.02)
        bard = next(s for s in reply.scores if s.expert == "bard-small")
        assert bard.eligible and not bard.ineligible_reason  # looked again at once, not after 30 s


async def test_a_route_right_after_a_scheduler_restart_waits_for_the_channel_instead_of_failing() -> None:
    """After a scheduler restart the router's channel may still be backing off from the refused
    connections when the new scheduler already serves: the Route still succeeds (the placer tries
    once more, waiting for the channel within the same deadline), instead of SCHEDULER_UNAVAILABLE."""
    from switchboard.common.service import wait_started
    from switchboard.common.settings import ServerSettings
    from switchboard.scheduler.app import SchedulerApp
    from switchboard.scheduler.config import SchedulerSettings
    from switchboard.v1 import scheduler_pb2_grpc

    async with running_stack(scheduler_timeout_seconds=2.0) as stack:  # the default deadline
        port = stack.scheduler.service.port
        stack.scheduler.service.stop()
        await asyncio.sleep(0.5)
        # Routes while it is down fail (and put the router's channel into reconnect backoff).
        for _ in range(3):
            details = await expect(stack.router.Route(route(), timeout=10), grpc.StatusCode.UNAVAILABLE)
            assert details["reason"] == "SCHEDULER_UNAVAILABLE"
        restarted = SchedulerApp(
            SchedulerSettings(server=ServerSettings(port=port, metrics_port=0, drain_seconds=0.2)),
            ["bard-small", "milton-small", "scribe-large"],
        )
        task = asyncio.create_task(restarted.run(handle_signals=False))
        await wait_started(task, restarted.service.started)
        assert restarted.service.port == port, (restarted.service.port, port)
        # A subchannel of its own: grpc shares subchannels between a process's channels, and this
        # registration must not connect the router's (still backing off) for it.
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
        try:
            await scheduler_pb2_grpc.SchedulerStub(channel).Register(
                scheduler_pb2.RegisterRequest(
                    replica_id="bard-1", expert="bard-small", address="127.0.0.1:50061", device="cpu",
                    model_name="bard-small", max_model_len=512, load=scheduler_pb2.ReplicaLoad(kv_blocks_total=100),
                ),
                timeout=5,
            )
            reply = await stack.router.Route(route(request_id="after-restart"), timeout=10)
            assert reply.candidates[0].replica_id == "bard-1"
        finally:
            await channel.close()
            restarted.service.stop()
            await task
