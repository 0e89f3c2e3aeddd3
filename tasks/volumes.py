"""Where do blobs go on the cluster when storage is a node's disk? A hostPath
PersistentVolume pinned to that node, and the claim bound to it (the runbook's PV/PVC)."""

from __future__ import annotations

from kubernetes import client
from prefect import task

from crflow.errors import transient_only
from crflow.outcomes import Change
from crflow.tasks.kubeapi import KubeAccess, api_client, get_or_none, managed_labels, retrying


def ensure_hostpath_volume(api: client.ApiClient, namespace: str, claim: str, path: str, node: str, size: str,
                           labels: dict[str, str]) -> Change:
    """A hostPath PersistentVolume on `node` and the claim bound to it (the runbook's PV/PVC)."""
    core = client.CoreV1Api(api)
    pv_name = f"{namespace}-{claim}"

    def attempt() -> Change:
        made = Change.UNCHANGED
        if get_or_none(lambda: core.read_persistent_volume(pv_name)) is None:
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
            made = Change.CREATED
        if get_or_none(lambda: core.read_namespaced_persistent_volume_claim(claim, namespace)) is None:
            core.create_namespaced_persistent_volume_claim(namespace, client.V1PersistentVolumeClaim(
                metadata=client.V1ObjectMeta(name=claim, labels=labels),
                spec=client.V1PersistentVolumeClaimSpec(
                    access_modes=["ReadWriteOnce"], storage_class_name="", volume_name=pv_name,
                    resources=client.V1VolumeResourceRequirements(requests={"storage": size}))))
            made = Change.CREATED
        return made

    return retrying(f"create PV {pv_name} and PVC {namespace}/{claim}", attempt)


@task(task_run_name="volume {claim} on {node}", retries=2, retry_delay_seconds=5, retry_condition_fn=transient_only)
def create_hostpath_volume(kube: KubeAccess, namespace: str, claim: str, path: str, node: str, size: str,
                           release: str) -> Change:
    """The hostPath PV on `node` and its claim, for filesystem storage on the cluster."""
    with api_client(kube) as api:
        return ensure_hostpath_volume(api, namespace, claim, path, node, size, managed_labels(release, namespace))


@task(task_run_name="delete volume {claim}", retries=1, retry_delay_seconds=5, retry_condition_fn=transient_only)
def delete_hostpath_volume(kube: KubeAccess, namespace: str, claim: str) -> list[str]:
    """Delete the claim and the PersistentVolume crflow made for it. The directory on the node
    stays: the volume's reclaim policy is Retain, so no data goes with the objects."""
    pv_name = f"{namespace}-{claim}"
    with api_client(kube) as api:
        core = client.CoreV1Api(api)
        deleted = []
        if retrying(f"delete PVC {namespace}/{claim}", lambda: get_or_none(
                lambda: core.delete_namespaced_persistent_volume_claim(claim, namespace, _preload_content=False))):
            deleted.append(f"PVC {namespace}/{claim}")
        if retrying(f"delete PV {pv_name}", lambda: get_or_none(
                lambda: core.delete_persistent_volume(pv_name, _preload_content=False))):
            deleted.append(f"PV {pv_name}")
    return deleted
