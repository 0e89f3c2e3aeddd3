"""The test kubelet: plays node, controllers and load balancer for the emulated cluster.

EMULATED, and every test that uses it says so. It polls the emulated API and:
- runs each Deployment's pod through crflow's local runner (crflow/localpod.py), with the
  ConfigMaps, Secrets and claims read back from the API, so a real registry process serves
  exactly what the cluster holds;
- replaces the pod when the Deployment's spec changes as a rolling update with
  maxUnavailable 0 does: a new process on a new port, the Service switched to it once it is
  ready, the old one stopped after in-flight requests had time to finish; a new pod that
  never gets ready is reported (Progressing=False) and the old one keeps serving;
- refreshes Secret volume files in place after `secret_refresh_delay` seconds, atomically,
  as the kubelet does for volumes not mounted with subPath;
- reports the Deployment Ready (status fields as the deployment controller writes them) once
  the pod answers its readiness probe, and marks claims Bound;
- forwards each Service address (loadBalancerIP, else 127.0.0.1, and the Service port) to
  the pod, through a loopback TCP forwarder whose backend can be switched;
- runs each DaemonSet's pod on every emulated node (two by default), as a Pod object with its
  status, and reports the DaemonSet's status as its controller would:
  - first the image: one from a registry host is pulled by the node's real containerd
    (tests/containerd.py) with the pod's imagePullSecrets; its certs.d directory is the only
    way a node learns the registry's CA. The chart's own registry image counts as present.
  - then the container: a `/bin/sh` script (the chart's node trust) runs on this machine with
    each volume mapped to a directory: a hostPath to the node's directory, a Secret or
    ConfigMap to files refreshed in place, an emptyDir to an empty one; mount paths in its
    command and environment are rewritten to those directories (the emulation of a mount
    namespace). Its exec readiness probe runs the same way. Any other container is only
    pulled: it is reported created, not run.
- runs each Job's pod once, on the first node, the same way (the image's /bin/registry is this
  machine's docker-registry, its /dev/termination-log a file, its PATH starts with this
  virtualenv's bin, as crflow's flow image has its own), and reports its exit code and
  termination message on the pod and the Job's succeeded/failed count;
- runs each Pod created on its own (a `helm test` hook) once on the first node, the same way,
  and reports its phase. An image with no registry host (Docker Hub's, such as curl's) counts
  as present on every node, since nothing can be pulled from the Internet here: its `/bin/sh`
  command runs with this machine's tools.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import httpx
from containerd import Containerd
from kubernetes import client, config
from pydantic import SecretStr

from crflow.chart import COMMAND
from crflow.localpod import LocalPod, registry_binary
from servers import BIN, free_port

NODES = ("node-1", "node-2")


def registry_host(image: str) -> str | None:
    """The registry an image is pulled from, or None for Docker Hub's (the chart's own
    `registry:` image, curl's), which the emulated nodes count as present."""
    first = image.split("/")[0]
    return first if "/" in image and ("." in first or ":" in first or first == "localhost") else None


class Node:
    """An emulated node: a directory standing for its root filesystem, and a real containerd
    whose registry config is the runtime's certs.d directory in it."""

    CERTS_D = "/etc/containerd/certs.d"

    def __init__(self, name: str, root: Path):
        self.name, self.root = name, root
        self.certs_d = self.host_path(self.CERTS_D)
        self.certs_d.mkdir(parents=True, exist_ok=True)
        self.runtime = Containerd(root.parent / f"{name}-containerd", self.certs_d)

    def host_path(self, path: str) -> Path:
        return self.root / path.lstrip("/")


class Forwarder:
    """A TCP forwarder on `listen` to a backend port that can change while it runs."""

    def __init__(self, listen: tuple[str, int], backend: int):
        self.listen, self.backend = listen, backend
        self.server = socket.create_server(listen)  # SO_REUSEADDR: a moved Service may come back here
        self.running = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while self.running:
            try:
                downstream, _ = self.server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.backend), timeout=5)
            except OSError:
                downstream.close()
                continue
            for source, sink in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(1 << 16):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.running = False
        try:  # wakes the thread blocked in accept(); a plain close() would keep the port bound until then
            self.server.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.server.close()


class Kubelet:
    def __init__(self, kubeconfig: Path, work: Path, secret_refresh_delay: float = 0.0, interval: float = 0.3):
        self.api = config.new_client_from_config(str(kubeconfig))
        self.core, self.apps = client.CoreV1Api(self.api), client.AppsV1Api(self.api)
        self.work, self.delay, self.interval = work, secret_refresh_delay, interval
        self.pods: dict[str, dict] = {}  # "ns/name" -> {"pod": LocalPod, "port": int, "spec": digest}
        self.forwarders: dict[str, Forwarder] = {}
        self.shown: dict[str, tuple[str, dict]] = {}  # "ns/name" -> (digest, content) the node has now
        self.first_seen: dict[tuple[str, str], float] = {}  # ("ns/name", digest) -> when the API first had it
        self.errors: list[str] = []
        self.failed: dict[str, tuple[int, str]] = {}  # "ns/name" -> (generation, why) of a pod that never got ready
        self.retired: list[LocalPod] = []  # pods replaced by a rolling update
        self.serial = 0  # registry pods started so far: each gets a directory of its own
        self.ds_serial = 0  # DaemonSet pods started so far
        self.pulled: list[tuple[str, str, str]] = []  # (node, image, user) of each successful pull
        self.nodes: list[Node] = []
        try:
            for name in NODES:
                self.nodes.append(Node(name, work / "nodes" / name))
        except Exception:  # containerd.Unavailable: the fixture skips, saying why
            for node in self.nodes:
                node.runtime.stop()
            self.api.close()
            raise
        self.ds_pods: dict[tuple[str, str], dict] = {}  # ("ns/name", node) -> the pod running there
        self.job_pods: dict[tuple[str, str], dict] = {}  # ("ns/name", uid) -> the Job's pod
        self.job_history: list[dict] = []  # every Job pod started, also after its Job is gone
        self.bare_pods: dict[tuple[str, str], dict] = {}  # ("ns/name", uid) -> a Pod made on its own (helm test)
        self.running = True
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    # --- the loop ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while self.running:
            try:
                self.sync()
            except Exception as err:  # a test bed keeps going, and keeps what went wrong
                self.errors.append(f"{type(err).__name__}: {err}")
            time.sleep(self.interval)

    def sync(self) -> None:
        for pvc in self.core.list_persistent_volume_claim_for_all_namespaces().items:
            if (pvc.status and pvc.status.phase) != "Bound" and pvc.spec.volume_name:
                self.core.patch_namespaced_persistent_volume_claim_status(
                    pvc.metadata.name, pvc.metadata.namespace, {"status": {"phase": "Bound"}})
        ready = [d for d in self.apps.list_deployment_for_all_namespaces().items if self._run(d)]
        self._daemonsets()
        self._jobs()
        self._bare_pods()
        for service in self.core.list_service_for_all_namespaces().items:
            self._forward(service)
        for deployment in ready:  # only once its Services reach the new pod, as endpoints follow readiness
            self._report_ready(deployment)

    def _secret(self, namespace: str, name: str, fresh: bool = False) -> dict[str, SecretStr]:
        """A Secret's content as the node shows it: in a running pod's volume a change appears
        `delay` seconds after it was seen; a new pod (`fresh`) mounts what the API holds now."""
        secret = self.core.read_namespaced_secret(name, namespace)
        digest = hashlib.sha256(json.dumps(secret.data, sort_keys=True).encode()).hexdigest()
        key, now = f"{namespace}/{name}", time.monotonic()
        shown = self.shown.get(key)
        if fresh or shown is None or (digest != shown[0] and
                                      now - self.first_seen.setdefault((key, digest), now) >= self.delay):
            data = {k: SecretStr(base64.b64decode(v).decode()) for k, v in (secret.data or {}).items()}
            self.shown[key] = shown = (digest, data)
        return shown[1]

    def _run(self, deployment) -> bool:
        """Run the Deployment's pod; True when it is ready (reported after its Services move)."""
        namespace, name = deployment.metadata.namespace, deployment.metadata.name
        template = self.api.sanitize_for_serialization(deployment.spec.template)
        spec = template["spec"]
        if spec["containers"][0].get("command") != [COMMAND]:  # the chart contract names the registry's entrypoint
            return False  # the emulated cluster runs no other Deployment
        key, generation = f"{namespace}/{name}", deployment.metadata.generation
        pod = self.pods.get(key)
        running = pod is not None and pod["generation"] == generation  # else a new pod, mounting Secrets afresh
        manifests = [{"kind": "Deployment", "metadata": {"name": name}, "spec": {"template": template}}]
        secrets, claims = {}, {}
        for volume in spec.get("volumes") or []:
            if "configMap" in volume:
                cm = self.core.read_namespaced_config_map(volume["configMap"]["name"], namespace)
                manifests.append({"kind": "ConfigMap", "metadata": {"name": cm.metadata.name}, "data": cm.data or {}})
            elif "secret" in volume:
                secrets[volume["secret"]["secretName"]] = self._secret(namespace, volume["secret"]["secretName"],
                                                                       fresh=not running)
            elif "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                pvc = self.core.read_namespaced_persistent_volume_claim(claim, namespace)
                pv = self.core.read_persistent_volume(pvc.spec.volume_name)
                claims[claim] = Path(pv.spec.host_path.path)
        for container in spec["containers"]:
            for var in container.get("env") or []:
                ref = (var.get("valueFrom") or {}).get("secretKeyRef")
                if ref and ref["name"] not in secrets:
                    secrets[ref["name"]] = self._secret(namespace, ref["name"], fresh=not running)

        if running:
            pod["pod"].apply(manifests, secrets, claims, ("127.0.0.1", pod["port"]), pod["debug"])  # Secret files refreshed
            return self._ready(pod["port"])
        if self.failed.get(key, (None,))[0] == generation:
            return False  # CrashLoopBackOff: this template does not come up; the old pod keeps serving
        # A new pod: the first one, or a rolling update with maxUnavailable 0 (the old pod serves
        # until the new one is ready; then the Service switches over and the old one stops).
        self.serial += 1
        new = {"pod": LocalPod(self.work / f"{namespace}-{name}-{self.serial}"), "port": free_port(),
               "debug": free_port(), "generation": generation}
        try:
            new["pod"].apply(manifests, secrets, claims, ("127.0.0.1", new["port"]), new["debug"])
            deadline = time.monotonic() + 20
            while not self._ready(new["port"]):
                if time.monotonic() > deadline:
                    raise RuntimeError("the readiness probe GET / did not answer 200 within 20 s")
                time.sleep(0.2)
        except Exception as err:
            new["pod"].stop()
            self.failed[key] = (generation, f"pod {namespace}/{name}-{self.serial} not ready: {err}")
            self._report_stuck(deployment, "ProgressDeadlineExceeded", self.failed[key][1])
            return False
        self.pods[key] = new
        if pod is not None:
            for forwarder in self.forwarders.values():
                if forwarder.backend == pod["port"]:
                    forwarder.backend = new["port"]
            self.retired.append(pod["pod"])
            threading.Timer(2.0, pod["pod"].stop).start()  # in-flight requests finish on the old pod
        return True

    @staticmethod
    def _ready(port: int) -> bool:
        """The readiness probe: GET / over HTTPS, unverified, as a kubelet's HTTPS probe is."""
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        try:
            return httpx.get(f"https://127.0.0.1:{port}/", verify=context, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def _report_stuck(self, deployment, reason: str, message: str) -> None:
        """What the deployment controller reports for a pod that does not come up."""
        self.apps.patch_namespaced_deployment_status(deployment.metadata.name, deployment.metadata.namespace, {
            "status": {"observedGeneration": deployment.metadata.generation, "conditions": [
                {"type": "Progressing", "status": "False", "reason": reason, "message": message[:300]}]}})

    def _report_ready(self, deployment) -> None:
        replicas = deployment.spec.replicas or 1
        status = deployment.status
        generation = deployment.metadata.generation
        if status and status.observed_generation == generation and status.ready_replicas == replicas:
            return
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.apps.patch_namespaced_deployment_status(deployment.metadata.name, deployment.metadata.namespace, {
            "status": {
                "observedGeneration": generation, "replicas": replicas, "updatedReplicas": replicas,
                "readyReplicas": replicas, "availableReplicas": replicas,
                "conditions": [
                    {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable",
                     "lastUpdateTime": now, "lastTransitionTime": now},
                    {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable",
                     "lastUpdateTime": now, "lastTransitionTime": now},
                ],
            }})

    def _forward(self, service) -> None:
        key = f"{service.metadata.namespace}/{service.metadata.name}"
        selector = service.spec.selector or {}
        backend = next((p for k, p in self.pods.items() if "port" in p and k.split("/")[0] == service.metadata.namespace
                        and self._selects(selector, k)), None)
        if backend is None:
            return
        listen = (service.spec.load_balancer_ip or "127.0.0.1", service.spec.ports[0].port)
        if service.spec.type == "LoadBalancer":  # as MetalLB reports the address it gave
            ingress = (service.status and service.status.load_balancer and service.status.load_balancer.ingress) or []
            if [entry.ip for entry in ingress] != [listen[0]]:
                self.core.patch_namespaced_service_status(service.metadata.name, service.metadata.namespace, {
                    "status": {"loadBalancer": {"ingress": [{"ip": listen[0]}]}}})
        forwarder = self.forwarders.get(key)
        if forwarder is not None and forwarder.listen == listen:
            forwarder.backend = backend["port"]
            return
        if forwarder is not None:  # the Service's address or port changed: the load balancer moves
            forwarder.close()
        self.forwarders[key] = Forwarder(listen, backend["port"])

    def _selects(self, selector: dict, pod_key: str) -> bool:
        namespace, name = pod_key.split("/")
        deployment = self.apps.read_namespaced_deployment(name, namespace)
        labels = deployment.spec.template.metadata.labels or {}
        return selector.items() <= labels.items()

    # --- DaemonSets -----------------------------------------------------------------------------
    def _daemonsets(self) -> None:
        seen = set()
        for ds in self.apps.list_daemon_set_for_all_namespaces().items:
            key = f"{ds.metadata.namespace}/{ds.metadata.name}"
            ready = updated = 0
            for node in self.nodes:
                seen.add((key, node.name))
                pod = self.ds_pods.get((key, node.name))
                if pod is None or pod["generation"] != ds.metadata.generation:
                    if pod is not None:
                        self._stop_ds_pod(pod)
                    pod = self.ds_pods[(key, node.name)] = self._start_ds_pod(ds, node)
                self._refresh(pod)
                updated += 1
                if not pod["ready"] and pod["process"] is not None and self._probe(pod):
                    pod["ready"] = True
                    self._pod_status(pod)
                ready += pod["ready"]
            status = ds.status
            if not (status and status.observed_generation == ds.metadata.generation and status.number_ready == ready):
                self.apps.patch_namespaced_daemon_set_status(ds.metadata.name, ds.metadata.namespace, {"status": {
                    "observedGeneration": ds.metadata.generation, "desiredNumberScheduled": len(self.nodes),
                    "currentNumberScheduled": len(self.nodes), "updatedNumberScheduled": updated,
                    "numberReady": ready, "numberAvailable": ready, "numberMisscheduled": 0,
                    "numberUnavailable": len(self.nodes) - ready}})
        for gone in [k for k in self.ds_pods if k not in seen]:  # the DaemonSet was deleted: its pods go
            self._stop_ds_pod(self.ds_pods.pop(gone))

    # --- Jobs ---------------------------------------------------------------------------------
    def _jobs(self) -> None:
        """Each Job's pod runs once on the first node; its exit and termination message are
        reported as the kubelet and the Job controller would."""
        batch = client.BatchV1Api(self.api)
        jobs = batch.list_job_for_all_namespaces().items
        for job in jobs:
            key = (f"{job.metadata.namespace}/{job.metadata.name}", job.metadata.uid)
            pod = self.job_pods.get(key)
            if pod is None:
                pod = self.job_pods[key] = self._start_ds_pod(job, self.nodes[0])
                self.job_history.append(pod)
            code = self._finished(pod)
            if code is not None:
                batch.patch_namespaced_job_status(job.metadata.name, job.metadata.namespace, {"status": {
                    "succeeded": 1 if code == 0 else 0, "failed": 0 if code == 0 else 1}})
        for gone in [k for k in self.job_pods if k[1] not in {j.metadata.uid for j in jobs}]:
            self._stop_ds_pod(self.job_pods.pop(gone))

    def _finished(self, pod: dict) -> int | None:
        """A run-once pod whose process just ended: its exit code and termination message
        reported as the kubelet would (phase Succeeded or Failed); None until then, and after."""
        if pod.get("done") or pod["process"] is None or pod["process"].poll() is None:
            return None
        code, message = pod["process"].returncode, pod["dir"] / "termination-log"
        pod["done"], pod["ready"] = True, False
        pod["state"] = {"terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                                       "message": message.read_text()[:4096] if message.exists() else ""}}
        self._get(lambda: self._pod_status(pod, phase="Succeeded" if code == 0 else "Failed"))  # 404: deleted meanwhile
        return code

    # --- Pods on their own (helm test hooks) ------------------------------------------------
    def _bare_pods(self) -> None:
        """Each Pod no controller of ours made runs once on the first node; its phase follows its exit."""
        pods = self.core.list_pod_for_all_namespaces().items
        for found in pods:
            key = (f"{found.metadata.namespace}/{found.metadata.name}", found.metadata.uid)
            if found.spec.node_name or key in self.bare_pods:
                continue
            spec = self.api.sanitize_for_serialization(found.spec)
            self.ds_serial += 1
            pod = self.bare_pods[key] = self._pod_record(found.metadata.name, found.metadata.namespace, self.nodes[0],
                                                          spec, found.metadata.labels or {}, None)
            self._start(pod)
        for pod in self.bare_pods.values():
            self._finished(pod)
        alive = {(f"{p.metadata.namespace}/{p.metadata.name}", p.metadata.uid) for p in pods}
        for gone in [k for k in self.bare_pods if k not in alive]:
            self._stop_ds_pod(self.bare_pods.pop(gone))

    def _pod_record(self, name: str, namespace: str, node: Node, spec: dict, labels: dict, generation) -> dict:
        pod = {"name": name, "namespace": namespace, "node": node, "labels": labels, "generation": generation,
               "spec": spec, "process": None, "ready": False, "state": {},
               "dir": self.work / f"{namespace}-{name}-{node.name}-{self.ds_serial}"}
        pod["dir"].mkdir(parents=True)
        return pod

    def _start_ds_pod(self, ds, node: Node) -> dict:
        namespace = ds.metadata.namespace
        template = self.api.sanitize_for_serialization(ds.spec.template)
        spec = template["spec"]
        self.ds_serial += 1
        labels = (template.get("metadata") or {}).get("labels") or {}
        pod = self._pod_record(f"{ds.metadata.name}-{node.name}", namespace, node, spec, labels, ds.metadata.generation)
        core = self.core
        if self._get(lambda: core.read_namespaced_pod(pod["name"], namespace)) is not None:
            core.delete_namespaced_pod(pod["name"], namespace, _preload_content=False)
        core.create_namespaced_pod(namespace, {
            "metadata": {"name": pod["name"], "labels": labels}, "spec": {**spec, "nodeName": node.name}})
        return self._start(pod)

    def _start(self, pod: dict) -> dict:
        """Pull the pod's image on its node, then run its container (a `/bin/sh` command) here."""
        namespace, node, spec = pod["namespace"], pod["node"], pod["spec"]
        container = spec["containers"][0]
        image = container["image"]
        if registry_host(image) is not None:
            user, password = self._login(namespace, spec, image.split("/")[0])
            why = node.runtime.pull(image, user, password)
            if why is not None:
                pod["state"] = {"waiting": {"reason": "ErrImagePull", "message": why}}
                self._pod_status(pod)
                return pod
            self.pulled.append((node.name, image, user))
        pod["image_id"] = image
        if (container.get("command") or [""])[0] != "/bin/sh":
            pod["state"] = {"running": {"startedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}
            pod["ready"] = True  # pulled and created; the emulated node does not run foreign images
            self._pod_status(pod)
            return pod
        pod["mounts"] = self._mount(pod, container, fresh=True)
        # The image's files this machine has: the registry binary, and the termination-message file.
        pod["mounts"].update({COMMAND: Path(registry_binary()), "/dev/termination-log": pod["dir"] / "termination-log"})
        pod["log"] = (pod["dir"] / "log").open("wb")
        # The image's PATH: crflow's flow image (deployments/Dockerfile) has its venv first; here, this one.
        env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        for var in container.get("env") or []:
            ref = (var.get("valueFrom") or {}).get("secretKeyRef")
            env[var["name"]] = (self._secret(namespace, ref["name"], fresh=True)[ref["key"]].get_secret_value() if ref
                                else self._mapped(pod, var.get("value", "")))
        pod["process"] = subprocess.Popen([self._mapped(pod, arg) for arg in container["command"] + container.get("args", [])],
                                          env=env, stdout=pod["log"], stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        pod["state"] = {"running": {"startedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}
        self._pod_status(pod)
        return pod

    def _login(self, namespace: str, spec: dict, server: str) -> tuple[str | None, str | None]:
        """The login the pod's imagePullSecrets hold for `server`, as the kubelet hands it to the runtime."""
        for ref in spec.get("imagePullSecrets") or []:
            secret = self.core.read_namespaced_secret(ref["name"], namespace)
            auths = json.loads(base64.b64decode(secret.data[".dockerconfigjson"]))["auths"]
            if server in auths:
                user, _, password = base64.b64decode(auths[server]["auth"]).decode().partition(":")
                return user, password
        return None, None

    def _mount(self, pod: dict, container: dict, fresh: bool) -> dict[str, Path]:
        """mountPath -> the directory standing for it; Secret and ConfigMap files (re)written
        atomically where their content changed."""
        volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
        mounts = {}
        for mount in container.get("volumeMounts") or []:
            volume, path = volumes[mount["name"]], pod["dir"] / "volumes" / mount["name"]
            if "hostPath" in volume:
                path = pod["node"].host_path(volume["hostPath"]["path"])
                path.mkdir(parents=True, exist_ok=True)  # DirectoryOrCreate
            elif "secret" in volume:
                data = self._secret(pod["namespace"], volume["secret"]["secretName"], fresh=fresh)
                self._files(path, volume["secret"].get("items"), {k: v.get_secret_value() for k, v in data.items()})
            elif "configMap" in volume:
                cm = self.core.read_namespaced_config_map(volume["configMap"]["name"], pod["namespace"])
                self._files(path, volume["configMap"].get("items"), cm.data or {})
            else:
                path.mkdir(parents=True, exist_ok=True)  # emptyDir
            mounts[mount["mountPath"]] = path
        return mounts

    @staticmethod
    def _files(path: Path, items: list | None, data: dict[str, str]) -> None:
        path.mkdir(parents=True, exist_ok=True)
        for key, name in ((i["key"], i["path"]) for i in items) if items else ((k, k) for k in data):
            target = path / name
            if key in data and (not target.exists() or target.read_text() != data[key]):
                aside = path / f".{name}.new"
                aside.write_text(data[key])
                aside.replace(target)

    def _refresh(self, pod: dict) -> None:
        if pod["process"] is not None:
            self._mount(pod, pod["spec"]["containers"][0], fresh=False)

    @staticmethod
    def _mapped(pod: dict, value: str) -> str:
        for mount_path in sorted(pod.get("mounts") or {}, key=len, reverse=True):
            if value == mount_path or value.startswith(mount_path.rstrip("/") + "/"):
                return str(pod["mounts"][mount_path]) + value[len(mount_path.rstrip("/")):]
        return value

    def _probe(self, pod: dict) -> bool:
        if pod["process"].poll() is not None:
            return False
        probe = (pod["spec"]["containers"][0].get("readinessProbe") or {}).get("exec")
        if probe is None:
            return True
        return subprocess.run([self._mapped(pod, a) for a in probe["command"]], capture_output=True).returncode == 0

    def _pod_status(self, pod: dict, phase: str | None = None) -> None:
        container = pod["spec"]["containers"][0]
        status = {"name": container["name"], "image": container["image"], "imageID": pod.get("image_id", ""),
                  "ready": pod["ready"], "restartCount": 0, "state": pod["state"]}
        self.core.patch_namespaced_pod_status(pod["name"], pod["namespace"], {"status": {
            "phase": phase or ("Running" if "running" in pod["state"] else "Pending"), "containerStatuses": [status]}})

    def _stop_ds_pod(self, pod: dict) -> None:
        process = pod["process"]
        if process is not None and process.poll() is None:
            process.terminate()
            process.wait(timeout=10)
        if "log" in pod:
            pod["log"].close()
        self._get(lambda: self.core.delete_namespaced_pod(pod["name"], pod["namespace"], _preload_content=False))

    def pod_log(self, namespace: str, daemonset: str, node: str) -> str:
        pod = self.ds_pods.get((f"{namespace}/{daemonset}", node))
        return (pod["dir"] / "log").read_text() if pod and "log" in pod else ""

    @staticmethod
    def _get(call):
        try:
            return call()
        except client.ApiException as err:
            if err.status == 404:
                return None
            raise

    def stop(self) -> None:
        self.running = False
        self.thread.join(timeout=10)
        for forwarder in self.forwarders.values():
            forwarder.close()
        for pod in [*self.retired, *(p["pod"] for p in self.pods.values() if "pod" in p)]:
            pod.stop()
        try:
            for pod in [*self.ds_pods.values(), *self.job_pods.values(), *self.bare_pods.values()]:
                self._stop_ds_pod(pod)
        finally:  # whatever the API says, no process outlives the test
            for pod in [*self.ds_pods.values(), *self.job_pods.values(), *self.bare_pods.values()]:
                if pod["process"] is not None and pod["process"].poll() is None:
                    pod["process"].kill()
            for node in self.nodes:
                node.runtime.stop()
            self.api.close()
