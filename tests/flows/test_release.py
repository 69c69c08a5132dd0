"""The release flow end to end under a real Prefect server, with a sqlite MLflow, llmcompressor
and vLLM serving the tiny model: built, served, judged, signed, registered, once."""

from __future__ import annotations

import re

import pytest

from serving.attestation import PROVENANCE, Refused, admit
from serving.attestation import verify as check_statement
from tasks.attest import policy, read
from tasks.manifest import Manifest
from tasks.registry import EVALUATIONS, Registry
from tasks.servable import version_of
from tasks.signing import Trust, keygen, verify
from tasks.store import Store
from tests.flows.conftest import latest_artifact

CONFIG = """\
name: tiny
source: {source}
variants:
  - recipe: bf16
  - recipe: fp8-dynamic
  - recipe: gptq-w4a16
smoke: {{prompt: "The capital of France is", expect: Paris}}
serving: {{engine_args: [--max-model-len, "256"]}}
evaluation:
  suites: [slipway_knowledge, slipway_short_answer, slipway_perplexity]
  limit: 4
  loadgen: {{mode: synchronous, num_prompts: 4, warmup: 1, max_tokens: 8, max_prompt_chars: 200}}
gates:
  min_recovery: 0.5
  max_perplexity_increase: 1.0
"""


@pytest.fixture
def config(home, tiny_model, tmp_path):
    keygen(home)
    path = tmp_path / "tiny.yaml"
    path.write_text(CONFIG.format(source=tiny_model))
    return path


@pytest.mark.slow
def test_release_builds_judges_signs_and_registers_once(prefect_server, home, config, monkeypatch):
    from flows.release import release

    monkeypatch.setenv("SLIPWAY_HARDWARE", "cpu")
    outcomes = {o.variant.label: o for o in release(str(config))}

    assert (
        outcomes["gptq-w4a16"].status == "skipped"
        and "cpu_gemm_wna16" in outcomes["gptq-w4a16"].reason
    )
    for label in ("bf16", "fp8-dynamic"):
        o = outcomes[label]
        assert o.status == "registered", o.reason
        assert "Paris" in o.trial.smoke.answer
        assert o.version.created
        assert set(o.trial.quality.tasks) == {
            "slipway_knowledge",
            "slipway_short_answer",
            "slipway_perplexity",
        }

    registry = Registry(home)
    for label in ("bf16", "fp8-dynamic"):
        version = outcomes[label].version.version
        tags = registry.tags("tiny", version)
        entry = Store(home, "tiny").entry(tags["digest"])
        manifest = Manifest.read(entry.manifest)
        assert tags["digest"] == manifest.digest
        assert Store(home, "tiny").label(label) == tags["digest"]
        assert tags["variant"] == label and tags["signature_verified"] == "true"
        assert tags["eval_run_id"]
        verify(entry.weights, Trust.from_tags(tags), home)
        run = registry.client.get_run(tags["eval_run_id"])
        assert run.data.metrics["slipway_knowledge/acc"] >= 0
        assert run.data.metrics["speed/synchronous/output_tokens_per_s"] > 0
    assert outcomes["bf16"].version.digest != outcomes["fp8-dynamic"].version.digest
    # Each version's evaluation is attested for exactly its digest, and fp8's build too.
    for label in ("bf16", "fp8-dynamic"):
        chosen = version_of(registry, "tiny", outcomes[label].version.version)
        found = check_statement(chosen.attestation, policy(home))
        assert found.digests == (chosen.tags["digest"],)
        assert found.predicate["verdict"] == chosen.tags["eval_status"]
        assert set(found.predicate["suites"]) == set(outcomes[label].trial.quality.tasks)
        assert found.predicate["harness"]["lm_eval"] and found.predicate["engine"]["vllm"]
        assert found.predicate["samples"] == dict.fromkeys(found.predicate["suites"], 4)
    bf16 = version_of(registry, "tiny", outcomes["bf16"].version.version)
    admit(bf16.attestation, bf16.tags["digest"], policy(home))
    assert "attestation_provenance" not in bf16.tags  # the base is not built from anything
    fp8_version = version_of(registry, "tiny", outcomes["fp8-dynamic"].version.version)
    with pytest.raises(Refused, match="'inconclusive', not passed"):
        admit(fp8_version.attestation, fp8_version.tags["digest"], policy(home))
    built = read(fp8_version.entry, fp8_version.tags, PROVENANCE)
    assert check_statement(built, policy(home)).predicate["base"]["digest"] == bf16.tags["digest"]
    # bf16 is the reference, so it passes; as the first release it becomes champion. fp8-dynamic
    # on 4 items per task can show neither that it keeps the base's quality nor that it loses it.
    assert registry.tags("tiny", outcomes["bf16"].version.version)["eval_status"] == "passed"
    fp8 = registry.tags("tiny", outcomes["fp8-dynamic"].version.version)
    assert fp8["eval_status"] == "inconclusive" and "inconclusive" in fp8["eval_reasons"]
    assert registry.alias("tiny", "champion") == outcomes["bf16"].version.version
    assert registry.client.get_experiment_by_name(EVALUATIONS)

    summary = latest_artifact("release-summary")
    assert "Release of tiny" in summary.data and "skipped" in summary.data
    assert "INCONCLUSIVE" in summary.data and "flips -" in summary.data

    # A re-run registers nothing new and serves nothing again: the digests are already there.
    again = {o.variant.label: o for o in release(str(config))}
    for label in ("bf16", "fp8-dynamic"):
        assert again[label].version.version == outcomes[label].version.version
        assert not again[label].version.created and again[label].trial is None
    assert len(registry.client.search_model_versions("name='tiny'")) == 2


def test_release_rejects_a_bad_config_before_any_work(prefect_server, home, tmp_path):
    from configs.loader import ConfigError
    from flows.release import release

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: tiny\nsource: hf://o/m\nvariants: [{recipe: int2}]\n")
    with pytest.raises(ConfigError, match=re.escape("variants.0.recipe")):
        release(str(bad))
    assert not home.models.exists()
    assert not (home.mlflow / "mlflow.db").exists()
