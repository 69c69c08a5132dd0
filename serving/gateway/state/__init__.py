"""The gateway's one place of durable shared state: what every instance routes (namespace
"routes"), and later its tenants, keys, audit log and cache state.

`store_for(spec, home)` picks the backend from `state.url`: SQLite by default (a file under
$SLIPWAY_HOME, for one machine), PostgreSQL for the production profile, Redis where one is
configured. store.py is the contract every backend keeps; migrations.py the schema.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from configs.gateway import StateSpec
from configs.home import Home
from serving.gateway.state.kv import RedisStore
from serving.gateway.state.migrations import MIGRATIONS, Migration
from serving.gateway.state.sql import postgres_store, sqlite_store
from serving.gateway.state.store import StateStore, redacted


def default_path(home: Home | None = None) -> Path:
    return (home or Home.from_env()).root / "state" / "gateway.sqlite"


def store_for(
    spec: StateSpec, home: Home | None = None, migrations: Sequence[Migration] = MIGRATIONS
) -> StateStore:
    """The store `spec` names, not yet opened (opening connects and applies `migrations`)."""
    url = spec.url
    if url is None:
        return sqlite_store(default_path(home), migrations)
    if url.startswith("sqlite:///"):
        return sqlite_store(Path(url.removeprefix("sqlite:///")), migrations)
    if url.startswith(("redis://", "rediss://")):
        return RedisStore(url, spec.redis_prefix, redacted(url), migrations)
    return postgres_store(url, redacted(url), migrations)
