"""`switchboard router train | eval | build | path`: fit the learned gate, measure it, cache the default.

- `train` fits a gate on a dataset's train split (`build-data`), scores it on the test split and
  writes the artifact atomically.
- `eval` prints, side by side in one run on the held-out split: the learned gate, the n-gram rule,
  always-cheapest, always-best, random at equal cost and the oracle, with quality, cost, APGR,
  compute and optimal-selection rate, plus a quality/cost curve over lambda as a PNG.
- `build` makes the default gate of an experts config (data + training), cached by recipe like
  the demo experts; `make run` runs it and the local stack then serves with it. `path` prints
  where that gate lives.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from switchboard.routing.dataset import RouterDataset, RouterRecord

# Bump when training or artifact code changes what `build` produces.
GATE_CODE_VERSION = 4
DEFAULT_EXPERTS_CONFIG = Path("config/experts.yaml")


def add_parser(sub: Any) -> None:
    """Add train, eval, build and path to the router's subparsers."""
    train = sub.add_parser("train", help="fit the learned gate on a dataset and write the artifact")
    train.add_argument("--data", type=Path, required=True, help="dataset folder (from build-data)")
    train.add_argument(
        "--out", type=Path, required=True, help="artifact folder to write (replaced atomically)"
    )
    train.add_argument(
        "--max-cost-fraction", type=float, default=0.5, help="default operating point's cost budget"
    )
    train.add_argument("--epochs", type=int, default=None, help="training epochs (default: the recipe's)")
    train.set_defaults(func=_train)

    evaluate = sub.add_parser("eval", help="compare the learned gate with the baselines on held-out prompts")
    evaluate.add_argument("--data", type=Path, required=True, help="dataset folder (from build-data)")
    evaluate.add_argument("--gate", type=Path, required=True, help="gate artifact folder (from train)")
    evaluate.add_argument(
        "--experts-config", type=Path, default=DEFAULT_EXPERTS_CONFIG, help="for the n-gram rule"
    )
    evaluate.add_argument("--split", default="test", help="dataset split to evaluate on (default: test)")
    evaluate.add_argument("--plot", type=Path, default=None, help="write the quality/cost curve here (PNG)")
    evaluate.add_argument("--json", type=Path, default=None, help="write every number here (JSON)")
    evaluate.set_defaults(func=_eval)

    build = sub.add_parser(
        "build", help="build the default gate of an experts config (cached; a no-op when built)"
    )
    build.add_argument("--experts-config", type=Path, default=DEFAULT_EXPERTS_CONFIG)
    build.add_argument("--force", action="store_true", help="retrain even if cached")
    build.set_defaults(func=_build)

    path = sub.add_parser("path", help="print the default gate's folder (built or not)")
    path.add_argument("--experts-config", type=Path, default=DEFAULT_EXPERTS_CONFIG)
    path.set_defaults(func=_path)


def _fail(action: str, message: str) -> int:
    print(f"switchboard router {action}: {message}", file=sys.stderr)
    return 2


def _examples(records: list[RouterRecord], experts: list[str]) -> list[Any]:
    from switchboard.router.training import TrainingExample

    return [
        TrainingExample(
            prompt=r.prompt,
            quality=tuple(r.quality[name] for name in experts),
            tokens=r.prompt_tokens + r.continuation_tokens,
            weight=r.continuation_tokens,
        )
        for r in records
    ]


def _artifact_experts(dataset: RouterDataset) -> list[Any]:
    from switchboard.router.artifact import ArtifactExpert

    return [ArtifactExpert(e.name, e.relative_cost, e.parameters) for e in dataset.experts]


def feature_tokenizer(dataset: RouterDataset) -> Path:
    """The cheapest expert's tokenizer.json (the gate's features are in its tokens)."""
    cheapest = min(dataset.experts, key=lambda e: e.relative_cost)
    path = Path(cheapest.model) / "tokenizer.json"
    if not path.is_file():
        raise ValueError(
            f"{path} does not exist: the dataset's expert {cheapest.name} folder has no tokenizer.json"
        )
    return path


def train_from_dataset(
    dataset: RouterDataset, out: Path, *, max_cost_fraction: float = 0.5, epochs: int | None = None
) -> Any:
    """Train on the train split, score the test split, write the artifact; returns it."""
    from switchboard.router.artifact import write_artifact
    from switchboard.router.evaluation import choose
    from switchboard.router.training import TrainConfig, predict, scored_set, train_gate

    config = TrainConfig(max_cost_fraction=max_cost_fraction)
    if epochs is not None:
        config = TrainConfig(**{**asdict(config), "epochs": epochs})
    names = dataset.expert_names
    experts = _artifact_experts(dataset)
    artifact = train_gate(
        experts, _examples(dataset.split("train"), names), feature_tokenizer(dataset), config=config
    )
    test = dataset.split("test")
    if test:
        from switchboard.router.evaluation import report

        gate = artifact.gate()
        predicted = predict(gate.net, [gate.extractor.extract(r.prompt) for r in test])
        test_set = scored_set(experts, _examples(test, names))
        result = report(
            test_set,
            "gate",
            choose(predicted, test_set.relative_cost, artifact.default_cost_weight),
            artifact.default_cost_weight,
        )
        artifact.metrics["test"] = {
            "prompts": len(test),
            "apgr": result.apgr,
            "cost_fraction": result.cost_fraction,
            "optimal_rate": result.optimal_rate,
        }
    artifact.training["dataset"] = {"folder": str(dataset.folder), "recipe_hash": dataset.recipe_hash}
    write_artifact(artifact, out)
    return artifact


def _train(args: argparse.Namespace) -> int:
    if not 0.0 < args.max_cost_fraction <= 1.0:
        return _fail("train", f"--max-cost-fraction must be in (0, 1], got {args.max_cost_fraction}")
    try:
        dataset = RouterDataset.load(args.data)
        artifact = train_from_dataset(
            dataset, args.out, max_cost_fraction=args.max_cost_fraction, epochs=args.epochs
        )
    except (OSError, ValueError) as exc:
        return _fail("train", str(exc))
    print(f"gate {artifact.version} written to {args.out}")
    print(json.dumps(artifact.metrics, indent=2))
    return 0


# --- eval ----------------------------------------------------------------------------------


def evaluate(
    dataset: RouterDataset, gate_folder: Path, experts_config: Path, split: str = "test"
) -> dict[str, Any]:
    """Every policy's measures on one split, plus the learned gate's and the oracle's curves."""
    from switchboard.common.experts_config import load_experts_config
    from switchboard.router.artifact import check_expert_set, load_artifact
    from switchboard.router.evaluation import (
        at_cost,
        choose,
        curve,
        default_cost_weights,
        random_at_cost,
        report,
    )
    from switchboard.router.gate import NgramGate
    from switchboard.router.training import predict, scored_set

    records = dataset.split(split)
    if not records:
        raise ValueError(f"the dataset has no {split!r} records")
    names = dataset.expert_names
    artifact = load_artifact(gate_folder)
    check_expert_set(artifact, names)
    gate = artifact.gate()
    order = [artifact.expert_names.index(n) for n in names]  # net outputs -> dataset order
    raw = predict(gate.net, [gate.extractor.extract(r.prompt) for r in records])
    predicted = [[row[i] for i in order] for row in raw]
    scored = scored_set(_artifact_experts(dataset), _examples(records, names))
    weights = default_cost_weights()
    lam = artifact.default_cost_weight

    specs = {spec.name: spec for spec in load_experts_config(experts_config)}
    missing = [n for n in names if n not in specs]
    if missing:
        raise ValueError(f"{experts_config} does not declare {', '.join(missing)} (the dataset's experts)")
    ngram = NgramGate({n: specs[n].description or n for n in names})
    ngram_choices = choose([list(ngram.score(r.prompt).quality) for r in records], scored.relative_cost, 0.0)

    gate_report = report(scored, "learned gate", choose(predicted, scored.relative_cost, lam), lam)
    ngram_report = report(scored, "n-gram rule", ngram_choices)
    lam_at_ngram, gate_at_ngram = at_cost(scored, predicted, ngram_report.cost_fraction, weights)
    rows = [
        gate_report,
        _renamed(gate_at_ngram, "learned gate @ n-gram's cost"),
        ngram_report,
        report(scored, "always-cheapest", scored.constant(scored.cheapest)),
        report(scored, "always-best", scored.constant(scored.best)),
        random_at_cost(scored, gate_report.cost_fraction),
        _renamed(random_at_cost(scored, ngram_report.cost_fraction), "random @ n-gram's cost"),
        report(scored, "oracle (same lambda)", choose(scored.quality, scored.relative_cost, lam), lam),
        report(scored, "oracle (best quality)", choose(scored.quality, scored.relative_cost, 0.0), 0.0),
    ]
    gate_curve = curve(scored, predicted, weights)
    oracle_curve = curve(scored, scored.quality, weights)
    best_quality = rows[4].quality
    equal = [r for _, r in gate_curve if r.quality >= best_quality]
    at_equal = min(equal, key=lambda r: r.cost) if equal else None
    return {
        "split": split,
        "prompts": len(records),
        "experts": names,
        "gate_version": artifact.version,
        "cost_weight": lam,
        "cost_weight_at_ngram_cost": lam_at_ngram,
        "rows": [asdict(r) for r in rows],
        "curve": [{"cost_weight": w, **asdict(r)} for w, r in gate_curve],
        "oracle_curve": [{"cost_weight": w, **asdict(r)} for w, r in oracle_curve],
        "at_equal_quality": None if at_equal is None else asdict(at_equal),
        "sources": _by_source(records, scored, predicted, lam),
    }


def _renamed(report: Any, name: str) -> Any:
    return report.__class__(**{**asdict(report), "name": name})


def _by_source(
    records: list[RouterRecord], scored: Any, predicted: list[list[float]], lam: float
) -> dict[str, dict[str, float]]:
    """The gate's share of each expert per source family (shakespeare, milton, mixed, text)."""
    from switchboard.router.evaluation import choose

    choices = choose(predicted, scored.relative_cost, lam)
    out: dict[str, dict[str, float]] = {}
    for record, choice in zip(records, choices, strict=True):
        family = record.source.split(":", 1)[0]
        counts = out.setdefault(family, {})
        counts[scored.experts[choice]] = counts.get(scored.experts[choice], 0) + 1
    return {family: {e: n / sum(c.values()) for e, n in c.items()} for family, c in out.items()}


def format_table(result: dict[str, Any]) -> str:
    """The side-by-side table `eval` prints."""
    lines = [
        f"held-out split {result['split']!r}: {result['prompts']} prompts; experts {', '.join(result['experts'])}; "
        f"gate {result['gate_version']}, lambda {result['cost_weight']:g}",
        "",
        f"{'policy':32} {'quality':>9} {'cost %':>7} {'compute %':>9} {'APGR':>7} {'optimal':>8}  share",
    ]
    for row in result["rows"]:
        optimal = "" if row["optimal_rate"] is None else f"{row['optimal_rate']:.1%}"
        share = " ".join(f"{e}={s:.0%}" for e, s in row["share"].items())
        lines.append(
            f"{row['name']:32} {row['quality']:9.4f} {row['cost_fraction']:7.1%} {row['compute_fraction']:9.1%} "
            f"{row['apgr']:7.1%} {optimal:>8}  {share}"
        )
    lines.append("")
    equal = result["at_equal_quality"]
    if equal is None:
        lines.append("equal quality: the learned gate does not reach always-best's quality on this split")
    else:
        lines.append(
            f"equal quality: the learned gate matches always-best at {equal['cost_fraction']:.1%} of its cost "
            f"({1 - equal['cost_fraction']:.1%} saved) and {equal['compute_fraction']:.1%} of its compute "
            f"({1 - equal['compute_fraction']:.1%} saved)"
        )
    lines.append(
        "gate's choice by source: "
        + "; ".join(
            f"{family}: " + ", ".join(f"{e} {s:.0%}" for e, s in sorted(shares.items()))
            for family, shares in result["sources"].items()
        )
    )
    return "\n".join(lines)


def plot_curve(result: dict[str, Any], path: Path) -> None:
    """Quality against cost (fraction of always-best's) over lambda, with the baselines as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for key, label, style in (
        ("curve", "learned gate (lambda sweep)", "-o"),
        ("oracle_curve", "oracle (lambda sweep)", ":"),
    ):
        points = sorted((p["cost_fraction"], p["quality"]) for p in result[key])
        ax.plot([x for x, _ in points], [y for _, y in points], style, markersize=3, label=label)
    for row in result["rows"]:
        if row["name"].startswith(("learned gate", "oracle")):
            continue
        ax.plot(row["cost_fraction"], row["quality"], "s", label=row["name"])
    gate = result["rows"][0]
    ax.plot(
        gate["cost_fraction"],
        gate["quality"],
        "*",
        markersize=14,
        color="black",
        label="learned gate (default lambda)",
    )
    ax.set_xlabel("cost (fraction of always-best's)")
    ax.set_ylabel("mean log-likelihood per token (nats)")
    ax.set_title(f"Router gate on held-out prompts ({result['prompts']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _eval(args: argparse.Namespace) -> int:
    from switchboard.router.artifact import GateArtifactError

    try:
        dataset = RouterDataset.load(args.data)
        result = evaluate(dataset, args.gate, args.experts_config, args.split)
    except (OSError, ValueError, GateArtifactError) as exc:
        return _fail("eval", str(exc))
    print(format_table(result))
    if args.plot is not None:
        plot_curve(result, args.plot)
        print(f"curve written to {args.plot}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


# --- build / path --------------------------------------------------------------------------


def gate_cache_root() -> Path:
    """`$SWITCHBOARD_CACHE_DIR/router-gate` (default ~/.cache/switchboard/router-gate)."""
    base = os.environ.get("SWITCHBOARD_CACHE_DIR") or str(Path.home() / ".cache" / "switchboard")
    return Path(base).expanduser() / "router-gate"


def default_gate_dir(data_recipe_hash: str) -> Path:
    """The default gate's folder for a dataset recipe (the data hash covers the experts)."""
    key = json.dumps({"data": data_recipe_hash, "code": GATE_CODE_VERSION}, sort_keys=True)
    return gate_cache_root() / hashlib.sha256(key.encode()).hexdigest()[:16]


def build_default_gate(experts_config: Path, force: bool = False, progress: Any = print) -> Path:
    """Data (cached) and gate (cached) of an experts config; returns the gate folder."""
    from switchboard.routing.build_data import build_router_data
    from switchboard.routing.cli import experts_from_config

    data_folder = build_router_data(experts_from_config(experts_config), progress=progress)
    dataset = RouterDataset.load(data_folder)
    out = default_gate_dir(dataset.recipe_hash)
    if (out / "gate.json").is_file() and not force:
        progress(f"gate cached at {out}")
        return out
    train_from_dataset(dataset, out)
    progress(f"gate built at {out}")
    return out


def _build(args: argparse.Namespace) -> int:
    try:
        folder = build_default_gate(args.experts_config, force=args.force)
    except (OSError, ValueError) as exc:
        return _fail("build", str(exc))
    print(folder)
    return 0


def _path(args: argparse.Namespace) -> int:
    from switchboard.routing.build_data import data_dir
    from switchboard.routing.cli import experts_from_config

    try:
        folder = data_dir(experts_from_config(args.experts_config))
        dataset = RouterDataset.load(folder)
    except (OSError, ValueError) as exc:
        return _fail("path", f"{exc} (run `switchboard router build` first)")
    print(default_gate_dir(dataset.recipe_hash))
    return 0
