"""The revision a replica announces: an explicit label, or one derived from its model folder.

A rollout moves an expert's traffic between revisions, and the gateway keys cached answers by
the revision, so two replicas with different weights must announce different revisions while
two replicas of the same folder (or of identical copies of it) announce the same one. Hashing
every weight byte would cost seconds per GB at every start; the derived label hashes the small
files whole (config, generation config, tokenizer files) and each weights file's name, size and
first and last MiB. A retrained checkpoint changes its config or the bytes at both ends of its
weights (the safetensors header with its offsets at the start, the last tensors at the end), so
in practice the label follows the weights; GENERATOR_REVISION names a revision explicitly.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

# Hashed whole when present.
_SMALL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
# Weight files, hashed by name, size and both edges.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_EDGE_BYTES = 1 << 20
PREFIX = "sha-"


def derived_revision(folder: Path) -> str:
    """`sha-` and 12 hex digits for the model in `folder` ("" when it is not a folder)."""
    if not folder.is_dir():
        return ""
    digest = hashlib.sha256()
    for name in _SMALL_FILES:
        path = folder / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES):
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with path.open("rb") as handle:
            digest.update(handle.read(_EDGE_BYTES))
            if size > 2 * _EDGE_BYTES:
                handle.seek(size - _EDGE_BYTES)
                digest.update(handle.read(_EDGE_BYTES))
    return PREFIX + digest.hexdigest()[:12]


def replica_revision(explicit: str, model: str) -> str:
    """The revision to announce: `explicit` when set, else the one derived from the `model` folder."""
    if explicit.strip():
        return explicit.strip()
    return derived_revision(Path(model).expanduser()) if model.strip() else ""
