"""The optional local trace viewer of `switchboard up --traces`: Arize Phoenix, in a venv of its own.

Phoenix (`arize-phoenix`, pinned as compose/local/trace-viewer/Dockerfile pins it) is about 850 MB,
so it is not a project requirement: `ensure_phoenix` installs it on first use into
`$SWITCHBOARD_PHOENIX_DIR` (default `<cache>/phoenix`), one folder per version, and later runs find
it there. `TraceViewer` runs `phoenix serve` on loopback ports (OTLP/gRPC in, the UI and its spans
API over HTTP), waits until it answers, and stops it with SIGTERM, then SIGKILL. Its traces are kept
in `<cache>/traces` (Phoenix's SQLite database), so they outlive a restart of the stack.

While a stack runs with the viewer, `switchboard up` writes a session file (`<cache>/traces.json`:
the UI's URL, the OTLP endpoint, the gateway's address, its own pid); `switchboard generate` reads
it, sends its request as the child of a root span it exports there itself (so the trace id is known
before the gateway answers and the trace has a root), and prints the viewer's URL of that trace.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

# Keep in step with compose/local/trace-viewer/Dockerfile (a test compares them).
PHOENIX_VERSION = "20.26.1"
PHOENIX_PORT, PHOENIX_GRPC_PORT = 6006, 4317  # Phoenix's own defaults (UI/HTTP, OTLP/gRPC)
SESSION_FILE = "traces.json"
# How the services export while the viewer runs: OTLP/gRPC without TLS on loopback, and batches
# flushed every 500 ms (the SDK's default is 5 s) so a trace is complete by the time it is opened.
EXPORT_DELAY_MS = "500"


class TraceViewerError(RuntimeError):
    """The viewer could not be installed or started; the message says why (with its log's tail)."""


def phoenix_dir(cache: Path) -> Path:
    """Where Phoenix is installed: `$SWITCHBOARD_PHOENIX_DIR`, default `<cache>/phoenix`; a folder per version."""
    root = os.environ.get("SWITCHBOARD_PHOENIX_DIR") or cache / "phoenix"
    return Path(root).expanduser() / PHOENIX_VERSION


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no output)"


@contextlib.contextmanager
def _install_lock(home: Path) -> Iterator[None]:
    """One installer at a time per folder (a test and a developer's `up` may start together)."""
    import fcntl

    home.parent.mkdir(parents=True, exist_ok=True)
    with open(home.parent / f".{home.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_phoenix(cache: Path, progress: Callable[[str], None] = print) -> Path:
    """The `phoenix` executable, installed from PyPI first if missing (TraceViewerError on failure).

    A folder counts as installed only once pip succeeded (a stamp file written last), so an
    interrupted install is redone rather than half used.
    """
    home = phoenix_dir(cache)
    executable, stamp = home / "venv" / "bin" / "phoenix", home / ".installed"
    if stamp.is_file() and executable.is_file():
        return executable
    with _install_lock(home):
        if stamp.is_file() and executable.is_file():  # another process installed it while we waited
            return executable
        home.mkdir(parents=True, exist_ok=True)
        log = home / "install.log"
        progress(f"installing the trace viewer (arize-phoenix=={PHOENIX_VERSION}, about 850 MB) into {home}...")
        steps = [
            [sys.executable, "-m", "venv", "--clear", str(home / "venv")],
            [str(home / "venv" / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
             "--no-input", f"arize-phoenix=={PHOENIX_VERSION}"],
        ]
        started = time.monotonic()
        with log.open("w") as out:
            for step in steps:
                code = subprocess.run(step, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=False).returncode
                if code != 0:
                    raise TraceViewerError(
                        f"installing the trace viewer failed ({' '.join(step[:3])}... exited {code}); "
                        f"log {log}:\n{_tail(log)}"
                    )
        if not executable.is_file():
            raise TraceViewerError(f"pip installed arize-phoenix but there is no {executable}; log {log}")
        stamp.write_text(PHOENIX_VERSION + "\n")
        progress(f"  installed in {time.monotonic() - started:.0f}s")
    return executable


def _port_open(port: int) -> bool:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def trace_url(ui: str, trace_id: str) -> str:
    """The viewer's page of one trace: Phoenix's `/redirects/traces/<trace id>` route looks the trace
    up by its OpenTelemetry id and redirects to `/projects/<project>/traces/<trace id>`."""
    return f"{ui.rstrip('/')}/redirects/traces/{trace_id}"


@dataclass
class TraceViewer:
    """`phoenix serve` on 127.0.0.1; a context manager that always stops it."""

    executable: Path
    data_dir: Path  # Phoenix's working folder (its SQLite database of traces)
    log_path: Path
    port: int = PHOENIX_PORT  # the UI, the REST/GraphQL API and OTLP over HTTP (/v1/traces)
    grpc_port: int = PHOENIX_GRPC_PORT  # OTLP over gRPC, where the services export
    popen: subprocess.Popen[bytes] | None = None

    @property
    def ui(self) -> str:
        """The viewer's URL."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def otlp_endpoint(self) -> str:
        """What OTEL_EXPORTER_OTLP_ENDPOINT takes."""
        return f"http://127.0.0.1:{self.grpc_port}"

    def export_env(self) -> dict[str, str]:
        """The OTEL_* variables that point a service's span export at this viewer."""
        return {
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.otlp_endpoint,
            # The signal-specific variable wins over the general one in the SDK: set it too, so a
            # developer's own OTEL_EXPORTER_OTLP_TRACES_ENDPOINT does not send the spans elsewhere.
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": self.otlp_endpoint,
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_BSP_SCHEDULE_DELAY": EXPORT_DELAY_MS,
        }

    def start(self, timeout: float = 180.0) -> None:
        """Start Phoenix and wait until its HTTP health check and its OTLP port answer."""
        from switchboard.common.launch import launch_env, launched

        for port, what in ((self.port, "PHOENIX_PORT"), (self.grpc_port, "PHOENIX_GRPC_PORT")):
            if _port_open(port):
                raise TraceViewerError(
                    f"port {port} ({what}) on 127.0.0.1 is taken (another trace viewer?); stop it or use --free-ports"
                )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "PHOENIX_HOST": "127.0.0.1",
            "PHOENIX_PORT": str(self.port),
            "PHOENIX_GRPC_PORT": str(self.grpc_port),
            "PHOENIX_WORKING_DIR": str(self.data_dir),
            "PHOENIX_TELEMETRY_ENABLED": "false",  # a local tool phones nobody
            "PYTHONUNBUFFERED": "1",
        }
        # Phoenix must not pick up the stack's own exporter settings and trace itself into itself.
        env = {k: v for k, v in env.items() if not k.startswith("OTEL_")}
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                launched([str(self.executable), "serve"]),  # dies with `switchboard up`
                env=launch_env(env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches `switchboard up`, which stops it in order
            )
        deadline = time.monotonic() + timeout
        while not (self._healthy() and _port_open(self.grpc_port)):
            if self.popen.poll() is not None:
                raise TraceViewerError(
                    f"the trace viewer exited with code {self.popen.returncode}; log {self.log_path}:\n{_tail(self.log_path)}"
                )
            if time.monotonic() > deadline:
                raise TraceViewerError(f"the trace viewer did not answer within {timeout:.0f}s; log {self.log_path}")
            time.sleep(0.3)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.ui}/healthz", timeout=1.0) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, the grace period, then SIGKILL."""
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=10)

    def alive(self) -> bool:
        """Whether Phoenix is still running."""
        return self.popen is not None and self.popen.poll() is None

    def __enter__(self) -> TraceViewer:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


# --- the session file: how `switchboard generate` finds the viewer of the running stack -----------


def write_session(cache: Path, viewer: TraceViewer, gateway_addr: str) -> Path:
    """Record the running viewer for `switchboard generate` (removed again by `remove_session`)."""
    path = cache / SESSION_FILE
    cache.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(
        json.dumps({"ui": viewer.ui, "otlp": viewer.otlp_endpoint, "gateway": gateway_addr, "pid": os.getpid()})
    )
    temporary.replace(path)
    return path


def remove_session(cache: Path) -> None:
    """Forget the viewer (the stack stopped); only this process's own session file."""
    path = cache / SESSION_FILE
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()


def read_session(cache: Path, gateway_addr: str) -> Mapping[str, Any] | None:
    """The viewer of the stack whose gateway is `gateway_addr`, if that stack still runs."""
    try:
        session = json.loads((cache / SESSION_FILE).read_text())
        pid = int(session["pid"])
        if session.get("gateway") != gateway_addr or not session.get("ui") or not session.get("otlp"):
            return None
        os.kill(pid, 0)  # a stale file of a killed `up`: no such process
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return session


class ClientTrace:
    """The root span of one `switchboard generate` request, exported to the viewer.

    `metadata()` is the W3C `traceparent` to send with the call (the gateway's server span becomes
    its child); `finish()` ends the span and flushes it (a bounded wait: the viewer is local).
    """

    def __init__(self, otlp_endpoint: str, name: str = "switchboard generate") -> None:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor

        # A provider of its own (not the global one): the CLI configures nothing else.
        self._provider = TracerProvider(
            resource=Resource.create({"service.name": "switchboard-cli", "service.namespace": "switchboard"})
        )
        self._provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True, timeout=3)))
        self._span = self._provider.get_tracer("switchboard.cli").start_span(name, kind=trace.SpanKind.CLIENT)
        self._context = trace.set_span_in_context(self._span)

    @property
    def trace_id(self) -> str:
        """32 hex digits, as trace viewers show it."""
        return format(self._span.get_span_context().trace_id, "032x")

    def metadata(self) -> list[tuple[str, str]]:
        """The call's trace context headers (`traceparent`)."""
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier, context=self._context)
        return list(carrier.items())

    def finish(self, attributes: Mapping[str, Any] | None = None, error: str | None = None) -> None:
        """End the span (with `attributes`, or as an error) and export it."""
        from opentelemetry.trace import Status, StatusCode

        for key, value in (attributes or {}).items():
            self._span.set_attribute(key, value)
        if error:
            self._span.set_status(Status(StatusCode.ERROR, error))
        self._span.end()
        self._provider.shutdown()
