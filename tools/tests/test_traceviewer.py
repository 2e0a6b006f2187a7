"""Unit tests of the trace viewer's plumbing (no Phoenix here: tests/test_trace_viewer.py runs it)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from switchboard.cli.main import build_parser
from switchboard.cli.traceviewer import (
    PHOENIX_VERSION,
    SESSION_FILE,
    ClientTrace,
    TraceViewer,
    ensure_phoenix,
    phoenix_dir,
    read_session,
    remove_session,
    trace_url,
    write_session,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_the_pinned_version_is_the_compose_viewers() -> None:
    dockerfile = (REPO_ROOT / "compose" / "local" / "trace-viewer" / "Dockerfile").read_text()
    assert re.search(r"^ARG PHOENIX_VERSION=(\S+)$", dockerfile, re.M).group(1) == PHOENIX_VERSION  # type: ignore[union-attr]


def test_install_folder_is_per_version_and_overridable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SWITCHBOARD_PHOENIX_DIR", raising=False)
    assert phoenix_dir(tmp_path) == tmp_path / "phoenix" / PHOENIX_VERSION
    monkeypatch.setenv("SWITCHBOARD_PHOENIX_DIR", str(tmp_path / "elsewhere"))
    assert phoenix_dir(tmp_path) == tmp_path / "elsewhere" / PHOENIX_VERSION


def test_an_installed_viewer_is_found_without_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SWITCHBOARD_PHOENIX_DIR", raising=False)
    home = phoenix_dir(tmp_path)
    (home / "venv" / "bin").mkdir(parents=True)
    (home / "venv" / "bin" / "phoenix").write_text("#!/bin/sh\n")
    (home / ".installed").write_text(PHOENIX_VERSION)
    assert ensure_phoenix(tmp_path, progress=lambda line: pytest.fail(f"installed again: {line}")) == home / "venv" / "bin" / "phoenix"


def test_the_services_export_to_the_viewer(tmp_path: Path) -> None:
    viewer = TraceViewer(Path("phoenix"), tmp_path, tmp_path / "log", port=16006, grpc_port=14317)
    env = viewer.export_env()
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] == "http://127.0.0.1:14317"
    assert env["OTEL_EXPORTER_OTLP_INSECURE"] == "true"
    assert viewer.ui == "http://127.0.0.1:16006"
    assert trace_url(viewer.ui + "/", "ab" * 16) == "http://127.0.0.1:16006/redirects/traces/" + "ab" * 16


def test_the_session_names_the_running_stacks_gateway(tmp_path: Path) -> None:
    viewer = TraceViewer(Path("phoenix"), tmp_path, tmp_path / "log", port=16006, grpc_port=14317)
    write_session(tmp_path, viewer, "127.0.0.1:50051")
    session = read_session(tmp_path, "127.0.0.1:50051")
    assert session is not None and session["ui"] == viewer.ui and session["otlp"] == viewer.otlp_endpoint
    assert read_session(tmp_path, "127.0.0.1:6000") is None  # another gateway: not that stack's viewer
    remove_session(tmp_path)
    assert not (tmp_path / SESSION_FILE).exists() and read_session(tmp_path, "127.0.0.1:50051") is None


def test_a_stale_session_is_ignored(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / SESSION_FILE).write_text(
        json.dumps({"ui": "http://127.0.0.1:1", "otlp": "http://127.0.0.1:2", "gateway": "g:1", "pid": gone.pid})
    )
    assert read_session(tmp_path, "g:1") is None
    (tmp_path / SESSION_FILE).write_text("{not json")
    assert read_session(tmp_path, "g:1") is None
    # Another process's file is not removed by this one.
    (tmp_path / SESSION_FILE).write_text(json.dumps({"pid": os.getpid() + 1}))
    remove_session(tmp_path)
    assert (tmp_path / SESSION_FILE).exists()


def test_the_client_span_travels_as_a_w3c_traceparent() -> None:
    # An endpoint nobody listens on: finishing must still return (a bounded export).
    traced = ClientTrace("http://127.0.0.1:9")
    [(name, value)] = traced.metadata()
    assert name == "traceparent"
    version, trace_id, span_id, flags = value.split("-")
    assert (version, trace_id) == ("00", traced.trace_id) and len(span_id) == 16 and int(flags, 16) & 1
    traced.finish({"switchboard.request_id": "r"}, error=None)


def test_up_takes_traces() -> None:
    args = build_parser(["up", "--traces"]).parse_args(["up", "--traces"])
    assert args.traces
    assert not build_parser(["up"]).parse_args(["up"]).traces
