"""Save a ~0.4B-parameter Llama with random weights as a model folder the generator serves.

For timing only (its text is noise): the same shape as `bench/profile_random_llama.py` profiles
(hidden 1536, 16 layers, 12 heads, 4 KV heads, intermediate 4096), with a demo expert's tokenizer
so `switchboard bench` can synthesize prompts of exact length for it. The real local stack then runs
a model whose prefill dominates a request's cost, as on the GPUs users serve from, which the tiny
demo experts cannot show. Never committed (about 1 GB in bfloat16); write it under a temporary
folder.

Run: .venv/bin/python bench/make_random_llama.py OUT_DIR [--tokenizer-from bard-small]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--tokenizer-from", default="bard-small", help="demo expert whose tokenizer to use")
    parser.add_argument("--max-position-embeddings", type=int, default=2048)
    args = parser.parse_args()
    from switchboard.experts import ensure_experts
    from transformers import LlamaConfig, LlamaForCausalLM

    source = ensure_experts([args.tokenizer_from])[args.tokenizer_from]
    vocab = json.loads((source / "config.json").read_text())["vocab_size"]
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=1536, intermediate_size=4096, num_hidden_layers=16,
        num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=args.max_position_embeddings,
        tie_word_embeddings=True, torch_dtype="bfloat16",
        bos_token_id=json.loads((source / "config.json").read_text()).get("bos_token_id"),
        eos_token_id=json.loads((source / "config.json").read_text()).get("eos_token_id"),
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).is_file():
            shutil.copy(source / name, args.out / name)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: random Llama, {params / 1e6:.0f}M parameters, vocab {vocab}, tokenizer of {args.tokenizer_from}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
