"""The regression flow end to end under a real Prefect server, with a sqlite MLflow and the real
vLLM that the stack serves the tiny champion with (started once here and recorded as `make up`
records it): a first run with an empty ledger, then one against a seeded ledger that it must judge.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from configs.models import Serving
from evaluation.monitoring.regression import label
from serving.gateway.usage import UNBILLED, read_table
from serving.processes import Proc, start_time, write_state
from serving.vllm import VLLMServer, hardware_class
from tasks.registry import Registry
from tasks.regression import EVENT, EXPERIMENT, RegressionFound
from tasks.servable import champions
from tests.flows.conftest import latest_artifact, stored_events
from tests.releases import release, stand_in_model

CONFIG = """\
name: tiny
source: {source}
variants: [{{recipe: bf16}}]
serving: {{engine_args: [--max-model-len, "256"]}}
evaluation:
  suites: [slipway_knowledge, slipway_short_answer, slipway_perplexity]
  limit: 4
  loadgen: {{mode: synchronous, num_prompts: 4, warmup: 1, max_tokens: 8, max_prompt_chars: 200}}
"""
TTFT = "speed/synchronous/ttft_ms_p50"
PPL = "slipway_perplexity_quick/word_perplexity"


def regression_runs(registry: Registry) -> list:
    experiment = registry.client.get_experiment_by_name(EXPERIMENT)
    order = ["attributes.start_time"]
    return registry.client.search_runs([experiment.experiment_id], order_by=order)


# ~3.5 min on the shared 2-core machine (vLLM's start alone ~2.5 min under load): make stress.
@pytest.mark.stress
@pytest.mark.slow
def test_regression_flow_logs_the_ledger_and_fails_on_a_regression(
    prefect_server, home, tiny_model, tmp_path
):
    from flows.regression import regression

    registry = Registry(home)
    registry.promote("tiny", release(home, "tiny", tiny_model))
    [champion] = champions(registry)
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "tiny.yaml").write_text(CONFIG.format(source=tiny_model))
    weights = champion.weights
    serving = Serving(engine_args=["--max-model-len", "256"])

    # Served as `make up` serves it: the flow must measure this server and start none.
    with VLLMServer(weights, "tiny", home, serving, [champion.served_name]) as server:
        what, log = f"vllm {champion.served_name}", str(server.log_path)
        proc = Proc(
            what,
            server.pid,
            server.pid,
            server.port,
            server.url,
            "/health",
            log,
            start_time(server.pid),
        )
        write_state(home, [proc])

        [first] = regression("tiny", str(configs))
        assert first.status == "passed", first.reason
        assert {r.status for r in first.verdict.rows} == {"no-baseline"}
        [run] = regression_runs(registry)
        tags, metrics = run.data.tags, run.data.metrics
        assert tags["status"] == "passed" and tags["digest"] == champion.tags["digest"]
        assert tags["model"] == "tiny" and tags["version"] == champion.version
        assert tags["hardware"] == hardware_class() and tags["vllm_version"][0].isdigit()
        assert run.data.params["served_by"] == "stack" and run.data.params["url"] == server.url
        assert metrics[TTFT] > 0 and metrics[PPL] > 0 and "slipway_knowledge_quick/acc" in metrics
        assert "slipway_short_answer_quick/exact_match" in metrics
        # The load it put on the served engine is in the usage log, for the reconciliation.
        [load] = read_table(UNBILLED, 0, time.time() + 1).itertuples()
        assert (load.source, load.backend_version, load.tokens_from) == (
            "regression",
            champion.version,
            "unmetered",
        )
        assert load.latency_ms > 1000  # the whole run: a load profile and two quality suites

        # Three earlier nights with the same key: TTFT was 10x faster, perplexity twice as high.
        key = {k: tags[k] for k in ("model", "version", "digest", "vllm_version", "hardware")}
        seeded = metrics | {TTFT: metrics[TTFT] / 10, PPL: metrics[PPL] * 2}
        for night in range(3):
            registry.log_run(
                f"seeded-{night}",
                params={},
                metrics=seeded,
                tags=key | {"status": "passed"},
                artifacts=[],
                experiment=EXPERIMENT,
            )

        state = regression(None, str(configs), return_state=True)
    assert [p.name for p in home.logs.glob("*.log")] == [server.log_path.name]  # no second vLLM

    assert state.is_failed()
    with pytest.raises(RegressionFound, match=r"tiny v1 \(bf16\): regressed \(MLflow run \w+\): "):
        state.result()
    run = regression_runs(registry)[-1]
    assert run.data.tags["status"] == "regressed" and run.data.params["ledger_runs"] == "4"
    artifacts = {a.path for a in registry.client.list_artifacts(run.info.run_id)}
    assert {"comparison.md", "history.png", "speed", "quality"} <= artifacts
    saved = registry.client.download_artifacts(run.info.run_id, "comparison.md", str(tmp_path))
    comparison = Path(saved).read_text()
    rows = [line.split("|") for line in comparison.splitlines() if line.startswith("| ")]
    statuses = {cells[1].strip(): cells[-2].strip() for cells in rows}
    assert statuses[label(TTFT)] == "regression" and statuses[label(PPL)] == "improvement"
    for task in ("slipway_knowledge_quick/acc", "slipway_short_answer_quick/exact_match"):
        assert statuses[label(task)] == "within-noise", task  # same weights, items, temperature
    assert "- ttft_ms_p50 (synchronous) rose " in comparison

    [event] = stored_events(EVENT)
    assert event.resource.id == "slipway.model.tiny"
    assert event.payload["mlflow_run_id"] == run.info.run_id
    assert any(r.startswith("ttft_ms_p50 (synchronous) rose ") for r in event.payload["reasons"])
    summary = latest_artifact("regression-summary")
    assert "## tiny v1 (bf16): regressed" in summary.data
    assert "| ttft_ms_p50 (synchronous) | lower |" in summary.data


def test_regression_refuses_an_unverified_champion_and_measures_nothing(
    prefect_server, home, tmp_path
):
    from flows.regression import regression

    model = stand_in_model(tmp_path / "src", b"weights")
    registry = Registry(home)
    version = release(home, "m", model, eval_status="failed", eval_reasons="acc 0.2 < 0.9")
    registry.promote("m", version)

    state = regression(return_state=True)
    assert state.is_failed()
    refusal = (
        r"m v1 \(bf16\): refused: refusing to serve the champion m v1 \(bf16\): "
        r"its evaluation did not pass \(eval_status=failed: acc 0.2 < 0.9\)"
    )
    with pytest.raises(RegressionFound, match=refusal):
        state.result()
    assert registry.client.get_experiment_by_name(EXPERIMENT) is None
    assert not (home.root / "regression").exists()
