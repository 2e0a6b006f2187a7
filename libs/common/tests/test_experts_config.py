"""The experts config loader: the real file parses; bad files name the problem."""

from __future__ import annotations

from pathlib import Path

import pytest
from switchboard.common.experts_config import ExpertsConfigError, load_experts_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "experts.yaml"
    path.write_text(text)
    return path


def test_valid_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "experts:\n  - {name: bard-small, description: plays, model: bard-small}\n"
        "  - {name: big, description: all, model: /models/big, relative_cost: 4.5, replicas: 2}\n",
    )
    specs = load_experts_config(path)
    assert [s.name for s in specs] == ["bard-small", "big"]
    assert specs[1].relative_cost == 4.5 and specs[1].replicas == 2 and specs[0].replicas == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("experts: []\n", "non-empty 'experts' list"),
        ("experts:\n  - {name: Bad_Name, model: x}\n", r"experts\[0\].name"),
        ("experts:\n  - {name: a}\n", r"experts\[0\].model: required"),
        ("experts:\n  - {name: a, model: x, relative_cost: 0}\n", "relative_cost: must be a positive number"),
        ("experts:\n  - {name: a, model: x, colour: red}\n", "unknown keys"),
        ("experts:\n  - {name: a, model: x}\n  - {name: a, model: y}\n", "duplicate expert names"),
        ("experts: [\n", "not valid YAML"),
    ],
)
def test_invalid_files(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ExpertsConfigError, match=message):
        load_experts_config(write(tmp_path, text))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ExpertsConfigError, match="SWITCHBOARD_EXPERTS_CONFIG"):
        load_experts_config(tmp_path / "nope.yaml")


def test_slo_is_optional_and_validated(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "experts:\n  - {name: a, model: a, slo: {ttft_seconds: 0.5, tpot_seconds: 0.05}}\n"
        "  - {name: b, model: b, slo: {ttft_seconds: 2}}\n  - {name: c, model: c}\n",
    )
    a, b, c = load_experts_config(path)
    assert a.slo is not None and (a.slo.ttft_seconds, a.slo.tpot_seconds) == (0.5, 0.05)
    assert b.slo is not None and (b.slo.ttft_seconds, b.slo.tpot_seconds) == (2.0, None)
    assert c.slo is None
    for bad, says in (
        ("slo: 3", "expected a mapping"),
        ("slo: {ttft: 1}", "unknown keys"),
        ("slo: {ttft_seconds: 0}", "slo.ttft_seconds"),
        ("slo: {tpot_seconds: true}", "slo.tpot_seconds"),
    ):
        with pytest.raises(ExpertsConfigError, match=says):
            load_experts_config(write(tmp_path, f"experts:\n  - {{name: a, model: a, {bad}}}\n"))
