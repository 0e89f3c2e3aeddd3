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
import uuid

import pytest
import yaml
from kubernetes import client, config
from minio import Minio

from conftest import oci_layout, skopeo

pytestmark = pytest.mark.kubernetes

MINIO_KEYS = {"accesskey": "crflow-test-access", "secretkey": "crflow-test-secret-0123456789"}


@pytest.fixture
def cluster_site(kube_api, kubelet, make_site, moto_s3, crflow):
    """A kubernetes site on the emulated cluster, with MinIO's secret where the runbook has it."""
    core = client.CoreV1Api(config.new_client_from_config(str(kube_api.kubeconfig)))
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
    from tasks.registry import digest_of

    assert any(digest_of(image.config)[7:] in n for n in names)
    assert not any((tmp_path / "node").rglob("docker/registry/v2/blobs"))  # nothing on the node's disk
