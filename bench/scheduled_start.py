"""How late does a deployment run start on a process worker? For crflow's verify deployment
(made by `crflow deploy`) and, as the peer, a Prefect flow that does nothing, deployed to the
same worker in the same run:
- scheduled: a run scheduled 15 s ahead; lateness = start time - scheduled time;
- on demand: a run created for now; latency = start time - creation time;
each with the worker's defaults (polls every 10 s, takes runs 10 s early) and with
PREFECT_WORKER_QUERY_SECONDS=2.

    .venv/bin/python bench/scheduled_start.py [--runs 3]

Prints medians and ratios to the peer; no targets are asserted (machines here are shared).
"""

from __future__ import annotations

import datetime as dt
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from prefect import flow

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from install_local import installed_site, runs_option  # noqa: E402  (this folder is on sys.path when run as a script)

from servers import BIN, start_server, stop_server  # noqa: E402

POOL = "bench-scheduled"


@flow(name="bench-noop")
def noop() -> None:
    """The peer: a flow with nothing to do, so its start time is the worker's and Prefect's alone."""


def parse(stamp: str) -> dt.datetime:
    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def start_and_wait(api: str, deployment_id: str, when: dt.datetime | None) -> float:
    """Seconds from the scheduled time (or creation) to the run's start."""
    body = {"state": {"type": "SCHEDULED", "state_details": {"scheduled_time": when.isoformat()}}} if when else {}
    run = httpx.post(f"{api}/deployments/{deployment_id}/create_flow_run", json=body).raise_for_status().json()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        current = httpx.get(f"{api}/flow_runs/{run['id']}").json()
        if current["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED"):
            if current["state"]["type"] != "COMPLETED":
                raise RuntimeError(f"bench run ended {current['state']['type']}: {current['state']['message']}")
            origin = when or parse(run["created"])
            return (parse(current["start_time"]) - origin).total_seconds()
        time.sleep(0.5)
    raise RuntimeError("a bench run did not end within 300 s")


def main() -> None:
    runs = runs_option(__doc__, 3)
    with installed_site() as (api, env, site):
        subprocess.run([str(BIN / "crflow"), "deploy", "-c", str(site), "--pool", POOL], env=env, check=True,
                       capture_output=True)
        verify_id = next(d["id"] for d in httpx.post(f"{api}/deployments/filter", json={}).json()
                         if d["entrypoint"] == "crflow.flows.verify.verify")
        peer = subprocess.run([str(BIN / "python"), "-c", (
            "import sys; sys.path.insert(0, 'bench'); from scheduled_start import noop; "
            "noop.from_source(source='bench', entrypoint='scheduled_start.py:noop')"
            ".deploy('noop', work_pool_name=sys.argv[1], print_next_steps=False)"), POOL],
            cwd=ROOT, env=env, capture_output=True, text=True)
        if peer.returncode:
            raise RuntimeError(peer.stderr[-2000:])
        noop_id = httpx.get(f"{api}/deployments/name/bench-noop/noop").json()["id"]

        print(f"{'worker':24} {'run':11} {'crflow verify s':>16} {'no-op flow s':>13} {'ratio':>6}")
        for label, extra in (("defaults (poll 10 s)", {}), ("poll every 2 s", {"PREFECT_WORKER_QUERY_SECONDS": "2"})):
            worker = start_server([str(BIN / "prefect"), "worker", "start", "--pool", POOL],
                                  Path(site).parent / "worker.log", {**env, **extra})
            try:
                for kind in ("scheduled", "on demand"):
                    seconds = {"crflow": [], "peer": []}
                    for _ in range(runs):
                        for name, deployment in (("crflow", verify_id), ("peer", noop_id)):
                            when = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=15) \
                                if kind == "scheduled" else None
                            seconds[name].append(start_and_wait(api, deployment, when))
                    ours, theirs = statistics.median(seconds["crflow"]), statistics.median(seconds["peer"])
                    ratio = f"{ours / theirs:6.1f}" if min(ours, theirs) > 0.5 else "     -"  # on time: no ratio
                    print(f"{label:24} {kind:11} {ours:16.2f} {theirs:13.2f} {ratio}")
            finally:
                stop_server(worker)


if __name__ == "__main__":
    main()
