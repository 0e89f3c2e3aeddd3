"""The runbook backwards, as a Prefect flow: the registry goes, and with it what crflow handed
out (node-trust files, pull Secrets, this machine's `crflow trust` files). The stored images,
the CA and the logins stay unless `purge`: a reinstall then serves the same images to clients
that still trust the same CA.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from prefect import flow, task

from crflow import layout
from crflow.flows.site_lock import one_run_per_site, run_name, this_run
from crflow.settings import Site
from crflow.targets import target_for
from crflow.tasks.report import publish_summary
from crflow.trust import trust, trusted


@dataclass(frozen=True)
class Uninstalled:
    """What an uninstall removed and what it left, a line each."""

    removed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


@task(task_run_name="remove what crflow made in {state_dir}")
def purge_state(state_dir: Path) -> Uninstalled:
    """The state directory's entries crflow made (the CA, the logins, the cache, the client
    files), gone for good, and the folder if nothing else is in it; what stayed is said."""
    removed, left = layout.purge(state_dir)
    return Uninstalled([f"the state directory {state_dir} ({', '.join(removed)})"] if removed else [], left)


@task(task_run_name="undo crflow trust on this machine")
def untrust_this_machine(site: Site) -> list[str]:
    """Every `crflow trust` this site recorded, undone."""
    removed = []
    for runtime, root in trusted(site):
        removed += [f"{runtime}: {line}" for line in trust(site, runtime, root, remove=True)]
    return removed


def removal_plan(site: Site, purge: bool) -> list[str]:
    """What `uninstall` will remove, for the confirmation (reads only local files)."""
    plan = target_for(site).removal_plan(purge)
    plan += [f"crflow trust files on this machine ({runtime} under {root})" for runtime, root in trusted(site)]
    if purge:
        layout.check_purgeable(site.state_dir)  # before anything is asked or removed
        plan.append(f"what crflow made in the state directory {site.state_dir}: the CA and the logins, for good")
    return plan


@flow(name="uninstall", flow_run_name=run_name)
@one_run_per_site
def uninstall(site_file: str, purge: bool = False) -> Uninstalled:
    """Remove the registry of `site_file`; returns what was removed and what was kept."""
    run = this_run()
    site, target = run.site, run.target
    removed = target.uninstall(purge)
    removed += untrust_this_machine(site)
    kept = ["nothing (purged)"] if purge else [f"the stored images, the CA and the logins in {site.state_dir}"]
    if purge:
        kept = target.store.kept_after_purge() or kept
        purged = purge_state(site.state_dir)
        removed, kept = removed + purged.removed, kept + purged.kept
    publish_summary("crflow-uninstall", f"Registry {site.release} uninstalled",
                    [*(("Removed", what) for what in removed or ["nothing: it was not installed"]),
                     *(("Kept", what) for what in kept)])
    return Uninstalled(removed, kept)
