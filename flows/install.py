"""The install runbook, as a Prefect flow: everything a private registry needs, made once
and kept. A rerun with the same site file changes nothing; a rerun after a crash finishes
the job with the certificates and credentials the first run made (they are cached,
encrypted, under the state directory).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from crflow.errors import CrflowError
from crflow.settings import S3Storage, Site, load_site
from crflow.vault import open_vault
from flows.values import chart_values_for
from tasks.client import save_client_bundle
from tasks.credentials import make_credentials, make_htpasswd, make_http_secret
from tasks.helm import data_claim, registry_secrets, render_chart
from tasks.localpod import check_local_host, run_local_pod
from tasks.pki import make_ca, make_server_cert
from tasks.registry import SMOKE_REPO, push_pull_check, wait_until_ready
from tasks.report import certificate_rows, publish_summary
from tasks.storage import ensure_bucket, ensure_directory, read_s3_keys_file


def registry_url(site: Site) -> str:
    return f"https://{site.registry.server}"


@flow(name="install")
def install(site_file: str) -> str:
    """Install (or converge) the registry described by `site_file`; return its address."""
    site = load_site(Path(site_file))
    if site.target != "local":
        raise CrflowError("target: kubernetes is not supported yet; use target: local")
    pod_dir = site.state_dir / "pod"
    check_local_host(pod_dir, site.registry.listen)
    vault = open_vault(site.state_dir)

    # TLS: a long-lived CA, and a server certificate for the addresses clients use.
    ca = vault(make_ca)(f"crflow {site.release} CA", days=site.tls.ca_days, key_algorithm=site.tls.key_algorithm)
    server_cert = vault(make_server_cert)(
        ca, site.registry.ips, site.registry.dns_names, days=site.tls.server_days, key_algorithm=site.tls.key_algorithm
    )

    # Login: a user with a random password, bcrypt-hashed into htpasswd.
    creds = vault(make_credentials)(site.auth.user)
    htpasswd = vault(make_htpasswd)(creds, cost=site.auth.bcrypt_cost)
    http_secret = vault(make_http_secret)()

    # Storage: a directory on this machine, or a bucket in S3.
    storage, s3_keys, claims = site.storage, None, {}
    if isinstance(storage, S3Storage):
        creds_file = storage.credentials
        s3_keys = read_s3_keys_file(creds_file.file, creds_file.access_key_key, creds_file.secret_key_key)
        ensure_bucket(storage.endpoint, storage.bucket, storage.region, s3_keys, storage.ca_bundle, storage.skip_verify)
    else:
        claims[data_claim(site.release)] = ensure_directory(site.data_dir)

    # The chart, rendered for these settings, run as a local process.
    values = chart_values_for(site, server_cert.fingerprint)
    manifests = render_chart(site.release, site.namespace, values)
    secrets = registry_secrets(
        site.release, ca=ca, server_cert=server_cert, htpasswd=htpasswd, http_secret=http_secret,
        s3_keys=s3_keys, s3_ca_pem=storage.ca_pem() if isinstance(storage, S3Storage) else None,
    )
    run_local_pod(pod_dir, manifests, secrets, claims, site.registry.listen)

    # Proof: the registry answers our login over TLS, and an image goes in and comes out.
    url = registry_url(site)
    wait_until_ready(url, ca.cert_pem, creds)
    digest = push_pull_check(url, ca.cert_pem, creds, SMOKE_REPO, "install")

    save_client_bundle(site.state_dir / "client", site.registry.server, ca.cert_pem, creds)
    publish_summary(
        "crflow-install",
        f"Registry {site.release} installed",
        [("Address", url), ("Target", site.target), ("Storage", storage.kind),
         ("Checked image", f"{SMOKE_REPO}@{digest}"), *certificate_rows(ca, server_cert)],
    )
    return url

