"""One run per site at a time: every crflow flow holds the site's Prefect global concurrency
limit (limit 1) while it runs.

Two runs that overlap break logins: an install during a rotation's grace period hands out
the old login again; two rotations at once leave a retired login valid. So a second run for
the same site waits, up to `runs.wait_seconds`, and then fails with a line naming the run that
holds the site. The slot is a lease the holder renews while it lives: a holder killed with
SIGKILL stops renewing, and the server frees the slot when the lease runs out (60 s, the
shortest lease Prefect's server accepts). Subflows (install inside rotate-cert, verify inside
upgrade) run inside their parent's slot.

    @flow(name="install")
    @one_run_per_site
    def install(site_file: str) -> str: ...
"""

from __future__ import annotations

import contextvars
import functools
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType, FlowRunFilterTags
from prefect.client.schemas.objects import StateType
from prefect.concurrency.sync import concurrency
from prefect.context import get_run_context
from prefect.exceptions import ObjectAlreadyExists

from crflow.errors import CrflowError
from crflow.settings import Site, load_site

LEASE_SECONDS = 60  # the server refuses shorter leases; a killed holder blocks at most this long
_held: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("crflow_sites_held", default=frozenset())


def site_name(site: Site) -> str:
    """How runs, tags and the limit name a site: its release and the address clients use."""
    return f"{site.release}@{site.registry.server}"


def site_tag(site: Site) -> str:
    return f"crflow-site:{site_name(site)}"


def _prepare(name: str, tag: str) -> None:
    """The site's limit exists, and this run carries the site's tag (from the CLI or a worker alike)."""
    run = get_run_context().flow_run
    with get_client(sync_client=True) as client:
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
        except ObjectAlreadyExists:
            pass
        if tag not in run.tags:
            client.update_flow_run(run.id, tags=[*run.tags, tag])


def _holders(site: Site) -> str:
    """The other running crflow runs of this site, for the error line."""
    me = get_run_context().flow_run.id
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            tags=FlowRunFilterTags(all_=[site_tag(site)]),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))))
    names = [f"'{run.name}' ({run.id})" for run in runs if run.id != me]
    return ", ".join(names) or "a run that ended without releasing it (its lease runs out within a minute)"


def one_run_per_site(flow_function):
    """Run the flow holding its site's slot (the first parameter is the site file)."""
    @functools.wraps(flow_function)
    def holding(site_file: str, *args, **kwargs):
        site = load_site(Path(site_file))
        name = f"crflow-site:{site_name(site)}"  # the server refuses / % & < > in names
        if name in _held.get():  # a subflow of the run that holds it
            return flow_function(site_file, *args, **kwargs)
        _prepare(name, site_tag(site))
        slot = concurrency(name, occupy=1, timeout_seconds=site.runs.wait_seconds, lease_duration=LEASE_SECONDS,
                           strict=True)
        try:
            slot.__enter__()
        except TimeoutError:
            raise CrflowError(f"site {site_name(site)} is busy: {_holders(site)} holds it, and it was not free "
                              f"after {site.runs.wait_seconds} s (runs.wait_seconds); try again later") from None
        token = _held.set(_held.get() | {name})
        try:
            return flow_function(site_file, *args, **kwargs)
        finally:
            _held.reset(token)
            slot.__exit__(None, None, None)

    return holding
