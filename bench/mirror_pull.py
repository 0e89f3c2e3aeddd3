"""How fast is a second pull through a pull-through mirror, against a pull from the registry?

Runs, on this machine, three registries from the chart as local processes with TLS (Debian's
docker-registry, as crflow's local target runs them): an upstream with no login, crflow's
registry and a mirror of the upstream, both with the same htpasswd login. One image with a
single incompressible layer (--mib, 200 by default) is pushed to the upstream and to the
registry. The mirror is warmed by one pull; then skopeo (the client) pulls the image whole
from the registry and through the mirror, alternating, --runs times each.

    .venv/bin/python bench/mirror_pull.py [--mib 200] [--runs 3]

Prints each median and their ratio (goal: mirror / registry <= 1.2); nothing is asserted.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from test_mirrors import anonymous_mirror, run_pod, serving_upstream, write_auth  # noqa: E402

from crflow.oci import OCI_MANIFEST  # noqa: E402

LAYER = "application/vnd.oci.image.layer.v1.tar"


def big_image(path: Path, mib: int) -> None:
    """An OCI layout holding one image whose only layer is a tar of `mib` MiB of random bytes."""
    blobs = path / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    payload = io.BytesIO()
    with tarfile.open(fileobj=payload, mode="w") as tar, open("/dev/urandom", "rb") as random:
        info = tarfile.TarInfo("random.bin")
        info.size = mib << 20
        tar.addfile(info, random)

    def blob(data: bytes) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"digest": f"sha256:{digest}", "size": len(data)}

    layer = {"mediaType": LAYER, **blob(payload.getvalue())}
    config = {"mediaType": "application/vnd.oci.image.config.v1+json", **blob(json.dumps({
        "architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [layer["digest"]]}}).encode())}
    manifest = blob(json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config,
                                "layers": [layer]}).encode())
    (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": OCI_MANIFEST, **manifest, "annotations": {"org.opencontainers.image.ref.name": "1"}}]}))


def skopeo(*args: str) -> None:
    subprocess.run([shutil.which("skopeo") or "skopeo", "--insecure-policy", *args], check=True, capture_output=True,
                   timeout=600, stdin=subprocess.DEVNULL)


def pulled_in(source: str, files: Path, work: Path) -> float:
    """Seconds skopeo takes to pull `source` whole into a fresh folder."""
    target = work / "pulled"
    shutil.rmtree(target, ignore_errors=True)
    started = time.perf_counter()
    skopeo("copy", "--src-authfile", str(files / "auth.json"), "--src-cert-dir", str(files), source, f"dir:{target}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="crflow-bench-") as scratch:
        work = Path(scratch)
        big_image(work / "image", args.mib)
        with serving_upstream(work) as (_, upstream, upstream_files):
            files = work / "client"
            manifests, secrets, login = anonymous_mirror(files, upstream, upstream_files)  # and the registry
            registry, registry_address = run_pod(work / "registry", manifests, secrets)
            mirror, mirror_address = run_pod(work / "mirror", manifests, secrets, deployment="r-mirror-up")
            try:
                write_auth(files, login, registry_address, mirror_address)
                skopeo("copy", "--dest-cert-dir", str(upstream_files), f"oci:{work / 'image'}:1",
                       f"docker://{upstream}/team/big:1")
                skopeo("copy", "--dest-authfile", str(files / "auth.json"), "--dest-cert-dir", str(files),
                       f"oci:{work / 'image'}:1", f"docker://{registry_address}/team/big:1")
                first = pulled_in(f"docker://{mirror_address}/team/big:1", files, work)  # fills the mirror's cache
                direct, cached = [], []
                for _ in range(args.runs):
                    direct.append(pulled_in(f"docker://{registry_address}/team/big:1", files, work))
                    cached.append(pulled_in(f"docker://{mirror_address}/team/big:1", files, work))
            finally:
                mirror.stop()
                registry.stop()
    direct_s, cached_s = statistics.median(direct), statistics.median(cached)
    print(f"image: one {args.mib} MiB layer; runs: {args.runs} each, medians")
    print(f"{'pull':<44} {'seconds':>8} {'MiB/s':>7}")
    for name, seconds in (("from the registry (the peer)", direct_s), ("through the mirror, first (from upstream)", first),
                          ("through the mirror, again (from its cache)", cached_s)):
        print(f"{name:<44} {seconds:>8.2f} {args.mib / seconds:>7.0f}")
    print(f"ratio, mirror's cached pull / registry's pull: {cached_s / direct_s:.2f} (goal <= 1.2)")


if __name__ == "__main__":
    main()
