"""Usage metering: prompt and output tokens per tenant and expert, as metrics and for the Usage RPC.

Counts since the process started are kept here (one gateway's share, summed across gateways by
Prometheus); the month's total across every gateway comes from the limits store's budget counter,
which all gateways sharing a Redis charge.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from prometheus_client import Counter, Gauge
from switchboard.common.logging import get_logger
from switchboard.v1 import gateway_pb2

log = get_logger(__name__)

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


TENANT_BUDGET = Gauge(
    "switchboard_gateway_tenant_budget_tokens",
    "Each budgeted tenant's monthly token budget (limits.monthly_token_budget in the tenants file).",
    ["tenant"],
)
TENANT_MONTH_TOKENS = Gauge(
    "switchboard_gateway_tenant_month_tokens",
    "Each budgeted tenant's tokens this UTC month across every gateway sharing its limits store.",
    ["tenant"],
)


class BudgetReporter:
    """Exports each budgeted tenant's budget and this month's use as gauges, every `interval` seconds.

    Alerts compare the two (a tenant nearing its budget); the month's count comes from the limits
    store, so every gateway reports the same figure. A store that cannot be reached leaves the last
    values in place: reporting never affects requests.
    """

    def __init__(
        self,
        budgets: Callable[[], dict[str, int]],
        month_tokens: Callable[[str], Awaitable[int]],
        interval_seconds: float,
    ) -> None:
        self._budgets = budgets
        self._month_tokens = month_tokens
        self._interval = interval_seconds
        self._reported: set[str] = set()

    async def report_once(self) -> None:
        """One round: set both gauges for every budgeted tenant, drop those no longer budgeted."""
        budgets = self._budgets()
        for tenant in self._reported - set(budgets):
            for gauge in (TENANT_BUDGET, TENANT_MONTH_TOKENS):
                with contextlib.suppress(KeyError):  # its use was never read
                    gauge.remove(tenant)
        for tenant, budget in budgets.items():
            TENANT_BUDGET.labels(tenant).set(budget)
            try:
                used = await self._month_tokens(tenant)
            except Exception as exc:  # the limits store is down: keep the last value (none yet: no series)
                log.debug("budget use not read", tenant=tenant, error=str(exc))
                continue
            TENANT_MONTH_TOKENS.labels(tenant).set(used)
        self._reported = set(budgets)

    async def run(self) -> None:
        """Report until cancelled."""
        while True:
            await self.report_once()
            await asyncio.sleep(self._interval)
