"""Requests and polls the compose checks send to a running stack (shared by the plain and TLS runs)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import checks
import pytest
from engine import EngineError, http_json
from stack import ComposeStack

DEV_KEY = "sb-dev-local-only"  # compose/dev-tenants.yaml
CLIENT = str(Path(sys.executable).with_name("switchboard"))


def switchboard_services(stack: ComposeStack) -> dict[str, dict]:
    """The stack's Switchboard services (by image), name -> resolved service."""
    return {
        n: s for n, s in stack.config()["services"].items() if checks.is_switchboard_image(s.get("image", ""))
    }


def generate(
    port: int, prompt: str, model: str = "", max_tokens: int = 8, cacert: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """One completion through the gateway's published gRPC port with the project's client."""
    args = [CLIENT, "generate", prompt, "--key", DEV_KEY, "--addr", f"127.0.0.1:{port}"]
    args += ["--max-tokens", str(max_tokens), "--timeout", "60", "--temperature", "0"]
    args += (["--model", model] if model else []) + (["--cacert", str(cacert)] if cacert else [])
    return subprocess.run(args, capture_output=True, text=True, timeout=90, check=False)


def poll(what: str, probe: Callable[[], object], limit: float = 90.0, period: float = 2.0) -> object:
    """`probe()` until it returns something truthy; its last problem is the failure's message."""
    deadline = time.monotonic() + limit
    last = None
    while True:
        try:
            result = probe()
            if result:
                return result
        except EngineError as exc:
            last = exc
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {limit:.0f} s (last: {last})")
        time.sleep(period)


def trace_ids(port: int) -> list[str]:
    """Traces in the viewer (published on `port`) with server spans of all four services."""
    spans = http_json(f"http://127.0.0.1:{port}/v1/projects/default/spans?limit=1000")
    return checks.traces_spanning(spans["data"])  # type: ignore[index]
