"""Prefect tasks over the local pod runner (crflow/localpod.py): the local target's steps."""

from __future__ import annotations

import os
from pathlib import Path

from prefect import get_run_logger, task
from pydantic import SecretStr

from crflow.chart import SecretData
from crflow.errors import CrflowError, transient_only
from crflow.localpod import DEBUG_HOST, LocalPod, ensure_port_free, registry_binary
from crflow.outcomes import PodApplied
from crflow.tasks.helm import helm_executable
from crflow.undo import undo, undoable


@task(task_run_name="port {listen[1]} on {listen[0]}")
def check_local_host(pod_dir: Path, listen: tuple[str, int], debug_port: int) -> None:
    """Before anything is made: the registry binary and helm are here, and the ports are ours or free."""
    registry_binary()
    helm_executable()
    if LocalPod(pod_dir).pid() is None:
        ensure_port_free(*listen)
        ensure_port_free(DEBUG_HOST, debug_port)


@task(task_run_name="registry process", retries=1, retry_condition_fn=transient_only)
def run_local_pod(
    pod_dir: Path, manifests: list[dict], secrets: SecretData, claims: dict[str, Path], listen: tuple[str, int],
    debug_port: int, deployment: str | None = None,
) -> PodApplied:
    """Run (or leave running) the registry's pod from `manifests` (or `deployment`'s, a
    mirror's) as a local process."""
    outcome = LocalPod(pod_dir, deployment).apply(manifests, secrets, claims, listen, debug_port)
    get_run_logger().info("local registry %s", outcome)
    return outcome


@task(task_run_name="Secret {name} (local)")
def put_local_secret(pod_dir: Path, name: str, data: dict[str, SecretStr]) -> None:
    """New content for a Secret the local registry mounts (put back on rollback)."""
    pod = LocalPod(pod_dir)
    with undoable() as on_undo:
        before = pod.refresh_secret(name, data)
        on_undo(lambda: pod.refresh_secret(name, before))


put_local_secret.on_rollback(undo)


@task(task_run_name="read the registry pod (local)")
def read_local_pod(pod_dir: Path) -> dict:
    """The template and ConfigMaps of the registry pod running on this machine."""
    return LocalPod(pod_dir).running_pod()


@task(task_run_name="remove the stored images in {data_dir}")
def remove_images(data_dir: Path) -> list[str]:
    """The images the local registry stored (its `docker/` tree), gone for good: uninstall
    --purge only. The folder goes too if that leaves it empty and it is not a mount point.
    Returns what went, and what stayed."""
    from crflow.files import remove

    if not remove(data_dir / "docker"):
        return []
    lines = [f"the stored images in {data_dir}"]
    try:
        if not os.path.ismount(data_dir):
            os.rmdir(data_dir)
    except OSError:  # not empty: someone else's files are in it
        lines.append(f"kept: {data_dir}, which holds files the registry did not write")
    return lines


@task(task_run_name="garbage-collect {pod_dir.name} (local, dry run: {dry_run})")
def collect_local(pod_dir: Path, manifests: list[dict], secrets: SecretData, claims: dict[str, Path], dry_run: bool,
                  delete_untagged: bool, timeout: float, deployment: str | None = None):
    """`registry garbage-collect` with the pod's config, storage and user (the registry's, or
    Deployment `deployment`'s, a mirror's): what a Job with its pod spec runs on the cluster."""
    from crflow.chart import CONFIG_PATH
    from crflow.tasks.gc import parse_collection

    args = ["garbage-collect", CONFIG_PATH,
            *(["--dry-run"] if dry_run else []), *(["--delete-untagged=true"] if delete_untagged else [])]
    result = LocalPod(pod_dir, deployment=deployment).run_once(manifests, secrets, claims, args, timeout)
    if result.returncode != 0:
        lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        raise CrflowError(f"registry garbage-collect failed: {lines[-1] if lines else f'exit {result.returncode}'}")
    return parse_collection(result.stdout)
