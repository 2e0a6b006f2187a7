"""A torch-free model of one replica: request scheduler, KV-cache manager, block pool,
prefix hashing and the fitted step-cost model.

The generator's engine drives it around its model runner; the scheduler's simulator
can drive it around a cost model instead. One step::

    out = scheduler.schedule()                      # SchedulerOutput
    runner_out = runner.execute(out)                # ModelRunnerOutput (the caller's runner)
    scheduler.update(out, runner_out, finish_reasons)  # -> list[RequestOutput]
"""

from switchboard.replica.block_pool import BlockPool
from switchboard.replica.cost_model import FORMULA, CostModel, StepComposition
from switchboard.replica.hashing import (
    ROOT_HASH,
    block_hash,
    extend_block_hashes,
    hash_seed,
    prompt_block_hashes,
)
from switchboard.replica.kv_cache_manager import KVCacheManager
from switchboard.replica.kv_events import KvEvent, KvEventBatch, KvEventJournal
from switchboard.replica.outputs import ModelRunnerOutput, RequestOutput, ScheduledRequest, SchedulerOutput
from switchboard.replica.request import Request, RequestStatus
from switchboard.replica.scheduler import Scheduler

__all__ = [
    "FORMULA",
    "ROOT_HASH",
    "BlockPool",
    "CostModel",
    "KVCacheManager",
    "KvEvent",
    "KvEventBatch",
    "KvEventJournal",
    "ModelRunnerOutput",
    "Request",
    "RequestOutput",
    "RequestStatus",
    "ScheduledRequest",
    "Scheduler",
    "SchedulerOutput",
    "StepComposition",
    "block_hash",
    "extend_block_hashes",
    "hash_seed",
    "prompt_block_hashes",
]
