"""A real single-node Kubernetes 1.20 on this machine, for the tests: etcd, kube-apiserver
(Node,RBAC authorization, service-account tokens), kube-controller-manager, kube-scheduler,
containerd with a private root and socket, kubelet and kube-proxy. The Kubernetes binaries are
built from Debian's `kubernetes` source package by scripts/build_cluster.sh (cached outside the
checkout); etcd, containerd, runc and the CNI plugins are Debian's.

Nothing it starts sends a packet off this machine: the pods sit on a bridge of their own with
no masquerading and a FORWARD rule that drops anything leaving it for another interface; the
apiserver (which pods reach at the bridge's gateway) and the NodePorts are dropped on every
interface but loopback and the bridge; the service range is routed to the bridge, never to the
default route. Every sysctl a component changes is set back at teardown, and teardown removes
what it made: processes by pid, mounts, the bridge, the iptables rules and chains.

    cluster = Cluster.start(workdir)      # about 20-40 s
    cluster.kubeconfig                     # admin (system:masters)
    cluster.stop()

The suite shares one cluster among its pytest-xdist workers (`shared`): the first worker that
needs it starts `python tests/cluster.py serve DIR OWNER`, a supervisor that keeps it running
(restarting a component that dies, as systemd would on a node) until the session's controller
ends it with `shutdown`, or until the controller's process is gone. Tests hold it shared
(`using`); a fault test that freezes or kills a component holds it alone (`exclusive`).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import fcntl
import gzip
import hashlib
import io
import ipaddress
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from servers import free_port

VERSION = "v1.20.2"
BRIDGE = "crflowk8s0"
LOCAL_ONLY = "CRFLOW-K8S-LOCAL-ONLY"  # an iptables chain: loopback and the bridge pass, the rest is dropped
GATEWAY = "10.244.0.1"
POD_CIDR = "10.244.0.0/24"
SERVICE_CIDR = "10.96.0.0/24"
SERVICE_IP = "10.96.0.1"
NODE = "localhost"  # the apiserver reaches the kubelet at 127.0.0.1 by this name
PAUSE_IMAGE = "localhost/crflow-pause:3.2"
REGISTRY_IMAGE = "localhost/crflow-registry:2.8.2"
# The same image under a second tag: an upgrade that changes the image has somewhere to go.
REGISTRY_IMAGE_NEXT = "localhost/crflow-registry:2.8.2-next"
ROOT = Path(__file__).resolve().parent.parent
# The chart's `helm test` image (curl and sh), built here from Debian's curl and held by the
# node under the name the chart asks for, as an air-gapped node holds what it was given.
CURL_IMAGE = "docker.io/" + yaml.safe_load((ROOT / "helm_chart" / "values.yaml").read_text())["tests"]["image"]
SYSCTLS = ["net/ipv4/ip_forward", "net/ipv4/conf/all/route_localnet", "vm/overcommit_memory", "kernel/panic",
           "kernel/panic_on_oops", "net/bridge/bridge-nf-call-iptables"]
POD_LOGS = Path("/var/log/pods")


class Unavailable(Exception):
    """The cluster cannot run here (not root, binaries not built); the reason says which."""


def binaries() -> Path:
    """Where scripts/build_cluster.sh keeps the Kubernetes binaries (it builds them once)."""
    found = subprocess.run([str(ROOT / "scripts" / "build_cluster.sh")], capture_output=True, text=True,
                           timeout=3600, stdin=subprocess.DEVNULL)
    if found.returncode != 0:
        raise Unavailable(f"scripts/build_cluster.sh failed: {found.stderr.strip()[-500:]}")
    return Path(found.stdout.strip().splitlines()[-1])


# --- PKI ----------------------------------------------------------------------------------
def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject: str, key, issuer=None, issuer_key=None, ca=False, org=None, sans=(), client=False):
    name = x509.Name([*([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org)] if org else []),
                      x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer.subject if issuer else name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        usages = [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH] if client else [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if sans:
        entries = []
        for san in sans:
            try:
                entries.append(x509.IPAddress(ipaddress.ip_address(san)))
            except ValueError:
                entries.append(x509.DNSName(san))
        builder = builder.add_extension(x509.SubjectAlternativeName(entries), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _pem(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


# --- images -------------------------------------------------------------------------------
def _oci_archive(path: Path, name: str, files: dict[str, tuple[bytes, int]], config: dict,
                 hardlinks: dict[str, str] | None = None) -> Path:
    """An OCI image layout tarball of one layer holding `files` (path -> (content, mode); a
    content of None is a folder) and `hardlinks` (path -> the file it is another name of),
    named `name` for `ctr images import`."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for member, (content, mode) in sorted(files.items()):
            info = tarfile.TarInfo(member)
            info.mtime = 0
            if content is None:
                info.type, info.mode = tarfile.DIRTYPE, mode
                tar.addfile(info)
            else:
                info.size, info.mode = len(content), mode
                tar.addfile(info, io.BytesIO(content))
        for member, target in sorted((hardlinks or {}).items()):
            info = tarfile.TarInfo(member)
            info.type, info.linkname, info.mode, info.mtime = tarfile.LNKTYPE, target, 0o755, 0
            tar.addfile(info)
    raw = layer.getvalue()
    packed = gzip.compress(raw, mtime=0)
    blobs = {}

    def blob(data: bytes) -> dict:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"digest": digest, "size": len(data)}

    image_config = {"architecture": "amd64", "os": "linux", "config": config,
                    "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(raw).hexdigest()]}}
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           **blob(json.dumps(image_config).encode())},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **blob(packed)}]}
    index = {"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                                                **blob(json.dumps(manifest).encode()),
                                                "annotations": {"io.containerd.image.name": name,
                                                                "org.opencontainers.image.ref.name": name}}]}
    with tarfile.open(path, "w") as tar:
        for member, data in [("oci-layout", b'{"imageLayoutVersion": "1.0.0"}'), ("index.json",
                             json.dumps(index).encode()),
                             *((f"blobs/sha256/{d.split(':')[1]}", b) for d, b in blobs.items())]:
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def pause_image(workdir: Path, bin_dir: Path, name: str = PAUSE_IMAGE, nonce: bytes | None = None) -> Path:
    """The pause binary as an image; with a `nonce` file its layer is one no node has yet
    (containerd fetches only the blobs it lacks, so a pull test needs new content)."""
    files = {"pause": ((bin_dir / "pause").read_bytes(), 0o755), **({"nonce": (nonce, 0o644)} if nonce else {})}
    archive = workdir / (f"pause-{nonce.hex()}.tar" if nonce else "pause.tar")
    return _oci_archive(archive, name, files, {"Entrypoint": ["/pause"]})


def registry_image(workdir: Path) -> Path:
    """The chart's registry image, from Debian's packages: /bin/registry (docker-registry, which
    links libc only), busybox for the shell and the tools the chart's scripts and probes use,
    and a passwd entry for the chart's uid 1000."""
    busybox = _busybox(workdir)
    files: dict[str, tuple[bytes | None, int]] = {d: (None, 0o040755) for d in (
        "bin", "etc", "lib", "lib64", "lib/x86_64-linux-gnu", "tmp", "var", "var/lib", "var/lib/registry",
        "etc/docker", "etc/docker/registry")}
    files["tmp"] = (None, 0o041777)
    files["bin/registry"] = (Path(shutil.which("docker-registry")).read_bytes(), 0o755)
    files["bin/busybox"] = (busybox, 0o755)
    applets = subprocess.run([str(workdir / "busybox"), "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    # Hard links, not symbolic ones: the readiness probe execs `test` as a file on PATH.
    links = {f"bin/{applet}": "bin/busybox" for applet in applets if applet != "busybox"}
    for lib in ("/lib/x86_64-linux-gnu/libc.so.6", "/lib64/ld-linux-x86-64.so.2"):
        files[lib.lstrip("/")] = (Path(os.path.realpath(lib)).read_bytes(), 0o755)
    files["etc/passwd"] = (b"root:x:0:0:root:/root:/bin/sh\nregistry:x:1000:1000:registry:/var/lib/registry:"
                           b"/bin/sh\n", 0o644)
    files["etc/group"] = (b"root:x:0:\nregistry:x:1000:\n", 0o644)
    return _oci_archive(workdir / "registry.tar", REGISTRY_IMAGE, files,
                        {"Entrypoint": ["/bin/registry"], "Cmd": ["serve", "/etc/docker/registry/config.yml"],
                         "Env": ["PATH=/bin"], "User": "1000"}, links)


def curl_image(workdir: Path) -> Path:
    """The chart's test image: Debian's curl with the libraries it links (as ldd lists them),
    busybox for sh, and the CA bundle folder curl expects (empty: the test names its CA)."""
    busybox = _busybox(workdir)
    files: dict[str, tuple[bytes | None, int]] = {d: (None, 0o040755) for d in ("bin", "etc", "tmp")}
    files["tmp"] = (None, 0o041777)
    files["bin/curl"] = (Path("/usr/bin/curl").read_bytes(), 0o755)
    files["bin/busybox"] = (busybox, 0o755)
    libraries = subprocess.run(["ldd", "/usr/bin/curl"], capture_output=True, text=True, check=True,
                               timeout=30).stdout.split()
    for lib in (word for word in libraries if word.startswith("/")):
        parts = Path(lib).parts[1:]
        for depth in range(1, len(parts)):
            files.setdefault("/".join(parts[:depth]), (None, 0o040755))
        files["/".join(parts)] = (Path(os.path.realpath(lib)).read_bytes(), 0o755)
    files["etc/passwd"] = (b"root:x:0:0:root:/root:/bin/sh\nregistry:x:1000:1000::/tmp:/bin/sh\n", 0o644)
    return _oci_archive(workdir / "curl.tar", CURL_IMAGE, files, {"Env": ["PATH=/bin"], "User": "1000"},
                        {"bin/sh": "bin/busybox", "bin/printf": "bin/busybox"})


def _busybox(workdir: Path) -> bytes:
    """busybox-static's binary (scripts/build_cluster.sh installs the package): a shell and
    the tools, with no library to carry."""
    target = workdir / "busybox"
    if not target.exists():
        shutil.copy("/bin/busybox", target)
    return target.read_bytes()


# --- the cluster --------------------------------------------------------------------------
@dataclass
class Cluster:
    workdir: Path
    bin_dir: Path
    ports: dict[str, int] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    sysctls: dict[str, str] = field(default_factory=dict)
    iptables: list[list[str]] = field(default_factory=list)
    chains: list[str] = field(default_factory=list)
    pod_logs: set[str] = field(default_factory=set)  # /var/log/pods entries there before it (the kubelet's fixed place)
    started_in: float = 0.0
    commands: dict[str, tuple[list[str], dict]] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)  # an attached view: the supervisor's processes

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "admin.kubeconfig"

    @property
    def api(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    @property
    def containerd_socket(self) -> Path:
        return self.workdir / "containerd" / "run" / "containerd.sock"

    @property
    def certs_d(self) -> Path:
        """containerd's hosts folder (its registry config_path): what node trust writes."""
        return self.workdir / "containerd" / "certs.d"

    @classmethod
    def start(cls, workdir: Path) -> Cluster:
        if os.geteuid() != 0:
            raise Unavailable("a kubelet and containerd need root")
        cluster = cls(workdir, binaries())
        began = time.monotonic()
        try:
            cluster._start()
        except BaseException:
            cluster.stop()
            raise
        cluster.started_in = time.monotonic() - began
        return cluster

    # --- set-up -----------------------------------------------------------------------------
    def _start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o700)
        for name in ("etcd", "etcd_peer", "apiserver", "kubelet", "kubelet_healthz", "proxy_healthz", "proxy_metrics",
                     "cm", "scheduler"):
            self.ports[name] = free_port()
        self.pod_logs = set(os.listdir(POD_LOGS)) if POD_LOGS.is_dir() else set()
        for sysctl in SYSCTLS:
            path = Path("/proc/sys") / sysctl
            if path.exists():
                self.sysctls[sysctl] = path.read_text().strip()
        self._network()
        self._pki()
        self._etcd()
        self._apiserver()
        self._control_plane()
        self._containerd()
        self._kubelet()
        self._proxy()
        self._wait(self._node_ready, 120, "the node to be Ready")

    def _run(self, name: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "ab")
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, env={"PATH": os.environ["PATH"], **(env or {})})
        log.close()
        self.processes[name] = process
        self.commands[name] = (argv, env or {})
        return process

    def _wait(self, check, timeout: float, what: str) -> None:
        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    tail = (self.workdir / f"{name}.log").read_text(errors="replace")[-1500:]
                    raise RuntimeError(f"{name} exited ({process.returncode}) while waiting for {what}:\n{tail}")
            try:
                if check():
                    return
            except (OSError, httpx.HTTPError, KeyError, ValueError, subprocess.SubprocessError) as err:
                last = err  # not up yet
            time.sleep(0.3)
        raise RuntimeError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")

    def _rule(self, *rule: str) -> None:
        """An iptables rule, inserted, and deleted again at teardown."""
        subprocess.run(["iptables", "-I", *rule], check=True)
        self.iptables.append(list(rule))

    def _network(self) -> None:
        subprocess.run(["ip", "link", "add", BRIDGE, "type", "bridge"], check=True)
        subprocess.run(["ip", "addr", "add", f"{GATEWAY}/24", "dev", BRIDGE], check=True)
        subprocess.run(["ip", "link", "set", BRIDGE, "up"], check=True)
        # Service addresses not yet rewritten by kube-proxy go to the bridge, never the default route.
        subprocess.run(["ip", "route", "add", SERVICE_CIDR, "dev", BRIDGE], check=True)
        self._rule("FORWARD", "-s", POD_CIDR, "!", "-o", BRIDGE, "-j", "DROP")
        self._rule("FORWARD", "-d", POD_CIDR, "!", "-i", BRIDGE, "-j", "DROP")
        # The apiserver listens on every address (pods reach it at the gateway) and NodePorts
        # answer on every address: only loopback and the bridge may reach them.
        subprocess.run(["iptables", "-N", LOCAL_ONLY], check=True)
        self.chains.append(LOCAL_ONLY)
        for rule in (["-i", "lo", "-j", "RETURN"], ["-i", BRIDGE, "-j", "RETURN"], ["-j", "DROP"]):
            subprocess.run(["iptables", "-A", LOCAL_ONLY, *rule], check=True)
        self._rule("INPUT", "-p", "tcp", "--dport", str(self.ports["apiserver"]), "-j", LOCAL_ONLY)
        self._rule("INPUT", "-p", "tcp", "--dport", "30000:32767", "-j", LOCAL_ONLY)

    def _pki(self) -> None:
        pki = self.workdir / "pki"
        pki.mkdir(mode=0o700, exist_ok=True)
        ca_key = _key()
        ca = _cert("crflow-test-kubernetes-ca", ca_key, ca=True)
        self.ca_pem = _pem(ca)
        (pki / "ca.crt").write_bytes(self.ca_pem)

        def pair(name: str, subject: str, org=None, sans=(), client=False):
            key = _key()
            (pki / f"{name}.key").write_bytes(_pem_key(key))
            (pki / f"{name}.crt").write_bytes(_pem(_cert(subject, key, ca, ca_key, org=org, sans=sans, client=client)))

        pair("apiserver", "kube-apiserver", sans=("127.0.0.1", SERVICE_IP, GATEWAY, "localhost", "kubernetes",
                                                  "kubernetes.default", "kubernetes.default.svc"))
        pair("apiserver-kubelet", "kube-apiserver-kubelet-client", org="system:masters", client=True)
        pair("kubelet", NODE, sans=("127.0.0.1", "localhost"))
        pair("kubelet-client", f"system:node:{NODE}", org="system:nodes", client=True)
        pair("admin", "crflow-test-admin", org="system:masters", client=True)
        pair("controller-manager", "system:kube-controller-manager", client=True)
        pair("scheduler", "system:kube-scheduler", client=True)
        pair("proxy", "system:kube-proxy", client=True)
        sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        (pki / "sa.key").write_bytes(_pem_key(sa_key))
        (pki / "sa.pub").write_bytes(sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        for name in ("admin", "controller-manager", "scheduler", "proxy", "kubelet-client"):
            self._kubeconfig(name)

    def _kubeconfig(self, name: str) -> Path:
        pki = self.workdir / "pki"
        path = self.workdir / f"{name}.kubeconfig"
        config = {"apiVersion": "v1", "kind": "Config", "current-context": "crflow-test",
                  "clusters": [{"name": "crflow-test", "cluster": {
                      "server": f"https://127.0.0.1:{self.ports['apiserver']}",
                      "certificate-authority-data": base64.b64encode(self.ca_pem).decode()}}],
                  "users": [{"name": name, "user": {
                      "client-certificate-data": base64.b64encode((pki / f"{name}.crt").read_bytes()).decode(),
                      "client-key-data": base64.b64encode((pki / f"{name}.key").read_bytes()).decode()}}],
                  "contexts": [{"name": "crflow-test", "context": {"cluster": "crflow-test", "user": name}}]}
        path.write_text(yaml.safe_dump(config))
        os.chmod(path, 0o600)
        return path

    def _etcd(self) -> None:
        data = self.workdir / "etcd"
        data.mkdir(mode=0o700, exist_ok=True)
        client, peer = f"http://127.0.0.1:{self.ports['etcd']}", f"http://127.0.0.1:{self.ports['etcd_peer']}"
        self._run("etcd", ["etcd", "--data-dir", str(data), "--listen-client-urls", client, "--advertise-client-urls",
                           client, "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                           "--initial-cluster", f"default={peer}", "--listen-metrics-urls", "", "--log-level", "warn"])
        self._wait(lambda: httpx.get(f"{client}/health", timeout=2).json()["health"] == "true", 60, "etcd")

    def _apiserver(self) -> None:
        pki = self.workdir / "pki"
        self._run("apiserver", [
            str(self.bin_dir / "kube-apiserver"), f"--etcd-servers=http://127.0.0.1:{self.ports['etcd']}",
            f"--secure-port={self.ports['apiserver']}", "--insecure-port=0", "--bind-address=0.0.0.0",
            f"--advertise-address={GATEWAY}", f"--tls-cert-file={pki}/apiserver.crt",
            f"--tls-private-key-file={pki}/apiserver.key", f"--client-ca-file={pki}/ca.crt",
            f"--service-account-key-file={pki}/sa.pub", f"--service-account-signing-key-file={pki}/sa.key",
            "--service-account-issuer=https://kubernetes.default.svc", "--authorization-mode=Node,RBAC",
            f"--service-cluster-ip-range={SERVICE_CIDR}", f"--kubelet-client-certificate={pki}/apiserver-kubelet.crt",
            f"--kubelet-client-key={pki}/apiserver-kubelet.key", f"--kubelet-certificate-authority={pki}/ca.crt",
            "--kubelet-preferred-address-types=Hostname,InternalIP", "--allow-privileged=true",
            "--enable-admission-plugins=NodeRestriction", "--anonymous-auth=false", "--v=0"])
        self._wait(lambda: self._get("/readyz").status_code == 200, 120, "kube-apiserver")

    def _get(self, path: str) -> httpx.Response:
        pki = self.workdir / "pki"
        tls = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        tls.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        return httpx.get(f"{self.api}{path}", verify=tls, timeout=5)

    def _control_plane(self) -> None:
        pki = self.workdir / "pki"
        self._run("controller-manager", [
            str(self.bin_dir / "kube-controller-manager"), f"--kubeconfig={self.workdir}/controller-manager.kubeconfig",
            "--controllers=*,-nodeipam", "--leader-elect=false", "--use-service-account-credentials",
            f"--root-ca-file={pki}/ca.crt", f"--service-account-private-key-file={pki}/sa.key",
            f"--cluster-signing-cert-file={pki}/ca.crt", "--port=0", f"--secure-port={self.ports['cm']}",
            "--bind-address=127.0.0.1"])
        self._run("scheduler", [
            str(self.bin_dir / "kube-scheduler"), f"--kubeconfig={self.workdir}/scheduler.kubeconfig",
            "--leader-elect=false", "--port=0", f"--secure-port={self.ports['scheduler']}",
            "--bind-address=127.0.0.1"])

    def _containerd(self) -> None:
        base = self.workdir / "containerd"
        for sub in ("root", "run", "cni-conf", "cni-data", "certs.d", "runc"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        (base / "cni-conf" / "10-crflow.conflist").write_text(json.dumps({
            "cniVersion": "0.4.0", "name": "crflow-test", "plugins": [
                {"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False, "hairpinMode": True,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR, "gateway": GATEWAY}]],
                          "dataDir": str(base / "cni-data")}},
                {"type": "portmap", "capabilities": {"portMappings": True}}, {"type": "loopback"}]}))
        config = f"""version = 2
root = "{base / 'root'}"
state = "{base / 'run' / 'state'}"
[grpc]
  address = "{self.containerd_socket}"
[ttrpc]
  address = "{base / 'run' / 'containerd.sock.ttrpc'}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      Root = "{base / 'runc'}"
      SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{base / 'cni-conf'}"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{self.certs_d}"
"""
        (base / "config.toml").write_text(config)
        self._run("containerd", ["containerd", "--config", str(base / "config.toml")])
        self._wait(lambda: self.ctr("version").returncode == 0, 60, "containerd")
        images = self.workdir / "images"
        images.mkdir(exist_ok=True)
        for archive in (pause_image(images, self.bin_dir), registry_image(images), curl_image(images)):
            imported = self.ctr("images", "import", "--all-platforms", str(archive))
            if imported.returncode != 0:
                raise RuntimeError(f"ctr images import {archive.name}: {imported.stderr}")
        tagged = self.ctr("images", "tag", REGISTRY_IMAGE, REGISTRY_IMAGE_NEXT)
        if tagged.returncode != 0:
            raise RuntimeError(f"ctr images tag: {tagged.stderr}")

    def ctr(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["ctr", "-a", str(self.containerd_socket), "-n", "k8s.io", *args], capture_output=True,
                              text=True, timeout=120)

    def _kubelet(self) -> None:
        base = self.workdir / "kubelet"
        base.mkdir(exist_ok=True)
        pki = self.workdir / "pki"
        (base / "config.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration", "address": "127.0.0.1",
            "port": self.ports["kubelet"], "readOnlyPort": 0, "healthzPort": self.ports["kubelet_healthz"],
            "healthzBindAddress": "127.0.0.1", "authentication": {"anonymous": {"enabled": False}, "webhook": {
                "enabled": True}, "x509": {"clientCAFile": str(pki / "ca.crt")}},
            "authorization": {"mode": "Webhook"}, "cgroupDriver": "cgroupfs", "failSwapOn": False,
            "tlsCertFile": str(pki / "kubelet.crt"), "tlsPrivateKeyFile": str(pki / "kubelet.key"),
            "clusterDomain": "cluster.local", "resolvConf": "/etc/resolv.conf", "podCIDR": POD_CIDR,
            "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99, "serializeImagePulls": False,
            # Mounted Secrets and ConfigMaps are refreshed on a pod's sync: every 5 s, not the
            # default minute, so rotation tests wait seconds (the same code path, sooner).
            "syncFrequency": "5s"}))
        self._run("kubelet", [
            str(self.bin_dir / "kubelet"), "--container-runtime=remote",
            f"--container-runtime-endpoint=unix://{self.containerd_socket}", f"--hostname-override={NODE}",
            f"--root-dir={base / 'root'}", f"--cert-dir={base / 'pki'}",
            f"--kubeconfig={self.workdir}/kubelet-client.kubeconfig", f"--config={base / 'config.yaml'}",
            f"--node-ip={GATEWAY}"])  # a local address pods reach; the apiserver reaches the kubelet as localhost
        # The kubelet sets these once at start; they are the machine's, so they go back at once.
        self._wait(lambda: self._node_registered(), 120, "the node to register")
        self._restore_sysctls(("vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops"))

    def _node_registered(self) -> bool:
        return self._get(f"/api/v1/nodes/{NODE}").status_code == 200

    def _node_ready(self) -> bool:
        node = self._get(f"/api/v1/nodes/{NODE}").json()
        return any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"]["conditions"])

    def _proxy(self) -> None:
        config = self.workdir / "proxy.yaml"
        config.write_text(yaml.safe_dump({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration", "mode": "iptables",
            "clusterCIDR": POD_CIDR, "clientConnection": {"kubeconfig": str(self.workdir / "proxy.kubeconfig")},
            "healthzBindAddress": f"127.0.0.1:{self.ports['proxy_healthz']}",
            "metricsBindAddress": f"127.0.0.1:{self.ports['proxy_metrics']}", "conntrack": {"maxPerCore": 0},
            "hostnameOverride": NODE}))
        self._run("proxy", [str(self.bin_dir / "kube-proxy"), f"--config={config}"])

    # --- teardown ---------------------------------------------------------------------------
    def _restore_sysctls(self, which=None) -> None:
        for sysctl, value in self.sysctls.items():
            if which is None or sysctl in which:
                with contextlib.suppress(OSError):
                    (Path("/proc/sys") / sysctl).write_text(value)

    def stop(self) -> None:
        """Everything it made, gone: pods first (the kubelet tears their sandboxes down), then the
        processes by pid, the shims of this containerd, mounts, the bridge and the rules."""
        if "kubelet" in self.processes and self.processes["kubelet"].poll() is None:
            with contextlib.suppress(Exception):
                subprocess.run([str(self.bin_dir / "kubectl"), f"--kubeconfig={self.kubeconfig}", "delete", "pods",
                                "--all", "--all-namespaces", "--grace-period=1", "--timeout=60s"],
                               capture_output=True, timeout=90)
        for name in ("proxy", "kubelet", "scheduler", "controller-manager"):
            self._stop(name)
        if self.containerd_socket.exists():  # the shims of this containerd only
            for task in self.ctr("tasks", "list", "-q").stdout.split():
                self.ctr("tasks", "kill", "-s", "SIGKILL", task)
        self._kill_shims()
        self._stop("containerd")
        for name in ("apiserver", "etcd"):
            self._stop(name)
        self._clean_host()

    def _clean_host(self) -> None:
        """What the cluster changed on this machine, with its processes gone: mounts, rules and
        chains, the bridge and its links, sysctls, pod logs."""
        self._unmount()
        for rule in reversed(self.iptables):
            subprocess.run(["iptables", "-D", *rule], capture_output=True)
        self.iptables.clear()
        for chain in self.chains:
            subprocess.run(["iptables", "-F", chain], capture_output=True)
            subprocess.run(["iptables", "-X", chain], capture_output=True)
        self.chains.clear()
        subprocess.run([str(self.bin_dir / "kube-proxy"), "--cleanup"], capture_output=True, timeout=60) \
            if (self.bin_dir / "kube-proxy").exists() else None
        self._flush_chains()
        subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)
        for link in subprocess.run(["ip", "-o", "link", "show", "type", "veth"], capture_output=True,
                                   text=True).stdout.splitlines():
            name = link.split(":")[1].strip().split("@")[0]
            if "master " + BRIDGE in link:
                subprocess.run(["ip", "link", "del", name], capture_output=True)
        self._restore_sysctls()
        if POD_LOGS.is_dir():
            for entry in set(os.listdir(POD_LOGS)) - self.pod_logs:
                shutil.rmtree(POD_LOGS / entry, ignore_errors=True)

    def _stop(self, name: str) -> None:
        process = self.processes.get(name)
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def _kill_shims(self) -> None:
        marker = str(self.containerd_socket).encode()
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                with contextlib.suppress(OSError):
                    cmdline = (proc / "cmdline").read_bytes()
                    if b"containerd-shim" in cmdline and marker in cmdline:
                        os.kill(int(proc.name), signal.SIGKILL)

    def _unmount(self) -> None:
        prefix = str(self.workdir) + "/"
        mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
        for mount in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
            subprocess.run(["umount", "-l", mount], capture_output=True)

    def _flush_chains(self) -> None:
        """The KUBE-* and CNI-* chains kube-proxy and the CNI plugins left (they leave some)."""
        for table in ("filter", "nat", "mangle"):
            listing = subprocess.run(["iptables", "-t", table, "-S"], capture_output=True, text=True).stdout
            for line in listing.splitlines():
                parts = line.split()
                if parts[:1] == ["-A"] and any(p.startswith(("KUBE-", "CNI-")) for p in parts):
                    subprocess.run(["iptables", "-t", table, "-D", *parts[1:]], capture_output=True)
            for line in listing.splitlines():
                parts = line.split()
                if parts[:1] == ["-N"] and parts[1].startswith(("KUBE-", "CNI-")):
                    subprocess.run(["iptables", "-t", table, "-F", parts[1]], capture_output=True)
                    subprocess.run(["iptables", "-t", table, "-X", parts[1]], capture_output=True)


# --- one cluster for the whole suite ------------------------------------------------------
STATE = "cluster.json"  # what attached processes read: ports, pids, how long the start took


def _save(cluster: Cluster) -> None:
    state = {"workdir": str(cluster.workdir), "bin_dir": str(cluster.bin_dir), "ports": cluster.ports,
             "sysctls": cluster.sysctls, "started_in": cluster.started_in,
             "pids": {name: process.pid for name, process in cluster.processes.items()},
             # What a later session needs to undo, should this one be killed before its teardown:
             "supervisor": os.getpid(), "iptables": cluster.iptables, "chains": cluster.chains,
             "pod_logs": sorted(cluster.pod_logs)}
    temporary = cluster.workdir / f".{STATE}.tmp"
    temporary.write_text(json.dumps(state))
    temporary.replace(cluster.workdir / STATE)


def attach(workdir: Path) -> Cluster:
    """A view of the cluster the supervisor runs: everything but its processes' handles."""
    state = json.loads((workdir / STATE).read_text())
    return Cluster(workdir, Path(state["bin_dir"]), ports=state["ports"], sysctls=state["sysctls"],
                   started_in=state["started_in"], pids=state["pids"])


def _pid(cluster: Cluster, name: str) -> int:
    if name in cluster.processes:
        return cluster.processes[name].pid
    return json.loads((cluster.workdir / STATE).read_text())["pids"][name]  # it changes when one is restarted


def alive(cluster: Cluster, name: str) -> bool:
    try:
        return Path(f"/proc/{_pid(cluster, name)}/status").read_text().split("State:")[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def signal_component(cluster: Cluster, name: str, sig: int) -> None:
    """Send `sig` to one component (SIGSTOP freezes it, SIGKILL has the supervisor restart it)."""
    os.killpg(_pid(cluster, name), sig)


def _supervise(cluster: Cluster) -> None:
    """Restart a component that died, as systemd restarts a node's services (a fault test
    kills one): the kubelet's start-up sysctls are set back again after it."""
    for name, process in list(cluster.processes.items()):
        if process.poll() is None:
            continue
        argv, env = cluster.commands[name]
        cluster._run(name, argv, env)
        if name == "kubelet":
            time.sleep(2)  # it writes them within its first second
            cluster._restore_sysctls(("vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops"))
        _save(cluster)


def serve(workdir: Path, owner: int) -> None:
    """The supervisor: start the cluster, keep it up until SIGTERM or until `owner` is gone,
    then stop it. A start that fails leaves its reason in workdir/failed."""
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    try:
        cluster = Cluster.start(workdir)
    except (Unavailable, RuntimeError, OSError, subprocess.SubprocessError) as why:
        (workdir / "failed").write_text(f"{type(why).__name__}: {why}")
        return
    _save(cluster)
    try:
        while not stopping and Path(f"/proc/{owner}").exists():
            _supervise(cluster)
            time.sleep(0.5)
    finally:
        (workdir / STATE).unlink(missing_ok=True)
        cluster.stop()
        (workdir / "stopped").write_text("")


def reap_killed(parent: Path) -> list[Path]:
    """Undo the clusters of sessions killed before their teardown (SIGKILL, a machine's session
    stopped): their processes, mounts, rules and bridge go, and the sysctls they changed are set
    back to the values their state recorded. Only when none is alive: every cluster here uses the
    same bridge name. Returns the folders it removed."""
    dead = []
    for state_file in parent.glob("crflow-k8s-*/cluster/" + STATE):
        with contextlib.suppress(OSError, ValueError, KeyError):
            state = json.loads(state_file.read_text())
            if Path(f"/proc/{state['supervisor']}").exists():
                return []  # a live cluster: leave everything to it
            dead.append((state_file.parent.parent, state))
    for root, state in dead:
        cluster = Cluster(Path(state["workdir"]), Path(state["bin_dir"]), ports=state["ports"],
                          sysctls=state["sysctls"], iptables=state["iptables"], chains=state["chains"],
                          pod_logs=set(state["pod_logs"]))
        for pid in state["pids"].values():
            with contextlib.suppress(OSError):  # (gone; a pid now someone else's is left alone)
                cmdline = Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
                if state["workdir"] in cmdline or state["bin_dir"] in cmdline:
                    os.killpg(pid, signal.SIGKILL)
        cluster._kill_shims()
        cluster._clean_host()
        shutil.rmtree(root, ignore_errors=True)
    return [root for root, _ in dead]


def shared(root: Path, owner: int, timeout: float = 600) -> Cluster:
    """The suite's cluster under `root`: started by the first caller (under a lock), attached
    by the rest. Raises Unavailable with the reason when it cannot run here."""
    workdir = root / "cluster"
    with open(root / "start.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (workdir / "failed").exists():
            raise Unavailable((workdir / "failed").read_text())
        if not (workdir / STATE).exists():
            if os.geteuid() != 0:
                raise Unavailable("a kubelet and containerd need root")
            binaries()  # built (or found) here, where its failure is a one-line skip reason
            for reaped in reap_killed(root.parent):
                print(f"removed the test cluster of a killed session: {reaped}", file=sys.stderr)
            workdir.mkdir(mode=0o700, exist_ok=True)
            with open(root / "supervisor.log", "ab") as log:
                supervisor = subprocess.Popen([sys.executable, __file__, "serve", str(workdir), str(owner)],
                                              stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                              start_new_session=True, cwd=Path(__file__).parent)
            (root / "supervisor.pid").write_text(str(supervisor.pid))
            deadline = time.monotonic() + timeout
            while not (workdir / STATE).exists():
                if (workdir / "failed").exists():
                    raise Unavailable((workdir / "failed").read_text())
                if supervisor.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the cluster's supervisor ended or took over {timeout} s: "
                                       f"{(root / 'supervisor.log').read_text(errors='replace')[-2000:]}")
                time.sleep(0.3)
        return attach(workdir)


def shutdown(root: Path, timeout: float = 240) -> None:
    """Stop the suite's cluster, if one was started under `root`, and wait for its teardown."""
    pid_file = root / "supervisor.pid"
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text())
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and not (root / "cluster" / "stopped").exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the test cluster did not stop within {timeout} s; see {root}/supervisor.log")
        time.sleep(0.3)


@contextlib.contextmanager
def using(root: Path):
    """Hold the cluster shared for a test: many tests at once, none while a fault test runs.
    A writer waiting at the turnstile keeps new readers out, so it is never starved."""
    with open(root / "turnstile.lock", "a") as turnstile, open(root / "use.lock", "a") as use:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        fcntl.flock(use, fcntl.LOCK_SH)
        fcntl.flock(turnstile, fcntl.LOCK_UN)
        yield


@contextlib.contextmanager
def exclusive(root: Path):
    """Hold the cluster alone: a test that freezes or kills a component."""
    with open(root / "turnstile.lock", "a") as turnstile, open(root / "use.lock", "a") as use:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        fcntl.flock(use, fcntl.LOCK_EX)
        fcntl.flock(turnstile, fcntl.LOCK_UN)
        yield


def kubectl(cluster: Cluster, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    """The built kubectl, as the cluster's admin."""
    result = subprocess.run([str(cluster.bin_dir / "kubectl"), f"--kubeconfig={cluster.kubeconfig}", *args],
                            capture_output=True, text=True, timeout=120, input=input,
                            stdin=None if input is not None else subprocess.DEVNULL)
    if check and result.returncode:
        raise AssertionError(f"kubectl {' '.join(args)}: {result.stderr}")
    return result


def ctr_pull(cluster: Cluster, ref: str, user: str, password: str) -> subprocess.CompletedProcess:
    """The node's containerd pulls `ref` itself (ctr, with the node's certs.d as its hosts
    folder, as the CRI plugin reads it): what the node trusts, and nothing else."""
    return subprocess.run(["ctr", "-a", str(cluster.containerd_socket), "-n", "k8s.io", "images", "pull",
                           "--hosts-dir", str(cluster.certs_d), "--user", f"{user}:{password}", ref],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(Path(sys.argv[2]), int(sys.argv[3]))
