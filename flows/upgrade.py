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

from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from crflow.errors import CrflowError
from crflow.settings import Site, load_site
from crflow.vault import open_vault
from flows.steps import deploy, publish_login, site_secrets, storage_and_secrets
from flows.values import chart_values_for, kube_access
from flows.verify import verify
from tasks.helm import deployed_release, diff_manifests, render_chart, rollback_release
from tasks.localpod import LocalPod, run_local_pod
from tasks.report import publish_summary


@task
def local_release(pod_dir: Path) -> tuple[None, list[dict]]:
    """The local target's counterpart of a helm release: the manifests its pod runs (no revisions)."""
    return None, LocalPod(pod_dir).manifests()


@task
def publish_diff(release: str, revision: int | None, deployed: list[dict], rendered: list[dict]) -> int:
    """The diff as a markdown artifact; returns how many objects change."""
    changes = diff_manifests(deployed, rendered)
    diff = "\n".join(changes.values())
    where = f"revision {revision}" if revision else "the running pod"
    body = f"```diff\n{diff}\n```" if changes else "No change: the upgrade would apply what is deployed."
    create_markdown_artifact(key="crflow-upgrade-diff", description=f"Upgrade of {release}",
                             markdown=f"# Upgrade of {release}: {len(changes)} objects change against {where}\n\n{body}\n")
    return len(changes)


def deployed_chart(site: Site) -> tuple[int | None, list[dict]]:
    if site.target == "local":
        return local_release(site.state_dir / "pod")
    return deployed_release(kube_access(site), site.release, site.namespace)


@flow(name="upgrade")
def upgrade(site_file: str, dry_run: bool = False) -> str:
    """Upgrade the registry of `site_file` to what the file and helm_chart/ say; verify; roll back if it breaks."""
    site = load_site(Path(site_file))
    vault = open_vault(site.state_dir)
    secrets, creds = site_secrets(site, vault)
    values = chart_values_for(site, secrets["server_cert"].fingerprint)
    manifests = render_chart(site.release, site.namespace, values)

    before, deployed = deployed_chart(site)
    if not deployed:
        raise CrflowError(f"registry {site.release} is not installed; run crflow install -c {site_file}")
    changed = publish_diff(site.release, before, deployed, manifests)
    if dry_run:
        return f"dry run: {changed} objects would change (see the crflow-upgrade-diff artifact)"

    contents, claims = storage_and_secrets(site, **secrets)
    try:
        after = deploy(site, values, manifests, contents, claims, changed=changed > 0)
        publish_login(site, secrets["ca"].cert_pem, creds)  # a changed address reaches the client files and pull Secrets
        verify(site_file)
    except Exception as err:
        failed, _ = deployed_chart(site)
        if site.target == "local":
            run_local_pod(site.state_dir / "pod", deployed, contents, claims, site.registry.listen)
            restored = "the previous pod spec"
        else:
            now = rollback_release(kube_access(site), site.release, site.namespace, before,
                                   site.cluster.helm_timeout_seconds)
            restored = f"revision {before} (now revision {now})"
        verify(site_file)
        publish_summary("crflow-upgrade", f"Upgrade of {site.release} failed and was rolled back", [
            ("Failed", f"revision {failed}" if failed else "the new pod spec"), ("Restored", restored),
            ("Reason", str(err).replace("|", "/")[:500])])
        raise CrflowError(f"the upgrade failed and was rolled back to {restored}, which passes verify: {err}") from None

    unchanged = after == before if site.target == "kubernetes" else changed == 0
    publish_summary("crflow-upgrade", f"Registry {site.release} upgraded", [
        ("Revision", f"{before} -> {after}" if after else "local pod"), ("Objects changed", str(changed)),
        ("Verify", "passed")])
    return f"{'no change' if unchanged else f'{changed} objects changed'}; verify passed"
