"""How do we know the registry works? Ask it, as a client would: with the client files crflow
wrote (ca.crt and auth.json, see tasks/client.py), over TLS trusting only that CA, and by
pushing and pulling a real image.

    with Registry.from_bundle("https://127.0.0.1:5000", Path("state/client")) as registry:
        registry.ping()
        digest = registry.push_image("crflow-smoke", "install", tiny_image({"a": b"b"}))

The transport is python-dxf. Before choosing, python-dxf 12.1.1 and oras-py 0.2.43 were
measured against the need here (200 MiB incompressible layer, filesystem storage, TLS and
htpasswd on loopback, 1 MiB chunks): python-dxf pushed at 157-194 MiB/s (streamed from the
file, after its own hashing pass) and pulled with its sha256 check at 559-605 MiB/s, peak
RSS 30 MiB. That is on a par with curl, the practical limit (TESTBED: ~130 MiB/s push,
~530 MiB/s pull). It does Basic auth, a CA file, cross-repo mount, and OCI and Docker
manifests and indexes. oras-py does not meet the need: its `put_upload` reads the whole blob
into memory, and its `download_blob` checks no digest. Written here, on top of python-dxf,
are only what it lacks: errors a person can act on, and images as blobs
(bench/push_pull.py keeps the figures current).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import tarfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import requests
from cryptography import x509
from dxf import DXF, DXFBase
from dxf.exceptions import DXFUnauthorizedError
from prefect import task
from pydantic import BaseModel

from crflow.errors import CrflowError, transient_only
from tasks.pki import served_certificate

SMOKE_REPO = "crflow-smoke"  # where crflow's own check images go
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
CHUNK = 1 << 20  # 1 MiB reads: python-dxf's default of 8 KiB costs half the pull speed


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Image:
    """An image as blobs: a config, its layers and the manifest that lists them."""

    config: bytes
    layers: list[bytes]

    @property
    def manifest(self) -> bytes:
        def descriptor(media_type: str, blob: bytes) -> dict:
            return {"mediaType": media_type, "digest": digest_of(blob), "size": len(blob)}

        return json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": descriptor(OCI_CONFIG, self.config),
                "layers": [descriptor(OCI_LAYER_TAR, layer) for layer in self.layers],
            },
            sort_keys=True,
        ).encode()


def tiny_image(files: dict[str, bytes]) -> Image:
    """A one-layer linux image holding `files` (an uncompressed tar, so diff_id == digest)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(content), 0o644, 0
            tar.addfile(info, io.BytesIO(content))
    layer = buffer.getvalue()
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [digest_of(layer)]},
    }
    return Image(config=json.dumps(config, sort_keys=True).encode(), layers=[layer])


def read_bundle(bundle_dir: Path, server: str) -> tuple[str, str]:
    """(user, password) for `server` from the bundle's auth.json."""
    try:
        auths = json.loads((bundle_dir / "auth.json").read_text())["auths"]
        user, _, password = base64.b64decode(auths[server]["auth"]).decode().partition(":")
    except (OSError, ValueError, KeyError):
        raise CrflowError(f"no login for {server} in {bundle_dir / 'auth.json'} (run crflow install first)") from None
    return user, password


def served_names(host: str, port: int) -> str:
    """The names in the certificate a server presents, for an error message (not verified)."""
    try:
        san = served_certificate(host, port).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return ", ".join([str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
                         + san.get_values_for_type(x509.DNSName)) or "none"
    except (OSError, ValueError, x509.ExtensionNotFound):
        return "unknown"


class Registry:
    """A registry client for one registry, one login and one CA file (python-dxf underneath)."""

    def __init__(self, base_url: str, ca_file: Path, user: str, password: str, timeout: float = 60):
        parts = urlsplit(base_url)
        self.base_url, self.host, self.port = base_url.rstrip("/"), parts.hostname, parts.port or 443
        self.ca_file, self.user, self.timeout = ca_file, user, timeout
        self._password = password
        # A DXF with no repository: its api_version_check is GET /v2/, and it lists the catalog.
        self.base = DXF(parts.netloc, "", auth=self._auth, tlsverify=str(ca_file), timeout=timeout).__enter__()
        self.repos: dict[str, DXF] = {}  # each with its own keep-alive session

    @classmethod
    def from_bundle(cls, base_url: str, bundle_dir: Path, timeout: float = 60) -> Registry:
        user, password = read_bundle(bundle_dir, urlsplit(base_url).netloc)
        return cls(base_url, bundle_dir / "ca.crt", user, password, timeout)

    def _auth(self, dxf: DXFBase, response: requests.Response) -> None:
        dxf.authenticate(self.user, self._password, response=response)

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc) -> None:
        for client in [self.base, *self.repos.values()]:
            client.__exit__()

    def repo(self, name: str) -> DXF:
        if name not in self.repos:
            self.repos[name] = DXF.from_base(self.base, name).__enter__()
        return self.repos[name]

    def call(self, what: str, action, *args, **kwargs):
        """One client action, with the failures a person can act on turned into CrflowError;
        a registry that does not answer raises ConnectionError (tasks retry it)."""
        try:
            return action(*args, **kwargs)
        except DXFUnauthorizedError:
            raise CrflowError(f"registry at {self.base_url} rejected user {self.user}: wrong user or password (401)") from None
        except requests.exceptions.SSLError:
            raise CrflowError(
                f"TLS verification of {self.base_url} failed: its certificate is not signed by the CA in "
                f"{self.ca_file}, or does not name this address (it names: {served_names(self.host, self.port)})"
            ) from None
        except requests.exceptions.ConnectionError as err:
            reason = re.search(r"\[Errno -?\d+\] [^'\")]+", str(err))
            raise ConnectionError(f"registry at {self.base_url} is not answering"
                                  f"{': ' + reason.group(0) if reason else ''}") from None
        except requests.exceptions.HTTPError as err:
            response = err.response
            detail = response.text[:300].strip() if response is not None else ""
            status = response.status_code if response is not None else "?"
            driver = re.search(r'"DriverName":"(\w+)"', detail)
            if driver:  # distribution's storage driver failed; its body holds no more than the driver's name
                detail = f"the registry's storage ({driver.group(1)}) failed: {detail}"
            problem = f"{what} at {self.base_url} failed with {status}: {detail}"
            raise (ConnectionError if isinstance(status, int) and status in (502, 503, 504) else CrflowError)(problem) from None

    def ping(self) -> None:
        """GET /v2/ with the login: the registry is up, trusts us, and we trust it."""
        self.call("GET /v2/", self.base.api_version_check)

    def push_blob(self, repo: str, blob: bytes) -> str:
        digest = digest_of(blob)
        self.call(f"upload of {digest} to {repo}", self.repo(repo).push_blob,
                  data=iter([blob]), digest=digest, check_exists=False)
        return digest

    def push_image(self, repo: str, tag: str, image: Image) -> str:
        for blob in [image.config, *image.layers]:
            self.push_blob(repo, blob)
        self.call(f"PUT manifest {repo}:{tag}", self.repo(repo).set_manifest, tag, image.manifest.decode())
        return digest_of(image.manifest)

    def pull_blob(self, repo: str, digest: str) -> bytes:
        """A blob, read in 1 MiB chunks; python-dxf checks its sha256 against `digest`."""
        chunks = self.call(f"GET blob {digest} from {repo}", self.repo(repo).pull_blob, digest, chunk_size=CHUNK)
        return b"".join(self.call(f"GET blob {digest} from {repo}", list, chunks))

    def pull_image(self, repo: str, ref: str) -> Image:
        manifest, _ = self.call(f"GET manifest {repo}:{ref}", self.repo(repo).get_manifest_and_response, ref)
        document = json.loads(manifest)
        return Image(config=self.pull_blob(repo, document["config"]["digest"]),
                     layers=[self.pull_blob(repo, d["digest"]) for d in document["layers"]])


def probe(base_url: str, bundle_dir: Path) -> str:
    """One authenticated GET /v2/ with a client bundle (ca.crt, auth.json): a line saying how it went."""
    try:
        with Registry.from_bundle(base_url, bundle_dir, timeout=5) as registry:
            registry.ping()
    except (CrflowError, ConnectionError) as err:
        message = str(err)
        return message if message.startswith("no login") else f"NOT OK: {message}"
    return f"answers over TLS, login of user {registry.user} accepted"


@task(retries=3, retry_delay_seconds=[1, 2, 4], retry_condition_fn=transient_only)
def wait_until_ready(base_url: str, bundle_dir: Path, timeout: float = 30) -> float:
    """Poll GET /v2/ with the client files until it answers 200; return the seconds it took."""
    started = time.monotonic()
    with Registry.from_bundle(base_url, bundle_dir, timeout=5) as registry:
        while True:
            try:
                registry.ping()
                return time.monotonic() - started
            except ConnectionError:
                if time.monotonic() - started > timeout:
                    raise
                time.sleep(0.2)


@task(retries=2, retry_delay_seconds=2, retry_condition_fn=transient_only)
def push_pull_check(base_url: str, bundle_dir: Path, repo: str, tag: str) -> str:
    """Push a tiny generated image, pull it back, and compare it blob by blob; return its digest."""
    image = tiny_image({"crflow-check": f"{repo}:{tag}\n".encode()})
    with Registry.from_bundle(base_url, bundle_dir) as registry:
        digest = registry.push_image(repo, tag, image)
        if registry.pull_image(repo, digest) != image:
            raise CrflowError(f"the image pulled from {base_url}/{repo}@{digest} differs from the one pushed")
    return digest


class Pushed(BaseModel):
    """What a check pushed: the manifest digest, its blobs' digests, and how long it took."""

    repo: str
    tag: str
    digest: str
    blobs: list[str]
    bytes: int
    seconds: float


def unique_image(layer_bytes: int) -> Image:
    """An image no registry has seen: its layer holds random bytes, so the upload path is
    really exercised (a known blob would be skipped or mounted)."""
    return tiny_image({"crflow-verify/payload": os.urandom(layer_bytes),
                       "crflow-verify/id": uuid.uuid4().hex.encode()})


@task(retries=2, retry_delay_seconds=[2, 5], retry_condition_fn=transient_only)
def push_unique_image(base_url: str, bundle_dir: Path, repo: str, layer_bytes: int = 8 << 20) -> Pushed:
    """Push a freshly made image (tag: the time of the run) and time the upload."""
    image, tag = unique_image(layer_bytes), time.strftime("verify-%Y%m%d-%H%M%S")
    with Registry.from_bundle(base_url, bundle_dir) as registry:
        started = time.perf_counter()
        digest = registry.push_image(repo, tag, image)
        seconds = time.perf_counter() - started
    blobs = [digest_of(b) for b in [image.config, *image.layers]]
    return Pushed(repo=repo, tag=tag, digest=digest, blobs=blobs, seconds=seconds,
                  bytes=len(image.manifest) + sum(len(b) for b in [image.config, *image.layers]))


@task(retries=2, retry_delay_seconds=[2, 5], retry_condition_fn=transient_only)
def pull_and_compare(base_url: str, bundle_dir: Path, pushed: Pushed) -> float:
    """Pull the image back by digest; every blob's sha256 must match what was pushed. Returns seconds."""
    with Registry.from_bundle(base_url, bundle_dir) as registry:
        started = time.perf_counter()
        manifest, _ = registry.call(f"GET manifest {pushed.repo}@{pushed.digest}",
                                    registry.repo(pushed.repo).get_manifest_and_response, pushed.digest)
        if digest_of(manifest.encode()) != pushed.digest:
            raise CrflowError(f"the manifest of {pushed.repo}@{pushed.digest} came back with another digest")
        document = json.loads(manifest)
        listed = [document["config"]["digest"], *(d["digest"] for d in document["layers"])]
        if listed != pushed.blobs:
            raise CrflowError(f"the manifest of {pushed.repo}@{pushed.digest} lists other blobs than were pushed")
        for digest in listed:
            registry.pull_blob(pushed.repo, digest)  # python-dxf checks each blob's sha256
        return time.perf_counter() - started


@task(retries=2, retry_delay_seconds=[2, 5], retry_condition_fn=transient_only)
def listed_in_catalog(base_url: str, bundle_dir: Path, repo: str, tag: str) -> None:
    """/v2/_catalog shows the repository and its tags/list shows the tag."""
    with Registry.from_bundle(base_url, bundle_dir) as registry:
        repos = registry.call("GET /v2/_catalog", registry.base.list_repos)
        tags = registry.call(f"GET /v2/{repo}/tags/list", registry.repo(repo).list_aliases)
    if repo not in repos:
        raise CrflowError(f"/v2/_catalog of {base_url} does not list {repo}")
    if tag not in tags:
        raise CrflowError(f"/v2/{repo}/tags/list of {base_url} does not list {tag}")


@task(retries=2, retry_delay_seconds=[2, 5], retry_condition_fn=transient_only)
def delete_by_digest(base_url: str, bundle_dir: Path, repo: str, digest: str) -> None:
    """Delete the manifest by digest (the registry refuses deletes by tag), and see it gone."""
    with Registry.from_bundle(base_url, bundle_dir) as registry:
        client = registry.repo(repo)
        registry.call(f"DELETE manifest {repo}@{digest}", client.del_alias, digest)
        try:
            client.get_manifest_and_response(digest)
        except requests.exceptions.HTTPError as err:
            if err.response is not None and err.response.status_code == 404:
                return
            raise
    raise CrflowError(f"{repo}@{digest} is still served after its deletion")
