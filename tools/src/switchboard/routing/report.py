"""A readable summary of a router dataset: mean quality and best expert per split and source.

No torch: `switchboard router build-data` prints it after a build and for a cached dataset.
"""

from __future__ import annotations

from collections.abc import Sequence

from switchboard.routing.dataset import SPLITS, RouterDataset, RouterRecord

#: Margin (nats per token) by which the costliest expert must beat the best cheaper one to count.
MARGIN = 0.05


def source_group(source: str) -> str:
    """The row a source is summarised under: a work or text file, or "mixed" for all mixed prompts."""
    return "mixed" if source.startswith("mixed:") else source


def costliest_expert(dataset: RouterDataset) -> str | None:
    """The expert whose relative cost is strictly above every other's, if there is one."""
    ranked = sorted(dataset.experts, key=lambda e: e.relative_cost, reverse=True)
    if len(ranked) < 2 or ranked[0].relative_cost == ranked[1].relative_cost:
        return None
    return ranked[0].name


def beats_cheaper(records: Sequence[RouterRecord], expert: str, margin: float = MARGIN) -> float:
    """Fraction of records on which `expert` beats the best of the other experts by more than `margin`."""
    if not records:
        return 0.0
    wins = 0
    for record in records:
        others = max(q for name, q in record.quality.items() if name != expert)
        wins += record.quality[expert] > others + margin
    return wins / len(records)


def summary_lines(dataset: RouterDataset) -> list[str]:
    """Per split and source: count, mean quality per expert, how often each is best, and the
    share of prompts on which the costliest expert beats the best cheaper one by MARGIN."""
    names = dataset.expert_names
    costly = costliest_expert(dataset)
    width = max(12, *(len(n) for n in names))
    rows: list[str] = []
    head = f"{'split':5s} {'source':28s} {'n':>5s}  " + " ".join(f"{n:>{width}s}" for n in names)
    head += "  | best: " + " ".join(f"{n:>{width}s}" for n in names)
    if costly:
        head += f"  | {costly} > others+{MARGIN}"
    rows.append("mean quality (mean log-likelihood of the continuation, nats/token; higher is better)")
    rows.append(head)
    for split in SPLITS:
        records = dataset.split(split)
        groups: dict[str, list[RouterRecord]] = {}
        for record in records:
            groups.setdefault(source_group(record.source), []).append(record)
        for group, members in [*sorted(groups.items()), ("all", records)]:
            if not members:
                continue
            means = [sum(r.quality[n] for r in members) / len(members) for n in names]
            best = [sum(r.best_expert() == n for r in members) / len(members) for n in names]
            line = f"{split:5s} {group:28s} {len(members):5d}  " + " ".join(f"{m:{width}.3f}" for m in means)
            line += "  |       " + " ".join(f"{b:{width}.0%}" for b in best)
            if costly:
                line += f"  | {beats_cheaper(members, costly):{len(costly) + 11}.0%}"
            rows.append(line)
    return rows
