"""How do we know the registry works? Ask it, as a client would: with the client files crflow
wrote (ca.crt and auth.json, see tasks/client.py), over TLS trusting only that CA, and by
pushing and pulling real images. The client is crflow/oci.py; these are the checks.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import requests
from prefect import task
from pydantic import BaseModel

from crflow.errors import CrflowError, LoginRefused, transient_only
from crflow.oci import (
    Image,
    Registry,
    copy_image,
    digest_of,
    parse_reference,
    read_login,
    served_certificate,
    tiny_image,
    walk,
)
from crflow.tasks.pki import fingerprint


@task(task_run_name="registry answers at {base_url}",
      retries=3, retry_delay_seconds=[1, 2, 4], retry_condition_fn=transient_only)
def wait_until_ready(base_url: str, bundle_dir: Path, timeout: float = 30) -> float:
    """Poll GET /v2/ with the client files until it answers 200; return the seconds it took."""
    started = time.monotonic()
    with Registry.from_bundle(base_url, bundle_dir, timeout=5) as registry:
        while True:
            try:
                registry.ping()
                return time.monotonic() - started
            except ConnectionError:
                if time.monotonic() - started > timeout:
                    raise
                time.sleep(0.05)


def login_accepted(base_url: str, bundle_dir: Path) -> bool:
    """GET /v2/ with the bundle's login: True on 200, False on 401; ConnectionError if no answer."""
    with Registry.from_bundle(base_url, bundle_dir, timeout=5) as registry:
        try:
            registry.ping()
        except LoginRefused:
            return False
    return True


@task(task_run_name="wait for the {bundle_dir.name} login: accepted {accepted}",
      retries=1, retry_condition_fn=transient_only)
def wait_for_login(base_url: str, bundle_dir: Path, accepted: bool, timeout: float) -> float:
    """Poll until the registry accepts (or, `accepted=False`, refuses) the bundle's login, as it
    does once a changed htpasswd reaches its pod; return the seconds it took."""
    started = time.monotonic()
    while True:
        try:
            if login_accepted(base_url, bundle_dir) == accepted:
                return time.monotonic() - started
        except ConnectionError:
            pass  # a pod being replaced: keep asking
        if time.monotonic() - started > timeout:
            user = read_login(bundle_dir / "auth.json", base_url.removeprefix("https://"))[0]
            raise CrflowError(f"after {timeout:.0f} s the registry still {'refuses' if accepted else 'accepts'} "
                              f"user {user}: the new htpasswd has not reached the registry's pod")
        time.sleep(0.3)


@task(task_run_name="served certificate at {host}:{port}")
def check_served_certificate(host: str, port: int, expected: str) -> str:
    """The registry serves the certificate with this fingerprint (after a renewal, the new one)."""
    served = fingerprint(served_certificate(host.strip("[]"), port))
    if served != expected:
        raise CrflowError(f"{host}:{port} serves certificate {served}, not the renewed {expected}")
    return served


@task(task_run_name="push and pull {repo}:{tag}", retries=2, retry_delay_seconds=2, retry_condition_fn=transient_only)
def push_pull_check(base_url: str, bundle_dir: Path, repo: str, tag: str) -> str:
    """Push a tiny generated image, pull it back, and compare it blob by blob; return its digest."""
    image = tiny_image({"crflow-check": f"{repo}:{tag}\n".encode()})
    with Registry.from_bundle(base_url, bundle_dir) as registry:
        digest = registry.push_image(repo, tag, image)
        if registry.pull_image(repo, digest) != image:
            raise CrflowError(f"the image pulled from {base_url}/{repo}@{digest} differs from the one pushed")
    return digest


class Pushed(BaseModel):
    """What a check pushed: the manifest digest, its blobs' digests, and how long it took."""

    repo: str
    tag: str
    digest: str
    blobs: list[str]
    bytes: int
    seconds: float


def unique_image(layer_bytes: int) -> Image:
    """An image no registry has seen: its layer holds random bytes, so the upload path is
    really exercised (a known blob would be skipped or mounted)."""
    return tiny_image({"crflow-verify/payload": os.urandom(layer_bytes),
                       "crflow-verify/id": uuid.uuid4().hex.encode()})


@task(task_run_name="push a new image to {repo}",
      retries=2, retry_delay_seconds=[2, 5], retry_condition_fn=transient_only)
def push_unique_image(base_url: str, bundle_dir: Path, repo: str, layer_bytes: int = 8 << 20) -> Pushed:
    """Push a freshly made image (tag: the time of the run) and time the upload."""
    image, tag = unique_image(layer_bytes), time.strftime("verify-%Y%m%d-%H%M%S")
    with Registry.from_bundle(base_url, bundle_dir) as registry:
        started = time.perf_counter()
        digest = registry.push_image(repo, tag, image)
        seconds = time.perf_counter() - started
    blobs = [digest_of(b) for b in [image.config, *image.layers]]
    return Pushed(repo=repo, tag=tag, digest=digest, blobs=blobs, seconds=seconds,
                  bytes=len(image.manifest) + sum(len(b) for b in [image.config, *image.layers]))


@task(task_run_name="pull {pushed.repo}@{pushed.digest}",
      retries=2, retry_delay_seconds=[2, 5], retry_condition_fn=transient_only)
def pull_and_compare(base_url: str, bundle_dir: Path, pushed: Pushed) -> float:
    """Pull the image back by digest; the manifest and every blob must match what was pushed
    (each digest is checked as it arrives). Returns seconds."""
    with Registry.from_bundle(base_url, bundle_dir) as registry:
        started = time.perf_counter()
        if walk(registry, pushed.repo, pushed.digest)[1:] != pushed.blobs:
            raise CrflowError(f"the manifest of {pushed.repo}@{pushed.digest} lists other blobs than were pushed")
        return time.perf_counter() - started


@task(task_run_name="catalog lists {repo}:{tag}",
      retries=2, retry_delay_seconds=[2, 5], retry_condition_fn=transient_only)
def listed_in_catalog(base_url: str, bundle_dir: Path, repo: str, tag: str) -> None:
    """/v2/_catalog shows the repository and its tags/list shows the tag."""
    with Registry.from_bundle(base_url, bundle_dir) as registry:
        repos = registry.call("GET /v2/_catalog", registry.base.list_repos)
        tags = registry.call(f"GET /v2/{repo}/tags/list", registry.repo(repo).list_aliases)
    if repo not in repos:
        raise CrflowError(f"/v2/_catalog of {base_url} does not list {repo}")
    if tag not in tags:
        raise CrflowError(f"/v2/{repo}/tags/list of {base_url} does not list {tag}")


@task(task_run_name="delete {repo}@{digest}", retries=2, retry_delay_seconds=[2, 5], retry_condition_fn=transient_only)
def delete_by_digest(base_url: str, bundle_dir: Path, repo: str, digest: str) -> None:
    """Delete the manifest by digest (the registry refuses deletes by tag), and see it gone."""
    with Registry.from_bundle(base_url, bundle_dir) as registry:
        client = registry.repo(repo)
        registry.call(f"DELETE manifest {repo}@{digest}", client.del_alias, digest)
        try:
            client.get_manifest_and_response(digest)
        except requests.exceptions.HTTPError as err:
            if err.response is not None and err.response.status_code == 404:
                return
            raise
    raise CrflowError(f"{repo}@{digest} is still served after its deletion")


@task(task_run_name="unlink the blobs of {repo}@{digest}", retries=2, retry_delay_seconds=[2, 5],
      retry_condition_fn=transient_only)
def unlink_blobs(base_url: str, bundle_dir: Path, repo: str, digest: str, blobs: list[str]) -> int:
    """DELETE each blob from the repository (202): the repository's links go now, the data at
    the next `crflow gc` (distribution keeps blob data until a collection). Returns how many."""
    with Registry.from_bundle(base_url, bundle_dir) as registry:
        client = registry.repo(repo)

        def delete(blob: str) -> None:
            try:
                client.del_blob(blob)
            except requests.exceptions.HTTPError as err:
                if err.response is None or err.response.status_code != 404:  # 404: gone already (a rerun)
                    raise

        for blob in blobs:
            registry.call(f"DELETE blob {repo}@{blob}", delete, blob)
    return len(blobs)


@task(task_run_name="copy {source}", retries=2, retry_delay_seconds=[2, 5], retry_condition_fn=transient_only)
def copy_source_image(source: str, source_ca: Path | None, source_authfile: Path | None, base_url: str,
                      bundle_dir: Path, repo: str) -> Pushed:
    """Copy a real image (an index with its platform manifests, or one manifest, and every
    blob) from another registry into this one, as the runbook pushed busybox."""
    server, source_repo, ref = parse_reference(source)
    user, password = read_login(source_authfile, server) if source_authfile else (None, None)
    tag = ref if not ref.startswith("sha256:") else "source"
    with Registry(f"https://{server}", source_ca, user, password) as origin, \
            Registry.from_bundle(base_url, bundle_dir) as registry:
        started = time.perf_counter()
        digest = copy_image(origin, source_repo, ref, registry, repo, tag)
        seconds = time.perf_counter() - started
    return Pushed(repo=repo, tag=tag, digest=digest, blobs=[], bytes=0, seconds=seconds)


@task(task_run_name="pull {repo}:{tag} through {base_url} twice", retries=1, retry_delay_seconds=5,
      retry_condition_fn=transient_only)
def pull_twice(base_url: str, bundle_dir: Path, repo: str, tag: str) -> str:
    """A mirror's check: pull an image whole, twice, every digest checked; the second is its
    cache's (a mirror still asks the upstream whether a tag moved, but no blob comes from it)."""
    seconds = []
    with Registry.from_bundle(base_url, bundle_dir) as registry:
        for _ in range(2):
            started = time.perf_counter()
            digests = walk(registry, repo, tag)
            seconds.append(time.perf_counter() - started)
    return f"{len(digests)} manifests and blobs, every digest equal; first pull {seconds[0]:.2f} s, second " \
           f"(from its cache) {seconds[1]:.2f} s"


@task(task_run_name="pull {repo}@{digest}", retries=2, retry_delay_seconds=[2, 5], retry_condition_fn=transient_only)
def pull_everything(base_url: str, bundle_dir: Path, repo: str, digest: str) -> str:
    """Pull an image or index back with all it references, every digest checked."""
    with Registry.from_bundle(base_url, bundle_dir) as registry:
        digests = walk(registry, repo, digest)
    return f"{len(digests)} manifests and blobs, every digest equal"
