"""Traffic Slipway itself sends a served engine outside the gateway, written to the usage log's
unbilled_usage so that the reconciliation with the engines' own counters counts it: the rollout's
scoring of mirrored answers (each call with the usage the engine reported) and the regression
flow's load on the champion `make up` serves (one row spanning the run, its tokens unmetered: the
load generator and lm-eval do not report them, so the engines' surplus is attributed to it)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable

from configs.home import Home
from evaluation.monitoring.reconcile import UNMETERED
from evaluation.quality.logprob import Call
from serving.gateway.usage import UNBILLED, default_url, write_rows

_ids = itertools.count()


def _request_id(source: str) -> str:
    return f"{source}-{os.getpid()}-{next(_ids)}"


def record_scoring(home: Home) -> Callable[[list[Call]], None]:
    """What the rollout's scorer hands its calls to."""
    url = default_url(home)

    def record(calls: list[Call]) -> None:
        rows = [
            (
                c.start,
                _request_id("scoring"),
                "scoring",
                c.version,
                1,
                c.prompt_tokens,
                c.completion_tokens,
                1,  # max_tokens 1: a prefill-only request
                c.latency_s * 1000.0,
                None if c.status == 200 else f"upstream_{c.status}",
                None,
            )
            for c in calls
        ]
        write_rows(url, rows, UNBILLED)

    return record


def record_unmetered(home: Home, source: str, version: str, start: float, end: float) -> None:
    """A run of load on `version`'s engine from `start` to `end` (unix seconds) whose tokens were
    not counted."""
    row = (start, _request_id(source), source, version, 1, 0, 0, None, (end - start) * 1000.0)
    write_rows(default_url(home), [(*row, None, UNMETERED)], UNBILLED)
