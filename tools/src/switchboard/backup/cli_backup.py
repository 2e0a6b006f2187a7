"""`switchboard backup ARCHIVE`: save the router's gate, the scheduler's policies, the tenants file and the
price table into one versioned archive, written atomically.

Each path comes from its flag, else from the variable the service reads (ROUTER_GATE_PATH,
SCHEDULER_POLICY_FILE, GATEWAY_TENANTS_FILE, GATEWAY_PRICES_FILE); what neither names is left out.
`switchboard restore ARCHIVE` puts them back.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from switchboard.backup.archive import BackupError, Source, write_archive
from switchboard.backup.settings_paths import ROLE_VARIABLES, path_from_environment


def sources_of(args: argparse.Namespace) -> list[Source]:
    """The paths to save: the flags, else the services' variables."""
    sources = []
    for role in ROLE_VARIABLES:
        given = getattr(args, role)
        paths = given if given else [path_from_environment(role)]
        sources.extend(Source(role, Path(p)) for p in paths if p)
    return sources


def run(args: argparse.Namespace) -> int:
    """Write the archive; exit 2 with one line saying why when it cannot."""
    try:
        manifest = write_archive(Path(args.archive), sources_of(args))
    except (BackupError, OSError) as exc:
        print(f"switchboard backup: error: {exc}", file=sys.stderr)
        return 2
    for member in manifest.members:
        print(f"{member.name}: {member.source} ({len(member.files)} file(s))")
    print(f"wrote {args.archive} (version {manifest.version}, {manifest.created_at})")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register `switchboard backup`."""
    parser = subparsers.add_parser(
        "backup", help="save the gate, policies, tenants file and price table into one archive", description=__doc__
    )
    parser.add_argument("archive", help="the archive to write (replaced atomically if it exists)")
    parser.add_argument("--gate", action="append", help="the router's gate artifact folder (default: ROUTER_GATE_PATH)")
    parser.add_argument(
        "--policy", action="append", help="a scheduler policy file, repeatable (default: SCHEDULER_POLICY_FILE)"
    )
    parser.add_argument("--tenants", action="append", help="the gateway's tenants file (default: GATEWAY_TENANTS_FILE)")
    parser.add_argument("--prices", action="append", help="the gateway's price table (default: GATEWAY_PRICES_FILE)")
    parser.add_argument(
        "--rollouts", action="append", help="the scheduler's rollout state file (default: SCHEDULER_ROLLOUT_STATE_FILE)"
    )
    parser.set_defaults(func=run)
