"""`crflow install` on the local target, checked from outside with independent clients."""

from __future__ import annotations

import gzip
import json
import os
import signal
import ssl
import subprocess
import time

import httpx
import pytest
from cryptography import x509

from conftest import cached_tasks, oci_layout, run_name_prefix, skopeo
from crflow.health import registry_health


def served_certificate(site) -> x509.Certificate:
    pem = ssl.get_server_certificate(("127.0.0.1", site.port))
    return x509.load_pem_x509_certificate(pem.encode())


def test_skopeo_pushes_and_pulls_with_only_the_exported_client_files(crflow, installed, tmp_path):
    out = tmp_path / "client"
    crflow("export-client", "-c", str(installed.path), "--out", str(out))
    assert oct((out / "auth.json").stat().st_mode & 0o777) == "0o600"
    readme = (out / "README.txt").read_text()
    assert "Import-Certificate -FilePath .\\ca.crt -CertStoreLocation Cert:\\LocalMachine\\Root" in readme
    assert "sudo cp ca.crt /usr/local/share/ca-certificates/crflow-registry.crt && sudo update-ca-certificates" in readme
    # a login for every address the certificate names: skopeo by name works with the same files
    skopeo("inspect", "--authfile", str(out / "auth.json"), "--cert-dir", str(out),
           f"docker://localhost:{installed.port}/crflow-smoke:install")

    image = oci_layout(tmp_path / "layout", "v1")
    ref = f"docker://{installed.server}/team/hello:v1"
    skopeo("copy", "--dest-authfile", str(out / "auth.json"), "--dest-cert-dir", str(out),
           f"oci:{tmp_path / 'layout'}:v1", ref)
    pulled = tmp_path / "pulled"
    skopeo("copy", "--src-authfile", str(out / "auth.json"), "--src-cert-dir", str(out), ref, f"oci:{pulled}:v1")
    # skopeo rewrites the manifest and gzips the layer on push; the config comes back byte
    # for byte, and the layer's content is the same tar.
    blobs = pulled / "blobs" / "sha256"
    manifest_digest = json.loads((pulled / "index.json").read_text())["manifests"][0]["digest"]
    manifest = json.loads((blobs / manifest_digest.split(":")[1]).read_text())
    config = (blobs / manifest["config"]["digest"].split(":")[1]).read_bytes()
    (layer,) = manifest["layers"]
    assert config == image.config
    assert gzip.decompress((blobs / layer["digest"].split(":")[1]).read_bytes()) == image.layers[0]
    inspected = json.loads(skopeo("inspect", "--authfile", str(out / "auth.json"), "--cert-dir", str(out), ref).stdout)
    assert inspected["Digest"] == manifest_digest


def test_wrong_password_gets_401(installed):
    user, password = installed.login()
    with httpx.Client(verify=ssl.create_default_context(cafile=str(installed.client / "ca.crt"))) as http:
        good = http.get(f"{installed.url}/v2/", auth=(user, password))
        bad = http.get(f"{installed.url}/v2/", auth=(user, password + "x"))
    assert (good.status_code, bad.status_code) == (200, 401)


def test_client_without_the_ca_gets_an_x509_error(installed):
    result = skopeo("inspect", "--authfile", str(installed.client / "auth.json"),
                    f"docker://{installed.server}/crflow-smoke:install", check=False)
    assert result.returncode != 0
    assert "x509" in result.stderr and "unknown authority" in result.stderr


def test_certificate_names_exactly_the_configured_ips_and_names(crflow, make_site):
    site = make_site(registry={"ips": ["127.0.0.1", "192.168.86.201"], "dns_names": ["localhost", "registry.lan"],
                               "port": 0})
    site.settings["registry"]["port"] = site.port
    site.write()
    crflow("install", "-c", str(site.path))
    san = served_certificate(site).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "192.168.86.201"}
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "registry.lan"}
    # The IPs are IP entries, not DNS names that happen to look like addresses.
    assert "127.0.0.1" not in san.get_values_for_type(x509.DNSName)


def test_second_install_changes_nothing(crflow, installed):
    def snapshot():
        return {
            "ca": (installed.client / "ca.crt").read_bytes(),
            "server_serial": served_certificate(installed).serial_number,
            "htpasswd": (installed.state / "pod" / "volumes" / "auth" / "htpasswd").read_bytes(),
            "auth": (installed.client / "auth.json").read_bytes(),
            "pid": installed.pod.pid(),
        }

    before = snapshot()
    crflow("install", "-c", str(installed.path))
    assert snapshot() == before
    assert cached_tasks(crflow.api, installed.path) == sorted(VAULT_TASKS)


def test_install_brings_a_killed_registry_back_with_the_same_credentials(crflow, installed):
    auth = (installed.client / "auth.json").read_bytes()
    pid = installed.pod.pid()
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    assert crflow("status", "-c", str(installed.path), check=False).returncode == 3
    crflow("install", "-c", str(installed.path))
    assert installed.pod.pid() not in (None, pid)
    assert (installed.client / "auth.json").read_bytes() == auth
    assert "login of user" in crflow("status", "-c", str(installed.path)).stdout


def test_down_stops_and_install_restarts(crflow, installed):
    assert crflow("down", "-c", str(installed.path)).stdout.startswith("Registry stopped")
    assert installed.pod.pid() is None
    crflow("install", "-c", str(installed.path))
    assert installed.pod.pid() is not None


VAULT_TASKS = ["make_ca", "make_credentials", "make_htpasswd", "make_server_cert", "make_http_secret"]
ALL_TASKS = ["check_local_host", *VAULT_TASKS, "ensure_directory", "render_chart", "run_local_pod",
             "save_client_bundle", "wait_until_ready", "push_pull_check", "publish_chart", "publish_summary"]


@pytest.mark.parametrize("killed_after", ALL_TASKS)
def test_killing_the_flow_after_any_task_then_rerunning_converges(crflow, make_site, killed_after):
    """SIGKILL the real `crflow install` process the moment a task reports completion, rerun,
    and check the rerun reused everything the killed run had made, and the registry works."""
    site = make_site()
    process = crflow.popen("install", "-c", str(site.path))
    # Prefect's log line is only the trigger (the API hears of task states later, by events):
    # if its wording changed the run would end unkilled, and the return code says so.
    for line in process.stdout:
        if f"Task run '{run_name_prefix(killed_after)}" in line and "Finished in state" in line:
            process.kill()
            break
    assert process.wait() == -signal.SIGKILL, f"the run ended before {killed_after} finished"
    finished = ALL_TASKS[:ALL_TASKS.index(killed_after) + 1]  # the flow runs them in this order, one by one

    crflow("install", "-c", str(site.path))
    made_before = [task for task in VAULT_TASKS if task in finished]
    assert set(made_before) <= set(cached_tasks(crflow.api, site.path)), "a secret was made again after the kill"
    assert registry_health(site.url, site.client).healthy
    crflow("install", "-c", str(site.path))
    assert cached_tasks(crflow.api, site.path) == sorted(VAULT_TASKS)


def test_install_publishes_the_chart_and_helm_pulls_it_with_the_client_files(crflow, installed, tmp_path):
    """helm (an independent OCI client) pulls the chart crflow pushed, trusting only the CA."""
    import yaml

    from crflow.chart import CHART_DIR
    from crflow.tasks.helm import helm_executable

    version = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())["version"]
    env = {**os.environ, "HOME": str(tmp_path)}  # no helm config of this machine's

    def pull(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([helm_executable(), "pull", f"oci://{installed.server}/charts/crflow-registry",
                               "--version", version, "--destination", str(tmp_path), *args],
                              capture_output=True, text=True, env=env, timeout=60)

    pulled = pull("--ca-file", str(installed.client / "ca.crt"), "--registry-config", str(installed.client / "auth.json"))
    assert pulled.returncode == 0, pulled.stderr
    assert subprocess.run(["tar", "-xzf", str(tmp_path / f"crflow-registry-{version}.tgz"), "-C", str(tmp_path)]).returncode == 0
    assert (tmp_path / "crflow-registry" / "values.yaml").read_text() == (CHART_DIR / "values.yaml").read_text()
    # Neither without the CA nor without the login.
    assert "certificate" in pull("--registry-config", str(installed.client / "auth.json")).stderr
    unauthorized = pull("--ca-file", str(installed.client / "ca.crt"))
    assert unauthorized.returncode != 0 and "basic credential not found" in unauthorized.stderr, unauthorized.stderr
    assert "helm pull oci://" in crflow("install", "-c", str(installed.path)).stdout  # a rerun publishes the same
