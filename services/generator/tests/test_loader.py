"""load_model: checkpoint formats, dtypes, tied weights, special ids, and bad folders named clearly."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from switchboard.generator.loader import (
    ModelLoadError,
    cpu_supports_bfloat16,
    load_model,
    main,
    resolve_dtype,
)

Maker = Callable[..., tuple[Path, Any]]


def logits_of(model: Any, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    return out.logits[0] if hasattr(out, "logits") else out[0]


IDS = [1, 5, 9, 33, 2, 100, 7]


def test_loaded_model_fields(make_model_dir: Maker) -> None:
    folder, hf = make_model_dir("llama-gqa")
    loaded = load_model(folder, dtype="float32")
    assert loaded.architecture == "llama"
    assert loaded.name == "llama-gqa"
    assert loaded.device == torch.device("cpu") and loaded.dtype == torch.float32
    assert loaded.max_model_len == 128
    assert loaded.eos_token_ids == {0}
    assert loaded.parameter_count == sum(p.numel() for p in hf.parameters())
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight  # tied
    assert not loaded.model.training
    assert all(not p.requires_grad and not p.is_meta for p in loaded.model.parameters())
    assert loaded.tokenizer.decode(loaded.tokenizer.encode("To be 日本")) == "To be 日本"


def test_sliding_window_caps_max_model_len(make_model_dir: Maker) -> None:
    folder, _ = make_model_dir("mistral")
    assert load_model(folder, dtype="float32").max_model_len == 64


def test_sharded_safetensors(make_model_dir: Maker) -> None:
    folder, hf = make_model_dir("llama")
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    keys = sorted(state)
    halves = {
        "model-00001-of-00002.safetensors": keys[: len(keys) // 2],
        "model-00002-of-00002.safetensors": keys[len(keys) // 2 :],
    }
    weight_map = {}
    for name, part in halves.items():
        save_file({k: state[k] for k in part}, str(folder / name))
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    loaded = load_model(folder, dtype="float32")
    torch.testing.assert_close(logits_of(loaded.model, IDS), logits_of(hf, IDS), rtol=1e-4, atol=1e-4)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(
        ModelLoadError,
        match=r"weight shards listed in .*model\.safetensors\.index\.json are missing: model-00002-of-00002\.safetensors",
    ):
        load_model(folder, dtype="float32")


def test_pytorch_model_bin(make_model_dir: Maker) -> None:
    folder, hf = make_model_dir("qwen2")
    (folder / "model.safetensors").unlink()
    torch.save(hf.state_dict(), folder / "pytorch_model.bin")
    loaded = load_model(folder, dtype="float32")
    torch.testing.assert_close(logits_of(loaded.model, IDS), logits_of(hf, IDS), rtol=1e-4, atol=1e-4)


def test_gpt2_checkpoint_without_prefix_and_with_mask_buffers(make_model_dir: Maker) -> None:
    """The layout of the original `gpt2` checkpoint: keys saved from GPT2Model, causal-mask buffers kept."""
    folder, hf = make_model_dir("gpt2")
    state = {
        k.removeprefix("transformer."): v.contiguous()
        for k, v in hf.state_dict().items()
        if k != "lm_head.weight"
    }
    for i in range(hf.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 128, 128))
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(state, str(folder / "model.safetensors"))
    loaded = load_model(folder, dtype="float32")
    assert loaded.architecture == "gpt2"
    torch.testing.assert_close(logits_of(loaded.model, IDS), logits_of(hf, IDS), rtol=1e-4, atol=1e-4)


def test_bfloat16_load(make_model_dir: Maker) -> None:
    folder, hf = make_model_dir("llama")
    loaded = load_model(folder, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())
    assert loaded.model.inv_freq.dtype == torch.float32  # RoPE table stays exact
    ours = logits_of(loaded.model, IDS).float()
    torch.testing.assert_close(ours, logits_of(hf, IDS), rtol=0.05, atol=0.05)


def test_bf16_checkpoint_loads_as_float32(make_model_dir: Maker) -> None:
    folder, _ = make_model_dir("gpt2")
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in load_file(folder / "model.safetensors").items()}
    save_file(state, str(folder / "model.safetensors"))
    loaded = load_model(folder, dtype="float32")
    assert loaded.model.transformer.wte.weight.dtype == torch.float32
    assert torch.equal(loaded.model.transformer.wte.weight, state["transformer.wte.weight"].float())


def test_dtype_resolution() -> None:
    cpu = torch.device("cpu")
    expected_auto = torch.bfloat16 if cpu_supports_bfloat16() else torch.float32
    assert resolve_dtype("auto", cpu, torch.float32) == expected_auto
    assert resolve_dtype("auto", cpu, torch.float16) == torch.float32
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cuda")) == torch.float16
    with pytest.raises(
        ModelLoadError,
        match=r"dtype 'float16' is not supported on cpu; choose one of: auto, float32, bfloat16",
    ):
        resolve_dtype("float16", cpu)
    with pytest.raises(ModelLoadError, match=r"dtype 'int8' is not supported on cuda"):
        resolve_dtype("int8", torch.device("cuda"))


# ---- bad folders: each error names the problem and the path ----


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"model folder .*nowhere does not exist"):
        load_model(tmp_path / "nowhere")


def test_missing_config(make_model_dir: Maker) -> None:
    folder, _ = make_model_dir("gpt2")
    (folder / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=rf"missing config\.json in model folder {folder}"):
        load_model(folder)


def test_invalid_config_json(make_model_dir: Maker) -> None:
    folder, _ = make_model_dir("gpt2")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=rf"config\.json in {folder} is not valid JSON"):
        load_model(folder)


def test_config_missing_a_required_field(make_model_dir: Maker) -> None:
    folder, _ = make_model_dir("llama")
    config = json.loads((folder / "config.json").read_text())
    del config["hidden_size"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ModelLoadError, match=rf"config\.json in {folder} is missing or has invalid fields: .*hidden_size"
    ):
        load_model(folder)


def test_missing_weights(make_model_dir: Maker) -> None:
    folder, _ = make_model_dir("llama")
    (folder / "model.safetensors").unlink()
    with pytest.raises(
        ModelLoadError, match=rf"no weights in model folder {folder}: expected model\.safetensors"
    ):
        load_model(folder)


def test_corrupt_weights(make_model_dir: Maker) -> None:
    folder, _ = make_model_dir("llama")
    (folder / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ModelLoadError, match=r"cannot read weights file .*model\.safetensors"):
        load_model(folder)


def test_missing_tokenizer(make_model_dir: Maker) -> None:
    folder, _ = make_model_dir("gpt2")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match=rf"missing tokenizer\.json in model folder {folder}"):
        load_model(folder)


def test_corrupt_tokenizer(make_model_dir: Maker) -> None:
    folder, _ = make_model_dir("gpt2")
    (folder / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=rf"cannot read tokenizer\.json in {folder}"):
        load_model(folder)


def test_tokenizer_larger_than_vocab(make_model_dir: Maker) -> None:
    folder, _ = make_model_dir("gpt2", vocab_size=300)
    with pytest.raises(
        ModelLoadError, match=r"tokenizer\.json in .* has 384 tokens but the model's vocab_size is 300"
    ):
        load_model(folder)


def test_unknown_architecture(make_model_dir: Maker) -> None:
    folder, _ = make_model_dir("gpt2")
    (folder / "config.json").write_text(
        json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"})
    )
    with pytest.raises(ModelLoadError) as info:
        load_model(folder)
    message = str(info.value)
    assert str(folder) in message
    assert "unknown architecture (architectures=['BertForMaskedLM'], model_type='bert')" in message
    supported = "GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"
    assert f"supported: {supported}" in message


def test_unsupported_rope_scaling(make_model_dir: Maker) -> None:
    """More cases (malformed parameters, v4 spelling) are in test_rope_scaling.py."""
    folder, _ = make_model_dir("llama")
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 500000.0, "factor": 8.0}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ModelLoadError,
        match=r"cannot serve model in .*: RoPE scaling type 'longrope' is not supported; "
        r"supported: default, dynamic, linear, llama3, yarn",
    ):
        load_model(folder)


def test_shape_mismatch_names_tensor_and_both_shapes(make_model_dir: Maker) -> None:
    folder, _ = make_model_dir("llama")
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as info:
        load_model(folder)
    message = str(info.value)
    assert message == (
        f"shape mismatch for tensor 'model.layers.0.mlp.down_proj.weight' in {folder}: "
        "checkpoint has (64, 128), config.json implies (64, 96)"
    )


def test_missing_and_unexpected_tensors(make_model_dir: Maker) -> None:
    folder, _ = make_model_dir("llama")
    state = load_file(folder / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.layers.1.mlp.extra.weight"] = torch.zeros(2)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ModelLoadError) as info:
        load_model(folder)
    message = str(info.value)
    assert f"checkpoint in {folder} does not match config.json" in message
    assert "missing tensors: model.layers.1.mlp.up_proj.weight" in message
    assert "unexpected tensors: model.layers.1.mlp.extra.weight" in message


def test_untied_model_without_lm_head_is_missing_a_tensor(make_model_dir: Maker) -> None:
    folder, _ = make_model_dir("llama")  # tie_word_embeddings false
    state = load_file(folder / "model.safetensors")
    del state["lm_head.weight"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"missing tensors: lm_head\.weight"):
        load_model(folder)


def test_cuda_device(make_model_dir: Maker) -> None:
    """On a CUDA machine the model lands there in bf16; elsewhere the request fails clearly."""
    folder, hf = make_model_dir("gpt2")
    if torch.cuda.is_available():
        loaded = load_model(folder, device="cuda")
        assert loaded.dtype == torch.bfloat16
        assert all(p.device.type == "cuda" for p in loaded.model.parameters())
        with torch.no_grad():
            ours = loaded.model(torch.tensor([IDS], device="cuda"))[0].float().cpu()
        torch.testing.assert_close(ours, logits_of(hf, IDS), rtol=0.05, atol=0.05)
    else:
        with pytest.raises(ModelLoadError, match=r"device 'cuda' requested for .* but CUDA is not available"):
            load_model(folder, device="cuda")


# ---- command line ----


def test_cli_prints_summary(make_model_dir: Maker, capsys: pytest.CaptureFixture[str]) -> None:
    folder, _ = make_model_dir("gpt2")
    assert main([str(folder), "--dtype", "float32", "--prompt", "To be"]) == 0
    out = capsys.readouterr().out
    assert "architecture:    gpt2 (GPT2LMHeadModel)" in out
    assert "device / dtype:  cpu / float32" in out
    assert "greedy next:" in out


def test_cli_reports_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path)]) == 1
    assert f"error: missing config.json in model folder {tmp_path}" in capsys.readouterr().err


def test_cli_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "switchboard.generator.loader", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "Load a Hugging Face-format model folder" in result.stdout
