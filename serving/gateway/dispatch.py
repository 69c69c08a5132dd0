"""The API's POST endpoints, reached by one dict lookup instead of Starlette's router.

Every API request would otherwise pass Starlette's exception middleware (which wraps `send` once
more) and its router (a regular-expression match per route in turn): 14 µs of the gateway's
325 µs of CPU per request, measured under the gateway bench's saturating load. What is not an API
POST goes on to the router as before, which still answers the API paths' 405 for other methods.
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.types import ASGIApp, Receive, Scope, Send


class ApiDispatch:
    def __init__(self, app: ASGIApp, endpoints: Mapping[str, ASGIApp]) -> None:
        self.app = app
        self.endpoints = dict(endpoints)  # path -> endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = self.endpoints.get(scope["path"])
            if endpoint is not None:
                await endpoint(scope, receive, send)
                return
        await self.app(scope, receive, send)
