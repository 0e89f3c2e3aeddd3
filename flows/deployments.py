"""`crflow deploy`: a site's Prefect deployments, bound to its site file, and its alerts.

    deploy_site(site, site_file, pool="crflow")   # idempotent: a rerun updates them
    remove_site(site)

Each deployment is named after the site (`install/registry@192.168.86.201:9005`) and carries
its tag, so two sites on one Prefect server stay apart. The flows are found by module path
(`crflow.flows.install.install`): a worker needs crflow installed, not this checkout at the
path it was deployed from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterTags
from prefect.client.schemas.schedules import CronSchedule
from prefect.exceptions import ObjectAlreadyExists
from prefect.types.entrypoint import EntrypointType

from crflow.flows.alerts import apply_alerts, remove_alerts
from crflow.flows.gc import gc
from crflow.flows.install import install
from crflow.flows.rotate import rotate_cert, rotate_credentials
from crflow.flows.site_lock import site_name, site_tag
from crflow.flows.upgrade import upgrade
from crflow.flows.verify import verify
from crflow.settings import Site


@dataclass(frozen=True)
class Deployed:
    pool: str
    deployments: list[str]  # FLOW/NAME, with their schedules
    automations: int


def _schedule(cron: str | None, timezone: str) -> list[CronSchedule]:
    return [CronSchedule(cron=cron, timezone=timezone)] if cron else []


def ensure_pool(pool: str) -> None:
    """A process work pool named `pool`, made if missing (an existing pool of any type is kept)."""
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        except ObjectAlreadyExists:
            pass


def deploy_site(site: Site, site_file: Path, pool: str) -> Deployed:
    ensure_pool(pool)
    name, every = site_name(site), site.schedules
    bound = {"site_file": str(site_file.resolve())}
    plan = [  # (flow, extra parameters, schedules, what it is for)
        (install, {}, [], "Install the registry, or bring it back to the site file (on demand)."),
        (verify, {}, _schedule(every.verify, every.timezone),
         "The smoke check: push, pull, catalog, storage, pull secret, delete."),
        (rotate_credentials, {"renew_cert_within_days": 30}, _schedule(every.rotate_credentials, every.timezone),
         "A new login, handed to every consumer with an overlap (and a new server certificate near its end)."),
        (rotate_cert, {}, [], "Renew the server certificate from the same CA (on demand)."),
        (upgrade, {"dry_run": True}, [], "The diff first; run with dry_run false to apply it (on demand)."),
        (gc, {}, _schedule(every.gc, every.timezone),
         "Retention, then garbage collection in a read-only window (pulls keep working)."),
    ]
    names = []
    for flow, extra, schedules, description in plan:
        deployment = flow.to_deployment(
            name=name, parameters={**bound, **extra}, schedules=schedules, description=description,
            tags=["crflow", site_tag(site)], entrypoint_type=EntrypointType.MODULE_PATH)
        deployment.apply(work_pool_name=pool)
        names.append(f"{flow.name}/{name}" + (f" ({schedules[0].cron} {every.timezone})" if schedules else ""))
    return Deployed(pool, names, apply_alerts(site))


def remove_site(site: Site) -> tuple[int, int]:
    """Delete the site's deployments (found by its tag) and automations: (deployments, automations)."""
    with get_client(sync_client=True) as client:
        mine = client.read_deployments(deployment_filter=DeploymentFilter(
            tags=DeploymentFilterTags(all_=[site_tag(site)])))
        for deployment in mine:
            client.delete_deployment(deployment.id)
    return len(mine), remove_alerts(site)
