"""Which generation of the rotated secrets is in use, kept in `<state_dir>/generations.json`.

The credentials and the server certificate are cached by their inputs, and the generation
is one of them: rotation makes generation N+1, and every later run (install, upgrade,
verify) asks the cache for generation N+1, so it keeps the rotated values and never brings
the old ones back. The file holds numbers only, never a secret.

    gens = Generations.load(state_dir)
    gens.credentials            # the login in use
    gens.rotating_to            # a credential rotation under way (its new generation), or None
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ValidationError

from crflow.errors import CrflowError
from crflow.files import write_atomic
from crflow.identity import Identity
from crflow.layout import GENERATIONS as FILE
from crflow.state import written


class Generations(BaseModel):
    credentials: int = 0
    rotating_to: int | None = None  # set when a rotation starts, so a rerun finishes it with the same new user
    rotation_undone: bool = False  # the rotation under way was rolled back: every consumer holds the old login again
    server_cert: int = 0
    renewing_cert: bool = False  # server_cert was raised by a renewal that has not been verified yet
    ca: int = 0  # raised only by `crflow install --new-ca`: the CA every client trusts is otherwise for good

    def progress(self) -> tuple[int, int, int, int]:
        """How far the site has gone: no number here ever goes down."""
        return self.credentials, max(self.credentials, self.rotating_to or 0), self.server_cert, self.ca

    def at_least(self, other: Generations) -> bool:
        return all(mine >= theirs for mine, theirs in zip(self.progress(), other.progress()))

    @classmethod
    def _held(cls, state_dir: Path) -> tuple[Generations | None, Generations | None, Identity]:
        """(generations.json, the identity record's copy, the record); None where one is missing."""
        path = state_dir / FILE
        try:
            own = cls.model_validate_json(path.read_text())
        except FileNotFoundError:
            own = None
        except ValidationError:
            raise CrflowError(f"{path} is damaged; it only holds generation numbers: fix or restore it") from None
        record = Identity.load(state_dir)
        return own, cls.model_validate(record.generations) if record.generations else None, record

    @classmethod
    def load(cls, state_dir: Path) -> Generations:
        """The generations in use, from generations.json and its copy in the identity record:
        the one further on (the copy is written first, so it wins a tie), and whichever file
        was lost or left behind is written again at once. So losing either file, in any order,
        can neither bring a retired login back nor revoke the current one."""
        own, copy, record = cls._held(state_dir)
        if own is None and copy is None:
            return cls()
        if own is not None and copy is not None and not (copy.at_least(own) or own.at_least(copy)):
            raise CrflowError(f"{state_dir / FILE} ({own.progress()}) and the copy in {state_dir / 'identity.json'} "
                              f"({copy.progress()}) disagree; restore {state_dir} from a backup (crflow restore)")
        newest = copy if copy is not None and (own is None or copy.at_least(own)) else own
        if own != newest or copy != newest:
            newest._write(state_dir, record)
        return newest

    def save(self, state_dir: Path) -> Generations:
        own, copy, record = self._held(state_dir)
        current = max((g for g in (own, copy) if g is not None), key=Generations.progress, default=Generations())
        if not self.at_least(current):  # a bug, not a user's doing: fail before anything is written
            raise RuntimeError(f"generations would go down from {current.progress()} to {self.progress()}")
        self._write(state_dir, record)
        return self

    def _write(self, state_dir: Path, record: Identity) -> None:
        record.generations = self.model_dump()
        record.save(state_dir)  # first: a crash between the two leaves the record ahead, never behind
        write_atomic(state_dir / FILE, self.model_dump_json(indent=2).encode(), 0o600)
        written()  # once, with both files written (the record's save above does not push)
