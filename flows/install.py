"""The install runbook, as a Prefect flow: everything a private registry needs, made once
and kept. A rerun with the same site file changes nothing; a rerun after a crash finishes
the job with the certificates and credentials the first run made (they are cached,
encrypted, under the state directory).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from crflow.generations import Generations
from crflow.oci import SMOKE_REPO
from crflow.settings import PvcStorage, S3Storage, Site, load_site
from crflow.vault import open_vault
from flows.steps import login, publish_login, server_cert, site_ca
from flows.values import chart_values_for, kube_access
from tasks.credentials import make_http_secret
from tasks.helm import SECRET_TYPES, data_claim, helm_release, registry_secrets, render_chart, secret_names
from tasks.kube import copy_s3_credentials, create_hostpath_volume, create_namespace, put_secret
from tasks.localpod import check_local_host, run_local_pod
from tasks.registry import push_pull_check, wait_until_ready
from tasks.report import certificate_rows, publish_summary
from tasks.storage import ensure_bucket, ensure_directory, read_s3_keys_file


@flow(name="install")
def install(site_file: str) -> str:
    """Install (or converge) the registry described by `site_file`; return its address."""
    site = load_site(Path(site_file))
    if site.target == "local":
        check_local_host(site.state_dir / "pod", site.registry.listen)
    vault = open_vault(site.state_dir)
    gens = Generations.load(site.state_dir)  # rotations move these on; an install keeps what they made

    # TLS: a long-lived CA, and a server certificate for the addresses clients use.
    ca = site_ca(site, vault)
    cert = server_cert(site, vault, ca, gens.server_cert)

    # Login: a user with a random password, bcrypt-hashed into htpasswd.
    creds, htpasswd = login(site, vault, gens.credentials)
    http_secret = vault(make_http_secret)()

    secrets = dict(ca=ca, server_cert=cert, htpasswd=htpasswd, http_secret=http_secret)
    if site.target == "local":
        on_this_machine(site, **secrets)
    else:
        on_the_cluster(site, **secrets)

    # The login goes to its users (client files here; login and pull Secrets on the cluster).
    # Then proof, with the client files a person would use: the registry answers our login
    # over TLS, trusting only our CA, and an image goes in and comes out.
    url = f"https://{site.registry.server}"
    publish_login(site, ca.cert_pem, creds)
    bundle = site.state_dir / "client"
    wait_until_ready(url, bundle)
    digest = push_pull_check(url, bundle, SMOKE_REPO, "install")

    publish_summary(
        "crflow-install",
        f"Registry {site.release} installed",
        [("Address", url), ("Target", site.target), ("Storage", site.storage.kind),
         ("Checked image", f"{SMOKE_REPO}@{digest}"), *certificate_rows(ca, cert)],
    )
    return url


def on_this_machine(site: Site, **secrets) -> None:
    """Local target: storage here, the chart rendered, its pod run as a local process."""
    storage, s3_keys, claims = site.storage, None, {}
    if isinstance(storage, S3Storage):
        keys_file = storage.credentials
        s3_keys = read_s3_keys_file(keys_file.file, keys_file.access_key_key, keys_file.secret_key_key)
        ensure_bucket(storage.endpoint, storage.bucket, storage.region, s3_keys, storage.ca_bundle, storage.skip_verify)
    else:
        claims[data_claim(site.release)] = ensure_directory(site.data_dir)

    manifests = render_chart(site.release, site.namespace, chart_values_for(site, secrets["server_cert"].fingerprint))
    contents = registry_secrets(site.release, **secrets, s3_keys=s3_keys,
                                s3_ca_pem=storage.ca_pem() if isinstance(storage, S3Storage) else None)
    run_local_pod(site.state_dir / "pod", manifests, contents, claims, site.registry.listen)


def on_the_cluster(site: Site, **secrets) -> None:
    """Kubernetes target: namespace, storage, the registry's Secrets, then the helm release."""
    kube = kube_access(site)
    names, storage, s3_keys = secret_names(site.release), site.storage, None
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

    contents = registry_secrets(site.release, **secrets,
                                s3_ca_pem=storage.ca_pem() if isinstance(storage, S3Storage) else None)
    for role, name in names.items():
        if name in contents:
            put_secret(kube, site.namespace, name, SECRET_TYPES.get(role, "Opaque"), contents[name], site.release)

    values = chart_values_for(site, secrets["server_cert"].fingerprint)
    helm_release(kube, site.release, site.namespace, values, site.cluster.helm_timeout_seconds)
