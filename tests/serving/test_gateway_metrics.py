"""Prometheus exposition and the Grafana dashboard that reads it."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
from prometheus_client.parser import text_string_to_metric_families

from configs.home import REPO
from tests.serving.conftest import backend, chat, post_many


def auth(keys) -> dict:
    return {"Authorization": f"Bearer {keys.key('alice')}"}


def test_metrics_expose_backend_series_and_dashboard_uses_them(mock, keys, run_gateway):
    _, url = mock
    config = keys.config(
        [backend(url, "1", weight=50), backend(url, "2", role="canary", weight=50)],
        cache={"enabled": True},
    )
    with run_gateway(config) as base:
        asyncio.run(post_many(base, keys.key("alice"), [chat(stream=True)] * 20 + [chat()] * 20))
        cached = {"x-slipway-cache": "yes", "x-session-id": "one", **auth(keys)}
        for _ in range(2):  # a miss, then a hit: not a backend's request
            httpx.post(f"{base}/v1/chat/completions", json=chat("again"), headers=cached)
        httpx.post(f"{base}/v1/chat/completions", json=chat())  # a 401
        r = httpx.get(f"{base}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    requests = {
        (s.labels["version"], s.labels["role"]): s.value
        for s in families["slipway_gateway_backend_requests"].samples
        if s.name.endswith("_total")
    }
    assert sum(requests.values()) == 41 and set(requests) == {("1", "stable"), ("2", "canary")}
    responses = {
        (s.labels["tenant"], s.labels["code"]): s.value
        for s in families["slipway_gateway_responses"].samples
        if s.name.endswith("_total")
    }
    assert responses == {("alice", "200"): 42, ("", "401"): 1}
    cache = {
        s.labels["result"]: s.value
        for s in families["slipway_gateway_cache"].samples
        if s.name.endswith("_total")
    }
    assert (cache["hit"], cache["miss"], cache["stored"]) == (1, 1, 1)
    ttft = [
        s
        for s in families["slipway_gateway_backend_ttft_seconds"].samples
        if s.name.endswith("_count")
    ]
    assert sum(s.value for s in ttft) == 20

    dashboard = json.loads((REPO / "configs" / "grafana-dashboard.json").read_text())
    used = {
        m
        for p in dashboard["panels"]
        for t in p["targets"]
        for m in re.findall(r"slipway_gateway_\w+", t["expr"])
    }
    exposed = {s.name for f in families.values() for s in f.samples}
    assert used and used <= exposed, used - exposed
