"""The admin API for tenants, their keys and the audit log (roles: serving/gateway/auth.py).

  GET  /admin/tenants                     every tenant and its settings
  PUT  /admin/tenants/{name}              create or replace a tenant: {"tier": ..., "rpm": ...}
                                          (configs.gateway.Tenant without its name)
  POST /admin/tenants/{name}/keys         issue a key: {"expires_at": <unix s>} (optional);
                                          the answer holds the key, shown this once
  GET  /admin/keys?tenant=NAME            the keys (ids, tenant, times; never a secret or hash)
  POST /admin/keys/{id}/revoke            refused from now on, on every instance
  POST /admin/keys/{id}/rotate            {"overlap_s": 3600}: a new key; the old one is valid
                                          for overlap_s more seconds
  POST /admin/keys/{id}/expire            {"expires_at": <unix s>}
  GET  /admin/tiers                       tiers shed now or before: {tier, until, reason, by}
  POST /admin/tiers/{tier}/shed           {"seconds": 900, "reason": "..."}: the tier's requests
                                          get 503 + Retry-After until then, on every instance
  POST /admin/tiers/{tier}/restore        {"reason": "..."}: served again at once
  GET  /admin/audit?limit=&action=&actor= the audit log, oldest first

Every change is written to the state store (every instance applies it within one poll) and then
to the audit log with its admin, before and after.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field
from starlette.requests import Request
from starlette.responses import Response

from configs.gateway import Tenant, unpriced
from configs.loader import Strict
from configs.pricing import Chargeback
from serving.gateway.admin import json_response, payload
from serving.gateway.audit import AuditLog
from serving.gateway.errors import BadRequest
from serving.gateway.keyring import Issued, Keyring

_TIER = re.compile(r"^[\w.-]+$")  # as configs.gateway.Tenant spells a tier


class TenantUpdate(Tenant):
    name: str = Field("", description="taken from the path")


class KeyRequest(Strict):
    expires_at: float | None = Field(None, description="Unix seconds; none: never")


class Rotation(Strict):
    overlap_s: float = Field(
        3600.0, ge=0, description="how long the old key stays valid alongside the new one"
    )


class Expiry(Strict):
    expires_at: float = Field(description="Unix seconds")


class Shedding(Strict):
    seconds: float = Field(gt=0, le=7 * 86400, description="how long the tier is shed")
    reason: str = Field(min_length=1, max_length=500, description="why, as clients are told")


class Restoring(Strict):
    reason: str = Field("restored", min_length=1, max_length=500)


def _issued(issued: Issued) -> dict[str, Any]:
    return {**issued.key.public(), "key": issued.secret}


class TenantsAPI:
    def __init__(self, keyring: Keyring, audit: AuditLog, chargeback: Chargeback) -> None:
        self.keyring = keyring
        self.audit = audit
        self.chargeback = chargeback  # a money budget needs a rate to be charged at

    async def list_tenants(self, request: Request) -> Response:
        tenants = [t.model_dump(mode="json") for t in self.keyring.tenants.values()]
        return json_response({"tenants": sorted(tenants, key=lambda t: t["name"])})

    async def put_tenant(self, request: Request) -> Response:
        name = request.path_params["name"]
        update = await payload(request, TenantUpdate)
        if update.name not in ("", name):
            raise BadRequest(
                f"the body names tenant '{update.name}', the path '{name}'", param="name"
            )
        try:
            tenant = Tenant.model_validate({**update.model_dump(exclude={"name"}), "name": name})
        except ValueError as e:
            raise BadRequest(f"invalid tenant name '{name}': {e}", param="name") from None
        if why := unpriced(tenant, self.chargeback):
            raise BadRequest(why, param="monthly_budget_usd")
        before = await self.keyring.put_tenant(tenant)
        after = tenant.model_dump(mode="json")
        await self.audit.record_for(
            request, "tenant.put", name, before and before.model_dump(mode="json"), after
        )
        return json_response(after)

    async def issue_key(self, request: Request) -> Response:
        name = request.path_params["name"]
        asked = await payload(request, KeyRequest, empty_ok=True)
        issued = await self.keyring.issue(name, asked.expires_at)
        await self.audit.record_for(request, "key.issue", issued.key.id, None, issued.key.public())
        return json_response(_issued(issued))

    async def list_keys(self, request: Request) -> Response:
        tenant = request.query_params.get("tenant")
        keys = [
            k.public() for k in self.keyring.keys.values() if tenant is None or k.tenant == tenant
        ]
        return json_response({"keys": sorted(keys, key=lambda k: k["created_at"])})

    async def revoke_key(self, request: Request) -> Response:
        key_id = request.path_params["key"]
        before, after = await self.keyring.update_key(key_id, revoked_at=self.keyring.now())
        await self.audit.record_for(request, "key.revoke", key_id, before.public(), after.public())
        return json_response(after.public())

    async def rotate_key(self, request: Request) -> Response:
        key_id = request.path_params["key"]
        asked = await payload(request, Rotation, empty_ok=True)
        before, after, issued = await self.keyring.rotate(key_id, asked.overlap_s)
        await self.audit.record_for(
            request,
            "key.rotate",
            key_id,
            before.public(),
            {"old": after.public(), "new": issued.key.public()},
        )
        return json_response({"old": after.public(), "new": _issued(issued)})

    async def expire_key(self, request: Request) -> Response:
        key_id = request.path_params["key"]
        asked = await payload(request, Expiry)
        before, after = await self.keyring.update_key(key_id, expires_at=asked.expires_at)
        await self.audit.record_for(request, "key.expire", key_id, before.public(), after.public())
        return json_response(after.public())

    async def list_sheds(self, request: Request) -> Response:
        now = self.keyring.now()
        sheds = [{**s.public(), "active": s.until > now} for s in self.keyring.sheds.values()]
        return json_response({"sheds": sorted(sheds, key=lambda s: s["tier"])})

    async def shed_tier(self, request: Request) -> Response:
        asked = await payload(request, Shedding)
        until = self.keyring.now() + asked.seconds
        return await self._set_shed(request, "tier.shed", until, asked.reason)

    async def restore_tier(self, request: Request) -> Response:
        asked = await payload(request, Restoring, empty_ok=True)
        return await self._set_shed(request, "tier.restore", self.keyring.now(), asked.reason)

    async def _set_shed(self, request: Request, action: str, until: float, reason: str) -> Response:
        tier = request.path_params["tier"]
        if not _TIER.match(tier):
            raise BadRequest(f"'{tier}' is not a tier name (letters, digits, . _ -)", param="tier")
        admin = request.scope.get("slipway.admin")
        by = admin.id if admin else "unknown"
        before = await self.keyring.set_shed(tier, until, reason, by)
        after = {"tier": tier, "until": until, "reason": reason, "by": by}
        await self.audit.record_for(request, action, tier, before and before.public(), after)
        return json_response(after)

    async def read_audit(self, request: Request) -> Response:
        query = request.query_params
        try:
            limit = int(query.get("limit", "100"))
        except ValueError:
            raise BadRequest("limit must be a whole number", param="limit") from None
        rows = await self.audit.read(limit, query.get("action"), query.get("actor"))
        return json_response({"records": rows})
