"""`switchboard scheduler eval`: one table of every policy, results JSON and plots; clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from switchboard.bench.workload import TraceRequest
from switchboard.cli.main import main
from switchboard.simulation.evaluate import held_out_windows


@pytest.fixture
def setup_files(tmp_path: Path, sim_inputs) -> dict[str, Path]:
    written = sim_inputs(
        "experts:\n"
        "  - {name: a, description: first pool, model: a, slo: {ttft_seconds: 0.2, tpot_seconds: 0.02}}\n"
        "  - {name: b, description: second pool, model: b}\n",
        (
            {"timestamp": i * 50, "input_length": 200 + i % 90, "output_length": 10 + i % 30, "hash_ids": [i % 3, 100 + i]}
            for i in range(400)
        ),
    )
    return {**written, "out": tmp_path / "out"}


def eval_args(files: dict[str, Path], *extra: str) -> list[str]:
    return ["scheduler", "eval", "--trace", str(files["trace"]), "--experts-config", str(files["experts"]),
            "--cost-models", str(files["costs"]), "--replicas", "2", "--windows", "2", "--window-seconds", "2",
            "--out", str(files["out"]), *extra]


def test_eval_prints_every_policy_and_writes_results_and_plots(setup_files, capsys) -> None:
    assert main(eval_args(setup_files, "--policies", "least-loaded,prefix-load,predicted-latency")) == 0
    printed = capsys.readouterr().out
    for name in ("least-loaded", "prefix-load", "predicted-latency", "SLO att.", "TTFT p99", "imbalance"):
        assert name in printed
    results = json.loads((setup_files["out"] / "results.json").read_text())
    assert set(results["policies"]) == {"least-loaded", "prefix-load", "predicted-latency"}
    row = results["policies"]["prefix-load"]
    assert row["requests"] == row["completed"] > 0 and 0 <= row["slo_attainment"] <= 1
    assert row["prefix_hit_rate"] > 0  # the trace's hash_ids share a leading block three ways
    for png in ("ttft_cdf.png", "policies.png"):
        assert (setup_files["out"] / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (("--policies", "fastest"), "unknown policies fastest"),
        (("--replicas", "0"), "--replicas must be at least 1"),
        (("--mix", "a=1,zz=2"), "not in the experts config: zz"),
        (("--window-seconds", "100"), "does not fit the held-out"),
        (("--cost-models", "/nonexistent"), "no cost profile for expert 'a'"),
        (("--trace", "/nonexistent.jsonl"), "no such trace file"),
        (("--seeds", "0,x"), "--seeds must be comma-separated integers"),
        (("--policies", "least-loaded", "--baseline", "prefix-load"), "baseline 'prefix-load' is not among"),
    ],
)
def test_bad_input_is_a_clear_error(setup_files, capsys, extra: tuple[str, ...], says: str) -> None:
    assert main(eval_args(setup_files, *extra)) == 2
    assert says in capsys.readouterr().err


def test_seeds_pool_their_runs_and_every_policy_is_paired_with_the_baseline(setup_files, capsys) -> None:
    assert main(eval_args(setup_files, "--policies", "least-loaded,prefix-load", "--seed", "3")) == 0
    one = json.loads((setup_files["out"] / "results.json").read_text())
    assert main(eval_args(setup_files, "--policies", "least-loaded,prefix-load,lookahead", "--seeds", "3,4")) == 0
    printed = capsys.readouterr().out
    assert "x 2 seeds" in printed
    assert "least-loaded vs prefix-load" in printed and "lookahead vs prefix-load" in printed
    both = json.loads((setup_files["out"] / "results.json").read_text())
    assert both["seeds"] == [3, 4]
    assert both["policies"]["prefix-load"]["requests"] > one["policies"]["prefix-load"]["requests"]
    paired = both["paired"]["lookahead"]
    assert paired["baseline"] == "prefix-load" and paired["requests"] == both["policies"]["prefix-load"]["requests"]
    for key in ("ttft_mean_ratio", "ttft_p99_ratio", "attainment_points"):
        estimate, lo, hi = paired[key]
        assert lo <= estimate <= hi
    # The point estimate is the ratio of the two rows' means.
    ratio = both["policies"]["prefix-load"]["ttft_mean"] / both["policies"]["lookahead"]["ttft_mean"]
    assert paired["ttft_mean_ratio"][0] == pytest.approx(ratio)


def test_held_out_windows_lie_in_the_last_part_of_the_trace() -> None:
    rows = [TraceRequest(i, float(i), 10, 10) for i in range(1001)]
    starts = held_out_windows(rows, 3, 100.0)
    assert starts == [700.0, 800.0, 900.0]  # spread over 700-1000 s, the last ending at the end
    assert held_out_windows(rows, 1, 50.0) == [700.0]
    with pytest.raises(ValueError, match="count >= 1"):
        held_out_windows(rows, 0, 10.0)
