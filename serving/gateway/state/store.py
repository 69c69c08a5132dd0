"""The state store's contract: namespaced records with versions, changed by compare-and-set.

A namespace ("routes" today; tenants, keys, the audit log and cache state later) holds records by
key. Each namespace has a version that every write bumps by one, and each record keeps the
version of the write that last set it. A write names the namespace version it was computed from
and fails with Conflict when another writer got there first, so concurrent writers (two gateway
instances, or `make up` and a gateway) never lose each other's change: the loser reads again and
decides again. `version()` is one indexed read (or one GET), cheap enough to poll several times a
second; `read()` returns the namespace's version and records from one consistent snapshot.

Every backend raises StoreUnavailable for a store it cannot reach (the message names the store,
never its password) and SchemaError for a store whose schema it cannot use.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit


class StateError(RuntimeError):
    """The state store cannot be used as asked; the message says which store and why."""


class StoreUnavailable(StateError):
    """The store did not answer (down, unreachable, timed out)."""


class SchemaError(StateError):
    """The store's schema is one this code cannot use (written by a newer Slipway)."""


class Conflict(StateError):
    """The namespace changed since the version a write was computed from."""


@dataclass(frozen=True, slots=True)
class Record:
    version: int  # the namespace version of the write that last set it
    value: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Snapshot:
    version: int  # 0: nothing was ever written to the namespace
    records: Mapping[str, Record]


class StateStore(Protocol):
    where: str  # the store's URL for messages, password removed

    async def open(self) -> None:
        """Connect and bring the schema up to date (or raise SchemaError)."""

    async def close(self) -> None: ...

    async def version(self, namespace: str) -> int: ...

    async def read(self, namespace: str) -> Snapshot: ...

    async def write(
        self,
        namespace: str,
        expected: int,
        put: Mapping[str, dict[str, Any]],
        delete: Collection[str] = (),
    ) -> int:
        """Set and delete records in one atomic step if the namespace is still at `expected`;
        return its new version, or raise Conflict."""


def redacted(url: str) -> str:
    """`url` without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{parts.username or ''}:***@{host}"
    return urlunsplit(parts._replace(netloc=netloc))
