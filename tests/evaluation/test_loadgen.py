"""The load generator: metric computation on fake streams (pure), the CLI's checks, and runs
against a real vLLM serving the tiny model (slow)."""

from __future__ import annotations

import asyncio
import itertools
import json
import time

import pytest
from click.testing import CliRunner

from configs.evaluation import PROMPTS, LoadProfile
from evaluation.benchmarks.mock_upstream import MockUpstream, serve
from evaluation.benchmarks.vllm_bench import (
    BenchLevel,
    compare_with_vllm_bench,
    end_to_end,
    paired_ttfts,
    pool_bench,
    sharegpt,
    vllm_bench_command,
)
from evaluation.loadgen.background import BackgroundLoad
from evaluation.loadgen.client import run_level
from evaluation.loadgen.report import (
    LoadReport,
    Prompt,
    RequestRecord,
    load_prompts,
    pick_prompts,
    record_from_stream,
    summarise,
)
from flows.cli import loadgen as cli


def completion(text: str) -> dict:
    return {"choices": [{"index": 0, "text": text, "finish_reason": None}]}


def chat(**delta) -> dict:
    return {"choices": [{"index": 0, "delta": delta}]}


USAGE = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 5}}


def test_timings_from_a_completions_stream_with_usage():
    # Sent at t=10.0; chunks at 10.2, 10.25, 10.35, 10.4; then the usage-only message.
    stream = [
        (10.2, completion(" Par")),
        (10.25, completion("is")),
        (10.35, completion(".")),
        (10.4, completion("")),
        (10.41, USAGE),
    ]
    r = record_from_stream("p1", start=1.0, sent=10.0, messages=stream)
    assert r.ok and r.prompt_tokens == 7
    assert r.ttft == pytest.approx(0.2)
    assert r.latency == pytest.approx(0.4)
    assert r.itl == pytest.approx([0.05, 0.1, 0.05])
    # Usage says 5 tokens in 4 chunks: usage wins; TPOT = (0.4 - 0.2) / (5 - 1).
    assert r.output_tokens == 5 and r.tokens_from_usage
    assert r.tpot == pytest.approx(0.05)


def test_chunks_count_tokens_when_the_server_sends_no_usage():
    stream = [
        (0.1, chat(role="assistant", content="")),
        (0.3, chat(content="Blue")),
        (0.4, chat(content=".")),
        (0.6, chat(content="!")),
    ]
    r = record_from_stream("p", start=0.0, sent=0.0, messages=stream)
    # The role announcement is not output: TTFT is the first content chunk.
    assert r.ttft == pytest.approx(0.3) and r.output_tokens == 3 and not r.tokens_from_usage
    assert r.tpot == pytest.approx(0.15)


def test_a_stream_without_output_is_an_error():
    r = record_from_stream("p", start=0.0, sent=0.0, messages=[(0.1, USAGE)])
    assert not r.ok and r.tpot is None


def ok(start: float, ttft: float, latency: float, tokens: int) -> RequestRecord:
    return RequestRecord(
        prompt_id="p",
        start=start,
        ttft=ttft,
        latency=latency,
        output_tokens=tokens,
        tokens_from_usage=True,
    )


def test_summary_percentiles_throughput_and_goodput():
    records = [
        ok(0.0, 0.1, 1.1, 11),  # TPOT 100 ms: good
        ok(0.5, 0.2, 2.2, 11),  # TPOT 200 ms: misses the 150 ms SLO
        ok(1.0, 0.6, 1.6, 11),  # TTFT 600 ms: misses the 500 ms SLO
        ok(1.5, 0.3, 1.0, 1),  # one token, no TPOT: judged on TTFT alone, good
        RequestRecord(prompt_id="p", start=2.0, error="HTTP 400: too long"),
    ]
    s = summarise(records, label="concurrency 2", slo_ttft_ms=500, slo_tpot_ms=150, concurrency=2)
    # From the first request sent (0.0) to the last one finished (0.5 + 2.2 = 2.7).
    assert s.duration_s == pytest.approx(2.7)
    assert (s.completed, s.failed, s.total_output_tokens) == (4, 1, 34)
    assert s.requests_per_s == pytest.approx(4 / 2.7)
    assert s.output_tokens_per_s == pytest.approx(34 / 2.7)
    assert s.ttft_ms.p50 == pytest.approx(250.0)  # of 100, 200, 300, 600
    assert s.ttft_ms.p99 == pytest.approx(300 + 300 * 0.97)
    assert s.tpot_ms.p50 == pytest.approx(100.0)  # of 100, 100, 200
    assert s.e2e_ms.mean == pytest.approx((1100 + 2200 + 1600 + 1000) / 4)
    assert s.goodput_share == pytest.approx(2 / 5) and s.goodput_per_s == pytest.approx(2 / 2.7)
    assert s.token_source == "usage" and s.errors == ["HTTP 400: too long"]


def test_summary_of_only_failures_is_all_zero():
    s = summarise(
        [RequestRecord(prompt_id="p", start=0, error="boom")],
        label="x",
        slo_ttft_ms=1,
        slo_tpot_ms=1,
    )
    assert (s.completed, s.failed, s.requests_per_s, s.token_source) == (0, 1, 0.0, "none")
    assert s.ttft_ms.p50 is None
    report = LoadReport(
        base_url="http://x",
        model="m",
        endpoint="completions",
        profile=LoadProfile(mode="synchronous"),
        levels=[s],
    )
    assert LoadReport.model_validate_json(report.model_dump_json()) == report


def test_the_shipped_prompt_set():
    prompts = load_prompts(PROMPTS)
    lengths = sorted(len(p.prompt.split()) for p in prompts)
    assert len(prompts) >= 200 and len({p.id for p in prompts}) == len(prompts)
    # A realistic spread: one-line questions up to multi-paragraph requests.
    assert lengths[0] < 10 and lengths[len(lengths) // 2] < 40 and lengths[-1] > 300
    assert sum("\n\n" in p.prompt for p in prompts) >= 30
    assert all(16 <= p.max_tokens <= 256 for p in prompts)
    capped = load_prompts(PROMPTS, max_tokens=16, max_chars=80)
    assert capped and all(p.max_tokens <= 16 and len(p.prompt) <= 80 for p in capped)


def test_background_load_holds_arrivals_past_its_in_flight_cap():
    upstream = MockUpstream(delay_s=2.0)  # an engine that has fallen behind
    prompts = load_prompts(PROMPTS, max_tokens=16)
    with serve(upstream) as url:
        load = BackgroundLoad(url, "mock", "key", 200.0, prompts, max_in_flight=3)
        with load:
            time.sleep(1.0)
            sent_while_slow = len(upstream.requests)
    assert sent_while_slow == 3  # not the ~200 an open loop sends in that second
    assert load.held >= 1 and load.failed == 0


def test_picked_prompts_are_seeded_mixed_and_cycle():
    prompts = load_prompts(PROMPTS)
    first = pick_prompts(prompts, 48, seed=0)
    assert first == pick_prompts(prompts, 48, seed=0) != pick_prompts(prompts, 48, seed=1)
    assert len({p.max_tokens for p in first}) > 1  # not just the file's short head
    assert len(pick_prompts(prompts[:3], 7, seed=0)) == 7


def test_bad_prompt_file_names_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "hi", "output_tokens": 4}) + '\n{"prompt": "x"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: need a JSON object"):
        load_prompts(path)


def test_vllm_bench_gets_the_same_prompts_in_the_same_order(tmp_path):
    prompts = pick_prompts(load_prompts(PROMPTS), 5, seed=0)
    data = json.loads(sharegpt(prompts))
    assert [d["conversations"][0]["value"] for d in data] == [p.prompt for p in prompts]


def test_vllm_bench_command_matches_the_profile(tmp_path):
    command = vllm_bench_command(
        tmp_path / "vllm",
        "http://127.0.0.1:8000/",
        "tiny",
        tmp_path / "tok",
        tmp_path / "d.json",
        concurrency=4,
        num_prompts=20,
        output_tokens=32,
        warmup=2,
        ignore_eos=True,
        result_dir=tmp_path,
        result_name="r.json",
    )
    flags = dict(itertools.pairwise(command[3:]))
    assert command[1:3] == ["bench", "serve"] and "--ignore-eos" in command
    assert flags["--max-concurrency"] == "4" and flags["--num-prompts"] == "20"
    assert flags["--dataset-name"] == "sharegpt" and flags["--sharegpt-output-len"] == "32"
    assert flags["--base-url"] == "http://127.0.0.1:8000" and "--disable-shuffle" in command


def test_cli_rejects_a_bad_profile(tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        cli,
        [
            "run",
            "--base-url",
            "http://127.0.0.1:9",
            "--model",
            "m",
            "--profile",
            "poisson",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 2 and "needs rate" in result.output
    result = runner.invoke(
        cli,
        [
            "run",
            "--base-url",
            "http://x",
            "--model",
            "m",
            "--concurrency",
            "1,two",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 2 and "comma-separated integers" in result.output


def test_profile_rejects_rate_outside_poisson():
    with pytest.raises(ValueError, match="poisson"):
        LoadProfile(mode="sweep", rate=2.0)


def bench_level(ours: list[float], bench: list[float]) -> BenchLevel:
    return BenchLevel(
        concurrency=4,
        ours_output_tokens_per_s=96.0,
        bench_output_tokens_per_s=100.0,
        ours_ttft_p50_ms=105.0,
        bench_ttft_p50_ms=100.0,
        ours_requests_per_s=1.0,
        bench_requests_per_s=1.0,
        ours_ttfts_ms=ours,
        bench_ttfts_ms=bench,
    )


def test_comparison_pairs_ttfts_prompt_by_prompt():
    level = bench_level([10.0, 50.0, 31.0, 200.0], [12.0, 40.0, 30.0, 100.0])
    assert level.throughput_diff == pytest.approx(-0.04)
    assert level.ttft_diff == pytest.approx(0.05)
    # differences -2, +10, +1, +100: their median, not the difference of the medians
    assert level.paired_ttft_diff_ms == pytest.approx(5.5)
    with pytest.raises(ValueError):
        _ = bench_level([1.0, 2.0], [1.0]).paired_ttft_diff_ms


def test_comparison_refuses_runs_that_sent_different_prompts():
    records = [
        RequestRecord(prompt_id=str(i), start=i, ttft=0.1, latency=1.0, prompt_tokens=n)
        for i, n in enumerate([7, 12, 9])
    ]
    bench = {"input_lens": [7, 12, 9], "ttfts": [0.1, 0.2, 0.3]}
    assert paired_ttfts(records, bench) == pytest.approx([100.0, 200.0, 300.0])
    with pytest.raises(RuntimeError, match="same prompts in the same order"):
        paired_ttfts(records, {**bench, "input_lens": [7, 9, 12]})


def test_two_vllm_bench_halves_pool_into_one_run():
    a = {
        "duration": 10.0,
        "total_output_tokens": 640,
        "completed": 10,
        "ttfts": [0.05, 0.07],
        "input_lens": [5, 6],
    }
    b = {
        "duration": 30.0,
        "total_output_tokens": 960,
        "completed": 20,
        "ttfts": [0.09, 0.01],
        "input_lens": [7, 8],
    }
    pooled = pool_bench([a, b])
    assert pooled["output_throughput"] == pytest.approx(1600 / 40)
    assert pooled["request_throughput"] == pytest.approx(30 / 40)
    assert pooled["median_ttft_ms"] == pytest.approx(60.0)  # of 10, 50, 70, 90 ms
    assert pooled["ttfts"] == [0.05, 0.07, 0.09, 0.01] and pooled["input_lens"] == [5, 6, 7, 8]


def test_two_runs_laid_end_to_end_sum_their_durations():
    def run(*spans):
        return [
            RequestRecord(prompt_id="p", start=s, ttft=0.1, latency=d, output_tokens=10)
            for s, d in spans
        ]

    first, second = run((0.0, 2.0), (0.5, 3.0)), run((0.0, 1.0), (1.0, 1.0))
    joined = end_to_end([first, second])
    assert [r.start for r in joined] == [0.0, 0.5, 3.5, 4.5]
    level = summarise(joined, label="c2", slo_ttft_ms=1000, slo_tpot_ms=1000)
    assert level.duration_s == pytest.approx(3.5 + 2.0)
    assert level.output_tokens_per_s == pytest.approx(40 / 5.5)


# ---- against a real vLLM -------------------------------------------------------------------------


@pytest.mark.slow
def test_sweep_against_vllm(tiny_server, tmp_path):
    """A 1,2 sweep on /v1/completions and a Poisson run on /v1/chat/completions, through the CLI."""
    runner = CliRunner()
    common = [
        "--base-url",
        tiny_server.url,
        "--model",
        "tiny",
        "--num-prompts",
        "6",
        "--warmup",
        "1",
        "--max-tokens",
        "12",
        "--max-prompt-chars",
        "160",
    ]
    result = runner.invoke(
        cli, ["run", *common, "--concurrency", "1,2", "--out", str(tmp_path / "a")]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert (tmp_path / "a" / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert [lv["concurrency"] for lv in report["levels"]] == [1, 2]
    for lv in report["levels"]:
        assert (lv["completed"], lv["failed"]) == (6, 0), lv["errors"]
        # ignore_eos: every request generates exactly its max_tokens, counted from usage.
        assert lv["token_source"] == "usage" and lv["total_output_tokens"] == 6 * 12
        assert 0 < lv["ttft_ms"]["p50"] <= lv["ttft_ms"]["p99"] < lv["e2e_ms"]["p99"] < 30_000
        assert 0 < lv["tpot_ms"]["p50"] < 5_000 and lv["itl_ms"]["mean"] > 0
        assert lv["requests_per_s"] > 0 and lv["output_tokens_per_s"] > 0
        assert 0 <= lv["goodput_share"] <= 1

    result = runner.invoke(
        cli,
        [
            "run",
            *common,
            "--profile",
            "poisson",
            "--rate",
            "20",
            "--endpoint",
            "chat",
            "--out",
            str(tmp_path / "b"),
        ],
    )
    assert result.exit_code == 0, result.output
    (level,) = json.loads((tmp_path / "b" / "report.json").read_text())["levels"]
    assert level["label"] == "poisson 20 req/s" and level["completed"] == 6
    assert level["total_output_tokens"] == 6 * 12


@pytest.mark.slow
def test_server_errors_are_counted_not_raised(tiny_server):
    """A prompt longer than the context fails with HTTP 400 and shows up in the summary."""
    profile = LoadProfile(mode="synchronous", num_prompts=2, warmup=0)
    prompts = [Prompt(id="long", prompt="word " * 400, max_tokens=8)]
    level = asyncio.run(
        run_level(tiny_server.url, "tiny", profile, prompts, concurrency=1, progress=False)
    )
    assert (level.completed, level.failed) == (0, 2)
    assert level.errors[0].startswith("HTTP 400")


@pytest.mark.slow
def test_comparison_with_vllm_bench_on_the_same_server(tiny_server, tiny_model_source, tmp_path):
    """The real `vllm bench serve` of the serve environment and this generator, level by level:
    every prompt paired (their prompt token counts match one by one), every file written."""
    profile = LoadProfile(
        mode="sweep",
        concurrency=[1, 2],
        num_prompts=6,
        warmup=1,
        max_tokens=8,
        max_prompt_chars=160,
    )
    comparison = compare_with_vllm_bench(
        tiny_server.url, "tiny", tiny_model_source, profile, tmp_path
    )
    assert [x.concurrency for x in comparison.levels] == [1, 2]
    for x in comparison.levels:  # 6 prompts per unit of concurrency
        assert len(x.ours_ttfts_ms) == len(x.bench_ttfts_ms) == 6 * x.concurrency
        assert min(x.ours_ttfts_ms + x.bench_ttfts_ms) > 0
        assert x.ours_output_tokens_per_s > 0 and x.bench_output_tokens_per_s > 0
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert saved["levels"][1]["bench_ttfts_ms"] == comparison.levels[1].bench_ttfts_ms
    # the derived figures are saved too, for bench reports to read without recomputing them
    assert saved["levels"][1]["paired_ttft_diff_ms"] == comparison.levels[1].paired_ttft_diff_ms
    assert saved["agree"] == comparison.agree
    assert "same prompt" in (tmp_path / "comparison.md").read_text()
    for png in ("comparison.png", "report.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
