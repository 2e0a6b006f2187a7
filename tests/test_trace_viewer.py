"""`switchboard up --traces` for real: Phoenix installed and started, one request's trace found in it.

The stack is `switchboard up --traces --free-ports` as a newcomer runs it (a cache folder of the
test's own for the dev key, logs and the viewer's database). Phoenix itself is installed into the
developer's cache (`$SWITCHBOARD_PHOENIX_DIR`, default `~/.cache/switchboard/phoenix`) the first time,
as `up` installs it, and found there afterwards; a failed install fails the test (no skip). Then
`switchboard generate` must print the viewer's URL of its request's trace, and that trace, read back
through Phoenix's own APIs (the REST spans list and the GraphQL API its UI uses), must hold the
client's root span and the server spans of all four services, parented through the hops.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from grpc_health.v1 import health_pb2
from switchboard.cli.processes import health_status
from switchboard.cli.stack import cache_dir
from switchboard.cli.traceviewer import SESSION_FILE

from .conftest import write_experts_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # the first run installs Phoenix (minutes)
SWITCHBOARD = str(Path(sys.executable).parent / "switchboard")
# The gRPC server span each service records for the request (OpenTelemetry's grpc instrumentation).
SERVER_SPAN_PREFIX = {
    "gateway": "/switchboard.v1.Gateway/",
    "router": "/switchboard.v1.Router/",
    "scheduler": "/switchboard.v1.Scheduler/",
    "generator": "/switchboard.v1.Generator/",
}


def _reader(stream: Any, lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line)
    lines.put("")


def _get_json(url: str, body: dict[str, Any] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json"} if data else {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _trace_spans(ui: str, trace_id: str) -> list[dict[str, Any]]:
    """The spans of one trace, from Phoenix's REST spans list (project `default`)."""
    spans = _get_json(f"{ui}/v1/projects/default/spans?limit=1000")["data"]
    return [s for s in spans if (s.get("context") or {}).get("trace_id") == trace_id]


def _services(spans: list[dict[str, Any]]) -> set[str]:
    return {service for s in spans for service, prefix in SERVER_SPAN_PREFIX.items() if s["name"].startswith(prefix)}


def test_up_with_traces_shows_the_trace_of_the_request_just_sent(tmp_path: Path, model_dir: Path) -> None:
    config = write_experts_config(tmp_path / "experts.yaml", model_dir, {"bard-small": 1})
    cache = tmp_path / "cache"
    phoenix_home = Path(os.environ.get("SWITCHBOARD_PHOENIX_DIR") or cache_dir() / "phoenix")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "GATEWAY_", "SWITCHBOARD_"))}
    env.update(
        SWITCHBOARD_CACHE_DIR=str(cache),
        SWITCHBOARD_PHOENIX_DIR=str(phoenix_home),
        GENERATOR_KV_CACHE_MB="32",
        GENERATOR_DEVICE="cpu",
    )
    up = subprocess.Popen(
        [SWITCHBOARD, "up", "--traces", "--free-ports", "--no-gate", "--experts-config", str(config), "--timeout", "300"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_reader, args=(up.stdout, lines), daemon=True).start()
    output: list[str] = []
    try:
        deadline = time.monotonic() + 1500  # a first install downloads about 850 MB
        while not any("Ctrl-C stops everything" in line for line in output):
            assert time.monotonic() < deadline and up.poll() is None, "".join(output)
            try:
                output.append(lines.get(timeout=1))
            except queue.Empty:
                continue
        text = "".join(output)
        ui = re.search(r"^\s+traces\s+(http://127\.0\.0\.1:\d+)", text, re.M).group(1)  # type: ignore[union-attr]
        gateway = re.search(r"gateway\s+(127\.0\.0\.1:\d+)", text).group(1)  # type: ignore[union-attr]
        addresses = re.findall(r"^\s+\w+\s+(127\.0\.0\.1:\d+)", text, re.M)
        key = re.search(r"dev API key: (\S+)", text).group(1)  # type: ignore[union-attr]
        assert (phoenix_home / "20.26.1" / ".installed").is_file()
        assert _get_json(f"{ui}/v1/projects/default/spans?limit=1")["data"] is not None  # the viewer answers

        result = subprocess.run(
            [SWITCHBOARD, "generate", "To be, or not to be", "--addr", gateway, "--key", key,
             "--max-tokens", "4", "--temperature", "0"],
            capture_output=True, text=True, timeout=120, env=env,
        )
        assert result.returncode == 0, result.stderr
        link = re.search(r"^trace: (\S+)$", result.stderr, re.M)
        assert link is not None, result.stderr
        trace_id = re.fullmatch(re.escape(ui) + r"/redirects/traces/([0-9a-f]{32})", link.group(1)).group(1)  # type: ignore[union-attr]

        # The services export in batches (every 500 ms with --traces), each process on its own clock:
        # wait until all four have arrived and every span's parent has too (one whole tree).
        def whole(spans: list[dict[str, Any]]) -> bool:
            ids = {s["context"]["span_id"] for s in spans}
            return _services(spans) == set(SERVER_SPAN_PREFIX) and all(
                s["parent_id"] is None or s["parent_id"] in ids for s in spans
            ) and any(s["name"] == "switchboard generate" for s in spans)

        spans: list[dict[str, Any]] = []
        wait_until = time.monotonic() + 60
        while time.monotonic() < wait_until and not whole(spans := _trace_spans(ui, trace_id)):
            time.sleep(0.5)
        assert _services(spans) == set(SERVER_SPAN_PREFIX), [s["name"] for s in spans]
        by_id = {s["context"]["span_id"]: s for s in spans}
        [root] = [s for s in spans if s["parent_id"] is None]
        assert root["name"] == "switchboard generate"
        # One tree: every span's parent is in the trace, and the gateway's server span hangs off the client's.
        assert all(s["parent_id"] in by_id for s in spans if s is not root), [(s["name"], s["parent_id"]) for s in spans]
        children = defaultdict(list)
        for s in spans:
            children[s["parent_id"]].append(s["name"])
        assert any(name.startswith(SERVER_SPAN_PREFIX["gateway"]) for name in children[root["context"]["span_id"]])

        # What the printed URL opens: Phoenix's UI resolves the trace id through this GraphQL query.
        found = _get_json(
            f"{ui}/graphql",
            {
                "query": "query($id: String!) { getTraceByOtelId(traceId: $id) "
                "{ traceId numSpans rootSpan { name } project { name } } }",
                "variables": {"id": trace_id},
            },
        )["data"]["getTraceByOtelId"]
        assert found["traceId"] == trace_id and found["project"]["name"] == "default"
        assert found["rootSpan"]["name"] == "switchboard generate" and found["numSpans"] >= len(spans)
        with urllib.request.urlopen(link.group(1), timeout=10) as page:
            assert page.status == 200 and b"Phoenix" in page.read()
        assert (cache / SESSION_FILE).is_file()
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGINT)
        try:
            code = up.wait(timeout=90)
        except subprocess.TimeoutExpired:
            up.kill()
            raise
    assert code == 0, "".join(output)
    # Ctrl-C stopped the viewer with the rest, and `generate` no longer points at it.
    with pytest.raises((urllib.error.URLError, OSError)):
        urllib.request.urlopen(f"{ui}/healthz", timeout=2)
    assert not (cache / SESSION_FILE).exists()
    for address in addresses:
        assert health_status(address, timeout=1.0) == health_pb2.HealthCheckResponse.UNKNOWN, f"{address} still up"
