"""The emulated Kubernetes API server (tests/kubeapi) against the real clients that crflow
and its users run: the official Python client, kubectl 1.37 and helm 4.3 through pyhelm3.
EMULATED: this checks the test bed itself; no real apiserver is involved."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from kubernetes import client, config, watch
from pyhelm3 import Client as Helm

from crflow.chart import CHART_DIR
from crflow.tasks.helm import helm_executable

pytestmark = pytest.mark.kubernetes


def core(kube_api) -> client.CoreV1Api:
    return client.CoreV1Api(config.new_client_from_config(str(kube_api.admin_kubeconfig)))


def test_python_client_crud_conflicts_selectors_and_watch(kube_api):
    v1 = core(kube_api)
    assert {n.metadata.name for n in v1.list_namespace().items} >= {"default", "kube-system"}
    v1.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="reg")))
    secret = v1.create_namespaced_secret("reg", client.V1Secret(
        metadata=client.V1ObjectMeta(name="s1", labels={"app": "registry"}), string_data={"k": "v"}))
    assert secret.metadata.uid and secret.metadata.resource_version and secret.data == {"k": "dg=="}
    with pytest.raises(client.ApiException) as exists:
        v1.create_namespaced_secret("reg", client.V1Secret(metadata=client.V1ObjectMeta(name="s1")))
    assert exists.value.status == 409
    v1.replace_namespaced_secret("s1", "reg", secret)
    with pytest.raises(client.ApiException) as stale:
        v1.replace_namespaced_secret("s1", "reg", secret)  # its resourceVersion is now stale
    assert stale.value.status == 409
    assert len(v1.list_namespaced_secret("reg", label_selector="app=registry").items) == 1
    assert v1.list_namespaced_secret("reg", label_selector="app in (other)").items == []

    events = []

    def follow():
        for event in watch.Watch().stream(v1.list_namespaced_config_map, "reg", timeout_seconds=3):
            events.append((event["type"], event["object"].metadata.name))

    watcher = threading.Thread(target=follow)
    watcher.start()
    time.sleep(0.5)
    v1.create_namespaced_config_map("reg", client.V1ConfigMap(metadata=client.V1ObjectMeta(name="c1")))
    v1.delete_namespaced_config_map("c1", "reg")
    watcher.join()
    assert events == [("ADDED", "c1"), ("DELETED", "c1")]


def test_kubectl_create_apply_get_diff(kube_api, tmp_path):
    kube_api.run("kubectl", "create", "namespace", "reg")
    kube_api.run("kubectl", "-n", "reg", "create", "secret", "generic", "s2", "--from-literal=a=b")  # protobuf body
    manifest = tmp_path / "cm.yaml"
    manifest.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cm1, namespace: reg}\ndata: {x: '1'}\n")
    assert "created" in kube_api.run("kubectl", "apply", "-f", str(manifest))
    assert "unchanged" in kube_api.run("kubectl", "apply", "-f", str(manifest))
    manifest.write_text(manifest.read_text().replace("'1'", "'2'"))
    diff = kube_api.run("kubectl", "diff", "-f", str(manifest), returncode=1)  # 1: differences found
    assert "-  x: \"1\"" in diff and "+  x: \"2\"" in diff
    assert "configured" in kube_api.run("kubectl", "apply", "-f", str(manifest))
    assert kube_api.run("kubectl", "-n", "reg", "get", "cm", "cm1", "-o", "jsonpath={.data.x}") == "2"
    assert kube_api.run("kubectl", "-n", "reg", "get", "secret", "s2", "-o", "jsonpath={.data.a}") == "Yg=="


@pytest.mark.parametrize("helm_binary", ["helm", "helm3"])
def test_helm_install_upgrade_rollback_uninstall_through_pyhelm3(kube_api, helm_binary):
    executable = helm_executable() if helm_binary == "helm" else str(CHART_DIR.parent / ".bin" / "helm3")

    async def scenario():
        helm = Helm(executable=executable, kubeconfig=kube_api.admin_kubeconfig)
        chart = await helm.get_chart(CHART_DIR)
        first = await helm.install_or_upgrade_release("registry", chart, {}, namespace="container-registry",
                                                      create_namespace=True)
        second = await helm.install_or_upgrade_release("registry", chart, {"podAnnotations": {"revision": "2"}},
                                                       namespace="container-registry")
        releases = await helm.list_releases(all_namespaces=True)
        rolled_back = await second.release.rollback(first.revision)
        history = [r.revision for r in await rolled_back.release.history()]
        await helm.uninstall_release("registry", namespace="container-registry", wait=False)
        return first.revision, second.revision, rolled_back.revision, history, [r.name for r in releases]

    assert asyncio.run(scenario()) == (1, 2, 3, [1, 2, 3], ["registry"])
    assert "Secret" not in kube_api.run("kubectl", "-n", "container-registry", "get", "secrets")


@pytest.mark.parametrize("cronjob_api", ["batch/v1", "batch/v1beta1"])
def test_cronjob_api_version_follows_the_live_clusters_discovery(cronjob_api, tmp_path):
    """helm renders the garbage-collect CronJob with what the (emulated) cluster serves."""
    from conftest import KubeApi
    from servers import stop_server

    api = KubeApi(tmp_path, "--cronjob-api", cronjob_api)
    try:
        api.run("helm", "install", "registry", str(CHART_DIR), "-n", "container-registry", "--create-namespace",
                "--set", "garbageCollect.enabled=true", "--set", "persistence.enabled=true")  # not on an emptyDir
        manifest = api.run("helm", "get", "manifest", "registry", "-n", "container-registry")
        assert f"apiVersion: {cronjob_api}\nkind: CronJob" in manifest
    finally:
        stop_server(api.process)


def test_faults_on_demand_errors_and_slow_responses(kube_api):
    v1 = core(kube_api)
    kube_api.fault(method="GET", path="/api/v1/namespaces$", status=500, count=2)
    kube_api.fault(method="GET", path="/api/v1/namespaces/default$", delay=1.0, count=1)
    for _ in range(2):
        with pytest.raises(client.ApiException) as failed:
            v1.list_namespace()
        assert failed.value.status == 500
    assert v1.list_namespace().items  # the third one is served
    started = time.monotonic()
    assert v1.read_namespace("default").metadata.name == "default"
    assert time.monotonic() - started >= 1.0


def test_status_subresource_updates_status_only_and_every_time(kube_api):
    apps = client.AppsV1Api(config.new_client_from_config(str(kube_api.admin_kubeconfig)))
    apps.create_namespaced_deployment("default", {
        "metadata": {"name": "d"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"a": "b"}},
                 "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": [{"name": "c", "image": "x"}]}}}})
    for generation in (1, 2):
        apps.patch_namespaced_deployment_status("d", "default", {"status": {"observedGeneration": generation},
                                                                  "spec": {"replicas": 7}})
        found = apps.read_namespaced_deployment("d", "default")
        assert found.status.observed_generation == generation and found.spec.replicas == 1
