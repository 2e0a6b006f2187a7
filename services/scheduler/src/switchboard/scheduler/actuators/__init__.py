"""Allocation actuators: what turns the allocation controller's decisions into replicas (issue 17).

One interface, three implementations:

| name | `add(expert, count)` | `remove(expert, replica_ids)` |
|---|---|---|
| `dry-run` (`DryRunActuator`) | logs and prints the decision, starts nothing | logs and prints it, stops nothing |
| `local` (`LocalProcessActuator`) | starts `count` generator processes on this machine with the command line and environment `switchboard up` gives one; each registers itself | SIGTERM (the generator drains), then SIGKILL after the grace period |
| `kubernetes` (`KubernetesActuator`) | reads the pool's Deployment scale and patches it `count` higher (the scale subresource) | patches it `len(replica_ids)` lower |

The controller only calls `remove` for replicas it has drained first (marked draining in the
registry, no request in flight), and only for ids `can_remove` accepts. Calls are blocking: the
controller runs them in a worker thread with a timeout, so placement never waits for them. A call
that fails raises `ActuatorError` (its `reason` labels the fault metric); the controller reports it
and tries again the next period.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Protocol, TextIO

from switchboard.common.logging import get_logger

log = get_logger(__name__)

ACTUATOR_NAMES = ("dry-run", "local", "kubernetes")


class ActuatorError(Exception):
    """An actuator call that did not happen; `reason` is a short label (e.g. `http_403`, `timeout`)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Actuator(Protocol):
    """Starts and stops replicas of expert pools (blocking calls; see the module docstring)."""

    name: str
    acts: bool  # False for the dry run: the controller then drains nothing either
    # True when `remove` stops exactly the replicas named; False when it lowers a count and the
    # orchestrator picks the pod (Kubernetes): the drained replica then serves again.
    targeted: bool

    def add(self, expert: str, count: int) -> list[str]:
        """Start `count` more replicas of `expert`; the ids they will register with, when known ([] else)."""
        ...

    def remove(self, expert: str, replica_ids: Sequence[str]) -> None:
        """Stop these drained replicas of `expert` (an id already gone is not an error)."""
        ...

    def can_remove(self, replica_id: str) -> bool:
        """Whether `remove` can stop this replica (the local actuator stops only what it started)."""
        ...

    def expected(self, expert: str) -> list[str | None]:
        """The replicas of `expert` already running or starting outside the controller's count, when it
        starts (their ids, or None where unknown): it counts the unregistered ones as starting, so a
        pool whose generators are still loading their model is not scaled up again."""
        ...

    def close(self) -> None:
        """Release what the actuator holds (the local one stops the processes it started)."""
        ...


class DryRunActuator:
    """Logs and prints every decision (one line on `out`, stdout by default) and acts on nothing."""

    name = "dry-run"
    acts = False
    targeted = True

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out
        self.calls: list[tuple[str, str, int | tuple[str, ...]]] = []

    def _say(self, line: str) -> None:
        print(line, file=self.out or sys.stdout, flush=True)

    def add(self, expert: str, count: int) -> list[str]:
        self.calls.append(("add", expert, count))
        log.info("dry run: would start replicas", expert=expert, count=count)
        self._say(f"allocation dry run: would start {count} replica(s) of {expert}")
        return []

    def remove(self, expert: str, replica_ids: Sequence[str]) -> None:
        self.calls.append(("remove", expert, tuple(replica_ids)))
        log.info("dry run: would stop replicas", expert=expert, replica_ids=list(replica_ids))
        self._say(f"allocation dry run: would stop {', '.join(replica_ids)} of {expert} (drained)")

    def can_remove(self, replica_id: str) -> bool:
        return True

    def expected(self, expert: str) -> list[str | None]:
        return []

    def close(self) -> None:
        return None
