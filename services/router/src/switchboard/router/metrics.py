"""The router's domain metrics (Prometheus), on the ROUTER_METRICS_PORT endpoint."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

ROUTE_DECISIONS = Counter(
    "switchboard_router_decisions_total", "Routing decisions, by primary expert chosen.", ["expert"]
)
ROUTE_UNAVAILABLE = Counter(
    "switchboard_router_unavailable_total", "Route calls that found no expert with a healthy replica."
)
GATE_SCORE = Histogram(
    "switchboard_router_gate_score",
    "Gate probability of the primary expert.",
    ["expert"],
    buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
)
FEEDBACK = Counter(
    "switchboard_router_feedback_total",
    "Outcomes reported by the gateway, by expert, success and finish reason.",
    ["expert", "success", "finish_reason"],
)
TIME_TO_FIRST_TOKEN = Histogram(
    "switchboard_router_time_to_first_token_seconds",
    "Time to first token reported by the gateway, by expert.",
    ["expert"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
REQUEST_LATENCY = Histogram(
    "switchboard_router_request_latency_seconds",
    "End-to-end request latency reported by the gateway, by expert.",
    ["expert"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
COMPLETION_TOKENS = Counter(
    "switchboard_router_completion_tokens_total", "Output tokens reported by the gateway, by expert.", ["expert"]
)
