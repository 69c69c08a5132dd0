"""The audit log: every admin change, appended to the state store (namespace "audit").

A record holds the time, the actor (the admin's id, never its token), the action (e.g.
"route.put", "route.weights", "tenant.put", "key.issue", "key.revoke", "key.rotate",
"key.expire"), its target, the state before and after, and the request's id. Keys appear by id
and tenant only: `scrub` drops any field named like a secret or its hash before a record is
written, so a mistake upstream cannot put one in the log.

Records are keyed by the time in nanoseconds and a random suffix, so they sort in order, and
appended with compare-and-set like every other write to the store; several instances append
without losing each other's records.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from serving.gateway.errors import Unavailable
from serving.gateway.state.store import Conflict, StateError, StateStore

log = logging.getLogger("serving.gateway")

AUDIT = "audit"
_TRIES = 10
_SECRET_FIELDS = ("sha256", "secret", "token", "key_sha256", "password")


def scrub(value: Any) -> Any:
    """`value` without any field whose name says it holds a secret or a secret's hash."""
    if isinstance(value, dict):
        return {
            k: scrub(v)
            for k, v in value.items()
            if not any(s in str(k).lower() for s in _SECRET_FIELDS)
        }
    if isinstance(value, list | tuple):
        return [scrub(v) for v in value]
    return value


class AuditLog:
    def __init__(self, store: StateStore, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self._clock = clock

    async def record_for(
        self, request: Any, action: str, target: str, before: Any, after: Any
    ) -> dict[str, Any]:
        """Record a change made by an admin request (its admin and request id)."""
        admin = request.scope.get("slipway.admin")
        actor = admin.id if admin else "unknown"
        request_id = request.scope.get("slipway.request_id")
        return await self.record(actor, action, target, before, after, request_id)

    async def record(
        self,
        actor: str,
        action: str,
        target: str,
        before: Any,
        after: Any,
        request_id: str | None,
    ) -> dict[str, Any]:
        """Append one record; a store that fails is logged loudly (the change it records is
        already made) and answered to the admin who made it as a 503 saying so."""
        now = self._clock()
        entry = scrub(
            {
                "time": now,
                "actor": actor,
                "action": action,
                "target": target,
                "before": before,
                "after": after,
                "request_id": request_id,
            }
        )
        key = f"{int(now * 1e9):020d}-{secrets.token_hex(3)}"
        try:
            for _ in range(_TRIES):
                try:
                    await self.store.write(AUDIT, await self.store.version(AUDIT), {key: entry})
                    return entry
                except Conflict:
                    continue
            raise StateError(f"the audit log changed {_TRIES} times while appending")
        except StateError as e:
            log.error("audit: %s on %s by %s made, not recorded: %s", action, target, actor, e)
            raise Unavailable(
                f"the change was made, but the audit log could not record it ({e}); "
                "the gateway's log names it",
                code="audit_unavailable",
                retry_after=1,
            ) from None

    async def read(
        self, limit: int = 100, action: str | None = None, actor: str | None = None
    ) -> list[dict[str, Any]]:
        """The latest `limit` records, oldest first, of `action` (a prefix, e.g. "key.") and
        `actor` where given."""
        snapshot = await self.store.read(AUDIT)
        rows = [snapshot.records[k].value for k in sorted(snapshot.records)]
        if action:
            rows = [r for r in rows if r["action"].startswith(action)]
        if actor:
            rows = [r for r in rows if r["actor"] == actor]
        return rows[-limit:] if limit > 0 else []
