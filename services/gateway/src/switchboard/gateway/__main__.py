"""`python -m switchboard.gateway`: run the gateway service."""

from __future__ import annotations

from switchboard.common.service import run_service
from switchboard.gateway.config import load_gateway_settings
from switchboard.gateway.server import serve


def main() -> None:
    """Entry point (also the `switchboard-gateway` console script)."""
    run_service("gateway", load_gateway_settings, serve)


if __name__ == "__main__":
    main()
