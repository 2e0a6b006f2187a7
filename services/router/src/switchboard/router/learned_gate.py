"""The learned gate: a small torch network that predicts each expert's quality for a prompt.

`GateNet` is an embedding bag over the prompt's token and token-bigram buckets (features.py)
joined with the normalized dense signals, then a two-layer MLP and one output per expert: the
predicted mean log-likelihood per token (nats) of that expert's answer. Predicting quality rather
than a choice keeps the cost knob free at request time: the selector trades predicted quality
against cost with any lambda, with no retraining (the role of RouteLLM's threshold, for more
than two models).

`LearnedGate` wraps a trained net with its feature extractor and implements the `Gate` protocol.
It serves with a numpy copy of the trained weights (`NumpyGateNet`): one row gather and three
small matrix-vector products cost about 0.05 ms, against about 0.13 ms of torch's per-operator
overhead for the same arithmetic (measured on the 2-vCPU Xeon; a test checks both agree).
The GELUs use the tanh form, which numpy computes exactly as torch does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from switchboard.router.features import DENSE_NAMES, FeatureExtractor, Features
from switchboard.router.gate import GateScores
from torch import nn


class GateNet(nn.Module):
    """Embedding bag + MLP -> (quality per expert, last hidden layer)."""

    def __init__(self, num_buckets: int, num_experts: int, embed_dim: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.num_buckets = num_buckets
        self.num_experts = num_experts
        self.embed_dim = embed_dim
        self.hidden_dim = hidden
        self.bag = nn.EmbeddingBag(num_buckets, embed_dim, mode="mean")
        # Small rows: torch's N(0, 1) default makes every prompt's mean a random code the MLP can
        # memorise, which it does before it learns what the tokens say (seen: it overfit in 4 epochs
        # without learning that Milton's prompts favour the Milton expert).
        nn.init.normal_(self.bag.weight, std=0.02)
        self.body = nn.Sequential(
            nn.Linear(embed_dim + len(DENSE_NAMES), hidden),
            nn.GELU(approximate="tanh"),
            nn.Linear(hidden, hidden),
            nn.GELU(approximate="tanh"),
        )
        self.head = nn.Linear(hidden, num_experts)
        # Dense-signal normalization, fitted on the training set and saved with the weights.
        self.register_buffer("dense_mean", torch.zeros(len(DENSE_NAMES)))
        self.register_buffer("dense_std", torch.ones(len(DENSE_NAMES)))

    def forward(
        self, indices: torch.Tensor, offsets: torch.Tensor, dense: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """indices/offsets: the flattened bags of a batch; dense: [batch, len(DENSE_NAMES)]."""
        bag = self.bag(indices, offsets)
        normalized = (dense - self.dense_mean) / self.dense_std
        hidden = self.body(torch.cat([bag, normalized], dim=-1))
        return self.head(hidden), hidden


def batch_tensors(batch: Sequence[Features]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (indices, offsets, dense) tensors of a batch of features."""
    sizes = [len(f.indices) for f in batch]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]) if sizes else np.zeros(0, dtype=np.int64)
    return (
        torch.from_numpy(np.concatenate([f.indices for f in batch]).astype(np.int64)),
        torch.from_numpy(offsets.astype(np.int64)),
        torch.tensor([f.dense for f in batch], dtype=torch.float32),
    )


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))


class NumpyGateNet:
    """The same forward pass as GateNet for one prompt, in numpy (serving only)."""

    def __init__(self, net: GateNet) -> None:
        state = {k: v.detach().to(torch.float32).cpu().numpy().copy() for k, v in net.state_dict().items()}
        self.bag = state["bag.weight"]
        self.dense_mean, self.dense_std = state["dense_mean"], state["dense_std"]
        self.w1, self.b1 = state["body.0.weight"], state["body.0.bias"]
        self.w2, self.b2 = state["body.2.weight"], state["body.2.bias"]
        self.w3, self.b3 = state["head.weight"], state["head.bias"]

    def forward(self, features: Features) -> tuple[np.ndarray, np.ndarray]:
        """(quality per expert, last hidden layer) of one prompt."""
        bag = self.bag[features.indices].mean(axis=0)
        dense = (np.asarray(features.dense, dtype=np.float32) - self.dense_mean) / self.dense_std
        hidden = _gelu_tanh(self.w1 @ np.concatenate([bag, dense]) + self.b1)
        hidden = _gelu_tanh(self.w2 @ hidden + self.b2)
        return self.w3 @ hidden + self.b3, hidden


class LearnedGate:
    """A trained `GateNet` with its features: implements the `Gate` protocol."""

    kind = "learned"

    def __init__(
        self,
        net: GateNet,
        extractor: FeatureExtractor,
        experts: Sequence[str],
        *,
        temperature: float,
        version: str,
    ) -> None:
        if net.num_experts != len(experts):
            raise ValueError(f"the net has {net.num_experts} outputs for {len(experts)} experts")
        self.net = net.eval()
        self.fast = NumpyGateNet(self.net)
        self.extractor = extractor
        self.experts = tuple(experts)
        self.temperature = temperature
        self.version = version

    def score(self, prompt: str) -> GateScores:
        """Predicted mean log-likelihood per token of every expert."""
        features = self.extractor.extract(prompt)
        quality, hidden = self.fast.forward(features)
        return GateScores(
            quality=tuple(quality.tolist()),
            temperature=self.temperature,
            prompt_tokens=features.prompt_tokens,
            exact_tokens=features.exact_tokens,
            features=features,
            hidden=tuple(hidden.tolist()),
        )
