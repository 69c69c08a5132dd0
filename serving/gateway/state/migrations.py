"""The state store's schema, as the ordered steps that build it.

Each step has a version (1, 2, ... with no gap) and what it does on each kind of store: SQL that
runs unchanged on SQLite and PostgreSQL, and a Lua body for Redis (run atomically, ARGV[1] being
the key prefix; empty when Redis needs nothing, as keys are made by the first write). A store
records every step applied to it with its name and time; opening a store applies the steps it
lacks, in order, under a lock, so two instances starting at once migrate it once. A store at a
version this code does not know was written by a newer Slipway and is refused: its meaning may
have changed. Add steps that the previous release can still read (new tables, columns with
defaults), so that replicas can be upgraded one at a time; never edit a released step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from serving.gateway.state.store import SchemaError

VERSIONS = "gateway_state_versions"
RECORDS = "gateway_state_records"


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: tuple[str, ...]  # statements, each valid in both SQLite and PostgreSQL
    redis: str = ""  # a Lua body; "" when the Redis layout needs no change


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "namespaced records with versions",
        sql=(
            f"CREATE TABLE {VERSIONS} (namespace TEXT PRIMARY KEY, version BIGINT NOT NULL)",
            f"CREATE TABLE {RECORDS} (namespace TEXT NOT NULL, key TEXT NOT NULL,"
            " version BIGINT NOT NULL, value TEXT NOT NULL, updated_at DOUBLE PRECISION NOT NULL,"
            " PRIMARY KEY (namespace, key))",
        ),
    ),
)


def pending(applied: int, migrations: Sequence[Migration], where: str) -> tuple[Migration, ...]:
    """The steps a store at schema version `applied` still needs, in order."""
    if [m.version for m in migrations] != list(range(1, len(migrations) + 1)):
        raise ValueError("migration versions must run 1, 2, 3, ... with no gap or repeat")
    known = len(migrations)
    if applied > known:
        raise SchemaError(
            f"the gateway state store {where} is at schema version {applied}, newer than this "
            f"gateway knows (up to {known}): a newer Slipway wrote it. Run the newer gateway, or "
            "point state.url at another store; do not lower the version by hand"
        )
    return tuple(migrations[applied:])
