"""Steps several flows share: the cached secrets of a generation, and where they are written
(the registry's Secrets, the login's consumers) on either target."""

from __future__ import annotations

from pydantic import SecretStr

from crflow.settings import Site
from crflow.vault import Vault
from flows.values import kube_access
from tasks.client import save_client_bundle
from tasks.consumers import put_pull_secrets
from tasks.credentials import Credentials, make_credentials, make_htpasswd
from tasks.helm import SECRET_TYPES, secret_names
from tasks.kube import put_secret
from tasks.localpod import put_local_secret
from tasks.pki import KeyPair, make_ca, make_server_cert


def site_ca(site: Site, vault: Vault) -> KeyPair:
    return vault(make_ca)(f"crflow {site.release} CA", days=site.tls.ca_days, key_algorithm=site.tls.key_algorithm)


def server_cert(site: Site, vault: Vault, ca: KeyPair, generation: int) -> KeyPair:
    return vault(make_server_cert)(ca, site.registry.ips, site.registry.dns_names, days=site.tls.server_days,
                                   key_algorithm=site.tls.key_algorithm, generation=generation)


def login(site: Site, vault: Vault, generation: int) -> tuple[Credentials, SecretStr]:
    """The credentials of one generation and their htpasswd line."""
    creds = vault(make_credentials)(site.auth.user, generation)
    return creds, vault(make_htpasswd)(creds, cost=site.auth.bcrypt_cost)


def put_registry_secret(site: Site, role: str, data: dict[str, SecretStr]) -> None:
    """Change one Secret the registry's pod mounts: in the cluster, or in the local pod's volume."""
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
