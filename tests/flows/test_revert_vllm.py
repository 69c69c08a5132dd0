"""The revert with a cold vLLM start, timed: the champion (served by the mock upstream) misbehaves,
its `previous` (the tiny model, its vLLM stopped at promotion as always) is verified, started,
health-checked and swapped in. The seconds of each stage and the new vLLM's resident memory are
printed; `make stress` runs it (one vLLM start)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import mlflow
import psutil
import pytest

from evaluation.benchmarks.mock_upstream import MockUpstream, serve
from flows.revert import revert
from serving.gateway.app import build_app
from serving.processes import members, read_state
from tasks.engines import stop_version
from tasks.registry import Registry
from tests.flows.killing import routed
from tests.flows.test_rollout import Stage, registered, traffic
from tests.releases import attestation_of, release
from tests.serving.conftest import MODEL, Secrets

pytestmark = pytest.mark.stress


def rss_gb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total / 1e9


@pytest.mark.timeout(1200)
def test_a_revert_with_a_cold_vllm_start(
    home, tiny_model_source, tmp_path, monkeypatch, prefect_server
):
    registry = Registry(home)
    previous = release(home, MODEL, tiny_model_source, "bf16")
    champion = registered(home, tmp_path, b"misbehaving", "fp8-dynamic")
    registry.promote(MODEL, previous)
    registry.promote(MODEL, champion)
    keys = Secrets()
    monkeypatch.setenv("SLIPWAY_ADMIN_TOKEN", keys.admin)
    upstream = MockUpstream(chunks=4)
    upstream.record = False
    engine = f"vllm {MODEL}-v{previous}"
    with serve(upstream) as upstream_url:
        backend = {
            "version": champion,
            "url": upstream_url,
            "served_model": f"{MODEL}-v{champion}",
            "digest": registry.tags(MODEL, champion)["digest"],
            "attestation": attestation_of(home, MODEL, champion),
            "weight": 100,
            "role": "stable",
        }
        config = keys.config([backend], tenants=[keys.tenant("alice")])
        with serve(build_app(config, home)) as gateway_url:
            stage = Stage(
                home,
                registry,
                upstream,
                upstream_url,
                gateway_url,
                keys.key("alice"),
                previous,
                champion,
                _admin=keys.admin,
            )
            try:
                with traffic(stage, stream=False) as statuses:
                    start = time.monotonic()
                    assert revert(MODEL, "answers look off", gateway_url) == "reverted"
                    wall = time.monotonic() - start
                [vllm] = [p for p in read_state(home) if p.what == engine]
                memory = rss_gb(members(vllm))
                assert routed(stage) == [(previous, "stable", 100.0)]
                assert registry.alias(MODEL, "champion") == previous
            finally:
                stop_version(home, engine)
    run_id = registry.tags(MODEL, champion)["revert_run_id"]
    evidence = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="evidence.json", tracking_uri=registry.uri
    )
    seconds = json.loads(Path(evidence).read_text())["seconds"]
    print(f"revert, cold vLLM start: {wall:.1f} s wall; stages {seconds}; vLLM RSS {memory:.2f} GB")
    assert seconds["serve"] > 0 and set(statuses) == {200}
