"""Run the gateway: `python -m serving.gateway --config configs/gateway.yaml`.

One process on uvicorn with uvloop and httptools. To use more cores run several instances
behind a load balancer with `redis_url` set, so they share tenant limits.
"""

from __future__ import annotations

import logging
import sys

import click
import uvicorn

from configs.gateway import load_gateway_config
from configs.loader import ConfigError
from serving.app import build_app


@click.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="gateway YAML")
@click.option("--host", default=None, help="overrides the config's host")
@click.option("--port", default=None, type=int, help="overrides the config's port")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
def main(config_path: str, host: str | None, port: int | None, log_level: str) -> None:
    """Serve the OpenAI-compatible gateway described by CONFIG."""
    try:
        config = load_gateway_config(config_path)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        build_app(config),
        host=host or config.host,
        port=port if port is not None else config.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,  # the usage log records every API request, off the hot path
        log_level=log_level,
        timeout_graceful_shutdown=30,
    )


if __name__ == "__main__":
    sys.exit(main())
