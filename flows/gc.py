"""Garbage collection without losing data, as a Prefect flow:

  0. the registry as the site file says, read-write (a run killed in its window left it
     read-only: this rerun puts it back first);
  1. retention: the tags no rule keeps, and untagged manifests past a rule's age, listed (a
     dry run stops at the list) and deleted by digest through the registry's API;
  2. a dry run of the collection: which blobs would go, and their bytes;
  3. read-only: pulls are served, pushes refused (405, which clients retry), waited for;
  4. `registry garbage-collect` with the pod's config and storage;
  5. read-write again (also when 4 failed), and a push and pull to prove it;
  6. each mirror's cache: what it cached more than `keep_days` ago evicted, then collected
     (no window: a blob swept mid-pull is fetched from the upstream again);
  7. an artifact: what went, bytes freed, the time read-only, the storage before and after.
"""

from __future__ import annotations

import time

from prefect import flow

from crflow.chart import SecretData, read_only, values_for
from crflow.flows.site_lock import one_run_per_site, run_name, this_run
from crflow.flows.steps import site_secrets, site_vault, storage_and_secrets
from crflow.flows.verify import report_usage
from crflow.oci import SMOKE_REPO
from crflow.settings import Site
from crflow.targets import Target
from crflow.tasks.gc import retention_plan, untagged_plan, wait_until_read_only
from crflow.tasks.helm import render_chart
from crflow.tasks.registry import delete_by_digest, push_pull_check, wait_until_ready
from crflow.tasks.report import publish_summary


@flow(name="gc", flow_run_name=run_name)
@one_run_per_site
def gc(site_file: str, dry_run: bool = False) -> str:
    """Collect the registry's unreferenced blobs in a read-only window; return a one-line summary."""
    run = this_run()
    site, target = run.site, run.target
    url, bundle = target.url, target.client_bundle()
    secrets = site_secrets(site, site_vault(site, target), target)
    contents = storage_and_secrets(site, target, secrets)
    values = values_for(site, secrets.server_cert.fingerprint)
    manifests = render_chart(site.release, site.namespace, values, target.kube_version())
    target.deploy(values, manifests, contents)  # read-write, whatever an interrupted run left
    wait_until_ready(url, bundle)

    rules = [rule.model_dump() for rule in site.retention]
    doomed = retention_plan(url, bundle, rules)
    if any(rule.untagged_older_than_days is not None for rule in site.retention):
        doomed += untagged_plan(url, bundle, target.store.manifest_revisions(), rules, time.time())
    rows = [("Retention would delete" if dry_run else "Retention deleted",
             f"{d.repo}{':' + d.tag if d.tag else '@' + d.digest} ({d.rule})") for d in doomed]
    if not dry_run:
        for digest, repo in sorted({(d.digest, d.repo) for d in doomed}):
            delete_by_digest(url, bundle, repo, digest)

    before = target.store.stored_blobs()
    plan = target.collect(manifests, contents, dry_run=True, delete_untagged=site.gc.delete_untagged)
    would_free = sum(before.get(digest, 0) for digest in plan.blobs) if before is not None else None
    rows += [("Blobs eligible", str(plan.blob_count)), ("Manifests eligible", str(plan.manifest_count)),
             ("Bytes eligible", "unknown (storage not readable from here)" if would_free is None else str(would_free))]
    if dry_run:
        mirrored, said = collect_mirrors(site, target, manifests, contents, dry_run=True)
        publish_summary("crflow-gc", f"Registry {site.release}: gc dry run", rows + mirrored)
        return f"dry run: {plan.blob_count} blobs ({would_free} bytes) and {len(doomed)} tags would go{said}"

    locked = read_only(values)
    locked_manifests = render_chart(site.release, site.namespace, locked, target.kube_version())  # before the window: it is kept short
    started = time.monotonic()
    target.deploy(locked, locked_manifests, contents)
    try:
        wait_until_read_only(url, bundle, site.gc.timeout_seconds)
        collected = target.collect(manifests, contents, dry_run=False, delete_untagged=site.gc.delete_untagged)
    finally:  # read-write again, whatever happened inside the window
        target.deploy(values, manifests, contents)
        wait_until_ready(url, bundle)
        window = time.monotonic() - started
    after = target.store.stored_blobs()  # before the proof push adds its own
    push_pull_check(url, bundle, SMOKE_REPO, "gc")

    freed = sum(before.values()) - sum(after.values()) if before is not None and after is not None else None
    rows += [("Blobs deleted", str(collected.blob_count)), ("Manifests deleted", str(collected.manifest_count)),
             ("Seconds read-only", f"{window:.1f}")]
    if before is not None and after is not None:
        rows += [("Stored before", f"{len(before)} blobs, {sum(before.values())} bytes"),
                 ("Stored after", f"{len(after)} blobs, {sum(after.values())} bytes"), ("Bytes freed", str(freed))]
    mirrored, said = collect_mirrors(site, target, manifests, contents, dry_run=False)
    publish_summary("crflow-gc", f"Registry {site.release}: garbage collected", rows + mirrored)
    report_usage(site, url, bundle)
    return f"gc: {collected.blob_count} blobs deleted ({freed} bytes freed), read-only for {window:.1f} s{said}"


def collect_mirrors(site: Site, target: Target, manifests: list[dict], contents: SecretData,
                    dry_run: bool) -> tuple[list[tuple[str, str]], str]:
    """Each mirror's cache: eviction past `keep_days`, then `garbage-collect` of its storage;
    (the artifact's rows, the summary's words). Untagged manifests stay: in a cache they are
    the pulls by digest."""
    rows, said = [], []
    for mirror in site.mirrors:
        store = target.store.of_mirror(mirror.name)
        before, evicted = None if dry_run else store.stored_blobs(), []  # (a dry run frees nothing to count)
        if mirror.keep_days is not None:
            since = time.time() - mirror.keep_days * 86400
            evicted = [r for r in store.manifest_revisions() if r.pushed < since]
            if evicted and not dry_run:
                store.evict(evicted)
            rows.append((f"Mirror {mirror.name}: {'would evict' if dry_run else 'evicted'}",
                         f"{len(evicted)} manifests cached over {mirror.keep_days} days ago"))
        collected = target.collect(manifests, contents, dry_run, delete_untagged=False, mirror=mirror.name)
        freed = ""
        if before is not None:
            after = store.stored_blobs()
            freed = f", {sum(before.values()) - sum(after.values())} bytes freed ({len(after)} blobs cached)"
        rows.append((f"Mirror {mirror.name}: blobs {'eligible' if dry_run else 'deleted'}",
                     f"{collected.blob_count}{freed}"))
        said.append(f"mirror {mirror.name}: {collected.blob_count} blobs {'would go' if dry_run else 'deleted'}" +
                    (f" ({len(evicted)} manifests {'to evict' if dry_run else 'evicted'})"
                     if mirror.keep_days is not None else ""))
    return rows, f"; {', '.join(said)}" if said else ""
