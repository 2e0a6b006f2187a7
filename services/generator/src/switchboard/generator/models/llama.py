"""The Llama family (Llama, Mistral, Qwen2, SmolLM, TinyLlama) in plain torch.

Parameter names equal those of Hugging Face's `LlamaForCausalLM`, so a
`model.safetensors` written by either loads into the other unchanged.
`forward` is the plain causal pass over whole sequences (training, scoring,
reference checks); the serving engine adds its own paged-KV paths on top of the
same submodules.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from switchboard.generator.engine.attention import AttentionContext


@dataclass
class LlamaConfig:
    """Hyper-parameters of a Llama-family model (the fields of its config.json)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    head_dim: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def head_size(self) -> int:
        """Size of one attention head."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> LlamaConfig:
        """Build from a Hugging Face config.json dictionary (unknown keys kept in `extra`)."""
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        values = {k: v for k, v in data.items() if k in known}
        values.setdefault("num_key_value_heads", data.get("num_attention_heads"))
        # Qwen2 checkpoints carry q/k/v biases without saying so in an attention_bias key.
        if data.get("model_type") == "qwen2":
            values["attention_bias"] = True
        return cls(**values, extra={k: v for k, v in data.items() if k not in known})

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json dictionary that Hugging Face's LlamaForCausalLM reads."""
        data = {k: v for k, v in asdict(self).items() if k != "extra" and v is not None}
        data.update(self.extra)
        data.update({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu"})
        return data


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in float32 as the reference does."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_inverse_frequencies(config: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies of rotary position embeddings (plain RoPE)."""
    dim = config.head_size
    return 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for the given positions, shaped [..., head_dim]."""
    freqs = positions.float().unsqueeze(-1) * inv_freq.to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of the last dimension (Hugging Face's RoPE layout)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply rotary embeddings; cos/sin broadcast against x's leading dimensions."""
    return x * cos + rotate_half(x) * sin


def explicit_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention as two matmuls and a masked softmax; q [B, H, L, D], k/v [B, Hkv, L, D].

    Used for training on CPU: there the backward of torch's fused (flash) attention
    kernel is about 3x slower than this for windows of a few hundred tokens (16 x 128
    tokens, 6 heads of 32: 17 vs 6 ms per layer), while its forward is as fast.
    """
    if k.shape[1] != q.shape[1]:  # grouped-query: each key/value head serves a run of query heads
        repeat = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    length = q.shape[-2]
    scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
    return torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1) @ v


def _fuse_linears(layers: list[nn.Linear]) -> nn.Linear:
    """One Linear whose output is the concatenated outputs of `layers` (same input)."""
    first = layers[0]
    fused = nn.Linear(
        first.in_features,
        sum(layer.out_features for layer in layers),
        bias=first.bias is not None,
        device=first.weight.device,
        dtype=first.weight.dtype,
    )
    with torch.no_grad():
        fused.weight.copy_(torch.cat([layer.weight for layer in layers]))
        if fused.bias is not None:
            fused.bias.copy_(torch.cat([layer.bias for layer in layers]))
    return fused.requires_grad_(first.weight.requires_grad)


class LlamaAttention(nn.Module):
    """Grouped-query self-attention.

    Loaded with separate q/k/v projections (the checkpoint's names); `fuse` merges them
    into one `qkv_proj` for serving (one matmul instead of three).
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_size
        bias = config.attention_bias
        self.q_proj: nn.Module | None = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj: nn.Module | None = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj: nn.Module | None = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.qkv_proj: nn.Module | None = None
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def fuse(self) -> None:
        """Replace q/k/v_proj with one `qkv_proj` (outputs: query heads, then key heads, then value heads)."""
        if self.qkv_proj is None:
            assert isinstance(self.q_proj, nn.Linear) and isinstance(self.k_proj, nn.Linear)
            assert isinstance(self.v_proj, nn.Linear)
            self.qkv_proj = _fuse_linears([self.q_proj, self.k_proj, self.v_proj])
            self.q_proj = self.k_proj = self.v_proj = None

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of x [..., hidden], each [..., heads, head_dim]."""
        lead = x.shape[:-1]
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x).view(*lead, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
            return qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=-2)
        assert self.q_proj is not None and self.k_proj is not None and self.v_proj is not None
        return (
            self.q_proj(x).view(*lead, self.num_heads, self.head_dim),
            self.k_proj(x).view(*lead, self.num_kv_heads, self.head_dim),
            self.v_proj(x).view(*lead, self.num_kv_heads, self.head_dim),
        )

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = (t.transpose(1, 2) for t in self.project_qkv(x))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if q.requires_grad and q.device.type == "cpu":
            out = explicit_causal_attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=self.num_kv_heads != self.num_heads
            )
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward block (`fuse` merges gate and up projections for serving)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj: nn.Module | None = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj: nn.Module | None = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.gate_up_proj: nn.Module | None = None
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def fuse(self) -> None:
        """Replace gate/up_proj with one `gate_up_proj` (outputs: gate, then up)."""
        if self.gate_up_proj is None:
            assert isinstance(self.gate_proj, nn.Linear) and isinstance(self.up_proj, nn.Linear)
            self.gate_up_proj = _fuse_linears([self.gate_proj, self.up_proj])
            self.gate_proj = self.up_proj = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            assert self.gate_proj is not None and self.up_proj is not None
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm transformer block: attention then SwiGLU, each with a residual."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Embeddings, decoder layers and the final norm (HF's `model.` prefix)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """A Llama-family causal language model."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inverse_frequencies(config), persistent=False)
        self._rope_table: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [batch, length, vocab] of a causal pass over whole sequences [batch, length]."""
        x = self.model.embed_tokens(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.model.norm(x))

    def _rope_tables(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for every position up to max_position_embeddings, built once per dtype/device.

        Same float32 computation then cast as `rope_cos_sin`, so the paged path
        matches the plain one bit for bit; indexing a table avoids per-step trig.
        """
        table = self._rope_table
        if table is None or table[0].dtype != dtype or table[0].device != device:
            positions = torch.arange(self.config.max_position_embeddings, device=device)
            table = rope_cos_sin(self.inv_freq.to(device), positions, dtype)
            self._rope_table = table
        return table

    def prepare_for_serving(self, pack: bool) -> None:
        """Fuse q/k/v and gate/up projections; with `pack`, prepack every linear for oneDNN (CPU).

        Fusing runs 2 matmuls instead of 5 per layer (at small sizes per-op overhead, not
        arithmetic, dominates); the separate weights are freed. Both steps are one-way (the
        model then serves and scores, but its state dict no longer matches a checkpoint).
        """
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
        if pack:
            from switchboard.generator.models.packed_linear import pack_linear_layers

            pack_linear_layers(self)

    def forward_step(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionContext,
        logits_indices: torch.Tensor,
    ) -> torch.Tensor:
        """Paged engine step over the flattened tokens [N] of every scheduled sequence.

        Keys/values go through `attn.attend`, which writes them into the paged KV
        cache and attends over each sequence's cached prefix. Returns logits
        [len(logits_indices), vocab] for the rows that sample.
        """
        n = input_ids.shape[0]
        x = self.model.embed_tokens(input_ids)
        cos_table, sin_table = self._rope_tables(x.dtype, x.device)
        cos = cos_table[positions].unsqueeze(1)  # [N, 1, D] broadcasts over heads
        sin = sin_table[positions].unsqueeze(1)
        if self.model.layers[0].self_attn.qkv_proj is None:
            self.prepare_for_serving(pack=False)
        cfg = self.config
        heads, kv_heads, dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
        for index, layer in enumerate(self.model.layers):
            qkv = layer.self_attn.qkv_proj(layer.input_layernorm(x)).view(n, heads + 2 * kv_heads, dim)
            # RoPE on queries and keys in one pass; values are the trailing heads.
            qk = apply_rope(qkv[:, : heads + kv_heads], cos, sin)
            out = attn.attend(index, qk[:, :heads], qk[:, heads:], qkv[:, heads + kv_heads :])
            x = x + layer.self_attn.o_proj(out)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        x = x.index_select(0, logits_indices)
        return self.lm_head(self.model.norm(x))
