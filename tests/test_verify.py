"""`crflow verify` (the verify-push-pull flow) on the local target: it passes on a working
registry, and fails, with a message a person can act on, when something is wrong."""

from __future__ import annotations

import base64
import json

from minio import Minio

from conftest import last_artifact, task_runs
from crflow.flows.verify import verify_table_key
from crflow.settings import load_site
from crflow.tasks.pki import new_ca


def verify_table(prefect_api: str, site) -> list[dict]:
    """The site's verify table (newest run first), as the Prefect API holds it."""
    data = last_artifact(prefect_api, verify_table_key(load_site(site.path)))
    return json.loads(data) if isinstance(data, str) else data


def last_verify_row(prefect_api: str, site) -> dict:
    return verify_table(prefect_api, site)[0]


def failure(crflow, site) -> str:
    result = crflow("verify", "-c", str(site.path), check=False)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    return result.stderr.strip().splitlines()[-1]


def test_verify_passes_and_reports(crflow, installed, prefect_api):
    out = crflow("verify", "-c", str(installed.path)).stdout
    assert out.strip().endswith("all checks passed")
    row = last_verify_row(prefect_api, installed)
    assert row["result"] == "passed" and row["failed check"] == ""
    assert float(row["push MiB/s"]) > 0 and float(row["pull MiB/s"]) > 0
    assert 360 <= int(row["server cert days left"]) <= 365 and int(row["CA days left"]) > 3600
    # it cleaned up: the image it pushed is deleted, so clients see only the install's check image
    from crflow.oci import Registry

    with Registry.from_bundle(installed.url, installed.client) as registry:
        assert registry.repo("crflow-smoke").list_aliases() == ["install"]


def test_wrong_password_fails_naming_user_and_registry(crflow, installed, prefect_api):
    auth_file = installed.client / "auth.json"
    document = json.loads(auth_file.read_text())
    user, password = installed.login()
    document["auths"][installed.server]["auth"] = base64.b64encode(f"{user}:{password}x".encode()).decode()
    auth_file.write_text(json.dumps(document))
    line = failure(crflow, installed)
    assert f"registry at {installed.url} rejected user {user}: wrong user or password (401)" in line
    assert password not in line
    row = last_verify_row(prefect_api, installed)
    assert (row["result"], row["failed check"]) == ("FAILED", "push a new image")
    # a failed run's row still says how long the certificates last
    assert 360 <= int(row["server cert days left"]) <= 365 and int(row["CA days left"]) > 3600


def test_wrong_ca_fails_naming_the_ca_file_and_the_certificates_names(crflow, installed):
    (installed.client / "ca.crt").write_text(new_ca("some other CA", 30, "ecdsa-p256").cert_pem)
    line = failure(crflow, installed)
    assert f"TLS verification of {installed.url} failed" in line
    assert f"CA in {installed.client / 'ca.crt'}" in line and "(it names: 127.0.0.1, localhost)" in line


def test_stopped_registry_fails_after_bounded_retries(crflow, installed, prefect_api):
    crflow("verify", "-c", str(installed.path))
    crflow("down", "-c", str(installed.path))
    line = failure(crflow, installed)
    assert f"push a new image: registry at {installed.url} is not answering" in line  # names the check
    crflow("install", "-c", str(installed.path))
    crflow("verify", "-c", str(installed.path))
    # The site's table keeps every run, newest first; the failed row still has the CA's days.
    table = verify_table(prefect_api, installed)
    assert [row["result"] for row in table] == ["passed", "FAILED", "passed"]
    assert table[1]["failed check"] == "push a new image"
    assert table[1]["server cert days left"] == "not served" and int(table[1]["CA days left"]) > 3600
    assert len({row["run"] for row in table}) == 3


def test_deleted_bucket_surfaces_the_registrys_error(crflow, s3_site, moto_s3):
    site, bucket = s3_site, s3_site.bucket
    crflow("install", "-c", str(site.path))
    assert crflow("verify", "-c", str(site.path)).stdout.strip().endswith("all checks passed")

    s3 = Minio(moto_s3.split("://")[1], access_key="x", secret_key="y", secure=False, region="us-east-1")
    for obj in s3.list_objects(bucket, recursive=True):
        s3.remove_object(bucket, obj.object_name)
    s3.remove_bucket(bucket)
    line = failure(crflow, site)
    assert f"bucket {bucket} does not exist at {moto_s3}" in line
    assert "the registry said: upload of" in line and "failed with 500: the registry's storage (s3aws) failed" in line


def test_source_image_with_an_index_is_copied_and_checked(crflow, make_site, tmp_path):
    """--source-image: a second real registry holds a two-platform OCI index; verify copies it
    (index, platform manifests, blobs) into the first registry and pulls it all back."""
    import json as json_

    from crflow.oci import Registry, digest_of, tiny_image

    target, source = make_site(), make_site()
    crflow("install", "-c", str(target.path))
    crflow("install", "-c", str(source.path))
    platforms = {"amd64": tiny_image({"arch": b"amd64"}), "arm64": tiny_image({"arch": b"arm64"})}
    with Registry.from_bundle(source.url, source.client) as registry:
        entries = []
        for arch, image in platforms.items():
            entries.append({"mediaType": "application/vnd.oci.image.manifest.v1+json", "size": len(image.manifest),
                            "digest": registry.push_image("library/tiny", arch, image),
                            "platform": {"architecture": arch, "os": "linux"}})
        index = json_.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                             "manifests": entries})
        registry.call("PUT index", registry.repo("library/tiny").set_manifest, "v1", index)

    out = crflow("verify", "-c", str(target.path), "--source-image", f"{source.server}/library/tiny:v1",
                 "--source-ca", str(source.client / "ca.crt"), "--source-authfile", str(source.client / "auth.json"))
    assert out.stdout.strip().endswith("all checks passed")
    states = dict(task_runs(crflow.api, target.path))
    assert states["copy_source_image"] == states["pull_everything"] == "Completed"
    # what was copied kept its digests: the platform manifests are still in the target, by digest
    with Registry.from_bundle(target.url, target.client) as registry:
        for entry in entries:
            manifest, _ = registry.repo("crflow-smoke/source").get_manifest_and_response(entry["digest"])
            assert digest_of(manifest.encode()) == entry["digest"]
