"""A tenant's bounds on the shape of a request: models, prompt size, max_tokens and n.

Applied once the tenant is known and the body parsed, before anything reaches a backend. A model
the tenant may not use gets the same 404 as a model that is not served; a request over a bound
gets a 400 whose message names the field and the limit, with `param` set to the field. A cap on
max_tokens is also the default of a request that names none, or leaving it out would lift the cap;
a tenant with token limits and no cap gives such a request the gateway's
`limits.default_max_tokens`, so the tokens held for it at admission (limits.py) bound its use.
"""

from __future__ import annotations

from typing import Any

from configs.gateway import Tenant
from serving.gateway.endpoints import BOUNDS
from serving.gateway.errors import BadRequest, model_not_found
from serving.gateway.limits import metered
from serving.gateway.validation import prompt_bytes


def _over(field: str, value: int, limit: str, bound: int, unit: str = "") -> BadRequest:
    return BadRequest(
        f"'{field}' is {value}{unit}, over this tenant's {limit} of {bound}{unit}",
        param=field,
        code="over_tenant_limit",
    )


def apply_tenant_bounds(
    tenant: Tenant, data: dict[str, Any], endpoint: str, default_max_tokens: int
) -> None:
    """Refuse a request outside the tenant's bounds; give one that names no max_tokens the cap,
    or `default_max_tokens` when the tenant has token or money limits but no cap."""
    model = data["model"]
    if tenant.models is not None and model not in tenant.models:
        raise model_not_found(model, param="model")
    cap, bounds = tenant.max_tokens_cap, BOUNDS.get(endpoint, ())
    if bounds and (cap is not None or metered(tenant)):
        named = [(field, data[field]) for field in bounds if data.get(field) is not None]
        for field, value in named:
            if cap is not None and value > cap:
                raise _over(field, value, "max_tokens_cap", cap)
        if not named:
            data[bounds[0]] = cap if cap is not None else default_max_tokens
    n = data.get("n")
    if tenant.max_n is not None and n is not None and n > tenant.max_n:
        raise _over("n", n, "max_n", tenant.max_n)
    limit = tenant.max_prompt_bytes
    if limit is not None and (size := prompt_bytes(data, endpoint)) > limit:
        field = {"chat": "messages", "responses": "input", "embeddings": "input"}.get(
            endpoint, "prompt"
        )
        raise _over(field, size, "max_prompt_bytes", limit, " bytes")
