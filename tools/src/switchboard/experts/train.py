"""Training loop of the demo experts on top of the generator's own Llama module.

Plain next-token cross-entropy on random windows of the training token stream,
AdamW with linear warmup and cosine decay, gradient clipping, fixed seeds. Most steps
use short windows and the last ones the full context (sequence-length warm-up: same
tokens per step, far less attention work). On CPU the forward and backward run under
bf16 autocast when the recipe asks for it (several times faster than float32 matmuls
on CPUs with bf16 instructions); parameters and optimiser state stay float32.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from switchboard.experts.recipes import ModelShape, TrainingRecipe
from switchboard.generator.models.llama import LlamaConfig, LlamaForCausalLM
from torch import nn

INIT_STD = 0.02


@dataclass
class TrainResult:
    """What a training run reports."""

    steps: int
    seconds: float
    first_loss: float
    final_loss: float
    tokens_seen: int


def llama_config(shape: ModelShape, vocab_size: int, eot_id: int) -> LlamaConfig:
    """The LlamaConfig of an expert shape."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=shape.max_position_embeddings,
        rope_theta=shape.rope_theta,
        tie_word_embeddings=shape.tie_word_embeddings,
        bos_token_id=eot_id,
        eos_token_id=eot_id,
    )


def init_model(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    """A freshly initialised model (normal(0, 0.02) weights, as Hugging Face initialises Llama)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    return model


def learning_rate(step: int, recipe: TrainingRecipe) -> float:
    """Linear warmup then cosine decay to `min_lr_ratio` of the peak."""
    if step < recipe.warmup_steps:
        return recipe.learning_rate * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return recipe.learning_rate * (recipe.min_lr_ratio + (1.0 - recipe.min_lr_ratio) * cosine)


def batch_shape(step: int, recipe: TrainingRecipe) -> tuple[int, int]:
    """(windows, tokens per window) of a step: short windows first, long ones for the final fraction."""
    long = recipe.long_context_length
    if long is None or step < round(recipe.steps * (1.0 - recipe.long_fraction)):
        return recipe.batch_size, recipe.context_length
    return max(1, recipe.batch_size * recipe.context_length // long), long


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, object]]:
    """Weight decay on matrices only (not norms), each shared tensor listed once."""
    decay, no_decay, seen = [], [], set()
    for param in model.parameters():
        if id(param) in seen or not param.requires_grad:
            continue
        seen.add(id(param))
        (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(
    model: LlamaForCausalLM,
    tokens: torch.Tensor,
    recipe: TrainingRecipe,
    log: Callable[[str], None] = lambda _: None,
) -> TrainResult:
    """Train in place on random windows of the 1-D token stream; returns loss summary."""
    longest = max(recipe.context_length, recipe.long_context_length or 0)
    if tokens.numel() < longest + 2:
        raise ValueError(f"training stream has {tokens.numel()} tokens, fewer than one window of {longest}")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(recipe.seed)
    optimizer = torch.optim.AdamW(
        _param_groups(model, recipe.weight_decay), lr=recipe.learning_rate, betas=(0.9, 0.95), eps=1e-8
    )
    use_autocast = recipe.bf16_autocast
    autocast_device = "cuda" if device.type == "cuda" else "cpu"
    model.train()
    started = time.perf_counter()
    first_loss = final_loss = float("nan")
    smoothed = None
    tokens_seen = 0
    for step in range(recipe.steps):
        windows, length = batch_shape(step, recipe)
        starts = torch.randint(0, tokens.numel() - length - 1, (windows,), generator=generator)
        batch = tokens[starts[:, None] + torch.arange(length + 1)].to(device)
        tokens_seen += windows * length
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, recipe)
        with torch.autocast(autocast_device, dtype=torch.bfloat16, enabled=use_autocast):
            logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        value = loss.item()
        if step == 0:
            first_loss = value
        smoothed = value if smoothed is None else 0.9 * smoothed + 0.1 * value
        final_loss = smoothed
        if step % 50 == 0 or step == recipe.steps - 1:
            elapsed = time.perf_counter() - started
            log(f"step {step + 1}/{recipe.steps} loss {smoothed:.3f} ({elapsed:.0f}s)")
    model.eval()
    return TrainResult(
        steps=recipe.steps,
        seconds=time.perf_counter() - started,
        first_loss=first_loss,
        final_loss=final_loss,
        tokens_seen=tokens_seen,
    )
