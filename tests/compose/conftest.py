"""Fixtures of the compose check (`make compose-test`): one engine, images and stack per session.

Not part of `make test` (its pytest run ignores this folder): it needs a container engine and
builds images. The stack runs under its own compose project name and publishes its ports on
free loopback ports, so a developer's `switchboard up` or compose stack is left alone.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# --import-mode=importlib does not put this folder on sys.path by itself.
sys.path.insert(0, str(Path(__file__).parent))

from engine import Engine, container_engine
from stack import REPO, STACK_FILES, ComposeStack, free_port, publish

PROJECT = "switchboard-check"
EXPERTS = ("bard-small", "milton-small", "scribe-large")
TORCH_PIN = "torch==2.13.0"


@pytest.fixture(scope="session")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    with container_engine(tmp_path_factory.mktemp("engine")) as running:
        yield running


@pytest.fixture(scope="session")
def torch_wheel(engine: Engine) -> None:
    """The torch wheel in wheels/ for the podman builds (the PyTorch index is not reachable there).

    pip takes it from wherever this machine's pip takes torch (here: a local wheel folder)."""
    if engine.kind != "podman" or list((REPO / "wheels").glob("torch-2.13.0*.whl")):
        return
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--only-binary=:all:",
            TORCH_PIN,
            "-d",
            str(REPO / "wheels"),
        ],
        check=True,
        timeout=900,
    )


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo experts, readable by the containers' uid 10001 (the cache under /root is not)."""
    from switchboard.experts import expert_dir

    folder = tmp_path_factory.mktemp("models")
    folder.chmod(0o755)
    folder.parent.chmod(0o755)
    for name in EXPERTS:
        shutil.copytree(expert_dir(name), folder / name)
    subprocess.run(["chmod", "-R", "a+rX", str(folder)], check=True)
    return folder


@pytest.fixture(scope="session")
def ports() -> dict[str, int]:
    return {name: free_port() for name in ("grpc", "http", "traces", "prometheus")}


@pytest.fixture(scope="session")
def stack(
    engine: Engine, torch_wheel: None, models_dir: Path, ports: dict[str, int]
) -> Iterator[ComposeStack]:
    """The stack users run, built from the project's Dockerfiles and up with every container healthy."""
    running = ComposeStack.of(engine, PROJECT, [REPO / f for f in STACK_FILES], models_dir, **publish(ports))
    try:
        running.build()
        running.up()
        yield running
    finally:
        running.down()
