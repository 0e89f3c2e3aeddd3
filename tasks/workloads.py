"""What runs on the cluster? The registry's Deployment as the cluster has it (for where its
pod stores blobs), and a short-lived Deployment whose pod pulls an image with a pull secret."""

from __future__ import annotations

import time
from pathlib import Path

from kubernetes import client
from prefect import task
from pydantic import SecretStr

from crflow.errors import CrflowError, transient_only
from crflow.tasks.kubeapi import KubeAccess, api_client, ensure_namespace, get_or_none, managed_labels, retrying
from crflow.tasks.secrets import apply_secret


@task(task_run_name="read the registry pod {namespace}/{deployment}",
      retries=2, retry_delay_seconds=5, retry_condition_fn=transient_only)
def read_registry_pod(kube: KubeAccess, namespace: str, deployment: str) -> dict:
    """The registry Deployment's pod template and the ConfigMaps it mounts, as the cluster has them."""
    with api_client(kube) as api:
        apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
        found = retrying(f"read Deployment {namespace}/{deployment}",
                         lambda: apps.read_namespaced_deployment(deployment, namespace))
        template = api.sanitize_for_serialization(found.spec.template)
        config_maps = {}
        for volume in template["spec"].get("volumes") or []:
            if "configMap" in volume:
                name = volume["configMap"]["name"]
                cm = retrying(f"read ConfigMap {namespace}/{name}", lambda: core.read_namespaced_config_map(name, namespace))
                config_maps[name] = cm.data or {}
    return {"template": template, "configMaps": config_maps}


PULL_TEST_NAMESPACE, PULL_SECRET, PULL_TEST = "crflow-verify", "crflow-verify-pull", "crflow-verify-pull-test"


def run_pull_test(api: client.ApiClient, image: str, docker_config: SecretStr, labels: dict[str, str],
                  timeout: float) -> str:
    """A Deployment in the test namespace whose pod pulls `image` with a pull secret; wait
    until it runs, then remove it. Raises CrflowError with the node's reason if it does not."""
    apps = client.AppsV1Api(api)
    ensure_namespace(api, PULL_TEST_NAMESPACE, labels)
    apply_secret(api, PULL_TEST_NAMESPACE, PULL_SECRET, "kubernetes.io/dockerconfigjson",
                 {".dockerconfigjson": docker_config}, labels)
    selector = {"app.kubernetes.io/name": PULL_TEST}
    deployment = client.V1Deployment(
        metadata=client.V1ObjectMeta(name=PULL_TEST, labels={**labels, **selector}),
        spec=client.V1DeploymentSpec(
            replicas=1, selector=client.V1LabelSelector(match_labels=selector),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=selector),
                spec=client.V1PodSpec(
                    containers=[client.V1Container(name="pull-test", image=image, image_pull_policy="Always")],
                    image_pull_secrets=[client.V1LocalObjectReference(name=PULL_SECRET)]))))
    retrying(f"create Deployment {PULL_TEST_NAMESPACE}/{PULL_TEST}",
             lambda: apps.create_namespaced_deployment(PULL_TEST_NAMESPACE, deployment))
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = retrying("read the pull test", lambda: apps.read_namespaced_deployment_status(
                PULL_TEST, PULL_TEST_NAMESPACE)).status
            if status and status.ready_replicas == 1:
                return f"{image} pulled in namespace {PULL_TEST_NAMESPACE}"
            stuck = [c for c in (status and status.conditions) or [] if c.type == "Progressing" and c.status == "False"]
            if stuck:
                raise CrflowError(f"a pod could not pull {image} with pull secret {PULL_TEST_NAMESPACE}/{PULL_SECRET}: "
                                  f"{stuck[0].reason}: {stuck[0].message}")
            time.sleep(0.5)
        raise CrflowError(f"a pod pulling {image} in namespace {PULL_TEST_NAMESPACE} was not running after {timeout:.0f} s")
    finally:
        retrying(f"delete Deployment {PULL_TEST_NAMESPACE}/{PULL_TEST}",
                 lambda: get_or_none(lambda: apps.delete_namespaced_deployment(PULL_TEST, PULL_TEST_NAMESPACE)))


@task(task_run_name="a pod pulls {image}", retries=1, retry_delay_seconds=5, retry_condition_fn=transient_only)
def pull_with_secret(kube: KubeAccess, image: str, auth_file: Path, release: str, timeout: float = 120) -> str:
    """Kubernetes: a pod pulls `image` with a pull secret made from the client login, and runs."""
    with api_client(kube) as api:
        return run_pull_test(api, image, SecretStr(auth_file.read_text()), managed_labels(release), timeout)
