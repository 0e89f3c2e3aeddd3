"""How do we know the registry works? Ask it, as a client would: over TLS trusting only our
CA, with the generated login, and by pushing and pulling a real (tiny) image.

    with Registry("https://127.0.0.1:5000", ca_pem, creds) as registry:
        registry.ping()
        digest = registry.push_image("crflow-smoke", "install", image)

Protocol notes for distribution 2.8 (see TESTBED.md): an upload is POST then PUT with the
digest merged into the Location's own query (httpx's `params=` would drop `_state`).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import ssl
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode, urljoin

import httpx
from prefect import task

from crflow.errors import CrflowError, transient_only
from tasks.credentials import Credentials

SMOKE_REPO = "crflow-smoke"  # where crflow's own check images go
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"


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


class Registry:
    """A Docker Registry HTTP API v2 client for one registry, one login, one trusted CA."""

    def __init__(self, base_url: str, ca_pem: str, creds: Credentials, timeout: float = 30):
        self.base_url = base_url.rstrip("/")
        self.user = creds.user
        context = ssl.create_default_context(cadata=ca_pem)
        self.http = httpx.Client(
            base_url=self.base_url, verify=context, timeout=timeout,
            auth=(creds.user, creds.password.get_secret_value()),
        )

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc) -> None:
        self.http.close()

    def request(self, method: str, url: str, **kwargs) -> httpx.Response:
        """One request, with the failures a person can act on turned into CrflowError."""
        try:
            response = self.http.request(method, url, **kwargs)
        except httpx.ConnectError as err:
            if isinstance(err.__context__, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY" in str(err):
                raise CrflowError(
                    f"TLS verification of {self.base_url} failed: its certificate is not signed by the crflow CA "
                    f"or does not name this address ({err})"
                ) from None
            raise ConnectionError(f"registry at {self.base_url} is not answering: {err}") from None
        if response.status_code == 401:
            raise CrflowError(f"registry at {self.base_url} rejected user {self.user}: wrong user or password (401)")
        if response.status_code >= 400:
            detail = response.text[:300].strip()
            problem = f"{method} {url} at {self.base_url} failed with {response.status_code}: {detail}"
            raise (ConnectionError if response.status_code >= 500 else CrflowError)(problem)
        return response

    def ping(self) -> None:
        """GET /v2/ with credentials: the registry is up, trusts us, and we trust it."""
        self.request("GET", "/v2/")

    def push_blob(self, repo: str, blob: bytes) -> str:
        digest = digest_of(blob)
        location = self.request("POST", f"/v2/{repo}/blobs/uploads/").headers["Location"]
        separator = "&" if "?" in location else "?"
        upload_url = urljoin(self.base_url + "/", location) + separator + urlencode({"digest": digest})
        self.request("PUT", upload_url, content=blob, headers={"Content-Type": "application/octet-stream"})
        return digest

    def push_image(self, repo: str, tag: str, image: Image) -> str:
        for blob in [image.config, *image.layers]:
            self.push_blob(repo, blob)
        manifest = image.manifest
        self.request("PUT", f"/v2/{repo}/manifests/{tag}", content=manifest, headers={"Content-Type": OCI_MANIFEST})
        return digest_of(manifest)

    def pull_image(self, repo: str, ref: str) -> Image:
        """Fetch a manifest and its blobs, checking every digest against what was fetched."""
        manifest = self.request("GET", f"/v2/{repo}/manifests/{ref}", headers={"Accept": OCI_MANIFEST}).content
        document = json.loads(manifest)

        def fetch(descriptor: dict) -> bytes:
            blob = self.request("GET", f"/v2/{repo}/blobs/{descriptor['digest']}").content
            if digest_of(blob) != descriptor["digest"]:
                raise CrflowError(f"blob {descriptor['digest']} from {self.base_url} does not match its digest")
            return blob

        return Image(config=fetch(document["config"]), layers=[fetch(d) for d in document["layers"]])


def probe(base_url: str, bundle_dir: Path) -> str:
    """One authenticated GET /v2/ with a client bundle (ca.crt, auth.json): a line saying how it went."""
    try:
        ca_pem = (bundle_dir / "ca.crt").read_text()
        ((server, entry),) = json.loads((bundle_dir / "auth.json").read_text())["auths"].items()
    except (OSError, ValueError, KeyError):
        return f"no client files in {bundle_dir} (not installed yet?)"
    user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
    creds = Credentials(user=user, password=password, id="client-bundle")
    try:
        with Registry(base_url, ca_pem, creds, timeout=5) as registry:
            registry.ping()
    except (CrflowError, ConnectionError) as err:
        return f"NOT OK: {err}"
    return f"answers over TLS, login of user {user} accepted"


@task(retries=3, retry_delay_seconds=[1, 2, 4], retry_condition_fn=transient_only)
def wait_until_ready(base_url: str, ca_pem: str, creds: Credentials, timeout: float = 30) -> float:
    """Poll GET /v2/ with the login until it answers 200; return the seconds it took."""
    started = time.monotonic()
    with Registry(base_url, ca_pem, creds, timeout=5) as registry:
        while True:
            try:
                registry.ping()
                return time.monotonic() - started
            except ConnectionError:
                if time.monotonic() - started > timeout:
                    raise


@task(retries=2, retry_delay_seconds=2, retry_condition_fn=transient_only)
def push_pull_check(base_url: str, ca_pem: str, creds: Credentials, repo: str, tag: str) -> str:
    """Push a tiny generated image, pull it back, and compare it blob by blob; return its digest."""
    image = tiny_image({"crflow-check": f"{repo}:{tag}\n".encode()})
    with Registry(base_url, ca_pem, creds) as registry:
        digest = registry.push_image(repo, tag, image)
        if registry.pull_image(repo, digest) != image:
            raise CrflowError(f"the image pulled from {base_url}/{repo}@{digest} differs from the one pushed")
    return digest
