"""A site's state kept apart from this machine, so that a run anywhere (a fresh worker pod, a
second laptop) carries on where the last one stopped: on the kubernetes target, one Secret in
the registry's namespace holds the generations, the identity record and the encrypted cache
(the CA key pair and the logins, each record encrypted with the result key, which is never
in it).

    data = pack(state_dir)             # what the Secret holds: file name -> bytes
    merge(state_dir, held)             # bring state_dir up to date from the Secret

    run.keep_state = target.keep_state  # every state write of the run reaches the Secret at once

Every write of the generations or the identity record is pushed before the run goes on: a
rotation killed after it retired a login must leave the cluster's copy past that login, or
the next run, on a fresh worker, would hand the retired login out again.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from crflow.errors import CrflowError
from crflow.files import ensure_dir, private_dir, write_atomic
from crflow.layout import GENERATIONS as GENERATIONS_FILE
from crflow.layout import IDENTITY as IDENTITY_FILE
from crflow.layout import RESULTS
from crflow.runcontext import current_run

if TYPE_CHECKING:  # identity.py reports its writes here
    from crflow.identity import Identity

CACHE_PREFIX = "results."  # a Secret's keys are flat: results/<name> is held as results.<name>
MAX_BYTES = 900 * 1024  # the API server refuses Secrets over 1 MiB; stop short of it with a clear line

def secret_name(release: str) -> str:
    """The Secret that holds a release's state, beside the registry's own."""
    return f"{release}-crflow-state"


def pack(state_dir: Path) -> dict[str, bytes]:
    """The state a run elsewhere needs, as flat file name -> content (no result key, no client files)."""
    data = {}
    for name in (GENERATIONS_FILE, IDENTITY_FILE):
        if (state_dir / name).exists():
            data[name] = (state_dir / name).read_bytes()
    results = state_dir / RESULTS
    if results.is_dir():
        for path in sorted(results.iterdir()):
            if path.is_file() and not path.name.endswith(".lock"):
                data[CACHE_PREFIX + path.name] = path.read_bytes()
    size = sum(len(v) for v in data.values())
    if size > MAX_BYTES:
        raise CrflowError(f"the state of {state_dir} is {size // 1024} KiB, more than a Secret holds; "
                          f"remove cache records of retired generations from {results}")
    return data


def _identity(content: bytes, where: str) -> Identity:
    from crflow.identity import Identity

    try:
        return Identity.model_validate_json(content)
    except ValidationError:
        raise CrflowError(f"the identity record in {where} is damaged; restore it from a backup") from None


def _merged_identity(local: Identity, held: Identity, where: str) -> Identity:
    """Both records' entries; the same entry with two values means two sites' states met."""
    if local.ca and held.ca and local.ca != held.ca:
        raise CrflowError(f"the CA recorded here ({local.ca}) is not the one {where} holds ({held.ca}): this "
                          "state_dir belongs to another site; point state_dir elsewhere")
    merged = held.model_copy(update={"ca": held.ca or local.ca})
    for kind in ("server_certs", "logins"):
        mine, theirs = getattr(local, kind), getattr(held, kind)
        clash = [k for k in mine.keys() & theirs.keys() if mine[k] != theirs[k]]
        if clash:
            raise CrflowError(f"the {kind.replace('_', ' ')} recorded here for {clash[0]} differ from what {where} "
                              "holds: this state_dir belongs to another site; point state_dir elsewhere")
        setattr(merged, kind, {**mine, **theirs})
    return merged


def to_hold(state_dir: Path, held: dict[str, bytes]) -> dict[str, bytes] | None:
    """What the Secret should hold now that this run changed state_dir (None: nothing worth
    holding yet, as in a run that stopped before the site had a CA). The generations and the
    identity record are this run's (it fetched them under the site's lock); cache records are
    only ever added: one the Secret holds is never replaced, so a run with a wrong key that
    made a record anew cannot overwrite the good one."""
    from crflow.identity import Identity

    if Identity.load(state_dir).ca is None:
        return None
    local = pack(state_dir)
    return {**local, **{k: v for k, v in held.items() if k.startswith(CACHE_PREFIX)}}


def merge(state_dir: Path, held: dict[str, bytes], where: str) -> None:
    """Bring state_dir up to date from `held` (what `pack` made, from `where`). The held copy is
    written after every change under the site's lock, so its generations win; records are
    added, and where both have one the held one stays."""
    private_dir(state_dir)
    ensure_dir(state_dir / RESULTS)
    if IDENTITY_FILE in held:
        from crflow.identity import Identity

        local = Identity.load(state_dir)
        merged = _merged_identity(local, _identity(held[IDENTITY_FILE], where), where)
        write_atomic(state_dir / IDENTITY_FILE, merged.model_dump_json(indent=2).encode(), 0o600)
    if GENERATIONS_FILE in held:
        write_atomic(state_dir / GENERATIONS_FILE, held[GENERATIONS_FILE], 0o600)
    for name, content in held.items():
        if name.startswith(CACHE_PREFIX):
            file = name.removeprefix(CACHE_PREFIX)
            if "/" in file or file in ("", ".", ".."):
                raise CrflowError(f"{where} holds a cache record named {file!r}, which crflow never writes")
            write_atomic(state_dir / RESULTS / file, content, 0o600)


def written() -> None:
    """The state on disk changed: push it now, if the run holds it elsewhere (its context's
    `keep_state`, which the run sets where it takes the site's slot)."""
    run = current_run()
    if run is not None and run.keep_state is not None:
        run.keep_state()
