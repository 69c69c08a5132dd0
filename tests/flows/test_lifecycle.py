"""The lifecycle users live in, on the tiny model: the second release must be as safe as the first.

Release r1 (its base becomes champion), release r2 of the same model with the same variant label
but other bytes, roll r2 out and promote it, revert to r1, restart the gateway, back up and
restore into a fresh home, and serve from there. Both releases go into the store and the registry
through the functions the release flow calls (tests/flows/test_release.py runs the flow itself,
trials included), so that the one real vLLM start here is the last serve; the rollout and the
revert run against the mock upstream."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from configs.home import Home
from evaluation.benchmarks.mock_upstream import Fault, MockUpstream, serve
from flows.revert import revert
from flows.rollout import rollout
from serving.gateway.app import build_app
from serving.processes import free_port
from serving.stack.operator import down, up
from tasks.backup import backup, restore
from tasks.manifest import Manifest, hash_dir
from tasks.registry import Registry, first_champion
from tasks.servable import check_servable, version_of
from tasks.signing import trusted
from tasks.store import Store
from tests.conftest import make_home
from tests.flows.test_rollout import BASE_DELAY_S, CHUNK_DELAY_S, Stage, traffic
from tests.releases import attestation_of
from tests.releases import release as register
from tests.serving.conftest import MODEL, Secrets

CONFIG = """\
name: {name}
source: {source}
variants: [{{recipe: bf16}}]
smoke: {{prompt: "The capital of France is", expect: Paris}}
serving: {{engine_args: [--max-model-len, "256"]}}
evaluation:
  suites: [slipway_perplexity_quick]
  limit: 2
  loadgen: {{mode: synchronous, num_prompts: 2, warmup: 0, max_tokens: 4, max_prompt_chars: 200}}
gates: {{min_recovery: 0.5, max_perplexity_increase: 1.0}}
"""
POLICY = {
    "steps": [20, 50, 100],
    "min_samples": 60,
    "max_seconds": 40,
    "look_interval_s": 0.1,
    "on_inconclusive": "rollback",
    "slos": {"ttft_p99_s": None, "error_rate": None},
}


def config(tmp_path: Path, source: Path, name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(CONFIG.format(name=MODEL, source=source))
    return path


def stock_cli_verifies(home: Home, registry: Registry, version: str) -> None:
    tags = registry.tags(MODEL, version)
    entry = Store(home, MODEL).entry(tags["digest"])
    public = trusted(home) / f"{tags['signing_key_fingerprint'].removeprefix('sha256:')}.pub"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "model_signing",
            "verify",
            "key",
            str(entry.weights),
            "--signature",
            str(entry.signature),
            "--public_key",
            str(public),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def usage_rows(home: Home) -> int:
    with sqlite3.connect(home.logs / "gateway-usage.sqlite") as db:
        return db.execute("SELECT COUNT(*) FROM gateway_usage").fetchone()[0]


@pytest.mark.slow
def test_the_second_release_is_as_safe_as_the_first(
    prefect_server, home, tiny_model, tmp_path, monkeypatch
):
    monkeypatch.setenv("SLIPWAY_HARDWARE", "cpu")
    registry, store = Registry(home), Store(home, MODEL)

    # r1: its bf16 base is champion at release.
    v1 = register(home, MODEL, tiny_model, "bf16")
    assert first_champion(registry, MODEL, [v1]) == v1
    d1 = registry.tags(MODEL, v1)["digest"]
    assert registry.alias(MODEL, "champion") == v1
    r1_files = Manifest.read(store.entry(d1).manifest).files
    # r2: the same model and variant label, other bytes (a changed generation config).
    r2 = Path(shutil.copytree(tiny_model, tmp_path / "r2"))
    generation = r2 / "generation_config.json"
    generation.write_text(json.dumps({"max_new_tokens": 24, "release": "r2"}))
    v2 = register(home, MODEL, r2, "bf16")
    d2 = registry.tags(MODEL, v2)["digest"]
    assert d2 != d1 and store.label("bf16") == d2
    assert hash_dir(store.entry(d1).weights) == r1_files  # r1's files untouched
    assert registry.alias(MODEL, "champion") == v1
    check_servable(version_of(registry, MODEL, v1))  # what `make up` checks: still servable

    # Roll r2 out against r1 (the mock upstream serves both) and promote it; then revert.
    keys = Secrets()
    monkeypatch.setenv("SLIPWAY_ADMIN_TOKEN", keys.admin)
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump(POLICY))
    upstream = MockUpstream(chunks=4, chunk_delay_s=CHUNK_DELAY_S)
    upstream.record = False
    for v in (v1, v2):
        upstream.faults[f"{MODEL}-v{v}"] = Fault(delay_s=BASE_DELAY_S)
    with serve(upstream) as upstream_url:
        backend = {
            "version": v1,
            "url": upstream_url,
            "served_model": f"{MODEL}-v{v1}",
            "digest": d1,
            "attestation": attestation_of(home, MODEL, v1),
            "weight": 100,
            "role": "stable",
        }
        config_ = keys.config([backend], tenants=[keys.tenant("alice")])
        with serve(build_app(config_, home)) as gateway_url:
            stage = Stage(
                home,
                registry,
                upstream,
                upstream_url,
                gateway_url,
                keys.key("alice"),
                v1,
                v2,
                _admin=keys.admin,
            )
            with traffic(stage) as statuses:
                assert rollout(MODEL, v2, str(policy), gateway_url, upstream_url) == "promoted"
                assert (registry.alias(MODEL, "champion"), registry.alias(MODEL, "previous")) == (
                    v2,
                    v1,
                )
                assert revert(MODEL, "r2 answers worse", gateway_url, upstream_url) == "reverted"
            assert statuses and set(statuses) == {200}  # no client saw the moves
        served = usage_rows(home)
        # Restart the gateway on its start-up config (which names only r1): it serves what the
        # state store says, i.e. r1 after the revert, verified.
        with serve(build_app(config_, home)) as gateway_url:
            route = httpx.get(f"{gateway_url}/admin/routes/{MODEL}", headers=stage.admin).json()
    assert [(b["version"], b["digest"], b["role"]) for b in route["backends"]] == [
        (v1, d1, "stable")
    ]
    assert registry.alias(MODEL, "champion") == v1 and registry.alias(MODEL, "previous") == v2
    history = [h["version"] for h in registry.alias_history(MODEL, "champion")]
    assert history == [v1, v2, v1]  # what served when
    for version in (v1, v2):  # every registered version verifies with the stock CLI
        stock_cli_verifies(home, registry, version)

    # Back up, restore into a fresh home and serve from there with a real vLLM.
    backup(home, tmp_path / "backup")
    fresh = make_home(tmp_path / "fresh")
    monkeypatch.setenv("SLIPWAY_HOME", str(fresh.root))
    restore(tmp_path / "backup", fresh)
    assert usage_rows(fresh) == served  # the usage history is complete
    configs = tmp_path / "configs"
    configs.mkdir()
    config(configs, tiny_model, MODEL)
    said: list[str] = []
    mlflow_port, gateway_port = free_port(), free_port()
    try:
        up(fresh, mlflow_port, gateway_port, configs, said.append)
        gateway = f"http://127.0.0.1:{gateway_port}"
        admin = {"Authorization": f"Bearer {fresh.admin_token.read_text().strip()}"}
        route = httpx.get(f"{gateway}/admin/routes/{MODEL}", headers=admin).json()
        assert [(b["version"], b["digest"]) for b in route["backends"]] == [(v1, d1)]
        reply = httpx.post(
            f"{gateway}/v1/completions",
            headers={"Authorization": f"Bearer {fresh.demo_key.read_text().strip()}"},
            json={"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4},
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
        assert any(f"checked:  {MODEL} v{v1}" in line and d1 in line for line in said), said
    finally:
        down(fresh, 20, said.append)
