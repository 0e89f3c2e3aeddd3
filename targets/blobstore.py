"""Where the registry's blobs are: a directory on this machine, a bucket in S3, or a claim on
a cluster node. One object per run, built from the site's storage with the target's way of
reading the S3 keys; apart from the settings, the only place that tells the three apart.

    store = blob_store(site, target.s3_keys)
    store.prepare()                       # the bucket, or the directory, made
    for check in store.checks(digest):    # verify: the layer is where the site says
        checks.check(check.name, check.task, *check.arguments)

Task modules are imported in the methods that run them: `crflow status` builds a store too
and must not pay for Prefect's import.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from crflow.settings import FilesystemStorage, HostPathVolume, PvcStorage, ResultStorage, S3Storage, Site

if TYPE_CHECKING:
    from crflow.tasks.storage import Revision, S3Endpoint, S3Keys, S3Results


@dataclass(frozen=True)
class Check:
    """One verify check: what it checks, in words, the task that checks it and its arguments."""

    name: str
    task: Callable[..., Any]
    arguments: tuple = ()


class BlobStore(ABC):
    kind: str  # the site's storage.kind, for messages
    directory: Path | None = None  # blobs in a directory on this machine (the local target's claim)
    node_volume: HostPathVolume | None = None  # a hostPath PersistentVolume crflow makes on a node
    bucket: str | None = None  # blobs in this S3 bucket; None: on a volume the pod mounts

    def prepare(self) -> None:
        """Where blobs go exists before the registry starts (the bucket, the directory)."""

    def s3_secret(self) -> tuple[tuple[SecretStr, SecretStr] | None, str | None]:
        """What the registry's S3 Secrets hold: (access key, secret key) and the endpoint's CA (PEM)."""
        return None, None

    def diagnose(self, registry_said: str) -> Check | None:
        """After the registry's storage failed a push: a check that names the cause, if one can."""
        return None

    @abstractmethod
    def checks(self, digest: str) -> list[Check]:
        """The checks that blob `digest`, just pushed, landed here."""

    def stored_blobs(self) -> dict[str, int] | None:
        """digest -> bytes of every stored blob; None where crflow cannot read the storage."""
        return None

    def manifest_revisions(self) -> list[Revision]:
        """Every manifest the storage holds (the settings allow the untagged rule only where crflow reads it)."""
        raise NotImplementedError(f"crflow does not read {self.kind} storage")

    def kept_after_purge(self) -> list[str]:
        """What an uninstall with purge leaves in place, in words."""
        return []

    @abstractmethod
    def of_mirror(self, name: str) -> BlobStore:
        """Mirror `name`'s store: this one's storage under mirrors/NAME (the chart's layout)."""

    def evict(self, revisions: list[Revision]) -> None:
        """Remove these manifests and their tags, so that the next `garbage-collect` frees what only they used."""
        raise NotImplementedError(f"crflow does not write {self.kind} storage")

    def result_cache(self, name: str, results: ResultStorage) -> S3Results:
        """The site's encrypted cache in this store's S3 service (`result_storage:`)."""
        raise NotImplementedError("result_storage needs storage.kind: s3 (the settings refuse it otherwise)")


class DirectoryStore(BlobStore):
    kind = "filesystem"

    def __init__(self, directory: Path):
        self.directory = directory

    def prepare(self) -> None:
        from crflow.tasks.storage import ensure_directory

        ensure_directory(self.directory)

    def checks(self, digest: str) -> list[Check]:
        from crflow.tasks.storage import blob_in_directory

        return [Check("the layer is in the storage directory", blob_in_directory, (self.directory, digest))]

    def stored_blobs(self) -> dict[str, int]:
        from crflow.tasks.storage import stored_blobs_in_directory

        return stored_blobs_in_directory(self.directory)

    def manifest_revisions(self) -> list[Revision]:
        from crflow.tasks.storage import manifest_revisions_in_directory

        return manifest_revisions_in_directory(self.directory)

    def of_mirror(self, name: str) -> DirectoryStore:
        return DirectoryStore(self.directory / "mirrors" / name)

    def evict(self, revisions: list[Revision]) -> None:
        from crflow.tasks.storage import evict_in_directory

        evict_in_directory(self.directory, revisions)


class ClaimStore(BlobStore):
    """A claim on a cluster node: the pod mounts it, crflow cannot read it."""

    kind = "pvc"

    def __init__(self, node_volume: HostPathVolume | None):
        self.node_volume = node_volume

    def checks(self, digest: str) -> list[Check]:
        return []  # the pod-storage check says the pod mounts the claim; its files are the node's

    def of_mirror(self, name: str) -> ClaimStore:
        return self  # the same claim, as unreadable from here under mirrors/NAME


class BucketStore(BlobStore):
    kind = "s3"

    def __init__(self, storage: S3Storage, read_keys: Callable[[], S3Keys]):
        self.storage, self.bucket, self._read_keys = storage, storage.bucket, read_keys

    @cached_property
    def s3(self) -> S3Endpoint:
        from crflow.tasks.storage import S3Endpoint

        storage = self.storage
        return S3Endpoint(storage.endpoint, storage.region, storage.ca_bundle, storage.skip_verify)

    @cached_property
    def keys(self) -> S3Keys:
        """The S3 keys, read once per run (from MinIO's Secret on the cluster)."""
        return self._read_keys()

    def prepare(self) -> None:
        from crflow.tasks.storage import ensure_bucket

        ensure_bucket(self.s3, self.storage.bucket, self.keys)

    def s3_secret(self) -> tuple[tuple[SecretStr, SecretStr] | None, str | None]:
        return (self.keys.access_key, self.keys.secret_key), self.storage.ca_pem()

    def diagnose(self, registry_said: str) -> Check:
        from crflow.tasks.storage import bucket_present

        return Check("diagnose the storage", bucket_present, (self.s3, self.storage.bucket, self.keys, registry_said))

    def checks(self, digest: str) -> list[Check]:
        from crflow.tasks.storage import blob_in_bucket

        return [Check("the layer is in the bucket", blob_in_bucket,
                      (self.s3, self.storage.bucket, self.storage.root_directory, self.keys, digest))]

    def stored_blobs(self) -> dict[str, int]:
        from crflow.tasks.storage import stored_blobs_in_bucket

        return stored_blobs_in_bucket(self.s3, self.storage.bucket, self.storage.root_directory, self.keys)

    def manifest_revisions(self) -> list[Revision]:
        from crflow.tasks.storage import manifest_revisions_in_bucket

        return manifest_revisions_in_bucket(self.s3, self.storage.bucket, self.storage.root_directory, self.keys)

    def of_mirror(self, name: str) -> BucketStore:
        root = f"{self.storage.root_directory.rstrip('/')}/mirrors/{name}"
        return BucketStore(self.storage.model_copy(update={"root_directory": root}), lambda: self.keys)

    def evict(self, revisions: list[Revision]) -> None:
        from crflow.tasks.storage import evict_in_bucket

        evict_in_bucket(self.s3, self.storage.bucket, self.storage.root_directory, self.keys, revisions)

    def kept_after_purge(self) -> list[str]:
        return [f"the images in bucket {self.storage.bucket} (delete them in the S3 service)"]

    def result_cache(self, name: str, results: ResultStorage) -> S3Results:
        from crflow.tasks.storage import ensure_bucket, results_in_bucket

        ensure_bucket(self.s3, results.bucket, self.keys)
        return results_in_bucket(name, self.s3, results.bucket, results.prefix, self.keys)


def blob_store(site: Site, read_keys: Callable[[], S3Keys]) -> BlobStore:
    """The store of `site`'s storage; `read_keys` reads the S3 keys when first needed."""
    storage = site.storage
    match storage:
        case S3Storage():
            return BucketStore(storage, read_keys)
        case PvcStorage():
            return ClaimStore(storage.host_path)
        case FilesystemStorage():
            return DirectoryStore(site.data_dir)
    raise TypeError(f"no blob store for {type(storage).__name__}")
