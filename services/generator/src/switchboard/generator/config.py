"""Generator settings: one typed object read from the environment once at start.

Identity defaults (replica id, advertised address, expert) depend on the bound port and the
loaded model, so they are resolved by the helpers below once those are known.
"""

from __future__ import annotations

import json
import math
import re
import socket
from collections.abc import Mapping
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any, ClassVar

from switchboard.common.settings import ServerSettings, SettingsError, load_settings, setting
from switchboard.replica.cost_model import CostModel

SERVER_PREFIX = "GENERATOR"
DEFAULT_PORT = 50061
DEFAULT_METRICS_PORT = 9111
DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "int8")  # switchboard.generator.models.quantize.QUANTIZATIONS (no torch import here)
BACKENDS = ("local", "remote")
REMOTE_ENGINES = ("auto", "vllm", "openai")  # remote.core.FLAVOURS (config imports no backend)
_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
_WILDCARD_HOSTS = {"0.0.0.0", "::", "[::]", ""}


@dataclass(frozen=True)
class GeneratorSettings:
    """Everything the generator reads from its environment."""

    # Generate carries the prompt's token ids and keeps the server limit; Info carries nothing; Score
    # carries a quality probe's texts (64 at most).
    server_defaults: ClassVar[Mapping[str, Any]] = {
        "max_method_message_bytes": ("Generator/Info=4096", "Generator/Score=1048576")
    }

    server: ServerSettings
    backend: str = setting(
        "GENERATOR_BACKEND",
        "local",
        "local: load GENERATOR_MODEL and run the engine here; remote: front the OpenAI-compatible engine server at GENERATOR_REMOTE_URL (vLLM, SGLang, TGI, `transformers serve`), loading no model",
        choices=BACKENDS,
    )
    remote_url: str = setting(
        "GENERATOR_REMOTE_URL",
        "",
        "base URL of the remote engine server, e.g. http://127.0.0.1:8000 (required with GENERATOR_BACKEND=remote)",
    )
    remote_model: str = setting(
        "GENERATOR_REMOTE_MODEL",
        "",
        "the model name the remote engine serves, sent as `model` (empty: GENERATOR_MODEL)",
    )
    remote_max_model_len: int = setting(
        "GENERATOR_REMOTE_MAX_MODEL_LEN",
        0,
        "context length announced for the remote engine (0: its /v1/models `max_model_len`, else GENERATOR_MODEL's config.json `max_position_embeddings`, else unknown)",
        minimum=0,
        maximum=1 << 30,
    )
    remote_token_ids: bool = setting(
        "GENERATOR_REMOTE_TOKEN_IDS",
        False,
        "the remote engine takes prompt token ids and streams the sampled ids (`return_token_ids`, vLLM); off: text in, text out, token counts from the final usage",
    )
    remote_engine: str = setting(
        "GENERATOR_REMOTE_ENGINE",
        "auto",
        "flavour of the remote engine, which decides the sampling fields sent beyond OpenAI's: vllm also sends `top_k`, `repetition_penalty`, `min_tokens` and `ignore_eos`; openai (transformers serve, TGI, others) sends none, and a request setting one is refused with INVALID_ARGUMENT; auto: vllm when the engine's /metrics exports `vllm:` metrics, else openai",
        choices=REMOTE_ENGINES,
    )
    remote_poll_seconds: float = setting(
        "GENERATOR_REMOTE_POLL_SECONDS",
        1.0,
        "interval of the remote engine's health and /metrics reads",
        minimum=0.05,
        maximum=60.0,
    )
    model: str = setting(
        "GENERATOR_MODEL",
        "",
        "model to serve: a Hugging Face model folder (required with the local backend; `switchboard up` passes the demo experts' folders; remote backend: optional, its config.json context length and, with GENERATOR_REMOTE_TOKEN_IDS, its tokenizer fingerprint are announced)",
    )
    expert: str = setting(
        "GENERATOR_EXPERT", "", "expert pool this replica serves (empty: the model folder's name)"
    )
    replica_id: str = setting("GENERATOR_REPLICA_ID", "", "unique replica id (empty: HOSTNAME-PORT)")
    advertise_addr: str = setting(
        "GENERATOR_ADVERTISE_ADDR",
        "",
        "host:port the gateway dials, sent to the scheduler (empty: GENERATOR_HOST:PORT, or HOSTNAME:PORT when listening on 0.0.0.0)",
    )
    device: str = setting("GENERATOR_DEVICE", "auto", "auto (cuda when available), cpu, cuda or cuda:N")
    dtype: str = setting(
        "GENERATOR_DTYPE",
        "auto",
        "weight dtype: auto (bfloat16 on CUDA; on CPU the faster of float32 and bfloat16 in a short step timed at load, logged as `dtype measured at load`; float32 for a float16 checkpoint), float32, bfloat16, float16 (naming one skips the timing)",
        choices=DTYPES,
    )
    quantize: str = setting(
        "GENERATOR_QUANTIZE",
        "none",
        "weight-only quantization of the linear layers, CPU only: none, or int8 (int8 weights with one scale per output channel through torch's `_weight_int8pack_mm`, activations in GENERATOR_DTYPE; speed and perplexity in bench/README.md, Weight-only int8)",
        choices=QUANTIZATIONS,
    )
    kv_cache_mb: int = setting(
        "GENERATOR_KV_CACHE_MB",
        0,
        "KV-cache pool size in MiB (0: 1024 on CPU, 60% of the free memory on CUDA)",
        minimum=0,
        maximum=1 << 24,
    )
    max_num_seqs: int = setting(
        "GENERATOR_MAX_NUM_SEQS", 64, "most sequences in the running batch", minimum=1, maximum=4096
    )
    max_waiting: int = setting(
        "GENERATOR_MAX_WAITING",
        256,
        "bound on the waiting queue (accepted, not yet running): a Generate arriving while this many wait is refused with RESOURCE_EXHAUSTED (reason REPLICA_QUEUE_FULL); announced to the scheduler, which stops placing here while the queue is full (default: 4 x the default GENERATOR_MAX_NUM_SEQS)",
        minimum=1,
        maximum=1 << 20,
    )
    block_size: int = setting(
        "GENERATOR_BLOCK_SIZE", 16, "tokens per KV-cache block", minimum=1, maximum=1024
    )
    max_tokens_per_step: int = setting(
        "GENERATOR_MAX_TOKENS_PER_STEP",
        512,
        "token budget of one engine step (long prompts are prefilled in chunks of at most this)",
        minimum=1,
        maximum=1 << 20,
    )
    prefix_caching: bool = setting(
        "GENERATOR_PREFIX_CACHING", True, "reuse the KV blocks of identical prompt prefixes"
    )
    default_max_tokens: int = setting(
        "GENERATOR_DEFAULT_MAX_TOKENS",
        64,
        "max_tokens of a request that leaves it 0",
        minimum=1,
        maximum=1 << 20,
    )
    scheduler_addr: str = setting(
        "SCHEDULER_ADDR", "127.0.0.1:50053", "host:port of the scheduler (empty: do not register)"
    )
    revision: str = setting(
        "GENERATOR_REVISION",
        "",
        "label of the model revision this replica serves, announced to the scheduler (rollouts move an expert's traffic between revisions; the gateway keys cached answers by it); empty: derived from GENERATOR_MODEL's files (`sha-` and 12 hex digits of its config and weights' sizes and edges), or none for a remote engine without a model folder",
    )
    fault_error_ratio: float = setting(
        "GENERATOR_FAULT_ERROR_RATIO",
        0.0,
        "fault injection for drills (rollback, failover): the share of Generate calls refused with UNAVAILABLE (reason INJECTED_FAULT) before any work, counted as failed by the replica; 0: off",
        minimum=0.0,
        maximum=1.0,
    )
    fault_first_token_delay_seconds: float = setting(
        "GENERATOR_FAULT_FIRST_TOKEN_DELAY_SECONDS",
        0.0,
        "fault injection for drills: seconds every Generate waits before its work starts (a slow revision); 0: off",
        minimum=0.0,
        maximum=600.0,
    )
    cost_profile: Path | None = setting(
        "GENERATOR_COST_PROFILE",
        None,
        "step-cost profile JSON of this model on this device (`python -m switchboard.generator.engine.profile`), announced to the scheduler; unset: none",
    )

    def __post_init__(self) -> None:
        if not _DEVICE.match(self.device):
            raise SettingsError(f"GENERATOR_DEVICE: must be auto, cpu, cuda or cuda:N; got {self.device!r}")
        if self.quantize != "none" and self.device.startswith("cuda"):
            raise SettingsError(
                f"GENERATOR_QUANTIZE: {self.quantize} runs on CPU only (torch's CPU int8 kernels); GENERATOR_DEVICE is {self.device}"
            )
        if self.quantize != "none" and self.dtype == "float16":
            raise SettingsError(
                f"GENERATOR_QUANTIZE: {self.quantize} computes in bfloat16 or float32, not GENERATOR_DTYPE=float16"
            )
        if self.backend == "remote":
            if not self.remote_url.startswith(("http://", "https://")):
                raise SettingsError(
                    f"GENERATOR_REMOTE_URL: must be the engine's http:// or https:// base URL with GENERATOR_BACKEND=remote, got {self.remote_url!r}"
                )
            if not (self.remote_model.strip() or self.model.strip()):
                raise SettingsError(
                    "GENERATOR_REMOTE_MODEL: required with GENERATOR_BACKEND=remote (the model name the engine serves)"
                )
        elif not self.model.strip():
            raise SettingsError("GENERATOR_MODEL: required (the folder of the model to serve)")
        for env, value in (
            ("GENERATOR_ADVERTISE_ADDR", self.advertise_addr),
            ("SCHEDULER_ADDR", self.scheduler_addr),
        ):
            if value and not _looks_like_address(value):
                raise SettingsError(f"{env}: must be host:port, got {value!r}")


def _looks_like_address(value: str) -> bool:
    host, sep, port = value.rpartition(":")
    return bool(sep and host and port.isdigit() and 1 <= int(port) <= 65535)


def load_generator_settings() -> GeneratorSettings:
    """Read the generator's settings from the environment (raises SettingsError naming the variable)."""
    return load_settings(
        GeneratorSettings,
        server_prefix=SERVER_PREFIX,
        default_port=DEFAULT_PORT,
        default_metrics_port=DEFAULT_METRICS_PORT,
    )


def load_cost_profile(path: Path | None) -> tuple[CostModel, str] | None:
    """The fitted step-cost model in GENERATOR_COST_PROFILE and the model it was profiled on (None
    when unset); raises SettingsError naming the variable for a missing or unusable file."""
    if path is None:
        return None
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
        model = CostModel.from_profile(document)
    except FileNotFoundError:
        raise SettingsError(f"GENERATOR_COST_PROFILE: {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise SettingsError(
            f"GENERATOR_COST_PROFILE: {path} is not a cost profile ({exc}); write one with "
            "`python -m switchboard.generator.engine.profile`"
        ) from None
    if not all(math.isfinite(c) and c >= 0 for c in astuple(model)):
        raise SettingsError(
            f"GENERATOR_COST_PROFILE: {path} has a negative or non-finite coefficient ({model}); profile again"
        )
    return model, str(document.get("model", ""))


def resolve_model_path(value: str) -> Path:
    """The model folder named by GENERATOR_MODEL, which must be an existing folder.

    The generator resolves no names: demo expert names are the tools' business (`switchboard up`
    builds them and hands each generator its folder), so the service never imports the CLI
    package. Raises SettingsError naming GENERATOR_MODEL when the folder is not there.
    """
    path = Path(value).expanduser()
    if path.is_dir():
        return path
    looks_like_path = "/" in value or value.startswith(".") or value.startswith("~")
    if looks_like_path:
        raise SettingsError(f"GENERATOR_MODEL: model folder {path} does not exist")
    raise SettingsError(
        f"GENERATOR_MODEL: {value!r} is not a model folder; give the path of one (a demo expert name is "
        "resolved by `switchboard up`; outside it, `switchboard experts path NAME` prints its folder)"
    )


def resolve_device(value: str) -> str:
    """`auto` becomes cuda when a GPU is visible, else cpu; other values pass through."""
    if value != "auto":
        return value
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_replica_id(port: int) -> str:
    """`<hostname>-<port>`: unique per process on a host, stable across restarts on the same port."""
    return f"{socket.gethostname()}-{port}"


def default_advertise_addr(host: str, port: int) -> str:
    """The address other services dial: the listen host, or this host's name when listening on all interfaces."""
    if host in _WILDCARD_HOSTS:
        host = socket.gethostname()
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"
