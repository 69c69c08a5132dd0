"""The release flow end to end under a real Prefect server with a sqlite MLflow."""

from __future__ import annotations

import pytest

from tasks.hub import Manifest
from tasks.registry import Registry
from tasks.signing import keygen, verify
from configs.models import Signing


@pytest.fixture
def config(home, tiny_model, tmp_path):
    keygen(home)
    path = tmp_path / "tiny.yaml"
    path.write_text(f"name: tiny\nsource: {tiny_model}\nvariants:\n  - recipe: bf16\n")
    return path


def test_release_registers_a_signed_version_once(prefect_server, home, config):
    from prefect.client.orchestration import get_client
    from flows.release import release

    first = release(str(config))
    again = release(str(config))

    assert [(r.version, r.created) for r in first] == [("1", True)]
    assert [(r.version, r.created) for r in again] == [("1", False)]  # re-running adds no version
    registry = Registry(home)
    tags = registry.tags("tiny", "1")
    weights = home.models / "tiny" / "bf16" / "weights"
    manifest = Manifest.read(weights.parent / "manifest.json")
    assert tags["digest"] == manifest.digest == first[0].digest
    assert tags["revision"] == manifest.revision and tags["variant"] == "bf16"
    assert tags["signature_verified"] == "true" and tags["signer"].startswith("key:sha256:")
    verify(weights, Signing(), home)
    assert len(registry.client.search_model_versions("name='tiny'")) == 1

    with get_client(sync_client=True) as client:
        artifact = client.read_latest_artifacts(limit=5)
    summary = next(a for a in artifact if a.key == "release-summary")
    assert "Release of tiny" in summary.data and "already registered" in summary.data


def test_release_rejects_a_bad_config_before_any_work(prefect_server, home, tmp_path):
    from configs.loader import ConfigError
    from flows.release import release

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: tiny\nsource: hf://o/m\nvariants: [{recipe: int2}]\n")
    with pytest.raises(ConfigError, match="variants.0.recipe"):
        release(str(bad))
    assert not home.models.exists()
    assert not (home.mlflow / "mlflow.db").exists()
