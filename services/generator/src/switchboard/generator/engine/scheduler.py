"""The engine's request scheduler: the torch-free one of `switchboard.replica`.

Re-exported here under the engine's older names (a `Sequence` is a replica `Request`,
a `StepPlan` a `SchedulerOutput`) so existing imports keep working.
"""

from __future__ import annotations

from switchboard.replica.outputs import SchedulerOutput as StepPlan
from switchboard.replica.request import Request as Sequence
from switchboard.replica.request import RequestStatus as SequenceStatus
from switchboard.replica.scheduler import Scheduler

__all__ = ["Scheduler", "Sequence", "SequenceStatus", "StepPlan"]
