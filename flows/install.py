"""The install runbook, as a Prefect flow: everything a private registry needs, made once
and kept. A rerun with the same site file changes nothing; a rerun after a crash finishes
the job with the certificates and credentials the first run made (they are cached,
encrypted, under the state directory).
"""

from __future__ import annotations

from prefect import flow

from crflow.chart import values_for
from crflow.flows.site_lock import one_run_per_site, run_name, this_run
from crflow.flows.steps import site_secrets, site_vault, storage_and_secrets
from crflow.oci import SMOKE_REPO
from crflow.tasks.helm import publish_chart, render_chart
from crflow.tasks.registry import push_pull_check, wait_until_ready
from crflow.tasks.report import certificate_rows, publish_summary


@flow(name="install", flow_run_name=run_name)
@one_run_per_site
def install(site_file: str, new_ca: bool = False) -> str:
    """Install (or converge) the registry described by `site_file`; return its address.
    `new_ca`: replace the site's CA (every client and node must then trust the new one)."""
    run = this_run()
    site, target = run.site, run.target
    target.check_host()
    secrets = site_secrets(site, site_vault(site, target), target, new_ca)

    # Storage and the registry's Secrets, then the chart: run here as a pod, or released by helm.
    contents = storage_and_secrets(site, target, secrets)
    values = values_for(site, secrets.server_cert.fingerprint)
    target.deploy(values, render_chart(site.release, site.namespace, values, target.kube_version()), contents)

    # The login goes to its users (client files; on the cluster, login and pull Secrets).
    # Then proof, with the client files a person would use: the registry answers our login
    # over TLS, trusting only our CA, and an image goes in and comes out.
    target.publish_login(secrets.ca.cert_pem, secrets.creds)
    wait_until_ready(target.url, target.bundle)
    digest = push_pull_check(target.url, target.bundle, SMOKE_REPO, "install")
    # The chart itself, as an OCI artifact in the registry it runs: others pull it from here.
    chart = publish_chart(site.registry.server, target.bundle)

    publish_summary(
        "crflow-install",
        f"Registry {site.release} installed",
        [("Address", target.url), ("Target", site.target), ("Storage", site.storage.kind),
         ("Checked image", f"{SMOKE_REPO}@{digest}"), ("Chart", f"helm pull {chart}"), *certificate_rows(secrets.ca, secrets.server_cert)],
    )
    return target.url
