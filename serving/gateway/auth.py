"""Authentication: tenant API keys on /v1, the admin token on /admin.

Only sha256 hashes of secrets are held. A tenant key is found by looking up its hash (the hash of
a high-entropy key reveals nothing through lookup timing); the admin token's hash is compared in
constant time. Neither the presented secret nor its hash is ever logged or echoed.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping

from starlette.types import ASGIApp, Receive, Scope, Send

from configs.gateway import TenantSpec
from serving.gateway.errors import Forbidden, Unauthorized


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


class AuthMiddleware:
    """Names the tenant of a /v1 request by its key; lets only the admin token into /admin."""

    def __init__(self, app: ASGIApp, tenants: Mapping[str, TenantSpec], admin_hash: str) -> None:
        self.app = app
        self.tenants = tenants  # by the sha256 of their key
        self.admin_hash = admin_hash

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(("/v1/", "/admin/")):
            await self.app(scope, receive, send)
            return
        token = bearer(scope)
        if token is None:
            raise Unauthorized(_MISSING, code="missing_api_key")
        digest = hashlib.sha256(token).hexdigest()
        if scope["path"].startswith("/admin/"):
            if not hmac.compare_digest(digest, self.admin_hash):
                if digest in self.tenants:
                    raise Forbidden(
                        "admin routes need the admin token; tenant API keys are not accepted here"
                    )
                raise Unauthorized("invalid admin token", code="invalid_admin_token")
        else:
            tenant = self.tenants.get(digest)
            if tenant is None:
                raise Unauthorized(
                    "invalid API key; check the key or ask your operator for a new one"
                )
            scope["slipway.tenant"] = tenant  # what the endpoints may show this tenant
            exchange = scope.get("slipway.exchange")
            if exchange is not None:
                exchange.tenant = tenant
        await self.app(scope, receive, send)
