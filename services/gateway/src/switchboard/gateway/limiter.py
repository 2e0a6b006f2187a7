"""A tenant's limits applied to one request: size caps, monthly budget, rates and concurrent streams.

`TenantLimiter.admit` checks, in order, and stops at the first refusal:

1. max_prompt_tokens, max_output_tokens: the request is too large for the tenant, whatever the
   time (a `LimitKind.TOO_LARGE` refusal, INVALID_ARGUMENT-style, no retry).
2. monthly_token_budget: used this month + the prompt over the budget (retry at the next month, UTC);
   monthly_cost_budget: this month's cost (price table, GATEWAY_PRICES_FILE) at or over the cap.
3. requests_per_second: one token from the request bucket.
4. tokens_per_second: the prompt's tokens from the token bucket.
5. max_concurrent_streams: a lease on one of the tenant's stream slots.

What an earlier step took is given back when a later one refuses, so a refused request costs the
tenant nothing. A limit that is None is skipped without a store call.

The returned `Admission` charges output tokens as they stream (batched, so the store sees one call
per `output_batch_tokens`, not one per token) to the token bucket, possibly into debt (a stream is
never interrupted for its rate), and to the budget; `finish` settles the exact total and frees the
stream slot.

The budget is checked by reading, not reserving: concurrent requests can together overshoot it by
their prompts, as they always can by their outputs; it is a quota, not a hard cap.

The cost budget is the same path with another counter: a request is priced once the expert that
serves it is known (`Admission.set_price`, at its first token), and its cost is charged with its
tokens, in nano-units of the currency. Admission refuses once the month's cost has reached the cap;
the requests in flight then may overshoot it by their own cost.

When the store cannot be reached, each tenant's `on_store_unavailable` decides: OPEN admits (a
warning and `switchboard_gateway_limit_store_errors_total`), CLOSED raises `LimitStoreUnavailable`.
After a failure the limiter does not call the store again for `store_retry_seconds`, so a store that
times out costs one request a timeout, not every request every step.
"""

from __future__ import annotations

import asyncio
import calendar
import enum
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TypeVar

from prometheus_client import Counter
from switchboard.common.logging import get_logger
from switchboard.gateway.limitstore import LimitStore, LimitStoreUnavailable, limit_key
from switchboard.gateway.prices import NANOS_PER_UNIT, Price
from switchboard.gateway.principal import FailMode, Principal, TenantLimits

log = get_logger(__name__)

LIMIT_STORE_ERRORS = Counter(
    "switchboard_gateway_limit_store_errors_total",
    "Limit store operations that failed (unreachable, timed out) or were skipped while it was down, by operation.",
    ["operation"],
)

DEFAULT_OUTPUT_BATCH_TOKENS = 16
# A stream's slot lease; refreshed while tokens flow, so only a crashed gateway's leases run out.
DEFAULT_SLOT_TTL_SECONDS = 60.0
# A month's budget counter is kept this long after the month ends (for usage reports, late settles).
DEFAULT_BUDGET_GRACE_SECONDS = 7 * 86400.0
DEFAULT_STORE_RETRY_SECONDS = 1.0

_T = TypeVar("_T")


class LimitKind(enum.Enum):
    """What sort of limit refused a request, which decides its status code."""

    TOO_LARGE = "too_large"  # the request can never fit the tenant's limits: INVALID_ARGUMENT
    RATE = "rate"  # too much right now (rates, concurrent streams): RESOURCE_EXHAUSTED, retry later
    QUOTA = "quota"  # the monthly budget is spent: RESOURCE_EXHAUSTED, retry next month


_KINDS = {
    "max_prompt_tokens": LimitKind.TOO_LARGE,
    "max_output_tokens": LimitKind.TOO_LARGE,
    "requests_per_second": LimitKind.RATE,
    "tokens_per_second": LimitKind.RATE,
    "max_concurrent_streams": LimitKind.RATE,
    "monthly_token_budget": LimitKind.QUOTA,
    "monthly_cost_budget": LimitKind.QUOTA,
}


class LimitExceeded(Exception):
    """A tenant limit refused the request.

    `limit` names the TenantLimits field; `message` says what to do; `retry_after_seconds` is when a
    retry can succeed (None when waiting does not help or is unknown); `quota_subject` is who the
    limit applies to (`tenant:<name>`), for a QuotaFailure detail.
    """

    def __init__(self, limit: str, message: str, retry_after_seconds: float | None, quota_subject: str) -> None:
        super().__init__(message)
        if limit not in _KINDS:
            raise ValueError(f"unknown limit {limit!r}; one of {', '.join(sorted(_KINDS))}")
        self.limit = limit
        self.message = message
        self.retry_after_seconds = retry_after_seconds
        self.quota_subject = quota_subject

    @property
    def kind(self) -> LimitKind:
        """TOO_LARGE (a bad request for this tenant), RATE or QUOTA (resource exhausted)."""
        return _KINDS[self.limit]

    def __repr__(self) -> str:
        return f"LimitExceeded({self.limit!r}, {self.message!r}, {self.retry_after_seconds!r}, {self.quota_subject!r})"


def month_of(epoch_seconds: float) -> str:
    """The UTC month `YYYY-MM` of a wall-clock time: the period of the monthly budget."""
    return datetime.fromtimestamp(epoch_seconds, UTC).strftime("%Y-%m")


def next_month_start(epoch_seconds: float) -> float:
    """The wall-clock time the UTC month after `epoch_seconds` begins."""
    moment = datetime.fromtimestamp(epoch_seconds, UTC)
    year, month = (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
    return float(calendar.timegm((year, month, 1, 0, 0, 0)))


def _request_burst(limits: TenantLimits) -> float:
    """The request bucket's capacity; without one configured, one second's worth (at least 1)."""
    assert limits.requests_per_second is not None
    return limits.request_burst if limits.request_burst is not None else max(1.0, limits.requests_per_second)


def _token_burst(limits: TenantLimits) -> float:
    """The token bucket's capacity; without one configured, one second's worth (at least 1)."""
    assert limits.tokens_per_second is not None
    return limits.token_burst if limits.token_burst is not None else max(1.0, limits.tokens_per_second)


class TenantLimiter:
    """Applies `Principal.limits` to requests, with state in a `LimitStore` (shared by gateways for Redis)."""

    def __init__(
        self,
        store: LimitStore,
        *,
        output_batch_tokens: int = DEFAULT_OUTPUT_BATCH_TOKENS,
        slot_ttl_seconds: float = DEFAULT_SLOT_TTL_SECONDS,
        budget_grace_seconds: float = DEFAULT_BUDGET_GRACE_SECONDS,
        store_retry_seconds: float = DEFAULT_STORE_RETRY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if output_batch_tokens < 1:
            raise ValueError(f"output_batch_tokens must be at least 1, got {output_batch_tokens}")
        self.store = store
        self.output_batch_tokens = output_batch_tokens
        self.slot_ttl_seconds = slot_ttl_seconds
        self.budget_grace_seconds = budget_grace_seconds
        self.store_retry_seconds = store_retry_seconds
        self._clock = clock
        self._wall_clock = wall_clock
        self._store_down_until = -float("inf")

    async def _call(self, operation: str, call: Callable[[], Awaitable[_T]]) -> _T:
        """One store operation; a failure is counted and keeps the store out of use for a while."""
        if self._clock() < self._store_down_until:
            LIMIT_STORE_ERRORS.labels(operation).inc()
            raise LimitStoreUnavailable(f"limit store {self.store!r} failed recently; not retried yet")
        try:
            return await call()
        except LimitStoreUnavailable:
            LIMIT_STORE_ERRORS.labels(operation).inc()
            self._store_down_until = self._clock() + self.store_retry_seconds
            raise

    def _budget_key(self, tenant: str, now: float) -> str:
        return limit_key(tenant, "budget", month_of(now))

    def _cost_key(self, tenant: str, now: float) -> str:
        return limit_key(tenant, "cost", month_of(now))

    def _budget_ttl(self, now: float) -> float:
        return next_month_start(now) - now + self.budget_grace_seconds

    async def month_tokens(self, tenant: str) -> int:
        """The tenant's tokens this UTC month, across every gateway sharing the store."""
        key = self._budget_key(tenant, self._wall_clock())
        return await self._call("budget_used", lambda: self.store.budget_used(key))

    async def month_cost(self, tenant: str) -> float:
        """The tenant's cost this UTC month in currency units (counted for cost-budgeted tenants only)."""
        key = self._cost_key(tenant, self._wall_clock())
        return await self._call("budget_used", lambda: self.store.budget_used(key)) / NANOS_PER_UNIT

    async def admit(
        self,
        principal: Principal,
        *,
        request_id: str,
        prompt_tokens: int,
        max_output_tokens: int,
        prompt_exact: bool = True,
    ) -> Admission:
        """Admit one request or raise `LimitExceeded` (or `LimitStoreUnavailable` for a fail-closed tenant).

        `prompt_exact=False` marks `prompt_tokens` as an estimate (the gateway counts before the
        router has tokenized): the prompt limit is then checked by `Admission.settle_prompt` with
        the exact count, which also charges the difference.
        """
        limits = principal.limits
        subject = f"tenant:{principal.tenant}"
        if prompt_exact and limits.max_prompt_tokens is not None and prompt_tokens > limits.max_prompt_tokens:
            raise LimitExceeded(
                "max_prompt_tokens",
                f"the prompt has {prompt_tokens} tokens, more than this tenant's limit of {limits.max_prompt_tokens}; "
                "shorten the prompt",
                None,
                subject,
            )
        if limits.max_output_tokens is not None and max_output_tokens > limits.max_output_tokens:
            raise LimitExceeded(
                "max_output_tokens",
                f"max_tokens is {max_output_tokens}, more than this tenant's limit of {limits.max_output_tokens}; "
                f"ask for at most {limits.max_output_tokens}",
                None,
                subject,
            )
        # A client's request id need not be unique; the lease must be, or two streams would share one.
        admission = Admission(self, principal, f"{request_id}:{uuid.uuid4().hex[:12]}", prompt_tokens)
        try:
            await self._take_all(admission, subject)
        except LimitStoreUnavailable as error:
            if limits.on_store_unavailable is FailMode.CLOSED:
                await admission._give_back()
                log.warning(
                    "limit store unavailable, request refused (fail closed)",
                    tenant=principal.tenant,
                    request_id=request_id,
                    error=str(error),
                )
                raise
            # Fail open: keep what was taken; `finish` settles whatever could not be charged now.
            admission.degraded = True
            log.warning(
                "limit store unavailable, request admitted (fail open)",
                tenant=principal.tenant,
                request_id=request_id,
                error=str(error),
            )
        except BaseException:
            # A refusal (or a cancelled request) leaves the tenant's buckets and slots as they were.
            await admission._give_back()
            raise
        return admission

    async def _take_all(self, admission: Admission, subject: str) -> None:
        """Steps 2-5 of `admit`, recording in `admission` what was taken so it can be given back."""
        principal, limits, store = admission.principal, admission.principal.limits, self.store
        tenant, prompt_tokens = principal.tenant, admission.prompt_tokens
        now = self._wall_clock()
        budget_key: str | None = None
        if limits.monthly_token_budget is not None:
            # Set first: when the store fails below (fail open), `finish` still charges the budget.
            admission._budget_key = budget_key = self._budget_key(tenant, now)
            admission._budget_ttl = ttl = self._budget_ttl(now)
            used = await self._call("budget_used", lambda: store.budget_used(budget_key))
            if used >= limits.monthly_token_budget or used + prompt_tokens > limits.monthly_token_budget:
                resets = next_month_start(now)
                raise LimitExceeded(
                    "monthly_token_budget",
                    f"this tenant's monthly budget of {limits.monthly_token_budget} tokens is used up "
                    f"({used} used, this prompt needs {prompt_tokens}); it renews at "
                    f"{datetime.fromtimestamp(resets, UTC):%Y-%m-%dT%H:%MZ}, or ask for a larger budget",
                    max(0.0, resets - now),
                    subject,
                )
        if limits.monthly_cost_budget is not None:
            admission._cost_key = cost_key = self._cost_key(tenant, now)
            admission._budget_ttl = self._budget_ttl(now)
            spent = await self._call("budget_used", lambda: store.budget_used(cost_key)) / NANOS_PER_UNIT
            if spent >= limits.monthly_cost_budget:
                resets = next_month_start(now)
                raise LimitExceeded(
                    "monthly_cost_budget",
                    f"this tenant's monthly cost budget of {limits.monthly_cost_budget:g} is used up ({spent:.6g} "
                    f"spent); it renews at {datetime.fromtimestamp(resets, UTC):%Y-%m-%dT%H:%MZ}, or ask for a "
                    "larger budget",
                    max(0.0, resets - now),
                    subject,
                )
        if limits.requests_per_second is not None:
            rate, burst = limits.requests_per_second, _request_burst(limits)
            decision = await self._call(
                "take", lambda: store.take(admission._requests_key, rate=rate, burst=burst, amount=1)
            )
            if not decision.allowed:
                raise LimitExceeded(
                    "requests_per_second",
                    f"this tenant may send {rate:g} requests per second (bursts of {burst:g}); "
                    f"retry after {decision.retry_after_seconds:.3g} s",
                    decision.retry_after_seconds,
                    subject,
                )
            admission._took_request = True
        if limits.tokens_per_second is not None:
            rate, burst = limits.tokens_per_second, _token_burst(limits)
            decision = await self._call(
                "take", lambda: store.take(admission._tokens_key, rate=rate, burst=burst, amount=prompt_tokens)
            )
            if not decision.allowed:
                raise LimitExceeded(
                    "tokens_per_second",
                    f"this tenant may use {rate:g} tokens per second (bursts of {burst:g}) and this prompt has "
                    f"{prompt_tokens}; retry after {decision.retry_after_seconds:.3g} s",
                    decision.retry_after_seconds,
                    subject,
                )
            admission._charged_tokens = prompt_tokens
        if limits.max_concurrent_streams is not None:
            limit = limits.max_concurrent_streams
            admission._slot_requested = True
            admission._slot_refreshed_at = self._clock()
            held = await self._call(
                "acquire_slot",
                lambda: store.acquire_slot(
                    admission._slots_key, limit=limit, lease_id=admission.lease_id, ttl_seconds=self.slot_ttl_seconds
                ),
            )
            if not held:
                admission._slot_requested = False
                raise LimitExceeded(
                    "max_concurrent_streams",
                    f"this tenant already has {limit} streams open, its limit; retry when one of them finishes",
                    None,
                    subject,
                )
        if budget_key is not None:
            await self._call(
                "charge_budget", lambda: store.charge_budget(budget_key, amount=prompt_tokens, ttl_seconds=ttl)
            )
            admission._charged_budget = prompt_tokens


class Admission:
    """One admitted request: charges its output tokens as they stream and settles them at the end.

    Made by `TenantLimiter.admit`. `charge_output` and `finish` never raise for the store (a
    failure is logged and counted, and what could not be charged is retried by the next call).
    """

    def __init__(self, limiter: TenantLimiter, principal: Principal, lease_id: str, prompt_tokens: int) -> None:
        self.principal = principal
        self.lease_id = lease_id
        self.prompt_tokens = prompt_tokens
        # True when the store was down at admission (fail open): the request was not fully checked.
        self.degraded = False
        self.finished = False
        self._limiter = limiter
        tenant = principal.tenant
        self._requests_key = limit_key(tenant, "requests")
        self._tokens_key = limit_key(tenant, "tokens")
        self._slots_key = limit_key(tenant, "streams")
        self._budget_key: str | None = None
        self._cost_key: str | None = None  # set for a tenant with a monthly cost budget
        self._price: Price | None = None  # set once the serving expert is known
        self._budget_ttl = 0.0
        self._output_tokens = 0  # seen so far through charge_output
        self._unflushed = 0  # output tokens since the last flush
        self._took_request = False
        self._slot_requested = False  # the slot may be held (an acquire was sent and not refused)
        self._slot_refreshed_at = 0.0
        # What the store has confirmed, so the next flush and `finish` charge exactly the rest.
        self._charged_tokens = 0
        self._charged_budget = 0
        self._charged_cost = 0  # nano-units
        self._replica_seconds = 0.0  # the serving replica's charge, known at the end

    @property
    def output_tokens(self) -> int:
        """Output tokens reported so far through `charge_output`."""
        return self._output_tokens

    async def charge_output(self, tokens: int) -> None:
        """Count `tokens` more output tokens; the store is called once at least a batch is pending."""
        if self.finished or tokens <= 0:
            return
        self._output_tokens += tokens
        self._unflushed += tokens
        if self._unflushed >= self._limiter.output_batch_tokens:
            # Everything outstanding goes, including what a failed earlier flush left behind; a store
            # that is down is tried once a batch, not once a token.
            self._unflushed = 0
            await self._settle(self.prompt_tokens + self._output_tokens, "charge_output")
        await self._refresh_slot_if_due()

    def set_price(self, price: Price) -> None:
        """Price the request at the serving expert's price: its cost is charged with its tokens from now on.

        Called when the expert streams its first token (after a failover, the one that served).
        """
        self._price = price

    async def settle_prompt(self, exact: int) -> None:
        """Replace the admission's prompt estimate with the exact count and charge the difference.

        Raises `LimitExceeded` (max_prompt_tokens) when the exact count is over the tenant's limit;
        the caller then calls `refund`.
        """
        limit = self.principal.limits.max_prompt_tokens
        if limit is not None and exact > limit:
            raise LimitExceeded(
                "max_prompt_tokens",
                f"the prompt has {exact} tokens, more than this tenant's limit of {limit}; shorten the prompt",
                None,
                f"tenant:{self.principal.tenant}",
            )
        if exact == self.prompt_tokens or self.finished:
            return
        self.prompt_tokens = exact
        await self._settle(self.prompt_tokens + self._output_tokens, "settle_prompt")

    async def refund(self) -> None:
        """Give back everything admission took (a request refused after admission); idempotent, never raises."""
        if self.finished:
            return
        await asyncio.shield(self._give_back())

    async def finish(self, output_tokens_total: int | None = None, replica_seconds: float = 0.0) -> None:
        """Settle the request's exact total (prompt + output tokens) and free its stream slot.

        `output_tokens_total` is the true count (None: what `charge_output` saw); `replica_seconds`
        is the replica time the serving generator charged it (priced by `per_replica_second`). Idempotent, never
        raises for the store, and completes even when the calling task is cancelled (safe in `finally`).
        """
        if self.finished:
            return
        self.finished = True
        if output_tokens_total is not None:
            self._output_tokens = output_tokens_total
        self._replica_seconds = max(0.0, replica_seconds)
        await asyncio.shield(self._finish())

    async def _finish(self) -> None:
        await self._settle(self.prompt_tokens + self._output_tokens, "finish")
        await self._release_slot()

    async def _settle(self, total: int, context: str, refund: bool = False) -> None:
        """Charge the token bucket and the budget up to `total` tokens for this request, and its cost."""
        limiter, limits, store = self._limiter, self.principal.limits, self._limiter.store
        if limits.tokens_per_second is not None and total != self._charged_tokens:
            rate, burst, amount = limits.tokens_per_second, _token_burst(limits), total - self._charged_tokens
            try:
                await limiter._call(
                    "settle", lambda: store.settle(self._tokens_key, rate=rate, burst=burst, amount=amount)
                )
                self._charged_tokens = total
            except Exception as error:
                self._log_failure(context, error)
        if self._budget_key is not None and total != self._charged_budget:
            key, amount, ttl = self._budget_key, total - self._charged_budget, self._budget_ttl
            try:
                await limiter._call("charge_budget", lambda: store.charge_budget(key, amount=amount, ttl_seconds=ttl))
                self._charged_budget = total
            except Exception as error:
                self._log_failure(context, error)
        if self._cost_key is not None:
            price = self._price
            cost = (
                0
                if refund or price is None
                else price.cost_nanos(self.prompt_tokens, self._output_tokens, self._replica_seconds)
            )
            if cost != self._charged_cost:
                cost_key, delta, ttl = self._cost_key, cost - self._charged_cost, self._budget_ttl
                try:
                    await limiter._call(
                        "charge_budget", lambda: store.charge_budget(cost_key, amount=delta, ttl_seconds=ttl)
                    )
                    self._charged_cost = cost
                except Exception as error:
                    self._log_failure(context, error)

    async def _refresh_slot_if_due(self) -> None:
        """Keep a long stream's lease alive: refresh it after a third of its TTL."""
        limiter = self._limiter
        if not self._slot_requested or limiter._clock() - self._slot_refreshed_at < limiter.slot_ttl_seconds / 3:
            return
        self._slot_refreshed_at = limiter._clock()
        try:
            held = await limiter._call(
                "refresh_slot",
                lambda: limiter.store.refresh_slot(self._slots_key, self.lease_id, limiter.slot_ttl_seconds),
            )
        except Exception as error:
            self._log_failure("charge_output", error)
            return
        if not held:
            # The lease ran out (a stall longer than its TTL); the stream goes on, uncounted from now.
            log.warning("stream slot lease expired", tenant=self.principal.tenant, lease_id=self.lease_id)
            self._slot_requested = False

    async def _release_slot(self) -> None:
        if not self._slot_requested:
            return
        self._slot_requested = False
        limiter = self._limiter
        try:
            await limiter._call("release_slot", lambda: limiter.store.release_slot(self._slots_key, self.lease_id))
        except Exception as error:
            self._log_failure("finish", error)  # the lease expires by itself

    async def _give_back(self) -> None:
        """Undo what admission took (the request was refused or cancelled); best effort, never raises."""
        self.finished = True
        limiter, limits, store = self._limiter, self.principal.limits, self._limiter.store
        if self._took_request and limits.requests_per_second is not None:
            self._took_request = False
            rate, burst = limits.requests_per_second, _request_burst(limits)
            try:
                await limiter._call(
                    "settle", lambda: store.settle(self._requests_key, rate=rate, burst=burst, amount=-1)
                )
            except Exception as error:
                self._log_failure("refund", error)
        await self._settle(0, "refund", refund=True)
        await self._release_slot()

    def _log_failure(self, context: str, error: Exception) -> None:
        """A failure after admission is logged, never raised: the stream must not break for accounting."""
        log.warning(
            "limit store unavailable, usage not recorded yet"
            if isinstance(error, LimitStoreUnavailable)
            else "limit accounting failed",
            context=context,
            tenant=self.principal.tenant,
            lease_id=self.lease_id,
            error=str(error),
            exc_info=not isinstance(error, LimitStoreUnavailable),
        )
