"""How do we run Helm? The real helm binary, through pyhelm3: render our chart, install or
upgrade a release and wait for it, read what a release deployed, roll it back.

    manifests = render_chart("registry", "container-registry", values)
    revision = helm_release(kube, "registry", "container-registry", values, timeout_seconds=300)

The chart only references Secrets (see crflow/chart.py); their content never enters values.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import TYPE_CHECKING

from prefect import task
from pyhelm3 import Client
from pyhelm3.command import Command
from pyhelm3.errors import ConnectionError as HelmConnectionError
from pyhelm3.errors import Error as HelmError
from pyhelm3.errors import ReleaseNotFoundError

from crflow.chart import CHART_DIR, CHART_REPOSITORY, chart_package, chart_reference
from crflow.errors import CrflowError, Transient, transient_only
from crflow.helmbin import find_helm

if TYPE_CHECKING:  # the local target renders the chart without loading the Kubernetes client
    from crflow.tasks.kubeapi import KubeAccess

def helm_executable() -> str:
    """The helm binary crflow runs (crflow/helmbin.py says where it looks)."""
    return find_helm().path


def _said(stderr: str, otherwise: str) -> str:
    """helm's own one-line reason ("Error: UPGRADE FAILED: ..."), without the lines before it."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1].removeprefix("Error: ") if lines else otherwise


def _reason(err: HelmError) -> str:
    return _said(str(err), type(err).__name__)


READ_SECONDS = 120  # helm template, get, version: no wait of helm's own; a frozen API server must not hang them
BEYOND_WAIT_SECONDS = 60  # what a waiting helm may take past its own --timeout before it is stopped


def _bounded(work, seconds: float, doing: str):
    """Run helm's coroutine for at most `seconds`; past that pyhelm3 stops helm (SIGTERM) and
    the step is Transient: a later try may find the cluster answering."""
    async def bounded():
        return await asyncio.wait_for(work, seconds)

    try:
        return asyncio.run(bounded())
    except TimeoutError:
        raise Transient(f"{doing}: helm did not finish in {seconds:.0f} s; stopped it") from None


# What helm says when the API server did not answer (pyhelm3 knows only two of these: a frozen
# API server gives "Kubernetes cluster unreachable: ... TLS handshake timeout").
UNREACHABLE = re.compile(r"cluster unreachable|tls handshake timeout|i/o timeout|connection refused|"
                         r"connection reset by peer|client connection lost", re.IGNORECASE)


def _failed(err: HelmError, doing: str) -> CrflowError:
    """helm's failure as a one-line CrflowError; Transient where a later try may pass: the
    cluster unreachable, or another operation on the release still in progress."""
    said = _reason(err)
    transient = isinstance(err, HelmConnectionError) or "another operation" in said or UNREACHABLE.search(said)
    return (Transient if transient else CrflowError)(f"{doing}: {said}")


class _TemplateFor(Command):
    """pyhelm3's Command, whose `template` renders for a given Kubernetes version (pyhelm3 has
    no option for helm's --kube-version)."""

    def __init__(self, kube_version: str | None, **options):
        super().__init__(**options)
        self._kube_version = kube_version

    async def run(self, command: list[str], input: bytes | None = None) -> bytes:
        if command[:1] == ["template"] and self._kube_version:
            command = [*command, "--kube-version", self._kube_version]
        return await super().run(command, input)


async def _render(release: str, namespace: str, values: dict, kube_version: str | None) -> list[dict]:
    # pyhelm3's Command, not its Client: the Client first runs `helm version` and `helm show
    # chart`, which cost every install ~0.1 s and add nothing to a local template.
    helm = _TemplateFor(kube_version, executable=helm_executable())
    resources = await helm.template(release, CHART_DIR, values, namespace=namespace)
    # Hooks (the `helm test` Pod) are not part of a release's manifest, as `helm get manifest` shows it.
    return [r for r in resources if r and "helm.sh/hook" not in ((r.get("metadata") or {}).get("annotations") or {})]


@task(task_run_name="helm template {release}", retries=1)
def render_chart(release: str, namespace: str, values: dict, kube_version: str | None = None) -> list[dict]:
    """`helm template` of our chart: the manifests a release with these values consists of, on
    a cluster of `kube_version` (None: helm's default)."""
    try:
        return _bounded(_render(release, namespace, values, kube_version), READ_SECONDS, "helm template")
    except HelmError as err:
        raise _failed(err, f"helm could not render {CHART_DIR}") from err


def _client(kube: KubeAccess) -> Client:
    return Client(executable=helm_executable(), kubeconfig=kube.kubeconfig and Path(kube.kubeconfig),
                  kubecontext=kube.context)


async def _ensure_release(kube: KubeAccess, release: str, namespace: str, values: dict, timeout_seconds: int,
                          always: bool) -> int:
    helm = _client(kube)
    chart = await helm.get_chart(CHART_DIR)
    options = dict(namespace=namespace, create_namespace=False, wait=True, timeout=f"{timeout_seconds}s")
    if always:
        revision = await helm.install_or_upgrade_release(release, chart, values, **options)
    else:
        revision = await helm.ensure_release(release, chart, values, **options)
    return revision.revision


@task(task_run_name="helm upgrade --install {release}",
      retries=1, retry_delay_seconds=10, retry_condition_fn=transient_only)
def helm_release(kube: KubeAccess, release: str, namespace: str, values: dict, timeout_seconds: int,
                 always: bool = False) -> int:
    """Install or upgrade the release and wait until it is ready. Only where chart version or
    values changed (pyhelm3's test), unless `always`: an upgrade that saw its manifests differ
    (a template edited without a version bump, a release changed by hand) applies them anyway.
    Returns the release's revision (unchanged on a rerun with the same settings)."""
    try:
        return _bounded(_ensure_release(kube, release, namespace, values, timeout_seconds, always),
                        timeout_seconds + BEYOND_WAIT_SECONDS, f"helm upgrade --install {release}")
    except HelmError as err:
        raise _failed(err, f"helm could not install or upgrade release {namespace}/{release}") from err


async def _deployed(kube: KubeAccess, release: str, namespace: str) -> tuple[int | None, list[dict]]:
    helm = _client(kube)
    try:
        revision = await helm.get_current_revision(release, namespace=namespace)
    except ReleaseNotFoundError:
        return None, []
    return revision.revision, [r for r in await revision.resources() if r]


@task(task_run_name="deployed release {release}", retries=1, retry_delay_seconds=5, retry_condition_fn=transient_only)
def deployed_release(kube: KubeAccess, release: str, namespace: str) -> tuple[int | None, list[dict]]:
    """The release's current revision and its manifests (`helm get manifest`); (None, []) if none."""
    try:
        return _bounded(_deployed(kube, release, namespace), READ_SECONDS, f"helm get {release}")
    except HelmError as err:
        raise _failed(err, f"helm could not read release {namespace}/{release}") from err


async def _rollback(kube: KubeAccess, release: str, namespace: str, revision: int, timeout_seconds: int) -> int:
    current = await _client(kube).get_current_revision(release, namespace=namespace)
    rolled = await current.release.rollback(revision, wait=True, timeout=f"{timeout_seconds}s")
    return rolled.revision


@task(task_run_name="helm rollback {release} to {revision}",
      retries=1, retry_delay_seconds=10, retry_condition_fn=transient_only)
def rollback_release(kube: KubeAccess, release: str, namespace: str, revision: int, timeout_seconds: int) -> int:
    """`helm rollback` to `revision` and wait until it is ready; returns the new revision's number."""
    try:
        return _bounded(_rollback(kube, release, namespace, revision, timeout_seconds),
                        timeout_seconds + BEYOND_WAIT_SECONDS, f"helm rollback {release}")
    except HelmError as err:
        raise _failed(err, f"helm could not roll release {namespace}/{release} back to revision {revision}") from err



async def _node_trust_off(kube: KubeAccess, release: str, namespace: str, timeout_seconds: int) -> bool:
    helm = _client(kube)
    try:
        await helm.get_current_revision(release, namespace=namespace)
    except ReleaseNotFoundError:
        return False
    await helm.install_or_upgrade_release(release, await helm.get_chart(CHART_DIR), {"nodeTrust": {"remove": True}},
                                          reuse_values=True, namespace=namespace, create_namespace=False,
                                          wait=True, timeout=f"{timeout_seconds}s")
    return True


@task(task_run_name="node-trust files off every node ({release})",
      retries=1, retry_delay_seconds=10, retry_condition_fn=transient_only)
def remove_node_trust(kube: KubeAccess, release: str, namespace: str, timeout_seconds: int) -> bool:
    """An upgrade that sets nodeTrust.remove: each node-trust pod deletes what it wrote, then
    idles. Returns whether there was a release to change (wait for its pods after)."""
    try:
        return _bounded(_node_trust_off(kube, release, namespace, timeout_seconds),
                        timeout_seconds + BEYOND_WAIT_SECONDS, f"helm upgrade {release}")
    except HelmError as err:
        raise _failed(err, f"helm could not upgrade release {namespace}/{release}") from err


async def _uninstall(kube: KubeAccess, release: str, namespace: str, timeout_seconds: int) -> bool:
    try:
        current = await _client(kube).get_current_revision(release, namespace=namespace)
    except ReleaseNotFoundError:
        return False
    await current.release.uninstall(wait=True, timeout=f"{timeout_seconds}s")
    return True


@task(task_run_name="helm uninstall {release}", retries=1, retry_delay_seconds=10, retry_condition_fn=transient_only)
def uninstall_release(kube: KubeAccess, release: str, namespace: str, timeout_seconds: int) -> bool:
    """Remove the release, waited for; returns whether there was one."""
    try:
        return _bounded(_uninstall(kube, release, namespace, timeout_seconds),
                        timeout_seconds + BEYOND_WAIT_SECONDS, f"helm uninstall {release}")
    except HelmError as err:
        raise _failed(err, f"helm could not uninstall release {namespace}/{release}") from err


@task(task_run_name="publish the chart to oci://{server}/" + CHART_REPOSITORY, retries=2, retry_delay_seconds=2,
      retry_condition_fn=transient_only)
def publish_chart(server: str, bundle: Path) -> str:
    """`helm package` our chart and `helm push` it into the registry it installed, trusting only
    crflow's CA and logging in with the client files (their path, never their content, is in
    helm's arguments). Returns what `helm pull` takes."""
    import subprocess
    import tempfile

    name, version = chart_package()
    helm = helm_executable()
    with tempfile.TemporaryDirectory(prefix="crflow-chart-") as out:
        def run(*args: str) -> None:
            result = subprocess.run([helm, *args], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
            if result.returncode != 0:
                raise CrflowError(f"helm {args[0]} of the chart failed: "
                                  f"{_said(result.stderr, f'exit {result.returncode}')}")

        run("package", str(CHART_DIR), "--destination", out)
        run("push", str(Path(out) / f"{name}-{version}.tgz"), f"oci://{server}/{CHART_REPOSITORY}",
            "--ca-file", str(bundle / "ca.crt"), "--registry-config", str(bundle / "auth.json"))
    return chart_reference(server)
