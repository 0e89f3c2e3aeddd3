"""Only what is transient is retried, and a bug fails at once with its cause (crflow/errors.py):
Prefect's real task engine with crflow's retry predicate, the Kubernetes client's own
ApiException through crflow's `retrying`, and the CLI's --debug."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from kubernetes.client.exceptions import ApiException

from crflow.errors import CrflowError, Transient, is_transient
from crflow.tasks.kubeapi import retrying

SCRIPT = """
import json
from prefect import flow, task
from crflow.errors import Transient, transient_only

calls = {"bug": 0, "flaky": 0}

@task(retries=2, retry_delay_seconds=0, retry_condition_fn=transient_only)
def bug():
    calls["bug"] += 1
    return {}["missing"]

@task(retries=2, retry_delay_seconds=0, retry_condition_fn=transient_only)
def flaky():
    calls["flaky"] += 1
    if calls["flaky"] < 3:
        raise Transient("Kubernetes API: read a Secret failed with 503: try again")
    return "served"

@flow
def both():
    try:
        bug()
    except KeyError as err:
        calls["raised"] = repr(err)
    return flaky()

print(json.dumps({"result": both(), **calls}))
"""


def test_prefect_retries_a_transient_fault_and_never_a_bug(prefect_api, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "PREFECT_API_URL": prefect_api, "PREFECT_HOME": str(tmp_path), "DO_NOT_TRACK": "1"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome == {"result": "served", "bug": 1, "flaky": 3, "raised": "KeyError('missing')"}


def api_error(status: int) -> ApiException:
    return ApiException(status=status, reason={409: "Conflict", 422: "Unprocessable Entity", 503: "Service Unavailable"}
                        [status])


def test_retrying_tries_again_on_503_and_stops_at_once_on_422_with_the_cause_chained():
    answers = [api_error(503), api_error(503), "read"]

    def call():
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert retrying("read a Secret", call, first_delay=0.01) == "read"
    tried = []

    def refused():
        tried.append(1)
        raise api_error(422)

    with pytest.raises(CrflowError) as caught:
        retrying("write a Secret", refused, first_delay=0.01)
    assert len(tried) == 1 and not isinstance(caught.value, Transient) and not is_transient(caught.value)
    assert isinstance(caught.value.__cause__, ApiException) and caught.value.__cause__.status == 422
    with pytest.raises(Transient) as busy:
        retrying("write a Secret", lambda: (_ for _ in ()).throw(api_error(409)), attempts=2, first_delay=0.01)
    assert busy.value.__cause__.status == 409 and is_transient(busy.value)


def test_debug_shows_the_traceback_and_the_one_line_stays_last(crflow, tmp_path):
    missing = str(tmp_path / "missing.yaml")
    plain = crflow("status", "-c", missing, check=False)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().splitlines() == [f"crflow: error: cannot read site file {missing}: No such file or "
                                                 "directory"]
    debugged = crflow("--debug", "status", "-c", missing, check=False)
    assert debugged.returncode == 1 and debugged.stderr.startswith("Traceback (most recent call last):")
    assert "in load_site" in debugged.stderr
    assert debugged.stderr.strip().splitlines()[-1] == plain.stderr.strip()


def test_the_clients_transport_errors_are_transient_and_a_bug_is_not():
    """What each client crflow calls raises for a dropped or slow connection (python-dxf's
    requests timed out under a busy CI before this list had it, and the install failed)."""
    import httpx
    import requests
    import urllib3

    for err in (requests.exceptions.ReadTimeout("read timed out"), requests.exceptions.ConnectionError("reset"),
                httpx.ConnectError("refused"), urllib3.exceptions.ProtocolError("reset"), TimeoutError(),
                ConnectionResetError(), Transient("503")):
        assert is_transient(err), err
    for err in (KeyError("x"), TypeError("x"), CrflowError("wrong setting"), requests.exceptions.HTTPError("404")):
        assert not is_transient(err), err


@pytest.mark.parametrize("server", ["silent", "refusing"])
def test_helm_meeting_an_api_server_that_does_not_answer_is_transient(tmp_path, server):
    """The real helm against an API server that takes the connection and never answers TLS (a
    frozen one: helm says "Kubernetes cluster unreachable: ... TLS handshake timeout", which
    pyhelm3 does not know; CI's frozen-apiserver test failed on it at once), or refuses it.
    EMULATED: both API servers are loopback sockets; helm and its messages are real."""
    import socket

    from conftest import unanswered_kubeconfig
    from crflow.tasks.helm import deployed_release
    from crflow.tasks.kubeapi import KubeAccess

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        if server == "silent":
            held.listen(8)  # the kernel completes the TCP handshake; nobody ever reads the ClientHello
        server_url = f"https://127.0.0.1:{held.getsockname()[1]}"
        kube = KubeAccess(kubeconfig=str(unanswered_kubeconfig(tmp_path / "kubeconfig", server_url)))
        with pytest.raises(Transient) as raised:
            deployed_release.fn(kube, "registry", "container-registry")
    said = str(raised.value)
    assert "\n" not in said and "cluster unreachable" in said.lower(), said
    assert ("TLS handshake timeout" if server == "silent" else "connection refused") in said
