"""How do we describe the registry to Helm? Chart values from plain settings, and the
manifests our chart renders from them (with the real helm binary, through pyhelm3).

    values = chart_values("registry", storage="filesystem", service_port=5000, ...)
    manifests = render_chart("registry", "container-registry", values)

The chart only references Secrets (see `secret_names`); their content never enters values.
"""

from __future__ import annotations

import asyncio
import difflib
import json
import os
import shutil
from pathlib import Path

import yaml
from prefect import task
from pydantic import SecretStr
from pyhelm3 import Client
from pyhelm3.errors import Error as HelmError
from pyhelm3.errors import ReleaseNotFoundError

from crflow.errors import CrflowError, transient_only
from tasks.kube import KubeAccess
from tasks.pki import KeyPair
from tasks.storage import S3Keys

CHART_DIR = Path(__file__).resolve().parent.parent / "helm_chart"
HELM_HINT = "run scripts/setup.sh (it fetches helm into .bin/), or put helm on PATH, or set CRFLOW_HELM"


def helm_executable() -> str:
    """The helm binary: $CRFLOW_HELM, else .bin/helm in the checkout, else helm on PATH."""
    candidates = [os.environ.get("CRFLOW_HELM"), str(CHART_DIR.parent / ".bin" / "helm"), shutil.which("helm")]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise CrflowError(f"helm not found: {HELM_HINT}")


def _reason(err: HelmError) -> str:
    """helm's own one-line reason ("Error: UPGRADE FAILED: ..."), without the lines before it."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1].removeprefix("Error: ") if lines else type(err).__name__


def secret_names(release: str) -> dict[str, str]:
    """The Secrets a release's chart references, by role. Created by crflow, named once here."""
    return {
        "login": f"{release}-login",  # not used by the chart: the user and password, for people and rotation
        "tls": f"{release}-tls",
        "htpasswd": f"{release}-htpasswd",
        "http": f"{release}-http-secret",
        "s3": f"{release}-s3",
        "s3_ca": f"{release}-s3-ca",
    }


SECRET_TYPES = {"tls": "kubernetes.io/tls", "login": "kubernetes.io/basic-auth"}  # by role; others are Opaque


def registry_secrets(
    release: str,
    *,
    ca: KeyPair,
    server_cert: KeyPair,
    htpasswd: SecretStr,
    http_secret: SecretStr,
    s3_keys: S3Keys | None = None,
    s3_ca_pem: str | None = None,
) -> dict[str, dict[str, SecretStr]]:
    """The content of every Secret `chart_values` references: name -> key -> value."""
    names = secret_names(release)
    secrets = {
        names["tls"]: {
            "tls.crt": SecretStr(server_cert.cert_pem),
            "tls.key": server_cert.key_pem,
            "ca.crt": SecretStr(ca.cert_pem),
        },
        names["htpasswd"]: {"htpasswd": htpasswd},
        names["http"]: {"haSharedSecret": http_secret},
    }
    if s3_keys:
        secrets[names["s3"]] = {"s3AccessKey": s3_keys.access_key, "s3SecretKey": s3_keys.secret_key}
    if s3_ca_pem:
        secrets[names["s3_ca"]] = {"ca.crt": SecretStr(s3_ca_pem)}
    return secrets


def data_claim(release: str) -> str:
    return f"{release}-data"


def chart_values(
    release: str,
    *,
    storage: str,
    service_type: str,
    service_port: int,
    load_balancer_ip: str | None,
    cert_fingerprint: str,
    claim: str | None = None,
    s3_endpoint: str | None = None,
    s3_bucket: str | None = None,
    s3_region: str | None = None,
    s3_root_directory: str = "",
    s3_ca_bundle: bool = False,
    s3_skip_verify: bool = False,
) -> dict:
    """Values for helm_chart/ that describe one crflow-managed registry.

    `storage` is "filesystem" (on `claim`, default `data_claim(release)`) or "s3".
    `cert_fingerprint` lands in `secretsChecksum`, so a new server certificate rolls the pod.
    """
    names = secret_names(release)
    values: dict = {
        "service": {"type": service_type, "port": service_port},
        "tlsSecretName": names["tls"],
        "secrets": {"htpasswdSecretName": names["htpasswd"], "haSharedSecretName": names["http"]},
        "secretsChecksum": cert_fingerprint,
        "storage": "s3" if storage == "s3" else "filesystem",
    }
    if load_balancer_ip and service_type == "LoadBalancer":
        values["service"]["loadBalancerIP"] = load_balancer_ip
    if service_type == "NodePort":  # clients reach node:port, so the node port is the registry's port
        values["service"]["nodePort"] = service_port
    if storage == "s3":
        values["secrets"]["s3"] = {"secretRef": names["s3"]}
        values["s3"] = {
            "regionEndpoint": s3_endpoint,
            "bucket": s3_bucket,
            "region": s3_region,
            "rootdirectory": s3_root_directory,
            "secure": bool(s3_endpoint and s3_endpoint.startswith("https://")),
            "caBundleSecretName": names["s3_ca"] if s3_ca_bundle else "",
            "skipVerify": s3_skip_verify,
        }
    else:
        values["persistence"] = {"enabled": True, "existingClaim": claim or data_claim(release)}
    return values


def merged(base: dict, over: dict) -> dict:
    """`over` laid on `base`, mappings merged key by key (as helm merges values files)."""
    result = dict(base)
    for key, value in over.items():
        result[key] = merged(result[key], value) if isinstance(value, dict) and isinstance(result.get(key), dict) else value
    return result


async def _render(release: str, namespace: str, values: dict) -> list[dict]:
    client = Client(executable=helm_executable())
    chart = await client.get_chart(CHART_DIR)
    resources = await client.template_resources(chart, release, values, namespace=namespace)
    return [r for r in resources if r]


@task(retries=1)
def render_chart(release: str, namespace: str, values: dict) -> list[dict]:
    """`helm template` of our chart: the manifests a release with these values consists of."""
    try:
        return asyncio.run(_render(release, namespace, values))
    except HelmError as err:
        raise CrflowError(f"helm could not render {CHART_DIR}: {_reason(err)}") from None


def _client(kube: KubeAccess) -> Client:
    return Client(executable=helm_executable(), kubeconfig=kube.kubeconfig and Path(kube.kubeconfig),
                  kubecontext=kube.context)


async def _ensure_release(kube: KubeAccess, release: str, namespace: str, values: dict, timeout_seconds: int,
                          always: bool) -> int:
    helm = _client(kube)
    chart = await helm.get_chart(CHART_DIR)
    options = dict(namespace=namespace, create_namespace=False, wait=True, timeout=f"{timeout_seconds}s")
    if always:
        revision = await helm.install_or_upgrade_release(release, chart, values, **options)
    else:
        revision = await helm.ensure_release(release, chart, values, **options)
    return revision.revision


@task(retries=1, retry_delay_seconds=10, retry_condition_fn=transient_only)
def helm_release(kube: KubeAccess, release: str, namespace: str, values: dict, timeout_seconds: int,
                 always: bool = False) -> int:
    """Install or upgrade the release and wait until it is ready. Only where chart version or
    values changed (pyhelm3's test), unless `always`: an upgrade that saw its manifests differ
    (a template edited without a version bump, a release changed by hand) applies them anyway.
    Returns the release's revision (unchanged on a rerun with the same settings)."""
    try:
        return asyncio.run(_ensure_release(kube, release, namespace, values, timeout_seconds, always))
    except HelmError as err:
        raise CrflowError(f"helm could not install or upgrade release {namespace}/{release}: {_reason(err)}") from None


async def _deployed(kube: KubeAccess, release: str, namespace: str) -> tuple[int | None, list[dict]]:
    helm = _client(kube)
    try:
        revision = await helm.get_current_revision(release, namespace=namespace)
    except ReleaseNotFoundError:
        return None, []
    return revision.revision, [r for r in await revision.resources() if r]


@task(retries=1, retry_delay_seconds=5, retry_condition_fn=transient_only)
def deployed_release(kube: KubeAccess, release: str, namespace: str) -> tuple[int | None, list[dict]]:
    """The release's current revision and its manifests (`helm get manifest`); (None, []) if none."""
    try:
        return asyncio.run(_deployed(kube, release, namespace))
    except HelmError as err:
        raise CrflowError(f"helm could not read release {namespace}/{release}: {_reason(err)}") from None


async def _rollback(kube: KubeAccess, release: str, namespace: str, revision: int, timeout_seconds: int) -> int:
    current = await _client(kube).get_current_revision(release, namespace=namespace)
    rolled = await current.release.rollback(revision, wait=True, timeout=f"{timeout_seconds}s")
    return rolled.revision


@task(retries=1, retry_delay_seconds=10, retry_condition_fn=transient_only)
def rollback_release(kube: KubeAccess, release: str, namespace: str, revision: int, timeout_seconds: int) -> int:
    """`helm rollback` to `revision` and wait until it is ready; returns the new revision's number."""
    try:
        return asyncio.run(_rollback(kube, release, namespace, revision, timeout_seconds))
    except HelmError as err:
        raise CrflowError(f"helm could not roll release {namespace}/{release} back to revision {revision}: {_reason(err)}") from None


REDACTED = "(redacted)"


def _comparable(obj: dict) -> dict:
    """An object as the chart defines it: Secret values redacted, the namespace left out."""
    obj = json.loads(json.dumps(obj))
    if obj.get("kind") == "Secret":
        for field in ("data", "stringData"):
            obj[field] = dict.fromkeys(obj.get(field) or {}, REDACTED)
    obj.get("metadata", {}).pop("namespace", None)
    return obj


class _BlockDumper(yaml.SafeDumper):
    """YAML with multi-line strings (a ConfigMap's config.yml) as blocks, so a diff shows their lines."""


_BlockDumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def diff_manifests(deployed: list[dict], rendered: list[dict]) -> dict[str, str]:
    """For each object (kind/name) the two sets of manifests define differently, its unified
    diff, Secret data redacted; {} if they define the same objects."""
    def by_key(objects: list[dict]) -> dict[str, str]:
        return {f"{o['kind']}/{o['metadata']['name']}": yaml.dump(_comparable(o), Dumper=_BlockDumper, sort_keys=True)
                for o in objects}

    old, new = by_key(deployed), by_key(rendered)
    return {key: "\n".join(difflib.unified_diff((old.get(key) or "").splitlines(), (new.get(key) or "").splitlines(),
                                                f"deployed/{key}", f"upgrade/{key}", lineterm="", n=2))
            for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key)}


def pod_storage(pod: dict) -> tuple[str, str]:
    """Where a running registry pod keeps blobs, read from its template and config:
    ("s3", bucket), ("pvc", claim), ("emptyDir", volume) or ("hostPath", path)."""
    spec = pod["template"]["spec"]
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    config_map = volumes["config"]["configMap"]["name"]
    storage = yaml.safe_load(pod["configMaps"][config_map]["config.yml"]).get("storage", {})
    if "s3" in storage:
        return "s3", storage["s3"].get("bucket", "")
    root = (storage.get("filesystem") or {}).get("rootdirectory", "/var/lib/registry")
    (container,) = [c for c in spec["containers"] if c["name"] == "registry"]
    mounts = [m for m in container.get("volumeMounts") or [] if root.startswith(m["mountPath"])]
    if not mounts:
        return "emptyDir", "(the container's own filesystem)"
    volume = volumes[max(mounts, key=lambda m: len(m["mountPath"]))["name"]]
    if "persistentVolumeClaim" in volume:
        return "pvc", volume["persistentVolumeClaim"]["claimName"]
    if "hostPath" in volume:
        return "hostPath", volume["hostPath"]["path"]
    return "emptyDir", volume["name"]


@task
def check_pod_storage(pod: dict, storage_kind: str, bucket: str | None) -> str:
    """The running pod stores blobs where the site says: the bucket for s3, a claim otherwise."""
    kind, where = pod_storage(pod)
    if storage_kind == "s3" and (kind, where) != ("s3", bucket):
        raise CrflowError(f"the registry pod stores blobs in {kind} {where}, not in S3 bucket {bucket} as "
                          "storage.kind: s3 says; run crflow install (or upgrade) to fix the release")
    if storage_kind != "s3" and kind not in ("pvc", "hostPath"):
        lost = " (lost when the pod goes)" if kind == "emptyDir" else ""
        raise CrflowError(f"the registry pod stores blobs in {kind} {where}{lost}, although storage.kind is "
                          f"{storage_kind}; run crflow install (or upgrade) to fix the release")
    return f"{kind} {where}"
