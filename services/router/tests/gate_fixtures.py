"""Test data for the learned gate: a real BPE tokenizer trained here and scored synthetic prompts.

Two kinds of prompt (sea words and war words) and three experts: `sailor` is good at the sea,
`soldier` at war, `scholar` (four times the cost) a little better at both. The qualities are made
up, but they follow a rule a gate can learn from the words, as real ones follow the corpus.
"""

from __future__ import annotations

import random
from pathlib import Path

from switchboard.router.artifact import ArtifactExpert, GateArtifact
from switchboard.router.training import TrainConfig, TrainingExample, train_gate
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

SEA = "ship sail wave tide harbour anchor mast storm sea salt fish whale deck".split()
WAR = "sword shield spear battle siege army king castle horse banner march blood".split()
FILLER = "the and of to in a with his her my thy that this".split()
EXPERTS = [ArtifactExpert("sailor", 1.0, 100), ArtifactExpert("soldier", 1.0, 100), ArtifactExpert("scholar", 4.0, 400)]


def make_tokenizer(path: Path) -> Path:
    """Train a small byte-level BPE on the test vocabulary and save it as tokenizer.json."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False)
    rng = random.Random(0)
    text = [" ".join(rng.choice(SEA + WAR + FILLER) for _ in range(30)) for _ in range(200)]
    tokenizer.train_from_iterator(text, trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path


def prompt(rng: random.Random, kind: str, words: int) -> str:
    pool = SEA if kind == "sea" else WAR
    return " ".join(rng.choice(pool) if rng.random() < 0.5 else rng.choice(FILLER) for _ in range(words))


def examples(count: int, seed: int = 0) -> list[TrainingExample]:
    """Scored prompts: the matching small expert is 1 nat better than the other, scholar 0.1 better still."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        kind = rng.choice(["sea", "war"])
        base = rng.uniform(-6.0, -4.0)  # how hard the prompt is for everyone
        noise = [rng.gauss(0, 0.05) for _ in range(3)]
        sailor = base + (0.0 if kind == "sea" else -1.0) + noise[0]
        soldier = base + (0.0 if kind == "war" else -1.0) + noise[1]
        scholar = base + 0.1 + noise[2]
        out.append(TrainingExample(prompt(rng, kind, rng.randint(5, 60)), (sailor, soldier, scholar), 80, 48))
    return out


def trained_gate(tmp_path: Path, count: int = 400) -> GateArtifact:
    """A gate trained on the synthetic data (a few seconds)."""
    tokenizer = make_tokenizer(tmp_path / "tok" / "tokenizer.json")
    return train_gate(EXPERTS, examples(count), tokenizer, config=TrainConfig(epochs=40), progress=lambda _: None)
