"""Dockerfiles: hadolint, COPY sources, and the contract with the service and the local stack."""

from __future__ import annotations

import sys
from pathlib import Path

import deploy_checks as dc
import pytest
from switchboard.cli.localstack import plan_stack, service_specs
from switchboard.cli.processes import ProcessGroup, ServiceSpec
from switchboard.common.launch import launched


@pytest.fixture(scope="module")
def stack_commands(tmp_path_factory: pytest.TempPathFactory, repo: Path) -> dict[str, list[str]]:
    """The command `switchboard up` runs for each service, as an image would run it.

    The module of each service comes from the local stack's own plan; the argv
    shape comes from a real process started by the stack's ProcessGroup (it runs
    `<venv python> -m <module>`; in an image `python` is the venv's python on PATH).
    """
    tmp = tmp_path_factory.mktemp("stack")
    keys = tmp / "tenants.yaml"
    keys.write_text("")
    specs = service_specs(plan_stack(repo / "config/experts.yaml", keys))
    modules = {name.split("-")[0]: spec.module for name, spec in specs.items()}
    with ProcessGroup(tmp / "logs", grace=5) as group:
        probe = group.start(ServiceSpec("probe", dc.HEALTHCHECK_MODULE, port=1))
        probe.popen.wait(timeout=60)
        argv = list(probe.popen.args)
    # The local stack starts each service through the launcher that ties it to `switchboard up`'s
    # life (switchboard.common.launch); what the launcher execs is the image's command.
    launcher = launched([])
    assert argv[: len(launcher)] == launcher
    assert argv[len(launcher) :] == [sys.executable, "-m", dc.HEALTHCHECK_MODULE]
    return {service: ["python", "-m", module] for service, module in modules.items()}


@pytest.mark.parametrize("service", dc.SERVICES)
def test_hadolint_passes(service: str, repo: Path) -> None:
    assert dc.check_hadolint(repo / f"services/{service}/Dockerfile", repo / ".hadolint.yaml") == []


@pytest.mark.parametrize("service", dc.SERVICES)
def test_copy_sources_exist_in_the_build_context(service: str, repo: Path) -> None:
    assert dc.check_copy_sources(repo / f"services/{service}/Dockerfile", repo) == []


@pytest.mark.parametrize("service", dc.SERVICES)
def test_dockerfile_matches_service_and_local_stack(
    service: str, repo: Path, contracts: dict[str, dc.ServiceContract], stack_commands: dict[str, list[str]]
) -> None:
    assert stack_commands[service] == ["python", "-m", f"switchboard.{service}"]
    problems = dc.check_dockerfile_contract(
        repo / f"services/{service}/Dockerfile", contracts[service], stack_commands[service], repo
    )
    assert problems == []


def test_dockerignore_keeps_sources_and_drops_local_state(repo: Path) -> None:
    patterns = dc.dockerignore_patterns(repo)
    assert not dc.dockerignored("libs/common/src/switchboard/common/service.py", patterns)
    assert not dc.dockerignored("requirements/service.txt", patterns)
    assert not dc.dockerignored("config/experts.yaml", patterns)
    assert dc.dockerignored(".venv/bin/python", patterns)
    assert dc.dockerignored(".git/HEAD", patterns)
    assert dc.dockerignored("services/gateway/tests/test_auth.py", patterns)
    assert dc.dockerignored("services/generator/src/switchboard/generator/__pycache__/x.pyc", patterns)


# ----------------------------------------------------------------- broken copies must fail


def _broken_copy(repo: Path, tmp_path: Path, service: str, old: str, new: str) -> Path:
    source = (repo / f"services/{service}/Dockerfile").read_text()
    assert old in source, f"the original no longer contains {old!r}"
    path = tmp_path / "Dockerfile"
    path.write_text(source.replace(old, new, 1))
    return path


def test_hadolint_fails_on_a_broken_dockerfile(repo: Path, tmp_path: Path) -> None:
    broken = _broken_copy(repo, tmp_path, "gateway", "USER 10001:10001", "RUN apt-get install curl\nUSER root")
    problems = dc.check_hadolint(broken)
    assert any("DL3008" in p for p in problems), problems  # unpinned apt package
    assert any("DL3002" in p for p in problems), problems  # last USER is root


def test_missing_or_ignored_copy_source_fails(repo: Path, tmp_path: Path) -> None:
    missing = _broken_copy(repo, tmp_path, "router", "COPY services/router services/router", "COPY services/routr services/router")
    assert any("services/routr does not exist" in p for p in dc.check_copy_sources(missing, repo))
    ignored = _broken_copy(repo, tmp_path, "router", "COPY services/router services/router", "COPY .venv /opt/venv")
    assert any(".venv is excluded by .dockerignore" in p for p in dc.check_copy_sources(ignored, repo))


@pytest.mark.parametrize(
    ("service", "old", "new", "expected"),
    [
        ("gateway", '"switchboard.gateway"]', '"switchboard.gateway.server"]', "differs from the local stack's command"),
        ("router", '"127.0.0.1:50052"]', '"127.0.0.1:50051"]', "HEALTHCHECK must run"),
        ("scheduler", "SCHEDULER_HOST=0.0.0.0", "SCHEDULER_LISTEN=0.0.0.0", "ENV SCHEDULER_LISTEN is not read"),
        ("generator", "EXPOSE 50061 9111", "EXPOSE 50061 9100", "EXPOSE [9100, 50061] differs"),
        ("generator", "USER 10001:10001", "USER root", "runs as root"),
        ("router", "./libs/common ./services/router", "./libs/common", "does not pip install ./services/router"),
        ("generator", "ARG TORCH_VERSION=2.13.0", "ARG TORCH_VERSION=2.12.0", "differs from requirements/model.txt"),
        ("gateway", "requirements/service.txt requirements/constraints.txt", "requirements/service.txt requirements/model.txt requirements/constraints.txt", "must not install torch"),
    ],
)
def test_dockerfile_contract_fails_on_a_broken_copy(
    service: str,
    old: str,
    new: str,
    expected: str,
    repo: Path,
    tmp_path: Path,
    contracts: dict[str, dc.ServiceContract],
    stack_commands: dict[str, list[str]],
) -> None:
    broken = _broken_copy(repo, tmp_path, service, old, new)
    problems = dc.check_dockerfile_contract(broken, contracts[service], stack_commands[service], repo)
    assert any(expected in p for p in problems), problems


def test_single_stage_dockerfile_fails(repo: Path, tmp_path: Path, contracts: dict[str, dc.ServiceContract]) -> None:
    source = (repo / "services/scheduler/Dockerfile").read_text()
    runtime = source[source.index("FROM ${PYTHON_IMAGE} AS runtime") :]
    path = tmp_path / "Dockerfile"
    path.write_text("ARG PYTHON_IMAGE=python:3.11-slim-bookworm\n" + runtime.replace("COPY --from=builder /opt/venv /opt/venv\n", ""))
    problems = dc.check_dockerfile_contract(path, contracts["scheduler"], ["python", "-m", "switchboard.scheduler"], repo)
    assert any("not multi-stage" in p for p in problems), problems
