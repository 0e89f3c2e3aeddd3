"""Garbage collection, as distribution does it: `registry garbage-collect` marks every blob a
manifest in any repository references and deletes the rest. It must not run while pushes
land (a blob uploaded mid-collection can be swept), so crflow collects inside a read-only
window; and it applies retention rules first, through the registry's API.

    doomed = retention_plan(url, bundle, rules)    # tags the rules do not keep
    collection = parse_collection(output)          # what `garbage-collect` found (or deleted)
"""

from __future__ import annotations

import fnmatch
import json
import re
import time
from pathlib import Path

from prefect import task
from pydantic import BaseModel

from crflow.errors import CrflowError, transient_only
from crflow.oci import Registry


class Collection(BaseModel):
    """What a garbage collection found eligible (a dry run) or deleted: counts, and the blobs'
    digests as far as the output reached crflow (a Job's termination message holds ~50)."""

    blob_count: int
    manifest_count: int
    blobs: list[str]


def parse_collection(output: str) -> Collection:
    """`registry garbage-collect` prints a summary line, then one line per blob it finds
    unreferenced."""
    summary = re.search(r"(\d+) blobs and (\d+) manifests eligible for deletion", output)
    blobs = sorted(set(re.findall(r"^blob eligible for deletion: (sha256:[0-9a-f]{64})", output, re.MULTILINE)))
    if summary is None:
        return Collection(blob_count=len(blobs), manifest_count=0, blobs=blobs)
    return Collection(blob_count=int(summary.group(1)), manifest_count=int(summary.group(2)), blobs=blobs)


class Doomed(BaseModel):
    """A tag a retention rule does not keep: deleted by its manifest's digest."""

    repo: str
    tag: str
    digest: str
    rule: str


def _created(registry: Registry, repo: str, tag: str) -> tuple[str, str]:
    """(digest, the config's `created`, "" if it has none) of repo:tag."""
    client = registry.repo(repo)
    manifest, response = registry.call(f"GET manifest {repo}:{tag}", client.get_manifest_and_response, tag)
    digest = response.headers.get("Docker-Content-Digest", "")
    config = json.loads(manifest).get("config", {}).get("digest")
    if not config:
        return digest, ""
    created = json.loads(registry.pull_blob(repo, config)).get("created") or ""
    return digest, created


@task(task_run_name="retention: the tags no rule keeps", retries=2, retry_delay_seconds=[2, 5],
      retry_condition_fn=transient_only)
def retention_plan(base_url: str, bundle_dir: Path, rules: list[dict]) -> list[Doomed]:
    """For each repository a rule's glob matches (first matching rule wins), the tags it does
    not keep, newest first by the image config's `created` (then by tag)."""
    if not rules:
        return []
    doomed = []
    with Registry.from_bundle(base_url, bundle_dir) as registry:
        repos = registry.call("GET /v2/_catalog", registry.base.list_repos)
        for repo in sorted(repos):
            rule = next((r for r in rules if fnmatch.fnmatchcase(repo, r["repositories"])), None)
            if rule is None or (rule.get("keep_newest") is None and rule.get("keep_tags") is None):
                continue  # no rule, or one for untagged manifests only: every tag stays
            tags = registry.call(f"GET /v2/{repo}/tags/list", registry.repo(repo).list_aliases) or []
            dated = sorted(((*_created(registry, repo, tag), tag) for tag in tags),
                           key=lambda row: (row[1], row[2]), reverse=True)
            pattern = rule.get("keep_tags")
            keep_newest = rule.get("keep_newest") or 0
            kept = {digest for digest, _, tag in dated[:keep_newest]} | \
                {digest for digest, _, tag in dated if pattern and re.fullmatch(pattern, tag)}
            name = f"{rule['repositories']}: keep {keep_newest} newest" + (f", tags {pattern}" if pattern else "")
            # A digest a kept tag also names stays: deleting a manifest removes all its tags.
            doomed += [Doomed(repo=repo, tag=tag, digest=digest, rule=name)
                       for digest, _, tag in dated if digest not in kept]
    return doomed


@task(task_run_name="the registry refuses pushes", retries=0)
def wait_until_read_only(base_url: str, bundle_dir: Path, timeout: float) -> float:
    """Poll until a blob upload is refused (405: distribution's read-only mode); the seconds it took."""
    started = time.monotonic()
    with Registry.from_bundle(base_url, bundle_dir, timeout=10) as registry:
        while True:
            if registry.upload_refused():
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise CrflowError(f"the registry at {base_url} still accepts pushes {timeout:.0f} s after it was "
                                  "set read-only; gc did not collect")
            time.sleep(0.05)


@task(task_run_name="retention: untagged manifests past their age", retries=2, retry_delay_seconds=[2, 5],
      retry_condition_fn=transient_only)
def untagged_plan(base_url: str, bundle_dir: Path, revisions: list, rules: list[dict], now: float) -> list[Doomed]:
    """The untagged manifests older than their repository's rule allows, except those a tagged
    index names (a multi-platform image's own manifests carry no tag)."""
    doomed = []
    with Registry.from_bundle(base_url, bundle_dir) as registry:
        for repo in sorted({r.repo for r in revisions}):
            rule = next((r for r in rules if fnmatch.fnmatchcase(repo, r["repositories"])), None)
            if rule is None or rule.get("untagged_older_than_days") is None:
                continue
            mine = [r for r in revisions if r.repo == repo]
            reachable = set()
            for tagged in (r for r in mine if r.tagged):
                manifest, _ = registry.call(f"GET manifest {repo}@{tagged.digest}",
                                            registry.repo(repo).get_manifest_and_response, tagged.digest)
                reachable |= {child["digest"] for child in json.loads(manifest).get("manifests", [])}
            limit = now - rule["untagged_older_than_days"] * 86400
            name = f"{rule['repositories']}: untagged older than {rule['untagged_older_than_days']} days"
            doomed += [Doomed(repo=repo, tag="", digest=r.digest, rule=name) for r in mine
                       if not r.tagged and r.digest not in reachable and r.pushed < limit]
    return doomed
