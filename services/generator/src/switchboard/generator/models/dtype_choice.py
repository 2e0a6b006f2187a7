"""`GENERATOR_DTYPE=auto` on CPU: time a short step in each candidate dtype at load, keep the faster.

CPU flags alone do not say which dtype serves faster: on an AMD EPYC with AVX512-BF16 the engine's
bf16 decode beat its float32 at every size measured, while on an Intel Xeon with AMX transformers'
float32 `generate` was close to the engine's bf16 (bench/README.md). So for `auto` the loader
prepares a throw-away copy of the model in each candidate dtype exactly as serving will (fused
projections, int8 weights when asked, oneDNN packing where available) and times a forward pass
over one token for 1 and for 16 sequences (decode at batch 1 and at 16 streams), best of a few
repeats. The candidate with the lower sum wins (a tie goes to the first, float32); the figures
are logged and kept on the loaded model. An explicit dtype skips all of this, so tests that
name one are deterministic.

The copy costs one model's worth of memory in the candidate dtype while it is timed (the
float32 original is kept meanwhile and cast to the winner afterwards).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence

import torch
from torch import nn

#: Rows (sequences decoding one token each) of the timed forward passes.
PROBE_ROWS = (1, 16)
WARMUP = 2
REPEATS = 5


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast every floating parameter to `dtype` in place; buffers (RoPE frequencies) stay float32.

    Tied weights stay tied: `parameters()` yields a shared parameter once and its data is
    replaced, not the parameter.
    """
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)


def step_seconds(
    model: nn.Module, vocab_size: int, rows: Sequence[int] = PROBE_ROWS, repeats: int = REPEATS
) -> dict[int, float]:
    """Best wall time of a one-token forward pass over `rows` sequences, per row count."""
    gen = torch.Generator().manual_seed(0)
    out: dict[int, float] = {}
    with torch.inference_mode():
        for n in rows:
            ids = torch.randint(0, vocab_size, (n, 1), generator=gen)
            for _ in range(WARMUP):
                model(ids)
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                model(ids)
                best = min(best, time.perf_counter() - start)
            out[n] = best
    return out


def measure_dtypes(
    model: nn.Module, candidates: Sequence[torch.dtype], quantize: str, pack: bool
) -> dict[str, dict[int, float]]:
    """Per candidate dtype name, the step times of a copy of `model` prepared for serving in it."""
    vocab = int(model.config.vocab_size)
    timings: dict[str, dict[int, float]] = {}
    for dtype in candidates:
        trial = copy.deepcopy(model)
        cast_parameters(trial, dtype)
        if quantize != "none":
            trial.quantize_for_serving(quantize)
        trial.prepare_for_serving(pack=pack)
        timings[str(dtype).removeprefix("torch.")] = step_seconds(trial, vocab)
        del trial
    return timings


def fastest(timings: Mapping[str, Mapping[int, float]]) -> str:
    """The candidate with the lowest summed step time; ties go to the first listed."""
    names = list(timings)
    return min(names, key=lambda name: (sum(timings[name].values()), names.index(name)))
