"""Build the router gate's data: cut prompts from held-out text and score them with every expert.

Each sample is a prompt (a random passage of 8-384 tokens, log-uniform) and the 48 tokens
that follow it in the same text. Every expert's real model, loaded with the generator's own
loader in float32, is run teacher-forced over prompt + continuation; the sample's quality
for that expert is the mean log-probability (nats) of the 48 continuation tokens. That is
what the gate learns to predict from the prompt alone.

The text is the demo corpus's held-out works only (the experts never trained on them),
split by whole work (half of Paradise Regained to each side) into gate-train and gate-test,
plus any `--text` files (first 70% to train, last 30% to test). Results are cached under
`<cache>/router-data/<hash>/`, the hash covering the recipe, the texts and the experts'
weights, so new experts or settings build new data and an unchanged build is a no-op.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from switchboard.experts.build import build_lock, torch_threads
from switchboard.experts.cache import cache_root
from switchboard.experts.corpus import Work, fetch_archive, read_works
from switchboard.experts.recipes import CORPUS, MILTON, SHAKESPEARE
from switchboard.generator.loader import load_model, weight_files
from switchboard.generator.models.registry import resolve_family
from switchboard.generator.tokenizer import Tokenizer
from switchboard.routing.dataset import META_FILE, ExpertEntry, RouterDataset, RouterRecord
from switchboard.routing.recipes import MIXED, RECIPE, RouterDataRecipe
from switchboard.routing.report import summary_lines

SCORE_THREADS = 2
_MAX_DRAWS = 200  # redraws of one sample (bad UTF-8 cut, length out of range) before giving up


class ExpertLike(Protocol):
    """What `build_router_data` needs of an expert (an `ExpertSpec` with `model` a folder fits)."""

    @property
    def name(self) -> str: ...

    @property
    def model(self) -> str | Path: ...

    @property
    def relative_cost(self) -> float: ...


@dataclass(frozen=True)
class _Segment:
    """A run of tokens of one work (or part of a text file) that samples are cut from."""

    kind: str  # shakespeare | milton | text:<name>
    work: str  # work id, or file name
    split: str
    ids: list[int]

    @property
    def source(self) -> str:
        return self.kind if self.kind.startswith("text:") else f"{self.kind}:{self.work}"


@dataclass(frozen=True)
class _Sample:
    source: str
    prompt: str
    prompt_ids: list[int]
    continuation_ids: list[int]


def router_data_root() -> Path:
    """`<cache>/router-data` (next to the experts' cache folder)."""
    return cache_root().parent / "router-data"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _digest(payload: object) -> str:
    text = json.dumps(payload, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class _ExpertModel:
    """A resolved expert: its folder, facts for meta.json and a fingerprint of its files."""

    name: str
    folder: Path
    relative_cost: float
    parameters: int
    tokenizer_sha256: str
    max_positions: int
    fingerprint: dict[str, object]

    def entry(self) -> ExpertEntry:
        return ExpertEntry(
            self.name, str(self.folder), self.relative_cost, self.parameters, self.tokenizer_sha256
        )


def _inspect_expert(expert: ExpertLike) -> _ExpertModel:
    """Check an expert folder and read what the dataset records about it (no weights loaded)."""
    folder = Path(expert.model).expanduser()
    config_path, tokenizer_path = folder / "config.json", folder / "tokenizer.json"
    if not folder.is_dir() or not config_path.is_file() or not tokenizer_path.is_file():
        raise ValueError(
            f"expert {expert.name!r}: {folder} is not a model folder (needs config.json and tokenizer.json)"
        )
    config_json = json.loads(config_path.read_text())
    family = resolve_family(config_json)
    config = family.parse_config(config_json)
    files = weight_files(folder)
    parameters = _count_parameters(files, family.tied_key(config))
    metrics_path = folder / "switchboard_expert.json"
    expert_recipe = (
        json.loads(metrics_path.read_text()).get("recipe_hash") if metrics_path.is_file() else None
    )
    fingerprint: dict[str, object] = {
        "config": sha256_file(config_path),
        "tokenizer": sha256_file(tokenizer_path),
        "weights": {f.name: sha256_file(f) for f in files},
        "expert_recipe_hash": expert_recipe,
    }
    return _ExpertModel(
        name=expert.name,
        folder=folder,
        relative_cost=float(expert.relative_cost),
        parameters=parameters,
        tokenizer_sha256=str(fingerprint["tokenizer"]),
        max_positions=int(family.max_model_len(config)),
        fingerprint=fingerprint,
    )


def _count_parameters(files: list[Path], tied_key: str | None) -> int:
    """Parameters stored in the safetensors files (a tied output head counted once, with the embedding)."""
    from safetensors import safe_open

    total = 0
    for file in files:
        if file.suffix != ".safetensors":
            raise ValueError(f"{file}: only safetensors checkpoints are supported by build-data")
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                if key == tied_key:
                    continue  # the demo export writes the tied head as its own copy
                total += math.prod(handle.get_slice(key).get_shape())
    return total


def _encode_text(tokenizer: Tokenizer, text: str) -> list[int]:
    """Tokens of a long text, encoded line by line (the tokenizer is very slow on 100 kB strings)."""
    ids: list[int] = []
    for encoding in tokenizer.inner.encode_batch(text.splitlines(keepends=True), add_special_tokens=False):
        ids.extend(encoding.ids)
    return ids


def _demo_segments(tokenizer: Tokenizer, recipe: RouterDataRecipe) -> list[_Segment]:
    """Gate-train and gate-test segments of the demo corpus's held-out works."""
    held_out = set(CORPUS.validation_works) | set(CORPUS.test_works)
    named = [*recipe.train_works, *recipe.test_works, *recipe.halved_works]
    trained_on = sorted(set(named) - held_out)
    if trained_on:
        raise ValueError(f"works {trained_on} are in the experts' training split; use held-out works only")
    if len(set(named)) != len(named):
        raise ValueError(f"a work is named twice in the gate split: {named}")
    archive = fetch_archive(cache_root() / "downloads", CORPUS.package)
    works: dict[str, Work] = {w.work_id: w for w in read_works(archive)}
    missing = sorted(set(named) - set(works))
    if missing:
        raise ValueError(f"works {missing} are not in the corpus (known: {sorted(works)})")
    segments = []
    for split, ids in (("train", recipe.train_works), ("test", recipe.test_works)):
        for work_id in ids:
            work = works[work_id]
            segments.append(_Segment(work.corpus, work_id, split, _encode_text(tokenizer, work.text)))
    for work_id in recipe.halved_works:
        work = works[work_id]
        tokens = _encode_text(tokenizer, work.text)
        half = len(tokens) // 2
        segments.append(_Segment(work.corpus, work_id, "train", tokens[:half]))
        segments.append(_Segment(work.corpus, work_id, "test", tokens[half:]))
    return segments


@dataclass(frozen=True)
class _TextFile:
    name: str
    path: Path
    text: str
    sha256: str


def read_text_file(path: Path | str) -> _TextFile:
    """A `--text` corpus: UTF-8 text; ValueError if missing, unreadable or empty."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"text file {path} does not exist")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"text file {path} is not UTF-8: {exc}") from None
    if not text.strip():
        raise ValueError(f"text file {path} is empty")
    return _TextFile(path.name, path, text, hashlib.sha256(data).hexdigest())


def _text_segments(
    tokenizer: Tokenizer, texts: Sequence[_TextFile], recipe: RouterDataRecipe
) -> list[_Segment]:
    """Train (first part) and test (last part) segments of each text file, split by token position."""
    need = 2 * (recipe.min_prompt_tokens + recipe.continuation_tokens)
    segments = []
    for text in texts:
        tokens = _encode_text(tokenizer, text.text)
        cut = round(len(tokens) * recipe.text_train_fraction)
        shortest = min(cut, len(tokens) - cut)
        if shortest < need:
            raise ValueError(
                f"text file {text.path} is too short: {len(tokens)} tokens; each of its train and test parts "
                f"needs at least {need} (a prompt of {recipe.min_prompt_tokens} and a continuation of "
                f"{recipe.continuation_tokens}, twice), so at least about "
                f"{math.ceil(need / min(recipe.text_train_fraction, 1 - recipe.text_train_fraction))} tokens"
            )
        kind = f"text:{text.name}"
        segments.append(_Segment(kind, text.name, "train", tokens[:cut]))
        segments.append(_Segment(kind, text.name, "test", tokens[cut:]))
    return segments


def _allocate(total: int, weights: Sequence[tuple[str, float]]) -> dict[str, int]:
    """Split `total` samples by weight (largest remainders), deterministically."""
    weight_sum = sum(w for _, w in weights)
    exact = [(name, total * w / weight_sum) for name, w in weights]
    counts = {name: math.floor(x) for name, x in exact}
    left = total - sum(counts.values())
    for name, _ in sorted(exact, key=lambda item: (-(item[1] - math.floor(item[1])), item[0]))[:left]:
        counts[name] += 1
    return counts


class _Sampler:
    """Cuts prompts and continuations from one split's segments with a seeded RNG."""

    def __init__(
        self, tokenizer: Tokenizer, recipe: RouterDataRecipe, segments: list[_Segment], rng: random.Random
    ) -> None:
        self.tokenizer = tokenizer
        self.recipe = recipe
        self.rng = rng
        self.by_kind: dict[str, list[_Segment]] = {}
        for segment in segments:
            self.by_kind.setdefault(segment.kind, []).append(segment)
        self.separator = "\n\n"
        self.separator_tokens = len(tokenizer.encode(self.separator))

    def _length(self) -> int:
        """A prompt length, log-uniform over [min_prompt_tokens, max_prompt_tokens]."""
        low, high = self.recipe.min_prompt_tokens, self.recipe.max_prompt_tokens
        return min(high, math.floor(math.exp(self.rng.uniform(math.log(low), math.log(high + 1)))))

    def _cut(self, kind: str, length: int, after: int) -> tuple[_Segment, int, int]:
        """(segment, start, length): `length + after` tokens of a `kind` segment from start (length capped to fit)."""
        segments = self.by_kind[kind]
        longest = max(len(s.ids) for s in segments)
        length = min(length, longest - after)
        weights = [max(0, len(s.ids) - length - after + 1) for s in segments]
        segment = self.rng.choices(segments, weights=weights)[0]
        return segment, self.rng.randrange(len(segment.ids) - length - after + 1), length

    def _decode(self, ids: list[int]) -> str | None:
        """Text of `ids`, or None if it is blank or splits a UTF-8 character."""
        text = self.tokenizer.decode(ids)
        return None if "\ufffd" in text or not text.strip() else text

    def _finish(self, source: str, prompt: str, continuation: list[int]) -> _Sample | None:
        """The sample, if the prompt's own tokens (as served: encode(prompt)) are in range."""
        ids = self.tokenizer.encode(prompt)
        if not self.recipe.min_prompt_tokens <= len(ids) <= self.recipe.max_prompt_tokens:
            return None
        return _Sample(source, prompt, ids, continuation)

    def plain(self, kind: str) -> _Sample | None:
        """A prompt from one segment of `kind` and the continuation that follows it there."""
        c = self.recipe.continuation_tokens
        segment, start, length = self._cut(kind, self._length(), c)
        prompt = self._decode(segment.ids[start : start + length])
        if prompt is None:
            return None
        return self._finish(segment.source, prompt, segment.ids[start + length : start + length + c])

    def mixed(self) -> _Sample | None:
        """A Shakespeare passage, "\\n\\n", a Milton passage (or the reverse), and what follows the second."""
        c = self.recipe.continuation_tokens
        first_kind, second_kind = (SHAKESPEARE, MILTON) if self.rng.random() < 0.5 else (MILTON, SHAKESPEARE)
        total = self._length()
        first_length = max(1, total // 2)
        second_length = max(1, total - first_length - self.separator_tokens)
        first, start_a, first_length = self._cut(first_kind, first_length, 0)
        second, start_b, second_length = self._cut(second_kind, second_length, c)
        text_a = self._decode(first.ids[start_a : start_a + first_length])
        text_b = self._decode(second.ids[start_b : start_b + second_length])
        if text_a is None or text_b is None:
            return None
        continuation = second.ids[start_b + second_length : start_b + second_length + c]
        return self._finish(
            f"{MIXED}:{first.work}+{second.work}", text_a + self.separator + text_b, continuation
        )

    def draw(self, kind: str) -> _Sample:
        """One sample of `kind` (a corpus, "mixed" or text:<name>), redrawing unusable cuts."""
        for _ in range(_MAX_DRAWS):
            sample = self.mixed() if kind == MIXED else self.plain(kind)
            if sample is not None:
                return sample
        raise ValueError(f"could not cut a usable prompt from {kind} in {_MAX_DRAWS} tries")


def _plan(recipe: RouterDataRecipe, texts: Sequence[_TextFile], total: int) -> dict[str, int]:
    """Samples per kind for one split."""
    text_kinds = [f"text:{t.name}" for t in texts]
    if recipe.use_demo_corpus and text_kinds:
        text_total = round(total * recipe.text_share)
    elif text_kinds:
        text_total = total
    else:
        text_total = 0
    counts = _allocate(text_total, [(k, 1.0) for k in text_kinds]) if text_kinds else {}
    if recipe.use_demo_corpus:
        counts.update(_allocate(total - text_total, recipe.mix))
    return counts


def cut_samples(
    tokenizer: Tokenizer, recipe: RouterDataRecipe, segments: list[_Segment], texts: Sequence[_TextFile]
) -> dict[str, list[_Sample]]:
    """The samples of each split, shuffled (the same for the same recipe, texts and tokenizer)."""
    out = {}
    for split, total in (("train", recipe.train_samples), ("test", recipe.test_samples)):
        rng = random.Random(f"{recipe.seed}:{split}")
        sampler = _Sampler(tokenizer, recipe, [s for s in segments if s.split == split], rng)
        samples = []
        for kind, count in _plan(recipe, texts, total).items():
            samples.extend(sampler.draw(kind) for _ in range(count))
        rng.shuffle(samples)
        out[split] = samples
    return out


@torch.inference_mode()
def score_continuations(
    model: torch.nn.Module, sequences: Sequence[Sequence[int]], continuation: int, batch_size: int = 16
) -> list[float]:
    """Mean log p(token | prefix), nats, over the last `continuation` tokens of each sequence.

    Sequences are sorted by length and run in batches, right-padded to the longest of the
    batch: the model is causal, so padding after a sequence cannot change its logits.
    """
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    result = [0.0] * len(sequences)
    steps = torch.arange(continuation)
    for begin in range(0, len(order), batch_size):
        chosen = order[begin : begin + batch_size]
        lengths = torch.tensor([len(sequences[i]) for i in chosen])
        batch = torch.zeros(len(chosen), int(lengths.max()), dtype=torch.long)
        for row, index in enumerate(chosen):
            batch[row, : lengths[row]] = torch.tensor(sequences[index])
        logits = model(batch)
        # Position p predicts token p + 1; the continuation is the last `continuation` tokens.
        positions = (lengths - continuation - 1)[:, None] + steps[None, :]
        picked = logits.gather(1, positions[:, :, None].expand(-1, -1, logits.shape[-1]))
        log_probs = F.log_softmax(picked.float(), dim=-1)
        targets = batch.gather(1, positions + 1)
        means = log_probs.gather(-1, targets[:, :, None])[:, :, 0].mean(dim=1)
        for row, index in enumerate(chosen):
            result[index] = float(means[row])
    return result


def data_key(
    recipe: RouterDataRecipe, experts: Sequence[_ExpertModel], texts: Sequence[_TextFile]
) -> tuple[str, dict[str, object]]:
    """The cache key and the `recipe` object meta.json records (all settings, texts and corpus)."""
    settings: dict[str, object] = {
        **asdict(recipe),
        "texts": [{"name": t.name, "sha256": t.sha256} for t in texts],
        "corpus": asdict(CORPUS) if recipe.use_demo_corpus else None,
    }
    key = _digest(
        {
            "recipe": settings,
            "experts": [
                {"name": e.name, "relative_cost": e.relative_cost, "files": e.fingerprint} for e in experts
            ],
        }
    )
    return key, settings


@dataclass(frozen=True)
class _Resolved:
    """The checked inputs of a build and its cache key."""

    models: list[_ExpertModel]
    text_files: list[_TextFile]
    recipe: RouterDataRecipe
    key: str
    settings: dict[str, object]


def _resolve(
    experts: Sequence[ExpertLike], recipe: RouterDataRecipe, texts: Sequence[Path | str]
) -> _Resolved:
    """Check the experts, recipe and texts (no weights loaded) and compute the cache key."""
    if not experts:
        raise ValueError("no experts to score with")
    if not recipe.use_demo_corpus and not texts:
        raise ValueError("nothing to cut prompts from: give --text files or use the demo corpus")
    if recipe.train_samples < 1 or recipe.test_samples < 1:
        raise ValueError("train and test sample counts must be at least 1")
    names = [e.name for e in experts]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate expert names {names}")
    models = [_inspect_expert(e) for e in experts]
    tokenizers = {m.tokenizer_sha256 for m in models}
    if len(tokenizers) > 1:
        listing = ", ".join(f"{m.name}: {m.tokenizer_sha256[:12]}" for m in models)
        raise ValueError(
            f"the experts use different tokenizers ({listing}); build-data scores one shared tokenization "
            "and supports only experts with the same tokenizer.json for now"
        )
    limit = min(m.max_positions for m in models)
    if recipe.max_prompt_tokens + recipe.continuation_tokens > limit:
        # Recorded in the recipe (and so in the key): prompts are capped to fit every expert.
        recipe = replace(recipe, max_prompt_tokens=limit - recipe.continuation_tokens)
    if recipe.max_prompt_tokens < recipe.min_prompt_tokens:
        raise ValueError(f"the experts serve only {limit} positions, too few for the recipe")
    text_files = [read_text_file(t) for t in texts]
    file_names = [t.name for t in text_files]
    if len(set(file_names)) != len(file_names):
        raise ValueError(f"text files must have distinct file names (they name the sources): {file_names}")
    key, settings = data_key(recipe, models, text_files)
    return _Resolved(models, text_files, recipe, key, settings)


def data_dir(
    experts: Sequence[ExpertLike], *, recipe: RouterDataRecipe = RECIPE, texts: Sequence[Path | str] = ()
) -> Path:
    """The cache folder `build_router_data` uses for these inputs (built or not)."""
    return router_data_root() / _resolve(experts, recipe, texts).key


def build_router_data(
    experts: Sequence[ExpertLike],
    out: Path | None = None,
    *,
    recipe: RouterDataRecipe = RECIPE,
    force: bool = False,
    texts: Sequence[Path | str] = (),
    progress: Callable[[str], None] = print,
) -> Path:
    """Cut and score the samples with every expert; the dataset folder (a no-op when cached).

    `experts` are in experts-config order, each with `model` a model folder. The data goes to
    `out`, or to `<cache>/router-data/<hash>/` where the hash covers the recipe, the texts and
    the experts' files. Raises ValueError for unusable experts, recipes or texts.
    """
    started = time.perf_counter()
    resolved = _resolve(experts, recipe, texts)
    if resolved.recipe.max_prompt_tokens != recipe.max_prompt_tokens:
        recipe = resolved.recipe
        limit = recipe.max_prompt_tokens + recipe.continuation_tokens
        progress(f"router data: prompts capped at {recipe.max_prompt_tokens} tokens (experts serve {limit})")
    models, text_files, recipe, key = resolved.models, resolved.text_files, resolved.recipe, resolved.key
    names = [m.name for m in models]
    dest = Path(out) if out is not None else router_data_root() / key
    if not force and _is_cached(dest, key):
        return _report_cached(dest, progress)
    with build_lock(router_data_root()):
        if not force and _is_cached(dest, key):
            return _report_cached(dest, progress)
        tokenizer = Tokenizer.from_dir(models[0].folder)
        # Text files first: a file that is too short fails before the corpus is read.
        segments = _text_segments(tokenizer, text_files, recipe)
        if recipe.use_demo_corpus:
            segments += _demo_segments(tokenizer, recipe)
        samples = cut_samples(tokenizer, recipe, segments, text_files)
        flat = [(split, s) for split in ("train", "test") for s in samples[split]]
        progress(
            f"router data: {len(samples['train'])} train + {len(samples['test'])} test prompts from "
            f"{len(segments)} segments in {time.perf_counter() - started:.1f}s; scoring with {', '.join(names)}"
        )
        sequences = [s.prompt_ids + s.continuation_ids for _, s in flat]
        quality: dict[str, list[float]] = {}
        with torch_threads(SCORE_THREADS):
            for model in models:
                begin = time.perf_counter()
                loaded = load_model(model.folder, device="cpu", dtype="float32")
                quality[model.name] = score_continuations(loaded.model, sequences, recipe.continuation_tokens)
                seconds = time.perf_counter() - begin
                del loaded
                progress(
                    f"router data: [{model.name}] {len(sequences)} samples in {seconds:.1f}s "
                    f"({len(sequences) / seconds:.1f} samples/s)"
                )
        records = []
        counters = {"train": 0, "test": 0}
        for index, (split, sample) in enumerate(flat):
            total_tokens = len(sample.prompt_ids) + len(sample.continuation_ids)
            records.append(
                RouterRecord(
                    id=f"{split}-{counters[split]:05d}",
                    split=split,
                    source=sample.source,
                    prompt=sample.prompt,
                    prompt_tokens=len(sample.prompt_ids),
                    continuation_tokens=len(sample.continuation_ids),
                    quality={m.name: quality[m.name][index] for m in models},
                    cost={m.name: m.relative_cost * total_tokens for m in models},
                )
            )
            counters[split] += 1
        dataset = RouterDataset(
            experts=[m.entry() for m in models],
            continuation_tokens=recipe.continuation_tokens,
            recipe=resolved.settings,
            recipe_hash=key,
            records=records,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            seconds=round(time.perf_counter() - started, 2),
        )
        dataset.write(dest)
    for line in summary_lines(dataset):
        progress(line)
    progress(f"router data: built in {dataset.seconds:.0f}s -> {dest}")
    return dest


def _report_cached(dest: Path, progress: Callable[[str], None]) -> Path:
    """Say that `dest` is already built and print its summary (reading it checks it is intact)."""
    progress(f"router data: cached, nothing to do ({dest})")
    for line in summary_lines(RouterDataset.load(dest)):
        progress(line)
    return dest


def _is_cached(dest: Path, key: str) -> bool:
    """Whether `dest` holds a finished dataset of this recipe hash."""
    meta = dest / META_FILE
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text()).get("recipe_hash") == key
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False
