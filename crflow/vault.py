"""Where generated certificates and credentials are kept between runs: Prefect's result
cache, encrypted with Fernet, under the site's state directory.

    vault = open_vault(state_dir)
    ca = vault(make_ca)("crflow registry CA", days=3650, key_algorithm="ecdsa-p256")

A rerun with the same inputs loads the cached value instead of making a new one. The key
comes from CRFLOW_RESULT_KEY or from `<state_dir>/result.key` (0600, made on first use).
A missing or wrong key is an error, never a silent new CA or password: Prefect would
otherwise treat an unreadable result as a cache miss and generate everything again.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Literal

from cryptography.fernet import Fernet, InvalidToken
from prefect.serializers import Serializer
from prefect.utilities.hashing import hash_objects

from crflow.errors import CrflowError
from crflow.files import private_dir

KEY_ENV = "CRFLOW_RESULT_KEY"
KEYCHECK = ".keycheck"
KEYCHECK_TEXT = b"crflow result key check"


def read_key(key_file: Path) -> bytes | None:
    """The result key: CRFLOW_RESULT_KEY, else the key file; None if neither is there."""
    if key := os.environ.get(KEY_ENV):
        return key.encode()
    try:
        return key_file.read_bytes().strip()
    except FileNotFoundError:
        return None


def _fernet(key: bytes) -> Fernet:
    try:
        return Fernet(key)
    except ValueError:
        raise CrflowError(f"the result key (from {KEY_ENV} or result.key) is not a Fernet key") from None


class FernetSerializer(Serializer):
    """Pickle inside Fernet (AES-128-CBC + HMAC-SHA256). Only the key file's *path* is a
    field: Prefect writes every field into the result's metadata."""

    type: Literal["crflow-fernet"] = "crflow-fernet"
    key_file: str

    def _cipher(self) -> Fernet:
        key = read_key(Path(self.key_file))
        if key is None:
            raise CrflowError(f"no result key: set {KEY_ENV} or restore {self.key_file}")
        return _fernet(key)

    def dumps(self, obj) -> bytes:
        return self._cipher().encrypt(pickle.dumps(obj))

    def loads(self, blob: bytes):
        try:
            return pickle.loads(self._cipher().decrypt(blob))
        except InvalidToken:
            raise CrflowError("a cached result does not decrypt with the result key") from None


def identity_key(**identity) -> str:
    """A task's cache key from exactly these values, hashed as Prefect's INPUTS policy hashes
    its inputs (so a key written under that policy is found again)."""
    return hash_objects(identity, raise_on_failure=True)


class Vault:
    """Applies the encrypted result store to a task: `vault(task)(...)`."""

    def __init__(self, results_dir: Path, key_file: Path):
        self.results_dir = results_dir
        self.options = dict(
            persist_result=True,
            result_storage=results_dir,
            result_serializer=FernetSerializer(key_file=str(key_file)),
        )

    def __call__(self, task):
        return task.with_options(**self.options)

    def is_empty(self) -> bool:
        """Nothing cached yet (a new or lost state directory)."""
        return not any(p.name != KEYCHECK for p in self.results_dir.iterdir())


def _new_key_file(key_file: Path) -> bytes:
    """A new key in `key_file`, whole or not at all (written aside, then linked into place, which
    fails if another run got there first: then that run's key is the one)."""
    aside = key_file.with_name(f".{key_file.name}.{os.getpid()}")
    fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(Fernet.generate_key() + b"\n")
        out.flush()
        os.fsync(out.fileno())
    try:
        if key_file.exists() and not key_file.read_bytes().strip():
            os.replace(aside, key_file)  # the empty file a killed run left
        else:
            os.link(aside, key_file)
    except FileExistsError:
        pass
    finally:
        aside.unlink(missing_ok=True)
    return key_file.read_bytes().strip()


def open_vault(state_dir: Path) -> Vault:
    """Check (or on first use, create) the result key for this state directory."""
    results_dir, key_file = state_dir / "results", state_dir / "result.key"
    private_dir(state_dir)  # also one that existed with other modes: nothing below it is anyone else's
    results_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    keycheck = results_dir / KEYCHECK
    key = read_key(key_file) or None  # an empty file is a key never written (a run killed making it)
    if key is None:
        if keycheck.exists():
            raise CrflowError(
                f"missing result key for {results_dir}: set {KEY_ENV} or restore {key_file} from a backup "
                f"(removing {state_dir} would also remove the stored images and every login clients hold)"
            )
        key = _new_key_file(key_file)
    cipher = _fernet(key)
    if keycheck.exists():
        try:
            cipher.decrypt(keycheck.read_bytes())
        except InvalidToken:
            raise CrflowError(
                f"wrong result key for {results_dir}: it is not the key that encrypted the cached "
                f"certificates and credentials; set {KEY_ENV} to that key or restore {key_file}"
            ) from None
    else:
        keycheck.write_bytes(cipher.encrypt(KEYCHECK_TEXT))
    return Vault(results_dir, key_file)
