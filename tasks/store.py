"""The model store: every model directory Slipway builds or pulls lives under its digest, is
written once and never changed afterwards.

    models/<name>/sha256-<hex>/     one entry per digest
        weights/                    what vLLM loads (made read-only when committed)
        manifest.json               sha256 per file, the digest, source and revision
        model.sig                   the signature, added once beside the weights
    models/<name>/variants/<label>.json   a variant label's latest digest (and its history)
    models/<name>/builds/<key>.json       a build's inputs -> the digest it produced (reuse)
    models/<name>/.staging/         writes in progress; what a killed run left is removed

An entry appears only whole: its weights are written into .staging, hashed, and renamed into
place in one step, so a second release of a variant (new bytes, new digest) lands beside the
first instead of over it, and a release killed mid-write leaves nothing half-written behind.
A label moving to a new digest never touches the old entry: rollbacks and reverts find last
week's files where they were. Only `gc` removes an entry, and only one nothing needs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from configs.home import Home
from tasks.manifest import MANIFEST, Manifest, hash_dir, model_digest

log = logging.getLogger(__name__)

WEIGHTS = "weights"
SIGNATURE = "model.sig"


class StoreError(RuntimeError):
    """The store cannot do what was asked; the message says why and what to do next."""


def entry_name(digest: str) -> str:
    """`sha256:<hex>` as a directory name (no colon, so it is a plain path on every system)."""
    algorithm, _, value = digest.partition(":")
    if algorithm != "sha256" or len(value) != 64:
        raise StoreError(f"{digest!r} is not a sha256:<64 hex> model digest")
    return f"sha256-{value}"


@dataclass(frozen=True)
class Entry:
    """One stored model directory."""

    model: str
    digest: str
    root: Path

    @property
    def weights(self) -> Path:
        return self.root / WEIGHTS

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    @property
    def signature(self) -> Path:
        return self.root / SIGNATURE

    def exists(self) -> bool:
        return self.weights.is_dir() and self.manifest.is_file()

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())


class Store:
    """The store of one model's directories under $SLIPWAY_HOME/models/<name>."""

    def __init__(self, home: Home, model: str) -> None:
        self.home = home
        self.model = model
        self.root = home.models / model

    def entry(self, digest: str) -> Entry:
        return Entry(self.model, digest, self.root / entry_name(digest))

    def entries(self) -> list[Entry]:
        """Every stored entry, by digest."""
        if not self.root.is_dir():
            return []
        found = []
        for path in sorted(self.root.glob("sha256-*")):
            entry = Entry(self.model, "sha256:" + path.name.removeprefix("sha256-"), path)
            if entry.exists():
                found.append(entry)
        return found

    # ---- writing ---------------------------------------------------------------------------------

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh directory to write a model into; removed on the way out, whatever happens
        (commit moves its weights away first)."""
        base = self.root / ".staging"
        base.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(dir=base))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def clean_staging(self) -> list[str]:
        """Remove what killed runs left in .staging; returns what was removed, to be told."""
        base = self.root / ".staging"
        left = sorted(base.iterdir()) if base.is_dir() else []
        for path in left:
            shutil.rmtree(path, ignore_errors=True)
        return [str(p) for p in left]

    def commit(self, weights: Path, source: str, revision: str) -> tuple[Entry, Manifest]:
        """Hash `weights` (a directory under staging), then move it into the store under its
        digest, with its manifest, in one rename. An entry already stored for that digest is
        kept as it is (the bytes are the same), and the staged copy is dropped."""
        files = hash_dir(weights)
        digest = model_digest(files)
        entry = self.entry(digest)
        if entry.exists():
            shutil.rmtree(weights, ignore_errors=True)
            return entry, Manifest.read(entry.manifest)
        manifest = Manifest.of(weights, source, revision, files)
        staged = weights.parent / f"{weights.name}.entry"
        staged.mkdir()
        os.replace(weights, staged / WEIGHTS)
        manifest.write(staged / MANIFEST)
        read_only(staged / WEIGHTS)
        try:
            os.rename(staged, entry.root)  # fails if another run committed the same digest
        except OSError:
            if not entry.exists():
                raise
            shutil.rmtree(staged, ignore_errors=True)
            return entry, Manifest.read(entry.manifest)
        log.info("stored %s %s at %s", self.model, digest, entry.root)
        return entry, manifest

    # ---- labels and builds -----------------------------------------------------------------------

    def point(self, label: str, digest: str) -> None:
        """Make `label` name `digest` (the old entry stays where it is)."""
        path = self.root / "variants" / f"{label}.json"
        history = self._read(path).get("history", [])
        record = {"digest": digest, "at": datetime.now(UTC).isoformat(timespec="seconds")}
        if not history or history[-1]["digest"] != digest:
            history.append(record)
        write_json(path, {"digest": digest, "history": history[-50:]})

    def forget_label(self, label: str) -> None:
        (self.root / "variants" / f"{label}.json").unlink(missing_ok=True)

    def label(self, label: str) -> str | None:
        """The digest a variant label names now, if any."""
        return self._read(self.root / "variants" / f"{label}.json").get("digest")

    def labels(self) -> dict[str, str]:
        """Every variant label and the digest it names."""
        folder = self.root / "variants"
        paths = sorted(folder.glob("*.json")) if folder.is_dir() else []
        return {p.stem: d for p in paths if (d := self._read(p).get("digest"))}

    def built(self, key: str) -> str | None:
        """The digest an earlier build with these inputs produced, if it is still stored."""
        digest = self._read(self.root / "builds" / f"{key}.json").get("digest")
        return digest if digest and self.entry(digest).exists() else None

    def record_build(self, key: str, digest: str, build: dict) -> None:
        write_json(self.root / "builds" / f"{key}.json", {"digest": digest, "build": build})

    def build_of(self, key: str) -> dict | None:
        return self._read(self.root / "builds" / f"{key}.json").get("build")

    def pulled(self, key: str) -> Entry | None:
        """The entry an earlier pull of the same bytes produced, if it is still stored."""
        digest = self._read(self.root / "pulls" / f"{key}.json").get("digest")
        return self.entry(digest) if digest and self.entry(digest).exists() else None

    def record_pull(self, key: str, digest: str) -> None:
        write_json(self.root / "pulls" / f"{key}.json", {"digest": digest})

    @staticmethod
    def _read(path: Path) -> dict:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}


def read_only(path: Path) -> None:
    """Drop the write bits of every file and folder under `path`: nothing edits an entry in
    place by accident (root still can; the digest check before serving catches that)."""
    for p in [*path.rglob("*"), path]:
        mode = p.stat().st_mode
        p.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def writable(path: Path) -> None:
    """Give write bits back (only `gc` and tests remove entries)."""
    for p in [path, *path.rglob("*")]:
        p.chmod(p.stat().st_mode | stat.S_IWUSR)


def write_json(path: Path, data: dict) -> None:
    """Write whole or not at all: a reader sees the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(partial, path)


# ---- homes made before the store -----------------------------------------------------------------


def legacy_dirs(home: Home) -> list[Path]:
    """Model directories of the layout before the store: models/<name>/<variant>/weights."""
    if not home.models.is_dir():
        return []
    return sorted(
        d
        for d in home.models.glob("*/*")
        if d.is_dir() and not d.name.startswith(("sha256-", ".")) and (d / WEIGHTS).is_dir()
    )


def migrate(home: Home) -> list[str]:
    """Move every legacy model directory into the store under the digest of the files it holds
    now (its manifest may name another digest: a second release used to overwrite the first),
    point its variant label at it, and say what moved. Idempotent: a migrated home has none."""
    done = []
    for old in legacy_dirs(home):
        store, label = Store(home, old.parent.name), old.name
        files = hash_dir(old / WEIGHTS)
        digest = model_digest(files)
        entry = store.entry(digest)
        recorded = Manifest.read(old / MANIFEST) if (old / MANIFEST).is_file() else None
        if not entry.exists():
            source = recorded.source if recorded else "unknown (migrated)"
            revision = recorded.revision if recorded else "unknown"
            manifest = Manifest.of(old / WEIGHTS, source, revision, files)
            entry.root.mkdir(parents=True)
            for name in (WEIGHTS, SIGNATURE, "evaluation", "attestations"):
                if (old / name).exists():
                    os.replace(old / name, entry.root / name)
            manifest.write(entry.manifest)
            read_only(entry.weights)
        store.point(label, digest)
        shutil.rmtree(old, ignore_errors=True)
        moved = f"migrated {old.relative_to(home.root)} -> {entry.root.relative_to(home.root)}"
        if recorded and recorded.digest != digest:
            moved += f" (its manifest named {recorded.digest}: those files were overwritten)"
        done.append(moved)
    return done


@task(name="prepare-store", cache_policy=NO_CACHE)
def prepare_store_task(home: Home, model: str) -> list[str]:
    """Before a release writes: migrate a legacy home, and remove what killed runs left in the
    model's staging area; returns (and logs) what it repaired."""
    repaired = migrate(home) + [f"removed {p}" for p in Store(home, model).clean_staging()]
    for line in repaired:
        log.info("%s", line)
    return repaired


@task(name="point-label", cache_policy=NO_CACHE)
def point_task(home: Home, model: str, label: str, digest: str) -> None:
    Store(home, model).point(label, digest)
