"""One run per site at a time: every crflow flow holds the site's Prefect global concurrency
limit (limit 1) while it runs, and, holding it, fetches the site's state from where its target
keeps it (the cluster) and pushes every change back.

Two runs that overlap break logins: an install during a rotation's grace period hands out
the old login again; two rotations at once leave a retired login valid. So a second run for
the same site waits, up to `runs.wait_seconds`, and then fails with a line naming the run that
holds the site. The slot is a lease the holder renews while it lives: a holder killed with
SIGKILL stops renewing, and the server frees the slot when the lease runs out (60 s, the
shortest lease Prefect's server accepts). A holder on this machine also leaves its lease in
`state_dir/site.lock`; the next run that finds that process gone releases the lease at once
instead of waiting it out. Subflows (install inside rotate-cert, verify inside upgrade) run
inside their parent's slot.

    @flow(name="install", flow_run_name=run_name)
    @one_run_per_site
    def install(site_file: str) -> str: ...
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import httpx
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType, FlowRunFilterTags
from prefect.client.schemas.objects import ConcurrencyLeaseHolder, StateType
from prefect.context import FlowRunContext, get_run_context
from prefect.events import emit_event
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound, TerminationSignal
from prefect.logging import get_run_logger

from crflow import layout
from crflow.errors import CrflowError, in_chain
from crflow.files import write_atomic
from crflow.runcontext import RunContext, open_run, running
from crflow.settings import Site, load_site
from crflow.targets import HoldsState, target_for

LEASE_SECONDS = 60  # the server refuses shorter leases; a killed holder elsewhere blocks at most this long
_held: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("crflow_sites_held", default=frozenset())


def site_name(site: Site) -> str:
    """How runs, tags and the limit name a site: its release and the address clients use."""
    return f"{site.release}@{site.registry.server}"


def site_tag(site: Site) -> str:
    return f"crflow-site:{site_name(site)}"


def site_slug(site: Site) -> str:
    """The site's name where only lower-case letters, digits and dashes are allowed (artifact
    keys, block names)."""
    return "".join(c if c.isalnum() else "-" for c in site_name(site).lower()).strip("-")


def _release_dead_holder(client, lock: Path) -> None:
    """If the holder recorded in `lock` was a process of this boot that is gone, free its lease."""
    found = layout.lock_holder(lock.parent)
    if found is None or found[1]:
        return  # none, or alive (or on another boot: its lease decides)
    holder = found[0]
    with contextlib.suppress(ObjectNotFound, httpx.HTTPStatusError):
        client.release_concurrency_slots_with_lease(UUID(holder["lease"]))
    lock.unlink(missing_ok=True)


def _acquire(client, name: str, holder: ConcurrencyLeaseHolder, wait_seconds: float) -> UUID:
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            response = client.increment_concurrency_slots_with_lease(
                names=[name], slots=1, mode="concurrency", lease_duration=LEASE_SECONDS, holder=holder)
            return UUID(response.json()["lease_id"])
        except httpx.HTTPStatusError as err:
            if err.response.status_code != 423:  # 423: every slot is taken
                raise
            retry = float(err.response.headers.get("Retry-After") or 1)
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(name)
        time.sleep(min(max(retry, 0.2), left))


def heartbeat(run) -> None:
    """The flow run's heartbeat, the event Prefect's zombie automations watch for. The lease
    renewer sends it, so the CLI can switch off Prefect's own heartbeat thread, whose
    one-second sleeps hold every run's end up to a second."""
    resource = {"prefect.resource.id": f"prefect.flow-run.{run.id}", "prefect.resource.name": run.name or ""}
    related = [{"prefect.resource.id": f"prefect.flow.{run.flow_id}", "prefect.resource.role": "flow"}]
    emit_event("prefect.flow-run.heartbeat", resource=resource, related=related)


@contextlib.contextmanager
def _slot(name: str, site: Site) -> Iterator[None]:
    """Hold the site's slot: acquired (or TimeoutError), renewed while held, released after."""
    run = get_run_context().flow_run
    lock = site.state.lock  # this machine's holder: its lease, pid and boot
    with get_client(sync_client=True) as client:
        with contextlib.suppress(ObjectAlreadyExists):
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
        _release_dead_holder(client, lock)
        lease = _acquire(client, name, ConcurrencyLeaseHolder(type="flow_run", id=run.id), site.runs.wait_seconds)
    try:
        layout.claim(site.state_dir)  # before the first write: what was there before crflow
        write_atomic(lock, json.dumps({"lease": str(lease), "pid": os.getpid(), "boot": layout.boot_id(),
                                       "flow_run": str(run.id)}).encode(), 0o600)
    except BaseException:  # (a full disk): the slot goes back at once, not when its lease runs out
        with get_client(sync_client=True) as client, contextlib.suppress(ObjectNotFound, httpx.HTTPStatusError):
            client.release_concurrency_slots_with_lease(lease)
        raise
    done = threading.Event()

    def renew() -> None:
        with get_client(sync_client=True) as client:
            while not done.wait(LEASE_SECONDS / 3):
                with contextlib.suppress(httpx.HTTPError):  # a missed renewal is retried at the next tick
                    client.renew_concurrency_lease(lease, lease_duration=LEASE_SECONDS)
                heartbeat(run)

    heartbeat(run)
    renewer = threading.Thread(target=contextvars.copy_context().run, args=(renew,), name="crflow-site-lease",
                               daemon=True)
    renewer.start()
    try:
        yield
    finally:
        done.set()
        renewer.join(timeout=5)
        lock.unlink(missing_ok=True)
        with get_client(sync_client=True) as client, contextlib.suppress(ObjectNotFound, httpx.HTTPStatusError):
            client.release_concurrency_slots_with_lease(lease)


def run_name() -> str:
    """Every crflow flow's `flow_run_name`: `install registry@HOST:PORT`. Prefect names the run
    with it before its first console line, whether the CLI or a worker started it, so the
    terminal, the UI and the alerts say the same name."""
    context = FlowRunContext.get()
    site_file = context.parameters["site_file"]
    try:
        return f"{context.flow.name} {site_name(load_site(Path(site_file)))}"
    except CrflowError:  # the run then fails on the site file; its name still says which file
        return f"{context.flow.name} {Path(site_file).name}"


def _tag_run(site: Site) -> None:
    """This run carries the site's tag, whether the CLI (which tags it at creation) or a worker started it."""
    run, tag = get_run_context().flow_run, site_tag(site)
    if tag in run.tags:
        return
    tags = [*run.tags, tag]
    with get_client(sync_client=True) as client:
        client.update_flow_run(run.id, tags=tags)
    run.tags = tags  # the engine's copy, which its state events (Failed...) are made from


def _holders(site: Site) -> str:
    """The other running crflow runs of this site, for the error line."""
    me = get_run_context().flow_run.id
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            tags=FlowRunFilterTags(all_=[site_tag(site)]),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))))
    names = [f"'{run.name}' ({run.id})" for run in runs if run.id != me]
    return ", ".join(names) or "a run that ended without releasing it (its lease runs out within a minute)"


@contextlib.contextmanager
def _state_held(run: RunContext) -> Iterator[None]:
    """The site's state fetched from where its target holds it, and every change pushed back at
    once (and once more at the end, for cache records no change of generation announced)."""
    target = run.target
    if not isinstance(target, HoldsState):  # its state is state_dir, and nowhere else
        yield
        return
    target.fetch_state()
    run.keep_state = target.keep_state
    try:
        yield
    except Exception:  # (not on SIGTERM or ^C: every change was pushed as it was made; end promptly)
        try:
            target.keep_state()
        except Exception as err:  # the run's own error is the one to report; this one is logged
            get_run_logger().warning("the site's state was not pushed after the failure: %s", err)
        raise
    finally:
        run.keep_state = None
    target.keep_state()


def this_run() -> RunContext:
    """The run a flow's steps belong to: its site and the one target built for it."""
    return open_run("a crflow flow")


def _check_registered(site_file: str) -> None:
    """A run of a deployment uses the site file its deployment was bound to, or one `crflow
    deploy` registered on this machine: whoever can start runs on the Prefect server cannot
    point crflow (as root, perhaps) at a site file of their choosing."""
    from crflow.runtime import deployed_sites

    run = get_run_context().flow_run
    if run.deployment_id is None:  # the CLI, run by whoever may run crflow here
        return
    with get_client(sync_client=True) as client:
        bound = client.read_deployment(run.deployment_id).parameters.get("site_file")
    if site_file != bound and str(Path(site_file).resolve()) not in (deployed_sites() or []):
        raise CrflowError(f"this run's site_file {site_file!r} is not the one its deployment was bound to, nor one "
                          "crflow deploy registered here; register it with crflow deploy -c SITE_FILE")


def one_run_per_site(flow_function):
    """Run the flow holding its site's slot (the first parameter is the site file)."""
    @functools.wraps(flow_function)
    def holding(site_file: str, *args, **kwargs):
        site = load_site(Path(site_file))
        name = f"crflow-site:{site_name(site)}"  # the server refuses / % & < > in names
        if name in _held.get():  # a subflow of the run that holds it
            return flow_function(site_file, *args, **kwargs)
        _check_registered(site_file)
        _tag_run(site)
        slot = _slot(name, site)
        try:
            slot.__enter__()
        except TimeoutError:
            raise CrflowError(f"site {site_name(site)} is busy: {_holders(site)} holds it, and it was not free "
                              f"after {site.runs.wait_seconds} s (runs.wait_seconds); try again later") from None
        token = _held.set(_held.get() | {name})
        try:

            with running(RunContext(site, target_for(site))) as run, _state_held(run):
                return flow_function(site_file, *args, **kwargs)
        except Exception as err:
            # Prefect 3.9 raises the SIGTERM as TerminationSignal where it lands; landing while
            # Prefect sets up a task run, it is replaced by the crash handler's own ValueError
            # ("Task run is not set"). Raised again, the run ends Crashed, and crflow on the signal.
            terminated = in_chain(err, TerminationSignal)
            if terminated is not None:
                raise terminated from None
            raise
        finally:
            _held.reset(token)
            layout.note_made(site.state_dir)
            slot.__exit__(None, None, None)

    return holding
