"""Every metric the Grafana dashboard and the Prometheus rules name is one a running stack exports.

Starts a stack (scheduler, router, one bard-small generator, gateway), sends one request through
the gateway, scrapes every service's /metrics (plain HTTP; the gRPC hops run mutual TLS) and checks
the names of compose/grafana/dashboards/switchboard.json and compose/prometheus/rules against
them (tests/deploy/observability_checks.py: histogram and counter suffixes are read from the
TYPE lines; recording-rule outputs and Prometheus' own `up` are left out).
"""

from __future__ import annotations

import importlib.util
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from switchboard.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

from .conftest import RunningStack, start_stack

pytestmark = pytest.mark.slow


def _load_checks():
    """tests/deploy/observability_checks.py (test code next to the deploy tests, not a package)."""
    path = Path(__file__).parent / "deploy" / "observability_checks.py"
    spec = importlib.util.spec_from_file_location("observability_checks", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("observability_checks", module)
    spec.loader.exec_module(module)
    return module


oc = _load_checks()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[RunningStack]:
    running = start_stack(tmp_path_factory.mktemp("dashboard"), model_dir, {"bard-small": 1})
    try:
        yield running
    finally:
        running.stack.stop()


def _scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


@pytest.fixture(scope="module")
def scraped(stack: RunningStack) -> dict[str, str]:
    """{service: exposition text} of every service, after one request went through the gateway."""
    with grpc.insecure_channel(stack.gateway_addr) as channel:
        request = gateway_pb2.GenerateRequest(
            prompt="To be, or not to be", sampling=common_pb2.SamplingParams(max_tokens=8, temperature=0.0)
        )
        messages = list(gateway_pb2_grpc.GatewayStub(channel).Generate(request, metadata=stack.auth(), timeout=60))
    assert messages and messages[-1].usage.completion_tokens > 0
    plan = stack.stack.plan
    ports = {"gateway": plan.gateway_metrics, "router": plan.router_metrics, "scheduler": plan.scheduler_metrics}
    ports |= {f"generator-{g.replica_id}": g.metrics_port for g in plan.generators}
    return {name: _scrape(port) for name, port in ports.items()}


def test_every_dashboard_and_rule_metric_is_exported(scraped: dict[str, str]) -> None:
    exported = set().union(*(oc.exported_names(text) for text in scraped.values()))
    dashboard, rules = oc.load_dashboard(), oc.load_rules()
    referenced = oc.referenced_metrics(dashboard, rules)
    assert len(referenced) > 15  # the scanner found the queries' names
    assert oc.check_metrics_exported(dashboard, rules, exported) == []


def test_the_request_shows_in_the_scraped_samples(scraped: dict[str, str]) -> None:
    """The scrape is of live counters, not only of registered names."""
    samples = {line.split("{")[0] for line in scraped["gateway"].splitlines() if line and not line.startswith("#")}
    assert {"switchboard_gateway_requests_total", "switchboard_gateway_time_to_first_token_seconds_bucket"} <= samples
