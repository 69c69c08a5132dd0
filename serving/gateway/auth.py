"""Authentication: admin tokens on /admin, each admin held to its role; tenant API keys (or an
identity provider's JWT, oidc.py) everywhere else but the public probes (PUBLIC), so an endpoint
added later is behind a key unless it is made public on purpose.

Only sha256 hashes of secrets are held. A tenant key is found by looking up its hash in the
keyring (the hash of a high-entropy key reveals nothing through lookup timing); an admin token's
hash is compared with each admin's in constant time. Neither the presented secret nor its hash is
ever logged or echoed.

Roles: operator, every admin route; rollout, the routes, weights and statistics the rollout flow
drives; auditor, reads only (GET).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from starlette.types import ASGIApp, Receive, Scope, Send

from configs.gateway import AdminSpec, Tenant
from serving.gateway.errors import Forbidden, Unauthorized, Unavailable
from serving.gateway.oidc import OIDCVerifier, looks_like_jwt

PUBLIC = frozenset({"/health", "/ready", "/metrics"})  # load balancers and Prometheus probe them


def key_hash(secret: str | bytes) -> str:
    return hashlib.sha256(secret if isinstance(secret, bytes) else secret.encode()).hexdigest()


def new_secret(prefix: str) -> str:
    """A new high-entropy secret (an API key or the admin token); only its hash is ever stored."""
    return prefix + secrets.token_urlsafe(32)


def bearer(scope: Scope) -> bytes | None:
    """The token of `Authorization: Bearer <token>` (or an `api-key` header), if any."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else None
        if name == b"api-key":
            return value.strip()
    return None


_MISSING = (
    "no API key: send `Authorization: Bearer <key>` (the key your operator gave you, "
    "made with `slipway keys new TENANT`)"
)


class Tenants(Protocol):
    """Where tenant keys are looked up (serving/gateway/keyring.py)."""

    def tenant_for(self, digest: str) -> Tenant:
        """The tenant of a valid key, else Unauthorized saying why."""

    def holds(self, digest: str) -> bool: ...

    def tenant_named(self, name: str) -> Tenant:
        """The tenant an identity token names, else Unauthorized."""

    @property
    def sheds(self) -> Mapping[str, Any]:
        """Tiers shed (or once shed), by name: empty on the common path."""

    def shed(self, tier: str) -> Any:
        """The tier's shedding while it lasts (until, reason), else None."""


_ROLLOUT_PATHS = ("/admin/routes", "/admin/stats")
ROLES = {
    "operator": "every admin route",
    "rollout": "only /admin/routes and /admin/stats",
    "auditor": "only reads (GET)",
}


def permitted(role: str, method: str, path: str) -> bool:
    if role == "operator":
        return True
    if role == "auditor":
        return method in ("GET", "HEAD")
    return role == "rollout" and path.startswith(_ROLLOUT_PATHS)


def admins_of(admin_hash: str, more: Sequence[AdminSpec]) -> tuple[AdminSpec, ...]:
    """Every admin identity: the config's admin token is the operator 'admin'."""
    return (AdminSpec(id="admin", token_sha256=admin_hash, role="operator"), *more)


class AuthMiddleware:
    """Names the tenant of a /v1 request by its key; lets admins into /admin as their role
    allows, naming the admin (scope "slipway.admin") for the audit log."""

    def __init__(
        self,
        app: ASGIApp,
        tenants: Tenants,
        admins: Sequence[AdminSpec],
        oidc: OIDCVerifier | None = None,
    ) -> None:
        self.app = app
        self.tenants = tenants
        self.admins = tuple(admins)
        self.oidc = oidc  # tenants may also present a JWT from this identity provider

    def _admin(self, digest: str) -> AdminSpec | None:
        found = None
        for admin in self.admins:  # every comparison made, so timing does not say which
            if hmac.compare_digest(digest, admin.token_sha256):
                found = admin
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC:
            await self.app(scope, receive, send)
            return
        token = bearer(scope)
        if scope["path"].startswith("/admin/"):
            if token is None:
                raise Unauthorized(_MISSING, code="missing_api_key")
            digest = hashlib.sha256(token).hexdigest()
            admin = self._admin(digest)
            if admin is None:
                if self.tenants.holds(digest):
                    raise Forbidden(
                        "admin routes need an admin token; tenant API keys are not accepted here"
                    )
                raise Unauthorized("invalid admin token", code="invalid_admin_token")
            if not permitted(admin.role, scope["method"], scope["path"]):
                raise Forbidden(
                    f"admin '{admin.id}' has the role {admin.role}, which may use "
                    f"{ROLES[admin.role]}, not {scope['method']} {scope['path']}"
                )
            scope["slipway.admin"] = admin
        else:
            exchange = scope.get("slipway.exchange")
            if exchange is None or exchange.trace is None:
                tenant = self._tenant(token)
            else:  # tracing on (tracing.py)
                tenant = exchange.trace.call("gateway.auth", self._tenant, token)
            scope["slipway.tenant"] = tenant  # what the endpoints may show this tenant
            if exchange is not None:
                exchange.tenant = tenant
            if self.tenants.sheds and (shed := self.tenants.shed(tenant.tier)) is not None:
                raise _shed(tenant.tier, shed)
        await self.app(scope, receive, send)

    def _tenant(self, token: bytes | None) -> Tenant:
        """The tenant a key or identity token names, else Unauthorized saying why."""
        if token is None:
            raise Unauthorized(_MISSING, code="missing_api_key")
        if self.oidc is not None and looks_like_jwt(token):
            return self.tenants.tenant_named(self.oidc.tenant_name(token))
        return self.tenants.tenant_for(hashlib.sha256(token).hexdigest())


def _shed(tier: str, shed: Any) -> Unavailable:
    wait = max(1, math.ceil(shed.until - time.time()))
    return Unavailable(
        f"requests of tier '{tier}' are shed for {wait} s more ({shed.reason}): capacity is kept "
        "for other tiers while an incident lasts; retry after that",
        code="tier_shed",
        retry_after=wait,
    )
