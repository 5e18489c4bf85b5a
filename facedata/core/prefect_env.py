"""Prefect settings for running without a server on a closed network.

Must run before `prefect` is imported. Values the user has already set win, so pointing
PREFECT_API_URL at a real server (or changing any other setting) still works.
"""

from __future__ import annotations

import os
import subprocess
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
    # Send our stage logs to the Prefect run logs too; the lines logged outside a flow run (before it
    # starts, after it ends) go to the terminal only, without a UserWarning each.
    "PREFECT_LOGGING_EXTRA_LOGGERS": "facedata",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
}


def configure_prefect(home: Path | None = None) -> None:
    if "prefect" in sys.modules:
        return  # settings are read at import; too late to change them here
    for key, value in QUIET_DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("PREFECT_HOME", str(home or Path.home() / ".cache" / "facedata" / "prefect"))
    # The ephemeral server does not create its home; without it the server never comes up.
    Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)


# Runs in its own small process: waits for EOF on stdin (the pipe's write end lives only in the
# process that started the server, so EOF means that process has ended), then stops the server
# unless it is gone already (its PID then checked not to name another program, where /proc exists).
_WATCHDOG = """
import os, signal, sys
sys.stdin.buffer.read()
try:
    with open("/proc/%(pid)d/cmdline", "rb") as f:
        ours = b"prefect.server.api.server" in f.read()
except FileNotFoundError:
    ours = not os.path.isdir("/proc")
except OSError:
    ours = False
if ours:
    try:
        os.kill(%(pid)d, signal.SIGTERM)
    except ProcessLookupError:
        pass
"""
_watchdog_pipes: dict[int, int] = {}  # server PID -> write end of its watchdog's stdin


def start_api_server() -> None:
    """Start Prefect's temporary API server now, unless the user set PREFECT_API_URL, and tie its
    life to this process.

    Prefect would start it on the flow's first call and stop it at exit; a process killed outright
    (kill -9, the OOM killer) never gets there, and the server then runs on for good (~230 MiB). A
    watchdog process stops it when this process ends, however it ends. Started here rather than
    lazily, its URL goes into the environment for the workers of `runner.kind: process`, which
    would otherwise each start a server of their own.
    """
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return  # the user's own server
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the same instance the flow's client uses
    server.start()
    os.environ["PREFECT_API_URL"] = server.api_url
    pid = server.server_process.pid
    if pid not in _watchdog_pipes:
        read_end, write_end = os.pipe()  # not inherited by the processes this one starts
        # Its own session: a Ctrl-C in the terminal goes to the run, not to the watchdog.
        subprocess.Popen([sys.executable, "-c", _WATCHDOG % {"pid": pid}], stdin=read_end,
                         start_new_session=True)
        os.close(read_end)
        _watchdog_pipes[pid] = write_end


def is_loopback(url: str | None) -> bool:
    """Whether a server address (a URL, or host:port) is on this machine only: a task runner's
    workers on other hosts could not reach a Prefect API there."""
    host = urlsplit(url if url and "://" in url else f"tcp://{url}").hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")
