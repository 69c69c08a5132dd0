"""The application's wiring in process (Starlette's TestClient, no sockets): each app owns its
parts, and the admin API's table swap is seen by every endpoint of that app and no other (apps on
one state store share its routes by design: test_gateway_state_sync.py)."""

from __future__ import annotations

import time

from starlette.testclient import TestClient

from configs.home import Home
from serving.gateway.app import build_app
from serving.gateway.usage import read_usage
from tests.serving.conftest import MODEL, backend, digest

URL = "http://127.0.0.1:9"  # never reached: these requests need no backend


def models(client: TestClient, key: str) -> list[str]:
    r = client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
    return [m["id"] for m in r.json()["data"]]


def test_two_apps_from_one_config_share_nothing(keys, home, tmp_path):
    config = keys.config([backend(URL, "1")])
    alice, admin = keys.key("alice"), {"Authorization": f"Bearer {keys.admin}"}
    route = {"backends": [{**backend(URL, "2"), "expected_digest": digest("2")}]}
    elsewhere = Home(tmp_path / "elsewhere")  # a state store of its own
    with (
        TestClient(build_app(config, home)) as one,
        TestClient(build_app(config, elsewhere)) as two,
    ):
        assert one.put("/admin/routes/other", json=route, headers=admin).status_code == 200
        assert models(one, alice) == ["other", MODEL]  # the swap is seen at once (sorted)
        assert one.get("/v1/models/other", headers={"Authorization": f"Bearer {alice}"}).is_success
        assert models(two, alice) == [MODEL]
        one.post("/v1/chat/completions", json={}, headers={"Authorization": "Bearer wrong"})
        assert 'code="401",tenant=""' in one.get("/metrics").text
        assert 'code="401"' not in two.get("/metrics").text


def test_an_app_can_be_started_again_and_logs_usage_each_time(keys, home):
    app = build_app(keys.config([backend(URL, "1")]), home)
    start = time.time()
    for _ in range(2):
        with TestClient(app) as client:
            r = client.post("/v1/chat/completions", json={}, headers={"Authorization": "Bearer x"})
            assert r.status_code == 401
    rows = read_usage(start, time.time() + 1)
    assert list(rows.status) == [401, 401] and rows.request_id.nunique() == 2


def test_api_posts_skip_the_router_and_other_methods_still_get_its_answers(keys, home):
    """The API's POSTs reach their endpoint by path (dispatch.py); any other method on those
    paths still gets the router's 405, and an unknown path its 404, both in the OpenAI shape."""
    alice = {"Authorization": f"Bearer {keys.key('alice')}"}
    with TestClient(build_app(keys.config([backend(URL, "1")]), home)) as client:
        posted = client.post("/v1/chat/completions", json={"model": MODEL}, headers=alice)
        assert posted.status_code == 400 and posted.json()["error"]["param"] == "messages"
        wrong = client.get("/v1/chat/completions", headers=alice)
        assert wrong.status_code == 405
        assert wrong.json()["error"]["code"] == "method_not_allowed"
        unknown = client.post("/v1/chat/completion", json={"model": MODEL}, headers=alice)
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
