"""The container engine that compose drives: a Docker daemon, or podman made to behave like one.

`docker` uses the daemon of the machine as it is (DOCKER_HOST or the default socket) and the
upstream base images. `podman` (the default, for machines with no Docker engine and no image
registry, such as CI) starts podman's Docker-compatible API on a socket of its own and works
around what such a machine lacks (../shared/TOOLS.md, "Containers without Docker"):
- a sandbox that refuses setrlimit in a container's init: an OCI-runtime wrapper
  (`norlimit-runtime`) named in a containers.conf of our own (CONTAINERS_CONF, no edit of /etc);
- no registry: a Debian base debootstrapped from Debian's packages and a Python base built on it
  (`images/python-base`), both kept in podman's storage, so later runs reuse them and the layers
  built on them;
- the registries' TLS proxy: the Python base carries this machine's CA bundle;
- no systemd to run HEALTHCHECKs: a thread runs `podman healthcheck run` for the project's containers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEBIAN_IMAGE = "localhost/switchboard-base/debian:bookworm"
PYTHON_IMAGE = "localhost/switchboard-base/python:3.11-bookworm"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
DEBIAN_MIRROR = os.environ.get("SWITCHBOARD_DEBIAN_MIRROR", "http://deb.debian.org/debian")


class EngineError(RuntimeError):
    """The engine could not be started or prepared; the message says what to fix."""


def _run(args: list[str], env: Mapping[str, str], timeout: float, what: str) -> str:
    try:
        done = subprocess.run(
            args, env=dict(env), capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError as exc:
        raise EngineError(f"{what}: {args[0]} is not installed ({exc})") from exc
    except subprocess.TimeoutExpired as exc:
        raise EngineError(f"{what}: no answer within {timeout:.0f} s") from exc
    if done.returncode != 0:
        raise EngineError(f"{what} failed (exit {done.returncode}): {(done.stderr or done.stdout)[-2000:]}")
    return done.stdout


@dataclass
class Engine:
    """What the stack needs from an engine: the environment for compose and the engine's CLI."""

    kind: str
    env: dict[str, str]
    build_env: dict[str, str] = field(default_factory=dict)

    @property
    def cli(self) -> str:
        return "podman" if self.kind == "podman" else "docker"

    def run(self, *args: str, timeout: float = 120.0, what: str = "") -> str:
        return _run([self.cli, *args], self.env, timeout, what or f"{self.cli} {' '.join(args[:2])}")

    def inspect(self, *names: str, kind: str = "container") -> list[dict]:
        return json.loads(self.run(kind, "inspect", *names, what=f"inspect {kind} {' '.join(names)}"))

    @contextmanager
    def healthchecks(self, project: str, period: float = 3.0) -> Iterator[None]:
        """Drive the containers' healthchecks where no systemd timer does (podman); a no-op on Docker."""
        if self.kind != "podman":
            yield
            return
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(period):
                try:
                    names = self.run(
                        "ps",
                        "--filter",
                        f"label=com.docker.compose.project={project}",
                        "--format",
                        "{{.Names}}",
                    ).split()
                except EngineError:
                    continue
                for name in names:
                    # Exit status 1 means unhealthy (or no healthcheck): recorded by podman itself.
                    subprocess.run(
                        ["podman", "healthcheck", "run", name],
                        env=self.env,
                        capture_output=True,
                        timeout=30,
                        check=False,
                    )

        thread = threading.Thread(target=loop, name=f"healthchecks-{project}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=35)


def _ping(socket_path: Path) -> bool:
    import http.client
    import socket

    class _UnixConnection(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(2)
            self.sock.connect(str(socket_path))

    try:
        connection = _UnixConnection("localhost", timeout=2)
        connection.request("GET", "/_ping")
        return connection.getresponse().status == 200
    except OSError:
        return False


@contextmanager
def podman_engine(workdir: Path) -> Iterator[Engine]:
    """podman's Docker API on `workdir`/podman.sock, with the workarounds above; stopped on exit."""
    if shutil.which("podman") is None or shutil.which("runc") is None:
        raise EngineError("podman and runc are needed: apt-get install -y podman runc debootstrap")
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "containers.conf"
    conf.write_text(
        f'[engine]\nruntime = "norlimit"\n\n[engine.runtimes]\nnorlimit = ["{HERE / "norlimit-runtime"}"]\n'
    )
    socket_path = workdir / "podman.sock"
    env = {**os.environ, "CONTAINERS_CONF": str(conf), "DOCKER_HOST": f"unix://{socket_path}"}
    log = (workdir / "podman-service.log").open("w")
    service = subprocess.Popen(
        ["podman", "system", "service", "--time=0", f"unix://{socket_path}"], env=env, stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + 30
        while not _ping(socket_path):
            if service.poll() is not None or time.monotonic() > deadline:
                raise EngineError(f"podman's API service did not start: see {workdir / 'podman-service.log'}")
            time.sleep(0.2)
        engine = Engine("podman", env)
        ensure_local_base_images(engine)
        engine.build_env = {
            "SWITCHBOARD_DEBIAN_IMAGE": DEBIAN_IMAGE,
            "SWITCHBOARD_PYTHON_IMAGE": PYTHON_IMAGE,
            "SWITCHBOARD_TORCH_FIND_LINKS": "/wheels",
        }
        yield engine
    finally:
        service.terminate()
        try:
            service.wait(timeout=15)
        except subprocess.TimeoutExpired:
            service.kill()
        log.close()


@contextmanager
def docker_engine() -> Iterator[Engine]:
    """The machine's Docker daemon as it is; images build on their upstream bases."""
    if shutil.which("docker") is None:
        raise EngineError("SWITCHBOARD_CONTAINER_ENGINE=docker needs the docker CLI and a running daemon")
    engine = Engine("docker", dict(os.environ))
    engine.run("version", what="docker version (is the daemon running?)")
    yield engine


def _image_exists(engine: Engine, image: str) -> bool:
    return subprocess.run(["podman", "image", "exists", image], env=engine.env, check=False).returncode == 0


def ensure_local_base_images(engine: Engine) -> None:
    """Debian bookworm from debootstrap, and the Python base on it; kept for later runs."""
    if not _image_exists(engine, DEBIAN_IMAGE):
        if shutil.which("debootstrap") is None:
            raise EngineError(
                "debootstrap is needed to make the local base image: apt-get install -y debootstrap"
            )
        with tempfile.TemporaryDirectory(prefix="switchboard-debootstrap-") as root:
            _run(
                ["debootstrap", "--variant=minbase", "bookworm", root, DEBIAN_MIRROR],
                engine.env,
                900,
                f"debootstrap of bookworm from {DEBIAN_MIRROR}",
            )
            tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
            imported = subprocess.run(
                ["podman", "import", "-", DEBIAN_IMAGE],
                env=engine.env,
                stdin=tar.stdout,
                capture_output=True,
                check=False,
            )
            tar.wait()
            if imported.returncode != 0:
                raise EngineError(
                    f"podman import of the Debian base failed: {imported.stderr.decode()[-2000:]}"
                )
    if not _image_exists(engine, PYTHON_IMAGE):
        with tempfile.TemporaryDirectory(prefix="switchboard-python-base-") as context:
            shutil.copy(HERE / "images/python-base/Dockerfile", context)
            shutil.copy(HOST_CA_BUNDLE, Path(context) / "ca-certificates.crt")
            engine.run(
                "build",
                "--format",
                "docker",
                "--network",
                "host",
                "--build-arg",
                f"DEBIAN_IMAGE={DEBIAN_IMAGE}",
                "-t",
                PYTHON_IMAGE,
                context,
                timeout=900,
                what="build of the local Python base image",
            )


@contextmanager
def container_engine(workdir: Path) -> Iterator[Engine]:
    """The engine SWITCHBOARD_CONTAINER_ENGINE names (podman by default)."""
    kind = os.environ.get("SWITCHBOARD_CONTAINER_ENGINE", "podman")
    if kind == "podman":
        with podman_engine(workdir) as engine:
            yield engine
    elif kind == "docker":
        with docker_engine() as engine:
            yield engine
    else:
        raise EngineError(f"SWITCHBOARD_CONTAINER_ENGINE={kind!r}: use podman or docker")


def http_json(url: str, timeout: float = 5.0) -> object:
    """GET `url` and decode its JSON body (the trace viewer's and Prometheus' APIs)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise EngineError(f"GET {url}: {exc}") from exc
