"""`switchboard rollout` against a real scheduler process: start, status, pause, resume, abort, list,
and the errors it reports (one line, exit code 2)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from switchboard.cli.main import main
from switchboard.cli.processes import ProcessGroup, ServiceSpec, free_port
from switchboard.v1 import scheduler_pb2, scheduler_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def scheduler(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    group = ProcessGroup(tmp_path / "logs")
    env = {
        "SCHEDULER_PORT": str(port),
        "SCHEDULER_METRICS_PORT": "0",
        "SWITCHBOARD_EXPERTS_CONFIG": str(REPO_ROOT / "config" / "experts.yaml"),
    }
    group.start(ServiceSpec("scheduler", "switchboard.scheduler", port, env))
    try:
        group.wait_healthy(timeout=60)
        address = f"127.0.0.1:{port}"
        with grpc.insecure_channel(address) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            for replica_id, revision, replica_port in (("old", "v1", 50061), ("new", "v2", 50062)):
                stub.Register(
                    scheduler_pb2.RegisterRequest(
                        replica_id=replica_id, expert="bard-small", address=f"127.0.0.1:{replica_port}", revision=revision
                    ),
                    timeout=10,
                )
        yield address
    finally:
        group.stop_all()


def test_the_rollout_commands(scheduler: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    probe = tmp_path / "probe.txt"
    probe.write_text("To be, or not to be\n\nNow is the winter of our discontent\n")
    code = main(
        ["rollout", "--scheduler", scheduler, "start", "bard-small", "--from", "v1", "--to", "v2", "--step", "0.25:600",
         "--step", "1:600", "--min-requests", "5", "--probe-file", str(probe)]
    )
    out = capsys.readouterr().out
    assert code == 0 and "bard-small: v1 -> v2 (canary)" in out and "step 1/2, weight 0" in out
    assert main(["rollout", "--scheduler", scheduler, "--json", "status", "bard-small"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["spec"]["quality_probe"]["texts"] == ["To be, or not to be", "Now is the winter of our discontent"]
    assert status["state"] == "ROLLOUT_STATE_RUNNING"
    assert main(["rollout", "--scheduler", scheduler, "pause", "bard-small", "--reason", "lunch"]) == 0
    assert "state paused" in capsys.readouterr().out
    assert main(["rollout", "--scheduler", scheduler, "resume", "bard-small"]) == 0
    assert main(["rollout", "--scheduler", scheduler, "abort", "bard-small", "--reason", "drill"]) == 0
    assert "state aborted" in capsys.readouterr().out
    assert main(["rollout", "--scheduler", scheduler, "list"]) == 0
    assert "reason: drill" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["start", "bard-small", "--from", "v1", "--to", "v1"], "INVALID_ARGUMENT: spec.to_revision"),
        (["start", "bard-small", "--from", "v1", "--to", "v3"], "FAILED_PRECONDITION"),
        (["start", "bard-small", "--from", "v1", "--to", "v2", "--deploy-model", "/m"], "no deployer"),
        (["start", "bard-small", "--from", "v1", "--to", "v2", "--probe-file", "/nonexistent/probe.txt"], "No such file"),
        (["status", "milton-small"], "NOT_FOUND"),
        (["pause", "milton-small"], "NOT_FOUND"),
    ],
)
def test_errors_are_one_line_and_exit_2(
    scheduler: str, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["rollout", "--scheduler", scheduler, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("switchboard rollout: ") and message in err and "\n" not in err


def test_a_bad_step_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["rollout", "start", "bard-small", "--from", "v1", "--to", "v2", "--step", "half"])
    assert "a step is WEIGHT:SECONDS" in capsys.readouterr().err
