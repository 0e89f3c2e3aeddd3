"""`crflow uninstall` on both targets. The local test is real end to end (registry, skopeo,
curl); the kubernetes test runs on the test cluster (tests/cluster.py: a real Kubernetes 1.20
node, whose node-trust pod writes into the node's containerd certs.d), with real helm."""

from __future__ import annotations

import pytest
from kubernetes import client

from conftest import curl_status, skopeo


def test_local_uninstall_keeps_images_ca_and_login_and_a_reinstall_serves_them(crflow, installed, tmp_path):
    site = installed
    ca, login = (site.client / "ca.crt").read_text(), site.login()
    crflow("trust", "-c", str(site.path), "--runtime", "docker", "--root", str(tmp_path))
    out = crflow("uninstall", "-c", str(site.path), "--yes").stdout
    assert "removed: the local registry process" in out
    assert f"removed: docker: removed {tmp_path}/etc/docker/certs.d/{site.server}" in out  # crflow trust undone
    assert site.pod.pid() is None and not (tmp_path / "etc/docker/certs.d" / site.server).exists()

    crflow("install", "-c", str(site.path))
    assert (site.client / "ca.crt").read_text() == ca and site.login() == login  # nothing made anew
    skopeo("inspect", "--authfile", str(site.client / "auth.json"), "--cert-dir", str(site.client),
           f"docker://{site.server}/crflow-smoke:install")  # the image stored before is still served


def test_local_purge_removes_images_ca_and_logins(crflow, installed):
    site = installed
    user, password = site.login()
    out = crflow("uninstall", "-c", str(site.path), "--yes", "--purge").stdout
    assert f"removed: the state directory {site.state}" in out and "kept: nothing (purged)" in out
    assert not site.state.exists()
    crflow("install", "-c", str(site.path))
    assert site.login() != (user, password) and curl_status(site, user, password) == 401  # a new site


def test_uninstall_asks_first_and_without_a_terminal_says_to_add_yes(crflow, installed):
    result = crflow("uninstall", "-c", str(installed.path), check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == \
        "crflow: error: crflow uninstall asks before it goes on: run it in a terminal, or add --yes"
    assert "the local registry process" in result.stdout  # the plan is shown
    assert installed.pod.pid() is not None  # nothing was removed


@pytest.mark.kubernetes
def test_kubernetes_uninstall_clears_the_node_and_the_pull_secrets_and_keeps_the_ca(crflow, cluster_site):
    site, core = cluster_site, cluster_site.core
    team = site.consumer("team-a")
    site.settings["pull_secrets"] = {"namespaces": [team], "default_service_account": True}
    site.write()
    crflow("install", "-c", str(site.path))
    assert site.node_certs() == [site.server]
    assert core.read_namespaced_service_account("default", team).image_pull_secrets
    # Another site's release is called `registry` too, in another namespace: its pull Secret
    # (labelled as crflow labels it) must outlive this site's uninstall. Tests on this
    # cluster run side by side, so this once removed a neighbour's Secret mid-test.
    neighbour = site.consumer("team-b")
    core.create_namespaced_secret(neighbour, client.V1Secret(
        metadata=client.V1ObjectMeta(name="registry-pull", labels={
            "app.kubernetes.io/name": "crflow-registry", "app.kubernetes.io/instance": "registry",
            "app.kubernetes.io/managed-by": "crflow", "crflow.io/registry-namespace": f"{site.namespace}-other"}),
        type="kubernetes.io/dockerconfigjson", string_data={".dockerconfigjson": '{"auths": {}}'}))

    out = crflow("uninstall", "-c", str(site.path), "--yes").stdout
    assert "removed: the node-trust files on 1 nodes" in out
    assert f"removed: helm release {site.namespace}/registry" in out
    assert f"removed: pull Secret {team}/registry-pull" in out
    assert f"pull Secret {neighbour}/" not in out and core.read_namespaced_secret("registry-pull", neighbour)
    assert site.node_certs() == []  # taken off before the release went
    assert "registry" not in site.helm("list", "-n", site.namespace, "-q").split()
    assert [s.metadata.name for s in core.list_namespaced_secret(team).items
            if s.type != "kubernetes.io/service-account-token"] == []
    assert not core.read_namespaced_service_account("default", team).image_pull_secrets
    kept = {s.metadata.name for s in core.list_namespaced_secret(site.namespace).items}
    assert {"registry-tls", "registry-ca", "registry-login"} <= kept  # the CA and the login stay

    out = crflow("uninstall", "-c", str(site.path), "--yes", "--purge").stdout  # a rerun: only the purge is left
    assert f"removed: Secret {site.namespace}/registry-tls" in out
    assert {s.metadata.name for s in core.list_namespaced_secret(site.namespace).items
            if s.type != "kubernetes.io/service-account-token"} == set()
