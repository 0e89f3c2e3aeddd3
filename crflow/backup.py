"""What a site cannot be rebuilt without, in one encrypted file: the result key and the
encrypted cache (the CA, the server certificates, the logins), the generations, the identity
record and the client files. Stored images are not in it: they live in the bucket or the
storage directory, and stay there.

    write_backup(state_dir, Path("site.crflow-backup"), passphrase, site.result_key, site_identity(site))
    restore_backup(state_dir, Path("site.crflow-backup"), passphrase, site_identity(site))  # into an empty state_dir

A backup records whose it is (release, addresses, target); a restore refuses another site's.

The file is a tar archive inside Fernet (AES-128-CBC + HMAC-SHA256), keyed by scrypt from a
passphrase and a random salt. The passphrase never appears in an argument or a message.
"""

from __future__ import annotations

import base64
import io
import json
import secrets
import tarfile
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from crflow import layout
from crflow.errors import CrflowError
from crflow.files import private_dir, write_atomic
from crflow.settings import ResultKey, Site
from crflow.vault import find_key

MAGIC = b"crflow-backup-1\n"
SALT_BYTES = 16
# What a restore brings back, relative to state_dir; the encrypted cache is the whole results/ folder.
KEPT = [layout.RESULT_KEY, layout.RESULTS, layout.GENERATIONS, layout.IDENTITY, f"{layout.CLIENT}/ca.crt",
        f"{layout.CLIENT}/auth.json"]
KEPT_TOP = {name.split("/")[0] for name in KEPT}
SITE = "site.json"  # whose backup it is: release, addresses, target (not restored; checked)


def site_identity(site: Site) -> dict:
    """What tells one site from another, as a backup records it."""
    return {"release": site.release, "servers": sorted(site.registry.servers), "target": site.target}


def _identity_in(members: dict[str, bytes]) -> dict:
    """The site a backup was made for: its record, or for a backup made before there was one,
    its CA's name (crflow RELEASE CA) and the addresses its auth.json names."""
    if SITE in members:
        return json.loads(members[SITE])
    from cryptography import x509

    found = {}
    if "client/ca.crt" in members:
        name = x509.load_pem_x509_certificate(members["client/ca.crt"]).subject.rfc4514_string()
        found["release"] = name.removeprefix("CN=crflow ").removesuffix(" CA")
    if "client/auth.json" in members:
        found["servers"] = sorted(json.loads(members["client/auth.json"])["auths"])
    return found


def _cipher(passphrase: str, salt: bytes) -> Fernet:
    if not passphrase:
        raise CrflowError("an empty passphrase protects nothing; set CRFLOW_BACKUP_PASSPHRASE or type one")
    key = Scrypt(salt=salt, length=32, n=2**15, r=8, p=1).derive(passphrase.encode())
    return Fernet(base64.urlsafe_b64encode(key))


def backups_beside(state_dir: Path) -> list[Path]:
    """crflow backups in the state_dir's folder and in it (by their first bytes, not their names)."""
    found = []
    for folder in (state_dir.parent, state_dir):
        try:
            entries = sorted(folder.iterdir())
        except OSError:
            continue
        for path in entries[:1000]:  # a folder of a million files is no place to look for one
            try:
                if path.is_file() and not path.is_symlink():
                    with open(path, "rb") as file:
                        if file.read(len(MAGIC)) == MAGIC:
                            found.append(path)
            except OSError:
                continue
    return found


def write_backup(state_dir: Path, out: Path, passphrase: str, source: ResultKey, site: dict) -> list[str]:
    """Write the backup (with the result key from wherever the site keeps it); returns what it
    holds (paths relative to state_dir)."""
    state = layout.StateDir(state_dir)
    if not state.identity.exists() and not state.results.exists():
        raise CrflowError(f"nothing to back up in {state_dir}: run crflow install first")
    key = find_key(state_dir, source)
    if key is None:
        raise CrflowError(f"no result key for {state_dir}: set CRFLOW_RESULT_KEY or the site's result_key, or the "
                          "backup could not be read")
    buffer, held = io.BytesIO(), []
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in KEPT:
            path = state_dir / name
            if name == layout.RESULT_KEY and not path.exists():  # the key came from CRFLOW_RESULT_KEY or result_key
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(key) + 1, 0o600
                tar.addfile(info, io.BytesIO(key + b"\n"))
            elif path.exists():
                tar.add(path, arcname=name)
            else:
                continue
            held.append(name)
        record = json.dumps(site).encode()
        info = tarfile.TarInfo(SITE)
        info.size, info.mode = len(record), 0o600
        tar.addfile(info, io.BytesIO(record))
    salt = secrets.token_bytes(SALT_BYTES)
    write_atomic(out, MAGIC + salt + _cipher(passphrase, salt).encrypt(buffer.getvalue()), 0o600, make_parents=0o700)
    return held


def restore_backup(state_dir: Path, backup: Path, passphrase: str, site: dict) -> list[str]:
    """Bring a backup of `site` (as site_identity says) back into a state_dir that holds no
    site; returns what it restored."""
    state = layout.StateDir(state_dir)
    if state.identity.exists() or any(state.results.glob("*")):
        raise CrflowError(f"{state_dir} already holds a site; move it away before restoring into it")
    try:
        blob = backup.read_bytes()
    except OSError as err:
        raise CrflowError(f"cannot read backup {backup}: {err.strerror}") from None
    if not blob.startswith(MAGIC):
        raise CrflowError(f"{backup} is not a crflow backup")
    salt, token = blob[len(MAGIC):len(MAGIC) + SALT_BYTES], blob[len(MAGIC) + SALT_BYTES:]
    try:
        archive = _cipher(passphrase, salt).decrypt(token)
    except InvalidToken:
        raise CrflowError(f"{backup} does not decrypt with this passphrase") from None
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile() or m.isdir()]
        if len(members) != len(tar.getmembers()):
            raise CrflowError(f"{backup} holds links or devices, which crflow never writes into a backup")
        files = {m.name: tar.extractfile(m).read() for m in members if m.isfile()}
    theirs = _identity_in(files)
    for key, mine in site.items():
        if key in theirs and theirs[key] != mine:
            raise CrflowError(f"{backup} is the backup of another site ({key} {theirs[key]}, not {mine}); restore "
                              "it with that site's file")
    private_dir(state_dir)
    layout.claim(state_dir)
    for name, content in files.items():
        if name == SITE:
            continue
        path = state_dir / name
        if not path.resolve().is_relative_to(state_dir.resolve()) or name.split("/")[0] not in KEPT_TOP:
            raise CrflowError(f"{backup} holds {name!r}, which crflow never writes into a backup")
        private_dir(path.parent)
        write_atomic(path, content, 0o600)
    layout.note_made(state_dir)
    return [name for name in KEPT if name in files or any(f.startswith(name + "/") for f in files)]
