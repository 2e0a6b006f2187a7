"""`switchboard up`: start the whole stack on 127.0.0.1 and keep it running until Ctrl-C.

It builds the demo experts if they are missing (switchboard.experts) and the router's
default learned gate for the experts config (`switchboard router build`, cached; skipped when
ROUTER_GATE_PATH is set, or with --no-gate), makes sure a
dev API key exists (the key in `<cache>/dev-api-key`, its hash in the gateway's tenants
file `<cache>/gateway-tenants.yaml`), starts the scheduler, the router, one generator
per replica in the experts config and the gateway as separate processes (each
`python -m switchboard.<service>`, as in the Dockerfiles), waits until every one
answers grpc.health.v1 SERVING and every generator is registered, prints the
endpoints, the metrics URLs and the key, then waits. Ctrl-C (or SIGTERM) stops all
of them (SIGTERM, grace period, SIGKILL); if one dies, the rest are stopped and
the command exits 1.

With --traces it also runs the local trace viewer (Arize Phoenix, installed on first use into a
venv of its own under the cache: switchboard.cli.traceviewer), points every service's OTLP
export at it, prints its URL, and stops it with the rest; `switchboard generate` then prints the
viewer's URL of each request's trace.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from switchboard.cli.processes import StartupError, free_port
from switchboard.cli.traceviewer import (
    TraceViewer,
    TraceViewerError,
    ensure_phoenix,
    remove_session,
    write_session,
)


def cache_dir() -> Path:
    """`$SWITCHBOARD_CACHE_DIR`, default ~/.cache/switchboard."""
    return Path(os.environ.get("SWITCHBOARD_CACHE_DIR") or Path.home() / ".cache" / "switchboard").expanduser()


def default_experts_config() -> Path:
    """SWITCHBOARD_EXPERTS_CONFIG, else ./config/experts.yaml, else the repository's copy."""
    configured = os.environ.get("SWITCHBOARD_EXPERTS_CONFIG")
    if configured:
        return Path(configured)
    local = Path("config/experts.yaml")
    if local.is_file():
        return local
    return Path(__file__).resolve().parents[4] / "config" / "experts.yaml"


def ensure_dev_key(directory: Path, tenants_file: Path, tenant: str = "dev") -> str:
    """The stable dev API key: reuse `<dir>/dev-api-key` if it is the tenants file's, else make one.

    The dev tenant gets every expert and the admin scope (so `Usage` works locally) and no limits.
    """
    from switchboard.gateway.keys import add_key, new_key
    from switchboard.gateway.tenants import TenantDirectory, TenantsFileError

    key_path = directory / "dev-api-key"
    if key_path.is_file() and tenants_file.is_file():
        key = key_path.read_text().strip()
        try:
            if key and TenantDirectory(tenants_file).principal_for_key(key) is not None:
                return key
        except TenantsFileError:
            pass  # a broken file: add_key below refuses it with the reason
    key = new_key()
    add_key(tenants_file, tenant, key, scopes=["experts:*", "admin"])
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    return key


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    """Start the stack, print how to use it, wait for Ctrl-C or a dead service."""
    from switchboard.cli.localstack import LocalStack, plan_stack
    from switchboard.common.experts_config import ExpertsConfigError, load_experts_config

    experts_config = Path(args.experts_config or default_experts_config())
    try:
        experts = load_experts_config(experts_config)
    except ExpertsConfigError as exc:
        print(f"switchboard up: {exc}", file=sys.stderr)
        return 2
    models: dict[str, str] = {}
    demo = [spec.model for spec in experts if not Path(spec.model).expanduser().exists()]
    if demo:
        from switchboard.experts import DEMO_EXPERTS, ensure_experts

        unknown = [name for name in demo if name not in DEMO_EXPERTS]
        if unknown:
            print(f"switchboard up: model {unknown[0]!r} is neither a folder nor a demo expert", file=sys.stderr)
            return 2
        print(f"checking demo experts {', '.join(sorted(set(demo)))} (built into the cache on first use)...", flush=True)
        folders = ensure_experts(sorted(set(demo)))
        models = {spec.name: str(folders[spec.model]) for spec in experts if spec.model in folders}
    cache = cache_dir()
    tenants_file = Path(os.environ.get("GATEWAY_TENANTS_FILE") or cache / "gateway-tenants.yaml")
    key = ensure_dev_key(cache, tenants_file)
    # A throwaway CA and a certificate per process: the internal hops run mutual TLS locally too.
    plan = plan_stack(experts_config, tenants_file, models=models, free_ports=args.free_ports, tls_dir=cache / "pki")
    gate = os.environ.get("ROUTER_GATE_PATH", "")
    if not gate and not args.no_gate:
        from switchboard.routing.gate_cli import build_default_gate

        print("checking the router's default gate (built into the cache on first use)...", flush=True)
        try:
            gate = str(build_default_gate(experts_config, progress=lambda line: print(f"  {line}", flush=True)))
        except (OSError, ValueError) as exc:
            print(f"switchboard up: cannot build the router's gate: {exc} (--no-gate uses the built-in rule)", file=sys.stderr)
            return 2
    if gate:
        plan.env["ROUTER_GATE_PATH"] = gate
    log_dir = Path(args.log_dir or cache / "logs")
    viewer = None
    if args.traces:
        try:
            phoenix = ensure_phoenix(cache, progress=lambda line: print(line, flush=True))
        except TraceViewerError as exc:
            print(f"switchboard up: {exc}", file=sys.stderr)
            return 2
        viewer = TraceViewer(phoenix, cache / "traces", log_dir / "trace-viewer.log")
        if args.free_ports:
            viewer.port, viewer.grpc_port = free_port(), free_port()
        plan.env.update(viewer.export_env())
    stack = LocalStack(plan, log_dir, start_timeout=args.timeout)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        started = time.monotonic()
        if viewer is not None:
            print(f"starting the trace viewer (Phoenix {viewer.ui}, OTLP {viewer.otlp_endpoint})...", flush=True)
            viewer.start()
        print(f"starting scheduler, router, {len(plan.generators)} generator(s), gateway (logs in {log_dir})...", flush=True)
        stack.start(args.timeout)
        if viewer is not None:
            write_session(cache, viewer, plan.gateway_addr)
        print(f"\nSwitchboard is up ({time.monotonic() - started:.1f}s)\n")
        print(f"  gateway    {plan.gateway_addr}   metrics http://127.0.0.1:{plan.gateway_metrics}/metrics")
        print(f"  OpenAI API {plan.openai_base_url}   (the same key; model: an expert's name or auto)")
        print(f"  router     {plan.router_addr}   metrics http://127.0.0.1:{plan.router_metrics}/metrics   gate: {gate or 'built-in n-gram rule'}")
        print(f"  scheduler  {plan.scheduler_addr}   metrics http://127.0.0.1:{plan.scheduler_metrics}/metrics")
        for g in plan.generators:
            print(f"  generator  127.0.0.1:{g.port}   metrics http://127.0.0.1:{g.metrics_port}/metrics   {g.expert} ({g.replica_id})")
        print(f"\n  dev API key: {key}")
        print(f"  export SWITCHBOARD_API_KEY={key}")
        print('  switchboard generate "To be, or not to be"')
        print(f"  grpcurl -plaintext {plan.gateway_addr} list")
        print(
            f'  grpcurl -plaintext -H "authorization: Bearer $SWITCHBOARD_API_KEY" '
            f"-d '{{\"prompt\":\"To be\",\"sampling\":{{\"max_tokens\":16}}}}' {plan.gateway_addr} switchboard.v1.Gateway/Generate"
        )
        print(
            f"  curl {plan.openai_base_url}/completions -H \"authorization: Bearer $SWITCHBOARD_API_KEY\" "
            "-H 'content-type: application/json' -d '{\"model\":\"auto\",\"prompt\":\"To be\",\"max_tokens\":16}'"
        )
        print(
            f"  internal hops: mutual TLS (CA and certificates in {cache / 'pki'}; tools use operator.pem "
            "with SWITCHBOARD_TLS_CA_FILE, SWITCHBOARD_TLS_CERT_FILE, SWITCHBOARD_TLS_KEY_FILE)"
        )
        if viewer is not None:
            print(f"  traces     {viewer.ui}   (Phoenix; every service exports to {viewer.otlp_endpoint})")
            print("             `switchboard generate` prints the viewer's URL of each request's trace")
            print(f"\n  logs: {log_dir}/<service>.log")
        else:
            print(f"\n  logs: {log_dir}/<service>.log   traces: `switchboard up --traces` (or set OTEL_EXPORTER_OTLP_ENDPOINT)")
        print("\nCtrl-C stops everything.", flush=True)
        while True:
            dead = next(iter(stack.group.dead()), None)
            if dead is not None:
                print(
                    f"\n{dead.spec.name} exited with code {dead.popen.returncode}; stopping the stack. "
                    f"Last log lines ({dead.log_path}):\n{dead.log_tail(15)}",
                    file=sys.stderr,
                )
                return 1
            if viewer is not None and not viewer.alive():
                print(f"\nthe trace viewer exited; stopping the stack. Log: {viewer.log_path}", file=sys.stderr)
                return 1
            time.sleep(0.5)
    except (StartupError, TraceViewerError) as exc:
        print(f"switchboard up: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping...", flush=True)
        return 0
    finally:
        # Ignore further Ctrl-C while children drain, so none is left behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop()
        if viewer is not None:
            remove_session(cache)
            viewer.stop()
        print("stopped.", flush=True)


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register `switchboard up`."""
    parser = subparsers.add_parser("up", help="start all four services locally and wait until healthy", description=__doc__)
    parser.add_argument("--experts-config", default=None, help="experts config (default: config/experts.yaml)")
    parser.add_argument("--log-dir", default=None, help="service logs folder (default: <cache>/logs)")
    parser.add_argument(
        "--free-ports", action="store_true", help="use free ports instead of 50051.. (a second stack on one machine)"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the stack to become healthy")
    parser.add_argument(
        "--no-gate", action="store_true", help="route with the built-in n-gram rule instead of the learned gate"
    )
    parser.add_argument(
        "--traces",
        action="store_true",
        help="also run the local trace viewer (Phoenix; installed into <cache>/phoenix on first use) and export every service's spans to it",
    )
    parser.set_defaults(func=run)
