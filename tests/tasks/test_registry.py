"""Registry: a logged model + model version per digest, never twice; aliases with history."""

from __future__ import annotations

import pytest

from tasks.registry import Registry


@pytest.fixture
def variant_dir(tmp_path):
    root = tmp_path / "v"
    (root / "weights").mkdir(parents=True)
    (root / "weights" / "model.safetensors").write_bytes(b"weights")
    (root / "manifest.json").write_text("{}")
    (root / "model.sig").write_text("sig")
    return root


def test_register_once_per_digest(home, variant_dir):
    registry = Registry(home)
    first = registry.register("m", variant_dir, "sha256:aa", {"variant": "bf16", "revision": "r1"})
    again = registry.register("m", variant_dir, "sha256:aa", {"variant": "bf16", "revision": "r1"})
    other = registry.register("m", variant_dir, "sha256:bb", {"variant": "fp8-dynamic"})

    assert first.created and not again.created and other.created
    assert again.version == first.version == "1" and other.version == "2"
    assert registry.tags("m", "1") == {"variant": "bf16", "revision": "r1", "digest": "sha256:aa"}
    versions = registry.client.search_model_versions("name='m'")
    assert len(versions) == 2
    model = registry.client.get_logged_model(first.model_id)
    assert model.model_type == "llm" and model.status.to_proto() == 2  # READY
    artifacts = {a.path for a in registry.client.list_logged_model_artifacts(first.model_id)}
    assert {"weights", "manifest.json", "model.sig"} <= artifacts


def test_aliases_and_history(home, variant_dir):
    registry = Registry(home)
    v1 = registry.register("m", variant_dir, "sha256:1", {}).version
    v2 = registry.register("m", variant_dir, "sha256:2", {}).version
    assert registry.alias("m", "champion") is None

    assert registry.promote("m", v1, reason="first release") is None
    assert registry.promote("m", v2, reason="canary passed") == v1
    assert registry.alias("m", "champion") == v2
    assert registry.alias("m", "previous") == v1
    history = registry.alias_history("m", "champion")
    assert [h["version"] for h in history] == [v1, v2]
    assert history[-1]["reason"] == "canary passed"
    assert registry.promote("m", v2) == v2  # already champion: nothing moves
    assert len(registry.alias_history("m", "champion")) == 2


def test_first_passed_version_becomes_champion_only_once(home, variant_dir):
    from tasks.registry import first_champion

    registry = Registry(home)
    failed = registry.register("m", variant_dir, "sha256:f", {"eval_status": "failed"}).version
    passed = registry.register("m", variant_dir, "sha256:p", {"eval_status": "passed"}).version
    later = registry.register("m", variant_dir, "sha256:l", {"eval_status": "passed"}).version

    assert first_champion(registry, "m", [failed, passed, later]) == passed
    assert registry.alias("m", "champion") == passed
    assert first_champion(registry, "m", [later]) is None  # later versions go through the rollout
    assert registry.alias("m", "champion") == passed
