"""How do we put the runbook's objects into the cluster? With the official Python client:
the namespace, the registry's Secrets (one function for all of them), MinIO's credentials
copied into the registry's own Secret, and the hostPath PV/PVC for filesystem storage.

    kube = KubeAccess(kubeconfig="~/.kube/config", context=None)
    with api_client(kube) as api:
        ensure_namespace(api, "container-registry", labels)
        apply_secret(api, "container-registry", "registry-tls", "kubernetes.io/tls", data, labels)

Every write is idempotent (read, compare, write only what differs) and retried on what a
retry can fix: connection errors, 429, 5xx, and 409 (someone else wrote first: read again).
No Secret value ever reaches a message: errors name the object, the verb and the status.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import urllib3
from kubernetes import client, config
from kubernetes.client.rest import ApiException
from prefect import task
from pydantic import BaseModel, SecretStr

from crflow.errors import CrflowError, transient_only
from crflow.undo import undo, undoable
from tasks.storage import S3Keys

KUBECONFIG_HINT = "kubectl config view --raw > ~/.kube/config; chmod 600 ~/.kube/config"
RETRIED_STATUSES = {409, 429, 500, 502, 503, 504}
POOL_SIZE = 16  # keep-alive connections per client: as many as tasks/consumers.py writes in parallel


class KubeAccess(BaseModel):
    """Which cluster: a kubeconfig file (None: $KUBECONFIG, ~/.kube/config, or in-cluster) and context."""

    kubeconfig: str | None = None
    context: str | None = None


def managed_labels(release: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "crflow-registry", "app.kubernetes.io/instance": release,
            "app.kubernetes.io/managed-by": "crflow"}


@contextlib.contextmanager
def api_client(kube: KubeAccess) -> Iterator[client.ApiClient]:
    """An ApiClient for `kube`, closed afterwards; a missing kubeconfig is a CrflowError with the fix."""
    configuration = client.Configuration()
    if kube.kubeconfig is None and "KUBERNETES_SERVICE_HOST" in os.environ:
        config.load_incluster_config(client_configuration=configuration)
    else:
        path = Path(kube.kubeconfig or os.environ.get("KUBECONFIG", "~/.kube/config")).expanduser()
        if not path.is_file():
            raise CrflowError(f"no kubeconfig at {path}: write one with `{KUBECONFIG_HINT}` or set cluster.kubeconfig")
        try:
            config.load_kube_config(config_file=str(path), context=kube.context, client_configuration=configuration)
        except config.ConfigException as err:
            raise CrflowError(f"kubeconfig {path}: {err}") from None
    configuration.connection_pool_maxsize = max(configuration.connection_pool_maxsize, POOL_SIZE)
    api = client.ApiClient(configuration)
    try:
        yield api
    finally:
        api.close()


def _reason(err: ApiException) -> str:
    try:
        return json.loads(err.body)["message"]
    except (TypeError, ValueError, KeyError):
        return err.reason or ""


def retrying(what: str, call: Callable, attempts: int = 6, first_delay: float = 0.2):
    """Run `call` (a whole read-compare-write) until it succeeds or fails for good."""
    delay = first_delay
    for attempt in range(attempts):
        last = attempt == attempts - 1
        try:
            return call()
        except ApiException as err:
            if err.status in RETRIED_STATUSES and not last:
                time.sleep(delay)
                delay *= 2
                continue
            raise CrflowError(f"Kubernetes API: {what} failed with {err.status}: {_reason(err)}") from None
        except (urllib3.exceptions.HTTPError, ConnectionError) as err:
            if not last:
                time.sleep(delay)
                delay *= 2
                continue
            raise CrflowError(f"Kubernetes API unreachable during {what} ({type(err).__name__}); "
                              f"check the kubeconfig (`{KUBECONFIG_HINT}`)") from None


def _get_or_none(read: Callable):
    try:
        return read()
    except ApiException as err:
        if err.status == 404:
            return None
        raise


def ensure_namespace(api: client.ApiClient, name: str, labels: dict[str, str]) -> str:
    core = client.CoreV1Api(api)

    def attempt() -> str:
        if _get_or_none(lambda: core.read_namespace(name)) is not None:
            return "unchanged"
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels=labels)))
        return "created"

    return retrying(f"create namespace {name}", attempt)


def apply_secret(api: client.ApiClient, namespace: str, name: str, secret_type: str,
                 data: dict[str, SecretStr], labels: dict[str, str]) -> str:
    """Make Secret namespace/name hold exactly `data`: "created", "updated" or "unchanged"."""
    core = client.CoreV1Api(api)
    encoded = {k: base64.b64encode(v.get_secret_value().encode()).decode() for k, v in data.items()}

    def attempt() -> str:
        current = _get_or_none(lambda: core.read_namespaced_secret(name, namespace))
        if current is None:
            core.create_namespaced_secret(namespace, client.V1Secret(
                metadata=client.V1ObjectMeta(name=name, labels=labels), type=secret_type, data=encoded))
            return "created"
        current_labels = current.metadata.labels or {}
        if current.data == encoded and current.type == secret_type and labels.items() <= current_labels.items():
            return "unchanged"
        if current.type != secret_type:  # the type of a Secret cannot change: replace it whole
            core.delete_namespaced_secret(name, namespace)
            core.create_namespaced_secret(namespace, client.V1Secret(
                metadata=client.V1ObjectMeta(name=name, labels=labels), type=secret_type, data=encoded))
            return "updated"
        current.data, current.metadata.labels = encoded, {**current_labels, **labels}
        core.replace_namespaced_secret(name, namespace, current)  # 409 if someone wrote since: retried
        return "updated"

    return retrying(f"write Secret {namespace}/{name}", attempt)


def snapshot_secret(api: client.ApiClient, namespace: str, name: str) -> client.V1Secret | None:
    """A Secret as it is now (None: absent), to put it back with `restore_secret`."""
    core = client.CoreV1Api(api)
    return retrying(f"read Secret {namespace}/{name}",
                    lambda: _get_or_none(lambda: core.read_namespaced_secret(name, namespace)))


def restore_secret(kube: KubeAccess, namespace: str, name: str, before: client.V1Secret | None) -> None:
    """Put back a Secret `snapshot_secret` saw (or delete it, if it was absent)."""
    with api_client(kube) as api:
        if before is None:
            core = client.CoreV1Api(api)
            retrying(f"delete Secret {namespace}/{name}",
                     lambda: _get_or_none(lambda: core.delete_namespaced_secret(name, namespace)))
            return
        data = {k: SecretStr(base64.b64decode(v).decode()) for k, v in (before.data or {}).items()}
        apply_secret(api, namespace, name, before.type, data, before.metadata.labels or {})


def write_secret_undoably(kube: KubeAccess, api: client.ApiClient, namespace: str, name: str, secret_type: str,
                          data: dict[str, SecretStr], labels: dict[str, str], on_undo: Callable) -> str:
    before = snapshot_secret(api, namespace, name)
    outcome = apply_secret(api, namespace, name, secret_type, data, labels)
    if outcome != "unchanged":
        on_undo(lambda: restore_secret(kube, namespace, name, before))
    return outcome


def read_secret(api: client.ApiClient, namespace: str, name: str, keys: list[str]) -> dict[str, SecretStr]:
    core = client.CoreV1Api(api)
    secret = retrying(f"read Secret {namespace}/{name}", lambda: core.read_namespaced_secret(name, namespace))
    missing = [k for k in keys if k not in (secret.data or {})]
    if missing:
        raise CrflowError(f"Secret {namespace}/{name} has no key {', '.join(missing)}")
    return {k: SecretStr(base64.b64decode(secret.data[k]).decode()) for k in keys}


def ensure_hostpath_volume(api: client.ApiClient, namespace: str, claim: str, path: str, node: str, size: str,
                           labels: dict[str, str]) -> str:
    """A hostPath PersistentVolume on `node` and the claim bound to it (the runbook's PV/PVC)."""
    core = client.CoreV1Api(api)
    pv_name = f"{namespace}-{claim}"

    def attempt() -> str:
        made = "unchanged"
        if _get_or_none(lambda: core.read_persistent_volume(pv_name)) is None:
            affinity = client.V1VolumeNodeAffinity(required=client.V1NodeSelector(node_selector_terms=[
                client.V1NodeSelectorTerm(match_expressions=[client.V1NodeSelectorRequirement(
                    key="kubernetes.io/hostname", operator="In", values=[node])])]))
            core.create_persistent_volume(client.V1PersistentVolume(
                metadata=client.V1ObjectMeta(name=pv_name, labels=labels),
                spec=client.V1PersistentVolumeSpec(
                    capacity={"storage": size}, access_modes=["ReadWriteOnce"], storage_class_name="",
                    persistent_volume_reclaim_policy="Retain", node_affinity=affinity,
                    host_path=client.V1HostPathVolumeSource(path=path, type="DirectoryOrCreate"),
                    claim_ref=client.V1ObjectReference(namespace=namespace, name=claim))))
            made = "created"
        if _get_or_none(lambda: core.read_namespaced_persistent_volume_claim(claim, namespace)) is None:
            core.create_namespaced_persistent_volume_claim(namespace, client.V1PersistentVolumeClaim(
                metadata=client.V1ObjectMeta(name=claim, labels=labels),
                spec=client.V1PersistentVolumeClaimSpec(
                    access_modes=["ReadWriteOnce"], storage_class_name="", volume_name=pv_name,
                    resources=client.V1VolumeResourceRequirements(requests={"storage": size}))))
            made = "created"
        return made

    return retrying(f"create PV {pv_name} and PVC {namespace}/{claim}", attempt)


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=transient_only)
def create_namespace(kube: KubeAccess, namespace: str, release: str) -> str:
    """The registry's namespace, labelled as crflow's."""
    with api_client(kube) as api:
        return ensure_namespace(api, namespace, managed_labels(release))


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=transient_only)
def put_secret(kube: KubeAccess, namespace: str, name: str, secret_type: str, data: dict[str, SecretStr],
               release: str) -> str:
    """One of the registry's Secrets, written only where it differs (put back on rollback)."""
    with api_client(kube) as api, undoable() as on_undo:
        return write_secret_undoably(kube, api, namespace, name, secret_type, data, managed_labels(release), on_undo)


put_secret.on_rollback(undo)


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=transient_only)
def copy_s3_credentials(kube: KubeAccess, source_namespace: str, source_name: str, access_key_key: str,
                        secret_key_key: str, namespace: str, name: str, release: str) -> S3Keys:
    """MinIO's keys, from MinIO's own Secret into the registry's (keys s3AccessKey/s3SecretKey)."""
    with api_client(kube) as api:
        keys = read_secret(api, source_namespace, source_name, [access_key_key, secret_key_key])
        s3_keys = S3Keys(access_key=keys[access_key_key], secret_key=keys[secret_key_key])
        apply_secret(api, namespace, name, "Opaque",
                     {"s3AccessKey": s3_keys.access_key, "s3SecretKey": s3_keys.secret_key}, managed_labels(release))
    return s3_keys


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=transient_only)
def create_hostpath_volume(kube: KubeAccess, namespace: str, claim: str, path: str, node: str, size: str,
                           release: str) -> str:
    """The hostPath PV on `node` and its claim, for filesystem storage on the cluster."""
    with api_client(kube) as api:
        return ensure_hostpath_volume(api, namespace, claim, path, node, size, managed_labels(release))


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=transient_only)
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


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=transient_only)
def read_s3_keys_secret(kube: KubeAccess, namespace: str, name: str) -> S3Keys:
    """The S3 keys the registry itself uses, from its Secret."""
    with api_client(kube) as api:
        keys = read_secret(api, namespace, name, ["s3AccessKey", "s3SecretKey"])
    return S3Keys(access_key=keys["s3AccessKey"], secret_key=keys["s3SecretKey"])


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
                 lambda: _get_or_none(lambda: apps.delete_namespaced_deployment(PULL_TEST, PULL_TEST_NAMESPACE)))


@task(retries=1, retry_delay_seconds=5, retry_condition_fn=transient_only)
def pull_with_secret(kube: KubeAccess, image: str, auth_file: Path, release: str, timeout: float = 120) -> str:
    """Kubernetes: a pod pulls `image` with a pull secret made from the client login, and runs."""
    with api_client(kube) as api:
        return run_pull_test(api, image, SecretStr(auth_file.read_text()), managed_labels(release), timeout)
