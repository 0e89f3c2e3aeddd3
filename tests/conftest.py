"""The test bed: real processes on loopback.

- one Prefect server (`prefect server start`) for the whole session;
- `crflow` run as a subprocess, exactly as a person runs it;
- the registry it starts is Debian's docker-registry (distribution 2.8.2), a real process;
- skopeo, an independent client, pushes and pulls;
- moto's server stands in for MinIO (S3 API; it ignores access keys and signatures, so wrong-credential cases are tested at the client boundary).
"""

from __future__ import annotations

import base64
import importlib
import json
import os
import pkgutil
import shutil
import subprocess
import uuid
from pathlib import Path

import httpx
import pytest
import yaml
from kubernetes import client, config

from crflow.localpod import LocalPod
from crflow.oci import tiny_image
from servers import BIN, free_port, start_prefect_server, start_server, stop_server, wait_http

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def prefect_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("prefect-home")


@pytest.fixture(scope="session")
def prefect_api(prefect_home) -> str:
    """A real Prefect server for the session; its URL is what every crflow run reports to."""
    process, url = start_prefect_server(prefect_home)
    yield url
    stop_server(process)


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory) -> str:
    """moto's S3 server: the stand-in for MinIO (MinIO's server is not obtainable here)."""
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
    process = start_server([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], log, env)
    url = f"http://127.0.0.1:{port}"
    wait_http(url, 60, "moto", process)
    yield url
    stop_server(process)


class Crflow:
    """Runs the crflow CLI as a subprocess, with its own CRFLOW_HOME and the session's Prefect."""

    def __init__(self, prefect_api: str, home: Path):
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "CRFLOW_"))}
        self.env.update(PREFECT_API_URL=prefect_api, CRFLOW_HOME=str(home), DO_NOT_TRACK="1")
        self.api = prefect_api
        self.binary = str(BIN / "crflow")

    def __call__(self, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run([str(BIN / "crflow"), *args], capture_output=True, text=True,
                                env={**self.env, **(env or {})}, stdin=subprocess.DEVNULL, timeout=300)
        if check and result.returncode != 0:
            raise AssertionError(f"crflow {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
        return result

    def popen(self, *args: str) -> subprocess.Popen:
        # Wide: Prefect's console wraps at COLUMNS, and a wrapped line (a long tmp path) would
        # hide the "Finished in state" a test waits for.
        return subprocess.Popen([str(BIN / "crflow"), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env={**self.env, "COLUMNS": "1000"}, stdin=subprocess.DEVNULL)


@pytest.fixture
def crflow(prefect_api, tmp_path) -> Crflow:
    return Crflow(prefect_api, tmp_path / "crflow-home")


class Site:
    """A site file in a test's tmp dir, with a free port; stops its registry at teardown."""

    def __init__(self, tmp_path: Path, **overrides):
        self.port = free_port()
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.state = tmp_path / "state"
        self.settings = {
            "target": "local",
            "state_dir": str(self.state),
            "registry": {"ips": ["127.0.0.1"], "dns_names": ["localhost"], "port": self.port},
            "storage": {"kind": "filesystem"},
        }
        self.settings.update(overrides)
        # Its own debug port too: the default 5001 would be shared by every test's registry.
        self.settings["registry"].setdefault("metrics_port", free_port())
        self.path = tmp_path / "site.yaml"
        self.write()

    def write(self) -> None:
        self.path.write_text(yaml.safe_dump(self.settings))

    @property
    def server(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"https://{self.server}"

    @property
    def pod(self) -> LocalPod:
        return LocalPod(self.state / "pod")

    @property
    def client(self) -> Path:
        return self.state / "client"

    def login(self) -> tuple[str, str]:
        """(user, password), read back from the client files crflow wrote."""
        auth = json.loads((self.client / "auth.json").read_text())["auths"][self.server]["auth"]
        user, _, password = base64.b64decode(auth).decode().partition(":")
        return user, password


@pytest.fixture
def make_site(tmp_path):
    sites = []

    def make(**overrides) -> Site:
        site = Site(tmp_path / f"site{len(sites)}", **overrides)
        sites.append(site)
        return site

    yield make
    for site in sites:
        site.pod.stop()


@pytest.fixture
def installed(crflow, make_site) -> Site:
    """A registry installed on the local target by `crflow install`."""
    site = make_site()
    crflow("install", "-c", str(site.path))
    return site


def oci_layout(path: Path, tag: str = "latest"):
    """A one-image OCI layout for skopeo to push, with unique content (skopeo caches blob
    locations and would otherwise mount instead of upload). Returns the image."""
    from crflow.oci import OCI_MANIFEST, digest_of

    image = tiny_image({"hello.txt": f"crflow test {uuid.uuid4()}\n".encode()})
    blobs = path / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    for blob in [image.config, *image.layers, image.manifest]:
        (blobs / digest_of(blob).split(":")[1]).write_bytes(blob)
    (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    manifest = {"mediaType": OCI_MANIFEST, "digest": digest_of(image.manifest), "size": len(image.manifest),
                "annotations": {"org.opencontainers.image.ref.name": tag}}
    (path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [manifest]}))
    return image


def last_artifact(prefect_api: str, key: str):
    """The data of the newest Prefect artifact with this key (markdown text, or a table)."""
    artifacts = httpx.post(f"{prefect_api}/artifacts/filter", json={
        "artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1}).json()
    return artifacts[0]["data"]


def task_runs(prefect_api: str, site_file: Path, flow: str | None = None) -> list[tuple[str, str]]:
    """(task function, state name) of each task run of the newest flow run against `site_file`,
    in the order they started, as the Prefect API records them (never read from log text)."""
    with httpx.Client(base_url=prefect_api, timeout=30) as http:
        runs = http.post("/flow_runs/filter", json={"sort": "START_TIME_DESC", "limit": 50}).json()
        run = next(r for r in runs if r["parameters"].get("site_file") == str(Path(site_file).resolve())
                   and (flow is None or r["name"] and http.get(f"/flows/{r['flow_id']}").json()["name"] == flow))
        tasks = http.post("/task_runs/filter", json={"flow_runs": {"id": {"any_": [run["id"]]}},
                                                     "sort": "EXPECTED_START_TIME_ASC", "limit": 200}).json()
    return [(t["task_key"].rsplit("-", 1)[0], (t["state"] or {}).get("name", "Pending")) for t in tasks]


def run_name_prefix(task_name: str) -> str:
    """How Prefect's log names a run of crflow's task `task_name`: its task_run_name up to the
    first templated field (or Prefect's default, the task's name and a dash)."""
    from prefect import Task

    for package in map(importlib.import_module, ("crflow.tasks", "crflow.flows")):  # `crflow` is a fixture here
        for info in pkgutil.iter_modules(package.__path__):
            candidate = getattr(importlib.import_module(f"{package.__name__}.{info.name}"), task_name, None)
            if isinstance(candidate, Task):
                return (candidate.task_run_name or f"{task_name}-").split("{")[0]
    raise LookupError(f"no crflow task named {task_name}")


def cached_tasks(prefect_api: str, site_file: Path) -> list[str]:
    """The tasks of the newest run against `site_file` that Prefect answered from its cache."""
    return sorted(name for name, state in task_runs(prefect_api, site_file) if state == "Cached")


def curl_status(site, user: str, password: str) -> int:
    """GET /v2/ with this login, trusting only the CA file crflow wrote (curl is the judge)."""
    out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", str(site.client / "ca.crt"),
                          "-u", f"{user}:{password}", f"{site.url}/v2/"], capture_output=True, text=True, timeout=30)
    return int(out.stdout or 0)


def secret_text(core, namespace: str, name: str, key: str) -> str:
    """One key of a Secret on the emulated cluster, decoded."""
    return base64.b64decode(core.read_namespaced_secret(name, namespace).data[key]).decode()


def fingerprint(pem: str) -> str:
    """A certificate's SHA-256 fingerprint, as openssl (not crflow) computes it."""
    out = subprocess.run(["openssl", "x509", "-noout", "-fingerprint", "-sha256"], input=pem, capture_output=True,
                         text=True, check=True, timeout=30).stdout
    return out.strip().split("=", 1)[1]


def skopeo(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """skopeo, the independent client. --insecure-policy skips image *signature* policy only;
    TLS verification stays on (no --tls-verify=false anywhere in these tests)."""
    result = subprocess.run([shutil.which("skopeo") or "skopeo", "--insecure-policy", *args],
                            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise AssertionError(f"skopeo {' '.join(args)} failed:\n{result.stderr}")
    return result


class KubeApi:
    """The emulated Kubernetes API server (tests/kubeapi), a subprocess with its own kubeconfig.
    EMULATED: no scheduler, kubelet, admission, RBAC or defaulting (see tests/kubeapi/server.py)."""

    def __init__(self, tmp_path: Path, *options: str):
        self.kubeconfig = tmp_path / "kubeconfig"  # crflow's: its requests are checked against deployments/ RBAC
        self.admin_kubeconfig = tmp_path / "admin-kubeconfig"  # the tests', helm's and kubectl's in tests, the kubelet's
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = start_server([str(BIN / "python"), str(ROOT / "tests" / "kubeapi" / "server.py"),
                                     "--port", str(self.port), "--kubeconfig", str(self.kubeconfig), *options],
                                    tmp_path / "kubeapi.log")
        wait_http(f"{self.url}/healthz", 30, "the emulated Kubernetes API", self.process)
        # helm and kubectl get a HOME of their own, so no cache or config leaks between runs.
        self.home = tmp_path / "kube-home"
        self.home.mkdir()
        self.env = {**os.environ, "KUBECONFIG": str(self.admin_kubeconfig), "HOME": str(self.home)}

    def fault(self, **rule) -> None:
        """Make the next matching requests fail: fault(method="POST", path="/secrets", status=500, count=3)."""
        httpx.post(f"{self.url}/_emulator/faults", json=rule).raise_for_status()

    def clear_faults(self) -> None:
        httpx.delete(f"{self.url}/_emulator/faults").raise_for_status()

    def requests(self) -> list[dict]:
        return httpx.get(f"{self.url}/_emulator/requests").json()

    def kubeconfig_as(self, user: str) -> Path:
        """A kubeconfig whose requests the server logs as `user` (one of tests/rbac.py's SUBJECTS)."""
        path = self.admin_kubeconfig.with_name(f"{user}-kubeconfig")
        path.write_text(self.admin_kubeconfig.read_text().replace("/as/test-admin", f"/as/{user}"))
        path.chmod(0o600)
        return path

    def run(self, tool: str, *args: str, returncode: int = 0) -> str:
        """kubectl or helm from .bin/, against this API server; its stdout."""
        result = subprocess.run([str(ROOT / ".bin" / tool), *args], env=self.env, capture_output=True, text=True,
                                timeout=120, stdin=subprocess.DEVNULL)
        assert result.returncode == returncode, f"{tool} {' '.join(args)}:\n{result.stderr}"
        return result.stdout


@pytest.fixture
def kube_api(tmp_path) -> KubeApi:
    api = KubeApi(tmp_path)
    yield api
    requests = api.requests()
    stop_server(api.process)
    # Least privilege, checked on every test: each API call crflow (and the helm it runs) made
    # is one deployments/worker-rbac.yaml allows its worker; each the Prefect worker made, one
    # deployments/worker.yaml allows it.
    from rbac import SUBJECTS, denied

    for user, (manifest, _) in SUBJECTS.items():
        refused = denied(requests, user)
        assert not refused, f"deployments/{manifest.name} does not allow what {user} did: {refused}"


@pytest.fixture
def kubelet(kube_api, tmp_path):
    """The test kubelet (tests/kubelet.py) for the emulated cluster. EMULATED: see its docstring."""
    from containerd import Unavailable
    from kubelet import Kubelet

    try:
        node = Kubelet(kube_api.admin_kubeconfig, tmp_path / "node")
    except Unavailable as why:  # its nodes pull with a real containerd, or the test would prove nothing
        pytest.skip(f"the emulated nodes need a real containerd: {why}")
    yield node
    node.stop()
    for error in [*dict.fromkeys(node.errors), *(why for _, why in node.failed.values())]:
        print(f"kubelet: {error}")  # shown with a failing test's output


MINIO_KEYS = {"accesskey": "crflow-test-access", "secretkey": "crflow-test-secret-0123456789"}


@pytest.fixture
def cluster_site(kube_api, kubelet, make_site, moto_s3, crflow):
    """A kubernetes site on the emulated cluster, with MinIO's secret where the runbook has it."""
    core = client.CoreV1Api(config.new_client_from_config(str(kube_api.admin_kubeconfig)))
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="minio")))
    core.create_namespaced_secret("minio", client.V1Secret(
        metadata=client.V1ObjectMeta(name="minio-access-secret"), string_data=MINIO_KEYS))
    site = make_site(
        target="kubernetes",
        namespace="container-registry",
        storage={"kind": "s3", "endpoint": moto_s3, "bucket": f"container-registry-{uuid.uuid4().hex[:8]}"},
        cluster={"kubeconfig": str(kube_api.kubeconfig), "helm_timeout_seconds": 60},
    )
    site.settings["registry"]["service_type"] = "LoadBalancer"
    site.write()
    crflow.env["HOME"] = str(kube_api.home)  # helm's cache and config, per test
    site.core = core
    return site


@pytest.fixture
def s3_site(make_site, moto_s3, tmp_path) -> Site:
    """A local-target site storing into a new bucket on moto (the stand-in for MinIO)."""
    keys = tmp_path / "minio-keys.yaml"
    keys.write_text(yaml.safe_dump({"accesskey": "crflow-test", "secretkey": "not-a-real-secret-0123456789"}))
    site = make_site(storage={"kind": "s3", "endpoint": moto_s3, "bucket": f"container-registry-{uuid.uuid4().hex[:8]}",
                              "credentials": {"file": str(keys)}})
    site.bucket = site.settings["storage"]["bucket"]
    return site
