"""`crflow verify` and node trust on the test cluster (tests/cluster.py: a real Kubernetes 1.20
node). REAL: the node-trust DaemonSet's pod writes into the node's containerd certs.d; the
kubelet pulls verify's image through containerd with the pull Secret, trusting the CA only
through those files; the kubelet refreshes a changed Secret in the running pod. EMULATED: moto
stands in for MinIO."""

from __future__ import annotations

import base64
import time

import pytest
from kubernetes import client

from cluster import NODE
from conftest import task_runs
from crflow.chart import CHART_DIR
from crflow.tasks.workloads import PULL_TEST_NAMESPACE, pull_test_name

pytestmark = pytest.mark.kubernetes


def node_files(site) -> set[str]:
    """This site's files under the node's containerd certs.d, as paths relative to it."""
    return {str(p.relative_to(site.node.certs_d)) for name in site.node_certs()
            for p in (site.node.certs_d / name).rglob("*") if p.is_file()}


def node_images(site) -> list[str]:
    """The images the node's containerd holds from this site's registry."""
    listed = site.node.ctr("images", "ls", "-q").stdout.split()
    return [ref for ref in listed if ref.startswith(f"{site.server}/")]


def test_install_makes_the_node_trust_the_registry_and_it_pulls_with_the_pull_secret(crflow, cluster_site):
    site = cluster_site
    site.settings["registry"]["dns_names"] = ["localhost"]
    site.write()
    crflow("install", "-c", str(site.path))
    ca = (site.client / "ca.crt").read_text()
    assert node_files(site) == {f"{server}/{name}" for server in (site.server, f"localhost:{site.port}")
                                for name in ("ca.crt", "hosts.toml", ".crflow-owner")}
    assert (site.node.certs_d / site.server / "ca.crt").read_text() == ca
    (trust_pod,) = site.pod_names("node-trust")
    assert "wrote" in site.kubectl("-n", site.namespace, "logs", trust_pod).stdout

    out = crflow("verify", "-c", str(site.path))
    assert out.stdout.strip().endswith("all checks passed")
    # containerd on the node pulled verify's image (by digest) with the pull Secret's login
    assert any(ref.startswith(f"{site.server}/crflow-smoke@sha256:") for ref in node_images(site)), node_images(site)
    assert dict(task_runs(crflow.api, site.path))["pull_with_secret"] == "Completed"
    name = pull_test_name(site.namespace, "registry")
    secret = site.core.read_namespaced_secret(name, PULL_TEST_NAMESPACE)
    assert secret.type == "kubernetes.io/dockerconfigjson"
    left = client.AppsV1Api(site.core.api_client).list_namespaced_daemon_set(PULL_TEST_NAMESPACE).items
    assert name not in [d.metadata.name for d in left]  # cleaned up


def test_without_node_trust_containerd_refuses_and_verify_names_the_node(crflow, cluster_site):
    site = cluster_site
    site.settings["node_trust"] = {"enabled": False}
    site.write()
    crflow("install", "-c", str(site.path))
    assert node_files(site) == set()
    result = crflow("verify", "-c", str(site.path), check=False)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1
    # containerd's own words: with no hosts.toml it trusts only the system's CAs
    assert "1 of 1 nodes could not pull" in last, last
    assert f"node {NODE}: ErrImagePull" in last and "x509: certificate signed by unknown authority" in last, last
    assert not any(ref.startswith(f"{site.server}/crflow-smoke@") for ref in node_images(site))


def test_emptydir_storage_while_s3_is_configured_fails(crflow, cluster_site):
    site = cluster_site
    crflow("install", "-c", str(site.path))
    # Someone upgrades the release by hand with the chart's defaults for storage: an emptyDir.
    site.helm("upgrade", "registry", str(CHART_DIR), "-n", site.namespace, "--reuse-values",
              "--set", "storage=filesystem", "--set", "persistence.enabled=false", "--wait", "--timeout", "120s")
    result = crflow("verify", "-c", str(site.path), check=False)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1
    assert "the registry pod stores blobs in emptyDir data, not in S3 bucket" in last


def test_a_changed_ca_secret_reaches_the_node_without_a_pod_restart(crflow, cluster_site):
    """The node-trust pod re-reads the mounted CA Secret (refreshed in place by the kubelet on
    its sync) every resync_seconds: no new pod, no restart of anything on the node."""
    site = cluster_site
    site.settings["node_trust"] = {"host_dir": str(site.node.certs_d), "resync_seconds": 1}
    site.write()
    crflow("install", "-c", str(site.path))
    (trust_pod,) = site.pod_names("node-trust")
    restarts = site.kubectl("-n", site.namespace, "get", "pod", trust_pod, "-o",
                            "jsonpath={.status.containerStatuses[0].restartCount}").stdout
    other = x509_pem("another CA")
    site.core.patch_namespaced_secret("registry-ca", site.namespace,
                                      {"data": {"ca.crt": base64.b64encode(other.encode()).decode()}})
    deadline = time.monotonic() + 120  # the kubelet's sync (5 s here) and the pod's resync
    while (site.node.certs_d / site.server / "ca.crt").read_text() != other:
        assert time.monotonic() < deadline, site.kubectl("-n", site.namespace, "logs", trust_pod).stdout[-2000:]
        time.sleep(0.3)
    assert site.pod_names("node-trust") == [trust_pod]  # the same pod
    assert site.kubectl("-n", site.namespace, "get", "pod", trust_pod, "-o",
                        "jsonpath={.status.containerStatuses[0].restartCount}").stdout == restarts


def x509_pem(name: str) -> str:
    from crflow.tasks.pki import new_ca

    return new_ca(name, 1, "ecdsa-p256").cert_pem
