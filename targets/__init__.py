"""Where the registry runs: one interface, two targets, chosen once from the site file.

    target = target_for(site)      # LocalTarget or KubernetesTarget
    target.prepare()               # the namespace; the volume blobs go to on a node
    target.store.prepare()         # the bucket or directory (targets/blobstore.py)
    target.deploy(values, manifests, secrets)   # with the Secrets the chart references

Everything that differs between running the chart's pod as a local process and installing
it with helm is a method here, so the flows read the same for both. Only this factory
compares `site.target`. What only one target can do is a small capability of its own,
asked with isinstance: `HoldsState` (the cluster keeps the site's state), `Stoppable` (the
local process stops and starts again with `crflow install`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import SecretStr

from crflow.chart import SecretData
from crflow.errors import NotInstalled
from crflow.health import Health
from crflow.settings import Site
from crflow.targets.blobstore import BlobStore, Check, blob_store

if TYPE_CHECKING:  # the task modules import Prefect, which `crflow status` must not pay for
    from crflow.tasks.credentials import Credentials
    from crflow.tasks.gc import Collection
    from crflow.tasks.registry import Pushed
    from crflow.tasks.storage import S3Keys

__all__ = ["Check", "HoldsState", "Release", "Stoppable", "Target", "target_for"]


@dataclass(frozen=True)
class Release:
    """What is deployed: helm's revision (None on the local target, which keeps no history)
    and the manifests it consists of ([] when nothing is deployed)."""

    revision: int | None
    manifests: list[dict] = field(default_factory=list)

    def describe(self) -> str:
        return f"revision {self.revision}" if self.revision is not None else "the running pod"


class Target(ABC):
    def __init__(self, site: Site):
        self.site = site
        self.url = f"https://{site.registry.server}"
        self.bundle = site.state.client  # the client files: ca.crt and auth.json
        self.store: BlobStore = blob_store(site, self.s3_keys)

    @abstractmethod
    def check_host(self) -> None:
        """Before anything is made: what this target needs from the machine is there."""

    def client_bundle(self) -> Path:
        """The directory with ca.crt and auth.json for this site's clients."""
        if not (self.bundle / "auth.json").exists():
            raise NotInstalled(f"no client files in {self.bundle}: run crflow install first")
        return self.bundle

    def kube_version(self) -> str | None:
        """The Kubernetes version the chart is rendered for (None: helm's default). A cluster's
        own: rendered for another, a 1.20 cluster's CronJob and PDB would differ from what it
        holds at every upgrade's diff."""
        return None

    @abstractmethod
    def prepare(self) -> None:
        """The namespace, and the volume blobs go to on a node (`store.prepare` makes the rest)."""

    @abstractmethod
    def s3_keys(self) -> S3Keys:
        """The S3 keys the registry uses: MinIO's Secret on the cluster, its stand-in file here."""

    @abstractmethod
    def update_secret(self, role: str, data: dict[str, SecretStr]) -> None:
        """New content for one Secret the running registry mounts, without a restart (put back
        on a transaction's rollback)."""

    @abstractmethod
    def deploy(self, values: dict, manifests: list[dict], secrets: SecretData, changed: bool = False) -> Release:
        """The chart running with `values` (rendered as `manifests`) and the Secrets it
        references holding `secrets`, waited for. Nothing restarts unless something changed, or
        the caller saw the manifests differ (`changed`)."""

    @abstractmethod
    def deployed(self) -> Release:
        """What runs now."""

    @abstractmethod
    def roll_back(self, to: Release, secrets: SecretData) -> Release:
        """Back to an earlier release (with `secrets`, those of this run), waited for; returns what runs now."""

    @abstractmethod
    def running_pod(self) -> dict:
        """{"template": the registry's pod template, "configMaps": name -> data}, as it runs."""

    @abstractmethod
    def checks(self, pushed: Pushed) -> list[Check]:
        """The verify checks only this target can make, for an image just pushed."""

    @abstractmethod
    def publish_login(self, ca_pem: str, creds: Credentials) -> list[str]:
        """Give the login to everyone who uses it; returns the namespaces whose pull Secret was
        written or checked."""

    @abstractmethod
    def status(self) -> Health:
        """Is the registry running and does it accept crflow's login over TLS?"""

    @abstractmethod
    def collect(self, manifests: list[dict], secrets: SecretData, dry_run: bool, delete_untagged: bool,
                mirror: str | None = None) -> Collection:
        """`registry garbage-collect` with the pod's config, Secrets and storage (`manifests` as
        rendered; mirror `mirror`'s pod, not the registry's, if given): what it finds eligible,
        or, unless `dry_run`, deletes."""

    @abstractmethod
    def removal_plan(self, purge: bool) -> list[str]:
        """What `uninstall` removes from this target, in words, asked about before (reads nothing)."""

    @abstractmethod
    def uninstall(self, purge: bool) -> list[str]:
        """Remove the registry and what crflow handed out on this target (node trust, pull
        Secrets); with `purge`, also its stored images and Secrets. Returns what went."""


class HoldsState(ABC):
    """A target that holds the site's state apart from this machine (the cluster), so a run
    elsewhere carries on where the last one stopped."""

    @abstractmethod
    def held_ca(self) -> str | None:
        """The CA certificate (PEM) this target already hands out apart from state_dir (the
        cluster's CA Secret), or None: a run whose state_dir is empty must not make another."""

    @abstractmethod
    def fetch_state(self) -> None:
        """Bring state_dir up to date from where the site's state is held (a run's first step,
        under the site's lock)."""

    @abstractmethod
    def keep_state(self) -> None:
        """Hold state_dir's state where `fetch_state` finds it (after every change)."""


class Stoppable(ABC):
    """A target whose registry can be stopped and started again (`crflow down`)."""

    @abstractmethod
    def down(self) -> bool:
        """Stop the registry, keeping its data, certificates and logins; whether it was running."""


def target_for(site: Site) -> Target:
    if site.target == "kubernetes":
        from crflow.targets.kubernetes import KubernetesTarget

        return KubernetesTarget(site)
    from crflow.targets.local import LocalTarget

    return LocalTarget(site)
