"""Per-request sampling parameters and the batched sampler.

`SamplingParams` is the validated, immutable form of the proto's
`switchboard.v1.SamplingParams`. `Sampler.sample` draws the next token of every
sequence in an engine step in one call. Its logit processing follows Hugging
Face's processors exactly (repetition penalty, then temperature, top-k, top-p,
the order `generate` applies them), so results can be checked against them.
Each row draws its random numbers from its own `torch.Generator`, so a seeded
request yields the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

#: Limits of the contract (protos/switchboard/v1/common.proto).
MAX_STOP_STRINGS = 8
MAX_STOP_LENGTH = 64
TEMPERATURE_RANGE = (0.0, 2.0)
REPETITION_PENALTY_RANGE = (1.0, 2.0)
MAX_SEED = 2**64 - 1


def _fail(field: str, problem: str, value: Any) -> ValueError:
    return ValueError(f"sampling.{field}: {problem}, got {value!r}")


@dataclass(frozen=True)
class SamplingParams:
    """How to draw the tokens of one request; validated on construction (ValueError names the field)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise _fail("max_tokens", "must be at least 1", self.max_tokens)
        low, high = TEMPERATURE_RANGE
        if not (low <= self.temperature <= high):  # also rejects NaN
            raise _fail("temperature", f"must be in [{low:g}, {high:g}]", self.temperature)
        if not (0.0 < self.top_p <= 1.0):
            raise _fail("top_p", "must be in (0, 1]", self.top_p)
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise _fail("top_k", "must be 0 (disabled) or positive", self.top_k)
        low, high = REPETITION_PENALTY_RANGE
        if not (low <= self.repetition_penalty <= high):
            raise _fail("repetition_penalty", f"must be in [{low:g}, {high:g}]", self.repetition_penalty)
        if len(self.stop) > MAX_STOP_STRINGS:
            raise _fail("stop", f"at most {MAX_STOP_STRINGS} stop strings", len(self.stop))
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise _fail("stop", "stop strings must be non-empty", s)
            if len(s) > MAX_STOP_LENGTH:
                raise _fail("stop", f"each stop string must be at most {MAX_STOP_LENGTH} characters", s)
        if self.seed is not None and not (0 <= self.seed <= MAX_SEED):
            raise _fail("seed", "must be in [0, 2**64)", self.seed)
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise _fail("min_tokens", "must not be negative", self.min_tokens)
        if self.min_tokens > self.max_tokens:
            raise _fail("min_tokens", f"must be <= max_tokens ({self.max_tokens})", self.min_tokens)

    @property
    def greedy(self) -> bool:
        """True when the request decodes greedily (temperature 0)."""
        return self.temperature == 0.0

    @classmethod
    def from_proto(cls, msg: Any, default_max_tokens: int) -> SamplingParams:
        """Validated params from a `switchboard.v1.SamplingParams` message (unset fields take defaults).

        max_tokens 0 means `default_max_tokens`. Raises ValueError starting with the field name.
        """
        if msg.max_tokens < 0:
            raise _fail("max_tokens", "must be at least 1 (0 means the default)", msg.max_tokens)
        return cls(
            max_tokens=msg.max_tokens or default_max_tokens,
            temperature=msg.temperature if msg.HasField("temperature") else 1.0,
            top_p=msg.top_p if msg.HasField("top_p") else 1.0,
            top_k=msg.top_k,
            repetition_penalty=msg.repetition_penalty if msg.HasField("repetition_penalty") else 1.0,
            stop=tuple(msg.stop),
            seed=msg.seed if msg.HasField("seed") else None,
            min_tokens=msg.min_tokens,
            ignore_eos=msg.ignore_eos,
        )


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for one request: seeded when `seed` is given, from fresh entropy otherwise."""
    import torch  # here, not at the top: SamplingParams is imported where torch is not (remote mode)

    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else random.SystemRandom().getrandbits(63))
    return generator


class Sampler:
    """Draws the next token for every row of a step's logits, each row with its own params."""

    def __init__(self, eos_token_ids: Iterable[int] = ()) -> None:
        self.eos_token_ids = sorted(set(eos_token_ids))

    def process_logits(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        previous_tokens: Sequence[Sequence[int]],
        num_generated: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """float32 logits [B, V] after every processor; -inf marks tokens that cannot be drawn.

        Greedy rows get the repetition penalty and EOS mask only (temperature and
        truncation do not change an argmax).
        """
        import torch

        scores = logits.float().clone()
        batch, vocab = scores.shape
        device = scores.device
        # Repetition penalty (CTRL / HF): divide positive, multiply negative scores of seen tokens.
        for row, (p, seen) in enumerate(zip(params, previous_tokens, strict=True)):
            if p.repetition_penalty != 1.0 and len(seen):
                index = torch.as_tensor(list(set(seen)), dtype=torch.long, device=device)
                picked = scores[row, index]
                scores[row, index] = torch.where(
                    picked < 0, picked * p.repetition_penalty, picked / p.repetition_penalty
                )
        # EOS may not end the request before min_tokens, nor at all under ignore_eos.
        if self.eos_token_ids:
            counts = num_generated if num_generated is not None else [0] * batch
            rows = [r for r, p in enumerate(params) if p.ignore_eos or counts[r] < p.min_tokens]
            if rows:
                eos = torch.as_tensor(self.eos_token_ids, device=device)
                eos = eos[eos < vocab]
                scores[torch.as_tensor(rows, device=device)[:, None], eos[None, :]] = -math.inf
        sampled = [r for r, p in enumerate(params) if not p.greedy]
        if not sampled:
            return scores
        rows = torch.as_tensor(sampled, device=device)
        sub = scores[rows] / torch.tensor([params[r].temperature for r in sampled], device=device)[:, None]
        top_k = [min(params[r].top_k, vocab) for r in sampled]
        if any(top_k):
            # HF TopK: drop scores strictly below the k-th largest (ties with it stay).
            largest = sub.topk(max(top_k), dim=-1).values
            k = torch.tensor(top_k, device=device)
            kth = largest.gather(1, (k.clamp(min=1) - 1)[:, None])
            kth = torch.where(k[:, None] > 0, kth, torch.full_like(kth, -math.inf))
            sub = sub.masked_fill(sub < kth, -math.inf)
        top_p = [params[r].top_p for r in sampled]
        if any(p < 1.0 for p in top_p):
            # HF TopP: sort ascending, drop the low tail whose cumulative mass is <= 1 - top_p,
            # always keeping the most likely token.
            sorted_scores, order = sub.sort(dim=-1)
            cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
            threshold = torch.tensor([1.0 - p if p < 1.0 else -1.0 for p in top_p], device=device)
            remove_sorted = cumulative <= threshold[:, None]
            remove_sorted[:, -1] = False
            remove = remove_sorted.scatter(1, order, remove_sorted)
            sub = sub.masked_fill(remove, -math.inf)
        scores[rows] = sub
        return scores

    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        previous_tokens: Sequence[Sequence[int]],
        num_generated: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Next token ids [B] (long, on logits' device) for logits [B, V].

        `previous_tokens[i]`: prompt + generated ids of row i (for the repetition
        penalty); `num_generated[i]`: tokens generated so far (for min_tokens);
        `generators[i]`: row i's generator (unused, may be None, for greedy rows).
        """
        import torch

        if logits.dim() != 2 or logits.shape[0] != len(params):
            raise ValueError(
                f"logits must be [batch, vocab] with batch={len(params)}, got {tuple(logits.shape)}"
            )
        scores = self.process_logits(logits, params, previous_tokens, num_generated)
        tokens = scores.argmax(dim=-1)
        sampled = [r for r, p in enumerate(params) if not p.greedy]
        if sampled:
            probs = scores[sampled].softmax(dim=-1)
            # Exponential race: argmax(p / E), E ~ Exp(1), is an exact draw from p, and each row's
            # noise comes only from that row's generator (independent of the batch around it).
            noise = torch.empty_like(probs)
            for i, r in enumerate(sampled):
                generator = generators[r]
                if generator is None:
                    raise ValueError(
                        f"row {r} samples (temperature {params[r].temperature}) but has no generator"
                    )
                noise[i].exponential_(generator=generator)
            tokens[sampled] = (probs / noise).argmax(dim=-1)
        return tokens
