"""`switchboard router train | eval | build | path` on real scored prompts of the demo experts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from switchboard.cli.main import main
from switchboard.routing.dataset import RouterDataset
from switchboard.routing.gate_cli import build_default_gate, evaluate

REPO = Path(__file__).resolve().parents[3]
EXPERTS_CONFIG = REPO / "config" / "experts.yaml"


@pytest.fixture(scope="module")
def default_gate() -> Path:
    """The default gate of config/experts.yaml (built by `make gate`; built here if missing)."""
    return build_default_gate(EXPERTS_CONFIG, progress=lambda _: None)


@pytest.fixture(scope="module")
def default_data(default_gate: Path) -> RouterDataset:
    config = json.loads((default_gate / "gate.json").read_text())
    return RouterDataset.load(config["training"]["dataset"]["folder"])


def test_learned_gate_beats_the_ngram_rule_and_random_at_equal_cost(default_gate: Path, default_data: RouterDataset) -> None:
    result = evaluate(default_data, default_gate, EXPERTS_CONFIG)
    rows = {row["name"]: row for row in result["rows"]}
    assert result["prompts"] == len(default_data.split("test")) >= 400
    at_ngram, ngram = rows["learned gate @ n-gram's cost"], rows["n-gram rule"]
    assert at_ngram["cost_fraction"] <= ngram["cost_fraction"] + 1e-9
    assert at_ngram["quality"] > ngram["quality"]
    gate, rand = rows["learned gate"], rows["random at equal cost"]
    assert abs(gate["cost_fraction"] - rand["cost_fraction"]) < 0.02
    assert gate["quality"] > rand["quality"]
    # The default operating point is chosen on held-back training prompts to stay within half of
    # always-best's cost; on the test split it lands near there.
    validation = json.loads((default_gate / "gate.json").read_text())["metrics"]["validation"]
    assert validation["cost_fraction"] <= 0.5 + 1e-9 and gate["cost_fraction"] < 0.6
    assert gate["apgr"] > rows["always-cheapest"]["apgr"]
    # The oracle bounds everything at the same lambda.
    assert rows["oracle (same lambda)"]["quality"] >= gate["quality"]


def test_train_then_eval_from_the_command_line(
    small_build: tuple[Path, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = small_build[0]
    assert main(["router", "train", "--data", str(data), "--out", str(tmp_path / "gate"), "--epochs", "3"]) == 0
    assert (tmp_path / "gate" / "gate.json").is_file()
    plot, numbers = tmp_path / "curve.png", tmp_path / "eval.json"
    code = main(
        ["router", "eval", "--data", str(data), "--gate", str(tmp_path / "gate"), "--plot", str(plot), "--json", str(numbers)]
    )
    out = capsys.readouterr().out
    assert code == 0
    for name in ("learned gate", "n-gram rule", "always-cheapest", "always-best", "random at equal cost", "oracle"):
        assert name in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {row["name"] for row in json.loads(numbers.read_text())["rows"]} >= {"learned gate", "n-gram rule"}


def test_eval_refuses_a_gate_for_other_experts(
    small_build: tuple[Path, list[str]], default_gate: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = json.loads((default_gate / "gate.json").read_text())
    other = tmp_path / "other-gate"
    shutil.copytree(default_gate, other)
    config["experts"][0]["name"] = "someone-else"
    (other / "gate.json").write_text(json.dumps(config))  # also breaks the version check: either refusal is clear
    assert main(["router", "eval", "--data", str(small_build[0]), "--gate", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("switchboard router eval: ") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["router", "train", "--data", "/nonexistent", "--out", "/tmp/x"], "train"),
        (["router", "eval", "--data", "/nonexistent", "--gate", "/tmp/x"], "eval"),
    ],
)
def test_missing_inputs_are_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"switchboard router {message}: ") and len(err.strip().splitlines()) == 1


def test_path_names_the_cached_default_gate(default_gate: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["router", "path", "--experts-config", str(EXPERTS_CONFIG)]) == 0
    assert capsys.readouterr().out.strip() == str(default_gate)
    assert main(["router", "build", "--experts-config", str(EXPERTS_CONFIG)]) == 0  # cached: a no-op
    assert str(default_gate) in capsys.readouterr().out
