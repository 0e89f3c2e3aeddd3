"""Kubernetes RBAC, evaluated as the API server's authorizer does, over the emulated server's
request log: is each request crflow made allowed by deployments/'s Roles and ClusterRoles?

EMULATED: the emulated API server authorizes nothing itself; this module applies the rules
after the fact, with Kubernetes' semantics: a request's verb comes from its method (GET on a
name: get; on a collection: list, or watch with ?watch; POST: create; PUT: update; PATCH:
patch; DELETE: delete or deletecollection); a Role's rules apply in its namespace, a
ClusterRole's everywhere it is bound cluster-wide; resourceNames never match create or a
collection; discovery paths (/api, /apis, /version, /openapi) are every user's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs

import yaml

ROOT = Path(__file__).resolve().parent.parent
# Who asks (the emulated server's /as/USER) -> the manifest binding its ServiceAccount (namespace, name).
SUBJECTS = {
    "crflow-worker": (ROOT / "deployments" / "worker-rbac.yaml", ("crflow", "crflow-worker")),  # the flows' Jobs
    "prefect-worker": (ROOT / "deployments" / "worker.yaml", ("crflow", "prefect-worker")),  # the Prefect worker
}


@dataclass(frozen=True)
class Attributes:
    verb: str
    group: str
    resource: str  # with its subresource: "deployments/status"
    namespace: str | None
    name: str | None

    def __str__(self) -> str:
        where = f" in {self.namespace}" if self.namespace else " (cluster-wide)"
        return f"{self.verb} {self.group or 'core'}/{self.resource}{f' {self.name}' if self.name else ''}{where}"


def attributes(method: str, path: str, query: str) -> Attributes | None:
    """The authorization attributes of one request; None for a non-resource (discovery) path."""
    parts = [p for p in path.split("/") if p]
    if parts[:2] == ["api", "v1"]:
        group, rest = "", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        group, rest = parts[1], parts[3:]
    else:
        return None
    if not rest:
        return None
    namespace = None
    if rest[0] == "namespaces" and len(rest) >= 3:
        namespace, rest = rest[1], rest[2:]
    resource, name = rest[0], rest[1] if len(rest) > 1 else None
    if len(rest) > 2:
        resource = f"{resource}/{rest[2]}"
    if resource.startswith("namespaces") and name:
        namespace = name  # a namespace object is authorized in itself
    watch = parse_qs(query).get("watch", [""])[0] in ("1", "true")
    verb = {"GET": "watch" if watch else ("get" if name else "list"), "POST": "create", "PUT": "update",
            "PATCH": "patch", "DELETE": "delete" if name else "deletecollection"}[method]
    return Attributes(verb, group, resource, namespace, name)


def _rule_allows(rule: dict, request: Attributes) -> bool:
    def has(key: str, value: str) -> bool:
        return value in rule.get(key, []) or "*" in rule.get(key, [])

    if not (has("apiGroups", request.group) and has("resources", request.resource) and has("verbs", request.verb)):
        return False
    names = rule.get("resourceNames")
    return not names or (request.name is not None and request.verb != "create" and request.name in names)


@dataclass
class Policy:
    """The rules bound to one ServiceAccount: (namespace or None, rules)."""

    grants: list[tuple[str | None, list[dict]]]

    @classmethod
    def load(cls, *files: Path, subject: tuple[str, str]) -> Policy:
        docs = [d for f in files for d in yaml.safe_load_all(f.read_text()) if d]
        roles = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d.get("rules") or []
                 for d in docs if d["kind"] in ("Role", "ClusterRole")}
        grants = []
        for binding in (d for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding")):
            if not any((s.get("namespace"), s["name"]) == subject for s in binding["subjects"]
                       if s["kind"] == "ServiceAccount"):
                continue
            ref, where = binding["roleRef"], binding["metadata"].get("namespace")
            rules = roles[(ref["kind"], where if ref["kind"] == "Role" else None, ref["name"])]
            grants.append((where if binding["kind"] == "RoleBinding" else None, rules))
        return cls(grants)

    def allows(self, request: Attributes) -> bool:
        return any((scope is None or scope == request.namespace) and any(_rule_allows(r, request) for r in rules)
                   for scope, rules in self.grants)


def worker_policy(user: str = "crflow-worker") -> Policy:
    manifest, subject = SUBJECTS[user]
    return Policy.load(manifest, subject=subject)


def denied(requests: list[dict], user: str = "crflow-worker") -> list[str]:
    """What `user` asked for that its manifest's RBAC does not allow (each once)."""
    policy, found = worker_policy(user), {}
    for entry in requests:
        if entry.get("user") != user:
            continue
        attrs = attributes(entry["method"], entry["path"], entry.get("query", ""))
        if attrs is not None and not policy.allows(attrs):
            found.setdefault(str(attrs), None)
    return list(found)
