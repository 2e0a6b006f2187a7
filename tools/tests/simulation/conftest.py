"""Shared inputs of the simulator CLI tests: an experts config, cost profiles and a trace in a folder."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

COST = {"fit": {"base_ms": 2.0, "prefill_token_ms": 0.05, "decode_seq_ms": 0.2, "context_token_ms": 0.001},
        "block_size": 16, "kv_blocks_total": 256, "max_num_seqs": 32, "max_tokens_per_step": 256, "max_model_len": 1024}

SimInputs = Callable[[str, Iterable[dict[str, Any]]], dict[str, Path]]


@pytest.fixture
def sim_inputs(tmp_path: Path) -> SimInputs:
    """write(experts_yaml, trace_rows) -> {experts, costs, trace}: pools a and b with the same cost profile."""

    def write(experts_yaml: str, rows: Iterable[dict[str, Any]]) -> dict[str, Path]:
        experts = tmp_path / "experts.yaml"
        experts.write_text(experts_yaml)
        costs = tmp_path / "costs"
        costs.mkdir()
        for name in ("a", "b"):
            (costs / f"{name}.json").write_text(json.dumps(COST))
        trace = tmp_path / "trace.jsonl"
        with trace.open("w") as out:
            for row in rows:
                out.write(json.dumps(row) + "\n")
        return {"experts": experts, "costs": costs, "trace": trace}

    return write
