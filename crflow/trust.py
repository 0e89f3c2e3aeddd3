"""This machine trusts the registry: the files each container runtime reads for a registry's
CA, written for every address the certificate names, and undone exactly.

    lines = trust(site, "containers", root=Path("/"))      # /etc/containers/certs.d/HOST:PORT/ca.crt
    lines = trust(site, "containers", root=Path("/"), remove=True)

The certs.d files are made by the chart's node-trust script, the one the DaemonSet runs on
every node, so a builder machine and a node get exactly the same files. The script writes
them into a private scratch folder; crflow then puts them under `root` itself, through
crflow/files.py: nothing below `root` is followed, so a link planted in a certs.d folder
cannot send a root-owned write elsewhere.

Each site records the files it wrote (runtime, root and paths, in its state directory), and
`--remove` takes away exactly those: two sites that share a release name, on other
addresses, never touch each other's files. A certs.d folder someone else wrote is left alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from crflow.chart import NODE_TRUST_SCRIPT, mirror_routes
from crflow.errors import CrflowError, NotInstalled
from crflow.files import opened_dir, read_bytes, write_atomic
from crflow.layout import note_made
from crflow.oci import read_login
from crflow.settings import Site

SCRIPT_SECONDS = 30  # the script copies two small files per address
UPDATE_SECONDS = 120  # update-ca-certificates rebuilds the bundle (and Java's, where installed)
MARK = ".crflow-owner"  # the node-trust script's mark on a certs.d folder it wrote


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


def trust(site: Site, runtime: str, root: Path, remove: bool = False) -> list[str]:
    """Write (or, with `remove`, undo) the files `runtime` reads to trust the site's CA, under
    `root`; returns what was done, one line each."""
    layout = RUNTIMES.get(runtime)
    if layout is None:
        raise CrflowError(f"--runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")
    if not root.is_dir():
        raise CrflowError(f"--root {root}: not a directory")
    root = Path(os.path.realpath(root))
    ca_file = site.state.client / "ca.crt"
    if not remove and not ca_file.is_file():
        raise NotInstalled(f"no CA for registry {site.release} yet: run crflow install -c SITE first")
    directory = root / layout.directory.lstrip("/")
    records = _recorded(site)
    recorded = records.get((runtime, str(root)))
    try:
        if remove:
            lines = _remove(site, root, recorded if recorded is not None else _default_files(
                site, layout, legacy=(runtime, str(root)) in records))
            if layout.format == "system" and lines:
                lines += _update_system_bundle(root)
            files: list[str] = []
        else:
            wanted = _certs_d_files(site, ca_file, layout) if layout.format != "system" else \
                {f"{layout.directory.lstrip('/')}/{system_file(site)}": (ca_file.read_bytes(), 0o644)}
            lines, files = _write(site, root, wanted)
            # What this site wrote before and no longer wants (an address that left the list).
            lines += _remove(site, root, [f for f in recorded or [] if f not in files])
            if layout.format == "system":
                lines += _update_system_bundle(root)
    except PermissionError as err:
        raise CrflowError(f"cannot write {err.filename or directory}: permission denied; run as root, "
                          "or give --root") from None
    _record(site, runtime, root, files)
    return lines


def system_file(site: Site) -> str:
    """The system bundle's file for this site: by release and address, so two sites never share one."""
    return f"crflow-{site.release}-{site.registry.servers[0].replace(':', '_').strip('[]')}.crt"


def owner(site: Site) -> str:
    """The mark on what `crflow trust` wrote: only folders carrying it are changed or removed."""
    return f"crflow-trust/{site.release}"


def mirror_wiring(site: Site, scratch: Path) -> dict[str, str]:
    """The node-trust script's MIRRORS and MIRROR_LOGIN_DIR for the site's mirrors ({} without
    any), the login (the one the client files hold) put in `scratch` as the DaemonSet's Secret
    volume holds it."""
    if not site.mirrors:
        return {}
    user, password = read_login(site.state.client / "auth.json", site.registry.servers[0])
    login = scratch / "mirror-login"
    login.mkdir(mode=0o700)
    for name, value in (("username", user), ("password", password)):
        write_atomic(login / name, value.encode(), 0o600, within=scratch)
    return {"MIRRORS": " ".join(mirror_routes(site)), "MIRROR_LOGIN_DIR": str(login)}


def _certs_d_files(site: Site, ca_file: Path, layout: Layout) -> dict[str, tuple[bytes, int]]:
    """Path under the root -> (content, mode): what the node-trust script writes for every
    address (and, for containerd, every mirror's prefix)."""
    with tempfile.TemporaryDirectory(prefix="crflow-trust-") as scratch:
        hosts = Path(scratch) / "hosts"
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOST_DIR": str(hosts), "CA_FILE": str(ca_file),
               "ADDRESSES": " ".join(site.client_servers), "FORMAT": layout.format, "OWNER": owner(site),
               "STATE_DIR": str(Path(scratch) / "state"), "MODE": "once",
               **(mirror_wiring(site, Path(scratch)) if layout.format == "containerd" else {})}
        try:
            result = subprocess.run(["/bin/sh", str(NODE_TRUST_SCRIPT)], env=env, capture_output=True, text=True,
                                    timeout=SCRIPT_SECONDS, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise CrflowError(f"the node-trust script did not finish in {SCRIPT_SECONDS} s") from None
        if result.returncode != 0:
            lines = (result.stdout + result.stderr).strip().splitlines() or ["(no output)"]
            raise CrflowError(f"the node-trust script failed: {lines[-1]}")
        return {f"{layout.directory.lstrip('/')}/{path.relative_to(hosts)}": (path.read_bytes(),
                                                                              path.stat().st_mode & 0o777)
                for path in sorted(hosts.rglob("*")) if path.is_file()}


def _foreign(site: Site, root: Path, folder: str) -> bool:
    """A certs.d folder under `root` that holds files and was not written by this site's mark."""
    path = root / folder
    mark = read_bytes(path / MARK, within=root)
    if mark is not None:
        return mark.decode(errors="replace").strip() != owner(site)
    try:
        with opened_dir(path, within=root) as fd:
            return bool(os.listdir(fd))
    except FileNotFoundError:
        return False


def _write(site: Site, root: Path, wanted: dict[str, tuple[bytes, int]]) -> tuple[list[str], list[str]]:
    """Put `wanted` under `root` (public files in public folders, but a hosts.toml holding a
    login, 0600), a certs.d folder only if it is new or this site's; returns (lines, files written)."""
    folders = {Path(relative).parent for relative in wanted}
    foreign = sorted(f for f in folders if f.parent.name == "certs.d" and _foreign(site, root, str(f)))
    lines = [f"left {root / folder} alone: it was not written by {owner(site)}" for folder in foreign]
    files = []
    for relative, (content, mode) in wanted.items():  # a folder's mark sorts first: it is written first
        if Path(relative).parent in foreign:
            continue
        if write_atomic(root / relative, content, 0o600 if mode & 0o077 == 0 else 0o644, within=root,
                        make_parents=0o755) \
                and Path(relative).name != MARK:
            lines.append(f"wrote {root / relative}")
        files.append(relative)
    return lines, files


def _remove(site: Site, root: Path, files: list[str]) -> list[str]:
    """Remove exactly `files` under `root` (in a certs.d folder, only if this site's mark is on
    it), then each folder they leave empty; returns what was done."""
    lines, folders = [], []
    for relative in files:
        path = root / relative
        certs_d = path.parent.parent.name == "certs.d"
        if certs_d and (read_bytes(path.parent / MARK, within=root) or b"").decode().strip() != owner(site):
            continue
        if certs_d and path.name == MARK:
            continue  # last, with the folder: the mark says whose it is until then
        try:
            with opened_dir(path.parent, within=root) as dfd:
                os.unlink(path.name, dir_fd=dfd)
        except (FileNotFoundError, NotADirectoryError):
            continue
        if not certs_d:
            lines.append(f"removed {path}")
        elif path.parent not in folders:
            folders.append(path.parent)
    for folder in folders:
        with opened_dir(folder, within=root) as fd:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(MARK, dir_fd=fd)
        try:
            with opened_dir(folder.parent, within=root) as dfd:
                os.rmdir(folder.name, dir_fd=dfd)
            lines.append(f"removed {folder}")
        except OSError:
            lines.append(f"left {folder}: it holds files crflow did not write")
    return lines


def _default_files(site: Site, layout: Layout, legacy: bool) -> list[str]:
    """What this site would have written (for a remove with no list of it): only folders
    carrying the site's mark are then touched. `legacy`: an earlier version's record says it
    wrote here, when the system file was named by release alone."""
    if layout.format == "system":
        return [f"{layout.directory.lstrip('/')}/{name}"
                for name in [system_file(site), *([f"crflow-{site.release}.crt"] if legacy else [])]]
    names = ["ca.crt", MARK, *(["hosts.toml"] if layout.format == "containerd" else [])]
    prefixes = [mirror.prefix for mirror in site.mirrors] if layout.format == "containerd" else []
    return [f"{layout.directory.lstrip('/')}/{folder}/{name}" for folder in [*site.client_servers, *prefixes]
            for name in names]


def _update_system_bundle(root: Path) -> list[str]:
    if root != Path("/"):  # the system's bundle is rebuilt only on this machine, never under a prefix
        return []
    if shutil.which("update-ca-certificates") is None:
        raise CrflowError("the CA file is in place, but there is no update-ca-certificates here to rebuild the "
                          "system's CA bundle; install the ca-certificates package")
    try:
        subprocess.run(["update-ca-certificates"], check=True, capture_output=True, timeout=UPDATE_SECONDS,
                       stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise CrflowError(f"update-ca-certificates did not finish in {UPDATE_SECONDS} s") from None
    except subprocess.CalledProcessError as err:
        raise CrflowError(f"update-ca-certificates failed: {(err.stderr or b'').decode().strip()[-200:]}") from None
    return ["ran update-ca-certificates"]


def _recorded(site: Site) -> dict[tuple[str, str], list[str] | None]:
    """(runtime, root) -> the files this site wrote there (None: an earlier version's record,
    which named no files)."""
    content = read_bytes(site.state.trusted)
    if content is None:
        return {}
    done = {}
    for entry in json.loads(content):
        if isinstance(entry, list):  # [runtime, root]
            done[(entry[0], entry[1])] = None
        else:
            done[(entry["runtime"], entry["root"])] = entry["files"]
    return done


def _record(site: Site, runtime: str, root: Path, files: list[str]) -> None:
    done = _recorded(site)
    done.pop((runtime, str(root)), None)
    if files:
        done[(runtime, str(root))] = files
    if site.state_dir.is_dir():
        entries = [{"runtime": r, "root": d, "files": f} for (r, d), f in sorted(done.items()) if f is not None]
        entries += [[r, d] for (r, d), f in sorted(done.items()) if f is None]
        write_atomic(site.state.trusted, json.dumps(entries).encode(), 0o600)
        note_made(site.state_dir)


def trusted(site: Site) -> list[tuple[str, Path]]:
    """(runtime, root) of everything `crflow trust` wrote for this site and did not undo."""
    return [(runtime, Path(root)) for runtime, root in _recorded(site)]
