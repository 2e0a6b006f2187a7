"""Kubernetes: kustomize renders each overlay, every object validates, and the semantics hold."""

from __future__ import annotations

import shutil
from pathlib import Path

import deploy_checks as dc
import pytest
import yaml
from switchboard.common.experts_config import load_experts_config

OVERLAYS = {"cpu": False, "gpu": True}  # overlay -> generators on GPUs


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
    pools = {}
    for d in rendered[overlay]:
        if d["kind"] == "Deployment" and d["metadata"]["name"].startswith("generator-"):
            env = {e["name"]: e.get("value") for e in d["spec"]["template"]["spec"]["containers"][0]["env"]}
            pools[d["metadata"]["name"]] = env["GENERATOR_EXPERT"]
    assert pools == {f"generator-{e}": e for e in experts}


def test_experts_configmap_is_the_repository_config(repo: Path, rendered: dict[str, list[dict]]) -> None:
    assert (repo / "compose/k8s/base/experts.yaml").read_text() == (repo / "config/experts.yaml").read_text(), (
        "run: cp config/experts.yaml compose/k8s/base/experts.yaml"
    )
    (configmap,) = [o for o in rendered["gpu"] if o["kind"] == "ConfigMap"]
    assert configmap["data"]["experts.yaml"] == (repo / "config/experts.yaml").read_text()


def test_everything_lands_in_one_namespace(rendered: dict[str, list[dict]]) -> None:
    namespaces = {o["metadata"].get("namespace") for o in rendered["gpu"] if o["kind"] != "Namespace"}
    assert namespaces == {"switchboard"}


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
        ("base/generators.yaml", "port: 50061\n            periodSeconds: 5\n            failureThreshold: 2", "port: 9111\n            periodSeconds: 5\n            failureThreshold: 2", "readinessProbe must be a native grpc probe on port 50061"),
        ("base/generators.yaml", "value: $(POD_IP):50061", "value: $(POD_ADDR):50061", "references $(POD_ADDR)"),
        ("base/networkpolicy.yaml", "app.kubernetes.io/name: gateway\n  policyTypes", "app.kubernetes.io/part-of: switchboard\n  policyTypes", "opens"),
        ("gpu/generator-gpu.yaml", 'memory: 32Gi\n              nvidia.com/gpu: "1"', "memory: 32Gi", "needs an nvidia.com/gpu limit"),
        ("gpu/generator-gpu.yaml", "value: cuda", "value: cpu", "does not fit a GPU overlay"),
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


def test_the_copy_passes_before_it_is_broken(k8s_copy: Path, contracts: dict[str, dc.ServiceContract]) -> None:
    objects, problems = dc.kustomize(k8s_copy / "gpu")
    assert problems == [] and dc.check_kubernetes(objects, contracts, gpu=True) == []
    assert yaml.safe_dump_all(objects)
