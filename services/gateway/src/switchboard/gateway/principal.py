"""Who a request comes from: the `Principal` that authentication resolves before any handler runs.

A principal carries everything the request path needs to decide about the caller (scopes, priority
class, limits) so no handler reads the tenants file or the token itself. It is frozen: the same
object is shared by every request of a tenant until the next reload.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Priority(enum.IntEnum):
    """Priority class of a tenant; a higher value is served first and shed last under overload."""

    LOW = 0
    NORMAL = 1
    HIGH = 2

    @classmethod
    def parse(cls, text: str) -> Priority:
        """'low' | 'normal' | 'high' (any case); ValueError naming the choices otherwise."""
        try:
            return cls[text.strip().upper()]
        except KeyError:
            raise ValueError(f"priority must be one of low, normal, high, got {text!r}") from None


class FailMode(enum.Enum):
    """What the limits do when their shared store (Redis) cannot be reached."""

    OPEN = "open"  # admit the request (availability over strict limits)
    CLOSED = "closed"  # refuse it with UNAVAILABLE (strict limits over availability)


# Scope that lets a principal call the admin RPCs (Usage).
ADMIN_SCOPE = "admin"
# Scope that lets a principal use every expert.
ALL_EXPERTS_SCOPE = "experts:*"


@dataclass(frozen=True)
class TenantLimits:
    """A tenant's limits; None means unlimited.

    Rates are per second with a burst (the bucket's capacity): a tenant may send `burst` at once,
    then `rate` per second on average.
    """

    requests_per_second: float | None = None
    request_burst: float | None = None
    tokens_per_second: float | None = None
    token_burst: float | None = None
    max_concurrent_streams: int | None = None
    max_prompt_tokens: int | None = None
    max_output_tokens: int | None = None
    monthly_token_budget: int | None = None
    # A monthly cost cap in the price table's currency (GATEWAY_PRICES_FILE), enforced at admission.
    monthly_cost_budget: float | None = None
    # Fractions of monthly_cost_budget at which the budget alert fires (exported as gauges).
    cost_alert_thresholds: tuple[float, ...] = ()
    on_store_unavailable: FailMode = FailMode.OPEN


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: its tenant, the key (or token) id it used, scopes, priority, limits."""

    tenant: str
    key_id: str
    scopes: frozenset[str] = field(default_factory=lambda: frozenset({ALL_EXPERTS_SCOPE}))
    priority: Priority = Priority.NORMAL
    limits: TenantLimits = field(default_factory=TenantLimits)
    share_cache: bool = False  # read and write the shared response cache namespace (else the tenant's own)

    @property
    def is_admin(self) -> bool:
        """Whether the principal may call the admin RPCs."""
        return ADMIN_SCOPE in self.scopes

    def may_use(self, expert: str) -> bool:
        """Whether the principal's scopes allow the expert (`experts:*` or `experts:<name>`)."""
        return ALL_EXPERTS_SCOPE in self.scopes or f"experts:{expert}" in self.scopes

    def allowed_experts(self) -> frozenset[str] | None:
        """The experts the scopes name, or None when every expert is allowed."""
        if ALL_EXPERTS_SCOPE in self.scopes:
            return None
        return frozenset(scope.removeprefix("experts:") for scope in self.scopes if scope.startswith("experts:"))
