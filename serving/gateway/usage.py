"""The usage log: one record per API request, written in batches off the hot path.

Requests append their Exchange to an in-memory buffer; a background task turns them into rows and
writes a batch every `usage.batch_interval_s` to SQLite (default: $SLIPWAY_HOME/logs/
gateway-usage.sqlite) or PostgreSQL (`usage.url`). Shutdown (lifespan end) flushes everything.
Loss window: a gateway killed with SIGKILL loses at most the records of the last batch interval
(plus a batch being written). A full buffer (`usage.queue_size`) drops new records and counts them.

Table gateway_usage, one row per request:
  time             request start (SQLite: unix seconds REAL; PostgreSQL: timestamptz)
  request_id       also returned to the client as x-request-id
  tenant           tenant name (NULL when authentication failed)
  model            public model name asked for
  endpoint         'chat' or 'completions'
  backend_version  registered model version that answered (NULL when none was reached)
  role             'stable' or 'canary'
  stream           whether the response was streamed
  status           HTTP status sent to the client
  error_kind       NULL on success, else a short code (rate_limit_exceeded, upstream_timeout, ...)
  prompt_tokens, completion_tokens   as reported by the backend; for a stream cut short (the
                   client left: client_disconnected), those generated until then
  tokens_from      NULL when the backend reported the counts; 'content' when it sent none and
                   the completion tokens are the non-empty content deltas relayed (a lower
                   bound) with 0 prompt tokens
  ttft_ms          time to the first streamed byte (streams only)
  latency_ms       request start to last byte
  prompt           prompt text, only for tenants with log_prompts: true
`read_usage(start, end, url)` returns rows with start <= time < end as a pandas DataFrame;
`iter_usage(start, end, columns, ...)` streams only the columns asked for, in frames of bounded
size, for reports over millions of rows (drift, cost).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import sqlite3
from collections import deque
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from time import perf_counter
from typing import TYPE_CHECKING, Protocol

from starlette.types import ASGIApp, Receive, Scope, Send

from configs.gateway import UsageSpec
from configs.home import Home
from serving.gateway.exchange import Exchange

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("serving.gateway")

TABLE = "gateway_usage"
COLUMNS = (
    "time",
    "request_id",
    "tenant",
    "model",
    "endpoint",
    "backend_version",
    "role",
    "stream",
    "status",
    "error_kind",
    "prompt_tokens",
    "completion_tokens",
    "ttft_ms",
    "latency_ms",
    "prompt",
    "tokens_from",
)

_SQLITE_DDL = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
  id INTEGER PRIMARY KEY, time REAL NOT NULL, request_id TEXT NOT NULL, tenant TEXT, model TEXT,
  endpoint TEXT NOT NULL, backend_version TEXT, role TEXT, stream INTEGER NOT NULL,
  status INTEGER NOT NULL, error_kind TEXT, prompt_tokens INTEGER NOT NULL,
  completion_tokens INTEGER NOT NULL, ttft_ms REAL, latency_ms REAL NOT NULL, prompt TEXT,
  tokens_from TEXT);
CREATE INDEX IF NOT EXISTS {TABLE}_time ON {TABLE} (time);
"""
_PG_DDL = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
  id BIGSERIAL PRIMARY KEY, time TIMESTAMPTZ NOT NULL, request_id TEXT NOT NULL, tenant TEXT,
  model TEXT, endpoint TEXT NOT NULL, backend_version TEXT, role TEXT, stream BOOLEAN NOT NULL,
  status INTEGER NOT NULL, error_kind TEXT, prompt_tokens INTEGER NOT NULL,
  completion_tokens INTEGER NOT NULL, ttft_ms DOUBLE PRECISION,
  latency_ms DOUBLE PRECISION NOT NULL, prompt TEXT, tokens_from TEXT);
CREATE INDEX IF NOT EXISTS {TABLE}_time ON {TABLE} (time);
ALTER TABLE {TABLE} ADD COLUMN IF NOT EXISTS tokens_from TEXT;
"""
# A log written before tokens_from existed gains it (SQLite has no ADD COLUMN IF NOT EXISTS).
_SQLITE_ADDED = (("tokens_from", "TEXT"),)

_SQLITE_INSERT = (
    f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
)

Row = tuple


def default_url(home: Home | None = None) -> str:
    return f"sqlite:///{(home or Home.from_env()).logs / 'gateway-usage.sqlite'}"


def row(ex: Exchange) -> Row:
    backend = ex.backend
    return (
        ex.time,
        ex.request_id,
        ex.tenant.name if ex.tenant else None,
        ex.model,
        ex.endpoint,
        backend.version if backend else None,
        backend.role if backend else None,
        ex.stream,
        ex.status,
        ex.error_kind,
        ex.prompt_tokens,
        ex.completion_tokens,
        None if ex.ttft_s is None else ex.ttft_s * 1000.0,
        ex.latency_s * 1000.0,
        ex.prompt,
        ex.tokens_from,
    )


class Sink(Protocol):
    async def open(self) -> None: ...
    async def write(self, rows: list[Row]) -> None: ...
    async def close(self) -> None: ...


class SQLiteSink:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One writer task uses the connection at a time, from worker threads.
        self._db = sqlite3.connect(self.path, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SQLITE_DDL)
        have = {info[1] for info in self._db.execute(f"PRAGMA table_info({TABLE})")}
        for column, kind in _SQLITE_ADDED:
            if column not in have:
                self._db.execute(f"ALTER TABLE {TABLE} ADD COLUMN {column} {kind}")

    def _write(self, rows: list[Row]) -> None:
        assert self._db is not None
        with self._db:
            self._db.executemany(_SQLITE_INSERT, rows)

    async def write(self, rows: list[Row]) -> None:
        await asyncio.to_thread(self._write, rows)

    async def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


class PostgresSink:
    def __init__(self, url: str) -> None:
        self.url = url
        self._conn = None

    async def open(self) -> None:
        import asyncpg  # only a PostgreSQL usage log needs it

        self._conn = await asyncpg.connect(self.url)
        await self._conn.execute(_PG_DDL)

    async def write(self, rows: list[Row]) -> None:
        records = [(datetime.fromtimestamp(r[0], UTC), *r[1:]) for r in rows]
        await self._conn.copy_records_to_table(TABLE, records=records, columns=COLUMNS)

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None


def sink_for(url: str) -> Sink:
    if url.startswith("sqlite:///"):
        return SQLiteSink(Path(url.removeprefix("sqlite:///")))
    return PostgresSink(url)


class UsageLog:
    """A bounded buffer of finished exchanges and the background task that writes them."""

    def __init__(self, sink: Sink, spec: UsageSpec) -> None:
        self._sink = sink
        self._interval = spec.batch_interval_s
        self._batch = spec.batch_size
        self._capacity = spec.queue_size
        self._pending: deque[Exchange] = deque()
        self._closing: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.dropped = 0
        self.written = 0

    @property
    def depth(self) -> int:
        return len(self._pending)

    def put(self, exchange: Exchange) -> None:
        if len(self._pending) >= self._capacity:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 10_000 == 0:
                log.error("usage log buffer full: %d records dropped so far", self.dropped)
            return
        self._pending.append(exchange)

    async def start(self) -> None:
        """Open the sink and start the writer, in the event loop that serves the requests."""
        await self._sink.open()
        self._closing = asyncio.Event()
        self._task = asyncio.create_task(self._run(self._closing), name="usage-writer")

    async def _run(self, closing: asyncio.Event) -> None:
        while not closing.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(closing.wait(), self._interval)
            await self.flush()

    async def flush(self) -> None:
        """Write everything buffered; on a write error keep it for the next round."""
        pending = self._pending
        while pending:
            batch = [pending.popleft() for _ in range(min(self._batch, len(pending)))]
            try:
                await self._sink.write([row(ex) for ex in batch])
            except Exception as e:
                log.error("usage log write failed (%d records kept for retry): %s", len(batch), e)
                pending.extendleft(reversed(batch))
                return
            self.written += len(batch)

    async def close(self) -> None:
        if self._task is not None:
            self._closing.set()
            await self._task
            self._task = None
        await self.flush()
        if self._pending:
            log.error("usage log: %d records could not be written at shutdown", len(self._pending))
        await self._sink.close()


_ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}


class UsageMiddleware:
    """Opens the Exchange of each API request and hands it to the usage log when it is done."""

    def __init__(self, app: ASGIApp, usage: UsageLog) -> None:
        self.app = app
        self.usage = usage
        # Request ids: a random prefix per application, so two gateways never share one.
        self._prefix = f"req-{os.urandom(4).hex()}-"
        self._ids = itertools.count()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = _ENDPOINTS.get(scope["path"]) if scope["type"] == "http" else None
        if endpoint is None:
            if scope["type"] == "http" and scope["path"].startswith("/admin/"):
                # Admin requests are not billed, but the audit log names them by this id.
                scope["slipway.request_id"] = f"{self._prefix}{next(self._ids)}"
            await self.app(scope, receive, send)
            return
        exchange = Exchange(endpoint, f"{self._prefix}{next(self._ids)}")
        scope["slipway.exchange"] = exchange
        try:
            await self.app(scope, receive, send)
        finally:
            exchange.latency_s = perf_counter() - exchange.started
            if exchange.status == 0:
                exchange.status, exchange.error_kind = 499, exchange.error_kind or "cancelled"
            self.usage.put(exchange)


def read_usage(
    start: datetime | float, end: datetime | float, url: str | None = None
) -> pd.DataFrame:
    """Usage rows with start <= time < end (datetimes; naive ones are UTC), oldest first.

    `time` comes back as a timezone-aware UTC datetime column whichever database holds the log.
    """
    import pandas as pd  # reports only: the gateway itself never loads pandas

    url = url or default_url()
    lo, hi = _epoch(start), _epoch(end)
    columns = ", ".join(COLUMNS)
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        _check_exists(path)
        with sqlite3.connect(path) as db:
            rows = db.execute(
                f"SELECT {columns} FROM {TABLE} WHERE time >= ? AND time < ? ORDER BY time",
                (lo, hi),
            ).fetchall()
    else:
        import psycopg2  # reading a PostgreSQL log only

        with psycopg2.connect(url) as db, db.cursor() as cur:
            cur.execute(
                f"SELECT {columns} FROM {TABLE}"
                " WHERE time >= to_timestamp(%s) AND time < to_timestamp(%s) ORDER BY time",
                (lo, hi),
            )
            rows = cur.fetchall()
        db.close()
    frame = pd.DataFrame.from_records(rows, columns=list(COLUMNS))
    if url.startswith("sqlite:///"):
        frame["time"] = pd.to_datetime(frame["time"], unit="s", utc=True)
        frame["stream"] = frame["stream"].astype(bool)
    else:
        frame["time"] = pd.to_datetime(frame["time"], utc=True)
    return frame


def _epoch(value: datetime | float) -> float:
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    return float(value)


def count_usage(
    start: datetime | float, end: datetime | float, url: str | None = None, model: str | None = None
) -> int:
    """How many rows `iter_usage` would yield (one indexed COUNT, no rows fetched)."""
    with _reader(url) as (cur, ph):
        query = f"SELECT COUNT(*) FROM {TABLE} WHERE {_where(ph, model)}"
        cur.execute(query, _args(start, end, model))
        return int(cur.fetchone()[0])


def iter_usage(
    start: datetime | float,
    end: datetime | float,
    columns: Sequence[str],
    url: str | None = None,
    model: str | None = None,
    chunk_rows: int = 100_000,
) -> Iterator[pd.DataFrame]:
    """The rows of `read_usage` (optionally one model's), only `columns`, oldest first, in frames
    of at most `chunk_rows`: for reports over millions of rows in bounded memory. `time` comes back
    as unix seconds (float) from either database; the other columns as the database returns them."""
    import pandas as pd  # reports only: the gateway itself never loads pandas

    unknown = set(columns) - set(COLUMNS)
    if unknown:
        raise ValueError(f"not usage log columns: {sorted(unknown)}; known: {', '.join(COLUMNS)}")
    with _reader(url) as (cur, ph):
        epoch = "time" if ph == "?" else "extract(epoch from time)::float8"
        selected = ", ".join(epoch + " AS time" if c == "time" else c for c in columns)
        cur.execute(
            f"SELECT {selected} FROM {TABLE} WHERE {_where(ph, model)} ORDER BY time, id",
            _args(start, end, model),
        )
        while rows := cur.fetchmany(chunk_rows):
            yield pd.DataFrame.from_records(rows, columns=list(columns))


@contextlib.contextmanager
def _reader(url: str | None) -> Iterator[tuple[object, str]]:
    """A read-only cursor on the usage log and its parameter placeholder."""
    url = url or default_url()
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        _check_exists(path)
        db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
        try:
            yield db.cursor(), "?"
        finally:
            db.close()
        return
    import psycopg2  # reading a PostgreSQL log only

    db = psycopg2.connect(url)
    try:
        # A named (server-side) cursor streams rows instead of loading the whole result at once.
        with db.cursor(name="slipway_usage") as cur:
            yield cur, "%s"
    finally:
        db.close()


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(
            f"no usage log at {path}: has the gateway run with this SLIPWAY_HOME?"
        )


def _where(ph: str, model: str | None) -> str:
    lo, hi = (ph, ph) if ph == "?" else ("to_timestamp(%s)", "to_timestamp(%s)")
    return f"time >= {lo} AND time < {hi}" + (f" AND model = {ph}" if model is not None else "")


def _args(start: datetime | float, end: datetime | float, model: str | None) -> tuple:
    return (_epoch(start), _epoch(end), *(() if model is None else (model,)))
