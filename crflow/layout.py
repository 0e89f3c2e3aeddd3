"""What crflow keeps in a site's state_dir, by name, and the record of what it made there.

A state_dir may be a folder crflow made, or one the user already had (`state_dir: .`, beside
notes and the site file itself). So crflow records which of its own names it made
(`.crflow-made`), and `uninstall --purge` removes exactly those: never a blind rmtree.

    state = StateDir(site.state_dir)
    state.identity          # state_dir/identity.json: every name is spelt here, and only here
    claim(state_dir)        # at a run's start: what was there before crflow, if this is the first
    note_made(state_dir)    # at its end: crflow's names that are there now, and were not before
    purge(state_dir)        # (removed, left): crflow's own entries gone, and what stayed
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from crflow.errors import CrflowError
from crflow.files import ensure_dir, read_bytes, remove, write_atomic

RESULT_KEY = "result.key"
RESULTS = "results"
IDENTITY = "identity.json"
GENERATIONS = "generations.json"
CLIENT = "client"
POD = "pod"
DATA = "data"
TRUSTED = "trusted.json"
LOCK = "site.lock"
ROTATION = "rotation"
USAGE_CACHE = "usage-cache.json"
GC_WINDOW = "gc-window.json"
MIRRORS = "mirrors"
MADE = ".crflow-made"
# Every name crflow may make in a state_dir: the only ones a purge may remove.
OWN = frozenset({RESULT_KEY, RESULTS, IDENTITY, GENERATIONS, CLIENT, POD, DATA, TRUSTED, LOCK, ROTATION,
                 USAGE_CACHE, GC_WINDOW, MIRRORS, MADE})


@dataclass(frozen=True)
class StateDir:
    """A site's state_dir and where each thing crflow keeps in it lives."""

    path: Path

    @property
    def result_key(self) -> Path:
        return self.path / RESULT_KEY  # 0600: the key of the encrypted cache, unless the site keeps it elsewhere

    @property
    def results(self) -> Path:
        return self.path / RESULTS  # the encrypted cache: CA, server certificates, logins

    @property
    def identity(self) -> Path:
        return self.path / IDENTITY  # what the site's CA and logins are, to check the cache against

    @property
    def generations(self) -> Path:
        return self.path / GENERATIONS  # which CA, certificate and login are in use

    @property
    def client(self) -> Path:
        return self.path / CLIENT  # ca.crt and auth.json, for the site's clients

    @property
    def pod(self) -> Path:
        return self.path / POD  # the local target's registry process and its volumes

    @property
    def data(self) -> Path:
        return self.path / DATA  # the local target's blobs, unless storage.path says elsewhere

    @property
    def trusted(self) -> Path:
        return self.path / TRUSTED  # what `crflow trust` wrote on this machine

    @property
    def lock(self) -> Path:
        return self.path / LOCK  # the lease of the run that holds the site

    @property
    def rotation(self) -> Path:
        return self.path / ROTATION  # a rotation's client files for the old and the new login

    @property
    def mirrors(self) -> Path:
        return self.path / MIRRORS  # the local target's mirror processes, a folder each

    @property
    def usage_cache(self) -> Path:
        return self.path / USAGE_CACHE


def boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def lock_holder(state_dir: Path) -> tuple[dict, bool] | None:
    """The run that holds the site on this machine, as its lock file records it (lease, pid,
    boot), and whether it is alive (a process of another boot counts as alive: its lease
    decides); None when no lock file is there."""
    try:
        holder = json.loads(StateDir(state_dir).lock.read_text())
    except (FileNotFoundError, ValueError):
        return None
    gone = holder.get("boot") == boot_id() and not Path(f"/proc/{holder.get('pid')}").exists()
    return holder, not gone


def _record(state_dir: Path) -> dict | None:
    content = read_bytes(state_dir / MADE)
    if content is None:
        return None
    try:
        record = json.loads(content)
        return {"made": [n for n in record["made"] if n in OWN], "found": list(record["found"])}
    except (ValueError, KeyError, TypeError):
        raise CrflowError(f"{state_dir / MADE} is damaged; it lists what crflow made in {state_dir}: remove it and "
                          "run crflow install again") from None


def _present(state_dir: Path) -> set[str]:
    try:
        return set(os.listdir(state_dir))
    except FileNotFoundError:
        return set()


def claim(state_dir: Path) -> None:
    """Before a run writes anything: on a state_dir crflow has no record of, note what is
    already there. A state an earlier crflow made (it has an identity record) is crflow's."""
    if _record(state_dir) is not None:
        return
    present = _present(state_dir)
    earlier = IDENTITY in present or RESULTS in present
    record = {"made": sorted(present & OWN) if earlier else [], "found": [] if earlier else sorted(present)}
    ensure_dir(state_dir)
    write_atomic(state_dir / MADE, json.dumps(record).encode(), 0o600)


def note_made(state_dir: Path) -> None:
    """Add crflow's names that are now in state_dir and were not there before it."""
    record = _record(state_dir)
    if record is None and not _present(state_dir) & (OWN - {LOCK}):  # nothing of crflow's here (purged)
        return
    if record is None:
        claim(state_dir)
        record = _record(state_dir)
    made = sorted(set(record["made"]) | ((_present(state_dir) & OWN) - set(record["found"])))
    if made != record["made"]:
        write_atomic(state_dir / MADE, json.dumps({**record, "made": made}).encode(), 0o600)


def check_purgeable(state_dir: Path) -> None:
    """A state_dir a purge may empty: not `/`, a home folder, crflow's own checkout, a mount
    point, or a folder that holds any of those."""
    resolved = Path(os.path.realpath(state_dir))
    checkout = Path(__file__).resolve().parent.parent
    guarded = {Path("/"): "/", Path.home().resolve(): "the home folder", Path("/root"): "root's home folder"}
    if (checkout / "pyproject.toml").exists():
        guarded[checkout] = "crflow's own checkout"
    for path, what in guarded.items():
        if path == resolved or path.is_relative_to(resolved):
            raise CrflowError(f"state_dir {state_dir} is {what} or holds it; crflow will not purge it: point "
                              "state_dir at a folder of its own, or remove what you want gone by hand")
    if os.path.ismount(resolved):
        raise CrflowError(f"state_dir {state_dir} is a mount point; crflow will not purge it: remove what you want "
                          "gone by hand")


def purge(state_dir: Path) -> tuple[list[str], list[str]]:
    """Remove what crflow made in state_dir, then the folder if nothing else is in it; returns
    (the names that went, what stayed and why)."""
    check_purgeable(state_dir)
    record = _record(state_dir) or {"made": [], "found": []}
    removed = [name for name in sorted(set(record["made"]) - {MADE}) if remove(state_dir / name)]
    remove(state_dir / MADE)
    left = sorted(_present(state_dir))
    if not left:
        os.rmdir(state_dir)
        return removed, []
    return removed, [f"{state_dir}, which holds {', '.join(left[:5])}{' ...' if len(left) > 5 else ''}: crflow did "
                     "not make them"]
