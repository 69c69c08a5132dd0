"""Reconciliation: the usage log against what each engine itself counted, as an invariant.

For each model version, the tokens of every request its engines served between two meter
readings (serving/gateway/meter.py) must equal the increase of the engines' own counters over
that span (vLLM's vllm:prompt_tokens_total and vllm:generation_tokens_total). Served means
billed (the tenants' requests, gateway_usage) and unbilled (mirrored copies, a canary's failed
try, and what Slipway sends an engine itself: unbilled_usage), so nothing that reaches an engine
is ignored.

How the numbers are compared:
- vLLM counts a prompt once per choice, the usage once per request: a row's prompt counts n times.
- The span runs from the first to the last reading in the window at which no request of the
  version was in flight (a quiet reading), so every request in it was counted whole. Where no
  reading was quiet, the requests that straddle an end are tolerated, each by its tokens.
- A request that completed (an answer, or an error the engine answered) must match exactly:
  tolerance 0. One that was aborted (the client hung up, a timeout, a broken stream) may have
  made the engine generate more than was relayed, up to its completion bound (max_tokens x
  choices): those are the tokens in flight, tolerated upwards. Its prompt may have been counted
  for only the choices the engine had started (down to none), or without the usage saying so.
- A row counted from content (the backend sent no usage) and a direct source whose tokens are not
  known (tokens_from "unmetered") make that side a lower bound: the engines' surplus is
  attributed to them.
- Counters that go down mean an engine restarted; each run of readings without a restart is
  checked on its own.
A divergence beyond the tolerance is a Reconciliation with ok False; its line gives the numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

# Seconds: a reading this close to a request's start or end does not count as quiet (the reading's
# time is taken just before its HTTP GET).
MARGIN_S = 0.25
# Seconds an engine may go on with an aborted request after the gateway stopped reading it.
ABORT_GRACE_S = 2.0
# Usage columns the reconciliation reads (billed rows gain source "billed").
COLUMNS = (
    "time",
    "backend_version",
    "n",
    "prompt_tokens",
    "completion_tokens",
    "completion_bound",
    "latency_ms",
    "error_kind",
    "tokens_from",
)
UNMETERED = "unmetered"  # tokens_from of a direct source that cannot count its tokens
CACHED = "cache"  # tokens_from of an answer the gateway's response cache gave
RECORD = (
    "version",
    "start",
    "end",
    "requests",
    "unbilled",
    "prompt_engines",
    "prompt_usage",
    "generated_engines",
    "generated_usage",
    "ok",
)


@dataclass(frozen=True)
class Side:
    """One counter: what the engines counted, what the rows say, and the tolerance each way."""

    metered: int
    counted: int
    over: float  # the engines may count this much more than the rows (math.inf: a lower bound)
    under: int  # ... and this much less (requests straddling a busy reading)

    @property
    def ok(self) -> bool:
        return self.counted - self.under <= self.metered <= self.counted + self.over

    @property
    def residual(self) -> int:
        return self.metered - self.counted

    def describe(self) -> str:
        over = "any" if math.isinf(self.over) else f"{int(self.over)}"
        return (
            f"engines {self.metered}, usage {self.counted} (difference {self.residual:+d}, "
            f"allowed -{self.under}..+{over})"
        )


@dataclass(frozen=True)
class Reconciliation:
    version: str
    start: float  # unix seconds of the two readings compared
    end: float
    requests: dict[str, int]  # rows by source: billed, shadow, retry, smoke, regression, ...
    prompt: Side
    generation: Side
    quiet: bool  # both readings were quiet: completed requests are held to 0 tokens

    @property
    def ok(self) -> bool:
        return self.prompt.ok and self.generation.ok

    def line(self) -> str:
        sources = ", ".join(f"{k} {v}" for k, v in sorted(self.requests.items())) or "no requests"
        verdict = "agrees" if self.ok else "DIVERGES"
        return (
            f"version {self.version} {verdict} over {self.end - self.start:.0f} s ({sources}): "
            f"prompt tokens {self.prompt.describe()}; "
            f"generated tokens {self.generation.describe()}"
        )

    def record(self) -> dict[str, object]:
        """One table row (artifacts, CSV), RECORD's columns."""
        return {
            "version": self.version,
            "start": pd.Timestamp(self.start, unit="s", tz="UTC").isoformat(),
            "end": pd.Timestamp(self.end, unit="s", tz="UTC").isoformat(),
            "requests": sum(self.requests.values()),
            "unbilled": sum(v for k, v in self.requests.items() if k != "billed"),
            "prompt_engines": self.prompt.metered,
            "prompt_usage": self.prompt.counted,
            "generated_engines": self.generation.metered,
            "generated_usage": self.generation.counted,
            "ok": self.ok,
        }


def reconcile(
    billed: pd.DataFrame, unbilled: pd.DataFrame, meter: pd.DataFrame
) -> list[Reconciliation]:
    """Every version's runs of meter readings (`meter`: the engine_meter rows of a window) against
    the `billed` (gateway_usage) and `unbilled` (unbilled_usage) rows, COLUMNS of each, `time` as
    unix seconds; rows are read from the first reading's time on (pass the window and a margin of
    the longest request before it). A version with fewer than two readings is not checked."""
    # A response-cache hit reached no engine, whatever its tokens say (serving/gateway/cache.py).
    reached = billed["backend_version"].notna() & (billed["tokens_from"] != CACHED)
    mine = billed.loc[reached, list(COLUMNS)].assign(source="billed")
    others = unbilled[[*COLUMNS, "source"]]
    parts = [p for p in (mine, others) if len(p)]  # concat warns about empty frames
    rows = pd.concat(parts, ignore_index=True) if parts else others
    out = []
    for version, readings in meter.groupby("backend_version", sort=True):
        served = rows[rows["backend_version"] == version]
        for run in _runs(readings):
            if len(run) >= 2:
                out.append(_check(str(version), run, served))
    return out


def _runs(readings: pd.DataFrame) -> list[pd.DataFrame]:
    """Ticks (time -> counters summed over the version's engines) in runs without a restart: a run
    ends where an engine's counter goes down or the set of engines changes."""
    runs: list[list[tuple[float, int, int]]] = []
    before: dict[str, tuple[int, int]] = {}
    for time, tick in readings.sort_values("time").groupby("time", sort=True):
        now = {
            u: (int(p), int(g))
            for u, p, g in tick[
                ["url", "prompt_tokens_total", "generation_tokens_total"]
            ].itertuples(index=False)
        }
        restarted = now.keys() != before.keys() or any(
            now[u][0] < before[u][0] or now[u][1] < before[u][1] for u in now
        )
        if restarted or not runs:
            runs.append([])
        runs[-1].append((float(time), *(sum(c) for c in zip(*now.values(), strict=True))))
        before = now
    return [pd.DataFrame(r, columns=["time", "prompt", "generation"]) for r in runs]


def _check(version: str, run: pd.DataFrame, rows: pd.DataFrame) -> Reconciliation:
    start = rows["time"].to_numpy(float)
    aborted = _aborted(rows).to_numpy()
    end = start + rows["latency_ms"].to_numpy(float) / 1000.0 + np.where(aborted, ABORT_GRACE_S, 0)
    times = run["time"].to_numpy()
    busy = [bool(((start - MARGIN_S <= t) & (t <= end + MARGIN_S)).any()) for t in times]
    quiet = [i for i, b in enumerate(busy) if not b]
    a, b = (quiet[0], quiet[-1]) if len(quiet) >= 2 else (0, len(times) - 1)
    t0, t1 = times[a], times[b]

    inside = (start >= t0) & (start < t1)
    n = pd.to_numeric(rows["n"]).fillna(1).to_numpy(int)  # NULL: a row from before n was kept
    prompt = rows["prompt_tokens"].to_numpy(int) * n
    completion = rows["completion_tokens"].to_numpy(int)
    bound = pd.to_numeric(rows["completion_bound"], errors="coerce").to_numpy(float)  # NaN: none
    unknown_prompt = (rows["tokens_from"].notna() | (aborted & (prompt == 0))).to_numpy()
    unmetered = (rows["tokens_from"] == UNMETERED).to_numpy()

    # Upwards: aborted requests' tokens in flight; requests that began before a busy start, whole.
    before = (start < t0) & (end > t0)
    most = np.where(aborted, np.nan_to_num(bound, nan=math.inf), completion)
    in_flight = np.where(aborted, np.nan_to_num(bound - completion, nan=math.inf), 0)
    gen_over = float(np.where(unmetered, math.inf, in_flight)[inside].sum() + most[before].sum())
    unknown = (unknown_prompt & (inside | before)).any()
    prompt_over = math.inf if unknown else float(prompt[before].sum())
    # Downwards: requests counted whole that were still running at a busy end; and an aborted
    # request's prompt, which vLLM counts only for the choices it had started.
    after = inside & (end > t1)
    gen_under = int(np.maximum(completion, 0)[after].sum())
    prompt_under = int(prompt[after | (inside & aborted)].sum())

    metered = run.iloc[b] - run.iloc[a]
    return Reconciliation(
        version=version,
        start=float(t0),
        end=float(t1),
        requests=rows.loc[inside, "source"].value_counts().to_dict(),
        prompt=Side(int(metered["prompt"]), int(prompt[inside].sum()), prompt_over, prompt_under),
        generation=Side(
            int(metered["generation"]), int(completion[inside].sum()), gen_over, gen_under
        ),
        quiet=len(quiet) >= 2,
    )


def _aborted(rows: pd.DataFrame) -> pd.Series:
    """Requests the engine may have worked on beyond what the row says: every error but an answer
    the engine gave itself (upstream_4xx)."""
    kind = rows["error_kind"]
    return kind.notna() & ~kind.fillna("").str.startswith("upstream_4")
