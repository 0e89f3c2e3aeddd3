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
from crflow.state import GENERATIONS_FILE as FILE
from crflow.state import written


class Generations(BaseModel):
    credentials: int = 0
    rotating_to: int | None = None  # set when a rotation starts, so a rerun finishes it with the same new user
    rotation_undone: bool = False  # the rotation under way was rolled back: every consumer holds the old login again
    server_cert: int = 0
    renewing_cert: bool = False  # server_cert was raised by a renewal that has not been verified yet

    @classmethod
    def load(cls, state_dir: Path) -> Generations:
        """The generations in use; if the file is lost, the copy in the identity record (so a
        lost file can neither bring generation 0's login back nor revoke the current one)."""
        path = state_dir / FILE
        try:
            return cls.model_validate_json(path.read_text())
        except FileNotFoundError:
            copy = Identity.load(state_dir).generations
            return cls.model_validate(copy) if copy else cls()
        except ValidationError:
            raise CrflowError(f"{path} is damaged; it only holds generation numbers: fix or restore it") from None

    def save(self, state_dir: Path) -> Generations:
        record = Identity.load(state_dir)
        record.generations = self.model_dump()
        record.save(state_dir)  # first: a crash between the two leaves the record ahead, never behind
        write_atomic(state_dir / FILE, self.model_dump_json(indent=2).encode(), 0o600)
        written()  # once, with both files written (the record's save above does not push)
        return self
