"""Linear layers whose weights are prepacked into oneDNN's blocked layout, for CPU serving.

A plain `F.linear` on CPU re-reads its weight in the layout it was stored in; oneDNN can
instead keep the weight in the blocked layout its matmul kernels stream best, packed once
at start. Decode is a chain of matrix-vector products bound by how fast the weights
stream from memory, and measured here (2-core AMD EPYC, torch 2.13, weights far larger
than the cache) the packed layout streams bf16 weights at 43-45 GB/s against 27-30 GB/s
for `F.linear`, and float32 at 40 against 21 GB/s; results are identical in bf16 and
within float32 rounding. The same op serves any number of rows (prefill too).

Packing replaces each `nn.Linear` module with a `PackedLinear` that holds only the packed
weight, so the dense copy is freed (a weight tied to an embedding stays, for the lookup).
It is one-way: a packed model serves and scores, but no longer trains or saves.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def packing_available() -> bool:
    """True when this torch build has oneDNN (mkldnn) and its prepacked linear ops."""
    if not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    return hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")


class PackedLinear(nn.Module):
    """`y = x @ W.T + b` with W prepacked for oneDNN (CPU, float32 or bfloat16, inference only)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        if weight.device.type != "cpu" or weight.dim() != 2:
            raise ValueError(f"PackedLinear needs a 2-D CPU weight, got {tuple(weight.shape)} on {weight.device}")
        self.out_features, self.in_features = weight.shape
        # The batch-size hint picks the layout; 1 favours decode, and larger batches still run on it.
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)
        self.bias = None if bias is None else bias.detach().clone()

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        """A packed copy of an `nn.Linear`'s weight and bias."""
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


LinearWeights = Callable[[nn.Module], tuple[torch.Tensor, torch.Tensor | None] | None]


def linear_weights(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight [out, in], bias) of an `nn.Linear`, None for any other module."""
    return (module.weight, module.bias) if isinstance(module, nn.Linear) else None


def pack_linear_layers(model: nn.Module, weights_of: LinearWeights = linear_weights) -> int:
    """Replace every module that `weights_of` reads as a linear layer with a `PackedLinear`.

    Returns how many were packed. The default packs `nn.Linear`; a model with its own
    linear-like modules passes a function that also reads those.
    """
    return replace_linear_layers(model, PackedLinear, weights_of)


def replace_linear_layers(
    model: nn.Module,
    build: Callable[[torch.Tensor, torch.Tensor | None], nn.Module],
    weights_of: LinearWeights = linear_weights,
) -> int:
    """Replace every module that `weights_of` reads as a linear layer with `build(weight, bias)`.

    Returns how many were replaced (packing here, int8 quantization in `quantize.py`).
    """
    count = 0
    with torch.no_grad():
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                weights = weights_of(child)
                if weights is not None:
                    setattr(parent, name, build(*weights))
                    count += 1
    return count
