"""Steps several flows share, on either target: the cached secrets of a generation, the
registry's storage and Secrets, the chart deployed, and the login handed to its consumers."""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr

from crflow.generations import Generations
from crflow.settings import PvcStorage, S3Storage, Site
from crflow.vault import Vault
from flows.values import kube_access
from tasks.client import save_client_bundle
from tasks.consumers import put_pull_secrets
from tasks.credentials import Credentials, make_credentials, make_htpasswd, make_http_secret
from tasks.helm import SECRET_TYPES, data_claim, helm_release, registry_secrets, secret_names
from tasks.kube import copy_s3_credentials, create_hostpath_volume, create_namespace, put_secret
from tasks.localpod import SecretData, put_local_secret, run_local_pod
from tasks.pki import KeyPair, make_ca, make_server_cert
from tasks.storage import ensure_bucket, ensure_directory, read_s3_keys_file


def site_ca(site: Site, vault: Vault) -> KeyPair:
    return vault(make_ca)(f"crflow {site.release} CA", days=site.tls.ca_days, key_algorithm=site.tls.key_algorithm)


def server_cert(site: Site, vault: Vault, ca: KeyPair, generation: int) -> KeyPair:
    return vault(make_server_cert)(ca, site.registry.ips, site.registry.dns_names, days=site.tls.server_days,
                                   key_algorithm=site.tls.key_algorithm, generation=generation)


def login(site: Site, vault: Vault, generation: int) -> tuple[Credentials, SecretStr]:
    """The credentials of one generation and their htpasswd line."""
    creds = vault(make_credentials)(site.auth.user, generation)
    return creds, vault(make_htpasswd)(creds, cost=site.auth.bcrypt_cost)


def site_secrets(site: Site, vault: Vault) -> tuple[dict, Credentials]:
    """The registry's secrets, made once and cached, of the generations in use: a long-lived
    CA, a server certificate for the addresses clients use, a login (user, random password,
    bcrypt in htpasswd) and the http.secret. Returns them by name, and the login."""
    gens = Generations.load(site.state_dir)  # rotations move these on; every later run keeps what they made
    ca = site_ca(site, vault)
    cert = server_cert(site, vault, ca, gens.server_cert)
    creds, htpasswd = login(site, vault, gens.credentials)
    return dict(ca=ca, server_cert=cert, htpasswd=htpasswd, http_secret=vault(make_http_secret)()), creds


def put_registry_secret(site: Site, role: str, data: dict[str, SecretStr]) -> None:
    """Write one of the registry's Secrets: in the cluster, or into the running local pod's volume."""
    name = secret_names(site.release)[role]
    if site.target == "local":
        put_local_secret(site.state_dir / "pod", name, data)
    else:
        put_secret(kube_access(site), site.namespace, name, SECRET_TYPES.get(role, "Opaque"), data, site.release)


def publish_login(site: Site, ca_pem: str, creds: Credentials) -> list[str]:
    """Give the login to everyone who uses it: the client bundle (ca.crt, auth.json) and, on
    Kubernetes, the login Secret and the pull Secret of every consumer namespace.
    Returns the namespaces whose pull Secret was written or checked."""
    save_client_bundle(site.state_dir / "client", site.registry.server, ca_pem, creds)
    if site.target == "local":
        return []
    kube, pulls = kube_access(site), site.pull_secrets
    put_secret(kube, site.namespace, secret_names(site.release)["login"], SECRET_TYPES["login"],
               {"username": SecretStr(creds.user), "password": creds.password}, site.release)
    return sorted(put_pull_secrets(kube, pulls.namespaces, pulls.namespace_selector, pulls.name,
                                   SecretStr(creds.auth_json(site.registry.server)), pulls.default_service_account,
                                   site.release))


def storage_and_secrets(site: Site, **secrets) -> tuple[SecretData, dict[str, Path]]:
    """What the registry's pod mounts, made ready: its storage (directory, bucket or volume)
    and its Secrets (on Kubernetes, written to the cluster). Returns the Secrets' content and,
    on the local target, the directory each claim is bound to."""
    storage, names, claims = site.storage, secret_names(site.release), {}
    s3_ca_pem = storage.ca_pem() if isinstance(storage, S3Storage) else None
    if site.target == "local":
        s3_keys = None
        if isinstance(storage, S3Storage):
            keys_file = storage.credentials
            s3_keys = read_s3_keys_file(keys_file.file, keys_file.access_key_key, keys_file.secret_key_key)
            ensure_bucket(storage.endpoint, storage.bucket, storage.region, s3_keys, storage.ca_bundle,
                          storage.skip_verify)
        else:
            claims[data_claim(site.release)] = ensure_directory(site.data_dir)
        return registry_secrets(site.release, **secrets, s3_keys=s3_keys, s3_ca_pem=s3_ca_pem), claims

    kube = kube_access(site)
    create_namespace(kube, site.namespace, site.release)
    if isinstance(storage, S3Storage):
        source = storage.credentials
        s3_keys = copy_s3_credentials(kube, source.namespace, source.name, source.access_key_key,
                                      source.secret_key_key, site.namespace, names["s3"], site.release)
        ensure_bucket(storage.endpoint, storage.bucket, storage.region, s3_keys, storage.ca_bundle, storage.skip_verify)
    elif isinstance(storage, PvcStorage) and storage.host_path:
        volume = storage.host_path
        create_hostpath_volume(kube, site.namespace, data_claim(site.release), volume.path, volume.node,
                               volume.size, site.release)
    contents = registry_secrets(site.release, **secrets, s3_ca_pem=s3_ca_pem)
    for role, name in names.items():
        if name in contents:
            put_registry_secret(site, role, contents[name])
    return contents, claims


def deploy(site: Site, values: dict, manifests: list[dict], contents: SecretData, claims: dict[str, Path],
           changed: bool = False) -> int | None:
    """The chart running: on the local target its rendered `manifests` as the local pod
    (restarted only if its spec changed); on Kubernetes the helm release with `values` (a new
    revision only if chart version or values changed, or the caller saw the manifests differ),
    waited for. Returns the helm revision."""
    if site.target == "local":
        run_local_pod(site.state_dir / "pod", manifests, contents, claims, site.registry.listen)
        return None
    return helm_release(kube_access(site), site.release, site.namespace, values, site.cluster.helm_timeout_seconds,
                        always=changed)
