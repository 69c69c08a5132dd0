"""Tenants and keys by the admin API on running gateways: a key issued, revoked, rotated or expired
through one instance is applied by another on the same store within a second; a revocation
outlives a restart with the config that seeded the key; admins are held to their roles; every
change is in the audit log with its admin, and no secret or hash ever is."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable

import httpx
import pytest
from click.testing import CliRunner

from evaluation.benchmarks.mock_upstream import serve
from flows.cli import cli
from serving.gateway.app import build_app
from serving.gateway.audit import AuditLog
from serving.gateway.auth import key_hash
from serving.gateway.errors import Unavailable
from serving.gateway.state import default_path
from serving.gateway.state.migrations import RECORDS
from serving.gateway.state.store import StoreUnavailable
from tests.serving.conftest import MODEL, backend, chat

FAST = {"poll_interval_s": 0.05}


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def status_within(check: Callable[[], int], expected: int, seconds: float = 1.0) -> float:
    """Seconds until `check()` returns `expected`; fails after `seconds`."""
    start = time.monotonic()
    while (got := check()) != expected:
        assert time.monotonic() - start < seconds, f"still {got} after {seconds} s"
        time.sleep(0.02)
    return time.monotonic() - start


def completion(base: str, key: str) -> int:
    return httpx.post(f"{base}/v1/chat/completions", json=chat(), headers=bearer(key)).status_code


@pytest.fixture
def two_gateways(mock, keys, home, state):
    """Two gateway instances on one state store (each kind), seeded with tenant alice."""
    _, url = mock
    config = keys.config([backend(url, "1")], state={**state, **FAST})
    with serve(build_app(config, home)) as a, serve(build_app(config, home)) as b:
        yield a, b, config


def test_a_key_issued_on_one_instance_works_on_the_other_and_revoking_it_stops_both(
    two_gateways, keys
):
    a, b, _ = two_gateways
    admin = bearer(keys.admin)
    r = httpx.put(f"{a}/admin/tenants/carol", json={"tier": "premium", "rpm": 100}, headers=admin)
    assert r.status_code == 200, r.text
    assert r.json()["tier"] == "premium"
    issued = httpx.post(f"{a}/admin/tenants/carol/keys", headers=admin).json()
    secret, key_id = issued["key"], issued["id"]
    assert secret.startswith("sk-slipway-") and "sha256" not in issued

    status_within(lambda: completion(b, secret), 200)
    listed = httpx.get(f"{b}/admin/keys", params={"tenant": "carol"}, headers=admin).json()
    assert [k["id"] for k in listed["keys"]] == [key_id]
    assert secret not in json.dumps(listed) and key_hash(secret) not in json.dumps(listed)

    r = httpx.post(f"{b}/admin/keys/{key_id}/revoke", headers=admin)
    assert r.status_code == 200 and r.json()["revoked_at"] is not None
    status_within(lambda: completion(a, secret), 401)
    refused = httpx.post(f"{a}/v1/chat/completions", json=chat(), headers=bearer(secret))
    assert f"API key {key_id} was revoked" in refused.json()["error"]["message"]
    assert completion(a, keys.key("alice")) == 200  # the seeded tenant is untouched


def test_a_shed_tier_is_refused_on_both_instances_until_restored_and_the_audit_says_who(
    two_gateways, keys, home
):
    a, b, config = two_gateways
    admin = bearer(keys.admin)
    for name, tier in (("bulk", "batch"), ("acme", "enterprise")):
        assert httpx.put(f"{a}/admin/tenants/{name}", json={"tier": tier}, headers=admin).is_success
    bulk = httpx.post(f"{a}/admin/tenants/bulk/keys", headers=admin).json()["key"]
    acme = httpx.post(f"{a}/admin/tenants/acme/keys", headers=admin).json()["key"]
    status_within(lambda: completion(b, bulk), 200)

    shed = {"seconds": 600, "reason": "incident: fast burn"}
    r = httpx.post(f"{a}/admin/tiers/batch/shed", json=shed, headers=admin)
    assert r.status_code == 200 and r.json()["by"] == "admin", r.text
    status_within(lambda: completion(b, bulk), 503)  # the other instance, within a poll
    refused = httpx.post(f"{b}/v1/chat/completions", json=chat(), headers=bearer(bulk))
    error = refused.json()["error"]
    assert error["code"] == "tier_shed" and "incident: fast burn" in error["message"]
    assert 590 <= int(refused.headers["retry-after"]) <= 600
    assert completion(b, acme) == 200 and completion(a, keys.key("alice")) == 200
    listed = httpx.get(f"{b}/admin/tiers", headers=admin).json()["sheds"]
    assert [(s["tier"], s["active"]) for s in listed] == [("batch", True)]
    assert "tier:batch" not in httpx.get(f"{b}/admin/tenants", headers=admin).text
    with serve(build_app(config, home)) as restarted:  # a fresh instance keeps it shed
        assert completion(restarted, bulk) == 503 and completion(restarted, acme) == 200

    assert httpx.post(f"{b}/admin/tiers/batch/restore", headers=admin).status_code == 200
    status_within(lambda: completion(a, bulk), 200)
    audit = httpx.get(f"{a}/admin/audit", params={"action": "tier."}, headers=admin).json()
    assert [(e["action"], e["target"], e["actor"]) for e in audit["records"]] == [
        ("tier.shed", "batch", "admin"),
        ("tier.restore", "batch", "admin"),
    ]
    bad = httpx.post(
        f"{a}/admin/tiers/batch/shed", json={"seconds": 0, "reason": ""}, headers=admin
    )
    assert bad.status_code == 400


def test_a_rotated_key_overlaps_for_the_stated_time_then_only_the_new_one_works(two_gateways, keys):
    a, b, _ = two_gateways
    admin = bearer(keys.admin)
    [seeded] = httpx.get(f"{a}/admin/keys", params={"tenant": "alice"}, headers=admin).json()[
        "keys"
    ]
    rotated = httpx.post(
        f"{a}/admin/keys/{seeded['id']}/rotate", json={"overlap_s": 1.5}, headers=admin
    ).json()
    new = rotated["new"]["key"]
    assert rotated["new"]["tenant"] == "alice" and rotated["old"]["expires_at"] is not None

    status_within(lambda: completion(b, new), 200)
    assert completion(b, keys.key("alice")) == 200  # both valid during the overlap
    waited = status_within(lambda: completion(b, keys.key("alice")), 401, seconds=3)
    assert waited > 0.5  # not cut short
    assert completion(a, new) == 200


def test_two_instances_changing_one_key_at_once_lose_neither_change(two_gateways, keys):
    a, b, _ = two_gateways
    admin = bearer(keys.admin)
    [seeded] = httpx.get(f"{a}/admin/keys", headers=admin).json()["keys"]
    later = time.time() + 3600

    async def both() -> list[int]:
        async with httpx.AsyncClient(headers=admin) as client:
            replies = await asyncio.gather(
                client.post(f"{a}/admin/keys/{seeded['id']}/revoke"),
                client.post(f"{b}/admin/keys/{seeded['id']}/expire", json={"expires_at": later}),
            )
        return [r.status_code for r in replies]

    assert asyncio.run(both()) == [200, 200]
    # each instance holds both changes once it has polled the store (within a second)
    deadline = time.monotonic() + 2
    while True:
        keys_seen = [httpx.get(f"{u}/admin/keys", headers=admin).json()["keys"] for u in (a, b)]
        done = all(k["revoked_at"] is not None and k["expires_at"] == later for [k] in keys_seen)
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert done, keys_seen


def test_an_expired_key_is_refused_saying_when(two_gateways, keys):
    a, b, _ = two_gateways
    admin = bearer(keys.admin)
    httpx.put(f"{a}/admin/tenants/dave", json={}, headers=admin).raise_for_status()
    issued = httpx.post(
        f"{a}/admin/tenants/dave/keys", json={"expires_at": time.time() + 0.8}, headers=admin
    ).json()
    status_within(lambda: completion(b, issued["key"]), 200)
    status_within(lambda: completion(b, issued["key"]), 401, seconds=2)
    message = httpx.post(
        f"{b}/v1/chat/completions", json=chat(), headers=bearer(issued["key"])
    ).json()["error"]["message"]
    assert f"API key {issued['id']} expired at" in message

    past = httpx.post(
        f"{a}/admin/tenants/dave/keys", json={"expires_at": time.time() - 1}, headers=admin
    )
    assert past.status_code == 400 and "expires_at must be in the future" in past.text


def test_a_money_budget_needs_a_chargeback_rate_for_the_tenant_or_its_tier(two_gateways, keys):
    a, _, _ = two_gateways
    admin = bearer(keys.admin)
    unpriced = httpx.put(
        f"{a}/admin/tenants/fay", json={"tier": "gold", "monthly_budget_usd": 5}, headers=admin
    )
    assert unpriced.status_code == 400
    assert unpriced.json()["error"]["param"] == "monthly_budget_usd"
    assert "no chargeback rate" in unpriced.text and "tier 'gold'" in unpriced.text
    assert "fay" not in {
        t["name"] for t in httpx.get(f"{a}/admin/tenants", headers=admin).json()["tenants"]
    }
    priced = httpx.put(  # the embedded pricing.yaml prices the standard tier
        f"{a}/admin/tenants/fay", json={"monthly_budget_usd": 5}, headers=admin
    )
    assert priced.status_code == 200 and priced.json()["monthly_budget_usd"] == 5


def test_a_revoked_key_stays_revoked_after_a_restart_and_a_new_config_key_is_added(
    mock, keys, home
):
    _, url = mock
    config = keys.config([backend(url, "1")])
    admin = bearer(keys.admin)
    with serve(build_app(config, home)) as base:
        [seeded] = httpx.get(f"{base}/admin/keys", headers=admin).json()["keys"]
        httpx.post(f"{base}/admin/keys/{seeded['id']}/revoke", headers=admin).raise_for_status()
    with serve(build_app(config, home)) as base:  # the config still names alice's key
        assert completion(base, keys.key("alice")) == 401
    # A key the store never held is added at start (`make up`'s fresh key after a restore).
    keys.keys["alice"] = "sk-test-new-alice-key-000000000000"
    renewed = keys.config([backend(url, "1")])
    with serve(build_app(renewed, home)) as base:
        assert completion(base, keys.key("alice")) == 200
        listed = httpx.get(f"{base}/admin/keys", headers=admin).json()["keys"]
    assert [k["revoked_at"] is not None for k in listed] == [True, False]


def test_admins_are_held_to_their_roles_and_named_in_the_audit_log(mock, keys, home):
    _, url = mock
    tokens = {"ops": "tok-ops-" + "o" * 20, "deploy": "tok-rollout-" + "r" * 20}
    tokens["audit"] = "tok-audit-" + "a" * 20
    admins = [
        {"id": "ops", "token_sha256": key_hash(tokens["ops"]), "role": "operator"},
        {"id": "deploy", "token_sha256": key_hash(tokens["deploy"]), "role": "rollout"},
        {"id": "audit", "token_sha256": key_hash(tokens["audit"]), "role": "auditor"},
    ]
    backends = [backend(url, "1"), backend(url, "2", role="canary", weight=0)]
    config = keys.config(backends, admins=admins)
    with serve(build_app(config, home)) as base:
        weights = {"weights": {"1": 90, "2": 10}}
        path = f"{base}/admin/routes/{MODEL}/weights"
        assert httpx.post(path, json=weights, headers=bearer(tokens["deploy"])).status_code == 200
        denied = httpx.put(f"{base}/admin/tenants/eve", json={}, headers=bearer(tokens["deploy"]))
        assert denied.status_code == 403 and "role rollout" in denied.text
        assert httpx.post(path, json=weights, headers=bearer(tokens["audit"])).status_code == 403
        r = httpx.put(
            f"{base}/admin/tenants/eve", json={"tpm": 5000}, headers=bearer(tokens["ops"])
        )
        assert r.status_code == 200
        issued = httpx.post(f"{base}/admin/tenants/eve/keys", headers=bearer(tokens["ops"])).json()
        httpx.post(
            f"{base}/admin/keys/{issued['id']}/rotate",
            json={"overlap_s": 60},
            headers=bearer(tokens["ops"]),
        ).raise_for_status()

        log = httpx.get(f"{base}/admin/audit", headers=bearer(tokens["audit"]))
        assert log.status_code == 200
        records = log.json()["records"]
        assert [(r["actor"], r["action"], r["target"]) for r in records] == [
            ("deploy", "route.weights", MODEL),
            ("ops", "tenant.put", "eve"),
            ("ops", "key.issue", issued["id"]),
            ("ops", "key.rotate", issued["id"]),
        ]
        [weights_change] = [r for r in records if r["action"] == "route.weights"]
        before = {b["version"]: b["weight"] for b in weights_change["before"]["backends"]}
        after = {b["version"]: b["weight"] for b in weights_change["after"]["backends"]}
        assert (before, after) == ({"1": 100, "2": 0}, {"1": 90, "2": 10})
        assert records[1]["before"] is None and records[1]["after"]["tpm"] == 5000
        assert all(r["request_id"] for r in records)
        only_keys = httpx.get(
            f"{base}/admin/audit", params={"action": "key."}, headers=bearer(tokens["audit"])
        ).json()["records"]
        assert [r["action"] for r in only_keys] == ["key.issue", "key.rotate"]

    # Nothing secret in the stored log: no key, token or hash of one, anywhere in the store.
    stored = sqlite3.connect(default_path(home)).execute(f"SELECT * FROM {RECORDS}").fetchall()
    audit_text = "\n".join(str(value) for row in stored if row[0] == "audit" for value in row)
    assert audit_text.count('"action"') == 4
    secrets = [*tokens.values(), issued["key"], keys.admin, keys.key("alice")]
    for secret in secrets:
        assert secret not in audit_text and key_hash(secret) not in audit_text


def test_the_cli_creates_a_tenant_issues_its_key_and_reads_the_audit_log(
    mock, keys, home, monkeypatch
):
    _, url = mock
    monkeypatch.setenv("SLIPWAY_ADMIN_TOKEN", keys.admin)
    runner = CliRunner()
    with serve(build_app(keys.config([backend(url, "1")]), home)) as base:

        def slipway(*args: str) -> str:
            result = runner.invoke(cli, [*args, "--gateway-url", base])
            assert result.exit_code == 0, result.output
            return result.output

        created = json.loads(slipway("tenants", "create", "frank", "--tier", "batch", "--rpm", "7"))
        assert (created["tier"], created["rpm"]) == ("batch", 7)
        issued = slipway("tenants", "issue-key", "frank")
        secret = issued.split(": ")[-1].strip()
        assert completion(base, secret) == 200
        key_id = issued.split()[1]
        slipway("tenants", "revoke", key_id)
        assert completion(base, secret) == 401
        lines = slipway("audit", "--actor", "admin").splitlines()
        assert [line.split()[3:5] for line in lines] == [
            ["tenant.put", "frank"],
            ["key.issue", key_id],
            ["key.revoke", key_id],
        ]
        unknown = runner.invoke(cli, ["tenants", "revoke", "key_nope", "--gateway-url", base])
        assert unknown.exit_code == 1 and "no API key 'key_nope'" in unknown.output


def test_a_change_the_audit_log_cannot_record_is_answered_as_made_but_unrecorded(caplog):
    class Down:
        where = "sqlite:///gone"

        async def version(self, namespace):
            raise StoreUnavailable("the gateway state store sqlite:///gone did not answer")

        write = version

    with pytest.raises(Unavailable) as raised:
        asyncio.run(AuditLog(Down()).record("ops", "key.revoke", "key_1", {}, {}, "req-1"))
    assert raised.value.code == "audit_unavailable"
    assert "the change was made, but the audit log could not record it" in str(raised.value)
    assert "key.revoke on key_1 by ops made, not recorded" in caplog.text
