"""The router dataset format: a round trip through meta.json + records.jsonl and strict reading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from switchboard.routing.dataset import (
    FORMAT,
    META_FILE,
    RECORDS_FILE,
    ExpertEntry,
    RouterDataset,
    RouterRecord,
    load,
)


def _dataset() -> RouterDataset:
    experts = [
        ExpertEntry("bard-small", "/models/bard-small", 1.0, 2_600_000, "ab" * 32),
        ExpertEntry("scribe-large", "/models/scribe-large", 4.0, 7_700_000, "ab" * 32),
    ]
    records = [
        RouterRecord(
            id=f"{split}-{i:05d}",
            split=split,
            source=source,
            prompt=f"Of man's first disobedience, {i} \u00e9\n",
            prompt_tokens=10 + i,
            continuation_tokens=48,
            quality={"bard-small": -4.25 - i / 3, "scribe-large": -3.5 - i / 7},
            cost={"bard-small": 58.0 + i, "scribe-large": 4 * (58.0 + i)},
        )
        for i, (split, source) in enumerate(
            [
                ("train", "shakespeare:tempest"),
                ("train", "mixed:tempest+poemata"),
                ("test", "milton:paradise_regained"),
            ]
        )
    ]
    return RouterDataset(
        experts=experts,
        continuation_tokens=48,
        recipe={"seed": 1, "mix": [["shakespeare", 0.4]]},
        recipe_hash="0123456789ab",
        records=records,
        created="2026-11-24T10:00:00+00:00",
        seconds=12.5,
    )


def test_round_trip_keeps_every_field(tmp_path: Path) -> None:
    dataset = _dataset()
    folder = dataset.write(tmp_path / "data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no temporary folder left
    loaded = RouterDataset.load(folder)
    assert loaded == dataset and loaded.folder == folder
    assert load(folder) == dataset
    assert [r.id for r in loaded.split("train")] == ["train-00000", "train-00001"]
    assert [r.source for r in loaded.split("test")] == ["milton:paradise_regained"]
    meta = json.loads((folder / META_FILE).read_text())
    assert meta["format"] == FORMAT and meta["recipe_hash"] == "0123456789ab"
    assert [e["name"] for e in meta["experts"]] == ["bard-small", "scribe-large"]
    assert meta["sources"] == {
        "train": {"mixed:tempest+poemata": 1, "shakespeare:tempest": 1},
        "test": {"milton:paradise_regained": 1},
    }
    assert len((folder / RECORDS_FILE).read_text().splitlines()) == 3
    assert loaded.records[0].best_expert() == "scribe-large"
    with pytest.raises(ValueError, match="unknown split"):
        loaded.split("validation")


def test_write_replaces_an_old_dataset_but_not_a_foreign_folder(tmp_path: Path) -> None:
    dataset = _dataset()
    dataset.write(tmp_path / "data")
    dataset.records = dataset.records[:1]
    dataset.write(tmp_path / "data")
    assert len(RouterDataset.load(tmp_path / "data").records) == 1
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a router dataset"):
        dataset.write(tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"


def _edit_line(folder: Path, number: int, edit) -> None:
    path = folder / RECORDS_FILE
    lines = path.read_text().splitlines()
    lines[number - 1] = edit(lines[number - 1])
    path.write_text("\n".join(lines) + "\n")


def _edit_record(folder: Path, number: int, change) -> None:
    def edit(line: str) -> str:
        data = json.loads(line)
        change(data)
        return json.dumps(data)

    _edit_line(folder, number, edit)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda d: d["quality"].pop("scribe-large"),
            r"records.jsonl:2: quality has experts \['bard-small'\]",
        ),
        (lambda d: d["cost"].update(extra=1.0), r"records.jsonl:2: cost has experts"),
        (lambda d: d.pop("prompt"), r"records.jsonl:2: missing prompt"),
        (lambda d: d.update(split="validation"), r"records.jsonl:2: split 'validation'"),
        (
            lambda d: d.update(prompt_tokens="12"),
            r"records.jsonl:2: prompt_tokens must be a positive integer",
        ),
        (lambda d: d["quality"].update({"bard-small": "high"}), r"records.jsonl:2: quality\['bard-small'\]"),
        (lambda d: d.update(continuation_tokens=40), r"records.jsonl:2: continuation_tokens 40 differs"),
        (lambda d: d.update(id="train-00000"), r"records.jsonl:2: duplicate id"),
    ],
)
def test_malformed_records_name_file_and_line(tmp_path: Path, change, message: str) -> None:
    folder = _dataset().write(tmp_path / "data")
    _edit_record(folder, 2, change)
    with pytest.raises(ValueError, match=message):
        RouterDataset.load(folder)


def test_invalid_json_and_non_finite_numbers_are_refused(tmp_path: Path) -> None:
    folder = _dataset().write(tmp_path / "data")
    _edit_line(folder, 3, lambda line: line[:-5])
    with pytest.raises(ValueError, match=r"records.jsonl:3: not valid JSON"):
        RouterDataset.load(folder)
    folder = _dataset().write(tmp_path / "data2")
    _edit_line(folder, 1, lambda line: line.replace('"bard-small": -4.25', '"bard-small": NaN'))
    with pytest.raises(ValueError, match=r"records.jsonl:1: quality\['bard-small'\] must be a finite number"):
        RouterDataset.load(folder)
    dataset = _dataset()
    dataset.records[0].quality["bard-small"] = float("nan")
    with pytest.raises(ValueError, match="Out of range float"):
        dataset.write(tmp_path / "data3")


def test_truncated_records_disagree_with_meta(tmp_path: Path) -> None:
    folder = _dataset().write(tmp_path / "data")
    lines = (folder / RECORDS_FILE).read_text().splitlines()
    (folder / RECORDS_FILE).write_text("\n".join(lines[:2]) + "\n")
    with pytest.raises(ValueError, match=r"differ from meta.json's sources"):
        RouterDataset.load(folder)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.update(format="switchboard-router-data/0"), "is not 'switchboard-router-data/1'"),
        (lambda m: m.pop("recipe_hash"), "missing recipe_hash"),
        (lambda m: m["experts"][0].pop("tokenizer_sha256"), r"experts\[0\]: expected exactly the keys"),
        (lambda m: m["experts"][1].update(parameters=1.5), r"experts\[1\].parameters: wrong type"),
        (lambda m: m.update(sources={"train": {}}), "sources must be"),
    ],
)
def test_malformed_meta_is_refused(tmp_path: Path, change, message: str) -> None:
    folder = _dataset().write(tmp_path / "data")
    meta = json.loads((folder / META_FILE).read_text())
    change(meta)
    (folder / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=f"meta.json: .*{message}"):
        RouterDataset.load(folder)


def test_missing_files_say_what_the_folder_lacks(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"meta.json: not found .*switchboard router build-data"):
        RouterDataset.load(tmp_path)
    (tmp_path / META_FILE).write_text("{")
    with pytest.raises(ValueError, match=r"records.jsonl: not found"):
        RouterDataset.load(tmp_path)
    (tmp_path / RECORDS_FILE).write_text("")
    with pytest.raises(ValueError, match=r"meta.json: not valid JSON"):
        RouterDataset.load(tmp_path)
