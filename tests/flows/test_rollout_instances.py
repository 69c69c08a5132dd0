"""The two-gateway rollout: two `slipway gateway` processes behind one port (SO_REUSEPORT), with
the routes in a shared state store and limits in Redis, and the rollout flow driving them as it
drives one (the mock upstream stands in for vLLM). The client's traffic is spread over both; each
step is decided on the statistics of both, and the evidence the rollout recorded per arm is
exactly what the client counted.

So that the counts can be compared exactly, the client sends one request at a time and stops when
the canary has served the step's min_samples: the analysis cannot decide before (it needs that
many canary requests) and is lenient enough to decide then, so every step is decided at a look
that saw all of the step's traffic and nothing else. It starts a step only once both instances
serve its weights, in a window of their own that starts empty."""

# redis_prefix, a fixture of tests/serving/conftest.py, is imported by name and taken by it.
# ruff: noqa: F811

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path

import mlflow
import pytest
import yaml

from evaluation.benchmarks.mock_upstream import Fault, MockUpstream, serve
from flows.rollout import rollout
from serving.gateway.auth import key_hash
from tasks.registry import Registry
from tasks.rollout.history import ROLLOUTS
from tests.flows.test_rollout import registered
from tests.releases import stable_backend
from tests.serving.conftest import MODEL, REDIS_URL, Secrets, redis_prefix  # noqa: F401
from tests.serving.instances import fresh, stats, together, two_gateways

MIN_SAMPLES = 30


@pytest.fixture
def policy(tmp_path) -> Path:
    """Steps of 20% and 50%, each decided at its MIN_SAMPLES-th canary request: margins and the
    error-rate tolerance wide, so an identical canary is shown not worse by then."""
    path = tmp_path / "policy.yaml"
    rules = {
        "steps": [20, 50, 100],
        "min_samples": MIN_SAMPLES,
        "max_seconds": 120,
        "look_interval_s": 0.1,
        "on_inconclusive": "rollback",
        "slos": {"ttft_p99_s": None, "error_rate": None},
        "analysis": {
            "burn_in": 10,
            "error_rate_tolerance": 0.5,
            "margins": {"ttft": 1.0, "tpot": 1.0, "e2e": 1.0},
        },
    }
    path.write_text(yaml.safe_dump(rules))
    return path


def step_traffic(
    base: str, keys: Secrets, weight: float, flow: threading.Thread
) -> tuple[Counter, dict[str, int]]:
    """Wait until both instances serve the canary at `weight` in fresh windows; then one request
    at a time, each on a new connection, until the canary has served MIN_SAMPLES. The requests
    per (version, ok) the client saw, and each instance's requests seen along the way."""
    with fresh(base, keys.admin) as admin, fresh(base, keys.key("alice")) as client:
        while True:
            snapshot = stats(admin)
            weights = {b["role"]: b["weight"] for b in snapshot["backends"]}
            if together(snapshot) and weights.get("canary") == weight:
                break
            assert flow.is_alive(), "the rollout ended before this step"
            time.sleep(0.05)
        assert all(b["requests"] == 0 for b in snapshot["backends"])  # a new window on both
        seen: Counter[tuple[str, bool]] = Counter()
        per_instance: Counter[str] = Counter()
        canary = {b["version"] for b in snapshot["backends"] if b["role"] == "canary"}
        while sum(n for (version, _), n in seen.items() if version in canary) < MIN_SAMPLES:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
            with client.stream(
                "POST", "/v1/chat/completions", json=body | {"max_tokens": 4, "stream": True}
            ) as r:
                ok = r.status_code == 200 and '"error"' not in "".join(r.iter_text())
                seen[r.headers["x-slipway-backend"], ok] += 1
            if sum(seen.values()) % 10 == 0:  # which instances serve, along the way
                for i in stats(admin)["instances"]:
                    per_instance[i["id"]] = max(per_instance[i["id"]], i["requests"])
    return seen, dict(per_instance)


def test_a_rollout_across_two_gateways_records_what_the_clients_counted(
    home, tmp_path, monkeypatch, prefect_server, redis_prefix, policy
):
    registry = Registry(home)
    stable = registered(home, tmp_path, b"stable", "bf16")
    registry.promote(MODEL, stable)
    candidate = registered(home, tmp_path, b"candidate", "gptq-w8a8")
    upstream = MockUpstream(chunks=4, chunk_delay_s=0.003)
    upstream.record = False
    for version in (stable, candidate):
        upstream.faults[f"{MODEL}-v{version}"] = Fault(delay_s=0.01)
    keys = Secrets()
    monkeypatch.setenv("SLIPWAY_ADMIN_TOKEN", keys.admin)
    with serve(upstream) as upstream_url:
        route = {
            "model": MODEL,
            "backends": [stable_backend(home, MODEL, stable, upstream_url)],
        }
        config = {
            "admin_token_sha256": key_hash(keys.admin),
            "routes": [route],
            # Limits in Redis, shared by both instances (alice's is never reached).
            "tenants": [keys.tenant("alice", rpm=100_000)],
            "redis_url": REDIS_URL,
            "redis_prefix": redis_prefix,
            "state": {"url": REDIS_URL, "redis_prefix": redis_prefix, "poll_interval_s": 0.05},
            "instances": {"heartbeat_s": 0.5},
        }
        with two_gateways(config, tmp_path, keys.admin) as base:
            result: list[str] = []
            flow = threading.Thread(
                target=lambda: result.append(
                    rollout(MODEL, candidate, str(policy), base, upstream_url)
                )
            )
            flow.start()
            counted = [step_traffic(base, keys, weight, flow) for weight in (20.0, 50.0)]
            flow.join(120)
    assert result == ["promoted"], registry.tags(MODEL, candidate)["rollout_reason"]
    experiment = registry.client.get_experiment_by_name(ROLLOUTS)
    [run_] = registry.client.search_runs([experiment.experiment_id])
    evidence = json.loads(
        Path(
            mlflow.artifacts.download_artifacts(
                run_id=run_.info.run_id, artifact_path="evidence.json", tracking_uri=registry.uri
            )
        ).read_text()
    )
    assert [s["weight"] for s in evidence["steps"]] == [20, 50]
    for step, (seen, instances) in zip(evidence["steps"], counted, strict=True):
        # Both instances served the step's traffic.
        assert len(instances) == 2 and all(n > 0 for n in instances.values()), instances
        assert step["by"] == "analysis" and step["action"] == "advance", step["reason"]
        [errors] = [t for t in step["analysis"]["tests"] if t["metric"] == "error_rate"]
        recorded = {
            stable: (errors["n_stable"], round(errors["stable"] * errors["n_stable"])),
            candidate: (errors["n_canary"], round(errors["canary"] * errors["n_canary"])),
        }
        client = {v: (seen[v, True] + seen[v, False], seen[v, False]) for v in (stable, candidate)}
        assert recorded == client, (step["reason"], seen)
        assert client[candidate] == (MIN_SAMPLES, 0)
