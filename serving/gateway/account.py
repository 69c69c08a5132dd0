"""GET /v1/usage: what a tenant may read about itself with its own key: its tier, its limits,
what it has used of them now and what is left (tokens held by its requests in flight count as
used). A limit it does not have shows as null."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from serving.gateway.admin import json_response
from serving.gateway.limits import Limiter


def _left(limit: int | None, used: int) -> int | None:
    return None if limit is None else max(0, limit - used)


class OwnUsage:
    def __init__(self, limiter: Limiter) -> None:
        self.limiter = limiter

    async def get(self, request: Request) -> Response:
        tenant = request.scope["slipway.tenant"]
        used = await self.limiter.usage(tenant)
        return json_response(
            {
                "tenant": tenant.name,
                "tier": tenant.tier,
                "month": used.month,
                "limits": {
                    "rpm": tenant.rpm,
                    "tpm": tenant.tpm,
                    "monthly_token_budget": tenant.monthly_token_budget,
                },
                "used": used._asdict(),
                "remaining": {
                    "requests_this_minute": _left(tenant.rpm, used.requests_this_minute),
                    "tokens_this_minute": _left(
                        tenant.tpm, used.tokens_this_minute + used.tokens_held
                    ),
                    "monthly_token_budget": _left(
                        tenant.monthly_token_budget, used.tokens_this_month + used.tokens_held
                    ),
                },
            }
        )
