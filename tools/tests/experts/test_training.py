"""The training command on a tiny recipe: it learns, writes a complete folder atomically, keys the cache."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from switchboard.experts.build import train_expert
from switchboard.experts.cache import expert_dir, is_built
from switchboard.experts.data import PreparedData
from switchboard.experts.recipes import (
    MILTON,
    RECIPES,
    EvalRecipe,
    ExpertRecipe,
    ModelShape,
    TrainingRecipe,
    recipe_hash,
)
from switchboard.experts.train import init_model, learning_rate, llama_config
from switchboard.generator.loader import load_model

TINY = ExpertRecipe(
    name="tiny",
    description="tiny test model",
    corpora=(MILTON,),
    model=ModelShape(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
    ),
    training=TrainingRecipe(steps=40, batch_size=4, context_length=64, learning_rate=5e-3, warmup_steps=5),
)
TINY_EVAL = EvalRecipe(context_length=128, max_tokens_per_corpus=1024)


def test_tiny_recipe_trains_and_writes_a_loadable_folder(tmp_path: Path, data: PreparedData) -> None:
    dest = tmp_path / "tiny"
    metrics = train_expert(TINY, data, dest, evaluation=TINY_EVAL, log=lambda _: None)
    assert is_built(dest)
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"], "no temporary folder may remain"
    assert metrics["train"]["final_loss"] < metrics["train"]["first_loss"] - 0.3
    assert json.loads((dest / "switchboard_expert.json").read_text())["recipe"]["name"] == "tiny"
    # Tied embeddings: the head is written as its own equal tensor.
    tensors = load_file(str(dest / "model.safetensors"))
    assert torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])
    loaded = load_model(dest, device="cpu", dtype="float32")
    assert loaded.parameter_count == metrics["parameters"]
    assert loaded.tokenizer.eos_token_ids == {data.eot_id}
    card = (dest / "README.md").read_text()
    assert "seed 1234" in card and "unigram" in card


def test_same_seed_same_weights(data: PreparedData) -> None:
    config = llama_config(TINY.model, data.tokenizer.get_vocab_size(), data.eot_id)
    first, second = init_model(config, 7), init_model(config, 7)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_learning_rate_schedule() -> None:
    recipe = TINY.training
    assert learning_rate(0, recipe) == pytest.approx(recipe.learning_rate / recipe.warmup_steps)
    assert learning_rate(recipe.warmup_steps, recipe) == pytest.approx(recipe.learning_rate)
    assert learning_rate(recipe.steps, recipe) == pytest.approx(recipe.learning_rate * recipe.min_lr_ratio)


def test_changed_recipe_changes_the_cache_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWITCHBOARD_CACHE_DIR", str(tmp_path))
    bard = RECIPES["bard-small"]
    folder = expert_dir("bard-small")
    assert folder == tmp_path / "experts" / recipe_hash(bard) / "bard-small"
    longer = replace(bard, training=replace(bard.training, steps=bard.training.steps + 1))
    assert recipe_hash(longer) != recipe_hash(bard)
    assert not is_built(folder)
    with pytest.raises(KeyError, match="unknown demo expert"):
        expert_dir("no-such-expert")


def test_batch_shape_switches_to_long_windows_for_the_final_fraction() -> None:
    """Sequence-length warm-up: same tokens per step, long windows only in the last steps."""
    from switchboard.experts.train import batch_shape

    recipe = TrainingRecipe(
        steps=100, batch_size=16, context_length=128, learning_rate=1e-3, long_context_length=512, long_fraction=0.15
    )
    assert batch_shape(0, recipe) == (16, 128)
    assert batch_shape(84, recipe) == (16, 128)
    assert batch_shape(85, recipe) == (4, 512)
    assert batch_shape(99, recipe) == (4, 512)
    plain = TrainingRecipe(steps=10, batch_size=4, context_length=64, learning_rate=1e-3)
    assert {batch_shape(step, plain) for step in range(10)} == {(4, 64)}
