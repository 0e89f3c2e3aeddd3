"""The cluster holds a kubernetes site's state: a site of the earlier layout moves into it, and
with `result_storage:` the encrypted cache lives in a bucket (on the test cluster, a real
Kubernetes 1.20 node; openssl and boto3 read what crflow wrote; EMULATED: moto is MinIO)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import yaml

from conftest import MINIO_KEYS, fingerprint, secret_text

pytestmark = pytest.mark.kubernetes


def test_a_site_installed_with_the_earlier_layout_moves_into_the_cluster_unchanged(crflow, cluster_site, tmp_path):
    """The earlier crflow kept the state in state_dir only: no state Secret, and cache records
    that named their key by file ({"type": "crflow-fernet", "key_file": PATH}). The test makes
    that layout from an install (the state Secret deleted, each record's serializer written back
    as the earlier code wrote it). From an empty directory, the new code then stops on the
    cluster's CA Secret and writes nothing; from the site's own directory it moves the state into
    the cluster; from an empty one after that it converges: the same CA and login throughout."""
    site, core = cluster_site, cluster_site.core
    namespace = site.namespace
    crflow("install", "-c", str(site.path))
    core.delete_namespaced_secret("registry-crflow-state", namespace)
    for record in (site.state / "results").iterdir():
        if record.name != ".keycheck":
            data = json.loads(record.read_text())
            data["metadata"]["serializer"] = {"type": "crflow-fernet", "key_file": str(site.state / "result.key")}
            record.write_text(json.dumps(data))
    ca = fingerprint(secret_text(core, namespace, "registry-ca", "ca.crt"))
    login = {k: secret_text(core, namespace, "registry-login", k) for k in ("username", "password")}

    def empty_directory(name: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "site.yaml").write_text(yaml.safe_dump({**site.settings, "state_dir": str(folder / "state")}))
        return folder / "site.yaml"

    def secrets() -> dict[str, str]:
        return {s.metadata.name: s.metadata.resource_version for s in core.list_namespaced_secret(namespace).items
                if s.type != "kubernetes.io/service-account-token"}

    before = secrets()
    lost = crflow("install", "-c", str(empty_directory("lost")), check=False)  # the state_dir is not here
    assert lost.returncode == 1
    assert "crflow will not make a new CA for registry: the cluster's CA Secret" in lost.stderr and "crflow restore" in lost.stderr
    assert secrets() == before  # nothing written

    crflow("verify", "-c", str(site.path))  # the first run under the new code
    held = core.read_namespaced_secret("registry-crflow-state", namespace).data
    assert json.loads(base64.b64decode(held["identity.json"]))["ca"] == ca
    assert sum(name.startswith("results.") for name in held) == len(list((site.state / "results").iterdir()))

    before = secrets()
    crflow("install", "-c", str(empty_directory("fresh")),
           env={"CRFLOW_RESULT_KEY": (site.state / "result.key").read_text().strip()})
    assert fingerprint(secret_text(core, namespace, "registry-ca", "ca.crt")) == ca
    assert {k: secret_text(core, namespace, "registry-login", k) for k in ("username", "password")} == login
    assert secrets() == before


def test_with_result_storage_the_cache_lives_in_a_bucket_and_serves_a_fresh_directory(
        crflow, cluster_site, cluster_moto, tmp_path, prefect_api, prefect_home):
    """`result_storage:` puts the encrypted cache in a bucket (moto, EMULATED S3, read back with
    boto3); the state Secret keeps the numbers, the identity record and the key check. The
    storage block Prefect keeps for it holds no key."""
    import uuid

    import boto3
    from test_secrets import assert_nowhere

    site, core = cluster_site, cluster_site.core
    namespace = site.namespace
    bucket = f"crflow-cache-{uuid.uuid4().hex[:8]}"
    site.settings["result_storage"] = {"bucket": bucket, "prefix": "sites/registry"}
    site.write()
    runs = [crflow("install", "-c", str(site.path))]
    password = secret_text(core, namespace, "registry-login", "password")

    s3 = boto3.client("s3", endpoint_url=cluster_moto, region_name="us-east-1", aws_access_key_id=MINIO_KEYS["accesskey"],
                      aws_secret_access_key=MINIO_KEYS["secretkey"])
    names = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    assert len(names) >= 4 and all(name.startswith("sites/registry/") for name in names)  # CA, cert, login, htpasswd...
    for name in names:
        record = json.loads(s3.get_object(Bucket=bucket, Key=name)["Body"].read())
        assert record["result"].startswith("gAAAAA") and password not in json.dumps(record)  # Fernet tokens only
    held = core.read_namespaced_secret("registry-crflow-state", namespace).data
    assert [name for name in held if name.startswith("results.")] == ["results..keycheck"]
    assert list((site.state / "results").iterdir()) == [site.state / "results" / ".keycheck"]

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "site.yaml").write_text(yaml.safe_dump({**site.settings, "state_dir": str(fresh / "state")}))
    before = {s.metadata.name: s.metadata.resource_version for s in core.list_namespaced_secret(namespace).items
              if s.type != "kubernetes.io/service-account-token"}
    key = (site.state / "result.key").read_text().strip()
    runs.append(crflow("install", "-c", str(fresh / "site.yaml"), env={"CRFLOW_RESULT_KEY": key}))
    assert {s.metadata.name: s.metadata.resource_version for s in core.list_namespaced_secret(namespace).items
            if s.type != "kubernetes.io/service-account-token"} == before  # the same CA, certificate and login, from the bucket: nothing to write
    assert_nowhere({"MinIO secret key": MINIO_KEYS["secretkey"], "password": password, "result key": key}, runs, site,
                   prefect_api, prefect_home)
