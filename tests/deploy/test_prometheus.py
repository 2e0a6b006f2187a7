"""Prometheus of the compose stack: promtool checks its config and unit-tests its alert rules."""

from __future__ import annotations

import shutil
from pathlib import Path

import deploy_checks as dc
import pytest


@pytest.fixture
def prometheus_copy(repo: Path, tmp_path: Path) -> Path:
    """compose/prometheus copied, with the rule file path made local (the container path is absolute)."""
    folder = tmp_path / "prometheus"
    shutil.copytree(repo / "compose/prometheus", folder)
    config = folder / "prometheus.yml"
    config.write_text(config.read_text().replace("/etc/prometheus/alerts.yml", str(folder / "alerts.yml")))
    return folder


def test_config_and_rules_are_valid(prometheus_copy: Path) -> None:
    assert dc.promtool(["check", "config", str(prometheus_copy / "prometheus.yml")]) == []


def test_alert_rules_unit_tests_pass(repo: Path) -> None:
    assert dc.promtool(["test", "rules", "alerts.test.yml"], cwd=repo / "compose/prometheus") == []


def test_broken_alert_threshold_fails_its_unit_test(prometheus_copy: Path) -> None:
    rules = prometheus_copy / "alerts.yml"
    rules.write_text(rules.read_text().replace("> 0.95", "> 1.5"))
    problems = dc.promtool(["test", "rules", "alerts.test.yml"], cwd=prometheus_copy)
    assert any("SwitchboardKvCacheFull" in p for p in problems), problems


def test_broken_rule_expression_fails_the_config_check(prometheus_copy: Path) -> None:
    rules = prometheus_copy / "alerts.yml"
    rules.write_text(rules.read_text().replace("== 0", "== = 0"))
    problems = dc.promtool(["check", "config", str(prometheus_copy / "prometheus.yml")])
    assert any("alerts.yml" in p for p in problems), problems
