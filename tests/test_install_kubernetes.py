"""`crflow install` with target: kubernetes, end to end on the emulated cluster.

EMULATED: the Kubernetes API is tests/kubeapi (no real apiserver); the test kubelet
(tests/kubelet.py) runs the registry pod as a local docker-registry process from what the
API holds, and forwards the Service address to it; moto stands in for MinIO. Real: the
crflow CLI and its Prefect flow, helm 4.3.1 through pyhelm3, the official Python client,
the registry process, skopeo and the S3 API traffic.
"""

from __future__ import annotations

import base64
import json

import pytest
import yaml
from kubernetes import client, config
from minio import Minio

from conftest import MINIO_KEYS, oci_layout, skopeo

pytestmark = pytest.mark.kubernetes

def client_files_from_cluster(core, site, out) -> None:
    """What an off-cluster client gets from the cluster alone: the CA from the TLS Secret and
    the login from the user/password Secret."""
    out.mkdir()
    tls = core.read_namespaced_secret("registry-tls", "container-registry")
    (out / "ca.crt").write_bytes(base64.b64decode(tls.data["ca.crt"]))
    login = core.read_namespaced_secret("registry-login", "container-registry")
    auth = base64.b64encode(base64.b64decode(login.data["username"]) + b":" + base64.b64decode(login.data["password"]))
    (out / "auth.json").write_text(json.dumps({"auths": {site.server: {"auth": auth.decode()}}}))


def test_install_on_the_emulated_cluster_serves_skopeo_from_the_bucket(crflow, cluster_site, kube_api, moto_s3, tmp_path):
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
    s3 = Minio(moto_s3.split("://")[1], access_key="x", secret_key="y", secure=False, region="us-east-1")
    names = [o.object_name for o in s3.list_objects(bucket, prefix="docker/registry/v2/", recursive=True)]
    from crflow.oci import digest_of

    assert any(digest_of(image.config)[7:] in n for n in names)
    assert not any((tmp_path / "node").rglob("docker/registry/v2/blobs"))  # nothing on the node's disk


def all_objects(kube_api) -> dict[str, str]:
    """Every object crflow or helm made, as kind/namespace/name -> resourceVersion."""
    api = config.new_client_from_config(str(kube_api.admin_kubeconfig))
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    found = {}
    for kind, items in [("Secret", core.list_secret_for_all_namespaces().items),
                        ("ConfigMap", core.list_config_map_for_all_namespaces().items),
                        ("Service", core.list_service_for_all_namespaces().items),
                        ("Deployment", apps.list_deployment_for_all_namespaces().items),
                        ("Namespace", core.list_namespace().items)]:
        for obj in items:
            found[f"{kind}/{obj.metadata.namespace}/{obj.metadata.name}"] = (obj.metadata.resource_version,
                                                                              obj.metadata.labels or {})
    return found


def test_objects_are_the_runbooks_and_a_rerun_changes_none(crflow, cluster_site, kube_api):
    crflow("install", "-c", str(cluster_site.path))
    objects = all_objects(kube_api)
    crflow_labels = {"app.kubernetes.io/managed-by": "crflow", "app.kubernetes.io/instance": "registry"}
    for name in ("registry-tls", "registry-htpasswd", "registry-http-secret", "registry-s3", "registry-login"):
        _, labels = objects[f"Secret/container-registry/{name}"]
        assert crflow_labels.items() <= labels.items(), name
    assert crflow_labels.items() <= objects["Namespace/None/container-registry"][1].items()

    core = cluster_site.core
    tls = core.read_namespaced_secret("registry-tls", "container-registry")
    assert (tls.type, sorted(tls.data)) == ("kubernetes.io/tls", ["ca.crt", "tls.crt", "tls.key"])
    s3 = core.read_namespaced_secret("registry-s3", "container-registry")
    assert {k: base64.b64decode(v).decode() for k, v in s3.data.items()} == {
        "s3AccessKey": MINIO_KEYS["accesskey"], "s3SecretKey": MINIO_KEYS["secretkey"]}
    assert core.read_namespaced_secret("registry-login", "container-registry").type == "kubernetes.io/basic-auth"
    service = core.read_namespaced_service("registry", "container-registry").spec
    assert (service.type, service.load_balancer_ip, service.ports[0].port) == ("LoadBalancer", "127.0.0.1", cluster_site.port)

    releases = json.loads(kube_api.run("helm", "list", "-A", "-o", "json"))
    assert [(r["name"], r["revision"]) for r in releases] == [("registry", "1")]

    crflow("install", "-c", str(cluster_site.path))
    assert all_objects(kube_api) == objects  # not one resourceVersion moved
    releases = json.loads(kube_api.run("helm", "list", "-A", "-o", "json"))
    assert [(r["name"], r["revision"]) for r in releases] == [("registry", "1")]


def test_transient_api_faults_are_retried(crflow, cluster_site, kube_api):
    kube_api.fault(method="POST", path="/namespaces/container-registry/secrets$", status=500, count=3)
    kube_api.fault(method="GET", path="/namespaces/minio/secrets/minio-access-secret$", status=500, count=2)
    kube_api.fault(method="POST", path="/api/v1/namespaces$", status=409, count=1)
    crflow("install", "-c", str(cluster_site.path))
    served = [(r["method"], r["status"]) for r in kube_api.requests() if r["status"] >= 500]
    assert served.count(("POST", 500)) == 3 and served.count(("GET", 500)) == 2
    assert any(r["status"] == 409 and r["path"] == "/api/v1/namespaces" for r in kube_api.requests())


def test_a_permanent_fault_fails_clearly_and_leaves_no_half_written_secret(crflow, cluster_site, kube_api):
    kube_api.fault(method="POST", path="/secrets/?$", status=403, count=1000)
    result = crflow("install", "-c", str(cluster_site.path), check=False)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    # The first Secret written is crflow's record of the new CA, before the registry's own.
    assert last.startswith("crflow: error: Kubernetes API: write Secret container-registry/registry-crflow-state "
                           "failed with 403")
    assert cluster_site.core.list_namespaced_secret("container-registry").items == []
    assert MINIO_KEYS["secretkey"] not in result.stderr + result.stdout


def test_missing_kubeconfig_gives_the_runbooks_hint(crflow, make_site, tmp_path):
    site = make_site(target="kubernetes", storage={"kind": "pvc", "existing_claim": "data"},
                     cluster={"kubeconfig": str(tmp_path / "nope")})
    result = crflow("install", "-c", str(site.path), check=False)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and "no kubeconfig at" in last
    assert "kubectl config view --raw > ~/.kube/config; chmod 600 ~/.kube/config" in last


def test_pvc_storage_on_a_hostpath_volume(crflow, kube_api, kubelet, make_site, tmp_path):
    """The runbook's filesystem variant: a hostPath PV on a named node and its claim."""
    disk = tmp_path / "mnt-hdd1-container_registry"
    site = make_site(target="kubernetes", storage={"kind": "pvc", "host_path": {"path": str(disk), "node": "node1"}},
                     cluster={"kubeconfig": str(kube_api.kubeconfig), "helm_timeout_seconds": 60})
    crflow.env["HOME"] = str(kube_api.home)
    crflow("install", "-c", str(site.path))
    core = client.CoreV1Api(config.new_client_from_config(str(kube_api.admin_kubeconfig)))
    pv = core.read_persistent_volume("container-registry-registry-data")
    assert pv.spec.host_path.path == str(disk)
    terms = pv.spec.node_affinity.required.node_selector_terms[0].match_expressions[0]
    assert (terms.key, terms.values) == ("kubernetes.io/hostname", ["node1"])
    assert core.read_namespaced_persistent_volume_claim("registry-data", "container-registry").spec.volume_name == pv.metadata.name
    assert list(disk.rglob("docker/registry/v2/repositories/crflow-smoke"))  # the install's check image is on that disk


def test_unreachable_api_gives_the_runbooks_hint(crflow, make_site, tmp_path):
    from servers import free_port

    kubeconfig = tmp_path / "kubeconfig"
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": closed}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
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
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="team-a")))
    cluster_site.settings["pull_secrets"] = {"namespaces": ["team-a"]}
    cluster_site.write()

    def secret(namespace, name, key):
        return base64.b64decode(core.read_namespaced_secret(name, namespace).data[key]).decode()

    def secrets_now() -> dict[str, str]:
        registry = "container-registry"
        return {
            "password": secret(registry, "registry-login", "password"),
            "htpasswd hash": secret(registry, "registry-htpasswd", "htpasswd").split(":", 1)[1].strip(),
            # the base64 body past the PKCS#8 header (48 characters, the same for every P-256 key)
            "server key": "".join(secret(registry, "registry-tls", "tls.key").strip().splitlines()[1:-1])[48:88],
            "http.secret": secret(registry, "registry-http-secret", "haSharedSecret"),
            "pull Secret auth": json.loads(secret("team-a", "registry-pull", ".dockerconfigjson"))[
                "auths"][cluster_site.server]["auth"],
        }

    runs = [crflow("install", "-c", str(cluster_site.path)) for _ in range(2)]
    secrets = {"MinIO secret key": MINIO_KEYS["secretkey"], **secrets_now()}
    runs.append(crflow("rotate-credentials", "-c", str(cluster_site.path), "--grace", "0"))
    rotated = secrets_now()
    assert rotated["password"] != secrets["password"]
    secrets.update({f"{name} after rotation": value for name, value in rotated.items()})
    assert_nowhere(secrets, runs, cluster_site, prefect_api, prefect_home)


def test_helm_test_asks_the_registry_over_tls_with_the_login(crflow, cluster_site, kube_api):
    """`helm test` (real helm 4) creates the chart's test Pod; the test kubelet runs its curl
    command on this machine (EMULATED: curl's image is not pulled) with the CA and login Secrets
    mounted and mapped, against the Service address. curl is the judge."""
    site = cluster_site
    crflow("install", "-c", str(site.path))
    out = kube_api.run("helm", "test", "registry", "-n", "container-registry", "--timeout", "90s")
    assert "Phase:          Succeeded" in out or "Phase: Succeeded" in out, out

    # The test can fail: with a login the registry does not know, curl gets 401 and the Pod fails.
    core = site.core
    core.patch_namespaced_secret("registry-login", "container-registry",
                                 {"data": {"password": base64.b64encode(b"not-the-password").decode()}})
    # (helm 4 waits for a failed test Pod until its timeout, as it waits for any resource to become ready.)
    failed = kube_api.run("helm", "test", "registry", "-n", "container-registry", "--timeout", "10s", returncode=1)
    assert "Phase:          Failed" in failed, failed


def test_an_empty_state_dir_changes_nothing_on_the_cluster_and_a_missing_or_wrong_key_makes_nothing(
        crflow, cluster_site, kube_api):
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
                for s in site.core.list_namespaced_secret("container-registry").items}

    def revision() -> int:
        return json.loads(kube_api.run("helm", "history", "registry", "-n", "container-registry", "-o", "json"))[-1][
            "revision"]

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

