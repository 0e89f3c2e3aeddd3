"""The test bed: real processes on loopback.

- one Prefect server (`prefect server start`) for the whole session;
- `crflow` run as a subprocess, exactly as a person runs it;
- the registry it starts is Debian's docker-registry (distribution 2.8.2), a real process;
- skopeo, an independent client, pushes and pulls;
- moto's server stands in for MinIO (S3 API; it ignores access keys and signatures, so wrong-credential cases are tested at the client boundary).
"""

from __future__ import annotations

import base64
import getpass
import importlib
import json
import os
import pkgutil
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml
from kubernetes import client, config

from crflow.localpod import LocalPod
from crflow.oci import tiny_image
from crflow.tasks.helm import helm_executable
from servers import (
    BIN,
    free_port,
    node_port,
    reap_killed_sessions,
    start_prefect_server,
    start_server,
    stop_server,
    wait_http,
)

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
        # Its own CRFLOW_HOME has no helm: the one setup found or fetched, by name.
        self.env.update(PREFECT_API_URL=prefect_api, CRFLOW_HOME=str(home), DO_NOT_TRACK="1",
                        CRFLOW_HELM=helm_executable())
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
        self.port = overrides.get("registry", {}).get("port") or free_port()
        self.host = "127.0.0.1"
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.state = tmp_path / "state"
        self.settings = {
            "target": "local",
            "state_dir": str(self.state),
            "registry": {"ips": ["127.0.0.1"], "dns_names": ["localhost"], "port": self.port},
            "storage": {"kind": "filesystem"},
        }
        self.settings.update(overrides)
        self.state = Path(self.settings["state_dir"])  # a test's own state_dir too: its pod is stopped at teardown
        # Its own debug port too: the default 5001 would be shared by every test's registry.
        self.settings["registry"].setdefault("metrics_port", free_port())
        self.path = tmp_path / "site.yaml"
        self.write()

    def write(self) -> None:
        self.path.write_text(yaml.safe_dump(self.settings))

    @property
    def server(self) -> str:
        return f"{self.host}:{self.port}"

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
        for mirror in (site.state / "mirrors").glob("*"):
            LocalPod(mirror).stop()


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


def _newest_run(http: httpx.Client, site_file: Path, flow: str | None) -> dict:
    runs = http.post("/flow_runs/filter", json={"sort": "START_TIME_DESC", "limit": 50}).json()
    return next(r for r in runs if r["parameters"].get("site_file") == str(Path(site_file).resolve())
                and (flow is None or r["name"] and http.get(f"/flows/{r['flow_id']}").json()["name"] == flow))


def flow_run_state(prefect_api: str, site_file: Path) -> str:
    """The state name of the newest flow run against `site_file`, as the Prefect API records it."""
    with httpx.Client(base_url=prefect_api, timeout=30) as http:
        return (_newest_run(http, site_file, None)["state"] or {}).get("name", "Pending")


def task_runs(prefect_api: str, site_file: Path, flow: str | None = None) -> list[tuple[str, str]]:
    """(task function, state name) of each task run of the newest flow run against `site_file`,
    in the order they started, as the Prefect API records them (never read from log text)."""
    with httpx.Client(base_url=prefect_api, timeout=30) as http:
        run = _newest_run(http, site_file, flow)
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


def unanswered_kubeconfig(path: Path, server: str) -> Path:
    """A kubeconfig for `server` with a dummy token and no CA: for API servers that never get
    as far as checking either (nothing listening, or no answer)."""
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": server}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
    return path


def curl_status(site, user: str, password: str) -> int:
    """GET /v2/ with this login, trusting only the CA file crflow wrote (curl is the judge)."""
    out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", str(site.client / "ca.crt"),
                          "-u", f"{user}:{password}", f"{site.url}/v2/"], capture_output=True, text=True, timeout=30)
    return int(out.stdout or 0)


def secret_text(core, namespace: str, name: str, key: str) -> str:
    """One key of a Secret on the test cluster, decoded."""
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


# --- the test cluster: a real Kubernetes 1.20 node (tests/cluster.py) -----------------------
# One for the whole session, shared by the xdist workers: the controller names its folder and
# stops it at the end; the first worker that needs it starts it.
CLUSTER_ROOT, CLUSTER_OWNER = "CRFLOW_TEST_CLUSTER_ROOT", "CRFLOW_TEST_CLUSTER_OWNER"


def pytest_configure(config):
    if CLUSTER_ROOT not in os.environ:  # the controller, or a run without xdist: workers inherit these
        os.environ[CLUSTER_ROOT] = tempfile.mkdtemp(prefix="crflow-k8s-")
        os.environ[CLUSTER_OWNER] = str(os.getpid())
        sessions = Path(tempfile.gettempdir()) / f"pytest-of-{getpass.getuser()}"  # where pytest keeps its tmp_paths
        for stopped in reap_killed_sessions(sessions):
            print(f"stopped a process of a killed test session: {stopped}", file=sys.stderr)


def pytest_sessionfinish(session):
    if os.environ.get(CLUSTER_OWNER) == str(os.getpid()):
        from cluster import shutdown

        root = Path(os.environ[CLUSTER_ROOT])
        shutdown(root)
        shutil.rmtree(root, ignore_errors=True)


MINIO_KEYS = {"accesskey": "crflow-test-access", "secretkey": "crflow-test-secret-0123456789"}


@pytest.fixture(scope="session")
def k8s():
    """The session's cluster; the flows' kubeconfig is the worker ServiceAccount's token, bound by
    deployments/worker-rbac.yaml: the real authorizer judges every call crflow and its helm make."""
    from cluster import Unavailable, shared

    root = Path(os.environ[CLUSTER_ROOT])
    try:
        node = shared(root, int(os.environ[CLUSTER_OWNER]))
    except Unavailable as why:
        pytest.skip(f"the test cluster cannot run here: {why}")
    node.root = root
    node.worker_kubeconfig = _worker_access(node, root)
    return node


def _worker_access(node, root: Path) -> Path:
    """Once per cluster: deployments/worker-rbac.yaml applied as shipped, MinIO's Secret where
    the runbook has it; a kubeconfig with the crflow-worker ServiceAccount's token."""
    import fcntl

    from cluster import kubectl

    with open(root / "rbac.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "rbac.done").exists():
            kubectl(node, "create", "namespace", "minio")  # MinIO's, where the file's Role for its keys lives
            kubectl(node, "apply", "-f", str(ROOT / "deployments" / "worker-rbac.yaml"))
            kubectl(node, "-n", "minio", "create", "secret", "generic", "minio-access-secret",
                    *(f"--from-literal={k}={v}" for k, v in MINIO_KEYS.items()))
            (root / "rbac.done").write_text("")
    return token_kubeconfig(node, "crflow", "crflow-worker")


def token_kubeconfig(node, namespace: str, account: str) -> Path:
    """A kubeconfig holding the ServiceAccount's token (the token controller's Secret, as
    Kubernetes 1.20 makes one per account), kept beside the cluster."""
    from cluster import kubectl

    path = node.root / f"{namespace}-{account}.kubeconfig"
    if path.exists():
        return path
    deadline, token = time.monotonic() + 60, ""
    while not token:
        assert time.monotonic() < deadline, f"no token Secret for {namespace}/{account} after 60 s"
        names = kubectl(node, "-n", namespace, "get", "serviceaccount", account,
                        "-o", "jsonpath={.secrets[*].name}").stdout.split()
        if names:
            token = base64.b64decode(kubectl(node, "-n", namespace, "get", "secret", names[0], "-o",
                                             "jsonpath={.data.token}").stdout).decode()
        else:
            time.sleep(0.3)
    config_ = yaml.safe_load(node.kubeconfig.read_text())
    config_["users"] = [{"name": account, "user": {"token": token}}]
    config_["contexts"][0]["context"]["user"] = account
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(yaml.safe_dump(config_))
    temporary.chmod(0o600)
    temporary.replace(path)
    return path


@pytest.fixture(scope="session")
def cluster_moto(k8s, tmp_path_factory) -> str:
    """moto's S3 server (MinIO's stand-in) on the cluster bridge's gateway, where the registry's
    pods reach it (and this machine too; it is a local address)."""
    from cluster import GATEWAY

    log = tmp_path_factory.mktemp("cluster-moto") / "moto.log"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
    process = start_server([str(BIN / "moto_server"), "-H", GATEWAY, "-p", str(port)], log, env)
    url = f"http://{GATEWAY}:{port}"
    wait_http(url, 60, "moto", process)
    yield url
    stop_server(process)


class ClusterSite(Site):
    """A kubernetes site on the test cluster, in a namespace of its own: a NodePort on the
    bridge's gateway, the locally built registry image, node trust into the node's containerd."""

    def __init__(self, tmp_path: Path, node, storage: dict, **overrides):
        from cluster import GATEWAY, REGISTRY_IMAGE

        self.node, self.namespace = node, f"cr-{uuid.uuid4().hex[:10]}"
        repository, tag = REGISTRY_IMAGE.split(":")
        super().__init__(
            tmp_path, target="kubernetes", namespace=self.namespace, storage=storage,
            registry={"ips": [GATEWAY], "dns_names": [], "port": node_port(), "service_type": "NodePort"},
            cluster={"kubeconfig": str(node.worker_kubeconfig), "helm_timeout_seconds": 120},
            node_trust={"host_dir": str(node.certs_d)},
            chart={"values": {"image": {"repository": repository, "tag": tag, "pullPolicy": "Never"}}}, **overrides)
        self.host = GATEWAY
        self.home = tmp_path / "kube-home"  # helm's cache and config, per test
        self.home.mkdir()
        self.consumers: list[str] = []
        self.core = client.CoreV1Api(config.new_client_from_config(str(node.kubeconfig)))
        self._grant()

    def _grant(self) -> None:
        """deployments/worker-rbac.yaml's Role for the registry's namespace, moved to this one
        (what its header tells a user with another namespace to do)."""
        docs = [d for d in yaml.safe_load_all((ROOT / "deployments" / "worker-rbac.yaml").read_text()) if d]
        moved = []
        for doc in docs:
            if doc["metadata"].get("namespace") == "container-registry" or \
                    (doc["kind"] == "Namespace" and doc["metadata"]["name"] == "container-registry"):
                doc["metadata"]["namespace" if doc["kind"] != "Namespace" else "name"] = self.namespace
                moved.append(doc)
        from cluster import kubectl

        kubectl(self.node, "apply", "-f", "-", input="\n---\n".join(yaml.safe_dump(d) for d in moved))

    def consumer(self, name: str, labels: dict | None = None) -> str:
        """A consumer namespace of this test's own (its name is this site's namespace and `name`)."""
        namespace = f"{self.namespace}-{name}"
        self.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace, labels=labels)))
        self.consumers.append(namespace)
        return namespace

    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
        from cluster import kubectl

        return kubectl(self.node, *args, check=check, input=input)

    def helm(self, *args: str, returncode: int = 0) -> str:
        """helm, as the cluster's admin; its stdout."""
        result = subprocess.run([helm_executable(), *args], capture_output=True, text=True, timeout=300,
                                stdin=subprocess.DEVNULL,
                                env={**os.environ, "KUBECONFIG": str(self.node.kubeconfig), "HOME": str(self.home)})
        assert result.returncode == returncode, f"helm {' '.join(args)}:\n{result.stderr}"
        return result.stdout

    def rollouts(self) -> int:
        """How many times the registry's Deployment rolled out (its revision, as the Deployment
        controller counts it): a new pod template, a new number."""
        deployment = client.AppsV1Api(self.core.api_client).read_namespaced_deployment("registry", self.namespace)
        return int(deployment.metadata.annotations["deployment.kubernetes.io/revision"])

    def wait_for_rollout(self) -> None:
        self.kubectl("-n", self.namespace, "rollout", "status", "deployment/registry", "--timeout=120s")

    def node_certs(self) -> list[str]:
        """The node's containerd certs.d entries for this site (the folder is the node's, shared)."""
        return sorted(p.name for p in self.node.certs_d.iterdir() if p.name.endswith(f":{self.port}"))

    def pod_names(self, component: str) -> list[str]:
        found = self.kubectl("-n", self.namespace, "get", "pods", "-l", f"app.kubernetes.io/component={component}",
                             "-o", "jsonpath={.items[*].metadata.name}").stdout.split()
        return sorted(found)

    def kubelet_pulls(self, namespace: str, image: str, timeout: float = 120) -> str | None:
        """A pod in `namespace` (its default ServiceAccount, no pull secret named) asks the
        kubelet for `image`: None once containerd has it, else the kubelet's reason and message."""
        name = f"pull-{uuid.uuid4().hex[:8]}"
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace},
               "spec": {"containers": [{"name": "c", "image": image, "imagePullPolicy": "Always"}],
                        "restartPolicy": "Never", "automountServiceAccountToken": False}}
        self.kubectl("apply", "-f", "-", input=json.dumps(pod))
        deadline, why = time.monotonic() + timeout, "still pulling"
        try:
            while time.monotonic() < deadline:
                found = self.core.read_namespaced_pod(name, namespace)
                for status in (found.status and found.status.container_statuses) or []:
                    waiting = status.state and status.state.waiting
                    # The image is data (no command): after the pull the kubelet says CreateContainerError.
                    if status.image_id or (waiting and waiting.reason in ("CreateContainerError", "RunContainerError")):
                        return None
                    if waiting and waiting.reason == "ErrImagePull":  # the kubelet tries again after its back-off
                        why = f"{waiting.reason}: {waiting.message}"
                time.sleep(0.3)
            return why
        finally:
            self.core.delete_namespaced_pod(name, namespace, grace_period_seconds=0)

    def remove(self) -> None:
        """What the test made on the cluster, gone (in the background: the next test need not wait)."""
        from crflow.tasks.workloads import PULL_TEST_NAMESPACE, pull_test_name

        release = self.settings.get("release", "registry")
        self.kubectl("delete", "namespace", "--wait=false", "--ignore-not-found", self.namespace, *self.consumers,
                     check=False)
        self.kubectl("delete", "persistentvolume", "--wait=false", "--ignore-not-found",
                     f"{self.namespace}-{release}-data", check=False)
        self.kubectl("-n", PULL_TEST_NAMESPACE, "delete", "daemonset,secret", "--wait=false", "--ignore-not-found",
                     pull_test_name(self.namespace, release), check=False)


@pytest.fixture
def make_cluster_site(k8s, cluster_moto, crflow, tmp_path, request):
    """Sites on the test cluster, held shared with the other workers' tests (one marked
    cluster_alone holds it alone); make_cluster_site(storage=...) for other storage than a new
    bucket on moto."""
    from cluster import exclusive, using

    sites = []

    def make(storage: dict | None = None, **overrides) -> ClusterSite:
        storage = storage or {"kind": "s3", "endpoint": cluster_moto, "bucket": f"registry-{uuid.uuid4().hex[:10]}"}
        site = ClusterSite(tmp_path / f"cluster-site{len(sites)}", k8s, storage, **overrides)
        sites.append(site)
        crflow.env["HOME"] = str(site.home)
        return site

    with (exclusive if request.node.get_closest_marker("cluster_alone") else using)(k8s.root):
        yield make
        for site in sites:
            site.remove()


@pytest.fixture
def cluster_site(make_cluster_site) -> ClusterSite:
    """A kubernetes site on the test cluster storing into a new bucket on moto."""
    return make_cluster_site()


@pytest.fixture
def s3_site(make_site, moto_s3, tmp_path) -> Site:
    """A local-target site storing into a new bucket on moto (the stand-in for MinIO)."""
    keys = tmp_path / "minio-keys.yaml"
    keys.write_text(yaml.safe_dump({"accesskey": "crflow-test", "secretkey": "not-a-real-secret-0123456789"}))
    site = make_site(storage={"kind": "s3", "endpoint": moto_s3, "bucket": f"container-registry-{uuid.uuid4().hex[:8]}",
                              "credentials": {"file": str(keys)}})
    site.bucket = site.settings["storage"]["bucket"]
    return site
