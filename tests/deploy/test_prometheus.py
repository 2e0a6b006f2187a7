"""Prometheus of the compose stack: promtool checks its config and rules and runs the rules' unit tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import deploy_checks as dc
import observability_checks as oc
import pytest

RULES = "rules/switchboard.rules.yml"


@pytest.fixture
def prometheus_copy(repo: Path, tmp_path: Path) -> Path:
    """compose/prometheus copied, with the rule file path made local (the container path is absolute)."""
    folder = tmp_path / "prometheus"
    shutil.copytree(repo / "compose/prometheus", folder)
    for config in (folder / "prometheus.yml", folder / "prometheus.vllm.yml"):
        text = config.read_text()
        assert f"/etc/prometheus/{RULES}" in text, f"{config.name} does not load the rules file"
        config.write_text(text.replace(f"/etc/prometheus/{RULES}", str(folder / RULES)))
    return folder


# prometheus.vllm.yml: read with compose.vllm.observability.yaml (the example vLLM pools).
@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus.vllm.yml"])
def test_config_and_rules_are_valid(config: str, prometheus_copy: Path) -> None:
    assert dc.promtool(["check", "config", str(prometheus_copy / config)]) == []


def test_rules_pass_promtool_check_rules(repo: Path) -> None:
    assert dc.promtool(["check", "rules", str(repo / "compose/prometheus" / RULES)]) == []


def test_alert_rules_unit_tests_pass(repo: Path) -> None:
    assert dc.promtool(["test", "rules", "switchboard.rules.test.yml"], cwd=repo / "compose/prometheus/rules") == []


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    assert oc.check_alerts_unit_tested(oc.load_rules()) == []


def test_every_alert_waits_has_a_severity_and_says_what_to_do() -> None:
    assert oc.check_alert_rules(oc.load_rules()) == []


def test_the_rules_cover_the_issues_alerts() -> None:
    alerts = {r["alert"] for r in oc.load_rules() if "alert" in r}
    assert {
        "SwitchboardAvailabilityBudgetBurnFast",
        "SwitchboardAvailabilityBudgetBurnSlow",
        "SwitchboardTtftSloBudgetBurnFast",
        "SwitchboardTtftSloBudgetBurnSlow",
        "SwitchboardServerErrors",
        "SwitchboardServiceDown",
        "SwitchboardExpertNoReadyReplica",
        "SwitchboardGeneratorQueueDeep",
        "SwitchboardKvCacheFull",
        "SwitchboardGatewayShedding",
        "SwitchboardLimitsStoreErrors",
        "SwitchboardTenantBudgetExhausted",
    } <= alerts


@pytest.mark.parametrize(
    ("original", "broken", "alert"),
    [
        ("> 0.95", "> 1.5", "SwitchboardKvCacheFull"),
        ("14.4 * 0.001", "30 * 0.001", "SwitchboardAvailabilityBudgetBurnFast"),
        ("6 * 0.01", "10 * 0.01", "SwitchboardTtftSloBudgetBurnFast"),
        ('{state="waiting"}) > 8', '{state="waiting"}) > 20', "SwitchboardGeneratorQueueDeep"),
    ],
)
def test_broken_alert_threshold_fails_its_unit_test(prometheus_copy: Path, original: str, broken: str, alert: str) -> None:
    rules = prometheus_copy / RULES
    text = rules.read_text()
    assert original in text
    rules.write_text(text.replace(original, broken))
    problems = dc.promtool(["test", "rules", "switchboard.rules.test.yml"], cwd=prometheus_copy / "rules")
    assert any(alert in p for p in problems), problems


def test_broken_rule_expression_fails_the_config_check(prometheus_copy: Path) -> None:
    rules = prometheus_copy / RULES
    rules.write_text(rules.read_text().replace("== 0", "== = 0"))
    problems = dc.promtool(["check", "config", str(prometheus_copy / "prometheus.yml")])
    assert any("switchboard.rules.yml" in p for p in problems), problems


def test_an_alert_without_a_unit_test_is_reported() -> None:
    rules = [*oc.load_rules(), {"alert": "Untested", "expr": "vector(1)", "for": "1m"}]
    assert oc.check_alerts_unit_tested(rules) == [
        "alert Untested: no unit test expects it to fire",
        "alert Untested: no unit test expects it to stay quiet",
    ]
    assert oc.check_alert_rules(rules[-1:]) == [
        "alert Untested: severity label must be critical, warning or info",
        "alert Untested: has no summary annotation",
        "alert Untested: has no action annotation",
    ]
