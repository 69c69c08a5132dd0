"""The gateway's state store on each backend (SQLite, PostgreSQL, Redis): versions bumped by
every write, compare-and-set that lets exactly one of racing writers win, consistent snapshots,
and a schema that is migrated forward and refused when it is newer than the code."""

from __future__ import annotations

import asyncio

import pytest
from starlette.testclient import TestClient

from configs.gateway import StateSpec
from serving.gateway.app import build_app
from serving.gateway.state import default_path, store_for
from serving.gateway.state.migrations import MIGRATIONS, RECORDS, VERSIONS, Migration, pending
from serving.gateway.state.store import Conflict, SchemaError, StateStore, redacted
from tests.serving.conftest import backend

# A second schema step, as a later release would add one. It is not idempotent on SQL (a second
# run breaks the primary key) and counts its runs on Redis, so running it twice shows.
STEP_2 = Migration(
    2,
    "test: a record written by the migration itself",
    sql=(
        f"INSERT INTO {VERSIONS} (namespace, version) VALUES ('test', 1)",
        f"INSERT INTO {RECORDS} (namespace, key, version, value, updated_at)"
        " VALUES ('test', 'runs', 1, '1', 0)",
    ),
    redis="redis.call('SET', ARGV[1] .. '{test}:version', 1)\n"
    "redis.call('HINCRBY', ARGV[1] .. '{test}:records', 'runs', 1)\n"
    "redis.call('HSET', ARGV[1] .. '{test}:revs', 'runs', 1)",
)


def opened(state: dict, home, migrations=MIGRATIONS) -> StateStore:
    return store_for(StateSpec.model_validate(state), home, migrations)


def test_writes_bump_the_version_and_keep_each_record_s_own(state, home):
    async def go():
        store = opened(state, home)
        await store.open()
        try:
            assert await store.version("routes") == 0
            empty = await store.read("routes")
            assert (empty.version, dict(empty.records)) == (0, {})
            assert await store.write("routes", 0, {"a": {"n": 1}, "b": {"n": [1, "$2 '"]}}) == 1
            assert await store.write("routes", 1, {"a": {"n": 2}}, delete=["b"]) == 2
            assert await store.write("other", 0, {"a": {"elsewhere": True}}) == 1
            with pytest.raises(Conflict, match="no longer at version 1"):
                await store.write("routes", 1, {"a": {"n": 3}})
            snapshot = await store.read("routes")
            assert await store.version("routes") == snapshot.version == 2
            assert {k: (r.version, r.value) for k, r in snapshot.records.items()} == {
                "a": (2, {"n": 2})
            }
            assert await store.write("routes", 2, {"c": {"n": [1, "$2 '"]}}) == 3
            records = (await store.read("routes")).records
            assert {k: r.version for k, r in records.items()} == {"a": 2, "c": 3}
            assert records["c"].value == {"n": [1, "$2 '"]}  # values come back as written
        finally:
            await store.close()

    asyncio.run(go())


def test_of_racing_writers_on_one_version_exactly_one_wins(state, home):
    async def go():
        stores = [opened(state, home) for _ in range(8)]
        await asyncio.gather(*(s.open() for s in stores))  # migrating at once: once
        try:

            async def attempt(i: int) -> int | None:
                try:
                    return await stores[i].write("routes", 0, {"m": {"writer": i}})
                except Conflict:
                    return None

            results = await asyncio.gather(*(attempt(i) for i in range(len(stores))))
            [winner] = [i for i, version in enumerate(results) if version == 1]
            assert results.count(None) == len(stores) - 1
            snapshot = await stores[0].read("routes")
            assert snapshot.version == 1 and snapshot.records["m"].value == {"writer": winner}
        finally:
            await asyncio.gather(*(s.close() for s in stores))

    asyncio.run(go())


def test_an_older_store_is_migrated_and_a_newer_one_refused(state, home):
    async def go():
        old = opened(state, home)  # this release's schema: version 1
        await old.open()
        await old.write("routes", 0, {"m": {"kept": True}})
        await old.close()

        for _ in range(2):  # the next release migrates it once, then finds nothing to do
            newer = opened(state, home, (*MIGRATIONS, STEP_2))
            await newer.open()
            assert (await newer.read("routes")).records["m"].value == {"kept": True}
            assert (await newer.read("test")).records["runs"].value == 1
            await newer.close()

        again = opened(state, home)
        with pytest.raises(SchemaError) as refused:
            await again.open()
        await again.close()
        return str(refused.value)

    message = asyncio.run(go())
    assert "is at schema version 2, newer than this gateway knows (up to 1)" in message
    assert "a newer Slipway wrote it" in message


def test_a_gateway_on_a_newer_store_refuses_to_start_and_says_why(keys, home):
    async def migrate_ahead():
        store = store_for(StateSpec(), home, (*MIGRATIONS, STEP_2))
        await store.open()
        await store.close()

    asyncio.run(migrate_ahead())
    app = build_app(keys.config([backend("http://127.0.0.1:9", "1")]), home)
    with pytest.raises(SchemaError, match="newer than this gateway knows"), TestClient(app):
        pass
    assert default_path(home).is_file()  # the default store: SQLite under $SLIPWAY_HOME


def test_migration_steps_must_run_in_order_without_gaps():
    assert [m.version for m in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))
    assert (
        pending(0, MIGRATIONS, "x") == MIGRATIONS
        and pending(len(MIGRATIONS), MIGRATIONS, "x") == ()
    )
    with pytest.raises(ValueError, match="no gap or repeat"):
        pending(0, (*MIGRATIONS, STEP_2, STEP_2), "x")


def test_store_urls_in_messages_carry_no_password():
    assert (
        redacted("postgresql://app:s3cret@db:5432/slipway")
        == "postgresql://app:***@db:5432/slipway"
    )
    assert redacted("redis://:s3cret@cache:6379/0") == "redis://:***@cache:6379/0"
    assert (
        redacted("sqlite:////var/lib/slipway/state.sqlite")
        == "sqlite:////var/lib/slipway/state.sqlite"
    )
