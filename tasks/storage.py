"""Where do the registry's blobs go? A directory on this machine, or a bucket in MinIO (S3);
and where does a running registry pod really keep them? (And, with `result_storage:`, the
bucket that holds crflow's encrypted cache.)

    keys = read_s3_keys_file(Path("minio-keys.yaml"), "accesskey", "secretkey")
    minio = S3Endpoint("https://minio.local:9000", "us-east-1", ca_bundle=Path("minio-ca.crt"))
    ensure_bucket(minio, "container-registry", keys)
"""

from __future__ import annotations

import contextlib
import io
import ssl
from dataclasses import dataclass
from pathlib import Path

import urllib3
import yaml
from prefect import get_run_logger, task
from prefect.filesystems import WritableFileSystem
from pydantic import BaseModel, SecretStr

from crflow.chart import CONFIG_FILE, CONFIG_VOLUME, CONTAINER
from crflow.errors import CrflowError, transient_only
from crflow.files import private_dir, remove
from crflow.runcontext import open_run


class S3Keys(BaseModel):
    access_key: SecretStr
    secret_key: SecretStr


def read_s3_keys(path: Path, access_key_key: str, secret_key_key: str) -> S3Keys:
    """The S3 keys from a YAML file laid out like MinIO's secret (the local target's stand-in)."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise CrflowError(f"cannot read the S3 credentials file {path}: {err.strerror}") from None
    missing = [k for k in (access_key_key, secret_key_key) if not isinstance(data, dict) or not data.get(k)]
    if missing:
        raise CrflowError(f"the S3 credentials file {path} has no {' or '.join(missing)} key")
    return S3Keys(access_key=str(data[access_key_key]), secret_key=str(data[secret_key_key]))


@dataclass(frozen=True)
class S3Endpoint:
    """How to reach an S3 service (MinIO): plain values, so a task that takes one keys its
    cache on them. The keys that sign requests are never part of it."""

    url: str
    region: str = "us-east-1"
    ca_bundle: Path | None = None
    skip_verify: bool = False  # the user's loud opt-out of TLS verification

    def __str__(self) -> str:
        return self.url

    def client(self, keys: S3Keys):
        from minio import Minio  # imported when used: it costs every command ~0.15 s to load

        retries = urllib3.Retry(total=2, backoff_factor=0.5)
        if self.skip_verify:
            http = urllib3.PoolManager(cert_reqs=ssl.CERT_NONE, retries=retries)
        else:
            http = urllib3.PoolManager(cert_reqs=ssl.CERT_REQUIRED, retries=retries,
                                       ca_certs=str(self.ca_bundle) if self.ca_bundle else None)
        return Minio(self.url.split("://", 1)[1].rstrip("/"), access_key=keys.access_key.get_secret_value(),
                     secret_key=keys.secret_key.get_secret_value(), secure=self.url.startswith("https://"),
                     region=self.region, http_client=http)

    @contextlib.contextmanager
    def errors(self, bucket: str):
        """S3 failures as a person can act on them; an endpoint that does not answer is a ConnectionError."""
        from minio.error import S3Error

        try:
            yield
        except S3Error as err:
            if err.code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise CrflowError(f"S3 at {self} refused bucket {bucket} ({err.code}): check the credentials and "
                                  "their permissions") from None
            raise CrflowError(f"S3 at {self}, bucket {bucket}: {err.code}: {err.message}") from None
        except urllib3.exceptions.MaxRetryError as err:  # urllib3 wraps what went wrong in its retries
            if isinstance(err.reason, urllib3.exceptions.SSLError):
                raise CrflowError(f"TLS verification of S3 at {self} failed ({err.reason}); set storage.ca_bundle "
                                  "to the CA of its certificate, or storage.skip_verify: true to opt out") from None
            raise ConnectionError(f"S3 at {self} is not answering: {err.reason}") from None


def bucket_exists_or_create(s3: S3Endpoint, bucket: str, keys: S3Keys) -> bool:
    """Make the bucket unless it exists; return whether it was created."""
    client = s3.client(keys)
    with s3.errors(bucket):
        if client.bucket_exists(bucket):
            return False
        client.make_bucket(bucket, location=s3.region)
        return True


class S3Results(WritableFileSystem):
    """Prefect's result storage in an S3 bucket, under a prefix: where a site's encrypted cache
    lives with `result_storage:` in the site file. Each record is written once and never
    replaced (runs hold the site's lock): a run with a wrong key that made a record anew cannot
    overwrite the good one."""

    _block_type_name = "crflow S3 results"
    endpoint: str
    bucket: str
    prefix: str
    region: str
    ca_bundle: Path | None = None
    skip_verify: bool = False

    @property
    def s3(self) -> S3Endpoint:
        return S3Endpoint(self.endpoint, self.region, self.ca_bundle, self.skip_verify)

    def _object(self, path: str) -> str:
        return f"{self.prefix.strip('/')}/{Path(path).name}"  # Prefect may pass the key as a path

    def _client(self):
        # The keys are the run's, by (endpoint, bucket, prefix): Prefect stores a result storage
        # block's fields on its server, so they are never one of them; and two sites on one
        # endpoint may log in as two users, so the endpoint alone does not name them.
        keys = open_run("the result cache in S3").s3_keys.get((self.endpoint, self.bucket, self.prefix))
        if keys is None:
            raise CrflowError(f"no S3 keys for {self.endpoint}/{self.bucket}/{self.prefix} in this run: the "
                              "site's vault opens the cache")
        return self.s3.client(keys)

    def read_path(self, path: str, **_) -> bytes:
        client = self._client()
        with self.s3.errors(self.bucket):
            response = client.get_object(self.bucket, self._object(path))
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

    def write_path(self, path: str, content: bytes, **_) -> str:
        from minio.error import S3Error

        client, name = self._client(), self._object(path)
        with self.s3.errors(self.bucket):
            try:
                client.stat_object(self.bucket, name)
                return name  # held already: never replaced
            except S3Error as err:
                if err.code not in ("NoSuchKey", "NoSuchObject"):
                    raise
            client.put_object(self.bucket, name, io.BytesIO(content), len(content))
        return name


def results_in_bucket(name: str, s3: S3Endpoint, bucket: str, prefix: str, keys: S3Keys) -> S3Results:
    """The result storage for a bucket and prefix, saved as the block `name` (Prefect stores a
    task's result storage by reference; the block holds no key)."""
    open_run("the result cache in S3").s3_keys[(s3.url, bucket, prefix)] = keys
    storage = S3Results(endpoint=s3.url, bucket=bucket, prefix=prefix, region=s3.region, ca_bundle=s3.ca_bundle,
                        skip_verify=s3.skip_verify)
    storage.save(name, overwrite=True)
    return storage


@task(task_run_name="storage directory {path}")
def ensure_directory(path: Path) -> Path:
    """The directory the registry keeps blobs in (filesystem storage), private to its owner."""
    return private_dir(path)


@task(task_run_name="S3 keys from {path}")
def read_s3_keys_file(path: Path, access_key_key: str, secret_key_key: str) -> S3Keys:
    """The S3 keys, read from the local stand-in of MinIO's secret."""
    return read_s3_keys(path, access_key_key, secret_key_key)


@task(task_run_name="bucket {bucket}", retries=3, retry_delay_seconds=[2, 4, 8], retry_condition_fn=transient_only)
def ensure_bucket(s3: S3Endpoint, bucket: str, keys: S3Keys) -> bool:
    """The registry's bucket exists (made if missing). True when this run created it."""
    if s3.skip_verify:
        get_run_logger().warning("TLS verification of %s is OFF (storage.skip_verify: true)", s3)
    return bucket_exists_or_create(s3, bucket, keys)


def blob_key(digest: str, root_directory: str = "") -> str:
    """Where distribution keeps a blob in its storage, relative to the driver's root."""
    hex_digest = digest.split(":", 1)[1]
    return f"{root_directory.strip('/') + '/' if root_directory.strip('/') else ''}docker/registry/v2/blobs/sha256/{hex_digest[:2]}/{hex_digest}/data"


@task(task_run_name="layer in bucket {bucket}",
      retries=2, retry_delay_seconds=[2, 5], retry_condition_fn=transient_only)
def blob_in_bucket(s3: S3Endpoint, bucket: str, root_directory: str, keys: S3Keys, digest: str) -> str:
    """The blob is an object in the bucket (so it landed in S3, not on a pod's disk)."""
    client = s3.client(keys)
    from minio.error import S3Error

    key = blob_key(digest, root_directory)
    with s3.errors(bucket):
        try:
            client.stat_object(bucket, key)
        except S3Error as err:
            if err.code != "NoSuchKey":
                raise
            raise CrflowError(f"blob {digest} is not in bucket {bucket} at {s3}: the registry is not "
                              "storing into it") from None
    return f"s3://{bucket}/{key}"


@task(task_run_name="bucket {bucket} present?",
      retries=2, retry_delay_seconds=[2, 5], retry_condition_fn=transient_only)
def bucket_present(s3: S3Endpoint, bucket: str, keys: S3Keys, registry_said: str) -> None:
    """After the registry's storage failed: say so plainly if the cause is a missing bucket."""
    client = s3.client(keys)
    with s3.errors(bucket):
        if not client.bucket_exists(bucket):
            raise CrflowError(f"bucket {bucket} does not exist at {s3} (run crflow install to make it); "
                              f"the registry said: {registry_said}")


@task(task_run_name="layer under {root}")
def blob_in_directory(root: Path, digest: str) -> str:
    """The blob is a file under the registry's storage directory on this machine."""
    path = root / blob_key(digest)
    if not path.is_file():
        raise CrflowError(f"blob {digest} is not under {root}: the registry is not storing there")
    return str(path)


def pod_storage(pod: dict) -> tuple[str, str]:
    """Where a running registry pod keeps blobs, read from its template and config:
    ("s3", bucket), ("pvc", claim), ("emptyDir", volume) or ("hostPath", path)."""
    spec = pod["template"]["spec"]
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    config_map = volumes[CONFIG_VOLUME]["configMap"]["name"]
    storage = yaml.safe_load(pod["configMaps"][config_map][CONFIG_FILE]).get("storage", {})
    if "s3" in storage:
        return "s3", storage["s3"].get("bucket", "")
    root = (storage.get("filesystem") or {}).get("rootdirectory", "/var/lib/registry")
    (container,) = [c for c in spec["containers"] if c["name"] == CONTAINER]
    mounts = [m for m in container.get("volumeMounts") or [] if root.startswith(m["mountPath"])]
    if not mounts:
        return "emptyDir", "(the container's own filesystem)"
    volume = volumes[max(mounts, key=lambda m: len(m["mountPath"]))["name"]]
    if "persistentVolumeClaim" in volume:
        return "pvc", volume["persistentVolumeClaim"]["claimName"]
    if "hostPath" in volume:
        return "hostPath", volume["hostPath"]["path"]
    return "emptyDir", volume["name"]


@task(task_run_name="pod storage is {storage_kind}")
def check_pod_storage(pod: dict, storage_kind: str, bucket: str | None) -> str:
    """The running pod stores blobs where the site says: in `bucket`, or (None) on a claim."""
    kind, where = pod_storage(pod)
    if bucket is not None and (kind, where) != ("s3", bucket):
        raise CrflowError(f"the registry pod stores blobs in {kind} {where}, not in S3 bucket {bucket} as "
                          f"storage.kind: {storage_kind} says; run crflow install (or upgrade) to fix the release")
    if bucket is None and kind not in ("pvc", "hostPath"):
        lost = " (lost when the pod goes)" if kind == "emptyDir" else ""
        raise CrflowError(f"the registry pod stores blobs in {kind} {where}{lost}, although storage.kind is "
                          f"{storage_kind}; run crflow install (or upgrade) to fix the release")
    return f"{kind} {where}"


BLOBS = "docker/registry/v2/blobs"  # distribution's layout: BLOBS/sha256/ab/abcd.../data


@task(task_run_name="stored blobs under {root}")
def stored_blobs_in_directory(root: Path) -> dict[str, int]:
    """digest -> bytes of every blob the filesystem driver holds under `root`."""
    found = {}
    for data in (root / BLOBS).glob("*/*/*/data"):
        found[f"{data.parent.parent.parent.name}:{data.parent.name}"] = data.stat().st_size
    return found


@task(task_run_name="stored blobs in bucket {bucket}", retries=2, retry_delay_seconds=[2, 5],
      retry_condition_fn=transient_only)
def stored_blobs_in_bucket(s3: S3Endpoint, bucket: str, root_directory: str, keys: S3Keys) -> dict[str, int]:
    """digest -> bytes of every blob the S3 driver holds in the bucket (one listing)."""
    prefix = f"{root_directory.strip('/')}/{BLOBS}/".lstrip("/")
    found = {}
    with s3.errors(bucket):
        client = s3.client(keys)
        for obj in client.list_objects(bucket, prefix=prefix, recursive=True):
            parts = obj.object_name[len(prefix):].split("/")  # sha256, ab, abcd..., data
            if len(parts) == 4 and parts[3] == "data":
                found[f"{parts[0]}:{parts[2]}"] = obj.size
    return found


REPOSITORIES = "docker/registry/v2/repositories"


class Revision(BaseModel):
    """A manifest a repository holds, as the storage records it."""

    repo: str
    digest: str
    pushed: float  # when its revision link was written (seconds since the epoch)
    tagged: bool  # some tag's current link names it
    tags: list[str] = []  # the tags whose current link names it

    def paths(self) -> list[str]:
        """Its folders under REPOSITORIES: the revision link, and each tag that names it (their
        removal is an eviction; the blobs go at the next `garbage-collect`)."""
        algorithm, _, hex_digest = self.digest.partition(":")
        return [f"{self.repo}/_manifests/revisions/{algorithm}/{hex_digest}",
                *(f"{self.repo}/_manifests/tags/{tag}" for tag in self.tags)]


def _revisions(entries: list[tuple[str, float]], read) -> list[Revision]:
    """From (path under REPOSITORIES, time) of every link file, and a reader of a link's content."""
    revisions, tags = {}, {}
    for path, when in entries:
        repo, marker, rest = path.partition("/_manifests/")
        if not marker:
            continue
        parts = rest.split("/")
        if parts[0] == "revisions" and len(parts) == 4 and parts[3] == "link":
            revisions[(repo, f"{parts[1]}:{parts[2]}")] = when
        elif parts[0] == "tags" and len(parts) == 4 and parts[2:] == ["current", "link"]:
            tags.setdefault((repo, read(path).strip()), []).append(parts[1])
    return [Revision(repo=repo, digest=digest, pushed=when, tagged=(repo, digest) in tags,
                     tags=sorted(tags.get((repo, digest), [])))
            for (repo, digest), when in sorted(revisions.items())]


@task(task_run_name="manifests under {root}")
def manifest_revisions_in_directory(root: Path) -> list[Revision]:
    base = root / REPOSITORIES
    entries = [(str(p.relative_to(base)), p.stat().st_mtime) for p in base.rglob("link")] if base.is_dir() else []
    return _revisions(entries, lambda path: (base / path).read_text())


@task(task_run_name="manifests in bucket {bucket}", retries=2, retry_delay_seconds=[2, 5],
      retry_condition_fn=transient_only)
def manifest_revisions_in_bucket(s3: S3Endpoint, bucket: str, root_directory: str, keys: S3Keys) -> list[Revision]:
    prefix = f"{root_directory.strip('/')}/{REPOSITORIES}/".lstrip("/")
    with s3.errors(bucket):
        client = s3.client(keys)
        entries = [(o.object_name[len(prefix):], o.last_modified.timestamp())
                   for o in client.list_objects(bucket, prefix=prefix, recursive=True) if o.object_name.endswith("/link")]

        def read(path: str) -> str:
            response = client.get_object(bucket, prefix + path)
            try:
                return response.read().decode()
            finally:
                response.close()
                response.release_conn()

        return _revisions(entries, read)


def _eviction_run_name(parameters: dict) -> str:
    """The eviction's run name: how many manifests go, and from where (a folder or a bucket)."""
    where = f"in bucket {parameters['bucket']}" if "bucket" in parameters else f"under {parameters['root']}"
    return f"evict {len(parameters['revisions'])} manifests {where}"


@task(task_run_name=_eviction_run_name)
def evict_in_directory(root: Path, revisions: list[Revision]) -> None:
    """Remove the revisions' links and tags from the filesystem driver's tree under `root`
    (fd-based, so no link planted in the tree redirects a removal)."""
    for revision in revisions:
        for path in revision.paths():
            remove(root / REPOSITORIES / path)


@task(task_run_name=_eviction_run_name, retries=2, retry_delay_seconds=[2, 5], retry_condition_fn=transient_only)
def evict_in_bucket(s3: S3Endpoint, bucket: str, root_directory: str, keys: S3Keys, revisions: list[Revision]) -> None:
    """Remove the revisions' links and tags from the S3 driver's objects in the bucket (a rerun
    after a fault finds fewer objects: removal is idempotent)."""
    from minio.deleteobjects import DeleteObject

    prefix = f"{root_directory.strip('/')}/{REPOSITORIES}/".lstrip("/")
    with s3.errors(bucket):
        client = s3.client(keys)
        doomed = [DeleteObject(o.object_name) for revision in revisions for path in revision.paths()
                  for o in client.list_objects(bucket, prefix=f"{prefix}{path}/", recursive=True)]
        failed = list(client.remove_objects(bucket, doomed))  # (lazy: the listing sends the requests)
        if failed:
            raise CrflowError(f"S3 did not delete {len(failed)} of the evicted objects in bucket {bucket}: "
                              f"{failed[0].code} on {failed[0].name}")
