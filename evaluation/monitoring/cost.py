"""The cost model: dollars per tenant, model, version and day from the usage log and the pricing.

All figures are exact over every request: the log is streamed in chunks and summed per hour,
tenant, model and version (only requests that reached a model version count; rejected ones cost
no GPU time), so a month of traffic needs memory for the sums, not the rows. The log is read
through the reader the caller passes in (evaluation.monitoring.usage).

- Hourly-billed versions (replicas x hardware price): a day costs price x replicas x hours, the
  hours being 24 for an always-on deployment and the hours with at least one request otherwise.
  Only days on which the version served a request are seen, so an idle day is not billed. The
  day's cost is allocated to tenants by their share of the version's tokens (prompt + completion)
  that day; a day with requests but no tokens is split by requests.
- Per-token versions: each tenant pays its own tokens at the configured prices.
- Dollars per million tokens: cost / (prompt + completion tokens) x 1e6.
- Utilisation (hourly-billed versions): request-seconds / replica-seconds billed, the sum of the
  requests' latencies over replicas x hours x 3600. Concurrent requests (vLLM batches them) each
  count, so a busy server can exceed 1: it reads as the mean number of requests in flight per
  replica.
- Saving: what the same prompt and completion tokens would cost at a reference API's list price,
  minus our cost (negative: the reference would have been cheaper).
- Budgets: a tenant's cost from the 1st of the month to the report day, against its monthly
  budget; an alert once the used share reaches its `alert_at`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from configs.pricing import Pricing
from evaluation.monitoring.usage import IterUsage

NO_TENANT = "(none)"
KEYS = ["day", "tenant", "model", "version"]
_READ = (
    "time",
    "tenant",
    "model",
    "backend_version",
    "error_kind",
    "prompt_tokens",
    "completion_tokens",
    "latency_ms",
)
_CHUNK_ROWS = 200_000  # rows per streamed frame: a month is summed in bounded memory
_HOURLY = ["hour", "tenant", "model", "version"]
_SUMS = ["requests", "errors", "prompt_tokens", "completion_tokens", "busy_s"]
_SERVED = [
    "day",
    "model",
    "version",
    "hardware",
    "replicas",
    "hours_billed",
    "cost_usd",
    "busy_s",
    "utilisation",
]


def hourly_usage(frames: Iterable[pd.DataFrame]) -> pd.DataFrame:
    """Usage rows streamed as `frames` of the usage log's columns, those that reached a model
    version summed per hour (unix hour), tenant, model and version."""
    parts = [_per_hour(chunk[chunk["backend_version"].notna()]) for chunk in frames]
    if not parts:
        return pd.DataFrame(columns=[*_HOURLY, *_SUMS])
    return pd.concat(parts).groupby(_HOURLY, as_index=False).sum()


def _per_hour(chunk: pd.DataFrame) -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "hour": (chunk["time"] // 3600).astype("int64"),
            "tenant": chunk["tenant"].fillna(NO_TENANT),
            "model": chunk["model"],
            "version": chunk["backend_version"].astype(str),
            "requests": 1,
            "errors": chunk["error_kind"].notna().astype("int64"),
            "prompt_tokens": chunk["prompt_tokens"].astype("int64"),
            "completion_tokens": chunk["completion_tokens"].astype("int64"),
            "busy_s": chunk["latency_ms"].astype("float64") / 1000.0,
        }
    )
    return frame.groupby(_HOURLY, as_index=False).sum()


def costs(hourly: pd.DataFrame, pricing: Pricing) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per (day, tenant, model, version): usage, cost, $/M tokens, reference cost and saving; and
    per (day, model, version) billed by the hour: hours billed and utilisation. Raises LookupError
    for a model version that no deployment in the pricing covers."""
    hourly = hourly.assign(day=pd.to_datetime(hourly["hour"] * 3600, unit="s", utc=True).dt.date)
    active_hours = hourly.groupby(["day", "model", "version"])["hour"].nunique()
    rows = hourly.groupby(KEYS, as_index=False)[_SUMS].sum()
    rows["tokens"] = rows["prompt_tokens"] + rows["completion_tokens"]
    rows["cost_usd"] = 0.0
    served = []
    for (day, model, version), group in rows.groupby(["day", "model", "version"]):
        deployment = pricing.deployment(model, version)
        if deployment.prices is not None:
            prices = deployment.prices
            rows.loc[group.index, "cost_usd"] = prices.cost(
                group["prompt_tokens"], group["completion_tokens"]
            )
            continue
        hours = 24 if deployment.always_on else int(active_hours[day, model, version])
        fixed = pricing.hardware[deployment.hardware].hourly_usd * deployment.replicas * hours
        weight = group["tokens"] if group["tokens"].sum() > 0 else group["requests"]
        rows.loc[group.index, "cost_usd"] = fixed * weight / weight.sum()
        busy = group["busy_s"].sum()
        utilisation = busy / (deployment.replicas * hours * 3600)
        served.append(
            (
                day,
                model,
                version,
                deployment.hardware,
                deployment.replicas,
                hours,
                fixed,
                busy,
                utilisation,
            )
        )
    rows["usd_per_million_tokens"] = _per_million(rows["cost_usd"], rows["tokens"])
    reference = pricing.reference[pricing.compare_with]
    rows["reference_usd"] = reference.cost(rows["prompt_tokens"], rows["completion_tokens"])
    rows["saving_usd"] = rows["reference_usd"] - rows["cost_usd"]
    return rows.sort_values(KEYS, ignore_index=True), pd.DataFrame(served, columns=_SERVED)


def _per_million(cost: pd.Series, tokens: pd.Series) -> pd.Series:
    return (cost / tokens.where(tokens > 0, np.nan) * 1e6).astype("float64")


@dataclass(frozen=True)
class BudgetAlert:
    tenant: str
    used_usd: float
    budget_usd: float
    alert_at: float

    @property
    def share(self) -> float:
        return self.used_usd / self.budget_usd

    def line(self) -> str:
        return (
            f"{self.tenant}: ${self.used_usd:.2f} of ${self.budget_usd:.2f} this month "
            f"({self.share:.0%}, alert at {self.alert_at:.0%})"
        )


def budget_alerts(month: pd.DataFrame, pricing: Pricing) -> list[BudgetAlert]:
    """Tenants whose cost this month has reached their budget's alert share."""
    used = month.groupby("tenant")["cost_usd"].sum()
    return [
        BudgetAlert(tenant, float(used[tenant]), budget.monthly_usd, budget.alert_at)
        for tenant, budget in sorted(pricing.budgets.items())
        if tenant in used and used[tenant] >= budget.alert_at * budget.monthly_usd
    ]


@dataclass(frozen=True)
class CostReport:
    """One day's costs, the month to date they belong to, utilisation, and budget alerts."""

    day: date
    rows: pd.DataFrame = field(repr=False)  # the day, per tenant/model/version
    month: pd.DataFrame = field(repr=False)  # 1st of the month .. day, same columns
    utilisation: pd.DataFrame = field(repr=False)  # the day, per model/version
    alerts: list[BudgetAlert]
    references: dict[str, float]  # the day's tokens at each reference's list prices

    @property
    def cost_usd(self) -> float:
        return float(self.rows["cost_usd"].sum())

    @property
    def tokens(self) -> int:
        return int(self.rows["tokens"].sum())

    @property
    def usd_per_million_tokens(self) -> float | None:
        return self.cost_usd / self.tokens * 1e6 if self.tokens else None

    def line(self) -> str:
        alerts = len(self.alerts)
        return (
            f"{self.day}: ${self.cost_usd:.2f} for {self.tokens} tokens, {alerts} budget alert(s)"
        )


def report(day: date, url: str, pricing: Pricing, *, read: IterUsage) -> CostReport:
    """The cost report of `day` (UTC), with the month to date for the budgets, from the usage
    log at `url` read with the reader handed in (the gateway's iter_usage)."""
    start, end = _midnight(day.replace(day=1)), _midnight(day + timedelta(days=1))
    frames = read(start, end, _READ, url, None, _CHUNK_ROWS)  # every model
    rows, utilisation = costs(hourly_usage(frames), pricing)
    today = rows[rows["day"] == day].reset_index(drop=True)
    references = {
        name: float(p.cost(today["prompt_tokens"].sum(), today["completion_tokens"].sum()))
        for name, p in pricing.reference.items()
    }
    return CostReport(
        day,
        today,
        rows,
        utilisation[utilisation["day"] == day].reset_index(drop=True),
        budget_alerts(rows, pricing),
        references,
    )


def metrics(r: CostReport) -> dict[str, float]:
    """Figures for MLflow: the day's totals, saving against each reference, utilisation."""
    out = {
        "cost_usd": r.cost_usd,
        "tokens": r.tokens,
        "requests": int(r.rows["requests"].sum()),
        "budget_alerts": len(r.alerts),
    }
    if r.usd_per_million_tokens is not None:
        out["usd_per_million_tokens"] = r.usd_per_million_tokens
    out |= {f"saving_usd/{name}": ref - r.cost_usd for name, ref in r.references.items()}
    return out | {
        f"utilisation/{u.model}/{u.version}": u.utilisation for u in r.utilisation.itertuples()
    }


def table(r: CostReport) -> list[dict[str, object]]:
    """The Prefect table artifact: the day's rows, rounded for reading."""
    dollars = ["cost_usd", "usd_per_million_tokens", "reference_usd", "saving_usd"]
    shown = [
        "tenant",
        "model",
        "version",
        "requests",
        "errors",
        "prompt_tokens",
        "completion_tokens",
        *dollars,
    ]
    out = r.rows[shown].round(dict.fromkeys(dollars, 4))
    return [
        {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in rec.items()}
        for rec in out.to_dict("records")
    ]


def summary(r: CostReport, pricing: Pricing, link: str) -> str:
    """The artifact's description: totals, savings, utilisation, alerts, and where the files are."""
    per_m = "n/a" if r.usd_per_million_tokens is None else f"${r.usd_per_million_tokens:.4f}"
    lines = [
        f"# Cost of {r.day} (UTC)",
        "",
        f"{_usd(r.cost_usd)} for {r.tokens} tokens ({per_m} per million); MLflow: {link}",
        "",
        f"Reference API list prices as of {pricing.reference_as_of}, for the same tokens:",
    ]
    lines += [
        f"- {name}: {_usd(ref)} (saving {_usd(ref - r.cost_usd)})"
        for name, ref in r.references.items()
    ]
    lines += ["", "Utilisation (request-seconds per replica-second billed):"]
    lines += [
        f"- {u.model} v{u.version}: {u.utilisation:.4f} "
        f"({u.replicas} x {u.hardware}, {u.hours_billed} h billed)"
        for u in r.utilisation.itertuples()
    ]
    lines += ["", "Budget alerts (month to date):" if r.alerts else "No budget alerts."]
    lines += [f"- {a.line()}" for a in r.alerts]
    lines += ["", "Hourly costs are shared among tenants by their share of tokens."]
    return "\n".join(lines)


def chart(r: CostReport, path: Path) -> Path:
    """PNG: cost per tenant per day over the month to date, stacked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.set_ylabel("USD")
    ax.set_title(f"Cost per tenant per day, {r.day:%B %Y} to {r.day}")
    if r.month.empty:
        ax.text(
            0.5, 0.5, "no requests reached a model this month", ha="center", transform=ax.transAxes
        )
    else:
        daily = r.month.pivot_table(
            index="day", columns="tenant", values="cost_usd", aggfunc="sum", fill_value=0
        )
        bottom = np.zeros(len(daily))
        labels = [d.strftime("%m-%d") for d in daily.index]
        for tenant in daily.columns:
            ax.bar(labels, daily[tenant], bottom=bottom, label=tenant)
            bottom += daily[tenant].to_numpy()
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _usd(value: float) -> str:
    return f"-${-value:.2f}" if value < 0 else f"${value:.2f}"


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)
