"""The rollout end to end on the real parts: the flow starts the candidate's vLLM itself (the
launcher), adds it to a real gateway in front of the stable vLLM, mirrors stable's requests to it
in a shadow phase, drives labelled synthetic load through the gateway, judges it and promotes it
or rolls it back; the candidate's server is left to the stack.

All under configs/rollout/demo.yaml as `make demo` runs it: two vLLM engines on this 2-core
machine, the demo's margins. Each test is several minutes; `make stress` runs them.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pytest

from configs.gateway import GatewayConfig
from configs.home import REPO
from configs.models import Serving
from evaluation.benchmarks.mock_upstream import serve
from flows.rollout import rollout
from serving.gateway.app import build_app
from serving.gateway.auth import key_hash
from serving.processes import read_state
from serving.vllm import VLLMServer
from tasks.engines import stop_version
from tasks.registry import Registry
from tests.releases import release
from tests.serving.conftest import Secrets

DEMO_POLICY = str(REPO / "configs" / "rollout" / "demo.yaml")


@contextmanager
def stable_behind_gateway(home, registry: Registry, stable: str, monkeypatch) -> Iterator[str]:
    """The stable tiny model on vLLM behind a real gateway with a synthetic-load tenant."""
    keys = Secrets()
    monkeypatch.setenv("SLIPWAY_ADMIN_TOKEN", keys.admin)
    monkeypatch.setenv("SLIPWAY_SYNTHETIC_KEY", keys.key("load"))
    weights = home.models / "tiny" / "bf16" / "weights"
    with VLLMServer(weights, "tiny", home, Serving(), aliases=[f"tiny-v{stable}"]) as server:
        backend = {
            "version": stable,
            "url": server.url,
            "served_model": f"tiny-v{stable}",
            "digest": registry.tags("tiny", stable)["digest"],
            "verified": True,
            "weight": 100,
            "role": "stable",
        }
        config = GatewayConfig.model_validate(
            {
                "admin_token_sha256": key_hash(keys.admin),
                "routes": [{"model": "tiny", "backends": [backend]}],
                "tenants": [keys.tenant("load", synthetic=True)],
            }
        )
        with serve(build_app(config, home)) as gateway_url:
            yield gateway_url


def roll_out(home, gateway_url: str, label: str) -> tuple[str, str]:
    """Roll the newest version labelled `label` out under the demo policy; (outcome, version)."""
    registry = Registry(home)
    version = registry.versions("tiny", variant=label)[-1]
    try:
        return rollout("tiny", label, DEMO_POLICY, gateway_url), version
    finally:
        stale = [p.what for p in read_state(home) if p.what.startswith("vllm tiny-")]
        champion = registry.alias("tiny", "champion")
        for what in stale:  # the champion's engine serves the next rollout; the rest go
            if what != f"vllm tiny-v{champion}":
                stop_version(home, what)


def evidence(registry: Registry, version: str) -> dict:
    run_id = registry.tags("tiny", version)["rollout_run_id"]
    path = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="evidence.json", tracking_uri=registry.uri
    )
    return json.loads(Path(path).read_text())


@pytest.fixture
def champion(home, tiny_model_source) -> str:
    """The tiny model released and made champion: the stable of every rollout here."""
    stable = release(home, "tiny", tiny_model_source, "bf16")
    Registry(home).promote("tiny", stable)
    return stable


@pytest.mark.stress
def test_identical_weights_are_promoted_in_each_of_three_rollouts_under_the_demo_policy(
    home, tiny_model_source, champion, tmp_path, monkeypatch, prefect_server
):
    registry, stable = Registry(home), champion
    with stable_behind_gateway(home, registry, stable, monkeypatch) as gateway_url:
        for round_ in range(3):
            twin = shutil.copytree(tiny_model_source, tmp_path / f"twin-{round_}")
            (twin / "README.md").write_text(f"The same weights, release {round_}: an A/A.\n")
            release(home, "tiny", twin, "fp8-dynamic")  # the same weights under another digest
            outcome, version = roll_out(home, gateway_url, "fp8-dynamic")
            reason = registry.tags("tiny", version)["rollout_reason"]
            assert outcome == "promoted", f"round {round_ + 1}: {reason}"
            assert registry.alias("tiny", "champion") == version
            steps = evidence(registry, version)["steps"]
            assert [s["weight"] for s in steps] == [0, 25, 50]
            assert all(s["mirrored_pairs"] for s in steps)  # every step judged on pairs


@pytest.mark.stress
def test_a_canary_with_a_broken_chat_template_is_rolled_back_in_the_shadow_phase(
    home, tiny_model_source, champion, tmp_path, monkeypatch, prefect_server
):
    registry, stable = Registry(home), champion
    broken = shutil.copytree(tiny_model_source, tmp_path / "broken")
    config = json.loads((broken / "tokenizer_config.json").read_text())
    # The roles are gone: the model sees bare text it was never taught to answer in a chat.
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    (broken / "tokenizer_config.json").write_text(json.dumps(config))
    release(home, "tiny", broken, "fp8-dynamic")
    with stable_behind_gateway(home, registry, stable, monkeypatch) as gateway_url:
        outcome, version = roll_out(home, gateway_url, "fp8-dynamic")
    reason = registry.tags("tiny", version)["rollout_reason"]
    assert outcome == "rolled_back"
    assert reason.startswith("step 1 (shadow (mirrored copies only))"), reason
    assert "quality:" in reason and "degraded" in reason
    [shadow] = evidence(registry, version)["steps"]
    assert shadow["weight"] == 0  # no user ever reached it
    assert sum(p["degraded"] for p in shadow["mirrored_pairs"]) > len(shadow["mirrored_pairs"]) / 2
