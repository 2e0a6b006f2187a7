"""The Kubernetes actuator: scales each pool's generator Deployment through the scale subresource.

It uses the official `kubernetes` client (requirements/scheduler.txt), imported only when this
actuator is chosen. Per call it reads the pool's Deployment scale
(`read_namespaced_deployment_scale`, GET `/apis/apps/v1/namespaces/{ns}/deployments/{name}/scale`)
and patches `spec.replicas` by the change (`patch_namespaced_deployment_scale`, PATCH of the same
path, content type `application/merge-patch+json`, body
`{"spec": {"replicas": <new>}, "metadata": {"resourceVersion": <read>}}`): relative to
what the Deployment says, so pods still starting are never cut, and with the read's resource
version as a precondition, so a change made in between (another controller, an operator's
`kubectl scale`) answers 409 Conflict instead of being overwritten; the controller retries the next
period. The scheduler's Role (`compose/k8s/base/scheduler.yaml`, rendered by
`scripts/render_deploy.py`) grants exactly `get` and `patch` on `deployments/scale` of the
generator Deployments.

Kubernetes chooses which pod a lower count removes (the ReplicaSet prefers pods that are not
ready, then the newest). The controller lowers the count only after the replicas it chose have
drained (no request in flight, marked draining so nothing new lands on them); a pod the
ReplicaSet picks instead still finishes its work on SIGTERM (the generator drains within its
termination grace period).

Errors become `ActuatorError`: `http_<status>` for an API answer (403 Forbidden when the RBAC is
missing, 404 for a Deployment that does not exist, 409 on a conflicting change, 5xx), `timeout`
when the API server does not answer within `request_timeout` seconds, `unreachable` otherwise.

No API server can run on the development machine: tests/test_actuators.py runs this actuator,
with the real client, against a small HTTP stand-in of the scale subresource and checks the
requests the client sends (method, path, content type, body).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from switchboard.common.logging import get_logger
from switchboard.scheduler.actuators import ActuatorError

log = get_logger(__name__)

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
DEFAULT_DEPLOYMENT = "generator-{expert}"  # scripts/render_deploy.py's names
MERGE_PATCH = "application/merge-patch+json"


def pod_namespace(default: str = "default") -> str:
    """The namespace this pod runs in (its service account's), else `default`."""
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or default
    except OSError:
        return default


def default_api_client() -> Any:
    """An ApiClient from the in-cluster service account, else from ~/.kube/config."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


class KubernetesActuator:
    """Scales `deployment.format(expert=...)` in `namespace` (module docstring)."""

    name = "kubernetes"
    acts = True
    targeted = False

    def __init__(
        self,
        namespace: str = "",
        deployment: str = DEFAULT_DEPLOYMENT,
        api_client: Any = None,
        request_timeout: float = 10.0,
    ) -> None:
        from kubernetes import client

        self.namespace = namespace or pod_namespace()
        self.deployment = deployment
        self.request_timeout = request_timeout
        self.api = client.AppsV1Api(api_client if api_client is not None else default_api_client())

    def deployment_name(self, expert: str) -> str:
        """The Deployment of one pool."""
        return self.deployment.format(expert=expert)

    def replicas(self, expert: str) -> int:
        """The pool's Deployment's `spec.replicas` now."""
        return self._call("read", expert, lambda name: self._read(name))[0]

    def _read(self, name: str) -> tuple[int, str]:
        scale = self.api.read_namespaced_deployment_scale(name, self.namespace, _request_timeout=self.request_timeout)
        return int(scale.spec.replicas or 0), str(scale.metadata.resource_version or "")

    def _scale_by(self, expert: str, change: int) -> tuple[int, int]:
        def scale(name: str) -> tuple[int, int]:
            current, version = self._read(name)
            target = max(0, current + change)
            body: dict[str, Any] = {"spec": {"replicas": target}}
            if version:
                body["metadata"] = {"resourceVersion": version}
            # A JSON merge patch (RFC 7386), named rather than left to the client's pick by body type.
            self.api.patch_namespaced_deployment_scale(
                name,
                self.namespace,
                body,
                _request_timeout=self.request_timeout,
                _content_type=MERGE_PATCH,
            )
            return current, target

        current, target = self._call("patch", expert, scale)
        log.info(
            "deployment scaled",
            expert=expert,
            deployment=self.deployment_name(expert),
            namespace=self.namespace,
            replicas_before=current,
            replicas=target,
        )
        return current, target

    def _call(self, what: str, expert: str, fn: Any) -> Any:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError, MaxRetryError, NewConnectionError, TimeoutError

        name = self.deployment_name(expert)
        where = f"deployment {self.namespace}/{name} scale"
        try:
            return fn(name)
        except ApiException as exc:
            raise ActuatorError(
                f"http_{exc.status}", f"{what} {where}: the API server answered {exc.status} {exc.reason}"
            ) from None
        except (TimeoutError, MaxRetryError) as exc:
            # urllib3 retries a GET that failed and then raises MaxRetryError with the failure as reason;
            # a refused connection (NewConnectionError) is one of its TimeoutErrors, but no timeout.
            cause = exc.reason if isinstance(exc, MaxRetryError) else exc
            if isinstance(cause, TimeoutError) and not isinstance(cause, NewConnectionError):
                raise ActuatorError("timeout", f"{what} {where}: no answer within {self.request_timeout:g} s") from None
            raise ActuatorError("unreachable", f"{what} {where}: {cause}") from None
        except (HTTPError, OSError) as exc:
            raise ActuatorError("unreachable", f"{what} {where}: {exc}") from None

    def add(self, expert: str, count: int) -> list[str]:
        self._scale_by(expert, count)
        return []  # pod names are the ReplicaSet's to choose

    def remove(self, expert: str, replica_ids: Sequence[str]) -> None:
        self._scale_by(expert, -len(replica_ids))

    def can_remove(self, replica_id: str) -> bool:
        return True

    def expected(self, expert: str) -> list[str | None]:
        """As many unnamed replicas as the Deployment's `spec.replicas` (pods are the ReplicaSet's to name)."""
        return [None] * self.replicas(expert)

    def close(self) -> None:
        close = getattr(self.api.api_client, "close", None)
        if close is not None:
            close()
