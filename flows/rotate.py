"""Rotation, as Prefect flows: a new login that nobody notices, and a renewed server certificate.

rotate-credentials moves the login to a new generation with an overlap in which both work:

  1. new credentials (a new user: htpasswd holds one hash per user);
  2. htpasswd = old entry + new entry; wait until the registry accepts the new login;
  3. push and pull with the new login;
  4. the new login to every consumer: client bundle, login Secret, pull Secrets;
  5. the grace period, for consumers that read their login now and then;
  6. htpasswd = new entry only; wait until the old login gets 401 and the new one works.

Steps 2-6 are one Prefect transaction: if any of them fails, the rollback hooks put back the
previous htpasswd, login Secret, pull Secrets and client bundle, and the old login keeps
working. The new generation is recorded before step 1 and its credentials are cached, so
a rerun after an interruption finishes the same rotation with the same new user.

rotate-cert makes the next server certificate from the same CA and converges the registry to
it (the install flow: TLS Secret, rolled pod), then checks the served certificate.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

from prefect import flow, task
from prefect.transactions import transaction
from pydantic import SecretStr

from crflow.files import remove
from crflow.flows.alerts import emit_rotation_rolled_back
from crflow.flows.install import install
from crflow.flows.site_lock import one_run_per_site, run_name, this_run
from crflow.flows.steps import login, server_cert, site_ca, site_vault
from crflow.generations import Generations
from crflow.oci import SMOKE_REPO
from crflow.tasks.client import save_client_bundle
from crflow.tasks.pki import days_left
from crflow.tasks.registry import check_served_certificate, login_accepted, push_pull_check, wait_for_login
from crflow.tasks.report import certificate_rows, publish_summary


@task(task_run_name="grace period ({seconds} s)")
def grace_period(seconds: int) -> None:
    """Both logins work while consumers that read their login now and then pick up the new one."""
    time.sleep(seconds)


@task(task_run_name="is the old login retired?", retries=2, retry_delay_seconds=2)
def old_login_retired(base_url: str, old_bundle: Path, new_bundle: Path) -> bool:
    """A rerun's question: did an interrupted run already remove the old entry?"""
    return not login_accepted(base_url, old_bundle) and login_accepted(base_url, new_bundle)


def _joined(*lines: SecretStr) -> SecretStr:
    return SecretStr("".join(line.get_secret_value() for line in lines))


@flow(name="rotate-credentials", flow_run_name=run_name)
@one_run_per_site
def rotate_credentials(site_file: str, grace_seconds: int | None = None,
                       renew_cert_within_days: int | None = None) -> int:
    """Rotate the registry login to a new generation with no failed pull; return the generation."""
    run = this_run()
    site, target = run.site, run.target
    grace = site.rotation.grace_seconds if grace_seconds is None else grace_seconds
    timeout = site.rotation.propagation_timeout_seconds
    vault = site_vault(site, target)
    gens = Generations.load(site.state_dir)
    gens = gens.model_copy(update={"rotating_to": gens.rotating_to or gens.credentials + 1,
                                   "rotation_undone": False}).save(site.state_dir)
    started = dt.datetime.now(dt.timezone.utc)

    # 1. The new login (cached: a rerun gets the same one), and both logins as client files.
    ca = site_ca(site, vault, target)
    old, old_line = login(site, vault, gens.credentials)
    new, new_line = login(site, vault, gens.rotating_to)
    url, workdir = target.url, site.state.rotation
    old_bundle = save_client_bundle(workdir / "old", site.client_servers, ca.cert_pem, old)
    new_bundle = save_client_bundle(workdir / "new", site.client_servers, ca.cert_pem, new)
    retired = old_login_retired(url, old_bundle, new_bundle)

    try:
        with transaction():
            if not retired:  # 2. the overlap: both logins work
                target.update_secret("htpasswd", {"htpasswd": _joined(old_line, new_line)})
                wait_for_login(url, new_bundle, True, timeout)
            overlap_started = time.monotonic()
            push_pull_check(url, new_bundle, SMOKE_REPO, f"rotation-{gens.rotating_to}")  # 3.
            namespaces = target.publish_login(ca.cert_pem, new)  # 4.
            if not retired:
                grace_period(grace)  # 5.
            target.update_secret("htpasswd", {"htpasswd": new_line})  # 6.
            wait_for_login(url, old_bundle, False, timeout)
            wait_for_login(url, new_bundle, True, timeout)
    except Exception as err:
        # Rolled back: the old htpasswd is in the Secret again; see the registry take it.
        wait_for_login(url, old_bundle, True, timeout)
        gens.model_copy(update={"rotation_undone": True}).save(site.state_dir)
        emit_rotation_rolled_back(site, gens.credentials, f"{type(err).__name__}: {err}")
        raise
    overlap = f"{time.monotonic() - overlap_started:.1f} s" if not retired else "ended by an earlier run"

    gens = gens.model_copy(update={"credentials": gens.rotating_to, "rotating_to": None}).save(site.state_dir)
    remove(workdir)
    publish_summary(
        "crflow-rotate-credentials",
        f"Registry {site.release}: login rotated to generation {gens.credentials}",
        [("Rotated at", started.strftime("%Y-%m-%d %H:%M:%S UTC")), ("Generation", str(gens.credentials)),
         ("Pull Secrets written or checked", f"{len(namespaces)}: {', '.join(namespaces[:20]) or '-'}"
                                             + (f" and {len(namespaces) - 20} more" if len(namespaces) > 20 else "")),
         ("Overlap (both logins worked)", f"{overlap}, of which grace period {grace} s")],
    )
    if renew_cert_within_days is not None:
        cert = server_cert(site, vault, ca, gens.server_cert)
        if days_left(cert.cert) <= renew_cert_within_days:
            rotate_cert(site_file)
    return gens.credentials


@flow(name="rotate-cert", flow_run_name=run_name)
@one_run_per_site
def rotate_cert(site_file: str) -> str:
    """Renew the server certificate from the same CA, roll the registry onto it, check it is served."""
    run = this_run()
    site, target = run.site, run.target
    gens = Generations.load(site.state_dir)
    if not gens.renewing_cert:  # a rerun after an interruption finishes the same renewal
        gens = gens.model_copy(update={"server_cert": gens.server_cert + 1, "renewing_cert": True})
        gens.save(site.state_dir)
    url = install(site_file)  # the registry converged onto the new certificate, push/pull checked
    vault = site_vault(site, target)
    ca = site_ca(site, vault, target)
    cert = server_cert(site, vault, ca, gens.server_cert)
    check_served_certificate(site.registry.host, site.registry.port, cert.fingerprint)
    gens.model_copy(update={"renewing_cert": False}).save(site.state_dir)
    publish_summary(
        "crflow-rotate-cert",
        f"Registry {site.release}: server certificate renewed (generation {gens.server_cert})",
        [("Address", url), ("Generation", str(gens.server_cert)), *certificate_rows(ca, cert)],
    )
    return cert.fingerprint
