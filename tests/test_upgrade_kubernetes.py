"""`crflow upgrade` on the emulated cluster with the real helm. EMULATED: the Kubernetes API
(tests/kubeapi) and the kubelet (tests/kubelet.py: rolling updates with maxUnavailable 0,
readiness from the real registry's GET /); helm, the registry processes and S3 (moto) are real."""

from __future__ import annotations

import json
import shutil

import pytest
from kubernetes import client
from test_rotate import push
from test_upgrade import set_chart_values

from conftest import ROOT, last_artifact
from crflow.oci import Registry

pytestmark = pytest.mark.kubernetes


def history(kube_api) -> list[dict]:
    return json.loads(kube_api.run("helm", "history", "registry", "-n", "container-registry", "-o", "json"))


def revisions(kube_api) -> list[tuple[int, str]]:
    return [(entry["revision"], entry["status"]) for entry in history(kube_api)]


def object_versions(site) -> dict[str, str]:
    """resourceVersion of every Deployment, ConfigMap, Service and Secret in the registry's namespace."""
    apps, core, namespace = client.AppsV1Api(site.core.api_client), site.core, "container-registry"
    lists = [apps.list_namespaced_deployment, core.list_namespaced_config_map, core.list_namespaced_service,
             core.list_namespaced_secret]
    return {f"{o.kind or lister.__name__}/{o.metadata.name}": o.metadata.resource_version
            for lister in lists for o in lister(namespace).items}


def test_upgrade_diffs_exactly_the_change_keeps_images_and_a_no_change_run_does_nothing(
        crflow, cluster_site, kube_api, kubelet, prefect_api):
    site = cluster_site
    crflow("install", "-c", str(site.path))
    digest, versions, serial = push(site), object_versions(site), kubelet.serial
    set_chart_values(site, {"image": {"tag": "2.8.4"}, "resources": {"limits": {"memory": "256Mi"}}})

    # The registry's Deployment, and the node-trust DaemonSet that runs the same image.
    assert "2 objects would change" in crflow("upgrade", "-c", str(site.path), "--dry-run").stdout
    diff = last_artifact(prefect_api, "crflow-upgrade-diff")
    changed = [line for line in diff.splitlines() if line[:1] in ("+", "-") and line[:3] not in ("+++", "---")]
    assert sorted(changed) == sorted(["-        image: registry:2.8.3", "+        image: registry:2.8.4", "+        resources:",
                                      "+          limits:", "+            memory: 256Mi",
                                      "-        image: registry:2.8.3", "+        image: registry:2.8.4"]), diff
    assert "against revision 1" in diff and site.login()[1] not in diff
    assert revisions(kube_api) == [(1, "deployed")] and object_versions(site) == versions  # the dry run changed nothing

    assert "verify passed" in crflow("upgrade", "-c", str(site.path)).stdout
    assert revisions(kube_api)[-1] == (2, "deployed")
    assert kubelet.serial == serial + 1  # a rolling update replaced the pod
    with Registry.from_bundle(site.url, site.client) as registry:
        assert registry.pull_image("team/app", digest)  # storage (the bucket) survived; same digest

    assert "no change" in crflow("upgrade", "-c", str(site.path)).stdout
    assert revisions(kube_api)[-1] == (2, "deployed") and kubelet.serial == serial + 1


BREAKAGES = {
    # The registry exits at start ("invalid loglevel"): the new pod never gets ready and helm's wait fails.
    "pod-not-ready": {"configData": {"log": {"level": "loud"}}},
    # The registry serves under /broken/ only: the pod is ready (GET / answers), verify's push gets 404.
    "verify-fails": {"configData": {"http": {"prefix": "/broken/"}}},
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_an_upgrade_the_registry_cannot_survive_is_rolled_back(crflow, cluster_site, kube_api, kubelet, prefect_api,
                                                               breakage):
    site = cluster_site
    site.settings["cluster"]["helm_timeout_seconds"] = 20
    site.write()
    crflow("install", "-c", str(site.path))
    digest = push(site)
    set_chart_values(site, BREAKAGES[breakage])

    result = crflow("upgrade", "-c", str(site.path), check=False)
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(
        "crflow: error: the upgrade failed and was rolled back to revision 1 (now revision 3), which passes verify")
    # helm keeps a failed upgrade "failed"; one that was deployed (and then failed verify) is "superseded"
    second = "failed" if breakage == "pod-not-ready" else "superseded"
    assert revisions(kube_api) == [(1, "superseded"), (2, second), (3, "deployed")]
    assert history(kube_api)[-1]["description"] == "Rollback to 1"
    if breakage == "pod-not-ready":
        assert "invalid loglevel loud" in kubelet.failed["container-registry/registry"][1]
    else:
        assert "container-registry/registry" not in kubelet.failed
    report = last_artifact(prefect_api, "crflow-upgrade")
    assert "revision 2" in report and "revision 1 (now revision 3)" in report
    with Registry.from_bundle(site.url, site.client) as registry:
        assert registry.pull_image("team/app", digest)
    push(site, "team/after-rollback")  # the previous revision serves push and pull again


def test_a_release_changed_behind_crflows_back_is_brought_back(crflow, cluster_site, kube_api, kubelet, prefect_api,
                                                               tmp_path):
    """Same chart version, same values, other manifests (someone ran helm with an edited copy of
    the chart): the diff shows it, and the upgrade applies the chart although pyhelm3's
    version-and-values test alone would call it up to date."""
    site = cluster_site
    crflow("install", "-c", str(site.path))
    edited = tmp_path / "edited-chart"
    shutil.copytree(ROOT / "helm_chart", edited)
    service = edited / "templates" / "service.yaml"
    service.write_text(service.read_text().replace("metadata:\n", "metadata:\n  annotations: {edited-by: hand}\n", 1))
    kube_api.run("helm", "upgrade", "registry", str(edited), "-n", "container-registry", "--reuse-values")
    assert revisions(kube_api)[-1] == (2, "deployed")

    assert "1 objects would change" in crflow("upgrade", "-c", str(site.path), "--dry-run").stdout
    assert "-  annotations:" in last_artifact(prefect_api, "crflow-upgrade-diff")
    assert "verify passed" in crflow("upgrade", "-c", str(site.path)).stdout
    assert revisions(kube_api)[-1] == (3, "deployed")
    assert "0 objects would change" in crflow("upgrade", "-c", str(site.path), "--dry-run").stdout


def test_a_new_load_balancer_address_gets_a_new_certificate_and_reaches_the_consumers(crflow, cluster_site, kubelet):
    """registry.ips changes (a new MetalLB address): the upgrade re-issues the server certificate
    for it (same CA), rolls the pod, moves the Service, and rewrites the client files."""
    site = cluster_site
    crflow("install", "-c", str(site.path))
    digest = push(site)
    site.settings["registry"]["ips"] = ["127.0.0.2"]
    site.write()
    new_server = f"127.0.0.2:{site.port}"
    assert "verify passed" in crflow("upgrade", "-c", str(site.path)).stdout
    assert list(json.loads((site.client / "auth.json").read_text())["auths"]) == [new_server, f"localhost:{site.port}"]
    with Registry.from_bundle(f"https://{new_server}", site.client) as registry:
        assert registry.pull_image("team/app", digest)
    for node in kubelet.nodes:  # the node-trust pods moved with it: the old address left every node
        assert sorted(p.name for p in node.certs_d.iterdir()) == [new_server, f"localhost:{site.port}"]


def test_a_dns_name_added_reaches_every_node_and_a_removed_one_leaves(crflow, cluster_site, kubelet):
    site = cluster_site
    site.settings["registry"]["dns_names"] = []
    site.write()
    crflow("install", "-c", str(site.path))
    named = f"localhost:{site.port}"

    def addresses() -> set[tuple[str, str]]:
        return {(node.name, p.name) for node in kubelet.nodes for p in node.certs_d.iterdir()}

    assert addresses() == {("node-1", site.server), ("node-2", site.server)}
    site.settings["registry"]["dns_names"] = ["localhost"]
    site.write()
    assert "verify passed" in crflow("upgrade", "-c", str(site.path)).stdout
    assert addresses() == {(n, a) for n in ("node-1", "node-2") for a in (site.server, named)}
    for node in kubelet.nodes:
        assert f'server = "https://{named}"' in (node.certs_d / named / "hosts.toml").read_text()
        # the node's containerd trusts the new name too: its own pull, through the Service
        user, password = site.login()
        assert node.runtime.pull(f"{named}/crflow-smoke:install", user, password) is None

    site.settings["registry"]["dns_names"] = []
    site.write()
    assert "verify passed" in crflow("upgrade", "-c", str(site.path)).stdout
    assert addresses() == {("node-1", site.server), ("node-2", site.server)}
