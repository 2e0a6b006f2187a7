"""Weight-only int8 (GENERATOR_QUANTIZE=int8): the kernel, the error bounds, the loader, the engine.

The tolerances come from the quantization itself: each weight is off by at most half its
row's step (`s / 2`), so a layer's output is off by at most `s_i / 2 * sum_k |x_k|`; a
whole model's logits move by about the sum of its serial layers' relative weight errors.
No timings here (bench/int8_bench.py measures speed).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
import torch
from switchboard.common.settings import SettingsError, load_settings
from switchboard.generator.config import DEFAULT_METRICS_PORT, DEFAULT_PORT, SERVER_PREFIX, GeneratorSettings
from switchboard.generator.loader import LoadedModel, ModelLoadError, check_quantization, load_model
from switchboard.generator.models.packed_linear import PackedLinear
from switchboard.generator.models.quantize import (
    DENSE_ROWS,
    INT8_LEVEL,
    Int8Linear,
    dequantize_int8,
    int8_available,
    quantize_int8,
    weight_error_bound,
)

sys.path.insert(0, str(Path(__file__).parent))
from engine_fixtures import build_gpt2, build_llama
from test_engine import PROMPTS, collect, greedy, reference_greedy, running_engine


def test_the_pinned_torch_has_the_int8_kernel() -> None:
    # torch is pinned (requirements), so a missing kernel is a failure here, never a skip.
    assert int8_available(), "aten._weight_int8pack_mm is missing from this torch build"


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_llama(tmp_path_factory.mktemp("llama") / "tiny-llama")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_gpt2(tmp_path_factory.mktemp("gpt2") / "tiny-gpt2")


def _folder(family: str, request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(f"{family}_dir")


# ---------------------------------------------------------------- one layer


def test_quantize_int8_rounds_each_row_to_within_half_a_step() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(40, 48, generator=gen) * torch.logspace(-3, 1, 40)[:, None]  # rows of very different size
    w[7] = 0.0  # an all-zero row: scale 1, weights 0
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and scales.shape == (40,) and int(q.abs().max()) == INT8_LEVEL
    err = (dequantize_int8(q, scales) - w).abs()
    assert bool((err <= weight_error_bound(scales)[:, None] * (1 + 1e-6)).all())
    assert scales[7] == 1.0 and not q[7].any()
    with pytest.raises(ValueError, match="2-D"):
        quantize_int8(torch.zeros(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_is_the_dequantized_matmul_and_within_the_bound_of_the_dense_one(dtype: torch.dtype) -> None:
    """Any row count and leading shape, with and without bias; the error against the dense layer
    stays under `s_i / 2 * sum|x|` (plus the activation dtype's own rounding of the output)."""
    gen = torch.Generator().manual_seed(1)
    eps = torch.finfo(dtype).eps
    for bias in (True, False):
        dense = torch.nn.Linear(48, 40, bias=bias)
        layer = Int8Linear(dense.weight, dense.bias, dtype)
        w_hat = layer.dequantized_weight()
        for shape in ((1, 48), (37, 48), (2, 5, 48), (DENSE_ROWS + 1, 48), (3, 50, 48)):
            x = torch.randn(shape, generator=gen).to(dtype)
            with torch.no_grad():
                got = layer(x).float()
                exact = torch.nn.functional.linear(x.float(), w_hat, None if dense.bias is None else dense.bias.to(dtype).float())
                want = dense(x.float())
            assert got.shape == want.shape
            rounding = eps * (x.float().abs() @ w_hat.abs().T + exact.abs()) + 1e-6
            assert bool(((got - exact).abs() <= rounding).all())
            bound = x.float().abs().sum(-1, keepdim=True) * weight_error_bound(layer.scales) + rounding
            assert bool(((got - want).abs() <= bound).all())


def test_int8_linear_refuses_what_the_kernel_cannot_run() -> None:
    with pytest.raises(ValueError, match="2-D CPU weight"):
        Int8Linear(torch.zeros(3), None)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        Int8Linear(torch.zeros(4, 4), None, torch.float16)


# ---------------------------------------------------------------- whole models


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_quantized_logits_stay_within_the_quantization_error(
    family: str, dtype: str, request: pytest.FixtureRequest
) -> None:
    """The int8 model computes exactly the dense model with dequantized weights (float32: 1e-4);
    against the unquantized model its logits move by at most twice the summed relative weight
    error of the layers a token passes through (first-order error propagation)."""
    folder = _folder(family, request)
    dense = load_model(folder, "cpu", dtype)
    quantized = load_model(folder, "cpu", dtype, quantize="int8")
    assert quantized.quantization == "int8" and dense.quantization == "none"
    assert quantized.parameter_count == dense.parameter_count
    assert not any(isinstance(m, torch.nn.Linear) for m in quantized.model.modules())
    layers = [m for m in quantized.model.modules() if isinstance(m, Int8Linear)]
    assert layers and all(m.scales.dtype == quantized.dtype for m in layers)

    # The dense model with every linear weight replaced by its dequantized int8 value.
    dequantized = load_model(folder, "cpu", "float32")
    dequantized.model.prepare_for_serving(pack=False)
    head = dequantized.model.lm_head  # untied: the int8 head is a copy, the embedding stays dense
    head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    dense_linears = [m for m in dequantized.model.modules() if isinstance(m, torch.nn.Linear)]
    if family == "llama" or not dequantized.model.config.tie_word_embeddings:
        assert len(dense_linears) == len(layers)
    relative = []
    with torch.no_grad():
        for ours, theirs in _pairs(quantized.model, dequantized.model, family):
            relative.append(float((ours.dequantized_weight() - theirs.float()).norm() / theirs.float().norm()))
            theirs.copy_(ours.dequantized_weight().to(theirs.dtype))

    ids = torch.randint(0, dense.model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = quantized.model(ids).float()
        want = dense.model(ids).float()
        same_weights = dequantized.model(ids).float()
    if dtype == "float32":
        torch.testing.assert_close(got, same_weights, rtol=1e-4, atol=1e-4)
    serial = _serial_layers(dense.model, family)
    tolerance = 2 * max(relative) * serial
    if dtype == "bfloat16":  # both sides also round activations to bf16 once per layer
        tolerance += 2 * serial * torch.finfo(torch.bfloat16).eps
    change = float((got - want).norm() / want.norm())
    assert change <= tolerance, (change, tolerance, relative)
    assert 0 < tolerance < 0.5  # the bound says something


def _serial_layers(model: torch.nn.Module, family: str) -> int:
    """Linear layers one token's hidden state passes through in series (2 per block, then the head)."""
    config = model.config
    return 2 * config.num_hidden_layers + 1


def _pairs(quantized: torch.nn.Module, dense: torch.nn.Module, family: str):  # type: ignore[no-untyped-def]
    """(Int8Linear, the matching dense weight [out, in]) for every quantized layer."""
    from switchboard.generator.models.gpt2 import Conv1D

    dense_modules = dict(dense.named_modules())
    for name, module in quantized.named_modules():
        if isinstance(module, Int8Linear):
            other = dense_modules[name]
            if isinstance(other, Conv1D):
                yield module, _TransposedView(other.weight)
            else:
                yield module, other.weight


class _TransposedView:
    """A Conv1D weight [in, out] seen as [out, in], writable."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight

    def float(self) -> torch.Tensor:
        return self.weight.t().float()

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    def copy_(self, value: torch.Tensor) -> None:
        self.weight.copy_(value.t())


# ---------------------------------------------------------------- the engine


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("prefix_caching", [False, True])
async def test_int8_greedy_through_the_paged_engine_equals_the_int8_model_recomputed(
    family: str, prefix_caching: bool, request: pytest.FixtureRequest
) -> None:
    """Batched greedy decoding over the paged KV cache (chunked prefill, prefix reuse) gives the
    tokens of the same int8 model recomputing each whole sequence."""
    loaded: LoadedModel = load_model(_folder(family, request), "cpu", "float32", quantize="int8")
    engine = await running_engine(loaded, enable_prefix_caching=prefix_caching, max_tokens_per_step=10)
    try:
        assert not any(isinstance(m, (torch.nn.Linear, PackedLinear)) for m in loaded.model.modules())
        assert engine.info.quantization == "int8"  # what Generator.Info reports
        prompts = [*PROMPTS, PROMPTS[1] + " and more"]
        results = await asyncio.gather(
            *(collect(engine, _request(f"q{i}", p)) for i, p in enumerate(prompts))
        )
        for prompt, (got, _, _) in zip(prompts, results, strict=True):
            assert got == reference_greedy(_Logits(loaded.model), loaded.tokenizer.encode(prompt), 10)
        assert engine.pool.num_used == 0
    finally:
        await engine.stop()


def _request(request_id: str, prompt: str):  # type: ignore[no-untyped-def]
    from switchboard.generator.engine import EngineRequest

    return EngineRequest(request_id, prompt=prompt, sampling=greedy(10))


class _Logits:
    """Our model called like a transformers one (`.logits`), for `reference_greedy`."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def __call__(self, ids: torch.Tensor):  # type: ignore[no-untyped-def]
        class Out:
            logits = self.model(ids)

        return Out


# ---------------------------------------------------------------- the setting


def _settings(tmp_path: Path, **environ: str) -> GeneratorSettings:
    return load_settings(
        GeneratorSettings,
        server_prefix=SERVER_PREFIX,
        default_port=DEFAULT_PORT,
        default_metrics_port=DEFAULT_METRICS_PORT,
        environ={"GENERATOR_MODEL": str(tmp_path), **environ},
    )


def test_generator_quantize_setting_is_off_by_default_and_validated_at_start(tmp_path: Path) -> None:
    assert _settings(tmp_path).quantize == "none"
    assert _settings(tmp_path, GENERATOR_QUANTIZE="int8").quantize == "int8"
    for environ in (
        {"GENERATOR_QUANTIZE": "int4"},
        {"GENERATOR_QUANTIZE": "INT8 "},
        {"GENERATOR_QUANTIZE": "int8", "GENERATOR_DEVICE": "cuda"},
        {"GENERATOR_QUANTIZE": "int8", "GENERATOR_DTYPE": "float16"},
    ):
        with pytest.raises(SettingsError, match="GENERATOR_QUANTIZE"):
            _settings(tmp_path, **environ)


def test_loader_refuses_an_unknown_scheme_or_a_non_cpu_device(llama_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"'int4' is not supported; choose one of: none, int8"):
        load_model(llama_dir, "cpu", "float32", quantize="int4")
    with pytest.raises(ModelLoadError, match="CPU only"):
        check_quantization("int8", torch.device("cuda"))
    assert check_quantization("none", torch.device("cuda")) == "none"
