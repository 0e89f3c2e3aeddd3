"""`crflow doctor` and `crflow --version`: what this machine has for crflow, one line per check,
each failure with its fix.

    findings = examine(site, fix=False)        # [Finding], in the order a user would fix them
    exit_code = 1 if any(f.level is Level.FAIL for f in findings) else 0
"""

from __future__ import annotations

import enum
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as installed_version
from pathlib import Path

from crflow import runtime
from crflow.config import environment
from crflow.errors import CrflowError
from crflow.helmbin import PINNED, HelmMissing, data_bin, fetch, find_helm
from crflow.settings import Site

FREE_DISK_FAIL = 200 * 2**20  # below this a push of one layer fails
FREE_DISK_WARN = 2 * 2**30


class Level(enum.Enum):
    OK = "ok"
    WARN = "warn"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Finding:
    check: str
    level: Level
    said: str
    fix: str = ""

    def line(self) -> str:
        return f"{self.level.value:<5} {self.check:<16} {self.said}" + (f"; fix: {self.fix}" if self.fix else "")


def crflow_version() -> str:
    try:
        return installed_version("crflow")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def registry_version(binary: str) -> str | None:
    """distribution's version, as `docker-registry --version` says it (2.8.2+ds1)."""
    try:
        said = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=20,
                              stdin=subprocess.DEVNULL).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"\bv?\d+\.\d+\.\d+\S*", said)
    return found.group(0) if found else None


def versions() -> str:
    """`crflow --version`: crflow's, and those of the parts it found."""
    from crflow.localpod import registry_binary

    try:
        helm = find_helm()
        helm_said = f"helm {helm.version} ({helm.path})"
    except CrflowError:
        helm_said = "helm not found"
    try:
        binary = registry_binary()
        registry_said = f"distribution {registry_version(binary) or 'of unknown version'} ({binary})"
    except CrflowError:
        registry_said = "distribution not found"
    return (f"crflow {crflow_version()} (Python {platform.python_version()}, Prefect {installed_version('prefect')}, "
            f"{helm_said}, {registry_said})")


def examine(site: Site | None, fix: bool = False) -> list[Finding]:
    import crflow

    findings = [Finding("crflow", Level.OK, f"{crflow_version()} at {Path(crflow.__file__).parent}, "
                                             f"Python {platform.python_version()} ({sys.executable})"),
                _helm(fix), _registry(site), _prefect()]
    if site is not None:
        if site.target == "kubernetes":
            findings.append(_cluster(site))
        findings += [_state_dir(site.state_dir), _disk(site.state_dir)]
        if site.target == "local":
            findings.append(_ports(site))
    return findings


def _helm(fix: bool) -> Finding:
    try:
        helm = find_helm()
        return Finding("helm", Level.OK, f"{helm.version} ({helm.where}: {helm.path})")
    except HelmMissing as err:
        if environment().helm:  # the user's explicit choice is theirs to mend: --fix does not replace it
            return Finding("helm", Level.FAIL, err.finding, "point CRFLOW_HELM at helm 3.8 or newer, or unset it")
        if not fix:
            return Finding("helm", Level.FAIL, err.finding,
                           f"crflow doctor --fix (fetches helm {PINNED['helm'].version} into {data_bin()})")
    fetch(data_bin(), ["helm"], progress=lambda line: print(f"      fix: {line}", flush=True))
    helm = find_helm()
    return Finding("helm", Level.OK, f"{helm.version} ({helm.where}: {helm.path}), fetched now")


def _registry(site: Site | None) -> Finding:
    from crflow.localpod import BINARY_HINT, registry_binary

    try:
        binary = registry_binary()
        return Finding("docker-registry", Level.OK, f"{registry_version(binary) or 'found'} ({binary})")
    except CrflowError:
        if site is not None and site.target == "kubernetes":
            return Finding("docker-registry", Level.OK, "not here (the kubernetes target runs it in the cluster)")
        level = Level.FAIL if site is not None else Level.WARN
        return Finding("docker-registry", level, "not found (the local target runs it)", BINARY_HINT.split(": ", 1)[1])


def _prefect() -> Finding:
    ours = runtime.configure()
    if not ours:
        url = os.environ["PREFECT_API_URL"]
        if runtime.healthy():
            return Finding("Prefect API", Level.OK, f"{url} answers (a server of yours: PREFECT_API_URL)")
        return Finding("Prefect API", Level.FAIL, f"{url} (PREFECT_API_URL) is not answering",
                       "start that server, or unset PREFECT_API_URL to use crflow's own")
    if runtime.healthy():
        return Finding("Prefect API", Level.OK, f"crflow's own server at {runtime.ui_url()}, running (a real server, "
                                                "not an ephemeral one: runs and schedules stay)")
    return Finding("Prefect API", Level.OK, f"crflow's own server at {runtime.ui_url()}, started by the first run "
                                            "(a real server, not an ephemeral one)")


def _cluster(site: Site) -> Finding:
    from crflow.targets.kubernetes import KubernetesTarget

    try:
        version = KubernetesTarget(site).kube_version()
    except CrflowError as err:
        return Finding("cluster", Level.FAIL, str(err), "point cluster.kubeconfig (and cluster.context) at the cluster")
    where = site.cluster.kubeconfig or os.environ.get("KUBECONFIG", "~/.kube/config")
    return Finding("cluster", Level.OK, f"Kubernetes {version} (kubeconfig {where})")


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _state_dir(state_dir: Path) -> Finding:
    if not state_dir.exists():
        parent = _nearest_existing(state_dir)
        if os.access(parent, os.W_OK | os.X_OK):
            return Finding("state_dir", Level.OK, f"{state_dir} does not exist yet; install makes it (0700)")
        return Finding("state_dir", Level.FAIL, f"{state_dir} cannot be made: {parent} is not writable by this user",
                       "set state_dir to a folder of this user's")
    info = state_dir.stat()
    if info.st_uid != os.geteuid():
        return Finding("state_dir", Level.FAIL, f"{state_dir} belongs to uid {info.st_uid}, not this user",
                       "run crflow as its owner, or set state_dir to a folder of this user's")
    if info.st_mode & 0o077:
        return Finding("state_dir", Level.FAIL, f"{state_dir} is mode {info.st_mode & 0o777:o}: others can reach the "
                                                "CA and logins in it", f"chmod 700 {state_dir}")
    return Finding("state_dir", Level.OK, f"{state_dir} (0700, this user's)")


def _disk(state_dir: Path) -> Finding:
    where = _nearest_existing(state_dir)
    free = shutil.disk_usage(where).free
    said = f"{free / 2**30:.1f} GiB free at {where}"
    if free < FREE_DISK_FAIL:
        return Finding("disk", Level.FAIL, said, "free space there, or set state_dir on another disk")
    if free < FREE_DISK_WARN:
        return Finding("disk", Level.WARN, said + " (images and the registry's data need more)")
    return Finding("disk", Level.OK, said)


def _ports(site: Site) -> Finding:
    from crflow.localpod import DEBUG_HOST, LocalPod, ensure_port_free
    from crflow.targets.local import LocalTarget

    host, port = site.registry.listen
    if LocalPod(LocalTarget(site).pod_dir).pid() is not None:
        return Finding("ports", Level.OK, f"{host}:{port} is this site's running registry")
    try:
        ensure_port_free(host, port)
        ensure_port_free(DEBUG_HOST, site.registry.debug_port)
    except CrflowError as err:
        return Finding("ports", Level.FAIL, str(err), "stop what listens there, or set registry.port (and "
                                                      "registry.metrics_port)")
    return Finding("ports", Level.OK, f"{host}:{port} and {DEBUG_HOST}:{site.registry.debug_port} are free")
