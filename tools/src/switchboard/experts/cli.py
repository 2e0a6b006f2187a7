"""`switchboard experts build | path | sample`: build, locate and try the demo experts."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from switchboard.experts.cache import expert_dir, is_built
from switchboard.experts.export import METRICS_FILE
from switchboard.experts.recipes import DEMO_EXPERTS, SAMPLING


def add_parser(subparsers: Any) -> None:
    """Add the `experts` subcommand and its own subcommands."""
    parser = subparsers.add_parser("experts", help="build, locate and sample the demo expert models")
    commands = parser.add_subparsers(dest="experts_command", metavar="ACTION", required=True)

    build = commands.add_parser("build", help="build the demo experts that are missing (no-op when cached)")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    build.add_argument(
        "--only", action="append", choices=DEMO_EXPERTS, metavar="NAME", help="build only NAME (repeatable)"
    )
    build.set_defaults(func=_build)

    path = commands.add_parser("path", help="print the folder of an expert (built or not)")
    path.add_argument("name", choices=DEMO_EXPERTS)
    path.set_defaults(func=_path)

    sample = commands.add_parser("sample", help="print a sampled continuation of a prompt")
    sample.add_argument("name", choices=DEMO_EXPERTS)
    sample.add_argument("--prompt", default=SAMPLING.prompt)
    sample.add_argument("--max-new-tokens", type=int, default=64)
    sample.add_argument("--temperature", type=float, default=SAMPLING.temperature)
    sample.add_argument("--top-k", type=int, default=SAMPLING.top_k)
    sample.add_argument(
        "--repetition-penalty",
        type=float,
        default=SAMPLING.repetition_penalty,
        help="damp tokens already in the window (1 = off)",
    )
    sample.add_argument("--seed", type=int, default=SAMPLING.seed)
    sample.set_defaults(func=_sample)


def _build(args: argparse.Namespace) -> int:
    from switchboard.experts.build import build_experts
    from switchboard.experts.corpus import CorpusFetchError

    names = args.only or list(DEMO_EXPERTS)
    cached = not args.force and all(is_built(expert_dir(n)) for n in names)
    started = time.perf_counter()
    try:
        folders = build_experts(names, force=args.force)
    except CorpusFetchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for name, folder in folders.items():
        metrics = json.loads((folder / METRICS_FILE).read_text())
        ev = metrics["eval"]
        print(
            f"{name:13s} {metrics['parameters'] / 1e6:5.2f}M params  held-out perplexity {ev['own_perplexity']:7.1f}"
            f"  (unigram baseline {ev['own_unigram_perplexity']:6.1f}; mixed text {ev['mixed_perplexity']:6.1f})"
        )
        sample = metrics["sample"]
        print(f"    {sample['prompt']}{sample['text']}".replace("\n", "\n    ").rstrip())
        print(f"    -> {folder}")
    state = "cached, nothing to build" if cached else f"built in {time.perf_counter() - started:.0f}s"
    print(f"experts: {state}")
    return 0


def _path(args: argparse.Namespace) -> int:
    print(expert_dir(args.name))
    return 0


def _sample(args: argparse.Namespace) -> int:
    from switchboard.experts.sample import continue_text, load_expert

    folder = expert_dir(args.name)
    if not is_built(folder):
        print(f"error: {args.name} is not built yet; run `switchboard experts build`", file=sys.stderr)
        return 1
    if args.repetition_penalty <= 0:
        print(f"error: --repetition-penalty must be > 0, got {args.repetition_penalty}", file=sys.stderr)
        return 2
    model, tokenizer = load_expert(folder)
    text = continue_text(
        model,
        tokenizer,
        args.prompt,
        args.max_new_tokens,
        args.temperature,
        args.top_k,
        args.seed,
        repetition_penalty=args.repetition_penalty,
    )
    print(args.prompt + text)
    return 0
