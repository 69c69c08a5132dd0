"""Two `slipway gateway` processes on one port (`instances.reuse_port`), as an operator runs them
on one machine: the kernel gives each new connection to one of them."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from serving.processes import free_port
from tests.serving.conftest import MODEL
from tests.serving.test_gateway_faults import process


def fresh(base: str, key: str) -> httpx.Client:
    """A client that opens a new connection for every request, so the kernel spreads them."""
    return httpx.Client(
        base_url=base,
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
        limits=httpx.Limits(max_keepalive_connections=0),
    )


def stats(admin: httpx.Client, samples: bool = False) -> dict:
    r = admin.get(f"/admin/stats/{MODEL}", params={"samples": str(samples).lower()})
    assert r.status_code == 200, r.text
    return r.json()


def together(snapshot: dict, n: int = 2) -> bool:
    """Whether the statistics add up `n` instances, all in the same window and answering."""
    instances = snapshot["instances"]
    return len(instances) == n and all(i["added"] for i in instances)


@contextmanager
def two_gateways(config: dict, folder: Path, admin_token: str) -> Iterator[str]:
    """Both processes on one free port with `config` (its `instances.reuse_port` set here), until
    each adds up the other's statistics of MODEL; yields the shared base URL."""
    path = folder / "gateway.json"
    path.write_text(
        json.dumps({**config, "instances": {**config.get("instances", {}), "reuse_port": True}})
    )
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    args = ["flows.cli", "gateway", "--config", str(path), "--port", str(port)]
    args += ["--log-level", "warning"]
    # The second one's /health may be answered by the first: `together` below shows both serve.
    with (
        process(args, folder / "gateway-1.log", f"{base}/health"),
        process(args, folder / "gateway-2.log", f"{base}/health"),
        fresh(base, admin_token) as admin,
    ):
        deadline = time.monotonic() + 30
        while not together(stats(admin)):
            assert time.monotonic() < deadline, stats(admin)["instances"]
            time.sleep(0.1)
        yield base
