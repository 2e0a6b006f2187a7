"""`switchboard experts ...` on the cached experts."""

from __future__ import annotations

from pathlib import Path

import pytest
from switchboard.cli.main import main
from switchboard.experts import expert_dir


def test_build_is_a_fast_no_op_when_cached(
    experts: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["experts", "build"]) == 0
    out = capsys.readouterr().out
    assert "cached, nothing to build" in out
    for name in experts:
        line = next(line for line in out.splitlines() if line.startswith(name))
        assert "held-out perplexity" in line and "unigram baseline" in line
    assert out.count("To be, or not to be") == len(experts)


def test_path_prints_the_expert_folder(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["experts", "path", "milton-small"]) == 0
    assert capsys.readouterr().out.strip() == str(expert_dir("milton-small"))


def test_sample_continues_the_prompt(experts: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["experts", "sample", "bard-small", "--prompt", "My lord,", "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("My lord,") and len(out.strip()) > len("My lord,")


def test_sample_of_an_unbuilt_expert_says_how_to_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SWITCHBOARD_CACHE_DIR", str(tmp_path))
    assert main(["experts", "sample", "bard-small", "--prompt", "Hi"]) == 1
    assert "switchboard experts build" in capsys.readouterr().err
