"""GENERATOR_DTYPE=auto on CPU: both dtypes timed at load, the faster kept; a named dtype times nothing.

Which dtype wins depends on the machine, so the tests check the mechanism (both candidates
timed, the model in the winner's dtype, the winner the one `fastest` picks from the recorded
figures) and the pure choice with made-up timings; none asserts a speed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from switchboard.generator.loader import load_model, measured_candidates
from switchboard.generator.models.dtype_choice import PROBE_ROWS, cast_parameters, fastest

sys.path.insert(0, str(Path(__file__).parent))
from engine_fixtures import build_gpt2, build_llama


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_llama(tmp_path_factory.mktemp("llama") / "tiny-llama")


def test_fastest_takes_the_lowest_summed_step_time_and_the_first_on_a_tie() -> None:
    assert fastest({"float32": {1: 2.0, 16: 3.0}, "bfloat16": {1: 1.0, 16: 3.5}}) == "bfloat16"
    assert fastest({"float32": {1: 1.0, 16: 3.0}, "bfloat16": {1: 0.5, 16: 4.0}}) == "float32"
    assert fastest({"float32": {1: 1.0}, "bfloat16": {1: 1.0}}) == "float32"


def test_only_cpu_auto_with_a_float32_or_bfloat16_checkpoint_is_measured() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert measured_candidates("auto", cpu, torch.float32) == (torch.float32, torch.bfloat16)
    assert measured_candidates("AUTO", cpu, torch.bfloat16) == (torch.float32, torch.bfloat16)
    assert measured_candidates("auto", cpu, None) == (torch.float32, torch.bfloat16)
    assert measured_candidates("auto", cpu, torch.float16) == ()
    assert measured_candidates("auto", cuda, torch.float32) == ()
    for named in ("float32", "bf16", "bfloat16"):
        assert measured_candidates(named, cpu, torch.float32) == ()


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_auto_times_both_dtypes_and_loads_the_winner(llama_dir: Path, quantize: str) -> None:
    loaded = load_model(llama_dir, "cpu", "auto", quantize=quantize)
    timings = loaded.dtype_timings
    assert timings is not None and set(timings) == {"float32", "bfloat16"}
    assert all(set(t) == set(PROBE_ROWS) and all(s > 0 for s in t.values()) for t in timings.values())
    assert loaded.dtype == getattr(torch, fastest(timings))
    assert {p.dtype for p in loaded.model.parameters()} == {loaded.dtype}
    assert loaded.model.inv_freq.dtype == torch.float32  # buffers are not cast
    # The timed copies were thrown away: the served model is not packed yet (the engine packs).
    assert quantize == "int8" or any(isinstance(m, torch.nn.Linear) for m in loaded.model.modules())
    ids = torch.tensor([[1, 2, 3, 4]])
    reference = load_model(llama_dir, "cpu", str(loaded.dtype).removeprefix("torch."), quantize=quantize)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids), reference.model(ids), rtol=0, atol=0)


def test_a_named_dtype_times_nothing(llama_dir: Path) -> None:
    for dtype in ("float32", "bfloat16"):
        loaded = load_model(llama_dir, "cpu", dtype)
        assert loaded.dtype_timings is None and loaded.dtype == getattr(torch, dtype)


def test_cast_parameters_keeps_tied_weights_tied(tmp_path: Path) -> None:
    loaded = load_model(build_gpt2(tmp_path / "gpt2"), "cpu", "float32")
    cast_parameters(loaded.model, torch.bfloat16)
    assert loaded.model.lm_head.weight is loaded.model.transformer.wte.weight
    assert loaded.model.lm_head.weight.dtype == torch.bfloat16
