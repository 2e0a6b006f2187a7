"""Checks of the compose observability files: the Grafana dashboard and the Prometheus rules.

Test code (like deploy_checks): tests/deploy checks the files' structure and that every alert
has a unit test; tests/test_dashboard_metrics.py checks every metric they name against what a
running stack's /metrics endpoints export.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "compose/grafana/dashboards/switchboard.json"
GRAFANA_PROVISIONING = REPO / "compose/grafana/provisioning"
RULES = REPO / "compose/prometheus/rules/switchboard.rules.yml"
RULES_TEST = REPO / "compose/prometheus/rules/switchboard.rules.test.yml"

# Series Prometheus makes itself rather than scraping them from a service.
PROMETHEUS_BUILTINS = frozenset({"up", "ALERTS", "ALERTS_FOR_STATE", "scrape_duration_seconds", "scrape_samples_scraped"})

# PromQL words that look like identifiers but name no series.
_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or", "unless",
     "inf", "nan", "start", "end"}
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(?P<metric>[^,()]+?)\s*,\s*)?(?P<label>[A-Za-z_]\w*)\s*\)\s*$")


def metric_names(expr: str) -> set[str]:
    """The metric (or recording-rule) names a PromQL expression selects.

    A small scanner, not a parser: strings, label matchers, ranges, grouping label lists and
    Grafana variables are removed first, then every identifier not called as a function and
    not a keyword is a name.
    """
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _GROUPING.sub(" ", text)
    text = re.sub(r"\$\{[^}]*\}|\$\w+", " ", text)
    names = set()
    for match in _IDENT.finditer(text):
        before = text[match.start() - 1] if match.start() else " "
        if before.isdigit() or before == ".":  # 1e3, 0.5, a duration's unit
            continue
        if text[match.end() :].lstrip().startswith("("):  # a function or aggregation
            continue
        if match.group().lower() in _KEYWORDS:
            continue
        names.add(match.group())
    return names


# --------------------------------------------------------------------------- dashboard


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    """The dashboard JSON model."""
    return json.loads(path.read_text())


def dashboard_panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested panels included."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def dashboard_expressions(dashboard: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable (label_values' metric)."""
    found = []
    for panel in dashboard_panels(dashboard):
        for target in panel.get("targets", []):
            if target.get("expr"):
                found.append((f"panel {panel.get('id')} {panel.get('title')!r} target {target.get('refId')}", target["expr"]))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        query = query.get("query", "") if isinstance(query, dict) else str(query or "")
        where = f"variable {variable.get('name')}"
        match = _LABEL_VALUES.match(query)
        if match:
            if match.group("metric"):
                found.append((where, match.group("metric")))
        elif query:
            found.append((where, re.sub(r"^\s*query_result\((.*)\)\s*$", r"\1", query)))
    return found


def check_dashboard(dashboard: Mapping[str, Any]) -> list[str]:
    """Structure: a uid and title, a Prometheus datasource variable every query uses, panels with
    unique ids and grid positions, each data panel with PromQL targets of unique refIds."""
    problems = []
    for key in ("uid", "title", "schemaVersion", "panels"):
        if not dashboard.get(key):
            problems.append(f"the dashboard has no {key}")
    variables = dashboard.get("templating", {}).get("list", [])
    datasource_vars = [v["name"] for v in variables if v.get("type") == "datasource" and v.get("query") == "prometheus"]
    if not datasource_vars:
        problems.append("the dashboard has no Prometheus datasource variable (templating type datasource, query prometheus)")
    allowed = {f"${{{name}}}" for name in datasource_vars} | {f"${name}" for name in datasource_vars}
    names = [v.get("name") for v in variables]
    if len(names) != len(set(names)):
        problems.append(f"variable names repeat: {names}")
    seen: set[int] = set()
    for panel in dashboard_panels(dashboard):
        where = f"panel {panel.get('id')} {panel.get('title')!r}"
        pid = panel.get("id")
        if not isinstance(pid, int) or pid in seen:
            problems.append(f"{where}: id must be a unique integer")
        seen.add(pid if isinstance(pid, int) else -1)
        grid = panel.get("gridPos") or {}
        if not all(isinstance(grid.get(k), int) for k in ("h", "w", "x", "y")) or grid.get("x", 0) + grid.get("w", 0) > 24:
            problems.append(f"{where}: gridPos {grid} must have integer h, w, x, y within 24 columns")
        if panel.get("type") in ("row", "text"):
            continue
        if not panel.get("title"):
            problems.append(f"{where}: has no title")
        targets = panel.get("targets") or []
        if not targets:
            problems.append(f"{where}: has no targets")
        for source in [panel.get("datasource"), *(t.get("datasource") for t in targets)]:
            if not isinstance(source, dict) or source.get("type") != "prometheus" or source.get("uid") not in allowed:
                problems.append(f"{where}: datasource {source} is not the templated Prometheus {sorted(allowed)}")
        refs = [t.get("refId") for t in targets]
        if len(refs) != len(set(refs)) or not all(refs):
            problems.append(f"{where}: refIds {refs} must be present and unique")
        for target in targets:
            if not str(target.get("expr", "")).strip():
                problems.append(f"{where} target {target.get('refId')}: has no PromQL expr")
    for variable in variables:
        if variable.get("type") == "query":
            source = variable.get("datasource")
            if not isinstance(source, dict) or source.get("uid") not in allowed:
                problems.append(f"variable {variable.get('name')}: datasource {source} is not the templated Prometheus")
    return problems


# --------------------------------------------------------------------------- rules


def load_rules(path: Path = RULES) -> list[dict[str, Any]]:
    """Every rule of every group."""
    return [rule for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


def rule_expressions(rules: Iterable[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(where, PromQL) of every recording and alerting rule."""
    return [(f"rule {r.get('alert') or r.get('record')}", str(r["expr"])) for r in rules]


def recorded_names(rules: Iterable[Mapping[str, Any]]) -> set[str]:
    """The series the recording rules write."""
    return {r["record"] for r in rules if "record" in r}


def check_alert_rules(rules: Iterable[Mapping[str, Any]]) -> list[str]:
    """Every alert waits (`for:`), has a severity and says what it means and what to do."""
    problems = []
    for rule in rules:
        if "alert" not in rule:
            continue
        where = f"alert {rule['alert']}"
        if "for" not in rule:
            problems.append(f"{where}: has no `for:`")
        if (rule.get("labels") or {}).get("severity") not in ("critical", "warning", "info"):
            problems.append(f"{where}: severity label must be critical, warning or info")
        annotations = rule.get("annotations") or {}
        for key in ("summary", "action"):
            if not str(annotations.get(key, "")).strip():
                problems.append(f"{where}: has no {key} annotation")
    return problems


def check_alerts_unit_tested(rules: Iterable[Mapping[str, Any]], tests_path: Path = RULES_TEST) -> list[str]:
    """Every alert has a promtool unit test where it fires and one where it stays quiet."""
    firing: set[str] = set()
    quiet: set[str] = set()
    for test in yaml.safe_load(tests_path.read_text())["tests"]:
        for case in test.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    problems = []
    for rule in rules:
        name = rule.get("alert")
        if name and name not in firing:
            problems.append(f"alert {name}: no unit test expects it to fire")
        if name and name not in quiet:
            problems.append(f"alert {name}: no unit test expects it to stay quiet")
    return problems


# --------------------------------------------------------------------------- exported metrics


def exported_names(text: str) -> set[str]:
    """Every series name a Prometheus text exposition offers, from its samples and its TYPE lines
    (a labelled metric with no child yet has only its TYPE line), with each type's suffixes."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            parts = line.split()
            if len(parts) < 4:
                continue
            name, kind = parts[2], parts[3]
            base = name.removesuffix("_total") if kind == "counter" else name
            if kind == "counter":
                names |= {base, f"{base}_total", f"{base}_created"}
            elif kind in ("histogram", "gaugehistogram"):
                names |= {name, f"{name}_bucket", f"{name}_sum", f"{name}_count", f"{name}_created"}
            elif kind == "summary":
                names |= {name, f"{name}_sum", f"{name}_count", f"{name}_created"}
            else:
                names.add(name)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


def referenced_metrics(dashboard: Mapping[str, Any], rules: list[dict[str, Any]]) -> dict[str, list[str]]:
    """{metric: where} of every scraped metric the dashboard and the rules name (recording-rule
    outputs and Prometheus' own series left out)."""
    recorded = recorded_names(rules)
    found: dict[str, list[str]] = {}
    for where, expr in [*dashboard_expressions(dashboard), *rule_expressions(rules)]:
        for name in metric_names(expr):
            if name in recorded or name in PROMETHEUS_BUILTINS:
                continue
            found.setdefault(name, []).append(where)
    return found


def check_recorded_names_defined(dashboard: Mapping[str, Any], rules: list[dict[str, Any]]) -> list[str]:
    """A name with a colon (the recording-rule convention) is one a rule records."""
    recorded = recorded_names(rules)
    problems = []
    for where, expr in [*dashboard_expressions(dashboard), *rule_expressions(rules)]:
        for name in sorted(metric_names(expr)):
            if ":" in name and name not in recorded:
                problems.append(f"{where}: {name} looks like a recording rule but no rule records it")
    return problems


def check_metrics_exported(dashboard: Mapping[str, Any], rules: list[dict[str, Any]], exported: set[str]) -> list[str]:
    """Every metric the dashboard and the rules name is among the exported ones."""
    return [
        f"{name} (in {', '.join(sorted(set(where)))}) is exported by no service"
        for name, where in sorted(referenced_metrics(dashboard, rules).items())
        if name not in exported
    ]
