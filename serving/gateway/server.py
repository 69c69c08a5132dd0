"""The gateway process: one uvicorn server with uvloop and httptools (`slipway gateway`).

To use more cores run several instances behind a load balancer on one shared state store
(`state.url`: PostgreSQL or Redis), so they serve the same routes, with `redis_url` set, so they
share tenant limits.
"""

from __future__ import annotations

import logging

import uvicorn

from configs.gateway import GatewayConfig
from serving.gateway.app import build_app


def serve(config: GatewayConfig, host: str | None, port: int | None, log_level: str) -> None:
    """Serve `config` until SIGTERM or SIGINT. Then the listening socket closes at once (new
    connections go to another instance), and requests in flight, streams too, get
    `timeouts.drain_s` to finish before they are cut; the usage log is flushed last."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    uvicorn.run(
        build_app(config),
        host=host or config.host,
        port=port if port is not None else config.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,  # the usage log records every API request, off the hot path
        proxy_headers=False,
        log_level=log_level,
        timeout_graceful_shutdown=config.timeouts.drain_s,
    )
