"""Held-out perplexity of a causal LM and of the unigram baseline on the same tokens.

Scoring takes evenly spaced, non-overlapping windows of `context_length` tokens from
the held-out stream (so a capped budget still covers every held-out work), predicts
every token of a window but its first, and averages the negative log-likelihood in
float32. The unigram baseline (add-one smoothed token frequencies of the training
stream) is scored on exactly the same predicted tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


def eval_windows(tokens: torch.Tensor, context_length: int, max_tokens: int) -> torch.Tensor:
    """[n, context_length] evenly spaced windows of a 1-D stream, at most `max_tokens` tokens in all."""
    total = tokens.numel()
    if total < context_length:
        return tokens[None, :]
    available = total // context_length
    count = max(1, min(available, max_tokens // context_length))
    # Evenly spaced window starts across the whole stream, none overlapping.
    stride = (total - context_length) // max(1, count - 1) if count > 1 else 0
    starts = [i * stride for i in range(count)]
    return torch.stack([tokens[s : s + context_length] for s in starts])


@torch.no_grad()
def mean_nll(
    logits_fn: Callable[[torch.Tensor], torch.Tensor], windows: torch.Tensor, batch_size: int = 8
) -> tuple[float, int]:
    """Mean next-token NLL (nats) over all windows and the number of predicted tokens."""
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        batch = windows[i : i + batch_size]
        logits = logits_fn(batch[:, :-1]).float()
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += batch[:, 1:].numel()
    return total / count, count


def unigram_nll(train_tokens: torch.Tensor, windows: torch.Tensor, vocab_size: int) -> float:
    """Mean NLL of add-one smoothed unigram frequencies on the windows' predicted tokens."""
    counts = torch.bincount(train_tokens, minlength=vocab_size).double() + 1.0
    log_probs = torch.log(counts / counts.sum())
    return float(-log_probs[windows[:, 1:].reshape(-1)].mean())


def perplexity(nll: float) -> float:
    """exp of a mean NLL in nats."""
    return math.exp(nll)
