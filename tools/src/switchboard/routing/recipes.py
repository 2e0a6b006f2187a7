"""The recipe of the router gate's data: which prompts are cut, from what, and how many.

Frozen and hashed (with the texts and the experts' files) into the cache folder's name, as
the demo experts' recipes are. No torch, so the CLI can read the defaults cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass

from switchboard.experts.recipes import MILTON, SHAKESPEARE

# Bump when sampling or scoring code changes what a recipe produces.
CODE_VERSION = 2

MIXED = "mixed"


@dataclass(frozen=True)
class RouterDataRecipe:
    """Everything that decides which prompts are cut and how they are scored."""

    train_samples: int = 2400
    test_samples: int = 800
    seed: int = 1124
    min_prompt_tokens: int = 8
    max_prompt_tokens: int = 384
    continuation_tokens: int = 48
    # Demo corpus: share of its samples per source ("mixed": a passage of each corpus).
    mix: tuple[tuple[str, float], ...] = ((SHAKESPEARE, 0.4), (MILTON, 0.4), (MIXED, 0.2))
    use_demo_corpus: bool = True
    # Gate split of the demo experts' held-out works (whole works, never a training work):
    # train on the validation works and the Sonnets, test on two plays the gate never sees;
    # `halved_works` go half to each side by tokens (first half train) so Milton has a test text.
    # Milton's Poemata (held out too) are left out: they are Latin, and with three quarters of
    # the Milton samples they taught the gate "Latin means Milton", so it sent English Milton to
    # the Shakespeare expert (test APGR 0.19 at 33% of always-best's cost, against 0.50 at 49%
    # without them; see services/router/README.md).
    train_works: tuple[str, ...] = ("julius_caesar", "tempest", "sonnets")
    test_works: tuple[str, ...] = ("macbeth", "twelfth_night")
    halved_works: tuple[str, ...] = ("paradise_regained",)
    # --text files: share of all samples when the demo corpus is used too (split equally between
    # files), and the fraction of each file (by position) that goes to the train split.
    text_share: float = 0.5
    text_train_fraction: float = 0.7
    code_version: int = CODE_VERSION


RECIPE = RouterDataRecipe()
