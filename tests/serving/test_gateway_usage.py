"""The usage log: one record per request, flushed on shutdown, in SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import httpx
import psycopg2

from configs.gateway import UsageSpec
from evaluation.benchmarks.mock_upstream import Fault
from serving.gateway.usage import METER, UNBILLED, UsageLog, read_table, read_usage, sink_for
from tests.serving.conftest import backend, chat, post_many


def traffic(base: str, keys) -> None:
    alice = {"Authorization": f"Bearer {keys.key('alice')}"}
    bob = {"Authorization": f"Bearer {keys.key('bob')}"}
    httpx.post(
        f"{base}/v1/chat/completions", json=chat("secret prompt words", max_tokens=3), headers=alice
    )
    httpx.post(
        f"{base}/v1/chat/completions",
        json=chat("bob private text", max_tokens=2, stream=True),
        headers=bob,
    )
    httpx.post(
        f"{base}/v1/chat/completions", json=chat(), headers=alice
    )  # alice is over rpm=1: 429
    httpx.post(
        f"{base}/v1/chat/completions", json=chat(), headers={"Authorization": "Bearer wrong"}
    )


def check(frame) -> None:
    assert len(frame) == 4
    ok = frame[frame.status == 200].sort_values("tenant")
    assert list(ok.tenant) == ["alice", "bob"]
    assert list(ok.backend_version) == ["1", "1"] and list(ok.role) == ["stable", "stable"]
    assert list(ok.prompt_tokens) == [3, 3] and list(ok.completion_tokens) == [3, 2]
    assert list(ok.stream) == [False, True]
    assert ok.ttft_ms.iloc[1] > 0 and (ok.latency_ms > 0).all()
    assert ok.prompt.iloc[0] == "secret prompt words"  # alice allows prompt logging
    assert ok.prompt.iloc[1] is None  # bob does not
    limited = frame[frame.status == 429].iloc[0]
    assert limited.tenant == "alice" and limited.error_kind == "rate_limit_exceeded"
    unauthenticated = frame[frame.status == 401].iloc[0]
    assert unauthenticated.tenant is None and unauthenticated.error_kind == "invalid_api_key"
    assert str(frame.time.dt.tz) == "UTC"


def tenants(keys) -> list[dict]:
    return [keys.tenant("alice", rpm=1, log_prompts=True), keys.tenant("bob")]


def test_sqlite_usage_flushed_on_shutdown(mock, keys, run_gateway, home):
    _, url = mock
    start = time.time()
    # A long batch interval: only the shutdown flush can have written the records.
    config = keys.config([backend(url, "1")], tenants(keys), usage={"batch_interval_s": 3600})
    with run_gateway(config) as base:
        traffic(base, keys)
    frame = read_usage(start, time.time() + 1)
    check(frame)
    assert read_usage(start - 100, start).empty


def test_usage_written_in_batches_while_running(mock, keys, run_gateway, home):
    upstream, url = mock
    upstream.faults["served-2"] = Fault(status=500)
    config = keys.config(
        [backend(url, "1", weight=0), backend(url, "2", role="canary", weight=100)],
        usage={"batch_interval_s": 0.1},
    )
    start = time.time()
    with run_gateway(config) as base:
        asyncio.run(post_many(base, keys.key("alice"), [chat()] * 50))
        time.sleep(0.5)
        frame = read_usage(start, time.time() + 1)
    assert len(frame) == 50 and (frame.status == 200).all()
    assert set(frame.backend_version) == {"1"}  # the failed canary attempts were retried on stable


def test_postgres_usage_flushed_on_shutdown(mock, keys, run_gateway, pg_url):
    _, url = mock
    start = time.time()
    config = keys.config(
        [backend(url, "1")], tenants(keys), usage={"url": pg_url, "batch_interval_s": 3600}
    )
    with run_gateway(config) as base:
        traffic(base, keys)
    check(read_usage(start, time.time() + 1, url=pg_url))


OLD_SCHEMA = """CREATE TABLE gateway_usage (
  id {id} PRIMARY KEY, time {time} NOT NULL, request_id TEXT NOT NULL, tenant TEXT, model TEXT,
  endpoint TEXT NOT NULL, backend_version TEXT, role TEXT, stream {bool} NOT NULL,
  status INTEGER NOT NULL, error_kind TEXT, prompt_tokens INTEGER NOT NULL,
  completion_tokens INTEGER NOT NULL, ttft_ms {real}, latency_ms {real} NOT NULL, prompt TEXT)"""
OLD_ROW = "INSERT INTO gateway_usage (time, request_id, endpoint, stream, status, prompt_tokens, "
OLD_ROW += "completion_tokens, latency_ms) VALUES ({at}, 'old', 'chat', {no}, 200, 1, 2, 3.0)"


def test_a_log_written_before_tokens_from_gains_the_column_and_keeps_its_rows(
    mock, keys, run_gateway, home, pg_url
):
    _, url = mock
    start = time.time()
    path = home.logs / "gateway-usage.sqlite"
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as db:
        db.execute(OLD_SCHEMA.format(id="INTEGER", time="REAL", bool="INTEGER", real="REAL"))
        db.execute(OLD_ROW.format(at=start, no=0))
    pg = psycopg2.connect(pg_url)
    with pg, pg.cursor() as cursor:
        cursor.execute(
            OLD_SCHEMA.format(
                id="BIGSERIAL", time="TIMESTAMPTZ", bool="BOOLEAN", real="DOUBLE PRECISION"
            )
        )
        cursor.execute(OLD_ROW.format(at=f"to_timestamp({start})", no="false"))
    pg.close()
    for usage in ({}, {"url": pg_url}):
        config = keys.config([backend(url, "1")], usage=usage)
        with run_gateway(config) as base:
            headers = {"Authorization": f"Bearer {keys.key('alice')}"}
            httpx.post(f"{base}/v1/chat/completions", json=chat(), headers=headers)
        frame = read_usage(start - 1, time.time() + 1, url=usage.get("url"))
        assert len(frame) == 2 and frame.request_id.iloc[0] == "old"  # kept, then the new row
        assert frame.tokens_from.isna().all() and frame.completion_tokens.iloc[0] == 2


def test_meter_readings_written_while_a_batch_is_flushed_are_all_kept(home, pg_url, caplog):
    """The engine meter writes through the usage log while its writer flushes: one PostgreSQL
    connection refuses a second operation in progress, so the writes take turns."""
    for url in (f"sqlite:///{home.logs / 'usage.sqlite'}", pg_url):
        start = time.time()

        async def flush_and_read(url=url, start=start) -> None:
            usage = UsageLog(sink_for(url), UsageSpec(batch_interval_s=3600, batch_size=50))
            await usage.start()
            for i in range(2000):
                usage.put_unbilled((start, f"r{i}", "shadow", "1", 1, 3, 2, 2, 1.0, None, None))
            readings = [[(start, "1", f"http://engine-{i}:8000", i, 2 * i)] for i in range(20)]
            await asyncio.gather(usage.flush(), *(usage.write(r, METER) for r in readings))
            await usage.close()

        asyncio.run(flush_and_read())
        assert not [r for r in caplog.records if r.levelname == "ERROR"], url
        end = time.time() + 1
        assert len(read_table(UNBILLED, start - 1, end, url)) == 2000, url
        meter = read_table(METER, start - 1, end, url)
        assert sorted(meter.generation_tokens_total) == [2 * i for i in range(20)], url
