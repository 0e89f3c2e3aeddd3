"""A real containerd for `crflow trust --runtime containerd` (Debian's `containerd` package), started by the
tests as root with its own root, state and socket under temporary directories: no system
service is touched. Its CRI `config_path` is the node's certs.d directory, and every pull
goes through `ctr images pull --hosts-dir` on that same directory, so a node trusts the
registry only through the files written there.

    runtime = Containerd(work_dir, certs_d)        # raises Unavailable(why) where it cannot run
    runtime.pull("127.0.0.1:5000/repo@sha256:...", "user", "password")  # None, or containerd's message
    runtime.stop()
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path


class Unavailable(Exception):
    """containerd cannot run here; the message says why."""


class Containerd:
    def __init__(self, work: Path, certs_d: Path, system_cas: Path | None = None):
        if shutil.which("containerd") is None or shutil.which("ctr") is None:
            raise Unavailable("no containerd/ctr on PATH (scripts/setup.sh --test installs Debian's containerd)")
        if os.geteuid() != 0:
            raise Unavailable("containerd needs root (the CI runs the suite as root)")
        self.certs_d = certs_d
        # ctr resolves and pulls itself: a folder of CAs it takes as the system's (a public upstream's).
        self.env = {**os.environ, "SSL_CERT_DIR": f"/etc/ssl/certs:{system_cas}"} if system_cas else None
        # The socket path must stay under 108 bytes; the test's tmp_path may not.
        self.run_dir = Path(tempfile.mkdtemp(prefix="ctr-", dir="/tmp"))
        self.socket = self.run_dir / "sock"
        work.mkdir(parents=True, exist_ok=True)
        config = work / "config.toml"
        config.write_text(f'''version = 2
root = "{work / 'root'}"
state = "{self.run_dir / 'state'}"
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.run_dir / 'ttrpc'}"
[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "{certs_d}"
''')
        self.log = (work / "containerd.log").open("wb")
        self.process = subprocess.Popen(["containerd", "--config", str(config)], stdout=self.log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while self._ctr("version").returncode != 0:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = (work / "containerd.log").read_text(errors="replace")[-400:]
                raise Unavailable(f"containerd did not start: {tail}")
            time.sleep(0.05)

    def _ctr(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["ctr", "--address", str(self.socket), "--namespace", "k8s.io", *args],
                              capture_output=True, text=True, timeout=120, env=self.env)

    def pull(self, image: str, user: str | None, password: str | None) -> str | None:
        """Pull `image` as the CRI would for a pod: None when it is here, else containerd's own
        last line (x509, 401 Unauthorized, 400 Bad Request...)."""
        login = ["--user", f"{user}:{password}"] if user is not None else []
        result = self._ctr("images", "pull", "--hosts-dir", str(self.certs_d), *login, image)
        if result.returncode == 0:
            return None
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        return lines[-1] if lines else f"ctr exited {result.returncode}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)
