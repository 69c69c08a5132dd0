"""The state store on SQL: SQLite (the default, one machine) and PostgreSQL (the production
profile, shared by every replica).

Both run the same statements: parameters are written $1, $2 as PostgreSQL takes them and SQLite
reads them as ?1, ?2. Tables (schema: migrations.py):
  gateway_state_schema    version, name, applied_at: every migration step applied
  gateway_state_versions  namespace -> version, bumped by every write to it
  gateway_state_records   (namespace, key) -> version, value (JSON text), updated_at
A write is one transaction: the namespace row's `UPDATE ... WHERE version = expected` is the
compare-and-set (PostgreSQL's row lock, SQLite's single writer), then the records change. SQLite
runs in WAL mode, so readers (every instance's poll) never wait for the writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, TypeVar

from serving.gateway.state.migrations import MIGRATIONS, RECORDS, VERSIONS, Migration, pending
from serving.gateway.state.store import Conflict, Record, Snapshot, StoreUnavailable

T = TypeVar("T")

_SCHEMA = "gateway_state_schema"
_CREATE_SCHEMA = (
    f"CREATE TABLE IF NOT EXISTS {_SCHEMA} (version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
    " applied_at DOUBLE PRECISION NOT NULL)"
)
_APPLIED = f"SELECT COALESCE(MAX(version), 0) FROM {_SCHEMA}"
_RECORD_STEP = f"INSERT INTO {_SCHEMA} (version, name, applied_at) VALUES ($1, $2, $3)"
_VERSION = f"SELECT version FROM {VERSIONS} WHERE namespace = $1"
_READ = (
    f"SELECT v.version, r.key, r.version, r.value FROM {VERSIONS} v"
    f" LEFT JOIN {RECORDS} r ON r.namespace = v.namespace WHERE v.namespace = $1"
)
_ENSURE = (
    f"INSERT INTO {VERSIONS} (namespace, version) VALUES ($1, 0) ON CONFLICT (namespace) DO NOTHING"
)
_BUMP = (
    f"UPDATE {VERSIONS} SET version = version + 1 WHERE namespace = $1 AND version = $2"
    " RETURNING version"
)
_PUT = (
    f"INSERT INTO {RECORDS} (namespace, key, version, value, updated_at)"
    " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (namespace, key) DO UPDATE"
    " SET version = excluded.version, value = excluded.value, updated_at = excluded.updated_at"
)
_DELETE = f"DELETE FROM {RECORDS} WHERE namespace = $1 AND key = $2"


class _Connection(Protocol):
    """What the store needs of a database connection; driver errors come out as
    StoreUnavailable."""

    migration_lock: str | None  # taken inside the migration's transaction, if the database needs it

    async def fetch(self, sql: str, *args: Any) -> list[Sequence[Any]]: ...
    async def execute(self, sql: str, *args: Any) -> None: ...
    def transaction(self) -> contextlib.AbstractAsyncContextManager[None]: ...
    async def close(self) -> None: ...


_BUSY_S = 5  # how long a connection waits for another's lock before it gives up


def _wal(db: sqlite3.Connection) -> None:
    """Put the database in WAL mode (readers go on beside the writer). The switch needs the
    database to itself, and SQLite refuses it at once, without its busy timeout, while other
    connections open the same new file (instances starting together): so it is retried for as
    long as that timeout."""
    deadline = time.monotonic() + _BUSY_S
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class _SQLite:
    """sqlite3 on a thread of its own, one statement per hop; transactions are BEGIN IMMEDIATE.

    Its own thread, not the shared pool: a transaction spans several hops, and pool threads all
    waiting on the write lock would leave none for the transaction that holds it.
    """

    migration_lock = None  # BEGIN IMMEDIATE already holds the database's only write lock

    def __init__(self, db: sqlite3.Connection, thread: ThreadPoolExecutor, where: str) -> None:
        self._db = db
        self._thread = thread
        self._where = where

    @classmethod
    async def connect(cls, path: Path, where: str) -> _SQLite:
        def connect() -> sqlite3.Connection:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Autocommit (isolation_level=None): transactions are explicit; timeout: wait for a
            # writer in another connection instead of failing at once.
            db = sqlite3.connect(path, isolation_level=None, timeout=_BUSY_S)
            _wal(db)
            return db

        thread = ThreadPoolExecutor(1, thread_name_prefix="gateway-state")
        try:
            db = await asyncio.get_running_loop().run_in_executor(thread, connect)
        except (OSError, sqlite3.Error) as e:
            thread.shutdown(wait=False)
            raise StoreUnavailable(f"the gateway state store {where} cannot be opened: {e}") from e
        return cls(db, thread, where)

    async def _run(self, sql: str, args: tuple[Any, ...]) -> list[Sequence[Any]]:
        def run() -> list[Sequence[Any]]:
            return self._db.execute(sql.replace("$", "?"), args).fetchall()

        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, run)
        except sqlite3.Error as e:
            raise StoreUnavailable(f"the gateway state store {self._where} failed: {e}") from e

    async def fetch(self, sql: str, *args: Any) -> list[Sequence[Any]]:
        return await self._run(sql, args)

    async def execute(self, sql: str, *args: Any) -> None:
        await self._run(sql, args)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        await self.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            with contextlib.suppress(StoreUnavailable):
                await self.execute("ROLLBACK")
            raise
        await self.execute("COMMIT")

    async def close(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._db.close)
        finally:
            self._thread.shutdown(wait=False)


class _Postgres:
    """One asyncpg connection; a lost one is replaced on the next operation."""

    # Two instances starting at once must not both create the tables.
    migration_lock = "SELECT pg_advisory_xact_lock(hashtext('slipway.gateway.state'))"

    def __init__(self, conn: Any, errors: tuple[type[BaseException], ...], where: str) -> None:
        self._conn = conn
        self._errors = errors
        self._where = where

    @classmethod
    async def connect(cls, url: str, where: str) -> _Postgres:
        import asyncpg  # only a PostgreSQL store needs it

        errors = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)
        try:
            conn = await asyncpg.connect(url, timeout=5, command_timeout=5)
        except errors as e:
            raise StoreUnavailable(f"the gateway state store {where} cannot be reached: {e}") from e
        return cls(conn, errors, where)

    async def _guard(self, step: Awaitable[T]) -> T:
        try:
            return await step
        except self._errors as e:
            raise self._unavailable(e) from e

    def _unavailable(self, error: BaseException) -> StoreUnavailable:
        return StoreUnavailable(f"the gateway state store {self._where} failed: {error}")

    async def fetch(self, sql: str, *args: Any) -> list[Sequence[Any]]:
        return await self._guard(self._conn.fetch(sql, *args))

    async def execute(self, sql: str, *args: Any) -> None:
        await self._guard(self._conn.execute(sql, *args))

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        try:  # a closed connection refuses here already, before any await
            transaction = self._conn.transaction()
        except self._errors as e:
            raise self._unavailable(e) from e
        await self._guard(transaction.start())
        try:
            yield
        except BaseException:
            with contextlib.suppress(*self._errors):
                await transaction.rollback()
            raise
        await self._guard(transaction.commit())

    async def close(self) -> None:
        await self._guard(self._conn.close(timeout=5))


class SQLStore:
    """The StateStore contract over one connection, used by one operation at a time."""

    def __init__(
        self,
        connect: Callable[[], Awaitable[_Connection]],
        where: str,
        migrations: Sequence[Migration] = MIGRATIONS,
    ) -> None:
        self.where = where
        self._connect = connect
        self._migrations = migrations
        self._conn: _Connection | None = None
        self._lock: asyncio.Lock | None = None

    async def open(self) -> None:
        self._lock = asyncio.Lock()  # made here: it belongs to the loop that serves
        await self._use(self._migrate)

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with contextlib.suppress(StoreUnavailable):
                await conn.close()

    async def _use(self, operation: Callable[[_Connection], Awaitable[T]]) -> T:
        assert self._lock is not None, "open() the store first"
        async with self._lock:
            if self._conn is None:
                self._conn = await self._connect()
            try:
                return await operation(self._conn)
            except StoreUnavailable:
                await self.close()  # reconnect on the next operation
                raise

    async def _migrate(self, conn: _Connection) -> None:
        async with conn.transaction():
            if conn.migration_lock:
                await conn.execute(conn.migration_lock)
            await conn.execute(_CREATE_SCHEMA)
            [(applied,)] = await conn.fetch(_APPLIED)
            for step in pending(applied, self._migrations, self.where):
                for statement in step.sql:
                    await conn.execute(statement)
                await conn.execute(_RECORD_STEP, step.version, step.name, time.time())

    async def version(self, namespace: str) -> int:
        rows = await self._use(lambda conn: conn.fetch(_VERSION, namespace))
        return rows[0][0] if rows else 0

    async def read(self, namespace: str) -> Snapshot:
        rows = await self._use(lambda conn: conn.fetch(_READ, namespace))
        records = {
            key: Record(v, json.loads(value)) for _, key, v, value in rows if key is not None
        }
        return Snapshot(rows[0][0] if rows else 0, records)

    async def write(
        self,
        namespace: str,
        expected: int,
        put: Mapping[str, dict[str, Any]],
        delete: Collection[str] = (),
    ) -> int:
        async def write(conn: _Connection) -> int:
            async with conn.transaction():
                await conn.execute(_ENSURE, namespace)
                bumped = await conn.fetch(_BUMP, namespace, expected)
                if not bumped:
                    raise Conflict(f"namespace '{namespace}' is no longer at version {expected}")
                version = bumped[0][0]
                now = time.time()
                for key, value in put.items():
                    await conn.execute(_PUT, namespace, key, version, json.dumps(value), now)
                for key in delete:
                    await conn.execute(_DELETE, namespace, key)
                return version

        return await self._use(write)


def sqlite_store(path: Path, migrations: Sequence[Migration] = MIGRATIONS) -> SQLStore:
    where = f"sqlite:///{path}"
    return SQLStore(lambda: _SQLite.connect(path, where), where, migrations)


def postgres_store(url: str, where: str, migrations: Sequence[Migration] = MIGRATIONS) -> SQLStore:
    return SQLStore(lambda: _Postgres.connect(url, where), where, migrations)
