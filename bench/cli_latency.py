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

import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from install_local import installed_site, runs_option, timed  # noqa: E402  (this folder is on sys.path when run as a script)

from servers import BIN  # noqa: E402


def main() -> None:
    runs = runs_option(__doc__, 5)
    crflow = str(BIN / "crflow")
    with installed_site() as (_, env, site):
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


if __name__ == "__main__":
    main()
