"""The gateway's `serve()`: load the tenants, connect to the router and the limits store, run the gRPC service."""

from __future__ import annotations

import asyncio
from pathlib import Path

from switchboard.common.channels import open_channel
from switchboard.common.logging import get_logger
from switchboard.common.service import GrpcService
from switchboard.common.settings import ServerSettings, parse_expert_folders
from switchboard.common.tls import TlsError, public_server_credentials
from switchboard.gateway.admission import AdmissionController
from switchboard.gateway.auth import Authenticator
from switchboard.gateway.auth_interceptor import AuthInterceptor
from switchboard.gateway.chat import ChatTemplates
from switchboard.gateway.config import GatewaySettings
from switchboard.gateway.core import GatewayCore
from switchboard.gateway.http_front import OpenAIFront, build_app, http_max_body_bytes
from switchboard.gateway.http_server import HttpServer
from switchboard.gateway.jwt_tokens import JwtConfigError
from switchboard.gateway.limiter import TenantLimiter
from switchboard.gateway.limitstore import LimitStore, MemoryLimitStore, RedisLimitStore
from switchboard.gateway.metering import (
    DEFAULT_COST_ALERT_THRESHOLDS,
    TENANT_COST_BUDGET,
    TENANT_MONTH_COST,
    BudgetReporter,
    UsageMeter,
)
from switchboard.gateway.prices import PriceBook, PriceTableError
from switchboard.gateway.response_cache import open_response_cache
from switchboard.gateway.servicer import GatewayServicer
from switchboard.gateway.tenants import TenantDirectory, TenantsFileError
from switchboard.v1 import gateway_pb2_grpc, router_pb2_grpc

log = get_logger(__name__)


def gateway_service(settings: ServerSettings, public_tls: tuple[Path, Path] | None = None) -> GrpcService:
    """The gateway's gRPC server: the shared one with authentication installed in front of every RPC.

    The gateway's port is public: TLS with `public_tls` (certificate, key) and no client certificates,
    or plaintext; its internal identity (settings.tls) is used only on its calls to the router and replicas.
    """
    credentials = None
    if public_tls is not None:
        credentials = public_server_credentials(*public_tls, "GATEWAY_PUBLIC_TLS_CERT_FILE", "GATEWAY_PUBLIC_TLS_KEY_FILE")
    return GrpcService("gateway", settings, extra_interceptors=[AuthInterceptor()], public=True, public_credentials=credentials)


def public_tls_files(settings: GatewaySettings) -> tuple[Path, Path] | None:
    """(certificate, key) of the public ports, or None for plaintext."""
    if settings.public_tls_cert_file is None or settings.public_tls_key_file is None:
        return None
    return settings.public_tls_cert_file, settings.public_tls_key_file


def _auth_interceptor(service: GrpcService) -> AuthInterceptor:
    found = [i for i in service.extra_interceptors if isinstance(i, AuthInterceptor)]
    if not found:
        # Fail closed: a server without the interceptor would serve unauthenticated calls.
        raise RuntimeError("the gateway's GrpcService must be made by gateway_service(), which installs authentication")
    return found[0]


def budgeted_tenants(tenants: TenantDirectory) -> dict[str, int]:
    """{tenant: monthly token budget} of the tenants that have one."""
    return {
        name: principal.limits.monthly_token_budget
        for name, principal in tenants.config.tenants.items()
        if principal.limits.monthly_token_budget is not None
    }


def cost_budgeted_tenants(tenants: TenantDirectory) -> dict[str, float]:
    """{tenant: monthly cost budget} of the tenants that have one."""
    return {
        name: principal.limits.monthly_cost_budget
        for name, principal in tenants.config.tenants.items()
        if principal.limits.monthly_cost_budget is not None
    }


def cost_alert_thresholds(tenants: TenantDirectory) -> dict[str, tuple[float, ...]]:
    """{tenant: shares of its cost budget that alert} of the cost-budgeted tenants (0.8 when none is named)."""
    return {
        name: principal.limits.cost_alert_thresholds or DEFAULT_COST_ALERT_THRESHOLDS
        for name, principal in tenants.config.tenants.items()
        if principal.limits.monthly_cost_budget is not None
    }


def limit_store(settings: GatewaySettings) -> LimitStore:
    """Redis when REDIS_URL is set (limits shared by every gateway replica), else in this process."""
    if settings.redis_url:
        return RedisLimitStore(settings.redis_url, timeout_seconds=settings.limit_store_timeout_seconds)
    return MemoryLimitStore()


async def serve(settings: GatewaySettings, service: GrpcService | None = None, handle_signals: bool = True) -> int:
    """Run the gateway until SIGTERM/SIGINT (or `service.stop()`); returns the process exit code.

    Tests pass their own `service` (made by `gateway_service`, to read its bound port) and handle_signals=False.
    """
    try:
        tenants = TenantDirectory(settings.tenants_file.expanduser())
    except TenantsFileError as exc:
        log.error("bad tenants file", error=str(exc))
        return 2
    try:
        prices = PriceBook(settings.prices_file.expanduser() if settings.prices_file is not None else None)
    except PriceTableError as exc:
        log.error("bad price table", error=str(exc))
        return 2
    try:
        service = service or gateway_service(settings.server, public_tls_files(settings))
    except TlsError as exc:
        log.error("bad public TLS files", error=str(exc))
        return 2
    authenticator = Authenticator(tenants)
    try:
        authenticator.check()
    except JwtConfigError as exc:
        log.error("bad JWT keys in the tenants file", error=str(exc))
        return 2
    _auth_interceptor(service).bind(authenticator)
    router_channel = open_channel(settings.router_addr, settings.server.tls, peer_role="router")
    store = limit_store(settings)
    cache = open_response_cache(
        settings.cache,
        redis_url=settings.redis_url,
        ttl_seconds=settings.cache_ttl_seconds,
        max_bytes=settings.cache_max_bytes,
        timeout_seconds=settings.limit_store_timeout_seconds,
    )
    limiter = TenantLimiter(store)
    core = GatewayCore(
        settings,
        router_pb2_grpc.RouterStub(router_channel),
        limiter,
        AdmissionController(settings.max_inflight, settings.max_queued, quantum_tokens=settings.fair_quantum_tokens),
        UsageMeter(),
        tenants,
        cache,
        prices,
    )
    gateway_pb2_grpc.add_GatewayServicer_to_server(
        GatewayServicer(core, settings.default_timeout_seconds), service.server
    )
    http: HttpServer | None = None
    if settings.http_port:
        templates = ChatTemplates(parse_expert_folders("GATEWAY_MODEL_FOLDERS", settings.model_folders))
        front = OpenAIFront(
            core, templates, settings.default_timeout_seconds, max_body_bytes=http_max_body_bytes(settings.max_prompt_chars)
        )
        http = HttpServer(
            build_app(front, authenticator), settings.server.host, settings.http_port, tls=public_tls_files(settings)
        )
        await http.start()
        service.on_drain(http.stop)
    log.info(
        "gateway configured",
        http_port=http.port if http is not None else 0,
        router=settings.router_addr,
        tenants=len(tenants.config.tenants),
        keys=len(tenants.config.by_key_hash),
        tenants_file=str(tenants.path),
        limits_store="redis" if settings.redis_url else "memory",
        response_cache=settings.cache,
        prices_file=str(prices.path or ""),
    )
    budgets = BudgetReporter(lambda: budgeted_tenants(tenants), limiter.month_tokens, settings.budget_report_seconds)
    cost_budgets = BudgetReporter(
        lambda: cost_budgeted_tenants(tenants),
        limiter.month_cost,
        settings.budget_report_seconds,
        TENANT_COST_BUDGET,
        TENANT_MONTH_COST,
        lambda: cost_alert_thresholds(tenants),
    )
    reporters = [asyncio.create_task(budgets.run()), asyncio.create_task(cost_budgets.run())]
    try:
        await service.run(["switchboard.v1.Gateway"], handle_signals=handle_signals)
    finally:
        for reporter in reporters:
            reporter.cancel()
        # After the drain: in-flight streams have finished (or been cancelled) by now.
        if http is not None:
            await http.stop()
        await core.close()
        await store.close()
        if cache is not None:
            await cache.close()
        await router_channel.close()
    return service.exit_code
