"""The local target: the chart's registry pod run on this machine as a `docker-registry`
process (crflow/localpod.py plays the kubelet). Each deploy hands the pod its Secrets, which
it writes into the pod's volumes as the kubelet mounts them.

Task modules are imported in the methods that run them: `crflow status` and `crflow down`
use only the plain clients and must not pay for Prefect's import (about a second).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pydantic import SecretStr

from crflow import layout
from crflow.chart import SecretData, data_claim, mirror_login_secret, mirror_name, secret_name
from crflow.errors import CrflowError
from crflow.health import Health, Status, mirror_health, registry_health, upstream_health
from crflow.localpod import DEBUG_HOST, LocalPod
from crflow.settings import Site
from crflow.targets import Check, Release, Stoppable, Target

FULL_BELOW = 1 << 20  # free bytes under which the storage counts as full: less than one small layer


class LocalTarget(Target, Stoppable):
    def __init__(self, site: Site):
        super().__init__(site)
        self.pod_dir = site.state.pod
        # The data claim is the store's directory, as a claim is bound to its volume.
        directory = self.store.directory
        self.claims: dict[str, Path] = {data_claim(site.release): directory} if directory is not None else {}

    def _mirror_pods(self) -> dict[str, LocalPod]:
        """Each mirror's process, by name: the site's mirrors, and any an earlier site file had."""
        pods = {path.name: LocalPod(path) for path in sorted(self.site.state.mirrors.glob("*")) if path.is_dir()}
        for mirror in self.site.mirrors:
            pods[mirror.name] = LocalPod(self.site.state.mirrors / mirror.name,
                                         deployment=mirror_name(self.site.release, mirror.name))
        return pods

    def _pods(self) -> list[LocalPod]:
        return [LocalPod(self.pod_dir), *self._mirror_pods().values()]

    def check_host(self) -> None:
        from crflow.tasks.localpod import check_local_host

        check_local_host(self.pod_dir, self.site.registry.listen, self.site.registry.debug_port)

    def prepare(self) -> None:
        pass  # no namespace here; the store makes its directory

    def s3_keys(self):
        from crflow.tasks.storage import read_s3_keys_file

        source = self.site.storage.credentials
        return read_s3_keys_file(source.file, source.access_key_key, source.secret_key_key)

    def update_secret(self, role: str, data: dict[str, SecretStr]) -> None:
        from crflow.tasks.localpod import put_local_secret

        for pod in self._pods():  # the mirrors take the registry's login and certificate too
            if pod.dir.exists():
                put_local_secret(pod.dir, secret_name(self.site.release, role), data)

    def deploy(self, values: dict, manifests: list[dict], secrets: SecretData, changed: bool = False) -> Release:
        from crflow.tasks.localpod import run_local_pod

        # The Secrets are the pod's volumes, as the API server holds them until the kubelet mounts them.
        run_local_pod(self.pod_dir, manifests, secrets, self.claims, self.site.registry.listen,
                      self.site.registry.debug_port)
        wanted = {mirror.name: mirror for mirror in self.site.mirrors}
        host = self.site.registry.listen[0]
        for name, pod in self._mirror_pods().items():
            if name in wanted:
                mirror = wanted[name]
                if pod.pid() is None:  # distribution's proxy will not start without its upstream: say why first
                    held = secrets.get(mirror_login_secret(self.site.release, name))
                    login = (held["username"].get_secret_value(), held["password"]) if held else None
                    upstream = upstream_health(mirror, login)
                    if not upstream.healthy:
                        raise CrflowError(f"{upstream.detail}; the mirror cannot start without it")
                run_local_pod(pod.dir, manifests, secrets, self.claims, (host, mirror.port), mirror.debug_port,
                              pod.deployment)
            else:  # a mirror the site file no longer names
                pod.stop()
        return Release(None, manifests)

    def deployed(self) -> Release:
        return Release(None, LocalPod(self.pod_dir).manifests())

    def roll_back(self, to: Release, secrets: SecretData) -> Release:
        return self.deploy({}, to.manifests, secrets)

    def running_pod(self) -> dict:
        from crflow.tasks.localpod import read_local_pod

        return read_local_pod(self.pod_dir)

    def checks(self, pushed) -> list[Check]:
        return []  # the pod is this machine's process: the store's checks see where its blobs went

    def publish_login(self, ca_pem: str, creds) -> list[str]:
        from crflow.tasks.client import save_client_bundle

        save_client_bundle(self.bundle, self.site.client_servers, ca_pem, creds)
        return []

    def status(self) -> Health:
        pod = LocalPod(self.pod_dir)
        if not pod.manifests() and not (self.bundle / "auth.json").exists():
            return Health(Status.NOT_INSTALLED, f"no registry installed in {self.site.state_dir}; run crflow install")
        pid = pod.pid()
        if pod.is_read_only():  # before the process check: a gc killed inside its restart leaves none running
            return self._read_only(pod, pid)
        if pid is None:
            return Health(Status.UNHEALTHY, "the local registry process is not running; crflow install starts it")
        # The chart's probes, as a kubelet asks them: live is the process, ready includes its storage.
        if not pod.probe("liveness"):
            return Health(Status.UNHEALTHY, f"registry process {pid} does not answer its liveness probe (the debug "
                                            f"server on {DEBUG_HOST}:{self.site.registry.debug_port}); restart "
                                            "it with crflow down and crflow install")
        if not pod.probe("readiness"):
            why = pod.failing_checks() or "it does not answer its readiness probe"
            return Health(Status.UNHEALTHY, f"registry process {pid} is live but not ready: {why}; it serves again "
                                            "once its storage answers, with no restart")
        health = registry_health(self.url, self.bundle)
        directory = self.store.directory
        if health.status is Status.HEALTHY and directory is not None:
            free = shutil.disk_usage(directory).free
            if free < FULL_BELOW:  # it answers, but no push can land
                return Health(Status.UNHEALTHY, f"registry process {pid}: the registry's storage is full (no space "
                                                f"left on device: {free >> 10} KiB free in {directory})")
        if health.status is not Status.HEALTHY:
            return Health(health.status, f"registry process {pid}: {health.detail}")
        mirrors = []
        pods = self._mirror_pods()  # (one listing of state_dir/mirrors, not one per mirror)
        for mirror in self.site.mirrors:
            mirror_pod = pods[mirror.name]
            mirror_pid = mirror_pod.pid()
            if mirror_pid is None:
                return Health(Status.UNHEALTHY, f"mirror {mirror.name}'s process is not running; crflow install "
                                                "starts it")
            if not mirror_pod.probe("readiness"):
                why = mirror_pod.failing_checks() or "it does not answer its readiness probe"
                return Health(Status.UNHEALTHY, f"mirror {mirror.name} (process {mirror_pid}) is not ready: {why}")
            mirrored = mirror_health(mirror, self.site.mirror_server(mirror), self.bundle)
            if not mirrored.healthy:
                return mirrored
            mirrors.append(f"{mirror.name} of {mirror.upstream.rstrip('/')} (process {mirror_pid}, port {mirror.port})")
        listed = f"; mirrors: {', '.join(mirrors)}" if mirrors else ""
        return Health(health.status, f"registry process {pid}: {health.detail}{listed}")

    def _read_only(self, pod: LocalPod, pid: int | None) -> Health:
        """Read-only maintenance: a gc's window while a run holds the site; else one that a gc
        stopped inside it left, which ends here (the writable pod it kept aside comes back, even
        when the gc died between stopping one process and starting the next)."""
        holder = layout.lock_holder(self.site.state_dir)
        if holder is not None and holder[1]:  # that run owns the pod: it is not ours to restore
            process = f"registry process {pid}" if pid is not None else "the registry (restarting)"
            return Health(Status.READ_ONLY, f"{process} is read-only (maintenance): a crflow run (pid "
                                            f"{holder[0].get('pid')}) holds the site, as gc does; pushes resume when "
                                            "it ends")
        if pod.restore_writable():
            return Health(Status.READ_ONLY, f"the registry was read-only (maintenance), left so by a gc stopped in its "
                                            f"window; write mode is restored (registry process {pod.pid()})")
        if pid is None:
            return Health(Status.UNHEALTHY, "the local registry process is not running, and its last pod was "
                                            "read-only (maintenance); crflow install starts it in write mode")
        return Health(Status.READ_ONLY, f"registry process {pid} is read-only (maintenance), left so by a gc stopped "
                                        "in its window; crflow gc or crflow install restores write mode")

    def down(self) -> bool:
        return any([pod.stop() for pod in self._pods()])  # (a list: every pod stops, not just the first)

    def collect(self, manifests: list[dict], secrets: SecretData, dry_run: bool, delete_untagged: bool,
                mirror: str | None = None):
        from crflow.tasks.localpod import collect_local

        pod = LocalPod(self.pod_dir) if mirror is None else self._mirror_pods()[mirror]
        return collect_local(pod.dir, manifests, secrets, self.claims, dry_run, delete_untagged,
                             self.site.gc.timeout_seconds, pod.deployment)

    def removal_plan(self, purge: bool) -> list[str]:
        plan = [f"the local registry process ({self.pod_dir})",
                *(f"mirror {name}'s process ({pod.dir})" for name, pod in self._mirror_pods().items())]
        if purge and self.store.directory is not None:
            plan.append(f"the stored images in {self.store.directory}")
        return plan

    def uninstall(self, purge: bool) -> list[str]:
        from crflow.tasks.localpod import remove_images

        removed = ["the local registry process"] if LocalPod(self.pod_dir).stop() else []
        removed += [f"mirror {name}'s process" for name, pod in self._mirror_pods().items() if pod.stop()]
        if purge and self.store.directory is not None:
            removed += remove_images(self.store.directory)
        return removed
