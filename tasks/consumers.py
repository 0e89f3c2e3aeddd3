"""How do workloads get the registry's login? A kubernetes.io/dockerconfigjson pull Secret in
every namespace that pulls (the runbook's hand-made imagePullSecret), kept current by crflow.

    put_pull_secrets(kube, ["team-a"], "registry-access=true", "registry-pull",
                     docker_config, default_service_account=True, release="registry",
                     registry_namespace="container-registry")

Namespaces come from an explicit list and a label selector. The Secret is written where it
differs and created where it is missing, optionally listed in the namespace's `default`
ServiceAccount, in parallel (a thousand namespaces are a few thousand API calls). Every
write can be undone: on failure at once, on a transaction's rollback later (crflow/undo.py).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from kubernetes import client
from kubernetes.client.rest import ApiException
from prefect import task
from pydantic import SecretStr

from crflow.errors import CrflowError, transient_only
from crflow.outcomes import Change
from crflow.tasks.kubeapi import POOL_SIZE, KubeAccess, api_client, get_or_none, managed_labels, retrying
from crflow.tasks.secrets import delete_secret, snapshot_secret, write_secret_undoably
from crflow.undo import undo, undoable

WORKERS = POOL_SIZE  # concurrent API calls, one keep-alive connection each


def consumer_namespaces(api: client.ApiClient, namespaces: list[str], selector: str | None) -> list[str]:
    """The listed namespaces (each must exist) and those the label selector matches."""
    core = client.CoreV1Api(api)
    found = set()
    if selector:
        listed = retrying(f"list namespaces matching {selector!r}", lambda: core.list_namespace(label_selector=selector))
        found = {ns.metadata.name for ns in listed.items}
    missing = [n for n in namespaces if n not in found and retrying(
        f"read namespace {n}", lambda n=n: get_or_none(lambda: core.read_namespace(n))) is None]
    if missing:
        raise CrflowError(f"pull_secrets.namespaces: no namespace {', '.join(missing)} in the cluster; "
                          "create it or remove it from the site file")
    return sorted(found | set(namespaces))


def _set_default_account_secret(api: client.ApiClient, namespace: str, secret: str, listed: bool) -> bool:
    """List (or unlist) `secret` in the namespace's default ServiceAccount; return whether it changed."""
    core = client.CoreV1Api(api)

    def attempt() -> bool:
        account = get_or_none(lambda: core.read_namespaced_service_account("default", namespace))
        if account is None:  # the ServiceAccount controller makes it moments after the namespace
            if not listed:
                return False
            raise ApiException(status=503, reason=f"ServiceAccount {namespace}/default does not exist yet")
        refs = account.image_pull_secrets or []
        if any(r.name == secret for r in refs) == listed:
            return False
        account.image_pull_secrets = ([*refs, client.V1LocalObjectReference(name=secret)] if listed
                                      else [r for r in refs if r.name != secret])
        core.replace_namespaced_service_account("default", namespace, account)  # 409 on a concurrent write: retried
        return True

    return retrying(f"update ServiceAccount {namespace}/default", attempt)


@task(task_run_name="pull Secret {name} in every consumer namespace",
      retries=1, retry_delay_seconds=5, retry_condition_fn=transient_only)
def put_pull_secrets(kube: KubeAccess, namespaces: list[str], selector: str | None, name: str,
                     docker_config: SecretStr, default_service_account: bool, release: str,
                     registry_namespace: str) -> dict[str, Change]:
    """The pull Secret `name` holding `docker_config` in every consumer namespace; what each got."""
    labels = managed_labels(release, registry_namespace)
    data = {".dockerconfigjson": docker_config}
    with api_client(kube) as api, undoable() as on_undo:
        targets = consumer_namespaces(api, namespaces, selector)

        def one(namespace: str) -> Change:
            outcome = write_secret_undoably(kube, api, namespace, name, "kubernetes.io/dockerconfigjson", data,
                                            labels, on_undo)
            if default_service_account and _set_default_account_secret(api, namespace, name, listed=True):
                on_undo(_unlist(kube, namespace, name))
                outcome = Change.UPDATED if outcome is Change.UNCHANGED else outcome
            return outcome

        pool = ThreadPoolExecutor(WORKERS)
        try:
            return dict(zip(targets, pool.map(one, targets), strict=True))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # after a failure, write no more: undo


put_pull_secrets.on_rollback(undo)


def _unlist(kube: KubeAccess, namespace: str, name: str) -> Callable[[], None]:
    def step() -> None:
        with api_client(kube) as api:
            _set_default_account_secret(api, namespace, name, listed=False)
    return step


@task(task_run_name="remove the pull Secrets of {release}", retries=1, retry_delay_seconds=5,
      retry_condition_fn=transient_only)
def remove_pull_secrets(kube: KubeAccess, release: str, registry_namespace: str, name: str) -> list[str]:
    """Delete the pull Secret `name` crflow made for `release` in `registry_namespace` from every namespace (found by
    crflow's labels, never by name alone: a Secret someone else made stays) and unlist it from
    the namespace's default ServiceAccount; returns them as "namespace/name". It reads each
    namespace's Secret by name, not a cluster-wide list: RBAC can then limit crflow to that
    one name outside the registry's namespace (deployments/worker-rbac.yaml)."""
    labels = managed_labels(release, registry_namespace)
    removed = []
    with api_client(kube) as api:
        core = client.CoreV1Api(api)
        namespaces = retrying("list namespaces", lambda: core.list_namespace()).items
        for namespace in sorted(ns.metadata.name for ns in namespaces):
            found = snapshot_secret(api, namespace, name)
            if found is None or found.type != "kubernetes.io/dockerconfigjson" or \
                    not labels.items() <= (found.metadata.labels or {}).items():
                continue
            _set_default_account_secret(api, namespace, name, listed=False)
            delete_secret(api, namespace, name)
            removed.append(f"{namespace}/{name}")
    return removed
