"""The flow image (deployments/Dockerfile, built by tests/shipping.py from this tree's wheel on
a Debian bookworm base made with debootstrap) against its peer, the base image alone: size in
storage, and cold start (`podman run` until the process ends) of `crflow --version` against
`python3 -c pass` in the base. Needs root, buildah and podman.

    .venv/bin/python bench/image.py [--runs 5]

Prints each figure and the ratio image/base.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from shipping import BASE_IMAGE, PODMAN_LIMITS, build_wheel, flow_image  # noqa: E402


def size(image: str) -> int:
    return int(subprocess.run(["podman", "image", "inspect", "--format", "{{.Size}}", image], capture_output=True,
                              text=True, check=True, timeout=60).stdout)


def cold_start(image: str, *command: str) -> float:
    # A cold Python each time: no bytecode cache survives --rm, and the page cache is the host's.
    started = time.perf_counter()
    subprocess.run(["podman", "run", "--rm", *PODMAN_LIMITS, "--network", "none", "--read-only", "--tmpfs",
                    "/var/lib/crflow:rw,mode=0700,U", image, *command], capture_output=True, check=True, timeout=300)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    runs = parser.parse_args().runs
    with tempfile.TemporaryDirectory() as work:
        image = flow_image(build_wheel(Path(work)))
    image_bytes, base_bytes = size(image), size(BASE_IMAGE)
    print(f"size: {image} {image_bytes / 2**20:.0f} MiB, {BASE_IMAGE} {base_bytes / 2**20:.0f} MiB, "
          f"ratio {image_bytes / base_bytes:.2f}")
    crflow = [cold_start(image, "crflow", "--version") for _ in range(runs)]
    base = [cold_start(BASE_IMAGE, "python3", "-c", "pass") for _ in range(runs)]
    print(f"cold start: crflow --version {statistics.median(crflow):.2f} s ({', '.join(f'{s:.2f}' for s in crflow)}), "
          f"base python3 {statistics.median(base):.2f} s ({', '.join(f'{s:.2f}' for s in base)}), "
          f"ratio {statistics.median(crflow) / statistics.median(base):.2f}")


if __name__ == "__main__":
    main()
