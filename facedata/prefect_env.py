"""Prefect settings for running without a server on a closed network.

Must run before `prefect` is imported. Values the user has already set win, so pointing
PREFECT_API_URL at a real server (or changing any other setting) still works.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

QUIET_DEFAULTS = {
    # Without these the ephemeral server tries to send telemetry out of a closed network.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_UI_ENABLED": "false",
    "PREFECT_TELEMETRY_ENABLE_RESOURCE_METRICS": "false",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    # A cold SQLite migration has exceeded the 20 s default once.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    # Send our stage logs to the Prefect run logs too.
    "PREFECT_LOGGING_EXTRA_LOGGERS": "facedata",
}


def configure_prefect(home: Path | None = None) -> None:
    if "prefect" in sys.modules:
        return  # settings are read at import; too late to change them here
    for key, value in QUIET_DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("PREFECT_HOME", str(home or Path.home() / ".cache" / "facedata" / "prefect"))
    # The ephemeral server does not create its home; without it the server never comes up.
    Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)


def is_loopback(url: str | None) -> bool:
    """Whether a server address (a URL, or host:port) is on this machine only: a task runner's
    workers on other hosts could not reach a Prefect API there."""
    host = urlsplit(url if url and "://" in url else f"tcp://{url}").hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")
