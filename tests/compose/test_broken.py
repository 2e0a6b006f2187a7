"""A broken Dockerfile or compose file fails the compose check: each kind of break, shown.

Dockerfiles: the gateway's, in a copy of its build context, with a missing COPY source (the
build fails), a wrong entry point (the container never becomes healthy) or no USER (the image
check finds root). Compose: a copy of the stack's files with a wrong service address or a
missing healthcheck (the config check names the service). The images reuse the layers of the
real build, so each takes seconds once `test_stack` has built them.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import checks
import pytest
import yaml
from engine import Engine, EngineError
from stack import REPO, STACK_FILES, ComposeStack, copy_compose_folder

# The first test's setup may make the local base images (debootstrap) on a cold machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

BROKEN_PROJECT = "switchboard-broken"


def _gateway_context(target: Path) -> Path:
    """What the gateway's Dockerfile copies, in a folder of its own."""
    for part in ("requirements", "libs/common", "services/gateway"):
        shutil.copytree(
            REPO / part, target / part, ignore=shutil.ignore_patterns("tests", "__pycache__", "*.egg-info")
        )
    shutil.copy(REPO / ".dockerignore", target / ".dockerignore")
    return target


def _broken_gateway(engine: Engine, tmp_path: Path, models: Path, old: str, new: str) -> ComposeStack:
    context = _gateway_context(tmp_path / "context")
    dockerfile = context / "services/gateway/Dockerfile"
    text = dockerfile.read_text()
    assert old in text
    dockerfile.write_text(text.replace(old, new))
    compose = tmp_path / "compose.yaml"
    compose.write_text(
        yaml.safe_dump(
            {
                "services": {
                    "gateway": {
                        "image": "localhost/switchboard-broken/gateway:test",
                        "build": {
                            "context": str(context),
                            "dockerfile": "services/gateway/Dockerfile",
                            "args": {
                                "PYTHON_IMAGE": engine.build_env.get(
                                    "SWITCHBOARD_PYTHON_IMAGE", "python:3.11-slim-bookworm"
                                )
                            },
                        },
                        "environment": {"GATEWAY_HTTP_PORT": "0", "ROUTER_ADDR": "127.0.0.1:1"},
                        "read_only": True,
                        "tmpfs": ["/tmp"],
                    }
                }
            }
        )
    )
    return ComposeStack.of(engine, BROKEN_PROJECT, [compose], models)


@pytest.fixture
def broken(engine: Engine, models_dir: Path) -> Iterator[list[ComposeStack]]:
    made: list[ComposeStack] = []
    yield made
    for stack in made:
        stack.down()
        assert stack.leftovers() == []


def test_a_missing_copy_source_fails_the_build(
    engine: Engine, models_dir: Path, tmp_path: Path, broken: list[ComposeStack]
) -> None:
    stack = _broken_gateway(
        engine,
        tmp_path,
        models_dir,
        "COPY services/gateway services/gateway",
        "COPY services/gateway/no-such-file services/gateway",
    )
    broken.append(stack)
    with pytest.raises(EngineError, match="no-such-file"):
        stack.build(timeout=600)


def test_a_wrong_entry_point_never_becomes_healthy(
    engine: Engine, models_dir: Path, tmp_path: Path, broken: list[ComposeStack]
) -> None:
    stack = _broken_gateway(
        engine,
        tmp_path,
        models_dir,
        'CMD ["python", "-m", "switchboard.gateway"]',
        'CMD ["python", "-m", "switchboard.gatewy"]',
    )
    broken.append(stack)
    stack.build(timeout=600)
    with pytest.raises(EngineError, match=r"up .*failed"):
        stack.up(timeout=60)


def test_an_image_without_a_user_is_found_running_as_root(
    engine: Engine, models_dir: Path, tmp_path: Path, broken: list[ComposeStack]
) -> None:
    stack = _broken_gateway(engine, tmp_path, models_dir, "USER 10001:10001\n", "")
    broken.append(stack)
    stack.build(timeout=600)
    image = engine.inspect("localhost/switchboard-broken/gateway:test", kind="image")[0]
    assert any("runs as root" in p for p in checks.image_problems("gateway", image))


def _compose_copy(tmp_path: Path, edit: dict[str, tuple[str, str]]) -> list[Path]:
    folder = copy_compose_folder(tmp_path)
    for name, (old, new) in edit.items():
        path = folder / name
        text = path.read_text()
        assert old in text, (name, old)
        path.write_text(text.replace(old, new))
    return [tmp_path / f for f in STACK_FILES]


def test_the_unbroken_copy_passes(engine: Engine, models_dir: Path, tmp_path: Path) -> None:
    stack = ComposeStack.of(engine, BROKEN_PROJECT, _compose_copy(tmp_path, {}), models_dir)
    assert checks.compose_problems(stack.config()) == []


def test_a_wrong_service_address_fails_the_config_check(
    engine: Engine, models_dir: Path, tmp_path: Path
) -> None:
    files = _compose_copy(
        tmp_path, {"env/gateway.env": ("ROUTER_ADDR=router:50052", "ROUTER_ADDR=routr:50052")}
    )
    problems = checks.compose_problems(ComposeStack.of(engine, BROKEN_PROJECT, files, models_dir).config())
    assert problems == [
        "service gateway: ROUTER_ADDR=routr:50052 names 'routr', which is no service of this stack"
    ]


def test_a_missing_healthcheck_fails_the_config_check(
    engine: Engine, models_dir: Path, tmp_path: Path
) -> None:
    old = '      test: ["CMD", "python", "-m", "switchboard.common.healthcheck", "127.0.0.1:50052"]\n      <<: *health-timing\n'
    files = _compose_copy(
        tmp_path, {"compose.yaml": ("    healthcheck:\n" + old, "    healthcheck:\n      disable: true\n")}
    )
    problems = checks.compose_problems(ComposeStack.of(engine, BROKEN_PROJECT, files, models_dir).config())
    assert problems == ["service router has no healthcheck"]
