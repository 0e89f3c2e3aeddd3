"""Which Prefect server do crflow's runs report to?

Without PREFECT_API_URL, every Prefect process starts a temporary server of its own
(9-16 s, ~200 MB). crflow instead keeps one local server, started on first use and left
running, with its database under $CRFLOW_HOME/prefect. Set PREFECT_API_URL to use another.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from crflow.errors import CrflowError

DEFAULT_PORT = 4200


def crflow_home() -> Path:
    return Path(os.environ.get("CRFLOW_HOME", "~/.local/share/crflow")).expanduser()


def _port() -> int:
    return int(os.environ.get("CRFLOW_PREFECT_PORT", DEFAULT_PORT))


def configure() -> bool:
    """Point this process's Prefect at crflow's local server; False if the user chose another.
    Call it before prefect is imported: Prefect reads its settings once, at import."""
    if os.environ.get("PREFECT_API_URL") and "CRFLOW_OWN_PREFECT" not in os.environ:
        return False
    home = crflow_home() / "prefect"
    home.mkdir(parents=True, exist_ok=True)  # Prefect makes its home without parents, and warns
    os.environ["PREFECT_HOME"] = str(home)
    os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{_port()}/api"
    os.environ["CRFLOW_OWN_PREFECT"] = "1"  # so a second call (and child processes) know it is ours
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    return True


def ui_url() -> str:
    return os.environ.get("PREFECT_API_URL", f"http://127.0.0.1:{_port()}/api").removesuffix("/api")


def healthy(timeout: float = 2) -> bool:
    # urllib, not httpx: `crflow status` asks this, and httpx's import alone is ~70 ms
    try:
        with urllib.request.urlopen(f"{os.environ['PREFECT_API_URL']}/health", timeout=timeout) as answer:
            return answer.status == 200
    except (OSError, ValueError):
        return False


def _pidfile() -> Path:
    return crflow_home() / "prefect" / "server.pid"


def ensure_server(wait: float = 120) -> None:
    """Start crflow's Prefect server unless it (or the user's PREFECT_API_URL) answers."""
    ours = configure()
    if healthy():
        return
    if not ours:
        raise CrflowError(f"the Prefect server at PREFECT_API_URL={os.environ['PREFECT_API_URL']} is not answering")
    home = Path(os.environ["PREFECT_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    prefect = Path(sys.executable).parent / "prefect"
    with open(home / "server.log", "ab") as log:
        process = subprocess.Popen(
            [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(_port())],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # a server for later runs too, not a child of this one
        )
    _pidfile().write_text(str(process.pid))
    print(f"Starting the Prefect server at {ui_url()} (log: {home / 'server.log'}) ...", file=sys.stderr)
    deadline = time.monotonic() + wait
    while not healthy():
        if process.poll() is not None or time.monotonic() > deadline:
            raise CrflowError(f"the Prefect server did not start; see {home / 'server.log'}")
        time.sleep(0.5)


def stop_server() -> bool:
    """Stop the Prefect server crflow started; return whether one was running."""
    configure()
    try:
        pid = int(_pidfile().read_text())
        os.killpg(pid, 15)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return False
    deadline = time.monotonic() + 20
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    _pidfile().unlink(missing_ok=True)
    return True
