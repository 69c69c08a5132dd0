"""`slipway bench arms`: two engines side by side, paired A-B-B-A and split, against two mock
upstreams whose latencies differ by a known factor."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from evaluation.benchmarks.arms import paired_rows
from evaluation.benchmarks.mock_upstream import Fault, MockUpstream, serve
from flows.cli import cli


def test_paired_and_split_ratios_find_a_known_slowdown(tmp_path):
    fast, slow = MockUpstream(chunks=4, delay_s=0.02), MockUpstream(chunks=4, delay_s=0.04)
    slow.faults["b"] = Fault(delay_s=0.04, word="z")  # other words, twice the wait
    out = tmp_path / "arms"
    with serve(fast) as a, serve(slow) as b:
        result = CliRunner().invoke(
            cli,
            [
                "bench",
                "arms",
                "--a",
                f"{a}=a",
                "--b",
                f"{b}=b",
                "--rate",
                "20",
                "--paired",
                "40",
                "--split",
                "40",
                "--out",
                str(out),
            ],
        )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "arms.json").read_text())
    assert report["errors"] == {"A": 0, "B": 0}
    median, low, high = report["paired"]["ttft"]["median_ratio"]
    assert 1.5 < median < 2.6 and low <= median <= high
    assert 1.3 < report["split"]["ttft"]["geometric_mean_ratio"][0] < 2.8
    assert report["paired"]["answers"]["identical"] == 0.0  # w0 w1 ... against z0 z1 ...
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert sorted({r["block"] for r in rows if r["phase"] == "paired"}) == [0, 1, 2, 3]
    assert len(paired_rows(rows)) == 40
    assert "| paired | ttft | 40 |" in (out / "arms.md").read_text()


def test_a_bad_engine_spec_is_refused_with_the_form_to_use(tmp_path):
    result = CliRunner().invoke(cli, ["bench", "arms", "--a", "localhost", "--b", "x=y"])
    assert result.exit_code == 2
    assert "give URL=MODEL" in result.output


@pytest.mark.parametrize("phase", ["paired", "split"])
def test_paired_rows_need_both_sides(phase):
    side = {"ok": True, "ttft_s": 0.1, "tpot_s": 0.01, "e2e_s": 0.3}
    rows = [{"phase": phase, "index": 0, "arm": "A", **side}]
    assert paired_rows(rows) == []
