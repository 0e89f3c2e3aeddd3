"""`crflow uninstall` on both targets. The local test is real end to end (registry, skopeo,
curl); the kubernetes test runs on the emulated cluster (tests/kubeapi and the test kubelet,
whose two nodes run the chart's node-trust script with their certs.d mapped to directories),
with real helm."""

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
def test_kubernetes_uninstall_clears_every_node_and_the_pull_secrets_and_keeps_the_ca(crflow, cluster_site, kubelet,
                                                                                      kube_api):
    site, core = cluster_site, cluster_site.core
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="team-a")))
    site.settings["pull_secrets"] = {"namespaces": ["team-a"], "default_service_account": True}
    site.write()
    crflow("install", "-c", str(site.path))
    assert all(any(node.certs_d.iterdir()) for node in kubelet.nodes)
    assert core.read_namespaced_service_account("default", "team-a").image_pull_secrets

    out = crflow("uninstall", "-c", str(site.path), "--yes").stdout
    assert "removed: the node-trust files on 2 nodes" in out
    assert "removed: helm release container-registry/registry" in out
    assert "removed: pull Secret team-a/registry-pull" in out
    assert all(list(node.certs_d.iterdir()) == [] for node in kubelet.nodes)  # taken off before the release went
    assert "registry" not in kube_api.run("helm", "list", "-n", "container-registry", "-q").split()
    assert [s.metadata.name for s in core.list_namespaced_secret("team-a").items] == []
    assert not core.read_namespaced_service_account("default", "team-a").image_pull_secrets
    kept = {s.metadata.name for s in core.list_namespaced_secret("container-registry").items}
    assert {"registry-tls", "registry-ca", "registry-login"} <= kept  # the CA and the login stay

    out = crflow("uninstall", "-c", str(site.path), "--yes", "--purge").stdout  # a rerun: only the purge is left
    assert "removed: Secret container-registry/registry-tls" in out
    assert {s.metadata.name for s in core.list_namespaced_secret("container-registry").items} == set()
