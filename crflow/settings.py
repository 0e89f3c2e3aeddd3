"""The site file: one YAML document that says how this site's registry is run.

It is read and validated here, once, at the edge. Everything past this module takes
plain values. Errors name the key, what is wrong with it and the fix, in one line each.
"""

from __future__ import annotations

import ipaddress
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from crflow.chart import CRFLOW_VALUES
from crflow.config import environment
from crflow.errors import CrflowError
from crflow.layout import StateDir

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
HOSTNAME = r"^([a-zA-Z0-9]([-a-zA-Z0-9]{0,61}[a-zA-Z0-9])?)(\.[a-zA-Z0-9]([-a-zA-Z0-9]{0,61}[a-zA-Z0-9])?)*$"
Port = Annotated[int, Field(ge=1, le=65535)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Address(Strict):
    """Where clients reach the registry: the LoadBalancer IP and/or DNS names, and the port."""

    ips: list[str] = ["127.0.0.1"]
    dns_names: list[Annotated[str, Field(pattern=HOSTNAME, max_length=253)]] = []
    port: Port = 5000
    # The local target's debug server (liveness, /metrics), on 127.0.0.1 only: it also serves
    # pprof. None: the port after `port`. On the cluster it is the chart's metrics.port.
    metrics_port: Port | None = None
    service_type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "LoadBalancer"

    @field_validator("ips")
    @classmethod
    def _ips(cls, ips: list[str]) -> list[str]:
        for ip in ips:
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                raise ValueError(f"{ip!r} is not an IP address; put host names under registry.dns_names") from None
        return ips

    @model_validator(mode="after")
    def _some_name(self) -> Address:
        if not self.ips and not self.dns_names:
            raise ValueError("give at least one of registry.ips or registry.dns_names")
        if self.metrics_port == self.port:
            raise ValueError(f"registry.metrics_port: {self.port} is the registry's own port; pick another")
        if self.service_type == "NodePort" and not 30000 <= self.port <= 32767:
            raise ValueError("registry.port: with service_type NodePort the port is the node port, 30000-32767")
        return self

    @property
    def host(self) -> str:
        """The name clients use: the first IP (the runbook's LoadBalancer IP), else the first DNS name."""
        if not self.ips:
            return self.dns_names[0]
        ip = ipaddress.ip_address(self.ips[0])
        return f"[{ip}]" if ip.version == 6 else str(ip)

    @property
    def debug_port(self) -> int:
        """The local registry's debug server port: metrics_port, else the port after the registry's."""
        if self.metrics_port is not None:
            return self.metrics_port
        return self.port + 1 if self.port < 65535 else self.port - 1

    @property
    def listen(self) -> tuple[str, int]:
        """Where the local target's registry listens: the first IP, else every interface."""
        return ((self.ips or ["0.0.0.0"])[0], self.port)

    @property
    def server(self) -> str:
        """host:port, as clients name the registry (docker login, auth.json, image refs)."""
        return f"{self.host}:{self.port}"

    @property
    def servers(self) -> list[str]:
        """Every host:port the certificate names, `server` first: clients may use any of them."""
        hosts = [f"[{ip}]" if ipaddress.ip_address(ip).version == 6 else ip for ip in self.ips] + self.dns_names
        return [f"{host}:{self.port}" for host in hosts]


class FilesystemStorage(Strict):
    """Blobs on a local directory (local target), or on a hostPath PV on one node."""

    kind: Literal["filesystem"]
    path: Path | None = None  # default: <state_dir>/data


class HostPathVolume(Strict):
    path: str
    node: str
    size: str = "50Gi"


class PvcStorage(Strict):
    """Blobs on a PersistentVolumeClaim: an existing one, or a hostPath PV crflow creates."""

    kind: Literal["pvc"]
    existing_claim: str | None = None
    host_path: HostPathVolume | None = None

    @model_validator(mode="after")
    def _one_source(self) -> PvcStorage:
        if (self.existing_claim is None) == (self.host_path is None):
            raise ValueError("storage: give exactly one of existing_claim or host_path")
        return self


def read_ca(path: Path | None, key: str) -> str | None:
    """A CA bundle the site file names at `key` (None where it names none), read when used."""
    if path is None:
        return None
    try:
        return path.read_text()
    except OSError as err:
        raise CrflowError(f"{key}: cannot read {path}: {err.strerror}") from None


class S3Credentials(Strict):
    """Where the S3 keys live. On Kubernetes: MinIO's own secret, copied by crflow.
    On the local target: a YAML file holding the same keys (a stand-in for that secret)."""

    namespace: str = "minio"
    name: str = "minio-access-secret"
    access_key_key: str = "accesskey"
    secret_key_key: str = "secretkey"
    file: Path | None = None


class S3Storage(Strict):
    kind: Literal["s3"]
    endpoint: Annotated[str, Field(pattern=r"^https?://")]
    bucket: str
    region: str = "us-east-1"
    root_directory: str = ""
    credentials: S3Credentials = S3Credentials()
    ca_bundle: Path | None = None
    skip_verify: bool = False

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, bucket: str) -> str:
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
            raise ValueError(f"{bucket!r} is not an S3 bucket name (3-63 of a-z 0-9 . -)")
        return bucket

    @model_validator(mode="after")
    def _trust(self) -> S3Storage:
        if self.ca_bundle and self.skip_verify:
            raise ValueError("storage: give ca_bundle or skip_verify: true, not both")
        return self

    def ca_pem(self) -> str | None:
        """The S3 endpoint's CA bundle, if one is configured."""
        return read_ca(self.ca_bundle, "storage.ca_bundle")


class Tls(Strict):
    ca_days: Annotated[int, Field(ge=30, le=36500)] = 3650
    server_days: Annotated[int, Field(ge=1, le=825)] = 365
    key_algorithm: Literal["ecdsa-p256", "ecdsa-p384", "rsa-2048", "rsa-4096"] = "ecdsa-p256"


class Auth(Strict):
    user: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")] | None = None  # None: generated
    # The registry runs bcrypt on every request, with no cache (measured on distribution 2.8.2:
    # cost 5 serves 236 requests/s, cost 10 13.7/s, cost 12 3.5/s, about +3 s per push). The
    # password is 192 random bits, so no cost adds meaningful work for an attacker: pick the cheap one.
    bcrypt_cost: Annotated[int, Field(ge=4, le=14)] = 5


class Cluster(Strict):
    """How crflow reaches the Kubernetes API: a kubeconfig (default: $KUBECONFIG or
    ~/.kube/config) and optionally one of its contexts; in a pod, its service account."""

    kubeconfig: Path | None = None
    context: str | None = None
    helm_timeout_seconds: Annotated[int, Field(ge=10, le=3600)] = 300
    # How long one Kubernetes API call waits for its answer: a frozen API server fails the call
    # (retried as transient) within it, never hangs the run.
    api_timeout_seconds: Annotated[int, Field(ge=1, le=600)] = 30


class NodeTrust(Strict):
    """Kubernetes: the chart's node-trust DaemonSet writes the CA into each node's runtime
    directory (certs.d), so nodes pull from the registry with no reboot."""

    enabled: bool = True
    runtime: Literal["containerd", "microk8s", "k3s", "docker"] = "containerd"
    host_dir: Annotated[str, Field(pattern=r"^/")] | None = None  # overrides the runtime's directory
    resync_seconds: Annotated[int, Field(ge=1, le=3600)] = 10


class PullSecrets(Strict):
    """Where workloads get the registry login: a kubernetes.io/dockerconfigjson Secret named
    `name` in each listed namespace and each namespace the label selector matches. crflow
    writes it on install and rewrites it on every rotation, creating it where it is missing."""

    name: Annotated[str, Field(pattern=DNS_LABEL, max_length=253)] = "registry-pull"
    namespaces: list[Annotated[str, Field(pattern=DNS_LABEL, max_length=63)]] = []
    namespace_selector: str | None = None  # e.g. "registry-access=true"
    default_service_account: bool = False  # also list the Secret in each namespace's `default` ServiceAccount


UPSTREAM_URL = r"^https://[^/@]+/?$"  # no user:password@: a login goes by reference (login:)
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


class UpstreamLogin(Strict):
    """Where a mirror's upstream login lives, by reference only (exactly one): crflow reads it
    when a run deploys the mirror and puts it in the mirror's Secret, never in the site file,
    a parameter, a log or its own state."""

    env: Annotated[str, Field(pattern=ENV_NAME)] | None = None  # NAME: $NAME_USERNAME and $NAME_PASSWORD
    prefect_secret: Annotated[str, Field(pattern=DNS_LABEL)] | None = None  # a Secret block: {"username", "password"}
    secret: Annotated[str, Field(pattern=DNS_LABEL)] | None = None  # kubernetes: keys username, password

    @model_validator(mode="after")
    def _one(self) -> UpstreamLogin:
        if sum(ref is not None for ref in (self.env, self.prefect_secret, self.secret)) != 1:
            raise ValueError("give exactly one of env, prefect_secret or secret")
        return self

    @property
    def source(self) -> str:
        """Where it comes from, for error lines: never the login itself."""
        if self.env is not None:
            return f"${self.env}_USERNAME and ${self.env}_PASSWORD"
        return f"Prefect Secret block {self.prefect_secret}" if self.prefect_secret else f"Secret {self.secret}"


class Mirror(Strict):
    """A pull-through mirror of one upstream registry: crflow runs one more registry in proxy
    mode beside the site's own (the chart's `mirrors`), and node trust sends the nodes' pulls
    of `prefix/...` images to it first, the upstream itself being the fallback."""

    name: Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]{0,18}[a-z0-9])?$")]  # RELEASE-mirror-NAME
    upstream: Annotated[str, Field(pattern=UPSTREAM_URL)]  # e.g. https://registry-1.docker.io
    prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9.-]+(:[0-9]+)?$")]  # the name images use: docker.io, HOST:PORT
    port: Port  # where the mirror serves, on the registry's addresses (on a cluster: its Service's port)
    metrics_port: Port | None = None  # the local target's debug server for it; None: the port after `port`
    ca_bundle: Path | None = None  # the upstream's CA, where the system's CAs do not vouch for it
    login: UpstreamLogin | None = None  # anonymous pulls without it
    # An image the upstream holds (REPO:TAG, as the mirror serves it: library/busybox:1.36 for
    # docker.io) that verify pulls through the mirror twice; without it verify asks /v2/ only.
    probe: Annotated[str, Field(pattern=r"^[a-z0-9]+([._/-][a-z0-9]+)*:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")] | None = None
    # Retention: `crflow gc` evicts what the mirror cached more than keep_days ago (a later pull
    # fetches it again). Distribution 2.8's proxy evicts at 7 days by itself, a span it does not
    # let anyone set: so only a shorter one means anything. None: the proxy's 7 days alone.
    keep_days: Annotated[int, Field(ge=0)] | None = None

    @field_validator("keep_days")
    @classmethod
    def _within_the_proxys_week(cls, days: int | None) -> int | None:
        if days is not None and days > 7:
            raise ValueError(f"{days} days: the mirror's proxy evicts what it cached 7 days ago by itself; give 0 to 7, "
                             "or leave keep_days out")
        return days

    @property
    def debug_port(self) -> int:
        return self.metrics_port or self.port + 1

    def ca_pem(self) -> str | None:
        """The upstream's CA bundle, if one is configured."""
        return read_ca(self.ca_bundle, f"mirrors: {self.name}: ca_bundle")


class Runs(Strict):
    # How long a run waits for another run of the same site to finish before it fails: a
    # rotation with a long grace period holds the site that long.
    wait_seconds: Annotated[int, Field(ge=1, le=86400)] = 900


CRON_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day", 1, 31), ("month", 1, 12), ("weekday", 0, 7))
CRON_NAMES = {name: i for i, name in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))} | {
    name: i + 1 for i, name in enumerate(("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct",
                                          "nov", "dec"))}


def _cron(expression: str) -> str:
    """Five cron fields with values in range (checked here so a typo fails at load, without
    importing Prefect; Prefect's own parser checks it again when `crflow deploy` sends it)."""
    fields = expression.split()
    if len(fields) != 5:
        raise ValueError(f"{expression!r} is not a cron expression (five fields: minute hour day month weekday)")
    for text, (name, low, high) in zip(fields, CRON_FIELDS, strict=True):
        for part in text.split(","):
            span, _, step = part.partition("/")
            values = [] if span == "*" else span.split("-", 1)
            numbers = [int(v) if v.isdigit() else CRON_NAMES.get(v.lower(), -1) for v in values]
            if (step and not step.isdigit()) or not all(low <= n <= high for n in numbers):
                raise ValueError(f"{expression!r}: the {name} field {text!r} is not within {low}-{high}")
    return expression


Cron = Annotated[str, AfterValidator(_cron)]


class Schedules(Strict):
    """When `crflow deploy`'s scheduled deployments run; null leaves one on demand only."""

    verify: Cron | None = "17 3 * * *"  # every night at 03:17
    rotate_credentials: Cron | None = "0 4 1 * *"  # 04:00 on the first of every month
    gc: Cron | None = "30 4 * * 0"  # 04:30 every Sunday: retention, then a collection in a read-only window
    timezone: str = "UTC"


class Alerts(Strict):
    """Where a failed run, a rolled-back rotation or a certificate near its end is reported:
    a webhook URL (crflow keeps it in a Prefect webhook block) or an existing Prefect
    notification block, as BLOCK-TYPE/NAME (e.g. slack-webhook/ops)."""

    webhook: SecretStr | None = None  # often holds a token (Slack, Teams): kept out of logs and reprs
    block: Annotated[str, Field(pattern=r"^[a-z0-9-]+/[^/]+$")] | None = None
    cert_days: Annotated[int, Field(ge=1, le=3650)] = 30

    @field_validator("webhook")
    @classmethod
    def _http_url(cls, url: SecretStr | None) -> SecretStr | None:
        if url is not None and not re.match(r"^https?://[^\s/]+", url.get_secret_value()):
            raise ValueError("is not an http(s) URL; give the webhook's full address")
        return url

    @model_validator(mode="after")
    def _one_destination(self) -> Alerts:
        if self.webhook and self.block:
            raise ValueError("set webhook or block, not both")
        return self


class Rotation(Strict):
    # How long the old login keeps working after every consumer has the new one: long
    # enough for clients that read their pull secret or auth file only now and then.
    grace_seconds: Annotated[int, Field(ge=0, le=86400)] = 60
    # How long to wait for the registry to see a changed htpasswd Secret: the kubelet
    # refreshes Secret volumes within about a minute (its sync period plus cache TTL).
    propagation_timeout_seconds: Annotated[int, Field(ge=5, le=3600)] = 180


class RetentionRule(Strict):
    """What a collection keeps in the repositories matching `repositories` (a glob: `team/*`).
    Tags: the `keep_newest` newest (by the image config's `created`) and every tag matching
    `keep_tags` (a regular expression); with either set, other tags are deleted by digest before
    gc. Untagged manifests: with `untagged_older_than_days`, those pushed longer ago go."""

    repositories: Annotated[str, Field(min_length=1)]
    keep_newest: Annotated[int, Field(ge=0)] | None = None
    keep_tags: str | None = None
    untagged_older_than_days: Annotated[int, Field(ge=0)] | None = None

    @field_validator("keep_tags")
    @classmethod
    def _regex(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"{pattern!r} is not a regular expression: {err}") from None
        return pattern

    @model_validator(mode="after")
    def _says_something(self) -> RetentionRule:
        if self.keep_newest is None and self.keep_tags is None and self.untagged_older_than_days is None:
            raise ValueError(f"retention for {self.repositories}: give keep_newest or keep_tags (which tags stay), "
                             "or untagged_older_than_days")
        return self


class Gc(Strict):
    """`crflow gc`: garbage collection in a read-only window."""

    delete_untagged: bool = True  # `registry garbage-collect --delete-untagged`: manifests no tag names go
    timeout_seconds: Annotated[int, Field(ge=10, le=86400)] = 3600


class Chart(Strict):
    """More values for the chart, in the community docker-registry chart's terms: replicaCount,
    image.tag, resources, garbageCollect, configData, podAnnotations... Applied by install and
    upgrade; the chart's values.schema.json checks them."""

    values: dict[str, Any] = {}
    # Values that weaken the registry's isolation (see weakening), allowed on a cluster only,
    # and then with a warning at every run: the local target runs the registry on this machine.
    allowInsecureValues: bool = False  # noqa: N815 (spelt as the chart's values are)

    @field_validator("values")
    @classmethod
    def _not_crflows(cls, values: dict[str, Any]) -> dict[str, Any]:
        for key, where in CRFLOW_VALUES.items():
            if key in values:
                raise ValueError(f"{key} is set by crflow from {where}; set it there, not in chart.values")
        if "mirrors" in values:  # helm would run them, but neither node trust nor the flows know them yet
            raise ValueError("mirrors: crflow sets the chart's mirrors from the site file's mirrors key; set them "
                             "there, not in chart.values")
        return values


STORAGE_DRIVERS = ("filesystem", "s3", "inmemory", "azure", "gcs", "swift", "oss")


def weakening(values: dict[str, Any], target: str) -> list[str]:
    """The chart values that would weaken the registry's isolation, each as "key: why"
    (chart.allowInsecureValues allows them on a cluster)."""
    found = []
    pod, container = values.get("podSecurityContext") or {}, values.get("containerSecurityContext") or {}
    for where, context in (("podSecurityContext", pod), ("containerSecurityContext", container)):
        for key in ("runAsUser", "runAsGroup"):
            if context.get(key) == 0:
                found.append(f"chart.values.{where}.{key}: 0 runs the registry as root; use the chart's 1000 or "
                             "another uid")
        if context.get("runAsNonRoot") is False:
            found.append(f"chart.values.{where}.runAsNonRoot: false lets the registry run as root; leave it true")
    if container.get("privileged"):
        found.append("chart.values.containerSecurityContext.privileged: a privileged registry is root on the host; "
                     "remove it")
    if container.get("allowPrivilegeEscalation"):
        found.append("chart.values.containerSecurityContext.allowPrivilegeEscalation: true lets the registry gain "
                     "privileges; remove it")
    if (container.get("capabilities") or {}).get("add"):
        found.append("chart.values.containerSecurityContext.capabilities.add: the registry needs no capability; "
                     "remove it")
    if target == "local" and container.get("readOnlyRootFilesystem") is False:
        found.append("chart.values.containerSecurityContext.readOnlyRootFilesystem: false is not how the local "
                     "target runs the registry (only its data folder is writable); remove it")
    return found


def ignored_storage(values: dict[str, Any]) -> list[str]:
    """The chart values for the registry's storage driver, which crflow sets from the site's
    storage key and would ignore (never allowed)."""
    storage = (values.get("configData") or {}).get("storage") or {}
    return [f"chart.values.configData.storage.{driver}: crflow sets the registry's storage from the site's storage "
            "key, and would ignore this; set storage there" for driver in STORAGE_DRIVERS if driver in storage]


class ResultKey(Strict):
    """Where the key of the encrypted cache comes from when CRFLOW_RESULT_KEY is not set. Neither:
    `<state_dir>/result.key`, made on first use. A key named here is never made: missing is an error."""

    file: Path | None = None  # a file holding it, such as a Kubernetes Secret mounted into the job
    prefect_secret: str | None = None  # the name of a Prefect Secret block holding it

    @model_validator(mode="after")
    def _one(self) -> ResultKey:
        if self.file is not None and self.prefect_secret is not None:
            raise ValueError("give one of result_key.file and result_key.prefect_secret, not both")
        return self


class ResultStorage(Strict):
    """Where the encrypted cache of the CA and the logins lives instead of state_dir (and the
    kubernetes target's state Secret): a bucket and prefix on the site's S3 storage, with its
    endpoint, keys and CA."""

    bucket: str
    prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9._/-]+$")] = "crflow-results"

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, bucket: str) -> str:
        return S3Storage._bucket(bucket)


class Site(Strict):
    target: Literal["local", "kubernetes"] = "local"
    state_dir: Path
    release: Annotated[str, Field(pattern=DNS_LABEL, max_length=40)] = "registry"
    namespace: Annotated[str, Field(pattern=DNS_LABEL, max_length=63)] = "container-registry"
    registry: Address = Address()
    storage: Annotated[FilesystemStorage | PvcStorage | S3Storage, Field(discriminator="kind")] = FilesystemStorage(
        kind="filesystem"
    )
    tls: Tls = Tls()
    auth: Auth = Auth()
    cluster: Cluster = Cluster()
    pull_secrets: PullSecrets = PullSecrets()
    node_trust: NodeTrust = NodeTrust()
    rotation: Rotation = Rotation()
    runs: Runs = Runs()
    schedules: Schedules = Schedules()
    alerts: Alerts = Alerts()
    retention: list[RetentionRule] = []
    gc: Gc = Gc()
    chart: Chart = Chart()
    result_key: ResultKey = ResultKey()
    result_storage: ResultStorage | None = None
    mirrors: list[Mirror] = []

    @model_validator(mode="after")
    def _mirrors_apart(self) -> Site:
        """Each mirror has a name and ports of its own, none the registry's."""
        local = self.target == "local"  # (on a cluster each debug server is in its own pod)
        taken = {self.registry.port: "registry.port", **({self.registry.debug_port: "registry.metrics_port"} if local
                                                          else {})}
        names = set()
        for mirror in self.mirrors:
            if mirror.name in names:
                raise ValueError(f"mirrors: two mirrors are named {mirror.name}; give each a name of its own")
            names.add(mirror.name)
            if self.registry.service_type == "NodePort" and not 30000 <= mirror.port <= 32767:
                raise ValueError(f"mirrors: {mirror.name}: with service_type NodePort its port is a node port, "
                                 "30000-32767")
            for port, what in ((mirror.port, "port"), *(((mirror.debug_port, "metrics_port"),) if local else ())):
                if port in taken:
                    raise ValueError(f"mirrors: {mirror.name}: its {what} {port} is {taken[port]}'s; pick another")
                taken[port] = f"mirror {mirror.name}'s {what}"
        for mirror in self.mirrors:
            if self.target == "local" and mirror.login is not None and mirror.login.secret is not None:
                raise ValueError(f"mirrors: {mirror.name}: login.secret names a Kubernetes Secret; on the local "
                                 "target use login.env or login.prefect_secret")
        if self.mirrors and self.target == "kubernetes" and self.node_trust.enabled and \
                self.node_trust.runtime == "docker":
            raise ValueError("mirrors: node trust wires mirrors into containerd's hosts.toml, and docker's certs.d "
                             "has no such file; use a containerd runtime on the nodes, or remove mirrors")
        return self

    @model_validator(mode="after")
    def _fits_target(self) -> Site:
        storage = self.storage
        if self.target == "local":
            if isinstance(storage, PvcStorage):
                raise ValueError("storage.kind: pvc needs target: kubernetes; use kind: filesystem on the local target")
            if isinstance(storage, S3Storage) and storage.credentials.file is None:
                raise ValueError("storage.credentials.file: the local target reads the S3 keys from a file; set its path")
            if self.pull_secrets.namespaces or self.pull_secrets.namespace_selector:
                raise ValueError("pull_secrets: namespaces need target: kubernetes; local clients use crflow export-client")
        elif isinstance(storage, FilesystemStorage):
            raise ValueError("storage.kind: filesystem is for the local target; on kubernetes use kind: pvc or s3")
        if ignored := ignored_storage(self.chart.values):
            raise ValueError(ignored[0])
        weak = weakening(self.chart.values, self.target)
        if weak and not (self.chart.allowInsecureValues and self.target == "kubernetes"):
            hint = "" if self.target == "local" else " (chart.allowInsecureValues: true allows it on a cluster)"
            raise ValueError(weak[0] + hint)
        if self.result_storage is not None and not isinstance(storage, S3Storage):
            raise ValueError("result_storage uses the S3 endpoint and keys of storage: it needs storage.kind: s3")
        if any(rule.untagged_older_than_days is not None for rule in self.retention):
            if self.gc.delete_untagged:
                raise ValueError("retention.untagged_older_than_days: gc.delete_untagged removes every untagged "
                                 "manifest anyway; set gc.delete_untagged: false to keep the recent ones")
            if isinstance(storage, PvcStorage):
                raise ValueError("retention.untagged_older_than_days reads when a manifest was pushed from the storage, "
                                 "which crflow cannot read on a cluster volume; use it with s3 or filesystem storage")
        for mirror in self.mirrors:
            if mirror.keep_days is not None and isinstance(storage, PvcStorage):
                raise ValueError(f"mirrors: {mirror.name}: keep_days reads when the mirror cached each manifest from "
                                 "the storage, which crflow cannot read on a cluster volume; use it with s3 storage, "
                                 "or leave keep_days out")
        return self

    @field_validator("state_dir")
    @classmethod
    def _state_dir(cls, path: Path) -> Path:
        if path.exists() and not path.is_dir():
            raise ValueError(f"{path} is a file; state_dir is the directory crflow keeps its state in")
        return path

    @property
    def client_servers(self) -> list[str]:
        """Every host:port a client uses with the site's login and CA: the registry's, then each
        mirror's on the same hosts (a mirror serves the registry's certificate and login)."""
        hosts = [server.rsplit(":", 1)[0] for server in self.registry.servers]
        return self.registry.servers + [f"{host}:{mirror.port}" for mirror in self.mirrors for host in hosts]

    def mirror_server(self, mirror: Mirror) -> str:
        """The host:port nodes and checks use for a mirror: the registry's first host, its port."""
        return f"{self.registry.servers[0].rsplit(':', 1)[0]}:{mirror.port}"

    @property
    def state(self) -> StateDir:
        """Where each thing crflow keeps for this site lives in its state_dir."""
        return StateDir(self.state_dir)

    @property
    def data_dir(self) -> Path:
        """Where the local target keeps blobs when storage is filesystem."""
        assert isinstance(self.storage, FilesystemStorage)
        return self.storage.path or self.state.data


def _resolve_paths(raw: dict, base: Path) -> None:
    """Relative paths in the file are relative to the file; ~ is the user's home."""

    def fix(value: str) -> str:
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else (base / path).resolve())

    if isinstance(raw.get("state_dir"), str):
        raw["state_dir"] = fix(raw["state_dir"])
    cluster = raw.get("cluster")
    if isinstance(cluster, dict) and isinstance(cluster.get("kubeconfig"), str):
        cluster["kubeconfig"] = fix(cluster["kubeconfig"])
    result_key = raw.get("result_key")
    if isinstance(result_key, dict) and isinstance(result_key.get("file"), str):
        result_key["file"] = fix(result_key["file"])
    storage = raw.get("storage")
    if isinstance(storage, dict):
        for key in ("path", "ca_bundle"):
            if isinstance(storage.get(key), str):
                storage[key] = fix(storage[key])
        creds = storage.get("credentials")
        if isinstance(creds, dict) and isinstance(creds.get("file"), str):
            creds["file"] = fix(creds["file"])


STORAGE_KINDS = ("filesystem", "pvc", "s3")
PATTERN_WORDS = {
    HOSTNAME: "a DNS name (labels of letters, digits and inner dashes, joined by dots)",
    DNS_LABEL: "a Kubernetes name (lower-case letters, digits and inner dashes)",
    r"^https?://": "a URL starting with http:// or https://",
    r"^[A-Za-z0-9._-]{1,64}$": "a user name (1-64 of letters, digits, . _ -)",
    UPSTREAM_URL: "a registry's https:// URL with no path and no login in it (https://HOST[:PORT]; a login goes "
                  "under the mirror's login:)",
}


def _explain(error: dict) -> str:
    loc = [str(p) for p in error["loc"] if not str(p).startswith("function-after")]
    if loc[:1] == ["storage"] and loc[1:2] and loc[1] in STORAGE_KINDS:
        del loc[1]  # pydantic names the union member; the file has no such level
    where = ".".join(loc)
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "string_pattern_mismatch":  # the pattern itself helps nobody: say what fits
        value = error["input"]
        # A URL with a login in it is never echoed: the error line reaches logs and terminals.
        shown = "a URL with a login in it" if re.match(r"^[a-z]+://[^/]*@", str(value)) else repr(value)
        message = f"{shown} is not {PATTERN_WORDS.get(error['ctx']['pattern'], 'allowed here')}"
    elif error["type"] == "extra_forbidden":
        message = "unknown key; check its spelling against examples/local.yaml"
    elif error["type"] == "missing":
        message = "required key is missing"
    return f"{where}: {message}" if where else message


MAX_SITE_FILE = 256 * 1024  # a site file is a page or two; anything near this is not one


def _plain_yaml(path: Path, text: str) -> None:
    """Refuse anchors and aliases: a few hundred bytes of nested aliases expand to gigabytes
    (a "billion laughs"), and a site file has no need of them."""
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise CrflowError(f"{path}: YAML anchors and aliases (&name, *name) are not allowed in a site file; "
                              "write the values out")


def site_path(path: Path) -> Path:
    """A site file's path; a relative one is under $CRFLOW_SITES when that is set (a deployment
    for a Kubernetes work pool names its site file so: the job template mounts them there)."""
    sites = environment().sites
    return sites / path if sites and not path.is_absolute() else path


def load_site(path: Path) -> Site:
    """Read and validate the site file; raise CrflowError naming every bad key."""
    path = site_path(path)
    try:
        if path.stat().st_size > MAX_SITE_FILE:
            raise CrflowError(f"{path} is larger than {MAX_SITE_FILE // 1024} KiB; is it really a site file?")
        text = path.read_text()
    except OSError as err:
        raise CrflowError(f"cannot read site file {path}: {err.strerror}") from None
    try:
        _plain_yaml(path, text)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise CrflowError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(raw, dict):
        raise CrflowError(f"{path}: expected a mapping of settings at the top level")
    _resolve_paths(raw, path.resolve().parent)
    try:
        site = Site.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(_explain(e) for e in err.errors())
        raise CrflowError(f"{path}: {problems}") from None
    for weak in weakening(site.chart.values, site.target):  # allowed, on a cluster: said at every run
        print(f"crflow: warning: {weak} (allowed by chart.allowInsecureValues)", file=sys.stderr)
    return site
