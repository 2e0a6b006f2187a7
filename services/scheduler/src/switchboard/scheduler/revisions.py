"""Revision deployers: start a rollout's new revision and retire the revision it leaves behind.

A rollout whose spec has `deploy` (a model folder and a replica count) needs no replicas of the new
revision beforehand: the scheduler asks its deployer (SCHEDULER_ROLLOUT_DEPLOYER) to start them,
waits until they registered and are ready (the rollout says "waiting for replicas"), runs the probe
and the steps, and once it ended retires the revision that lost: the old one after a promotion,
the new one after a rollback or an abort. Calls block; the servicer runs them in a worker thread.

| name | `deploy` | `retire` |
|---|---|---|
| `local` (`LocalRevisionDeployer`) | starts generator processes of the local stack (the local actuator's generator template) with `GENERATOR_REVISION` and `GENERATOR_MODEL` set | stops the processes it started for that revision (SIGTERM: they drain); the stack's own generators are not its to stop and stay as fallback only |
| `kubernetes` (`KubernetesRevisionDeployer`) | creates the Deployment `<pool deployment>-<revision>` as a copy of the pool's (`revision_deployment`): the revision label on it, its selector and pods, and the two variables on the generator container | deletes a Deployment it created; the pool's own Deployment (the revision the pool started with) is scaled to 0 through the scale subresource |

The Kubernetes deployer needs more than the allocation actuator's `get`/`patch` of named
Deployments: `create`, `get` and `delete` of Deployments in the namespace (names of new
revisions are not known in advance, so they cannot be listed in `resourceNames`). That Role is
the opt-in `compose/k8s/rollouts` component, not the base. No API server runs here:
tests/test_revisions.py runs this deployer with the real client against an HTTP stand-in.
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Mapping
from typing import Any, Protocol

from switchboard.common.logging import get_logger
from switchboard.scheduler.actuators import ActuatorError
from switchboard.scheduler.actuators.kubernetes import MERGE_PATCH

log = get_logger(__name__)

DEPLOYER_NAMES = ("none", "local", "kubernetes")
REVISION_LABEL = "switchboard.dev/revision"
GENERATOR_CONTAINER = "generator"
_SLUG = re.compile(r"[^a-z0-9-]+")


class RevisionDeployer(Protocol):
    """Starts and retires the replicas of one revision of an expert (blocking calls)."""

    name: str

    def deploy(self, expert: str, revision: str, model: str, replicas: int) -> None:
        """Start `replicas` replicas of `expert` serving `revision` from `model` ("": the pool's own)."""
        ...

    def retire(self, expert: str, revision: str, pool_revision: bool) -> None:
        """Stop the replicas of `expert`'s `revision` this deployer started; with `pool_revision`
        (the old revision after a promotion) also those of the pool itself, where it can."""
        ...


def revision_slug(revision: str) -> str:
    """A DNS-label-safe form of a revision label (lower case, digits, '-'; at most 40 characters; a
    hash suffix when anything had to change, so two revisions never share a slug)."""
    slug = _SLUG.sub("-", revision.lower()).strip("-")
    if slug == revision and 0 < len(slug) <= 40:
        return slug
    digest = hashlib.sha256(revision.encode()).hexdigest()[:8]
    return f"{slug[:31].strip('-') or 'r'}-{digest}"


def revision_deployment(
    base: Mapping[str, Any], revision: str, model: str, replicas: int
) -> dict[str, Any]:
    """The Deployment of a new revision, from the pool's Deployment as the API returns it (a dict in
    the API's camelCase): named `<base>-<slug>`, the revision label on it, in its selector and on its
    pods, `replicas` replicas, and GENERATOR_REVISION (and GENERATOR_MODEL when given) set on the
    generator container. Server-set fields (status, uid, resourceVersion, ...) are dropped."""
    slug = revision_slug(revision)
    meta = base.get("metadata") or {}
    spec = copy.deepcopy(base.get("spec") or {})
    labels = {**(meta.get("labels") or {}), REVISION_LABEL: slug}
    spec["replicas"] = replicas
    selector = spec.setdefault("selector", {})
    selector["matchLabels"] = {**(selector.get("matchLabels") or {}), REVISION_LABEL: slug}
    template = spec.setdefault("template", {})
    template_meta = template.setdefault("metadata", {})
    template_meta["labels"] = {**(template_meta.get("labels") or {}), REVISION_LABEL: slug}
    containers = (template.get("spec") or {}).get("containers") or []
    generator = next((c for c in containers if c.get("name") == GENERATOR_CONTAINER), None)
    if generator is None:
        raise ActuatorError("template", f"deployment {meta.get('name')} has no container named {GENERATOR_CONTAINER!r}")
    settings = {"GENERATOR_REVISION": revision, **({"GENERATOR_MODEL": model} if model else {})}
    env = [e for e in generator.get("env") or [] if e.get("name") not in settings]
    generator["env"] = env + [{"name": k, "value": v} for k, v in settings.items()]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": f"{meta.get('name')}-{slug}",
            "namespace": meta.get("namespace"),
            "labels": labels,
            "annotations": {"switchboard.dev/rollout-of": str(meta.get("name"))},
        },
        "spec": spec,
    }


class LocalRevisionDeployer:
    """Starts a revision's generators as processes of the local stack (through a local actuator)."""

    name = "local"

    def __init__(self, actuator: Any) -> None:
        self.actuator = actuator  # actuators.local.LocalProcessActuator, with its own id tag

    def deploy(self, expert: str, revision: str, model: str, replicas: int) -> None:
        env = {"GENERATOR_REVISION": revision, **({"GENERATOR_MODEL": model} if model else {})}
        ids = self.actuator.add(expert, replicas, env=env)
        log.info("revision deployed", expert=expert, revision=revision, replicas=ids, model=model or "(the pool's)")

    def retire(self, expert: str, revision: str, pool_revision: bool) -> None:
        # The stack's own generators are not the actuator's to stop: they stay, as fallback only.
        ids = self.actuator.started_ids(expert, revision)
        if ids:
            self.actuator.remove(expert, ids)
        log.info("revision retired", expert=expert, revision=revision, stopped=ids)

    def close(self) -> None:
        self.actuator.close()


def make_deployer(settings: Any) -> RevisionDeployer | None:
    """The deployer SCHEDULER_ROLLOUT_DEPLOYER names (None for `none`), on the settings the
    allocation actuators read (the generator template, the namespace and Deployment names)."""
    if settings.rollout_deployer == "local":
        from pathlib import Path

        from switchboard.scheduler.actuators.local import GeneratorTemplate, LocalProcessActuator

        template = GeneratorTemplate.read(Path(settings.local_generators_file).expanduser())
        return LocalRevisionDeployer(LocalProcessActuator(template, id_tag="rev"))
    if settings.rollout_deployer == "kubernetes":
        from switchboard.scheduler.actuators.kubernetes import KubernetesActuator

        return KubernetesRevisionDeployer(
            KubernetesActuator(
                namespace=settings.k8s_namespace,
                deployment=settings.k8s_deployment,
                request_timeout=settings.actuator_timeout_seconds,
            )
        )
    return None


class KubernetesRevisionDeployer:
    """Creates and deletes revision Deployments next to the pool's (module docstring)."""

    name = "kubernetes"

    def __init__(self, scaler: Any) -> None:
        # actuators.kubernetes.KubernetesActuator: its client, namespace, names, timeouts and errors.
        self.scaler = scaler

    def _api(self) -> Any:
        return self.scaler.api

    def deploy(self, expert: str, revision: str, model: str, replicas: int) -> None:
        from kubernetes.client.exceptions import ApiException

        api, namespace, timeout = self._api(), self.scaler.namespace, self.scaler.request_timeout

        def create(base_name: str) -> str:
            base = api.api_client.sanitize_for_serialization(
                api.read_namespaced_deployment(base_name, namespace, _request_timeout=timeout)
            )
            body = revision_deployment(base, revision, model, replicas)
            try:
                api.create_namespaced_deployment(namespace, body, _request_timeout=timeout)
            except ApiException as exc:
                if exc.status != 409:
                    raise
                # Already there (a deploy retried after a timeout): set its replicas.
                api.patch_namespaced_deployment_scale(
                    body["metadata"]["name"],
                    namespace,
                    {"spec": {"replicas": replicas}},
                    _request_timeout=timeout,
                    _content_type=MERGE_PATCH,
                )
            return str(body["metadata"]["name"])

        name = self.scaler._call("create revision of", expert, create)
        log.info("revision deployed", expert=expert, revision=revision, deployment=name, namespace=namespace, replicas=replicas)

    def retire(self, expert: str, revision: str, pool_revision: bool) -> None:
        from kubernetes.client.exceptions import ApiException

        api, namespace, timeout = self._api(), self.scaler.namespace, self.scaler.request_timeout

        def delete_or_scale(base_name: str) -> str:
            name = f"{base_name}-{revision_slug(revision)}"
            try:
                api.delete_namespaced_deployment(name, namespace, _request_timeout=timeout)
                return f"deleted {name}"
            except ApiException as exc:
                if exc.status != 404:
                    raise
            if not pool_revision:
                return f"nothing: {name} does not exist"  # never the pool's own after a rollback
            # Not one this deployer created: the revision the pool's own Deployment serves.
            api.patch_namespaced_deployment_scale(
                base_name, namespace, {"spec": {"replicas": 0}}, _request_timeout=timeout, _content_type=MERGE_PATCH
            )
            return f"scaled {base_name} to 0"

        done = self.scaler._call("retire revision of", expert, delete_or_scale)
        log.info("revision retired", expert=expert, revision=revision, namespace=namespace, action=done)

    def close(self) -> None:
        self.scaler.close()
