"""The gateway's domain metrics (Prometheus), on the GATEWAY_METRICS_PORT endpoint."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

REQUESTS = Counter(
    "switchboard_gateway_requests_total",
    "Generate/Complete requests by tenant, expert and outcome (a gRPC status code name or OK).",
    ["tenant", "expert", "outcome"],
)
FAILOVERS = Counter(
    "switchboard_gateway_failovers_total",
    "Attempts abandoned before the first token, by expert and status code of the failed replica.",
    ["expert", "code"],
)
TIME_TO_FIRST_TOKEN = Histogram(
    "switchboard_gateway_time_to_first_token_seconds",
    "From the gateway receiving a request to its first token, by expert.",
    ["expert"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
TIME_PER_OUTPUT_TOKEN = Histogram(
    "switchboard_gateway_time_per_output_token_seconds",
    "Mean time between output tokens after the first, per request, by expert.",
    ["expert"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
OUTPUT_TOKENS = Counter(
    "switchboard_gateway_output_tokens_total", "Tokens streamed to clients, by tenant and expert.", ["tenant", "expert"]
)
AUTH_FAILURES = Counter("switchboard_gateway_auth_failures_total", "Rejected API keys, by reason.", ["reason"])
HTTP_REQUESTS = Counter(
    "switchboard_gateway_http_requests_total", "Requests to the OpenAI-compatible HTTP front, by route and HTTP status.", ["route", "status"]
)
LIMIT_REFUSALS = Counter(
    "switchboard_gateway_limit_refusals_total",
    "Requests refused by a tenant limit or by admission, by tenant and limit "
    "(requests_per_second, tokens_per_second, max_concurrent_streams, monthly_token_budget, max_prompt_tokens, "
    "max_output_tokens, admission, limit_store_unavailable).",
    ["tenant", "limit"],
)
