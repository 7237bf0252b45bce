"""Process logging from the settings: every process (portal, worker, trainer, CLI) logs at ``TRIAGE_LOG_LEVEL``."""

from __future__ import annotations

import logging

from core.config import Settings

#: One line per record: time, level, process, logger, message.
LOG_FORMAT = "%(asctime)s %(levelname)s [%(processName)s] %(name)s: %(message)s"


def log_level(settings: Settings, unset_default: str | None = None) -> str:
    """The level this process logs at: ``TRIAGE_LOG_LEVEL``, or ``unset_default`` when the variable is not set."""
    if unset_default is not None and "log_level" not in settings.model_fields_set:
        return unset_default
    return settings.log_level


def configure_logging(settings: Settings, unset_default: str | None = None, level: str | None = None) -> None:
    """Log records at the process's level and above to stderr, in :data:`LOG_FORMAT`.

    Args:
        settings: the process's settings (``log_level``).
        unset_default: the level when ``TRIAGE_LOG_LEVEL`` is not set (the admin CLI: WARNING, so
            the output it prints stays readable).
        level: an explicit level that wins over both (the trainer's ``--verbose``).

    The root logger's level is set even when a handler exists already (a server's or a test
    runner's), so the setting is honoured there too.
    """
    chosen = level or log_level(settings, unset_default)
    logging.basicConfig(level=chosen, format=LOG_FORMAT)
    logging.getLogger().setLevel(chosen)
