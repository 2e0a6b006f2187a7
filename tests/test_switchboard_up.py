"""`switchboard up` and `switchboard generate` as a newcomer runs them, as real commands."""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2
from switchboard.cli.processes import health_status

from .conftest import write_experts_config

pytestmark = pytest.mark.slow
SWITCHBOARD = str(Path(sys.executable).parent / "switchboard")


def _reader(stream, lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line)
    lines.put("")


def test_up_serves_generate_and_stops_everything_on_ctrl_c(tmp_path: Path, model_dir: Path) -> None:
    config = write_experts_config(tmp_path / "experts.yaml", model_dir, {"bard-small": 1})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "GATEWAY_", "SWITCHBOARD_"))}
    env.update(SWITCHBOARD_CACHE_DIR=str(tmp_path / "cache"), GENERATOR_KV_CACHE_MB="32", GENERATOR_DEVICE="cpu")
    # `up` builds the router's gate for this config in the test's cache; its corpus archive is
    # copied from the real cache when there is one, so the test does not download it again.
    from switchboard.experts.cache import cache_root

    archives = cache_root() / "downloads"
    if archives.is_dir():
        shutil.copytree(archives, tmp_path / "cache" / "experts" / "downloads")
    up = subprocess.Popen(
        [SWITCHBOARD, "up", "--free-ports", "--experts-config", str(config), "--timeout", "240"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_reader, args=(up.stdout, lines), daemon=True).start()
    output: list[str] = []
    try:
        deadline = time.monotonic() + 300
        while not any("Ctrl-C stops everything" in line for line in output):
            assert time.monotonic() < deadline and up.poll() is None, "".join(output)
            try:
                output.append(lines.get(timeout=1))
            except queue.Empty:
                continue
        text = "".join(output)
        gateway = re.search(r"gateway\s+(127\.0\.0\.1:\d+)", text).group(1)
        addresses = re.findall(r"^\s+\w+\s+(127\.0\.0\.1:\d+)", text, re.M)
        assert len(addresses) == 4  # gateway, router, scheduler, one generator
        # `up` built the router's gate for this experts config (into the test's cache) and serves it.
        gate = re.search(r"router\s+127\.0\.0\.1:\d+.*gate: (\S+)", text).group(1)
        assert (Path(gate) / "gate.json").is_file() and str(tmp_path / "cache") in gate
        key = re.search(r"dev API key: (\S+)", text).group(1)
        assert (tmp_path / "cache" / "dev-api-key").read_text().strip() == key
        result = subprocess.run(
            [SWITCHBOARD, "generate", "To be, or not to be", "--addr", gateway, "--key", key, "--max-tokens", "6", "--temperature", "0", "--repetition-penalty", "1.15"],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip()
        assert "[bard-small]" in result.stderr and "completion_tokens=" in result.stderr
        wrong = subprocess.run(
            [SWITCHBOARD, "generate", "hi", "--addr", gateway, "--key", "sb-wrong"],
            capture_output=True, text=True, timeout=60, env=env,
        )
        assert wrong.returncode == 1 and "UNAUTHENTICATED" in wrong.stderr
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGINT)
        try:
            code = up.wait(timeout=60)
        except subprocess.TimeoutExpired:
            up.kill()
            raise
    assert code == 0, "".join(output)
    for address in addresses:
        assert health_status(address, timeout=1.0) == health_pb2.HealthCheckResponse.UNKNOWN, f"{address} still up"
