"""The nightly smoke check, as the runbook did it by hand: push an image, pull it back,
see it listed, see its data in the bucket (not on a pod's disk), then clean up. Every check
is timed; the run's artifacts say which passed, how fast, and how long the certificates last.
It uses the client files crflow wrote (ca.crt, auth.json), as any client of the registry would.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from cryptography import x509
from prefect import flow

from crflow.errors import CrflowError, StorageFailure
from crflow.flows.alerts import emit_certificate_days
from crflow.flows.site_lock import one_run_per_site, run_name, site_slug, this_run
from crflow.health import mirror_health
from crflow.oci import SMOKE_REPO, served_certificate
from crflow.settings import Mirror
from crflow.tasks.pki import days_left
from crflow.tasks.registry import (
    copy_source_image,
    delete_by_digest,
    listed_in_catalog,
    pull_and_compare,
    pull_everything,
    pull_twice,
    push_unique_image,
    unlink_blobs,
)
from crflow.tasks.report import Checks
from crflow.tasks.storage import check_pod_storage
from crflow.tasks.usage import publish_usage, registry_usage


@flow(name="verify-push-pull", flow_run_name=run_name)
@one_run_per_site
def verify(site_file: str, source_image: str | None = None, source_ca: str | None = None,
           source_authfile: str | None = None) -> str:
    """Check that the registry of `site_file` takes, serves and stores images; fail if not.
    With `source_image` (host/repo:tag), first copy that image from its registry and check it too."""
    run = this_run()
    site, target = run.site, run.target
    store = target.store
    url, bundle = target.url, target.client_bundle()
    with Checks(f"Registry {site.release} verified", site.registry.server, verify_table_key(site)) as checks:
        server_days, ca_days = certificate_days(site.registry.host.strip("[]"), site.registry.port, bundle / "ca.crt")
        checks.figures.update({"server cert days left": "not served" if server_days is None else str(server_days),
                               "CA days left": "no CA file" if ca_days is None else str(ca_days)})
        emit_certificate_days(site, server_days, ca_days)
        try:
            pushed = checks.check("push a new image", push_unique_image, url, bundle, SMOKE_REPO)
        except StorageFailure as err:
            if (diagnosis := store.diagnose(str(err))) is not None:
                checks.check(diagnosis.name, diagnosis.task, *diagnosis.arguments)
            raise
        deleted = False
        try:
            pull_seconds = checks.check("pull it back, every digest equal", pull_and_compare, url, bundle, pushed)
            mib = pushed.bytes / 2**20
            checks.figures.update({"push MiB/s": f"{mib / pushed.seconds:.0f}", "pull MiB/s": f"{mib / pull_seconds:.0f}"})
            checks.check("catalog and tags list it", listed_in_catalog, url, bundle, pushed.repo, pushed.tag)
            if source_image:
                copied = checks.check(f"copy {source_image}", copy_source_image, source_image,
                                      source_ca and Path(source_ca), source_authfile and Path(source_authfile),
                                      url, bundle, f"{SMOKE_REPO}/source")
                checks.check("pull the copy back", pull_everything, url, bundle, copied.repo, copied.digest)

            checks.check("the pod stores blobs where the site says", check_pod_storage, target.running_pod(),
                         store.kind, store.bucket)
            # Where the layer landed (the bucket, the directory); on a cluster, a pod's pull of it.
            for check in store.checks(pushed.blobs[-1]) + target.checks(pushed):
                checks.check(check.name, check.task, *check.arguments)
            checks.check("delete it by digest", delete_by_digest, url, bundle, pushed.repo, pushed.digest)
            deleted = True
        finally:
            if not deleted:  # a failed check must not leave its image behind for the next gc to find
                with contextlib.suppress(CrflowError, ConnectionError):
                    delete_by_digest(url, bundle, pushed.repo, pushed.digest)
        checks.check("unlink its blobs (gc frees them)", unlink_blobs, url, bundle, pushed.repo, pushed.digest,
                     pushed.blobs)
        if source_image:
            checks.check("delete the copy by digest", delete_by_digest, url, bundle, copied.repo, copied.digest)
        for mirror in site.mirrors:
            server = site.mirror_server(mirror)
            checks.check(f"mirror {mirror.name} answers, its upstream answers and takes its login", mirror_answers,
                         mirror, server, bundle)
            if mirror.probe:
                repo, tag = mirror.probe.rsplit(":", 1)
                checks.check(f"pull {mirror.probe} through mirror {mirror.name} twice", pull_twice,
                             f"https://{server}", bundle, repo, tag)
    report_usage(site, url, bundle)
    return f"{url}: all checks passed"


def mirror_answers(mirror: Mirror, server: str, bundle: Path) -> str:
    """(Not a task: it reads the mirror's login reference, and a task's inputs are its cache key.)"""
    health = mirror_health(mirror, server, bundle)
    if not health.healthy:
        raise CrflowError(health.detail)
    return health.detail


def report_usage(site, url: str, bundle: Path) -> int:
    """What the registry stores, per repository, and its growth: the site's usage table."""
    return publish_usage(registry_usage(url, bundle, site.state.usage_cache),
                         f"crflow-usage-{site_slug(site)}", site.registry.server)


def verify_table_key(site) -> str:
    """The key of the site's verify table: one per site, so sites on one server stay apart."""
    return f"crflow-verify-{site_slug(site)}"


def certificate_days(host: str, port: int, ca_file: Path) -> tuple[int | None, int | None]:
    """Days left on the served certificate and the CA, as far as they can be read (None where
    not): a failed run's row still says how long the certificates last."""
    try:
        server = days_left(served_certificate(host, port))
    except (OSError, ValueError):
        server = None
    try:
        ca = days_left(x509.load_pem_x509_certificate(ca_file.read_bytes()))
    except (OSError, ValueError):
        ca = None
    return server, ca
