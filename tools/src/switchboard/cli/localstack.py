"""The local stack: scheduler, router, generators and gateway as processes on loopback.

`LocalStack` plans the environment of every service from the experts config
(one generator per replica of each expert), starts them in dependency order
with `ProcessGroup`, waits for grpc.health.v1 SERVING and for every generator
to be registered with the scheduler, and stops them all on exit. `switchboard
up` and the cross-service tests both use it, so the tests run the stack a
newcomer runs. It also writes the generator template that the scheduler's local
allocation actuator starts further generators from (`generator_template`).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import grpc
from switchboard.cli.processes import ProcessGroup, ServiceSpec, StartupError, free_port
from switchboard.common.experts_config import ExpertSpec, load_experts_config
from switchboard.common.pki import LocalCA, identity_env
from switchboard.common.tls import OPERATOR_ROLE, TlsIdentity, blocking_channel
from switchboard.scheduler.actuators.local import PER_REPLICA_ENV, GeneratorTemplate
from switchboard.v1 import scheduler_pb2, scheduler_pb2_grpc

# Default ports of `switchboard up` (the documented ones).
GATEWAY_PORT, ROUTER_PORT, SCHEDULER_PORT, FIRST_GENERATOR_PORT = 50051, 50052, 50053, 50061
GATEWAY_METRICS, ROUTER_METRICS, SCHEDULER_METRICS, FIRST_GENERATOR_METRICS = 9101, 9102, 9103, 9111
GATEWAY_HTTP_PORT = 8080  # the gateway's OpenAI-compatible HTTP front
# Next to the experts config: measured step-cost profiles, <expert>.json.
COST_MODELS_DIR = "cost_models"


@dataclass(frozen=True)
class GeneratorPlan:
    """One generator replica to start."""

    expert: str
    model: str  # the model folder (GENERATOR_MODEL); services resolve no demo expert names
    replica_id: str
    port: int
    metrics_port: int
    # Its step-cost profile (GENERATOR_COST_PROFILE; "" = none), announced to the scheduler.
    cost_profile: str = ""
    # Added to this replica's environment after StackPlan.generator_env (e.g. a remote backend's
    # GENERATOR_BACKEND / GENERATOR_REMOTE_URL, which differ per replica).
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass
class StackPlan:
    """Every port and path of one local stack."""

    experts_config: Path
    tenants_file: Path
    gateway_port: int = GATEWAY_PORT
    gateway_http_port: int = GATEWAY_HTTP_PORT  # the OpenAI-compatible HTTP front
    router_port: int = ROUTER_PORT
    scheduler_port: int = SCHEDULER_PORT
    gateway_metrics: int = GATEWAY_METRICS
    router_metrics: int = ROUTER_METRICS
    scheduler_metrics: int = SCHEDULER_METRICS
    generators: list[GeneratorPlan] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # added to every service (OTEL_*, LOG_LEVEL, ...)
    generator_env: dict[str, str] = field(default_factory=dict)  # added to every generator
    # {expert: model folder} of the experts whose model is a folder here, for the router's
    # tokenizers (ROUTER_MODEL_FOLDERS): the router resolves no demo expert names.
    model_folders: dict[str, str] = field(default_factory=dict)
    # Mutual TLS on the internal hops: each process's identity by service name ("scheduler",
    # "router", "gateway", "generator-<replica id>") and the operator's (for tools and tests).
    # Empty: plaintext.
    identities: dict[str, TlsIdentity] = field(default_factory=dict)

    @property
    def operator(self) -> TlsIdentity | None:
        """The identity tools and tests use to call the internal services (None: plaintext stack)."""
        return self.identities.get(OPERATOR_ROLE)

    def channel(self, address: str, role: str) -> grpc.Channel:
        """A blocking channel to an internal service of this stack (`role`: scheduler, router, generator)."""
        return blocking_channel(address, self.operator, role)

    @property
    def gateway_addr(self) -> str:
        """Where clients connect."""
        return f"127.0.0.1:{self.gateway_port}"

    @property
    def openai_base_url(self) -> str:
        """The OpenAI-compatible HTTP front's base URL (what an OpenAI client's base_url takes)."""
        return f"http://127.0.0.1:{self.gateway_http_port}/v1"

    @property
    def scheduler_addr(self) -> str:
        """The scheduler's address."""
        return f"127.0.0.1:{self.scheduler_port}"

    @property
    def router_addr(self) -> str:
        """The router's address."""
        return f"127.0.0.1:{self.router_port}"


def plan_stack(
    experts_config: Path,
    tenants_file: Path,
    *,
    models: Mapping[str, str] | None = None,
    free_ports: bool = False,
    metrics: bool = True,
    tls_dir: Path | None = None,
) -> StackPlan:
    """Plan a stack: one generator per configured replica of each expert.

    models: {expert: model folder} overriding each expert's `model` from the config
    (e.g. the built demo expert folders). free_ports: pick free ports instead of the
    documented defaults (tests, or a second stack on one machine). metrics=False
    disables the metrics endpoints. tls_dir: make a throwaway CA there and a certificate per process,
    so every internal hop runs mutual TLS (the gateway's public port stays plaintext on loopback).
    """
    experts: list[ExpertSpec] = load_experts_config(experts_config)
    plan = StackPlan(experts_config=experts_config.resolve(), tenants_file=tenants_file)
    if free_ports:
        plan.gateway_port, plan.router_port, plan.scheduler_port = free_port(), free_port(), free_port()
        plan.gateway_http_port = free_port()
        plan.gateway_metrics, plan.router_metrics, plan.scheduler_metrics = free_port(), free_port(), free_port()
    if not metrics:
        plan.gateway_metrics = plan.router_metrics = plan.scheduler_metrics = 0
    index = 0
    profiles = experts_config.resolve().parent / COST_MODELS_DIR
    for spec in experts:
        folder = Path((models or {}).get(spec.name, spec.model)).expanduser()
        if folder.is_dir():
            plan.model_folders[spec.name] = str(folder.resolve())
        # A measured profile named after the expert (config/cost_models/<expert>.json), when there is one.
        profile = profiles / f"{spec.name}.json"
        for replica in range(spec.replicas):
            port = free_port() if free_ports else FIRST_GENERATOR_PORT + index
            metrics_port = (free_port() if free_ports else FIRST_GENERATOR_METRICS + index) if metrics else 0
            model = (models or {}).get(spec.name, spec.model)
            plan.generators.append(
                GeneratorPlan(
                    spec.name,
                    model,
                    f"{spec.name}-{replica}",
                    port,
                    metrics_port,
                    str(profile) if profile.is_file() else "",
                )
            )
            index += 1
    if tls_dir is not None:
        plan.identities = issue_identities(tls_dir, plan)
    return plan


def issue_identities(folder: Path, plan: StackPlan) -> dict[str, TlsIdentity]:
    """A fresh local CA in `folder` and one certificate per process of the plan, plus the operator's."""
    ca = LocalCA.create(folder)
    identities = {name: ca.issue(name) for name in ("scheduler", "router", "gateway", OPERATOR_ROLE)}
    for generator in plan.generators:
        identities[f"generator-{generator.replica_id}"] = ca.issue(f"generator/{generator.replica_id}")
    return identities


def service_specs(plan: StackPlan) -> dict[str, ServiceSpec]:
    """The ServiceSpec of every process, keyed by name, in start order."""
    shared = {
        "SWITCHBOARD_EXPERTS_CONFIG": str(plan.experts_config),
        "SCHEDULER_ADDR": plan.scheduler_addr,
        "ROUTER_ADDR": plan.router_addr,
        **plan.env,
    }
    specs = {
        "scheduler": ServiceSpec(
            "scheduler",
            "switchboard.scheduler",
            plan.scheduler_port,
            {
                **shared,
                "SCHEDULER_PORT": str(plan.scheduler_port),
                "SCHEDULER_METRICS_PORT": str(plan.scheduler_metrics),
                **_identity_env(plan, "scheduler"),
            },
            plan.scheduler_metrics,
            probe_tls=plan.operator,
            role="scheduler",
        ),
        "router": ServiceSpec(
            "router",
            "switchboard.router",
            plan.router_port,
            {
                **shared,
                "ROUTER_PORT": str(plan.router_port),
                "ROUTER_METRICS_PORT": str(plan.router_metrics),
                **(
                    {"ROUTER_MODEL_FOLDERS": ",".join(f"{e}={f}" for e, f in plan.model_folders.items())}
                    if plan.model_folders
                    else {}
                ),
                **_identity_env(plan, "router"),
            },
            plan.router_metrics,
            probe_tls=plan.operator,
            role="router",
        ),
    }
    for generator in plan.generators:
        name = f"generator-{generator.replica_id}"
        specs[name] = ServiceSpec(
            name,
            "switchboard.generator",
            generator.port,
            {
                **shared,
                "GENERATOR_PORT": str(generator.port),
                "GENERATOR_METRICS_PORT": str(generator.metrics_port),
                "GENERATOR_MODEL": generator.model,
                "GENERATOR_EXPERT": generator.expert,
                "GENERATOR_REPLICA_ID": generator.replica_id,
                **({"GENERATOR_COST_PROFILE": generator.cost_profile} if generator.cost_profile else {}),
                **plan.generator_env,
                **generator.env,
                **_identity_env(plan, name),
            },
            generator.metrics_port,
            probe_tls=plan.operator,
            role="generator",
        )
    specs["gateway"] = ServiceSpec(
        "gateway",
        "switchboard.gateway",
        plan.gateway_port,
        {
            **shared,
            "GATEWAY_PORT": str(plan.gateway_port),
            "GATEWAY_METRICS_PORT": str(plan.gateway_metrics),
            "GATEWAY_HTTP_PORT": str(plan.gateway_http_port),
            "GATEWAY_TENANTS_FILE": str(plan.tenants_file),
            **_identity_env(plan, "gateway"),
        },
        plan.gateway_metrics,
    )
    return specs


def _identity_env(plan: StackPlan, name: str) -> dict[str, str]:
    identity = plan.identities.get(name)
    return identity_env(identity) if identity is not None else {}


# The local allocation actuator's generator template, written next to the logs (see LocalStack).
GENERATOR_TEMPLATE_FILE = "generator-template.json"


def generator_template(plan: StackPlan, log_dir: Path, grace: float = 10.0) -> GeneratorTemplate:
    """How the scheduler's local actuator starts one more generator of each expert: the environment
    `service_specs` gives the expert's first planned replica, less what differs per replica (id, port,
    certificate), so a process it starts is one `switchboard up` would have started."""
    specs = service_specs(plan)
    experts: dict[str, dict[str, str]] = {}
    replicas: dict[str, tuple[str, ...]] = {}
    for generator in plan.generators:
        replicas[generator.expert] = (*replicas.get(generator.expert, ()), generator.replica_id)
        if generator.expert not in experts:
            env = dict(specs[f"generator-{generator.replica_id}"].env)
            for key in PER_REPLICA_ENV:
                env.pop(key, None)
            experts[generator.expert] = env
    operator = plan.operator
    return GeneratorTemplate(
        argv=(sys.executable, "-m", "switchboard.generator"),
        experts=experts,
        log_dir=log_dir,
        pki_dir=operator.ca_file.parent if operator is not None else None,
        grace_seconds=grace,
        replicas=replicas,
    )


def registered_replicas(scheduler_addr: str, timeout: float = 1.0, tls: TlsIdentity | None = None) -> dict[str, int]:
    """{replica_id: state} as the scheduler sees them ({} when it does not answer)."""
    with blocking_channel(scheduler_addr, tls, "scheduler") as channel:
        try:
            cluster = scheduler_pb2_grpc.SchedulerStub(channel).GetCluster(
                scheduler_pb2.GetClusterRequest(), timeout=timeout
            )
        except grpc.RpcError:
            return {}
    return {replica.replica_id: int(replica.state) for replica in cluster.replicas}


class LocalStack:
    """Start a planned stack; a context manager that always stops every process."""

    def __init__(
        self,
        plan: StackPlan,
        log_dir: Path,
        base_env: Mapping[str, str] | None = None,
        grace: float = 10.0,
        start_timeout: float = 180.0,
    ) -> None:
        """log_dir receives one `<service>.log` per process (its JSON log lines)."""
        self.plan = plan
        self.start_timeout = start_timeout
        self.specs = service_specs(plan)
        # The scheduler's local allocation actuator (SCHEDULER_ACTUATOR=local) reads this template
        # to start more generators the way this stack starts them; a plan's own setting wins.
        template = generator_template(plan, log_dir, grace).write(log_dir / GENERATOR_TEMPLATE_FILE)
        scheduler = self.specs["scheduler"]
        self.specs["scheduler"] = dataclasses.replace(
            scheduler, env={"SCHEDULER_LOCAL_GENERATORS_FILE": str(template), **scheduler.env}
        )
        self.group = ProcessGroup(log_dir, base_env if base_env is not None else os.environ, grace=grace)

    def start(self, timeout: float = 180.0) -> None:
        """Start everything in order, waiting for health and registrations (StartupError on failure)."""
        deadline = time.monotonic() + timeout
        self.group.start(self.specs["scheduler"])
        self.group.wait_healthy(["scheduler"], timeout=deadline - time.monotonic())
        later = [name for name in self.specs if name not in ("scheduler", "gateway")]
        for name in later:
            self.group.start(self.specs[name])
        self.group.start(self.specs["gateway"])
        self.group.wait_healthy(timeout=deadline - time.monotonic())
        self.wait_registered([g.replica_id for g in self.plan.generators], deadline - time.monotonic())

    def wait_registered(self, replica_ids: list[str], timeout: float) -> None:
        """Poll the scheduler until every named replica is READY (generators register after loading)."""
        deadline = time.monotonic() + timeout
        while True:
            seen = registered_replicas(self.plan.scheduler_addr, tls=self.plan.operator)
            missing = [r for r in replica_ids if seen.get(r) != scheduler_pb2.REPLICA_STATE_READY]
            if not missing:
                return
            dead = list(self.group.dead())
            if dead:
                raise StartupError(f"{dead[0].spec.name} exited during startup:\n{dead[0].log_tail()}")
            if time.monotonic() > deadline:
                raise StartupError(f"replicas never registered with the scheduler: {', '.join(missing)}")
            time.sleep(0.2)

    def stop(self) -> None:
        """Stop every process (SIGTERM, grace period, SIGKILL)."""
        self.group.stop_all()

    def __enter__(self) -> LocalStack:
        try:
            self.start(self.start_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
