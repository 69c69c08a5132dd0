"""The state store on Redis (`state.url: redis://...`), for deployments that already run one.

Keys, under the configured prefix (each namespace in a hash tag, so its keys share a cluster slot):
  {prefix}state:schema                 hash: migration version -> "name applied_at"
  {prefix}state:{<namespace>}:version  the namespace's version, bumped by every write
  {prefix}state:{<namespace>}:records  hash: key -> value (JSON)
  {prefix}state:{<namespace>}:revs     hash: key -> version of the write that last set it
Writes and reads are Lua scripts, so a compare-and-set and a snapshot are each one atomic step.
Redis keeps the state only as well as its persistence is set up (appendonly yes for routes that
survive a Redis restart).
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Collection, Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from serving.gateway.state.migrations import MIGRATIONS, Migration, pending
from serving.gateway.state.store import Conflict, Record, Snapshot, StoreUnavailable

_WRITE = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current ~= tonumber(ARGV[1]) then return -1 end
local version = redis.call('INCR', KEYS[1])
local puts = tonumber(ARGV[2])
for i = 0, puts - 1 do
  redis.call('HSET', KEYS[2], ARGV[3 + 2 * i], ARGV[4 + 2 * i])
  redis.call('HSET', KEYS[3], ARGV[3 + 2 * i], version)
end
for i = 3 + 2 * puts, #ARGV do
  redis.call('HDEL', KEYS[2], ARGV[i])
  redis.call('HDEL', KEYS[3], ARGV[i])
end
return version
"""

_READ = """
return {redis.call('GET', KEYS[1]) or '0', redis.call('HGETALL', KEYS[2]),
        redis.call('HGETALL', KEYS[3])}
"""

# One migration step, applied once and in order by whoever runs it first. ARGV: the state key
# prefix (the step's body reads it as ARGV[1]), the step's version, name and time.
_STEP = """
local top = 0
for _, v in ipairs(redis.call('HKEYS', KEYS[1])) do top = math.max(top, tonumber(v)) end
local version = tonumber(ARGV[2])
if top >= version then return 0 end
if top ~= version - 1 then return redis.error_reply('schema at ' .. top .. ', step ' .. version) end
local function step()
%s
end
step()
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3] .. ' ' .. ARGV[4])
return 1
"""


class RedisStore:
    """The StateStore contract on Redis, in the keys above."""

    def __init__(
        self, url: str, prefix: str, where: str, migrations: Sequence[Migration] = MIGRATIONS
    ) -> None:
        self.where = where
        self._url = url
        self._prefix = f"{prefix}state:"
        self._migrations = migrations
        self._redis: aioredis.Redis | None = None

    def _keys(self, namespace: str) -> list[str]:
        tagged = f"{self._prefix}{{{namespace}}}"
        return [f"{tagged}:version", f"{tagged}:records", f"{tagged}:revs"]

    def _client(self) -> aioredis.Redis:
        assert self._redis is not None, "open() the store first"
        return self._redis

    async def _guard(self, step: Awaitable[Any]) -> Any:
        try:
            return await step
        except (RedisError, OSError) as e:
            raise StoreUnavailable(f"the gateway state store {self.where} failed: {e}") from e

    async def open(self) -> None:
        # Made here: the client's connections belong to the loop that serves.
        self._redis = aioredis.from_url(
            self._url, socket_timeout=5, socket_connect_timeout=5, decode_responses=True
        )
        schema = f"{self._prefix}schema"
        client = self._client()
        applied = max(map(int, await self._guard(client.hkeys(schema))), default=0)
        for step in pending(applied, self._migrations, self.where):
            args = (self._prefix, step.version, step.name, time.time())
            await self._guard(client.eval(_STEP % step.redis, 1, schema, *args))

    async def close(self) -> None:
        if self._redis is not None:
            client, self._redis = self._redis, None
            await client.aclose()

    async def version(self, namespace: str) -> int:
        return int(await self._guard(self._client().get(self._keys(namespace)[0])) or 0)

    async def read(self, namespace: str) -> Snapshot:
        read = self._client().eval(_READ, 3, *self._keys(namespace))
        version, values, revisions = await self._guard(read)
        values, revisions = _pairs(values), _pairs(revisions)
        records = {k: Record(int(revisions[k]), json.loads(v)) for k, v in values.items()}
        return Snapshot(int(version), records)

    async def write(
        self,
        namespace: str,
        expected: int,
        put: Mapping[str, dict[str, Any]],
        delete: Collection[str] = (),
    ) -> int:
        pairs = [item for key, value in put.items() for item in (key, json.dumps(value))]
        args = [expected, len(put), *pairs, *delete]
        version = await self._guard(self._client().eval(_WRITE, 3, *self._keys(namespace), *args))
        if version < 0:
            raise Conflict(f"namespace '{namespace}' is no longer at version {expected}")
        return int(version)


def _pairs(flat: list[str]) -> dict[str, str]:
    """HGETALL as Lua returns it (key, value, key, value, ...) as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))
