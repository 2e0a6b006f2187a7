"""The generator template `LocalStack` writes for the scheduler's local allocation actuator: a
generator it starts gets the environment `switchboard up` gives that expert's generators."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from switchboard.cli.localstack import GENERATOR_TEMPLATE_FILE, LocalStack, plan_stack, service_specs
from switchboard.scheduler.actuators.local import GeneratorTemplate, LocalProcessActuator

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_a_started_generator_gets_the_stacks_environment_but_its_own_id_ports_and_certificate(tmp_path: Path) -> None:
    plan = plan_stack(REPO_ROOT / "config" / "experts.yaml", tmp_path / "k", free_ports=True, tls_dir=tmp_path / "pki")
    plan.generator_env["GENERATOR_DEVICE"] = "cpu"
    stack = LocalStack(plan, tmp_path / "logs")
    path = Path(stack.specs["scheduler"].env["SCHEDULER_LOCAL_GENERATORS_FILE"])
    assert path == tmp_path / "logs" / GENERATOR_TEMPLATE_FILE
    template = GeneratorTemplate.read(path)
    assert template.argv[1:] == ("-m", "switchboard.generator") and template.pki_dir == tmp_path / "pki"
    assert template.replicas == {"bard-small": ("bard-small-0",), "milton-small": ("milton-small-0",), "scribe-large": ("scribe-large-0",)}
    env = LocalProcessActuator(template).replica_env("milton-small", "milton-small-auto-1", 45678)
    # What `switchboard up` would give a replica of that id (same plan, one more generator).
    first = next(g for g in plan.generators if g.expert == "milton-small")
    plan.generators.append(dataclasses.replace(first, replica_id="milton-small-auto-1", port=45678))
    expected = dict(service_specs(plan)["generator-milton-small-auto-1"].env)
    # A fresh metrics port, and its own certificate from the stack's CA (the planned identities
    # cover only the planned replicas, so the spec of the extra one has none).
    assert env.pop("GENERATOR_METRICS_PORT") not in ("0", expected.pop("GENERATOR_METRICS_PORT"))
    assert env.pop("SWITCHBOARD_TLS_CA_FILE") == str(plan.operator.ca_file)
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(Path(env.pop("SWITCHBOARD_TLS_CERT_FILE")).read_bytes())
    assert cert.subject.rfc4514_string() == "CN=generator/milton-small-auto-1"
    assert Path(env.pop("SWITCHBOARD_TLS_KEY_FILE")).is_file()
    assert env.pop("PYTHONUNBUFFERED") == "1"
    assert env == expected
