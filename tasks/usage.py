"""What does the registry store, per repository, and how fast does it grow? Read through the
registry's API, never by walking the storage: tags are listed and resolved to digests each run
(one HEAD per tag), and a manifest is fetched only the first time its digest is seen, since a
digest's content never changes (the cache is a file in the state directory).

    usage = registry_usage(url, bundle, StateDir(state_dir).usage_cache)
    publish_usage(usage, "crflow-usage-registry-127-0-0-1-5000", server)
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel

from crflow.errors import transient_only
from crflow.files import write_atomic
from crflow.oci import Registry
from crflow.tasks.report import HISTORY, latest_table


class RepoUsage(BaseModel):
    tags: int
    bytes: int  # the blobs and manifests its tags reach, each once


class Usage(BaseModel):
    repos: dict[str, RepoUsage]
    total_bytes: int  # every blob and manifest any tag reaches, each once across repositories


def _reach(registry: Registry, repo: str, digest: str, cache: dict[str, dict[str, int]]) -> dict[str, int]:
    """digest -> size of the manifest `digest` and all it references (an index's children too)."""
    if digest not in cache:
        manifest, _ = registry.call(f"GET manifest {repo}@{digest}", registry.repo(repo).get_manifest_and_response,
                                    digest)
        document = json.loads(manifest)
        reached = {digest: len(manifest.encode())}
        for child in document.get("manifests", []):
            reached.update(_reach(registry, repo, child["digest"], cache))
        for blob in [document["config"], *document.get("layers", [])] if "config" in document else []:
            reached[blob["digest"]] = blob["size"]
        cache[digest] = reached
    return cache[digest]


@task(task_run_name="what every repository stores", retries=2, retry_delay_seconds=[2, 5],
      retry_condition_fn=transient_only)
def registry_usage(base_url: str, bundle_dir: Path, cache_file: Path) -> Usage:
    """Tags and bytes per repository, and the total, through the registry's API."""
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    repos, everything = {}, {}
    with Registry.from_bundle(base_url, bundle_dir) as registry:
        for repo in sorted(registry.call("GET /v2/_catalog", registry.base.list_repos)):
            client = registry.repo(repo)
            tags = registry.call(f"GET /v2/{repo}/tags/list", client.list_aliases) or []
            reached: dict[str, int] = {}
            for tag in tags:
                digest = registry.call(f"HEAD manifest {repo}:{tag}", client.head_manifest_and_response, tag)[0]
                reached.update(_reach(registry, repo, digest, cache))
            if tags:
                repos[repo] = RepoUsage(tags=len(tags), bytes=sum(reached.values()))
            everything.update(reached)
    if cache_file.parent.is_dir():
        write_atomic(cache_file, json.dumps(cache).encode(), 0o600)
    return Usage(repos=repos, total_bytes=sum(everything.values()))


@task(task_run_name="usage report")
def publish_usage(usage: Usage, key: str, server: str) -> int:
    """A table artifact with one row per run (newest first) and the growth since the previous
    one, and a markdown artifact per repository; returns the growth in bytes."""
    history = latest_table(key)
    previous = history[0]["stored bytes"] if history and "stored bytes" in history[0] else None
    growth = usage.total_bytes - previous if previous is not None else 0
    row = {"time": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ"),
           "repositories": len(usage.repos), "tags": sum(r.tags for r in usage.repos.values()),
           "stored bytes": usage.total_bytes, "growth bytes": growth}
    create_table_artifact(key=key, table=[row, *history][:HISTORY],
                          description=f"What {server} stores: the last {HISTORY} reports, newest first")
    lines = [f"# What {server} stores", "", f"{usage.total_bytes} bytes in all ({growth:+d} since the last report)", "",
             "| repository | tags | bytes |", "|---|---|---|",
             *(f"| {name} | {r.tags} | {r.bytes} |" for name, r in usage.repos.items())]
    create_markdown_artifact(key=f"{key}-repositories", markdown="\n".join(lines) + "\n",
                             description=f"Repositories of {server}")
    return growth
