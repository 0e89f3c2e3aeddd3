"""The worker's RBAC (deployments/worker-rbac.yaml), evaluated by tests/rbac.py. Every test on
the emulated cluster checks crflow's own API calls against it at teardown (the kube_api
fixture); here, that the evaluation can refuse, and refuses what crflow must not have."""

from __future__ import annotations

import pytest
from rbac import Attributes, attributes, worker_policy


@pytest.mark.parametrize(("method", "path", "query", "allowed"), [
    # The registry's namespace: its Secrets and the chart's objects.
    ("GET", "/api/v1/namespaces/container-registry/secrets/registry-tls", "", True),
    ("PATCH", "/apis/apps/v1/namespaces/container-registry/deployments/registry", "", True),
    ("GET", "/apis/batch/v1/namespaces/container-registry/jobs/registry-gc/status", "", True),
    ("GET", "/api/v1/namespaces/container-registry/pods", "watch=true", True),
    # Consumers: the pull Secret by its name, nothing else there.
    ("GET", "/api/v1/namespaces/team-a/secrets/registry-pull", "", True),
    ("PUT", "/api/v1/namespaces/team-a/secrets/registry-pull", "", True),
    ("POST", "/api/v1/namespaces/team-a/secrets", "", True),
    ("GET", "/api/v1/namespaces/team-a/secrets/db-password", "", False),
    ("GET", "/api/v1/namespaces/team-a/secrets", "", False),
    ("GET", "/api/v1/secrets", "labelSelector=app.kubernetes.io%2Fmanaged-by%3Dcrflow", False),
    ("PUT", "/api/v1/namespaces/team-a/serviceaccounts/default", "", True),
    ("PUT", "/api/v1/namespaces/team-a/serviceaccounts/builder", "", False),
    ("POST", "/api/v1/namespaces/team-a/serviceaccounts", "", False),
    # MinIO's keys: that one Secret.
    ("GET", "/api/v1/namespaces/minio/secrets/minio-access-secret", "", True),
    ("GET", "/api/v1/namespaces/minio/secrets/minio-root", "", False),
    # Nothing the flows do not do.
    ("DELETE", "/apis/apps/v1/namespaces/default/deployments/web", "", False),
    ("GET", "/api/v1/nodes", "", False),
    ("POST", "/api/v1/namespaces/container-registry/pods", "", False),
    ("POST", "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", "", False),
    ("DELETE", "/api/v1/namespaces/container-registry", "", False),
])
def test_the_worker_may_do_what_the_flows_do_and_nothing_more(method, path, query, allowed):
    assert worker_policy().allows(attributes(method, path, query)) is allowed


def test_request_attributes_follow_kubernetes():
    assert attributes("GET", "/api/v1/namespaces/a/secrets", "watch=1") == Attributes("watch", "", "secrets", "a", None)
    assert attributes("DELETE", "/apis/apps/v1/namespaces/a/deployments", "") == \
        Attributes("deletecollection", "apps", "deployments", "a", None)
    assert attributes("PATCH", "/api/v1/namespaces/a", "") == Attributes("patch", "", "namespaces", "a", "a")
    assert attributes("GET", "/apis", "") is None and attributes("GET", "/version", "") is None
