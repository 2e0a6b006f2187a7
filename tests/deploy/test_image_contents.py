"""What each image installs covers everything its code imports (the images cannot be built here)."""

from __future__ import annotations

from pathlib import Path

import deploy_checks as dc
import pytest


def _libs(repo: Path, service: str) -> list[str]:
    return dc.image_libs(repo / f"services/{service}/Dockerfile")


def _sources(repo: Path, service: str) -> list[Path]:
    return [repo / f"services/{service}/src", *(repo / "libs" / lib / "src" for lib in _libs(repo, service))]


@pytest.mark.parametrize("service", dc.SERVICES)
def test_image_requirements_cover_the_code(service: str, repo: Path) -> None:
    files = dc.image_requirement_files(repo / f"services/{service}/Dockerfile")
    assert "requirements/service.txt" in files
    assert ("requirements/model.txt" in files) == (service in ("router", "generator"))
    libs = _libs(repo, service)
    assert "common" in libs
    problems = dc.check_image_imports(service, _sources(repo, service), [repo / f for f in files], libs, repo)
    assert problems == []


def test_an_import_the_image_lacks_fails(repo: Path, tmp_path: Path) -> None:
    extra = tmp_path / "src"
    extra.mkdir()
    (extra / "client.py").write_text("import httpx\nfrom switchboard.bench import records\n")
    files = [repo / "requirements/service.txt"]
    problems = dc.check_image_imports("gateway", [*_sources(repo, "gateway"), extra], files, _libs(repo, "gateway"), repo)
    assert any("imports httpx from httpx" in p for p in problems), problems
    assert any("switchboard.bench, a package its image does not copy" in p for p in problems), problems


def test_torch_is_not_in_the_gateway_image(repo: Path, tmp_path: Path) -> None:
    extra = tmp_path / "src"
    extra.mkdir()
    (extra / "gate.py").write_text("import torch\n")
    problems = dc.check_image_imports("gateway", [extra], [repo / "requirements/service.txt"])
    assert any("imports torch from torch" in p for p in problems), problems


def test_a_shared_library_the_image_does_not_copy_fails(repo: Path, tmp_path: Path) -> None:
    extra = tmp_path / "src"
    extra.mkdir()
    (extra / "sim.py").write_text("from switchboard.replica import block_pool\n")
    files = [repo / "requirements/service.txt"]
    problems = dc.check_image_imports("gateway", [extra], files, ["common"], repo)
    assert any("imports switchboard.replica, a package its image does not copy" in p for p in problems), problems
    assert dc.check_image_imports("gateway", [extra], files, ["common", "replica"], repo) == []
