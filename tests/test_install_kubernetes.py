"""`crflow install` with target: kubernetes, end to end on the test cluster (tests/cluster.py:
a real Kubernetes 1.20 node). The flows run with the crflow-worker ServiceAccount's token, so
the real authorizer applies deployments/worker-rbac.yaml to every call. REAL: the apiserver,
kubelet, containerd and kube-proxy, the crflow CLI and its Prefect flow, helm 4 through
pyhelm3, the registry pod (Debian's docker-registry in a locally built image), skopeo.
EMULATED: moto stands in for MinIO.
"""

from __future__ import annotations

import base64
import json

import pytest
import yaml
from kubernetes import client
from minio import Minio

from conftest import MINIO_KEYS, oci_layout, skopeo

pytestmark = pytest.mark.kubernetes

def client_files_from_cluster(core, site, out) -> None:
    """What an off-cluster client gets from the cluster alone: the CA from the TLS Secret and
    the login from the user/password Secret."""
    out.mkdir()
    tls = core.read_namespaced_secret("registry-tls", site.namespace)
    (out / "ca.crt").write_bytes(base64.b64decode(tls.data["ca.crt"]))
    login = core.read_namespaced_secret("registry-login", site.namespace)
    auth = base64.b64encode(base64.b64decode(login.data["username"]) + b":" + base64.b64decode(login.data["password"]))
    (out / "auth.json").write_text(json.dumps({"auths": {site.server: {"auth": auth.decode()}}}))


def test_install_on_the_cluster_serves_skopeo_from_the_bucket(crflow, cluster_site, cluster_moto, tmp_path):
    crflow("install", "-c", str(cluster_site.path))
    assert "login of user" in crflow("status", "-c", str(cluster_site.path)).stdout

    creds = tmp_path / "from-cluster"
    client_files_from_cluster(cluster_site.core, cluster_site, creds)
    image = oci_layout(tmp_path / "layout", "v1")
    ref = f"docker://{cluster_site.server}/team/hello:v1"
    skopeo("copy", "--dest-authfile", str(creds / "auth.json"), "--dest-cert-dir", str(creds),
           f"oci:{tmp_path / 'layout'}:v1", ref)
    skopeo("copy", "--src-authfile", str(creds / "auth.json"), "--src-cert-dir", str(creds), ref,
           f"oci:{tmp_path / 'pulled'}:v1")

    bucket = yaml.safe_load(cluster_site.path.read_text())["storage"]["bucket"]
    s3 = Minio(cluster_moto.split("://")[1], access_key="x", secret_key="y", secure=False, region="us-east-1")
    names = [o.object_name for o in s3.list_objects(bucket, prefix="docker/registry/v2/", recursive=True)]
    from crflow.oci import digest_of

    assert any(digest_of(image.config)[7:] in n for n in names)
    volumes = cluster_site.kubectl("-n", cluster_site.namespace, "get", "deployment", "registry", "-o",
                                   "jsonpath={.spec.template.spec.volumes[*].name}").stdout.split()
    assert "data" not in volumes  # nothing on the node's disk: S3 is the storage


def all_objects(site) -> dict[str, str]:
    """Every object crflow or helm made for the site, as kind/namespace/name -> resourceVersion."""
    core, apps, namespace = site.core, client.AppsV1Api(site.core.api_client), site.namespace
    found = {}
    for kind, items in [("Secret", core.list_namespaced_secret(namespace).items),
                        ("ConfigMap", core.list_namespaced_config_map(namespace).items),
                        ("Service", core.list_namespaced_service(namespace).items),
                        ("Deployment", apps.list_namespaced_deployment(namespace).items),
                        ("DaemonSet", apps.list_namespaced_daemon_set(namespace).items),
                        ("Namespace", [core.read_namespace(namespace)])]:
        for obj in items:
            found[f"{kind}/{obj.metadata.namespace}/{obj.metadata.name}"] = (obj.metadata.resource_version,
                                                                              obj.metadata.labels or {})
    return found


def test_objects_are_the_runbooks_and_a_rerun_changes_none(crflow, cluster_site):
    site, namespace = cluster_site, cluster_site.namespace
    crflow("install", "-c", str(site.path))
    objects = all_objects(site)
    crflow_labels = {"app.kubernetes.io/managed-by": "crflow", "app.kubernetes.io/instance": "registry"}
    for name in ("registry-tls", "registry-htpasswd", "registry-http-secret", "registry-s3", "registry-login"):
        _, labels = objects[f"Secret/{namespace}/{name}"]
        assert crflow_labels.items() <= labels.items(), name
    # The namespace is deployments/worker-rbac.yaml's (the Role lives in it): crflow found it and left it be.
    assert objects[f"Namespace/None/{namespace}"][1]["app.kubernetes.io/managed-by"] == "crflow"

    core = site.core
    tls = core.read_namespaced_secret("registry-tls", namespace)
    assert (tls.type, sorted(tls.data)) == ("kubernetes.io/tls", ["ca.crt", "tls.crt", "tls.key"])
    s3 = core.read_namespaced_secret("registry-s3", namespace)
    assert {k: base64.b64decode(v).decode() for k, v in s3.data.items()} == {
        "s3AccessKey": MINIO_KEYS["accesskey"], "s3SecretKey": MINIO_KEYS["secretkey"]}
    assert core.read_namespaced_secret("registry-login", namespace).type == "kubernetes.io/basic-auth"
    service = core.read_namespaced_service("registry", namespace).spec
    assert (service.type, service.ports[0].node_port) == ("NodePort", site.port)
    # The real controllers ran what helm made: one ready replica, and the node's trust pod.
    deployment = client.AppsV1Api(core.api_client).read_namespaced_deployment("registry", namespace)
    assert deployment.status.ready_replicas == 1

    releases = json.loads(site.helm("list", "-n", namespace, "-o", "json"))
    assert [(r["name"], r["revision"]) for r in releases] == [("registry", "1")]

    crflow("install", "-c", str(site.path))
    assert all_objects(site) == objects  # not one resourceVersion moved
    releases = json.loads(site.helm("list", "-n", namespace, "-o", "json"))
    assert [(r["name"], r["revision"]) for r in releases] == [("registry", "1")]


def test_a_call_the_authorizer_refuses_fails_clearly_and_leaves_no_half_written_secret(crflow, make_cluster_site):
    """The site's namespace lacks deployments/worker-rbac.yaml's Role: the real authorizer
    answers 403 to the first Secret crflow writes there."""
    site = make_cluster_site()
    site.kubectl("-n", site.namespace, "delete", "rolebinding", "crflow-registry")
    result = crflow("install", "-c", str(site.path), check=False)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    # The first call there reads crflow's record of the site, before anything is written.
    assert last.startswith(f"crflow: error: Kubernetes API: read Secret {site.namespace}/registry-crflow-state "
                           "failed with 403"), last
    assert 'User "system:serviceaccount:crflow:crflow-worker" cannot get resource "secrets"' in last
    assert site.core.list_namespaced_secret(site.namespace).items == [] or all(
        s.type == "kubernetes.io/service-account-token" for s in site.core.list_namespaced_secret(site.namespace).items)
    assert MINIO_KEYS["secretkey"] not in result.stderr + result.stdout


def test_missing_kubeconfig_gives_the_runbooks_hint(crflow, make_site, tmp_path):
    site = make_site(target="kubernetes", storage={"kind": "pvc", "existing_claim": "data"},
                     cluster={"kubeconfig": str(tmp_path / "nope")})
    result = crflow("install", "-c", str(site.path), check=False)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and "no kubeconfig at" in last
    assert "kubectl config view --raw > ~/.kube/config; chmod 600 ~/.kube/config" in last


def test_pvc_storage_on_a_hostpath_volume(crflow, make_cluster_site, tmp_path):
    """The runbook's filesystem variant: a hostPath PV on a named node and its claim."""
    from cluster import NODE

    disk = tmp_path / "mnt-hdd1-container_registry"
    site = make_cluster_site(storage={"kind": "pvc", "host_path": {"path": str(disk), "node": NODE}})
    crflow("install", "-c", str(site.path))
    core = site.core
    pv = core.read_persistent_volume(f"{site.namespace}-registry-data")
    assert pv.spec.host_path.path == str(disk)
    terms = pv.spec.node_affinity.required.node_selector_terms[0].match_expressions[0]
    assert (terms.key, terms.values) == ("kubernetes.io/hostname", [NODE])
    claim = core.read_namespaced_persistent_volume_claim("registry-data", site.namespace)
    assert (claim.spec.volume_name, claim.status.phase) == (pv.metadata.name, "Bound")  # bound by the real controller
    assert list(disk.rglob("docker/registry/v2/repositories/crflow-smoke"))  # the install's check image is on that disk


def test_unreachable_api_gives_the_runbooks_hint(crflow, make_site, tmp_path):
    from conftest import unanswered_kubeconfig
    from servers import free_port

    kubeconfig = unanswered_kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    site = make_site(target="kubernetes", storage={"kind": "pvc", "existing_claim": "data"},
                     cluster={"kubeconfig": str(kubeconfig)})
    result = crflow("install", "-c", str(site.path), check=False)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and "Kubernetes API unreachable during " in last
    assert "kubectl config view --raw > ~/.kube/config" in last


def test_no_secret_reaches_prefect_on_the_cluster_target(crflow, cluster_site, prefect_api, prefect_home):
    """Two installs, then a rotation that writes a pull Secret: none of the secrets, old or new,
    is in Prefect's database, API, the CLI output or the result files."""
    from test_secrets import assert_nowhere

    core = cluster_site.core
    team = cluster_site.consumer("team-a")
    cluster_site.settings["pull_secrets"] = {"namespaces": [team]}
    cluster_site.write()

    def secret(namespace, name, key):
        return base64.b64decode(core.read_namespaced_secret(name, namespace).data[key]).decode()

    def secrets_now() -> dict[str, str]:
        registry = cluster_site.namespace
        return {
            "password": secret(registry, "registry-login", "password"),
            "htpasswd hash": secret(registry, "registry-htpasswd", "htpasswd").split(":", 1)[1].strip(),
            # the base64 body past the PKCS#8 header (48 characters, the same for every P-256 key)
            "server key": "".join(secret(registry, "registry-tls", "tls.key").strip().splitlines()[1:-1])[48:88],
            "http.secret": secret(registry, "registry-http-secret", "haSharedSecret"),
            "pull Secret auth": json.loads(secret(team, "registry-pull", ".dockerconfigjson"))[
                "auths"][cluster_site.server]["auth"],
        }

    runs = [crflow("install", "-c", str(cluster_site.path)) for _ in range(2)]
    secrets = {"MinIO secret key": MINIO_KEYS["secretkey"], **secrets_now()}
    runs.append(crflow("rotate-credentials", "-c", str(cluster_site.path), "--grace", "0"))
    rotated = secrets_now()
    assert rotated["password"] != secrets["password"]
    secrets.update({f"{name} after rotation": value for name, value in rotated.items()})
    assert_nowhere(secrets, runs, cluster_site, prefect_api, prefect_home)


def test_helm_test_asks_the_registry_over_tls_with_the_login(crflow, cluster_site):
    """`helm test` (real helm 4) creates the chart's test Pod; the kubelet runs it (Debian's curl
    in a locally built image) with the CA and login Secrets mounted, against the registry's
    address through kube-proxy. curl is the judge."""
    site = cluster_site
    crflow("install", "-c", str(site.path))
    out = site.helm("test", "registry", "-n", site.namespace, "--timeout", "90s")
    assert "Phase:          Succeeded" in out or "Phase: Succeeded" in out, out

    # The test can fail: with a login the registry does not know, curl gets 401 and the Pod fails.
    core = site.core
    core.patch_namespaced_secret("registry-login", site.namespace,
                                 {"data": {"password": base64.b64encode(b"not-the-password").decode()}})
    # (helm 4 waits for a failed test Pod until its timeout, as it waits for any resource to become ready.)
    failed = site.helm("test", "registry", "-n", site.namespace, "--timeout", "30s", returncode=1)
    assert "Phase:          Failed" in failed, failed


def test_an_empty_state_dir_changes_nothing_on_the_cluster_and_a_missing_or_wrong_key_makes_nothing(
        crflow, cluster_site):
    """The disk crflow ran from is lost (or a fresh worker runs it): the run fetches the site's
    state from the cluster's state Secret. Without the result key, or with another one, it stops
    before writing anything; with the key it converges and writes nothing (every Secret's
    resourceVersion, and helm's revision, stay as they were)."""
    import shutil

    from cryptography.fernet import Fernet

    site = cluster_site
    crflow("install", "-c", str(site.path))

    def secrets() -> dict[str, str]:
        return {s.metadata.name: s.metadata.resource_version
                for s in site.core.list_namespaced_secret(site.namespace).items
                if s.type != "kubernetes.io/service-account-token"}

    def revision() -> int:
        return json.loads(site.helm("history", "registry", "-n", site.namespace, "-o", "json"))[-1]["revision"]

    before, key = secrets(), (site.state / "result.key").read_text().strip()
    assert "registry-crflow-state" in before
    shutil.rmtree(site.state)

    missing = crflow("install", "-c", str(site.path), check=False)
    assert missing.returncode == 1 and "missing result key" in missing.stderr.splitlines()[-1]
    shutil.rmtree(site.state)
    wrong = crflow("install", "-c", str(site.path), check=False, env={"CRFLOW_RESULT_KEY": Fernet.generate_key().decode()})
    assert wrong.returncode == 1 and "wrong result key" in wrong.stderr.splitlines()[-1]
    assert secrets() == before and revision() == 1  # nothing written, nothing made

    shutil.rmtree(site.state)
    crflow("install", "-c", str(site.path), env={"CRFLOW_RESULT_KEY": key})
    assert secrets() == before and revision() == 1  # the same CA, certificate and login: nothing to write

