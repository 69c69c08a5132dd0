"""The gateway process: one uvicorn server with uvloop and httptools (`slipway gateway`).

To use more cores run several instances on one shared state store (`state.url`; on one machine
the default SQLite file will do), so they serve the same routes, with `redis_url` set, so they
share tenant limits: behind a load balancer (in Kubernetes, the Service), or on one machine on one
port (`instances.reuse_port`: the kernel spreads the connections). Each process also listens on a
free port of `instances.peer_host`, its own address, announced in the state store: there the
instance asked for /admin/stats reads the others' (peers.py).
"""

from __future__ import annotations

import gc
import logging
import socket
import sys

import uvicorn

from configs.gateway import GatewayConfig
from serving.gateway.app import build_app


def serve(
    config: GatewayConfig,
    host: str | None,
    port: int | None,
    log_level: str,
    peer_host: str | None = None,
) -> None:
    """Serve `config` until SIGTERM or SIGINT. Then the listening sockets close at once (new
    connections go to another instance), and requests in flight, streams too, get
    `timeouts.drain_s` to finish before they are cut; the usage log is flushed last."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    instances = config.instances
    shared = _bind(
        host or config.host, port if port is not None else config.port, instances.reuse_port
    )
    peer_host = peer_host or instances.peer_host
    sockets = [shared]
    if instances.reuse_port:  # the shared port names no one instance: a port of its own does
        sockets.append(_bind(peer_host, 0, reuse_port=False))
    app = build_app(config, peer_url=_url(peer_host, sockets[-1].getsockname()[1]))
    _tune_gc()
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            loop="uvloop",
            http="httptools",
            lifespan="on",
            access_log=False,  # the usage log records every API request, off the hot path
            proxy_headers=False,
            log_level=log_level,
            timeout_graceful_shutdown=config.timeouts.drain_s,
        )
    )
    server.run(sockets=sockets)
    if not server.started:
        sys.exit(3)  # uvicorn's own exit status for a server that did not start


def _bind(host: str, port: int, reuse_port: bool) -> socket.socket:
    """A listening TCP socket on `host`:`port` (0: a free one), shared with other processes that
    bind it with SO_REUSEPORT too when `reuse_port`."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _tune_gc() -> None:
    """Keep Python's cyclic garbage collector off the request path. Left as it is, it took 14% of
    the gateway's CPU under the gateway bench's saturating load: each full collection walked the
    ~94,000 objects start-up made (modules, configs, the app), which live as long as the process,
    and the young generation was collected every 700 allocations, a few requests apart. Frozen,
    those objects are never walked again, and a young generation of 10,000 is collected about
    every 3,000 requests (7 ms each): under 1% of the CPU. Garbage without cycles is freed at
    once by reference counting, as before."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)
