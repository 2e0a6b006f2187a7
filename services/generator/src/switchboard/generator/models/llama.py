"""The Llama family (Llama, Mistral, Qwen2, Qwen3, SmolLM, TinyLlama) in plain torch.

Parameter names equal those of Hugging Face's `LlamaForCausalLM`, so a
`model.safetensors` written by either loads into the other unchanged.
`forward` is the plain causal pass over whole sequences (training, scoring,
reference checks); the serving engine adds its own paged-KV paths on top of the
same submodules. RoPE is plain or scaled (`linear`, `dynamic`, `llama3`, `yarn`),
computed as transformers' `modeling_rope_utils` computes it. Attention projections
may carry biases (`attention_bias`: q/k/v and o as in transformers' Llama and
Qwen3; q/k/v only in Qwen2), and Qwen3's per-head RMSNorm on queries and keys
(`qk_norm`) runs before RoPE.
"""

from __future__ import annotations

import math
from collections.abc import Callable
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
    #: Biases on the q/k/v projections, and on o_proj too unless `o_proj_bias` says otherwise
    #: (transformers' Llama and Qwen3 put `attention_bias` on all four).
    attention_bias: bool = False
    #: Bias on o_proj; None: as `attention_bias`. Qwen2 has q/k/v biases and none on o_proj.
    o_proj_bias: bool | None = None
    #: Per-head RMSNorm of queries and keys before RoPE (`q_norm`/`k_norm`, Qwen3).
    qk_norm: bool = False
    head_dim: int | None = None
    #: RoPE scaling parameters (transformers' `rope_scaling` / `rope_parameters` without
    #: `rope_theta`), or None for plain RoPE; checked by `rope_scaling_parameters`.
    rope_scaling: dict[str, Any] | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def head_size(self) -> int:
        """Size of one attention head."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def output_bias(self) -> bool:
        """Whether o_proj has a bias."""
        return self.attention_bias if self.o_proj_bias is None else self.o_proj_bias

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> LlamaConfig:
        """Build from a Hugging Face config.json dictionary (unknown keys kept in `extra`).

        Both RoPE spellings are read: transformers v5's `rope_parameters` (with
        `rope_theta` and `rope_type` inside) and v4's top-level `rope_theta` plus
        `rope_scaling` (`type` or `rope_type`). As in transformers, `rope_scaling`
        wins over `rope_parameters`, and a `rope_theta` inside the dict over the
        top-level one.
        """
        data = dict(data)
        rope = data.pop("rope_parameters", None)
        scaling = data.pop("rope_scaling", None) or rope
        if isinstance(scaling, dict):
            scaling = dict(scaling)
            theta = scaling.pop("rope_theta", None)
            if theta is not None:
                data["rope_theta"] = theta
            if not (set(scaling) - {"rope_type", "type"}) and _rope_type(scaling) == "default":
                scaling = None
        data["rope_scaling"] = scaling or None
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        values = {k: v for k, v in data.items() if k in known}
        values.setdefault("num_key_value_heads", data.get("num_attention_heads"))
        # Qwen2 checkpoints carry q/k/v biases (never one on o_proj) without an attention_bias key.
        if data.get("model_type") == "qwen2":
            values["attention_bias"] = True
            values["o_proj_bias"] = False
        if data.get("model_type") == "qwen3":
            values["qk_norm"] = True
            # transformers' Qwen3Config defaults; head_dim is not hidden_size / heads there.
            values.setdefault("head_dim", 128)
            values.setdefault("rms_norm_eps", 1e-6)
        return cls(**values, extra={k: v for k, v in data.items() if k not in known})

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json dictionary that HF's LlamaForCausalLM (Qwen3ForCausalLM with `qk_norm`) reads."""
        if self.o_proj_bias is not None and self.o_proj_bias != self.attention_bias:
            raise ValueError("q/k/v biases without an o_proj bias (Qwen2) have no LlamaForCausalLM config")
        skip = {"extra", "o_proj_bias", "qk_norm"}
        data = {k: v for k, v in asdict(self).items() if k not in skip and v is not None}
        data.update(self.extra)
        arch, model_type = ("Qwen3ForCausalLM", "qwen3") if self.qk_norm else ("LlamaForCausalLM", "llama")
        data.update({"architectures": [arch], "model_type": model_type, "hidden_act": "silu"})
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


def _rope_type(scaling: dict[str, Any]) -> Any:
    """The scaling type of a RoPE dict, read from `rope_type` or the older `type` key."""
    return scaling.get("rope_type", scaling.get("type", "default"))


def _default_inv_freq(base: float, dim: int) -> torch.Tensor:
    """Plain RoPE inverse frequencies 1 / base^(2i/dim)."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


# Each scaling function below mirrors transformers' `modeling_rope_utils._compute_<type>_parameters`
# operation for operation (same float32/float64 steps, same order), so the tables match bit for bit.
# Each takes the config and the checked parameters and returns (inverse frequencies, the factor
# that multiplies cos and sin).


def _linear_rope(config: LlamaConfig, params: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """Linear (position interpolation) scaling: every frequency divided by `factor`."""
    inv_freq = _default_inv_freq(config.rope_theta, config.head_size)
    inv_freq /= params["factor"]
    return inv_freq, 1.0


def _dynamic_ntk_rope(config: LlamaConfig, params: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """Dynamic NTK scaling at sequence length max_position_embeddings.

    transformers recomputes the base from the running sequence length only once a
    forward pass reaches beyond max_position_embeddings; the engine's context length
    is max_position_embeddings (`_llama_max_len`), so inside it these are exactly
    the frequencies transformers uses (the base formula at seq_len = max positions).
    """
    dim = config.head_size
    factor = params["factor"]
    seq_len = config.max_position_embeddings
    scale = (factor * seq_len / config.max_position_embeddings) - (factor - 1)
    base = config.rope_theta * scale ** (dim / (dim - 2))
    return _default_inv_freq(base, dim), 1.0


def _llama3_rope(config: LlamaConfig, params: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """Llama 3.1 scaling: low frequencies divided by `factor`, high kept, a smooth ramp between."""
    inv_freq = _default_inv_freq(config.rope_theta, config.head_size)
    factor = params["factor"]
    low_freq_factor = params["low_freq_factor"]
    high_freq_factor = params["high_freq_factor"]
    old_context_len = params["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama), 1.0


def _yarn_rope(config: LlamaConfig, params: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """YaRN: interpolation and extrapolation blended per dimension, plus an attention factor on cos/sin."""
    base = config.rope_theta
    dim = config.head_size
    factor = params["factor"]
    attention_factor = params.get("attention_factor")
    mscale = params.get("mscale")
    mscale_all_dim = params.get("mscale_all_dim")
    original_max = params["original_max_position_embeddings"]
    if factor is None:  # DeepSeek-style configs: the ratio of the extended to the original length
        factor = config.max_position_embeddings / original_max

    def get_mscale(scale: float, mscale: float = 1) -> float:
        if scale <= 1:
            return 1.0
        return 0.1 * mscale * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: avoids a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)

    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    inv_freq = (
        inv_freq_interpolation * (1 - extrapolation_factor) + inv_freq_extrapolation * extrapolation_factor
    )
    return inv_freq, float(attention_factor)


#: RoPE scaling types the engine computes, by transformers' `rope_type` name.
ROPE_SCALING_TYPES: dict[str, Callable[[LlamaConfig, dict[str, Any]], tuple[torch.Tensor, float]]] = {
    "linear": _linear_rope,
    "dynamic": _dynamic_ntk_rope,
    "llama3": _llama3_rope,
    "yarn": _yarn_rope,
}

#: Parameters each type needs (transformers refuses a config without them too).
_REQUIRED_KEYS = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
    "yarn": ("factor",),
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def rope_scaling_parameters(config: LlamaConfig) -> dict[str, Any] | None:
    """The checked RoPE scaling parameters of `config` (None: plain RoPE).

    Fills `rope_type` and, for llama3 and yarn, `original_max_position_embeddings`
    the way transformers does (a top-level config.json value first, then the dict's,
    then max_position_embeddings). Raises ValueError naming the type and what is
    wrong for a type that is not implemented or parameters it cannot use.
    """
    scaling = config.rope_scaling
    if scaling is None:
        return None
    supported = ", ".join(["default", *sorted(ROPE_SCALING_TYPES)])
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling={scaling!r} is not an object; supported: {supported}")
    kind = _rope_type(scaling)
    if kind == "default":
        return None
    if not isinstance(kind, str) or kind not in ROPE_SCALING_TYPES:
        raise ValueError(f"RoPE scaling type {kind!r} is not supported; supported: {supported}")
    params = {k: v for k, v in scaling.items() if k != "type"}
    params["rope_type"] = kind

    def bad(what: str) -> ValueError:
        return ValueError(f"RoPE scaling type {kind!r}: {what}")

    missing = [key for key in _REQUIRED_KEYS[kind] if key not in params]
    if missing:
        raise bad(f"missing {', '.join(missing)}")
    partial = params.get("partial_rotary_factor", config.extra.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise bad(f"partial_rotary_factor={partial!r} (only full-head rotation is implemented)")
    if kind in ("llama3", "yarn"):
        top_level = config.extra.get("original_max_position_embeddings")
        if top_level is not None:
            params["original_max_position_embeddings"] = top_level
        original = params.setdefault("original_max_position_embeddings", config.max_position_embeddings)
        if not isinstance(original, int) or isinstance(original, bool) or original <= 0:
            raise bad(f"original_max_position_embeddings={original!r} must be a positive integer")
    factor = params["factor"]
    if not (kind == "yarn" and factor is None) and not (_is_number(factor) and factor > 0):
        raise bad(f"factor={factor!r} must be a positive number")
    if kind == "llama3":
        low, high = params["low_freq_factor"], params["high_freq_factor"]
        if not (_is_number(low) and low > 0 and _is_number(high) and high > low):
            raise bad(
                f"low_freq_factor={low!r} and high_freq_factor={high!r} must be numbers with 0 < low < high"
            )
    if kind == "yarn":
        for key in ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
            value = params.get(key)
            if value is not None and not _is_number(value):
                raise bad(f"{key}={value!r} must be a number")
        attention_factor = params.get("attention_factor")
        if attention_factor is not None and attention_factor < 0:
            raise bad(f"attention_factor={attention_factor!r} must not be negative")
        if not isinstance(params.get("truncate", True), bool):
            raise bad(f"truncate={params['truncate']!r} must be true or false")
    return params


def rope_parameters(config: LlamaConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the cos/sin scaling factor of the config's RoPE (plain or scaled)."""
    params = rope_scaling_parameters(config)
    if params is None:
        return _default_inv_freq(config.rope_theta, config.head_size), 1.0
    return ROPE_SCALING_TYPES[params["rope_type"]](config, params)


def rope_inverse_frequencies(config: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies of rotary position embeddings (with the config's RoPE scaling)."""
    return rope_parameters(config)[0]


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for the given positions, shaped [..., head_dim], times `scale` (yarn's factor)."""
    freqs = positions.float().unsqueeze(-1) * inv_freq.to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if scale != 1.0:  # in float32 before the cast, as transformers does
        cos, sin = cos * scale, sin * scale
    return cos.to(dtype), sin.to(dtype)


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
    into one `qkv_proj` for serving (one matmul instead of three). With `qk_norm`
    (Qwen3) each query and key head is RMS-normalised over head_dim before RoPE.
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
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.output_bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None

    def fuse(self) -> None:
        """Replace q/k/v_proj with one `qkv_proj` (outputs: query heads, then key heads, then value heads)."""
        if self.qkv_proj is None:
            assert isinstance(self.q_proj, nn.Linear) and isinstance(self.k_proj, nn.Linear)
            assert isinstance(self.v_proj, nn.Linear)
            self.qkv_proj = _fuse_linears([self.q_proj, self.k_proj, self.v_proj])
            self.q_proj = self.k_proj = self.v_proj = None

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of x [..., hidden], each [..., heads, head_dim] (q/k after qk_norm)."""
        lead = x.shape[:-1]
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x).view(*lead, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
            q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=-2)
        else:
            assert self.q_proj is not None and self.k_proj is not None and self.v_proj is not None
            q = self.q_proj(x).view(*lead, self.num_heads, self.head_dim)
            k = self.k_proj(x).view(*lead, self.num_kv_heads, self.head_dim)
            v = self.v_proj(x).view(*lead, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

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
        inv_freq, self.rope_attention_scaling = rope_parameters(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._rope_table: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [batch, length, vocab] of a causal pass over whole sequences [batch, length]."""
        x = self.model.embed_tokens(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype, self.rope_attention_scaling)
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
            table = rope_cos_sin(self.inv_freq.to(device), positions, dtype, self.rope_attention_scaling)
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

    def quantize_for_serving(self, scheme: str, head: bool = True) -> int:
        """Fuse the projections, then make every linear layer (and, with `head`, lm_head) int8.

        Weight-only int8 with per-output-channel scales (`models/quantize.py`), computing in
        the model's dtype; returns how many layers were quantized. One-way, as packing.
        """
        from switchboard.generator.models.packed_linear import linear_weights
        from switchboard.generator.models.quantize import quantize_linear_layers

        if scheme != "int8":
            raise ValueError(f"unknown weight quantization {scheme!r}; supported: int8")
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
        dtype = self.model.embed_tokens.weight.dtype
        count = quantize_linear_layers(self.model, dtype)
        if head:
            count += quantize_linear_layers(self, dtype, lambda m: linear_weights(m) if m is self.lm_head else None)
        return count

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
            attn_layer = layer.self_attn
            qkv = attn_layer.qkv_proj(layer.input_layernorm(x)).view(n, heads + 2 * kv_heads, dim)
            qk = qkv[:, : heads + kv_heads]
            if attn_layer.q_norm is not None and attn_layer.k_norm is not None:
                qk = torch.cat((attn_layer.q_norm(qk[:, :heads]), attn_layer.k_norm(qk[:, heads:])), dim=1)
            # RoPE on queries and keys in one pass; values are the trailing heads.
            qk = apply_rope(qk, cos, sin)
            out = attn.attend(index, qk[:, :heads], qk[:, heads:], qkv[:, heads + kv_heads :])
            x = x + layer.self_attn.o_proj(out)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        x = x.index_select(0, logits_indices)
        return self.lm_head(self.model.norm(x))
