"""The API resources the emulated server knows, and the discovery documents built from them.

EMULATED: a fixed table, not a real apiserver's registry. It holds what crflow, helm and
kubectl touch; anything else answers 404 as an unknown resource would.
"""

from __future__ import annotations

from dataclasses import dataclass

VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
SERVER_VERSION = {"major": "1", "minor": "30", "gitVersion": "v1.30.0", "platform": "linux/amd64",
                  "goVersion": "go1.22.0", "compiler": "gc", "buildDate": "2026-01-01T00:00:00Z",
                  "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean"}


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    kind: str
    plural: str
    namespaced: bool = True
    status: bool = False  # has a /status subresource
    short_names: tuple[str, ...] = ()

    @property
    def group_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def discovery(self) -> list[dict]:
        entries = [{"name": self.plural, "singularName": self.kind.lower(), "namespaced": self.namespaced,
                    "kind": self.kind, "verbs": VERBS, "shortNames": list(self.short_names)}]
        if self.status:
            entries.append({"name": f"{self.plural}/status", "singularName": "", "namespaced": self.namespaced,
                            "kind": self.kind, "verbs": ["get", "patch", "update"]})
        return entries


RESOURCES = [
    Resource("", "v1", "Namespace", "namespaces", namespaced=False, status=True, short_names=("ns",)),
    Resource("", "v1", "Secret", "secrets"),
    Resource("", "v1", "ConfigMap", "configmaps", short_names=("cm",)),
    Resource("", "v1", "Service", "services", status=True, short_names=("svc",)),
    Resource("", "v1", "ServiceAccount", "serviceaccounts", short_names=("sa",)),
    Resource("", "v1", "PersistentVolumeClaim", "persistentvolumeclaims", status=True, short_names=("pvc",)),
    Resource("", "v1", "PersistentVolume", "persistentvolumes", namespaced=False, status=True, short_names=("pv",)),
    Resource("", "v1", "Pod", "pods", status=True, short_names=("po",)),
    Resource("", "v1", "Event", "events", short_names=("ev",)),
    Resource("", "v1", "Endpoints", "endpoints", short_names=("ep",)),
    Resource("apps", "v1", "Deployment", "deployments", status=True, short_names=("deploy",)),
    Resource("apps", "v1", "ReplicaSet", "replicasets", status=True, short_names=("rs",)),
    Resource("apps", "v1", "StatefulSet", "statefulsets", status=True, short_names=("sts",)),
    Resource("apps", "v1", "DaemonSet", "daemonsets", status=True, short_names=("ds",)),
    Resource("batch", "v1", "Job", "jobs", status=True),
    Resource("rbac.authorization.k8s.io", "v1", "Role", "roles"),
    Resource("rbac.authorization.k8s.io", "v1", "RoleBinding", "rolebindings"),
    Resource("rbac.authorization.k8s.io", "v1", "ClusterRole", "clusterroles", namespaced=False),
    Resource("rbac.authorization.k8s.io", "v1", "ClusterRoleBinding", "clusterrolebindings", namespaced=False),
]


def find(group: str, version: str, plural: str, resources: list[Resource]) -> Resource | None:
    for resource in resources:
        if (resource.group, resource.version, resource.plural) == (group, version, plural):
            return resource
    return None


def api_versions() -> dict:
    return {"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}


def resource_list(group_version: str, resources: list[Resource]) -> dict | None:
    members = [r for r in resources if r.group_version == group_version]
    if not members:
        return None
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version,
            "resources": [entry for r in members for entry in r.discovery()]}


def group_list(resources: list[Resource]) -> dict:
    groups: dict[str, list[str]] = {}
    for r in resources:
        if r.group and r.version not in groups.setdefault(r.group, []):
            groups[r.group].append(r.version)
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [group(name, versions) for name, versions in groups.items()]}


def group(name: str, versions: list[str]) -> dict:
    gvs = [{"groupVersion": f"{name}/{v}", "version": v} for v in versions]
    return {"kind": "APIGroup", "apiVersion": "v1", "name": name, "versions": gvs, "preferredVersion": gvs[0]}


def openapi_v3_index(resources: list[Resource]) -> dict:
    """/openapi/v3: where each group/version's document is."""
    paths = {}
    for gv in dict.fromkeys(r.group_version for r in resources):
        prefix = "api/v1" if gv == "v1" else f"apis/{gv}"
        paths[prefix] = {"serverRelativeURL": f"/openapi/v3/{prefix}"}
    return {"paths": paths}


def openapi_v3_document(group_version: str, resources: list[Resource]) -> dict | None:
    """A group/version's OpenAPI v3 document, without schemas: only PATCH operations that
    declare the `fieldValidation` query parameter. That tells kubectl and helm that the
    server validates fields itself, so they do not look for schemas to validate against."""
    paths = {}
    for r in resources:
        if r.group_version != group_version:
            continue
        base = "/api/v1" if not r.group else f"/apis/{r.group}/{r.version}"
        path = f"{base}/namespaces/{{namespace}}/{r.plural}/{{name}}" if r.namespaced else f"{base}/{r.plural}/{{name}}"
        paths[path] = {"patch": {
            "x-kubernetes-group-version-kind": {"group": r.group, "version": r.version, "kind": r.kind},
            "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}],
            "responses": {"200": {"description": "OK"}},
        }}
    if not paths:
        return None
    return {"openapi": "3.0.0", "info": {"title": "Kubernetes (emulated)", "version": "v1.30.0"}, "paths": paths}
