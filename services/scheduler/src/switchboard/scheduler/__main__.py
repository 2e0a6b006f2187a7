"""Entry point: `python -m switchboard.scheduler` (or the `switchboard-scheduler` script)."""

from __future__ import annotations

from switchboard.common.experts_config import ExpertsConfigError, load_experts_config
from switchboard.common.service import run_service
from switchboard.common.settings import SettingsError
from switchboard.scheduler.app import SchedulerApp
from switchboard.scheduler.config import SchedulerSettings, load_scheduler_settings


def load() -> SchedulerSettings:
    """Settings plus a check of the experts config, so a bad file fails at start with one clear line."""
    settings = load_scheduler_settings()
    try:
        specs = load_experts_config(settings.experts_config)
    except ExpertsConfigError as exc:
        raise SettingsError(f"SWITCHBOARD_EXPERTS_CONFIG: {exc}") from None
    if settings.allocator != "off":  # budget and bounds must fit the declared pools
        settings.allocation_config([spec.name for spec in specs])
    return settings


async def serve(settings: SchedulerSettings) -> int:
    """Run the scheduler until SIGTERM/SIGINT; returns the exit code."""
    specs = load_experts_config(settings.experts_config)
    return await SchedulerApp(settings, [spec.name for spec in specs], slos={s.name: s.slo for s in specs}).run()


def main() -> None:
    """Console entry point."""
    run_service("scheduler", load, serve)


if __name__ == "__main__":
    main()
