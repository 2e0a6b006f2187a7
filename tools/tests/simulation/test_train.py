"""`switchboard scheduler train`: a tiny run writes a loadable, versioned policy file; same seed, same policy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from switchboard.cli.main import main
from switchboard.scheduler.learned_policy import (
    FEATURE_NAMES,
    POLICY_FORMAT,
    LearnedPlacementPolicy,
    load_policy_file,
)


@pytest.fixture
def files(tmp_path: Path, sim_inputs) -> dict[str, Path]:
    written = sim_inputs(
        "experts:\n"
        "  - {name: a, description: first pool, model: a, slo: {ttft_seconds: 0.05, tpot_seconds: 0.02}}\n"
        "  - {name: b, description: second pool, model: b, slo: {ttft_seconds: 0.05}}\n",
        (
            {"timestamp": i * 50, "input_length": 200 + (i * 37) % 300, "output_length": 10 + i % 30,
             "hash_ids": [i % 3, 100 + i]}
            for i in range(800)
        ),
    )
    return {**written, "tmp": tmp_path}


def train_args(files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["scheduler", "train", "--trace", str(files["trace"]), "--experts-config", str(files["experts"]),
            "--cost-models", str(files["costs"]), "--replicas", "3", "--speedup", "4", "--episode-seconds", "2",
            "--bc-episodes", "2", "--episodes", "3", "--eval-every", "1", "--seed", "5", "--out", str(out), *extra]


def test_a_tiny_training_writes_a_loadable_policy_file_deterministically(files, capsys) -> None:
    first, second = files["tmp"] / "one", files["tmp"] / "two"
    assert main(train_args(files, first)) == 0
    printed = capsys.readouterr().out
    assert "behaviour cloning:" in printed and "held-out learned" in printed
    raw = json.loads((first / "policy.json").read_text())
    assert raw["format"] == POLICY_FORMAT and raw["version"] == 1 and raw["features"] == list(FEATURE_NAMES)
    meta = raw["training"]
    assert meta["seed"] == 5 and meta["pg_episodes"] == 3 and meta["teacher"] == "prefix-load"
    assert set(meta["held_out"]) == {"learned", "prefix-load"}
    network = load_policy_file(first / "policy.json")
    policy = LearnedPlacementPolicy(first / "policy.json")
    assert policy.network is not None and policy.status.startswith("learned")
    assert (first / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert (first / "checkpoints" / "last.pt").is_file()
    assert len(list((first / "checkpoints").glob("iter_*.pt"))) == 3
    curve = json.loads((first / "train.json").read_text())["curve"]
    assert [c["iteration"] for c in curve] == [0, 1, 2, 3]

    # The same seed trains the same network.
    assert main(train_args(files, second)) == 0
    again = load_policy_file(second / "policy.json")
    for (w1, b1), (w2, b2) in zip(network.layers, again.layers, strict=True):
        np.testing.assert_array_equal(w1, w2)
        np.testing.assert_array_equal(b1, b2)
    np.testing.assert_array_equal(network.mean, again.mean)
    assert json.loads((second / "train.json").read_text())["curve"] == curve


def test_torch_export_round_trip_matches(files) -> None:
    from switchboard.simulation.train import from_network, to_network

    net = load_policy_file(_write_random(files["tmp"]))
    model = from_network(net)
    x = np.random.default_rng(1).normal(size=(7, len(FEATURE_NAMES)))
    with torch.no_grad():
        expected = model(torch.as_tensor(x, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(net.scores(x), expected, rtol=1e-4, atol=1e-4)
    back = to_network(model)
    np.testing.assert_allclose(back.scores(x), expected, rtol=1e-4, atol=1e-4)


def _write_random(folder: Path) -> Path:
    from switchboard.scheduler.learned_policy import PolicyNetwork, write_policy_file

    return write_policy_file(folder / "random.json", PolicyNetwork.random(seed=2))


def test_bad_windows_are_refused(files, capsys) -> None:
    assert main(train_args(files, files["tmp"] / "x", "--train-window", "5")) == 2
    assert "--train-window must be START:END" in capsys.readouterr().err
    assert main(train_args(files, files["tmp"] / "x", "--train-window", "0:1")) == 2
    assert "shorter than one 2 s episode" in capsys.readouterr().err


def test_eval_runs_the_learned_policy_from_its_file(files, capsys) -> None:
    out = files["tmp"] / "trained"
    assert main(train_args(files, out, "--episodes", "1")) == 0
    capsys.readouterr()
    ev = ["scheduler", "eval", "--trace", str(files["trace"]), "--experts-config", str(files["experts"]),
          "--cost-models", str(files["costs"]), "--replicas", "3", "--windows", "1", "--window-seconds", "2",
          "--out", str(files["tmp"] / "ev")]
    assert main([*ev, "--policy", "learned,prefix-load", "--policy-file", str(out / "policy.json")]) == 0
    results = json.loads((files["tmp"] / "ev" / "results.json").read_text())
    assert set(results["policies"]) == {"learned", "prefix-load"}
    assert results["policies"]["learned"]["requests"] > 0
    assert main([*ev, "--policy", "learned"]) == 2
    assert "needs --policy-file" in capsys.readouterr().err
    (files["tmp"] / "bad.json").write_text("{")
    assert main([*ev, "--policy", "learned", "--policy-file", str(files["tmp"] / "bad.json")]) == 2
    assert "not JSON" in capsys.readouterr().err


def test_the_look_ahead_teacher_distils_with_dagger_in_forked_workers_deterministically(files, capsys) -> None:
    args = ("--teacher", "lookahead", "--dagger-rounds", "2", "--dagger-episodes", "2", "--episodes", "0")
    one, two = files["tmp"] / "la1", files["tmp"] / "la2"
    assert main(train_args(files, one, *args)) == 0
    printed = capsys.readouterr().out
    assert "agreement with lookahead" in printed and "DAgger round 2:" in printed and "held-out lookahead" in printed
    summary = json.loads((one / "train.json").read_text())
    assert summary["teacher"] == "lookahead" and summary["pg_episodes"] == 0
    dagger = [c for c in summary["curve"] if c["phase"] == "dagger"]
    assert [c["round"] for c in dagger] == [1, 2]
    assert dagger[0]["decisions"] < dagger[1]["decisions"] == summary["dagger"]["decisions"]
    assert set(summary["held_out"]) == {"learned", "prefix-load", "lookahead"}
    assert (one / "checkpoints" / "dagger_002.pt").is_file()
    assert LearnedPlacementPolicy(one / "policy.json").network is not None
    # Episodes labelled in two forked workers give the very same network as in this process.
    assert main(train_args(files, two, *args, "--workers", "2")) == 0
    a, b = load_policy_file(one / "policy.json"), load_policy_file(two / "policy.json")
    for (w1, b1), (w2, b2) in zip(a.layers, b.layers, strict=True):
        np.testing.assert_array_equal(w1, w2)
        np.testing.assert_array_equal(b1, b2)


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (("--dagger-rounds", "1"), "--dagger-rounds needs --teacher lookahead"),
        (("--teacher", "lookahead", "--workers", "0"), "--workers at least 1"),
        (("--teacher", "lookahead", "--target-temperature", "0"), "target temperature must be positive"),
    ],
)
def test_bad_distillation_options_are_refused(files, capsys, extra: tuple[str, ...], says: str) -> None:
    assert main(train_args(files, files["tmp"] / "x", *extra)) == 2
    assert says in capsys.readouterr().err
