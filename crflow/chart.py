"""The contract between crflow and `helm_chart/`: every name both sides use, named once here.

The chart references Secrets crflow makes (never their content), and crflow reads the pod the
chart renders (its container, its config volume). A rename on either side must change this
module, and `tests/test_chart.py` renders the chart and checks every name below against it.

    values = values_for(site, cert_fingerprint)            # the values crflow sets
    secret_name("registry", "tls")                        # "registry-tls"
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import SecretStr

from crflow.errors import CrflowError
from crflow.resources import packaged

if TYPE_CHECKING:  # settings derives its list of refused chart.values from CRFLOW_VALUES below
    from crflow.settings import Site

CHART_DIR = packaged("helm_chart")
# Writes a runtime's certs.d files: run by the node-trust DaemonSet and by `crflow trust`.
NODE_TRUST_SCRIPT = CHART_DIR / "files" / "node-trust.sh"

# The registry's pod, as the chart renders it.
CONTAINER = "registry"  # the registry container's name
COMMAND = "/bin/registry"  # the registry image's entrypoint
CONFIG_VOLUME = "config"  # the volume holding the ConfigMap's config.yml
CONFIG_FILE = "config.yml"
CONFIG_PATH = f"/etc/docker/registry/{CONFIG_FILE}"  # where the container reads it (`serve CONFIG_PATH`)

# The Secrets crflow makes, by role (in the runbook's order): name suffix, type, and the keys
# the chart reads.
SECRETS = {
    "s3": ("s3", "Opaque", ("s3AccessKey", "s3SecretKey")),
    "s3_ca": ("s3-ca", "Opaque", ("ca.crt",)),
    "tls": ("tls", "kubernetes.io/tls", ("tls.crt", "tls.key", "ca.crt")),
    "ca": ("ca", "Opaque", ("ca.crt",)),  # the CA alone, for node trust: no pod there sees the key
    "htpasswd": ("htpasswd", "Opaque", ("htpasswd",)),
    "http": ("http-secret", "Opaque", ("haSharedSecret",)),
    "login": ("login", "kubernetes.io/basic-auth", ("username", "password")),  # for people and rotation
}

SecretData = dict[str, dict[str, SecretStr]]  # Secret name -> key -> content


def secret_name(release: str, role: str) -> str:
    return f"{release}-{SECRETS[role][0]}"


def secret_type(role: str) -> str:
    return SECRETS[role][1]


CHART_REPOSITORY = "charts"  # where crflow publishes the chart in the registry it runs


def chart_package() -> tuple[str, str]:
    """(name, version) of the chart, from its Chart.yaml."""
    import yaml

    meta = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    return meta["name"], str(meta["version"])


def chart_reference(server: str) -> str:
    """What `helm pull` takes for the chart crflow publishes into the registry at `server`."""
    name, version = chart_package()
    return f"oci://{server}/{CHART_REPOSITORY}/{name} --version {version}"


def node_trust_name(release: str) -> str:
    """The node-trust DaemonSet (and its script's ConfigMap)."""
    return f"{release}-node-trust"


def data_claim(release: str) -> str:
    """The claim filesystem storage is on, unless the site names an existing one."""
    return f"{release}-data"


# Chart values crflow sets from the site file, and the site key to change instead.
CRFLOW_VALUES = {
    "service": "registry (service_type, port, ips)",
    "storage": "storage",
    "s3": "storage",
    "persistence": "storage",
    "secrets": "nothing (crflow makes the Secrets)",
    "tlsSecretName": "tls",
    "secretsChecksum": "nothing (the server certificate's fingerprint)",
    "nodeTrust": "node_trust",
    "tests": "nothing (crflow names its CA and login Secrets for helm test)",
    "namespaceOverride": "namespace",
}


def registry_secrets(release: str, *, ca_pem: str, cert_pem: str, key_pem: SecretStr, htpasswd: SecretStr,
                     http_secret: SecretStr, login: tuple[str, SecretStr], s3_keys: tuple[SecretStr, SecretStr] | None = None,
                     s3_ca_pem: str | None = None) -> SecretData:
    """The content of every Secret the chart references: name -> key -> value."""
    def secret(role: str, *values: SecretStr) -> tuple[str, dict[str, SecretStr]]:
        return secret_name(release, role), dict(zip(SECRETS[role][2], values, strict=True))

    secrets = dict([
        secret("tls", SecretStr(cert_pem), key_pem, SecretStr(ca_pem)),
        secret("ca", SecretStr(ca_pem)),
        secret("htpasswd", htpasswd),
        secret("http", http_secret),
        # Before the chart, not after: node trust sends it to the mirrors from its first sync.
        secret("login", SecretStr(login[0]), login[1]),
    ])
    if s3_keys:
        secrets.update([secret("s3", *s3_keys)])
    if s3_ca_pem:
        secrets.update([secret("s3_ca", SecretStr(s3_ca_pem))])
    return secrets


def values_for(site: Site, cert_fingerprint: str) -> dict:
    """The chart values of `site`: its own `chart.values` with crflow's on top.
    `cert_fingerprint` lands in `secretsChecksum`, so a new server certificate rolls the pod."""
    address = site.registry
    values: dict = {
        "service": {"type": address.service_type, "port": address.port},
        "tlsSecretName": secret_name(site.release, "tls"),
        "secrets": {"htpasswdSecretName": secret_name(site.release, "htpasswd"),
                    "haSharedSecretName": secret_name(site.release, "http")},
        "secretsChecksum": cert_fingerprint,
    }
    if site.target == "kubernetes":
        trust = site.node_trust
        values["nodeTrust"] = {"enabled": trust.enabled, "runtime": trust.runtime, "hostDir": trust.host_dir or "",
                               "addresses": address.servers, "caSecretName": secret_name(site.release, "ca"),
                               "resyncSeconds": trust.resync_seconds, "mirrors": mirror_routes(site),
                               "mirrorLoginSecretName": secret_name(site.release, "login") if site.mirrors else ""}
        # `helm test` asks the address clients use, trusting the CA alone, with the login Secret.
        values["tests"] = {"address": address.server, "caSecretName": secret_name(site.release, "ca"),
                           "loginSecretName": secret_name(site.release, "login")}
    if address.ips and address.service_type == "LoadBalancer":
        values["service"]["loadBalancerIP"] = address.ips[0]
    if address.service_type == "NodePort":  # clients reach node:port, so the node port is the registry's port
        values["service"]["nodePort"] = address.port
    if site.mirrors:
        values["mirrors"] = [mirror_values(site, mirror) for mirror in site.mirrors]
    return merged(site.chart.values, merged(values, storage_values(site)))


def mirror_name(release: str, name: str) -> str:
    """A mirror's Deployment and Service, as the chart names them (fullname-mirror-NAME)."""
    return f"{release}-mirror-{name}"


def rendered_deployment(manifests: list[dict], name: str | None = None) -> dict:
    """Deployment `name` of the rendered chart, or (None) the registry's: the one not labelled
    a mirror (the registry's name follows the chart's fullname, which values may override)."""
    for obj in manifests:
        if obj.get("kind") != "Deployment":
            continue
        meta = obj["metadata"]
        if (meta["name"] == name if name is not None
                else (meta.get("labels") or {}).get("app.kubernetes.io/component") != "mirror"):
            return obj
    raise CrflowError(f"the rendered chart has no Deployment {name or 'for the registry'}")


def mirror_routes(site: Site) -> list[str]:
    """What node trust writes for each mirror, as the node-trust script takes it
    (PREFIX|UPSTREAM_URL|MIRROR_ADDRESS): pulls of PREFIX/... go to the mirror, on the
    registry's first host, first, and to the upstream after."""
    return [f"{m.prefix}|{m.upstream.rstrip('/')}|{site.mirror_server(m)}" for m in site.mirrors]


def mirror_values(site: Site, mirror) -> dict:
    """One entry of the chart's `mirrors`: the mirror's upstream, its Service beside the registry's."""
    service: dict = {"type": site.registry.service_type, "port": mirror.port}
    if site.registry.service_type == "NodePort":
        service["nodePort"] = mirror.port
    entry = {"name": mirror.name, "remoteurl": mirror.upstream.rstrip("/"), "service": service}
    if mirror.ca_bundle is not None:
        entry["caBundleSecretName"] = mirror_ca_secret(site.release, mirror.name)
    if mirror.login is not None:  # a Secret of the user's own, or the one crflow fills from the reference
        entry["secretRef"] = mirror.login.secret or mirror_login_secret(site.release, mirror.name)
    return entry


def mirror_ca_secret(release: str, name: str) -> str:
    """The Secret holding a mirror's upstream CA (key ca.crt)."""
    return f"{mirror_name(release, name)}-ca"


def mirror_login_secret(release: str, name: str) -> str:
    """The Secret holding the upstream login crflow read for a mirror (keys username, password)."""
    return f"{mirror_name(release, name)}-upstream"


def mirror_secrets(site: Site, logins: dict[str, tuple[str, SecretStr]]) -> SecretData:
    """The Secrets the site's mirrors reference beyond the registry's own: their upstreams' CAs,
    and the upstream logins crflow read (`logins`, by mirror name)."""
    cas = {mirror_ca_secret(site.release, m.name): {"ca.crt": SecretStr(pem)}
           for m in site.mirrors if (pem := m.ca_pem()) is not None}
    return cas | {mirror_login_secret(site.release, name): {"username": SecretStr(user), "password": password}
                  for name, (user, password) in logins.items()}


def storage_values(site: Site) -> dict:
    """The chart values of the site's storage: the S3 driver, or a claim the pod mounts."""
    from crflow.settings import FilesystemStorage, PvcStorage, S3Storage

    storage, release = site.storage, site.release
    match storage:
        case S3Storage():
            return {"storage": "s3", "secrets": {"s3": {"secretRef": secret_name(release, "s3")}}, "s3": {
                "regionEndpoint": storage.endpoint,
                "bucket": storage.bucket,
                "region": storage.region,
                "rootdirectory": storage.root_directory,
                "secure": storage.endpoint.startswith("https://"),
                "caBundleSecretName": secret_name(release, "s3_ca") if storage.ca_bundle else "",
                "skipVerify": storage.skip_verify,
            }}
        case PvcStorage():
            # crflow's hostPath PV: the kubelet makes its folder root's, so the pod chowns it
            return {"storage": "filesystem", "persistence": {
                "enabled": True, "existingClaim": storage.existing_claim or data_claim(release),
                "chownOnStart": storage.host_path is not None}}
        case FilesystemStorage():
            return {"storage": "filesystem", "persistence": {
                "enabled": True, "existingClaim": data_claim(release), "chownOnStart": False}}
    raise TypeError(f"no chart values for {type(storage).__name__}")


def read_only(values: dict) -> dict:
    """`values` with the registry in read-only maintenance mode (pulls served, pushes refused
    with 405), for a garbage collection that must not race a push."""
    return merged(values, {"configData": {"storage": {"maintenance": {"readonly": {"enabled": True}}}}})


def is_read_only(config: dict) -> bool:
    """A registry config (configData, as rendered) that `read_only` put in maintenance mode."""
    return bool((((config.get("storage") or {}).get("maintenance") or {}).get("readonly") or {}).get("enabled"))


def merged(base: dict, over: dict) -> dict:
    """`over` laid on `base`, mappings merged key by key (as helm merges values files)."""
    result = dict(base)
    for key, value in over.items():
        result[key] = merged(result[key], value) if isinstance(value, dict) and isinstance(result.get(key), dict) else value
    return result
