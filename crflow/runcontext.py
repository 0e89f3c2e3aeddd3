"""What one crflow run holds open, handed explicitly to the steps inside it: the site, its
target (built once, where the site's slot is taken), the result keys the run opened (by key
id), the S3 keys of its result cache, and how its state is pushed to where the target keeps
it.

    with running(RunContext(site, target_for(site))) as run:
        run.target.deploy(...)

It lives in a context variable for the run's length, as Prefect's own run context does, so
the places Prefect calls back into crflow (a result serializer, a result storage block) find
it too. Nothing outlives the run: two runs in one process (two sites' runs in one worker)
never see each other's keys.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from crflow.errors import CrflowError


@dataclass(eq=False)
class RunContext:
    site: Any  # the Site (settings); Any, so a test may open a context with no site file
    target: Any  # the run's Target (targets/ sits above this module)
    keys: dict[str, bytes] = field(default_factory=dict)  # result keys opened by this run, by key id
    s3_keys: dict[tuple[str, str, str], Any] = field(default_factory=dict)  # (endpoint, bucket, prefix) -> S3Keys
    keep_state: Callable[[], None] | None = None  # pushes state_dir's state where the target holds it


_current: contextvars.ContextVar[RunContext | None] = contextvars.ContextVar("crflow_run", default=None)


def current_run() -> RunContext | None:
    return _current.get()


def open_run(what: str) -> RunContext:
    """The open run, for `what` needs one; a call outside any run is a bug, named."""
    run = _current.get()
    if run is None:
        raise CrflowError(f"{what} needs an open crflow run (flows open one where they take the site's slot)")
    return run


@contextlib.contextmanager
def running(run: RunContext) -> Iterator[RunContext]:
    token = _current.set(run)
    try:
        yield run
    finally:
        _current.reset(token)
