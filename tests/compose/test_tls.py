"""The same stack with compose.tls.yaml: mutual TLS on every internal hop and TLS on the gateway's
public ports, with certificates from `scripts/render_deploy.py certs`, run for real.

It runs from a copy of compose/ (the certificates go into the copy's certs/, never into the
repository's) on the images `test_stack` built, after that stack is down.
"""

from __future__ import annotations

import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import checks
import httpx
import pytest
from engine import Engine
from probes import DEV_KEY, generate, poll, switchboard_services, trace_ids
from stack import REPO, ComposeStack, copy_compose_folder, free_port, publish

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

TLS_FILES = ("compose.yaml", "compose.observability.yaml", "compose.local.yaml", "compose.tls.yaml")


@pytest.fixture(scope="module")
def tls_ports() -> dict[str, int]:
    return {name: free_port() for name in ("grpc", "http", "traces", "prometheus")}


@pytest.fixture(scope="module")
def tls_stack(
    stack: ComposeStack,
    engine: Engine,
    models_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    tls_ports: dict[str, int],
) -> Iterator[ComposeStack]:
    stack.down()  # the plain stack's images stay; its containers would compete for the machine
    folder = copy_compose_folder(tmp_path_factory.mktemp("tls"))
    subprocess.run(
        [sys.executable, str(REPO / "scripts/render_deploy.py"), "certs", str(folder / "certs")],
        check=True,
        timeout=120,
    )
    running = ComposeStack.of(
        engine, "switchboard-check-tls", [folder / f for f in TLS_FILES], models_dir, **publish(tls_ports)
    )
    try:
        running.up()
        yield running
    finally:
        running.down()


def test_every_container_is_healthy_over_tls(tls_stack: ComposeStack, engine: Engine) -> None:
    # Each healthcheck presents the container's own certificate to its own TLS port.
    names = [tls_stack.container(service) for service in switchboard_services(tls_stack)]
    assert [p for name in names for p in checks.container_problems(name, engine.inspect(name)[0])] == []
    assert checks.compose_problems(tls_stack.config()) == []


def test_the_client_streams_over_tls_and_plaintext_is_refused(
    tls_stack: ComposeStack, tls_ports: dict[str, int]
) -> None:
    ca = tls_stack.files[0].parent / "certs/ca.pem"
    done = generate(tls_ports["grpc"], "Enter the king, with his lords", max_tokens=16, cacert=ca)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() and "completion_tokens=16" in done.stderr
    plain = generate(tls_ports["grpc"], "Enter the king")
    assert plain.returncode == 1 and "UNAVAILABLE" in plain.stderr


def test_the_openai_client_streams_over_https(tls_stack: ComposeStack, tls_ports: dict[str, int]) -> None:
    import openai

    ca = tls_stack.files[0].parent / "certs/ca.pem"
    client = openai.OpenAI(
        base_url=f"https://127.0.0.1:{tls_ports['http']}/v1",
        api_key=DEV_KEY,
        timeout=60,
        http_client=httpx.Client(verify=ssl.create_default_context(cafile=str(ca))),
    )
    chunks = list(client.completions.create(model="auto", prompt="To be, or not", max_tokens=8, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices)


def test_one_trace_crosses_the_mutual_tls_hops(tls_stack: ComposeStack, tls_ports: dict[str, int]) -> None:
    ca = tls_stack.files[0].parent / "certs/ca.pem"
    assert generate(tls_ports["grpc"], "Once more unto the breach", cacert=ca).returncode == 0
    assert poll("a trace across the four services", lambda: trace_ids(tls_ports["traces"]), limit=60)


def test_the_tls_stack_stops_cleanly_and_leaves_nothing(tls_stack: ComposeStack) -> None:
    tls_stack.stop()
    services = switchboard_services(tls_stack)
    exits = {c["Service"]: c.get("ExitCode") for c in tls_stack.containers() if c["Service"] in services}
    assert exits and set(exits.values()) == {0}, exits
    tls_stack.down()
    assert tls_stack.leftovers() == []
