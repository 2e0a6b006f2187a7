"""Kubernetes: kustomize renders each overlay, every object validates, and the semantics hold."""

from __future__ import annotations

import shutil
from pathlib import Path

import deploy_checks as dc
import pytest
import yaml
from switchboard.common.experts_config import load_experts_config

OVERLAYS = {"cpu": False, "gpu": True, "dev": False, "vllm": True, "rollouts": False}  # overlay -> generators on GPUs


def _render_deploy():
    import importlib.util

    spec = importlib.util.spec_from_file_location("render_deploy", dc.REPO / "scripts/render_deploy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render_deploy = _render_deploy()


@pytest.fixture(scope="module")
def rendered(repo: Path) -> dict[str, list[dict]]:
    """The objects of each overlay (and the base), rendered once."""
    out = {}
    for name in [*OVERLAYS, "base"]:
        objects, problems = dc.kustomize(repo / "compose/k8s" / name)
        assert problems == []
        out[name] = objects
    return out


@pytest.mark.parametrize("overlay", [*OVERLAYS, "base"])
def test_every_object_validates_against_the_schemas(overlay: str, rendered: dict[str, list[dict]]) -> None:
    assert rendered[overlay], "kustomize rendered nothing"
    assert dc.kubernetes_validate(rendered[overlay]) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_agrees_with_the_services(
    overlay: str, rendered: dict[str, list[dict]], contracts: dict[str, dc.ServiceContract]
) -> None:
    assert dc.check_kubernetes(rendered[overlay], contracts, gpu=OVERLAYS[overlay]) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_generator_pool_per_expert(overlay: str, rendered: dict[str, list[dict]], repo: Path) -> None:
    experts = [spec.name for spec in load_experts_config(repo / "config/experts.yaml")]
    if overlay == "vllm":
        experts += [pool.name for pool in render_deploy.vllm_pools(repo)]
    (configmap,) = [o for o in rendered[overlay] if o["kind"] == "ConfigMap"]
    assert [e["name"] for e in yaml.safe_load(configmap["data"]["experts.yaml"])["experts"]] == experts
    pools = {}
    for d in rendered[overlay]:
        if d["kind"] == "Deployment" and d["metadata"]["name"].startswith("generator-"):
            (container,) = [c for c in d["spec"]["template"]["spec"]["containers"] if c["name"] == "generator"]
            env = {e["name"]: e.get("value") for e in container["env"]}
            pools[d["metadata"]["name"]] = env["GENERATOR_EXPERT"]
    assert pools == {f"generator-{e}": e for e in experts}


def test_experts_configmap_is_the_repository_config(repo: Path, rendered: dict[str, list[dict]]) -> None:
    assert (repo / "compose/k8s/base/experts.yaml").read_text() == (repo / "config/experts.yaml").read_text(), (
        "run: cp config/experts.yaml compose/k8s/base/experts.yaml"
    )
    (configmap,) = [o for o in rendered["gpu"] if o["kind"] == "ConfigMap"]
    assert configmap["data"]["experts.yaml"] == (repo / "config/experts.yaml").read_text()


def _one(objects: list[dict], kind: str, name: str) -> dict:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_serves_http_and_shares_its_limits_through_redis(
    overlay: str, rendered: dict[str, list[dict]], repo: Path, contracts: dict[str, dc.ServiceContract]
) -> None:
    objects = rendered[overlay]
    (container,) = _one(objects, "Deployment", "gateway")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["GATEWAY_HTTP_PORT"] == str(contracts["gateway"].http_port)
    assert {"name": "http", "containerPort": 8080} in container["ports"]
    service_ports = {p["name"]: p["port"] for p in _one(objects, "Service", "gateway")["spec"]["ports"]}
    assert service_ports == {"grpc": 50051, "http": 8080, "metrics": 9101}
    public = _one(objects, "NetworkPolicy", "gateway-public")["spec"]["ingress"]
    assert [{p["port"] for p in rule["ports"]} for rule in public] == [{50051, 8080}]
    assert env["REDIS_URL"] == "redis://redis:6379/0"
    # The same Redis image as compose, so both stacks test one version.
    model, problems = dc.compose_config([repo / "compose/compose.yaml"], [])
    assert problems == []
    (redis,) = _one(objects, "Deployment", "redis")["spec"]["template"]["spec"]["containers"]
    assert redis["image"] == model["services"]["redis"]["image"] == "redis:7.4-alpine"


def test_redis_is_one_hardened_in_memory_instance_reachable_from_the_gateway_only(rendered: dict[str, list[dict]]) -> None:
    objects = rendered["gpu"]
    deployment = _one(objects, "Deployment", "redis")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 999
    assert dc._check_third_party_deployment(deployment, objects, dc.THIRD_PARTY["redis"]) == []
    (volume,) = pod["volumes"]
    assert "emptyDir" in volume
    service = _one(objects, "Service", "redis")
    assert service["spec"]["type"] == "ClusterIP" and [p["port"] for p in service["spec"]["ports"]] == [6379]
    (rule,) = _one(objects, "NetworkPolicy", "redis-from-gateway")["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "gateway"}}}]
    assert rule["ports"] == [{"port": 6379, "protocol": "TCP"}]


@pytest.mark.parametrize("overlay", [*OVERLAYS, "base"])
def test_certificates_give_every_service_its_identity(overlay: str, rendered: dict[str, list[dict]]) -> None:
    objects = rendered[overlay]
    assert dc.check_certificates(objects) == []
    certificates = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "Certificate" and not o["spec"].get("isCA")}
    assert {c.get("commonName") for c in certificates.values()} == {"scheduler", "router", "gateway", "generator", None}
    assert certificates["gateway-public"]["usages"] == ["digital signature", "server auth"]
    for name, spec in certificates.items():
        assert spec["issuerRef"] == {"group": "cert-manager.io", "kind": "Issuer", "name": "switchboard-ca"}, name
    # The base ships no Issuer (and no CA key): the cluster provides switchboard-ca.
    issuers = [o["metadata"]["name"] for o in objects if o["kind"] == "Issuer"]
    assert sorted(issuers) == ([] if overlay != "dev" else ["switchboard-ca", "switchboard-selfsigned"])
    for d in (o for o in objects if o["kind"] == "Deployment" and dc._pod_kind(o) in dc.SERVICES):
        (container,) = [c for c in d["spec"]["template"]["spec"]["containers"] if c["name"] == dc._pod_kind(d)]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["exec"]["command"][:3] == ["python", "-m", dc.HEALTHCHECK_MODULE], (d["metadata"]["name"], probe)


def test_schema_check_leaves_out_cert_manager_kinds_only(rendered: dict[str, list[dict]]) -> None:
    certificate = next(o for o in rendered["base"] if o["kind"] == "Certificate")
    assert dc.kubernetes_validate([certificate]) == []
    unknown = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {}}
    assert dc.kubernetes_validate([certificate, unknown]) != []


@pytest.mark.parametrize("overlay", ["base", "cpu", "gpu"])
def test_the_base_ships_no_development_credentials(overlay: str, rendered: dict[str, list[dict]], repo: Path) -> None:
    dev = (repo / "compose/dev-tenants.yaml").read_text()
    assert dc.check_no_dev_tenants(rendered[overlay], dev, overlay) == []
    assert not [o for o in rendered[overlay] if o["kind"] == "Secret"], "the operator provides gateway-tenants"
    for path in (repo / "compose/k8s" / overlay).iterdir():
        assert "fbaead493821e9f00a51dde691a8e6c2b305bea307ab4c26b3fa00cacf216725" not in path.read_text(), path


def test_the_dev_overlay_brings_the_development_tenants(rendered: dict[str, list[dict]], repo: Path) -> None:
    assert (repo / "compose/k8s/dev/gateway-tenants.yaml").read_text() == (repo / "compose/dev-tenants.yaml").read_text()
    (secret,) = [o for o in rendered["dev"] if o["kind"] == "Secret"]
    assert secret["metadata"]["name"].startswith("gateway-tenants-")
    volumes = _one(rendered["dev"], "Deployment", "gateway")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "tenants", "secret": {"secretName": secret["metadata"]["name"]}} in volumes
    assert dc.check_no_dev_tenants(rendered["dev"], (repo / "compose/dev-tenants.yaml").read_text(), "dev") != []


def test_dev_tenants_put_back_in_the_base_are_found(k8s_copy: Path, repo: Path) -> None:
    shutil.copy(k8s_copy / "dev/gateway-tenants.yaml", k8s_copy / "base/gateway-tenants.yaml")
    kustomization = k8s_copy / "base/kustomization.yaml"
    kustomization.write_text(kustomization.read_text() + "secretGenerator:\n  - name: gateway-tenants\n    files:\n      - gateway-tenants.yaml\n")
    objects, problems = dc.kustomize(k8s_copy / "gpu")
    assert problems == []
    found = dc.check_no_dev_tenants(objects, (repo / "compose/dev-tenants.yaml").read_text(), "gpu")
    assert any("Secret gateway-tenants-" in p and "development key hash" in p for p in found), found


def test_everything_lands_in_one_namespace(rendered: dict[str, list[dict]]) -> None:
    namespaces = {o["metadata"].get("namespace") for o in rendered["gpu"] if o["kind"] != "Namespace"}
    assert namespaces == {"switchboard"}


def test_vllm_pool_pods_run_the_remote_generator_beside_their_engine(rendered: dict[str, list[dict]], repo: Path) -> None:
    objects = rendered["vllm"]
    model, problems = dc.compose_config([repo / "compose/compose.yaml", repo / "compose/compose.vllm.yaml"], [])
    assert problems == []
    for pool in render_deploy.vllm_pools(repo):
        deployment = _one(objects, "Deployment", f"generator-{pool.name}")
        assert deployment["spec"]["replicas"] == pool.replicas
        pod = deployment["spec"]["template"]["spec"]
        containers = {c["name"]: c for c in pod["containers"]}
        assert sorted(containers) == ["generator", "vllm"]
        env = {e["name"]: e.get("value") for e in containers["generator"]["env"]}
        assert env["GENERATOR_BACKEND"] == "remote" and env["GENERATOR_REMOTE_URL"] == "http://127.0.0.1:8000"
        assert env["GENERATOR_REMOTE_ENGINE"] == "vllm" and env["GENERATOR_REMOTE_TOKEN_IDS"] == "true"
        assert env["GENERATOR_REMOTE_MODEL"] == pool.name and env["GENERATOR_MODEL"] == pool.expert["model"]
        assert containers["generator"]["image"] == "switchboard/generator:0.1.0"  # the CPU image: no torch used
        assert "nvidia.com/gpu" not in containers["generator"]["resources"]["limits"]
        engine = containers["vllm"]
        # The same pinned image as compose, serving the pool's model folder under the pool's name.
        assert engine["image"] == model["services"][f"vllm-{pool.name}"]["image"] == render_deploy.VLLM_IMAGE
        assert [*engine["command"], *engine["args"]] == model["services"][f"vllm-{pool.name}"]["entrypoint"]
        assert engine["resources"]["limits"]["nvidia.com/gpu"] == "1"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert engine[probe]["httpGet"] == {"path": "/health", "port": "engine"}, probe
        # vLLM gets SIGTERM only after the generator has drained its streams.
        generator_stop = containers["generator"]["lifecycle"]["preStop"]["sleep"]["seconds"] + int(env["GENERATOR_DRAIN_SECONDS"])
        assert engine["lifecycle"]["preStop"]["sleep"]["seconds"] > generator_stop
        assert pod["terminationGracePeriodSeconds"] > engine["lifecycle"]["preStop"]["sleep"]["seconds"]
        role = _one(objects, "Role", "scheduler-scale-generators")
        assert f"generator-{pool.name}" in role["rules"][1]["resourceNames"]
    (configmap,) = [o for o in objects if o["kind"] == "ConfigMap"]
    assert configmap["data"]["experts.yaml"] == (repo / "compose/k8s/vllm/experts.yaml").read_text()
    assert (repo / "compose/k8s/vllm/experts.yaml").read_text() == (repo / "compose/vllm/experts.yaml").read_text()


# ----------------------------------------------------------------- broken copies must fail


@pytest.fixture
def k8s_copy(repo: Path, tmp_path: Path) -> Path:
    """A copy of compose/k8s to break."""
    shutil.copytree(repo / "compose/k8s", tmp_path / "k8s")
    return tmp_path / "k8s"


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{path} no longer contains {old!r}"
    path.write_text(text.replace(old, new, 1))


def test_kustomize_fails_on_a_missing_resource(k8s_copy: Path) -> None:
    (k8s_copy / "base/router.yaml").unlink()
    objects, problems = dc.kustomize(k8s_copy / "gpu")
    assert objects == [] and any("kubectl kustomize" in p and "router.yaml" in p for p in problems), problems


@pytest.mark.parametrize(
    ("path", "old", "new", "expected"),
    [
        ("base/gateway.yaml", "livenessProbe:", "livenessProbes:", "livenessProbes"),
        ("base/router.yaml", "containerPort: 50052", "containerPort: fifty", "fifty"),
        ("base/scheduler.yaml", "maxUnavailable: 1", "maxUnavailable: [1]", "maxUnavailable"),
    ],
)
def test_schema_validation_fails_on_a_broken_manifest(path: str, old: str, new: str, expected: str, k8s_copy: Path) -> None:
    _edit(k8s_copy / path, old, new)
    objects, problems = dc.kustomize(k8s_copy / "gpu")
    assert problems == []
    failures = dc.kubernetes_validate(objects)
    assert any(expected in f for f in failures), failures


@pytest.mark.parametrize(
    ("path", "old", "new", "expected"),
    [
        ("base/gateway.yaml", "readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false", "readOnlyRootFilesystem must be true"),
        ("base/gateway.yaml", "terminationGracePeriodSeconds: 30", "terminationGracePeriodSeconds: 12", "must exceed GATEWAY_DRAIN_SECONDS"),
        ("base/router.yaml", "name: ROUTER_PORT", "name: ROUTER_PROT", "ROUTER_PROT is not read by the router"),
        ("base/router.yaml", "value: scheduler:50053", "value: scheduler:50099", "names no Service with that port"),
        ("base/scheduler.yaml", 'verbs: ["get", "patch"]', 'verbs: ["get", "patch", "delete"]', "exceed get/list/patch"),
        ("base/scheduler.yaml", '"generator-scribe-large"]', '"generator-scribe-large", "gateway"]', "limited to generator Deployments"),
        ("base/scheduler.yaml", "kind: Role\n", "kind: ClusterRole\n", "no cluster-wide permission"),
        ("base/router.yaml", "automountServiceAccountToken: false\n      # >", "automountServiceAccountToken: true\n      # >", "automountServiceAccountToken must be false"),
        ("base/generators.yaml", '127.0.0.1:50061"]\n            periodSeconds: 5\n            timeoutSeconds: 5\n            failureThreshold: 2', '127.0.0.1:9111"]\n            periodSeconds: 5\n            timeoutSeconds: 5\n            failureThreshold: 2', "readinessProbe must be an exec probe running ['python', '-m', 'switchboard.common.healthcheck', '127.0.0.1:50061']"),
        # Mutual TLS: exec probes (kubelet's grpc probes speak plaintext), each identity from its Certificate.
        ("base/router.yaml", 'exec:\n              command: ["python", "-m", "switchboard.common.healthcheck", "127.0.0.1:50052"]\n            periodSeconds: 5', "grpc:\n              port: 50052\n            periodSeconds: 5", "readinessProbe must be an exec probe"),
        ("base/router.yaml", "timeoutSeconds: 5\n            failureThreshold: 2", "timeoutSeconds: 1\n            failureThreshold: 2", "timeoutSeconds must be at least 3"),
        ("base/router.yaml", "            - name: SWITCHBOARD_TLS_KEY_FILE\n              value: /etc/switchboard/tls/tls.key\n", "", "mutual TLS needs all three"),
        ("base/scheduler.yaml", "secretName: scheduler-tls", "secretName: router-tls", "Certificate router has commonName 'router', not 'scheduler'"),
        ("base/gateway.yaml", "mountPath: /etc/switchboard/public-tls", "mountPath: /etc/switchboard/public", "GATEWAY_PUBLIC_TLS_CERT_FILE=/etc/switchboard/public-tls/tls.crt is not in a read-only Secret volume"),
        ("base/gateway.yaml", "            - name: GATEWAY_PUBLIC_TLS_CERT_FILE\n              value: /etc/switchboard/public-tls/tls.crt\n", "", "without GATEWAY_PUBLIC_TLS_*"),
        ("base/gateway.yaml", "secretName: gateway-public-tls", "secretName: gateway-certs", "Secret gateway-certs is filled by no Certificate"),
        ("base/certificates.yaml", "commonName: router", "commonName: gateway", "Certificate router has commonName 'gateway', not 'router'"),
        ("base/certificates.yaml", "name: switchboard-ca", "name: letsencrypt", "is not the Issuer switchboard-ca"),
        ("base/certificates.yaml", "    - scheduler.switchboard.svc.cluster.local\n", "", "lack scheduler.switchboard.svc.cluster.local"),
        ("base/certificates.yaml", "    - client auth\n", "", "lack client auth"),
        ("base/certificates.yaml", "secretName: router-tls", "secretName: scheduler-tls", "secretName scheduler-tls is also Certificate"),
        ("base/certificates.yaml", "    - generator\n", "    - generators\n", "Certificate generator does not name 'generator'"),
        ("base/generators.yaml", "value: $(POD_IP):50061", "value: $(POD_ADDR):50061", "references $(POD_ADDR)"),
        ("base/networkpolicy.yaml", "app.kubernetes.io/name: gateway\n  policyTypes", "app.kubernetes.io/part-of: switchboard\n  policyTypes", "opens"),
        ("gpu/generator-gpu.yaml", 'memory: 32Gi\n              nvidia.com/gpu: "1"', "memory: 32Gi", "needs an nvidia.com/gpu limit"),
        ("gpu/generator-gpu.yaml", "value: cuda", "value: cpu", "does not fit a GPU overlay"),
        # The gateway's HTTP front: listened on, in its Service, open in its public policy.
        ("base/gateway.yaml", "            - name: http\n              containerPort: 8080\n", "", "containerPorts [9101, 50051] differ from the service's [8080, 9101, 50051]"),
        ("base/gateway.yaml", "    - name: http\n      port: 8080\n      targetPort: http\n      appProtocol: http\n", "", "containerPort http 8080 is in no Service"),
        ("base/networkpolicy.yaml", "        - port: 8080 # OpenAI-compatible HTTP\n          protocol: TCP\n", "", "expected the gateway's gRPC and HTTP ports [8080, 50051]"),
        ("base/networkpolicy.yaml", "        - port: 8080 # OpenAI-compatible HTTP\n", "        - port: 9101\n", "expected the gateway's gRPC and HTTP ports"),
        # Redis: the gateway replicas (HPA) share it; pinned, hardened, reachable from the gateway only.
        ("base/gateway.yaml", "            - name: REDIS_URL\n              value: redis://redis:6379/0\n", "", "up to 10 replicas but no REDIS_URL"),
        ("base/gateway.yaml", "value: redis://redis:6379/0", "value: redis://redis:6380/0", "REDIS_URL=redis://redis:6380/0 names no Service"),
        ("base/redis.yaml", "image: redis:7.4-alpine", "image: redis:latest", "must be pinned by a version tag"),
        ("base/redis.yaml", "image: redis:7.4-alpine", "image: switchboard/redis:7.4", "is not redis"),
        ("base/redis.yaml", "readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false", "Deployment redis container redis: readOnlyRootFilesystem must be true"),
        ("base/redis.yaml", "allowPrivilegeEscalation: false", "allowPrivilegeEscalation: true", "redis: allowPrivilegeEscalation must be false"),
        ("base/redis.yaml", "runAsNonRoot: true", "runAsNonRoot: false", "Deployment redis: pod securityContext needs runAsNonRoot"),
        ("base/redis.yaml", "                - ALL\n", "                - NET_RAW\n", "redis: capabilities must drop ALL"),
        ("base/redis.yaml", "type: RuntimeDefault", "type: Unconfined", "Deployment redis: pod seccompProfile must be RuntimeDefault"),
        ("base/redis.yaml", "mountPath: /data", "mountPath: /srv", "/data must be a writable emptyDir"),
        ("base/redis.yaml", '              command: ["redis-cli", "ping"]\n            periodSeconds: 5', '              command: ["true"]\n            periodSeconds: 5', "readinessProbe must run ['redis-cli', 'ping']"),
        ("base/redis.yaml", "            limits:\n              cpu: 500m\n", "            limits:\n", "redis: resources.limits must set cpu and memory"),
        ("base/networkpolicy.yaml", "app.kubernetes.io/name: gateway\n      ports:\n        - port: 6379", "app.kubernetes.io/name: router\n      ports:\n        - port: 6379", "only ['gateway'] pods may"),
        ("base/networkpolicy.yaml", "    - from:\n        - podSelector:\n            matchLabels:\n              app.kubernetes.io/name: gateway\n      ports:\n        - port: 6379", "    - ports:\n        - port: 6379", "lets any source reach redis:6379"),
        ("base/networkpolicy.yaml", "app.kubernetes.io/name: redis\n  policyTypes", "app.kubernetes.io/name: nothing\n  policyTypes", "no NetworkPolicy lets gateway pods reach redis:6379"),
    ],
)
def test_semantic_checks_fail_on_a_broken_manifest(
    path: str, old: str, new: str, expected: str, k8s_copy: Path, contracts: dict[str, dc.ServiceContract]
) -> None:
    _edit(k8s_copy / path, old, new)
    objects, problems = dc.kustomize(k8s_copy / "gpu")
    assert problems == []
    found = dc.check_kubernetes(objects, contracts, gpu=True)
    assert any(expected in f for f in found), found


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("image: vllm/vllm-openai:v0.11.0", "image: vllm/vllm-openai:latest", "must be pinned by a version tag"),
        ("            memory: 32Gi\n            nvidia.com/gpu: '1'\n", "            memory: 32Gi\n", "needs an nvidia.com/gpu limit"),
        ("value: http://127.0.0.1:8000", "value: http://127.0.0.1:8001", "names no container of its pod listening there"),
        ("value: http://127.0.0.1:8000", "value: http://vllm:8001", "names no Service with that port"),
        ("path: /health\n            port: engine\n          timeoutSeconds: 5\n          periodSeconds: 5", "path: /v1/models\n            port: engine\n          timeoutSeconds: 5\n          periodSeconds: 5", "readinessProbe must be an httpGet probe of /health"),
        ("- name: tmp\n          mountPath: /tmp\n        - name: shm", "- name: shm", "/tmp must be a writable emptyDir"),
        ("kubernetes.io/metadata.name: monitoring", "app.kubernetes.io/name: gateway", "only Prometheus (namespace monitoring) may scrape it"),
        ("- name: vllm\n        image:", "- name: engine\n        image:", "must be allowed sidecars"),
    ],
)
def test_broken_vllm_overlay_fails(old: str, new: str, expected: str, k8s_copy: Path, contracts: dict[str, dc.ServiceContract]) -> None:
    _edit(k8s_copy / "vllm/generators.yaml", old, new)
    objects, problems = dc.kustomize(k8s_copy / "vllm")
    assert problems == []
    found = dc.check_kubernetes(objects, contracts, gpu=True)
    assert any(expected in f for f in found), found


def test_vllm_pool_the_scheduler_cannot_scale_is_found(k8s_copy: Path, contracts: dict[str, dc.ServiceContract]) -> None:
    _edit(k8s_copy / "vllm/scheduler-rbac.yaml", "  - generator-general-vllm\n", "")
    objects, problems = dc.kustomize(k8s_copy / "vllm")
    assert problems == []
    found = dc.check_kubernetes(objects, contracts, gpu=True)
    assert "the scheduler cannot scale generator Deployments ['generator-general-vllm']" in found, found


def test_the_copy_passes_before_it_is_broken(k8s_copy: Path, contracts: dict[str, dc.ServiceContract]) -> None:
    objects, problems = dc.kustomize(k8s_copy / "gpu")
    assert problems == [] and dc.check_kubernetes(objects, contracts, gpu=True) == []
    assert yaml.safe_dump_all(objects)
