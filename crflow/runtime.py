"""Which Prefect server do crflow's runs report to?

Without PREFECT_API_URL, every Prefect process starts a temporary server of its own
(9-16 s, ~200 MB). crflow instead keeps one local server, started on first use and left
running, with its database under $CRFLOW_HOME/prefect. Set PREFECT_API_URL to use another.

Anyone who can reach a Prefect server's API can read every block's secrets (the alert
webhook's token) and start runs. So the server crflow starts asks for Prefect's own basic
auth (PREFECT_SERVER_API_AUTH_STRING), with a credential made on first use and kept 0600 in
$CRFLOW_HOME/prefect/api-auth; crflow's processes send it (PREFECT_API_AUTH_STRING).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from crflow.config import OWN_PREFECT, environment
from crflow.errors import CrflowError
from crflow.files import create_once, private_dir, write_atomic

DEFAULT_PORT = 4200


def crflow_home() -> Path:
    return environment().home.expanduser()


def _port() -> int:
    return environment().prefect_port


def configure() -> bool:
    """Point this process's Prefect at crflow's local server; False if the user chose another.
    Call it before prefect is imported: Prefect reads its settings once, at import."""
    if os.environ.get("PREFECT_API_URL") and not environment().own_prefect:
        return False
    home = crflow_home() / "prefect"
    private_dir(home)  # Prefect makes its home without parents, and warns; its database is crflow's alone
    os.environ["PREFECT_HOME"] = str(home)
    os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{_port()}/api"
    os.environ["PREFECT_API_AUTH_STRING"] = _auth_string()
    os.environ[OWN_PREFECT] = "1"  # so a second call (and child processes) know it is ours
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    return True


def ui_url() -> str:
    return os.environ.get("PREFECT_API_URL", f"http://127.0.0.1:{_port()}/api").removesuffix("/api")


def _answers(path: str, timeout: float) -> bool:
    """GET PREFECT_API_URL/path without a credential answers 200. urllib, not httpx: `crflow
    status` asks this, and httpx's import alone is ~70 ms."""
    try:
        with urllib.request.urlopen(f"{os.environ['PREFECT_API_URL']}/{path}", timeout=timeout) as answer:
            return answer.status == 200
    except (OSError, ValueError):
        return False


def healthy(timeout: float = 2) -> bool:
    return _answers("health", timeout)  # open to all, as Prefect's auth leaves it


def _pidfile() -> Path:
    return crflow_home() / "prefect" / "server.pid"


def auth_file() -> Path:
    """Where the local server's credential is kept (user:password, 0600)."""
    return crflow_home() / "prefect" / "api-auth"


def _auth_string() -> str:
    """The local server's credential, made on first use."""
    path = auth_file()
    try:  # every command reads it: made (and fsynced) once, not tried again at each start
        return path.read_text().strip()
    except FileNotFoundError:
        private_dir(path.parent)
        create_once(path, f"crflow:{secrets.token_urlsafe(24)}".encode(), 0o600)
        return path.read_text().strip()


def open_to_anyone(timeout: float = 2) -> bool:
    """The server answers its API without a credential (one an earlier crflow started)."""
    return _answers("admin/version", timeout)


def ensure_server(wait: float = 120) -> None:
    """Start crflow's Prefect server unless it (or the user's PREFECT_API_URL) answers."""
    ours = configure()
    if healthy():
        if ours and open_to_anyone():
            print(f"crflow: warning: the Prefect server at {ui_url()} asks for no credential (an earlier crflow started "
                  "it): anyone on this machine can read its blocks; restart it with crflow server stop", file=sys.stderr)
        return
    if not ours:
        raise CrflowError(f"the Prefect server at PREFECT_API_URL={os.environ['PREFECT_API_URL']} is not answering")
    home = Path(os.environ["PREFECT_HOME"])
    prefect = Path(sys.executable).parent / "prefect"
    with open(home / "server.log", "ab") as log:
        process = subprocess.Popen(
            [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(_port())],
            env={**os.environ, "PREFECT_SERVER_API_AUTH_STRING": os.environ["PREFECT_API_AUTH_STRING"]},
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # a server for later runs too, not a child of this one
        )
    write_atomic(_pidfile(), str(process.pid).encode(), 0o600)
    print(f"Starting the Prefect server at {ui_url()} (log: {home / 'server.log'}) ...", file=sys.stderr)
    deadline = time.monotonic() + wait
    while not healthy():
        if process.poll() is not None or time.monotonic() > deadline:
            raise CrflowError(f"the Prefect server did not start; see {home / 'server.log'}")
        time.sleep(0.5)


def deployed_sites_file() -> Path:
    return crflow_home() / "deployed-sites.json"


def register_site(site_file: Path) -> None:
    """`crflow deploy` bound deployments to this site file: runs on this machine may use it."""
    sites = set(deployed_sites() or [])
    private_dir(crflow_home())
    write_atomic(deployed_sites_file(), json.dumps(sorted(sites | {str(site_file.resolve())})).encode(), 0o600)


def deployed_sites() -> list[str] | None:
    """The site files `crflow deploy` registered on this machine (None: it never ran here, as
    in a work pool's Job, where the deployment's own parameters are the check)."""
    try:
        return json.loads(deployed_sites_file().read_text())
    except FileNotFoundError:
        return None


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
