"""Step-cost model: load a profile JSON in the generator's format, predict steps from their composition."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
from switchboard.replica import FORMULA, BlockPool, CostModel, Request, Scheduler, StepComposition

FIT = CostModel(base_ms=2.5, prefill_token_ms=0.04, decode_seq_ms=0.3, context_token_ms=0.001)


def profile_document(fit: CostModel) -> dict:
    """A cost JSON shaped as `python -m switchboard.generator.engine.profile` writes it."""
    samples = [
        {"kind": "prefill", "prefill_tokens": n, "decode_seqs": 0, "decode_context_tokens": 0, "ms": fit.step_ms(n)}
        for n in (16, 32, 64)
    ] + [
        {"kind": "decode", "prefill_tokens": 0, "decode_seqs": b, "decode_context_tokens": b * 64, "ms": fit.step_ms(0, b, b * 64)}
        for b in (1, 4)
    ]
    return {
        "model": "bard-small",
        "architecture": "llama",
        "parameter_count": 1234,
        "device": "cpu",
        "dtype": "float32",
        "block_size": 4,
        "kv_blocks_total": 64,
        "max_tokens_per_step": 512,
        "max_num_seqs": 64,
        "torch": "2.13.0",
        "threads": 2,
        "created": "2025-01-01T00:00:00+00:00",
        "formula": FORMULA,
        "fit": asdict(fit),
        "samples": samples,
    }


def test_load_round_trips_the_fit_and_reproduces_the_samples(tmp_path: Path) -> None:
    path = tmp_path / "cost.json"
    document = profile_document(FIT)
    path.write_text(json.dumps(document, indent=2) + "\n")
    model = CostModel.load(path)
    assert model == FIT
    for s in document["samples"]:
        composition = StepComposition(s["prefill_tokens"], s["decode_seqs"], s["decode_context_tokens"])
        assert model.predict(composition) == pytest.approx(s["ms"])


def test_a_scheduled_step_is_priced_by_its_batch_composition() -> None:
    scheduler = Scheduler(BlockPool(64), 4, max_num_seqs=8, max_tokens_per_step=40, enable_prefix_caching=False)
    decoding = [Request(f"d{i}", i, 10, list(range(10)), max_tokens=8) for i in range(3)]
    for r in decoding:
        scheduler.add(r)
    prefill = scheduler.schedule()
    assert StepComposition.of(prefill) == StepComposition(prefill_tokens=30)
    for s in prefill.scheduled:
        scheduler.after_step(s.request, s.num_new_tokens)
        s.request.token_ids.append(1)
    scheduler.add(Request("p", 9, 20, list(range(20)), max_tokens=8))
    mixed = scheduler.schedule()
    composition = StepComposition.of(mixed)
    assert composition == StepComposition(prefill_tokens=20, decode_seqs=3, decode_context_tokens=30)
    assert FIT.predict(mixed) == pytest.approx(2.5 + 0.04 * 20 + 0.3 * 3 + 0.001 * 30)
    assert FIT.predict(Scheduler(BlockPool(1), 4, 1, 1, False).schedule()) == 0.0


def test_a_document_without_a_fit_is_refused() -> None:
    with pytest.raises(ValueError, match="step-cost profile"):
        CostModel.from_profile({"samples": []})
