"""The local-process actuator: starts and stops generator processes of the local stack on this machine.

It runs inside the scheduler process that `switchboard up` (or a test's `LocalStack`) started,
and launches each new replica as that command launches one: `python -m switchboard.generator` with
the generator environment of its expert, read from the *generator template*, a JSON file that the
tools write from the very `ServiceSpec` of the stack's generators
(`switchboard.cli.localstack.write_generator_template`, named by SCHEDULER_LOCAL_GENERATORS_FILE):

    {"version": 1, "argv": ["/venv/bin/python", "-m", "switchboard.generator"],
     "log_dir": "...", "pki_dir": "..." | null, "grace_seconds": 10.0,
     "experts": {"bard-small": {"env": {"GENERATOR_MODEL": "...", "GENERATOR_EXPERT": "bard-small", ...},
                                "replicas": ["bard-small-0"]}}}

Per new replica it sets what differs between replicas: `GENERATOR_REPLICA_ID` (`<expert>-auto-<n>`),
`GENERATOR_PORT` and `GENERATOR_METRICS_PORT` (free ports; 0 stays 0), and, on a mutual-TLS stack,
a certificate for `generator/<replica id>` issued by the stack's local CA in `pki_dir` (the
scheduler binds a replica id to the identity that registered it). The process inherits the
scheduler's environment under that, writes `<log_dir>/generator-<id>.log` (and `.stderr.log`) like
the stack's own, and registers itself with the scheduler once its model is loaded.

It stops only the processes it started (`can_remove`): SIGTERM (the generator drains and
deregisters), then SIGKILL after `grace_seconds`. `close()` stops all of them; they also get
SIGTERM if the scheduler process dies (Linux `PR_SET_PDEATHSIG`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

from switchboard.common.launch import launch_env, launched
from switchboard.common.logging import get_logger
from switchboard.scheduler.actuators import ActuatorError

log = get_logger(__name__)

TEMPLATE_VERSION = 1
# Set per replica by the actuator, never taken from the template.
PER_REPLICA_ENV = (
    "GENERATOR_REPLICA_ID",
    "GENERATOR_PORT",
    "SWITCHBOARD_TLS_CERT_FILE",
    "SWITCHBOARD_TLS_KEY_FILE",
)


@dataclass(frozen=True)
class GeneratorTemplate:
    """How to start a generator of each expert (see the module docstring)."""

    argv: tuple[str, ...]
    experts: Mapping[str, Mapping[str, str]]  # expert -> its environment, less PER_REPLICA_ENV
    log_dir: Path
    pki_dir: Path | None = None
    grace_seconds: float = 10.0
    # expert -> ids of the generators the stack itself starts (counted as starting until they register).
    replicas: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        """The file form."""
        return {
            "version": TEMPLATE_VERSION,
            "argv": list(self.argv),
            "log_dir": str(self.log_dir),
            "pki_dir": str(self.pki_dir) if self.pki_dir is not None else None,
            "grace_seconds": self.grace_seconds,
            "experts": {
                name: {"env": dict(env), "replicas": list(self.replicas.get(name, ()))}
                for name, env in sorted(self.experts.items())
            },
        }

    def write(self, path: Path) -> Path:
        """Write the file (0600: it names the CA folder) atomically."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(self.to_json(), handle, indent=1)
        os.replace(tmp, path)
        return path

    @classmethod
    def read(cls, path: Path) -> GeneratorTemplate:
        """Read a template file; ValueError naming the problem."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"generator template {path}: cannot be read as JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("version") != TEMPLATE_VERSION:
            raise ValueError(f"generator template {path}: not a version {TEMPLATE_VERSION} template")
        try:
            experts = {
                str(name): {str(k): str(v) for k, v in spec["env"].items() if k not in PER_REPLICA_ENV}
                for name, spec in data["experts"].items()
            }
            replicas = {str(name): tuple(str(r) for r in spec.get("replicas", ())) for name, spec in data["experts"].items()}
            argv = tuple(str(a) for a in data["argv"])
            if not argv:
                raise ValueError("argv is empty")
            return cls(
                argv=argv,
                experts=experts,
                log_dir=Path(data["log_dir"]),
                pki_dir=Path(data["pki_dir"]) if data.get("pki_dir") else None,
                grace_seconds=float(data.get("grace_seconds", 10.0)),
                replicas=replicas,
            )
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ValueError(f"generator template {path}: malformed ({exc})") from None


def default_argv() -> tuple[str, ...]:
    """The command line of a generator (its Dockerfile's, with this interpreter)."""
    return (sys.executable, "-m", "switchboard.generator")


# The tools' `processes.free_port`, repeated here because a service never imports the tools
# package (the tools depend on the services, not the other way round).
def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class _Started:
    expert: str
    popen: subprocess.Popen[bytes]
    port: int
    revision: str = ""  # the GENERATOR_REVISION it was started with ("": the template's)


@dataclass
class LocalProcessActuator:
    """Starts and stops generator processes from a `GeneratorTemplate` (module docstring)."""

    template: GeneratorTemplate
    base_env: Mapping[str, str] | None = None  # default: this process's environment
    name: str = "local"
    acts: bool = True
    targeted: bool = True
    # The middle of the ids it gives (`<expert>-<tag>-<n>`): the rollouts' deployer has its own.
    id_tag: str = "auto"
    _started: dict[str, _Started] = field(default_factory=dict)
    _retired: set[str] = field(default_factory=set)  # ids it started and has stopped (or is stopping)
    _next: int = 1
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def replica_env(
        self, expert: str, replica_id: str, port: int, overrides: Mapping[str, str] | None = None
    ) -> dict[str, str]:
        """The environment the new replica adds to the inherited one (`overrides` over the template's)."""
        env = self.template.experts.get(expert)
        if env is None:
            known = ", ".join(sorted(self.template.experts)) or "(none)"
            raise ActuatorError("unknown_expert", f"the generator template has no expert {expert!r} (it has {known})")
        out = {**env, **(overrides or {})}
        out["GENERATOR_REPLICA_ID"] = replica_id
        out["GENERATOR_PORT"] = str(port)
        if out.get("GENERATOR_METRICS_PORT", "0") != "0":
            out["GENERATOR_METRICS_PORT"] = str(free_port())
        if self.template.pki_dir is not None:
            from switchboard.common.pki import LocalCA, identity_env

            out.update(identity_env(LocalCA(self.template.pki_dir).issue(f"generator/{replica_id}")))
        out["PYTHONUNBUFFERED"] = "1"
        return out

    def add(self, expert: str, count: int, env: Mapping[str, str] | None = None) -> list[str]:
        """Start `count` generators of `expert`; `env` overrides the template's environment (a
        rollout's GENERATOR_REVISION and GENERATOR_MODEL)."""
        ids = []
        for _ in range(count):
            with self._lock:
                replica_id = f"{expert}-{self.id_tag}-{self._next}"
                self._next += 1
            port = free_port()
            try:
                child_env = {
                    **(os.environ if self.base_env is None else self.base_env),
                    **self.replica_env(expert, replica_id, port, env),
                }
            except OSError as exc:  # the CA folder is unreadable
                raise ActuatorError("pki", f"cannot issue a certificate for {replica_id}: {exc}") from None
            self.template.log_dir.mkdir(parents=True, exist_ok=True)
            stem = self.template.log_dir / f"generator-{replica_id}"
            try:
                with open(f"{stem}.log", "ab") as out, open(f"{stem}.stderr.log", "ab") as err:
                    # The launcher makes it die with the scheduler: not a preexec_fn, which would run
                    # Python between fork and exec in this gRPC server's process (launch.py says why).
                    popen = subprocess.Popen(
                        launched(self.template.argv),
                        env=launch_env(child_env),
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=err,
                        start_new_session=True,
                    )
            except OSError as exc:
                raise ActuatorError("spawn", f"cannot start a generator of {expert}: {exc}") from None
            with self._lock:
                self._started[replica_id] = _Started(expert, popen, port, (env or {}).get("GENERATOR_REVISION", ""))
            log.info("generator process started", expert=expert, replica_id=replica_id, pid=popen.pid, port=port)
            ids.append(replica_id)
        return ids

    def can_remove(self, replica_id: str) -> bool:
        with self._lock:
            return replica_id in self._started

    def expected(self, expert: str) -> list[str | None]:
        """The stack's own generators of `expert` (the template's `replicas`)."""
        return list(self.template.replicas.get(expert, ()))

    def started_ids(self, expert: str, revision: str) -> list[str]:
        """The ids of the processes it started for `expert` with this GENERATOR_REVISION override."""
        with self._lock:
            return [rid for rid, s in self._started.items() if s.expert == expert and s.revision == revision]

    def alive(self, replica_id: str) -> bool:
        """Whether a process this actuator started is still running."""
        with self._lock:
            started = self._started.get(replica_id)
        return started is not None and started.popen.poll() is None

    def pid(self, replica_id: str) -> int | None:
        """The pid of a process this actuator started (None when it did not)."""
        with self._lock:
            started = self._started.get(replica_id)
        return started.popen.pid if started is not None else None

    def remove(self, expert: str, replica_ids: Sequence[str]) -> None:
        for replica_id in replica_ids:
            with self._lock:
                started = self._started.pop(replica_id, None)
                if started is None and replica_id in self._retired:
                    continue  # already stopped, or being stopped by a call that outlasted its timeout
                if started is None:
                    raise ActuatorError("not_owned", f"replica {replica_id} was not started by the local actuator")
                self._retired.add(replica_id)
            code = self._stop(started.popen)
            log.info("generator process stopped", expert=expert, replica_id=replica_id, exit_code=code)

    def _stop(self, popen: subprocess.Popen[bytes]) -> int | None:
        if popen.poll() is None:
            popen.send_signal(signal.SIGTERM)
            try:
                popen.wait(timeout=self.template.grace_seconds)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait(timeout=10)
        return popen.returncode

    def close(self) -> None:
        with self._lock:
            started = list(self._started.items())
            self._started.clear()
        for _, s in started:
            if s.popen.poll() is None:
                s.popen.send_signal(signal.SIGTERM)
        for replica_id, s in started:
            self._stop(s.popen)
            log.info("generator process stopped", expert=s.expert, replica_id=replica_id, exit_code=s.popen.returncode)
