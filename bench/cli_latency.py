"""How long does a person wait for the `crflow` command? Wall time, median of 5, of:
- `crflow --help`;
- `crflow status` on a running local registry;
- `crflow install` rerun with everything cached;
each next to the wall time of `python -c pass` from the same venv in the same run (the
floor no Python command can beat), against a Prefect server of its own that is already up.

    .venv/bin/python bench/cli_latency.py [--runs 5]

Prints medians and ratios; no targets are asserted (machines here are shared and noisy).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from install_local import prefect_for_bench, timed  # noqa: E402  (this folder is on sys.path when run as a script)

from servers import BIN, free_port, stop_server  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    runs = parser.parse_args().runs

    work = Path(tempfile.mkdtemp(prefix="crflow-bench-"))
    server, _, env = prefect_for_bench(work)
    site = work / "site.yaml"
    site.write_text(yaml.safe_dump({"state_dir": str(work / "state"), "registry": {"port": free_port()}}))
    crflow = str(BIN / "crflow")
    try:
        subprocess.run([crflow, "install", "-c", str(site)], env=env, check=True, capture_output=True)
        commands = {
            "python -c pass": [str(BIN / "python"), "-c", "pass"],
            "crflow --help": [crflow, "--help"],
            "crflow status": [crflow, "status", "-c", str(site)],
            "crflow install (cached rerun)": [crflow, "install", "-c", str(site)],
        }
        seconds: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(runs):  # interleaved, so a busy moment hits every command alike
            for name, argv in commands.items():
                seconds[name].append(timed(argv, env))
        floor = statistics.median(seconds["python -c pass"])
        print(f"{'command':32} {'median s':>9} {'x python -c pass':>17}")
        for name, values in seconds.items():
            median = statistics.median(values)
            print(f"{name:32} {median:9.2f} {median / floor:17.1f}")
    finally:
        subprocess.run([crflow, "down", "-c", str(site)], env=env, capture_output=True)
        stop_server(server)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
