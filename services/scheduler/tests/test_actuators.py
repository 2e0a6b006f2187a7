"""The allocation actuators: dry run, local processes, and Kubernetes against a stand-in API server.

No Kubernetes API server can run here, so `ScaleStandIn` is a small real HTTP server (threaded
`http.server` on 127.0.0.1) that serves the Deployment scale subresource,
GET/PATCH `/apis/apps/v1/namespaces/{ns}/deployments/{name}/scale`, as the API server does (a
`autoscaling/v1` Scale with a resource version; a merge patch with a stale resource version is a
409 Conflict; errors as `Status` objects), and records every request. The Kubernetes actuator runs
with the real `kubernetes` client against it, and the tests check what that client sends: method,
path, bearer token, content type of the patch and its body.
"""

from __future__ import annotations

import io
import json
import re
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from switchboard.scheduler.actuators import ActuatorError, DryRunActuator

SCALE_PATH = re.compile(r"^/apis/apps/v1/namespaces/([^/]+)/deployments/([^/]+)/scale$")


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: object


@dataclass
class ScaleStandIn:
    """The scale subresource of some Deployments, over real HTTP (module docstring)."""

    replicas: dict[tuple[str, str], int]
    requests: list[Recorded] = field(default_factory=list)
    # Statuses to answer instead of serving, one per request, first first (403, 500, ...; 0: serve).
    failures: list[int] = field(default_factory=list)
    delay_seconds: float = 0.0
    versions: dict[tuple[str, str], int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def scale(self, key: tuple[str, str]) -> dict[str, object]:
        return {
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": {"name": key[1], "namespace": key[0], "resourceVersion": str(self.versions.get(key, 1))},
            "spec": {"replicas": self.replicas[key]},
            "status": {"replicas": self.replicas[key], "selector": "app.kubernetes.io/name=generator"},
        }


def status(code: int, reason: str, message: str) -> dict[str, object]:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": reason, "code": code}


def handler_for(state: ScaleStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # quiet
            return

        def answer(self, code: int, payload: dict[str, object]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (the timeout test)

        def handle_any(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            with state.lock:
                state.requests.append(Recorded(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                failure = state.failures.pop(0) if state.failures else None
            if state.delay_seconds:
                time.sleep(state.delay_seconds)
            if failure:
                reason = {403: "Forbidden", 404: "NotFound", 409: "Conflict"}.get(failure, "InternalError")
                self.answer(failure, status(failure, reason, f"stand-in answers {failure}"))
                return
            match = SCALE_PATH.match(self.path.split("?")[0])
            key = (match.group(1), match.group(2)) if match else None
            if key is None or key not in state.replicas:
                self.answer(404, status(404, "NotFound", f"{self.path} not found"))
                return
            with state.lock:
                if self.command == "PATCH":
                    wanted = (body or {}).get("metadata", {}).get("resourceVersion")
                    if wanted is not None and wanted != str(state.versions.get(key, 1)):
                        self.answer(409, status(409, "Conflict", "the object has been modified"))
                        return
                    state.replicas[key] = int(body["spec"]["replicas"])
                    state.versions[key] = state.versions.get(key, 1) + 1
                payload = state.scale(key)
            self.answer(200, payload)

        do_GET = handle_any
        do_PATCH = handle_any

    return Handler


@pytest.fixture
def stand_in() -> Iterator[tuple[ScaleStandIn, str]]:
    state = ScaleStandIn({("switchboard", "generator-bard-small"): 1, ("switchboard", "generator-milton-small"): 2})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def k8s_actuator(url: str, timeout: float = 5.0):
    from kubernetes import client
    from switchboard.scheduler.actuators.kubernetes import KubernetesActuator

    configuration = client.Configuration(host=url)
    configuration.api_key = {"authorization": "test-token"}
    configuration.api_key_prefix = {"authorization": "Bearer"}
    configuration.retries = 0  # one request per call, so the stand-in sees exactly what was sent
    return KubernetesActuator(
        namespace="switchboard", api_client=client.ApiClient(configuration), request_timeout=timeout
    )


def test_kubernetes_actuator_reads_then_patches_the_scale_subresource(stand_in: tuple[ScaleStandIn, str]) -> None:
    state, url = stand_in
    actuator = k8s_actuator(url)
    assert actuator.replicas("bard-small") == 1
    assert actuator.add("bard-small", 2) == []
    assert state.replicas[("switchboard", "generator-bard-small")] == 3
    actuator.remove("milton-small", ["milton-small-0"])
    assert state.replicas[("switchboard", "generator-milton-small")] == 1
    methods = [(r.method, r.path) for r in state.requests]
    scale = "/apis/apps/v1/namespaces/switchboard/deployments/generator-{}/scale"
    assert methods == [
        ("GET", scale.format("bard-small")),
        ("GET", scale.format("bard-small")),
        ("PATCH", scale.format("bard-small")),
        ("GET", scale.format("milton-small")),
        ("PATCH", scale.format("milton-small")),
    ]
    patch = state.requests[2]
    # What the real client puts on the wire: a JSON merge patch of spec.replicas, with the
    # resource version it read as a precondition, and the service account's bearer token.
    assert patch.headers["content-type"] == "application/merge-patch+json"
    assert patch.body == {"spec": {"replicas": 3}, "metadata": {"resourceVersion": "1"}}
    assert all(r.headers["authorization"] == "Bearer test-token" for r in state.requests)
    assert state.requests[0].headers["accept"].startswith("application/json")
    actuator.close()


@pytest.mark.parametrize(("code", "reason"), [(403, "http_403"), (500, "http_500"), (404, "http_404")])
def test_kubernetes_api_errors_become_actuator_errors(stand_in: tuple[ScaleStandIn, str], code: int, reason: str) -> None:
    state, url = stand_in
    state.failures = [code]
    with pytest.raises(ActuatorError) as caught:
        k8s_actuator(url).add("bard-small", 1)
    assert caught.value.reason == reason and str(code) in str(caught.value)
    assert state.replicas[("switchboard", "generator-bard-small")] == 1  # nothing changed


def test_a_conflicting_change_between_read_and_patch_is_a_409_not_an_overwrite(
    stand_in: tuple[ScaleStandIn, str],
) -> None:
    state, url = stand_in
    actuator = k8s_actuator(url)
    original = actuator._read

    def read_then_someone_scales(name: str) -> tuple[int, str]:
        result = original(name)
        with state.lock:  # an operator's `kubectl scale` lands in between
            state.replicas[("switchboard", name)] = 5
            state.versions[("switchboard", name)] = 7
        return result

    actuator._read = read_then_someone_scales  # type: ignore[method-assign]
    with pytest.raises(ActuatorError) as caught:
        actuator.add("bard-small", 1)
    assert caught.value.reason == "http_409"
    assert state.replicas[("switchboard", "generator-bard-small")] == 5


def test_an_api_server_that_does_not_answer_is_a_timeout(stand_in: tuple[ScaleStandIn, str]) -> None:
    state, url = stand_in
    state.delay_seconds = 2.0
    started = time.monotonic()
    with pytest.raises(ActuatorError) as caught:
        k8s_actuator(url, timeout=0.3).add("bard-small", 1)
    assert caught.value.reason == "timeout"
    assert time.monotonic() - started < 1.9


def test_an_unreachable_api_server_is_reported() -> None:
    from switchboard.scheduler.actuators.local import free_port

    with pytest.raises(ActuatorError) as caught:
        k8s_actuator(f"http://127.0.0.1:{free_port()}", timeout=1.0).add("bard-small", 1)
    assert caught.value.reason == "unreachable"


def test_dry_run_prints_and_acts_on_nothing() -> None:
    out = io.StringIO()
    dry = DryRunActuator(out)
    assert dry.add("bard-small", 2) == [] and not dry.acts
    dry.remove("bard-small", ["bard-small-1"])
    assert out.getvalue().splitlines() == [
        "allocation dry run: would start 2 replica(s) of bard-small",
        "allocation dry run: would stop bard-small-1 of bard-small (drained)",
    ]
    assert dry.calls == [("add", "bard-small", 2), ("remove", "bard-small", ("bard-small-1",))]


# ----------------------------------------------------------------------------- local processes

FAKE_GENERATOR = """
import json, os, signal, time
json.dump({k: v for k, v in os.environ.items() if k.startswith(("GENERATOR_", "SWITCHBOARD_", "SCHEDULER_ADDR"))},
          open(os.environ["OUT_DIR"] + "/" + os.environ["GENERATOR_REPLICA_ID"] + ".json", "w"))
if os.environ.get("STUBBORN"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
while True:
    time.sleep(0.05)
"""


def local_actuator(tmp_path: Path, pki: bool = False, stubborn: bool = False, grace: float = 5.0):
    from switchboard.scheduler.actuators.local import GeneratorTemplate, LocalProcessActuator

    script = tmp_path / "fake_generator.py"
    script.write_text(FAKE_GENERATOR)
    pki_dir = None
    env = {"GENERATOR_MODEL": "/models/bard", "GENERATOR_EXPERT": "bard-small", "GENERATOR_METRICS_PORT": "9111",
           "SCHEDULER_ADDR": "127.0.0.1:1234", "GENERATOR_REPLICA_ID": "ignored", "OUT_DIR": str(tmp_path)}
    if pki:
        from switchboard.common.pki import LocalCA

        pki_dir = tmp_path / "pki"
        ca = LocalCA.create(pki_dir)
        env["SWITCHBOARD_TLS_CA_FILE"] = str(ca.ca_file)
    if stubborn:
        env["STUBBORN"] = "1"
    template = GeneratorTemplate((sys.executable, str(script)), {"bard-small": env}, tmp_path / "logs", pki_dir, grace)
    path = template.write(tmp_path / "template.json")
    assert (path.stat().st_mode & 0o777) == 0o600
    return LocalProcessActuator(GeneratorTemplate.read(path))


def wait_for(path: Path, timeout: float = 10.0) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline, f"{path} never written"
        time.sleep(0.05)
    time.sleep(0.1)
    return json.loads(path.read_text())


def test_local_actuator_starts_generators_with_the_template_environment_and_stops_them(tmp_path: Path) -> None:
    actuator = local_actuator(tmp_path, pki=True)
    try:
        ids = actuator.add("bard-small", 2)
        assert ids == ["bard-small-auto-1", "bard-small-auto-2"]
        envs = [wait_for(tmp_path / f"{rid}.json") for rid in ids]
        for rid, env in zip(ids, envs, strict=True):
            assert env["GENERATOR_REPLICA_ID"] == rid and env["GENERATOR_EXPERT"] == "bard-small"
            assert env["GENERATOR_MODEL"] == "/models/bard" and env["SCHEDULER_ADDR"] == "127.0.0.1:1234"
            assert env["GENERATOR_PORT"] != env["GENERATOR_METRICS_PORT"] != "9111"
            # Its own certificate, for the identity the scheduler binds its replica id to.
            assert env["SWITCHBOARD_TLS_CERT_FILE"].endswith(".pem") and Path(env["SWITCHBOARD_TLS_CERT_FILE"]).is_file()
            from cryptography import x509

            cert = x509.load_pem_x509_certificate(Path(env["SWITCHBOARD_TLS_CERT_FILE"]).read_bytes())
            assert cert.subject.rfc4514_string() == f"CN=generator/{rid}"
        assert envs[0]["GENERATOR_PORT"] != envs[1]["GENERATOR_PORT"]
        assert (tmp_path / "logs" / "generator-bard-small-auto-1.log").exists()
        assert actuator.can_remove(ids[0]) and not actuator.can_remove("bard-small-0")
        actuator.remove("bard-small", [ids[0]])
        assert not actuator.can_remove(ids[0]) and actuator.alive(ids[1])
        actuator.remove("bard-small", [ids[0]])  # a retry of a stop that outlasted its timeout: nothing to do
        with pytest.raises(ActuatorError) as caught:
            actuator.remove("bard-small", ["bard-small-0"])  # not one it started
        assert caught.value.reason == "not_owned"
        with pytest.raises(ActuatorError) as caught:
            actuator.add("milton-small", 1)
        assert caught.value.reason == "unknown_expert"
    finally:
        actuator.close()
    assert not actuator.alive(ids[1])


def test_local_actuator_kills_a_generator_that_ignores_sigterm(tmp_path: Path) -> None:
    actuator = local_actuator(tmp_path, stubborn=True, grace=0.5)
    (rid,) = actuator.add("bard-small", 1)
    wait_for(tmp_path / f"{rid}.json")
    pid = actuator.pid(rid)
    started = time.monotonic()
    actuator.remove("bard-small", [rid])
    assert 0.4 < time.monotonic() - started < 5
    import os

    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_generator_template_errors_name_the_file(tmp_path: Path) -> None:
    from switchboard.scheduler.actuators.local import GeneratorTemplate

    bad = tmp_path / "t.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"t\.json"):
        GeneratorTemplate.read(bad)
    bad.write_text(json.dumps({"version": 1, "argv": [], "experts": {}, "log_dir": "/tmp"}))
    with pytest.raises(ValueError, match="argv"):
        GeneratorTemplate.read(bad)
    with pytest.raises(ValueError, match=r"missing\.json"):
        GeneratorTemplate.read(tmp_path / "missing.json")
