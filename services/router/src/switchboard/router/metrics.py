"""The router's domain metrics (Prometheus), on the ROUTER_METRICS_PORT endpoint."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

ROUTE_DECISIONS = Counter(
    "switchboard_router_decisions_total",
    "Routing decisions, by primary expert chosen (its rate share is the expert's traffic share).",
    ["expert"],
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
SELECTED_K = Histogram(
    "switchboard_router_selected_k", "Experts selected per request (dynamic k).", buckets=(1, 2, 3, 4, 6, 8, 16)
)
DECISION_SECONDS = Histogram(
    "switchboard_router_decision_seconds",
    "Gate and selector time per request (features, network, selection; no I/O).",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.1),
)
TRAFFIC_SHARE = Gauge(
    "switchboard_router_traffic_share",
    "Share of the last decisions (exponentially weighted, about 100) whose primary is this expert.",
    ["expert"],
)
LOAD_BIAS = Gauge("switchboard_router_load_bias", "Load bias applied to the expert's utility (<= 0).", ["expert"])
POOL_PRESSURE = Gauge(
    "switchboard_router_pool_pressure", "Saturation of the expert's pool at the last look (1 = at a limit).", ["expert"]
)
GATE_INFO = Gauge(
    "switchboard_router_gate_info", "The gate in use (value 1), by kind (learned or ngram) and version.", ["kind", "version"]
)
GATE_FALLBACK = Gauge(
    "switchboard_router_gate_fallback", "1 while the router runs the built-in n-gram rule because no gate artifact is set."
)
EXPLORED = Counter("switchboard_router_explored_total", "Decisions whose primary was drawn at random (exploration).")
ONLINE_UPDATES = Counter("switchboard_router_online_updates_total", "Online-head updates from joined feedback.")
FEEDBACK_UNMATCHED = Counter(
    "switchboard_router_feedback_unmatched_total", "Feedback whose decision was no longer held (too old or unknown)."
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
EXPERT_TOKENIZER = Gauge(
    "switchboard_router_expert_tokenizer",
    "1 when the router tokenizes prompts for the expert (its tokenizer loaded at start), 0 when it "
    "cannot (the expert's replicas tokenize the prompt text themselves).",
    ["expert"],
)
UNTOKENIZED_CANDIDATES = Counter(
    "switchboard_router_untokenized_candidates_total",
    "Route candidates returned without token ids (no tokenizer for their expert, or it failed on the prompt).",
    ["expert"],
)
TOKENIZE_SECONDS = Histogram(
    "switchboard_router_tokenize_seconds",
    "Time to tokenize one request's prompt for its candidates (once per distinct tokenizer).",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.1),
)
COMPLETION_TOKENS = Counter(
    "switchboard_router_completion_tokens_total", "Output tokens reported by the gateway, by expert.", ["expert"]
)


class ShareTracker:
    """Exponentially weighted share of decisions per expert, exported as TRAFFIC_SHARE."""

    def __init__(self, experts: list[str], alpha: float = 0.01) -> None:
        self.alpha = alpha
        self.share = dict.fromkeys(experts, 1.0 / max(1, len(experts)))

    def observe(self, primary: str) -> None:
        """One decision."""
        for name in self.share:
            target = 1.0 if name == primary else 0.0
            self.share[name] += self.alpha * (target - self.share[name])
            TRAFFIC_SHARE.labels(name).set(self.share[name])
