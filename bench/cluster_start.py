"""How long the test bed takes to come up: the real Kubernetes 1.20 node of tests/cluster.py
(etcd, kube-apiserver, controller-manager, scheduler, containerd, kubelet, kube-proxy; until
the node is Ready and its images imported) against its peer, the emulated API server the suite
used before (tests/kubeapi/server.py, read from git history at EMULATOR_COMMIT), until it
answered /healthz. Needs root.

    .venv/bin/python bench/cluster_start.py [--runs 3]

Prints each run's seconds and the ratio real/emulated of the medians.
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
from cluster import Cluster  # noqa: E402
from servers import BIN, free_port, start_server, stop_server, wait_http  # noqa: E402

EMULATOR_COMMIT = "efead22"  # the last commit whose suite judged the kubernetes target by the emulator


def emulated(work: Path) -> float:
    tree = work / "emulator"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", EMULATOR_COMMIT, "tests/kubeapi", "tests/servers.py"],
                             capture_output=True, check=True, timeout=60).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True, timeout=60)
    port = free_port()
    started = time.perf_counter()
    server = start_server([str(BIN / "python"), str(tree / "tests" / "kubeapi" / "server.py"), "--port", str(port),
                           "--kubeconfig", str(work / "kubeconfig")], work / "kubeapi.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", 60, "the emulated API server", server)
        return time.perf_counter() - started
    finally:
        stop_server(server)


def real(work: Path) -> float:
    started = time.perf_counter()
    cluster = Cluster.start(work / "cluster")
    seconds = time.perf_counter() - started
    cluster.stop()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[float]] = {"real": [], "emulated": []}
    for run in range(args.runs):
        for name, start in (("real", real), ("emulated", emulated)):
            with tempfile.TemporaryDirectory() as tmp:
                results[name].append(start(Path(tmp)))
            print(f"run {run + 1}: {name:>8} {results[name][-1]:6.2f} s", flush=True)
    real_s, emulated_s = statistics.median(results["real"]), statistics.median(results["emulated"])
    print(f"median: real node Ready in {real_s:.1f} s, emulated API answering in {emulated_s:.2f} s; "
          f"ratio real/emulated {real_s / emulated_s:.0f}x")


if __name__ == "__main__":
    main()
