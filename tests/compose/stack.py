"""One compose project driven through the project's pinned docker-compose, on a given engine."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from engine import Engine, EngineError

REPO = Path(__file__).resolve().parents[2]
COMPOSE = str(Path(sys.executable).with_name("docker-compose"))
IMAGE_PREFIX = "localhost/switchboard"

# The files users run, plus the override that swaps the third-party images for ones built here.
STACK_FILES = (
    "compose/compose.yaml",
    "compose/compose.observability.yaml",
    "compose/compose.local.yaml",
    "compose/compose.replicas.yaml",
)


@dataclass
class ComposeStack:
    engine: Engine
    project: str
    files: tuple[Path, ...]
    env: dict[str, str]

    @classmethod
    def of(
        cls, engine: Engine, project: str, files: list[Path], models_dir: Path, **extra: str
    ) -> ComposeStack:
        env = {
            **engine.env,
            **engine.build_env,
            "SWITCHBOARD_IMAGE_PREFIX": IMAGE_PREFIX,
            "SWITCHBOARD_MODELS_DIR": str(models_dir),
            "COMPOSE_PROFILES": "cpu",
            **extra,
        }
        return cls(engine, project, tuple(files), env)

    def compose(
        self, *args: str, timeout: float = 300.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        command = [COMPOSE, "--project-name", self.project]
        for file in self.files:
            command += ["-f", str(file)]
        try:
            done = subprocess.run(
                [*command, *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise EngineError(f"docker-compose {' '.join(args)}: no end within {timeout:.0f} s") from exc
        if check and done.returncode != 0:
            raise EngineError(
                f"docker-compose {' '.join(args)} failed (exit {done.returncode}):\n{done.stderr[-4000:]}"
            )
        return done

    def config(self) -> dict:
        return json.loads(self.compose("config", "--format", "json").stdout)

    def build(self, *services: str, timeout: float = 1800.0) -> None:
        self.compose("build", *services, timeout=timeout)

    def up(self, *services: str, timeout: float = 300.0) -> None:
        """Start and wait until every started container is healthy (fails on one that exits)."""
        with self.engine.healthchecks(self.project):
            self.compose(
                "up",
                "--detach",
                "--no-build",
                "--wait",
                "--wait-timeout",
                str(int(timeout)),
                *services,
                timeout=timeout + 30,
            )

    def containers(self, all_: bool = True) -> list[dict]:
        """`docker-compose ps` as JSON: one dict per container (Service, Name, State, ExitCode, ...)."""
        out = self.compose("ps", "--format", "json", *(["--all"] if all_ else [])).stdout.strip()
        if not out:
            return []
        if out.startswith("["):
            return json.loads(out)
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def container(self, service: str) -> str:
        names = [c["Name"] for c in self.containers() if c["Service"] == service]
        if len(names) != 1:
            raise EngineError(f"service {service}: expected one container, found {names}")
        return names[0]

    def stop(self, timeout: float = 120.0) -> float:
        """Stop every container (SIGTERM, then SIGKILL after its grace period); seconds taken."""
        started = time.monotonic()
        self.compose("stop", timeout=timeout)
        return time.monotonic() - started

    def down(self) -> None:
        self.compose("down", "--volumes", "--remove-orphans", timeout=180)

    def leftovers(self) -> list[str]:
        """Containers, networks and volumes of this project the engine still has."""
        label = f"label=com.docker.compose.project={self.project}"
        found = []
        for kind, fmt in (("ps", "{{.Names}}"), ("network", "{{.Name}}"), ("volume", "{{.Name}}")):
            args = ["ps", "--all"] if kind == "ps" else [kind, "ls"]
            names = self.engine.run(*args, "--filter", label, "--format", fmt).split()
            found += [f"{'container' if kind == 'ps' else kind} {n}" for n in names]
        return found


def copy_compose_folder(target: Path) -> Path:
    """A copy of compose/ (and config/experts.yaml beside it, as compose.yaml mounts ../config)."""
    shutil.copytree(
        REPO / "compose", target / "compose", ignore=shutil.ignore_patterns("models", "certs", "k8s")
    )
    (target / "config").mkdir()
    shutil.copy(REPO / "config/experts.yaml", target / "config/experts.yaml")
    return target / "compose"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def publish(ports: dict[str, int]) -> dict[str, str]:
    """Where the stack publishes its ports: free loopback ports, never the defaults a developer uses."""
    return {
        "GATEWAY_PUBLISH": f"127.0.0.1:{ports['grpc']}",
        "GATEWAY_HTTP_PUBLISH": f"127.0.0.1:{ports['http']}",
        "TRACES_PUBLISH": f"127.0.0.1:{ports['traces']}",
        "PROMETHEUS_PUBLISH": f"127.0.0.1:{ports['prometheus']}",
    }
