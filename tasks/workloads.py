"""What runs on the cluster? The registry's Deployment as the cluster has it (for where its
pod stores blobs), the node-trust DaemonSet ready on every node, and a short-lived DaemonSet
whose pod on every node pulls an image with a pull secret."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from kubernetes import client
from prefect import task
from pydantic import SecretStr

from crflow.chart import COMMAND, CONFIG_PATH
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


PULL_TEST_NAMESPACE, PULL_TEST = "crflow-verify", "crflow-verify-pull-test"


def pull_test_name(namespace: str, release: str) -> str:
    """The site's pull Secret and DaemonSet in verify's namespace: one pair per site, so two
    registries on one cluster verify at once, and uninstall one, without touching the other's."""
    name = f"pull-{release}-{namespace}"
    if len(name) > 52:  # a label value holds 63, and the DaemonSet's pods add a suffix to its name
        name = f"{name[:43]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return name
# What a kubelet reports for an image it could not get: the runtime's own message follows.
PULL_FAILURES = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}
# What a kubelet reports once the image is there but the container cannot start: the smoke
# image is data, with no command to run (a real kubelet says CreateContainerError, "no command
# specified"). The kubelet pulls before it makes the container, so each of these means pulled.
AFTER_PULL = {"CreateContainerError", "CreateContainerConfigError", "RunContainerError", "CrashLoopBackOff",
              "ContainerCannotRun"}


def daemonset_ready(status) -> bool:
    """Every node the DaemonSet is for runs its current pod, ready (what `kubectl rollout
    status` waits for)."""
    return bool(status and status.desired_number_scheduled is not None
                and (status.updated_number_scheduled or 0) == status.desired_number_scheduled
                and (status.number_ready or 0) == status.desired_number_scheduled)


def wait_for_daemonset(api: client.ApiClient, namespace: str, name: str, timeout: float) -> int:
    """Wait until the DaemonSet's current pod is ready on every node; returns how many nodes."""
    apps = client.AppsV1Api(api)
    deadline = time.monotonic() + timeout
    while True:
        found = retrying(f"read DaemonSet {namespace}/{name}", lambda: apps.read_namespaced_daemon_set(name, namespace))
        current = found.status and found.status.observed_generation == found.metadata.generation
        if current and daemonset_ready(found.status):
            return found.status.desired_number_scheduled
        if time.monotonic() > deadline:
            status = found.status
            raise CrflowError(f"DaemonSet {namespace}/{name} is ready on {status and status.number_ready or 0} of "
                              f"{status and status.desired_number_scheduled or '?'} nodes after {timeout:.0f} s; "
                              f"see kubectl -n {namespace} get pods -o wide")
        time.sleep(0.5)


def rolled_out(deployment, pods: list) -> bool:
    """`kubectl rollout status`'s test, and one more: the controller saw the current spec, every
    replica runs it and is available, and no pod of an older spec is left, not even one
    terminating. helm's wait, and `kubectl rollout status`, can end while an old pod still
    answers through the Service (a terminating one leaves it only once the endpoints
    controller and kube-proxy catch up): a check right after would judge the old spec."""
    status = deployment.status
    if status is None or (status.observed_generation or 0) < (deployment.metadata.generation or 0):
        return False
    want = 1 if deployment.spec.replicas is None else deployment.spec.replicas
    counts = (status.replicas or 0, status.updated_replicas or 0, status.available_replicas or 0)
    live = [pod for pod in pods if (pod.status and pod.status.phase) not in ("Succeeded", "Failed")]  # (evicted: no answer)
    return counts == (want, want, want) and len(live) == want and all(
        pod.metadata.deletion_timestamp is None for pod in live)


def _owned_pods(apps: client.AppsV1Api, core: client.CoreV1Api, deployment) -> list:
    """The pods of the Deployment's ReplicaSets, by owner: its selector may match others (the
    node-trust DaemonSet's pods carry the release's labels too)."""
    namespace, name = deployment.metadata.namespace, deployment.metadata.name
    selector = ",".join(f"{k}={v}" for k, v in (deployment.spec.selector.match_labels or {}).items())

    def owned(items, uids: set[str]) -> list:
        return [o for o in items if any(ref.uid in uids for ref in o.metadata.owner_references or [])]

    sets = retrying(f"list the ReplicaSets of {namespace}/{name}",
                    lambda: apps.list_namespaced_replica_set(namespace, label_selector=selector)).items
    pods = retrying(f"list the pods of {namespace}/{name}",
                    lambda: core.list_namespaced_pod(namespace, label_selector=selector)).items
    return owned(pods, {rs.metadata.uid for rs in owned(sets, {deployment.metadata.uid})})


@task(task_run_name="rollouts done in {namespace}: {names}", retries=1, retry_delay_seconds=5,
      retry_condition_fn=transient_only)
def wait_for_rollouts(kube: KubeAccess, namespace: str, names: list[str], timeout: float) -> None:
    """Wait until each Deployment's pods all run its current spec (see rolled_out)."""
    deadline = time.monotonic() + timeout
    with api_client(kube) as api:
        apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
        for name in names:
            while True:
                found = retrying(f"read Deployment {namespace}/{name}",
                                 lambda: apps.read_namespaced_deployment(name, namespace))
                pods = _owned_pods(apps, core, found)
                if rolled_out(found, pods):
                    break
                if time.monotonic() > deadline:
                    raise CrflowError(f"Deployment {namespace}/{name} has not finished its rollout after {timeout:.0f} s "
                                      f"({len(pods)} pods, {found.status and found.status.updated_replicas or 0} "
                                      f"of the current spec); see kubectl -n {namespace} rollout status "
                                      f"deployment/{name}")
                time.sleep(0.5)


@task(task_run_name="every node trusts the registry ({namespace}/{name})",
      retries=1, retry_delay_seconds=5, retry_condition_fn=transient_only)
def wait_for_node_trust(kube: KubeAccess, namespace: str, name: str, timeout: float) -> int:
    """The node-trust DaemonSet has written the CA on every node; returns how many nodes."""
    with api_client(kube) as api:
        return wait_for_daemonset(api, namespace, name, timeout)


LOAD_BALANCER_SECONDS = 60  # a controller (MetalLB) answers in seconds; past this, none is coming


@task(task_run_name="Service {namespace}/{name} has its external IP", retries=1, retry_delay_seconds=5,
      retry_condition_fn=transient_only)
def wait_for_load_balancer(kube: KubeAccess, namespace: str, name: str, wanted: str | None, timeout: float) -> str:
    """The LoadBalancer Service's address, once a controller gave it one; a line that says
    EXTERNAL-IP is <pending>, and why, if none did (clients would only be refused)."""
    with api_client(kube) as api:
        core = client.CoreV1Api(api)
        deadline = time.monotonic() + timeout
        while True:
            service = retrying(f"read Service {namespace}/{name}", lambda: core.read_namespaced_service(name, namespace))
            status = service.status
            ingress = (status and status.load_balancer and status.load_balancer.ingress) or []
            given = [entry.ip or entry.hostname for entry in ingress]
            if given:
                if wanted and wanted not in given:
                    raise CrflowError(f"Service {namespace}/{name} got the external address {given[0]}, not {wanted} "
                                      "(registry.ips, which the certificate names); give the load balancer that "
                                      "address, or put it in registry.ips")
                return given[0]
            if time.monotonic() >= deadline:
                raise CrflowError(
                    f"Service {namespace}/{name} has no external IP after {timeout:.0f} s (EXTERNAL-IP <pending>): no "
                    f"load-balancer controller gave it {wanted or 'one'} (MetalLB: enable it, with that address in "
                    "its pool), or use registry.service_type: NodePort")
            time.sleep(1)


def pull_outcomes(api: client.ApiClient, selector: dict[str, str]) -> dict[str, str | None]:
    """node -> None once its pod has the image, else the kubelet's reason and message while a
    pull fails (its back-off's own message says nothing: the last failure's is kept by the
    caller); nodes still pulling are left out."""
    core = client.CoreV1Api(api)
    pods = retrying("list the pull-test pods", lambda: core.list_namespaced_pod(
        PULL_TEST_NAMESPACE, label_selector=",".join(f"{k}={v}" for k, v in selector.items())))
    outcomes: dict[str, str | None] = {}
    for pod in pods.items:
        for status in (pod.status and pod.status.container_statuses) or []:
            state = status.state
            waiting = state and state.waiting
            if status.image_id or (state and (state.running or state.terminated)) or \
                    (waiting and waiting.reason in AFTER_PULL):
                outcomes[pod.spec.node_name] = None  # pulled (the container may not run: it need not)
            elif waiting and waiting.reason in PULL_FAILURES:
                outcomes[pod.spec.node_name] = f"{waiting.reason}: {waiting.message}"
    return outcomes


# A node's first failed pull is not yet its answer: a kubelet may pull with a copy of the pull
# Secret older than the one this run wrote (seen on a real 1.20 kubelet: 401, then the same
# pull 13 s later succeeded, and its pod's status said so 3 s after that). Its back-off waits
# 10 s, then 20 s: by 30 s it has tried again and reported.
PULL_SETTLE_SECONDS = 30.0


def run_pull_test(api: client.ApiClient, image: str, docker_config: SecretStr, labels: dict[str, str],
                  name: str, timeout: float) -> str:
    """A DaemonSet in the test namespace whose pod on every node pulls `image` with a pull
    secret; wait until each node has it, then remove it. Raises CrflowError naming each node
    that could not pull, with the runtime's message."""
    apps = client.AppsV1Api(api)
    ensure_namespace(api, PULL_TEST_NAMESPACE, labels)
    apply_secret(api, PULL_TEST_NAMESPACE, name, "kubernetes.io/dockerconfigjson",
                 {".dockerconfigjson": docker_config}, labels)
    selector = {"app.kubernetes.io/name": PULL_TEST, "app.kubernetes.io/instance": name}
    daemonset = client.V1DaemonSet(
        metadata=client.V1ObjectMeta(name=name, labels={**labels, **selector}),
        spec=client.V1DaemonSetSpec(
            selector=client.V1LabelSelector(match_labels=selector),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=selector),
                spec=client.V1PodSpec(
                    # Every node a workload may land on, control-plane nodes included.
                    tolerations=[client.V1Toleration(operator="Exists")],
                    automount_service_account_token=False,
                    containers=[client.V1Container(name="pull-test", image=image, image_pull_policy="Always")],
                    image_pull_secrets=[client.V1LocalObjectReference(name=name)]))))
    retrying(f"delete DaemonSet {PULL_TEST_NAMESPACE}/{name}",  # a killed run's
             lambda: get_or_none(lambda: apps.delete_namespaced_daemon_set(name, PULL_TEST_NAMESPACE)))
    retrying(f"create DaemonSet {PULL_TEST_NAMESPACE}/{name}",
             lambda: apps.create_namespaced_daemon_set(PULL_TEST_NAMESPACE, daemonset))
    try:
        deadline = time.monotonic() + timeout
        failing_since: dict[str, float] = {}
        reasons: dict[str, str] = {}
        while True:
            status = retrying("read the pull test", lambda: apps.read_namespaced_daemon_set_status(
                name, PULL_TEST_NAMESPACE)).status
            nodes = status and status.desired_number_scheduled
            outcomes = pull_outcomes(api, selector) if nodes else {}
            now = time.monotonic()
            for node, why in outcomes.items():
                if why is None:
                    failing_since.pop(node, None)
                    continue
                failing_since.setdefault(node, now)
                if not why.startswith("ImagePullBackOff") or node not in reasons:
                    reasons[node] = why
            settled = {node for node, why in outcomes.items()
                       if why is None or now - failing_since[node] >= PULL_SETTLE_SECONDS}
            if nodes and len(settled) >= nodes:
                failed = {node: reasons[node] for node in sorted(settled) if outcomes[node]}
                if failed:
                    raise CrflowError(f"{len(failed)} of {nodes} nodes could not pull {image} with pull secret "
                                      f"{PULL_TEST_NAMESPACE}/{name}: " +
                                      "; ".join(f"node {node}: {why}" for node, why in failed.items()))
                return f"{image} pulled on {nodes} nodes ({', '.join(sorted(outcomes))})"
            if now > deadline:
                if reasons:
                    raise CrflowError(f"pulling {image} with pull secret {PULL_TEST_NAMESPACE}/{name}: " +
                                      "; ".join(f"node {node}: {why}" for node, why in sorted(reasons.items())))
                waiting = "no node runs the pull test" if status and nodes == 0 else \
                    f"{len(outcomes)} of {nodes or '?'} nodes pulled it"
                raise CrflowError(f"pulling {image} in namespace {PULL_TEST_NAMESPACE}: {waiting} after {timeout:.0f} s")
            time.sleep(0.5)
    finally:
        retrying(f"delete DaemonSet {PULL_TEST_NAMESPACE}/{name}",
                 lambda: get_or_none(lambda: apps.delete_namespaced_daemon_set(name, PULL_TEST_NAMESPACE)))


@task(task_run_name="a pod on every node pulls {image}", retries=1, retry_delay_seconds=5,
      retry_condition_fn=transient_only)
def pull_with_secret(kube: KubeAccess, image: str, auth_file: Path, namespace: str, release: str,
                     timeout: float = 120) -> str:
    """Kubernetes: a pod on every node pulls `image` with a pull secret made from the client login."""
    with api_client(kube) as api:
        return run_pull_test(api, image, SecretStr(auth_file.read_text()), managed_labels(release, namespace),
                             pull_test_name(namespace, release), timeout)


# The collection's container: the registry binary, its output kept in /tmp, and what crflow
# needs of it (the summary line first, then the blob lines that fit) as the termination message.
GC_SCRIPT = """registry=$1 config=$2 message=$3; shift 3
"$registry" garbage-collect "$config" "$@" > /tmp/gc.log 2>&1; status=$?
if [ $status -eq 0 ]; then
  { grep 'eligible for deletion$' /tmp/gc.log; grep '^blob eligible for deletion' /tmp/gc.log; } | head -c 4000 > "$message"
else
  tail -n 5 /tmp/gc.log | head -c 4000 > "$message"
fi
exit $status
"""
GC_VOLUMES = {"config", "data", "s3-ca"}  # the config and the storage: no TLS key, no htpasswd


def gc_job(name: str, template: dict, flags: list[str], labels: dict[str, str], instance: str) -> dict:
    """A Job running `registry garbage-collect` with the registry pod's config and storage,
    whose pod carries none of the Deployment's selector labels (no Service sends it traffic)."""
    spec = template["spec"]
    (container,) = [c for c in spec["containers"] if c.get("command") == [COMMAND]]
    pod_labels = {"app.kubernetes.io/name": "crflow-registry-garbage-collect", "app.kubernetes.io/instance": instance,
                  "app.kubernetes.io/component": "garbage-collect"}
    keep = {k: spec[k] for k in ("securityContext", "imagePullSecrets", "nodeSelector", "tolerations", "affinity")
            if k in spec}
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "labels": {**labels, "app.kubernetes.io/component": "garbage-collect"}},
        "spec": {"backoffLimit": 0, "ttlSecondsAfterFinished": 3600, "template": {
            "metadata": {"labels": pod_labels},
            "spec": {**keep, "restartPolicy": "Never", "automountServiceAccountToken": False,
                     "volumes": [v for v in spec.get("volumes") or [] if v["name"] in GC_VOLUMES] +
                     [{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}],
                     "containers": [{
                         "name": "garbage-collect", "image": container["image"],
                         "imagePullPolicy": container.get("imagePullPolicy", "IfNotPresent"),
                         "command": ["/bin/sh", "-c", GC_SCRIPT, "gc"],
                         "args": [COMMAND, CONFIG_PATH, "/dev/termination-log", *flags],
                         # (a mirror's upstream login is its proxy's, not the collection's)
                         "env": [e for e in container.get("env") or [] if not e["name"].startswith("REGISTRY_PROXY_")],
                         "securityContext": container.get("securityContext") or {},
                         "volumeMounts": [m for m in container.get("volumeMounts") or [] if m["name"] in GC_VOLUMES] +
                         [{"name": "tmp", "mountPath": "/tmp"}]}]}}}}


@task(task_run_name="garbage-collect Job {namespace}/{name}", retries=0)
def run_gc_job(kube: KubeAccess, namespace: str, name: str, template: dict, flags: list[str], instance: str,
               release: str, timeout: float) -> str:
    """Run the collection as a Job, wait for it, delete it; returns what it reported."""
    with api_client(kube) as api:
        batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
        job = gc_job(name, template, flags, managed_labels(release, namespace), instance)
        retrying(f"delete Job {namespace}/{name}", lambda: get_or_none(lambda: batch.delete_namespaced_job(
            name, namespace, propagation_policy="Background", _preload_content=False)))  # a killed run's
        retrying(f"create Job {namespace}/{name}", lambda: batch.create_namespaced_job(namespace, job))
        try:
            deadline = time.monotonic() + timeout
            while True:
                status = retrying(f"read Job {namespace}/{name}",
                                  lambda: batch.read_namespaced_job_status(name, namespace)).status
                if status and (status.succeeded or status.failed):
                    break
                if time.monotonic() > deadline:
                    raise CrflowError(f"the garbage-collect Job {namespace}/{name} did not finish in {timeout:.0f} s")
                time.sleep(0.5)
            selector = ",".join(f"{k}={v}" for k, v in job["spec"]["template"]["metadata"]["labels"].items())
            pods = retrying("list the Job's pod", lambda: core.list_namespaced_pod(namespace, label_selector=selector))
            messages = [s.state.terminated.message or "" for p in pods.items
                        for s in (p.status and p.status.container_statuses) or [] if s.state and s.state.terminated]
            output = messages[-1] if messages else ""
            if status.failed:
                last = [line for line in output.splitlines() if line.strip()]
                raise CrflowError(f"registry garbage-collect failed in Job {namespace}/{name}: "
                                  f"{last[-1] if last else 'no message'}")
            return output
        finally:
            retrying(f"delete Job {namespace}/{name}", lambda: get_or_none(lambda: batch.delete_namespaced_job(
                name, namespace, propagation_policy="Background", _preload_content=False)))
