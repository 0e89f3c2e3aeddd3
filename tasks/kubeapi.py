"""How do we talk to the cluster? The official Python client, opened per call from plain
access settings, with the retries every write shares, crflow's labels, and the namespace.

    kube = KubeAccess(kubeconfig="~/.kube/config", context=None)
    with api_client(kube) as api:
        ensure_namespace(api, "container-registry", managed_labels("registry", "container-registry"))

Every write is idempotent (read, compare, write only what differs) and retried on what a
retry can fix: connection errors, 429, 5xx, and 409 (someone else wrote first: read again).
No Secret value ever reaches a message: errors name the object, the verb and the status.
"""

from __future__ import annotations

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
from pydantic import BaseModel

from crflow.errors import CrflowError, Transient, transient_only
from crflow.outcomes import Change

KUBECONFIG_HINT = "kubectl config view --raw > ~/.kube/config; chmod 600 ~/.kube/config"
RETRIED_STATUSES = {409, 429, 500, 502, 503, 504}
POOL_SIZE = 16  # keep-alive connections per client: as many as crflow.tasks.consumers writes in parallel
# Every call's bound: a frozen or partitioned apiserver is a timeout (retried as any connection
# error is), never a hang. An apiserver answers a single object in milliseconds and gives up on
# a slow etcd after 60 s itself; nothing crflow asks for is a watch or a long list.
CONNECT_SECONDS = 10.0


class KubeAccess(BaseModel):
    """Which cluster: a kubeconfig file (None: $KUBECONFIG, ~/.kube/config, or in-cluster) and
    context; and how long one API call may wait for its answer (cluster.api_timeout_seconds)."""

    kubeconfig: str | None = None
    context: str | None = None
    read_seconds: float = 30.0


def managed_labels(release: str, namespace: str) -> dict[str, str]:
    """What marks an object as crflow's for the registry `release` in `namespace`. Both: a
    release name is unique only within its namespace, and crflow finds its pull Secrets in
    every namespace by these labels (two sites named `registry` must not take each other's)."""
    return {"app.kubernetes.io/name": "crflow-registry", "app.kubernetes.io/instance": release,
            "app.kubernetes.io/managed-by": "crflow", "crflow.io/registry-namespace": namespace}


class BoundedApiClient(client.ApiClient):
    """The official client with a timeout on every call that names none (it sends none by
    default, and a socket without one waits for ever)."""

    def __init__(self, configuration: client.Configuration, read_seconds: float):
        super().__init__(configuration)
        self.bound = (min(CONNECT_SECONDS, read_seconds), read_seconds)

    def call_api(self, *args, _request_timeout=None, **kwargs):
        return super().call_api(*args, _request_timeout=_request_timeout or self.bound, **kwargs)


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
    configuration.retries = 0  # `retrying` is the one place that retries (urllib3 would add 3 of its own per try)
    api = BoundedApiClient(configuration, kube.read_seconds)
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
    """Run `call` (a whole read-compare-write) until it succeeds or fails for good: a 409, 429,
    5xx or an unreachable API is retried here, then raised as Transient (so the task's own
    retries may try again later); any other status is a CrflowError at once. Causes are chained."""
    delay = first_delay
    for attempt in range(attempts):
        last = attempt == attempts - 1
        try:
            return call()
        except ApiException as err:
            if err.status not in RETRIED_STATUSES:
                raise CrflowError(f"Kubernetes API: {what} failed with {err.status}: {_reason(err)}") from err
            if last:
                raise Transient(f"Kubernetes API: {what} failed with {err.status}: {_reason(err)}") from err
        except (urllib3.exceptions.HTTPError, ConnectionError) as err:
            if last:
                raise Transient(f"Kubernetes API unreachable during {what} ({type(err).__name__}); "
                                f"check the kubeconfig (`{KUBECONFIG_HINT}`)") from err
        time.sleep(delay)
        delay *= 2


def get_or_none(read: Callable):
    """`read()`, or None where the object does not exist (404)."""
    try:
        return read()
    except ApiException as err:
        if err.status == 404:
            return None
        raise


def ensure_namespace(api: client.ApiClient, name: str, labels: dict[str, str]) -> Change:
    core = client.CoreV1Api(api)

    def attempt() -> Change:
        if get_or_none(lambda: core.read_namespace(name)) is not None:
            return Change.UNCHANGED
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels=labels)))
        return Change.CREATED

    return retrying(f"create namespace {name}", attempt)


@task(task_run_name="the cluster's Kubernetes version", retries=2, retry_delay_seconds=5,
      retry_condition_fn=transient_only)
def server_version(kube: KubeAccess) -> str:
    """The API server's version, as `kubectl version` shows it (v1.20.2)."""
    with api_client(kube) as api:
        return retrying("read the server's version", lambda: client.VersionApi(api).get_code()).git_version


@task(task_run_name="namespace {namespace}", retries=2, retry_delay_seconds=5, retry_condition_fn=transient_only)
def create_namespace(kube: KubeAccess, namespace: str, release: str) -> Change:
    """The registry's namespace, labelled as crflow's."""
    with api_client(kube) as api:
        return ensure_namespace(api, namespace, managed_labels(release, namespace))


