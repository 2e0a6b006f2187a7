"""Weight-only int8 (GENERATOR_QUANTIZE=int8) against the unquantized engine, in one run.

For each demo expert that is built (or the folders given) it prints:
  held-out perplexity: the experts' own test-split score (`switchboard.experts.build.evaluate_expert`:
      own corpus, both corpora mixed), for float32, bfloat16, int8 weights with float32 activations
      and int8 weights with bfloat16 activations; the change against the unquantized model in the
      same activation dtype.
  (a) batch-1 decode tokens/s (one request, 32-token prompt, 64 greedy tokens) and
  (b) total output tokens/s of 16 concurrent streams (prompts of 32-47 tokens, 64 tokens each),
      the shapes of bench/generator_bench.py's (a)/(b), on the first model (scribe-large by default),
      for the same four variants; ratios int8 / unquantized in the same activation dtype, and
      best int8 / best unquantized.
  (c) with --big: batch-1 decode of a ~0.5B-parameter random Llama (weights far larger than the
      caches, where decode is bound by the weight bytes streamed), the four variants.

Variants alternate over rounds and each keeps its best, because the machine is shared. The load
average is printed next to every figure.

Run: .venv/bin/python bench/int8_bench.py [--models DIR ...] [--rounds 3] [--big] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from bench_common import machine
from generator_bench import engine_decode
from switchboard.generator.loader import LoadedModel, load_model

DECODE_TOKENS = 64
STREAMS = 16
PROMPT_LEN = 32
#: (name, activation dtype, quantization)
VARIANTS = (
    ("float32", "float32", "none"),
    ("bfloat16", "bfloat16", "none"),
    ("int8+fp32", "float32", "int8"),
    ("int8+bf16", "bfloat16", "int8"),
)
BASELINE = {"int8+fp32": "float32", "int8+bf16": "bfloat16"}


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def demo_experts() -> list[tuple[str, Path]]:
    """(name, folder) of every built demo expert, scribe-large first."""
    from switchboard.experts.cache import expert_dir, is_built
    from switchboard.experts.recipes import DEMO_EXPERTS

    names = sorted(DEMO_EXPERTS, key=lambda n: n != "scribe-large")
    return [(n, expert_dir(n)) for n in names if is_built(expert_dir(n))]


def held_out_perplexity(name: str, variants: dict[str, LoadedModel]) -> dict[str, Any]:
    """The build's own held-out evaluation (test split, 512-token windows) of each variant."""
    from switchboard.experts.build import evaluate_expert
    from switchboard.experts.cache import cache_root
    from switchboard.experts.data import prepare_data
    from switchboard.experts.recipes import EVALUATION, RECIPES

    data = prepare_data(cache_root())
    out: dict[str, Any] = {}
    for label, loaded in variants.items():
        with torch.inference_mode():
            scores = evaluate_expert(loaded.model, RECIPES[name], data, EVALUATION)
        out[label] = {"own": scores["own_perplexity"], "mixed": scores["mixed_perplexity"]}
    return out


def load_variants(folder: Path) -> dict[str, LoadedModel]:
    return {label: load_model(folder, "cpu", dtype, quantize) for label, dtype, quantize in VARIANTS}


def ratios(best: dict[str, float]) -> dict[str, float]:
    """int8 / unquantized in the same activation dtype, and best int8 / best unquantized."""
    out = {f"{q}/{base}": best[q] / best[base] for q, base in BASELINE.items()}
    out["best int8/best unquantized"] = max(best[q] for q in BASELINE) / max(best[b] for b in BASELINE.values())
    return out


def speed(folder: Path, rounds: int) -> dict[str, Any]:
    """(a) and (b) for the four variants, alternating, best of `rounds` each."""
    prompts = [[(7 * i + 3 * j) % 250 + 5 for j in range(PROMPT_LEN + i)] for i in range(STREAMS)]
    best_a: dict[str, float] = {}
    best_b: dict[str, float] = {}
    for _label, dtype, quantize in VARIANTS:  # warm-up, one engine each
        asyncio.run(engine_decode(load_model(folder, "cpu", dtype, quantize), prompts[:2], 4))
    loads = []
    for _ in range(rounds):
        for label, dtype, quantize in VARIANTS:
            # A fresh load per engine: serving prepares (fuses, packs) the model in place.
            a, _ = asyncio.run(engine_decode(load_model(folder, "cpu", dtype, quantize), prompts[:1], DECODE_TOKENS))
            _, b = asyncio.run(engine_decode(load_model(folder, "cpu", dtype, quantize), prompts, DECODE_TOKENS))
            best_a[label] = max(best_a.get(label, 0.0), a)
            best_b[label] = max(best_b.get(label, 0.0), b)
            gc.collect()
        loads.append(load_average())
    return {"a_tok_s": best_a, "b_tok_s": best_b, "a_ratios": ratios(best_a), "b_ratios": ratios(best_b),
            "load_after_each_round": loads}


def big_decode(rounds: int) -> dict[str, Any]:
    """(c): batch-1 decode of a ~0.5B random Llama, the four variants (built in memory, never saved)."""
    import tempfile

    from safetensors.torch import save_file

    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = _big_random_llama_folder(Path(tmp), save_file)
        loads = []
        for _ in range(rounds):
            for label, dtype, quantize in VARIANTS:
                loaded = load_model(folder, "cpu", dtype, quantize)
                asyncio.run(engine_decode(loaded, [list(range(5, 37))], 3))  # warm-up on this engine's model
                rate = max(asyncio.run(engine_decode(loaded, [list(range(5, 37))], 16))[0] for _ in range(2))
                best[label] = max(best.get(label, 0.0), rate)
                del loaded
                gc.collect()
            loads.append(load_average())
    return {"tok_s": best, "ratios": ratios(best), "load_after_each_round": loads}


def _big_random_llama_folder(root: Path, save_file: Any) -> Path:
    """A ~0.5B Llama (hidden 1536, 16 layers, GQA 12/4, vocab 32000) with random float32 weights, saved."""
    import tokenizers
    from switchboard.generator.models.llama import LlamaConfig, LlamaForCausalLM
    from tokenizers import models, pre_tokenizers, trainers

    config = LlamaConfig(
        vocab_size=32000, hidden_size=1536, intermediate_size=4096, num_hidden_layers=16,
        num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(0)
    state = {}
    for name, p in model.named_parameters():
        state[name] = torch.ones(p.shape) if name.endswith("norm.weight") else torch.randn(p.shape, generator=gen) * 0.02
    folder = root / "random-0.5b"
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    del state
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000, "hidden_size": 1536,
          "intermediate_size": 4096, "num_hidden_layers": 16, "num_attention_heads": 12, "num_key_value_heads": 4,
          "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False}
    (folder / "config.json").write_text(json.dumps(hf))
    inner = tokenizers.Tokenizer(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.ByteLevel()
    inner.train_from_iterator(["a b c"], trainers.BpeTrainer(vocab_size=260, show_progress=False))
    inner.save(str(folder / "tokenizer.json"))
    return folder


def _fmt(rates: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in rates.items())


def _fmt_ratios(r: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}x" for k, v in r.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, nargs="*", default=None,
                        help="model folders (default: the built demo experts, scribe-large first); speed on the first")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per speed measurement (best kept)")
    parser.add_argument("--no-perplexity", action="store_true", help="skip the held-out perplexity")
    parser.add_argument("--big", action="store_true", help="also (c): batch-1 decode of a random ~0.5B Llama")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    models = [(p.name, p) for p in args.models] if args.models else demo_experts()
    if not models:
        parser.error("no demo expert is built (make experts) and no --models given")
    results: dict[str, Any] = {"machine": machine(torch_threads=torch.get_num_threads(), load=False),
                               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(f"machine: {results['machine']}; torch {torch.__version__}; {results['date']}")

    if not args.no_perplexity:
        results["perplexity"] = {}
        for name, folder in models:
            ppl = held_out_perplexity(name, load_variants(folder))
            results["perplexity"][name] = ppl
            changes = {q: ppl[q]["own"] / ppl[base]["own"] - 1 for q, base in BASELINE.items()}
            print(f"held-out perplexity {name} (own corpus; mixed): "
                  + ", ".join(f"{k} {v['own']:.3f}; {v['mixed']:.3f}" for k, v in ppl.items())
                  + "  change: " + ", ".join(f"{q} vs {BASELINE[q]} {100 * c:+.2f}%" for q, c in changes.items())
                  + f"  [load {load_average()}]", flush=True)
            gc.collect()

    name, folder = models[0]
    s = speed(folder, args.rounds)
    results["speed"] = {"model": name, **s}
    print(f"(a) batch-1 decode tok/s, {name}: {_fmt(s['a_tok_s'])}; {_fmt_ratios(s['a_ratios'])}  "
          f"[load after each round {s['load_after_each_round']}]", flush=True)
    print(f"(b) {STREAMS} streams x {DECODE_TOKENS} tokens, total tok/s, {name}: {_fmt(s['b_tok_s'])}; "
          f"{_fmt_ratios(s['b_ratios'])}", flush=True)
    if args.big:
        c = big_decode(max(1, args.rounds - 1))
        results["big"] = c
        print(f"(c) batch-1 decode tok/s, random 0.5B Llama: {_fmt(c['tok_s'])}; {_fmt_ratios(c['ratios'])}  "
              f"[load after each round {c['load_after_each_round']}]", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=lambda x: None if math.isnan(x) else x))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
