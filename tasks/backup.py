"""Backup and restore of one Slipway home: what a node needs to serve the same champions again.

A backup holds the registry database (SQLite, copied with SQLite's online backup, so a running
MLflow does not matter) and its artifact store, the model store, the keyring (public keys and CA
chains; the private signing key only when asked, encrypted with a passphrase), and the SQLite
databases under state/ and logs/ (the gateway's state store and usage log, the same way). Every
file is listed in backup.json with its sha256; restore checks each one before it writes, into an
empty home only, and rewrites the artifact locations the registry recorded for the old home.

What this does not cover, and a production backup must add: PostgreSQL databases (pg_dump of the
MLflow and Prefect databases and of the usage log when `usage.url` is PostgreSQL) and a remote
artifact store (S3 or MinIO: use its own versioning or replication).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

from configs.home import Home
from tasks.manifest import sha256_file
from tasks.signing import default_keys, trusted
from tasks.store import read_only

FORMAT = 1
PRIVATE_KEY = "keys/signing.key.enc"


class BackupError(RuntimeError):
    """The backup or restore cannot be done; the message says why and what to do."""


def _copy_sqlite(source: Path, target: Path) -> None:
    """A consistent copy of a live SQLite database (its WAL included)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with (
        sqlite3.connect(f"{source.as_uri()}?mode=ro", uri=True) as src,
        sqlite3.connect(target) as dst,
    ):
        src.backup(dst)


def _copy_tree(source: Path, target: Path) -> None:
    shutil.copytree(source, target, symlinks=False, ignore=shutil.ignore_patterns(".staging"))


def _sqlite_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.sqlite")) if folder.is_dir() else []


def backup(home: Home, dest: Path, passphrase: bytes | None = None) -> dict:
    """Write a backup of `home` into the new folder `dest`; with `passphrase`, the private
    signing key goes in too, encrypted with it. Returns what backup.json records."""
    if dest.exists() and any(dest.iterdir()):
        raise BackupError(f"{dest} is not empty: back up into a new folder")
    if not home.tracking_uri.startswith("sqlite:///"):
        raise BackupError(
            f"the registry is {home.tracking_uri}, not this home's SQLite database: back it up "
            "with its own tools (pg_dump for PostgreSQL) and the artifact store with its own"
        )
    dest.mkdir(parents=True, exist_ok=True)
    database = Path(home.tracking_uri.removeprefix("sqlite:///"))
    if database.is_file():
        _copy_sqlite(database, dest / "mlflow" / "mlflow.db")
    if home.artifact_root.is_dir():
        _copy_tree(home.artifact_root, dest / "mlflow" / "artifacts")
    if home.models.is_dir():
        _copy_tree(home.models, dest / "models")
    if trusted(home).is_dir():
        _copy_tree(trusted(home), dest / "keys" / "trusted")
    private, public = default_keys(home)
    if public.is_file():
        shutil.copyfile(public, dest / "keys" / public.name)
    if passphrase is not None:
        if not private.is_file():
            raise BackupError(f"no private signing key at {private} to back up")
        (dest / PRIVATE_KEY).write_bytes(_encrypt(private.read_bytes(), passphrase))
    for folder in ("state", "logs"):
        for db in _sqlite_files(home.root / folder):
            _copy_sqlite(db, dest / folder / db.name)
    record = {
        "format": FORMAT,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "home": str(home.root),
        "files": {
            p.relative_to(dest).as_posix(): sha256_file(p)
            for p in sorted(dest.rglob("*"))
            if p.is_file()
        },
    }
    (dest / "backup.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def restore(source: Path, home: Home, passphrase: bytes | None = None) -> list[str]:
    """Restore the backup in `source` into `home`, which must hold no registry and no models
    yet. Every file is checked against backup.json first. Returns what was restored."""
    index = source / "backup.json"
    if not index.is_file():
        raise BackupError(f"{source} holds no backup.json: not a Slipway backup")
    record = json.loads(index.read_text())
    if record.get("format") != FORMAT:
        raise BackupError(f"{source} is backup format {record.get('format')}, not {FORMAT}")
    if (home.mlflow / "mlflow.db").exists() or any(home.models.glob("*")):
        raise BackupError(
            f"{home.root} already has a registry or models: restore into an empty home"
        )
    for rel, digest in record["files"].items():
        if sha256_file(source / rel) != digest:
            raise BackupError(f"{source / rel} does not match backup.json: the backup is damaged")
    restored = []
    for rel in ("mlflow", "models", "state", "logs", "keys/trusted"):
        if (source / rel).is_dir():
            target = home.root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(source / rel, target, dirs_exist_ok=True)
            restored.append(rel)
    for entry in home.models.glob("*/sha256-*/weights"):
        read_only(entry)
    private, public = default_keys(home)
    if (source / "keys" / public.name).is_file():
        shutil.copyfile(source / "keys" / public.name, public)
    if (source / PRIVATE_KEY).is_file():
        if passphrase is None:
            raise BackupError("the backup holds the private signing key: give its passphrase")
        fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(_decrypt((source / PRIVATE_KEY).read_bytes(), passphrase))
        restored.append("the private signing key")
    if (home.mlflow / "mlflow.db").is_file():
        _move_artifact_locations(home.mlflow / "mlflow.db", Path(record["home"]), home.root)
    return restored


def _move_artifact_locations(database: Path, old: Path, new: Path) -> None:
    """The registry records where artifacts live as absolute URIs: point them at the new home."""
    columns = {
        "experiments": ["artifact_location"],
        "runs": ["artifact_uri"],
        "logged_models": ["artifact_location"],
        "model_versions": ["storage_location"],
    }
    with sqlite3.connect(database) as db:
        for table, names in columns.items():
            for column in names:
                for before, after in ((old.as_uri(), new.as_uri()), (str(old), str(new))):
                    db.execute(
                        f"UPDATE {table} SET {column} = REPLACE({column}, ?, ?)", (before, after)
                    )


def _encrypt(pem: bytes, passphrase: bytes) -> bytes:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pem, password=None)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase),
    )


def _decrypt(pem: bytes, passphrase: bytes) -> bytes:
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_private_key(pem, password=passphrase)
    except ValueError:
        raise BackupError("the passphrase does not open the backed-up private key") from None
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
