"""Compose: the files validate under every profile/overlay, and agree with what the services read."""

from __future__ import annotations

import shutil
from pathlib import Path

import deploy_checks as dc
import pytest
from switchboard.common.experts_config import load_experts_config
from switchboard.gateway.tenants import hash_key, parse_tenants

COMBINATIONS = [
    (["compose.yaml"], []),
    (["compose.yaml"], ["gpu"]),
    (["compose.yaml", "compose.observability.yaml"], []),
    (["compose.yaml", "compose.observability.yaml"], ["gpu"]),
    (["compose.yaml", "compose.replicas.yaml"], []),
    # The example vLLM pools (config/experts.vllm.yaml), alone and with the observability overlay.
    (["compose.yaml", "compose.vllm.yaml"], []),
    (["compose.yaml", "compose.vllm.yaml"], ["gpu"]),
    (["compose.yaml", "compose.observability.yaml", "compose.vllm.yaml", "compose.vllm.observability.yaml"], []),
]
VLLM = ["compose.yaml", "compose.vllm.yaml"]


def _check(compose_dir: Path, files: list[str], profiles: list[str], contracts: dict[str, dc.ServiceContract]) -> list[str]:
    model, problems = dc.compose_config([compose_dir / f for f in files], profiles)
    if model is None:
        return problems
    prometheus = None
    if "prometheus" in model["services"]:
        # The config file its command names (compose.vllm.observability.yaml names prometheus.vllm.yml).
        command = model["services"]["prometheus"].get("command") or []
        config = next((c.split("=", 1)[1] for c in command if c.startswith("--config.file=")), "prometheus.yml")
        prometheus = compose_dir / "prometheus" / Path(config).name
    return dc.check_compose(model, contracts, prometheus)


@pytest.mark.parametrize(("files", "profiles"), COMBINATIONS, ids=lambda v: "+".join(v) or "default")
def test_compose_validates_and_agrees_with_the_services(
    files: list[str], profiles: list[str], repo: Path, contracts: dict[str, dc.ServiceContract]
) -> None:
    assert _check(repo / "compose", files, profiles, contracts) == []


@pytest.mark.parametrize(("profiles", "suffix"), [([], ""), (["gpu"], "-gpu")])
def test_one_generator_per_expert_in_each_profile(profiles: list[str], suffix: str, repo: Path) -> None:
    model, problems = dc.compose_config([repo / "compose/compose.yaml"], profiles)
    assert problems == []
    experts = [spec.name for spec in load_experts_config(repo / "config/experts.yaml")]
    generators = sorted(name for name, s in model["services"].items() if dc.compose_service_kind(s) == "generator")
    assert generators == sorted(f"generator-{e}{suffix}" for e in experts)
    for name in generators:
        env = model["services"][name]["environment"]
        assert env["GENERATOR_EXPERT"] in experts


def test_observability_overlay_sends_traces_to_jaeger(repo: Path) -> None:
    model, problems = dc.compose_config([repo / "compose/compose.yaml", repo / "compose/compose.observability.yaml"], [])
    assert problems == []
    jaeger = model["services"]["jaeger"]
    assert any(p["target"] == 16686 for p in jaeger["ports"])
    for name, service in model["services"].items():
        if dc.compose_service_kind(service):
            assert service["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317", name


def test_gateway_publishes_grpc_and_http_and_keeps_limits_in_the_compose_redis(
    repo: Path, contracts: dict[str, dc.ServiceContract]
) -> None:
    model, problems = dc.compose_config([repo / "compose/compose.yaml"], [])
    assert problems == []
    gateway = model["services"]["gateway"]
    env = gateway["environment"]
    assert contracts["gateway"].http_port == 8080 and env["GATEWAY_HTTP_PORT"] == "8080"
    assert {(p["host_ip"], p["target"]) for p in gateway["ports"]} == {("127.0.0.1", 50051), ("127.0.0.1", 8080)}
    assert env["REDIS_URL"] == "redis://redis:6379/0"
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"


def test_redis_is_an_allowed_third_party_image_pinned_and_hardened(repo: Path) -> None:
    model, problems = dc.compose_config([repo / "compose/compose.yaml"], [])
    assert problems == []
    third_party = sorted(name for name, s in model["services"].items() if dc.compose_service_kind(s) is None)
    assert third_party == ["redis"]
    redis = model["services"]["redis"]
    assert redis["image"] == "redis:7.4-alpine" and "build" not in redis
    assert dc.check_image_pinned(redis["image"], dc.THIRD_PARTY["redis"], "redis") == []
    assert redis["read_only"] is True and redis["cap_drop"] == ["ALL"]
    assert redis["security_opt"] == ["no-new-privileges:true"]
    assert redis["user"].split(":")[0] == "999"
    assert "/data" in redis["tmpfs"] and "ports" not in redis
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    command = redis["command"]
    assert command[0] == "redis-server"
    assert command[command.index("--save") + 1] == "" and command[command.index("--appendonly") + 1] == "no"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"


@pytest.mark.parametrize(
    ("image", "pinned"),
    [
        ("redis:7.4-alpine", True),
        ("docker.io/library/redis:7.4.2", True),
        ("redis@sha256:" + "0" * 64, True),
        ("redis", False),
        ("redis:latest", False),
        ("redis:alpine", False),
        ("bitnami/redis:7.4", False),
    ],
)
def test_third_party_images_must_be_pinned_by_version(image: str, pinned: bool) -> None:
    assert (dc.check_image_pinned(image, dc.THIRD_PARTY["redis"], "redis") == []) is pinned


def test_dev_tenants_file_is_valid_and_matches_the_kubernetes_secret(repo: Path) -> None:
    text = (repo / "compose/dev-tenants.yaml").read_text()
    config = parse_tenants(text)
    assert list(config.tenants) == ["dev"]
    assert config.by_key_hash[bytes.fromhex(hash_key("sb-dev-local-only"))].tenant == "dev"
    assert (repo / "compose/k8s/dev/gateway-tenants.yaml").read_text() == text


# ----------------------------------------------------------------- broken copies must fail


@pytest.fixture
def compose_copy(repo: Path, tmp_path: Path) -> Path:
    """A copy of compose/ (and the config it mounts) to break."""
    shutil.copytree(repo / "compose", tmp_path / "compose", ignore=shutil.ignore_patterns("k8s", "models"))
    shutil.copytree(repo / "config", tmp_path / "config")
    return tmp_path / "compose"


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{path} no longer contains {old!r}"
    path.write_text(text.replace(old, new, 1))


def test_the_copy_passes_before_it_is_broken(compose_copy: Path, contracts: dict[str, dc.ServiceContract]) -> None:
    assert _check(compose_copy, ["compose.yaml", "compose.observability.yaml"], [], contracts) == []


@pytest.mark.parametrize(
    ("path", "old", "new", "expected"),
    [
        ("compose.yaml", "retries: 3", "retries: three", "docker-compose config -q failed"),
        ("compose.yaml", "condition: service_healthy", "condition: service_ready", "docker-compose config -q failed"),
        ("env/gateway.env", "GATEWAY_PORT=50051", "GATEWAY_PROT=50051", "GATEWAY_PROT is not read by the gateway"),
        ("env/router.env", "ROUTER_PORT=50052", "ROUTER_PORT=50059", "healthcheck"),
        ("env/router.env", "ROUTER_DRAIN_SECONDS=10", "ROUTER_MAX_ALTERNATES=99", "the router rejects its environment"),
        ("env/scheduler.env", "SCHEDULER_HOST=0.0.0.0", "SCHEDULER_HOST=127.0.0.1", "must be 0.0.0.0"),
        ("env/generator.env", "GENERATOR_DRAIN_SECONDS=20", "GENERATOR_DRAIN_SECONDS=45", "stop_grace_period 30.0s must exceed"),
        ("env/gateway.env", "ROUTER_ADDR=router:50052", "ROUTER_ADDR=router:50053", "names no service listening there"),
        ("compose.yaml", "GENERATOR_MODEL: /models/bard-small", "GENERATOR_MODEL: /weights/bard-small", "not inside a read-only mounted"),
        ("compose.yaml", "condition: service_healthy", "condition: service_started", "not service_healthy"),
        ("prometheus/prometheus.yml", "router:9102", "router:9120", "no scrape target router:9102"),
        ("env/generator-cpu.env", "GENERATOR_DEVICE=cpu", "GENERATOR_DEVICE=cuda", "no NVIDIA device is reserved"),
        # The HTTP front is published, on the loopback address, where the gateway listens.
        ("compose.yaml", "127.0.0.1:8080}:8080", "127.0.0.1:8080}:8081", "publishes container ports [8081, 50051], expected [8080, 50051]"),
        ("env/gateway.env", "GATEWAY_HTTP_PORT=8080", "GATEWAY_HTTP_PORT=8081", "expected [8081, 50051]"),
        (".env", "GATEWAY_HTTP_PUBLISH=127.0.0.1:8080", "GATEWAY_HTTP_PUBLISH=0.0.0.0:8080", "published on 0.0.0.0, not 127.0.0.1"),
        ("compose.yaml", "  read_only: true\n", "  read_only: false\n", "gateway: read_only must be true"),
        # Redis: an allowed third-party image, pinned, hardened, healthy before the gateway starts.
        ("compose.yaml", "image: redis:7.4-alpine", "image: redis:latest", "must be pinned by a version tag"),
        ("compose.yaml", "image: redis:7.4-alpine", "image: redis", "must be pinned by a version tag"),
        ("compose.yaml", 'user: "999:1000"', 'user: "0:0"', "redis: user must be a numeric non-root uid"),
        ("compose.yaml", "    tmpfs:\n      - /data\n", "", "/data must be a tmpfs or a volume"),
        ("compose.yaml", '["CMD", "redis-cli", "ping"]', '["CMD", "true"]', "redis: healthcheck ['CMD', 'true'] differs"),
        ("compose.yaml", "redis:\n        condition: service_healthy", "redis:\n        condition: service_started", "does not depend on it with service_healthy"),
        ("env/gateway.env", "REDIS_URL=redis://redis:6379/0", "REDIS_URL=redis://redis:6380/0", "names no redis service listening there"),
        ("env/gateway.env", "REDIS_URL=redis://redis:6379/0", "REDIS_URL=redis:6379", "is not a redis:// URL"),
        ("compose.yaml", "services:\n  scheduler:", "services:\n  cache:\n    image: memcached:1.6\n  scheduler:", "cache: runs neither a Switchboard Dockerfile"),
    ],
)
def test_broken_compose_fails(
    path: str, old: str, new: str, expected: str, compose_copy: Path, contracts: dict[str, dc.ServiceContract]
) -> None:
    _edit(compose_copy / path, old, new)
    problems = _check(compose_copy, ["compose.yaml", "compose.observability.yaml"], [], contracts)
    assert any(expected in p for p in problems), problems


# ----------------------------------------------------------------- mutual TLS (compose.tls.yaml)


def _render_deploy():
    import importlib.util

    spec = importlib.util.spec_from_file_location("render_deploy", dc.REPO / "scripts/render_deploy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tls_copy(compose_copy: Path, repo: Path) -> Path:
    """The compose copy with throwaway certificates in its certs/ (scripts/render_deploy.py certs)."""
    _render_deploy().make_certs(repo, compose_copy / "certs")
    return compose_copy


@pytest.mark.parametrize(
    ("files", "profiles"),
    [
        (["compose.yaml", "compose.tls.yaml"], []),
        (["compose.yaml", "compose.tls.yaml"], ["gpu"]),
        (["compose.yaml", "compose.observability.yaml", "compose.tls.yaml"], []),
        (["compose.yaml", "compose.tls.yaml", "compose.vllm.yaml", "compose.vllm.tls.yaml"], []),
    ],
    ids=lambda v: "+".join(v) or "default",
)
def test_tls_overlay_gives_every_service_its_own_certificate(
    files: list[str], profiles: list[str], tls_copy: Path, contracts: dict[str, dc.ServiceContract]
) -> None:
    assert _check(tls_copy, files, profiles, contracts) == []
    model, _ = dc.compose_config([tls_copy / f for f in files], profiles)
    for name, service in model["services"].items():
        kind = dc.compose_service_kind(service)
        if kind is None:
            continue
        env = service["environment"]
        assert all(env.get(v) for v in dc.TLS_ENV), name
        sources = {Path(v["source"]).name for v in service["volumes"] if v["target"].startswith("/etc/switchboard/tls/")}
        assert sources == {"ca.pem", f"{kind}.pem", f"{kind}-key.pem"}, name  # its own key, never another's
    assert model["services"]["gateway"]["environment"]["GATEWAY_PUBLIC_TLS_CERT_FILE"]
    assert not (tls_copy / "certs/ca-key.pem").exists(), "the CA's key is discarded"
    assert sorted(p.name for p in (tls_copy / "certs").iterdir()) == sorted(
        ["ca.pem", *(f"{i}{s}" for i in ("scheduler", "router", "gateway", "generator", "operator") for s in (".pem", "-key.pem"))]
    )


@pytest.mark.parametrize(
    ("path", "old", "new", "expected"),
    [
        ("compose.tls.yaml", "./certs/router.pem:", "./certs/gateway.pem:", "router: SWITCHBOARD_TLS_CERT_FILE: "),
        ("compose.tls.yaml", "/etc/switchboard/tls/ca.pem:ro", "/etc/switchboard/tls/ca.pem:rw", "SWITCHBOARD_TLS_CA_FILE=/etc/switchboard/tls/ca.pem is not a read-only mounted file"),
        ("compose.tls.yaml", "      SWITCHBOARD_TLS_KEY_FILE: /etc/switchboard/tls/tls.key\n", "", "mutual TLS needs all three"),
        ("compose.tls.yaml", "      GATEWAY_PUBLIC_TLS_CERT_FILE: /etc/switchboard/tls/tls.crt\n      GATEWAY_PUBLIC_TLS_KEY_FILE: /etc/switchboard/tls/tls.key\n", "", "without GATEWAY_PUBLIC_TLS_*"),
        ("certs/generator.pem", "", "", "generator.pem does not exist"),
    ],
)
def test_broken_tls_overlay_fails(
    path: str, old: str, new: str, expected: str, tls_copy: Path, contracts: dict[str, dc.ServiceContract]
) -> None:
    if path.startswith("certs/"):
        (tls_copy / path).unlink()
    else:
        _edit(tls_copy / path, old, new)
    problems = _check(tls_copy, ["compose.yaml", "compose.tls.yaml"], [], contracts)
    assert any(expected in p for p in problems), problems


# ----------------------------------------------------------------- the example vLLM pools (compose.vllm.yaml)


def _render_deploy_module():
    return _render_deploy()


def test_vllm_pool_is_a_remote_generator_in_front_of_its_own_engine(repo: Path) -> None:
    model, problems = dc.compose_config([repo / "compose" / f for f in VLLM], [])
    assert problems == []
    services = model["services"]
    pools = _render_deploy_module().vllm_pools(repo)
    assert [p.name for p in pools] == ["general-vllm"]
    for pool in pools:
        generator, engine = services[f"generator-{pool.name}"], services[f"vllm-{pool.name}"]
        env = generator["environment"]
        assert env["GENERATOR_BACKEND"] == "remote" and env["GENERATOR_REMOTE_ENGINE"] == "vllm"
        assert env["GENERATOR_REMOTE_TOKEN_IDS"] == "true" and env["GENERATOR_EXPERT"] == pool.name
        assert env["GENERATOR_REMOTE_URL"] == f"http://vllm-{pool.name}:8000"
        assert generator["depends_on"][f"vllm-{pool.name}"]["condition"] == "service_healthy"
        assert "profiles" not in generator and "profiles" not in engine  # under either profile
        assert engine["image"] == _render_deploy_module().VLLM_IMAGE
        assert dc.check_image_pinned(engine["image"], dc.THIRD_PARTY["vllm"], "vllm") == []
        command = engine["entrypoint"]
        assert command[:3] == ["vllm", "serve", pool.expert["model"]]
        assert command[command.index("--served-model-name") + 1] == env["GENERATOR_REMOTE_MODEL"] == pool.name
        assert {v["target"] for v in engine["volumes"] if v["read_only"]} == {pool.expert["model"]}
        assert "http://127.0.0.1:8000/health" in " ".join(engine["healthcheck"]["test"])
        assert "ports" not in engine, "the engine is reached inside the compose network only"
    # The router and the scheduler know the pools: config/experts.yaml's experts, then the pools'.
    experts = [s.name for s in load_experts_config(repo / "compose/vllm/experts.yaml")]
    assert experts == [s.name for s in load_experts_config(repo / "config/experts.yaml")] + [p.name for p in pools]
    for name in ("router", "scheduler"):
        (mount,) = [v for v in services[name]["volumes"] if v["target"] == "/etc/switchboard/experts.yaml"]
        assert Path(mount["source"]) == repo / "compose/vllm/experts.yaml"


def test_vllm_pool_is_scraped_with_the_observability_overlays(repo: Path) -> None:
    files = ["compose.yaml", "compose.observability.yaml", "compose.vllm.yaml", "compose.vllm.observability.yaml"]
    model, problems = dc.compose_config([repo / "compose" / f for f in files], [])
    assert problems == []
    assert "--config.file=/etc/prometheus/prometheus.vllm.yml" in model["services"]["prometheus"]["command"]
    assert model["services"]["generator-general-vllm"]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317"
    # Without compose.vllm.observability.yaml, Prometheus would miss the pool: the check says so.
    model, problems = dc.compose_config([repo / "compose" / f for f in files[:3]], [])
    found = dc.check_compose(model, dc.contracts(), repo / "compose/prometheus/prometheus.yml")
    assert any("no scrape target vllm-general-vllm:8000" in p for p in found), found


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("image: vllm/vllm-openai:v0.11.0", "image: vllm/vllm-openai:latest", "must be pinned by a version tag"),
        ("image: vllm/vllm-openai:v0.11.0", "image: example/vllm:0.11.0", "is not vllm/vllm-openai"),
        ("            - driver: nvidia\n              count: 1\n              capabilities: [gpu]\n", "            - driver: nvidia\n              count: 1\n              capabilities: [compute]\n", "needs an NVIDIA GPU, but reserves none"),
        ("GENERATOR_REMOTE_URL: http://vllm-general-vllm:8000", "GENERATOR_REMOTE_URL: http://vllm-general-vllm:8001", "names no engine service listening there"),
        ("GENERATOR_REMOTE_URL: http://vllm-general-vllm:8000", "GENERATOR_REMOTE_URL: http://redis:6379", "names no engine service listening there"),
        ("      vllm-general-vllm:\n        condition: service_healthy", "      vllm-general-vllm:\n        condition: service_started", "not service_healthy"),
        ('user: "10001:10001"', 'user: "0:0"', "vllm-general-vllm: user must be a numeric non-root uid"),
        ("127.0.0.1:8000/health", "127.0.0.1:8000/v1/models", "must GET http://127.0.0.1:8000/health"),
        ("  read_only: true\n", "  read_only: false\n", "vllm-general-vllm: read_only must be true"),
        ("GENERATOR_REMOTE_ENGINE: vllm", "GENERATOR_REMOTE_ENGINE: sglang", "the generator rejects its environment"),
        ("      - ./vllm/experts.yaml:/etc/switchboard/experts.yaml:ro\n  scheduler:", "  scheduler:", None),
    ],
)
def test_broken_vllm_pool_fails(
    old: str, new: str, expected: str | None, compose_copy: Path, contracts: dict[str, dc.ServiceContract]
) -> None:
    _edit(compose_copy / "compose.vllm.yaml", old, new)
    problems = _check(compose_copy, VLLM, [], contracts)
    if expected is None:  # the router would read the experts without the pools: a test above fails
        model, _ = dc.compose_config([compose_copy / f for f in VLLM], [])
        (mount,) = [v for v in model["services"]["router"]["volumes"] if v["target"] == "/etc/switchboard/experts.yaml"]
        assert Path(mount["source"]).name == "experts.yaml" and Path(mount["source"]).parent.name == "config"
        return
    assert any(expected in p for p in problems), problems


def test_local_override_swaps_only_the_third_party_images_for_ones_built_here(repo: Path) -> None:
    """compose.local.yaml (the compose check's, for machines with no registry) builds Redis, the
    trace viewer and Prometheus here, drops Grafana, and leaves every Switchboard service as is."""
    users = [repo / "compose/compose.yaml", repo / "compose/compose.observability.yaml"]
    plain, problems = dc.compose_config(users, [])
    local, local_problems = dc.compose_config([*users, repo / "compose/compose.local.yaml"], [])
    assert problems == [] and local_problems == []
    assert set(plain["services"]) - set(local["services"]) == {"grafana"}
    for name in ("redis", "jaeger", "prometheus"):
        assert local["services"][name]["image"].startswith("localhost/switchboard-local/"), name
        assert (Path(local["services"][name]["build"]["context"]) / "Dockerfile").is_file(), name
    for name, service in local["services"].items():
        if dc.compose_service_kind(service):
            assert service == plain["services"][name], name


@pytest.mark.parametrize("image", ["redis", "trace-viewer", "prometheus"])
def test_hadolint_passes_on_the_local_images(image: str, repo: Path) -> None:
    assert dc.check_hadolint(repo / f"compose/local/{image}/Dockerfile", repo / ".hadolint.yaml") == []
