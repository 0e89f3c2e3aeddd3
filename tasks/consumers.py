"""How do workloads get the registry's login? A kubernetes.io/dockerconfigjson pull Secret in
every namespace that pulls (the runbook's hand-made imagePullSecret), kept current by crflow.

    put_pull_secrets(kube, ["team-a"], "registry-access=true", "registry-pull",
                     docker_config, default_service_account=True, release="registry")

Namespaces come from an explicit list and a label selector. The Secret is written where it
differs and created where it is missing, optionally listed in the namespace's `default`
ServiceAccount, in parallel (a thousand namespaces are a few thousand API calls). Every
write can be undone: on failure at once, on a transaction's rollback later (crflow/undo.py).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from kubernetes import client
from prefect import task
from pydantic import SecretStr

from crflow.errors import CrflowError, transient_only
from crflow.tasks.kubeapi import POOL_SIZE, KubeAccess, api_client, get_or_none, managed_labels, retrying
from crflow.tasks.secrets import write_secret_undoably
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
        if account is None:  # the ServiceAccount controller has not made it yet: make it as it would
            if not listed:
                return False
            core.create_namespaced_service_account(namespace, client.V1ServiceAccount(
                metadata=client.V1ObjectMeta(name="default"),
                image_pull_secrets=[client.V1LocalObjectReference(name=secret)]))
            return True
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
                     docker_config: SecretStr, default_service_account: bool, release: str) -> dict[str, str]:
    """The pull Secret `name` holding `docker_config` in every consumer namespace;
    returns namespace -> "created", "updated" or "unchanged"."""
    labels = managed_labels(release)
    data = {".dockerconfigjson": docker_config}
    with api_client(kube) as api, undoable() as on_undo:
        targets = consumer_namespaces(api, namespaces, selector)

        def one(namespace: str) -> str:
            outcome = write_secret_undoably(kube, api, namespace, name, "kubernetes.io/dockerconfigjson", data,
                                            labels, on_undo)
            if default_service_account and _set_default_account_secret(api, namespace, name, listed=True):
                on_undo(_unlist(kube, namespace, name))
                outcome = "updated" if outcome == "unchanged" else outcome
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
def remove_pull_secrets(kube: KubeAccess, release: str) -> list[str]:
    """Delete every pull Secret crflow made for `release` (found by crflow's labels, never by
    name alone: a Secret someone else made stays) and unlist it from the namespace's default
    ServiceAccount; returns them as "namespace/name"."""
    selector = ",".join(f"{k}={v}" for k, v in managed_labels(release).items())
    with api_client(kube) as api:
        core = client.CoreV1Api(api)
        found = retrying("list crflow's Secrets", lambda: core.list_secret_for_all_namespaces(label_selector=selector))
        pulls = sorted((s.metadata.namespace, s.metadata.name) for s in found.items
                       if s.type == "kubernetes.io/dockerconfigjson")
        for namespace, name in pulls:
            _set_default_account_secret(api, namespace, name, listed=False)
            retrying(f"delete Secret {namespace}/{name}", lambda n=namespace, s=name: get_or_none(
                lambda: core.delete_namespaced_secret(s, n, _preload_content=False)))
    return [f"{namespace}/{name}" for namespace, name in pulls]
