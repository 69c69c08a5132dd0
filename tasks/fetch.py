"""Weights on a node that never ran the release: a registered version's files, materialised into
the model store from MLflow's artifact copy and verified against the version's recorded digest
and signature before they are committed, so nothing unverified is ever in the store to serve."""

from __future__ import annotations

import shutil
from collections.abc import Callable

from configs.home import Home
from tasks.attest import ATTESTATIONS
from tasks.manifest import MANIFEST, Manifest, hash_dir, model_digest
from tasks.registry import Registry
from tasks.servable import champions
from tasks.signing import SIGNATURE, SignatureError, Trust, verify
from tasks.store import WEIGHTS, Entry, Store


class FetchError(RuntimeError):
    """The artifact copy cannot be materialised; the message says what did not match."""


def fetch(registry: Registry, model: str, version: str) -> tuple[Entry, bool]:
    """The version's store entry, downloaded and verified if it is not here yet; returns it and
    whether it was fetched now."""
    tags = registry.tags(model, version)
    digest = tags.get("digest")
    if not digest:
        raise FetchError(f"{model} v{version} has no `digest` tag: nothing to check a copy against")
    store = Store(registry.home, model)
    if (entry := store.entry(digest)).exists():
        return entry, False
    with store.staging() as work:
        registry.download(model, version, work)
        if not (work / WEIGHTS).is_dir() or not (work / SIGNATURE).is_file():
            raise FetchError(
                f"MLflow's copy of {model} v{version} has no {WEIGHTS}/ and {SIGNATURE}: it was "
                "not registered by a Slipway release"
            )
        files = hash_dir(work / WEIGHTS)
        if (actual := model_digest(files)) != digest:
            raise FetchError(
                f"MLflow's copy of {model} v{version} hashes to {actual}, not the registered "
                f"{digest}: the artifact store does not hold the registered files"
            )
        try:
            verify(work / WEIGHTS, Trust.from_tags(tags), registry.home)
        except SignatureError as e:
            raise FetchError(f"MLflow's copy of {model} v{version}: {e}") from e
        recorded = Manifest.read(work / MANIFEST) if (work / MANIFEST).is_file() else None
        signature = work / f"{SIGNATURE}.fetched"
        shutil.move(work / SIGNATURE, signature)
        entry, _ = store.commit(
            work / WEIGHTS,
            recorded.source if recorded else tags.get("source", "mlflow"),
            recorded.revision if recorded else tags.get("revision", "unknown"),
        )
        if not entry.signature.exists():
            shutil.copyfile(signature, entry.signature)
        if (work / ATTESTATIONS).is_dir():  # checked where they are used: check_servable
            shutil.copytree(work / ATTESTATIONS, entry.root / ATTESTATIONS, dirs_exist_ok=True)
    return entry, True


def fetch_champions(home: Home, say: Callable[[str], None]) -> list[str]:
    """Materialise every champion missing from this node's store; returns what was fetched."""
    registry = Registry(home)
    fetched = []
    for champion in champions(registry):
        entry, now = fetch(registry, champion.model, champion.version)
        if now:
            fetched.append(f"fetched {champion} from MLflow into {entry.root} (verified)")
            say(fetched[-1])
    return fetched
