"""The gateway's admin API as the rollout uses it: routes, weights, live statistics.

Which gateway: an explicit URL, else the one `make up` started. The admin token comes from
SLIPWAY_ADMIN_TOKEN or the 0600 file `make up` wrote; it is sent, never logged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import SecretStr

from configs.home import Home
from configs.settings import Settings
from serving.processes import read_state


class GatewayAdminError(RuntimeError):
    """The gateway refused or could not be reached; the message says which and why."""


def secret(value: SecretStr | None, variable: str, path: Path, what: str) -> str:
    """A secret from the environment (`value`, read from `variable`), else from the 0600 file
    `make up` wrote."""
    if value is not None:
        return value.get_secret_value()
    if not path.is_file():
        raise GatewayAdminError(f"no {what}: set {variable} or create {path} (`make up` does)")
    return path.read_text().strip()


class GatewayAdmin:
    """A client of one gateway's admin API (see serving/gateway/admin.py for the routes)."""

    def __init__(self, url: str, token: str, timeout_s: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self._client = httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout_s
        )

    @classmethod
    def of(cls, home: Home, url: str | None = None) -> GatewayAdmin:
        """The gateway at `url`, or the one `make up` started; its admin token from the env or
        the file `make up` wrote."""
        if url is None:
            gateway = next((p for p in read_state(home) if p.what == "gateway"), None)
            if gateway is None:
                raise GatewayAdminError(
                    "no gateway to steer: `make up` has not started one (see `make status`); "
                    "start it, or pass the gateway's URL"
                )
            url = gateway.url
        token = Settings().admin_token
        return cls(url, secret(token, "SLIPWAY_ADMIN_TOKEN", home.admin_token, "admin token"))

    def route(self, model: str) -> dict[str, Any]:
        return self._call("GET", f"/admin/routes/{model}")

    def put_route(self, model: str, backends: list[dict[str, Any]]) -> dict[str, Any]:
        return self._call("PUT", f"/admin/routes/{model}", {"backends": backends})

    def set_weights(
        self,
        model: str,
        weights: dict[str, float],
        audience: str | None = None,
        mirror: dict[str, Any] | Literal["keep"] | None = "keep",
    ) -> dict[str, Any]:
        """New weights; `audience` None keeps the route's; `mirror` left out keeps the route's
        mirror, None stops it."""
        body: dict[str, Any] = {"weights": weights}
        if audience is not None:
            body["audience"] = audience
        if mirror != "keep":
            body["mirror"] = mirror
        return self._call("POST", f"/admin/routes/{model}/weights", body)

    def shed_tier(self, tier: str, seconds: float, reason: str) -> dict[str, Any]:
        """Refuse `tier`'s requests (503 + Retry-After) for `seconds`, on every instance."""
        return self._call(
            "POST", f"/admin/tiers/{tier}/shed", {"seconds": seconds, "reason": reason}
        )

    def stats(self, model: str, samples: bool = True) -> dict[str, Any]:
        return self._call("GET", f"/admin/stats/{model}", params={"samples": str(samples).lower()})

    def reset_stats(self, model: str) -> dict[str, Any]:
        """Start a new statistics window for `model` on every instance."""
        return self._call("POST", f"/admin/stats/{model}/reset")

    def call(
        self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """Any admin route (tenants, keys, the audit log: serving/gateway/tenants_api.py)."""
        return self._call(method, path, body, params)

    def _call(
        self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None
    ) -> dict[str, Any]:
        try:
            response = self._client.request(method, path, json=body, params=params)
        except httpx.HTTPError as e:
            raise GatewayAdminError(f"gateway {self.url} unreachable ({method} {path}): {e}") from e
        if response.status_code != 200:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:300]
            raise GatewayAdminError(
                f"gateway {self.url} refused {method} {path} ({response.status_code}): {message}"
            )
        return response.json()
