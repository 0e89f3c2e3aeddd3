"""The real apiserver behind a proxy that answers some requests with a fault first: a crflow
task under Prefect's real engine tries a 503 again (inside the call, then as a task retry)
and the run completes; a 422 fails at once. REAL: the apiserver (it serves every request the
proxy passes on), Prefect's engine and server, crflow's task. EMULATED: the faults, which the
proxy answers in the apiserver's place (its Status body, as the apiserver sends one); the
proxy also stands in for the client's credentials with the cluster's admin certificate."""

from __future__ import annotations

import base64
import json
import ssl
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler

import httpx
import pytest
import yaml

from conftest import MINIO_KEYS
from servers import http_server, loopback_tls

pytestmark = [pytest.mark.kubernetes]

SECRET = "/api/v1/namespaces/minio/secrets/minio-access-secret"
STALL_SECONDS = 8  # MinIO's Secret, as the worker RBAC places it

SCRIPT = """
import json, sys
from prefect import flow
from prefect.context import get_run_context
from crflow.tasks.kubeapi import KubeAccess
from crflow.tasks.secrets import read_s3_keys_secret

@flow
def read_keys(kubeconfig: str) -> bool:
    keys = read_s3_keys_secret(KubeAccess(kubeconfig=kubeconfig), "minio", "minio-access-secret", "accesskey",
                               "secretkey")
    print(json.dumps({"flow_run": str(get_run_context().flow_run.id)}), flush=True)
    return keys.access_key.get_secret_value() == sys.argv[2]

print(json.dumps({"read": read_keys(sys.argv[1])}))
"""


class FaultyApi(BaseHTTPRequestHandler):
    """Answers the next fault queued for a path, else passes the request on to the apiserver."""

    protocol_version = "HTTP/1.1"
    upstream: httpx.Client
    faults: dict[str, list[int]] = {}
    seen: list[tuple[str, int]] = []

    def _pass_on(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = self.path.split("?", 1)[0]
        queued = self.faults.get(path)
        if queued and queued[0] == "stall":  # an apiserver that takes the request and does not answer (yet)
            queued.pop(0)
            time.sleep(STALL_SECONDS)
            queued = None
        if queued:
            status = queued.pop(0)
            content = json.dumps({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                  "message": "injected by the test's proxy", "code": status}).encode()
        else:
            headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "accept")}
            answer = self.upstream.request(self.command, self.path, content=body, headers=headers)
            status, content = answer.status_code, answer.content
        self.seen.append((path, status))
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _pass_on

    def log_message(self, *args):
        pass


@pytest.fixture
def faulty_api(k8s, tmp_path):
    """The proxy on loopback, with TLS of its own; yields a kubeconfig that reaches the apiserver through it."""
    admin = yaml.safe_load(k8s.kubeconfig.read_text())
    files = {"ca.crt": admin["clusters"][0]["cluster"]["certificate-authority-data"],
             "admin.crt": admin["users"][0]["user"]["client-certificate-data"],
             "admin.key": admin["users"][0]["user"]["client-key-data"]}
    for name, data in files.items():
        (tmp_path / name).write_bytes(base64.b64decode(data))
    ca, tls = loopback_tls(tmp_path, "the test's proxy CA")
    FaultyApi.faults, FaultyApi.seen = {}, []
    as_admin = ssl.create_default_context(cafile=tmp_path / "ca.crt")
    as_admin.load_cert_chain(tmp_path / "admin.crt", tmp_path / "admin.key")
    with httpx.Client(base_url=k8s.api, verify=as_admin, timeout=30) as upstream:
        FaultyApi.upstream = upstream
        with http_server(FaultyApi, tls=tls) as url:
            config = {"apiVersion": "v1", "kind": "Config", "current-context": "proxy",
                      "clusters": [{"name": "proxy", "cluster": {
                          "server": url, "certificate-authority-data": base64.b64encode(ca.cert_pem.encode()).decode()}}],
                      "users": [{"name": "proxied", "user": {"token": "the-proxy-authenticates-as-admin"}}],
                      "contexts": [{"name": "proxy", "context": {"cluster": "proxy", "user": "proxied"}}]}
            kubeconfig = tmp_path / "proxy.kubeconfig"
            kubeconfig.write_text(yaml.safe_dump(config))
            kubeconfig.chmod(0o600)
            yield kubeconfig


def read_through(kubeconfig, prefect_api: str, home) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PREFECT_API_URL": prefect_api, "PREFECT_HOME": str(home), "DO_NOT_TRACK": "1"}
    return subprocess.run([sys.executable, "-c", SCRIPT, str(kubeconfig), MINIO_KEYS["accesskey"]],
                          capture_output=True, text=True, env=env, timeout=180)


def task_run_count(prefect_api: str, stdout: str) -> int:
    """How many times Prefect's engine ran the task (1: never retried), as its server records it."""
    flow_run = json.loads(stdout.splitlines()[0])["flow_run"]
    found = httpx.post(f"{prefect_api}/task_runs/filter", json={"flow_runs": {"id": {"any_": [flow_run]}}},
                       timeout=30).raise_for_status().json()
    (task_run,) = found
    return task_run["run_count"]


@pytest.mark.parametrize(("faults", "requests", "runs"), [
    ([503, 503], [503, 503, 200], 1),  # tried again inside the call
    ([503] * 7, [503] * 7 + [200], 2),  # the call's six tries spent: Prefect's retry of the task
], ids=["503-twice", "503-seven-times"])
def test_a_503_is_tried_again_and_the_run_completes(faulty_api, prefect_api, tmp_path, faults, requests, runs):
    FaultyApi.faults[SECRET] = list(faults)
    done = read_through(faulty_api, prefect_api, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == {"read": True}  # the apiserver's Secret, read at last
    assert [status for path, status in FaultyApi.seen if path == SECRET] == requests
    assert task_run_count(prefect_api, done.stdout) == runs


def test_a_422_fails_at_once_with_one_request(faulty_api, prefect_api, tmp_path):
    FaultyApi.faults[SECRET] = [422]
    done = read_through(faulty_api, prefect_api, tmp_path)
    assert done.returncode == 1
    assert [status for path, status in FaultyApi.seen if path == SECRET] == [422]
    assert "Kubernetes API: read Secret minio/minio-access-secret failed with 422" in done.stderr


def test_a_stalled_call_ends_at_the_sites_api_timeout(faulty_api):
    """cluster.api_timeout_seconds bounds one call's wait: 1 s here, against a proxy that holds
    the request for STALL_SECONDS."""
    import urllib3
    from kubernetes import client

    from crflow.tasks.kubeapi import KubeAccess, api_client

    FaultyApi.faults[SECRET] = ["stall"]
    started = time.monotonic()
    with api_client(KubeAccess(kubeconfig=str(faulty_api), read_seconds=1)) as api:
        with pytest.raises(urllib3.exceptions.HTTPError, match="timed out"):  # (a read timeout, maybe wrapped)
            client.CoreV1Api(api).read_namespaced_secret("minio-access-secret", "minio")
    assert time.monotonic() - started < STALL_SECONDS - 2
