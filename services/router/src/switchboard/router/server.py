"""The router's `serve()`: build the gate, the experts' tokenizers and the core from the settings and
run the gRPC service."""

from __future__ import annotations

import asyncio
import contextlib
import random

import torch
from switchboard.common.channels import open_channel
from switchboard.common.experts_config import ExpertsConfigError, ExpertSpec, load_experts_config
from switchboard.common.logging import get_logger
from switchboard.common.service import GrpcService
from switchboard.router import metrics
from switchboard.router.artifact import TOKENIZER_FILE, GateArtifactError, check_expert_set, load_artifact
from switchboard.router.config import RouterSettings, parse_model_folders, parse_tenant_cost_weights
from switchboard.router.core import CoreSettings, RouterCore
from switchboard.router.decision_log import OutcomeSink
from switchboard.router.gate import Gate, NgramGate
from switchboard.router.load_bias import LoadBias, LoadBiasConfig
from switchboard.router.online import OnlineHead
from switchboard.router.scheduler_client import ClusterWatcher, SchedulerPlacer
from switchboard.router.selector import Selector, SelectorConfig
from switchboard.router.servicer import RouterServicer
from switchboard.router.tokenization import PromptTokenizers, load_prompt_tokenizers
from switchboard.v1 import router_pb2_grpc, scheduler_pb2_grpc

# Who may call the router when it runs mutual TLS (certificate role -> methods).
IDENTITY_POLICY = {
    "/switchboard.v1.Router/Route": frozenset({"gateway"}),
    "/switchboard.v1.Router/Feedback": frozenset({"gateway"}),
    "/switchboard.v1.Router/ListExperts": frozenset({"gateway", "operator"}),
}
log = get_logger(__name__)


def build_gate(settings: RouterSettings, experts: list[ExpertSpec]) -> tuple[Gate, float]:
    """The configured gate and its default cost weight; raises GateArtifactError for a bad artifact."""
    names = [spec.name for spec in experts]
    if settings.gate_path is None:
        gate = NgramGate(
            {spec.name: spec.description or spec.name for spec in experts}, temperature=settings.gate_temperature
        )
        log.warning("no gate artifact configured (ROUTER_GATE_PATH): routing with the built-in n-gram rule")
        metrics.GATE_FALLBACK.set(1)
        metrics.GATE_INFO.labels("ngram", "").set(1)
        return gate, 0.0
    artifact = load_artifact(settings.gate_path)
    check_expert_set(artifact, names)
    metrics.GATE_FALLBACK.set(0)
    metrics.GATE_INFO.labels("learned", artifact.version).set(1)
    log.info(
        "gate loaded",
        path=str(settings.gate_path),
        version=artifact.version,
        experts=artifact.expert_names,
        default_cost_weight=artifact.default_cost_weight,
        metrics=artifact.metrics.get("test", {}),
    )
    return artifact.gate(), artifact.default_cost_weight


def build_tokenizers(settings: RouterSettings, experts: list[ExpertSpec]) -> PromptTokenizers:
    """Every expert's tokenizer, loaded once (`tokenization.py`); says once in the log (and in
    `switchboard_router_expert_tokenizer`) which experts have none, so their replicas tokenize."""
    fallback = None
    if settings.gate_path is not None:
        # The gate's features use the cheapest expert's tokenizer, and the artifact carries a copy.
        cheapest = min(experts, key=lambda spec: spec.relative_cost)
        fallback = (cheapest.name, settings.gate_path / TOKENIZER_FILE)
    loaded = load_prompt_tokenizers(experts, fallback, folders=parse_model_folders(settings.model_folders))
    for spec in experts:
        metrics.EXPERT_TOKENIZER.labels(spec.name).set(0 if spec.name in loaded.missing else 1)
    if loaded.experts:
        log.info(
            "prompt tokenizers loaded",
            experts={name: fingerprint[:12] for name, fingerprint in loaded.experts.items()},
            distinct=len(set(loaded.experts.values())),
        )
    if loaded.missing:
        log.warning(
            "no tokenizer for some experts: their prompts go without token ids and their replicas tokenize them",
            missing=loaded.missing,
        )
    return loaded


def build_core(
    settings: RouterSettings,
    experts: list[ExpertSpec],
    placer: SchedulerPlacer,
    rng: random.Random | None = None,
    tokenizers: PromptTokenizers | None = None,
) -> RouterCore:
    """Gate, selector, load bias, online head and decision log wired into one core (with
    `tokenizers`, it tokenizes prompts upstream)."""
    gate, default_cost_weight = build_gate(settings, experts)
    names = [spec.name for spec in experts]
    # Each expert's TTFT objective from the experts config, else the router's default.
    slo = {
        spec.name: spec.slo.ttft_seconds if spec.slo and spec.slo.ttft_seconds else settings.ttft_slo_seconds
        for spec in experts
    }
    online = None
    net = getattr(gate, "net", None)  # only the learned gate has a hidden layer to learn on
    if settings.online_learning and net is not None:
        online = OnlineHead(gate.experts, net.hidden_dim, gate.version)
        if settings.online_state_path is not None:
            why = online.load(settings.online_state_path)
            log.info("online head", restored=why is None, why=why, updates=online.updates)
    return RouterCore(
        names,
        gate,
        Selector(
            names,
            {spec.name: spec.relative_cost for spec in experts},
            SelectorConfig(
                cumulative_threshold=settings.cumulative_threshold,
                k_max=settings.max_k,
                exploration=settings.exploration if online is not None else 0.0,
            ),
        ),
        placer,
        CoreSettings(
            default_cost_weight=settings.cost_weight if settings.cost_weight is not None else default_cost_weight,
            tenant_cost_weights=parse_tenant_cost_weights(settings.tenant_cost_weights),
            max_alternates=settings.max_alternates,
            ttft_slo_seconds=slo,
            pools_stale_seconds=max(3.0, 4 * settings.load_poll_seconds),
        ),
        load_bias=LoadBias(
            names,
            LoadBiasConfig(
                step=settings.load_bias_step,
                max_penalty=settings.load_bias_max,
                waiting_per_replica=settings.saturation_waiting,
            ),
            ttft_slo_seconds=slo,
        ),
        online=online,
        online_snapshot=settings.online_state_path,
        sink=OutcomeSink(settings.outcomes_path) if settings.outcomes_path is not None else None,
        rng=rng,
        tokenizers=tokenizers,
    )


async def serve(settings: RouterSettings, service: GrpcService | None = None, handle_signals: bool = True) -> int:
    """Run the router until SIGTERM/SIGINT (or `service.stop()`); returns the process exit code.

    Tests pass their own `service` (to read its bound port) and handle_signals=False.
    """
    # The gate's matmuls are tiny: one thread avoids waking a pool for microseconds of work.
    torch.set_num_threads(1)
    try:
        experts = load_experts_config(settings.experts_config)
    except ExpertsConfigError as exc:
        log.error("bad experts config", error=str(exc))
        return 2
    channel = open_channel(settings.scheduler_addr, settings.server.tls, peer_role="scheduler")
    stub = scheduler_pb2_grpc.SchedulerStub(channel)
    placer = SchedulerPlacer(stub, settings.scheduler_timeout_seconds)
    try:
        core = build_core(settings, experts, placer, tokenizers=build_tokenizers(settings, experts))
    except GateArtifactError as exc:
        log.error("unusable gate artifact (ROUTER_GATE_PATH)", error=str(exc))
        await channel.close()
        return 2

    def on_pools(pools: dict) -> None:
        for name, bias in core.update_pools(pools).items():
            metrics.LOAD_BIAS.labels(name).set(bias)
        for name, pressure in core.load_bias.pressure.items():
            metrics.POOL_PRESSURE.labels(name).set(pressure)

    watcher = ClusterWatcher(
        stub, core.experts, on_pools, settings.load_poll_seconds, settings.scheduler_timeout_seconds
    )
    core.on_stale_view = watcher.poke
    service = service or GrpcService("router", settings.server, identity_policy=IDENTITY_POLICY)
    servicer = RouterServicer(experts, core, stub, settings)
    router_pb2_grpc.add_RouterServicer_to_server(servicer, service.server)
    log.info(
        "router configured",
        experts=[spec.name for spec in experts],
        scheduler=settings.scheduler_addr,
        gate=core.gate.kind,
        gate_version=core.gate.version,
        online_learning=core.online is not None,
    )
    watch_task = asyncio.create_task(watcher.run())
    try:
        await service.run(["switchboard.v1.Router"], handle_signals=handle_signals)
    finally:
        watch_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch_task
        if core.online is not None and settings.online_state_path is not None:
            core.online.save(settings.online_state_path)
            log.info("online head saved", path=str(settings.online_state_path), updates=core.online.updates)
        # Closed only after the drain, so in-flight Route calls can still reach the scheduler.
        await channel.close()
    return service.exit_code
