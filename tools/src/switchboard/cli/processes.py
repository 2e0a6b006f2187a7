"""Start Switchboard services as separate processes and wait until they are healthy.

`switchboard up` and the cross-service tests use this same code: each service runs
as `python -m switchboard.<service>` (the command its Dockerfile runs), with its
settings in environment variables, its stdout (JSON log lines) and stderr in log files, and readiness
decided by the standard `grpc.health.v1` Check RPC (never by sleeping).
`ProcessGroup` is a context manager that always stops what it started: SIGTERM,
wait for the grace period, then SIGKILL.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from switchboard.common.launch import launch_env, launched
from switchboard.common.tls import TlsIdentity, blocking_channel


class StartupError(RuntimeError):
    """A service exited or did not become healthy in time; the message has its log tail."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the OS picks it)."""
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class ServiceSpec:
    """How to run one service process."""

    name: str  # unique label, e.g. "generator-bard-small"
    module: str  # run as `python -m <module>`
    port: int  # its gRPC port (for the health check)
    env: Mapping[str, str] = field(default_factory=dict)  # added to the parent's environment
    metrics_port: int = 0
    host: str = "127.0.0.1"
    # How to reach its health service: with mutual TLS as `probe_tls` (the operator's identity) to
    # a server whose certificate is for `role`; None: plaintext.
    probe_tls: TlsIdentity | None = None
    role: str = ""

    @property
    def address(self) -> str:
        """host:port of its gRPC server."""
        return f"{self.host}:{self.port}"


@dataclass
class ManagedProcess:
    """A running service process."""

    spec: ServiceSpec
    popen: subprocess.Popen[bytes]
    log_path: Path  # stdout: the service's JSON log lines
    stderr_path: Path  # stderr: tracebacks and library warnings, kept apart so stdout stays JSON

    @property
    def pid(self) -> int:
        """The process id."""
        return self.popen.pid

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of its stdout and stderr (for error messages)."""
        parts = []
        for path in (self.log_path, self.stderr_path):
            try:
                tail = path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            if tail:
                parts.append(f"[{path.name}]\n" + "\n".join(tail))
        return "\n".join(parts) or "(no output)"


def health_status(
    address: str, timeout: float = 1.0, service: str = "", tls: TlsIdentity | None = None, role: str = ""
) -> int:
    """One grpc.health.v1 Check (mutual TLS to `role` with `tls`); the ServingStatus, or UNKNOWN if unreachable."""
    with blocking_channel(address, tls, role or None) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return health_pb2.HealthCheckResponse.UNKNOWN
        return int(reply.status)


def stop_process(process: ManagedProcess, grace: float = 10.0) -> int | None:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL; returns the exit code."""
    if process.alive():
        process.popen.send_signal(signal.SIGTERM)
        try:
            process.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.popen.kill()
            process.popen.wait(timeout=10)
    return process.popen.returncode


class ProcessGroup:
    """Processes started together and always stopped together (in reverse order)."""

    def __init__(self, log_dir: Path, base_env: Mapping[str, str] | None = None, grace: float = 10.0) -> None:
        """log_dir receives `<name>.log` per service; base_env defaults to os.environ."""
        self.log_dir = log_dir
        self.base_env = dict(os.environ if base_env is None else base_env)
        self.grace = grace
        self.processes: dict[str, ManagedProcess] = {}

    def start(self, spec: ServiceSpec) -> ManagedProcess:
        """Launch one service (does not wait for health); stdout to `<name>.log`, stderr to `<name>.stderr.log`."""
        if spec.name in self.processes and self.processes[spec.name].alive():
            raise ValueError(f"{spec.name} is already running")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{spec.name}.log"
        stderr_path = self.log_dir / f"{spec.name}.stderr.log"
        env = launch_env({**self.base_env, **spec.env, "PYTHONUNBUFFERED": "1"})
        with open(log_path, "ab") as log, open(stderr_path, "ab") as errors:
            popen = subprocess.Popen(
                # The launcher makes the service die with this process (switchboard.common.launch
                # says why that is not a preexec_fn).
                launched([sys.executable, "-m", spec.module]),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=errors,
                # Own process group: Ctrl-C in a terminal reaches only the parent,
                # which then stops each child in order.
                start_new_session=True,
            )
        process = ManagedProcess(spec=spec, popen=popen, log_path=log_path, stderr_path=stderr_path)
        self.processes[spec.name] = process
        return process

    def wait_healthy(self, names: list[str] | None = None, timeout: float = 120.0) -> None:
        """Poll grpc.health.v1 until every named service answers SERVING.

        Raises StartupError (with the log tail) as soon as one exits, or when the
        timeout passes.
        """
        pending = list(names if names is not None else self.processes)
        deadline = time.monotonic() + timeout
        while pending:
            for name in list(pending):
                process = self.processes[name]
                if not process.alive():
                    raise StartupError(
                        f"{name} exited with code {process.popen.returncode} before it was healthy; "
                        f"log {process.log_path}:\n{process.log_tail()}"
                    )
                status = health_status(process.spec.address, timeout=1.0, tls=process.spec.probe_tls, role=process.spec.role)
                if status == health_pb2.HealthCheckResponse.SERVING:
                    pending.remove(name)
            if not pending:
                return
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {n} ({self.processes[n].log_path}):\n{self.processes[n].log_tail()}" for n in pending)
                raise StartupError(f"not healthy after {timeout:.0f}s: {', '.join(pending)}\n{tails}")
            time.sleep(0.2)

    def dead(self) -> Iterator[ManagedProcess]:
        """Processes that have exited."""
        return (p for p in self.processes.values() if not p.alive())

    def stop(self, name: str, grace: float | None = None) -> int | None:
        """Stop one service gracefully (SIGTERM, then SIGKILL after the grace period)."""
        return stop_process(self.processes[name], self.grace if grace is None else grace)

    def kill(self, name: str) -> None:
        """SIGKILL one service (a crash, for fault tests)."""
        process = self.processes[name]
        if process.alive():
            process.popen.kill()
            process.popen.wait(timeout=10)

    def stop_all(self) -> None:
        """SIGTERM every process (last started first), wait out one shared grace period, then SIGKILL."""
        running = [p for p in reversed(list(self.processes.values())) if p.alive()]
        for process in running:
            process.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        for process in running:
            try:
                process.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.popen.kill()
                process.popen.wait(timeout=10)

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop_all()
