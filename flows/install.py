"""The install runbook, as a Prefect flow: everything a private registry needs, made once
and kept. A rerun with the same site file changes nothing; a rerun after a crash finishes
the job with the certificates and credentials the first run made (they are cached,
encrypted, under the state directory).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from crflow.oci import SMOKE_REPO
from crflow.settings import load_site
from crflow.vault import open_vault
from flows.steps import deploy, publish_login, site_secrets, storage_and_secrets
from flows.values import chart_values_for
from tasks.helm import render_chart
from tasks.localpod import check_local_host
from tasks.registry import push_pull_check, wait_until_ready
from tasks.report import certificate_rows, publish_summary


@flow(name="install")
def install(site_file: str) -> str:
    """Install (or converge) the registry described by `site_file`; return its address."""
    site = load_site(Path(site_file))
    if site.target == "local":
        check_local_host(site.state_dir / "pod", site.registry.listen)
    vault = open_vault(site.state_dir)
    secrets, creds = site_secrets(site, vault)

    # Storage and the registry's Secrets, then the chart: rendered and run here, or released.
    contents, claims = storage_and_secrets(site, **secrets)
    values = chart_values_for(site, secrets["server_cert"].fingerprint)
    manifests = render_chart(site.release, site.namespace, values) if site.target == "local" else []
    deploy(site, values, manifests, contents, claims)

    # The login goes to its users (client files here; login and pull Secrets on the cluster).
    # Then proof, with the client files a person would use: the registry answers our login
    # over TLS, trusting only our CA, and an image goes in and comes out.
    url = f"https://{site.registry.server}"
    publish_login(site, secrets["ca"].cert_pem, creds)
    bundle = site.state_dir / "client"
    wait_until_ready(url, bundle)
    digest = push_pull_check(url, bundle, SMOKE_REPO, "install")

    publish_summary(
        "crflow-install",
        f"Registry {site.release} installed",
        [("Address", url), ("Target", site.target), ("Storage", site.storage.kind),
         ("Checked image", f"{SMOKE_REPO}@{digest}"), *certificate_rows(secrets["ca"], secrets["server_cert"])],
    )
    return url
