"""Pull-through mirrors, run for real: the mirror's Deployment, as the chart renders it, runs
as a local `docker-registry` process (crflow's LocalPod plays the kubelet) in front of an
upstream registry on loopback (the chart's registry with TLS and no login, as a public one
serves anonymous pulls). skopeo and a real containerd, not crflow, pull through it and judge.
On the test cluster (a real Kubernetes 1.20 node), the mirror is the chart's Deployment, node
trust's DaemonSet wires the node's containerd, and a pod whose image names the upstream runs.
REAL: distribution in proxy mode and as the upstream, helm's rendering, skopeo, containerd, TLS,
the apiserver, kubelet and kube-proxy. EMULATED: moto is MinIO (the cluster mirror's storage)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import subprocess
import sys
import time

import pytest
import yaml
from pydantic import SecretStr

from conftest import oci_layout, skopeo
from crflow.chart import CHART_DIR
from crflow.localpod import LocalPod
from crflow.tasks.credentials import Credentials, htpasswd_line, new_credentials
from crflow.tasks.helm import helm_executable
from crflow.tasks.pki import new_ca, new_server_cert
from servers import free_port

RELEASE = "r"


def render(values: dict) -> list[dict]:
    done = subprocess.run([helm_executable(), "template", RELEASE, str(CHART_DIR), "--namespace", "n", "-f", "-"],
                          input=yaml.safe_dump(values), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def mirror_values(upstream: str, **mirror) -> dict:
    return {"tlsSecretName": "r-tls", "secrets": {"htpasswdSecretName": "r-htpasswd"},
            "persistence": {"enabled": True},
            "mirrors": [{"name": "up", "remoteurl": f"https://{upstream}", "secretRef": "r-mirror-up",
                         "caBundleSecretName": "r-up-ca", **mirror}]}


def test_the_chart_renders_a_mirror_beside_the_registry_with_no_secret_in_it():
    manifests = render(mirror_values("upstream.example:5000", service={"type": "NodePort", "port": 5443,
                                                                       "nodePort": 30443}))
    names = {(m["kind"], m["metadata"]["name"]) for m in manifests}
    assert {("Deployment", "r"), ("Deployment", "r-mirror-up"), ("Service", "r-mirror-up"),
            ("ConfigMap", "r-mirror-up-config")} <= names
    deployments = {m["metadata"]["name"]: m for m in manifests if m["kind"] == "Deployment"}
    assert deployments["r"]["spec"]["selector"] != deployments["r-mirror-up"]["spec"]["selector"]
    (config,) = [yaml.safe_load(m["data"]["config.yml"]) for m in manifests if m["metadata"]["name"] == "r-mirror-up-config"]
    assert config["proxy"] == {"remoteurl": "https://upstream.example:5000"}  # the login is not in it
    assert config["storage"]["filesystem"]["rootdirectory"] == "/var/lib/registry/mirrors/up"
    # No blob descriptor cache in a mirror: evictions (the proxy's and gc's) would leave it stale.
    registry_config = next(yaml.safe_load(m["data"]["config.yml"]) for m in manifests if m["metadata"]["name"] == "r-config")
    assert "cache" in registry_config["storage"] and "cache" not in config["storage"]
    pod = deployments["r-mirror-up"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "r" and ("ServiceAccount", "r-mirror-up") not in names  # the registry's
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["REGISTRY_PROXY_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "r-mirror-up", "key": "password"}
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"r"}  # the registry's own volume, under a folder of its own
    (service,) = [m for m in manifests if m["kind"] == "Service" and m["metadata"]["name"] == "r-mirror-up"]
    assert service["spec"]["type"] == "NodePort" and service["spec"]["ports"][0]["nodePort"] == 30443


def test_a_new_upstream_login_version_rolls_the_mirrors_pod_and_not_the_registrys():
    """The proxy reads its upstream login at start only: crflow passes the version of the login's
    Secret, and the mirror's pod template (only its) changes with it."""
    def templates(version: str) -> dict:
        values = mirror_values("upstream.example:5000", loginVersion=version)
        return {m["metadata"]["name"]: m["spec"]["template"] for m in render(values) if m["kind"] == "Deployment"}

    before, after = templates("version-one"), templates("version-two")
    assert before["r"] == after["r"] and before["r-mirror-up"] != after["r-mirror-up"]
    assert "version-one" not in json.dumps(before["r-mirror-up"])  # in a checksum, not as text


def test_a_mirrors_gc_job_runs_its_pod_spec_without_the_upstream_login():
    from crflow.chart import rendered_deployment
    from crflow.tasks.workloads import gc_job

    manifests = render(mirror_values("upstream.example:5000"))
    template = rendered_deployment(manifests, "r-mirror-up")["spec"]["template"]
    assert "REGISTRY_PROXY_PASSWORD" in json.dumps(template)  # the mirror's own pod has it
    job = gc_job("r-mirror-up-gc", template, [], {}, "r-mirror-up")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert "REGISTRY_PROXY" not in json.dumps(job) and container["image"] == template["spec"]["containers"][0]["image"]
    config = next(v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "config")
    assert config["configMap"]["name"] == "r-mirror-up-config"  # the mirror's config: its storage under mirrors/up


def test_a_gc_window_leaves_the_mirrors_writable():
    """gc's read-only window (chart.read_only) is the registry's: a mirror's cache keeps filling."""
    from crflow.chart import is_read_only, read_only

    manifests = render(read_only(mirror_values("upstream.example:5000")))
    configs = {m["metadata"]["name"]: yaml.safe_load(m["data"]["config.yml"]) for m in manifests
               if m["kind"] == "ConfigMap"}
    assert is_read_only(configs["r-config"])
    unlocked = render(mirror_values("upstream.example:5000"))
    assert [m for m in manifests if "mirror" in m["metadata"]["name"]] == \
        [m for m in unlocked if "mirror" in m["metadata"]["name"]]  # not a byte changes: no restart


def test_the_community_charts_proxy_key_names_the_mirrors_value():
    done = subprocess.run([helm_executable(), "template", RELEASE, str(CHART_DIR), "--set", "proxy.enabled=true"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "proxy: each pull-through cache is an entry of mirrors" in done.stderr


def tls_files(folder, name: str, host: str = "127.0.0.1") -> dict:
    """A CA of the test's own and a server certificate for `host`: the chart's TLS Secret,
    with the CA also written to folder/ca.crt for the clients."""
    ca = new_ca(name, days=1, key_algorithm="ecdsa-p256")
    served = new_server_cert(ca, [host], [], days=1, key_algorithm="ecdsa-p256")
    folder.mkdir()
    (folder / "ca.crt").write_text(ca.cert_pem)
    return {"tls.crt": SecretStr(served.cert_pem), "tls.key": served.key_pem, "ca.crt": SecretStr(ca.cert_pem)}


def run_pod(folder, manifests: list[dict], secrets: dict, deployment: str | None = None,
            host: str = "127.0.0.1") -> tuple[LocalPod, str]:
    """The rendered Deployment run as a local process on `host`: (its LocalPod, its address)."""
    port, data = free_port(), folder / "data"
    data.mkdir(mode=0o700, parents=True)
    pod = LocalPod(folder / "pod", deployment=deployment)
    pod.apply(manifests, secrets, {RELEASE: data}, (host, port), free_port())
    return pod, f"{host}:{port}"


@contextlib.contextmanager
def serving_upstream(folder, host: str = "127.0.0.1"):
    """The upstream: the chart's registry with TLS and no login, as a public registry serves
    anonymous pulls (distribution 2.8's proxy logs in only where the upstream answers with a
    Bearer challenge; see test_a_basic_auth_upstream_is_asked_with_no_login)."""
    secrets = {"r-tls": tls_files(folder / "upstream-client", "upstream test CA", host)}
    pod, address = run_pod(folder / "upstream", render({"tlsSecretName": "r-tls", "persistence": {"enabled": True}}),
                           secrets, host=host)
    try:
        yield pod, address, folder / "upstream-client"
    finally:
        pod.stop()


@pytest.fixture
def upstream(tmp_path):
    with serving_upstream(tmp_path) as served:
        yield served


def anonymous_mirror(files, upstream_address: str, upstream_files) -> tuple[list[dict], dict, Credentials]:
    """The chart's rendering of a mirror of an upstream that asks no login, and the Secrets it
    mounts: TLS of the test's own (its CA in files/ca.crt) and an htpasswd login;
    (manifests, Secrets, that login)."""
    client = new_credentials("puller")
    secrets = {"r-tls": tls_files(files, "mirror test CA"), "r-htpasswd": {"htpasswd": htpasswd_line(client, 5)},
               "r-up-ca": {"ca.crt": SecretStr((upstream_files / "ca.crt").read_text())}}
    values = mirror_values(upstream_address)
    del values["mirrors"][0]["secretRef"]
    return render(values), secrets, client


def write_auth(files, client: Credentials, *addresses: str) -> None:
    """files/auth.json: `client`'s login for each of `addresses`, as skopeo reads it."""
    login = base64.b64encode(f"{client.user}:{client.password.get_secret_value()}".encode()).decode()
    (files / "auth.json").write_text(json.dumps({"auths": {address: {"auth": login} for address in addresses}}))


@pytest.fixture
def mirror(upstream, tmp_path):
    """The chart's mirror of the upstream, running on loopback with TLS and a login of its own:
    (LocalPod, its address, a folder with its CA and an auth.json, its data folder)."""
    _, upstream_address, upstream_files = upstream
    files = tmp_path / "mirror-client"
    manifests, secrets, client = anonymous_mirror(files, upstream_address, upstream_files)
    pod, address = run_pod(tmp_path / "mirror", manifests, secrets, deployment="r-mirror-up")
    write_auth(files, client, address)
    try:
        yield pod, address, files, tmp_path / "mirror" / "data"
    finally:
        pod.stop()


def digest_through(address: str, files, repo: str, auth: bool = True) -> str:
    found = skopeo("inspect", *(["--authfile", str(files / "auth.json")] if auth else []), "--cert-dir", str(files),
                   f"docker://{address}/{repo}")
    return json.loads(found.stdout)["Digest"]


def test_a_pull_through_the_mirror_is_cached_and_served_with_the_upstream_stopped(upstream, mirror, tmp_path):
    upstream_pod, upstream_address, upstream_files = upstream
    pod, address, files, data = mirror
    oci_layout(tmp_path / "layout", "1")
    skopeo("copy", "--dest-cert-dir", str(upstream_files), f"oci:{tmp_path / 'layout'}:1",
           f"docker://{upstream_address}/team/app:1")
    pushed = digest_through(upstream_address, upstream_files, "team/app:1", auth=False)

    skopeo("copy", "--src-authfile", str(files / "auth.json"), "--src-cert-dir", str(files),
           f"docker://{address}/team/app:1", f"oci:{tmp_path / 'first'}:1")
    assert digest_through(address, files, "team/app:1") == pushed
    cached = list((data / "mirrors" / "up" / "docker" / "registry" / "v2" / "blobs").rglob("data"))
    assert len(cached) >= 2, "the mirror's storage holds no blobs: it did not cache the pull"

    upstream_pod.stop()
    skopeo("copy", "--src-authfile", str(files / "auth.json"), "--src-cert-dir", str(files),
           f"docker://{address}/team/app@{pushed}", f"oci:{tmp_path / 'cached'}:1")
    assert (tmp_path / "cached" / "index.json").exists()


def test_a_basic_auth_upstream_is_asked_with_no_login(installed, tmp_path):
    """distribution 2.8's proxy sends the upstream login only after a Bearer challenge: an
    upstream with basic auth (htpasswd, as crflow's own registry) is asked anonymously and
    refuses. This pins the limitation (README: mirrors), so a distribution that lifts it shows."""
    user, password = installed.login()
    files = tmp_path / "mirror-client"
    client = new_credentials("puller")
    secrets = {"r-tls": tls_files(files, "mirror test CA"), "r-htpasswd": {"htpasswd": htpasswd_line(client, 5)},
               "r-mirror-up": {"username": SecretStr(user), "password": SecretStr(password)},
               "r-up-ca": {"ca.crt": SecretStr((installed.client / "ca.crt").read_text())}}
    pod, address = run_pod(tmp_path / "mirror", render(mirror_values(installed.server)), secrets,
                           deployment="r-mirror-up")
    try:
        write_auth(files, client, address)
        oci_layout(tmp_path / "layout", "1")
        skopeo("copy", "--dest-authfile", str(installed.client / "auth.json"), "--dest-cert-dir",
               str(installed.client), f"oci:{tmp_path / 'layout'}:1", f"docker://{installed.server}/team/app:1")
        refused = skopeo("inspect", "--authfile", str(files / "auth.json"), "--cert-dir", str(files),
                         f"docker://{address}/team/app:1", check=False)
        assert refused.returncode != 0 and "manifest unknown" in refused.stderr
        upstream_log = (installed.state / "pod" / "registry.log").read_text()
        assert '"GET /v2/team/app/manifests/1 HTTP/2.0" 401' in upstream_log  # asked with no login
    finally:
        pod.stop()


def test_a_pull_without_the_mirrors_login_is_refused(mirror):
    pod, address, files, data = mirror
    refused = skopeo("inspect", "--cert-dir", str(files), "--no-creds", f"docker://{address}/team/app:1", check=False)
    assert refused.returncode != 0 and "unauthorized" in refused.stderr.lower()


def installed_with_mirror(crflow, make_site, upstream, tmp_path, **mirror):
    """A local site whose mirror `up` fronts the upstream, installed, and team/app:1 pushed to
    the upstream: (site, the mirror's port)."""
    _, upstream_address, upstream_files = upstream
    port = free_port()
    site = make_site(mirrors=[{"name": "up", "upstream": f"https://{upstream_address}", "prefix": upstream_address,
                               "port": port, "metrics_port": free_port(),
                               "ca_bundle": str(upstream_files / "ca.crt"), **mirror}])
    crflow("install", "-c", str(site.path))
    oci_layout(tmp_path / "layout", "1")
    skopeo("copy", "--dest-cert-dir", str(upstream_files), f"oci:{tmp_path / 'layout'}:1",
           f"docker://{upstream_address}/team/app:1")
    return site, port


def test_install_runs_the_sites_mirror_beside_the_registry_and_status_names_it(crflow, make_site, upstream,
                                                                                 tmp_path):
    upstream_pod, upstream_address, upstream_files = upstream
    site, port = installed_with_mirror(crflow, make_site, upstream, tmp_path)
    pushed = digest_through(upstream_address, upstream_files, "team/app:1", auth=False)

    # The client files crflow wrote hold the mirror's address: its CA and login are the registry's.
    assert digest_through(f"127.0.0.1:{port}", site.client, "team/app:1") == pushed
    status = crflow("status", "-c", str(site.path))
    assert f"mirrors: up of https://{upstream_address} (process " in status.stdout
    mirror = LocalPod(site.state / "mirrors" / "up")
    running = mirror.pid()
    crflow("install", "-c", str(site.path))  # a rerun leaves the mirror as it is
    crflow("gc", "-c", str(site.path))  # and so does the registry's read-only window
    assert running is not None and mirror.pid() == running
    old = (site.client / "auth.json").read_text()
    crflow("rotate-credentials", "-c", str(site.path), "--grace", "0")  # the mirror takes the new login too
    assert (site.client / "auth.json").read_text() != old
    assert digest_through(f"127.0.0.1:{port}", site.client, "team/app:1") == pushed
    retired = tmp_path / "retired"
    retired.mkdir()
    (retired / "auth.json").write_text(old)
    (retired / "ca.crt").write_bytes((site.client / "ca.crt").read_bytes())
    refused = skopeo("inspect", "--authfile", str(retired / "auth.json"), "--cert-dir", str(retired),
                     f"docker://127.0.0.1:{port}/team/app:1", check=False)
    assert refused.returncode != 0 and "unauthorized" in refused.stderr.lower()

    crflow("down", "-c", str(site.path))
    assert mirror.pid() is None and site.pod.pid() is None


def test_gc_evicts_what_a_mirror_cached_before_keep_days_and_the_next_pull_fetches_it_again(crflow, make_site,
                                                                                              upstream, tmp_path):
    """EMULATED: age. The old image's revision link is dated two days back (its mtime is what
    crflow reads, as it reads when a push landed); everything else is the real chart, proxy,
    `registry garbage-collect`, skopeo and the upstream's own log."""
    upstream_pod, upstream_address, upstream_files = upstream
    site, port = installed_with_mirror(crflow, make_site, upstream, tmp_path, keep_days=1)
    fresh = oci_layout(tmp_path / "fresh", "1")
    skopeo("copy", "--dest-cert-dir", str(upstream_files), f"oci:{tmp_path / 'fresh'}:1",
           f"docker://{upstream_address}/team/fresh:1")
    cache = site.state / "data" / "mirrors" / "up" / "docker" / "registry" / "v2"
    layer = {}
    for repo in ("app", "fresh"):
        found = json.loads(skopeo("inspect", "--authfile", str(site.client / "auth.json"), "--cert-dir",
                                  str(site.client), f"docker://127.0.0.1:{port}/team/{repo}:1").stdout)
        (layer[repo],) = found["Layers"]
        skopeo("copy", "--src-authfile", str(site.client / "auth.json"), "--src-cert-dir", str(site.client),
               f"docker://127.0.0.1:{port}/team/{repo}:1", f"dir:{tmp_path / ('pulled-' + repo)}")

    def cached(digest: str) -> bool:
        return (cache / "blobs" / "sha256" / digest[7:9] / digest[7:] / "data").exists()

    deadline = time.monotonic() + 30  # the proxy commits a blob to its storage as it finishes serving it
    while not all(map(cached, layer.values())) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(map(cached, layer.values())), "the pulls did not go through the mirror"
    assert fresh.layers and layer["app"] != layer["fresh"]
    old = time.time() - 2 * 86400
    for link in (cache / "repositories" / "team" / "app" / "_manifests" / "revisions").rglob("link"):
        os.utime(link, (old, old))

    dry = crflow("gc", "-c", str(site.path), "--dry-run").stdout
    assert "mirror up: 0 blobs would go (1 manifests to evict)" in dry, dry
    assert cached(layer["app"])
    done = crflow("gc", "-c", str(site.path)).stdout
    assert re.search(r"mirror up: [1-9]\d* blobs deleted \(1 manifests evicted\)", done), done
    assert not cached(layer["app"]) and cached(layer["fresh"])
    assert not (cache / "repositories" / "team" / "app" / "_manifests" / "tags" / "1").exists()

    asked = upstream_pod.logfile.read_text().count(f"/blobs/{layer['app']}")
    skopeo("copy", "--src-authfile", str(site.client / "auth.json"), "--src-cert-dir", str(site.client),
           f"docker://127.0.0.1:{port}/team/app:1", f"dir:{tmp_path / 'again'}")  # the evicted image, fetched anew
    assert upstream_pod.logfile.read_text().count(f"/blobs/{layer['app']}") > asked
    assert (tmp_path / "again" / layer["app"][7:]).read_bytes() == (tmp_path / "pulled-app" / layer["app"][7:]).read_bytes()
    skopeo("copy", "--src-authfile", str(site.client / "auth.json"), "--src-cert-dir", str(site.client),
           f"docker://127.0.0.1:{port}/team/fresh:1", f"dir:{tmp_path / 'fresh-again'}")  # the kept one, still served


def test_keep_days_past_the_proxys_week_gets_one_line(crflow, make_site):
    site = make_site(mirrors=[{"name": "up", "upstream": "https://upstream.example", "prefix": "upstream.example",
                               "port": free_port(), "keep_days": 30}])
    refused = crflow("status", "-c", str(site.path), check=False)
    assert refused.returncode == 1 and "keep_days" in refused.stderr and "0 to 7" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_containerd_wired_only_by_crflow_trust_pulls_through_the_mirror_and_falls_back(crflow, make_site,
                                                                                         upstream, tmp_path):
    from containerd import Containerd, Unavailable

    upstream_pod, upstream_address, upstream_files = upstream
    site, port = installed_with_mirror(crflow, make_site, upstream, tmp_path)
    root = tmp_path / "root"
    root.mkdir()
    certs_d = root / "etc" / "containerd" / "certs.d"
    try:  # the upstream's CA as the system's, as a public registry's is
        runtime = Containerd(tmp_path / "containerd", certs_d, system_cas=upstream_files)
    except Unavailable as why:
        pytest.skip(f"needs a real containerd: {why}")
    mirror = LocalPod(site.state / "mirrors" / "up")
    image = f"{upstream_address}/team/app:1"  # the name the pod asks for: unchanged
    try:
        crflow("trust", "-c", str(site.path), "--runtime", "containerd", "--root", str(root))
        hosts = certs_d / upstream_address / "hosts.toml"
        assert hosts.stat().st_mode & 0o777 == 0o600  # it holds the mirror's login
        assert runtime.pull(image, None, None) is None  # no login given: the hosts.toml's header is the mirror's
        cached = list((site.state / "data" / "mirrors" / "up" / "docker" / "registry" / "v2" / "blobs").rglob("data"))
        assert len(cached) >= 2, "containerd's pull did not go through the mirror"
        asked = upstream_pod.logfile.read_text().count("containerd/")

        mirror.stop()
        assert runtime.pull(image, None, None) is None  # the mirror gone: the upstream, hosts.toml's server
        assert upstream_pod.logfile.read_text().count("containerd/") > asked, "the fallback did not reach the upstream"

        crflow("trust", "-c", str(site.path), "--runtime", "containerd", "--root", str(root), "--remove")
        assert not (certs_d / upstream_address).exists()
    finally:
        runtime.stop()


def test_an_untrusted_upstream_is_named_by_install_and_a_gone_one_by_status(crflow, make_site, upstream):
    upstream_pod, upstream_address, upstream_files = upstream
    site = make_site(mirrors=[{"name": "up", "upstream": f"https://{upstream_address}", "prefix": upstream_address,
                               "port": free_port(), "metrics_port": free_port()}])
    refused = crflow("install", "-c", str(site.path), check=False)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1] == (
        f"crflow: error: mirror up: upstream https://{upstream_address} has a certificate crflow does not trust "
        "(unable to get local issuer certificate); set the mirror's ca_bundle to its CA; the mirror cannot start "
        "without it")

    site.settings["mirrors"][0]["ca_bundle"] = str(upstream_files / "ca.crt")
    site.write()
    crflow("install", "-c", str(site.path))
    assert crflow("status", "-c", str(site.path)).returncode == 0

    def named_by_status_and_verify(line: str) -> None:
        status = crflow("status", "-c", str(site.path), check=False)
        assert status.returncode == 3 and line in status.stdout, status.stdout
        verify = crflow("verify", "-c", str(site.path), check=False)
        assert verify.returncode == 1 and line in verify.stderr.strip().splitlines()[-1], verify.stderr[-2000:]

    site.settings["mirrors"][0]["ca_bundle"] = str(site.client / "ca.crt")  # a CA, but not the upstream's
    site.write()
    named_by_status_and_verify(f"mirror up: upstream https://{upstream_address} has a certificate crflow does not "
                               "trust (unable to get local issuer certificate); the mirror's ca_bundle is not its CA")
    site.settings["mirrors"][0]["ca_bundle"] = str(upstream_files / "ca.crt")
    site.write()
    upstream_pod.stop()
    named_by_status_and_verify(f"mirror up: upstream https://{upstream_address} is not answering")


@pytest.mark.kubernetes
def test_on_the_cluster_a_pod_naming_the_upstream_runs_on_an_image_pulled_through_the_mirror(crflow, make_cluster_site,
                                                                                             cluster_moto, tmp_path):
    """The upstream listens on the cluster bridge's gateway, where the mirror's pod reaches it;
    the pod's image is the pause binary with a layer no node has, pushed there by skopeo."""
    from minio import Minio

    from cluster import GATEWAY, pause_image
    from servers import node_port

    with serving_upstream(tmp_path, GATEWAY) as (upstream_pod, upstream_address, upstream_files):
        site = make_cluster_site()
        app = pause_image(tmp_path, site.node.bin_dir, "team/pause:1", os.urandom(8))
        skopeo("copy", "--dest-cert-dir", str(upstream_files), f"oci-archive:{app}", f"docker://{upstream_address}/team/pause:1")
        port = node_port()
        site.settings["mirrors"] = [{"name": "up", "upstream": f"https://{upstream_address}", "prefix": upstream_address,
                                     "port": port, "ca_bundle": str(upstream_files / "ca.crt"), "keep_days": 0,
                                     "login": {"env": "UP"}}]  # (the upstream asks none: the proxy keeps it unused)
        crflow.env.update(UP_USERNAME="puller", UP_PASSWORD="first")
        site.write()
        crflow("install", "-c", str(site.path))
        hosts = site.node.certs_d / upstream_address / "hosts.toml"
        assert hosts.stat().st_mode & 0o777 == 0o600  # it holds the mirror's login
        assert f'[host."https://{GATEWAY}:{port}"]' in hosts.read_text()
        status = crflow("status", "-c", str(site.path)).stdout
        assert f"mirrors: up of https://{upstream_address} ({GATEWAY}:{port})" in status

        image = f"{upstream_address}/team/pause:1"  # the pod names the upstream: no manifest changed
        site.kubectl("-n", site.namespace, "run", "app", f"--image={image}", "--restart=Never")
        site.kubectl("-n", site.namespace, "wait", "--for=condition=Ready", "pod/app", "--timeout=120s")
        mirror_log = site.kubectl("-n", site.namespace, "logs", "deployment/registry-mirror-up").stdout
        assert "/v2/team/pause/manifests/1" in mirror_log and "containerd/" in mirror_log  # the node asked the mirror
        s3 = Minio(cluster_moto.split("://")[1], access_key="x", secret_key="y", secure=False, region="us-east-1")

        def cached() -> int:
            return sum(o.object_name.endswith("/data") for o in s3.list_objects(
                site.settings["storage"]["bucket"], prefix="mirrors/up/docker/registry/v2/blobs/", recursive=True))

        deadline = time.monotonic() + 30  # the mirror commits a blob to its storage as it finishes serving it
        while cached() < 3 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert cached() >= 3, "the mirror's storage lacks the image's blobs: the pull did not go through it"

        # keep_days 0: gc evicts all the mirror cached, and a Job with the mirror's pod spec collects its blobs.
        done = crflow("gc", "-c", str(site.path)).stdout
        assert re.search(r"mirror up: [1-9]\d* blobs deleted \(1 manifests evicted\)", done), done
        assert cached() == 0
        asked = upstream_pod.logfile.read_text().count("/v2/team/pause/blobs/")
        skopeo("copy", "--src-authfile", str(site.client / "auth.json"), "--src-cert-dir", str(site.client),
               f"docker://{GATEWAY}:{port}/team/pause:1", f"dir:{tmp_path / 'again'}")  # fetched anew by the mirror
        assert upstream_pod.logfile.read_text().count("/v2/team/pause/blobs/") > asked

        # rotate-credentials rotates the mirror's login too: it takes the registry's htpasswd Secret,
        # and node trust's pod reads the login Secret on each sync and rewrites the node's header.
        old_auth = json.loads((site.client / "auth.json").read_text())["auths"][f"{GATEWAY}:{port}"]["auth"]
        retired = tmp_path / "retired"
        retired.mkdir()
        (retired / "auth.json").write_text(json.dumps({"auths": {f"{GATEWAY}:{port}": {"auth": old_auth}}}))
        (retired / "ca.crt").write_bytes((site.client / "ca.crt").read_bytes())

        def mirror_refuses_the_old_login() -> bool:
            found = skopeo("inspect", "--authfile", str(retired / "auth.json"), "--cert-dir", str(retired),
                           f"docker://{GATEWAY}:{port}/team/pause:1", check=False)
            return found.returncode != 0 and "unauthorized" in found.stderr.lower()

        assert not mirror_refuses_the_old_login()
        crflow("rotate-credentials", "-c", str(site.path), "--grace", "0")
        new_auth = json.loads((site.client / "auth.json").read_text())["auths"][f"{GATEWAY}:{port}"]["auth"]
        assert new_auth != old_auth

        deadline = time.monotonic() + 60  # the kubelet refreshes the mounted htpasswd on its sync
        while not (mirror_refuses_the_old_login() and f"Basic {new_auth}" in hosts.read_text()) \
                and time.monotonic() < deadline:
            time.sleep(1)
        assert mirror_refuses_the_old_login() and f"Basic {new_auth}" in hosts.read_text()
        assert digest_through(f"{GATEWAY}:{port}", site.client, "team/pause:1")  # the new login: served

        # A new upstream password reaches the mirror, which reads it at start: the Secret's new version rolls its pod.
        def mirror_state() -> tuple[bytes, str]:
            secret = json.loads(site.kubectl("-n", site.namespace, "get", "secret", "registry-mirror-up-upstream",
                                             "-o", "json").stdout)
            return base64.b64decode(secret["data"]["password"]), site.kubectl(
                "-n", site.namespace, "get", "deployment/registry-mirror-up", "-o",
                "jsonpath={.spec.template.metadata.annotations}").stdout

        password, template = mirror_state()
        crflow("install", "-c", str(site.path))  # the same login: nothing rolls
        assert mirror_state() == (password, template) and password == b"first"
        crflow.env["UP_PASSWORD"] = "second"
        crflow("install", "-c", str(site.path))
        password, rolled = mirror_state()
        assert password == b"second" and rolled != template
        site.kubectl("-n", site.namespace, "rollout", "status", "deployment/registry-mirror-up", "--timeout=120s")

        # The mirror leaves the site file: its Deployment, its Secrets and the nodes' wiring go with it.
        site.settings["mirrors"] = []
        site.write()
        crflow("install", "-c", str(site.path))
        left = site.kubectl("-n", site.namespace, "get", "deployments,secrets", "-o", "name").stdout
        assert "registry-mirror-up" not in left and "secret/registry-htpasswd" in left
        wired = site.node.certs_d / upstream_address
        deadline = time.monotonic() + 60  # node trust's pod rewrites the node's files on its next sync
        while wired.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not wired.exists()

        crflow("uninstall", "-c", str(site.path), "--yes")


def test_a_mirror_logs_in_upstream_with_a_login_from_the_environment_and_a_wrong_one_is_named(
        crflow, make_site, prefect_api, prefect_home, tmp_path):
    """The upstream asks for a login as Docker Hub does (a Bearer challenge, its token service:
    EMULATED, see servers.token_upstream); distribution's proxy and skopeo are real."""
    from test_secrets import assert_nowhere

    from servers import token_upstream

    password = os.urandom(18).hex()
    with token_upstream(tmp_path / "upstream", "puller", password) as (address, files, answers):
        oci_layout(tmp_path / "layout", "1")
        skopeo("copy", "--dest-creds", f"puller:{password}", "--dest-cert-dir", str(files),
               f"oci:{tmp_path / 'layout'}:1", f"docker://{address}/team/app:1")
        pushed = json.loads(skopeo("inspect", "--creds", f"puller:{password}", "--cert-dir", str(files),
                                   f"docker://{address}/team/app:1").stdout)["Digest"]
        port = free_port()
        site = make_site(mirrors=[{"name": "up", "upstream": f"https://{address}", "prefix": address, "port": port,
                                   "metrics_port": free_port(), "ca_bundle": str(files / "ca.crt"),
                                   "login": {"env": "UPSTREAM"}, "probe": "team/app:1"}])
        unset = crflow("install", "-c", str(site.path), check=False)
        assert unset.returncode == 1 and unset.stderr.strip().splitlines()[-1] == (
            "crflow: error: mirrors: up: login.env: set $UPSTREAM_USERNAME and $UPSTREAM_PASSWORD in the environment "
            "crflow runs in (a worker's, for a deployment)")

        env = {"UPSTREAM_USERNAME": "puller", "UPSTREAM_PASSWORD": password}
        runs = [crflow("install", "-c", str(site.path), env=env)]
        assert digest_through(f"127.0.0.1:{port}", site.client, "team/app:1") == pushed  # skopeo, through the mirror
        assert 200 in answers  # the mirror logged in with the login from the environment
        runs.append(crflow("verify", "-c", str(site.path), env=env))  # its probe: team/app:1, pulled twice
        asked = re.findall(r'"(GET|HEAD) /v2/team/app/(manifests|blobs)/\S+ [^"]+" \d+ \d+ "[^"]*" "Go-http-client',
                           (tmp_path / "upstream" / "registry.log").read_text())  # what the mirror asked
        assert ("GET", "blobs") in asked and asked[-1] == ("HEAD", "manifests")  # the second pull: no blob upstream
        assert crflow("status", "-c", str(site.path), env=env).returncode == 0

        wrong = {**env, "UPSTREAM_PASSWORD": "not-" + password}
        line = (f"mirror up: upstream https://{address} refused the login from $UPSTREAM_USERNAME and "
                "$UPSTREAM_PASSWORD (401 from its token service); fix it there")
        status = crflow("status", "-c", str(site.path), env=wrong, check=False)
        assert status.returncode == 3 and line in status.stdout
        verify = crflow("verify", "-c", str(site.path), env=wrong, check=False)
        assert verify.returncode == 1 and line in verify.stderr.strip().splitlines()[-1]
        runs += [status, verify]
        assert_nowhere({"upstream password": password}, runs, site, prefect_api, prefect_home)
        # The login lives only where the mirror's process is started from (its environment, as a
        # kubelet resolves a secretKeyRef), private: nowhere else under the state directory.
        holding = [path for path in site.state.rglob("*") if path.is_file() and password.encode() in path.read_bytes()]
        assert [path.relative_to(site.state).as_posix() for path in holding] == ["mirrors/up/launch.json"]
        assert holding[0].stat().st_mode & 0o077 == 0


def test_a_mirror_takes_its_upstream_login_from_a_prefect_secret_block(crflow, make_site, prefect_api, tmp_path):
    from servers import token_upstream

    password = os.urandom(18).hex()
    with token_upstream(tmp_path / "upstream", "puller", password) as (address, files, answers):
        oci_layout(tmp_path / "layout", "1")
        skopeo("copy", "--dest-creds", f"puller:{password}", "--dest-cert-dir", str(files),
               f"oci:{tmp_path / 'layout'}:1", f"docker://{address}/team/app:1")
        block = f"upstream-{os.urandom(4).hex()}"
        port = free_port()
        site = make_site(mirrors=[{"name": "up", "upstream": f"https://{address}", "prefix": address, "port": port,
                                   "metrics_port": free_port(), "ca_bundle": str(files / "ca.crt"),
                                   "login": {"prefect_secret": block}}])
        missing = crflow("install", "-c", str(site.path), check=False)
        assert missing.returncode == 1 and missing.stderr.strip().splitlines()[-1] == (
            f"crflow: error: mirrors: up: login.prefect_secret: Prefect has no Secret block named {block}; create it "
            'with the value {"username": ..., "password": ...}')

        # The block as a user makes it: Prefect's own Secret, through its API (the value on stdin).
        subprocess.run([sys.executable, "-c", "import json, sys\nfrom prefect.blocks.system import Secret\n"
                        "Secret(value=json.load(sys.stdin)).save(sys.argv[1])", block],
                       input=json.dumps({"username": "puller", "password": password}), text=True, check=True,
                       timeout=120, env={**os.environ, "PREFECT_API_URL": prefect_api})
        out = crflow("install", "-c", str(site.path))
        assert password not in out.stdout + out.stderr
        skopeo("copy", "--src-authfile", str(site.client / "auth.json"), "--src-cert-dir", str(site.client),
               f"docker://127.0.0.1:{port}/team/app:1", f"oci:{tmp_path / 'pulled'}:1")
        assert 200 in answers and (tmp_path / "pulled" / "index.json").exists()


def test_a_kubernetes_secret_reference_is_the_mirrors_own_and_crflow_never_reads_it(tmp_path):
    from crflow.chart import mirror_secrets, values_for
    from crflow.settings import load_site
    from crflow.upstream import upstream_logins

    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump({
        "target": "kubernetes", "state_dir": str(tmp_path / "state"), "namespace": "registry",
        "storage": {"kind": "s3", "endpoint": "https://minio.example", "bucket": "registry"},
        "mirrors": [{"name": "hub", "upstream": "https://registry-1.docker.io", "prefix": "docker.io", "port": 5443,
                     "login": {"secret": "hub-login"}}]}))
    site = load_site(path)
    assert values_for(site, "f")["mirrors"][0]["secretRef"] == "hub-login"
    assert upstream_logins(site) == {} and mirror_secrets(site, {}) == {}
