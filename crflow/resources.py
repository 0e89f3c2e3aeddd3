"""What crflow ships beside its code, found in the installed package: the chart and the
deployment files.

    chart = packaged("helm_chart")                 # the folder helm renders
    template = packaged("deployments", "base-job-template.json")

In a wheel they are `crflow/helm_chart/` and `crflow/deployments/`. In a checkout those two
names are links to the top-level `helm_chart/` and `deployments/`, so both ways read one copy.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from crflow.errors import CrflowError


def packaged(*parts: str) -> Path:
    """A file or folder shipped in the crflow package, as a path helm and open() can read."""
    found = files("crflow").joinpath(*parts)
    # helm reads the chart from a folder: a package inside a zip has none to give it.
    if not isinstance(found, Path):
        raise CrflowError("crflow is installed inside an archive; install its wheel with pip or pipx into a folder")
    if not found.exists():
        raise CrflowError(f"crflow's {'/'.join(parts)} is missing from {found.parent}: reinstall crflow")
    return found
