"""scripts/render_deploy.py: the expert list of config/experts.yaml is the only hand-written one."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import deploy_checks as dc
import pytest
import yaml

SCRIPT = dc.REPO / "scripts/render_deploy.py"


def _module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("render_deploy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render_deploy = _module()
GENERATED = sorted(render_deploy.rendered(dc.REPO))
# The vLLM pools' files that name no expert of config/experts.yaml (only the pools').
POOLS_ONLY = {
    "compose/compose.vllm.yaml",
    "compose/compose.vllm.observability.yaml",
    "compose/compose.vllm.tls.yaml",
    "compose/k8s/vllm/generators.yaml",
}


def test_every_derived_file_agrees_with_the_experts_config() -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), "check"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    """The experts config and the deployment files, to break."""
    shutil.copytree(dc.REPO / "config", tmp_path / "config")
    shutil.copytree(dc.REPO / "compose", tmp_path / "compose", ignore=shutil.ignore_patterns("models", "certs"))
    return tmp_path


@pytest.mark.parametrize("path", GENERATED)
def test_a_hand_edited_copy_is_named(path: str, repo_copy: Path) -> None:
    target = repo_copy / path
    name = "general-vllm" if path in POOLS_ONLY else "scribe-large"
    assert name in target.read_text()
    target.write_text(target.read_text().replace(name, name + "x", 1))
    assert render_deploy.check(repo_copy) == [f"{path}: differs from what config/experts.yaml gives; run `make deploy-files`"]


def test_missing_markers_are_named(repo_copy: Path) -> None:
    target = repo_copy / "compose/prometheus/prometheus.yml"
    target.write_text(target.read_text().replace(render_deploy.END, "# the end"))
    assert render_deploy.check(repo_copy) == ["compose/prometheus/prometheus.yml: the generated block's marker comments are missing"]


def test_a_new_expert_reaches_every_copy_and_the_result_passes_the_checks(
    repo_copy: Path, contracts: dict[str, dc.ServiceContract]
) -> None:
    config = repo_copy / "config/experts.yaml"
    data = yaml.safe_load(config.read_text())
    data["experts"].append({**data["experts"][0], "name": "sonnet-tiny", "model": "sonnet-tiny"})
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    assert sorted(p.split(":")[0] for p in render_deploy.check(repo_copy)) == sorted(set(GENERATED) - POOLS_ONLY)
    render_deploy.render(repo_copy, say=lambda _: None)
    assert render_deploy.check(repo_copy) == []
    for overlay in ("gpu", "vllm"):
        objects, problems = dc.kustomize(repo_copy / "compose/k8s" / overlay)
        assert problems == [] and dc.check_kubernetes(objects, contracts, gpu=True) == []
        assert any(o["kind"] == "Deployment" and o["metadata"]["name"] == "generator-sonnet-tiny" for o in objects)
    model, problems = dc.compose_config([repo_copy / "compose/compose.yaml", repo_copy / "compose/compose.observability.yaml"], [])
    assert problems == [] and "generator-sonnet-tiny" in model["services"]
    assert dc.check_compose(model, contracts, repo_copy / "compose/prometheus/prometheus.yml") == []


def test_a_new_vllm_pool_reaches_compose_and_kubernetes_and_passes_the_checks(
    repo_copy: Path, contracts: dict[str, dc.ServiceContract]
) -> None:
    config = repo_copy / "config/experts.vllm.yaml"
    data = yaml.safe_load(config.read_text())
    data["experts"].append({**data["experts"][0], "name": "coder-vllm", "model": "/models/coder-vllm", "replicas": 2})
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    drifted = sorted(p.split(":")[0] for p in render_deploy.check(repo_copy))
    assert drifted == sorted(p for p in GENERATED if "vllm" in p)
    render_deploy.render(repo_copy, say=lambda _: None)
    assert render_deploy.check(repo_copy) == []
    objects, problems = dc.kustomize(repo_copy / "compose/k8s/vllm")
    assert problems == [] and dc.check_kubernetes(objects, contracts, gpu=True) == []
    (deployment,) = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "generator-coder-vllm"]
    assert deployment["spec"]["replicas"] == 2
    compose = repo_copy / "compose"
    files = [compose / f for f in ("compose.yaml", "compose.observability.yaml", "compose.vllm.yaml", "compose.vllm.observability.yaml")]
    model, problems = dc.compose_config(files, [])
    assert problems == []
    # Compose: one engine per replica, each with its own generator.
    assert {"vllm-coder-vllm", "vllm-coder-vllm-2", "generator-coder-vllm", "generator-coder-vllm-2"} <= set(model["services"])
    assert model["services"]["generator-coder-vllm-2"]["environment"]["GENERATOR_REMOTE_URL"] == "http://vllm-coder-vllm-2:8000"
    assert dc.check_compose(model, contracts, compose / "prometheus/prometheus.vllm.yml") == []
