"""Offline checks of the deployment files: Dockerfiles, compose, Kubernetes manifests.

Every check takes the files it judges as arguments (so tests can hand it a broken
copy in a temporary folder) and returns a list of problems, one readable line
each; an empty list means the files pass. The external checkers are the
project's own pinned tools in the virtualenv (hadolint, docker-compose, kubectl
with kustomize, kubernetes-validate); what they cannot know (env vars the
services really read, ports, probes, RBAC scope) is checked against each
service's settings class, the one source of truth for its variables.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import re
import shlex
import subprocess
import sys
import typing
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from switchboard.common.settings import ServerSettings, SettingsError, load_settings, settings_reference
from switchboard.common.tls import CA_ENV, CERT_ENV, KEY_ENV, certificate_identity, role_of

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SERVICES = ("gateway", "router", "scheduler", "generator")
KUBERNETES_VERSION = "1.34.0"
HEALTHCHECK_MODULE = "switchboard.common.healthcheck"

# Variables a container may set although no settings class declares them, and why.
GENERIC_ENV = {
    # Read by the OpenTelemetry SDK and switchboard.common.telemetry (standard names only).
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_INSECURE",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    # Read by the Python interpreter itself.
    "PATH",
    "PYTHONUNBUFFERED",
    "PYTHONDONTWRITEBYTECODE",
}


# A service's identity on internal hops: read by every service's ServerSettings (switchboard.common.tls),
# all three or none. The values are files in the container, so they are checked against its mounts
# (and the certificates behind them) rather than read.
TLS_ENV = (CA_ENV, CERT_ENV, KEY_ENV)
PUBLIC_TLS_ENV = ("GATEWAY_PUBLIC_TLS_CERT_FILE", "GATEWAY_PUBLIC_TLS_KEY_FILE")
CERT_MANAGER_GROUP = "cert-manager.io"
ISSUER = "switchboard-ca"


@dataclass(frozen=True)
class ThirdParty:
    """A service that runs someone else's image (no Dockerfile here), allowed by name.

    image: its repository (the tag must pin a version); port: what it listens on;
    hardened: part of the core stack, so it takes the Switchboard hardening (non-root user,
    read-only root with `writable` paths on tmpfs/volumes, no capabilities, no privilege
    escalation, the `healthcheck` command) rather than being an overlay's development tool;
    clients: the Switchboard services that may connect to it (Kubernetes NetworkPolicy);
    health_path: an HTTP health endpoint on `port`: the compose healthcheck GETs it and the Kubernetes
    probes may be httpGet probes of it (instead of running `healthcheck`); gpu: it needs an NVIDIA
    GPU (reserved in compose, an nvidia.com/gpu limit on a GPU node in Kubernetes); sidecar: in
    Kubernetes it runs as a container of a Switchboard pod (named after its key), reached over
    localhost, its port open to Prometheus (namespace monitoring) only.
    """

    image: str
    port: int
    hardened: bool
    healthcheck: tuple[str, ...] = ()
    writable: tuple[str, ...] = ()
    clients: tuple[str, ...] = ()
    health_path: str = ""
    gpu: bool = False
    sidecar: bool = False
    metrics: bool = False  # Prometheus metrics at /metrics on `port` (scraped where Prometheus runs)


# Every third-party service of the compose files and manifests; anything else without a
# Switchboard Dockerfile is refused.
THIRD_PARTY = {
    # The gateway's limits state (REDIS_URL), shared by its replicas.
    "redis": ThirdParty("redis", 6379, True, ("redis-cli", "ping"), ("/data",), ("gateway",)),
    # compose.observability.yaml: the trace viewer, Prometheus and Grafana, for development.
    "jaeger": ThirdParty("jaegertracing/all-in-one", 4317, False),
    "prometheus": ThirdParty("prom/prometheus", 9090, False),
    "grafana": ThirdParty("grafana/grafana", 3000, False),
    # The engine of the example vLLM pools (compose.vllm.yaml, k8s/vllm): the remote generator's.
    "vllm": ThirdParty(
        "vllm/vllm-openai", 8000, True, writable=("/tmp",), clients=("generator",), health_path="/health", gpu=True, sidecar=True,
        metrics=True,
    ),
}
MONITORING_PEER = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}


def third_party_of(service: str) -> ThirdParty | None:
    """What a compose service runs, by its name: redis, prometheus, vllm-<pool>[-N] (its key, or
    the key and a dash then anything)."""
    if service in THIRD_PARTY:
        return THIRD_PARTY[service]
    key = service.split("-", 1)[0]
    return THIRD_PARTY[key] if key in THIRD_PARTY and THIRD_PARTY[key].sidecar else None


def check_image_pinned(image: str, third_party: ThirdParty, where: str) -> list[str]:
    """The image is the expected repository with a version tag (or a digest), never `latest` or untagged."""
    name, _, digest = image.partition("@")
    repository, _, tag = name.rpartition(":") if ":" in name.rsplit("/", 1)[-1] else (name, "", "")
    problems = []
    if repository not in (third_party.image, f"docker.io/{third_party.image}", f"docker.io/library/{third_party.image}"):
        problems.append(f"{where}: image {image} is not {third_party.image}")
    if not digest and (not tag or tag == "latest" or not re.search(r"\d", tag)):
        problems.append(f"{where}: image {image} must be pinned by a version tag (not latest or untagged)")
    return problems


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class ServiceContract:
    """What one service reads and listens on, taken from its settings module."""

    name: str
    prefix: str
    port: int
    metrics_port: int
    settings_class: type
    variables: frozenset[str]
    http_port: int = 0  # default of its HTTP front's port variable; 0: it has none

    @property
    def http_env(self) -> str:
        """The variable of its HTTP front's port (read only by services that have one)."""
        return f"{self.prefix}_HTTP_PORT"

    @property
    def port_env(self) -> str:
        """The variable of its gRPC port."""
        return f"{self.prefix}_PORT"

    @property
    def metrics_env(self) -> str:
        """The variable of its metrics port."""
        return f"{self.prefix}_METRICS_PORT"

    @property
    def drain_env(self) -> str:
        """The variable of its drain period."""
        return f"{self.prefix}_DRAIN_SECONDS"

    @property
    def host_env(self) -> str:
        """The variable of its listen address."""
        return f"{self.prefix}_HOST"

    def port_in(self, env: Mapping[str, str]) -> int:
        """Its gRPC port under `env` (the default when unset)."""
        return int(env.get(self.port_env, self.port))

    def metrics_port_in(self, env: Mapping[str, str]) -> int:
        """Its metrics port under `env`."""
        return int(env.get(self.metrics_env, self.metrics_port))

    def http_port_in(self, env: Mapping[str, str]) -> int:
        """Its HTTP front's port under `env` (0: none, or disabled)."""
        return int(env.get(self.http_env, self.http_port)) if self.http_env in self.variables else 0

    def traffic_ports_in(self, env: Mapping[str, str]) -> set[int]:
        """The ports it serves requests on under `env`: gRPC, and the HTTP front if any."""
        return {self.port_in(env), self.http_port_in(env)} - {0}

    def listening_ports_in(self, env: Mapping[str, str]) -> set[int]:
        """Every port it listens on under `env` (requests and metrics)."""
        return self.traffic_ports_in(env) | ({self.metrics_port_in(env)} - {0})

    def drain_in(self, env: Mapping[str, str]) -> float:
        """Its drain period in seconds under `env` (ServerSettings' default when unset)."""
        return float(env.get(self.drain_env, ServerSettings.drain_seconds))


def service_contract(name: str) -> ServiceContract:
    """Import `switchboard.<name>.config` and read its settings dataclass and constants.

    The settings class is the module's dataclass with a `server: ServerSettings`
    field; SERVER_PREFIX, DEFAULT_PORT and DEFAULT_METRICS_PORT are the arguments
    its load function passes to `load_settings`.
    """
    module = importlib.import_module(f"switchboard.{name}.config")
    classes = [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type)
        and dataclasses.is_dataclass(obj)
        and obj.__module__ == module.__name__
        and ServerSettings in typing.get_type_hints(obj).values()
    ]
    if len(classes) != 1:
        raise AssertionError(f"switchboard.{name}.config: expected one settings dataclass, found {classes}")
    cls = classes[0]
    prefix, port, metrics = module.SERVER_PREFIX, module.DEFAULT_PORT, module.DEFAULT_METRICS_PORT
    docs = settings_reference(cls, server_prefix=prefix, default_port=port, default_metrics_port=metrics)
    http = next((int(d.default) for d in docs if d.env == f"{prefix}_HTTP_PORT"), 0)
    return ServiceContract(name, prefix, port, metrics, cls, frozenset(d.env for d in docs), http)


def contracts() -> dict[str, ServiceContract]:
    """The contract of every service."""
    return {name: service_contract(name) for name in SERVICES}


def check_env(contract: ServiceContract, env: Mapping[str, str], where: str, placeholders: Iterable[str] = ()) -> list[str]:
    """Every variable is one the service reads, and the values load through its settings class.

    `placeholders` are helper variables that exist only to be substituted into
    others (Kubernetes `$(POD_IP)`); they are allowed and not passed to the service.
    """
    problems = []
    unknown = sorted(set(env) - contract.variables - GENERIC_ENV - set(TLS_ENV) - set(placeholders))
    for variable in unknown:
        problems.append(f"{where}: {variable} is not read by the {contract.name} (not in its settings class)")
    given = [v for v in TLS_ENV if env.get(v)]
    if given and len(given) != len(TLS_ENV):
        problems.append(f"{where}: {', '.join(sorted(set(TLS_ENV) - set(given)))} missing: mutual TLS needs all three SWITCHBOARD_TLS_*")
    # The TLS files live in the container; their mounts are checked by check_tls_files.
    readable = {k: v for k, v in env.items() if k in contract.variables}
    try:
        load_settings(
            contract.settings_class,
            server_prefix=contract.prefix,
            default_port=contract.port,
            default_metrics_port=contract.metrics_port,
            environ=readable,
        )
    except (SettingsError, ValueError) as exc:
        problems.append(f"{where}: the {contract.name} rejects its environment: {exc}")
    host = env.get(contract.host_env)
    if host not in ("0.0.0.0", "::"):
        problems.append(f"{where}: {contract.host_env} must be 0.0.0.0 in a container (got {host!r}); 127.0.0.1 is unreachable")
    return problems


# --------------------------------------------------------------------------- tools


def tls_files(env: Mapping[str, str]) -> dict[str, str]:
    """The TLS file variables a container sets (internal identity and the gateway's public ports) -> path."""
    return {v: env[v] for v in (*TLS_ENV, *PUBLIC_TLS_ENV) if env.get(v)}


def check_tls_mode(where: str, kind: str, env: Mapping[str, str]) -> list[str]:
    """A gateway under mutual TLS serves its public ports with TLS too: its health check (which presents
    the container's certificate and verifies the server as its own role) cannot speak plaintext."""
    if kind == "gateway" and env.get(CERT_ENV) and not all(env.get(v) for v in PUBLIC_TLS_ENV):
        return [f"{where}: SWITCHBOARD_TLS_* without GATEWAY_PUBLIC_TLS_*: the health check speaks TLS to a plaintext port"]
    return []


def run_tool(args: list[str], stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run one of the venv's tools; the first argument is the tool's name in the venv's bin/."""
    tool = BIN / args[0]
    if not tool.exists():
        raise AssertionError(f"{tool} is missing: run `make venv` (it is pinned in requirements/dev.txt)")
    return subprocess.run(
        [str(tool), *args[1:]], input=stdin, capture_output=True, text=True, cwd=cwd, timeout=120, check=False
    )


# --------------------------------------------------------------------------- Dockerfiles


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction, continuation lines joined."""

    keyword: str
    args: str
    line: int


def parse_dockerfile(path: Path) -> list[Instruction]:
    """The instructions of a Dockerfile (comments dropped, `\\` continuations joined)."""
    instructions: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text = pending + stripped
        pending = ""
        keyword, _, args = text.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
    return instructions


def exec_form(args: str) -> list[str] | None:
    """The argument list of a JSON exec-form instruction, or None for the shell form."""
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


def _without_flags(args: str) -> list[str]:
    """Words of a COPY/ADD after its --flags (exec or shell form)."""
    words = exec_form(args) or shlex.split(args)
    return [w for w in words if not w.startswith("--")]


def dockerignore_patterns(context: Path) -> list[str]:
    """The patterns of `<context>/.dockerignore`, in order."""
    path = context / ".dockerignore"
    if not path.exists():
        return []
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's .dockerignore glob (`**` any depth, `*` within one segment) as a regex."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignored(relative: str, patterns: list[str]) -> bool:
    """Whether the build context leaves out `relative` (the last matching pattern wins).

    Like Docker, a pattern matches a path or any of its parent folders, and `!`
    puts a path back.
    """
    parts = relative.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        regex = _pattern_regex(pattern.strip().strip("/"))
        if any(regex.match(c) for c in candidates):
            excluded = not negate
    return excluded


def check_copy_sources(dockerfile: Path, context: Path) -> list[str]:
    """Every COPY/ADD source from the build context exists there and is not left out by .dockerignore."""
    problems = []
    patterns = dockerignore_patterns(context)
    for ins in parse_dockerfile(dockerfile):
        if ins.keyword not in ("COPY", "ADD") or "--from" in ins.args:
            continue
        words = _without_flags(ins.args)
        for source in words[:-1]:
            if not (context / source).exists():
                problems.append(f"{dockerfile}:{ins.line}: COPY source {source} does not exist in {context}")
            elif dockerignored(source, patterns):
                problems.append(f"{dockerfile}:{ins.line}: COPY source {source} is excluded by .dockerignore")
    return problems


def check_hadolint(dockerfile: Path, config: Path | None = None) -> list[str]:
    """hadolint's findings (its exit status is 1 on any)."""
    args = ["hadolint", "--no-color"]
    if config is not None and config.exists():
        args += ["--config", str(config)]
    result = run_tool([*args, str(dockerfile)])
    if result.returncode != 0:
        return [line for line in (result.stdout + result.stderr).splitlines() if line.strip()] or [f"hadolint exit {result.returncode}"]
    return []


def _last_stage(instructions: list[Instruction]) -> list[Instruction]:
    starts = [i for i, ins in enumerate(instructions) if ins.keyword == "FROM"]
    return instructions[starts[-1] :] if starts else instructions


def dockerfile_env(instructions: Iterable[Instruction]) -> dict[str, str]:
    """ENV of the instructions given (`ENV A=1 B=2` form)."""
    env: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "ENV":
            for word in shlex.split(ins.args):
                key, sep, value = word.partition("=")
                if sep:
                    env[key] = value
    return env


def check_dockerfile_contract(dockerfile: Path, contract: ServiceContract, stack_command: list[str], repo: Path) -> list[str]:
    """Multi-stage, non-root, CMD = the local stack's command, healthcheck/EXPOSE = the service's ports, known ENV."""
    problems = []
    instructions = parse_dockerfile(dockerfile)
    final = _last_stage(instructions)
    where = str(dockerfile)
    if sum(ins.keyword == "FROM" for ins in instructions) < 2:
        problems.append(f"{where}: not multi-stage (one FROM)")
    users = [ins.args for ins in final if ins.keyword == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append(f"{where}: the runtime stage runs as root (needs a non-root USER)")
    cmds = [exec_form(ins.args) for ins in final if ins.keyword == "CMD"]
    if not cmds or cmds[-1] != stack_command:
        problems.append(f"{where}: CMD {cmds[-1] if cmds else None} differs from the local stack's command {stack_command}")
    env = dockerfile_env(final)
    for variable in sorted(set(env) - contract.variables - GENERIC_ENV):
        problems.append(f"{where}: ENV {variable} is not read by the {contract.name}")
    if env.get(contract.host_env) not in ("0.0.0.0", "::"):
        problems.append(f"{where}: ENV {contract.host_env}=0.0.0.0 missing (the default 127.0.0.1 is unreachable)")
    port, metrics = contract.port_in(env), contract.metrics_port_in(env)
    health = [ins.args for ins in final if ins.keyword == "HEALTHCHECK"]
    expected_probe = ["python", "-m", HEALTHCHECK_MODULE, f"127.0.0.1:{port}"]
    if not health or " CMD " not in f" {health[-1]} " or exec_form(health[-1].split(" CMD ", 1)[-1].strip()) != expected_probe:
        problems.append(f"{where}: HEALTHCHECK must run {expected_probe} (the gRPC health service on the service's port)")
    exposed = {int(word.split("/")[0]) for ins in final if ins.keyword == "EXPOSE" for word in ins.args.split()}
    ports = {port, metrics, contract.http_port_in(env)} - {0}
    if exposed != ports:
        problems.append(f"{where}: EXPOSE {sorted(exposed)} differs from the service's ports {sorted(ports)}")
    text = "\n".join(f"{ins.keyword} {ins.args}" for ins in instructions)  # comments may mention torch
    installs = " ".join(ins.args for ins in instructions if ins.keyword == "RUN" and "pip install" in ins.args)
    for package in ("./libs/common", f"./services/{contract.name}"):
        if package not in installs.split():
            problems.append(f"{where}: the builder does not pip install {package}")
    model_pin = re.search(r"^torch==(\S+)", (repo / "requirements/model.txt").read_text(), re.MULTILINE)
    if contract.name == "gateway":
        if "model.txt" in text or "torch" in text.lower():
            problems.append(f"{where}: the gateway image must not install torch or requirements/model.txt")
    else:
        args = {ins.args.split("=")[0]: ins.args.partition("=")[2] for ins in instructions if ins.keyword == "ARG"}
        if "TORCH_VERSION" in args and model_pin and args["TORCH_VERSION"] != model_pin.group(1):
            problems.append(
                f"{where}: ARG TORCH_VERSION={args['TORCH_VERSION']} differs from requirements/model.txt torch=={model_pin.group(1)}"
            )
    return problems


# --------------------------------------------------------------------------- compose


def compose_config(files: list[Path], profiles: list[str], env_file: Path | None = None) -> tuple[dict[str, Any] | None, list[str]]:
    """`docker-compose config` of the files under the profiles: (resolved model, problems)."""
    args = ["docker-compose"]
    for f in files:
        args += ["-f", str(f)]
    if env_file is not None:
        args += ["--env-file", str(env_file)]
    for profile in profiles:
        args += ["--profile", profile]
    quiet = run_tool([*args, "config", "-q"])
    if quiet.returncode != 0:
        return None, [f"docker-compose config -q failed: {quiet.stderr.strip() or quiet.stdout.strip()}"]
    resolved = run_tool([*args, "config", "--format", "json"])
    if resolved.returncode != 0:
        return None, [f"docker-compose config failed: {resolved.stderr.strip()}"]
    return json.loads(resolved.stdout), []


def _duration_seconds(text: str) -> float:
    """Compose's Go durations ('30s', '1m30s', '3m0s') in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    total = 0.0
    for value, unit in re.findall(r"([\d.]+)(ms|h|m|s)", text):
        total += float(value) * units[unit]
    return total


def compose_service_kind(service: Mapping[str, Any]) -> str | None:
    """Which Switchboard service a compose service runs (from its build's Dockerfile), if any."""
    dockerfile = (service.get("build") or {}).get("dockerfile", "")
    match = re.fullmatch(r"services/(\w+)/Dockerfile", dockerfile)
    return match.group(1) if match else None


def redis_address(url: str) -> tuple[str, int] | None:
    """(host, port) of a redis:// or rediss:// URL (port 6379 when unset); None when it is not one."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        return None
    try:
        return parts.hostname, parts.port or 6379
    except ValueError:
        return None


def _dns_names(name: str, service: Mapping[str, Any]) -> set[str]:
    names = {name}
    for network in (service.get("networks") or {}).values():
        names.update((network or {}).get("aliases") or [])
    return names


def check_compose(model: dict[str, Any], contracts_: Mapping[str, ServiceContract], prometheus: Path | None) -> list[str]:
    """Env, ports, healthchecks, dependencies, grace periods and scrape targets of a resolved compose model."""
    problems = []
    services: dict[str, Any] = model.get("services", {})
    listening: dict[str, int] = {}  # dns name -> gRPC port
    third_party: dict[str, tuple[str, ThirdParty]] = {}  # dns name -> (its service, what it runs)
    metrics_targets: list[tuple[set[str], int]] = []  # (dns names of one service, its metrics port)
    for name, service in services.items():
        runs = third_party_of(name)
        if compose_service_kind(service) is None and runs is not None:
            third_party.update((dns, (name, runs)) for dns in _dns_names(name, service))
    for name, service in services.items():
        kind = compose_service_kind(service)
        where = f"compose service {name}"
        if kind is None:
            runs = third_party_of(name)
            if runs is not None:
                problems += _check_compose_third_party(where, service, runs)
                if runs.metrics:
                    metrics_targets.append((_dns_names(name, service), runs.port))
            else:
                problems.append(f"{where}: runs neither a Switchboard Dockerfile nor an allowed third-party image (THIRD_PARTY)")
            continue
        contract = contracts_[kind]
        env = {k: str(v) for k, v in (service.get("environment") or {}).items()}
        problems += check_env(contract, env, where)
        problems += _check_compose_hardening(where, service)
        problems += _check_compose_published(where, service, contract, env)
        port = contract.port_in(env)
        for dns in _dns_names(name, service):
            listening[dns] = port
        if contract.metrics_port_in(env):
            metrics_targets.append((_dns_names(name, service), contract.metrics_port_in(env)))
        test = (service.get("healthcheck") or {}).get("test") or []
        expected = ["CMD", "python", "-m", HEALTHCHECK_MODULE, f"127.0.0.1:{port}"]
        if test != expected:
            problems.append(f"{where}: healthcheck {test} differs from {expected} ({contract.port_env}={port})")
        grace = _duration_seconds(str(service.get("stop_grace_period", "10s")))
        if grace <= contract.drain_in(env):
            problems.append(f"{where}: stop_grace_period {grace}s must exceed {contract.drain_env}={contract.drain_in(env)}")
        for dependency, spec in (service.get("depends_on") or {}).items():
            target = services.get(dependency, {})
            if (compose_service_kind(target) or target.get("healthcheck")) and spec.get("condition") != "service_healthy":
                problems.append(f"{where}: depends on {dependency} with {spec.get('condition')}, not service_healthy")
        if env.get("REDIS_URL"):
            problems += _check_compose_redis_url(where, env["REDIS_URL"], service, third_party)
        if kind == "generator":
            problems += _check_compose_generator(where, env, service)
            if env.get("GENERATOR_BACKEND") == "remote":
                problems += _check_compose_remote(where, env, service, third_party)
        problems += check_tls_mode(where, kind, env)
        problems += _check_compose_tls(where, kind, env, service)
    for name, service in services.items():
        kind = compose_service_kind(service)
        env = service.get("environment") or {}
        for variable in ("ROUTER_ADDR", "SCHEDULER_ADDR", "GENERATOR_ADVERTISE_ADDR"):
            if kind and variable in env:
                host, _, port = str(env[variable]).rpartition(":")
                if listening.get(host) != int(port):
                    problems.append(
                        f"compose service {name}: {variable}={env[variable]} names no service listening there "
                        f"(known: {sorted(f'{h}:{p}' for h, p in listening.items())})"
                    )
    if prometheus is not None:
        problems += check_prometheus_targets(prometheus, metrics_targets)
    return problems


def _check_compose_hardening(where: str, service: Mapping[str, Any]) -> list[str]:
    """The `x-hardening` anchor: read-only root, every capability dropped, no privilege escalation."""
    problems = []
    if service.get("read_only") is not True:
        problems.append(f"{where}: read_only must be true (writable paths on tmpfs or volumes)")
    if "ALL" not in (service.get("cap_drop") or []):
        problems.append(f"{where}: cap_drop must include ALL")
    if "no-new-privileges:true" not in (service.get("security_opt") or []):
        problems.append(f"{where}: security_opt must include no-new-privileges:true")
    if service.get("privileged"):
        problems.append(f"{where}: must not be privileged")
    return problems


def _check_compose_third_party(where: str, service: Mapping[str, Any], third_party: ThirdParty) -> list[str]:
    """Pinned by tag; a core-stack one also hardened, non-root, with its writable paths and healthcheck."""
    problems = check_image_pinned(str(service.get("image", "")), third_party, where)
    if service.get("build"):
        problems.append(f"{where}: a third-party service is pulled, not built")
    if not third_party.hardened:
        return problems
    problems += _check_compose_hardening(where, service)
    user = str(service.get("user", ""))
    if not re.fullmatch(r"\d+(:\d+)?", user) or user.split(":")[0] == "0":
        problems.append(f"{where}: user must be a numeric non-root uid (got {user!r}); the image would start as root")
    writable = set(service.get("tmpfs") or []) | {v.get("target") for v in service.get("volumes") or [] if not v.get("read_only")}
    writable = {w.split(":")[0] for w in writable if w}
    for path in third_party.writable:
        if path not in writable:
            problems.append(f"{where}: {path} must be a tmpfs or a volume (the root filesystem is read-only)")
    test = (service.get("healthcheck") or {}).get("test")
    if third_party.health_path:
        url = f"http://127.0.0.1:{third_party.port}{third_party.health_path}"
        if not test or test[0] != "CMD" or not any(url in str(part) for part in test):
            problems.append(f"{where}: healthcheck {test} must GET {url}")
    elif test != ["CMD", *third_party.healthcheck]:
        problems.append(f"{where}: healthcheck {test} differs from {['CMD', *third_party.healthcheck]}")
    devices = ((service.get("deploy") or {}).get("resources") or {}).get("reservations", {}).get("devices") or []
    if third_party.gpu and not any("gpu" in (d.get("capabilities") or []) for d in devices):
        problems.append(f"{where}: runs {third_party.image}, which needs an NVIDIA GPU, but reserves none")
    if service.get("ports"):
        problems.append(f"{where}: publishes {[p.get('published') for p in service['ports']]}; only the gateway is published")
    return problems


def _check_compose_published(where: str, service: Mapping[str, Any], contract: ServiceContract, env: Mapping[str, str]) -> list[str]:
    """Only the gateway is published, on exactly its gRPC and HTTP ports, on the loopback address by default."""
    problems = []
    ports = service.get("ports") or []
    targets = {int(p["target"]) for p in ports}
    expected = contract.traffic_ports_in(env) if contract.name == "gateway" else set()
    if targets != expected:
        problems.append(f"{where}: publishes container ports {sorted(targets)}, expected {sorted(expected)}")
    for port in ports:
        if port.get("host_ip") not in ("127.0.0.1", "::1"):
            problems.append(f"{where}: port {port['target']} is published on {port.get('host_ip') or 'every address'}, not 127.0.0.1")
    return problems


def _check_compose_redis_url(
    where: str, url: str, service: Mapping[str, Any], third_party: Mapping[str, tuple[str, ThirdParty]]
) -> list[str]:
    """REDIS_URL names the compose Redis on its port, and the service waits for it to be healthy."""
    address = redis_address(url)
    if address is None:
        return [f"{where}: REDIS_URL={url} is not a redis:// URL"]
    host, port = address
    name, runs = third_party.get(host, ("", None))
    if runs is None or runs is not THIRD_PARTY["redis"] or port != runs.port:
        return [f"{where}: REDIS_URL={url} names no redis service listening there"]
    condition = ((service.get("depends_on") or {}).get(name) or {}).get("condition")
    if condition != "service_healthy":
        return [f"{where}: REDIS_URL names {name} but it does not depend on it with service_healthy (got {condition})"]
    return []


def _check_compose_tls(where: str, kind: str, env: Mapping[str, str], service: Mapping[str, Any]) -> list[str]:
    """Each TLS file is a read-only bind mount whose source exists; the certificate is issued to the service's role."""
    problems = []
    mounts = {v.get("target"): v for v in service.get("volumes") or []}
    for variable, path in tls_files(env).items():
        mount = mounts.get(path)
        if mount is None or not mount.get("read_only"):
            problems.append(f"{where}: {variable}={path} is not a read-only mounted file")
            continue
        source = Path(str(mount.get("source", "")))
        if not source.is_file():
            problems.append(f"{where}: {variable}: {source} does not exist (scripts/render_deploy.py certs compose/certs makes it)")
        elif variable == CERT_ENV and role_of(certificate_identity(source)) != kind:
            problems.append(f"{where}: {variable}: {source} is issued to {certificate_identity(source)!r}, not the {kind} role")
    return problems


def _check_compose_generator(where: str, env: Mapping[str, str], service: Mapping[str, Any]) -> list[str]:
    problems = []
    model = env.get("GENERATOR_MODEL", "")
    mounts = [v.get("target", "") for v in service.get("volumes") or [] if v.get("read_only")]
    if not any(model == t or model.startswith(t.rstrip("/") + "/") for t in mounts):
        problems.append(f"{where}: GENERATOR_MODEL={model} is not inside a read-only mounted model folder {mounts}")
    devices = ((service.get("deploy") or {}).get("resources") or {}).get("reservations", {}).get("devices") or []
    gpu = any("gpu" in (d.get("capabilities") or []) for d in devices)
    wants_cuda = env.get("GENERATOR_DEVICE", "auto").startswith("cuda")
    if wants_cuda and not gpu:
        problems.append(f"{where}: GENERATOR_DEVICE={env.get('GENERATOR_DEVICE')} but no NVIDIA device is reserved")
    if gpu and not wants_cuda:
        problems.append(f"{where}: reserves a GPU but GENERATOR_DEVICE is {env.get('GENERATOR_DEVICE', 'auto')}")
    return problems


def _check_compose_remote(
    where: str, env: Mapping[str, str], service: Mapping[str, Any], third_party: Mapping[str, tuple[str, ThirdParty]]
) -> list[str]:
    """A remote generator's GENERATOR_REMOTE_URL names an engine service on its port, and it waits
    for that engine to be healthy."""
    url = env.get("GENERATOR_REMOTE_URL", "")
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return [f"{where}: GENERATOR_REMOTE_URL={url} has no valid port"]
    name, runs = third_party.get(parts.hostname or "", ("", None))
    if runs is None or not runs.clients or "generator" not in runs.clients or port != runs.port:
        return [f"{where}: GENERATOR_REMOTE_URL={url} names no engine service listening there"]
    condition = ((service.get("depends_on") or {}).get(name) or {}).get("condition")
    if condition != "service_healthy":
        return [f"{where}: GENERATOR_REMOTE_URL names {name} but it does not depend on it with service_healthy (got {condition})"]
    return []


def check_prometheus_targets(config: Path, metrics_targets: list[tuple[set[str], int]]) -> list[str]:
    """Prometheus scrapes every service's metrics port (under its name or an alias), and nothing else."""
    problems = []
    parsed = yaml.safe_load(config.read_text())
    targets = {
        target
        for job in parsed.get("scrape_configs", [])
        for static in job.get("static_configs", [])
        for target in static.get("targets", [])
    }
    for names, port in metrics_targets:
        if not {f"{n}:{port}" for n in names} & targets:
            problems.append(f"{config}: no scrape target {min(names, key=len)}:{port} (a service's metrics port)")
    known = {f"{n}:{port}" for names, port in metrics_targets for n in names}
    for target in sorted(targets - known):
        problems.append(f"{config}: scrape target {target} is no running service's metrics port")
    return problems


# --------------------------------------------------------------------------- Kubernetes


def kustomize(directory: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Render a kustomization with the venv's kubectl: (objects, problems)."""
    result = run_tool(["kubectl", "kustomize", str(directory)])
    if result.returncode != 0:
        return [], [f"kubectl kustomize {directory} failed: {result.stderr.strip()}"]
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc], []


def kubernetes_validate(objects: list[dict[str, Any]]) -> list[str]:
    """kubernetes-validate --strict of every object against the Kubernetes schemas.

    cert-manager's kinds (cert-manager.io/*) are custom resources with no schema in
    kubernetes-validate, which would fail them as unknown: they are left out here, explicitly by
    API group, and check_certificates checks their structure instead.
    """
    objects = [o for o in objects if not str(o.get("apiVersion", "")).startswith(f"{CERT_MANAGER_GROUP}/")]
    text = yaml.safe_dump_all(objects, sort_keys=False)
    result = run_tool(["kubernetes-validate", "--strict", "-k", KUBERNETES_VERSION, "--quiet", "-"], stdin=text)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    if result.returncode != 0:
        return lines or ["kubernetes-validate failed"]
    # It only warns (exit 0) about a kind it has no schema for; here that is a failure, so a kind is
    # either validated or left out above by name.
    return [line for line in lines if "Couldn't find schema" in line]


def _by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o.get("kind") == kind]


def _selects(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    match = (selector or {}).get("matchLabels", selector or {})
    return all(labels.get(k) == v for k, v in match.items())


def _container_env(container: Mapping[str, Any]) -> tuple[dict[str, str], list[str], list[str]]:
    """(env with placeholders for valueFrom and $(VAR) expanded, placeholder names, problems)."""
    env: dict[str, str] = {}
    problems = []
    referenced: set[str] = set()
    for entry in container.get("env") or []:
        name = entry["name"]
        if "valueFrom" in entry:
            env[name] = "10.0.0.1" if "podIP" in json.dumps(entry["valueFrom"]) else "from-the-api"
            continue
        value = str(entry.get("value", ""))
        for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", value):
            if ref not in env:
                problems.append(f"env {name} references $({ref}), which is not defined before it")
            referenced.add(ref)
            value = value.replace(f"$({ref})", env.get(ref, ""))
        env[name] = value
    return env, sorted(referenced), problems


def check_kubernetes(objects: list[dict[str, Any]], contracts_: Mapping[str, ServiceContract], gpu: bool) -> list[str]:
    """Security, probes, grace periods, env, companions, network policy and RBAC of rendered objects."""
    problems: list[str] = []
    deployments = _by_kind(objects, "Deployment")
    services = _by_kind(objects, "Service")
    service_ports = {s["metadata"]["name"]: {p["port"] for p in s["spec"].get("ports", [])} for s in services}
    for deployment in deployments:
        kind = _pod_kind(deployment)
        if kind in THIRD_PARTY and THIRD_PARTY[kind].hardened:
            problems += _check_third_party_deployment(deployment, objects, THIRD_PARTY[kind])
        else:
            problems += _check_deployment(deployment, objects, contracts_, service_ports, gpu)
        for container in deployment["spec"]["template"]["spec"].get("containers", []):
            where = f"Deployment {deployment['metadata']['name']} container {container['name']}"
            problems += _check_exposed(where, container, deployment["spec"]["template"]["metadata"].get("labels", {}), services)
    problems += _check_network_policies(objects, deployments, contracts_)
    problems += _check_rbac(objects, deployments)
    problems += check_certificates(objects)
    hpas = _by_kind(objects, "HorizontalPodAutoscaler")
    if not any(h["spec"]["scaleTargetRef"]["name"] == "gateway" for h in hpas):
        problems.append("no HorizontalPodAutoscaler scales the gateway Deployment")
    for deployment in deployments:
        name = deployment["metadata"]["name"]
        replicas = max(
            [deployment["spec"].get("replicas", 1)]
            + [h["spec"].get("maxReplicas", 1) for h in hpas if h["spec"]["scaleTargetRef"]["name"] == name]
        )
        if _pod_kind(deployment) == "gateway" and replicas > 1:
            for container in deployment["spec"]["template"]["spec"]["containers"]:
                if not _container_env(container)[0].get("REDIS_URL"):
                    problems.append(
                        f"Deployment {name} container {container['name']}: up to {replicas} replicas but no REDIS_URL; "
                        "each replica would hold the tenants' limits on its own"
                    )
    return problems


def _pod_kind(deployment: Mapping[str, Any]) -> str | None:
    return deployment["spec"]["template"]["metadata"].get("labels", {}).get("app.kubernetes.io/name")


def _check_exposed(where: str, container: Mapping[str, Any], labels: Mapping[str, str], services: list[dict[str, Any]]) -> list[str]:
    """Every containerPort is the target of a port of a Service that selects the pod."""
    problems = []
    selecting = [s for s in services if _selects(s["spec"].get("selector"), labels)]
    targets = {p.get("targetPort", p["port"]) for s in selecting for p in s["spec"].get("ports", [])}
    for port in container.get("ports", []):
        if port.get("name") not in targets and port["containerPort"] not in targets:
            problems.append(f"{where}: containerPort {port.get('name')} {port['containerPort']} is in no Service selecting the pod")
    return problems


def _port_names(deployment: Mapping[str, Any], port: int) -> set[str]:
    """The names its containers give `port` (a NetworkPolicy or probe may use either)."""
    containers = deployment["spec"]["template"]["spec"].get("containers", [])
    return {p["name"] for c in containers for p in c.get("ports", []) if p["containerPort"] == port and p.get("name")}


def _check_third_party_deployment(
    deployment: dict[str, Any], objects: list[dict[str, Any]], third_party: ThirdParty
) -> list[str]:
    """Pinned by tag and hardened like the Switchboard pods: non-root, seccomp, read-only root, probes, resources."""
    problems = []
    name = deployment["metadata"]["name"]
    spec = deployment["spec"]["template"]["spec"]
    labels = deployment["spec"]["template"]["metadata"].get("labels", {})
    where = f"Deployment {name}"
    pod_security = spec.get("securityContext") or {}
    if pod_security.get("runAsNonRoot") is not True or not pod_security.get("runAsUser"):
        problems.append(f"{where}: pod securityContext needs runAsNonRoot: true and a non-zero runAsUser (the image starts as root)")
    if (pod_security.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        problems.append(f"{where}: pod seccompProfile must be RuntimeDefault")
    if spec.get("automountServiceAccountToken") is not False:
        problems.append(f"{where}: automountServiceAccountToken must be false (only the scheduler uses the API)")
    if not any(o["kind"] == "Service" and _selects(o["spec"].get("selector"), labels) for o in objects):
        problems.append(f"{where}: no Service selects its pods")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for container in spec.get("containers", []):
        problems += _check_third_party_container(f"{where} container {container['name']}", container, deployment, volumes, third_party)
    return problems


def _check_third_party_container(
    cwhere: str, container: Mapping[str, Any], deployment: Mapping[str, Any], volumes: Mapping[str, Any], third_party: ThirdParty
) -> list[str]:
    """One container of a third-party image: pinned, hardened, its port, probes, writable paths, GPU."""
    problems: list[str] = []
    spec = deployment["spec"]["template"]["spec"]
    problems += check_image_pinned(container.get("image", ""), third_party, cwhere)
    security = container.get("securityContext") or {}
    if security.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{cwhere}: allowPrivilegeEscalation must be false")
    if security.get("readOnlyRootFilesystem") is not True:
        problems.append(f"{cwhere}: readOnlyRootFilesystem must be true")
    if "ALL" not in ((security.get("capabilities") or {}).get("drop") or []):
        problems.append(f"{cwhere}: capabilities must drop ALL")
    if security.get("privileged"):
        problems.append(f"{cwhere}: must not be privileged")
    resources = container.get("resources") or {}
    for part in ("requests", "limits"):
        if not {"cpu", "memory"} <= set(resources.get(part) or {}):
            problems.append(f"{cwhere}: resources.{part} must set cpu and memory")
    ports = {p["containerPort"] for p in container.get("ports", [])}
    if ports != {third_party.port}:
        problems.append(f"{cwhere}: containerPorts {sorted(ports)} differ from {third_party.image}'s {[third_party.port]}")
    ports_of_it = {third_party.port} | _port_names(deployment, third_party.port)
    for probe in ("livenessProbe", "readinessProbe"):
        spec_ = container.get(probe) or {}
        if third_party.health_path:
            http = spec_.get("httpGet") or {}
            if http.get("path") != third_party.health_path or http.get("port") not in ports_of_it:
                problems.append(f"{cwhere}: {probe} must be an httpGet probe of {third_party.health_path} on {third_party.port}")
            continue
        command = (spec_.get("exec") or {}).get("command")
        tcp = (spec_.get("tcpSocket") or {}).get("port")
        if command != list(third_party.healthcheck) and tcp not in ports_of_it:
            problems.append(f"{cwhere}: {probe} must run {list(third_party.healthcheck)} or be a tcpSocket probe on {third_party.port}")
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
    for path in third_party.writable:
        mount = mounts.get(path)
        if mount is None or mount.get("readOnly") or "emptyDir" not in volumes.get(mount["name"], {}):
            problems.append(f"{cwhere}: {path} must be a writable emptyDir (the root filesystem is read-only)")
    if third_party.gpu:
        limits = resources.get("limits") or {}
        if "nvidia.com/gpu" not in limits or not (spec.get("tolerations") and spec.get("nodeSelector")):
            problems.append(f"{cwhere}: {third_party.image} needs an nvidia.com/gpu limit, and its pod tolerations and a nodeSelector")
    return problems


def _check_deployment(
    deployment: dict[str, Any],
    objects: list[dict[str, Any]],
    contracts_: Mapping[str, ServiceContract],
    service_ports: Mapping[str, set[int]],
    gpu: bool,
) -> list[str]:
    problems = []
    name = deployment["metadata"]["name"]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"].get("labels", {})
    spec = pod["spec"]
    kind = labels.get("app.kubernetes.io/name")
    where = f"Deployment {name}"
    if kind not in contracts_:
        return [f"{where}: label app.kubernetes.io/name={kind} is not a Switchboard service"]
    contract = contracts_[kind]
    pod_security = spec.get("securityContext") or {}
    if pod_security.get("runAsNonRoot") is not True:
        problems.append(f"{where}: pod securityContext.runAsNonRoot must be true")
    if (pod_security.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        problems.append(f"{where}: pod seccompProfile must be RuntimeDefault")
    # Only the scheduler talks to the Kubernetes API; no other pod gets a token.
    if kind != "scheduler" and spec.get("automountServiceAccountToken") is not False:
        problems.append(f"{where}: automountServiceAccountToken must be false (only the scheduler uses the API)")
    account = spec.get("serviceAccountName")
    if not any(o["kind"] == "ServiceAccount" and o["metadata"]["name"] == account for o in objects):
        problems.append(f"{where}: serviceAccountName {account} has no ServiceAccount")
    for companion in ("Service", "PodDisruptionBudget"):
        if not any(o["kind"] == companion and _selects(o["spec"].get("selector"), labels) for o in objects):
            problems.append(f"{where}: no {companion} selects its pods")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    sidecars = {c["name"]: c for c in spec.get("containers", []) if c["name"] != kind}
    for container in spec.get("containers", []):
        cwhere = f"{where} container {container['name']}"
        sidecar = THIRD_PARTY.get(container["name"])
        if container["name"] in sidecars:
            if sidecar is None or not sidecar.sidecar:
                problems.append(f"{cwhere}: a {kind} pod's other containers must be allowed sidecars (THIRD_PARTY), not {container['name']}")
            else:
                problems += _check_third_party_container(cwhere, container, deployment, volumes, sidecar)
            continue
        env, placeholders, env_problems = _container_env(container)
        problems += [f"{cwhere}: {p}" for p in env_problems]
        problems += check_env(contract, env, cwhere, placeholders)
        security = container.get("securityContext") or {}
        if security.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{cwhere}: allowPrivilegeEscalation must be false")
        if security.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{cwhere}: readOnlyRootFilesystem must be true")
        if "ALL" not in ((security.get("capabilities") or {}).get("drop") or []):
            problems.append(f"{cwhere}: capabilities must drop ALL")
        resources = container.get("resources") or {}
        for part in ("requests", "limits"):
            if not {"cpu", "memory"} <= set(resources.get(part) or {}):
                problems.append(f"{cwhere}: resources.{part} must set cpu and memory")
        port = contract.port_in(env)
        ports = {p["containerPort"] for p in container.get("ports", [])}
        if ports != contract.listening_ports_in(env):
            problems.append(f"{cwhere}: containerPorts {sorted(ports)} differ from the service's {sorted(contract.listening_ports_in(env))}")
        probe_command = ["python", "-m", HEALTHCHECK_MODULE, f"127.0.0.1:{port}"]
        secure = bool(tls_files(env))
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            spec_ = container.get(probe)
            if spec_ is None and probe == "startupProbe":
                continue
            grpc_probe = (spec_ or {}).get("grpc")
            command = ((spec_ or {}).get("exec") or {}).get("command")
            if secure and command != probe_command:
                # Kubelet's grpc probes speak plaintext only: no TLS, no client certificate.
                problems.append(f"{cwhere}: {probe} must be an exec probe running {probe_command} (the service runs TLS)")
            elif not secure and command != probe_command and (not grpc_probe or grpc_probe.get("port") != port):
                problems.append(f"{cwhere}: {probe} must be a native grpc probe on port {port} ({contract.port_env}) or run {probe_command}")
            if command is not None and (spec_ or {}).get("timeoutSeconds", 1) < 3:
                problems.append(f"{cwhere}: {probe} runs a Python process: timeoutSeconds must be at least 3")
        problems += check_tls_mode(cwhere, kind, env)
        problems += _check_k8s_tls(cwhere, kind, env, container, spec, objects)
        pre_stop = (((container.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {}).get("seconds", 0)
        grace = spec.get("terminationGracePeriodSeconds", 30)
        if grace <= contract.drain_in(env) + pre_stop:
            problems.append(
                f"{where}: terminationGracePeriodSeconds {grace} must exceed {contract.drain_env}={contract.drain_in(env)} "
                f"+ preStop sleep {pre_stop}"
            )
        for variable in ("ROUTER_ADDR", "SCHEDULER_ADDR"):
            if variable in env:
                host, _, addr_port = env[variable].rpartition(":")
                if int(addr_port) not in service_ports.get(host.split(".")[0], set()):
                    problems.append(f"{cwhere}: {variable}={env[variable]} names no Service with that port")
        if env.get("REDIS_URL"):
            address = redis_address(env["REDIS_URL"])
            if address is None or address[1] not in service_ports.get(address[0].split(".")[0], set()):
                problems.append(f"{cwhere}: REDIS_URL={env['REDIS_URL']} names no Service with that port")
        if kind == "generator" and env.get("GENERATOR_BACKEND") == "remote":
            problems += _check_k8s_remote(cwhere, env, container, sidecars, service_ports)
        elif kind == "generator":
            wants_gpu = "nvidia.com/gpu" in (resources.get("limits") or {})
            if gpu and not (wants_gpu and spec.get("tolerations") and spec.get("nodeSelector")):
                problems.append(f"{cwhere}: a GPU generator needs an nvidia.com/gpu limit, tolerations and a nodeSelector")
            if gpu != wants_gpu:
                problems.append(f"{cwhere}: nvidia.com/gpu limit {'missing' if gpu else 'set on a CPU overlay'}")
            device = env.get("GENERATOR_DEVICE", "auto")
            if gpu != device.startswith("cuda"):
                problems.append(f"{cwhere}: GENERATOR_DEVICE={device} does not fit a {'GPU' if gpu else 'CPU'} overlay")
    return problems


def _check_k8s_remote(
    where: str, env: Mapping[str, str], container: Mapping[str, Any], sidecars: Mapping[str, Any], service_ports: Mapping[str, set[int]]
) -> list[str]:
    """A remote generator holds no GPU (its engine does) and GENERATOR_REMOTE_URL names its engine:
    a sidecar of its pod on localhost, or a Service with that port."""
    problems = []
    if "nvidia.com/gpu" in ((container.get("resources") or {}).get("limits") or {}):
        problems.append(f"{where}: a remote generator loads no model: the nvidia.com/gpu limit belongs to its engine")
    url = env.get("GENERATOR_REMOTE_URL", "")
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return [*problems, f"{where}: GENERATOR_REMOTE_URL={url} has no valid port"]
    host = parts.hostname or ""
    if host in ("127.0.0.1", "localhost", "::1"):
        engines = [c for c in sidecars.values() if any(p["containerPort"] == port for p in c.get("ports", []))]
        if not engines:
            problems.append(f"{where}: GENERATOR_REMOTE_URL={url} names no container of its pod listening there")
    elif port not in service_ports.get(host.split(".")[0], set()):
        problems.append(f"{where}: GENERATOR_REMOTE_URL={url} names no Service with that port")
    return problems


def _check_k8s_tls(
    where: str, kind: str, env: Mapping[str, str], container: Mapping[str, Any], spec: Mapping[str, Any], objects: list[dict[str, Any]]
) -> list[str]:
    """Every Switchboard container runs mutual TLS; each TLS file is in a read-only Secret volume that a
    cert-manager Certificate fills, issued to the container's role (internal) or naming it (public)."""
    problems = []
    if not all(env.get(v) for v in TLS_ENV):
        problems.append(f"{where}: SWITCHBOARD_TLS_* must be set (every internal hop runs mutual TLS)")
    mounts = container.get("volumeMounts") or []
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    certificates = {c["spec"].get("secretName"): c for c in _certificates(objects)}
    for variable, path in tls_files(env).items():
        mount = next((m for m in mounts if path.startswith(m["mountPath"].rstrip("/") + "/")), None)
        secret = ((volumes.get(mount["name"]) or {}).get("secret") or {}).get("secretName") if mount else None
        if mount is None or not mount.get("readOnly") or secret is None:
            problems.append(f"{where}: {variable}={path} is not in a read-only Secret volume")
            continue
        certificate = certificates.get(secret)
        if certificate is None:
            problems.append(f"{where}: {variable}: Secret {secret} is filled by no Certificate")
            continue
        if Path(path).name not in {"ca.crt", "tls.crt", "tls.key"}:
            problems.append(f"{where}: {variable}={path}: a cert-manager Secret holds ca.crt, tls.crt and tls.key only")
        name = certificate["metadata"]["name"]
        if variable in TLS_ENV and certificate["spec"].get("commonName") != kind:
            problems.append(f"{where}: {variable}: Certificate {name} has commonName {certificate['spec'].get('commonName')!r}, not {kind!r}")
        if kind not in (certificate["spec"].get("dnsNames") or []):
            problems.append(f"{where}: {variable}: Certificate {name} does not name {kind!r} (the name clients and probes verify)")
    return problems


def check_no_dev_tenants(objects: list[dict[str, Any]], dev_tenants: str, where: str) -> list[str]:
    """No object carries a key hash of the development tenants file (Secrets' data decoded)."""
    import base64

    hashes = set(re.findall(r"\b[0-9a-f]{64}\b", dev_tenants))
    problems = []
    for obj in objects:
        texts = [yaml.safe_dump(obj)]
        for value in (obj.get("data") or {}).values() if obj.get("kind") == "Secret" else []:
            texts.append(base64.b64decode(value).decode(errors="replace"))
        if any(h in text for h in hashes for text in texts):
            problems.append(f"{where}: {obj['kind']} {obj['metadata']['name']} holds the development key hash (compose/dev-tenants.yaml)")
    return problems


def _certificates(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if o.get("kind") == "Certificate" and str(o.get("apiVersion", "")).startswith(f"{CERT_MANAGER_GROUP}/")]


def check_certificates(objects: list[dict[str, Any]]) -> list[str]:
    """The cert-manager Certificates (no schema of them is offline): issuer, names, usages, key, Secret.

    Each is issued by the Issuer `switchboard-ca`; an internal identity's common name is its role
    and its DNS names are the role and its Service's names; the public one serves only.
    """
    problems = []
    services = {o["metadata"]["name"]: o for o in objects if o.get("kind") == "Service"}
    secrets: dict[str, str] = {}
    for certificate in _certificates(objects):
        name = certificate["metadata"]["name"]
        where = f"Certificate {name}"
        spec = certificate.get("spec") or {}
        namespace = certificate["metadata"].get("namespace", "default")
        if certificate["apiVersion"] != f"{CERT_MANAGER_GROUP}/v1":
            problems.append(f"{where}: apiVersion {certificate['apiVersion']} is not {CERT_MANAGER_GROUP}/v1")
        unknown = sorted(set(spec) - {"secretName", "commonName", "dnsNames", "usages", "duration", "renewBefore", "privateKey", "issuerRef", "isCA"})
        if unknown:
            problems.append(f"{where}: unknown spec fields {unknown}")
        issuer = spec.get("issuerRef") or {}
        if spec.get("isCA"):
            continue  # a CA bootstrap of an overlay (compose/k8s/dev)
        if issuer.get("name") != ISSUER or issuer.get("kind", "Issuer") != "Issuer" or issuer.get("group", CERT_MANAGER_GROUP) != CERT_MANAGER_GROUP:
            problems.append(f"{where}: issuerRef {issuer} is not the Issuer {ISSUER} (the cluster's CA)")
        secret = spec.get("secretName")
        if not secret:
            problems.append(f"{where}: no secretName")
        elif secret in secrets:
            problems.append(f"{where}: secretName {secret} is also Certificate {secrets[secret]}'s")
        else:
            secrets[secret] = name
        usages = set(spec.get("usages") or [])
        dns = spec.get("dnsNames") or []
        role = spec.get("commonName")
        if "server auth" not in usages:
            problems.append(f"{where}: usages {sorted(usages)} lack server auth")
        if role is not None:
            if role not in SERVICES:
                problems.append(f"{where}: commonName {role!r} is not a service role {list(SERVICES)}")
            if "client auth" not in usages:
                problems.append(f"{where}: usages {sorted(usages)} lack client auth (an internal identity is also a client)")
        expected = role or (dns[0] if dns else "")
        if expected not in dns:
            problems.append(f"{where}: dnsNames {dns} lack the role {expected!r}")
        if expected not in services:
            problems.append(f"{where}: no Service {expected!r} for its names")
        elif f"{expected}.{namespace}.svc.cluster.local" not in dns:
            problems.append(f"{where}: dnsNames {dns} lack {expected}.{namespace}.svc.cluster.local")
        key = spec.get("privateKey") or {}
        if key.get("algorithm") not in ("ECDSA", "Ed25519") and int(key.get("size", 2048)) < 2048:
            problems.append(f"{where}: privateKey {key} is too weak")
    return problems


def _rule_ports(rule: Mapping[str, Any]) -> set[int | str] | None:
    """The ports an ingress rule opens; None for every port."""
    return {p["port"] for p in rule["ports"]} if rule.get("ports") else None


def _check_network_policies(
    objects: list[dict[str, Any]], deployments: list[dict[str, Any]], contracts_: Mapping[str, ServiceContract]
) -> list[str]:
    problems = []
    policies = _by_kind(objects, "NetworkPolicy")
    if not any(p["spec"].get("podSelector") in ({}, None) and "ingress" not in p["spec"] for p in policies):
        problems.append("no default-deny ingress NetworkPolicy (podSelector {} with no ingress rules)")
    problems += _check_public_ports(policies, deployments, contracts_)
    for kind, third_party in THIRD_PARTY.items():
        for deployment in (d for d in deployments if _pod_kind(d) == kind):
            problems += _check_only_clients(policies, deployment, third_party)
    for deployment in deployments:
        for container in deployment["spec"]["template"]["spec"].get("containers", []):
            sidecar = THIRD_PARTY.get(container["name"])
            if sidecar is not None and sidecar.sidecar and _pod_kind(deployment) != container["name"]:
                problems += _check_sidecar_ingress(policies, deployment, sidecar)
    for policy in policies:
        for rule in policy["spec"].get("ingress") or []:
            if not _open_to_all(rule):
                continue
            selected = [
                d["metadata"]["name"]
                for d in deployments
                if _selects(policy["spec"].get("podSelector"), d["spec"]["template"]["metadata"].get("labels", {}))
            ]
            if selected != ["gateway"]:
                problems.append(f"NetworkPolicy {policy['metadata']['name']} opens {selected} to any source; only the gateway may be")
    return problems


def _open_to_all(rule: Mapping[str, Any]) -> bool:
    return not rule.get("from") or any((peer.get("ipBlock") or {}).get("cidr") in ("0.0.0.0/0", "::/0") for peer in rule["from"])


def _check_public_ports(
    policies: list[dict[str, Any]], deployments: list[dict[str, Any]], contracts_: Mapping[str, ServiceContract]
) -> list[str]:
    """The gateway's gRPC and HTTP ports, and no other, are open to any source."""
    problems = []
    for deployment in (d for d in deployments if _pod_kind(d) == "gateway"):
        labels = deployment["spec"]["template"]["metadata"].get("labels", {})
        opened: set[int | str] = set()
        for policy in (p for p in policies if _selects(p["spec"].get("podSelector"), labels)):
            for rule in policy["spec"].get("ingress") or []:
                if _open_to_all(rule):
                    ports = _rule_ports(rule)
                    if ports is None:
                        problems.append(f"NetworkPolicy {policy['metadata']['name']} opens every gateway port to any source")
                    else:
                        opened |= ports
        for container in deployment["spec"]["template"]["spec"].get("containers", []):
            expected = contracts_["gateway"].traffic_ports_in(_container_env(container)[0])
            if opened != expected:
                problems.append(
                    f"Deployment {deployment['metadata']['name']}: ports {sorted(map(str, opened))} are open to any source, "
                    f"expected the gateway's gRPC and HTTP ports {sorted(expected)}"
                )
    return problems


def _check_sidecar_ingress(policies: list[dict[str, Any]], deployment: dict[str, Any], sidecar: ThirdParty) -> list[str]:
    """A sidecar engine is reached over localhost by its pod's service: its port accepts Prometheus
    (namespace monitoring) only, and only when it has metrics."""
    problems = []
    labels = deployment["spec"]["template"]["metadata"].get("labels", {})
    port_names = _port_names(deployment, sidecar.port)
    for policy in (p for p in policies if _selects(p["spec"].get("podSelector"), labels)):
        for rule in policy["spec"].get("ingress") or []:
            ports = _rule_ports(rule)
            if ports is not None and not ports & ({sidecar.port} | port_names):
                continue
            peers = rule.get("from") or [{}]
            if not sidecar.metrics or any(peer != MONITORING_PEER for peer in peers):
                problems.append(
                    f"NetworkPolicy {policy['metadata']['name']}: opens {deployment['metadata']['name']}'s {sidecar.image} port "
                    f"{sidecar.port} to {peers}; its generator uses localhost, only Prometheus (namespace monitoring) may scrape it"
                )
    return problems


def _check_only_clients(policies: list[dict[str, Any]], deployment: dict[str, Any], third_party: ThirdParty) -> list[str]:
    """A third-party store accepts its port from its clients' pods only, and from them at least."""
    problems = []
    labels = deployment["spec"]["template"]["metadata"].get("labels", {})
    name = deployment["metadata"]["name"]
    port_names = _port_names(deployment, third_party.port)
    allowed: set[str] = set()
    for policy in (p for p in policies if _selects(p["spec"].get("podSelector"), labels)):
        for rule in policy["spec"].get("ingress") or []:
            ports = _rule_ports(rule)
            if ports is not None and not ports & ({third_party.port} | port_names):
                continue
            peers = rule.get("from") or [{}]
            for peer in peers:
                client = ((peer.get("podSelector") or {}).get("matchLabels") or {}).get("app.kubernetes.io/name")
                if set(peer) != {"podSelector"} or client not in third_party.clients:
                    problems.append(
                        f"NetworkPolicy {policy['metadata']['name']}: lets {peer or 'any source'} reach {name}:{third_party.port}; "
                        f"only {list(third_party.clients)} pods may"
                    )
                else:
                    allowed.add(client)
    for client in sorted(set(third_party.clients) - allowed):
        problems.append(f"no NetworkPolicy lets {client} pods reach {name}:{third_party.port} (ingress is denied by default)")
    return problems


def _check_rbac(objects: list[dict[str, Any]], deployments: list[dict[str, Any]]) -> list[str]:
    problems = []
    for kind in ("ClusterRole", "ClusterRoleBinding"):
        for obj in _by_kind(objects, kind):
            problems.append(f"{kind} {obj['metadata']['name']}: Switchboard needs no cluster-wide permission")
    generators = {
        d["metadata"]["name"] for d in deployments if d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/name") == "generator"
    }
    scalable: set[str] = set()
    # The opt-in revision deployer (compose/k8s/rollouts) may create, read and delete Deployments
    # and patch any Deployment's scale, in one Role of exactly those rules, and only where the
    # scheduler is told to deploy revisions.
    deploys = any(
        _container_env(c)[0].get("SCHEDULER_ROLLOUT_DEPLOYER") == "kubernetes"
        for d in deployments
        if d["metadata"]["name"] == "scheduler"
        for c in d["spec"]["template"]["spec"]["containers"]
    )
    deployer_rules = [
        {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "create", "delete"]},
        {"apiGroups": ["apps"], "resources": ["deployments/scale"], "verbs": ["patch"]},
    ]
    for role in _by_kind(objects, "Role"):
        if role.get("rules") == deployer_rules:
            if not deploys:
                problems.append(
                    f"Role {role['metadata']['name']}: deploys revisions, but the scheduler's SCHEDULER_ROLLOUT_DEPLOYER "
                    "is not kubernetes"
                )
            continue
        for rule in role.get("rules", []):
            rwhere = f"Role {role['metadata']['name']}"
            if set(rule.get("apiGroups", [])) != {"apps"} or not set(rule.get("resources", [])) <= {"deployments", "deployments/scale"}:
                problems.append(f"{rwhere}: grants {rule.get('apiGroups')}/{rule.get('resources')}; only apps deployments(/scale)")
            if not set(rule.get("verbs", [])) <= {"get", "list", "patch"}:
                problems.append(f"{rwhere}: verbs {rule.get('verbs')} exceed get/list/patch")
            if "patch" in rule.get("verbs", []):
                names = set(rule.get("resourceNames") or [])
                if not names or not names <= generators:
                    problems.append(f"{rwhere}: patch must be limited to generator Deployments {sorted(generators)}, got {sorted(names) or 'all'}")
                scalable |= names
    missing = generators - scalable
    if missing:
        problems.append(f"the scheduler cannot scale generator Deployments {sorted(missing)}")
    bindings = _by_kind(objects, "RoleBinding")
    bound = {s["name"] for b in bindings for s in b.get("subjects", []) if s.get("kind") == "ServiceAccount"}
    if bound != {"scheduler"}:
        problems.append(f"RoleBindings grant permissions to service accounts {sorted(bound)}; only the scheduler needs any")
    return problems


# --------------------------------------------------------------------------- Prometheus


PROMTOOL_CACHE = REPO / ".cache" / "tools" / "prometheus"


def ensure_promtool(cache: Path = PROMTOOL_CACHE) -> Path:
    """promtool from Debian's `prometheus` package, unpacked by `make promtool` (make test runs it).

    No Prometheus release is on PyPI; apt is reachable wherever the project is
    built (/work/shared/TOOLS.md), and the package is only downloaded and
    unpacked, never installed.
    """
    promtool = cache / "usr" / "bin" / "promtool"
    if not promtool.exists():
        raise AssertionError(f"promtool is missing at {promtool}: run `make promtool` (make test does)")
    return promtool


def promtool(args: list[str], cwd: Path | None = None) -> list[str]:
    """Run promtool; its output lines as problems when it fails."""
    result = subprocess.run(
        [str(ensure_promtool()), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )
    if result.returncode != 0:
        return [line for line in (result.stdout + result.stderr).splitlines() if line.strip()] or ["promtool failed"]
    return []


# --------------------------------------------------------------------------- image contents


# Imports an image may lack on purpose, and why.
# Imports a service may make of a package its image does not copy (none: services are given
# model folders and import no CLI/tools package; tests/test_layering.py keeps it so).
OPTIONAL_IMPORTS: dict[str, set[str]] = {}


def image_requirement_files(dockerfile: Path) -> list[str]:
    """The requirements/*.txt files a Dockerfile installs (besides constraints)."""
    text = "\n".join(f"{i.keyword} {i.args}" for i in parse_dockerfile(dockerfile) if i.keyword == "RUN")
    return sorted(set(re.findall(r"-r\s+(requirements/\S+\.txt)", text)))


def image_libs(dockerfile: Path) -> list[str]:
    """The shared libraries (`libs/<name>`) a Dockerfile copies into its image."""
    copies = [i.args for i in parse_dockerfile(dockerfile) if i.keyword == "COPY"]
    return sorted({m for args in copies for m in re.findall(r"(?:^|\s)libs/([\w-]+)(?=\s|/|$)", args)})


def lib_packages(repo: Path, libs: Iterable[str]) -> set[str]:
    """The `switchboard.*` packages those libraries hold (their src/switchboard/ subfolders)."""
    return {
        f"switchboard.{pkg.name}"
        for lib in libs
        for pkg in (repo / "libs" / lib / "src" / "switchboard").iterdir()
        if pkg.is_dir() and not pkg.name.startswith(("_", "."))
    }


def _distribution_closure(requirement_files: Iterable[Path]) -> set[str]:
    """Normalised names of the pinned distributions and everything they require (installed metadata)."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pending = []
    for path in requirement_files:
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line and not line.startswith("-"):
                pending.append(Requirement(line).name)
    seen: set[str] = set()
    while pending:
        name = canonicalize_name(pending.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for spec in requires:
            requirement = Requirement(spec)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(requirement.name)
    return seen


@functools.cache
def _module_owners() -> dict[str, frozenset[str]]:
    """Importable module name -> normalised names of the installed distributions that ship it.

    Read from the distributions' file lists (RECORD), so nothing is imported: a
    file `google/rpc/status_pb2.py` makes `google.rpc.status_pb2`, `google.rpc`
    and `google` modules of googleapis-common-protos.
    """
    from importlib import metadata

    from packaging.utils import canonicalize_name

    owners: dict[str, set[str]] = {}
    for dist in metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        for file in dist.files or []:
            parts = file.parts
            if not parts or parts[0].endswith((".dist-info", ".data")) or parts[0] in ("..", "bin"):
                continue
            if file.suffix not in (".py", ".so", ".pyd"):
                continue
            module = [*parts[:-1], parts[-1].split(".")[0]]
            if module[-1] == "__init__":
                module = module[:-1]
            for depth in range(1, len(module) + 1):
                owners.setdefault(".".join(module[:depth]), set()).add(name)
    return {module: frozenset(names) for module, names in owners.items()}


def _imports(sources: Iterable[Path]) -> set[str]:
    """Absolute module names imported anywhere in the .py files under `sources`."""
    import ast

    names: set[str] = set()
    for source in sources:
        for path in source.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names.add(node.module)
    return names


def check_image_imports(
    service: str, sources: list[Path], requirement_files: list[Path], libs: Iterable[str] = ("common",), repo: Path | None = None
) -> list[str]:
    """Every module the image's code imports comes from the stdlib, our copied packages, or the pinned files.

    libs: the `libs/<name>` folders the Dockerfile copies (see `image_libs`).
    """
    root = repo or Path(__file__).resolve().parents[2]
    packages = {f"switchboard.{service}"} | lib_packages(root, libs)
    closure = _distribution_closure(requirement_files)
    owners = _module_owners()
    problems = []
    for name in sorted(_imports(sources)):
        top = name.split(".")[0]
        if top in sys.stdlib_module_names or top == "__future__":
            continue
        if top == "switchboard":
            if not any(name == p or name.startswith(p + ".") for p in packages) and name not in OPTIONAL_IMPORTS.get(service, set()):
                problems.append(f"{service}: imports {name}, a package its image does not copy")
            continue
        parts = name.split(".")
        owner_set = next((owners[".".join(parts[:n])] for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in owners), None)
        owner = None if owner_set is None else (sorted(owner_set & closure) or sorted(owner_set))[0]
        if owner is None:
            problems.append(f"{service}: imports {name}, which no installed distribution provides")
        elif owner not in closure:
            files = ", ".join(str(f) for f in requirement_files)
            problems.append(f"{service}: imports {name} from {owner}, which the image's {files} do not install")
    return problems
