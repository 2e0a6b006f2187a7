"""`switchboard router ACTION`: build the learned gate's data, train the gate and evaluate it.

`add_parser` adds the `router` subcommand and one sub-subcommand per action: `build-data`
is defined here; actions that live in their own modules are listed in `ACTIONS` and added
by calling that module's `add_parser(sub)`. Nothing heavy is imported until an action runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from switchboard.common.experts_config import ExpertSpec

# Router actions defined in other modules: action name -> module whose `add_parser(sub)` adds
# it to the router's subparsers and sets `func` (e.g. "train": "switchboard.routing.train_cli").
ACTIONS: dict[str, str] = {
    "train": "switchboard.routing.gate_cli",
    "eval": "switchboard.routing.gate_cli",
    "build": "switchboard.routing.gate_cli",
    "path": "switchboard.routing.gate_cli",
}


def add_parser(subparsers: Any) -> None:
    """Add the `router` subcommand and its actions."""
    parser = subparsers.add_parser("router", help="build the router gate's data, train and evaluate it")
    sub = parser.add_subparsers(dest="router_command", metavar="ACTION", required=True)
    _add_build_data(sub)
    for module_name in dict.fromkeys(ACTIONS.values()):  # a module adding several actions: once
        importlib.import_module(module_name).add_parser(sub)


# --- build-data ---------------------------------------------------------------------------


def _add_build_data(sub: Any) -> None:
    from switchboard.routing.recipes import RECIPE

    parser = sub.add_parser(
        "build-data",
        help="score every expert on held-out prompts (the gate's training data; a no-op when cached)",
        description="Cut prompts from held-out text and score each expert's model on the continuation.",
    )
    parser.add_argument(
        "--experts-config", default=None, help="experts config (default: config/experts.yaml)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="dataset folder (default: <cache>/router-data/<hash>)"
    )
    parser.add_argument("--train-samples", type=int, default=RECIPE.train_samples, metavar="N")
    parser.add_argument("--test-samples", type=int, default=RECIPE.test_samples, metavar="N")
    parser.add_argument(
        "--text",
        action="append",
        type=Path,
        default=[],
        metavar="FILE",
        help="also cut prompts from this UTF-8 text (first 70%% train, last 30%% test; repeatable)",
    )
    parser.add_argument(
        "--no-demo-corpus", action="store_true", help="use only the --text files, not the demo corpus"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.set_defaults(func=_build_data)


def _fail(message: str) -> int:
    print(f"switchboard router build-data: {message}", file=sys.stderr)
    return 2


def resolve_expert_model(value: str) -> Path:
    """Folder of an experts-config `model`: a folder path, or a demo expert name (built if missing).

    A folder is checked as the generator checks GENERATOR_MODEL (`resolve_model_path`); a demo
    expert name is resolved here (the services resolve no names), built first when it is not yet.
    Raises ValueError naming what is wrong.
    """
    from switchboard.common.settings import SettingsError
    from switchboard.experts import DEMO_EXPERTS, ensure_experts, expert_dir, is_built
    from switchboard.generator.config import resolve_model_path

    if value in DEMO_EXPERTS and not Path(value).expanduser().is_dir():
        if not is_built(expert_dir(value)):
            print(f"building demo expert {value} (first use)...", file=sys.stderr, flush=True)
            ensure_experts([value])
        return expert_dir(value)
    if not Path(value).expanduser().is_dir() and "/" not in value and not value.startswith((".", "~")):
        raise ValueError(
            f"{value!r} is neither a model folder nor a demo expert (known: {', '.join(DEMO_EXPERTS)})"
        )
    try:
        return resolve_model_path(value)
    except SettingsError as exc:
        raise ValueError(str(exc).removeprefix("GENERATOR_MODEL: ")) from None


def experts_from_config(path: Path | str) -> list[ExpertSpec]:
    """The experts of an experts config, in its order, each `model` resolved to its folder.

    Returns `ExpertSpec`s (what `build_router_data` takes); raises ValueError (an
    `ExpertsConfigError` for the file itself) naming the config and the expert.
    """
    from dataclasses import replace

    from switchboard.common.experts_config import load_experts_config

    specs = load_experts_config(Path(path))
    experts = []
    for spec in specs:
        try:
            experts.append(replace(spec, model=str(resolve_expert_model(spec.model))))
        except ValueError as exc:
            raise ValueError(f"{path}: expert {spec.name!r}: {exc}") from None
    return experts


def _build_data(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from switchboard.cli.stack import default_experts_config
    from switchboard.experts.corpus import CorpusFetchError

    config_path = Path(args.experts_config or default_experts_config())
    if args.train_samples < 1 or args.test_samples < 1:
        return _fail("--train-samples and --test-samples must be at least 1")
    if args.no_demo_corpus and not args.text:
        return _fail("--no-demo-corpus needs at least one --text FILE")
    for text in args.text:
        if not text.expanduser().is_file():
            return _fail(f"text file {text} does not exist")
    try:
        experts = experts_from_config(config_path)
    except ValueError as exc:
        return _fail(str(exc))
    except CorpusFetchError as exc:  # building a missing demo expert needs the corpus archive
        print(f"switchboard router build-data: {exc}", file=sys.stderr)
        return 1

    from switchboard.routing.build_data import build_router_data
    from switchboard.routing.recipes import RECIPE

    recipe = replace(
        RECIPE,
        train_samples=args.train_samples,
        test_samples=args.test_samples,
        use_demo_corpus=not args.no_demo_corpus,
    )
    started = time.perf_counter()
    try:
        folder = build_router_data(
            experts, args.out, recipe=recipe, force=args.force, texts=args.text, progress=_print
        )
    except CorpusFetchError as exc:
        print(f"switchboard router build-data: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        return _fail(str(exc))
    print(f"router data: {folder} ({time.perf_counter() - started:.1f}s)")
    return 0


def _print(message: str) -> None:
    print(message, flush=True)
