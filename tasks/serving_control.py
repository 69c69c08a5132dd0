"""Serving control: the rollout's hands on the serving layer.

- GatewayAdmin: the gateway's admin API (routes, weights, live statistics), with the admin token.
- start_version / stop_version: a registered version's vLLM, started detached and recorded in the
  stack's state ($SLIPWAY_HOME/run/stack.json) beside what `make up` started, so `make down`
  stops it too, whether or not the flow that started it is still alive.

Which gateway: an explicit URL, else the one `make up` started. The admin token comes from
SLIPWAY_ADMIN_TOKEN or the 0600 file `make up` wrote; it is sent, never logged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from configs.home import Home
from configs.models import Serving
from serving.stack import (
    Champion,
    admin_token_path,
    read_state,
    start_vllm,
    stop,
    write_state,
)
from serving.vllm import VLLMStartError


class ServingControlError(RuntimeError):
    """The serving layer refused or could not be reached; the message says which and why."""


def secret(variable: str, path: Path, what: str) -> str:
    """A secret from the environment, else from the 0600 file `make up` wrote."""
    if value := os.environ.get(variable):
        return value
    if not path.is_file():
        raise ServingControlError(f"no {what}: set {variable} or create {path} (`make up` does)")
    return path.read_text().strip()


class GatewayAdmin:
    """A client of one gateway's admin API (see serving/admin.py for the routes)."""

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
                raise ServingControlError(
                    "no gateway to steer: `make up` has not started one (see `make status`); "
                    "start it, or pass the gateway's URL"
                )
            url = gateway.url
        return cls(url, secret("SLIPWAY_ADMIN_TOKEN", admin_token_path(home), "admin token"))

    def route(self, model: str) -> dict[str, Any]:
        return self._call("GET", f"/admin/routes/{model}")

    def put_route(self, model: str, backends: list[dict[str, Any]]) -> dict[str, Any]:
        return self._call("PUT", f"/admin/routes/{model}", {"backends": backends})

    def set_weights(
        self, model: str, weights: dict[str, float], audience: str | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"weights": weights}
        if audience is not None:
            body["audience"] = audience
        return self._call("POST", f"/admin/routes/{model}/weights", body)

    def stats(self, model: str, samples: bool = True) -> dict[str, Any]:
        return self._call("GET", f"/admin/stats/{model}", params={"samples": str(samples).lower()})

    def _call(
        self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None
    ) -> dict[str, Any]:
        try:
            response = self._client.request(method, path, json=body, params=params)
        except httpx.HTTPError as e:
            raise ServingControlError(
                f"gateway {self.url} unreachable ({method} {path}): {e}"
            ) from e
        if response.status_code != 200:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:300]
            raise ServingControlError(
                f"gateway {self.url} refused {method} {path} ({response.status_code}): {message}"
            )
        return response.json()


@dataclass(frozen=True)
class RunningVersion:
    """A registered version being served: where, and whether this process started it."""

    version: Champion
    url: str
    started_here: bool


def start_version(version: Champion, serving: Serving, home: Home) -> RunningVersion:
    """vLLM on the version's weights, detached and recorded before it is waited on, so that a
    crash of the caller leaves it to `make down`. Raises ServingControlError if it never gets
    healthy (then nothing of it is left running or recorded)."""
    server, proc = start_vllm(version, serving, home)
    write_state(home, [*read_state(home), proc])
    try:
        server.wait_healthy()
    except VLLMStartError as e:
        stop_version(home, proc.what)
        raise ServingControlError(f"the {version} server did not start: {e}") from e
    return RunningVersion(version, server.url, started_here=True)


def stop_version(home: Home, record: str, grace_s: float = 20) -> bool:
    """Stop the recorded process group named `record` and forget it; False if none was recorded."""
    procs = read_state(home)
    mine = [p for p in procs if p.what == record]
    if not mine:
        return False
    if survivors := stop(mine, grace_s):
        raise ServingControlError(f"still running after SIGKILL: {'; '.join(survivors)}")
    write_state(home, [p for p in read_state(home) if p.what != record])
    return True
