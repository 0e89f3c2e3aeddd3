"""Is `crflow status` slower after a change? Wall time, median of N, of `crflow status` on one
running local registry, run by this tree and by an earlier commit (a git worktree of REF, on
the same venv), interleaved, next to `python -c pass` (the floor) in the same run.

    .venv/bin/python bench/status_change.py [--before REF] [--runs 15]

Prints medians and the ratio this tree / REF; nothing is asserted (machines here are shared
and noisy). REF defaults to the commit before the storage/run-context refactor of issue 28.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from install_local import installed_site, timed  # noqa: E402  (this folder is on sys.path when run as a script)

from servers import BIN  # noqa: E402

BEFORE = "e91341e"  # the last commit before BlobStore, RunContext and StateDir
CLI = "import sys; from crflow.cli.main import main; sys.argv[0] = 'crflow'; main()"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=BEFORE)
    parser.add_argument("--runs", type=int, default=15)
    options = parser.parse_args()
    python = str(BIN / "python")
    with tempfile.TemporaryDirectory(prefix="crflow-before-") as work:
        tree = Path(work) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), options.before],
                       check=True, capture_output=True, timeout=120)
        for package in ("flows", "targets", "tasks", "cli"):  # as the wheel lays them out, so the tree imports its own
            (tree / "crflow" / package).symlink_to(f"../{package}")
        try:
            with installed_site() as (_, env, site):
                trees = {"this tree": ROOT, options.before: tree}
                commands = {"python -c pass": ([python, "-c", "pass"], env)}
                for name, path in trees.items():  # the same way in for both: the package from the tree's folder
                    commands[f"crflow status ({name})"] = ([python, "-c", CLI, "status", "-c", str(site)],
                                                           {**env, "PYTHONPATH": str(path)})
                seconds: dict[str, list[float]] = {name: [] for name in commands}
                for _ in range(options.runs):  # interleaved, so a busy moment hits each alike
                    for name, (argv, environment) in commands.items():
                        seconds[name].append(timed(argv, environment))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True,
                           timeout=120)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    print(f"{'command':36} {'median s':>9}")
    for name, median in medians.items():
        print(f"{name:36} {median:9.3f}")
    after, before = medians["crflow status (this tree)"], medians[f"crflow status ({options.before})"]
    floor = medians["python -c pass"]
    print(f"ratio this tree / {options.before}: {after / before:.2f} "
          f"(above the python floor: {(after - floor) / (before - floor):.2f})")


if __name__ == "__main__":
    main()
