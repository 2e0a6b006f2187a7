"""`python -m switchboard.router`: run the router service."""

from __future__ import annotations

from switchboard.common.service import run_service
from switchboard.router.config import load_router_settings
from switchboard.router.server import serve


def main() -> None:
    """Entry point (also the `switchboard-router` console script)."""
    run_service("router", load_router_settings, serve)


if __name__ == "__main__":
    main()
