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
  endpoint         'chat', 'completions', 'responses', 'embeddings', 'tokenize' or 'detokenize'
  backend_version  registered model version that answered (NULL when none was reached)
  role             'stable' or 'canary'
  stream           whether the response was streamed
  status           HTTP status sent to the client
  error_kind       NULL on success, else a short code (rate_limit_exceeded, upstream_timeout, ...)
  prompt_tokens, completion_tokens   as reported by the backend; for a stream cut short (the
                   client left: client_disconnected), those generated until then
  tokens_from      NULL when the backend reported the counts; 'content' when it sent none and
                   the completion tokens are the non-empty content deltas relayed (a lower
                   bound) with 0 prompt tokens; 'cache' when the response cache answered (no
                   backend was asked; the tokens are 0 or the cached answer's, as
                   cache.billing says)
  ttft_ms          time to the first streamed byte (streams only)
  latency_ms       request start to last byte
  prompt           prompt text, only for tenants with log_prompts: true
  n                choices per prompt (vLLM counts each prompt once per choice)
  completion_bound max_tokens x choices: the most an aborted request can have made the backend
                   generate (NULL when the request named no max_tokens)
  trace_id         the request's OpenTelemetry trace (32 hex digits), when tracing recorded
                   it (tracing.py); NULL when tracing is off or the trace was not sampled
Beside it, for the reconciliation with the backends' own counters: unbilled_usage (the same
counts for traffic no tenant pays for: mirrored copies, a canary's failed tries, Slipway's own
requests to an engine, by `source`) and engine_meter (the backends' token counters as read by
meter.py). `read_usage(start, end, url)` returns rows with start <= time < end as a pandas
DataFrame, `read_table` any table's; `iter_usage(start, end, columns, ...)` streams only the
columns asked for, in frames of bounded size, for reports over millions of rows (drift, cost).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import sqlite3
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from time import perf_counter
from typing import TYPE_CHECKING, Any, Protocol

from starlette.types import ASGIApp, Receive, Scope, Send

from configs.gateway import UsageSpec
from configs.home import Home
from serving.gateway.endpoints import PATHS
from serving.gateway.exchange import Exchange

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("serving.gateway")


@dataclass(frozen=True)
class Table:
    """One table of the usage log: its name and typed columns, created (and given the columns a
    later release added) by whichever sink opens it."""

    name: str
    columns: tuple[tuple[str, str], ...]  # (name, kind): see _TYPES

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.columns)

    def ddl(self, dialect: str) -> list[str]:
        types = _TYPES[dialect]
        key = "id INTEGER PRIMARY KEY" if dialect == "sqlite" else "id BIGSERIAL PRIMARY KEY"
        columns = ", ".join(f"{name} {types[kind]}" for name, kind in self.columns)
        return [
            f"CREATE TABLE IF NOT EXISTS {self.name} ({key}, {columns})",
            f"CREATE INDEX IF NOT EXISTS {self.name}_time ON {self.name} (time)",
        ]

    def added(self, have: set[str], dialect: str) -> list[str]:
        """ALTERs for the nullable columns a log written by an earlier release lacks."""
        types = _TYPES[dialect]
        return [
            f"ALTER TABLE {self.name} ADD COLUMN {name} {types[kind]}"
            for name, kind in self.columns
            if name not in have and not kind.endswith("!")
        ]


# kind -> column type; "!" is NOT NULL. Counters are 64-bit: an engine's lifetime total of tokens
# passes 2^31.
_TYPES = {
    "sqlite": {
        "time!": "REAL NOT NULL",
        "text": "TEXT",
        "text!": "TEXT NOT NULL",
        "int": "INTEGER",
        "int!": "INTEGER NOT NULL",
        "big!": "INTEGER NOT NULL",
        "real": "REAL",
        "real!": "REAL NOT NULL",
        "bool!": "INTEGER NOT NULL",
    },
    "postgresql": {
        "time!": "TIMESTAMPTZ NOT NULL",
        "text": "TEXT",
        "text!": "TEXT NOT NULL",
        "int": "INTEGER",
        "int!": "INTEGER NOT NULL",
        "big!": "BIGINT NOT NULL",
        "real": "DOUBLE PRECISION",
        "real!": "DOUBLE PRECISION NOT NULL",
        "bool!": "BOOLEAN NOT NULL",
    },
}

USAGE = Table(
    "gateway_usage",
    (
        ("time", "time!"),
        ("request_id", "text!"),
        ("tenant", "text"),
        ("model", "text"),
        ("endpoint", "text!"),
        ("backend_version", "text"),
        ("role", "text"),
        ("stream", "bool!"),
        ("status", "int!"),
        ("error_kind", "text"),
        ("prompt_tokens", "int!"),
        ("completion_tokens", "int!"),
        ("ttft_ms", "real"),
        ("latency_ms", "real!"),
        ("prompt", "text"),
        ("tokens_from", "text"),
        ("n", "int"),
        ("completion_bound", "int"),
        ("trace_id", "text"),
    ),
)
# Traffic an engine served that no tenant is billed for: mirrored copies (source "shadow"), a
# canary's failed try before stable answered ("retry"), and what Slipway itself sends an engine
# outside the gateway (tasks.direct_traffic). Kept apart so that billing, cost and drift read only
# the tenants' requests, while the reconciliation counts everything an engine did.
UNBILLED = Table(
    "unbilled_usage",
    (
        ("time", "time!"),
        ("request_id", "text!"),
        ("source", "text!"),
        ("backend_version", "text!"),
        ("n", "int"),
        ("prompt_tokens", "int!"),
        ("completion_tokens", "int!"),
        ("completion_bound", "int"),
        ("latency_ms", "real!"),
        ("error_kind", "text"),
        ("tokens_from", "text"),
    ),
)
# Each backend's own token counters, read from its /metrics every usage.meter_interval_s
# (serving/gateway/meter.py); one reading per backend per tick, all of a tick at the same time.
METER = Table(
    "engine_meter",
    (
        ("time", "time!"),
        ("backend_version", "text!"),
        ("url", "text!"),
        ("prompt_tokens_total", "big!"),
        ("generation_tokens_total", "big!"),
    ),
)
TABLES = (USAGE, UNBILLED, METER)
COLUMNS = USAGE.names

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
        ex.n,
        ex.completion_bound,
        ex.trace_id,
    )


def unbilled_row(ex: Exchange, source: str, version: str) -> Row:
    """The UNBILLED row of an exchange no tenant pays for (a mirrored copy, a failed try)."""
    return (
        ex.time,
        ex.request_id,
        source,
        version,
        ex.n,
        ex.prompt_tokens,
        ex.completion_tokens,
        ex.completion_bound,
        (perf_counter() - ex.started) * 1000.0,
        ex.error_kind,
        ex.tokens_from,
    )


class Sink(Protocol):
    async def open(self) -> None: ...
    async def write(self, rows: list[Row], table: Table = USAGE) -> None: ...
    async def close(self) -> None: ...


# Rows go in one multi-row INSERT per chunk, not executemany: sqlite3 gives up the GIL on every
# statement step, and a row at a time the writer thread and the requests passed it back and forth
# at five times the insert's own cost. 32766: SQLite's bound on parameters per statement.
_SQLITE_VARIABLES = 32766


class SQLiteSink:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # UsageLog.write serialises the writers; each write runs in a worker thread.
        self._db = sqlite3.connect(self.path, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        for table in TABLES:
            for statement in table.ddl("sqlite"):
                self._db.execute(statement)
            have = {info[1] for info in self._db.execute(f"PRAGMA table_info({table.name})")}
            for statement in table.added(have, "sqlite"):
                self._db.execute(statement)
        self._db.commit()

    def _write(self, rows: list[Row], table: Table) -> None:
        assert self._db is not None
        names = table.names
        one = f"({', '.join('?' * len(names))})"
        per = _SQLITE_VARIABLES // len(names)
        with self._db:
            for i in range(0, len(rows), per):
                chunk = rows[i : i + per]
                values = ", ".join([one] * len(chunk))
                insert = f"INSERT INTO {table.name} ({', '.join(names)}) VALUES {values}"
                self._db.execute(insert, [v for r in chunk for v in r])

    async def write(self, rows: list[Row], table: Table = USAGE) -> None:
        await asyncio.to_thread(self._write, rows, table)

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
        for table in TABLES:
            for statement in table.ddl("postgresql"):
                await self._conn.execute(statement)
            have = {
                r["column_name"]
                for r in await self._conn.fetch(
                    "SELECT column_name FROM information_schema.columns WHERE table_name = $1",
                    table.name,
                )
            }
            for statement in table.added(have, "postgresql"):
                await self._conn.execute(statement)

    async def write(self, rows: list[Row], table: Table = USAGE) -> None:
        records = [(datetime.fromtimestamp(r[0], UTC), *r[1:]) for r in rows]
        await self._conn.copy_records_to_table(table.name, records=records, columns=table.names)

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None


def sink_for(url: str) -> Sink:
    if url.startswith("sqlite:///"):
        return SQLiteSink(Path(url.removeprefix("sqlite:///")))
    return PostgresSink(url)


class UsageLog:
    """Bounded buffers of finished exchanges (and unbilled rows), the background task that
    writes them, and the one way into the sink (its connection takes one write at a time)."""

    def __init__(self, sink: Sink, spec: UsageSpec) -> None:
        self._sink = sink
        self._interval = spec.batch_interval_s
        self._batch = spec.batch_size
        self._capacity = spec.queue_size
        self._pending: deque[Exchange] = deque()
        self._unbilled: deque[Row] = deque()
        self._closing: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._writing = asyncio.Lock()
        self.dropped = 0
        self.written = 0

    @property
    def depth(self) -> int:
        return len(self._pending) + len(self._unbilled)

    def put(self, exchange: Exchange) -> None:
        self._append(self._pending, exchange)

    def put_unbilled(self, row: Row) -> None:
        """An UNBILLED row (unbilled_row), written with the next batch."""
        self._append(self._unbilled, row)

    def _append(self, pending: deque, item: Exchange | Row) -> None:
        if self.depth >= self._capacity:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 10_000 == 0:
                log.error("usage log buffer full: %d records dropped so far", self.dropped)
            return
        pending.append(item)

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

    async def write(self, rows: list[Row], table: Table) -> None:
        """Write rows now, after any write in progress (the meter's readings go this way)."""
        async with self._writing:
            await self._sink.write(rows, table)

    async def flush(self) -> None:
        """Write everything buffered; on a write error keep it for the next round."""
        if await self._flush(self._pending, row, USAGE):
            await self._flush(self._unbilled, lambda r: r, UNBILLED)

    async def _flush(self, pending: deque, as_row: Callable[[Any], Row], table: Table) -> bool:
        while pending:
            batch = [pending.popleft() for _ in range(min(self._batch, len(pending)))]
            try:
                await self.write([as_row(item) for item in batch], table)
            except Exception as e:
                log.error("usage log write failed (%d records kept for retry): %s", len(batch), e)
                pending.extendleft(reversed(batch))
                return False
            self.written += len(batch)
        return True

    async def close(self) -> None:
        if self._task is not None:
            self._closing.set()
            await self._task
            self._task = None
        await self.flush()
        if self.depth:
            log.error("usage log: %d records could not be written at shutdown", self.depth)
        await self._sink.close()


_ENDPOINTS = {path: endpoint for endpoint, path in PATHS.items()}


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


def write_rows(url: str, rows: list[Row], table: Table = USAGE) -> None:
    """Append rows to a table of the usage log at url (sqlite:/// or postgresql://) with the
    gateway's sink, from outside the gateway: Slipway's own traffic to an engine, test data. A row
    may leave out the table's last columns (those a later release added, all nullable): NULL."""
    width = len(table.names)
    if rows and len(rows[0]) < width:
        rows = [(*r, *(None,) * (width - len(r))) for r in rows]

    async def write() -> None:
        sink = sink_for(url)
        await sink.open()
        try:
            for i in range(0, len(rows), 100_000):
                await sink.write(rows[i : i + 100_000], table)
        finally:
            await sink.close()

    asyncio.run(write())


def read_usage(
    start: datetime | float, end: datetime | float, url: str | None = None
) -> pd.DataFrame:
    """Usage rows with start <= time < end (datetimes; naive ones are UTC), oldest first.

    `time` comes back as a timezone-aware UTC datetime column whichever database holds the log.
    """
    import pandas as pd  # reports only: the gateway itself never loads pandas

    frame = read_table(USAGE, start, end, url)
    frame["time"] = pd.to_datetime(frame["time"], unit="s", utc=True)
    frame["stream"] = frame["stream"].astype(bool)
    return frame


def read_table(
    table: Table,
    start: datetime | float,
    end: datetime | float,
    url: str | None = None,
    columns: Sequence[str] | None = None,
) -> pd.DataFrame:
    """`table`'s rows with start <= time < end (all its columns, or `columns`), oldest first;
    `time` as unix seconds (float)."""
    import pandas as pd  # reports only: the gateway itself never loads pandas

    columns = list(columns or table.names)
    frames = list(iter_table(table, start, end, columns, url))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def _epoch(value: datetime | float) -> float:
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    return float(value)


def count_usage(
    start: datetime | float, end: datetime | float, url: str | None = None, model: str | None = None
) -> int:
    """How many rows `iter_usage` would yield (one indexed COUNT, no rows fetched)."""
    with _reader(url) as (cur, ph):
        query = f"SELECT COUNT(*) FROM {USAGE.name} WHERE {_where(ph, model)}"
        cur.execute(query, _args(start, end, model))
        return int(cur.fetchone()[0])


def iter_table(
    table: Table,
    start: datetime | float,
    end: datetime | float,
    columns: Sequence[str],
    url: str | None = None,
    model: str | None = None,
    chunk_rows: int = 100_000,
) -> Iterator[pd.DataFrame]:
    """`table`'s rows (optionally one model's: gateway_usage only), only `columns`, oldest first,
    in frames of at most `chunk_rows`: for reports over millions of rows in bounded memory. `time`
    comes back as unix seconds (float) from either database; the other columns as the database
    returns them."""
    import pandas as pd  # reports only: the gateway itself never loads pandas

    unknown = set(columns) - set(table.names)
    if unknown:
        known = ", ".join(table.names)
        raise ValueError(f"not {table.name} columns: {sorted(unknown)}; known: {known}")
    with _reader(url) as (cur, ph):
        epoch = "time" if ph == "?" else "extract(epoch from time)::float8"
        selected = ", ".join(epoch + " AS time" if c == "time" else c for c in columns)
        cur.execute(
            f"SELECT {selected} FROM {table.name} WHERE {_where(ph, model)} ORDER BY time, id",
            _args(start, end, model),
        )
        while rows := cur.fetchmany(chunk_rows):
            yield pd.DataFrame.from_records(rows, columns=list(columns))


# The billed requests' rows: what drift and cost read (evaluation.monitoring.usage.IterUsage).
iter_usage = partial(iter_table, USAGE)


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
