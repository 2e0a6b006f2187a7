"""Step-cost profile of a ~0.5B-parameter Llama with random weights, for the simulator's evaluation.

The demo experts are so small that on a CPU every step costs about the same whatever its batch or
prompt, so placement hardly matters for them. A 0.5B model (Qwen2.5-0.5B's size class: hidden
1536, 16 layers, 12 heads, 4 KV heads) makes prefill the dominant cost of a long prompt, as it is
on the GPUs users serve from. Step times do not depend on the weights' values, so random weights
give the real timing of that shape on this machine (the same model as `bench/generator_bench.py`
(c)). Writes the profile JSON that `switchboard scheduler eval --cost-models` reads.

Run: .venv/bin/python bench/profile_random_llama.py --out bench/sim/cost_models/chat-half-b.json   # a few minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from generator_bench import big_random_llama
from switchboard.generator.engine.engine import Engine
from switchboard.generator.engine.profile import profile
from switchboard.generator.engine.types import EngineConfig


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    loaded = big_random_llama(getattr(torch, args.dtype))
    engine = Engine(loaded, EngineConfig(max_num_seqs=64, max_tokens_per_step=512))
    data = profile(engine, repeats=args.repeats)
    data["note"] = "random weights of a ~0.5B Llama shape (timing only), bench/profile_random_llama.py"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    fit = data["fit"]
    print(f"wrote {args.out}: step_ms = {fit['base_ms']:.3f} + {fit['prefill_token_ms']:.4f}*prefill_tokens"
          f" + {fit['decode_seq_ms']:.4f}*decode_seqs + {fit['context_token_ms']:.6f}*context_tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
