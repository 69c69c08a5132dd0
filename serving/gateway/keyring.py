"""Tenants and their API keys, kept in the state store so that every instance applies a change
within one poll and a restart keeps it.

Records: namespace "tenants", key the tenant's name, value its settings (configs.gateway.Tenant
without the name), and key "tier:<tier>" for a tier shed until a time {until, reason, by};
namespace "keys", key the key's id, value {tenant, sha256, created_at, expires_at, revoked_at}
(times in Unix seconds, None where unset). A key's secret is shown once,
when it is issued; only its sha256 is stored. The config's tenants and keys are added at start
where the store does not hold them (a tenant by name, a key by hash: `make up`'s fresh demo key
after a restore, say); what the store holds is the truth, so a key revoked by the admin API stays
revoked after a restart with the same config.

Requests never wait on the store: they look their key up in memory, and expiry is judged at the
moment of the request. A change is computed from the namespace as read, written with
compare-and-set on its version, and retried on a conflict with another writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from pydantic import ValidationError

from configs.gateway import Tenant, TenantSpec
from configs.loader import describe
from serving.gateway.auth import key_hash, new_secret
from serving.gateway.background import stop
from serving.gateway.errors import (
    BadRequest,
    NotFound,
    Unauthorized,
    store_busy,
    store_unavailable,
)
from serving.gateway.state.store import Conflict, Snapshot, StateError, StateStore, StoreUnavailable

log = logging.getLogger("serving.gateway")

TENANTS, KEYS = "tenants", "keys"
# A shed tier is a record of the tenants namespace under this prefix (no tenant name has a ':'),
# so every instance reads it in the same poll as the tenants.
SHED = "tier:"
_TRIES = 5


@dataclass(frozen=True, slots=True)
class Shed:
    """A tier whose requests are refused (503) until `until` (Unix seconds)."""

    tier: str
    until: float
    reason: str
    by: str

    def public(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Key:
    id: str
    tenant: str
    sha256: str
    created_at: float
    expires_at: float | None = None
    revoked_at: float | None = None

    def refusal(self, now: float) -> str | None:
        """Why this key is refused at `now`, or None if it is valid."""
        if self.revoked_at is not None and self.revoked_at <= now:
            return f"API key {self.id} was revoked; ask your operator for a new one"
        if self.expires_at is not None and self.expires_at <= now:
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.expires_at))
            return f"API key {self.id} expired at {when}; ask your operator for a new one"
        return None

    def public(self) -> dict[str, Any]:
        """What the admin API and the audit log show: everything but the hash."""
        return {k: v for k, v in asdict(self).items() if k != "sha256"}


@dataclass(frozen=True, slots=True)
class Issued:
    key: Key
    secret: str  # shown once, to the admin who asked


def new_key_id() -> str:
    return "key_" + secrets.token_hex(6)


def _tenant_record(tenant: Tenant) -> dict[str, Any]:
    """A tenant's settings as stored (a config's TenantSpec drops its key: keys are kept apart)."""
    return tenant.model_dump(mode="json", exclude={"name", "key_sha256"})


class Keyring:
    """The tenants and keys every request is authenticated against, loaded from, polled from and
    written to `store` (opened by the table sync, which shares it)."""

    def __init__(
        self,
        store: StateStore,
        seed: tuple[TenantSpec, ...],
        poll_interval_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self._seed = seed
        self._interval = poll_interval_s
        self._clock = clock
        self.tenants: Mapping[str, Tenant] = {}
        self.sheds: Mapping[str, Shed] = {}  # by tier, those ended included
        self.keys: Mapping[str, Key] = {}  # by id
        self._by_hash: Mapping[str, Key] = {}
        self._seen = (-1, -1)  # the (tenants, keys) versions last applied
        self._task: asyncio.Task | None = None

    def now(self) -> float:
        return self._clock()

    # ---- requests ---------------------------------------------------------------------------

    def tenant_for(self, digest: str) -> Tenant:
        """The tenant whose valid key hashes to `digest`; Unauthorized saying why otherwise."""
        key = self._by_hash.get(digest)
        if key is None:
            raise Unauthorized("invalid API key; check the key or ask your operator for a new one")
        if (refusal := key.refusal(self._clock())) is not None:
            raise Unauthorized(refusal, code="api_key_refused")
        tenant = self.tenants.get(key.tenant)
        if tenant is None:
            raise Unauthorized(f"API key {key.id} names tenant '{key.tenant}', which is gone")
        return tenant

    def tenant_named(self, name: str) -> Tenant:
        tenant = self.tenants.get(name)
        if tenant is None:
            raise Unauthorized(
                f"the identity token names tenant '{name}', which does not exist; ask your "
                "operator to create it",
                code="invalid_token",
            )
        return tenant

    def shed(self, tier: str) -> Shed | None:
        """The tier's shedding, while it lasts."""
        shed = self.sheds.get(tier)
        return shed if shed is not None and shed.until > self._clock() else None

    def holds(self, digest: str) -> bool:
        """Whether `digest` is a tenant key's (valid or not): such a token is not an admin's."""
        return digest in self._by_hash

    # ---- loading ----------------------------------------------------------------------------

    async def open(self) -> None:
        """Seed an empty store from the config, load, and start polling."""
        if self._seed:
            await self._seed_store()
        await self._refresh()
        log.info(
            "tenants: %d tenants, %d keys from the state store %s",
            len(self.tenants),
            len(self.keys),
            self.store.where,
        )
        self._task = asyncio.create_task(self._poll(), name="keyring-sync")

    async def _seed_store(self) -> None:
        """Add the config's tenants and keys the store does not hold (by name, by hash); what it
        holds stays as the admin API left it, so a key revoked there stays revoked."""
        now = self._clock()
        tenants, keys = await self.store.read(TENANTS), await self.store.read(KEYS)
        known = {r.value.get("sha256") for r in keys.records.values()}
        new_tenants = {
            t.name: _tenant_record(t) for t in self._seed if t.name not in tenants.records
        }
        new_keys = {
            k.id: asdict(k)
            for t in self._seed
            if t.key_sha256 not in known
            for k in [Key(f"key_seed_{t.key_sha256[:12]}", t.name, t.key_sha256, now)]
        }
        with contextlib.suppress(Conflict):  # another instance seeded them first
            if new_tenants:
                await self.store.write(TENANTS, tenants.version, new_tenants)
            if new_keys:
                await self.store.write(KEYS, keys.version, new_keys)
        if new_tenants or new_keys:
            log.info(
                "state store %s: added the config's tenants %s and %d keys it did not hold",
                self.store.where,
                sorted(new_tenants) or "(none)",
                len(new_keys),
            )

    async def close(self) -> None:
        task, self._task = self._task, None
        await stop(task)

    async def _refresh(self) -> None:
        tenants, keys = await self.store.read(TENANTS), await self.store.read(KEYS)
        self._apply(tenants, keys)

    def _apply(self, tenants: Snapshot, keys: Snapshot) -> None:
        self._seen = (tenants.version, keys.version)
        try:
            self.tenants = {
                name: Tenant.model_validate({**r.value, "name": name})
                for name, r in tenants.records.items()
                if not name.startswith(SHED)
            }
            self.sheds = {
                name[len(SHED) :]: Shed(tier=name[len(SHED) :], **r.value)
                for name, r in tenants.records.items()
                if name.startswith(SHED)
            }
            self.keys = {kid: Key(**r.value) for kid, r in keys.records.items()}
        except (ValidationError, TypeError) as e:
            detail = describe(e) if isinstance(e, ValidationError) else str(e)
            raise StateError(
                f"a tenant or key in the state store {self.store.where} is not valid; set it "
                f"again through /admin/tenants:\n{detail}"
            ) from None
        self._by_hash = {k.sha256: k for k in self.keys.values()}

    async def _poll(self) -> None:
        down = False
        while True:
            await asyncio.sleep(self._interval)
            try:
                versions = (await self.store.version(TENANTS), await self.store.version(KEYS))
                if versions != self._seen:
                    await self._refresh()
                    log.info("tenants and keys: versions %d, %d applied", *self._seen)
                if down:
                    log.info("tenants: the state store %s answers again", self.store.where)
                    down = False
            except StoreUnavailable as e:
                if not down:
                    log.error("%s; authenticating against the tenants and keys held", e)
                down = True
            except Exception:
                # The poll must outlive a bug too: a dead poll would keep revoked keys valid.
                log.exception("tenants: polling the state store failed")

    # ---- changes ----------------------------------------------------------------------------

    async def _change(self, namespace: str, edit: Callable[[Snapshot], dict[str, dict]]) -> None:
        """Write `edit`'s records computed from the namespace as it is now; retried on conflict."""
        try:
            for _ in range(_TRIES):
                snapshot = await self.store.read(namespace)
                try:
                    await self.store.write(namespace, snapshot.version, edit(snapshot))
                except Conflict:
                    continue
                await self._refresh()
                return
        except StateError as e:
            raise store_unavailable(e, f"the {namespace}") from None
        raise store_busy(namespace, _TRIES)

    async def put_tenant(self, tenant: Tenant) -> Tenant | None:
        """Create or replace a tenant's settings; the settings it had (None: new)."""
        had: list[Tenant | None] = []

        def edit(snapshot: Snapshot) -> dict[str, dict]:
            record = snapshot.records.get(tenant.name)
            had[:] = [
                Tenant.model_validate({**record.value, "name": tenant.name}) if record else None
            ]
            return {tenant.name: _tenant_record(tenant)}

        await self._change(TENANTS, edit)
        return had[0]

    async def set_shed(self, tier: str, until: float, reason: str, by: str) -> Shed | None:
        """Shed `tier` until `until` (a time already past restores it); the shedding it had."""
        had: list[Shed | None] = []

        def edit(snapshot: Snapshot) -> dict[str, dict]:
            record = snapshot.records.get(SHED + tier)
            had[:] = [Shed(tier=tier, **record.value) if record else None]
            return {SHED + tier: {"until": until, "reason": reason, "by": by}}

        await self._change(TENANTS, edit)
        return had[0]

    async def issue(self, tenant: str, expires_at: float | None = None) -> Issued:
        await self._refresh()
        if tenant not in self.tenants:
            raise NotFound(
                f"no tenant '{tenant}'; create it first with PUT /admin/tenants/{tenant}",
                param="tenant",
            )
        issued = self._new(tenant, expires_at)
        await self._change(KEYS, lambda _: {issued.key.id: asdict(issued.key)})
        return issued

    def _new(self, tenant: str, expires_at: float | None) -> Issued:
        now = self._clock()
        if expires_at is not None and expires_at <= now:
            raise BadRequest("expires_at must be in the future", param="expires_at")
        secret = new_secret("sk-slipway-")
        return Issued(Key(new_key_id(), tenant, key_hash(secret), now, expires_at), secret)

    async def update_key(self, key_id: str, **fields: float | None) -> tuple[Key, Key]:
        """Set a key's revoked_at or expires_at; (before, after). Computed from the key as the
        store holds it at the write, so a concurrent change by another instance is not lost."""
        before, after, _ = await self._edit_key(key_id, lambda key: (replace(key, **fields), None))
        return before, after

    async def rotate(self, key_id: str, overlap_s: float) -> tuple[Key, Key, Issued]:
        """A new key for the same tenant; the old one stays valid for `overlap_s` more seconds
        (or until it expired already). Both written in one step: (old before, old after, new)."""

        def rotated(before: Key) -> tuple[Key, Issued]:
            if (refusal := before.refusal(self._clock())) is not None:
                raise BadRequest(f"cannot rotate: {refusal}", param="key")
            ends = self._clock() + overlap_s
            after = replace(before, expires_at=min(ends, before.expires_at or ends))
            return after, self._new(before.tenant, before.expires_at)

        before, after, issued = await self._edit_key(key_id, rotated)
        assert issued is not None
        return before, after, issued

    async def _edit_key(
        self, key_id: str, change: Callable[[Key], tuple[Key, Issued | None]]
    ) -> tuple[Key, Key, Issued | None]:
        """Write `change` of the key as the store holds it (and the key it issues, if any)."""
        done: list = []

        def edit(snapshot: Snapshot) -> dict[str, dict]:
            record = snapshot.records.get(key_id)
            if record is None:
                raise _no_key(key_id)
            before = Key(**record.value)
            after, issued = change(before)
            done[:] = [before, after, issued]
            put = {key_id: asdict(after)}
            if issued is not None:
                put[issued.key.id] = asdict(issued.key)
            return put

        await self._change(KEYS, edit)
        return done[0], done[1], done[2]


def _no_key(key_id: str) -> NotFound:
    return NotFound(f"no API key '{key_id}'; GET /admin/keys lists them", param="key")
