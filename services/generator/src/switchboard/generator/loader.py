"""Load a Hugging Face-format model folder into our own torch modules.

A folder holds config.json, weights (model.safetensors, sharded
model-0000N-of-0000M.safetensors with model.safetensors.index.json, or
pytorch_model.bin) and tokenizer.json. The model is built on the meta device
and each checkpoint tensor is read, cast to the target dtype and assigned one at
a time, so no full-size float32 copy of a large model ever exists. The weight
check is strict: a missing or unexpected tensor, or a shape that differs from
what config.json implies, is a `ModelLoadError` naming the tensor.

Run `python -m switchboard.generator.loader DIR` to print a summary of a folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from switchboard.common.logging import get_logger
from switchboard.generator.models.dtype_choice import cast_parameters, fastest, measure_dtypes
from switchboard.generator.models.quantize import QUANTIZATIONS, int8_available
from switchboard.generator.models.registry import ModelFamily, UnsupportedModelError, resolve_family
from switchboard.generator.tokenizer import Tokenizer
from torch import nn

log = get_logger("switchboard.generator.loader")

#: dtype names accepted by `load_model`, per device type.
SUPPORTED_DTYPES: dict[str, dict[str, torch.dtype]] = {
    "cpu": {"float32": torch.float32, "bfloat16": torch.bfloat16},
    "cuda": {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32},
}
_DTYPE_ALIASES = {
    "fp32": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "float": "float32",
}


class ModelLoadError(RuntimeError):
    """A model folder cannot be served; the message names the problem and the path."""


@dataclass
class LoadedModel:
    """A model ready to serve: module (eval, on device, in dtype), tokenizer and facts about it."""

    model: nn.Module
    tokenizer: Tokenizer
    architecture: str
    name: str
    device: torch.device
    dtype: torch.dtype
    max_model_len: int
    eos_token_ids: set[int]
    parameter_count: int
    path: Path | None = None
    #: Weight quantization of the linear layers: "none", or "int8" (weight-only, per-channel scales).
    quantization: str = "none"
    #: dtype "auto" on CPU: best one-token step seconds per candidate dtype and row count, timed
    #: at load (`models/dtype_choice.py`); None when the dtype was named or there was one candidate.
    dtype_timings: dict[str, dict[int, float]] | None = None


def cpu_supports_bfloat16() -> bool:
    """True when this CPU runs bfloat16 matmuls natively (AVX512-BF16 or AMX via oneDNN)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_dtype(
    dtype: str, device: torch.device, checkpoint_dtype: torch.dtype | None = None
) -> torch.dtype:
    """The torch dtype to load into; ModelLoadError for a dtype the device does not support.

    "auto" is bfloat16 on CUDA; on CPU bfloat16 where the CPU has native bf16
    support and the checkpoint is bf16 or fp32, float32 otherwise. (`load_model`
    decides CPU "auto" by timing both instead, see `measured_candidates`.)
    """
    name = _DTYPE_ALIASES.get(dtype.lower(), dtype.lower()) if isinstance(dtype, str) else str(dtype)
    supported = SUPPORTED_DTYPES.get(device.type)
    if supported is None:
        raise ModelLoadError(f"unsupported device type {device.type!r}; use cpu or cuda")
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        bf16_checkpoint = checkpoint_dtype in (None, torch.bfloat16, torch.float32)
        return torch.bfloat16 if bf16_checkpoint and cpu_supports_bfloat16() else torch.float32
    if name not in supported:
        raise ModelLoadError(
            f"dtype {dtype!r} is not supported on {device.type}; choose one of: auto, {', '.join(supported)}"
        )
    return supported[name]


def measured_candidates(
    dtype: str, device: torch.device, checkpoint_dtype: torch.dtype | None
) -> tuple[torch.dtype, ...]:
    """The dtypes "auto" times at load on CPU (float32 and bfloat16); () when nothing is measured:
    a named dtype, CUDA (bfloat16), or a float16 checkpoint (float32, as `resolve_dtype`)."""
    name = _DTYPE_ALIASES.get(dtype.lower(), dtype.lower()) if isinstance(dtype, str) else str(dtype)
    if name != "auto" or device.type != "cpu" or checkpoint_dtype not in (None, torch.bfloat16, torch.float32):
        return ()
    return (torch.float32, torch.bfloat16)


def _read_config(path: Path) -> dict[str, Any]:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"missing config.json in model folder {path}")
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"config.json in {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"config.json in {path} is not a JSON object")
    return data


def weight_files(path: Path) -> list[Path]:
    """The checkpoint files of a folder, safetensors preferred; ModelLoadError if there are none."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ModelLoadError(f"{index} has no valid weight_map: {exc}") from exc
            files = [path / name for name in sorted(set(weight_map.values()))]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise ModelLoadError(f"weight shards listed in {index} are missing: {', '.join(missing)}")
            return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    shards = sorted(path.glob("*.safetensors"))
    if shards:
        return shards
    bin_file = path / "pytorch_model.bin"
    if bin_file.is_file():
        return [bin_file]
    raise ModelLoadError(
        f"no weights in model folder {path}: expected model.safetensors, sharded *.safetensors "
        "with model.safetensors.index.json, or pytorch_model.bin"
    )


def iter_checkpoint(files: list[Path]) -> Iterator[tuple[str, Any]]:
    """(name, loader) pairs over every tensor of the checkpoint; loader() reads that one tensor."""
    for file in files:
        if file.suffix == ".safetensors":
            try:
                handle = safe_open(str(file), framework="pt", device="cpu")
            except Exception as exc:  # safetensors raises its own error types for corrupt headers
                raise ModelLoadError(f"cannot read weights file {file}: {exc}") from exc
            for key in handle.keys():
                yield key, (lambda h=handle, k=key: h.get_tensor(k))
        else:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # torch.load raises many types (pickle, zip, runtime)
                raise ModelLoadError(f"cannot read weights file {file}: {exc}") from exc
            if not isinstance(state, dict):
                raise ModelLoadError(f"weights file {file} does not hold a state dict")
            for key, tensor in state.items():
                yield key, (lambda t=tensor: t)


def _checkpoint_dtype(files: list[Path]) -> torch.dtype | None:
    """The floating dtype of the first floating tensor (to choose "auto")."""
    for _, load in iter_checkpoint(files[:1]):
        tensor = load()
        if tensor.is_floating_point():
            return tensor.dtype
    return None


def _load_weights(
    model: nn.Module,
    family: ModelFamily,
    config: Any,
    files: list[Path],
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    """Read, check and assign every tensor into the meta-built `model`; strict."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}
    tied = family.tied_key(config)
    if tied is not None:
        expected.pop(tied, None)
    model_keys = set(expected)
    loaded: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for raw_key, load in iter_checkpoint(files):
        if any(p.search(raw_key) for p in family.ignored_keys):
            continue
        key = family.rename_key(raw_key, model_keys)
        if key == tied:
            continue  # some tied checkpoints still store the head; ours shares the embedding
        if key not in expected:
            unexpected.append(raw_key)
            continue
        tensor = load()
        if tuple(tensor.shape) != expected[key]:
            raise ModelLoadError(
                f"shape mismatch for tensor {raw_key!r} in {files[0].parent}: checkpoint has "
                f"{tuple(tensor.shape)}, config.json implies {expected[key]}"
            )
        if tensor.is_floating_point():
            tensor = tensor.to(device=device, dtype=dtype)
        loaded[key] = tensor.to(device).contiguous()
    missing = sorted(model_keys - loaded.keys())
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
        if unexpected:
            parts.append(
                f"unexpected tensors: {', '.join(unexpected[:8])}" + (" ..." if len(unexpected) > 8 else "")
            )
        raise ModelLoadError(
            f"checkpoint in {files[0].parent} does not match config.json: " + "; ".join(parts)
        )
    model.load_state_dict(loaded, strict=False, assign=True)
    family.finalize(model, device)
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise ModelLoadError(
            f"tensors left unloaded after reading {files[0].parent}: {', '.join(still_meta)}"
        )


def _parameter_count(model: nn.Module) -> int:
    """Distinct parameters (tied ones counted once)."""
    return sum(p.numel() for p in model.parameters())


def check_quantization(quantize: str, device: torch.device) -> str:
    """The quantization scheme name, checked against the device; ModelLoadError otherwise."""
    if quantize not in QUANTIZATIONS:
        raise ModelLoadError(f"weight quantization {quantize!r} is not supported; choose one of: {', '.join(QUANTIZATIONS)}")
    if quantize != "none" and device.type != "cpu":
        raise ModelLoadError(f"weight quantization {quantize!r} runs on CPU only (torch's CPU int8 kernels); the device is {device}")
    if quantize == "int8" and not int8_available():
        raise ModelLoadError("weight quantization 'int8' needs aten._weight_int8pack_mm, which this torch build lacks")
    return quantize


def load_model(
    path: Path | str, device: str | torch.device = "cpu", dtype: str = "auto", quantize: str = "none"
) -> LoadedModel:
    """Load a model folder onto `device` in `dtype`; ModelLoadError names whatever is wrong.

    `quantize="int8"` (CPU only) fuses the projections and makes every linear layer and the
    output head weight-only int8 (`models/quantize.py`), computing in `dtype`.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"model folder {path} does not exist or is not a directory")
    target = torch.device(device)
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested for {path} but CUDA is not available")
    quantize = check_quantization(quantize, target)
    config_json = _read_config(path)
    try:
        family = resolve_family(config_json)
        config = family.parse_config(config_json)
    except UnsupportedModelError as exc:
        raise ModelLoadError(f"cannot serve model in {path}: {exc}") from exc
    except (TypeError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"config.json in {path} is missing or has invalid fields: {exc}") from exc
    files = weight_files(path)
    if not (path / "tokenizer.json").is_file():
        raise ModelLoadError(f"missing tokenizer.json in model folder {path}")
    checkpoint_dtype = _checkpoint_dtype(files)
    torch_dtype = resolve_dtype(dtype, target, checkpoint_dtype)
    candidates = measured_candidates(dtype, target, checkpoint_dtype)
    if candidates:
        torch_dtype = torch.float32  # loaded exactly, cast to the measured winner below
    with torch.device("meta"):
        model = family.model_class(config)
    _load_weights(model, family, config, files, target, torch_dtype)
    model.eval().requires_grad_(False)
    timings = None
    if candidates:
        from switchboard.generator.models.packed_linear import packing_available

        timings = measure_dtypes(model, candidates, quantize, pack=packing_available())
        choice = fastest(timings)
        torch_dtype = getattr(torch, choice)
        cast_parameters(model, torch_dtype)
        log.info(
            "dtype measured at load",
            model=path.name,
            chosen=choice,
            quantize=quantize,
            **{f"{name}_step_ms": {rows: round(1e3 * t, 3) for rows, t in times.items()} for name, times in timings.items()},
        )
    parameter_count = _parameter_count(model)  # before quantizing: int8 weights are buffers
    if quantize != "none":
        model.quantize_for_serving(quantize)
    try:
        tokenizer = Tokenizer.from_dir(path, config_json)
    except Exception as exc:  # tokenizers raises a bare Exception for malformed files
        raise ModelLoadError(f"cannot read tokenizer.json in {path}: {exc}") from exc
    vocab = config.vocab_size
    if tokenizer.vocab_size > vocab:
        raise ModelLoadError(
            f"tokenizer.json in {path} has {tokenizer.vocab_size} tokens but the model's vocab_size is {vocab}"
        )
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        architecture=family.name,
        name=path.resolve().name,
        device=target,
        dtype=torch_dtype,
        max_model_len=int(family.max_model_len(config)),
        eos_token_ids=set(tokenizer.eos_token_ids),
        parameter_count=parameter_count,
        path=path,
        quantization=quantize,
        dtype_timings=timings,
    )


def _summary(loaded: LoadedModel) -> str:
    """Human-readable description of a loaded model."""
    c = loaded.model.config
    return "\n".join(
        [
            f"name:            {loaded.name}",
            f"path:            {loaded.path}",
            f"architecture:    {loaded.architecture} ({type(loaded.model).__name__})",
            f"parameters:      {loaded.parameter_count:,}",
            f"device / dtype:  {loaded.device} / {str(loaded.dtype).removeprefix('torch.')}"
            + ("" if loaded.quantization == "none" else f" activations, {loaded.quantization} weights"),
            f"layers / heads:  {c.num_hidden_layers} layers, {c.num_attention_heads} heads, "
            f"{c.num_key_value_heads} kv heads, head size {c.head_size}",
            f"vocab:           model {c.vocab_size}, tokenizer {loaded.tokenizer.vocab_size}",
            f"max_model_len:   {loaded.max_model_len}",
            f"bos / eos ids:   {loaded.tokenizer.bos_token_id} / {sorted(loaded.eos_token_ids)}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """Command line: load a model folder and print its summary (exit 1 with the reason if it cannot load)."""
    parser = argparse.ArgumentParser(
        prog="python -m switchboard.generator.loader",
        description="Load a Hugging Face-format model folder the way the generator does and print a summary.",
    )
    parser.add_argument("path", type=Path, help="model folder (config.json, weights, tokenizer.json)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (default: auto)")
    parser.add_argument(
        "--quantize", default="none", choices=QUANTIZATIONS, help="weight quantization (default: none)"
    )
    parser.add_argument(
        "--prompt", default=None, help="also run one greedy step on this prompt and print the next token"
    )
    args = parser.parse_args(argv)
    try:
        loaded = load_model(args.path, args.device, args.dtype, args.quantize)
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(_summary(loaded))
    if args.prompt is not None:
        ids = loaded.tokenizer.encode(args.prompt)
        with torch.inference_mode():
            logits = loaded.model(torch.tensor([ids], device=loaded.device))
        next_id = int(logits[0, -1].argmax())
        print(f"prompt ids:      {ids}")
        print(f"greedy next:     {next_id} {loaded.tokenizer.decode([next_id])!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
