"""Revision deployers: the new revision's Deployment built from the pool's, and the Kubernetes
deployer with the real client against an HTTP stand-in of the Deployments API (no API server can
run here), plus the rollout's deploy phase in the manager."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from switchboard.scheduler.actuators import ActuatorError
from switchboard.scheduler.revisions import (
    REVISION_LABEL,
    KubernetesRevisionDeployer,
    revision_deployment,
    revision_slug,
)
from switchboard.scheduler.rollout import (
    DEPLOY_TIMEOUT_SECONDS,
    Deploy,
    InvalidRollout,
    RevisionLedger,
    RolloutManager,
    RolloutSpec,
    RolloutState,
    Step,
)

REPO = Path(__file__).resolve().parents[3]
DEPLOYMENT = re.compile(r"^/apis/apps/v1/namespaces/([^/]+)/deployments(?:/([^/]+))?(/scale)?$")


def base_deployment() -> dict[str, Any]:
    """bard-small's generator Deployment as the base manifests render it."""
    docs = yaml.safe_load_all((REPO / "compose" / "k8s" / "base" / "generators.yaml").read_text())
    deployment = next(d for d in docs if d and d["kind"] == "Deployment" and d["metadata"]["name"] == "generator-bard-small")
    deployment["metadata"]["namespace"] = "switchboard"
    deployment["metadata"]["uid"] = "0d7b"  # server-set fields the copy must drop
    deployment["status"] = {"readyReplicas": 1}
    return deployment


def test_revision_slugs_are_dns_labels_and_distinct() -> None:
    assert revision_slug("v2") == "v2"
    assert revision_slug("sha-0123456789ab") == "sha-0123456789ab"
    odd = revision_slug("Release 2.1/Final")
    assert re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?", odd) and len(odd) <= 40
    assert revision_slug("Release 2.1/Final") != revision_slug("release-2-1-final")
    assert len(revision_slug("x" * 200)) <= 40


def test_the_new_revision_is_a_copy_of_the_pool_with_its_label_and_settings() -> None:
    base = base_deployment()
    new = revision_deployment(base, "v2", "/models/bard-small-v2", 2)
    assert new["metadata"]["name"] == "generator-bard-small-v2"
    assert new["metadata"]["labels"][REVISION_LABEL] == "v2"
    assert "uid" not in new["metadata"] and "status" not in new
    spec = new["spec"]
    assert spec["replicas"] == 2
    assert spec["selector"]["matchLabels"][REVISION_LABEL] == "v2"
    assert spec["template"]["metadata"]["labels"][REVISION_LABEL] == "v2"
    # The selector keeps the pool's labels (the Service, NetworkPolicies and monitors still select it).
    assert spec["selector"]["matchLabels"]["switchboard.dev/expert"] == "bard-small"
    generator = next(c for c in spec["template"]["spec"]["containers"] if c["name"] == "generator")
    env = {e["name"]: e.get("value") for e in generator["env"]}
    assert env["GENERATOR_REVISION"] == "v2" and env["GENERATOR_MODEL"] == "/models/bard-small-v2"
    assert [e["name"] for e in generator["env"]].count("GENERATOR_MODEL") == 1
    # The pool's Deployment is not changed by building the copy.
    assert REVISION_LABEL not in base["spec"]["selector"]["matchLabels"]
    same_model = revision_deployment(base, "v3", "", 1)
    old_model = next(e for e in base["spec"]["template"]["spec"]["containers"][0]["env"] if e["name"] == "GENERATOR_MODEL")
    kept = next(c for c in same_model["spec"]["template"]["spec"]["containers"] if c["name"] == "generator")
    assert {"name": "GENERATOR_MODEL", "value": old_model["value"]} in kept["env"]


def test_a_pool_without_a_generator_container_is_refused() -> None:
    base = base_deployment()
    base["spec"]["template"]["spec"]["containers"][0]["name"] = "sidecar"
    with pytest.raises(ActuatorError, match="no container named 'generator'"):
        revision_deployment(base, "v2", "", 1)


@dataclass
class DeploymentsStandIn:
    """Deployments of one namespace over real HTTP: GET, POST, DELETE, and PATCH of /scale."""

    deployments: dict[str, dict[str, Any]]
    requests: list[tuple[str, str, str, Any]] = field(default_factory=list)  # method, path, content type, body
    failures: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _status(code: int, reason: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code, "message": reason}


def _handler(state: DeploymentsStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            return

        def answer(self, code: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def handle_any(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            path = self.path.split("?")[0]
            with state.lock:
                state.requests.append((self.command, path, self.headers.get("Content-Type", ""), body))
                failure = state.failures.pop(0) if state.failures else 0
                if failure:
                    return self.answer(failure, _status(failure, "Forbidden" if failure == 403 else "InternalError"))
                match = DEPLOYMENT.match(path)
                if match is None:
                    return self.answer(404, _status(404, "NotFound"))
                _, name, scale = match.groups()
                if self.command == "POST" and name is None:
                    created = body["metadata"]["name"]
                    if created in state.deployments:
                        return self.answer(409, _status(409, "AlreadyExists"))
                    state.deployments[created] = body
                    return self.answer(201, body)
                if name not in state.deployments:
                    return self.answer(404, _status(404, "NotFound"))
                if self.command == "DELETE":
                    state.deployments.pop(name)
                    return self.answer(200, _status(200, "Success") | {"status": "Success"})
                if scale and self.command == "PATCH":
                    state.deployments[name]["spec"]["replicas"] = body["spec"]["replicas"]
                    replicas = state.deployments[name]["spec"]["replicas"]
                    return self.answer(
                        200,
                        {"apiVersion": "autoscaling/v1", "kind": "Scale", "metadata": {"name": name}, "spec": {"replicas": replicas}},
                    )
                return self.answer(200, state.deployments[name])

        do_GET = do_POST = do_DELETE = do_PATCH = handle_any

    return Handler


@pytest.fixture
def api() -> Iterator[tuple[DeploymentsStandIn, KubernetesRevisionDeployer]]:
    from kubernetes import client
    from switchboard.scheduler.actuators.kubernetes import KubernetesActuator

    state = DeploymentsStandIn({"generator-bard-small": base_deployment()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    configuration = client.Configuration(host=f"http://127.0.0.1:{server.server_address[1]}")
    configuration.retries = 0
    scaler = KubernetesActuator(namespace="switchboard", api_client=client.ApiClient(configuration), request_timeout=5.0)
    try:
        yield state, KubernetesRevisionDeployer(scaler)
    finally:
        server.shutdown()
        server.server_close()


def test_kubernetes_deploy_creates_the_copy_and_retire_deletes_it_or_scales_the_pool(api) -> None:
    state, deployer = api
    deployer.deploy("bard-small", "v2", "/models/bard-small-v2", 2)
    methods = [(m, p) for m, p, _, _ in state.requests]
    assert methods == [
        ("GET", "/apis/apps/v1/namespaces/switchboard/deployments/generator-bard-small"),
        ("POST", "/apis/apps/v1/namespaces/switchboard/deployments"),
    ]
    created = state.deployments["generator-bard-small-v2"]
    assert created["spec"]["replicas"] == 2 and created["metadata"]["namespace"] == "switchboard"
    # Deploying again (a retry after a timeout) sets the replicas of the one already there.
    deployer.deploy("bard-small", "v2", "/models/bard-small-v2", 3)
    assert state.requests[-1][:3] == (
        "PATCH",
        "/apis/apps/v1/namespaces/switchboard/deployments/generator-bard-small-v2/scale",
        "application/merge-patch+json",
    )
    assert created["spec"]["replicas"] == 3
    # A rollback retires the new revision: its Deployment is deleted; the pool is never touched.
    deployer.retire("bard-small", "v2", pool_revision=False)
    assert "generator-bard-small-v2" not in state.deployments
    deployer.retire("bard-small", "v9", pool_revision=False)
    assert state.requests[-1][0] == "DELETE" and state.deployments["generator-bard-small"]["spec"]["replicas"] == 1
    # A promotion retires the old revision: the pool's own Deployment (not one it created) goes to 0.
    deployer.retire("bard-small", "v1", pool_revision=True)
    assert state.requests[-1][:2] == ("PATCH", "/apis/apps/v1/namespaces/switchboard/deployments/generator-bard-small/scale")
    assert state.requests[-1][3] == {"spec": {"replicas": 0}}
    assert state.deployments["generator-bard-small"]["spec"]["replicas"] == 0


def test_kubernetes_errors_are_actuator_errors(api) -> None:
    state, deployer = api
    state.failures = [403]
    with pytest.raises(ActuatorError) as caught:
        deployer.deploy("bard-small", "v2", "", 1)
    assert caught.value.reason == "http_403"
    with pytest.raises(ActuatorError) as caught:
        deployer.deploy("milton-small", "v2", "", 1)  # the pool has no Deployment
    assert caught.value.reason == "http_404"


def test_the_rollout_waits_for_its_deployed_replicas() -> None:
    clock = [1000.0]
    ready: dict[tuple[str, str], int] = {("bard", "v1"): 1}
    manager = RolloutManager(("bard",), RevisionLedger(lambda: clock[0]), lambda e, r: ready.get((e, r), 0), clock=lambda: clock[0])
    spec = RolloutSpec("bard", "v1", "v2", steps=(Step(0.5, 10.0),), deploy=Deploy("/models/v2", 2))
    with pytest.raises(InvalidRollout):
        manager.start(RolloutSpec("bard", "v1", "v2", deploy=Deploy("", 0)))
    rollout = manager.start(spec)  # no replica of v2 yet: the deploy starts them
    assert manager.pending_deploys() == [rollout] and manager.splits["bard"].weight == 0.0
    manager.record_deploy_started("bard")
    assert manager.pending_deploys() == [] and rollout.deploy_state == "waiting"  # asked once, not every tick
    ready[("bard", "v2")] = 1
    assert manager.tick() == [] and "1 of 2 ready" in rollout.reason
    ready[("bard", "v2")] = 2
    assert [t for _, t in manager.tick()] == ["deployed"]
    assert manager.pending_deploys() == [] and manager.splits["bard"].weight == 0.5
    stuck = RolloutManager(("bard",), RevisionLedger(), lambda e, r: 1 if r == "v1" else 0, clock=lambda: clock[0])
    late = stuck.start(spec)
    clock[0] += DEPLOY_TIMEOUT_SECONDS
    stuck.tick()
    assert late.state is RolloutState.ROLLED_BACK and "0 of 2 replica(s)" in late.reason
    failed = RolloutManager(("bard",), RevisionLedger(), lambda e, r: 1 if r == "v1" else 0)
    broken = failed.start(spec)
    failed.record_deploy_failure("bard", "http_403: forbidden")
    assert broken.state is RolloutState.ROLLED_BACK and "could not be deployed" in broken.reason
