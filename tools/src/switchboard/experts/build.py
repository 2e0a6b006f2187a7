"""Building experts into the cache: prepare data, train, evaluate, write, rename into place.

Builds are serialised by a file lock in the cache root (two `make test` runs at once
do not train the same expert twice) and written to a temporary folder that is renamed
to its final name only when complete, so an interrupted build leaves nothing that
looks finished.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from switchboard.experts.cache import cache_root, expert_dir, is_built
from switchboard.experts.data import PreparedData, prepare_data
from switchboard.experts.evaluate import eval_windows, mean_nll, unigram_nll
from switchboard.experts.export import write_expert_folder
from switchboard.experts.recipes import (
    CORPUS,
    DEMO_EXPERTS,
    EVALUATION,
    MILTON,
    RECIPES,
    SAMPLING,
    SHAKESPEARE,
    TOKENIZER,
    CorpusRecipe,
    EvalRecipe,
    ExpertRecipe,
    TokenizerRecipe,
    data_hash,
    recipe_hash,
)
from switchboard.experts.sample import continue_text
from switchboard.experts.train import init_model, llama_config, train

TRAIN_THREADS = 2


def _log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def build_lock(root: Path) -> Iterator[None]:
    """Exclusive lock over builds in this cache root (released when the process dies); the router
    data builder uses it too."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".build.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run with a fixed number of intra-op threads (reproducible, and polite on shared CPUs)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, min(count, os.cpu_count() or 1)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def evaluate_expert(
    model: torch.nn.Module, recipe: ExpertRecipe, data: PreparedData, evaluation: EvalRecipe
) -> dict[str, Any]:
    """Test-split perplexity on each corpus, unigram baselines, own-corpus and mixed summaries."""
    train_stream = data.stream(recipe.corpora, "train")
    vocab = data.tokenizer.get_vocab_size()
    corpora: dict[str, dict[str, float]] = {}
    for corpus in (SHAKESPEARE, MILTON):
        windows = eval_windows(
            data.streams[(corpus, "test")], evaluation.context_length, evaluation.max_tokens_per_corpus
        )
        nll, count = mean_nll(model, windows)
        base = unigram_nll(train_stream, windows, vocab)
        corpora[corpus] = {
            "nll": nll,
            "perplexity": math.exp(nll),
            "unigram_perplexity": math.exp(base),
            "unigram_nll": base,
            "tokens": count,
        }
    own = [corpora[c] for c in recipe.corpora]
    return {
        "split": "test",
        "dtype": "float32",
        "context_length": evaluation.context_length,
        "max_tokens_per_corpus": evaluation.max_tokens_per_corpus,
        "corpora": corpora,
        "own_perplexity": math.exp(sum(c["nll"] for c in own) / len(own)),
        "own_unigram_perplexity": math.exp(sum(c["unigram_nll"] for c in own) / len(own)),
        "mixed_perplexity": math.exp(sum(c["nll"] for c in corpora.values()) / len(corpora)),
    }


def train_expert(
    recipe: ExpertRecipe,
    data: PreparedData,
    dest: Path,
    corpus: CorpusRecipe = CORPUS,
    tokenizer_recipe: TokenizerRecipe = TOKENIZER,
    evaluation: EvalRecipe = EVALUATION,
    log: Callable[[str], None] = _log_stderr,
) -> dict[str, Any]:
    """Train, evaluate and write one expert to `dest` atomically; returns its metrics."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = llama_config(recipe.model, data.tokenizer.get_vocab_size(), data.eot_id)
    train_stream = data.stream(recipe.corpora, "train")
    with torch_threads(TRAIN_THREADS):
        model = init_model(config, recipe.training.seed).to(device)
        parameters = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        log(f"[{recipe.name}] {parameters / 1e6:.2f}M parameters, {train_stream.numel():,} training tokens")
        result = train(model, train_stream, recipe.training, log=lambda m: log(f"[{recipe.name}] {m}"))
        model = model.float().cpu()
        started = time.perf_counter()
        metrics_eval = evaluate_expert(model, recipe, data, evaluation)
        settings = asdict(SAMPLING)
        prompt = settings.pop("prompt")
        sample = continue_text(model, data.tokenizer, prompt, **settings)
        eval_seconds = time.perf_counter() - started
    metrics: dict[str, Any] = {
        "name": recipe.name,
        "recipe_hash": recipe_hash(recipe, corpus, tokenizer_recipe, evaluation),
        "data_hash": data_hash(corpus, tokenizer_recipe),
        "recipe": asdict(recipe),
        "corpus": asdict(corpus),
        "tokenizer": asdict(tokenizer_recipe),
        "parameters": parameters,
        "vocab_size": config.vocab_size,
        "train": {
            **asdict(result),
            "train_tokens": train_stream.numel(),
            "device": f"{device.type} ({TRAIN_THREADS} threads)" if device.type == "cpu" else device.type,
        },
        "eval": {**metrics_eval, "seconds": eval_seconds},
        "sample": {**asdict(SAMPLING), "text": sample},
    }
    _write_atomically(
        dest, lambda folder: write_expert_folder(folder, model, data.tokenizer, tokenizer_recipe, metrics)
    )
    return metrics


def _write_atomically(dest: Path, write: Callable[[Path], None]) -> None:
    """Write into a temporary sibling folder, then rename it to `dest` (replacing an old one)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        if dest.exists():
            old = dest.parent / f".{dest.name}.old-{os.getpid()}"
            dest.rename(old)
            shutil.rmtree(old)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_experts(
    names: list[str] | tuple[str, ...] | None = None,
    force: bool = False,
    log: Callable[[str], None] = _log_stderr,
) -> dict[str, Path]:
    """Build the named demo experts that are missing (or all of them with `force`)."""
    chosen = list(names) if names else list(DEMO_EXPERTS)
    unknown = [n for n in chosen if n not in RECIPES]
    if unknown:
        raise KeyError(f"unknown demo experts {unknown}; known: {', '.join(DEMO_EXPERTS)}")
    targets = {name: expert_dir(name) for name in chosen}
    if not force and all(is_built(path) for path in targets.values()):
        return targets
    root = cache_root()
    with build_lock(root):
        # Another process may have finished them while we waited for the lock.
        todo = [n for n in chosen if force or not is_built(targets[n])]
        if todo:
            started = time.perf_counter()
            data = prepare_data(root)
            log(f"data ready in {time.perf_counter() - started:.1f}s ({data.folder})")
            for name in todo:
                train_expert(RECIPES[name], data, targets[name], log=log)
            log(f"built {', '.join(todo)} in {time.perf_counter() - started:.0f}s")
    return targets
