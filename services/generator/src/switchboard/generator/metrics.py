"""The generator's domain metrics (Prometheus); per-RPC counters and latency come from the shared server.

Request-level metrics are recorded by the servicer as requests finish; engine-level gauges (queue
depth, KV blocks, tokens/s) are read from `engine.load()` at scrape time, so they are never stale.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram
from switchboard.generator.engine import EngineLoad
from switchboard.generator.prompt_input import SOURCES

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

TIME_TO_FIRST_TOKEN = Histogram(
    "switchboard_generator_time_to_first_token_seconds",
    "Seconds from the arrival of a Generate call to its first token (queueing + prefill).",
    buckets=_LATENCY_BUCKETS,
)
TIME_PER_OUTPUT_TOKEN = Histogram(
    "switchboard_generator_time_per_output_token_seconds",
    "Mean seconds between output tokens after the first, per request.",
    buckets=_TOKEN_BUCKETS,
)
REQUEST_SECONDS = Histogram(
    "switchboard_generator_request_seconds",
    "Seconds from the arrival of a Generate call to its last token.",
    buckets=_LATENCY_BUCKETS,
)
REQUESTS = Counter(
    "switchboard_generator_requests_total",
    "Finished Generate calls by finish reason (length, eos, stop_sequence, cancelled, rejected, queue_full, error).",
    ["finish_reason"],
)
REQUESTS_FAILED_IN_ENGINE = Counter(
    "switchboard_generator_requests_failed_in_engine_total",
    "Requests an engine step failed on, taken out of the batch while the replica served on (their "
    "calls end with INTERNAL, reason REQUEST_FAILED_IN_ENGINE).",
)
PROMPT_TOKENS = Counter("switchboard_generator_prompt_tokens_total", "Prompt tokens of finished requests.")
CACHED_PROMPT_TOKENS = Counter(
    "switchboard_generator_cached_prompt_tokens_total", "Prompt tokens served from the prefix cache."
)
GENERATION_TOKENS = Counter("switchboard_generator_generation_tokens_total", "Tokens generated.")
PROMPT_TOKENIZATION = Counter(
    "switchboard_generator_prompt_tokenization_total",
    "Accepted Generate calls by where their prompt's token ids came from: upstream (sent with the "
    "request, made by this replica's tokenizer) or local (the prompt text tokenized here).",
    ["source"],
)
for _source in SOURCES:
    PROMPT_TOKENIZATION.labels(source=_source)  # both series exist (at 0) from the start
QUEUE_DEPTH = Gauge(
    "switchboard_generator_sequences", "Sequences in the engine by state (running, waiting).", ["state"]
)
KV_BLOCKS = Gauge("switchboard_generator_kv_blocks", "KV-cache blocks by kind (used, total).", ["kind"])
TOKENS_PER_SECOND = Gauge(
    "switchboard_generator_tokens_per_second", "Output tokens per second over the engine's recent window."
)


def bind_engine_gauges(load: Callable[[], EngineLoad]) -> None:
    """Read the engine gauges from `load()` (an `EngineLoad`) whenever Prometheus scrapes."""
    QUEUE_DEPTH.labels(state="running").set_function(lambda: load().running)
    QUEUE_DEPTH.labels(state="waiting").set_function(lambda: load().waiting)
    KV_BLOCKS.labels(kind="used").set_function(lambda: load().kv_blocks_used)
    KV_BLOCKS.labels(kind="total").set_function(lambda: load().kv_blocks_total)
    TOKENS_PER_SECOND.set_function(lambda: load().tokens_per_second)


def record_finished(
    finish_reason: str,
    time_to_first_token: float | None,
    total_seconds: float,
    prompt_tokens: int,
    completion_tokens: int,
    cached_prompt_tokens: int,
) -> None:
    """Record one finished request."""
    REQUESTS.labels(finish_reason=finish_reason).inc()
    REQUEST_SECONDS.observe(total_seconds)
    PROMPT_TOKENS.inc(prompt_tokens)
    CACHED_PROMPT_TOKENS.inc(cached_prompt_tokens)
    GENERATION_TOKENS.inc(completion_tokens)
    if time_to_first_token is not None:
        TIME_TO_FIRST_TOKEN.observe(time_to_first_token)
        if completion_tokens > 1:
            TIME_PER_OUTPUT_TOKEN.observe((total_seconds - time_to_first_token) / (completion_tokens - 1))
