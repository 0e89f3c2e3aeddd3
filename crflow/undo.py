"""Undo for writes made inside a Prefect transaction (see flows/rotate.py).

A task that changes something the registry's users depend on (a Secret, a mounted file,
the client bundle) records how to put back what was there:

    @task
    def put_secret(...):
        with undoable() as on_undo:
            before = read(...)
            write(...)
            on_undo(lambda: write_back(before))

    put_secret.on_rollback(undo)

If the task itself fails half-way, `undoable` undoes its own writes at once (Prefect runs
rollback hooks of successful tasks only). If it succeeds, the undo is kept on the task's
transaction, and runs when an enclosing `with transaction():` rolls back. Outside a
transaction, nothing is kept. Undo functions hold previous values in memory only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from prefect.transactions import Transaction, get_transaction

UNDO = "crflow-undo"


def undo(txn: Transaction) -> None:
    """Prefect rollback hook: run the task's recorded undo functions, last write first."""
    for step in reversed(txn.get(UNDO, [])):
        step()


@contextlib.contextmanager
def undoable() -> Iterator[Callable[[Callable[[], object]], None]]:
    steps: list[Callable[[], object]] = []
    try:
        yield steps.append
    except BaseException:
        for step in reversed(steps):
            step()
        raise
    txn = get_transaction()
    if txn is not None and steps:
        txn.set(UNDO, [*txn.get(UNDO, []), *steps])
