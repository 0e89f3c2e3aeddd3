"""How long does `crflow install` take on the local target, and how much of it is Prefect?

Runs, on this machine, against a Prefect server of its own:
- a first install (fresh state: CA, certificate, login, registry start, push/pull check);
- a rerun with everything cached (what a scheduled or repeated run costs);
and splits the rerun into: starting Python and importing crflow and Prefect (the peer:
`python -c "import crflow.flows.install"` in the same venv), the time Prefect reports for the
tasks themselves, and the rest (Prefect's engine and API calls: the overhead).

    .venv/bin/python bench/install_local.py [--runs 3]

Prints medians; no targets are asserted (machines here are shared and noisy).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from crflow.tasks.helm import helm_executable  # noqa: E402
from servers import BIN, free_port, start_prefect_server, stop_server  # noqa: E402


def timed(argv: list[str], env: dict) -> float:
    started = time.perf_counter()
    subprocess.run(argv, env=env, check=True, capture_output=True, cwd=ROOT, stdin=subprocess.DEVNULL)
    return time.perf_counter() - started


def last_flow_run_task_seconds(api: str) -> float:
    with httpx.Client(base_url=api, timeout=30) as http:
        (run,) = http.post("/flow_runs/filter", json={"sort": "START_TIME_DESC", "limit": 1}).json()
        tasks = http.post("/task_runs/filter", json={"flow_runs": {"id": {"any_": [run["id"]]}}, "limit": 200}).json()
    return sum(t["total_run_time"] for t in tasks)


def prefect_for_bench(work: Path) -> tuple:
    """A Prefect server of the benchmark's own under `work`; (process, API URL, env for crflow)."""
    server, api = start_prefect_server(work / "prefect")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "CRFLOW_"))}
    # helm as the tests find it: the bench's own CRFLOW_HOME holds none
    env.update(PREFECT_API_URL=api, CRFLOW_HOME=str(work / "home"), DO_NOT_TRACK="1", CRFLOW_HELM=helm_executable())
    return server, api, env


def local_site(work: Path, name: str = "site") -> Path:
    """A local-target site file under `work`, on a free port, with its state beside it."""
    site = work / f"{name}.yaml"
    site.write_text(yaml.safe_dump({"state_dir": str(work / f"{name}-state"), "registry": {"port": free_port()}}))
    return site


def runs_option(doc: str, default: int) -> int:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--runs", type=int, default=default)
    return parser.parse_args().runs


@contextlib.contextmanager
def installed_site() -> Iterator[tuple[str, dict, Path]]:
    """A Prefect server and a local registry installed by `crflow install`, both the benchmark's
    own and removed afterwards: (API URL, env for crflow, site file)."""
    work = Path(tempfile.mkdtemp(prefix="crflow-bench-"))
    server, api, env = prefect_for_bench(work)
    site = local_site(work)
    crflow = str(BIN / "crflow")
    try:
        subprocess.run([crflow, "install", "-c", str(site)], env=env, check=True, capture_output=True)
        yield api, env, site
    finally:
        subprocess.run([crflow, "down", "-c", str(site)], env=env, capture_output=True)
        stop_server(server)
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    runs = runs_option(__doc__, 3)

    work = Path(tempfile.mkdtemp(prefix="crflow-bench-"))
    server, api, env = prefect_for_bench(work)
    sites = []
    try:
        first, rerun, task_time, imports = [], [], [], []
        for i in range(runs):
            site = local_site(work, f"site{i}")
            sites.append(work / f"site{i}-state")
            crflow = [str(BIN / "crflow"), "install", "-c", str(site)]
            first.append(timed(crflow, env))
            rerun.append(timed(crflow, env))
            task_time.append(last_flow_run_task_seconds(api))
            imports.append(timed([sys.executable, "-c", "import crflow.flows.install"], env))

        med = statistics.median
        overhead = med(rerun) - med(imports) - med(task_time)
        print(f"crflow install, local target, median of {runs} (seconds)")
        print(f"  first install (fresh state)        {med(first):6.2f}")
        print(f"  rerun, everything cached           {med(rerun):6.2f}   rerun/first = {med(rerun) / med(first):.2f}")
        print("  the rerun, split:")
        print(f"    python start + imports (peer)    {med(imports):6.2f}   {med(imports) / med(rerun):5.0%}")
        print(f"    the tasks' own time              {med(task_time):6.2f}   {med(task_time) / med(rerun):5.0%}")
        print(f"    Prefect engine + API (overhead)  {overhead:6.2f}   {overhead / med(rerun):5.0%}")
    finally:
        for state in sites:
            pid_file = state / "pod" / "registry.pid"
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text()), signal.SIGTERM)
                except ProcessLookupError:
                    pass
        stop_server(server)
        time.sleep(2)  # the registries exit 1-2 s after SIGTERM
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
