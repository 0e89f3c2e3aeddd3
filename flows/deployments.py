"""`crflow deploy`: a site's Prefect deployments, bound to its site file, and its alerts.

    deploy_site(site, site_file, pool="crflow")   # idempotent: a rerun updates them
    remove_site(site)

Each deployment is named after the site (`install/registry@192.168.86.201:9005`) and carries
its tag, so two sites on one Prefect server stay apart. The flows are found by module path
(`crflow.flows.install.install`): a worker needs crflow installed, not this checkout at the
path it was deployed from.

A `process` pool's runs read the site file at its absolute path on the worker's machine. A
`kubernetes` pool's runs are Jobs from deployments/base-job-template.json: each names its site
file by its file name, found under $CRFLOW_SITES, where the job mounts the `crflow-sites`
ConfigMap; the state comes from the cluster and the result key from the `crflow-result-key`
Secret, so any Job carries on where the last run stopped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from prefect import Flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import DeploymentUpdate, WorkPoolCreate
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterTags
from prefect.client.schemas.schedules import CronSchedule
from prefect.exceptions import ObjectAlreadyExists
from prefect.types.entrypoint import EntrypointType

from crflow.errors import CrflowError
from crflow.flows.alerts import apply_alerts, remove_alerts
from crflow.flows.gc import gc
from crflow.flows.install import install
from crflow.flows.rotate import rotate_cert, rotate_credentials
from crflow.flows.site_lock import site_name, site_tag
from crflow.flows.upgrade import upgrade
from crflow.flows.verify import verify
from crflow.resources import packaged
from crflow.settings import Schedules, Site

PoolType = Literal["process", "kubernetes"]
# Without a pull step, `prefect flow-run execute` copies its whole working directory into the
# run's workspace (in the flow image: /opt/crflow with its virtualenv, on every run). This one
# only settles in the empty workspace: the flows are imported from the installed package.
PULL_STEPS = [{"prefect.deployments.steps.set_working_directory": {"directory": "."}}]


@dataclass(frozen=True)
class Deployed:
    pool: str
    deployments: list[str]  # FLOW/NAME, with their schedules
    automations: int
    site_file: str  # as the runs name it


def _schedule(cron: str | None, timezone: str) -> list[CronSchedule]:
    return [CronSchedule(cron=cron, timezone=timezone)] if cron else []


def deployment_plan(every: Schedules) -> list[tuple[Flow, dict, list[CronSchedule], str]]:
    """Each deployment of a site: (flow, parameters besides site_file, schedules, what it is for).
    prefect.yaml holds the same deployments, with the default schedules (a test compares them)."""
    return [
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


def job_template(path: Path | None) -> dict:
    """The kubernetes pool's base job template: `path`, else the one crflow ships."""
    path = path or packaged("deployments", "base-job-template.json")
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CrflowError(f"no job template at {path}: pass --job-template deployments/base-job-template.json "
                          "from crflow's source") from None
    except ValueError:
        raise CrflowError(f"{path} is not JSON: it should be a Prefect base job template") from None


def ensure_pool(pool: str, pool_type: PoolType = "process", template: dict | None = None) -> None:
    """A work pool named `pool` of `pool_type`, made if missing. An existing pool of that type is
    kept as it is (its template may have been edited); one of another type is an error."""
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=pool, type=pool_type, base_job_template=template or {}))
            return
        except ObjectAlreadyExists:
            found = client.read_work_pool(pool).type
    if found != pool_type:
        raise CrflowError(f"work pool {pool} is a {found} pool, not {pool_type}; name another with --pool")


def deploy_site(site: Site, site_file: Path, pool: str, pool_type: PoolType = "process",
                template: Path | None = None, image: str | None = None) -> Deployed:
    kubernetes = pool_type == "kubernetes"
    ensure_pool(pool, pool_type, job_template(template) if kubernetes else None)
    name, every = site_name(site), site.schedules
    # A Job finds the site file by its name in the mounted ConfigMap; a process worker by its path here.
    bound = {"site_file": site_file.name if kubernetes else str(site_file.resolve())}
    names = []
    for flow, extra, schedules, description in deployment_plan(every):
        deployment = flow.to_deployment(
            name=name, parameters={**bound, **extra}, schedules=schedules, description=description,
            tags=["crflow", site_tag(site)], entrypoint_type=EntrypointType.MODULE_PATH,
            job_variables={"image": image} if image else None)
        deployment_id = deployment.apply(work_pool_name=pool)
        with get_client(sync_client=True) as client:
            client.update_deployment(deployment_id, DeploymentUpdate(pull_steps=PULL_STEPS))
        names.append(f"{flow.name}/{name}" + (f" ({schedules[0].cron} {every.timezone})" if schedules else ""))
    return Deployed(pool, names, apply_alerts(site), bound["site_file"])


def remove_site(site: Site) -> tuple[int, int]:
    """Delete the site's deployments (found by its tag) and automations: (deployments, automations)."""
    with get_client(sync_client=True) as client:
        mine = client.read_deployments(deployment_filter=DeploymentFilter(
            tags=DeploymentFilterTags(all_=[site_tag(site)])))
        for deployment in mine:
            client.delete_deployment(deployment.id)
    return len(mine), remove_alerts(site)
