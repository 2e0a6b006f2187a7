"""`switchboard restore ARCHIVE`: put back what `switchboard backup` saved, atomically, after checking it all.

The archive is verified first (a known version, every file present with its SHA-256); a corrupt
one or one of an unknown version is refused and nothing is written. Each member goes back where it
was saved from unless `--to NAME=PATH` names another place (NAME as `--check` lists it: gate,
policy, policy-2, tenants, prices, rollouts). The services re-read the tenants file, price table and
policy file when they change; restart the router to load a restored gate and the scheduler to load
restored rollouts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from switchboard.backup.archive import BackupError, read_archive, restore


def parse_targets(pairs: list[str] | None) -> dict[str, Path]:
    """{member name: path} from NAME=PATH pairs."""
    targets: dict[str, Path] = {}
    for pair in pairs or []:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise BackupError(f"--to {pair!r}: expected NAME=PATH, e.g. --to tenants=/etc/switchboard/tenants.yaml")
        targets[name] = Path(path)
    return targets


def run(args: argparse.Namespace) -> int:
    """Verify, then restore (or only list with --check); exit 2 with one line saying why when refused."""
    try:
        verified = read_archive(Path(args.archive))
        manifest = verified.manifest
        if args.check:
            print(f"{args.archive}: version {manifest.version}, made {manifest.created_at}, intact")
            for member in manifest.members:
                print(f"{member.name}: {member.kind} from {member.source} ({len(member.files)} file(s))")
            return 0
        restored = restore(verified, parse_targets(args.to))
    except (BackupError, OSError) as exc:
        print(f"switchboard restore: error: {exc}", file=sys.stderr)
        return 2
    for member, path in restored:
        print(f"restored {member.name} to {path}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register `switchboard restore`."""
    parser = subparsers.add_parser(
        "restore", help="restore the gate, policies, tenants file and price table from a backup", description=__doc__
    )
    parser.add_argument("archive", help="an archive written by switchboard backup")
    parser.add_argument("--to", action="append", metavar="NAME=PATH", help="restore member NAME to PATH instead")
    parser.add_argument("--check", action="store_true", help="verify the archive and list its members; write nothing")
    parser.set_defaults(func=run)
