"""Tenants signed in by an identity provider: a JWT verified offline, its tenant from a claim.

The provider's key set (JWKS) is read once when the gateway starts, from a file or a URL, so a
request never waits on the provider. A token is accepted only when its header names a key of that
set (`kid`), its signature verifies with it under one of the configured asymmetric algorithms,
and `exp`, `iss` and `aud` are present and right (`nbf` too when present), with the configured
leeway for clock skew. Every refusal says which check failed, never the token.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx
import jwt

from configs.gateway import OIDCSpec
from serving.gateway.errors import Unauthorized

log = logging.getLogger("serving.gateway")


class OIDCError(RuntimeError):
    """The key set cannot be read or used; the message says where and why."""


def looks_like_jwt(token: bytes) -> bool:
    """Three base64url parts, the first a JSON header (`eyJ` is `{"`)."""
    return token.startswith(b"eyJ") and token.count(b".") == 2


class OIDCVerifier:
    def __init__(self, spec: OIDCSpec) -> None:
        self.spec = spec
        self._keys: dict[str, Any] = {}  # kid -> PyJWK

    async def open(self) -> None:
        spec = self.spec
        where = str(spec.jwks_file or spec.jwks_url)
        try:
            if spec.jwks_file is not None:
                data = json.loads(spec.jwks_file.read_text())
            else:
                async with httpx.AsyncClient(timeout=10) as client:
                    reply = await client.get(spec.jwks_url)
                    reply.raise_for_status()
                    data = reply.json()
            keys = jwt.PyJWKSet.from_dict(data).keys
        except (OSError, ValueError, httpx.HTTPError, jwt.PyJWTError) as e:
            raise OIDCError(f"oidc: the key set {where} cannot be used: {e}") from None
        self._keys = {k.key_id: k for k in keys if k.key_id}
        if not self._keys:
            raise OIDCError(f"oidc: the key set {where} holds no key with a `kid`")
        log.info("oidc: %d keys of %s from %s", len(self._keys), spec.issuer, where)

    def tenant_name(self, token: bytes) -> str:
        """The tenant a valid token names; Unauthorized saying which check failed."""
        spec = self.spec
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as e:
            raise _refused(f"not a readable JWT ({e})") from None
        key = self._keys.get(header.get("kid", ""))
        if key is None:
            raise _refused(f"its key id {header.get('kid')!r} is not in the issuer's key set")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=list(spec.algorithms),
                audience=spec.audience,
                issuer=spec.issuer,
                leeway=spec.leeway_s,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise _refused("it has expired") from None
        except jwt.InvalidAudienceError:
            raise _refused(f"its audience is not {spec.audience!r}") from None
        except jwt.InvalidIssuerError:
            raise _refused(f"its issuer is not {spec.issuer!r}") from None
        except jwt.PyJWTError as e:
            raise _refused(str(e)) from None
        tenant = claims.get(spec.tenant_claim)
        if not isinstance(tenant, str) or not tenant:
            raise _refused(f"it has no {spec.tenant_claim!r} claim naming a tenant")
        return tenant


def _refused(why: str) -> Unauthorized:
    return Unauthorized(f"identity token refused: {why}", code="invalid_token")
