"""Where the demo experts live: `<cache>/experts/<recipe-hash>/<name>/`.

The cache root is `$SWITCHBOARD_CACHE_DIR` or `~/.cache/switchboard`. A folder is
complete only if it exists under its final name: builds happen in a temporary
sibling folder that is renamed into place at the end.
"""

from __future__ import annotations

import os
from pathlib import Path

from switchboard.experts.recipes import RECIPES, recipe_hash

# Files whose presence marks a finished expert folder.
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "switchboard_expert.json")


def cache_root() -> Path:
    """The experts cache folder (`$SWITCHBOARD_CACHE_DIR/experts`, default ~/.cache/switchboard/experts)."""
    base = os.environ.get("SWITCHBOARD_CACHE_DIR") or str(Path.home() / ".cache" / "switchboard")
    return Path(base).expanduser() / "experts"


def expert_dir(name: str) -> Path:
    """Folder of the named demo expert under its current recipe (whether built or not)."""
    if name not in RECIPES:
        raise KeyError(f"unknown demo expert {name!r}; known: {', '.join(RECIPES)}")
    return cache_root() / recipe_hash(RECIPES[name]) / name


def is_built(folder: Path) -> bool:
    """Whether a finished expert folder exists at `folder`."""
    return all((folder / f).is_file() for f in REQUIRED_FILES)
