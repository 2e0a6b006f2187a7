"""The GPT-2 family in plain torch.

Parameter names equal those of Hugging Face's `GPT2LMHeadModel`
(`transformer.wte`, `transformer.h.N.attn.c_attn`, ...), including HF's
`Conv1D` layout: its weights are stored [in_features, out_features] and applied
as `x @ W + b`, so a checkpoint's state dict loads unchanged. `forward` is the
plain causal pass over whole sequences; `forward_step` is the serving engine's
paged path (see notes/engine_api.md): every layer hands q, k, v of the flattened
batch to `attn.attend(layer_index, q, k, v)`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

#: Activations that equal GPT-2's tanh-approximated GELU ("gelu_new").
TANH_GELU_NAMES = frozenset({"gelu_new", "gelu_pytorch_tanh", "gelu_fast"})


class StepAttention(Protocol):
    """What `forward_step` needs from the engine's attention context."""

    def attend(self, layer_index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attend [N, heads, head_dim] queries over the paged cache; returns [N, heads*head_dim]."""
        ...


@dataclass
class GPT2Config:
    """Hyper-parameters of a GPT-2 model (the fields of its config.json)."""

    vocab_size: int
    n_embd: int
    n_layer: int
    n_head: int
    n_positions: int = 1024
    n_inner: int | None = None
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    tie_word_embeddings: bool = True
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # Uniform names the engine reads to size the KV cache (shared with LlamaConfig's view).
    @property
    def num_layers(self) -> int:
        """Number of transformer blocks."""
        return self.n_layer

    @property
    def num_hidden_layers(self) -> int:
        """Alias of `num_layers` under Hugging Face's Llama name."""
        return self.n_layer

    @property
    def num_attention_heads(self) -> int:
        """Number of query heads."""
        return self.n_head

    @property
    def num_kv_heads(self) -> int:
        """Number of key/value heads (GPT-2 has no grouped-query attention)."""
        return self.n_head

    @property
    def num_key_value_heads(self) -> int:
        """Alias of `num_kv_heads` under Hugging Face's Llama name."""
        return self.n_head

    @property
    def head_dim(self) -> int:
        """Size of one attention head."""
        return self.n_embd // self.n_head

    @property
    def head_size(self) -> int:
        """Alias of `head_dim` (LlamaConfig's name)."""
        return self.head_dim

    @property
    def hidden_size(self) -> int:
        """Width of the residual stream."""
        return self.n_embd

    @property
    def max_position_embeddings(self) -> int:
        """Longest sequence the learned position table covers."""
        return self.n_positions

    @property
    def inner_size(self) -> int:
        """Width of the MLP's hidden layer."""
        return self.n_inner or 4 * self.n_embd

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> GPT2Config:
        """Build from a Hugging Face config.json dictionary (unknown keys kept in `extra`)."""
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        values = {k: v for k, v in data.items() if k in known}
        return cls(**values, extra={k: v for k, v in data.items() if k not in known})

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json dictionary that Hugging Face's GPT2LMHeadModel reads."""
        data = {k: v for k, v in asdict(self).items() if k != "extra" and v is not None}
        data.update(self.extra)
        data.update({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
        return data

    def unsupported(self) -> list[str]:
        """Settings this implementation does not reproduce (empty when the model is supported)."""
        problems = []
        if self.activation_function not in TANH_GELU_NAMES:
            problems.append(f"activation_function={self.activation_function!r} (supported: gelu_new)")
        if self.scale_attn_by_inverse_layer_idx:
            problems.append("scale_attn_by_inverse_layer_idx=true")
        if not self.scale_attn_weights:
            problems.append("scale_attn_weights=false")
        if self.n_embd % self.n_head:
            problems.append(f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}")
        return problems


class Conv1D(nn.Module):
    """Hugging Face's GPT-2 linear layer: weight [in, out], y = x @ W + b."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (*x.shape[:-1], self.weight.shape[1])
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(shape)


class GPT2Attention(nn.Module):
    """Multi-head causal self-attention with a fused qkv projection."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.num_heads = config.n_head
        self.head_dim = config.head_dim
        self.c_attn = Conv1D(config.n_embd, 3 * config.n_embd)
        self.c_proj = Conv1D(config.n_embd, config.n_embd)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v each shaped [..., heads, head_dim] for inputs [..., n_embd]."""
        q, k, v = self.c_attn(x).split(self.num_heads * self.head_dim, dim=-1)
        shape = (*x.shape[:-1], self.num_heads, self.head_dim)
        return q.reshape(shape), k.reshape(shape), v.reshape(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = (t.transpose(1, 2) for t in self.qkv(x))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(out.transpose(1, 2).reshape(batch, length, -1))


class GPT2MLP(nn.Module):
    """Feed-forward block with the tanh-approximated GELU."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.c_fc = Conv1D(config.n_embd, config.inner_size)
        self.c_proj = Conv1D(config.inner_size, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class GPT2Block(nn.Module):
    """Pre-norm transformer block: attention then MLP, each with a residual."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    """Token and position embeddings, blocks and the final norm (HF's `transformer.` prefix)."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(GPT2Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)


def _serving_linear_weights(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight [out, in], bias) of a Conv1D (stored [in, out]: its transpose) or an nn.Linear."""
    from switchboard.generator.models.packed_linear import linear_weights

    if isinstance(module, Conv1D):
        return module.weight.t().contiguous(), module.bias
    return linear_weights(module)


class GPT2LMHeadModel(nn.Module):
    """A GPT-2 causal language model; the output head shares the token embedding when tied."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the output head with the token embedding when the config says so."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [batch, length, vocab] of a causal pass over whole sequences [batch, length]."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.transformer.wte(input_ids) + self.transformer.wpe(positions)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))

    def prepare_for_serving(self, pack: bool) -> None:
        """With `pack`, prepack every projection for oneDNN (CPU); one-way, see packed_linear.py."""
        if not pack:
            return
        from switchboard.generator.models.packed_linear import pack_linear_layers

        pack_linear_layers(self, _serving_linear_weights)

    def quantize_for_serving(self, scheme: str, head: bool = True) -> int:
        """Make every projection (and, with `head`, lm_head) weight-only int8; see models/quantize.py.

        Returns how many layers were quantized. One-way, as packing.
        """
        from switchboard.generator.models.quantize import quantize_linear_layers

        if scheme != "int8":
            raise ValueError(f"unknown weight quantization {scheme!r}; supported: int8")
        dtype = self.transformer.wte.weight.dtype
        count = quantize_linear_layers(self.transformer, dtype, _serving_linear_weights)
        if head:
            count += quantize_linear_layers(
                self, dtype, lambda m: _serving_linear_weights(m) if m is self.lm_head else None
            )
        return count

    def forward_step(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: StepAttention,
        logits_indices: torch.Tensor,
    ) -> torch.Tensor:
        """Logits [len(logits_indices), vocab] for one engine step over flattened tokens [N].

        Every layer computes q, k, v [N, heads, head_dim] and lets `attn.attend` write
        k, v into the paged cache and attend over each sequence's prefix causally.
        """
        t = self.transformer
        x = t.wte(input_ids) + t.wpe(positions)
        for index, block in enumerate(t.h):
            q, k, v = block.attn.qkv(block.ln_1(x))
            x = x + block.attn.c_proj(attn.attend(index, q, k, v))
            x = x + block.mlp(block.ln_2(x))
        return self.lm_head(t.ln_f(x[logits_indices]))
