"""Usage metering: prompt and output tokens and their cost per tenant and expert, as metrics and for Usage.

Counts since the process started are kept here (one gateway's share, summed across gateways by
Prometheus); the month's total across every gateway comes from the limits store's budget counter,
which all gateways sharing a Redis charge. Costs are in the price table's currency
(GATEWAY_PRICES_FILE), priced at the expert's price when the request was served.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
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
TENANT_COST = Counter(
    "switchboard_gateway_cost_total",
    "Cost of the tokens served per tenant and expert, in the price table's currency (GATEWAY_PRICES_FILE).",
    ["tenant", "expert"],
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
    cost: float = 0.0


class UsageMeter:
    """Tokens served per (tenant, expert) by this process."""

    def __init__(self) -> None:
        self._totals: dict[tuple[str, str], _Totals] = {}

    def record(self, tenant: str, expert: str, prompt_tokens: int, completion_tokens: int, cost: float = 0.0) -> None:
        """Count one request that streamed output, and what it cost."""
        totals = self._totals.setdefault((tenant, expert), _Totals())
        totals.prompt_tokens += prompt_tokens
        totals.completion_tokens += completion_tokens
        totals.requests += 1
        totals.cost += cost
        TENANT_COST.labels(tenant, expert).inc(cost)
        TENANT_TOKENS.labels(tenant, expert, "prompt").inc(prompt_tokens)
        TENANT_TOKENS.labels(tenant, expert, "completion").inc(completion_tokens)
        TENANT_REQUESTS.labels(tenant, expert).inc()

    async def report(
        self,
        tenant: str | None,
        month_tokens: Callable[[str], Awaitable[int]],
        budget: Callable[[str], int | None],
        month_cost: Callable[[str], Awaitable[float]] | None = None,
        cost_budget: Callable[[str], float | None] = lambda tenant: None,
    ) -> tuple[str, list[gateway_pb2.TenantUsage]]:
        """The month and one row per (tenant, expert) of `tenant` (None: every tenant), sorted.

        `month_cost` is read only for the tenants `cost_budget` gives a budget (only their cost is counted).
        """
        rows: list[gateway_pb2.TenantUsage] = []
        month_cache: dict[str, int] = {}
        cost_cache: dict[str, float] = {}
        keys = sorted(k for k in self._totals if tenant is None or k[0] == tenant)
        if tenant is not None and not keys:
            keys = [(tenant, "")]  # a tenant with no traffic here still has a month's total
        for name, expert in keys:
            if name not in month_cache:
                month_cache[name] = await month_tokens(name)
                capped = cost_budget(name)
                cost_cache[name] = await month_cost(name) if capped is not None and month_cost is not None else 0.0
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
                    cost=totals.cost,
                    month_cost=cost_cache[name],
                    monthly_cost_budget=cost_budget(name) or 0.0,
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


TENANT_COST_BUDGET = Gauge(
    "switchboard_gateway_tenant_cost_budget",
    "Each cost-budgeted tenant's monthly cost budget (limits.monthly_cost_budget), in the price table's currency.",
    ["tenant"],
)
TENANT_MONTH_COST = Gauge(
    "switchboard_gateway_tenant_month_cost",
    "Each cost-budgeted tenant's cost this UTC month across every gateway sharing its limits store.",
    ["tenant"],
)
TENANT_COST_ALERT_THRESHOLD = Gauge(
    "switchboard_gateway_tenant_cost_alert_threshold",
    "The shares of its monthly cost budget at which a tenant's budget alert fires (limits.cost_alert_thresholds; "
    "0.8 when it names none); the value is the share, also in the threshold label.",
    ["tenant", "threshold"],
)
# The share of a cost budget that alerts when the tenants file names no threshold (as the token budget's alert).
DEFAULT_COST_ALERT_THRESHOLDS = (0.8,)


class BudgetReporter:
    """Exports each budgeted tenant's budget and this month's use as gauges, every `interval` seconds.

    Alerts compare the two (a tenant nearing its budget); the month's count comes from the limits
    store, so every gateway reports the same figure. A store that cannot be reached leaves the last
    values in place: reporting never affects requests. The token budgets use the default gauges;
    the cost budgets pass theirs and `thresholds`, each tenant's alert shares.
    """

    def __init__(
        self,
        budgets: Callable[[], Mapping[str, float]],
        month_tokens: Callable[[str], Awaitable[float]],
        interval_seconds: float,
        budget_gauge: Gauge = TENANT_BUDGET,
        used_gauge: Gauge = TENANT_MONTH_TOKENS,
        thresholds: Callable[[], Mapping[str, tuple[float, ...]]] | None = None,
    ) -> None:
        self._budgets = budgets
        self._month_tokens = month_tokens
        self._interval = interval_seconds
        self._budget_gauge = budget_gauge
        self._used_gauge = used_gauge
        self._thresholds = thresholds
        self._reported: set[str] = set()
        self._reported_thresholds: set[tuple[str, str]] = set()

    async def report_once(self) -> None:
        """One round: set both gauges for every budgeted tenant, drop those no longer budgeted."""
        budgets = self._budgets()
        for tenant in self._reported - set(budgets):
            for gauge in (self._budget_gauge, self._used_gauge):
                with contextlib.suppress(KeyError):  # its use was never read
                    gauge.remove(tenant)
        for tenant, budget in budgets.items():
            self._budget_gauge.labels(tenant).set(budget)
            try:
                used = await self._month_tokens(tenant)
            except Exception as exc:  # the limits store is down: keep the last value (none yet: no series)
                log.debug("budget use not read", tenant=tenant, error=str(exc))
                continue
            self._used_gauge.labels(tenant).set(used)
        self._reported = set(budgets)
        if self._thresholds is not None:
            self._report_thresholds({t: v for t, v in self._thresholds().items() if t in budgets})

    def _report_thresholds(self, thresholds: Mapping[str, tuple[float, ...]]) -> None:
        current = {(tenant, f"{share:g}"): share for tenant, shares in thresholds.items() for share in shares}
        for labels in self._reported_thresholds - set(current):
            with contextlib.suppress(KeyError):
                TENANT_COST_ALERT_THRESHOLD.remove(*labels)
        for labels, share in current.items():
            TENANT_COST_ALERT_THRESHOLD.labels(*labels).set(share)
        self._reported_thresholds = set(current)

    async def run(self) -> None:
        """Report until cancelled."""
        while True:
            await self.report_once()
            await asyncio.sleep(self._interval)
