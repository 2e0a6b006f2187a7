"""Tests of the process launcher, the stack plan and the dev key of `switchboard up`."""

from __future__ import annotations

from pathlib import Path

import pytest
from switchboard.cli.client import build_request
from switchboard.cli.localstack import plan_stack, service_specs
from switchboard.cli.main import build_parser
from switchboard.cli.processes import ProcessGroup, ServiceSpec, StartupError, free_port
from switchboard.cli.stack import ensure_dev_key
from switchboard.gateway.tenants import TenantDirectory

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_dev_key_is_stable_and_accepted(tmp_path: Path) -> None:
    tenants_file = tmp_path / "tenants.yaml"
    first = ensure_dev_key(tmp_path, tenants_file)
    assert ensure_dev_key(tmp_path, tenants_file) == first
    assert TenantDirectory(tenants_file).principal_for_key(first).tenant == "dev"  # type: ignore[union-attr]
    assert (tmp_path / "dev-api-key").stat().st_mode & 0o777 == 0o600
    # A tenants file that lost the hash gets a fresh key instead of a dead one.
    tenants_file.write_text("")
    second = ensure_dev_key(tmp_path, tenants_file)
    assert second != first and TenantDirectory(tenants_file).principal_for_key(second).tenant == "dev"  # type: ignore[union-attr]


def test_default_plan_uses_documented_ports_and_one_generator_per_replica(tmp_path: Path) -> None:
    plan = plan_stack(REPO_ROOT / "config" / "experts.yaml", tmp_path / "tenants.yaml")
    assert (plan.gateway_port, plan.router_port, plan.scheduler_port) == (50051, 50052, 50053)
    assert [(g.expert, g.port, g.metrics_port) for g in plan.generators] == [
        ("bard-small", 50061, 9111),
        ("milton-small", 50062, 9112),
        ("scribe-large", 50063, 9113),
    ]
    specs = service_specs(plan)
    assert list(specs) == [
        "scheduler",
        "router",
        "generator-bard-small-0",
        "generator-milton-small-0",
        "generator-scribe-large-0",
        "gateway",
    ]
    assert specs["gateway"].env["ROUTER_ADDR"] == "127.0.0.1:50052"
    assert specs["gateway"].env["GATEWAY_TENANTS_FILE"] == str(tmp_path / "tenants.yaml")
    assert specs["generator-milton-small-0"].env["GENERATOR_EXPERT"] == "milton-small"
    assert specs["router"].env["SCHEDULER_ADDR"] == "127.0.0.1:50053"


def test_plan_hands_services_model_folders_not_demo_names(tmp_path: Path) -> None:
    # `switchboard up` resolves the demo names; the services get folders (they resolve no names).
    folders = {name: tmp_path / name for name in ("bard-small", "milton-small")}
    for folder in folders.values():
        folder.mkdir()
    models = {name: str(folder) for name, folder in folders.items()}
    specs = service_specs(plan_stack(REPO_ROOT / "config" / "experts.yaml", tmp_path / "k", models=models))
    assert specs["generator-bard-small-0"].env["GENERATOR_MODEL"] == str(folders["bard-small"])
    pairs = dict(pair.split("=", 1) for pair in specs["router"].env["ROUTER_MODEL_FOLDERS"].split(","))
    # scribe-large's demo name was not resolved (no folder given): the router is not told a name.
    assert pairs == {name: str(folder.resolve()) for name, folder in folders.items()}
    assert "ROUTER_MODEL_FOLDERS" not in service_specs(plan_stack(REPO_ROOT / "config" / "experts.yaml", tmp_path / "k"))["router"].env


def test_free_port_plan_has_distinct_ports(tmp_path: Path) -> None:
    plan = plan_stack(REPO_ROOT / "config" / "experts.yaml", tmp_path / "k", free_ports=True, metrics=False)
    ports = [plan.gateway_port, plan.router_port, plan.scheduler_port, *(g.port for g in plan.generators)]
    assert len(set(ports)) == len(ports)
    assert plan.gateway_metrics == 0 and all(g.metrics_port == 0 for g in plan.generators)


def test_a_service_that_exits_is_reported_with_its_output(tmp_path: Path) -> None:
    # `python -m json.tool` with no input exits at once with an error: never healthy.
    with ProcessGroup(tmp_path) as group:
        group.start(ServiceSpec("broken", "json.tool", free_port()))
        with pytest.raises(StartupError, match="broken exited with code"):
            group.wait_healthy(timeout=30)


def test_a_real_service_becomes_healthy_and_stops_on_sigterm(tmp_path: Path) -> None:
    config = REPO_ROOT / "config" / "experts.yaml"
    port = free_port()
    env = {"SCHEDULER_PORT": str(port), "SCHEDULER_METRICS_PORT": "0", "SWITCHBOARD_EXPERTS_CONFIG": str(config)}
    with ProcessGroup(tmp_path, grace=10) as group:
        process = group.start(ServiceSpec("scheduler", "switchboard.scheduler", port, env))
        group.wait_healthy(timeout=60)
        assert group.stop("scheduler") == 0
    log = process.log_path.read_text()
    assert "serving" in log and "stopped" in log  # it started, then drained on SIGTERM


def test_client_request_from_arguments() -> None:
    argv = ["generate", "hi", "--max-tokens", "5", "--temperature", "0", "--top-k", "3", "--seed", "7"]
    argv += ["--stop", "\n", "--model", "bard-small", "--repetition-penalty", "1.15"]
    request = build_request(build_parser(argv).parse_args(argv))
    assert request.prompt == "hi" and request.model == "bard-small"
    assert request.sampling.max_tokens == 5 and request.sampling.HasField("temperature")
    assert request.sampling.seed == 7 and list(request.sampling.stop) == ["\n"] and not request.sampling.HasField("top_p")
    assert request.sampling.repetition_penalty == pytest.approx(1.15)
    assert not request.HasField("cost_weight")  # unset: the router's default
    argv = ["generate", "hi", "--cost-weight", "0.05"]
    assert build_request(build_parser(argv).parse_args(argv)).cost_weight == pytest.approx(0.05)


def test_services_die_with_their_launcher(tmp_path: Path) -> None:
    """A launcher killed with SIGKILL leaves no service behind (parent-death signal)."""
    import subprocess
    import sys
    import time

    from switchboard.cli.processes import health_status

    port = free_port()
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from switchboard.cli.processes import ProcessGroup, ServiceSpec\n"
        f"group = ProcessGroup(Path({str(tmp_path)!r}))\n"
        f"p = group.start(ServiceSpec('scheduler', 'switchboard.scheduler', {port}, "
        f"{{'SCHEDULER_PORT': '{port}', 'SCHEDULER_METRICS_PORT': '0', "
        f"'SWITCHBOARD_EXPERTS_CONFIG': {str(REPO_ROOT / 'config' / 'experts.yaml')!r}}}))\n"
        "group.wait_healthy(timeout=60)\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    launcher = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        child = int(launcher.stdout.readline())
        assert health_status(f"127.0.0.1:{port}") == 1  # SERVING
    finally:
        launcher.kill()
        launcher.wait(timeout=10)
    deadline = time.monotonic() + 20
    while _running(child):
        assert time.monotonic() < deadline, "the service outlived its launcher"
        time.sleep(0.2)
    assert health_status(f"127.0.0.1:{port}") != 1


def _running(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie (an orphan's zombie may wait for a reaper)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"
