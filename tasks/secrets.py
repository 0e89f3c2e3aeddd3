"""How do we keep the registry's Secrets? One function writes any of them, only where it
differs, and can put back what it replaced; MinIO's keys are read from MinIO's own Secret.

    with api_client(kube) as api:
        apply_secret(api, "container-registry", "registry-tls", "kubernetes.io/tls", data, labels)
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path

from kubernetes import client
from prefect import task
from pydantic import SecretStr

from crflow.chart import mirror_name
from crflow.errors import CrflowError, transient_only
from crflow.outcomes import Change
from crflow.state import to_hold
from crflow.tasks.kubeapi import KubeAccess, api_client, ensure_namespace, get_or_none, managed_labels, retrying
from crflow.tasks.storage import S3Keys
from crflow.undo import undo, undoable


def apply_secret(api: client.ApiClient, namespace: str, name: str, secret_type: str,
                 data: dict[str, SecretStr], labels: dict[str, str]) -> Change:
    """Make Secret namespace/name hold exactly `data`."""
    core = client.CoreV1Api(api)
    encoded = {k: base64.b64encode(v.get_secret_value().encode()).decode() for k, v in data.items()}

    def attempt() -> Change:
        current = get_or_none(lambda: core.read_namespaced_secret(name, namespace))
        if current is None:
            core.create_namespaced_secret(namespace, client.V1Secret(
                metadata=client.V1ObjectMeta(name=name, labels=labels), type=secret_type, data=encoded))
            return Change.CREATED
        current_labels = current.metadata.labels or {}
        if current.data == encoded and current.type == secret_type and labels.items() <= current_labels.items():
            return Change.UNCHANGED
        if current.type != secret_type:  # the type of a Secret cannot change: replace it whole
            core.delete_namespaced_secret(name, namespace)
            core.create_namespaced_secret(namespace, client.V1Secret(
                metadata=client.V1ObjectMeta(name=name, labels=labels), type=secret_type, data=encoded))
            return Change.UPDATED
        current.data, current.metadata.labels = encoded, {**current_labels, **labels}
        core.replace_namespaced_secret(name, namespace, current)  # 409 if someone wrote since: retried
        return Change.UPDATED

    return retrying(f"write Secret {namespace}/{name}", attempt)


def snapshot_secret(api: client.ApiClient, namespace: str, name: str) -> client.V1Secret | None:
    """A Secret as it is now (None: absent), to put it back with `restore_secret`."""
    core = client.CoreV1Api(api)
    return retrying(f"read Secret {namespace}/{name}",
                    lambda: get_or_none(lambda: core.read_namespaced_secret(name, namespace)))


def delete_secret(api: client.ApiClient, namespace: str, name: str) -> None:
    """Delete one Secret; one already gone is not an error (a rerun after a crash)."""
    core = client.CoreV1Api(api)
    retrying(f"delete Secret {namespace}/{name}", lambda: get_or_none(
        lambda: core.delete_namespaced_secret(name, namespace, _preload_content=False)))


def restore_secret(kube: KubeAccess, namespace: str, name: str, before: client.V1Secret | None) -> None:
    """Put back a Secret `snapshot_secret` saw (or delete it, if it was absent)."""
    with api_client(kube) as api:
        if before is None:
            delete_secret(api, namespace, name)
            return
        data = {k: SecretStr(base64.b64decode(v).decode()) for k, v in (before.data or {}).items()}
        apply_secret(api, namespace, name, before.type, data, before.metadata.labels or {})


def write_secret_undoably(kube: KubeAccess, api: client.ApiClient, namespace: str, name: str, secret_type: str,
                          data: dict[str, SecretStr], labels: dict[str, str], on_undo: Callable) -> Change:
    before = snapshot_secret(api, namespace, name)
    outcome = apply_secret(api, namespace, name, secret_type, data, labels)
    if outcome is not Change.UNCHANGED:
        on_undo(lambda: restore_secret(kube, namespace, name, before))
    return outcome


def read_secret(api: client.ApiClient, namespace: str, name: str, keys: list[str],
                missing_ok: bool = False) -> dict[str, SecretStr] | None:
    """Those `keys` of Secret namespace/name, decoded; None if the Secret is absent and `missing_ok`."""
    if missing_ok:
        secret = snapshot_secret(api, namespace, name)
    else:
        core = client.CoreV1Api(api)
        secret = retrying(f"read Secret {namespace}/{name}", lambda: core.read_namespaced_secret(name, namespace))
    if secret is None:
        return None
    missing = [k for k in keys if k not in (secret.data or {})]
    if missing:
        raise CrflowError(f"Secret {namespace}/{name} has no key {', '.join(missing)}")
    return {k: SecretStr(base64.b64decode(secret.data[k]).decode()) for k in keys}


@task(task_run_name="Secret {namespace}/{name}", retries=2, retry_delay_seconds=5, retry_condition_fn=transient_only)
def put_secret(kube: KubeAccess, namespace: str, name: str, secret_type: str, data: dict[str, SecretStr],
               release: str) -> Change:
    """One of the registry's Secrets, written only where it differs (put back on rollback)."""
    with api_client(kube) as api, undoable() as on_undo:
        return write_secret_undoably(kube, api, namespace, name, secret_type, data, managed_labels(release, namespace), on_undo)


put_secret.on_rollback(undo)


@task(task_run_name="S3 keys from Secret {namespace}/{name}",
      retries=2, retry_delay_seconds=5, retry_condition_fn=transient_only)
def read_s3_keys_secret(kube: KubeAccess, namespace: str, name: str, access_key_key: str,
                        secret_key_key: str) -> S3Keys:
    """The S3 keys from MinIO's own Secret (the registry's Secret gets a copy with the others)."""
    with api_client(kube) as api:
        keys = read_secret(api, namespace, name, [access_key_key, secret_key_key])
    return S3Keys(access_key=keys[access_key_key], secret_key=keys[secret_key_key])


@task(task_run_name="versions of Secrets in {namespace}", retries=2, retry_delay_seconds=5,
      retry_condition_fn=transient_only)
def secret_versions(kube: KubeAccess, namespace: str, names: list[str]) -> dict[str, str]:
    """name -> resourceVersion of those of `names` that exist: a number that moves whenever a
    Secret is written, and says nothing of what it holds."""
    with api_client(kube) as api:
        found = {name: snapshot_secret(api, namespace, name) for name in names}
    return {name: secret.metadata.resource_version for name, secret in found.items() if secret is not None}


@task(task_run_name="the mirrors' Secrets no mirror uses, in {namespace}", retries=1, retry_delay_seconds=5,
      retry_condition_fn=transient_only)
def prune_mirror_secrets(kube: KubeAccess, namespace: str, release: str, keep: list[str]) -> list[str]:
    """Delete the Secrets crflow made for `release`'s mirrors (RELEASE-mirror-..., found by its
    labels: a Secret of the user's stays) but those in `keep`; returns those deleted."""
    prefix = mirror_name(release, "")
    selector = ",".join(f"{k}={v}" for k, v in managed_labels(release, namespace).items())
    with api_client(kube) as api:
        core = client.CoreV1Api(api)
        found = retrying(f"list Secrets in {namespace}", lambda: core.list_namespaced_secret(
            namespace, label_selector=selector)).items
        doomed = sorted(s.metadata.name for s in found if s.metadata.name.startswith(prefix) and s.metadata.name not in keep)
        for name in doomed:
            delete_secret(api, namespace, name)
    return [f"Secret {namespace}/{name}" for name in doomed]


@task(task_run_name="delete the registry's Secrets in {namespace}", retries=1, retry_delay_seconds=5,
      retry_condition_fn=transient_only)
def delete_secrets(kube: KubeAccess, namespace: str, names: list[str], release: str,
                   registry_namespace: str) -> list[str]:
    """Delete those of `names` that carry crflow's labels for the registry `release` in
    `registry_namespace`; returns those deleted."""
    labels = managed_labels(release, registry_namespace)
    deleted = []
    with api_client(kube) as api:
        for name in names:
            found = snapshot_secret(api, namespace, name)
            if found is not None and labels.items() <= (found.metadata.labels or {}).items():
                delete_secret(api, namespace, name)
                deleted.append(f"Secret {namespace}/{name}")
    return deleted


@task(task_run_name="the CA the cluster holds ({namespace})", retries=2, retry_delay_seconds=5,
      retry_condition_fn=transient_only)
def read_held_ca(kube: KubeAccess, namespace: str, names: list[str]) -> str | None:
    """ca.crt from the first of `names` that holds one (a public certificate), or None."""
    with api_client(kube) as api:
        for name in names:
            found = snapshot_secret(api, namespace, name)
            if found is not None and "ca.crt" in (found.data or {}):
                return base64.b64decode(found.data["ca.crt"]).decode()
    return None


def _decoded(secret: client.V1Secret | None) -> dict[str, bytes] | None:
    return None if secret is None else {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}


@task(task_run_name="the site's state from Secret {namespace}/{name}", retries=2, retry_delay_seconds=5,
      retry_condition_fn=transient_only)
def read_state(kube: KubeAccess, namespace: str, name: str) -> dict[str, bytes] | None:
    """What the state Secret holds (file name -> content), or None if there is none yet."""
    with api_client(kube) as api:
        return _decoded(snapshot_secret(api, namespace, name))


@task(task_run_name="the site's state to Secret {namespace}/{name}", retries=2, retry_delay_seconds=5,
      retry_condition_fn=transient_only)
def keep_state(kube: KubeAccess, namespace: str, name: str, state_dir: Path, release: str) -> Change | None:
    """The state Secret brought up to date with state_dir; None: nothing to hold yet (no CA)."""
    with api_client(kube) as api:
        held = _decoded(snapshot_secret(api, namespace, name))
        data = to_hold(state_dir, held or {})
        if data is None:
            return None
        if held is None:  # the site's first state comes before the install step that makes the namespace
            ensure_namespace(api, namespace, managed_labels(release, namespace))
        # Every file held is text: JSON records and Fernet tokens.
        return apply_secret(api, namespace, name, "Opaque", {k: SecretStr(v.decode()) for k, v in data.items()},
                            managed_labels(release, namespace))
