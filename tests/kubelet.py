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
- for any other Deployment, "starts" its pod by pulling its image (manifest and every blob,
  digests checked) with the pod's imagePullSecrets, trusting the CA files the node was given
  with `trust()` (the runbook's "trust the cert on every node"), then reports it Ready; a
  failed pull is reported as the deployment controller would (Progressing=False, the reason).
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import ssl
import threading
import time
from pathlib import Path

import httpx
from kubernetes import client, config
from pydantic import SecretStr

from crflow.chart import COMMAND
from crflow.localpod import LocalPod
from servers import free_port


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
        self.serial = 0  # pods started so far: each gets a directory of its own
        self.trusted: dict[str, Path] = {}  # registry host:port -> CA file the node trusts for it
        self.pulled: list[tuple[str, str]] = []  # (image, user) of each successful pull
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

    def trust(self, server: str, ca_file: Path) -> None:
        self.trusted[server] = ca_file

    def _pull(self, deployment, spec: dict) -> None:
        """Start a non-registry pod: pull its image with its pull secrets, then report it."""
        from crflow.oci import Registry

        key = f"{deployment.metadata.uid}@{deployment.metadata.generation}"  # a Deployment made anew is new
        if key in self.pods:
            return
        self.pods[key] = {}
        image = spec["containers"][0]["image"]
        server, _, path = image.partition("/")
        repo, _, digest = path.partition("@")
        try:
            user = password = None
            for ref in spec.get("imagePullSecrets") or []:
                secret = self.core.read_namespaced_secret(ref["name"], deployment.metadata.namespace)
                auths = json.loads(base64.b64decode(secret.data[".dockerconfigjson"]))["auths"]
                if server in auths:
                    user, _, password = base64.b64decode(auths[server]["auth"]).decode().partition(":")
            if user is None:
                raise RuntimeError(f"no imagePullSecret holds a login for {server}")
            if server not in self.trusted:
                raise RuntimeError(f"x509: the node does not trust the CA of {server}")
            with Registry(f"https://{server}", self.trusted[server], user, password) as registry:
                registry.pull_image(repo, digest)
            self.pulled.append((image, user))
            self._report_ready(deployment)
        except Exception as err:
            self._report_stuck(deployment, "ErrImagePull", str(err))

    def _run(self, deployment) -> bool:
        """Run the Deployment's pod; True when it is ready (reported after its Services move)."""
        namespace, name = deployment.metadata.namespace, deployment.metadata.name
        template = self.api.sanitize_for_serialization(deployment.spec.template)
        spec = template["spec"]
        if spec["containers"][0].get("command") != [COMMAND]:  # the chart contract names the registry's entrypoint
            self._pull(deployment, spec)
            return False
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
            pod["pod"].apply(manifests, secrets, claims, ("127.0.0.1", pod["port"]))  # Secret files refreshed
            return self._ready(pod["port"])
        if self.failed.get(key, (None,))[0] == generation:
            return False  # CrashLoopBackOff: this template does not come up; the old pod keeps serving
        # A new pod: the first one, or a rolling update with maxUnavailable 0 (the old pod serves
        # until the new one is ready; then the Service switches over and the old one stops).
        self.serial += 1
        new = {"pod": LocalPod(self.work / f"{namespace}-{name}-{self.serial}"), "port": free_port(),
               "generation": generation}
        try:
            new["pod"].apply(manifests, secrets, claims, ("127.0.0.1", new["port"]))
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

    def stop(self) -> None:
        self.running = False
        self.thread.join(timeout=10)
        for forwarder in self.forwarders.values():
            forwarder.close()
        for pod in [*self.retired, *(p["pod"] for p in self.pods.values() if "pod" in p)]:
            pod.stop()
        self.api.close()
