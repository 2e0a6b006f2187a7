"""Which identity speaks for a replica id: a replica may only register, report and deregister itself.

With mutual TLS every call carries its peer's certificate identity. Two rules, both pure:

- a generator whose identity names an instance (`generator/<replica id>`) speaks only for that id;
- a replica id is bound to the identity that registered it while the replica is live (until it
  deregisters or expires), so one generator's certificate cannot take over or drain another's
  replica even when generators share an identity-less role certificate.

Without TLS (a plaintext dev stack) there is no identity and nothing is checked.
"""

from __future__ import annotations

from collections.abc import Callable

from switchboard.common.tls import role_of


class NotYourReplica(Exception):
    """The caller's identity may not speak for this replica id; the message says whose it is."""


def instance_of(identity: str) -> str | None:
    """The instance part of `role/instance`, or None for a bare role."""
    return identity.split("/", 1)[1] if "/" in identity else None


class ReplicaOwners:
    """The identity bound to each live replica id (`is_live` says whether the registry still has it)."""

    def __init__(self, is_live: Callable[[str], bool]) -> None:
        self._owners: dict[str, str] = {}
        self._is_live = is_live

    def check(self, replica_id: str, identity: str | None) -> None:
        """Raise NotYourReplica unless `identity` may speak for `replica_id` (None: no TLS, always allowed)."""
        if identity is None:
            return
        instance = instance_of(identity)
        if role_of(identity) == "generator" and instance is not None and instance != replica_id:
            raise NotYourReplica(f"identity {identity} speaks only for replica {instance}, not {replica_id}")
        owner = self._owners.get(replica_id)
        if owner is not None and owner != identity and self._is_live(replica_id):
            raise NotYourReplica(
                f"replica {replica_id} is registered by another identity ({owner}) until it deregisters or expires"
            )

    def bind(self, replica_id: str, identity: str | None) -> None:
        """Bind the replica id to the identity that registered it (after `check` passed)."""
        if identity is not None:
            self._owners[replica_id] = identity

    def release(self, replica_id: str) -> None:
        """Forget the binding (the replica deregistered)."""
        self._owners.pop(replica_id, None)

    def prune(self) -> None:
        """Drop bindings of replicas no longer live (expired), so the map does not grow."""
        for replica_id in [r for r in self._owners if not self._is_live(r)]:
            del self._owners[replica_id]
