"""Weight-only int8 for CPU serving: int8 weights with one scale per output channel.

`quantize_int8(weight)` rounds each output row to 255 levels symmetric about zero,
`w_q = round(w / s)` clamped to [-127, 127] with `s = max|w_row| / 127`, so each weight
is off by at most `s / 2` (`weight_error_bound`). `Int8Linear` keeps only the int8 matrix,
the scales (in the activation dtype) and the bias, and computes `y = x @ (w_q * s).T + b`
through torch's CPU kernel `aten._weight_int8pack_mm`, which dequantizes inside the
matmul (activations stay in bfloat16 or float32: weight-only, no activation rounding);
above `DENSE_ROWS` rows (prefill, scoring) it dequantizes the weight for the call instead.
Weights take 1 byte each instead of 2 (bf16) or 4 (fp32); bench/int8_bench.py measures
what that buys in speed and costs in held-out perplexity, bench/README.md records it.

`quantize_linear_layers` swaps every linear-like module of a model for an `Int8Linear`
(one-way, like packing: the model then serves and scores, but no longer trains or
saves). Fused projections quantize exactly as their parts would, the scales being per
row. Modules already replaced (packed or quantized) are not linear layers any more, so
a later `pack_linear_layers` leaves them alone.
"""

from __future__ import annotations

import torch
from switchboard.generator.models.packed_linear import LinearWeights, linear_weights, replace_linear_layers
from torch import nn

#: Accepted weight quantization schemes (GENERATOR_QUANTIZE).
QUANTIZATIONS = ("none", "int8")
#: Largest magnitude of a quantized weight (symmetric, so -128 is never used).
INT8_LEVEL = 127
#: Above this many rows (prefill chunks, scoring) the layer dequantizes its weight for the call and
#: runs a dense matmul: the int8 kernel works on a few rows at a time and re-streams the weight for
#: each group, so at hundreds of rows it ran 5-10x slower than dense here (bench/README.md).
DENSE_ROWS = 64


def int8_available() -> bool:
    """True when this torch build has the CPU weight-only int8 matmul."""
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight [out, in], float32 scales [out]) of a [out, in] weight, symmetric per output row.

    Computed in float32 whatever the weight's dtype; an all-zero row gets scale 1 (its
    weights stay 0) rather than 0, so no division by zero and no zero scale.
    """
    if weight.dim() != 2:
        raise ValueError(f"int8 quantization needs a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    absmax = w.abs().amax(dim=1)
    scales = torch.where(absmax > 0, absmax / INT8_LEVEL, torch.ones_like(absmax))
    q = torch.round(w / scales[:, None]).clamp_(-INT8_LEVEL, INT8_LEVEL).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float32 weight an int8 matrix and its per-row scales stand for."""
    return q.float() * scales.float()[:, None]


def weight_error_bound(scales: torch.Tensor) -> torch.Tensor:
    """Per-row bound on |w - dequantized w|: half a quantization step (round to nearest)."""
    return scales.float() / 2


class Int8Linear(nn.Module):
    """`y = x @ (w_q * s).T + b` with int8 `w_q` [out, in] and scales `s` [out] (CPU, inference only).

    Activations are bfloat16 or float32 (the dtype the scales are kept in); any number
    of leading dimensions and rows (decode and prefill alike).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if weight.device.type != "cpu" or weight.dim() != 2:
            raise ValueError(f"Int8Linear needs a 2-D CPU weight, got {tuple(weight.shape)} on {weight.device}")
        dtype = dtype or weight.dtype
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"Int8Linear computes in float32 or bfloat16, not {dtype}")
        self.out_features, self.in_features = weight.shape
        q, scales = quantize_int8(weight)
        self.register_buffer("weight_int8", q)
        self.register_buffer("scales", scales.to(dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype).clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """An int8 copy of an `nn.Linear`'s weight and bias."""
        return cls(linear.weight, linear.bias)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight this layer multiplies by (for checks)."""
        return dequantize_int8(self.weight_int8, self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        if not rows.is_contiguous():
            rows = rows.contiguous()
        if rows.shape[0] > DENSE_ROWS:
            weight = self.weight_int8.to(rows.dtype) * self.scales[:, None]
            y = torch.nn.functional.linear(rows, weight)
        else:
            y = torch.ops.aten._weight_int8pack_mm(rows, self.weight_int8, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


def quantize_linear_layers(
    model: nn.Module, dtype: torch.dtype, weights_of: LinearWeights = linear_weights
) -> int:
    """Replace every module that `weights_of` reads as a linear layer with an `Int8Linear` in `dtype`.

    Returns how many were replaced. A weight tied to an embedding is copied (the
    embedding keeps its dense weight for the lookup).
    """
    if not int8_available():
        raise RuntimeError("this torch build has no aten._weight_int8pack_mm (weight-only int8 on CPU)")
    return replace_linear_layers(model, lambda w, b: Int8Linear(w, b, dtype), weights_of)
