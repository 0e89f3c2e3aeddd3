"""S3 storage on the local target: the bucket is made with the minio SDK, and the registry
stores blobs there, not on the local disk. moto's server stands in for MinIO: it speaks the
S3 API but ignores credentials, so credential checks are not tested here."""

from __future__ import annotations

from minio import Minio

from conftest import cached_tasks, oci_layout, skopeo


def test_blobs_land_in_the_bucket_not_on_local_disk(crflow, s3_site, moto_s3, tmp_path):
    site, bucket = s3_site, s3_site.bucket
    crflow("install", "-c", str(site.path))

    image = oci_layout(tmp_path / "layout", "v1")
    skopeo("copy", "--dest-authfile", str(site.client / "auth.json"), "--dest-cert-dir", str(site.client),
           f"oci:{tmp_path / 'layout'}:v1", f"docker://{site.server}/team/hello:v1")

    s3 = Minio(moto_s3.split("://")[1], access_key="x", secret_key="y", secure=False, region="us-east-1")
    names = [o.object_name for o in s3.list_objects(bucket, prefix="docker/registry/v2/", recursive=True)]
    from crflow.oci import digest_of

    config_blob = f"docker/registry/v2/blobs/sha256/{digest_of(image.config)[7:9]}/{digest_of(image.config)[7:]}/data"
    assert config_blob in names
    assert any("repositories/team/hello/_manifests/tags/v1" in n for n in names)
    assert any("repositories/crflow-smoke/" in n for n in names)  # the install's own check image
    assert not (site.state / "data").exists()

    # A rerun finds the bucket and changes nothing.
    rerun = crflow("install", "-c", str(site.path))
    assert rerun.returncode == 0 and len(cached_tasks(crflow.api, site.path)) == 5
