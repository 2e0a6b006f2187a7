"""Demo expert models: small Llama LMs trained here on Shakespeare and Milton.

`expert_dir(name)` gives an expert's cache folder (Hugging Face layout) without
building; `ensure_experts()` builds whatever is missing. Importing this package does
not import torch; building does.
"""

from __future__ import annotations

from pathlib import Path

from switchboard.experts.cache import cache_root, expert_dir, is_built
from switchboard.experts.recipes import DEMO_EXPERTS

__all__ = ["DEMO_EXPERTS", "cache_root", "ensure_experts", "expert_dir", "is_built"]


def ensure_experts(names: list[str] | tuple[str, ...] | None = None) -> dict[str, Path]:
    """Folders of the named experts (all demo experts by default), building the missing ones."""
    from switchboard.experts.build import build_experts

    return build_experts(names)
