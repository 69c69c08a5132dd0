"""Drift of the traffic: a recent window of the usage log against a reference window, per feature.

Features per request: prompt and completion tokens, latency, TTFT (streams only), is_error
(error_kind set), tenant, and Evidently's offline text descriptors of the prompt (length, words,
sentences) where the tenant allows prompt logging. The reference is the same window a week
earlier (same hour and weekday, so daily and weekly cycles do not read as drift), the window
that starts when the champion was promoted, or, for a rollout, the champion's own traffic over
the rollout's span against the canary's (windows of one model version: rollout_windows).

What is exact and what is sampled: each window is streamed from the usage log in chunks, reading
only the columns needed, through the readers the caller passes in (evaluation.monitoring.usage).
Row counts, the error rate, the tenant shares and the number of logged prompts are counted over
ALL rows. The distribution tests run on a uniform sample of `sample_rows` rows per window, drawn
by position with a seeded generator, so a re-run gives the same report. At 50,000 rows a distance
is known to about +-0.01, a tenth of the 0.1 floor; a million rows per window cost seconds.

When a feature drifts (evaluation/monitoring/drift_rule.py): its test rejects at its share of the
alarm budget (false_alarm_rate over horizon_looks looks, split over the features compared) AND
its effect size reaches its floor. Evidently's DataDriftPreset makes the HTML report with the
same effect sizes (normed Wasserstein, Jensen-Shannon) against the floors, and the error rate's
z-test at its level; the verdicts, p-values and levels are in the artifact and MLflow.
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
from evaluation.monitoring import drift_rule as rule
from evaluation.monitoring.usage import CountUsage, IterUsage

if TYPE_CHECKING:
    from evidently.core.report import Snapshot

Reference = Literal["previous_week", "promotion", "rollout"]
NUMERIC = ("prompt_tokens", "completion_tokens", "latency_ms", "ttft_ms")
TEXT = ("prompt_chars", "prompt_words", "prompt_sentences")  # descriptors of logged prompts
CATEGORICAL = ("is_error", "tenant")
NO_TENANT = "(none)"  # requests that failed authentication
SAMPLING_NOTE = (
    "Distribution tests ran on a uniform seeded sample per window; counts, error rates and tenant "
    "shares are exact over all rows. A feature drifts when its test's p-value is below the test "
    "level (its share of the false-alarm budget: false_alarm_rate / horizon_looks / features "
    "compared) AND its effect size reaches the floor. Evidently's report shows the effect sizes "
    "against the floors (and the error rate's z-test at its level)."
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
    version: str | None = None  # only the rows this model version answered (backend_version)

    @property
    def label(self) -> str:
        span = f"{self.start:%Y-%m-%d %H:%M}..{self.end:%Y-%m-%d %H:%M} UTC"
        return span + (f", version {self.version}" if self.version else "")


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


def rollout_windows(
    started: datetime, ended: datetime, stable: str, canary: str
) -> tuple[Window, Window]:
    """A rollout's traffic: the canary version's requests (current) against the champion's
    (reference), both over the rollout's span, so time of day and load are the same for both."""
    started, ended = (t if t.tzinfo else t.replace(tzinfo=UTC) for t in (started, ended))
    return Window(started, ended, canary), Window(started, ended, stable)


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
    method: str = ""  # the effect size
    score: float | None = None  # the effect size's value
    threshold: float | None = None  # its floor
    drifted: bool = False
    skipped: str = ""  # why it was not compared
    test: str = ""
    p_value: float | None = None
    level: float | None = None  # the test rejects below it: its share of the alarm budget


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
    """Each feature with enough values in both samples judged by the decision rule
    (drift_rule), and Evidently's DataDriftPreset on them for the report; raises NotEnoughData
    when either window has fewer than `min_rows` requests."""
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
    level = rule.feature_level(config.false_alarm_rate, config.horizon_looks, len(compared))
    judged = [
        judge(name, current.sample[name], reference.sample[name], config.floor(name), level)
        for name in compared
    ]
    definition = DataDefinition(
        numerical_columns=[c for c in compared if c not in CATEGORICAL],
        categorical_columns=[c for c in compared if c in CATEGORICAL],
    )
    # The report's methods are the rule's effect sizes against their floors; the error rate's is
    # its z-test at the rule's level (Evidently has no difference of proportions).
    thresholds = {c: config.floor(c) for c in compared if c != "is_error"}
    if "is_error" in compared:
        thresholds["is_error"] = level
    preset = DataDriftPreset(
        columns=compared,
        drift_share=config.drift_share,
        num_method=rule.NUMBER_EFFECT,
        num_threshold=config.num_floor,
        cat_method=rule.TENANT_EFFECT,
        cat_threshold=config.cat_floor,
        per_column_method={"is_error": rule.ERROR_TEST} if "is_error" in compared else {},
        per_column_threshold=thresholds,
    )
    snapshot = Report([preset], include_tests=True).run(
        Dataset.from_pandas(current.sample[compared], data_definition=definition),
        Dataset.from_pandas(reference.sample[compared], data_definition=definition),
    )
    result = DriftResult(
        model=model,
        current=WindowStats.of(current),
        reference=WindowStats.of(reference),
        features=(*judged, *skipped),
        drift_share=sum(f.drifted for f in judged) / len(judged) if judged else 0.0,
        threshold=config.drift_share,
    )
    return result, snapshot


def judge(
    name: str, current: pd.Series, reference: pd.Series, floor: float, level: float
) -> FeatureDrift:
    """One feature's verdict by the decision rule, from the two samples' values."""
    if name == "is_error":
        stats = rule.proportions(reference.sum(), len(reference), current.sum(), len(current))
        test, effect = rule.ERROR_TEST, rule.ERROR_EFFECT
    elif name in CATEGORICAL:
        ref, cur = (s.dropna().astype(str).value_counts() for s in (reference, current))
        seen = sorted(set(ref.index) | set(cur.index))
        stats = rule.categories(
            ref.reindex(seen, fill_value=0).to_numpy()[None],
            cur.reindex(seen, fill_value=0).to_numpy()[None],
        )
        test, effect = rule.TENANT_TEST, rule.TENANT_EFFECT
    else:
        stats = rule.numbers(
            reference.to_numpy("float64", na_value=np.nan)[None],
            current.to_numpy("float64", na_value=np.nan)[None],
        )
        test, effect = rule.NUMBER_TEST, rule.NUMBER_EFFECT
    return FeatureDrift(
        name,
        effect,
        float(stats.effect[0]),
        floor,
        bool(rule.drifted(stats, level, floor)[0]),
        test=test,
        p_value=float(stats.p_value[0]),
        level=level,
    )


def report_values(snapshot: Snapshot) -> dict[str, tuple[str, float]]:
    """What Evidently's report computed per feature: (method, value)."""
    return {
        m["config"]["column"]: (m["config"]["method"], float(m["value"]))
        for m in snapshot.dict()["metrics"]
        if m["config"]["type"].endswith("ValueDrift")
    }


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
        load_window(w, *_rows(w, url, model, count, read), config) for w in (current, reference)
    ]
    return compare(*loaded, config, model)


def _rows(
    w: Window, url: str, model: str | None, count: CountUsage, read: IterUsage
) -> tuple[int, Iterable[pd.DataFrame]]:
    """The window's row count and its rows; for one version's window, the count is a first pass
    over the version column alone (the readers filter by time and model only)."""
    if w.version is None:
        return count(w.start, w.end, url, model), read(
            w.start, w.end, _READ, url, model, _CHUNK_ROWS
        )

    def mine(frame: pd.DataFrame) -> pd.DataFrame:
        kept = frame[frame["backend_version"].astype(str) == w.version]
        return kept.drop(columns="backend_version").reset_index(drop=True)

    columns = (*_READ, "backend_version")
    versions = read(w.start, w.end, ("backend_version",), url, model, _CHUNK_ROWS)
    total = sum(int((f["backend_version"].astype(str) == w.version).sum()) for f in versions)
    return total, (mine(f) for f in read(w.start, w.end, columns, url, model, _CHUNK_ROWS))


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
    for f in result.features:
        if f.score is not None:
            out[f"drift_score/{f.feature}"] = f.score
        if f.p_value is not None and f.level is not None:
            out[f"drift_p/{f.feature}"] = f.p_value
            out["drift_test_level"] = f.level
    return out


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
    head = ("feature", "effect size", "value", "floor", "test", "p-value", "test level", "drifted")
    lines += ["", _row(*head), _row(*["---"] * len(head))]
    for f in result.features:
        if f.skipped:
            lines.append(_row(f.feature, f"not compared: {f.skipped}", *[""] * (len(head) - 2)))
        else:
            drift = "yes" if f.drifted else "no"
            cells = (f.method, f"{f.score:.4g}", f"{f.threshold:g}", f.test, f"{f.p_value:.3g}")
            lines.append(_row(f.feature, *cells, f"{f.level:.3g}", drift))
    lines += ["", _row("tenant", "share, reference (all rows)", "share, current (all rows)")]
    lines.append(_row(*["---"] * 3))
    for tenant in sorted(set(cur.tenant_shares) | set(ref.tenant_shares)):
        shares = (ref.tenant_shares.get(tenant, 0), cur.tenant_shares.get(tenant, 0))
        lines.append(_row(tenant, *(f"{v:.4f}" for v in shares)))
    lines += ["", SAMPLING_NOTE]
    return "\n".join(lines)


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"
