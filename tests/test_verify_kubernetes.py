"""`crflow verify` on the emulated cluster. EMULATED: tests/kubeapi is the API server and
tests/kubelet.py the node (it runs the registry pod, and "starts" the pull-test pod by
pulling its image through the Service address with the pod's imagePullSecret, trusting the
CA it was given, as a node configured by the runbook's trust step would); moto is MinIO."""

from __future__ import annotations

import pytest
from kubernetes import client

from conftest import task_runs
from crflow.chart import CHART_DIR

pytestmark = pytest.mark.kubernetes


def test_verify_passes_and_a_pod_pulls_with_the_pull_secret(crflow, cluster_site, kubelet):
    crflow("install", "-c", str(cluster_site.path))
    kubelet.trust(cluster_site.server, cluster_site.client / "ca.crt")
    out = crflow("verify", "-c", str(cluster_site.path))
    assert out.stdout.strip().endswith("all checks passed")
    user, _ = cluster_site.login()
    assert [(image.split("@")[0], who) for image, who in kubelet.pulled] == \
        [(f"{cluster_site.server}/crflow-smoke", user)]
    assert dict(task_runs(crflow.api, cluster_site.path))["pull_with_secret"] == "Completed"
    core = cluster_site.core
    secret = core.read_namespaced_secret("crflow-verify-pull", "crflow-verify")
    assert secret.type == "kubernetes.io/dockerconfigjson"
    assert client.AppsV1Api(core.api_client).list_namespaced_deployment("crflow-verify").items == []  # cleaned up


def test_a_node_that_does_not_trust_the_ca_fails_the_pull_test(crflow, cluster_site, kubelet):
    crflow("install", "-c", str(cluster_site.path))
    result = crflow("verify", "-c", str(cluster_site.path), check=False)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1
    assert "a pod could not pull" in last and "ErrImagePull" in last and "does not trust the CA" in last


def test_emptydir_storage_while_s3_is_configured_fails(crflow, cluster_site, kubelet, kube_api):
    crflow("install", "-c", str(cluster_site.path))
    kubelet.trust(cluster_site.server, cluster_site.client / "ca.crt")
    # Someone upgrades the release by hand with the chart's defaults for storage: an emptyDir.
    kube_api.run("helm", "upgrade", "registry", str(CHART_DIR), "-n", "container-registry", "--reuse-values",
                 "--set", "storage=filesystem", "--set", "persistence.enabled=false", "--wait", "--timeout", "60s")
    result = crflow("verify", "-c", str(cluster_site.path), check=False)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1
    assert "the registry pod stores blobs in emptyDir data, not in S3 bucket" in last
