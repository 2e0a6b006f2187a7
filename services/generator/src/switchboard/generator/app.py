"""Wiring of one generator process: engine + servicer on the shared gRPC server + scheduler registration.

Lifecycle: the engine starts, the server binds and goes SERVING, the replica registers. On
SIGTERM the shared server sets health NOT_SERVING and runs `_drain`: new Generate calls are
refused (UNAVAILABLE, so the gateway fails over), the replica deregisters, and in-flight streams
get the drain period to finish before the server cancels them (which frees their KV blocks).
A fatal engine error stops the server with exit code 1 so the orchestrator restarts the process.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from grpc_health.v1 import health_pb2
from switchboard.common.logging import get_logger
from switchboard.common.service import GrpcService
from switchboard.generator import metrics
from switchboard.generator.config import (
    GeneratorSettings,
    default_advertise_addr,
    default_replica_id,
    load_cost_profile,
)
from switchboard.generator.engine import EngineConfig
from switchboard.generator.registration import Registrar
from switchboard.generator.revision import replica_revision
from switchboard.generator.servicer import FaultInjection, GeneratorServicer, ReplicaIdentity
from switchboard.v1 import generator_pb2, generator_pb2_grpc, scheduler_pb2

if TYPE_CHECKING:
    from switchboard.generator.engine import Engine

# Who may call the generator when it runs mutual TLS (certificate role -> methods).
IDENTITY_POLICY = {
    "/switchboard.v1.Generator/Generate": frozenset({"gateway", "operator"}),
    "/switchboard.v1.Generator/Info": frozenset({"gateway", "router", "scheduler", "operator"}),
    # The scheduler's quality probe of a rollout scores fixed texts on each revision.
    "/switchboard.v1.Generator/Score": frozenset({"scheduler", "operator"}),
}
log = get_logger(__name__)

SERVICE_NAME = generator_pb2.DESCRIPTOR.services_by_name["Generator"].full_name
ENGINE_FAILURE_EXIT_CODE = 1


def engine_config(settings: GeneratorSettings, model_identity: str | None = None) -> EngineConfig:
    """The engine sizing the settings ask for; `model_identity` seeds its prefix-block hashes."""
    return EngineConfig(
        model_identity=model_identity,
        block_size=settings.block_size,
        kv_cache_bytes=settings.kv_cache_mb * (1 << 20) if settings.kv_cache_mb else None,
        max_num_seqs=settings.max_num_seqs,
        max_waiting=settings.max_waiting,
        max_tokens_per_step=settings.max_tokens_per_step,
        enable_prefix_caching=settings.prefix_caching,
    )


class GeneratorApp:
    """One generator replica around an engine; `await run()` serves until drained and returns the exit code."""

    def __init__(self, settings: GeneratorSettings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.revision = replica_revision(settings.revision, settings.model)
        self.identity = ReplicaIdentity(
            replica_id=settings.replica_id,
            expert=settings.expert or engine.info.model_name.rstrip("/").rsplit("/", 1)[-1],
            revision=self.revision,
        )
        self.servicer = GeneratorServicer(
            engine,
            self.identity,
            settings.default_max_tokens,
            on_engine_failure=self._engine_failed,
            faults=FaultInjection(settings.fault_error_ratio, settings.fault_first_token_delay_seconds),
        )
        self.service = GrpcService("generator", settings.server, identity_policy=IDENTITY_POLICY)
        generator_pb2_grpc.add_GeneratorServicer_to_server(self.servicer, self.service.server)
        self.service.on_drain(self._drain)
        self.registrar: Registrar | None = None
        self.address = ""
        # Set once the port is bound and the replica id and address are known.
        self.ready = asyncio.Event()
        self._health_tasks: set[asyncio.Task[None]] = set()
        metrics.bind_engine_gauges(engine.load)
        profile = load_cost_profile(settings.cost_profile)
        self.cost_model = profile[0] if profile is not None else None
        if profile is not None and profile[1] and profile[1] != engine.info.model_name:
            log.warning(
                "the cost profile was measured on another model; the scheduler's latency predictions may be off",
                profile=str(settings.cost_profile),
                profiled_model=profile[1],
                model=engine.info.model_name,
            )

    def _engine_failed(self, error: BaseException) -> None:
        log.error("engine failed; stopping so the replica is restarted", error=repr(error))
        self.service.stop(exit_code=ENGINE_FAILURE_EXIT_CODE)

    def announce(self) -> scheduler_pb2.RegisterRequest:
        """What this replica tells the scheduler about itself: identity, model, how its prefix cache
        hashes blocks (block size, chain seed), its tokenizer's fingerprint, the bound on its waiting
        queue and, with a cost profile, its step-cost model."""
        info = self.engine.info
        cost = self.cost_model
        return scheduler_pb2.RegisterRequest(
            replica_id=self.identity.replica_id,
            expert=self.identity.expert,
            address=self.address,
            device=info.device,
            model_name=info.model_name,
            max_model_len=info.max_model_len,
            kv_block_size=info.block_size,
            kv_hash_seed=self.engine.hash_seed,
            tokenizer_fingerprint=self.servicer.tokenizer_fingerprint,
            max_waiting=self.engine.config.max_waiting,
            revision=self.revision,
            cost_model=None
            if cost is None
            else scheduler_pb2.StepCostModel(
                base_ms=cost.base_ms,
                prefill_token_ms=cost.prefill_token_ms,
                decode_seq_ms=cost.decode_seq_ms,
                context_token_ms=cost.context_token_ms,
            ),
        )

    def _outcomes(self) -> tuple[int, int]:
        outcomes = self.servicer.outcomes
        return outcomes.ended, outcomes.failed

    async def _drain(self) -> None:
        self.servicer.draining = True
        if self.registrar is not None:
            await self.registrar.drain()

    def _engine_health(self, healthy: bool) -> None:
        """A remote engine's health changed: the replica's gRPC health follows it (not while draining)."""
        if self.servicer.draining:
            return
        status = (
            health_pb2.HealthCheckResponse.SERVING if healthy else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        task = asyncio.get_running_loop().create_task(self.service.health.set(SERVICE_NAME, status))
        self._health_tasks.add(task)
        task.add_done_callback(self._health_tasks.discard)

    async def run(self, handle_signals: bool = True) -> int:
        """Start the engine, serve, register; on stop drain, then stop the engine."""
        if hasattr(self.engine, "on_health"):
            self.engine.on_health = self._engine_health
        await self.engine.start()
        serving = asyncio.create_task(self.service.run([SERVICE_NAME], handle_signals=handle_signals))
        started = asyncio.create_task(self.service.started.wait())
        try:
            await asyncio.wait({serving, started}, return_when=asyncio.FIRST_COMPLETED)
            if started.done():
                port = self.service.port
                self.identity.replica_id = self.settings.replica_id or default_replica_id(port)
                self.address = self.settings.advertise_addr or default_advertise_addr(
                    self.settings.server.host, port
                )
                info = self.engine.info
                log.info(
                    "generator ready",
                    replica_id=self.identity.replica_id,
                    expert=self.identity.expert,
                    address=self.address,
                    model=info.model_name,
                    device=info.device,
                    dtype=info.dtype,
                    kv_blocks=info.kv_blocks_total,
                    max_model_len=info.max_model_len,
                    tokenizer_fingerprint=self.servicer.tokenizer_fingerprint[:12],
                    revision=self.revision,
                    cost_model=self.cost_model is not None,
                )
                if self.settings.scheduler_addr:
                    self.registrar = Registrar(
                        self.settings.scheduler_addr,
                        self.announce,
                        self.engine.load,
                        kv_events=self.engine.kv_events,
                        tls=self.settings.server.tls,
                        outcomes=self._outcomes,
                    )
                    self.registrar.start()
                if getattr(self.engine, "healthy", True) is False:
                    self._engine_health(False)
                self.ready.set()
            await serving
        finally:
            started.cancel()
            if self.registrar is not None:
                await self.registrar.close()
            await self.engine.stop()
        if self.engine.failed is not None:
            return self.service.exit_code or ENGINE_FAILURE_EXIT_CODE
        return self.service.exit_code
