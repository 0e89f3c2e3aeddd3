"""The chart's probes and metrics on the local target: the same registry process, config and
debug server the chart's pod runs. curl is the judge of every endpoint; `crflow status` asks
the probes as a kubelet would.

The storage outage uses moto's S3 server (the stand-in for MinIO). moto keeps its data in
memory, so the server started again is empty: the test makes the bucket again, as a MinIO
that came back would still have it."""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml
from minio import Minio

from conftest import BIN
from servers import free_port, start_server, stop_server, wait_http


def curl(url: str, *args: str) -> tuple[int, str]:
    out = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", "--max-time", "10", *args, url],
                         capture_output=True, text=True, timeout=30)
    body, _, code = out.stdout.rpartition("\n")
    return int(code or 0), body


def poll(what: str, check, timeout: float = 60):
    """`check()` until it returns a true value, for at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.3)
    raise AssertionError(f"not within {timeout} s: {what}")


def listeners(port: int) -> set[str]:
    """The IPv4 addresses something listens on at `port`, as the kernel lists them (/proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            found.add(".".join(str(int(address[i:i + 2], 16)) for i in (6, 4, 2, 0)))  # little-endian
    return found


def test_the_debug_server_serves_the_registrys_request_counters_on_loopback_only(crflow, make_site):
    """install pushed and pulled its check image: the counters show it. The registry listens on
    127.0.0.2 here, so the kernel's own table shows the debug server (it also serves pprof)
    bound to 127.0.0.1 and nowhere else."""
    site = make_site(registry={"ips": ["127.0.0.2"], "dns_names": ["localhost"], "port": free_port()})
    crflow("install", "-c", str(site.path))
    port, registry_port = site.settings["registry"]["metrics_port"], site.settings["registry"]["port"]
    code, metrics = curl(f"http://127.0.0.1:{port}/metrics")
    assert code == 200
    puts = [line for line in metrics.splitlines() if line.startswith("registry_http_requests_total{")
            and 'handler="manifest"' in line and 'method="put"' in line]
    assert puts and all(float(line.rsplit(" ", 1)[1]) >= 1 for line in puts), metrics[:2000]
    assert "registry_storage_action_seconds_count" in metrics
    assert listeners(port) == {"127.0.0.1"} and listeners(registry_port) == {"127.0.0.2"}
    assert curl(f"http://127.0.0.2:{port}/metrics")[0] == 0  # nothing answers there


@pytest.fixture
def own_moto(tmp_path):
    """A moto S3 server this test may stop and start again on the same port."""
    port, log = free_port(), tmp_path / "moto.log"
    servers = []

    def start():
        servers.append(start_server([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], log))
        wait_http(f"http://127.0.0.1:{port}", 60, "moto", servers[-1])

    start()
    yield f"http://127.0.0.1:{port}", start, lambda: stop_server(servers[-1])
    stop_server(servers[-1])


def test_an_s3_outage_makes_the_registry_unready_not_dead(crflow, make_site, own_moto, tmp_path):
    endpoint, start_s3, stop_s3 = own_moto
    keys = tmp_path / "minio-keys.yaml"
    keys.write_text(yaml.safe_dump({"accesskey": "crflow-test", "secretkey": "not-a-real-secret-0123456789"}))
    bucket = f"container-registry-{uuid.uuid4().hex[:8]}"
    # The registry checks its storage every second, and one failure counts (the chart's default is 10 s, 3).
    site = make_site(storage={"kind": "s3", "endpoint": endpoint, "bucket": bucket, "credentials": {"file": str(keys)}},
                     chart={"values": {"configData": {"health": {"storagedriver": {
                         "enabled": True, "interval": "1s", "threshold": 1}}}}})
    crflow("install", "-c", str(site.path))
    pid, debug = site.pod.pid(), f"http://127.0.0.1:{site.settings['registry']['metrics_port']}"
    ready_url, ca = f"{site.url}/", ("--cacert", str(site.client / "ca.crt"))
    assert curl(ready_url, *ca)[0] == 200 and curl(f"{debug}/debug/vars")[0] == 200

    stop_s3()
    code, body = poll("readiness fails", lambda: (lambda r: r if r[0] != 200 else None)(curl(ready_url, *ca)))
    assert code == 503 and "health check failed" in body
    assert curl(f"{debug}/debug/vars")[0] == 200  # liveness: the process answers
    health_code, health = curl(f"{debug}/debug/health")
    assert health_code == 503 and "storagedriver_s3" in health
    status = crflow("status", "-c", str(site.path), check=False)
    assert status.returncode == 3, status.stdout + status.stderr
    assert "live but not ready: storagedriver_s3" in status.stdout and "with no restart" in status.stdout
    assert site.pod.pid() == pid

    start_s3()
    Minio(endpoint.split("://")[1], access_key="x", secret_key="y", secure=False, region="us-east-1").make_bucket(bucket)
    poll("readiness is back", lambda: curl(ready_url, *ca)[0] == 200)
    assert site.pod.pid() == pid  # the same process throughout: never restarted
    assert crflow("status", "-c", str(site.path)).returncode == 0
