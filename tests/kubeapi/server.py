"""An emulated Kubernetes API server for the tests: enough of the real one for the official
Python client, kubectl and helm (through pyhelm3) to work against it over loopback.

    python tests/kubeapi/server.py --port 6443 --kubeconfig /tmp/kubeconfig

EMULATED, and said so in every test that uses it: there is no scheduler, kubelet,
admission, RBAC, defaulting or garbage collection; objects are stored as sent plus the
metadata an apiserver sets. The test kubelet (tests/kubelet.py) plays the node.

Control endpoints for tests (not part of any Kubernetes API):
- POST /_emulator/faults {"method": "PUT", "path": "regex", "status": 500, "count": 3, "delay": 0}
  makes the next `count` matching requests fail (or stall `delay` seconds first);
- DELETE /_emulator/faults clears them; GET /_emulator/requests lists what was served.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from pathlib import Path

import yaml
from aiohttp import web
from yarl import URL

sys.path.insert(0, str(Path(__file__).resolve().parent))

import protobuf  # noqa: E402
import resources as res  # noqa: E402
from store import ApiError, Store  # noqa: E402

NAMESPACE_SUBRESOURCES = {"status", "finalize"}


def _json(data, status: int = 200) -> web.Response:
    return web.json_response(data, status=status)


class Emulator:
    def __init__(self, cronjob_api: str = "batch/v1"):
        self.store = Store()
        group, version = cronjob_api.split("/")
        self.resources = [*res.RESOURCES, res.Resource(group, version, "CronJob", "cronjobs", status=True,
                                                       short_names=("cj",))]
        self.faults: list[dict] = []
        self.requests: list[dict] = []

    # --- routing -------------------------------------------------------------------------
    def route(self, path: str) -> tuple[str, str, list[str]] | None:
        """(group, version, rest) for a resource path, or None for a discovery path."""
        parts = [p for p in path.split("/") if p]
        if parts[:2] == ["api", "v1"] and len(parts) > 2:
            return "", "v1", parts[2:]
        if parts[:1] == ["apis"] and len(parts) > 3:
            return parts[1], parts[2], parts[3:]
        return None

    def discovery(self, path: str):
        parts = [p for p in path.split("/") if p]
        if parts == ["api"]:
            return res.api_versions()
        if parts == ["api", "v1"]:
            return res.resource_list("v1", self.resources)
        if parts == ["apis"]:
            return res.group_list(self.resources)
        if len(parts) == 2 and parts[0] == "apis":
            versions = sorted({r.version for r in self.resources if r.group == parts[1]})
            return res.group(parts[1], versions) if versions else None
        if len(parts) == 3 and parts[0] == "apis":
            return res.resource_list(f"{parts[1]}/{parts[2]}", self.resources)
        if parts == ["version"]:
            return res.SERVER_VERSION
        if parts == ["openapi", "v3"]:
            return res.openapi_v3_index(self.resources)
        if parts[:2] == ["openapi", "v3"]:
            gv = "v1" if parts[2:] == ["api", "v1"] else "/".join(parts[3:])
            return res.openapi_v3_document(gv, self.resources)
        return None

    def target(self, group: str, version: str, rest: list[str]):
        """(resource, namespace, name, subresource) from the part after the group/version."""
        namespace = None
        if rest[0] == "namespaces" and len(rest) >= 3 and rest[2] not in NAMESPACE_SUBRESOURCES:
            namespace, rest = rest[1], rest[2:]
        resource = res.find(group, version, rest[0], self.resources)
        if resource is None:
            raise ApiError(404, "NotFound", f"the server could not find the requested resource ({rest[0]})")
        name = rest[1] if len(rest) > 1 else None
        subresource = rest[2] if len(rest) > 2 else None
        return resource, namespace, name, subresource

    # --- the handler ---------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.StreamResponse:
        user = ""
        if request.path.startswith("/as/"):  # the kubeconfig's server URL names who asks (see kubeconfig())
            _, _, user, rest = request.path.split("/", 3)
            request = request.clone(rel_url=URL.build(path=f"/{rest}", query_string=request.rel_url.raw_query_string,
                                                      encoded=True))
        path = request.path
        if path.startswith("/_emulator/"):
            return await self.control(request)
        fault = self.fault_for(request.method, path)
        if fault and fault.get("delay"):
            await asyncio.sleep(fault["delay"])
        try:
            if fault and fault.get("status"):
                raise ApiError(fault["status"], "InternalError" if fault["status"] >= 500 else "Conflict",
                               f"emulated fault on {request.method} {path}")
            response = await self.serve(request)
        except ApiError as err:
            response = _json(err.status(), err.code)
        except (ValueError, KeyError, yaml.YAMLError) as err:
            response = _json(ApiError(400, "BadRequest", f"cannot decode the request: {err}").status(), 400)
        self.requests.append({"method": request.method, "path": path, "query": request.query_string,
                              "status": response.status, "user": user})
        return response

    def fault_for(self, method: str, path: str) -> dict | None:
        for fault in self.faults:
            if fault["count"] > 0 and fault.get("method", method) == method and re.search(fault.get("path", ""), path):
                fault["count"] -= 1
                return fault
        return None

    async def control(self, request: web.Request) -> web.Response:
        if request.path == "/_emulator/faults" and request.method == "POST":
            self.faults.append({"count": 1, **(await request.json())})
            return _json({"faults": self.faults})
        if request.path == "/_emulator/faults" and request.method == "DELETE":
            self.faults.clear()
            return _json({"faults": []})
        if request.path == "/_emulator/requests":
            return _json(self.requests)
        return _json({}, 404)

    async def body(self, request: web.Request):
        raw = await request.read()
        content_type = request.headers.get("Content-Type", "application/json")
        if content_type.startswith("application/vnd.kubernetes.protobuf"):
            return protobuf.decode(raw)
        if "yaml" in content_type:
            return yaml.safe_load(raw)
        return json.loads(raw or b"{}")

    async def serve(self, request: web.Request) -> web.StreamResponse:
        path, method, query = request.path, request.method, request.query
        if path in ("/healthz", "/readyz", "/livez"):
            return web.Response(text="ok")
        routed = self.route(path)
        if routed is None:
            document = self.discovery(path) if method == "GET" else None
            if document is None:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            return _json(document)
        resource, namespace, name, subresource = self.target(*routed)
        if not resource.namespaced and resource.plural != "namespaces":
            namespace = None
        if resource.plural == "namespaces":
            namespace = None
        dry_run = "dryRun" in query
        store = self.store
        if method == "GET" and name is None and query.get("watch") in ("1", "true"):
            return await self.watch(request, resource, namespace)
        if method == "GET" and name is None:
            items = store.list(resource, namespace, query.get("labelSelector"), query.get("fieldSelector"))
            return _json({"kind": f"{resource.kind}List", "apiVersion": resource.group_version,
                          "metadata": {"resourceVersion": str(store.rv)}, "items": items})
        if method == "GET":
            return _json(store.get(resource, namespace, name))
        if method == "POST" and name is None:
            return _json(await store.create(resource, namespace, await self.body(request), dry_run), 201)
        if method == "PUT" and name:
            obj = await self.body(request)
            return _json(await store.replace(resource, namespace, name, obj, subresource, dry_run))
        if method == "PATCH" and name:
            content_type = request.headers.get("Content-Type", "")
            raw = await request.read()
            patch = yaml.safe_load(raw) if "yaml" in content_type else json.loads(raw)
            return _json(await store.patch(resource, namespace, name, content_type, patch, subresource, dry_run))
        if method == "DELETE" and name:
            obj = await store.delete(resource, namespace, name)
            return _json({"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {},
                          "details": {"name": name, "kind": resource.plural, "uid": obj["metadata"]["uid"]}})
        if method == "DELETE":
            for obj in store.list(resource, namespace, query.get("labelSelector"), query.get("fieldSelector")):
                await store.delete(resource, namespace or obj["metadata"].get("namespace"), obj["metadata"]["name"])
            return _json({"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}})
        raise ApiError(405, "MethodNotAllowed", f"{method} is not allowed on {path}")

    async def watch(self, request: web.Request, resource, namespace: str | None) -> web.StreamResponse:
        """A watch stream: JSON lines of {"type", "object"}, as the apiserver sends them."""
        query, store = request.query, self.store
        labels, fields = query.get("labelSelector"), query.get("fieldSelector")
        timeout = float(query.get("timeoutSeconds", 1800))
        response = web.StreamResponse(headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
        await response.prepare(request)

        async def send(event_type: str, obj: dict) -> None:
            await response.write(json.dumps({"type": event_type, "object": obj}).encode() + b"\n")

        def selected(obj: dict) -> bool:
            from store import matches_fields, matches_labels

            ns_ok = not namespace or obj["metadata"].get("namespace") == namespace
            return ns_ok and matches_labels(obj, labels) and matches_fields(obj, fields)

        since = query.get("resourceVersion", "")
        if query.get("sendInitialEvents") == "true" or since in ("", "0"):
            for obj in store.list(resource, namespace, labels, fields):
                await send("ADDED", obj)
            since = str(store.rv)
            if query.get("sendInitialEvents") == "true":
                await send("BOOKMARK", {"kind": resource.kind, "apiVersion": resource.group_version,
                                        "metadata": {"resourceVersion": since,
                                                     "annotations": {"k8s.io/initial-events-end": "true"}}})
        position = next((i for i, e in enumerate(store.events) if e.rv > int(since)), len(store.events))
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            while (remaining := deadline - asyncio.get_running_loop().time()) > 0:
                for event in store.events[position:]:
                    if event.resource.plural == resource.plural and event.resource.group == resource.group \
                            and selected(event.obj):
                        await send(event.type, event.obj)
                position = len(store.events)
                async with store.changed:
                    try:
                        await asyncio.wait_for(store.changed.wait(), timeout=min(remaining, 5))
                    except asyncio.TimeoutError:
                        pass
        except (ConnectionResetError, asyncio.CancelledError):
            return response
        return response


def kubeconfig(server: str, user: str = "crflow-worker") -> dict:
    """A kubeconfig for the emulated server. Its server URL's path (/as/USER) names who asks, in
    the request log: crflow runs as "crflow-worker" (checked against deployments/ RBAC), tests
    and the test kubelet as "test-admin". (Not a token: client-go sends none over plain HTTP.)"""
    return {
        "apiVersion": "v1", "kind": "Config", "current-context": "emulated",
        "clusters": [{"name": "emulated", "cluster": {"server": f"{server}/as/{user}"}}],
        "users": [{"name": "emulated", "user": {"token": "emulated-cluster-no-auth"}}],
        "contexts": [{"name": "emulated", "context": {"cluster": "emulated", "user": "emulated",
                                                      "namespace": "default"}}],
    }


async def _seed(emulator: Emulator) -> None:
    for name in ("default", "kube-system", "kube-public"):
        await emulator.store.create(res.RESOURCES[0], None, {"metadata": {"name": name}})


def main() -> None:
    parser = argparse.ArgumentParser(description="An emulated Kubernetes API server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--kubeconfig", type=Path, required=True)
    parser.add_argument("--cronjob-api", default="batch/v1", help="batch/v1beta1: a cluster older than 1.21")
    args = parser.parse_args()

    emulator = Emulator(args.cronjob_api)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", emulator.handle)
    app.on_startup.append(lambda _: _seed(emulator))
    args.kubeconfig.write_text(yaml.safe_dump(kubeconfig(f"http://{args.host}:{args.port}")))
    args.kubeconfig.chmod(0o600)
    admin = args.kubeconfig.with_name("admin-kubeconfig")
    admin.write_text(yaml.safe_dump(kubeconfig(f"http://{args.host}:{args.port}", "test-admin")))
    admin.chmod(0o600)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None, shutdown_timeout=0.5)


if __name__ == "__main__":
    main()
