"""Tests of the learned gate: features, training, the artifact, and the offline measures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from switchboard.router.artifact import GateArtifactError, check_expert_set, load_artifact, write_artifact
from switchboard.router.evaluation import ScoredSet, choose, random_at_cost, report
from switchboard.router.features import DENSE_NAMES, FeatureConfig, FeatureExtractor
from switchboard.router.training import predict, scored_set

from .gate_fixtures import EXPERTS, examples, make_tokenizer, trained_gate


@pytest.fixture(scope="module")
def artifact_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("gate")
    artifact = trained_gate(tmp)
    write_artifact(artifact, tmp / "artifact")
    return tmp / "artifact"


def test_features_are_bounded_and_deterministic(tmp_path: Path) -> None:
    tokenizer = make_tokenizer(tmp_path / "tokenizer.json")
    config = FeatureConfig(max_chars=200, max_tokens=30)
    extractor = FeatureExtractor.from_file(tokenizer, config, surprisal=[3.0] * 300)
    short = extractor.extract("ship sail wave")
    assert short.exact_tokens and short.prompt_tokens == len(extractor.token_ids("ship sail wave"))
    assert len(short.dense) == len(DENSE_NAMES)
    assert short.same_as(extractor.extract("ship sail wave"))
    assert not short.same_as(extractor.extract("ship sail"))
    long_prompt = "ship sail wave tide " * 2000
    long = extractor.extract(long_prompt)
    assert not long.exact_tokens
    assert len(long.indices) <= 2 * 30  # tokens plus bigrams of the bounded prefix
    exact = len(extractor.token_ids(long_prompt))
    assert abs(long.prompt_tokens - exact) / exact < 0.05  # the estimate from the prefix's compression
    assert all(0 <= i < config.num_buckets for i in long.indices)
    assert extractor.extract("").indices.tolist() == [0]  # an empty bag still has one row
    with pytest.raises(ValueError):
        short.indices[0] = 1  # read-only


def test_feature_config_from_another_feature_set_is_refused() -> None:
    assert FeatureConfig.from_dict(FeatureConfig().to_dict()) == FeatureConfig()
    with pytest.raises(ValueError, match="unknown feature settings"):
        FeatureConfig.from_dict({**FeatureConfig().to_dict(), "char_ngrams": 3})


def test_trained_gate_routes_by_content_and_the_cost_knob(artifact_dir: Path) -> None:
    gate = load_artifact(artifact_dir).gate()
    held_out = examples(200, seed=7)
    predicted = predict(gate.net, [gate.extractor.extract(e.prompt) for e in held_out])
    scored = scored_set(EXPERTS, held_out)
    cheap = report(scored, "gate", choose(predicted, scored.relative_cost, 0.1), 0.1)
    assert cheap.optimal_rate is not None and cheap.optimal_rate > 0.9  # sailor for the sea, soldier for war
    # Scholar only where the words do not tell (a very short prompt), where it is the safer bet.
    assert cheap.share["scholar"] < 0.15 and cheap.apgr > 0.75 and cheap.cost_fraction < 0.4
    free = report(scored, "gate", choose(predicted, scored.relative_cost, 0.0), 0.0)
    assert free.share["scholar"] > 0.9  # with cost free, the better expert wins
    scores = gate.score("the storm tossed the ship and the whale")
    assert scores.quality[0] > scores.quality[1]  # sailor over soldier
    assert len(scores.hidden) == gate.net.hidden_dim and scores.features is not None


def test_artifact_round_trip_records_version_and_operating_point(artifact_dir: Path) -> None:
    artifact = load_artifact(artifact_dir)
    config = json.loads((artifact_dir / "gate.json").read_text())
    assert artifact.version == config["version"] and len(artifact.version) == 16
    assert artifact.expert_names == ["sailor", "soldier", "scholar"]
    assert artifact.temperature > 0 and artifact.default_cost_weight >= 0
    assert 0.0 <= artifact.metrics["validation"]["cost_fraction"] <= 0.5 + 1e-9
    check_expert_set(artifact, ["scholar", "sailor", "soldier"])  # order does not matter
    with pytest.raises(GateArtifactError, match="configured but not in the gate: bard"):
        check_expert_set(artifact, ["sailor", "soldier", "scholar", "bard"])
    with pytest.raises(GateArtifactError, match="in the gate but not configured: scholar"):
        check_expert_set(artifact, ["sailor", "soldier"])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "gate.safetensors").write_bytes(b"\0" * 64), "corrupt"),
        (lambda d: (d / "gate.json").write_text("{not json"), "not valid JSON"),
        (lambda d: (d / "gate.json").write_text(json.dumps({"format": "other/9"})), "format"),
        (lambda d: (d / "tokenizer.json").unlink(), "no tokenizer.json"),
        (lambda d: (d / "tokenizer.json").write_text((d / "tokenizer.json").read_text().replace("ship", "shop")), "fingerprint"),
        (lambda d: _edit_json(d, temperature=0.5), "do not match the recorded version"),
    ],
)
def test_damaged_artifacts_are_refused_with_a_reason(artifact_dir: Path, tmp_path: Path, damage, message: str) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(artifact_dir, copy)
    damage(copy)
    with pytest.raises(GateArtifactError, match=message):
        load_artifact(copy)


def _edit_json(folder: Path, **changes: object) -> None:
    config = json.loads((folder / "gate.json").read_text())
    config.update(changes)
    (folder / "gate.json").write_text(json.dumps(config))


def test_missing_artifact_says_how_to_build_one(tmp_path: Path) -> None:
    with pytest.raises(GateArtifactError, match="switchboard router train"):
        load_artifact(tmp_path / "nowhere")


def test_writing_replaces_atomically(artifact_dir: Path, tmp_path: Path) -> None:
    artifact = load_artifact(artifact_dir)
    target = tmp_path / "gate"
    first = write_artifact(artifact, target)
    artifact.default_cost_weight += 1.0
    second = write_artifact(artifact, target)
    assert first != second and load_artifact(target).version == second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gate"]  # no temporary folders left


def test_offline_measures_on_a_hand_made_set() -> None:
    scored = ScoredSet(
        experts=("cheap", "dear"),
        relative_cost=(1.0, 3.0),
        parameters=(1, 10),
        quality=((-5.0, -4.0), (-4.0, -4.0)),
        tokens=(10, 10),
        weights=(1, 1),
    )
    assert (scored.best, scored.cheapest) == (1, 0)
    smart = report(scored, "smart", [1, 0], cost_weight=0.1)
    assert smart.apgr == pytest.approx(1.0) and smart.cost_fraction == pytest.approx(40 / 60)
    assert smart.optimal_rate == 1.0 and smart.compute_fraction == pytest.approx(11 / 20)
    assert report(scored, "cheap", [0, 0]).apgr == 0.0
    rand = random_at_cost(scored, smart.cost_fraction, draws=200)
    assert rand.cost_fraction == pytest.approx(smart.cost_fraction, abs=0.05)
    assert rand.apgr < 0.7
    with pytest.raises(ValueError):
        ScoredSet(("a",), (1.0,), (1,), (), (), ())


def test_the_numpy_forward_that_serves_equals_the_torch_net(artifact_dir: Path) -> None:
    import torch
    from switchboard.router.learned_gate import batch_tensors

    gate = load_artifact(artifact_dir).gate()
    for example in examples(20, seed=11):
        features = gate.extractor.extract(example.prompt)
        with torch.inference_mode():
            quality, hidden = gate.net(*batch_tensors([features]))
        scores = gate.score(example.prompt)
        assert scores.quality == pytest.approx(quality[0].tolist(), abs=1e-5)
        assert scores.hidden == pytest.approx(hidden[0].tolist(), abs=1e-5)
