"""This machine trusts the registry: the files each container runtime reads for a registry's
CA, written for every address the certificate names, and undone exactly.

    lines = trust(site, "containers", root=Path("/"))      # /etc/containers/certs.d/HOST:PORT/ca.crt
    lines = trust(site, "containers", root=Path("/"), remove=True)

The certs.d layouts are written by the chart's node-trust script, the one the DaemonSet runs
on every node, so a builder machine and a node get exactly the same files. What was trusted is
recorded in the state directory, so `crflow uninstall` can undo it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from crflow.chart import NODE_TRUST_SCRIPT
from crflow.errors import CrflowError, NotInstalled
from crflow.files import write_atomic
from crflow.settings import Site


@dataclass(frozen=True)
class Layout:
    directory: str  # under the root
    format: str  # the node-trust script's FORMAT, or "system"


RUNTIMES = {
    "containerd": Layout("/etc/containerd/certs.d", "containerd"),
    "docker": Layout("/etc/docker/certs.d", "certs"),
    "containers": Layout("/etc/containers/certs.d", "certs"),  # podman, skopeo, buildah
    "system": Layout("/usr/local/share/ca-certificates", "system"),  # update-ca-certificates (Debian, WSL)
}
RECORD = "trusted.json"  # in state_dir: [[runtime, root], ...]


def trust(site: Site, runtime: str, root: Path, remove: bool = False) -> list[str]:
    """Write (or, with `remove`, undo) the files `runtime` reads to trust the site's CA, under
    `root`; returns what was done, one line each."""
    layout = RUNTIMES.get(runtime)
    if layout is None:
        raise CrflowError(f"--runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")
    if not root.is_dir():
        raise CrflowError(f"--root {root}: not a directory")
    ca_file = site.state_dir / "client" / "ca.crt"
    if not remove and not ca_file.is_file():
        raise NotInstalled(f"no CA for registry {site.release} yet: run crflow install -c SITE first")
    directory = root / layout.directory.lstrip("/")
    try:
        if layout.format == "system":
            lines = _system(site, directory, ca_file, root, remove)
        else:
            lines = _certs_d(site, directory, ca_file, layout.format, remove)
    except PermissionError as err:
        raise CrflowError(f"cannot write {err.filename or directory}: permission denied; run as root, "
                          "or give --root") from None
    _record(site, runtime, root, remove)
    return lines


def _certs_d(site: Site, directory: Path, ca_file: Path, fmt: str, remove: bool) -> list[str]:
    if remove and not directory.is_dir():
        return []
    with tempfile.TemporaryDirectory(prefix="crflow-trust-") as scratch:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOST_DIR": str(directory),
               "CA_FILE": str(ca_file), "ADDRESSES": " ".join(site.registry.servers), "FORMAT": fmt,
               "OWNER": owner(site), "STATE_DIR": scratch, "MODE": "once-remove" if remove else "once"}
        result = subprocess.run(["/bin/sh", str(NODE_TRUST_SCRIPT)], env=env, capture_output=True, text=True)
    lines = [line.removeprefix("node-trust: ") for line in result.stdout.splitlines()]
    if result.returncode != 0:
        denied = next((line for line in lines + result.stderr.splitlines() if "ermission denied" in line), None)
        if denied:
            raise PermissionError(13, "permission denied", str(directory))
        raise CrflowError(f"could not write the trust files in {directory}: {(lines or ['(no output)'])[-1]}")
    return lines


def _system(site: Site, directory: Path, ca_file: Path, root: Path, remove: bool) -> list[str]:
    path = directory / f"crflow-{site.release}.crt"
    if remove:
        if not path.exists():
            return []
        path.unlink()
        lines = [f"removed {path}"]
    else:
        if not directory.is_dir():
            directory.mkdir(parents=True)
            directory.chmod(0o755)  # public, whatever crflow's umask
        changed = write_atomic(path, ca_file.read_bytes(), 0o644)
        lines = [f"wrote {path}" if changed else f"{path} is current"]
    if root == Path("/"):  # the system's bundle is rebuilt only on this machine, never under a prefix
        if shutil.which("update-ca-certificates") is None:
            raise CrflowError(f"{path} is in place, but there is no update-ca-certificates here to rebuild "
                              "the system's CA bundle; install the ca-certificates package")
        subprocess.run(["update-ca-certificates"], check=True, capture_output=True)
        lines.append("ran update-ca-certificates")
    return lines


def owner(site: Site) -> str:
    """The mark on what `crflow trust` wrote: only directories carrying it are changed or removed."""
    return f"crflow-trust/{site.release}"


def _record(site: Site, runtime: str, root: Path, remove: bool) -> None:
    path = site.state_dir / RECORD
    done = {tuple(entry) for entry in json.loads(path.read_text())} if path.exists() else set()
    entry = (runtime, str(root.resolve()))
    done = done - {entry} if remove else done | {entry}
    if site.state_dir.is_dir():
        write_atomic(path, json.dumps(sorted(done)).encode(), 0o600)


def trusted(site: Site) -> list[tuple[str, Path]]:
    """(runtime, root) of everything `crflow trust` wrote for this site and did not undo."""
    path = site.state_dir / RECORD
    return [(runtime, Path(root)) for runtime, root in json.loads(path.read_text())] if path.exists() else []
