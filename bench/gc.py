"""How long does `crflow gc` keep the registry read-only, against the collection alone?

On this machine, against a local registry and a Prefect server of the benchmark's own, with
filesystem storage, two data sets (each its own registry):
- many small images: `--small` (1,000) one-layer images in 10 repositories, half deleted;
- big layers: `--gib` (4) GiB in 40 single-layer images, half deleted.

For each, one `crflow gc`: the seconds read-only (from its output) and the seconds of the
`registry garbage-collect` task inside that window (the peer: the collection alone, on the
same data, in the same run, as Prefect recorded it). The ratio is the cost of the window
(two restarts and the wait for the read-only refusal) on top of the collection.

    .venv/bin/python bench/gc.py [--small 1000] [--gib 4]

Prints figures and ratios; asserts nothing (the goal: read-only within 1.5x the collection).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from install_local import installed_site  # noqa: E402

from crflow.oci import Image, Registry, digest_of, tiny_image  # noqa: E402
from servers import BIN  # noqa: E402


def collection_seconds(api: str) -> float:
    """The newest non-dry-run garbage-collect task's run time, as Prefect recorded it."""
    with httpx.Client(base_url=api, timeout=30) as http:
        runs = http.post("/task_runs/filter", json={"sort": "EXPECTED_START_TIME_DESC", "limit": 50}).json()
    (run,) = [r for r in runs if r["name"].startswith("garbage-collect") and "dry run: False" in r["name"]][:1]
    return run["total_run_time"]


def fill_small(registry: Registry, count: int) -> None:
    for n in range(count):
        repo = f"bench/small-{n % 10}"
        digest = registry.push_image(repo, f"t{n}", tiny_image({"n": f"{n} {time.time()}".encode()}))
        if n % 2:
            registry.call("DELETE", registry.repo(repo).del_alias, digest)


def fill_big(registry: Registry, gib: int) -> None:
    layer_bytes = (gib << 30) // 40
    for n in range(40):
        layer = os.urandom(layer_bytes)
        config = f'{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":["{digest_of(layer)}"]}}}}'
        digest = registry.push_image("bench/big", f"b{n}", Image(config=config.encode(), layers=[layer]))
        if n % 2:
            registry.call("DELETE", registry.repo("bench/big").del_alias, digest)


def measure(name: str, fill) -> None:
    with installed_site() as (api, env, site):
        state = Path(__import__("yaml").safe_load(site.read_text())["state_dir"])
        port = __import__("yaml").safe_load(site.read_text())["registry"]["port"]
        started = time.monotonic()
        with Registry.from_bundle(f"https://127.0.0.1:{port}", state / "client") as registry:
            fill(registry)
        filled = time.monotonic() - started
        out = subprocess.run([str(BIN / "crflow"), "gc", "-c", str(site)], env=env, check=True, capture_output=True,
                             text=True).stdout.strip().splitlines()[-1]
        window = float(re.search(r"read-only for ([\d.]+) s", out).group(1))
        alone = collection_seconds(api)
        print(f"{name}: filled in {filled:.0f} s; {out}")
        print(f"  read-only {window:.2f} s, garbage-collect alone {alone:.2f} s, ratio {window / alone:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--gib", type=int, default=4)
    args = parser.parse_args()
    measure(f"{args.small} small images", lambda r: fill_small(r, args.small))
    measure(f"{args.gib} GiB in 40 layers", lambda r: fill_big(r, args.gib))


if __name__ == "__main__":
    main()
