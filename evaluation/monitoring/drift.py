"""Drift of the traffic: a recent window of the usage log against a reference window, per feature.

Features per request: prompt and completion tokens, latency, TTFT (streams only), is_error
(error_kind set), tenant, and Evidently's offline text descriptors of the prompt (length, words,
sentences) where the tenant allows prompt logging. The reference is the same window a week
earlier (same hour and weekday, so daily and weekly cycles do not read as drift) or the window
that starts when the champion was promoted.

What is exact and what is sampled: each window is streamed from the usage log in chunks, reading
only the columns needed, through the readers the caller passes in (evaluation.monitoring.usage).
Row counts, the error rate, the tenant shares and the number of logged prompts are counted over
ALL rows. The distribution tests (Evidently's DataDriftPreset: normed Wasserstein for numbers,
Jensen-Shannon for categories, a z-test for the error rate, as set in configs/drift.yaml) run on
a uniform sample of `sample_rows` rows per window, drawn by position with a seeded generator, so a
re-run gives the same report. At 50,000 rows a distance is known to about +-0.01, a tenth of the
0.1 threshold; a million rows per window cost seconds, not a minute.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from configs.drift import DriftConfig
from evaluation.monitoring.usage import CountUsage, IterUsage

if TYPE_CHECKING:
    from evidently.core.report import Snapshot

Reference = Literal["previous_week", "promotion"]
NUMERIC = ("prompt_tokens", "completion_tokens", "latency_ms", "ttft_ms")
TEXT = ("prompt_chars", "prompt_words", "prompt_sentences")  # descriptors of logged prompts
CATEGORICAL = ("is_error", "tenant")
NO_TENANT = "(none)"  # requests that failed authentication
SAMPLING_NOTE = (
    "Distribution tests ran on a uniform seeded sample per window; counts, error rates and tenant "
    "shares are exact over all rows. A distance (wasserstein, jensenshannon, ...) drifts at or "
    "above its threshold; a test's p-value (z, ks, chisquare, ...) below it."
)
_READ = (
    "tenant",
    "error_kind",
    "prompt_tokens",
    "completion_tokens",
    "latency_ms",
    "ttft_ms",
    "prompt",
)
_CHUNK_ROWS = 100_000  # rows per streamed frame: memory stays bounded at a million rows a window


class NotEnoughData(ValueError):
    """A window holds too few requests to compare; the message names the window and its count."""


@dataclass(frozen=True)
class Window:
    start: datetime
    end: datetime

    @property
    def label(self) -> str:
        return f"{self.start:%Y-%m-%d %H:%M}..{self.end:%Y-%m-%d %H:%M} UTC"


def windows(
    end: datetime, hours: float, reference: Reference, promoted_at: datetime | None = None
) -> tuple[Window, Window]:
    """The current window [end - hours, end) and its reference: the same window 7 days earlier, or
    the window of the same length that starts at the promotion."""
    end = end if end.tzinfo else end.replace(tzinfo=UTC)
    span = timedelta(hours=hours)
    current = Window(end - span, end)
    if reference == "previous_week":
        week = timedelta(days=7)
        return current, Window(current.start - week, current.end - week)
    if promoted_at is None:
        raise ValueError("reference 'promotion' needs the time of the promotion")
    return current, Window(promoted_at, promoted_at + span)


@dataclass(frozen=True)
class WindowData:
    """One window: counts over all rows, features of a uniform sample of rows."""

    window: Window
    rows: int
    errors: int
    prompts: int
    tenants: dict[str, int]
    sample: pd.DataFrame = field(repr=False)

    @property
    def error_rate(self) -> float:
        return self.errors / self.rows if self.rows else 0.0

    def tenant_shares(self) -> dict[str, float]:
        return {t: n / self.rows for t, n in sorted(self.tenants.items())}


def load_window(
    window: Window, total: int, frames: Iterable[pd.DataFrame], config: DriftConfig
) -> WindowData:
    """One pass over the window's `total` rows, streamed as `frames` of the usage log's columns:
    exact counts over all of them, features of the sampled."""
    rng = np.random.default_rng(config.seed)
    picks = np.sort(rng.choice(total, size=min(total, config.sample_rows), replace=False))
    rows = errors = prompts = 0
    tenants: Counter[str] = Counter()
    kept = []
    for chunk in frames:
        chunk["tenant"] = chunk["tenant"].fillna(NO_TENANT)
        errors += int(chunk["error_kind"].notna().sum())
        prompts += int(chunk["prompt"].notna().sum())
        tenants.update(chunk["tenant"].value_counts().to_dict())
        lo, hi = np.searchsorted(picks, [rows, rows + len(chunk)])
        kept.append(chunk.iloc[picks[lo:hi] - rows])
        rows += len(chunk)
    sample = pd.concat(kept, ignore_index=True) if kept else pd.DataFrame(columns=list(_READ))
    return WindowData(window, rows, errors, prompts, dict(tenants), features(sample))


def features(rows: pd.DataFrame) -> pd.DataFrame:
    """Usage rows -> the compared features, in compact dtypes; descriptors NaN where no prompt."""
    out = pd.DataFrame(
        {
            "prompt_tokens": rows["prompt_tokens"].astype("int32"),
            "completion_tokens": rows["completion_tokens"].astype("int32"),
            "latency_ms": rows["latency_ms"].astype("float32"),
            "ttft_ms": pd.to_numeric(rows["ttft_ms"]).astype("float32"),
            "is_error": rows["error_kind"].notna().astype("int8"),
            "tenant": rows["tenant"].astype("category"),
        }
    )
    prompts = rows["prompt"].dropna()
    for name in TEXT:
        out[name] = np.float32("nan")
    if len(prompts):
        described = _describe(prompts.reset_index(drop=True))
        out.loc[prompts.index, list(TEXT)] = described[list(TEXT)].to_numpy("float32")
    return out


def _describe(prompts: pd.Series) -> pd.DataFrame:
    from evidently import DataDefinition, Dataset
    from evidently.descriptors import SentenceCount, TextLength, WordCount

    descriptors = [
        TextLength("prompt", alias="prompt_chars"),
        WordCount("prompt", alias="prompt_words"),
        SentenceCount("prompt", alias="prompt_sentences"),
    ]
    data = Dataset.from_pandas(
        pd.DataFrame({"prompt": prompts}),
        data_definition=DataDefinition(text_columns=["prompt"]),
        descriptors=descriptors,
    )
    return data.as_dataframe()


@dataclass(frozen=True)
class FeatureDrift:
    feature: str
    method: str = ""
    score: float | None = None
    threshold: float | None = None
    drifted: bool = False
    skipped: str = ""  # why it was not compared


@dataclass(frozen=True)
class WindowStats:
    """What the report says about one window; everything but `sampled` is counted over all rows."""

    window: Window
    rows: int
    sampled: int
    error_rate: float
    prompts: int
    tenant_shares: dict[str, float]

    @classmethod
    def of(cls, data: WindowData) -> WindowStats:
        return cls(
            data.window,
            data.rows,
            len(data.sample),
            data.error_rate,
            data.prompts,
            data.tenant_shares(),
        )


@dataclass(frozen=True)
class DriftResult:
    model: str | None
    current: WindowStats
    reference: WindowStats
    features: tuple[FeatureDrift, ...]
    drift_share: float
    threshold: float

    @property
    def detected(self) -> bool:
        return self.drift_share >= self.threshold

    @property
    def drifted(self) -> list[str]:
        return [f.feature for f in self.features if f.drifted]


def compare(
    current: WindowData, reference: WindowData, config: DriftConfig, model: str | None = None
) -> tuple[DriftResult, Snapshot]:
    """Evidently's DataDriftPreset on the two samples, over the features with enough values in
    both; raises NotEnoughData when either window has fewer than `min_rows` requests."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    for data in (current, reference):
        if data.rows < config.min_rows:
            raise NotEnoughData(
                f"{data.window.label}: {data.rows} requests, fewer than min_rows="
                f"{config.min_rows}; nothing to compare (does the gateway log to this usage log, "
                "for this model?)"
            )
    compared, skipped = [], []
    for name in (*NUMERIC, *TEXT, *CATEGORICAL):
        counts = [int(d.sample[name].notna().sum()) for d in (current, reference)]
        if min(counts) < config.min_rows:
            skipped.append(
                FeatureDrift(
                    name, skipped=f"too few values (current {counts[0]}, reference {counts[1]})"
                )
            )
        else:
            compared.append(name)
    definition = DataDefinition(
        numerical_columns=[c for c in compared if c not in CATEGORICAL],
        categorical_columns=[c for c in compared if c in CATEGORICAL],
    )
    preset = DataDriftPreset(
        columns=compared,
        drift_share=config.drift_share,
        num_method=config.num_method,
        num_threshold=config.num_threshold,
        cat_method=config.cat_method,
        cat_threshold=config.cat_threshold,
        per_column_method={k: v for k, v in config.methods.items() if k in compared},
        per_column_threshold={k: v for k, v in config.thresholds.items() if k in compared},
    )
    snapshot = Report([preset], include_tests=True).run(
        Dataset.from_pandas(current.sample[compared], data_definition=definition),
        Dataset.from_pandas(reference.sample[compared], data_definition=definition),
    )
    result = DriftResult(
        model=model,
        current=WindowStats.of(current),
        reference=WindowStats.of(reference),
        features=(*_verdicts(snapshot), *skipped),
        drift_share=_share(snapshot),
        threshold=config.drift_share,
    )
    return result, snapshot


def _verdicts(snapshot: Snapshot) -> list[FeatureDrift]:
    """Per feature: Evidently's score, method and threshold, and its test's verdict."""
    report = snapshot.dict()
    failed = {
        t["metric_config"]["params"]["column"]
        for t in report["tests"]
        if "column" in t["metric_config"]["params"] and str(t["status"]).endswith("FAIL")
    }
    return [
        FeatureDrift(
            m["config"]["column"],
            m["config"]["method"],
            float(m["value"]),
            float(m["config"]["threshold"]),
            m["config"]["column"] in failed,
        )
        for m in report["metrics"]
        if m["config"]["type"].endswith("ValueDrift")
    ]


def _share(snapshot: Snapshot) -> float:
    counted = next(
        m for m in snapshot.dict()["metrics"] if m["config"]["type"].endswith("DriftedColumnsCount")
    )
    return float(counted["value"]["share"])


def check(
    current: Window,
    reference: Window,
    url: str,
    config: DriftConfig,
    model: str | None = None,
    *,
    count: CountUsage,
    read: IterUsage,
) -> tuple[DriftResult, Snapshot]:
    """Load both windows from the usage log at `url` with the readers handed in (the gateway's
    count_usage and iter_usage) and compare them. The count comes first: it fixes the sample."""
    loaded = [
        load_window(
            w,
            count(w.start, w.end, url, model),
            read(w.start, w.end, _READ, url, model, _CHUNK_ROWS),
            config,
        )
        for w in (current, reference)
    ]
    return compare(*loaded, config, model)


def metrics(result: DriftResult) -> dict[str, float]:
    """Figures for MLflow: drift share, exact window counts, each compared feature's score."""
    out = {"drift_share": result.drift_share, "drift_detected": float(result.detected)}
    for side, stats in (("current", result.current), ("reference", result.reference)):
        out |= {
            f"{side}/rows": stats.rows,
            f"{side}/sampled_rows": stats.sampled,
            f"{side}/error_rate": stats.error_rate,
            f"{side}/prompts": stats.prompts,
        }
    return out | {
        f"drift_score/{f.feature}": f.score for f in result.features if f.score is not None
    }


def markdown(result: DriftResult, link: str) -> str:
    """The Prefect artifact: verdict, windows, per-feature drift, exact tenant shares, the link."""
    drifted = ", ".join(result.drifted)
    if result.detected:
        verdict = f"**DRIFT** in {drifted}"
    else:
        verdict = f"no drift alarm (drifted: {drifted})" if drifted else "no drift"
    cur, ref = result.current, result.reference
    lines = [
        f"# Drift of {result.model or 'all models'}",
        "",
        f"{verdict}; drift share {result.drift_share:.2f}, alarm at {result.threshold:.2f}.",
        "",
        f"Evidently report: {link}",
        "",
        _row(
            "window", "from..to", "requests (all)", "sampled", "error rate (all)", "prompts (all)"
        ),
        _row(*["---"] * 6),
    ]
    for side, s in (("current", cur), ("reference", ref)):
        lines.append(
            _row(side, s.window.label, s.rows, s.sampled, f"{s.error_rate:.4f}", s.prompts)
        )
    lines += ["", _row("feature", "method", "score", "threshold", "drifted"), _row(*["---"] * 5)]
    for f in result.features:
        if f.skipped:
            lines.append(_row(f.feature, f"not compared: {f.skipped}", "", "", ""))
        else:
            drift = "yes" if f.drifted else "no"
            lines.append(_row(f.feature, f.method, f"{f.score:.4g}", f"{f.threshold:g}", drift))
    lines += ["", _row("tenant", "share, reference (all rows)", "share, current (all rows)")]
    lines.append(_row(*["---"] * 3))
    for tenant in sorted(set(cur.tenant_shares) | set(ref.tenant_shares)):
        shares = (ref.tenant_shares.get(tenant, 0), cur.tenant_shares.get(tenant, 0))
        lines.append(_row(tenant, *(f"{v:.4f}" for v in shares)))
    lines += ["", SAMPLING_NOTE]
    return "\n".join(lines)


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"
