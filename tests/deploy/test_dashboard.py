"""The Grafana dashboard of the observability overlay: its structure, its provisioning, the
compose service, and the metric names its queries (and the alert rules) select.

Whether those metrics are exported is checked against a running stack by
tests/test_dashboard_metrics.py (with observability_checks.check_metrics_exported).
"""

from __future__ import annotations

import copy
from pathlib import Path

import deploy_checks as dc
import observability_checks as oc
import pytest
import yaml


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return oc.load_dashboard()


def test_dashboard_structure(dashboard: dict) -> None:
    assert oc.check_dashboard(dashboard) == []


def test_dashboard_covers_the_issues_panels(dashboard: dict) -> None:
    """Request rate, errors, TTFT/TPOT percentiles, queue depth, KV use, prefix hit rate, expert
    traffic shares, tenant tokens and cost by tenant with its budget (rollouts export nothing yet)."""
    names = set(oc.referenced_metrics(dashboard, []))
    assert {
        "switchboard_gateway_requests_total",
        "switchboard_rpc_requests_total",
        "switchboard_gateway_time_to_first_token_seconds_bucket",
        "switchboard_gateway_time_per_output_token_seconds_bucket",
        "switchboard_generator_sequences",
        "switchboard_gateway_admission_queued",
        "switchboard_generator_kv_blocks",
        "switchboard_generator_cached_prompt_tokens_total",
        "switchboard_router_decisions_total",
        "switchboard_scheduler_slo_requests_total",
        "switchboard_gateway_tenant_tokens_total",
        "switchboard_gateway_cost_total",
        "switchboard_gateway_tenant_month_cost",
        "switchboard_gateway_tenant_cost_budget",
    } <= names
    quantiles = [e for _, e in oc.dashboard_expressions(dashboard) if "histogram_quantile(0.99" in e]
    assert len(quantiles) >= 2


def test_dashboard_names_no_undefined_recording_rule(dashboard: dict) -> None:
    assert oc.check_recorded_names_defined(dashboard, oc.load_rules()) == []


@pytest.mark.parametrize(
    ("break_it", "problem"),
    [
        (lambda d: d["panels"][1].update(id=d["panels"][0]["id"]), "id must be a unique integer"),
        (lambda d: d["panels"][0].update(targets=[]), "has no targets"),
        (lambda d: d["panels"][0].update(datasource={"type": "prometheus", "uid": "abc123"}), "is not the templated Prometheus"),
        (lambda d: d["templating"].update(list=[]), "no Prometheus datasource variable"),
        (lambda d: d["panels"][0]["targets"].append(dict(d["panels"][0]["targets"][0])), "must be present and unique"),
        (lambda d: d["panels"][0]["gridPos"].update(x=20), "within 24 columns"),
    ],
)
def test_a_broken_dashboard_is_reported(dashboard: dict, break_it, problem: str) -> None:
    broken = copy.deepcopy(dashboard)
    break_it(broken)
    problems = oc.check_dashboard(broken)
    assert any(problem in p for p in problems), problems


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (expert) (rate(a_total{expert=~"$expert"}[$__rate_interval]))', {"a_total"}),
        ("histogram_quantile(0.99, sum by (le) (rate(b_bucket[5m])))", {"b_bucket"}),
        ('x / ignoring(expert) group_left sum(rate(x[1m] offset 1h)) > 1e3', {"x"}),
        ('up{job=~"a|b"} == 0 and on(job) c:ratio_rate5m > 14.4 * 0.001', {"up", "c:ratio_rate5m"}),
        ('max by (e) (max_over_time(r{state="ready"}[1h])) > 0 or sum without (i) (d) unless e', {"r", "d", "e"}),
        ('label_replace(m, "dst", "$1", "src", "(.*)")', {"m"}),
    ],
)
def test_metric_names_of_promql(expr: str, names: set[str]) -> None:
    assert oc.metric_names(expr) == names


def test_variable_queries_name_their_metric(dashboard: dict) -> None:
    where = dict(oc.dashboard_expressions(dashboard))
    assert where["variable expert"] == "switchboard_scheduler_replicas"


def test_exported_names_read_types_and_samples() -> None:
    text = "\n".join(
        [
            "# TYPE c_total counter",
            "# TYPE h histogram",
            "# TYPE g gauge",
            "# TYPE lone counter",
            'c_total{a="1"} 3',
            'h_bucket{le="1"} 1',
            "g 2",
        ]
    )
    names = oc.exported_names(text)
    assert {"c_total", "h_bucket", "h_sum", "h_count", "g", "lone_total"} <= names
    dashboard = {"panels": [{"id": 1, "targets": [{"refId": "A", "expr": "rate(c_total[1m]) + missing_total + up"}]}]}
    assert oc.check_metrics_exported(dashboard, [], names) == [
        "missing_total (in panel 1 None target A) is exported by no service"
    ]


# --------------------------------------------------------------------------- provisioning


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards(repo: Path, dashboard: dict) -> None:
    sources = yaml.safe_load((oc.GRAFANA_PROVISIONING / "datasources/prometheus.yml").read_text())["datasources"]
    assert [(s["type"], s["url"]) for s in sources] == [("prometheus", "http://prometheus:9090")]
    providers = yaml.safe_load((oc.GRAFANA_PROVISIONING / "dashboards/switchboard.yml").read_text())["providers"]
    paths = {p["options"]["path"] for p in providers}
    model, problems = dc.compose_config([repo / "compose/compose.yaml", repo / "compose/compose.observability.yaml"], [])
    assert problems == []
    grafana = model["services"]["grafana"]
    mounts = {v["target"]: v for v in grafana["volumes"]}
    for path in paths | {"/etc/grafana/provisioning/datasources", "/etc/grafana/provisioning/dashboards"}:
        assert path in mounts, f"{path} is not mounted into grafana"
    assert Path(mounts[next(iter(paths))]["source"]) == oc.DASHBOARD.parent
    assert grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"].startswith(next(iter(paths)))


def test_grafana_runs_non_root_with_read_only_mounts_on_the_loopback(repo: Path) -> None:
    model, problems = dc.compose_config([repo / "compose/compose.yaml", repo / "compose/compose.observability.yaml"], [])
    assert problems == []
    grafana = model["services"]["grafana"]
    assert dc.check_image_pinned(grafana["image"], dc.THIRD_PARTY["grafana"], "grafana") == []
    assert grafana["image"].startswith("grafana/grafana:11.")
    user = str(grafana["user"]).split(":")[0]
    assert user.isdigit() and user != "0"
    assert grafana["volumes"] and all(v.get("read_only") for v in grafana["volumes"])
    assert [(p["host_ip"], int(p["target"])) for p in grafana["ports"]] == [("127.0.0.1", 3000)]


def test_every_dashboard_query_is_valid_promql(dashboard: dict, tmp_path: Path) -> None:
    """promtool parses each query (as a recording rule), Grafana's variables given sample values."""
    values = {"$__rate_interval": "1m", "$__range": "1h", "$expert": ".*"}
    rules = []
    for number, (_, expr) in enumerate(oc.dashboard_expressions(dashboard)):
        for variable, value in values.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"an unknown Grafana variable in {expr}"
        rules.append({"record": f"dashboard:query:{number}", "expr": expr})
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert dc.promtool(["check", "rules", str(path)]) == []
