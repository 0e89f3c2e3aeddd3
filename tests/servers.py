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


def _pytest_alive(pid: int) -> bool:
    try:
        return b"pytest" in Path(f"/proc/{pid}/cmdline").read_bytes()  # (not a pid since reused)
    except OSError:
        return False


def reap_killed_sessions(base: Path) -> list[str]:
    """Stop what test sessions killed before their teardown left running (a registry, a Prefect
    server, moto): every process whose working folder or output lies in the folder of a session
    under `base` (pytest's pytest-N) that is over. pytest's .lock in that folder names the session's
    pid, and is gone once it ended. Returns "pid command" of each process stopped."""
    over = []
    for session in base.glob("pytest-[0-9]*"):
        try:
            owner = int((session / ".lock").read_text())
        except FileNotFoundError:
            owner = None  # ended, its teardown done: anything of it still running is left over
        except (OSError, ValueError):
            continue
        if owner is None or not _pytest_alive(owner):
            over.append(f"{session}/")
    stopped = []
    for proc in Path("/proc").glob("[0-9]*") if over else ():
        places = []
        for link in ("cwd", "fd/1", "fd/2"):
            with contextlib.suppress(OSError):
                places.append(os.readlink(proc / link))
        if any(place.startswith(folder) for place in places for folder in over):
            with contextlib.suppress(OSError):
                command = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                os.kill(int(proc.name), signal.SIGKILL)
                stopped.append(f"{proc.name} {command}")
    return stopped


def wait_http(url: str, timeout: float, what: str, process: subprocess.Popen, verify: str | bool = True) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2, verify=ssl.create_default_context(cafile=verify) if isinstance(verify, str)
                         else verify).status_code < 500:
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


@contextlib.contextmanager
def token_upstream(folder: Path, user: str, password: str):
    """An upstream registry that asks for a login as Docker Hub does, on loopback: Debian's
    docker-registry with token auth and TLS, and a token service of the test's own. EMULATED:
    Docker Hub's auth service; a few lines here issue the ES256 JWT distribution verifies, to
    `user`:`password` only. Yields (its address, a folder holding its CA as ca.crt, a list of
    the token service's answers: 200 or 401 each)."""
    import base64
    import json
    import urllib.parse
    import uuid
    from http.server import BaseHTTPRequestHandler

    import yaml
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    from crflow.tasks.pki import new_ca

    folder.mkdir(parents=True)
    ca, tls = loopback_tls(folder, "upstream test CA")
    client = folder / "client"
    client.mkdir()
    (client / "ca.crt").write_text(ca.cert_pem)
    signer = new_ca("token signer", days=1, key_algorithm="ecdsa-p256")
    (folder / "signer.crt").write_text(signer.cert_pem)
    key = serialization.load_pem_private_key(signer.key_pem.get_secret_value().encode(), None)
    chain = [base64.b64encode(x509.load_pem_x509_certificate(signer.cert_pem.encode())
                              .public_bytes(serialization.Encoding.DER)).decode()]
    expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    answers: list[int] = []

    def b64url(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    class Tokens(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            if self.headers.get("Authorization") != expected:
                answers.append(401)
                self.send_response(401)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            access = []
            for scope in urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query).get("scope", []):
                kind, _, rest = scope.partition(":")  # repository:team/app:pull,push
                name, _, actions = rest.rpartition(":")
                access.append({"type": kind, "name": name, "actions": actions.split(",")})
            now = int(time.time())
            claims = {"iss": "crflow-test", "sub": user, "aud": "upstream", "exp": now + 300, "nbf": now - 10,
                      "iat": now, "jti": uuid.uuid4().hex, "access": access}
            signed = (f"{b64url(json.dumps({'typ': 'JWT', 'alg': 'ES256', 'x5c': chain}).encode())}."
                      f"{b64url(json.dumps(claims).encode())}")
            r, s = decode_dss_signature(key.sign(signed.encode(), ec.ECDSA(hashes.SHA256())))
            token = f"{signed}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"
            body = json.dumps({"token": token, "access_token": token, "expires_in": 300}).encode()
            answers.append(200)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    with http_server(Tokens, tls) as tokens:
        port, data = free_port(), folder / "data"
        data.mkdir()
        (folder / "config.yml").write_text(yaml.safe_dump({
            "version": 0.1, "storage": {"filesystem": {"rootdirectory": str(data)}},
            "http": {"addr": f"127.0.0.1:{port}", "secret": uuid.uuid4().hex,
                     "tls": {"certificate": str(folder / "tls.crt"), "key": str(folder / "tls.key")}},
            "auth": {"token": {"realm": f"{tokens}/token", "service": "upstream", "issuer": "crflow-test",
                               "rootcertbundle": str(folder / "signer.crt")}}}))
        process = start_server(["docker-registry", "serve", str(folder / "config.yml")], folder / "registry.log")
        try:
            wait_http(f"https://127.0.0.1:{port}/v2/", 60, "the token upstream", process, str(client / "ca.crt"))
            yield f"127.0.0.1:{port}", client, answers
        finally:
            stop_server(process)
