"""`make up`'s reconciliation of the gateway's state store: what the store routed and nothing of
the new stack serves (a canary left by an interrupted rollout, a stable backend at an old URL, a
model no longer championed) is reported line by line and replaced by the champions' routes, which
a gateway started afterwards serves, whatever its start-up file says."""

from __future__ import annotations

import httpx

from evaluation.benchmarks.mock_upstream import serve
from serving.gateway.app import build_app
from serving.stack.stored_routes import reconcile_routes
from tests.serving.conftest import MODEL, backend, chat, digest

DEAD = "http://127.0.0.1:9"  # what the earlier stack's vLLMs answered on: nothing now


def test_up_reports_and_repairs_a_stale_canary(mock, keys, home, state):
    _, url = mock
    admin = {"Authorization": f"Bearer {keys.admin}"}
    earlier = keys.config([backend(DEAD, "1")], state=state)
    canary = {
        "backends": [
            {**backend(DEAD, "1", weight=50), "expected_digest": digest("1")},
            {**backend(DEAD, "2", role="canary", weight=50), "expected_digest": digest("2")},
        ]
    }
    retired = {"backends": [{**backend(DEAD, "7"), "expected_digest": digest("7")}]}
    with serve(build_app(earlier, home)) as base:  # the earlier stack, its rollout interrupted
        assert httpx.put(f"{base}/admin/routes/{MODEL}", json=canary, headers=admin).is_success
        assert httpx.put(f"{base}/admin/routes/retired", json=retired, headers=admin).is_success

    now = keys.config([backend(url, "1")], state=state)  # v1 is champion, at its new vLLM
    assert reconcile_routes(now, home) == [
        f"retired: removed, no longer a champion (it routed stable v7 at {DEAD} (100))",
        f"{MODEL}: canary v2 at {DEAD} dropped: left by an interrupted rollout, and no vLLM of "
        "this stack serves it",
        f"{MODEL}: v1 url: {DEAD} -> {url}",
        f"{MODEL}: v1 weight: 50.0 -> 100.0",
    ]

    # A gateway started now, even on the earlier start-up file, serves what `up` wrote.
    with serve(build_app(earlier, home)) as base:
        routes = httpx.get(f"{base}/admin/routes", headers=admin).json()["routes"]
        assert [
            (r["model"], [(b["version"], b["url"], b["weight"]) for b in r["backends"]])
            for r in routes
        ] == [(MODEL, [("1", url, 100.0)])]
        headers = {"Authorization": f"Bearer {keys.key('alice')}"}
        r = httpx.post(f"{base}/v1/chat/completions", json=chat(), headers=headers)
        assert r.status_code == 200 and r.headers["x-slipway-backend"] == "1"

    assert reconcile_routes(now, home) == [f"{MODEL}: unchanged, stable v1 at {url} (100)"]


def test_up_fills_an_empty_store_and_replaces_a_changed_champion(mock, keys, home):
    _, url = mock
    first = keys.config([backend(url, "1")])
    assert reconcile_routes(first, home) == [f"{MODEL}: added, stable v1 at {url} (100)"]
    promoted = keys.config([backend(url, "3")])  # a rollout promoted v3; the route still says v1
    assert reconcile_routes(promoted, home) == [
        f"{MODEL}: stable v1 at {url} dropped: the champion is v3",
        f"{MODEL}: stable v3 added at {url} (100)",
    ]
