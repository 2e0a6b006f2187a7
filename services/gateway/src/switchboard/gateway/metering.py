"""Usage metering: prompt and output tokens per tenant and expert, as metrics and for the Usage RPC.

Counts since the process started are kept here (one gateway's share, summed across gateways by
Prometheus); the month's total across every gateway comes from the limits store's budget counter,
which all gateways sharing a Redis charge.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from prometheus_client import Counter
from switchboard.v1 import gateway_pb2

TENANT_TOKENS = Counter(
    "switchboard_gateway_tenant_tokens_total",
    "Tokens served per tenant and expert; kind is prompt or completion.",
    ["tenant", "expert", "kind"],
)
TENANT_REQUESTS = Counter(
    "switchboard_gateway_tenant_requests_served_total", "Requests that streamed output, per tenant and expert.", ["tenant", "expert"]
)


def current_month(now: float | None = None) -> str:
    """The UTC month as YYYY-MM (the period of monthly budgets)."""
    return time.strftime("%Y-%m", time.gmtime(time.time() if now is None else now))


@dataclass
class _Totals:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0


class UsageMeter:
    """Tokens served per (tenant, expert) by this process."""

    def __init__(self) -> None:
        self._totals: dict[tuple[str, str], _Totals] = {}

    def record(self, tenant: str, expert: str, prompt_tokens: int, completion_tokens: int) -> None:
        """Count one request that streamed output."""
        totals = self._totals.setdefault((tenant, expert), _Totals())
        totals.prompt_tokens += prompt_tokens
        totals.completion_tokens += completion_tokens
        totals.requests += 1
        TENANT_TOKENS.labels(tenant, expert, "prompt").inc(prompt_tokens)
        TENANT_TOKENS.labels(tenant, expert, "completion").inc(completion_tokens)
        TENANT_REQUESTS.labels(tenant, expert).inc()

    async def report(
        self,
        tenant: str | None,
        month_tokens: Callable[[str], Awaitable[int]],
        budget: Callable[[str], int | None],
    ) -> tuple[str, list[gateway_pb2.TenantUsage]]:
        """The month and one row per (tenant, expert) of `tenant` (None: every tenant), sorted."""
        rows: list[gateway_pb2.TenantUsage] = []
        month_cache: dict[str, int] = {}
        keys = sorted(k for k in self._totals if tenant is None or k[0] == tenant)
        if tenant is not None and not keys:
            keys = [(tenant, "")]  # a tenant with no traffic here still has a month's total
        for name, expert in keys:
            if name not in month_cache:
                month_cache[name] = await month_tokens(name)
            totals = self._totals.get((name, expert), _Totals())
            rows.append(
                gateway_pb2.TenantUsage(
                    tenant=name,
                    expert=expert,
                    prompt_tokens=totals.prompt_tokens,
                    completion_tokens=totals.completion_tokens,
                    requests=totals.requests,
                    month_tokens=month_cache[name],
                    monthly_token_budget=budget(name) or 0,
                )
            )
        return current_month(), rows
