"""Security: no route answers without a valid key except the public probes, admin routes take only
the admin token, and no key or token is written anywhere but its own 0600 file.

Routes are read from the application itself, so a route added later is covered without editing
this file. /health, /ready and /metrics are public on purpose: load balancers and Prometheus probe
them without credentials, and they hold no secret and no prompt (counts by tenant name, backend
versions and digests). Covered elsewhere: a backend whose digest differs from the registered one
is refused by the admin API (test_gateway_routing.py::test_admin_route_changes_verify_digests),
and weights that do not verify against their signature are never served
(test_stack.py::test_weights_that_do_not_verify_are_refused).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from starlette.routing import Route
from starlette.testclient import TestClient

from configs.home import REPO
from serving.gateway.app import build_app
from serving.gateway.auth import key_hash
from serving.processes import free_port
from serving.stack.gateway_config import Backend, write_gateway_config
from tasks.registry import Registry
from tasks.servable import version_of
from tests.releases import release, stand_in_model
from tests.serving.conftest import MODEL, SIGNER, backend, chat, digest

PUBLIC = {"/health", "/ready", "/metrics"}


def endpoints(app) -> list[tuple[str, str]]:
    """(method, concrete path) of every route of the app, path parameters filled with MODEL."""
    found = []
    for route in app.routes:
        assert isinstance(route, Route), (
            f"{route!r}: only plain routes are enumerated; extend this test"
        )
        path = re.sub(r"\{[^}]+\}", MODEL, route.path)
        found += [(method, path) for method in sorted(route.methods - {"HEAD"})]
    return found


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def is_error(response, status: int) -> bool:
    return response.status_code == status and bool(response.json()["error"]["message"])


@pytest.fixture
def client(mock, keys, home):
    _, url = mock
    app = build_app(keys.config([backend(url, "1")]), home)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield app, client


def test_every_route_needs_a_key_except_the_public_probes(client, keys):
    app, c = client
    routes = endpoints(app)
    assert {p for _, p in routes} >= PUBLIC | {"/v1/chat/completions", "/admin/routes"}
    answered = set()
    for method, path in routes:
        for headers in (
            {},
            bearer("sk-not-a-key"),
            {"api-key": "sk-not-a-key"},
            {"Authorization": "Basic x"},
        ):
            r = c.request(method, path, headers=headers)
            if r.status_code < 400:
                answered.add(path)
            else:
                assert is_error(r, 401), (method, path, headers, r.status_code, r.text)
    assert answered == PUBLIC  # a new public route must be added to PUBLIC on purpose


def test_admin_routes_take_only_the_admin_token_and_v1_only_tenant_keys(client, keys):
    app, c = client
    for method, path in endpoints(app):
        if path in PUBLIC:
            continue
        tenant = c.request(method, path, headers=bearer(keys.key("alice")))
        admin = c.request(method, path, headers=bearer(keys.admin))
        if path.startswith("/admin/"):
            assert is_error(tenant, 403), (method, path, tenant.text)
            assert admin.status_code not in (401, 403), (method, path, admin.text)
        else:
            assert is_error(admin, 401), (method, path, admin.text)
            assert tenant.status_code not in (401, 403), (method, path, tenant.text)


@pytest.mark.parametrize(
    "path",
    [
        "/v1/models/",
        "//v1/models",
        "/v1//chat/completions",
        "/V1/models",
        "/v1/models/%2e%2e/%2e%2e/admin/routes",
        "/admin/routes/",
        "//admin/routes",
        "/admin//routes",
        "/ADMIN/routes",
        "/admin/routes/..%2F..%2Fhealth",
        "/health/../admin/routes",
        "/metrics/../admin/routes",
    ],
)
def test_path_tricks_do_not_get_past_auth(client, path):
    _, c = client
    for method in ("GET", "POST", "PUT"):
        r = c.request(method, path)
        assert r.status_code in (401, 404, 405) and r.json()["error"]["message"], (
            method,
            path,
            r.text,
        )


# ---- secrets at rest and in logs -----------------------------------------------------------------


def start_gateway(config: Path, port: int, log: Path, home: Path) -> subprocess.Popen:
    env = {**os.environ, "SLIPWAY_HOME": str(home), "PYTHONPATH": str(REPO)}
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flows.cli",
                "gateway",
                "--config",
                str(config),
                "--port",
                str(port),
                "--log-level",
                "debug",
            ],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, (
            f"gateway exited with {proc.returncode}: {log.read_text()[-2000:]}"
        )
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "gateway did not answer /health in 60 s"
        time.sleep(0.2)


def test_no_key_or_token_in_any_file_or_log_of_a_gateway_run(home, mock, tmp_path):
    """The real gateway process at debug log level, config and secrets made by `make up`'s code."""
    _, url = mock
    version = release(home, MODEL, stand_in_model(tmp_path / "m", b"champion"))
    champion = version_of(Registry(home), MODEL, version)
    port = free_port()
    config = write_gateway_config(home, [Backend(champion, (url,))], port)
    key, admin = home.demo_key.read_text().strip(), home.admin_token.read_text().strip()
    assert key_hash(key) in config.read_text() and key_hash(admin) in config.read_text()
    near = key[:-1] + ("A" if key[-1] != "A" else "B")  # one character off the real key
    wrong = ["sk-slipway-" + "x" * 43, "sk-wrong-secret-value", near, admin + "0"]

    # The made-up backend below is signed by the tests' key: trusted the way a rotated key is.
    shutil.copyfile(SIGNER.public_key, home.keys / "trusted" / "tests.pub")
    proc = start_gateway(config, port, home.logs / "gateway.log", home.root)
    try:
        base = f"http://127.0.0.1:{port}"
        body = chat(model=MODEL)
        assert (
            httpx.post(f"{base}/v1/chat/completions", json=body, headers=bearer(key)).status_code
            == 200
        )
        s = httpx.post(
            f"{base}/v1/chat/completions", json={**body, "stream": True}, headers={"api-key": key}
        )
        assert s.status_code == 200
        for token in wrong:
            assert (
                httpx.post(
                    f"{base}/v1/chat/completions", json=body, headers=bearer(token)
                ).status_code
                == 401
            )
            assert httpx.get(f"{base}/admin/routes", headers=bearer(token)).status_code == 401
        assert httpx.get(f"{base}/admin/routes", headers=bearer(key)).status_code == 403
        assert (
            httpx.post(f"{base}/v1/completions", json=body, headers=bearer(admin)).status_code
            == 401
        )
        dead = {
            "backends": [
                {**backend(f"http://127.0.0.1:{free_port()}", "2"), "expected_digest": digest("2")}
            ]
        }
        assert (
            httpx.put(f"{base}/admin/routes/dead", json=dead, headers=bearer(admin)).status_code
            == 200
        )
        assert (
            httpx.post(
                f"{base}/v1/chat/completions", json=chat(model="dead"), headers=bearer(key)
            ).status_code
            == 502
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)

    log = (home.logs / "gateway.log").read_text()
    # The scan below reads the gateway's real log, of a clean shutdown (uvicorn re-raises SIGTERM).
    assert "route 'dead' set" in log and "Application shutdown complete" in log
    assert (home.logs / "gateway-usage.sqlite").is_file()
    secrets = [key, admin, *wrong]
    for path in sorted(
        p
        for p in home.root.rglob("*")
        if p.is_file() and "envs" not in p.relative_to(home.root).parts
    ):
        data = path.read_bytes()
        for secret in secrets:
            if secret.encode() in data:
                # Only a secret's own file may hold it: nothing else in it, readable by the owner
                # only.
                assert data.decode().strip() == secret, f"{secret[:12]}... found in {path}"
                assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
