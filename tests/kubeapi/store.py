"""Objects as an apiserver keeps them: with uid, resourceVersion, creationTimestamp and
generation set by the server, 409 on a stale resourceVersion, label/field selectors, the
four PATCH types, and an event log that watches are served from.

EMULATED: strategic-merge patch merges lists of named items by `name` (what the built-in
types use for containers, env, volumes, ports); `$patch` directives and other merge keys
are not implemented. Server-side apply is a create-or-merge, without field managers.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import uuid
from dataclasses import dataclass, field

from resources import Resource


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> dict:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "code": self.code}


def not_found(resource: Resource, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{resource.plural} "{name}" not found')


# --- selectors -------------------------------------------------------------------------------
def _requirements(selector: str) -> list[tuple[str, str, set[str]]]:
    """Parse a label selector: a=b, a==b, a!=b, a, !a, a in (x,y), a notin (x,y)."""
    parts, depth, current = [], 0, ""
    for char in selector:
        depth += char == "("
        depth -= char == ")"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    requirements = []
    for part in (p.strip() for p in parts if p.strip()):
        if " notin " in part or " in " in part:
            op = "notin" if " notin " in part else "in"
            key, values = part.split(f" {op} ", 1)
            requirements.append((key.strip(), op, {v.strip() for v in values.strip("() ").split(",")}))
        elif "!=" in part:
            key, value = part.split("!=", 1)
            requirements.append((key.strip(), "!=", {value.strip()}))
        elif "=" in part:
            key, value = part.replace("==", "=").split("=", 1)
            requirements.append((key.strip(), "=", {value.strip()}))
        elif part.startswith("!"):
            requirements.append((part[1:].strip(), "!exists", set()))
        else:
            requirements.append((part, "exists", set()))
    return requirements


def matches_labels(obj: dict, selector: str | None) -> bool:
    labels = obj.get("metadata", {}).get("labels") or {}
    for key, op, values in _requirements(selector or ""):
        present, value = key in labels, labels.get(key)
        if op == "=" and value not in values or op == "in" and value not in values:
            return False
        if op in ("!=", "notin") and present and value in values:
            return False
        if op == "exists" and not present or op == "!exists" and present:
            return False
    return True


def matches_fields(obj: dict, selector: str | None) -> bool:
    for key, op, values in _requirements(selector or ""):
        node = obj
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if (op == "=" and node not in values) or (op == "!=" and node in values):
            return False
    return True


# --- patches ---------------------------------------------------------------------------------
def merge_patch(target, patch):
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def strategic_merge_patch(target, patch):
    """Merge patch, except that lists of objects with a `name` are merged item by item."""
    if isinstance(patch, list) and isinstance(target, list) and all(
        isinstance(i, dict) and "name" in i for i in [*patch, *target]
    ):
        merged = {item["name"]: copy.deepcopy(item) for item in target}
        for item in patch:
            merged[item["name"]] = strategic_merge_patch(merged.get(item["name"]), item)
        return list(merged.values())
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$"):
            continue
        if value is None:
            result.pop(key, None)
        else:
            result[key] = strategic_merge_patch(result.get(key), value)
    return result


def json_patch(target, operations: list[dict]):
    """RFC 6902: add, remove, replace, test (the operations clients send)."""
    doc = copy.deepcopy(target)

    def locate(path: str):
        parts = [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]
        parent = doc
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        return parent, parts[-1]

    for op in operations:
        parent, key = locate(op["path"])
        if isinstance(parent, list):
            index = len(parent) if key == "-" else int(key)
            if op["op"] == "add":
                parent.insert(index, op["value"])
            elif op["op"] == "remove":
                parent.pop(index)
            elif op["op"] == "replace":
                parent[index] = op["value"]
            elif op["op"] == "test" and parent[index] != op["value"]:
                raise ApiError(422, "Invalid", f"json patch test failed at {op['path']}")
        else:
            if op["op"] in ("add", "replace"):
                parent[key] = op["value"]
            elif op["op"] == "remove":
                del parent[key]
            elif op["op"] == "test" and parent.get(key) != op["value"]:
                raise ApiError(422, "Invalid", f"json patch test failed at {op['path']}")
    return doc


PATCHERS = {
    "application/merge-patch+json": merge_patch,
    "application/strategic-merge-patch+json": strategic_merge_patch,
    "application/json-patch+json": json_patch,
    "application/apply-patch+yaml": merge_patch,
}


# --- the store -------------------------------------------------------------------------------
@dataclass
class Event:
    rv: int
    type: str
    resource: Resource
    obj: dict


@dataclass
class Store:
    objects: dict[tuple[str, str, str, str], dict] = field(default_factory=dict)  # (group, plural, ns, name)
    events: list[Event] = field(default_factory=list)
    rv: int = 1
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    def _key(self, resource: Resource, namespace: str | None, name: str) -> tuple[str, str, str, str]:
        return (resource.group, resource.plural, namespace or "", name)

    def get(self, resource: Resource, namespace: str | None, name: str) -> dict:
        obj = self.objects.get(self._key(resource, namespace, name))
        if obj is None:
            raise not_found(resource, name)
        return copy.deepcopy(obj)

    def list(self, resource: Resource, namespace: str | None, labels: str | None, fields: str | None) -> list[dict]:
        return [
            copy.deepcopy(obj) for (group, plural, ns, _), obj in sorted(self.objects.items())
            if (group, plural) == (resource.group, resource.plural) and (not namespace or ns == namespace)
            and matches_labels(obj, labels) and matches_fields(obj, fields)
        ]

    async def _record(self, type_: str, resource: Resource, obj: dict) -> dict:
        self.events.append(Event(int(obj["metadata"]["resourceVersion"]), type_, resource, copy.deepcopy(obj)))
        async with self.changed:
            self.changed.notify_all()
        return copy.deepcopy(obj)

    def _next_rv(self) -> str:
        self.rv += 1
        return str(self.rv)

    def _check_namespace(self, resource: Resource, namespace: str | None) -> None:
        if not resource.namespaced or resource.plural == "namespaces":
            return
        ns_resource = Resource("", "v1", "Namespace", "namespaces", namespaced=False)
        if self._key(ns_resource, None, namespace or "") not in self.objects:
            raise ApiError(404, "NotFound", f'namespaces "{namespace}" not found')

    async def create(self, resource: Resource, namespace: str | None, obj: dict, dry_run: bool = False) -> dict:
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        name = meta.get("name")
        if not name:
            raise ApiError(422, "Invalid", "metadata.name: Required value")
        self._check_namespace(resource, namespace)
        key = self._key(resource, namespace, name)
        if key in self.objects:
            raise ApiError(409, "AlreadyExists", f'{resource.plural} "{name}" already exists')
        obj["apiVersion"], obj["kind"] = resource.group_version, resource.kind
        if resource.namespaced:
            meta["namespace"] = namespace
        meta.update(uid=str(uuid.uuid4()), resourceVersion=self._next_rv(), generation=1,
                    creationTimestamp=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
        meta.pop("deletionTimestamp", None)
        if resource.kind == "Namespace":
            obj["status"] = {"phase": "Active"}
        if resource.kind == "Service" and not obj.get("spec", {}).get("clusterIP"):  # the apiserver allocates it
            obj.setdefault("spec", {})["clusterIP"] = f"10.96.{self.rv // 250 % 250}.{self.rv % 250 + 1}"
        if resource.kind == "Secret" and "stringData" in obj:
            import base64

            data = obj.setdefault("data", {})
            for k, v in obj.pop("stringData").items():
                data[k] = base64.b64encode(v.encode()).decode()
        if dry_run:
            return obj
        self.objects[key] = obj
        recorded = await self._record("ADDED", resource, obj)
        if resource.kind == "Namespace":  # what the ServiceAccount controller does for every new namespace
            from resources import RESOURCES

            accounts = next(r for r in RESOURCES if r.plural == "serviceaccounts")
            await self.create(accounts, name, {"metadata": {"name": "default"}})
        return recorded

    async def replace(self, resource: Resource, namespace: str | None, name: str, obj: dict,
                      subresource: str | None = None, dry_run: bool = False) -> dict:
        current = self.get(resource, namespace, name)
        sent_rv = obj.get("metadata", {}).get("resourceVersion")
        if sent_rv and sent_rv != current["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {resource.plural} "{name}": '
                                            "the object has been modified; please apply your changes to the latest version and try again")
        if subresource == "status":  # only the status changes, whatever else was sent
            new = {**current, "status": obj.get("status", {})}
            new["metadata"] = dict(current["metadata"])
        else:
            new = {**obj, "status": current.get("status", obj.get("status"))} if "status" in current else dict(obj)
            meta = new.setdefault("metadata", {})
            for kept in ("uid", "creationTimestamp", "generation", "namespace"):
                if kept in current["metadata"]:
                    meta[kept] = current["metadata"][kept]
            meta["name"] = name
            if _spec(new) != _spec(current):
                meta["generation"] = current["metadata"].get("generation", 1) + 1
        new["apiVersion"], new["kind"] = resource.group_version, resource.kind
        if dry_run:
            return new
        new["metadata"]["resourceVersion"] = self._next_rv()
        self.objects[self._key(resource, namespace, name)] = new
        return await self._record("MODIFIED", resource, new)

    async def patch(self, resource: Resource, namespace: str | None, name: str, content_type: str, patch,
                    subresource: str | None = None, dry_run: bool = False) -> dict:
        patcher = PATCHERS.get(content_type.split(";")[0].strip())
        if patcher is None:
            raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format: {content_type}")
        try:
            current = self.get(resource, namespace, name)
        except ApiError:
            if content_type.startswith("application/apply-patch"):
                return await self.create(resource, namespace, patch, dry_run)
            raise
        new = patcher(current, patch)
        new.setdefault("metadata", {})["resourceVersion"] = current["metadata"]["resourceVersion"]
        return await self.replace(resource, namespace, name, new, subresource, dry_run)

    async def delete(self, resource: Resource, namespace: str | None, name: str) -> dict:
        obj = self.get(resource, namespace, name)
        del self.objects[self._key(resource, namespace, name)]
        obj["metadata"]["resourceVersion"] = self._next_rv()
        if resource.kind == "Namespace":  # its objects go with it
            for key in [k for k in self.objects if k[2] == name]:
                del self.objects[key]
        return await self._record("DELETED", resource, obj)


def _spec(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}
