"""Wiring of the scheduler process: registry + policy + servicer on the shared gRPC server, plus the expiry sweep
and (opt-in, SCHEDULER_ALLOCATOR) the allocation controller."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Collection, Mapping

from switchboard.common.experts_config import ExpertSLO
from switchboard.common.logging import get_logger
from switchboard.common.service import GrpcService
from switchboard.scheduler.actuators import Actuator
from switchboard.scheduler.config import SchedulerSettings
from switchboard.scheduler.controller import ScalingController, controller_from_settings
from switchboard.scheduler.policies import PlacementPolicy, make_policy
from switchboard.scheduler.registry import ReplicaRegistry
from switchboard.scheduler.revisions import make_deployer
from switchboard.scheduler.servicer import SchedulerServicer
from switchboard.v1 import scheduler_pb2, scheduler_pb2_grpc

log = get_logger(__name__)

SERVICE_NAME = scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name


def sweep_interval(settings: SchedulerSettings) -> float:
    """How often to look for expired replicas: a quarter of the expiry, so one is dropped at most 25% late."""
    return min(settings.heartbeat_seconds, settings.expiry_seconds / 4)


# Who may call the scheduler when it runs mutual TLS (certificate role -> methods). A generator may
# also speak only for its own replica id (the servicer checks that).
IDENTITY_POLICY = {
    "/switchboard.v1.Scheduler/Register": frozenset({"generator"}),
    "/switchboard.v1.Scheduler/ReportLoad": frozenset({"generator"}),
    "/switchboard.v1.Scheduler/Deregister": frozenset({"generator"}),
    "/switchboard.v1.Scheduler/Place": frozenset({"router"}),
    "/switchboard.v1.Scheduler/Complete": frozenset({"router"}),
    "/switchboard.v1.Scheduler/GetCluster": frozenset({"router", "gateway", "operator"}),
    # Rollouts are an operator's (and the tools'): reading them is open to the gateway and router too.
    "/switchboard.v1.Scheduler/StartRollout": frozenset({"operator"}),
    "/switchboard.v1.Scheduler/GetRollout": frozenset({"router", "gateway", "operator"}),
    "/switchboard.v1.Scheduler/ListRollouts": frozenset({"router", "gateway", "operator"}),
    "/switchboard.v1.Scheduler/PauseRollout": frozenset({"operator"}),
    "/switchboard.v1.Scheduler/ResumeRollout": frozenset({"operator"}),
    "/switchboard.v1.Scheduler/AbortRollout": frozenset({"operator"}),
}


class SchedulerApp:
    """One scheduler: build it, `await run()` until drained; `service.port` is the bound port.

    The placement policy is `policy` when given, else the one the settings name
    (SCHEDULER_PLACEMENT_POLICY, seeded by SCHEDULER_PLACEMENT_SEED, tuned by the SCHEDULER_PREFIX_*
    and SCHEDULER_LATENCY_* settings; `slos`, the experts' objectives, also feed predicted-latency).
    """

    def __init__(
        self,
        settings: SchedulerSettings,
        experts: Collection[str],
        policy: PlacementPolicy | None = None,
        slos: Mapping[str, ExpertSLO | None] | None = None,
        actuator: Actuator | None = None,
    ) -> None:
        self.settings = settings
        self.registry = ReplicaRegistry(
            expiry_seconds=settings.expiry_seconds, placement_ttl_seconds=settings.placement_ttl_seconds
        )
        self.servicer = SchedulerServicer(
            self.registry,
            experts,
            policy
            or make_policy(
                settings.placement_policy,
                settings.placement_seed,
                slos=slos,
                options=settings.policy_options(),
            ),
            heartbeat_seconds=settings.heartbeat_seconds,
            retry_after_seconds=settings.retry_after_seconds,
            slos=slos,
            rollout_state_file=settings.rollout_state_file,
            tls=settings.server.tls,
            deployer=make_deployer(settings),
        )
        self.service = GrpcService("scheduler", settings.server, identity_policy=IDENTITY_POLICY)
        # Allocation across expert pools (SCHEDULER_ALLOCATOR; None when off); `actuator` replaces
        # the one SCHEDULER_ACTUATOR names (tests).
        self.controller: ScalingController | None = controller_from_settings(
            settings, self.registry, experts, actuator
        )
        scheduler_pb2_grpc.add_SchedulerServicer_to_server(self.servicer, self.service.server)

    async def run(self, handle_signals: bool = True) -> int:
        """Serve until SIGTERM/SIGINT or `service.stop()`, then drain; returns the exit code."""
        sweeper = asyncio.create_task(self.servicer.run_sweeper(sweep_interval(self.settings)))
        rollouts = asyncio.create_task(self.servicer.run_rollouts(self.settings.rollout_tick_seconds))
        allocating = asyncio.create_task(self.controller.run()) if self.controller is not None else None
        log.info(
            "scheduler starting",
            experts=sorted(self.servicer.experts),
            policy=self.servicer.policy.name,
            expiry_seconds=self.settings.expiry_seconds,
        )
        try:
            await self.service.run([SERVICE_NAME], handle_signals=handle_signals)
        finally:
            for task in (sweeper, rollouts, allocating):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            deployer = self.servicer.deployer
            if deployer is not None and hasattr(deployer, "close"):
                await asyncio.to_thread(deployer.close)  # the local one stops the processes it started
        return self.service.exit_code
