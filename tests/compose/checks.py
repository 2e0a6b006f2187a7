"""What the compose check asserts, as pure functions of what the engine and the stack report.

Each returns a list of problems (empty when all is well), so the check of the running stack and
the tests that show a broken Dockerfile or compose file failing use the same code.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

SWITCHBOARD_SERVICES = ("gateway", "router", "scheduler", "generator")
# The gRPC server span each service records for the request (OpenTelemetry's grpc instrumentation).
SERVER_SPAN_PREFIX = {
    "gateway": "/switchboard.v1.Gateway/",
    "router": "/switchboard.v1.Router/",
    "scheduler": "/switchboard.v1.Scheduler/",
    "generator": "/switchboard.v1.Generator/",
}
ROOT_USERS = {"", "0", "root", "0:0", "root:root"}


def is_switchboard_image(image: str) -> bool:
    return any(f"/{name}:" in image for name in SWITCHBOARD_SERVICES)


def image_problems(name: str, inspect: Mapping[str, Any]) -> list[str]:
    """An image's own configuration (`image inspect`): non-root user, a healthcheck, a command."""
    problems = []
    config = inspect.get("Config") or {}
    user = str(config.get("User") or "")
    if user in ROOT_USERS or user.split(":")[0] in {"0", "root"}:
        problems.append(f"image {name} runs as root (USER {user or 'unset'}): set a numeric non-root USER")
    # Docker keeps the healthcheck in Config, podman beside it.
    health = config.get("Healthcheck") or inspect.get("Healthcheck") or {}
    if not health.get("Test") or health.get("Test") == ["NONE"]:
        problems.append(f"image {name} has no HEALTHCHECK")
    if not (config.get("Cmd") or config.get("Entrypoint")):
        problems.append(f"image {name} has no CMD or ENTRYPOINT")
    return problems


def container_problems(name: str, inspect: Mapping[str, Any]) -> list[str]:
    """A running Switchboard container: read-only root, non-root user, healthy."""
    problems = []
    host = inspect.get("HostConfig") or {}
    if not host.get("ReadonlyRootfs"):
        problems.append(f"container {name} has a writable root filesystem")
    user = str((inspect.get("Config") or {}).get("User") or "")
    if user in ROOT_USERS or user.split(":")[0] in {"0", "root"}:
        problems.append(f"container {name} runs as root (user {user or 'unset'})")
    health = ((inspect.get("State") or {}).get("Health") or {}).get("Status")
    if health != "healthy":
        problems.append(f"container {name} is not healthy (health {health!r})")
    return problems


def _service_names(config: Mapping[str, Any]) -> set[str]:
    names = set()
    for service, spec in (config.get("services") or {}).items():
        names.add(service)
        for network in (spec.get("networks") or {}).values():
            names.update((network or {}).get("aliases") or [])
    return names


def compose_problems(config: Mapping[str, Any]) -> list[str]:
    """A resolved compose config (`config --format json`): every Switchboard service healthchecked,
    hardened, and every address it is given (`*_ADDR`, OTLP and Redis endpoints) naming a service."""
    problems = []
    names = _service_names(config)
    for service, spec in sorted((config.get("services") or {}).items()):
        if not is_switchboard_image(str(spec.get("image", ""))):
            continue
        health = spec.get("healthcheck") or {}
        if health.get("disable") or not health.get("test"):
            problems.append(f"service {service} has no healthcheck")
        if not spec.get("read_only"):
            problems.append(f"service {service} does not have read_only: true")
        user = str(spec.get("user") or "")
        if user and (user in ROOT_USERS or user.split(":")[0] in {"0", "root"}):
            problems.append(f"service {service} runs as root (user {user})")
        for key, value in sorted((spec.get("environment") or {}).items()):
            host = _address_host(key, str(value or ""))
            if host is not None and host not in names:
                problems.append(
                    f"service {service}: {key}={value} names {host!r}, which is no service of this stack"
                )
    return problems


def _address_host(key: str, value: str) -> str | None:
    """The host an address setting points at, or None for a setting that is not an address."""
    if not value:
        return None
    if key.endswith("_ADDR"):
        return value.rsplit(":", 1)[0]
    if key in ("REDIS_URL", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        rest = value.split("://", 1)[-1]
        return rest.split("/", 1)[0].rsplit("@", 1)[-1].rsplit(":", 1)[0]
    return None


def traces_spanning(
    spans: Iterable[Mapping[str, Any]], services: Iterable[str] = SWITCHBOARD_SERVICES
) -> list[str]:
    """Trace ids holding a server span of every one of `services` (trace viewer's span list)."""
    seen: dict[str, set[str]] = defaultdict(set)
    for span in spans:
        trace = (span.get("context") or {}).get("trace_id")
        name = str(span.get("name", ""))
        for service, prefix in SERVER_SPAN_PREFIX.items():
            if trace and name.startswith(prefix):
                seen[trace].add(service)
    wanted = set(services)
    return sorted(trace for trace, found in seen.items() if wanted <= found)


def target_problems(targets: Iterable[Mapping[str, Any]], jobs: Iterable[str]) -> list[str]:
    """Prometheus' active targets: every job present and every target up."""
    problems = []
    found = defaultdict(list)
    for target in targets:
        job = (target.get("labels") or {}).get("job", "?")
        found[job].append(target)
        if target.get("health") != "up":
            problems.append(
                f"target {target.get('scrapeUrl')} of job {job} is {target.get('health')}: {target.get('lastError')}"
            )
    problems += [f"Prometheus scrapes no target of job {job}" for job in jobs if job not in found]
    return problems
