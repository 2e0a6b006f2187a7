"""The gate artifact: a versioned folder that holds everything a learned gate needs.

    <folder>/gate.json          format, version, expert set, feature config, temperature,
                                default cost weight, training metrics
    <folder>/gate.safetensors   the GateNet weights and the unigram surprisal table
    <folder>/tokenizer.json     the feature tokenizer (so the router needs no model folder)

The version is a content hash of the weights and the config, so two artifacts with the same
version behave the same. Writing is atomic (a temporary sibling renamed into place): a router
never loads half an artifact. Loading checks everything and raises `GateArtifactError` with a
message that says what is wrong (missing, corrupt, another format, another expert set).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from switchboard.router.features import FeatureConfig, FeatureExtractor, tokenizer_fingerprint
from switchboard.router.learned_gate import GateNet, LearnedGate
from tokenizers import Tokenizer

FORMAT = "switchboard-router-gate/1"
CONFIG_FILE = "gate.json"
WEIGHTS_FILE = "gate.safetensors"
TOKENIZER_FILE = "tokenizer.json"
_SURPRISAL_KEY = "features.surprisal"


class GateArtifactError(ValueError):
    """The gate artifact cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class ArtifactExpert:
    """One expert as the gate was trained for it."""

    name: str
    relative_cost: float
    parameters: int = 0


@dataclass
class GateArtifact:
    """A loaded (or about to be written) gate."""

    net: GateNet
    features: FeatureConfig
    surprisal: list[float]
    experts: list[ArtifactExpert]
    temperature: float
    default_cost_weight: float
    tokenizer_path: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    version: str = ""
    created: str = ""

    @property
    def expert_names(self) -> list[str]:
        """Expert names in the net's output order."""
        return [e.name for e in self.experts]

    def gate(self) -> LearnedGate:
        """The serving gate of this artifact."""
        extractor = FeatureExtractor(Tokenizer.from_file(str(self.tokenizer_path)), self.features, self.surprisal)
        return LearnedGate(
            self.net, extractor, self.expert_names, temperature=self.temperature, version=self.version
        )


def _config(artifact: GateArtifact) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "experts": [{"name": e.name, "relative_cost": e.relative_cost, "parameters": e.parameters} for e in artifact.experts],
        "features": artifact.features.to_dict(),
        "net": {
            "num_buckets": artifact.net.num_buckets,
            "embed_dim": artifact.net.embed_dim,
            "hidden": artifact.net.hidden_dim,
        },
        "temperature": artifact.temperature,
        "default_cost_weight": artifact.default_cost_weight,
        "tokenizer_sha256": tokenizer_fingerprint(artifact.tokenizer_path),
        "metrics": artifact.metrics,
        "training": artifact.training,
    }


def _version(weights: bytes, config: Mapping[str, Any]) -> str:
    digest = hashlib.sha256(weights)
    digest.update(json.dumps(config, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def write_artifact(artifact: GateArtifact, folder: Path) -> str:
    """Write `artifact` to `folder` atomically (replacing what is there); returns its version."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        tensors = {f"net.{k}": v.detach().contiguous().clone() for k, v in artifact.net.state_dict().items()}
        tensors[_SURPRISAL_KEY] = torch.tensor(artifact.surprisal, dtype=torch.float32)
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        shutil.copyfile(artifact.tokenizer_path, tmp / TOKENIZER_FILE)
        config = _config(artifact)
        version = _version((tmp / WEIGHTS_FILE).read_bytes(), config)
        config["version"] = version
        config["created"] = datetime.now(UTC).isoformat(timespec="seconds")
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    artifact.version = version
    artifact.tokenizer_path = folder / TOKENIZER_FILE
    return version


def _require(config: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: Path) -> Any:
    value = config.get(key)
    if not isinstance(value, kind):
        raise GateArtifactError(f"{where}: field {key!r} is missing or malformed; rebuild the gate with `switchboard router train`")
    return value


def load_artifact(folder: Path) -> GateArtifact:
    """Load and check a gate artifact (raises GateArtifactError saying what is wrong)."""
    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise GateArtifactError(f"gate artifact {folder} does not exist; build one with `switchboard router train`")
    for name in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE):
        if not (folder / name).is_file():
            raise GateArtifactError(f"gate artifact {folder} has no {name}; it is incomplete, rebuild it")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GateArtifactError(f"{config_path} is not valid JSON ({exc}); the artifact is corrupt, rebuild it") from None
    if not isinstance(config, dict):
        raise GateArtifactError(f"{config_path} must hold a JSON object; the artifact is corrupt")
    if config.get("format") != FORMAT:
        raise GateArtifactError(
            f"{config_path} has format {config.get('format')!r}; this router reads {FORMAT!r}: retrain the gate"
        )
    experts_raw = _require(config, "experts", list, config_path)
    try:
        experts = [
            ArtifactExpert(str(e["name"]), float(e["relative_cost"]), int(e.get("parameters", 0))) for e in experts_raw
        ]
        features = FeatureConfig.from_dict(_require(config, "features", dict, config_path))
        net_config = _require(config, "net", dict, config_path)
        net = GateNet(
            int(net_config["num_buckets"]), len(experts), int(net_config["embed_dim"]), int(net_config["hidden"])
        )
        temperature = float(config["temperature"])
        default_cost_weight = float(config["default_cost_weight"])
    except (KeyError, TypeError, ValueError) as exc:
        raise GateArtifactError(f"{config_path}: malformed field ({exc}); rebuild the gate") from None
    if not experts or temperature <= 0:
        raise GateArtifactError(f"{config_path}: needs at least one expert and a temperature > 0")
    try:
        tensors = load_file(str(folder / WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError) as exc:
        raise GateArtifactError(f"{folder / WEIGHTS_FILE} cannot be read ({exc}); the artifact is corrupt, rebuild it") from None
    if _version((folder / WEIGHTS_FILE).read_bytes(), {k: v for k, v in config.items() if k not in ("version", "created")}) != config.get("version"):
        raise GateArtifactError(f"{folder}: weights or config do not match the recorded version; the artifact is corrupt")
    surprisal = tensors.pop(_SURPRISAL_KEY, None)
    state = {k.removeprefix("net."): v for k, v in tensors.items() if k.startswith("net.")}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise GateArtifactError(f"{folder / WEIGHTS_FILE} does not fit the recorded net shape: {exc}") from None
    if surprisal is None:
        raise GateArtifactError(f"{folder / WEIGHTS_FILE} has no surprisal table; the artifact is corrupt")
    if tokenizer_fingerprint(folder / TOKENIZER_FILE) != config.get("tokenizer_sha256"):
        raise GateArtifactError(f"{folder / TOKENIZER_FILE} does not match the recorded fingerprint; the artifact is corrupt")
    return GateArtifact(
        net=net.eval(),
        features=features,
        surprisal=surprisal.tolist(),
        experts=experts,
        temperature=temperature,
        default_cost_weight=default_cost_weight,
        tokenizer_path=folder / TOKENIZER_FILE,
        metrics=dict(config.get("metrics") or {}),
        training=dict(config.get("training") or {}),
        version=str(config["version"]),
        created=str(config.get("created", "")),
    )


def check_expert_set(artifact: GateArtifact, configured: Sequence[str]) -> None:
    """Raise GateArtifactError unless the artifact was trained for exactly the configured experts."""
    trained, wanted = set(artifact.expert_names), set(configured)
    if trained != wanted:
        missing = sorted(wanted - trained)
        extra = sorted(trained - wanted)
        parts = []
        if missing:
            parts.append(f"configured but not in the gate: {', '.join(missing)}")
        if extra:
            parts.append(f"in the gate but not configured: {', '.join(extra)}")
        raise GateArtifactError(
            f"gate {artifact.version} was trained for experts {', '.join(artifact.expert_names)}, "
            f"the experts config declares {', '.join(configured)} ({'; '.join(parts)}); "
            "retrain the gate for this config or unset ROUTER_GATE_PATH to use the built-in rule"
        )
