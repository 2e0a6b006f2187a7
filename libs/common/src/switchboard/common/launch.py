"""`python -m switchboard.common.launch PROGRAM [ARGS]`: start a child process that dies with its launcher.

It asks Linux to SIGTERM this process when the launching process dies (prctl PR_SET_PDEATHSIG,
which survives the exec), checks that the launcher is still the parent (it may have died before
the prctl), then execs PROGRAM. `launched(argv)` builds such a command line; the local stack's
`ProcessGroup`, the trace viewer and the scheduler's local actuator start every child with it.

Doing this after exec, rather than in a `subprocess` `preexec_fn`, keeps Python code out of the
window between fork and exec: a parent with gRPC threads running (the scheduler's server, a test
sending traffic while it starts a replica) leaves gRPC's state mid-poll in the forked copy, and
any Python code there (a garbage collection finalizing a gRPC object) can call into it and abort
the child ("ev_epoll1_linux.cc: Check failed: next_worker->state == KICKED", seen here).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Mapping, Sequence

# The launcher's pid, in the child's environment; a child whose parent is no longer it exits.
PARENT_ENV = "SWITCHBOARD_LAUNCHER_PID"


def launched(argv: Sequence[str]) -> list[str]:
    """The command line that runs `argv` (program first) so that it dies with this process."""
    return [sys.executable, "-m", "switchboard.common.launch", *argv]


def launch_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with this process named as the launcher (pass it with `launched`)."""
    return {**env, PARENT_ENV: str(os.getpid())}


def die_with_parent() -> None:
    """SIGTERM this process when its parent dies (Linux prctl); elsewhere a no-op."""
    if sys.platform != "linux":
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


def main(argv: Sequence[str]) -> None:
    if not argv:
        sys.exit("usage: python -m switchboard.common.launch PROGRAM [ARGS]")
    die_with_parent()
    expected = os.environ.pop(PARENT_ENV, "")
    if expected and os.getppid() != int(expected):
        sys.exit(f"the launcher (pid {expected}) exited before {argv[0]} started")
    os.execv(argv[0], list(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
