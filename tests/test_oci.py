"""crflow's blob download against a small real HTTP server that misbehaves on purpose."""

from __future__ import annotations

import hashlib
import io
from http.server import BaseHTTPRequestHandler

import pytest

from crflow.errors import CrflowError
from crflow.oci import Registry
from servers import http_server

BODY = b"x" * 100_000
DIGEST = "sha256:" + hashlib.sha256(BODY).hexdigest()


class Misbehaving(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        if self.path.endswith("/broken/blobs/" + DIGEST):
            self.wfile.write(BODY[:1000])  # then the connection goes
        else:
            self.wfile.write(b"y" * len(BODY))  # the right length, the wrong bytes

    def log_message(self, *args):
        pass


@pytest.fixture
def registry():
    with http_server(Misbehaving) as url:
        client = Registry(url, None, None, None, timeout=5)
        yield client
        client.__exit__()


def test_a_download_cut_short_is_a_connection_error_to_retry(registry):
    with pytest.raises(ConnectionError, match=r"broke off the download of sha256:\w+ after 1000 of 100000 bytes"):
        registry.pull_to("broken", DIGEST, io.BytesIO())


def test_bytes_that_do_not_match_the_digest_are_refused(registry):
    with pytest.raises(CrflowError, match="does not match its digest"):
        registry.pull_blob("wrong", DIGEST)
