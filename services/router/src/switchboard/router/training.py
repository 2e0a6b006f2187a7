"""Fitting the learned gate on scored prompts, and choosing its default operating point.

Training data are prompts with each expert's measured quality (mean log-likelihood per token of
the reference continuation). The net regresses every expert's quality; the loss weighs the
*differences* between experts (what routing needs) ten times more than the common level (how
hard the prompt is for everyone), and early stopping watches the differences only. A fifth of the training prompts is held back for early stopping,
for the softmax temperature (fitted so that p(e) is the probability that e is the best expert),
and for the default cost weight: the lambda that maximises quality subject to a cost budget (by
default half of always-best's cost). Seeds are fixed: the same data give the same gate.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from switchboard.router.artifact import ArtifactExpert, GateArtifact
from switchboard.router.evaluation import ScoredSet, at_cost, choose, default_cost_weights, report
from switchboard.router.features import FeatureConfig, FeatureExtractor, Features, fit_surprisal
from switchboard.router.learned_gate import GateNet, batch_tensors
from tokenizers import Tokenizer


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run (recorded in the artifact)."""

    embed_dim: int = 32
    hidden: int = 64
    epochs: int = 80
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    dropout_tokens: float = 0.1  # share of bag indices dropped per example while training
    validation_fraction: float = 0.2
    patience: int = 20
    max_cost_fraction: float = 0.5  # the default operating point's budget, of always-best's cost
    seed: int = 0


@dataclass(frozen=True)
class TrainingExample:
    """One scored prompt."""

    prompt: str
    quality: tuple[float, ...]  # per expert, in the experts' order
    tokens: int  # prompt + continuation tokens (cost basis)
    weight: int  # continuation tokens


def scored_set(experts: Sequence[ArtifactExpert], examples: Sequence[TrainingExample]) -> ScoredSet:
    """The evaluation view of examples."""
    return ScoredSet(
        experts=tuple(e.name for e in experts),
        relative_cost=tuple(e.relative_cost for e in experts),
        parameters=tuple(e.parameters for e in experts),
        quality=tuple(ex.quality for ex in examples),
        tokens=tuple(ex.tokens for ex in examples),
        weights=tuple(ex.weight for ex in examples),
    )


def _centered(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Error on the differences between experts (what routing decides on)."""
    return F.mse_loss(predicted - predicted.mean(-1, keepdim=True), target - target.mean(-1, keepdim=True))


def _loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # The common level (how hard a prompt is for every expert) is noisy and easy to overfit;
    # it only needs to be roughly right, so it weighs a tenth.
    level = F.mse_loss(predicted.mean(-1), target.mean(-1))
    return _centered(predicted, target) + 0.1 * level


def _drop(features: Features, rate: float, rng: np.random.Generator) -> Features:
    if rate <= 0 or len(features.indices) < 4:
        return features
    keep = rng.random(len(features.indices)) >= rate
    kept = features.indices[keep] if keep.any() else features.indices[:1]
    return Features(kept, features.dense, features.prompt_tokens, features.exact_tokens)


@torch.inference_mode()
def predict(net: GateNet, features: Sequence[Features], batch_size: int = 256) -> list[list[float]]:
    """Predicted quality per expert for many prompts."""
    net.eval()
    out: list[list[float]] = []
    for i in range(0, len(features), batch_size):
        quality, _ = net(*batch_tensors(features[i : i + batch_size]))
        out.extend(quality.tolist())
    return out


def fit_temperature(predicted: Sequence[Sequence[float]], true_quality: Sequence[Sequence[float]]) -> float:
    """The temperature whose softmax(predicted / T) best predicts which expert is truly best."""
    best = [max(range(len(row)), key=row.__getitem__) for row in true_quality]
    logits = torch.tensor(predicted)
    target = torch.tensor(best)
    candidates = [10 ** (x / 20) for x in range(-60, 11)]  # 0.001 .. ~3.2
    losses = [float(F.cross_entropy(logits / t, target)) for t in candidates]
    return candidates[min(range(len(candidates)), key=losses.__getitem__)]


def train_gate(
    experts: Sequence[ArtifactExpert],
    examples: Sequence[TrainingExample],
    tokenizer_path: Path,
    *,
    config: TrainConfig | None = None,
    features: FeatureConfig | None = None,
    progress: Callable[[str], None] = print,
) -> GateArtifact:
    """Fit a gate on `examples` and return it as an artifact (not yet written)."""
    config = config or TrainConfig()
    features = features or FeatureConfig()
    if len(examples) < 20:
        raise ValueError(f"need at least 20 scored prompts to train a gate, got {len(examples)}")
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    drop_rng = np.random.default_rng(config.seed)
    order = list(range(len(examples)))
    rng.shuffle(order)
    n_val = max(10, int(len(order) * config.validation_fraction))
    val_idx, train_idx = order[:n_val], order[n_val:]

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    plain = FeatureExtractor(tokenizer, features)
    surprisal = fit_surprisal([plain.token_ids(examples[i].prompt[: features.max_chars]) for i in train_idx], tokenizer.get_vocab_size())
    extractor = FeatureExtractor(tokenizer, features, surprisal)
    all_features = [extractor.extract(ex.prompt) for ex in examples]
    targets = torch.tensor([ex.quality for ex in examples], dtype=torch.float32)

    net = GateNet(features.num_buckets, len(experts), config.embed_dim, config.hidden)
    dense = torch.tensor([all_features[i].dense for i in train_idx])
    net.dense_mean.copy_(dense.mean(0))
    net.dense_std.copy_(dense.std(0).clamp_min(1e-3))
    with torch.no_grad():  # start from the mean quality of each expert
        net.head.bias.copy_(targets[train_idx].mean(0))
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    val_features = [all_features[i] for i in val_idx]
    val_targets = targets[val_idx]
    best_state, best_loss, stale = None, math.inf, 0
    for epoch in range(config.epochs):
        net.train()
        rng.shuffle(train_idx)
        for start in range(0, len(train_idx), config.batch_size):
            batch = train_idx[start : start + config.batch_size]
            inputs = batch_tensors([_drop(all_features[i], config.dropout_tokens, drop_rng) for i in batch])
            predicted, _ = net(*inputs)
            loss = _loss(predicted, targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.inference_mode():
            net.eval()
            val_loss = float(_centered(net(*batch_tensors(val_features))[0], val_targets))
        if val_loss < best_loss - 1e-5:
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            best_loss, stale = val_loss, 0
        else:
            stale += 1
        if epoch % 10 == 0 or stale == 0:
            progress(f"epoch {epoch + 1}: validation loss {val_loss:.4f} (best {best_loss:.4f})")
        if stale >= config.patience:
            break
    assert best_state is not None
    net.load_state_dict(best_state)
    net.eval()

    val_predicted = predict(net, val_features)
    val_set = scored_set(experts, [examples[i] for i in val_idx])
    temperature = fit_temperature(val_predicted, val_set.quality)
    cost_weight, point = at_cost(val_set, val_predicted, config.max_cost_fraction, default_cost_weights())
    progress(
        f"validation: temperature {temperature:.3g}, default lambda {cost_weight:g} -> APGR {point.apgr:.3f} "
        f"at {point.cost_fraction:.1%} of always-best's cost"
    )
    metrics: dict[str, Any] = {
        "validation": {
            "prompts": len(val_idx),
            "loss": best_loss,
            "apgr": point.apgr,
            "cost_fraction": point.cost_fraction,
            "optimal_rate": report(val_set, "gate", choose(val_predicted, val_set.relative_cost, cost_weight), cost_weight).optimal_rate,
        }
    }
    return GateArtifact(
        net=net,
        features=features,
        surprisal=surprisal,
        experts=list(experts),
        temperature=temperature,
        default_cost_weight=cost_weight,
        tokenizer_path=tokenizer_path,
        metrics=metrics,
        training={"config": asdict(config), "prompts": len(examples), "train_prompts": len(train_idx)},
    )
