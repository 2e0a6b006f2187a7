"""The compose stack users run, for real: images built from the project's Dockerfiles, every
container healthy, requests through both fronts, one trace across the four services in a trace
viewer, every metrics endpoint scraped by Prometheus, a killed generator failed over and
recovered, and a clean stop within the grace periods that leaves nothing behind.

The tests share one running stack and run in the order written (the last one stops it).
"""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor

import checks
import pytest
from engine import Engine, EngineError, http_json
from probes import DEV_KEY, generate, poll, switchboard_services, trace_ids
from stack import ComposeStack

# The first test's setup builds every image: on a cold machine that alone is minutes (README).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

SWITCHBOARD_JOBS = ("gateway", "router", "scheduler", "generator")


def _prometheus(ports: dict[str, int], query: str) -> list[dict]:
    from urllib.parse import quote

    answer = http_json(f"http://127.0.0.1:{ports['prometheus']}/api/v1/query?query={quote(query)}")
    return answer["data"]["result"]  # type: ignore[index]


def test_images_are_non_root_with_healthchecks(stack: ComposeStack, engine: Engine) -> None:
    images = sorted({s["image"] for s in switchboard_services(stack).values()})
    assert {i.rsplit("/", 1)[-1].split(":")[0] for i in images} == set(SWITCHBOARD_JOBS)
    problems = [
        p for image in images for p in checks.image_problems(image, engine.inspect(image, kind="image")[0])
    ]
    assert problems == []


def test_compose_config_is_sound(stack: ComposeStack) -> None:
    assert checks.compose_problems(stack.config()) == []


def test_every_container_is_healthy_read_only_and_runs_as_10001(stack: ComposeStack, engine: Engine) -> None:
    names = [stack.container(service) for service in switchboard_services(stack)]
    problems = [p for name in names for p in checks.container_problems(name, engine.inspect(name)[0])]
    assert problems == []
    for name in names:
        assert engine.run("exec", name, "id", "-u").strip() == "10001"
        refused = subprocess.run(
            [engine.cli, "exec", name, "touch", "/app/x"], env=engine.env, capture_output=True, text=True
        )
        assert refused.returncode != 0 and "Read-only file system" in refused.stderr


def test_the_client_streams_a_completion_through_the_gateway(
    stack: ComposeStack, ports: dict[str, int]
) -> None:
    done = generate(ports["grpc"], "Enter the king, with his lords", max_tokens=16)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    assert "completion_tokens=16" in done.stderr


def test_the_openai_client_streams_through_the_http_front(stack: ComposeStack, ports: dict[str, int]) -> None:
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{ports['http']}/v1", api_key=DEV_KEY, timeout=60)
    chunks = list(
        client.completions.create(
            model="auto",
            prompt="To be, or not",
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
    chat = client.chat.completions.create(
        model="bard-small", messages=[{"role": "user", "content": "Speak, friend"}], max_tokens=8
    )
    assert chat.choices[0].message.content and chat.usage is not None and chat.usage.completion_tokens == 8


def test_one_trace_spans_all_four_services_in_the_trace_viewer(
    stack: ComposeStack, ports: dict[str, int]
) -> None:
    assert generate(ports["grpc"], "Once more unto the breach").returncode == 0

    assert poll(
        "a trace with server spans of the gateway, router, scheduler and generator",
        lambda: trace_ids(ports["traces"]),
        limit=60,
    )


def test_prometheus_scrapes_every_metrics_endpoint(stack: ComposeStack, ports: dict[str, int]) -> None:
    def healthy() -> bool:
        answer = http_json(f"http://127.0.0.1:{ports['prometheus']}/api/v1/targets")
        problems = checks.target_problems(answer["data"]["activeTargets"], SWITCHBOARD_JOBS)  # type: ignore[index]
        if problems:
            raise EngineError("; ".join(problems))
        return True

    poll("every target up", healthy, limit=60)
    # And the numbers are the services' own: the scheduler sees the replicas of every expert.
    ready = {
        r["metric"]["expert"]: float(r["value"][1])
        for r in _prometheus(ports, 'switchboard_scheduler_replicas{state="ready"}')
    }
    assert ready == {"bard-small": 2.0, "milton-small": 1.0, "scribe-large": 1.0}


def _ready(ports: dict[str, int], expert: str) -> float:
    result = _prometheus(ports, f'switchboard_scheduler_replicas{{state="ready",expert="{expert}"}}')
    return float(result[0]["value"][1]) if result else 0.0


def test_a_killed_generator_fails_over_and_recovers(
    stack: ComposeStack, engine: Engine, ports: dict[str, int]
) -> None:
    killed = stack.container("generator-bard-small")
    engine.run("kill", killed)
    # Requests pinned to the pool keep succeeding on its other replica, from the first one on.
    with ThreadPoolExecutor(4) as pool:
        results = list(
            pool.map(lambda i: generate(ports["grpc"], f"Friends, Romans {i}", "bard-small"), range(8))
        )
    assert [r.returncode for r in results] == [0] * 8, [r.stderr[-300:] for r in results if r.returncode]
    poll("the scheduler drops the killed replica", lambda: _ready(ports, "bard-small") == 1.0, limit=60)

    stack.up("generator-bard-small")
    poll("the restarted replica registers again", lambda: _ready(ports, "bard-small") == 2.0, limit=60)

    def served_by_restarted() -> bool:
        with ThreadPoolExecutor(8) as pool:
            done = list(
                pool.map(
                    lambda i: generate(ports["grpc"], f"Now is the winter {i}", "bard-small", 16), range(8)
                )
            )
        assert [r.returncode for r in done] == [0] * 8
        served = _prometheus(
            ports, 'sum(switchboard_generator_requests_total{instance="generator-bard-small:9111"})'
        )
        return bool(served) and float(served[0]["value"][1]) > 0

    poll("the restarted replica serves requests", served_by_restarted, limit=120, period=6)


def test_stop_is_clean_within_the_grace_periods_and_leaves_nothing(stack: ComposeStack) -> None:
    config = stack.config()["services"]
    grace = max(_seconds(spec.get("stop_grace_period", "10s")) for spec in config.values())
    took = stack.stop()
    assert took < grace + 15, f"stop took {took:.1f} s; the longest grace period is {grace:.0f} s"
    # Every Switchboard process exits on SIGTERM by itself (0), none is SIGKILLed (137).
    exits = {
        c["Service"]: c.get("ExitCode")
        for c in stack.containers()
        if c["Service"] in switchboard_services(stack)
    }
    assert exits and set(exits.values()) == {0}, exits
    stack.down()
    assert stack.leftovers() == []


def _seconds(duration: str) -> float:
    """Compose durations as `config --format json` gives them ("30s", "1m30s") or nanoseconds."""
    if isinstance(duration, (int, float)):
        return float(duration) / 1e9
    total, number = 0.0, ""
    for char in str(duration):
        if char.isdigit() or char == ".":
            number += char
        else:
            total += float(number or 0) * {"h": 3600, "m": 60, "s": 1}.get(char, 0)
            number = ""
    return total + float(number or 0)
