"""The child launcher: exec of the program, refusal when the launcher is no longer the parent."""

from __future__ import annotations

import os
import subprocess
import sys

from switchboard.common.launch import PARENT_ENV, launch_env, launched


def test_the_launcher_execs_the_program_with_its_arguments() -> None:
    done = subprocess.run(
        launched([sys.executable, "-c", "import os, sys; print(sys.argv[1], os.environ.get('SWITCHBOARD_LAUNCHER_PID'))", "hi"]),
        env=launch_env(os.environ),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.split() == ["hi", "None"]  # the launcher's own variable does not reach the program


def test_a_child_whose_launcher_is_gone_does_not_start() -> None:
    done = subprocess.run(
        launched(["/bin/echo", "started"]),
        env={**os.environ, PARENT_ENV: "1"},  # not this process: as if the launcher had died first
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0 and "started" not in done.stdout
    assert "exited before /bin/echo started" in done.stderr
