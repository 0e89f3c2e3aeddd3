"""Where generated certificates and credentials are kept between runs: Prefect's result
cache, encrypted with Fernet, under the site's state directory.

    vault = open_vault(state_dir, site.result_key)
    ca = vault(make_ca)("crflow registry CA", days=3650, key_algorithm="ecdsa-p256")

A rerun with the same inputs loads the cached value instead of making a new one. The key
comes from CRFLOW_RESULT_KEY, else the site file's `result_key` (a file, such as a mounted
Kubernetes Secret, or a Prefect Secret block), else `<state_dir>/result.key` (0600, made on
first use). A missing or wrong key is an error, never a silent new CA or password: Prefect
would otherwise treat an unreadable result as a cache miss and generate everything again.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path
from typing import Literal

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from prefect.filesystems import WritableFileSystem
from prefect.serializers import Serializer
from prefect.utilities.hashing import hash_objects

from crflow.config import RESULT_KEY, environment
from crflow.errors import CrflowError
from crflow.files import create_once, ensure_dir, private_dir, write_atomic
from crflow.layout import StateDir
from crflow.runcontext import open_run
from crflow.settings import ResultKey

KEYCHECK = ".keycheck"
KEYCHECK_TEXT = b"crflow result key check"


def _keys() -> dict[str, bytes]:
    """The result keys this run opened, by id. Records name their key by id, never by path:
    the cache may be read from another directory (a worker's, after the cluster's copy was
    fetched), where a path written into the record would mean nothing."""
    return open_run("the encrypted cache").keys


def read_key(key_file: Path) -> bytes | None:
    """The result key: CRFLOW_RESULT_KEY, else the key file; None if neither is there."""
    if key := environment().result_key:
        return key.get_secret_value().encode()
    try:
        return key_file.read_bytes().strip()
    except FileNotFoundError:
        return None


def key_id(key: bytes) -> str:
    """A name for a key that says nothing about it (a prefix of its SHA-256)."""
    return hashlib.sha256(key).hexdigest()[:16]


def _fernet(key: bytes) -> Fernet:
    try:
        return Fernet(key)
    except ValueError:
        raise CrflowError("the result key is not a Fernet key (32 url-safe base64 bytes, as "
                          "`python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key())'` makes)") \
            from None


class FernetSerializer(Serializer):
    """Pickle inside Fernet (AES-128-CBC + HMAC-SHA256). Only the key's id is a field:
    Prefect writes every field into the result's metadata."""

    type: Literal["crflow-fernet"] = "crflow-fernet"
    key_id: str | None = None
    key_file: str | None = None  # how records written before key ids named their key: read with the open keys

    def dumps(self, obj) -> bytes:
        keys = _keys()
        if self.key_id not in keys:
            raise CrflowError("no result key is open in this run: open the site's vault first")
        return _fernet(keys[self.key_id]).encrypt(pickle.dumps(obj))

    def loads(self, blob: bytes):
        # A record names its key by id and is read with that key only; one written before ids
        # (with key_file instead) is tried with the keys open here.
        opened = _keys()
        if self.key_id is not None and self.key_id not in opened:
            raise CrflowError("a cached result does not decrypt with the result key")
        keys = [opened[self.key_id]] if self.key_id is not None else list(opened.values())
        if not keys:
            raise CrflowError("no result key to read a cached result with: set CRFLOW_RESULT_KEY or the site's "
                              "result_key")
        try:
            return pickle.loads(MultiFernet([_fernet(k) for k in keys]).decrypt(blob))
        except InvalidToken:
            raise CrflowError("a cached result does not decrypt with the result key") from None


def identity_key(**identity) -> str:
    """A task's cache key from exactly these values, hashed as Prefect's INPUTS policy hashes
    its inputs (so a key written under that policy is found again)."""
    return hash_objects(identity, raise_on_failure=True)


class Vault:
    """Applies the encrypted result store to a task: `vault(task)(...)`. The records go to
    `results_dir`, or to `remote` (a Prefect file system block, such as the site's S3 bucket)."""

    def __init__(self, results_dir: Path, key: bytes, remote: WritableFileSystem | None = None):
        self.results_dir, self.remote, self.key = results_dir, remote, key
        _keys()[key_id(key)] = key
        self.options = dict(
            persist_result=True,
            result_storage=remote or results_dir,
            result_serializer=FernetSerializer(key_id=key_id(key)),
        )

    def __call__(self, task):
        return task.with_options(**self.options)

    def holds(self, record: str) -> bool | None:
        """Whether the cache holds `record` (a cache key): True; False when it holds none; None
        when the cache is remote (not looked at here). A record this key cannot read is an
        error: Prefect would take it for a miss and write a new one over it."""
        if self.remote is not None:
            return None
        path = self.results_dir / record
        if not path.exists():
            return False
        if not _readable(path.read_bytes(), self.key):
            raise CrflowError(f"the cache record {path} is damaged or was written with another result key, and "
                              f"crflow will not make a new one over it: restore the state_dir (crflow restore) or "
                              f"set {RESULT_KEY} or the site's result_key to the key that wrote it")
        return True

    def is_empty(self) -> bool:
        """Nothing cached yet (a new or lost state directory). A remote cache may hold records
        whatever this directory holds: the CA check against the cluster's decides then."""
        return self.remote is None and not any(p.name != KEYCHECK for p in self.results_dir.iterdir())


def _readable(record: bytes, key: bytes) -> bool:
    """A Prefect result record (JSON whose `result` is what the serializer made) this key decrypts."""
    try:
        _fernet(key).decrypt(json.loads(record)["result"].encode())
        return True
    except (ValueError, KeyError, TypeError, AttributeError, InvalidToken):
        return False


def _new_key_file(key_file: Path) -> bytes:
    """A new key in `key_file`, whole or not at all; if another run got there first, that
    run's key is the one."""
    key = Fernet.generate_key() + b"\n"
    if key_file.exists() and not key_file.read_bytes().strip():
        write_atomic(key_file, key, 0o600)  # the empty file an earlier version's killed run left
    else:
        create_once(key_file, key, 0o600)
    return key_file.read_bytes().strip()


def _configured_key(source: ResultKey) -> bytes | None:
    """The key from the site file's result_key; None if it names none. Named but absent is an
    error: a job whose Secret was not mounted must stop, not make a key of its own."""
    if source.file is not None:
        try:
            return source.file.read_bytes().strip() or None
        except FileNotFoundError:
            raise CrflowError(f"result_key.file: {source.file} does not exist; mount the result-key Secret there "
                              f"or set {RESULT_KEY}") from None
    if source.prefect_secret is not None:
        from prefect.blocks.system import Secret

        try:
            return Secret.load(source.prefect_secret).get().strip().encode()
        except ValueError:  # Prefect's word for a block it does not have
            raise CrflowError(f"result_key.prefect_secret: no Prefect Secret block named {source.prefect_secret!r}; "
                              "create it with the site's result key") from None
    return None


def find_key(state_dir: Path, source: ResultKey) -> bytes | None:
    """The site's result key: CRFLOW_RESULT_KEY, else what `source` names (an error if that is
    missing or empty), else `<state_dir>/result.key`; None if there is none yet."""
    if (source.file is not None or source.prefect_secret is not None) and not environment().result_key:
        key = _configured_key(source)
        if key is None:
            raise CrflowError("result_key: the key it names is empty; put the site's result key there")
        return key
    return read_key(StateDir(state_dir).result_key) or None  # an empty file is a key never written (a run killed making it)


def open_vault(state_dir: Path, source: ResultKey = ResultKey(), remote: WritableFileSystem | None = None) -> Vault:
    """Check (or on first use, create) the result key for this state directory (whose
    results/ keeps the key check even when the records are `remote`)."""
    results_dir, key_file = StateDir(state_dir).results, StateDir(state_dir).result_key
    private_dir(state_dir)  # also one that existed with other modes: nothing below it is anyone else's
    ensure_dir(results_dir)
    keycheck = results_dir / KEYCHECK
    key = find_key(state_dir, source)
    if key is None:
        if keycheck.exists():
            raise CrflowError(
                f"missing result key for {results_dir}: set {RESULT_KEY} or the site's result_key, or restore {key_file} "
                f"from a backup (removing {state_dir} would also remove the stored images and every login clients "
                "hold)")
        key = _new_key_file(key_file)
    cipher = _fernet(key)
    if keycheck.exists():
        try:
            cipher.decrypt(keycheck.read_bytes())
        except InvalidToken:
            raise CrflowError(
                f"wrong result key for {results_dir}: it is not the key that encrypted the cached "
                f"certificates and credentials; set {RESULT_KEY} or the site's result_key to that key, or restore "
                f"{key_file}") from None
    else:
        # A lost key check beside records: the key must read them before it is taken as the
        # site's, or a new key would pass and every record would be made again over the old.
        records = sorted((p for p in results_dir.iterdir() if not p.name.startswith(".") and p.suffix != ".lock"),
                         key=lambda p: p.stat().st_mtime)[:5]
        if records and not any(_readable(p.read_bytes(), key) for p in records):
            raise CrflowError(
                f"wrong result key for {results_dir}: it reads none of the cached records (and the key check "
                f"{keycheck.name} is gone); set {RESULT_KEY} or the site's result_key to the key that wrote them, or "
                "restore the state_dir (crflow restore)")
        create_once(keycheck, cipher.encrypt(KEYCHECK_TEXT), 0o600)
    return Vault(results_dir, key, remote)
