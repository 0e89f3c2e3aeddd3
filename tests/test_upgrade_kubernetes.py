"""`crflow upgrade` on the test cluster (tests/cluster.py: a real Kubernetes 1.20 node) with the
real helm. REAL: rollouts by the Deployment controller and the kubelet, readiness from the
registry pod's own probes, node trust written by the DaemonSet into the node's containerd
certs.d, containerd as the judge of what the node trusts. EMULATED: moto stands in for MinIO."""

from __future__ import annotations

import json
import shutil

import pytest
from kubernetes import client
from test_rotate import push

from cluster import REGISTRY_IMAGE, REGISTRY_IMAGE_NEXT, ctr_pull
from conftest import ROOT, last_artifact
from crflow.oci import Registry

pytestmark = pytest.mark.kubernetes


def history(site) -> list[dict]:
    return json.loads(site.helm("history", "registry", "-n", site.namespace, "-o", "json"))


def revisions(site) -> list[tuple[int, str]]:
    return [(entry["revision"], entry["status"]) for entry in history(site)]


def object_versions(site) -> dict[str, str]:
    """resourceVersion of every Deployment, ConfigMap, Service and Secret in the registry's namespace."""
    apps, core, namespace = client.AppsV1Api(site.core.api_client), site.core, site.namespace
    lists = [apps.list_namespaced_deployment, core.list_namespaced_config_map, core.list_namespaced_service,
             core.list_namespaced_secret]
    return {f"{o.kind or lister.__name__}/{o.metadata.name}": o.metadata.resource_version
            for lister in lists for o in lister(namespace).items}


def set_values(site, values: dict) -> None:
    """Chart values on top of the test cluster's own (its locally built images)."""
    site.settings["chart"]["values"].update(values)
    site.write()


def test_upgrade_diffs_exactly_the_change_keeps_images_and_a_no_change_run_does_nothing(
        crflow, cluster_site, prefect_api):
    site = cluster_site
    crflow("install", "-c", str(site.path))
    digest, versions, rollouts = push(site), object_versions(site), site.rollouts()
    set_values(site, {"image": {**site.settings["chart"]["values"]["image"], "tag": REGISTRY_IMAGE_NEXT.split(":")[1]},
                      "resources": {"limits": {"memory": "256Mi"}}})

    # The registry's Deployment, and the node-trust DaemonSet that runs the same image.
    assert "2 objects would change" in crflow("upgrade", "-c", str(site.path), "--dry-run").stdout
    diff = last_artifact(prefect_api, "crflow-upgrade-diff")
    changed = [line for line in diff.splitlines() if line[:1] in ("+", "-") and line[:3] not in ("+++", "---")]
    old, new = f"        image: {REGISTRY_IMAGE}", f"        image: {REGISTRY_IMAGE_NEXT}"
    assert sorted(changed) == sorted([f"-{old}", f"+{new}", "+        resources:", "+          limits:",
                                      "+            memory: 256Mi", f"-{old}", f"+{new}"]), diff
    assert "against revision 1" in diff and site.login()[1] not in diff
    assert revisions(site) == [(1, "deployed")] and object_versions(site) == versions  # the dry run changed nothing

    assert "verify passed" in crflow("upgrade", "-c", str(site.path)).stdout
    assert revisions(site)[-1] == (2, "deployed")
    assert site.rollouts() == rollouts + 1  # the Deployment controller rolled a new pod
    with Registry.from_bundle(site.url, site.client) as registry:
        assert registry.pull_image("team/app", digest)  # storage (the bucket) survived; same digest

    assert "no change" in crflow("upgrade", "-c", str(site.path)).stdout
    assert revisions(site)[-1] == (2, "deployed") and site.rollouts() == rollouts + 1


BREAKAGES = {
    # The registry exits at start ("invalid loglevel"): the new pod never gets ready and helm's wait fails.
    "pod-not-ready": {"configData": {"log": {"level": "loud"}}},
    # The registry serves under /broken/ only: the pod is ready (its probes ask the debug port), verify's push gets 404.
    "verify-fails": {"configData": {"http": {"prefix": "/broken/"}}},
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_an_upgrade_the_registry_cannot_survive_is_rolled_back(crflow, cluster_site, prefect_api, breakage):
    site = cluster_site
    site.settings["cluster"]["helm_timeout_seconds"] = 30
    site.write()
    crflow("install", "-c", str(site.path))
    digest = push(site)
    set_values(site, BREAKAGES[breakage])

    result = crflow("upgrade", "-c", str(site.path), check=False)
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(
        "crflow: error: the upgrade failed and was rolled back to revision 1 (now revision 3), which passes verify")
    # helm keeps a failed upgrade "failed"; one that was deployed (and then failed verify) is "superseded"
    second = "failed" if breakage == "pod-not-ready" else "superseded"
    assert revisions(site) == [(1, "superseded"), (2, second), (3, "deployed")]
    assert history(site)[-1]["description"] == "Rollback to 1"
    report = last_artifact(prefect_api, "crflow-upgrade")
    assert "revision 2" in report and "revision 1 (now revision 3)" in report
    with Registry.from_bundle(site.url, site.client) as registry:
        assert registry.pull_image("team/app", digest)
    push(site, "team/after-rollback")  # the previous revision serves push and pull again


def test_a_release_changed_behind_crflows_back_is_brought_back(crflow, cluster_site, prefect_api, tmp_path):
    """Same chart version, same values, other manifests (someone ran helm with an edited copy of
    the chart): the diff shows it, and the upgrade applies the chart although pyhelm3's
    version-and-values test alone would call it up to date."""
    site = cluster_site
    crflow("install", "-c", str(site.path))
    edited = tmp_path / "edited-chart"
    shutil.copytree(ROOT / "helm_chart", edited)
    manifests = edited / "templates" / "_manifests.tpl"  # the Service's template, as a named one
    service = '{{- define "registry.service" -}}\napiVersion: v1\nkind: Service\nmetadata:\n'
    assert service in manifests.read_text()
    manifests.write_text(manifests.read_text().replace(service, service + "  annotations: {edited-by: hand}\n"))
    site.helm("upgrade", "registry", str(edited), "-n", site.namespace, "--reuse-values")
    assert revisions(site)[-1] == (2, "deployed")

    assert "1 objects would change" in crflow("upgrade", "-c", str(site.path), "--dry-run").stdout
    assert "-  annotations:" in last_artifact(prefect_api, "crflow-upgrade-diff")
    assert "verify passed" in crflow("upgrade", "-c", str(site.path)).stdout
    assert revisions(site)[-1] == (3, "deployed")
    assert "0 objects would change" in crflow("upgrade", "-c", str(site.path), "--dry-run").stdout


def test_a_new_address_gets_a_new_certificate_and_reaches_the_consumers_and_the_node(crflow, cluster_site):
    """registry.ips changes (a new MetalLB address; here another local address the NodePort
    answers on): the upgrade re-issues the server certificate for it (same CA), rolls the pod,
    and rewrites the client files and the node's trust."""
    site = cluster_site
    crflow("install", "-c", str(site.path))
    digest, old_server = push(site), site.server
    site.settings["registry"]["ips"] = ["127.0.0.1"]
    site.write()
    new_server = f"127.0.0.1:{site.port}"
    assert "verify passed" in crflow("upgrade", "-c", str(site.path)).stdout
    assert list(json.loads((site.client / "auth.json").read_text())["auths"]) == [new_server]
    with Registry.from_bundle(f"https://{new_server}", site.client) as registry:
        assert registry.pull_image("team/app", digest)
    # the node-trust pod moved with it: the old address left the node (verify's pull went through the new one)
    assert site.node_certs() == [new_server] and old_server not in site.node_certs()


def test_a_dns_name_added_reaches_the_node_and_a_removed_one_leaves(crflow, cluster_site):
    site = cluster_site
    crflow("install", "-c", str(site.path))
    named = f"localhost:{site.port}"
    assert site.node_certs() == [site.server]
    site.settings["registry"]["dns_names"] = ["localhost"]
    site.write()
    assert "verify passed" in crflow("upgrade", "-c", str(site.path)).stdout
    assert site.node_certs() == sorted([site.server, named])
    assert f'server = "https://{named}"' in (site.node.certs_d / named / "hosts.toml").read_text()
    # the node's containerd trusts the new name too: its own pull, through kube-proxy
    pulled = ctr_pull(site.node, f"{named}/crflow-smoke:install", *site.login())
    assert pulled.returncode == 0, pulled.stderr

    site.settings["registry"]["dns_names"] = []
    site.write()
    assert "verify passed" in crflow("upgrade", "-c", str(site.path)).stdout
    assert site.node_certs() == [site.server]
