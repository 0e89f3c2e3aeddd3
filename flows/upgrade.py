"""The upgrade runbook ("dry run first, then for real"), as a Prefect flow that shows what
will change, changes it, proves the registry still works, and undoes itself if it does not:

  1. values from the site file, with the certificates and login in use (cached, never new);
  2. the manifests the upgrade would apply, diffed against the deployed ones (Secret data
     redacted) and published as an artifact; a dry run stops here;
  3. storage and Secrets as the site file says, then the upgrade (helm, waited for; on the
     local target the pod, restarted only if its spec changed), and the login handed out
     again (a changed address reaches the client files and pull Secrets);
  4. the verify-push-pull flow;
  5. if 3 or 4 failed: back to the previous revision (helm rollback; locally the previous
     manifests), verify again, and end as Failed with both revisions in the artifact.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from crflow.chart import values_for
from crflow.errors import CrflowError, NotInstalled
from crflow.flows.site_lock import one_run_per_site, run_name, this_run
from crflow.flows.steps import site_secrets, site_vault, storage_and_secrets
from crflow.flows.verify import verify
from crflow.tasks.helm import render_chart
from crflow.tasks.manifests import diff_manifests
from crflow.tasks.report import publish_summary


@task(task_run_name="diff of {release}")
def publish_diff(release: str, deployed: str, before: list[dict], rendered: list[dict]) -> int:
    """The diff as a markdown artifact; returns how many objects change."""
    changes = diff_manifests(before, rendered)
    diff = "\n".join(changes.values())
    body = f"```diff\n{diff}\n```" if changes else "No change: the upgrade would apply what is deployed."
    create_markdown_artifact(key="crflow-upgrade-diff", description=f"Upgrade of {release}",
                             markdown=f"# Upgrade of {release}: {len(changes)} objects change against {deployed}\n\n{body}\n")
    return len(changes)


@flow(name="upgrade", flow_run_name=run_name)
@one_run_per_site
def upgrade(site_file: str, dry_run: bool = False) -> str:
    """Upgrade the registry of `site_file` to what the file and helm_chart/ say; verify; roll back if it breaks."""
    run = this_run()
    site, target = run.site, run.target
    secrets = site_secrets(site, site_vault(site, target), target)
    values = values_for(site, secrets.server_cert.fingerprint)
    manifests = render_chart(site.release, site.namespace, values, target.kube_version())

    before = target.deployed()
    if not before.manifests:
        raise NotInstalled(f"registry {site.release} is not installed; run crflow install -c {site_file}")
    changed = publish_diff(site.release, before.describe(), before.manifests, manifests)
    if dry_run:
        return f"dry run: {changed} objects would change (see the crflow-upgrade-diff artifact)"

    contents = storage_and_secrets(site, target, secrets)
    try:
        after = target.deploy(values, manifests, contents, changed=changed > 0)
        target.publish_login(secrets.ca.cert_pem, secrets.creds)  # a changed address reaches the client files and pull Secrets
        verify(site_file)
    except Exception as err:
        failed = target.deployed()
        now = target.roll_back(before, contents)
        restored = f"{before.describe()} (now {now.describe()})" if now.revision is not None else "the previous pod spec"
        verify(site_file)
        publish_summary("crflow-upgrade", f"Upgrade of {site.release} failed and was rolled back", [
            ("Failed", failed.describe() if failed.revision is not None else "the new pod spec"),
            ("Restored", restored), ("Reason", str(err).replace("|", "/")[:500])])
        raise CrflowError(f"the upgrade failed and was rolled back to {restored}, which passes verify: {err}") from err

    publish_summary("crflow-upgrade", f"Registry {site.release} upgraded", [
        ("Revision", f"{before.revision} -> {after.revision}" if after.revision is not None else "local pod"),
        ("Objects changed", str(changed)), ("Verify", "passed")])
    return f"{f'{changed} objects changed' if changed else 'no change'}; verify passed"
