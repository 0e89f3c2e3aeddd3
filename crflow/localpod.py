"""How does the local target run the registry? As the pod our chart describes, played by a
local process of the distribution registry binary (Debian's `docker-registry`). This is the
local target's counterpart of the Kubernetes API and kubelet: a client, with no Prefect in it.

The runner plays kubelet for the Deployment's pod spec:
- each volume becomes a host directory under `<pod_dir>/volumes/` (ConfigMap and Secret
  items written atomically, Secret files 0600), or the host directory a claim is bound to;
- the container's filesystem view is emulated by translation: every string in args, env
  values and the YAML config passed in args that starts with a mountPath is rewritten to
  that volume's host directory;
- the environment is the container's own (`env`, `valueFrom.secretKeyRef`), not the caller's;
- the Service address is where the process listens (REGISTRY_HTTP_ADDR), as a port-forward;
  its debug server (the `debug` port: liveness, metrics) listens on 127.0.0.1 only, as it
  also serves pprof;
- the container's probes are asked as the kubelet asks them (`probe`), by `crflow status`;
- the security context, where a process can: when crflow runs as root, the registry runs as
  the pod's runAsUser/runAsGroup with no capabilities and no_new_privs (RunAs below). As a
  kubelet does, ConfigMap and Secret volumes are root's files the pod's group may read,
  mounted read-only; only its claims and emptyDirs are the registry's own, and writable.
  So the registry (or whoever takes it over) can change nothing crflow writes.

As on Kubernetes, a change to the pod spec (including its checksum annotations) or to
resolved env restarts the process; a change to mounted Secret content only refreshes the
files, which the registry re-reads (htpasswd) without a restart.

    pod = LocalPod(StateDir(state_dir).pod)
    pod.apply(manifests, secrets, claims={"registry-data": data_dir}, listen=("127.0.0.1", 5000), debug_port=5001)
    pod.probe("readiness")                       # True: the registry and its storage answer
    pod.stop()
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import SecretStr

from crflow.chart import COMMAND, CONTAINER, SecretData, is_read_only, rendered_deployment
from crflow.config import environment
from crflow.errors import CrflowError
from crflow.files import ensure_dir, opened_dir, own_tree, write_atomic
from crflow.outcomes import Launch, PodApplied

DEBUG_HOST = "127.0.0.1"
BINARY_HINT = "install it with: apt-get install docker-registry (Debian/Ubuntu), or set CRFLOW_REGISTRY_BINARY"


def registry_binary() -> str:
    chosen = environment().registry_binary
    binary = str(chosen) if chosen else shutil.which("docker-registry")
    if not binary or not os.access(binary, os.X_OK):
        raise CrflowError(f"the registry binary docker-registry was not found: {BINARY_HINT}")
    return binary


def _find(manifests: list[dict], kind: str, name: str | None = None) -> dict:
    for obj in manifests:
        if obj.get("kind") == kind and (name is None or obj["metadata"]["name"] == name):
            return obj
    raise CrflowError(f"the rendered chart has no {kind}{' ' + name if name else ''}")


def ensure_port_free(host: str, port: int, wait: float = 0) -> None:
    """The port is free (waiting up to `wait` seconds for a stopped process to let go of it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    deadline = time.monotonic() + wait
    while True:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
                return
            except OSError as err:
                if err.errno != errno.EADDRINUSE:
                    raise CrflowError(f"cannot listen on {host}:{port}: {err.strerror}") from None
        if time.monotonic() >= deadline:
            raise CrflowError(
                f"port {port} on {host} is in use by another process; stop it or choose another registry.port")
        time.sleep(0.02)  # a bind attempt is cheap; a restart waits on this


# Where a registry that runs as the pod's user finds its files: in a mount namespace of its
# own, a small tmpfs here with the volumes directory (read-only) and each claim and emptyDir
# (read-write) bound into it. The host's way to them, through a 0700 state_dir, stays closed
# to that user.
JAIL = Path("/run/crflow-registry")
_JAIL_SCRIPT = """set -e
jail=$1; shift
umask 022
mount -t tmpfs -o mode=0755,size=64k crflow-registry "$jail"
while [ "$1" != -- ]; do
  mkdir -p "$jail/$2"; mount --bind "$1" "$jail/$2"
  if [ "$3" = ro ]; then mount -o remount,bind,ro "$jail/$2"; fi
  shift 3
done
shift
umask 077
exec "$@"
"""


@dataclass(frozen=True)
class RunAs:
    """The user the pod's security context names, which the registry runs as when crflow is
    root (a user running crflow runs it as themselves)."""

    uid: int
    gid: int

    @classmethod
    def of(cls, template: dict, container: dict) -> RunAs | None:
        if os.geteuid() != 0:
            return None
        pod, own = template["spec"].get("securityContext") or {}, container.get("securityContext") or {}
        uid = own.get("runAsUser", pod.get("runAsUser"))
        if not uid:  # unset or 0: the pod itself would run as root
            return None
        return cls(int(uid), int(own.get("runAsGroup", pod.get("runAsGroup", uid))))

    @property
    def owner(self) -> tuple[int, int]:
        return self.uid, self.gid

    @property
    def reader(self) -> tuple[int, int]:
        """Who owns the files crflow writes for the pod: root, with the pod's group to read them."""
        return 0, self.gid

    def argv(self, command: list[str], binds: dict[Path, Path], writable: set[Path], port: int) -> list[str]:
        """`command` in a mount namespace where `binds` (host -> path under JAIL) are mounted,
        read-only but for `writable`, as the user, with no capabilities but the one a port
        below 1024 needs."""
        JAIL.mkdir(mode=0o755, exist_ok=True)
        caps = ["--inh-caps", "-all"]
        if port < 1024:
            caps = ["--inh-caps", "-all,+net_bind_service", "--ambient-caps", "+net_bind_service"]
        mounts = [str(part) for host, inside in binds.items()
                  for part in (host, inside.relative_to(JAIL), "rw" if host in writable else "ro")]
        return ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", _JAIL_SCRIPT, "crflow-registry",
                str(JAIL), *mounts, "--", "setpriv", "--reuid", str(self.uid), "--regid", str(self.gid),
                "--clear-groups", "--no-new-privs", *caps, *command]


@dataclass
class Mounts:
    """Container mountPath -> host directory, and the translation of container paths: to the
    host directory, or where the process sees it (`views`: host directory -> its path in the
    process's mount namespace)."""

    table: dict[str, Path]
    views: dict[Path, Path] = field(default_factory=dict)

    def translate(self, value: str, seen: bool = True) -> str:
        if ":" in value and not value.startswith(":"):  # a PATH-like list, as in SSL_CERT_DIR
            return ":".join(self.translate(part, seen) for part in value.split(":"))
        for mount_path in sorted(self.table, key=len, reverse=True):
            if value == mount_path or value.startswith(mount_path.rstrip("/") + "/"):
                return str(self.view(self.table[mount_path]) if seen else self.table[mount_path]) + \
                    value[len(mount_path.rstrip("/")) :]
        return value

    def view(self, host: Path) -> Path:
        for base, inside in self.views.items():
            if host == base or base in host.parents:
                return inside / host.relative_to(base)
        return host

    def translate_tree(self, node):
        if isinstance(node, dict):
            return {k: self.translate_tree(v) for k, v in node.items()}
        if isinstance(node, list):
            return [self.translate_tree(v) for v in node]
        return self.translate(node) if isinstance(node, str) else node


class LocalPod:
    """One registry pod run as a local process, with its state under `pod_dir`."""

    def __init__(self, pod_dir: Path, deployment: str | None = None):
        self.dir, self.deployment = pod_dir, deployment  # which Deployment (None: the registry's, not a mirror's)
        self.pidfile = pod_dir / "registry.pid"
        self.specfile = pod_dir / "spec.sha256"
        self.manifestfile = pod_dir / "manifests.json"  # the rendered chart the process runs, as a release's manifest
        self.logfile = pod_dir / "registry.log"
        self.portsfile = pod_dir / "ports.json"  # container port name -> where the process serves it
        self.launchfile = pod_dir / "launch.json"  # how the running process was started
        self.writablefile = pod_dir / "writable.json"  # the writable pod, kept while a gc's window is open

    def _deployment(self, manifests: list[dict]) -> dict:
        """The Deployment this pod runs, of the rendered chart's."""
        return rendered_deployment(manifests, self.deployment)

    # --- process state -------------------------------------------------------------------
    def pid(self) -> int | None:
        """The running registry's pid, or None (a stale pidfile counts as not running)."""
        try:
            pid = int(self.pidfile.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        except (FileNotFoundError, ValueError):
            return None
        return pid if b"serve" in cmdline and state != "Z" else None

    def stop(self, timeout: float = 15) -> bool:
        """Stop the registry (SIGTERM to its process group, then SIGKILL); return whether one was running."""
        pid = self.pid()
        if pid is None:
            self.pidfile.unlink(missing_ok=True)
            return False
        os.killpg(pid, signal.SIGTERM)  # it leads its own session (start_new_session)
        deadline = time.monotonic() + timeout
        while self.pid() is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.pid() is not None:
            os.killpg(pid, signal.SIGKILL)
        self.pidfile.unlink(missing_ok=True)
        return True

    def manifests(self) -> list[dict]:
        """The rendered chart last applied ([] if none), as `helm get manifest` shows a release."""
        try:
            return json.loads(self.manifestfile.read_text())
        except FileNotFoundError:
            return []

    def running_pod(self) -> dict:
        """{"template": the pod template, "configMaps": name -> data} of the running registry."""
        if self.pid() is None:
            raise CrflowError(f"the local registry is not running (no process for {self.dir}); run crflow install")
        manifests = self.manifests()
        configs = {cm["metadata"]["name"]: cm.get("data", {}) for cm in manifests if cm.get("kind") == "ConfigMap"}
        return {"template": self._deployment(manifests)["spec"]["template"], "configMaps": configs}

    def log_tail(self, since: int = 0, lines: int = 3) -> str:
        """What the registry logged from byte `since` on: its error lines if any, else the last lines."""
        try:
            with open(self.logfile, "rb") as log:
                log.seek(since)
                logged = log.read().decode(errors="replace").strip().splitlines()
        except FileNotFoundError:
            return ""
        panics = [line for line in logged if line.startswith("panic: ")]  # a Go panic's cause, not its stack
        errors = [line for line in logged if "error" in line.lower()]
        return " | ".join(panics[:1] or (errors or logged)[-lines:])

    # --- probes ----------------------------------------------------------------------------
    def probe(self, kind: str, timeout: float = 5) -> bool:
        """The registry container's `kind` probe (liveness, readiness, startup) asked as the
        kubelet asks an httpGet probe: True when it answers 200-399. HTTPS is not verified,
        as the kubelet does not verify it."""
        import httpx

        if self.pid() is None:
            return False
        url = self._probe_url(kind)
        try:
            return 200 <= httpx.get(url, verify=False, timeout=timeout).status_code < 400
        except httpx.HTTPError:
            return False

    def failing_checks(self, timeout: float = 5) -> str:
        """What the registry's own health checks report failing (its storage driver, say), from
        the debug server's /debug/health; "" when none or when it cannot be asked."""
        import httpx

        try:
            ports = json.loads(self.portsfile.read_text())
            answer = httpx.get(f"http://{DEBUG_HOST}:{ports['debug']}/debug/health", timeout=timeout)
            return "; ".join(f"{name}: {why}" for name, why in answer.json().items())
        except (OSError, ValueError, KeyError, httpx.HTTPError):
            return ""

    def _probe_url(self, kind: str) -> str:
        (container,) = [c for c in self._deployment(self.manifests())["spec"]["template"]["spec"]["containers"]
                        if c["name"] == CONTAINER]
        get = container[f"{kind}Probe"]["httpGet"]
        ports = json.loads(self.portsfile.read_text())
        host = DEBUG_HOST if get["port"] == "debug" else ports["host"]
        return f"{get.get('scheme', 'HTTP').lower()}://{host}:{ports[get['port']]}{get['path']}"

    # --- volumes ---------------------------------------------------------------------------
    def _volume(self, volume: dict, manifests: list[dict], secrets: SecretData, claims: dict[str, Path],
                run_as: RunAs | None) -> Path:
        name = volume["name"]
        if "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]["claimName"]
            if claim not in claims:
                raise CrflowError(f"volume {name}: claim {claim} is bound to no local directory")
            return ensure_dir(claims[claim])
        if "emptyDir" in volume:  # the registry's to write: apart from the read-only volumes
            return ensure_dir(self.dir / "empty" / name)
        if "configMap" in volume:
            source = _find(manifests, "ConfigMap", volume["configMap"]["name"])["data"]
            files = {k: v.encode() for k, v in source.items()}
        elif "secret" in volume:
            secret_name = volume["secret"]["secretName"]
            if secret_name not in secrets:
                raise CrflowError(f"volume {name}: Secret {secret_name} does not exist")
            files = {k: v.get_secret_value().encode() for k, v in secrets[secret_name].items()}
        else:
            raise CrflowError(f"volume {name}: only configMap, secret, emptyDir and PVC volumes run locally")
        # Readable by the registry's group as each file lands: a file it cannot read for a
        # moment would be read no more (the registry re-reads htpasswd only when its mtime changes).
        host = self.dir / "volumes" / name
        self._write_items(host, volume, files, run_as)
        return host

    def _write_items(self, host: Path, volume: dict, files: dict[str, bytes],
                     run_as: RunAs | None) -> dict[str, bytes]:
        """Write a ConfigMap/Secret volume's files, each atomically; return what they held before."""
        items = volume.get("configMap", volume.get("secret")).get("items") or [{"key": k, "path": k} for k in files]
        secret = "secret" in volume
        self._shared_dir(host, run_as)  # in the volumes folder _prepare made
        before = {}
        for item in items:
            if item["key"] not in files:
                raise CrflowError(f"volume {volume['name']}: key {item['key']} is missing from its source")
            path = host / item["path"]
            if path.exists():
                before[item["key"]] = path.read_bytes()
            write_atomic(path, files[item["key"]], *self._file_mode(secret, run_as))
        return before

    @staticmethod
    def _file_mode(secret: bool, run_as: RunAs | None) -> tuple[int, tuple[int, int] | None]:
        """(mode, owner) of a file crflow writes for the pod: root's, which the pod's group reads."""
        if run_as is None:
            return (0o600 if secret else 0o644), None
        return (0o640 if secret else 0o644), run_as.reader

    @staticmethod
    def _shared_dir(folder: Path, run_as: RunAs | None) -> None:
        """A folder of the pod's files: root's, which the pod's group may enter."""
        with opened_dir(folder, make=0o700) as fd:
            if run_as is not None:
                os.fchown(fd, *run_as.reader)
                os.fchmod(fd, 0o750)

    def refresh_secret(self, name: str, data: dict[str, SecretStr]) -> dict[str, SecretStr]:
        """Replace the files of the running pod's Secret volumes for Secret `name`, as the kubelet
        refreshes them: each file atomically, no restart. Returns the previous content."""
        files = {k: v.get_secret_value().encode() for k, v in data.items()}
        template = self.running_pod()["template"]
        volumes = [v for v in template["spec"].get("volumes") or [] if (v.get("secret") or {}).get("secretName") == name]
        if not volumes:
            raise CrflowError(f"the local registry mounts no Secret {name}")
        (container,) = [c for c in template["spec"]["containers"] if c["name"] == CONTAINER]
        run_as = RunAs.of(template, container)
        before = {}
        for volume in volumes:
            before.update(self._write_items(self.dir / "volumes" / volume["name"], volume, files, run_as))
        return {k: SecretStr(v.decode()) for k, v in before.items()}

    # --- the container ---------------------------------------------------------------------
    @staticmethod
    def _env(container: dict, secrets: SecretData, mounts: Mounts) -> dict[str, str]:
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
        for var in container.get("env") or []:
            if "value" in var:
                env[var["name"]] = mounts.translate(str(var["value"]))
                continue
            ref = var["valueFrom"].get("secretKeyRef")
            if ref is None:
                raise CrflowError(f"env {var['name']}: only value and secretKeyRef run locally")
            try:
                env[var["name"]] = secrets[ref["name"]][ref["key"]].get_secret_value()
            except KeyError:
                raise CrflowError(f"env {var['name']}: Secret {ref['name']} has no key {ref['key']}") from None
        return env

    def _command(self, container: dict, mounts: Mounts, run_as: RunAs | None,
                 args: list[str] | None = None) -> list[str]:
        command = [*(container.get("command") or [COMMAND]), *(container.get("args") if args is None else args)]
        if command[0] != COMMAND:
            raise CrflowError(f"the container runs {command[0]}, not the registry ({COMMAND})")
        argv = [registry_binary()]
        for arg in command[1:]:
            host_arg = mounts.translate(arg, seen=False)
            if host_arg != arg and host_arg.endswith((".yml", ".yaml")):
                # The config, as the container would read it: its paths translated too. It
                # sits with the volumes, where the process can read it.
                config = mounts.translate_tree(yaml.safe_load(Path(host_arg).read_text()))
                host_file = self.dir / "volumes" / Path(arg).name
                write_atomic(host_file, yaml.safe_dump(config).encode(), *self._file_mode(True, run_as))
                argv.append(str(mounts.view(host_file)))
            else:
                argv.append(mounts.translate(arg))
        return argv

    def _wait_listening(self, process: subprocess.Popen, host: str, port: int, log_start: int,
                        timeout: float = 20) -> None:
        """The new process accepts connections; or it exited, and its log says why."""
        deadline = time.monotonic() + timeout
        while process.poll() is None and time.monotonic() < deadline:
            try:
                socket.create_connection((host, port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise CrflowError(f"the registry did not start listening on {host}:{port}: {self.log_tail(log_start)}")

    def _prepare(self, manifests: list[dict], secrets: SecretData, claims: dict[str, Path], port: int,
                 args: list[str] | None = None) -> tuple[dict, list[str], dict[str, str], RunAs | None]:
        """The pod's volumes written, and the process that plays its container: (template,
        argv, env, user). `args` replace the container's (container paths, translated)."""
        template = self._deployment(manifests)["spec"]["template"]
        (container,) = [c for c in template["spec"]["containers"] if c["name"] == CONTAINER]
        run_as = RunAs.of(template, container)
        self._shared_dir(self.dir / "volumes", run_as)  # bound into the jail even when only the config is there
        host_dirs = {v["name"]: self._volume(v, manifests, secrets, claims, run_as)
                     for v in template["spec"].get("volumes") or []}
        mounts = Mounts({m["mountPath"]: host_dirs[m["name"]] for m in container.get("volumeMounts") or []})
        own_kinds = {v["name"] for v in template["spec"].get("volumes") or []
                     if "emptyDir" in v or "persistentVolumeClaim" in v}  # ConfigMaps and Secrets: never
        writable = {host_dirs[m["name"]] for m in container.get("volumeMounts") or []
                    if m["name"] in own_kinds and not m.get("readOnly")}
        if run_as is not None:
            mounts.views = {self.dir / "volumes": JAIL / "volumes", **{
                path: JAIL / "claims" / claim for claim, path in claims.items() if path in host_dirs.values()}, **{
                host: JAIL / "empty" / host.name for host in host_dirs.values() if host.parent == self.dir / "empty"}}
        env = self._env(container, secrets, mounts)
        argv = self._command(container, mounts, run_as, args)
        if run_as is not None:
            for host in writable:  # the registry's own, as fsGroup makes a volume the pod's
                own_tree(host, run_as.owner, only_if_top_differs=host in claims.values())
            argv = run_as.argv(argv, mounts.views, writable, port)
        return template, argv, env, run_as

    def run_once(self, manifests: list[dict], secrets: SecretData, claims: dict[str, Path], args: list[str],
                 timeout: float) -> subprocess.CompletedProcess:
        """The registry binary run once with `args` in the pod's volumes, environment and user,
        as a Job with the Deployment's pod spec would (`garbage-collect CONFIG`)."""
        _, argv, env, run_as = self._prepare(manifests, secrets, claims, 0, args)
        return subprocess.run(argv, env=env, cwd=self.dir if run_as is None else "/", stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)

    def apply(self, manifests: list[dict], secrets: SecretData, claims: dict[str, Path], listen: tuple[str, int],
              debug_port: int) -> PodApplied:
        """Make the running process match the rendered pod; return what that did. Going read-only (gc's window),
        the writable pod is kept aside first: a crflow killed in the window leaves it to come
        back to (`restore_writable`)."""
        if read_only(manifests) and not read_only(self.manifests()) and self.pid() is not None \
                and self.launchfile.exists():  # (a registry an earlier version started has none: not kept)
            self._keep_writable()
        template, argv, env, run_as = self._prepare(manifests, secrets, claims, listen[1])
        # The registry reads env values as YAML: an IPv6 "[::1]:5000" would be a list, so quote it.
        env["REGISTRY_HTTP_ADDR"] = f"{listen[0]}:{listen[1]}" if ":" not in listen[0] else f'"[{listen[0]}]:{listen[1]}"'
        env["REGISTRY_HTTP_DEBUG_ADDR"] = f"{DEBUG_HOST}:{debug_port}"
        probe_host = "127.0.0.1" if listen[0] in ("0.0.0.0", "::") else listen[0]
        write_atomic(self.portsfile, json.dumps(
            {"host": probe_host if ":" not in probe_host else f"[{probe_host}]", "registry": listen[1],
             "debug": debug_port}).encode(), 0o644)
        spec = json.dumps([template, argv, env], sort_keys=True).encode()
        digest = hashlib.sha256(spec).hexdigest()

        write_atomic(self.manifestfile, json.dumps(manifests).encode(), 0o644)
        running = self.pid()
        if running is not None and self.specfile.exists() and self.specfile.read_text() == digest:
            outcome = PodApplied(Launch.UNCHANGED)
        else:
            outcome = self._launch({"argv": argv, "env": env, "cwd": str(self.dir) if run_as is None else "/",
                                    "digest": digest, "listen": list(listen), "probe": probe_host,
                                    "debug": debug_port})
        if not read_only(manifests):
            self.writablefile.unlink(missing_ok=True)
        return outcome

    def _launch(self, launch: dict) -> PodApplied:
        """Start the process `launch` describes (argv, env, cwd, digest; where it listens, is
        probed and serves debug) in place of the one running."""
        running = self.pid()
        stopped = time.monotonic()
        if running is not None:
            self.stop()
        ensure_port_free(*launch["listen"], wait=10 if running is not None else 0)
        ensure_port_free(DEBUG_HOST, launch["debug"], wait=10 if running is not None else 0)
        # The process writes its own pid before it becomes the registry: a crflow killed right
        # after starting it leaves no registry that no pidfile names.
        pid_first = ["/bin/sh", "-c", 'umask 022; echo $$ > "$0.new" && mv -f "$0.new" "$0" && umask 077 && exec "$@"',
                     str(self.pidfile), *launch["argv"]]
        with open(self.logfile, "ab") as log:
            log_start = log.tell()
            process = subprocess.Popen(
                pid_first, env=launch["env"], cwd=launch["cwd"], stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # outlives the crflow process that started it
                umask=0o077,  # blobs and uploads readable by the registry's user only
            )
        write_atomic(self.pidfile, str(process.pid).encode(), 0o644)
        write_atomic(self.specfile, launch["digest"].encode(), 0o644)
        # What restarts it as it is (its env holds the Secrets' values, as the pod's volumes do: 0600).
        write_atomic(self.launchfile, json.dumps(launch).encode(), 0o600)
        self._wait_listening(process, launch["probe"], launch["listen"][1], log_start)
        if running is None:
            return PodApplied(Launch.STARTED)
        return PodApplied(Launch.RESTARTED, time.monotonic() - stopped)

    # --- gc's read-only window -------------------------------------------------------------
    def _config_files(self, manifests: list[dict]) -> list[Path]:
        """The files a change of ConfigMap rewrites: its volumes' files, and the translated config."""
        template = self._deployment(manifests)["spec"]["template"]
        names = [v["name"] for v in template["spec"].get("volumes") or [] if "configMap" in v]
        volumes = self.dir / "volumes"
        return sorted([p for name in names for p in (volumes / name).glob("*") if p.is_file()] +
                      [p for p in volumes.glob("*") if p.is_file()])

    def _keep_writable(self) -> None:
        """The writable pod, as it runs now, kept aside before it goes read-only."""
        manifests, files = self.manifests(), {}
        for path in self._config_files(manifests):
            info = path.lstat()
            files[str(path.relative_to(self.dir))] = {"content": path.read_text(), "mode": info.st_mode & 0o777,
                                                      "owner": [info.st_uid, info.st_gid]}
        kept = {"manifests": manifests, "launch": json.loads(self.launchfile.read_text()), "files": files}
        write_atomic(self.writablefile, json.dumps(kept).encode(), 0o600)

    def is_read_only(self) -> bool:
        """The running pod is in read-only maintenance (a gc's window, or one a gc left)."""
        return read_only(self.manifests())

    def restore_writable(self) -> bool:
        """Bring back the writable pod kept aside when a gc's window began (that gc having been
        stopped inside it); return whether there was one to bring back."""
        try:
            kept = json.loads(self.writablefile.read_text())
        except FileNotFoundError:
            return False
        for relative, file in kept["files"].items():
            write_atomic(self.dir / relative, file["content"].encode(), file["mode"], tuple(file["owner"]))
        write_atomic(self.manifestfile, json.dumps(kept["manifests"]).encode(), 0o644)
        self._launch(kept["launch"])
        self.writablefile.unlink()
        return True


def read_only(manifests: list[dict]) -> bool:
    """Whether the rendered pod's registry config is in read-only maintenance mode."""
    for obj in manifests:
        if obj.get("kind") == "ConfigMap":
            for text in (obj.get("data") or {}).values():
                config = yaml.safe_load(text) if "maintenance" in text else None
                if isinstance(config, dict) and is_read_only(config):
                    return True
    return False
