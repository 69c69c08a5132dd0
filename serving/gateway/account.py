"""GET /v1/usage: what a tenant may read about itself with its own key: its tier, its limits,
what it has used of them now and what is left (what its requests in flight hold counts as used),
and the chargeback rate its money budget is charged at. A limit it does not have shows as null."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from configs.pricing import Chargeback
from serving.gateway.admin import json_response
from serving.gateway.limits import Limiter


def _left(limit: float | None, used: float) -> float | None:
    return None if limit is None else max(0, limit - used)


class OwnUsage:
    def __init__(self, limiter: Limiter, chargeback: Chargeback) -> None:
        self.limiter = limiter
        self.chargeback = chargeback

    async def get(self, request: Request) -> Response:
        tenant = request.scope["slipway.tenant"]
        used = await self.limiter.usage(tenant)
        rate = self.chargeback.rate(tenant.name, tenant.tier)
        return json_response(
            {
                "tenant": tenant.name,
                "tier": tenant.tier,
                "month": used.month,
                "limits": {
                    "rpm": tenant.rpm,
                    "tpm": tenant.tpm,
                    "monthly_token_budget": tenant.monthly_token_budget,
                    "monthly_budget_usd": tenant.monthly_budget_usd,
                },
                "chargeback": None if rate is None else rate.model_dump(),
                "used": used._asdict(),
                "remaining": {
                    "requests_this_minute": _left(tenant.rpm, used.requests_this_minute),
                    "tokens_this_minute": _left(
                        tenant.tpm, used.tokens_this_minute + used.tokens_held
                    ),
                    "monthly_token_budget": _left(
                        tenant.monthly_token_budget, used.tokens_this_month + used.tokens_held
                    ),
                    "monthly_budget_usd": _left(
                        tenant.monthly_budget_usd, used.usd_this_month + used.usd_held
                    ),
                },
            }
        )
