"""`crflow verify` and node trust on the emulated cluster. EMULATED: tests/kubeapi is the API
server and tests/kubelet.py plays two nodes: it runs the registry pod and the chart's
node-trust script with each node's certs.d mapped to a directory. REAL: each node's image
pulls go through a real containerd (tests/containerd.py) with the pod's imagePullSecret, and
the CA reaches it only through the files the node-trust DaemonSet wrote. moto is MinIO."""

from __future__ import annotations

import base64
import time

import pytest
from kubernetes import client

from conftest import task_runs
from crflow.chart import CHART_DIR

pytestmark = pytest.mark.kubernetes


def node_files(kubelet) -> dict[str, set[str]]:
    """node -> the files under its containerd certs.d, as paths relative to it."""
    return {node.name: {str(p.relative_to(node.certs_d)) for p in node.certs_d.rglob("*") if p.is_file()}
            for node in kubelet.nodes}


def test_install_makes_every_node_trust_the_registry_and_each_pulls_with_the_pull_secret(
        crflow, cluster_site, kubelet):
    site = cluster_site
    site.settings["registry"]["dns_names"] = ["localhost"]
    site.write()
    crflow("install", "-c", str(site.path))
    ca = (site.client / "ca.crt").read_text()
    wanted = {f"{server}/{name}" for server in (site.server, f"localhost:{site.port}")
              for name in ("ca.crt", "hosts.toml", ".crflow-owner")}
    assert node_files(kubelet) == {"node-1": wanted, "node-2": wanted}
    for node in kubelet.nodes:
        assert (node.certs_d / site.server / "ca.crt").read_text() == ca
        assert "wrote" in kubelet.pod_log("container-registry", "registry-node-trust", node.name)

    out = crflow("verify", "-c", str(site.path))
    assert out.stdout.strip().endswith("all checks passed")
    user, _ = site.login()
    # containerd on each node pulled the verify image with the pull secret's login
    assert sorted((node, image.split("@")[0], who) for node, image, who in kubelet.pulled) == \
        [(node, f"{site.server}/crflow-smoke", user) for node in ("node-1", "node-2")]
    assert dict(task_runs(crflow.api, site.path))["pull_with_secret"] == "Completed"
    core = site.core
    secret = core.read_namespaced_secret("crflow-verify-pull", "crflow-verify")
    assert secret.type == "kubernetes.io/dockerconfigjson"
    assert client.AppsV1Api(core.api_client).list_namespaced_daemon_set("crflow-verify").items == []  # cleaned up


def test_without_node_trust_containerd_refuses_and_verify_names_each_node(crflow, cluster_site, kubelet):
    site = cluster_site
    site.settings["node_trust"] = {"enabled": False}
    site.write()
    crflow("install", "-c", str(site.path))
    assert node_files(kubelet) == {"node-1": set(), "node-2": set()}
    result = crflow("verify", "-c", str(site.path), check=False)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1
    # containerd's own words: with no hosts.toml it speaks plain HTTP to a loopback address,
    # and the registry's TLS port answers 400 (an address off this machine would get x509).
    assert "2 of 2 nodes could not pull" in last, last
    for node in ("node-1", "node-2"):
        assert f"node {node}: ErrImagePull: ctr: failed to resolve reference" in last
    assert "400 Bad Request" in last
    assert kubelet.pulled == []


def test_emptydir_storage_while_s3_is_configured_fails(crflow, cluster_site, kubelet, kube_api):
    crflow("install", "-c", str(cluster_site.path))
    # Someone upgrades the release by hand with the chart's defaults for storage: an emptyDir.
    kube_api.run("helm", "upgrade", "registry", str(CHART_DIR), "-n", "container-registry", "--reuse-values",
                 "--set", "storage=filesystem", "--set", "persistence.enabled=false", "--wait", "--timeout", "60s")
    result = crflow("verify", "-c", str(cluster_site.path), check=False)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1
    assert "the registry pod stores blobs in emptyDir data, not in S3 bucket" in last


def test_a_changed_ca_secret_reaches_every_node_without_a_pod_restart(crflow, cluster_site, kubelet):
    """The node-trust pods re-read the mounted CA Secret (refreshed in place by the kubelet)
    every resync_seconds: no new pod, no restart of anything on the node."""
    site = cluster_site
    site.settings["node_trust"] = {"resync_seconds": 1}
    site.write()
    crflow("install", "-c", str(site.path))
    started = kubelet.ds_serial
    other = x509_pem("another CA")
    site.core.patch_namespaced_secret("registry-ca", "container-registry",
                                      {"data": {"ca.crt": base64.b64encode(other.encode()).decode()}})
    deadline = time.monotonic() + 30
    while not all((node.certs_d / site.server / "ca.crt").read_text() == other for node in kubelet.nodes):
        assert time.monotonic() < deadline, [kubelet.pod_log("container-registry", "registry-node-trust", n.name)
                                             for n in ("node-1", "node-2")]
        time.sleep(0.2)
    assert kubelet.ds_serial == started  # the same pods


def x509_pem(name: str) -> str:
    from crflow.tasks.pki import new_ca

    return new_ca(name, 1, "ecdsa-p256").cert_pem
