"""Profile a replica's step time and write a JSON cost model for the scheduler's simulator.

    python -m switchboard.generator.engine.profile --model DIR --out cost.json [--device cpu] [--dtype auto]

Measures real engine steps (the paged `forward_step`, the same code the engine
runs) for prefills of growing length and for decode batches of growing size at
a few context lengths, then fits one linear model of a step's time:

    step_ms = base_ms + prefill_token_ms * prefill_tokens
                      + decode_seq_ms * decode_seqs + context_token_ms * decode_context_tokens

`CostModel.load(path).step_ms(...)` (from the torch-free `switchboard.replica.cost_model`, which
also predicts a `SchedulerOutput`'s time) evaluates it; the JSON also keeps every sample.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from switchboard.generator.engine.attention import AttentionContext, SequenceSlice
from switchboard.generator.engine.engine import Engine
from switchboard.generator.engine.types import EngineConfig
from switchboard.replica.cost_model import FORMULA, CostModel

__all__ = ["CostModel", "main", "profile"]

PREFILL_TOKENS = (16, 32, 64, 128, 256, 512)
DECODE_BATCHES = (1, 2, 4, 8, 16, 32)
DECODE_CONTEXTS = (64, 256)


def _time_step(engine: Engine, slices: list[SequenceSlice], token_count: int, repeats: int) -> float:
    """Fastest of `repeats` timings (ms) of one forward_step over `slices` (decodes first), synchronised on CUDA."""
    device = engine.device
    ids = torch.randint(0, engine.vocab_size, (token_count,), device=device)
    positions = torch.cat([torch.arange(s.context_before, s.context_before + s.num_new) for s in slices]).to(device)
    ends = torch.tensor([0] + [s.num_new for s in slices]).cumsum(0)[1:] - 1
    rows = ends.to(device)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        attn = AttentionContext(engine.cache, slices, device)
        logits = engine.model.forward_step(ids, positions, attn, rows)
        logits.argmax(dim=-1).tolist()  # what the engine does next; also synchronises
        times.append((time.perf_counter() - start) * 1000.0)
    # The first run warms caches; the minimum is the least disturbed by other load on a shared machine.
    return min(times[1:])


def _fit(samples: list[dict[str, Any]]) -> CostModel:
    """Least-squares fit of the linear step model to all samples."""
    design = torch.tensor(
        [[1.0, s["prefill_tokens"], s["decode_seqs"], s["decode_context_tokens"]] for s in samples], dtype=torch.float64
    )
    target = torch.tensor([[s["ms"]] for s in samples], dtype=torch.float64)
    coef = torch.linalg.lstsq(design, target).solution.flatten().tolist()
    # Costs cannot be negative; a tiny negative coefficient is measurement noise.
    base, per_token, per_seq, per_ctx = (max(0.0, c) for c in coef)
    return CostModel(base, per_token, per_seq, per_ctx)


def _cpu_model() -> str:
    """The CPU's model name (step times are only valid on the machine they were measured on)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@torch.inference_mode()
def profile(
    engine: Engine,
    repeats: int = 5,
    prefill_tokens: tuple[int, ...] = PREFILL_TOKENS,
    decode_batches: tuple[int, ...] = DECODE_BATCHES,
    decode_contexts: tuple[int, ...] = DECODE_CONTEXTS,
) -> dict[str, Any]:
    """Measure prefill and decode steps on `engine`'s model and cache; returns the cost JSON."""
    bs = engine.config.block_size
    total_blocks = engine.pool.num_blocks
    max_len = engine.max_model_len
    samples: list[dict[str, Any]] = []
    for tokens in prefill_tokens:
        if tokens > min(max_len, engine.config.max_tokens_per_step) or (tokens + bs - 1) // bs > total_blocks:
            continue
        table = list(range((tokens + bs - 1) // bs))
        ms = _time_step(engine, [SequenceSlice(table, 0, tokens)], tokens, repeats)
        samples.append({"kind": "prefill", "prefill_tokens": tokens, "decode_seqs": 0, "decode_context_tokens": 0, "ms": ms})
    for context in decode_contexts:
        if context >= max_len:
            continue
        per_seq = (context + 1 + bs - 1) // bs
        for batch in decode_batches:
            if batch * per_seq > total_blocks or batch > engine.config.max_num_seqs:
                continue
            slices = [SequenceSlice(list(range(i * per_seq, (i + 1) * per_seq)), context, 1) for i in range(batch)]
            ms = _time_step(engine, slices, batch, repeats)
            samples.append(
                {"kind": "decode", "prefill_tokens": 0, "decode_seqs": batch, "decode_context_tokens": batch * context, "ms": ms}
            )
    fit = _fit(samples)
    info = engine.info
    return {
        "model": info.model_name,
        "architecture": info.architecture,
        "parameter_count": info.parameter_count,
        "device": info.device,
        "dtype": info.dtype,
        "block_size": info.block_size,
        "kv_blocks_total": info.kv_blocks_total,
        "max_tokens_per_step": engine.config.max_tokens_per_step,
        "max_num_seqs": engine.config.max_num_seqs,
        "max_model_len": max_len,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": _cpu_model(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "formula": FORMULA,
        "fit": asdict(fit),
        "samples": samples,
    }


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    from switchboard.generator.loader import ModelLoadError, load_model

    parser = argparse.ArgumentParser(prog="python -m switchboard.generator.engine.profile", description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="model folder (config.json, weights, tokenizer.json)")
    parser.add_argument("--out", type=Path, required=True, help="where to write the cost model JSON")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (default: auto)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-tokens-per-step", type=int, default=512)
    parser.add_argument("--kv-cache-bytes", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per point (fastest kept)")
    args = parser.parse_args(argv)
    try:
        loaded = load_model(args.model, args.device, args.dtype)
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    engine = Engine(
        loaded,
        EngineConfig(
            block_size=args.block_size,
            kv_cache_bytes=args.kv_cache_bytes,
            max_num_seqs=args.max_num_seqs,
            max_tokens_per_step=args.max_tokens_per_step,
        ),
    )
    result = profile(engine, repeats=args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    fit = result["fit"]
    print(
        f"wrote {args.out}: {len(result['samples'])} samples; step_ms = {fit['base_ms']:.3f} "
        f"+ {fit['prefill_token_ms']:.4f}*prefill_tokens + {fit['decode_seq_ms']:.4f}*decode_seqs "
        f"+ {fit['context_token_ms']:.6f}*context_tokens"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
