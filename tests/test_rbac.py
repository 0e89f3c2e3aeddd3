"""The worker's RBAC (deployments/worker-rbac.yaml), as the test cluster's real authorizer
applies it: `kubectl auth can-i` as the crflow-worker ServiceAccount. Every flow on the test
cluster runs with that account's token, so a call the file does not allow fails that test;
here, that it also refuses what crflow must not have."""

from __future__ import annotations

import pytest

from cluster import kubectl

pytestmark = pytest.mark.kubernetes
WORKER = "system:serviceaccount:crflow:crflow-worker"


@pytest.mark.parametrize(("verb", "resource", "namespace", "allowed"), [
    # The registry's namespace: its Secrets and the chart's objects.
    ("get", "secrets/registry-tls", "container-registry", True),
    ("patch", "deployments.apps/registry", "container-registry", True),
    ("get", "jobs.batch/registry-gc", "container-registry", True),
    ("watch", "pods", "container-registry", True),
    # Consumers: the pull Secret by its name, nothing else there.
    ("get", "secrets/registry-pull", "team-a", True),
    ("update", "secrets/registry-pull", "team-a", True),
    ("create", "secrets", "team-a", True),
    ("get", "secrets/db-password", "team-a", False),
    ("list", "secrets", "team-a", False),
    ("list", "secrets", None, False),
    ("update", "serviceaccounts/default", "team-a", True),
    ("update", "serviceaccounts/builder", "team-a", False),
    ("create", "serviceaccounts", "team-a", False),
    # MinIO's keys: that one Secret.
    ("get", "secrets/minio-access-secret", "minio", True),
    ("get", "secrets/minio-root", "minio", False),
    # Nothing the flows do not do.
    ("delete", "deployments.apps/web", "default", False),
    ("get", "nodes", None, False),
    ("create", "pods", "container-registry", False),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io", None, False),
    ("delete", "namespaces/container-registry", None, False),
])
def test_the_worker_may_do_what_the_flows_do_and_nothing_more(k8s, verb, resource, namespace, allowed):
    where = ["-n", namespace] if namespace else ["--all-namespaces"] if verb == "list" else []
    answer = kubectl(k8s, "auth", "can-i", verb, resource, *where, "--as", WORKER, check=False)
    assert answer.stdout.strip() == ("yes" if allowed else "no"), answer.stderr
