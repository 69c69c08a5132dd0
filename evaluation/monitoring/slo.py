"""Prometheus rules from the SLOs (configs/slo.yaml): per SLI, a recording rule of its bad-event
ratio over each alert window, and multi-window, multi-burn-rate alerts on them as the Google SRE
workbook ("Alerting on SLOs") sets them out. `rule_file` returns the file as a dict; `write_rules`
writes it as YAML for Prometheus' `rule_files`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from configs.slo import Latency, Objectives, SloConfig

# The gateway's series (serving/gateway/metrics.py); Prometheus names a counter's samples _total.
RESPONSES = "slipway_gateway_responses_total"  # labels: tenant, code
BACKEND_REQUESTS = "slipway_gateway_backend_requests_total"  # labels: model, version, role
BACKEND_ERRORS = "slipway_gateway_backend_errors_total"  # 5xx, timeout, unreachable, broken off
TTFT = "slipway_gateway_backend_ttft_seconds"  # histogram of streamed attempts that succeeded
# Mirrored copies reach no client: their failures and latency spend no one's budget.
SERVED = 'role!="shadow"'
# A 5xx is the service failing. A 429 (the tenant's own limit) or a 499 (the client left first) is
# no failure of the service, nor a request it could complete: neither counts on either side.
FAILED = 'code=~"5.."'
ASKED = 'code!~"429|499"'

RECORD = "slo:sli_error:ratio_rate{}"
RULES = "slipway-slo.rules.yml"  # write_rules' file name
WINDOWS = ("5m", "30m", "1h", "6h", "3d")
_HOURS = {"5m": 5 / 60, "30m": 0.5, "1h": 1.0, "6h": 6.0, "3d": 72.0}


@dataclass(frozen=True)
class Burn:
    """Alert while the bad-event ratio exceeds `factor` x the budget (1 - objective) over both
    windows: the long one makes it significant, the short one stops it soon after a recovery."""

    alert: str
    severity: str
    long: str
    short: str
    factor: float

    def consumed(self, window_hours: int) -> float:
        """The share of the window's budget spent by the time this alert fires."""
        return self.factor * _HOURS[self.long] / window_hours


# The workbook's: 2% of a 30-day budget in an hour or 5% in six hours pages; 10% in 3 days (1x,
# the rate that spends exactly the budget) opens a ticket.
BURNS = (
    Burn("SloErrorBudgetBurnFast", "page", "1h", "5m", 14.4),
    Burn("SloErrorBudgetBurnSlow", "page", "6h", "30m", 6.0),
    Burn("SloErrorBudgetBurnTicket", "ticket", "3d", "6h", 1.0),
)


@dataclass(frozen=True)
class Sli:
    """One objective: its bad-event ratio is `counted` / `total`, or 1 minus it when `counted`
    are the good events (a histogram counts the requests under a bound, not over it)."""

    labels: dict[str, str]
    objective: float
    counted: str
    total: str
    counted_good: bool = False

    @property
    def name(self) -> str:
        return self.labels["slo"]

    def ratio(self, window: str) -> str:
        share = f"sum(rate({self.counted}[{window}])) / sum(rate({self.total}[{window}]))"
        return f"1 - ({share})" if self.counted_good else share


def _selector(metric: str, *matchers: str) -> str:
    return f"{metric}{{{', '.join(matchers)}}}"


def _latency(slo: str, scope: dict[str, str], matchers: tuple[str, ...], latency: Latency) -> Sli:
    # The bound as the gateway writes its `le` label (repr of the float, e.g. "1.0").
    under = _selector(f"{TTFT}_bucket", *matchers, f'le="{latency.ttft_s!r}"')
    return Sli(
        {"slo": f"{slo}-latency", "sli": "latency", **scope},
        latency.objective,
        counted=under,
        total=_selector(f"{TTFT}_count", *matchers),
        counted_good=True,
    )


def _gateway_slis(objectives: Objectives) -> list[Sli]:
    out = []
    if objectives.availability is not None:
        out.append(
            Sli(
                {"slo": "gateway-availability", "sli": "availability"},
                objectives.availability,
                counted=_selector(RESPONSES, FAILED),
                total=_selector(RESPONSES, ASKED),
            )
        )
    if objectives.latency is not None:
        out.append(_latency("gateway", {}, (SERVED,), objectives.latency))
    return out


def _model_slis(model: str, objectives: Objectives) -> list[Sli]:
    # Attempts, not responses (the responses counter has no model label): a canary's failure that
    # stable then answered still counts here, so the model's SLI errs on the strict side.
    matchers = (f"model={json.dumps(model)}", SERVED)
    scope = {"model": model}
    out = []
    if objectives.availability is not None:
        out.append(
            Sli(
                {"slo": f"{model}-availability", "sli": "availability", **scope},
                objectives.availability,
                counted=_selector(BACKEND_ERRORS, *matchers),
                total=_selector(BACKEND_REQUESTS, *matchers),
            )
        )
    if objectives.latency is not None:
        out.append(_latency(model, scope, matchers, objectives.latency))
    return out


def slis(config: SloConfig) -> list[Sli]:
    out = _gateway_slis(config.gateway) if config.gateway else []
    for model, objectives in config.models.items():
        out.extend(_model_slis(model, objectives))
    return out


def scaled(window: str, time_scale: float) -> str:
    """`window` times `time_scale` as a Prometheus duration (the window itself at 1)."""
    if time_scale == 1:
        return window
    ms = round(_HOURS[window] * 3600 * 1000 * time_scale)
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def recording_rules(sli: Sli, time_scale: float = 1.0) -> list[dict]:
    """Per window, the bad-event ratio; `time_scale` shortens the ranges (tests: 1/60 makes an
    hour a minute) and keeps the names, so the alerts read them unchanged."""
    return [
        {
            "record": RECORD.format(w),
            "expr": sli.ratio(scaled(w, time_scale)),
            "labels": dict(sli.labels),
        }
        for w in WINDOWS
    ]


def alert_rules(sli: Sli, window: str, window_hours: int) -> list[dict]:
    rules = []
    for burn in BURNS:
        # Written out rather than computed, so the rule reads as the objective it guards.
        threshold = f"({burn.factor!r} * (1 - {sli.objective!r}))"
        chosen = f"{{slo={json.dumps(sli.name)}}}"
        expr = (
            f"{RECORD.format(burn.long)}{chosen} > {threshold}"
            f" and {RECORD.format(burn.short)}{chosen} > {threshold}"
        )
        consumed = f"{100 * burn.consumed(window_hours):.3g}%"
        rules.append(
            {
                "alert": burn.alert,
                "expr": expr,
                # The SLI's labels too, or promtool finds the alerts of two SLOs duplicates.
                "labels": {"severity": burn.severity, **sli.labels},
                "annotations": {
                    "summary": f"SLO {sli.name}: error budget burning at {burn.factor:g}x",
                    "description": (
                        f"The {sli.labels['sli']} bad-event ratio over {burn.long} and over "
                        f"{burn.short} exceeds {burn.factor:g} x the budget of "
                        f"{1 - sli.objective:.4g} (objective {sli.objective!r}): at this rate "
                        f"{consumed} of the {window} budget is spent in {burn.long}."
                    ),
                    "burn_rate": f"{burn.factor:g}",
                    "budget_consumed": consumed,
                    "windows": f"{burn.long} and {burn.short}",
                },
            }
        )
    return rules


def rule_file(config: SloConfig, time_scale: float = 1.0) -> dict:
    """One group per SLI: Prometheus evaluates a group's rules in order, so its alerts read the
    ratios recorded just before them. `time_scale` below 1 shortens every window by that factor
    (recording_rules), for tests only."""
    return {
        "groups": [
            {
                "name": f"slo-{sli.name}",
                "rules": [
                    *recording_rules(sli, time_scale),
                    *alert_rules(sli, config.window, config.window_hours),
                ],
            }
            for sli in slis(config)
        ]
    }


def write_rules(config: SloConfig, out: Path, time_scale: float = 1.0) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / RULES
    rules = rule_file(config, time_scale)
    path.write_text(yaml.safe_dump(rules, sort_keys=False, width=1000))
    return path
