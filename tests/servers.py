"""Starting and stopping the real servers the tests and benchmarks talk to, on loopback."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent


# Test ports come from below the kernel's ephemeral range (32768-60999 by default): outgoing
# connections take ports from that range at any moment, so a port picked there can be taken
# between the pick and the server's bind. Below it only listeners take ports, and each one
# this suite hands out is locked (flock, released when the process ends) so that parallel
# workers and concurrent suites never hand out the same one.
PORT_RANGE = (20000, 30000)
# A test cluster's NodePorts (kube-apiserver's default range is 30000-32767): apart from the
# servers' ports, so a Service never captures a port another test's server holds.
NODE_PORTS = (30000, 32768)
PORT_LOCKS = Path(os.environ.get("TMPDIR", "/tmp")) / "crflow-test-ports"
_held: list = []
_next: dict[tuple[int, int], int] = {}


def _bindable(port: int) -> bool:
    for host in ("127.0.0.1", "127.0.0.2"):  # the tests' Service addresses live on both
        with socket.socket() as probe:
            try:
                probe.bind((host, port))
            except OSError:
                return False
    return True


def free_port(port_range: tuple[int, int] = PORT_RANGE) -> int:
    """A port no listener has, outside the ephemeral range, reserved for this process."""
    low, high = port_range
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    high = min(high, ephemeral_low)
    PORT_LOCKS.mkdir(mode=0o777, exist_ok=True)
    start = _next.setdefault(port_range, low + (os.getpid() * 97) % (high - low))
    for step in range(high - low):
        port = low + (start - low + step) % (high - low)
        lock = open(PORT_LOCKS / str(port), "a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            continue
        if _bindable(port):
            _held.append(lock)
            _next[port_range] = low + (port + 1 - low) % (high - low)
            return port
        lock.close()
    raise RuntimeError(f"no free port in {low}-{high}")


def node_port() -> int:
    """A NodePort for a test's Service on the test cluster, held as free_port holds its ports."""
    return free_port(NODE_PORTS)


def start_server(argv: list[str], log: Path, env: dict | None = None, cwd: Path | None = None) -> subprocess.Popen:
    """A detached server process (its own session, so it can be stopped as a group)."""
    with open(log, "ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=cwd, start_new_session=True)


def stop_server(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(process.pid, signal.SIGKILL)


def wait_http(url: str, timeout: float, what: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{what} did not answer at {url} within {timeout} s")


def start_prefect_server(home: Path) -> tuple[subprocess.Popen, str]:
    """A real Prefect server with its database under `home`; returns it and its API URL."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    process = start_server([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                           home / "server.log", env)
    url = f"http://127.0.0.1:{port}/api"
    wait_http(f"{url}/health", 180, "the Prefect server", process)
    return process, url


def loopback_tls(folder: Path, name: str):
    """A CA of the test's own and a server TLS context for 127.0.0.1 that it signed: (ca, context)."""
    from crflow.tasks.pki import new_ca, new_server_cert

    ca = new_ca(name, days=1, key_algorithm="ecdsa-p256")
    cert = new_server_cert(ca, ["127.0.0.1"], [], days=1, key_algorithm="ecdsa-p256")
    (folder / "tls.crt").write_text(cert.cert_pem)
    (folder / "tls.key").write_text(cert.key_pem.get_secret_value())
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "tls.crt", folder / "tls.key")
    return ca, context


@contextlib.contextmanager
def http_server(handler, tls: ssl.SSLContext | None = None):
    """A small real HTTP(S) server on loopback, in a thread, answering with `handler`; yields its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
