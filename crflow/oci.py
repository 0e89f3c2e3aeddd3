"""crflow's registry client: the Docker Registry HTTP API v2 over python-dxf, for one
registry, one login and one CA file, with errors a person can act on. No Prefect here: a
client process that only moves bytes should not pay for an orchestrator's import.

    with Registry.from_bundle("https://127.0.0.1:5000", Path("state/client")) as registry:
        registry.ping()
        digest = registry.push_image("crflow-smoke", "install", tiny_image({"a": b"b"}))

The transport is python-dxf. Before choosing, python-dxf 12.1.1 and oras-py 0.2.43 were
measured against the need here (200 MiB incompressible layer, filesystem storage, TLS and
htpasswd on loopback, 1 MiB chunks): python-dxf pushed at 157-194 MiB/s (streamed from the
file, after its own hashing pass) and pulled with its sha256 check at 559-605 MiB/s, peak
RSS 30 MiB. That is on a par with curl, the practical limit (measured here: ~130 MiB/s push,
~530 MiB/s pull). It does Basic auth, a CA file, cross-repo mount, and OCI and Docker
manifests and indexes. oras-py does not meet the need: its `put_upload` reads the whole blob
into memory, and its `download_blob` checks no digest. Written here, on top of python-dxf,
are only what it lacks: errors a person can act on, streaming to and from files in 1 MiB
chunks, copying an image or index between registries, and images as blobs.

bench/push_pull.py, this machine, median of 3, each client a process (MiB/s, crflow/curl):
200 MiB: push 135 (1.11), pull 150 (0.74); 1 GiB: push 158 (1.10), pull 292 (1.20); skopeo
117-178; crflow's peak RSS 50 MiB at 1 GiB. Below ~200 MiB a pull is short enough that
Python's start (~0.25 s) costs it the 0.8x-curl target.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import os
import re
import ssl
import tarfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import requests
from cryptography import x509
from dxf import DXF, DXFBase
from dxf.exceptions import DXFUnauthorizedError

from crflow.errors import CrflowError, LoginRefused, NotAnswering, NotInstalled, StorageFailure, TlsFailure, in_chain

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


def read_login(auth_file: Path, server: str) -> tuple[str, str]:
    """(user, password) for `server` from a containers-auth / docker config file."""
    try:
        auths = json.loads(auth_file.read_text())["auths"]
        user, _, password = base64.b64decode(auths[server]["auth"]).decode().partition(":")
    except (OSError, ValueError, KeyError):
        raise CrflowError(f"no login for {server} in {auth_file}") from None
    return user, password


def served_certificate(host: str, port: int) -> x509.Certificate:
    """The certificate a TLS server presents (read only: not verified)."""
    return x509.load_pem_x509_certificate(ssl.get_server_certificate((host, port), timeout=5).encode())


def served_names(host: str, port: int) -> str:
    """The names in the certificate a server presents, for an error message (not verified)."""
    try:
        san = served_certificate(host, port).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return ", ".join([str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
                         + san.get_values_for_type(x509.DNSName)) or "none"
    except (OSError, ValueError, x509.ExtensionNotFound):
        return "unknown"


def _verification_failed(err: BaseException) -> bool:
    """Whether an SSL error is the certificate failing verification (wrong CA, wrong name),
    found as its type in the chain requests and urllib3 wrap around it."""
    return in_chain(err, ssl.SSLCertVerificationError) is not None


class Registry:
    """A registry client for one registry, one login and one CA file (python-dxf underneath)."""

    def __init__(self, base_url: str, ca_file: Path | None, user: str | None, password: str | None,
                 timeout: float = 60):
        parts = urlsplit(base_url)
        self.base_url, self.host, self.port = base_url.rstrip("/"), parts.hostname, parts.port or 443
        self.ca_file, self.user, self.timeout = ca_file, user, timeout
        self._password = password
        # A DXF with no repository: its api_version_check is GET /v2/, and it lists the catalog.
        self.base = DXF(parts.netloc, "", auth=self._auth if user else None,
                        tlsverify=str(ca_file) if ca_file else True, timeout=timeout).__enter__()
        self.repos: dict[str, DXF] = {}  # each with its own keep-alive session

    @classmethod
    def from_bundle(cls, base_url: str, bundle_dir: Path, timeout: float = 60) -> Registry:
        """With the client files crflow wrote (ca.crt, auth.json); NotInstalled if there are none."""
        if not (bundle_dir / "auth.json").exists():
            raise NotInstalled(f"no client files in {bundle_dir}: the registry is not installed yet")
        user, password = read_login(bundle_dir / "auth.json", urlsplit(base_url).netloc)
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
        """One client action, with the failures a person can act on turned into their types
        (crflow/errors.py); a registry that does not answer raises NotAnswering (tasks retry it)."""
        try:
            return action(*args, **kwargs)
        except DXFUnauthorizedError:
            raise LoginRefused(f"registry at {self.base_url} rejected user {self.user}: wrong user or password (401)") from None
        except requests.exceptions.SSLError as err:
            if not _verification_failed(err):  # a handshake cut short (a restart): nothing answers yet
                raise NotAnswering(f"registry at {self.base_url} is not answering: the TLS handshake was cut "
                                   "short") from None
            raise TlsFailure(
                f"TLS verification of {self.base_url} failed: its certificate is not signed by the CA in "
                f"{self.ca_file}, or does not name this address (it names: {served_names(self.host, self.port)})"
            ) from None
        except requests.exceptions.ConnectionError as err:
            reason = re.search(r"\[Errno -?\d+\] [^'\")]+", str(err))
            raise NotAnswering(f"registry at {self.base_url} is not answering"
                                  f"{': ' + reason.group(0) if reason else ''}") from None
        except requests.exceptions.HTTPError as err:
            response = err.response
            detail = response.text[:300].strip() if response is not None else ""
            status = response.status_code if response is not None else "?"
            driver = re.search(r'"DriverName":"(\w+)"', detail)
            if driver:  # distribution's storage driver failed; its body holds no more than the driver's name
                if re.search(r'"Err":13\b', response.text):  # EACCES: a folder the registry's user cannot write
                    raise StorageFailure(f"{what} at {self.base_url} failed with {status}: the registry may not write "
                                         "its storage (permission denied): the folder is not its user's") from None
                if re.search(r'"Err":28\b', response.text):  # ENOSPC, as the filesystem driver reports it
                    raise StorageFailure(f"{what} at {self.base_url} failed with {status}: the registry's storage "
                                         "is full (no space left on device); free space where it stores blobs") from None
                raise StorageFailure(f"{what} at {self.base_url} failed with {status}: the registry's storage "
                                     f"({driver.group(1)}) failed: {detail}") from None
            if status == 400 and not detail:  # what distribution answers when its htpasswd cannot be read
                raise CrflowError(f"{what} at {self.base_url} failed with 400 and no reason: the registry could not "
                                  "check the login (its htpasswd file is missing or unreadable); run crflow install "
                                  "to write it again") from None
            if status == 405 and what.startswith(("PUT", "POST", "PATCH", "DELETE", "push", "upload", "delete")):
                raise CrflowError(f"{what} at {self.base_url} was refused (405): the registry is read-only "
                                  "(maintenance), as in a gc's window; crflow status says whether a gc is running "
                                  "and ends one a stopped gc left") from None
            problem = f"{what} at {self.base_url} failed with {status}: {detail}"
            raise (NotAnswering if isinstance(status, int) and status in (502, 503, 504) else CrflowError)(problem) from None

    def ping(self) -> None:
        """GET /v2/ with the login: the registry is up, trusts us, and we trust it."""
        self.call("GET /v2/", self.base.api_version_check)

    def upload_refused(self, repo: str = "crflow-gc-probe") -> bool:
        """Is a blob upload refused (405, distribution's read-only mode)? An upload it starts is
        cancelled at once; a registry that does not answer (restarting) counts as not refusing."""
        import httpx  # only gc asks

        context = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        auth = (self.user, self._password) if self.user else None
        try:
            with httpx.Client(verify=context, auth=auth, timeout=self.timeout) as http:
                started = http.post(f"{self.base_url}/v2/{repo}/blobs/uploads/")
                if started.status_code == 202 and "location" in started.headers:
                    http.delete(urljoin(f"{self.base_url}/", started.headers["location"]))
        except httpx.TransportError:
            return False
        if started.status_code not in (202, 405):
            raise CrflowError(f"POST upload to {repo} at {self.base_url} failed with {started.status_code}")
        return started.status_code == 405

    def push_blob(self, repo: str, blob: bytes) -> str:
        digest = digest_of(blob)
        self.call(f"upload of {digest} to {repo}", self.repo(repo).push_blob,
                  data=iter([blob]), digest=digest, check_exists=False)
        return digest

    def push_file(self, repo: str, path: Path, digest: str) -> None:
        """Stream a blob from a file in 1 MiB chunks (its digest known, so one read pass)."""
        def chunks():
            with open(path, "rb") as blob:
                while chunk := blob.read(CHUNK):
                    yield chunk

        self.call(f"upload of {digest} to {repo}", self.repo(repo).push_blob, data=chunks(), digest=digest,
                  check_exists=False)

    def pull_to(self, repo: str, digest: str, sink) -> int:
        """Stream a blob into `sink` (a binary file), checking its sha256; returns its size.

        Written here rather than through python-dxf: requests' iter_content tops out near
        300 MiB/s on this machine, http.client's readinto into one reused 1 MiB buffer near
        540 MiB/s (measured here), which is what keeps a pull at curl's pace. Basic auth is sent up
        front (the registry's htpasswd realm), and one redirect (S3 storage) is followed.
        """
        url = f"{self.base_url}/v2/{repo}/blobs/{digest}"
        login = base64.b64encode(f"{self.user}:{self._password}".encode()).decode() if self.user else None
        headers = {"Authorization": f"Basic {login}"} if login else {}
        for _ in range(2):  # the blob, or one redirect to where it is
            parts = urlsplit(url)
            # The registry is trusted through its CA; a redirect elsewhere (S3) through the system's.
            ours = (parts.hostname, parts.port or 443) == (self.host, self.port)
            context = ssl.create_default_context(cafile=str(self.ca_file) if ours and self.ca_file else None)
            connection_type = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
            connection = connection_type(parts.hostname, parts.port, timeout=self.timeout,
                                         **({"context": context} if parts.scheme == "https" else {}))
            try:
                response = self.call(f"GET blob {digest} from {repo}", self._get, connection, parts, headers)
                if response.status in (301, 302, 303, 307, 308):
                    url, headers = response.getheader("Location"), {}
                    continue
                return self._receive(response, digest, sink, repo)
            finally:
                connection.close()
        raise CrflowError(f"GET blob {digest} from {repo} at {self.base_url}: too many redirects")

    def _get(self, connection, parts, headers):
        try:
            connection.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""), headers=headers)
            response = connection.getresponse()
        except ssl.SSLCertVerificationError as err:
            raise requests.exceptions.SSLError(err) from None
        except OSError as err:
            raise requests.exceptions.ConnectionError(str(err)) from None
        if response.status == 401:
            raise DXFUnauthorizedError()
        if response.status >= 400:
            error = requests.Response()
            error.status_code, error._content = response.status, response.read(300)
            raise requests.exceptions.HTTPError(response=error)
        return response

    def _receive(self, response, digest: str, sink, repo: str) -> int:
        hasher, buffer, size = hashlib.sha256(), bytearray(CHUNK), 0
        view = memoryview(buffer)
        expected = response.getheader("Content-Length")
        try:
            while count := response.readinto(buffer):
                hasher.update(view[:count])
                sink.write(view[:count])
                size += count
        except (http.client.HTTPException, ConnectionError, TimeoutError):
            pass  # told below, with what did arrive
        if expected is not None and size != int(expected):  # readinto returns 0 at an early close
            raise NotAnswering(f"registry at {self.base_url} broke off the download of {digest} after "
                                  f"{size} of {expected} bytes")
        if "sha256:" + hasher.hexdigest() != digest:
            raise CrflowError(f"blob {digest} from {self.base_url}/{repo} does not match its digest")
        return size

    def push_image(self, repo: str, tag: str, image: Image) -> str:
        for blob in [image.config, *image.layers]:
            self.push_blob(repo, blob)
        self.call(f"PUT manifest {repo}:{tag}", self.repo(repo).set_manifest, tag, image.manifest.decode())
        return digest_of(image.manifest)

    def pull_blob(self, repo: str, digest: str) -> bytes:
        """A (small) blob, in memory, its sha256 checked."""
        buffer = io.BytesIO()
        self.pull_to(repo, digest, buffer)
        return buffer.getvalue()

    def pull_image(self, repo: str, ref: str) -> Image:
        manifest, _ = self.call(f"GET manifest {repo}:{ref}", self.repo(repo).get_manifest_and_response, ref)
        document = json.loads(manifest)
        return Image(config=self.pull_blob(repo, document["config"]["digest"]),
                     layers=[self.pull_blob(repo, d["digest"]) for d in document["layers"]])


def parse_reference(reference: str) -> tuple[str, str, str]:
    """host[:port]/repo[:tag|@digest] -> (host[:port], repo, tag or digest)."""
    server, _, rest = reference.partition("/")
    if not rest or "." not in server and ":" not in server and server != "localhost":
        raise CrflowError(f"{reference!r}: give the registry too, as in registry.example:5000/library/busybox:1.36")
    if "@" in rest:
        repo, _, ref = rest.partition("@")
    else:
        repo, _, ref = rest.rpartition(":") if ":" in rest else (rest, "", "latest")
    return server, repo, ref


def walk(registry: Registry, repo: str, ref: str) -> list[str]:
    """Pull an image or index and everything it references (platform manifests, configs,
    layers), checking each digest; return the digests in the order met."""
    manifest, _ = registry.call(f"GET manifest {repo}:{ref}", registry.repo(repo).get_manifest_and_response, ref)
    seen = [digest_of(manifest.encode())]
    if ref.startswith("sha256:") and seen[0] != ref:
        raise CrflowError(f"manifest {repo}@{ref} from {registry.base_url} does not match its digest")
    document = json.loads(manifest)
    for child in document.get("manifests", []):
        seen += walk(registry, repo, child["digest"])
    for blob in [document["config"], *document["layers"]] if "config" in document else []:
        with open(os.devnull, "wb") as sink:
            registry.pull_to(repo, blob["digest"], sink)
        seen.append(blob["digest"])
    return seen


def copy_image(source: Registry, source_repo: str, ref: str, target: Registry, target_repo: str, tag: str) -> str:
    """Copy an image, or an index with every platform manifest, blob by blob (streamed, blobs
    the target has are skipped); manifests keep their bytes, so digests stay. Returns the digest."""
    manifest, _ = source.call(f"GET manifest {source_repo}:{ref}", source.repo(source_repo).get_manifest_and_response, ref)
    document = json.loads(manifest)
    for child in document.get("manifests", []):
        copy_image(source, source_repo, child["digest"], target, target_repo, child["digest"])
    for blob in [document["config"], *document["layers"]] if "config" in document else []:
        chunks = source.call(f"GET blob {blob['digest']}", source.repo(source_repo).pull_blob, blob["digest"],
                             chunk_size=CHUNK)
        target.call(f"upload of {blob['digest']} to {target_repo}", target.repo(target_repo).push_blob,
                    data=iter(chunks), digest=blob["digest"], check_exists=True)
    target.call(f"PUT manifest {target_repo}:{tag}", target.repo(target_repo).set_manifest, tag, manifest)
    return digest_of(manifest.encode())
