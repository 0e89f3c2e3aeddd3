"""How does a machine off the cluster use the registry? With our CA and an auth file.

    write_client_bundle(Path("client"), ["192.168.86.201:9005"], ca_pem, creds)
    # skopeo copy --authfile client/auth.json --cert-dir client ...

`ca.crt` is what `--cert-dir` (and docker's /etc/docker/certs.d/HOST:PORT/) reads;
`auth.json` is the containers-auth format that skopeo, podman and docker read.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

from crflow.files import ensure_dir, write_atomic
from crflow.tasks.credentials import Credentials
from crflow.undo import undo, undoable


def write_client_bundle(out_dir: Path, servers: list[str], ca_pem: str, creds: Credentials) -> Path:
    ensure_dir(out_dir)
    write_atomic(out_dir / "ca.crt", ca_pem.encode(), 0o644)
    write_atomic(out_dir / "auth.json", creds.auth_json(servers).encode(), 0o600)
    return out_dir


@task(task_run_name="client files in {out_dir}")
def save_client_bundle(out_dir: Path, servers: list[str], ca_pem: str, creds: Credentials) -> Path:
    """ca.crt and auth.json (0600) for clients of `servers` (the previous auth.json comes back on rollback)."""
    auth = out_dir / "auth.json"
    before = auth.read_bytes() if auth.exists() else None
    with undoable() as on_undo:
        write_client_bundle(out_dir, servers, ca_pem, creds)
        on_undo(lambda: write_atomic(auth, before, 0o600) if before else auth.unlink(missing_ok=True))
    return out_dir


save_client_bundle.on_rollback(undo)
