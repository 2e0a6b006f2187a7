"""The router's training data: prompts scored by every expert, as a folder of JSON files.

A dataset is a folder with two files:

- `meta.json`: `{"format": "switchboard-router-data/1", "experts": [{"name", "model",
  "relative_cost", "parameters", "tokenizer_sha256"}, ...] (experts-config order),
  "continuation_tokens", "recipe", "recipe_hash", "sources": {split: {source: count}},
  "created" (ISO time), "seconds"}`.
- `records.jsonl`: one record a line, `{"id", "split" ("train" | "test"), "source", "prompt",
  "prompt_tokens", "continuation_tokens", "quality": {expert: mean log-likelihood per token
  of the reference continuation, nats}, "cost": {expert: relative_cost * (prompt_tokens +
  continuation_tokens)}}`.

Reading is strict: a malformed file is a ValueError naming the file (and line) and what is
wrong, so a truncated or hand-edited dataset never trains a gate silently. Writing goes to a
temporary sibling folder renamed into place. No torch here: the gate's trainer and the
router service can read datasets without it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "switchboard-router-data/1"
SPLITS = ("train", "test")
META_FILE = "meta.json"
RECORDS_FILE = "records.jsonl"

_EXPERT_FIELDS = {
    "name": str,
    "model": str,
    "relative_cost": (int, float),
    "parameters": int,
    "tokenizer_sha256": str,
}
_RECORD_FIELDS = (
    "id",
    "split",
    "source",
    "prompt",
    "prompt_tokens",
    "continuation_tokens",
    "quality",
    "cost",
)
_META_FIELDS = (
    "format",
    "experts",
    "continuation_tokens",
    "recipe",
    "recipe_hash",
    "sources",
    "created",
    "seconds",
)


@dataclass(frozen=True)
class ExpertEntry:
    """One expert the prompts were scored with (meta.json `experts[i]`)."""

    name: str
    model: str  # the model folder it was loaded from
    relative_cost: float
    parameters: int
    tokenizer_sha256: str


@dataclass(frozen=True)
class RouterRecord:
    """One scored prompt (a line of records.jsonl)."""

    id: str
    split: str
    source: str
    prompt: str
    prompt_tokens: int
    continuation_tokens: int
    # Mean log p(continuation token | prefix) in nats, per expert (negative; higher is better).
    quality: dict[str, float]
    # relative_cost * (prompt_tokens + continuation_tokens), per expert.
    cost: dict[str, float]

    def best_expert(self) -> str:
        """The expert with the highest quality (the first in meta order on a tie)."""
        return max(self.quality, key=lambda name: self.quality[name])

    def to_json(self) -> dict[str, Any]:
        """The record as the JSON object of its records.jsonl line."""
        return {name: getattr(self, name) for name in _RECORD_FIELDS}


@dataclass
class RouterDataset:
    """The experts, the recipe that produced the data, and every scored prompt."""

    experts: list[ExpertEntry]
    continuation_tokens: int
    recipe: dict[str, Any]
    recipe_hash: str
    records: list[RouterRecord]
    created: str
    seconds: float
    folder: Path | None = field(default=None, compare=False)

    @property
    def expert_names(self) -> list[str]:
        """Expert names in meta order (the experts-config order)."""
        return [e.name for e in self.experts]

    @property
    def sources(self) -> dict[str, dict[str, int]]:
        """Record counts per split and source (what meta.json's `sources` holds)."""
        counts: dict[str, Counter[str]] = {name: Counter() for name in SPLITS}
        for record in self.records:
            counts[record.split][record.source] += 1
        return {split: dict(sorted(c.items())) for split, c in counts.items()}

    def split(self, name: str) -> list[RouterRecord]:
        """The records of one split ("train" or "test"), in file order."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        return [r for r in self.records if r.split == name]

    def meta(self) -> dict[str, Any]:
        """The meta.json object."""
        return {
            "format": FORMAT,
            "experts": [
                {
                    "name": e.name,
                    "model": e.model,
                    "relative_cost": e.relative_cost,
                    "parameters": e.parameters,
                    "tokenizer_sha256": e.tokenizer_sha256,
                }
                for e in self.experts
            ],
            "continuation_tokens": self.continuation_tokens,
            "recipe": self.recipe,
            "recipe_hash": self.recipe_hash,
            "sources": self.sources,
            "created": self.created,
            "seconds": self.seconds,
        }

    def write(self, folder: Path | str) -> Path:
        """Write meta.json and records.jsonl to `folder` atomically (replacing an old dataset there)."""
        folder = Path(folder)
        if folder.exists():
            foreign = sorted({p.name for p in folder.iterdir()} - {META_FILE, RECORDS_FILE})
            if not folder.is_dir() or foreign:
                raise ValueError(
                    f"{folder} exists and is not a router dataset ({', '.join(foreign[:3]) or 'a file'}); "
                    "choose an empty or new folder"
                )
        names = set(self.expert_names)
        for record in self.records:
            _check_record_experts(record, names, f"record {record.id!r}")
        meta_text = json.dumps(self.meta(), indent=1, allow_nan=False) + "\n"
        lines = [json.dumps(r.to_json(), ensure_ascii=False, allow_nan=False) + "\n" for r in self.records]
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            with open(tmp / RECORDS_FILE, "w", encoding="utf-8") as handle:
                handle.writelines(lines)
            # meta.json last: a folder with meta.json has all its records.
            (tmp / META_FILE).write_text(meta_text, encoding="utf-8")
            if folder.exists():
                old = folder.parent / f".{folder.name}.old-{os.getpid()}"
                shutil.rmtree(old, ignore_errors=True)
                folder.rename(old)
                shutil.rmtree(old)
            tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.folder = folder
        return folder

    @classmethod
    def load(cls, folder: Path | str) -> RouterDataset:
        """Read a dataset folder; ValueError naming the file and line for anything malformed."""
        folder = Path(folder)
        meta_path = folder / META_FILE
        records_path = folder / RECORDS_FILE
        if not meta_path.is_file():
            raise ValueError(
                f"{meta_path}: not found (is {folder} a router dataset? build one with "
                "`switchboard router build-data`)"
            )
        if not records_path.is_file():
            raise ValueError(f"{records_path}: not found")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{meta_path}: not valid JSON: {exc}") from None
        experts, continuation, sources = _parse_meta(meta_path, meta)
        names = {e.name for e in experts}
        records: list[RouterRecord] = []
        seen: set[str] = set()
        with open(records_path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                where = f"{records_path}:{number}"
                if not line.strip():
                    raise ValueError(f"{where}: empty line")
                try:
                    data = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{where}: not valid JSON: {exc}") from None
                record = _parse_record(where, data)
                _check_record_experts(record, names, where)
                if record.continuation_tokens != continuation:
                    raise ValueError(
                        f"{where}: continuation_tokens {record.continuation_tokens} differs from "
                        f"{META_FILE}'s {continuation}"
                    )
                if record.id in seen:
                    raise ValueError(f"{where}: duplicate id {record.id!r}")
                seen.add(record.id)
                records.append(record)
        dataset = cls(
            experts=experts,
            continuation_tokens=continuation,
            recipe=meta["recipe"],
            recipe_hash=meta["recipe_hash"],
            records=records,
            created=meta["created"],
            seconds=float(meta["seconds"]),
            folder=folder,
        )
        if dataset.sources != sources:
            raise ValueError(
                f"{records_path}: record counts per source {dataset.sources} differ from {META_FILE}'s "
                f"sources {sources} (truncated or edited file?)"
            )
        return dataset


def load(folder: Path | str) -> RouterDataset:
    """Read a dataset folder (same as `RouterDataset.load`)."""
    return RouterDataset.load(folder)


def _check_record_experts(record: RouterRecord, names: set[str], where: str) -> None:
    for key in ("quality", "cost"):
        got = set(getattr(record, key))
        if got != names:
            raise ValueError(
                f"{where}: {key} has experts {sorted(got)}, but the dataset's experts are {sorted(names)}"
            )


def _parse_meta(path: Path, meta: Any) -> tuple[list[ExpertEntry], int, dict[str, dict[str, int]]]:
    """Checked experts, continuation length and sources of a meta.json object."""
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r} (rebuild the data)")
    missing = [key for key in _META_FIELDS if key not in meta]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)}")
    entries = meta["experts"]
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: experts must be a non-empty list")
    experts = []
    for index, entry in enumerate(entries):
        where = f"{path}: experts[{index}]"
        if not isinstance(entry, dict) or set(entry) != set(_EXPERT_FIELDS):
            raise ValueError(f"{where}: expected exactly the keys {', '.join(_EXPERT_FIELDS)}")
        for key, kind in _EXPERT_FIELDS.items():
            if not isinstance(entry[key], kind) or isinstance(entry[key], bool):
                raise ValueError(f"{where}.{key}: wrong type {type(entry[key]).__name__}")
        experts.append(ExpertEntry(**{**entry, "relative_cost": float(entry["relative_cost"])}))
    names = [e.name for e in experts]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: duplicate expert names {names}")
    continuation = meta["continuation_tokens"]
    if not isinstance(continuation, int) or continuation < 1:
        raise ValueError(f"{path}: continuation_tokens must be a positive integer, got {continuation!r}")
    if not isinstance(meta["recipe"], dict) or not isinstance(meta["recipe_hash"], str):
        raise ValueError(f"{path}: recipe must be an object and recipe_hash a string")
    if not isinstance(meta["created"], str) or not isinstance(meta["seconds"], (int, float)):
        raise ValueError(f"{path}: created must be a string and seconds a number")
    sources = meta["sources"]
    ok = isinstance(sources, dict) and set(sources) == set(SPLITS)
    ok = ok and all(
        isinstance(counts, dict) and all(isinstance(n, int) for n in counts.values())
        for counts in sources.values()
    )
    if not ok:
        raise ValueError(
            f"{path}: sources must be {{split: {{source: count}}}} for splits {', '.join(SPLITS)}"
        )
    return experts, continuation, sources


def _parse_record(where: str, data: Any) -> RouterRecord:
    """A checked record from one records.jsonl object."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object")
    keys = set(data)
    if keys != set(_RECORD_FIELDS):
        detail = []
        if set(_RECORD_FIELDS) - keys:
            detail.append(f"missing {', '.join(sorted(set(_RECORD_FIELDS) - keys))}")
        if keys - set(_RECORD_FIELDS):
            detail.append(f"unknown {', '.join(sorted(keys - set(_RECORD_FIELDS)))}")
        raise ValueError(f"{where}: {'; '.join(detail)}")
    for key in ("id", "source", "prompt"):
        if not isinstance(data[key], str) or not data[key]:
            raise ValueError(f"{where}: {key} must be a non-empty string")
    if data["split"] not in SPLITS:
        raise ValueError(f"{where}: split {data['split']!r} is not one of {', '.join(SPLITS)}")
    for key in ("prompt_tokens", "continuation_tokens"):
        value = data[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{where}: {key} must be a positive integer, got {value!r}")
    for key in ("quality", "cost"):
        mapping = data[key]
        if not isinstance(mapping, dict) or not mapping:
            raise ValueError(f"{where}: {key} must be a non-empty {{expert: number}} object")
        for name, value in mapping.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"{where}: {key}[{name!r}] must be a finite number, got {value!r}")
    return RouterRecord(
        id=data["id"],
        split=data["split"],
        source=data["source"],
        prompt=data["prompt"],
        prompt_tokens=data["prompt_tokens"],
        continuation_tokens=data["continuation_tokens"],
        quality={k: float(v) for k, v in data["quality"].items()},
        cost={k: float(v) for k, v in data["cost"].items()},
    )
