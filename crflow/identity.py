"""A site's identity, recorded where the cache cannot lose it: `<state_dir>/identity.json`.

The encrypted cache (crflow/vault.py) holds the CA, the server certificates and the logins.
Prefect treats a result it cannot read (truncated, wrong key) as a cache miss and would make
new ones: a new CA that no client trusts, a new login that locks every consumer out. So the
first time crflow sees each of them it records their public identity here (the CA's and each
server certificate's fingerprint, each login's public id), and every later run checks what
the cache gave against the record. A mismatch stops the run before anything is written.

The record also keeps a copy of the generations, so that losing `generations.json` alone can
neither bring a retired login back nor revoke the current one. It holds no secret.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ValidationError

from crflow.config import RESULT_KEY
from crflow.errors import CrflowError
from crflow.files import ensure_dir, write_atomic
from crflow.layout import IDENTITY as FILE
from crflow.state import written


class Identity(BaseModel):
    ca: str | None = None  # the CA's SHA-256 fingerprint
    server_certs: dict[str, str] = {}  # what the certificate was made for (see server_cert_key) -> fingerprint
    logins: dict[str, str] = {}  # "generation:user" -> the login's public id
    generations: dict[str, int | bool | None] | None = None  # a copy of generations.json
    retired_cas: list[str] = []  # CAs replaced by `crflow install --new-ca`, never made again

    @classmethod
    def load(cls, state_dir: Path) -> Identity:
        path = state_dir / FILE
        try:
            return cls.model_validate_json(path.read_text())
        except FileNotFoundError:
            return cls()
        except ValidationError:
            raise CrflowError(f"{path} is damaged; restore it from a backup; it only holds "
                              "fingerprints and generation numbers") from None

    def save(self, state_dir: Path) -> None:
        """Write the record; whoever changed it (guard, Generations.save) pushes the state once."""
        ensure_dir(state_dir)
        write_atomic(state_dir / FILE, self.model_dump_json(indent=2).encode(), 0o600)


def guard(state_dir: Path, kind: str, key: str, found: str) -> None:
    """Record `found` as the `kind` (ca, server_certs or logins) under `key`, or, if the record
    already holds another one, stop with a line naming the cache and the fix."""
    record = Identity.load(state_dir)
    entries = {"": record.ca} if kind == "ca" else getattr(record, kind)
    recorded = entries.get(key)
    if recorded is None:
        if kind == "ca":
            record.ca = found
        else:
            entries[key] = found
        record.save(state_dir)
        written()
    elif recorded != found:
        what = {"ca": "CA", "server_certs": f"server certificate ({key})", "logins": f"login ({key})"}[kind]
        raise CrflowError(
            f"the {what} in the cache {state_dir / 'results'} is not the one this site uses (recorded in "
            f"{state_dir / FILE}: {recorded}); the cache was damaged or read with another key, and crflow will "
            f"not make a new one: restore {state_dir} from a backup or set the right {RESULT_KEY}")
