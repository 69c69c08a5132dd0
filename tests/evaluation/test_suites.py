"""The shipped suites load offline through lm-eval with the data they promise, and run end to
end through a real vLLM serving the tiny model (slow)."""

from __future__ import annotations

import json
import re

import pytest

from configs.evaluation import DEFAULT_SUITES, SUITES_DIR, Evaluation, shipped_suites
from tasks.evaluate import EvaluationError, run_quality, scores_from, task_manager

DATA = SUITES_DIR / "data"


@pytest.fixture(scope="module", autouse=True)
def offline():
    """No network for lm-eval or `datasets`: the suites must load from the checkout alone."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def loaded():
    return task_manager(hub_tasks=False).load([*DEFAULT_SUITES, "slipway_quick"])


def docs(loaded, name: str) -> list[dict]:
    return list(loaded["tasks"][name].test_docs())


def test_every_shipped_name_is_indexed():
    manager = task_manager(hub_tasks=False)
    assert task_manager(hub_tasks=False) is manager  # one index per process
    assert set(shipped_suites()) <= set(manager.all_tasks) | set(manager.all_tags)


def test_knowledge_set(loaded):
    items = docs(loaded, "slipway_knowledge")
    assert len(items) >= 200
    assert all(len(d["choices"]) == 4 and 0 <= d["answer"] < 4 for d in items)
    assert all(len(set(d["choices"])) == 4 for d in items)
    assert len({d["question"] for d in items}) == len(items)
    # Answers are spread over the four positions, so a position bias cannot score well.
    positions = [d["answer"] for d in items]
    assert min(positions.count(i) for i in range(4)) >= len(items) // 8
    task = loaded["tasks"]["slipway_knowledge"]
    assert task.OUTPUT_TYPE == "multiple_choice"
    assert {m["metric"] for m in task.config.metric_list} == {"acc", "acc_norm"}
    assert task.doc_to_text(items[0]) == f"Question: {items[0]['question']}\nAnswer:"


def test_short_answer_set_and_its_normalised_match(loaded):
    items = docs(loaded, "slipway_short_answer")
    assert 90 <= len(items) <= 120
    assert all(1 <= len(a.split()) <= 3 for d in items for a in d["answers"])
    task = loaded["tasks"]["slipway_short_answer"]
    assert task.OUTPUT_TYPE == "generate_until"
    doc = next(d for d in items if d["answers"] == ["Pacific", "Pacific Ocean"])
    for said, right in [
        (" The Pacific Ocean.", 1),
        ("pacific", 1),
        (" PACIFIC!", 1),
        (" Atlantic", 0),
        ("", 0),
    ]:
        assert task.process_results(doc, [said])["exact_match"] == right, said


def test_perplexity_text(loaded):
    items = docs(loaded, "slipway_perplexity")
    words = sum(len(d["text"].split()) for d in items)
    assert len(items) >= 5 and 2000 <= words <= 10000
    task = loaded["tasks"]["slipway_perplexity"]
    assert task.OUTPUT_TYPE == "loglikelihood_rolling"
    assert task.doc_to_target(items[0]) == items[0]["text"]


def test_quick_variants_are_small_subsets(loaded):
    for name in DEFAULT_SUITES:
        full, quick = docs(loaded, name), docs(loaded, f"{name}_quick")
        assert 0 < len(quick) < len(full)
        assert all(d in full for d in quick)


def test_data_files_are_clean():
    """One JSON object per line, no stray blank lines, plain ASCII text."""
    for path in [DATA / "knowledge.jsonl", DATA / "short_answer.jsonl"]:
        lines = path.read_text().splitlines()
        assert all(json.loads(line) for line in lines)
    text = (DATA / "perplexity.txt").read_text()
    assert text.isascii() and "\n\n" not in text and not re.search(r"[ \t]$", text, re.M)


def test_scores_from_lm_eval_output():
    """The shape simple_evaluate returns with log_samples, reduced to TaskScores."""
    results = {
        "results": {
            "slipway_knowledge": {
                "alias": "k",
                "acc,none": 0.5,
                "acc_stderr,none": 0.03,
                "acc_norm,none": 0.4,
                "acc_norm_stderr,none": 0.03,
            },
            "slipway_perplexity": {
                "word_perplexity,none": 30.0,
                "word_perplexity_stderr,none": "N/A",
            },
            "slipway_quick": {"alias": "slipway_quick"},
        },
        "samples": {
            "slipway_knowledge": [
                {"doc_id": 0, "acc": 1.0, "acc_norm": 0.0},
                {"doc_id": 1, "acc": 0.0, "acc_norm": 1.0},
            ],
            "slipway_perplexity": [{"doc_id": 0, "word_perplexity": [-10.0, 5]}],
        },
    }
    scores = scores_from(results)
    assert set(scores) == {"slipway_knowledge", "slipway_perplexity"}
    k = scores["slipway_knowledge"]
    assert k.metrics == {"acc": 0.5, "acc_norm": 0.4} and k.stderr["acc"] == 0.03 and k.n == 2
    assert k.items["acc"] == {0: 1.0, 1: 0.0}
    p = scores["slipway_perplexity"]
    assert p.metrics == {"word_perplexity": 30.0} and p.stderr == {} and p.items == {}


# ---- through a real vLLM -------------------------------------------------------------------------


@pytest.mark.slow
def test_run_quality_against_vllm(tiny_server, tiny_model_source, tmp_path):
    """Every shipped suite end to end through vLLM on a few items: structure and sane ranges
    (the tiny model knows six facts; its scores mean nothing)."""
    evaluation = Evaluation(limit=4, num_concurrent=2)
    result = run_quality(tiny_server.url, "tiny", tiny_model_source, evaluation, tmp_path)
    assert set(result.tasks) == set(DEFAULT_SUITES) and result.limit == 4
    knowledge = result.tasks["slipway_knowledge"]
    assert knowledge.n == 4 and set(knowledge.metrics) == {"acc", "acc_norm"}
    assert 0 <= knowledge.metrics["acc"] <= 1 and knowledge.stderr["acc"] >= 0
    assert set(knowledge.items["acc"]) == {0, 1, 2, 3}
    short = result.tasks["slipway_short_answer"]
    assert 0 <= short.metrics["exact_match"] <= 1 and len(short.items["exact_match"]) == 4
    perplexity = result.tasks["slipway_perplexity"]
    assert perplexity.metrics["word_perplexity"] > 1 and perplexity.metrics["bits_per_byte"] > 0
    for name in DEFAULT_SUITES:
        lines = (tmp_path / f"samples_{name}.jsonl").read_text().splitlines()
        assert len(lines) == 4 and json.loads(lines[0])["doc_id"] == 0
    assert set(json.loads((tmp_path / "results.json").read_text())["results"]) >= set(
        DEFAULT_SUITES
    )


@pytest.mark.slow
def test_run_quality_names_a_wrong_model(tiny_server, tiny_model_source, tmp_path):
    with pytest.raises(EvaluationError, match=r"serves tiny, not 'other'"):
        run_quality(tiny_server.url, "other", tiny_model_source, Evaluation(limit=1), tmp_path)
