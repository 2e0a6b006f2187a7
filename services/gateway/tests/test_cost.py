"""Cost per tenant: the price table, cost in Usage and metrics, and the monthly cost budget at admission.

The price table is parsed from real files (and reloaded when it changes); the limiter charges cost
to a real MemoryLimitStore; the gRPC tests run a real gateway in-process in front of in-process
router and replica servers, as test_tenant_rules does.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY
from switchboard.common.errors import error_details
from switchboard.common.settings import ServerSettings
from switchboard.gateway.config import GatewaySettings
from switchboard.gateway.limiter import LimitExceeded, LimitKind, TenantLimiter
from switchboard.gateway.limitstore import MemoryLimitStore, limit_key
from switchboard.gateway.metering import BudgetReporter
from switchboard.gateway.prices import Price, PriceBook, PriceTableError, parse_prices
from switchboard.gateway.principal import Principal, TenantLimits
from switchboard.gateway.server import cost_alert_thresholds, serve
from switchboard.gateway.tenants import TenantDirectory, TenantsFileError, hash_key, parse_tenants
from switchboard.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, generator_pb2_grpc, router_pb2_grpc

from .redis_server import free_port
from .test_tenant_rules import RecordingRouter, Replica
from .test_token_ids import FP_A, decision, grpc_server, started_gateway

# Expert a: 1 per prompt token and 2 per output token, so a 4-token prompt with 2 output tokens costs 8.
PRICES = """
currency: EUR
default: {prompt_per_1k: 0.5, output_per_1k: 0.5}
experts:
  a:
    prompt_per_1k: 1000
    output_per_1k: 2000
    revisions:
      r2: {output_per_1k: 3000}
"""

TENANTS = f"""
tenants:
  admin:
    keys: [{{id: admin-1, sha256: "{hash_key("admin-key")}"}}]
    scopes: ["experts:*", admin]
  capped:
    keys: [{{id: capped-1, sha256: "{hash_key("capped-key")}"}}]
    limits: {{monthly_cost_budget: 10, cost_alert_thresholds: [0.9, 0.5]}}
  open:
    keys: [{{id: open-1, sha256: "{hash_key("open-key")}"}}]
  strict:
    keys: [{{id: strict-1, sha256: "{hash_key("strict-key")}"}}]
    limits: {{monthly_cost_budget: 10, on_store_unavailable: closed}}
  lenient:
    keys: [{{id: lenient-1, sha256: "{hash_key("lenient-key")}"}}]
    limits: {{monthly_cost_budget: 10, on_store_unavailable: open}}
"""


def test_the_price_table_prices_experts_revisions_and_the_rest() -> None:
    table = parse_prices(PRICES)
    assert table.currency == "EUR"
    assert table.price("a") == Price(1000, 2000)
    assert table.price("a", "r2") == Price(1000, 3000)  # the revision inherits the prompt price
    assert table.price("a", "r9") == Price(1000, 2000)  # an unknown revision: the expert's price
    assert table.price("b") == Price(0.5, 0.5)  # unnamed expert: the default
    assert parse_prices("experts: {a: {prompt_per_1k: 1}}").price("b") == Price()  # no default: free
    assert table.price("a").cost(4, 2) == 8.0
    assert Price(0.0005, 0.0015).cost_nanos(10, 10) == 20_000


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("experts: {a: {prompt_per_1k: -1}}", "experts.a.prompt_per_1k"),
        ("experts: {a: {prompt_per_1k: cheap}}", "experts.a.prompt_per_1k"),
        ("experts: {a: {prompt_per_1k: .nan}}", "experts.a.prompt_per_1k"),
        ("experts: {a: {per_replica_second: -0.1}}", "experts.a.per_replica_second: must be a number >= 0 (currency units per replica-second)"),
        ("experts: {a: {input_per_1k: 1}}", "experts.a: unknown field(s) input_per_1k"),
        ("experts: {a: {revisions: {r1: {output_per_1k: true}}}}", "experts.a.revisions.r1.output_per_1k"),
        ("experts: [a, b]", "experts: expected a mapping"),
        ("currency: 5", "currency"),
        ("prices: {}", "unknown field(s) prices"),
        ("experts: {a: [", "not valid YAML"),
    ],
)
def test_a_malformed_price_table_names_the_bad_value(text: str, named: str) -> None:
    with pytest.raises(PriceTableError, match=named.replace("(", r"\(").replace(")", r"\)")):
        parse_prices(text)


def test_the_price_book_reloads_and_keeps_the_last_good_table(tmp_path: Path) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text(PRICES)
    book = PriceBook(path)
    assert book.price("a") == Price(1000, 2000)
    failures = REGISTRY.get_sample_value("switchboard_gateway_prices_reload_failures_total") or 0
    path.write_text("experts: {a: {prompt_per_1k: -5}}\n")
    assert book.price("a") == Price(1000, 2000)  # a bad edit keeps the last good table
    assert REGISTRY.get_sample_value("switchboard_gateway_prices_reload_failures_total") == failures + 1
    replacement = tmp_path / "new.yaml"
    replacement.write_text("currency: USD\nexperts: {a: {prompt_per_1k: 3, output_per_1k: 4}}\n")
    os.replace(replacement, path)  # an atomic replace: a new inode
    assert book.price("a") == Price(3, 4) and book.table.currency == "USD"
    assert PriceBook(None).price("a") == Price()  # no table: free


def test_a_missing_price_table_is_a_start_error(tmp_path: Path) -> None:
    with pytest.raises(PriceTableError, match="GATEWAY_PRICES_FILE"):
        PriceBook(tmp_path / "absent.yaml")


def test_cost_budget_fields_in_the_tenants_file() -> None:
    config = parse_tenants(TENANTS)
    limits = config.tenants["capped"].limits
    assert limits.monthly_cost_budget == 10 and limits.cost_alert_thresholds == (0.5, 0.9)
    with pytest.raises(TenantsFileError, match=r"tenants\.t\.limits\.cost_alert_thresholds.*fractions"):
        parse_tenants("tenants: {t: {limits: {monthly_cost_budget: 5, cost_alert_thresholds: [1.5]}}}")
    with pytest.raises(TenantsFileError, match="needs monthly_cost_budget"):
        parse_tenants("tenants: {t: {limits: {cost_alert_thresholds: [0.5]}}}")
    with pytest.raises(TenantsFileError, match="monthly_cost_budget"):
        parse_tenants("tenants: {t: {limits: {monthly_cost_budget: -1}}}")
    # Thresholds in the defaults apply to the tenants that set a budget, and bother no other.
    inherited = parse_tenants(
        "defaults: {limits: {cost_alert_thresholds: [0.7]}}\n"
        "tenants: {t: {limits: {monthly_cost_budget: 5}}, u: {}}"
    )
    assert inherited.tenants["t"].limits.cost_alert_thresholds == (0.7,)


class WallClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_the_limiter_charges_cost_at_the_serving_price_and_refunds_it() -> None:
    store, wall = MemoryLimitStore(), WallClock()
    limiter = TenantLimiter(store, output_batch_tokens=1, wall_clock=wall)
    principal = Principal("acme", "k", limits=TenantLimits(monthly_cost_budget=1.0))
    key = limit_key("acme", "cost", "2023-11")

    admission = await limiter.admit(principal, request_id="r1", prompt_tokens=100, max_output_tokens=10)
    await admission.charge_output(1)
    assert await store.budget_used(key) == 0  # not priced yet: no expert has streamed
    admission.set_price(Price(prompt_per_1k=1.0, output_per_1k=10.0))
    await admission.charge_output(1)  # 100 prompt + 2 output tokens: 0.1 + 0.02
    assert await store.budget_used(key) == 120_000_000
    await admission.finish(5)  # 0.1 + 0.05
    assert await limiter.month_cost("acme") == pytest.approx(0.15)

    refunded = await limiter.admit(principal, request_id="r2", prompt_tokens=100, max_output_tokens=10)
    refunded.set_price(Price(prompt_per_1k=1.0))
    await refunded.settle_prompt(200)
    assert await limiter.month_cost("acme") == pytest.approx(0.35)
    await refunded.refund()  # refused after admission: its cost is given back
    assert await limiter.month_cost("acme") == pytest.approx(0.15)

    spender = await limiter.admit(principal, request_id="r3", prompt_tokens=1000, max_output_tokens=10)
    spender.set_price(Price(prompt_per_1k=1.0))
    await spender.finish(0)  # 1.0 more: 1.15, over the cap of 1.0
    with pytest.raises(LimitExceeded) as refused:
        await limiter.admit(principal, request_id="r4", prompt_tokens=1, max_output_tokens=1)
    assert refused.value.limit == "monthly_cost_budget" and refused.value.kind is LimitKind.QUOTA
    assert refused.value.quota_subject == "tenant:acme" and refused.value.retry_after_seconds > 0
    assert "renews" in refused.value.message
    wall.now += 31 * 86400  # the next month: a fresh counter
    await (await limiter.admit(principal, request_id="r5", prompt_tokens=1, max_output_tokens=1)).finish(0)


def test_replica_seconds_are_priced_alone_or_with_tokens() -> None:
    table = parse_prices(
        "experts: {gpu: {per_replica_second: 0.5, revisions: {r2: {prompt_per_1k: 1}}}, mixed: {output_per_1k: 1000, per_replica_second: 2}}"
    )
    assert table.price("gpu").cost(1000, 1000, 3.0) == pytest.approx(1.5)  # only the replica time
    assert table.price("gpu", "r2").cost(1000, 0, 3.0) == pytest.approx(2.5)  # the revision keeps the expert's 0.5/s
    assert table.price("mixed").cost(0, 2, 0.25) == pytest.approx(2.5)
    assert table.price("mixed").cost(0, 0, -1.0) == 0.0  # never a credit
    assert table.price("mixed").cost_nanos(0, 0, 1e-9) == 2


async def test_the_limiter_charges_the_replica_time_at_the_end() -> None:
    store = MemoryLimitStore()
    limiter = TenantLimiter(store, output_batch_tokens=1, wall_clock=WallClock())
    principal = Principal("acme", "k", limits=TenantLimits(monthly_cost_budget=100.0))
    admission = await limiter.admit(principal, request_id="r1", prompt_tokens=10, max_output_tokens=10)
    admission.set_price(Price(per_replica_second=2.0))
    await admission.charge_output(3)
    assert await limiter.month_cost("acme") == 0  # known only when the replica reports it, at the end
    await admission.finish(3, replica_seconds=0.75)
    assert await limiter.month_cost("acme") == pytest.approx(1.5)


async def test_a_tenant_without_a_cost_budget_costs_no_store_call() -> None:
    store = MemoryLimitStore()
    limiter = TenantLimiter(store)
    admission = await limiter.admit(Principal("free", "k"), request_id="r", prompt_tokens=10, max_output_tokens=1)
    admission.set_price(Price(1.0, 1.0))
    await admission.finish(1)
    assert len(store) == 0


async def test_cost_budgets_and_their_thresholds_are_exported_as_gauges(tmp_path: Path) -> None:
    from switchboard.gateway.metering import TENANT_COST_BUDGET, TENANT_MONTH_COST

    tenants_file = tmp_path / "tenants.yaml"
    tenants_file.write_text(TENANTS)
    directory = TenantDirectory(tenants_file)
    thresholds = cost_alert_thresholds(directory)
    # Named thresholds, or 0.8 for a cost-budgeted tenant that names none; none without a cost budget.
    assert thresholds == {"capped": (0.5, 0.9), "strict": (0.8,), "lenient": (0.8,)}
    spent = {"capped": 4.5}

    async def month_cost(tenant: str) -> float:
        return spent[tenant]

    reporter = BudgetReporter(
        lambda: {"capped": 10.0}, month_cost, 60, TENANT_COST_BUDGET, TENANT_MONTH_COST, lambda: dict(thresholds)
    )
    await reporter.report_once()

    def sample(name: str, **labels: str) -> float | None:
        return REGISTRY.get_sample_value(name, labels)

    assert sample("switchboard_gateway_tenant_cost_budget", tenant="capped") == 10.0
    assert sample("switchboard_gateway_tenant_month_cost", tenant="capped") == 4.5
    assert sample("switchboard_gateway_tenant_cost_alert_threshold", tenant="capped", threshold="0.9") == 0.9
    assert sample("switchboard_gateway_tenant_cost_alert_threshold", tenant="capped", threshold="0.5") == 0.5
    thresholds["capped"] = (0.75,)  # a reload changed them: the old series go
    await reporter.report_once()
    assert sample("switchboard_gateway_tenant_cost_alert_threshold", tenant="capped", threshold="0.9") is None
    assert sample("switchboard_gateway_tenant_cost_alert_threshold", tenant="capped", threshold="0.75") == 0.75


@asynccontextmanager
async def gateway(
    tmp_path: Path, prices: str | None = PRICES, **overrides: object
) -> AsyncIterator[gateway_pb2_grpc.GatewayStub]:
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text(TENANTS)
    prices_file = None
    if prices is not None:
        prices_file = tmp_path / "prices.yaml"
        prices_file.write_text(prices)
    replica, router = Replica(), RecordingRouter(None)
    async with (
        grpc_server(lambda s: generator_pb2_grpc.add_GeneratorServicer_to_server(replica, s)) as replica_addr,
        grpc_server(lambda s: router_pb2_grpc.add_RouterServicer_to_server(router, s)) as router_addr,
    ):
        answer = decision(("a", replica_addr, FP_A))
        answer.prompt_tokens = 4
        router.answer = answer
        settings = GatewaySettings(
            server=ServerSettings(port=0, metrics_port=0, drain_seconds=0.2),
            router_addr=router_addr,
            tenants_file=tenants,
            prices_file=prices_file,
            http_port=0,
            **overrides,  # type: ignore[arg-type]
        )
        async with started_gateway(settings) as channel:
            yield gateway_pb2_grpc.GatewayStub(channel)


async def complete(stub: gateway_pb2_grpc.GatewayStub, key: str) -> gateway_pb2.CompleteResponse:
    return await stub.Complete(
        gateway_pb2.CompleteRequest(prompt="To be", sampling=common_pb2.SamplingParams(max_tokens=2)),
        metadata=[("authorization", f"Bearer {key}")],
        timeout=20,
    )


def cost_counter(tenant: str) -> float:
    return REGISTRY.get_sample_value("switchboard_gateway_cost_total", {"tenant": tenant, "expert": "a"}) or 0.0


async def test_cost_in_usage_and_metrics_and_the_cost_cap_refuses_at_admission(tmp_path: Path) -> None:
    before = cost_counter("capped"), cost_counter("open")
    async with gateway(tmp_path) as stub:
        await complete(stub, "capped-key")  # 4 prompt + 2 output tokens: 8 of the 10
        await complete(stub, "capped-key")  # admitted (8 < 10), then 16: over the cap
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await complete(stub, "capped-key")
        await complete(stub, "open-key")  # no cost budget: never refused for cost
        own = await stub.Usage(gateway_pb2.UsageRequest(), metadata=[("authorization", "Bearer capped-key")])
        everyone = await stub.Usage(gateway_pb2.UsageRequest(), metadata=[("authorization", "Bearer admin-key")])
    error = refused.value
    details = error_details(error)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and details["reason"] == "TENANT_LIMIT_EXCEEDED"
    assert details["metadata"] == {"limit": "monthly_cost_budget"}
    ((subject, description),) = details["quota_violations"]
    assert subject == "tenant:capped" and description.startswith("monthly_cost_budget")
    assert details["retry_after"] > 0 and "monthly cost budget of 10" in (error.details() or "")

    assert own.currency == "EUR"
    (row,) = own.usage
    assert (row.tenant, row.expert, row.requests) == ("capped", "a", 2)
    assert (row.cost, row.month_cost, row.monthly_cost_budget) == (16.0, 16.0, 10.0)
    rows = {r.tenant: r for r in everyone.usage}
    assert set(rows) == {"capped", "open"}
    assert (rows["open"].cost, rows["open"].month_cost, rows["open"].monthly_cost_budget) == (8.0, 0.0, 0.0)
    assert (cost_counter("capped") - before[0], cost_counter("open") - before[1]) == (16.0, 8.0)


async def test_an_unreachable_limits_store_fails_a_cost_budget_open_or_closed(tmp_path: Path) -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"
    async with gateway(tmp_path, redis_url=closed, limit_store_timeout_seconds=0.2) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await complete(stub, "strict-key")
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_details(refused.value)["reason"] == "LIMITS_UNAVAILABLE"
        assert (await complete(stub, "lenient-key")).text == "ww"  # fail open: served, its cost not counted yet
        with pytest.raises(grpc.aio.AioRpcError) as usage:
            await stub.Usage(gateway_pb2.UsageRequest(), metadata=[("authorization", "Bearer lenient-key")])
        assert usage.value.code() == grpc.StatusCode.UNAVAILABLE and "limits store" in (usage.value.details() or "")


async def test_without_a_price_table_everything_is_free(tmp_path: Path) -> None:
    before = cost_counter("open")
    async with gateway(tmp_path, prices=None) as stub:
        await complete(stub, "open-key")
        usage = await stub.Usage(gateway_pb2.UsageRequest(), metadata=[("authorization", "Bearer open-key")])
    assert usage.currency == "" and usage.usage[0].cost == 0.0
    assert cost_counter("open") == before


async def test_a_malformed_price_table_stops_the_gateway_at_start(tmp_path: Path) -> None:
    tenants, prices = tmp_path / "tenants.yaml", tmp_path / "prices.yaml"
    tenants.write_text(TENANTS)
    prices.write_text("experts: {a: {prompt_per_1k: -1}}\n")
    settings = GatewaySettings(
        server=ServerSettings(port=0, metrics_port=0), tenants_file=tenants, prices_file=prices, http_port=0
    )
    assert await serve(settings, handle_signals=False) == 2
