"""The model runner: turns a `SchedulerOutput` into one forward pass and samples.

The only part of a step that touches tensors (as vLLM v1's GPU model runner): it
lays the scheduled tokens out (decodes first, as the scheduler ordered them),
builds the paged attention context over the KV cache, runs the model's
`forward_step` and samples one token for every request that reached the end of
its known tokens. It reads the requests it is given and changes none of them.
"""

from __future__ import annotations

from typing import Any

import torch
from switchboard.generator.engine.attention import AttentionContext, SequenceSlice
from switchboard.generator.engine.kv_cache import KVCache
from switchboard.generator.sampling import Sampler
from switchboard.replica.outputs import ModelRunnerOutput, SchedulerOutput


class ModelRunner:
    """Runs one step of a model over its paged KV cache."""

    def __init__(self, model: Any, cache: KVCache, sampler: Sampler, device: torch.device) -> None:
        self.model = model
        self.cache = cache
        self.sampler = sampler
        self.device = device

    def execute(self, output: SchedulerOutput) -> ModelRunnerOutput:
        """Compute every scheduled token and sample where a request is up to date (call under inference_mode)."""
        input_ids: list[int] = []
        positions: list[int] = []
        slices: list[SequenceSlice] = []
        logits_rows: list[int] = []
        samplers = []
        for s in output.scheduled:
            start = s.num_computed_tokens
            input_ids.extend(s.new_token_ids)
            positions.extend(range(start, start + s.num_new_tokens))
            slices.append(SequenceSlice(list(s.block_ids), start, s.num_new_tokens))
            if s.sample:
                logits_rows.append(len(input_ids) - 1)
                samplers.append(s.request)
        device = self.device
        ids_t = torch.tensor(input_ids, dtype=torch.long).to(device, non_blocking=True)
        pos_t = torch.tensor(positions, dtype=torch.long).to(device, non_blocking=True)
        rows_t = torch.tensor(logits_rows, dtype=torch.long).to(device, non_blocking=True)
        attn = AttentionContext(self.cache, slices, device)
        logits = self.model.forward_step(ids_t, pos_t, attn, rows_t)
        if not samplers:
            return ModelRunnerOutput((), ())
        tokens = self.sampler.sample(
            logits,
            [r.params for r in samplers],
            [r.generator for r in samplers],
            [r.token_ids for r in samplers],
            [r.num_generated for r in samplers],
        ).tolist()
        return ModelRunnerOutput(tuple(r.request_id for r in samplers), tuple(int(t) for t in tokens))
