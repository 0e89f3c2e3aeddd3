"""Push and pull of big incompressible layers: crflow's registry client against skopeo (the
peer) and curl (a C client doing one streamed POST+PUT and one GET: the practical limit of
this machine), against one registry installed by crflow (filesystem storage, TLS, htpasswd).

    .venv/bin/python bench/push_pull.py [--sizes 200,1024] [--rounds 3]

Each round pushes a fresh image per client (skopeo skips blobs a registry has, so content is
never reused), then every client pulls every image of that round; clients take turns within
a round, so the machine's noise falls on all of them. Each client runs as a subprocess, and
its peak RSS is read from wait4(). Prints medians (MiB/s), the ratios crflow/skopeo and
crflow/curl, and peak RSS. Targets from the issue: pull >= 0.8x curl, push >= 0.9x curl,
peak RSS <= 64 MiB at 1 GiB. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
from servers import BIN, free_port, start_prefect_server, stop_server  # noqa: E402

MIB = 1 << 20
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"  # so skopeo sends it as is (random bytes)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as blob:
        while chunk := blob.read(4 * MIB):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


class Image:
    """One image on disk as an OCI layout: a layer file, a config and a manifest."""

    def __init__(self, base: Path, layer_source: Path, marker: str):
        self.dir = base
        blobs = base / "blobs" / "sha256"
        blobs.mkdir(parents=True)
        layer = base / "layer"
        shutil.copyfile(layer_source, layer)
        with open(layer, "r+b") as out:  # new content: a marker over the first bytes
            out.write(marker.encode().ljust(64, b"."))
        self.layer, self.layer_digest, self.layer_size = layer, sha256_file(layer), layer.stat().st_size
        self.config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers",
                                  "diff_ids": [self.layer_digest]}, "config": {}}).encode()
        self.config_digest = "sha256:" + hashlib.sha256(self.config).hexdigest()
        self.manifest = json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": self.config_digest,
                       "size": len(self.config)},
            "layers": [{"mediaType": LAYER_TYPE, "digest": self.layer_digest, "size": self.layer_size}]}).encode()
        self.manifest_digest = "sha256:" + hashlib.sha256(self.manifest).hexdigest()
        os.link(layer, blobs / self.layer_digest[7:])
        (blobs / self.config_digest[7:]).write_bytes(self.config)
        (blobs / self.manifest_digest[7:]).write_bytes(self.manifest)
        (base / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        (base / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": self.manifest_digest,
            "size": len(self.manifest), "annotations": {"org.opencontainers.image.ref.name": "bench"}}]}))

    def describe(self) -> dict:
        return {"layer": str(self.layer), "layer_digest": self.layer_digest, "config": self.config.decode(),
                "manifest": self.manifest.decode()}


# --- the clients, each run as `bench/push_pull.py --client NAME ACTION ...` --------------------
def crflow_client(action: str, url: str, bundle: Path, repo: str, image: dict, out: Path) -> None:
    from crflow.oci import Registry

    with Registry.from_bundle(url, bundle, timeout=600) as registry:
        if action == "push":
            registry.push_file(repo, Path(image["layer"]), image["layer_digest"])
            registry.push_blob(repo, image["config"].encode())
            registry.call("PUT manifest", registry.repo(repo).set_manifest, "bench", image["manifest"])
        else:
            manifest, _ = registry.call("GET manifest", registry.repo(repo).get_manifest_and_response, "bench")
            for descriptor in [json.loads(manifest)["config"], *json.loads(manifest)["layers"]]:
                with open(out, "wb") as sink:
                    registry.pull_to(repo, descriptor["digest"], sink)


def curl_commands(action: str, url: str, curlrc: Path, ca: Path, repo: str, image: dict, out: Path) -> list[list[str]]:
    curl = ["curl", "-sSf", "--config", str(curlrc), "--cacert", str(ca)]
    if action == "pull":
        manifest = json.loads(image["manifest"])
        return [[*curl, "-o", str(out), f"{url}/v2/{repo}/blobs/{d['digest']}"]
                for d in [manifest["config"], *manifest["layers"]]]
    return []  # a push needs the Location of each POST: done in curl_push


def curl_push(url: str, curlrc: Path, ca: Path, repo: str, image: dict) -> int:
    """POST then one streamed PUT per blob, then the manifest; returns the peak RSS of the curls."""
    curl = ["curl", "-sSf", "--config", str(curlrc), "--cacert", str(ca)]
    peak = 0
    config_file = Path(image["layer"]).with_name("config.json")
    config_file.write_text(image["config"])
    for path, digest in [(image["layer"], image["layer_digest"]),
                         (str(config_file), "sha256:" + hashlib.sha256(image["config"].encode()).hexdigest())]:
        headers = subprocess.run([*curl, "-X", "POST", "-D", "-", "-o", "/dev/null",
                                  f"{url}/v2/{repo}/blobs/uploads/"], capture_output=True, text=True, check=True).stdout
        location = next(h.split(":", 1)[1].strip() for h in headers.splitlines() if h.lower().startswith("location:"))
        target = (location if location.startswith("http") else url + location) + \
            ("&" if "?" in location else "?") + f"digest={digest}"
        peak = max(peak, run_measured([*curl, "-X", "PUT", "-H", "Content-Type: application/octet-stream",
                                       "-T", path, target]))
    manifest = Path(image["layer"]).with_name("manifest.json")
    manifest.write_text(image["manifest"])
    return max(peak, run_measured([*curl, "-X", "PUT", "-H", "Content-Type: application/vnd.oci.image.manifest.v1+json",
                                   "--data-binary", f"@{manifest}", f"{url}/v2/{repo}/manifests/bench"]))


def run_measured(argv: list[str], env: dict | None = None) -> int:
    """Run a command; return its peak RSS in KiB (from wait4)."""
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{argv[0]} failed: {process.stderr.read().decode()[-500:]}")
    return usage.ru_maxrss


class Bench:
    def __init__(self, work: Path, url: str, bundle: Path):
        self.work, self.url, self.bundle = work, url, bundle
        self.server = url.split("://")[1]
        auth = json.loads((bundle / "auth.json").read_text())["auths"][self.server]["auth"]
        self.curlrc = work / "curlrc"
        self.curlrc.write_text(f'user = "{base64.b64decode(auth).decode()}"\n')
        self.curlrc.chmod(0o600)
        self.times: dict[tuple[str, str, int], list[float]] = {}
        self.rss: dict[tuple[str, int], int] = {}

    def measure(self, client: str, action: str, size: int, repo: str, image: Image) -> None:
        out = self.work / f"pulled-{client}"
        started = time.perf_counter()
        if client == "crflow":
            rss = run_measured([sys.executable, __file__, "--client", action, self.url, str(self.bundle), repo,
                                json.dumps(image.describe()), str(out)])
        elif client == "skopeo":
            auth = ["--authfile", str(self.bundle / "auth.json"), "--cert-dir", str(self.bundle)]
            if action == "push":
                argv = ["skopeo", "--insecure-policy", "copy", "--dest-authfile", auth[1], "--dest-cert-dir", auth[3],
                        f"oci:{image.dir}:bench", f"docker://{self.server}/{repo}:bench"]
            else:
                shutil.rmtree(out, ignore_errors=True)
                argv = ["skopeo", "--insecure-policy", "copy", "--src-authfile", auth[1], "--src-cert-dir", auth[3],
                        f"docker://{self.server}/{repo}:bench", f"dir:{out}"]
            rss = run_measured(argv)
        elif action == "push":
            rss = curl_push(self.url, self.curlrc, self.bundle / "ca.crt", repo, image.describe())
        else:
            rss = max(run_measured(argv) for argv in curl_commands(action, self.url, self.curlrc,
                                                                   self.bundle / "ca.crt", repo, image.describe(), out))
        seconds = time.perf_counter() - started
        self.times.setdefault((client, action, size), []).append(seconds)
        self.rss[(client, size)] = max(self.rss.get((client, size), 0), rss)
        shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)

    def report(self, sizes: list[int]) -> None:
        med = statistics.median
        for size in sizes:
            print(f"\n{size} MiB layer, median of {len(self.times[('crflow', 'push', size)])} (MiB/s; peak RSS MiB)")
            rates = {(c, a): size / med(self.times[(c, a, size)]) for c in CLIENTS for a in ("push", "pull")}
            for client in CLIENTS:
                print(f"  {client:7} push {rates[(client, 'push')]:7.0f}   pull {rates[(client, 'pull')]:7.0f}"
                      f"   peak RSS {self.rss[(client, size)] / 1024:6.0f}")
            for action in ("push", "pull"):
                print(f"  {action}: crflow/skopeo {rates[('crflow', action)] / rates[('skopeo', action)]:.2f}   "
                      f"crflow/curl {rates[('crflow', action)] / rates[('curl', action)]:.2f}")


CLIENTS = ("crflow", "skopeo", "curl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="200,1024", help="layer sizes in MiB")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    work = Path(tempfile.mkdtemp(prefix="crflow-bench-"))
    server, api = start_prefect_server(work / "prefect")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "CRFLOW_"))}
    env.update(PREFECT_API_URL=api, CRFLOW_HOME=str(work / "home"), DO_NOT_TRACK="1")
    site = work / "site.yaml"
    port = free_port()
    site.write_text(yaml.safe_dump({"state_dir": str(work / "state"), "registry": {"port": port}}))
    try:
        subprocess.run([str(BIN / "crflow"), "install", "-c", str(site)], env=env, check=True, capture_output=True)
        bench = Bench(work, f"https://127.0.0.1:{port}", work / "state" / "client")
        for size in sizes:
            source = work / f"random-{size}"
            with open(source, "wb") as out:
                for _ in range(size):
                    out.write(os.urandom(MIB))
            for round_ in range(args.rounds):
                order = CLIENTS[round_ % 3:] + CLIENTS[:round_ % 3]
                images = {c: Image(work / f"image-{size}-{round_}-{c}", source, f"{c}-{round_}-{time.time()}")
                          for c in order}
                for client in order:
                    bench.measure(client, "push", size, f"bench/{client}", images[client])
                for client in order:
                    bench.measure(client, "pull", size, f"bench/{order[(order.index(client) + 1) % 3]}",
                                  images[order[(order.index(client) + 1) % 3]])
                for image in images.values():
                    shutil.rmtree(image.dir)
            source.unlink()
        bench.report(sizes)
    finally:
        subprocess.run([str(BIN / "crflow"), "down", "-c", str(site)], env=env, capture_output=True)
        stop_server(server)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--client"]:
        _, _, action, url, bundle, repo, image, out = sys.argv
        crflow_client(action, url, Path(bundle), repo, json.loads(image), Path(out))
    else:
        main()
