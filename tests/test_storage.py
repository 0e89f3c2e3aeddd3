"""The bucket step's errors. moto ignores credentials, so a refusal is tested at the client
boundary: a small real HTTP server on loopback answers as S3 answers a key without rights
(403 AccessDenied), and the minio SDK talks to it for real."""

from __future__ import annotations

from http.server import BaseHTTPRequestHandler

import pytest
from pydantic import SecretStr

from crflow.errors import CrflowError
from crflow.tasks.storage import S3Endpoint, S3Keys, bucket_exists_or_create
from servers import http_server, loopback_tls

ACCESS_DENIED = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
                 b"<Message>Access Denied.</Message><BucketName>container-registry</BucketName></Error>")


class Refusing(BaseHTTPRequestHandler):
    def _deny(self):
        self.send_response(403)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(ACCESS_DENIED)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(ACCESS_DENIED)

    do_HEAD = do_GET = do_PUT = _deny

    def log_message(self, *args):
        pass


@pytest.fixture
def refusing_s3():
    with http_server(Refusing) as url:
        yield url


def test_no_permission_names_the_bucket_and_endpoint_but_not_the_keys(refusing_s3):
    keys = S3Keys(access_key=SecretStr("AKIA-test"), secret_key=SecretStr("s3cr3t-never-shown-0123"))
    with pytest.raises(CrflowError) as refused:
        bucket_exists_or_create(S3Endpoint(refusing_s3), "container-registry", keys)
    message = str(refused.value)
    assert f"S3 at {refusing_s3} refused bucket container-registry (AccessDenied)" in message
    assert "s3cr3t" not in message and "AKIA-test" not in message


def test_unverifiable_s3_certificate_says_how_to_trust_it(tmp_path):
    """A TLS endpoint whose certificate nothing trusts: the error names ca_bundle and skip_verify."""
    ca, context = loopback_tls(tmp_path, "fake MinIO CA")
    keys = S3Keys(access_key=SecretStr("a"), secret_key=SecretStr("b"))
    with http_server(Refusing, tls=context) as endpoint:
        with pytest.raises(CrflowError, match="set storage.ca_bundle to the CA of its certificate"):
            bucket_exists_or_create(S3Endpoint(endpoint), "container-registry", keys)
        (tmp_path / "ca.crt").write_text(ca.cert_pem)
        with pytest.raises(CrflowError, match=r"refused bucket container-registry \(AccessDenied\)"):
            bucket_exists_or_create(S3Endpoint(endpoint, ca_bundle=tmp_path / "ca.crt"), "container-registry", keys)


class Recording(BaseHTTPRequestHandler):
    """Answers every request 404 NoSuchKey, and notes which access key signed it, per bucket."""

    seen: dict[str, str] = {}

    def do_GET(self):
        bucket = self.path.lstrip("/").split("/", 1)[0].split("?", 1)[0]
        credential = self.headers.get("Authorization", "").split("Credential=", 1)[-1].split("/", 1)[0]
        Recording.seen[bucket] = credential
        body = b"<Error><Code>NoSuchKey</Code><Message>none</Message></Error>"
        self.send_response(404)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


KEYS_SCRIPT = """
import sys
from pydantic import SecretStr
from crflow.errors import CrflowError
from crflow.runcontext import RunContext, running
from crflow.tasks.storage import S3Endpoint, S3Keys, results_in_bucket

endpoint = S3Endpoint(sys.argv[1])
runs = {site: RunContext(site=None, target=None) for site in ("a", "b")}
caches = {}
for site, run in runs.items():  # each site's run opens its cache with its own keys
    with running(run):
        caches[site] = results_in_bucket(f"crflow-keys-{site}", endpoint, f"bucket-{site}", "registry", S3Keys(
            access_key=SecretStr(f"AKIA-SITE-{site.upper()}"), secret_key=SecretStr("s" * 24)))
for site, run in runs.items():
    with running(run):
        try:
            caches[site].read_path("record")
        except CrflowError:
            pass  # the endpoint's 404: what it saw is what counts
with running(runs["b"]):  # site b's run holds no keys for site a's cache
    try:
        caches["a"].read_path("record")
    except CrflowError as err:
        print("refused:", err)
"""


def test_two_sites_result_caches_on_one_endpoint_sign_with_their_own_keys(prefect_api, tmp_path):
    """Both caches opened in one process, as two sites' runs in one worker would: each request
    reaches the S3 endpoint signed with its own site's access key (the endpoint sees it), and
    one site's run holds no key for the other's cache."""
    import subprocess
    import sys

    Recording.seen = {}
    with http_server(Recording) as url:
        done = subprocess.run([sys.executable, "-c", KEYS_SCRIPT, url], capture_output=True, text=True, timeout=120,
                              env={"PATH": "/usr/bin:/bin", "PREFECT_API_URL": prefect_api, "DO_NOT_TRACK": "1",
                                   "PREFECT_HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert Recording.seen == {"bucket-a": "AKIA-SITE-A", "bucket-b": "AKIA-SITE-B"}
    assert done.stdout.startswith("refused: no S3 keys for"), done.stdout
