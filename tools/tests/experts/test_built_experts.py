"""The built demo experts: they load through the generator's loader and score held-out text as recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from switchboard.experts import DEMO_EXPERTS, expert_dir
from switchboard.experts.data import PreparedData
from switchboard.experts.evaluate import eval_windows, mean_nll
from switchboard.experts.export import METRICS_FILE
from switchboard.experts.recipes import EVALUATION, MILTON, RECIPES, SHAKESPEARE
from switchboard.generator.loader import load_model


def _metrics(folder: Path) -> dict:
    return json.loads((folder / METRICS_FILE).read_text())


def test_experts_live_in_the_recipe_keyed_cache(experts: dict[str, Path]) -> None:
    assert set(experts) == set(DEMO_EXPERTS) == {"bard-small", "milton-small", "scribe-large"}
    for name, folder in experts.items():
        assert folder == expert_dir(name)
        assert folder.name == name and _metrics(folder)["recipe_hash"] == folder.parent.name
        for file in (
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "generation_config.json",
            "README.md",
        ):
            assert (folder / file).is_file(), f"{name} lacks {file}"
        assert not [p for p in folder.parent.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("name", DEMO_EXPERTS)
def test_loader_scores_held_out_text_at_recorded_perplexity(
    name: str, experts: dict[str, Path], data: PreparedData
) -> None:
    folder = experts[name]
    recorded = _metrics(folder)["eval"]
    loaded = load_model(folder, device="cpu", dtype="float32")
    assert loaded.max_model_len >= 512
    for corpus in (SHAKESPEARE, MILTON):
        works = [w for w in data.splits["test"] if w.corpus == corpus]
        # Tokenize the held-out works with the loader's tokenizer, as the build did (line by line).
        ids: list[int] = []
        for work in works:
            ids.append(data.eot_id)
            for line in work.text.splitlines(keepends=True):
                ids.extend(loaded.tokenizer.encode(line, add_special_tokens=False))
        stream = torch.tensor(ids)
        assert torch.equal(stream, data.streams[(corpus, "test")])
        windows = eval_windows(stream, EVALUATION.context_length, EVALUATION.max_tokens_per_corpus)
        nll, count = mean_nll(loaded.model, windows)
        assert count == recorded["corpora"][corpus]["tokens"]
        assert nll == pytest.approx(recorded["corpora"][corpus]["nll"], rel=1e-4)


@pytest.mark.parametrize("name", DEMO_EXPERTS)
def test_perplexity_is_far_below_the_unigram_baseline(name: str, experts: dict[str, Path]) -> None:
    ev = _metrics(experts[name])["eval"]
    assert ev["own_perplexity"] < 0.5 * ev["own_unigram_perplexity"]
    for corpus in RECIPES[name].corpora:
        assert ev["corpora"][corpus]["perplexity"] < 0.5 * ev["corpora"][corpus]["unigram_perplexity"]


def test_generalist_beats_specialists_on_mixed_text(experts: dict[str, Path]) -> None:
    mixed = {name: _metrics(folder)["eval"]["mixed_perplexity"] for name, folder in experts.items()}
    assert mixed["scribe-large"] < mixed["bard-small"]
    assert mixed["scribe-large"] < mixed["milton-small"]


def test_specialists_are_best_at_their_own_corpus(experts: dict[str, Path]) -> None:
    corpora = {name: _metrics(folder)["eval"]["corpora"] for name, folder in experts.items()}
    assert (
        corpora["bard-small"][SHAKESPEARE]["perplexity"] < corpora["milton-small"][SHAKESPEARE]["perplexity"]
    )
    assert corpora["milton-small"][MILTON]["perplexity"] < corpora["bard-small"][MILTON]["perplexity"]


def test_generalist_is_several_times_larger(experts: dict[str, Path]) -> None:
    params = {name: _metrics(folder)["parameters"] for name, folder in experts.items()}
    assert params["scribe-large"] >= 3 * max(params["bard-small"], params["milton-small"])


@pytest.mark.parametrize("name", DEMO_EXPERTS)
def test_transformers_reads_the_folder_with_the_same_logits(name: str, experts: dict[str, Path]) -> None:
    folder = experts[name]
    reference = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ours = load_model(folder, device="cpu", dtype="float32").model
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    text = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer"
    ids = hf_tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    assert hf_tokenizer.decode(ids[0]) == text
    # Positions up to 512: rotary embeddings must agree at the longest context the experts serve.
    long_ids = torch.cat([ids] * (512 // ids.shape[1] + 1), dim=1)[:, :512]
    with torch.no_grad():
        expected = reference(long_ids).logits
        actual = ours(long_ids)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
