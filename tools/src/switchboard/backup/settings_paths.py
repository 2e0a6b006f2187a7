"""Where the services keep what a backup saves: the settings that name each path, read from the environment.

The same variables the services read (ROUTER_GATE_PATH, SCHEDULER_POLICY_FILE, GATEWAY_TENANTS_FILE,
GATEWAY_PRICES_FILE, SCHEDULER_ROLLOUT_STATE_FILE), so `switchboard backup` run with a service's environment saves what that
service uses; a flag on the command line wins over its variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

# role -> the environment variable that names its path.
ROLE_VARIABLES: Mapping[str, str] = {
    "gate": "ROUTER_GATE_PATH",
    "policy": "SCHEDULER_POLICY_FILE",
    "tenants": "GATEWAY_TENANTS_FILE",
    "prices": "GATEWAY_PRICES_FILE",
    "rollouts": "SCHEDULER_ROLLOUT_STATE_FILE",
}


def path_from_environment(role: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The path the role's variable names, or None when it is unset or empty."""
    value = (os.environ if environ is None else environ).get(ROLE_VARIABLES[role], "").strip()
    return value or None
