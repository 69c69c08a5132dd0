"""Garbage collection of the model store: remove the entries no registered version references.

An alias (champion, previous, a candidate being rolled out) always names a registered version,
so what any alias names is never removed; failed releases that registered nothing, superseded
pulls and builds killed before registration are. The registry is the authority: a store whose
registry holds no model at all is left alone (a wrong MLFLOW_TRACKING_URI must not empty it).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass

from configs.home import Home
from tasks.registry import Registry
from tasks.store import Store, writable


class GcRefused(RuntimeError):
    """gc would remove everything; the message says why it stopped."""


@dataclass(frozen=True)
class Freed:
    model: str
    digest: str
    bytes: int


def collect(home: Home, dry_run: bool = False) -> tuple[list[Freed], list[str]]:
    """Remove (or with dry_run, only list) unreferenced entries; returns them and what else was
    cleaned (staging left by killed runs, labels that named a removed entry)."""
    registry = Registry(home)
    models = (
        sorted(p.name for p in home.models.iterdir() if p.is_dir()) if home.models.is_dir() else []
    )
    registered = set(registry.model_names())
    stores = [Store(home, m) for m in models]
    if stores and any(s.entries() for s in stores) and not registered:
        raise GcRefused(
            f"the registry at {registry.uri} holds no registered model, so every stored entry "
            "would go: check MLFLOW_TRACKING_URI (or $SLIPWAY_HOME) before collecting"
        )
    freed: list[Freed] = []
    cleaned: list[str] = []
    for store in stores:
        keep = set(registry.digests(store.model).values()) if store.model in registered else set()
        for entry in store.entries():
            if entry.digest in keep:
                continue
            freed.append(Freed(store.model, entry.digest, entry.size_bytes()))
            if not dry_run:
                writable(entry.root)
                shutil.rmtree(entry.root)
        if not dry_run:
            cleaned += [f"removed {p}" for p in store.clean_staging()]
            gone = {f.digest for f in freed if f.model == store.model}
            for label, digest in store.labels().items():
                if digest in gone:
                    store.forget_label(label)
                    cleaned.append(f"variant label {store.model}/{label} named a removed entry")
    return freed, cleaned
