"""The test bed cleans up after sessions killed before their teardown (tests/servers.py): the
servers they started are stopped when the next session starts, and a running session's are
not. REAL processes; the sessions are folders laid out as pytest leaves them (pytest-N with a
.lock naming the session's pid, removed when it ends), the killed one's naming a pid now gone.
"""

from __future__ import annotations

import subprocess
import sys

from servers import reap_killed_sessions, start_server, stop_server


def test_the_servers_of_a_killed_or_ended_session_are_stopped_and_a_running_sessions_are_not(tmp_path):
    base = tmp_path / "pytest-of-me"
    gone = subprocess.Popen(["true"])
    gone.wait()  # its pid is free: the killed session's
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", "pytest"])  # a live session
    owners = {"killed": gone.pid, "running": running.pid, "ended": None}
    servers = {}
    try:
        for n, (name, owner) in enumerate(owners.items()):
            folder = base / f"pytest-{n}" / "popen-gw0" / "test_x0"
            folder.mkdir(parents=True)
            if owner is not None:
                (base / f"pytest-{n}" / ".lock").write_text(str(owner))
            servers[name] = start_server(["sleep", "300"], folder / "server.log")
        stopped = reap_killed_sessions(base)
        for name in ("killed", "ended"):
            assert servers[name].wait(timeout=30) == -9, name
        assert servers["running"].poll() is None and running.poll() is None
        assert sorted(stopped) == sorted(f"{servers[name].pid} sleep" for name in ("killed", "ended"))
        assert reap_killed_sessions(base) == []  # nothing more to stop
    finally:
        for server in servers.values():
            if server.poll() is None:
                stop_server(server)
        running.kill()
        running.wait()
