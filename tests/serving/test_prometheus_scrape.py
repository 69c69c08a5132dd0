"""A real Prometheus scraping a real gateway: every query of the Grafana dashboard and every
recording rule of the SLO rule file, evaluated through Prometheus' HTTP API after a known load,
returns the series that load implies; and the gateway's series stay within a stated budget
however many tenants call it.

The load (several tenants at known rates, a known share of answers replayed by the response cache,
unauthenticated callers, the mock upstream failing one attempt in EVERY) is counted client-side,
request by request. Dashboard queries are evaluated twice: over the load's exact span (the range
runs from the scrape just before the load to the scrape just after it, so Prometheus extrapolates
nothing and every rate is a count over that span: ratios and counts must match exactly), and over
a 5 s window inside the load (request rates within 20% of the rates the client sent at).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import aiohttp
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from configs.home import REPO
from configs.slo import load_slo_config
from evaluation.benchmarks.mock_upstream import Fault, MockUpstream, serve
from evaluation.monitoring.slo import rule_file, write_rules
from serving.gateway.app import build_app
from tests.prometheus import Prometheus, binary, running_prometheus
from tests.serving.conftest import Secrets, backend

DASHBOARD = REPO / "configs" / "grafana-dashboard.json"
SLO = load_slo_config()  # the shipped configs/slo.yaml: the gateway serves the model it names
[MODEL] = SLO.models  # the test's one route; a second model in slo.yaml needs a second route here
SERVED = "served-1"  # the mock upstream's name for the one backend (conftest.backend)
WEIGHT = 100.0
EVERY = 5  # the mock fails one attempt in EVERY with a 500: an injected error ratio of 20%
RATES = {"acme": 9.0, "globex": 7.0, "initech": 6.0, "umbrella": 5.0}  # requests/s per tenant
ANONYMOUS_RPS = 3.0  # callers without a key: 401s, tenant ""
LOAD_S = 8.0
CACHED_EVERY = 4  # one request in 4 of each tenant is deterministic (temperature 0, same body)
MAX_TOKENS = 2  # the mock answers max_tokens words: completion tokens per answer
PROMPT = 3  # words in every prompt: the mock's prompt tokens per answer
RATE_WINDOW_S = 5


@pytest.fixture
def prometheus() -> str:
    """The prometheus binary, or a skip; in CI (CI=true) its absence fails."""
    return binary("prometheus", "prometheus")


@dataclass
class Load:
    """What the client sent and got, request by request."""

    answers: Counter[tuple[str, int]] = field(default_factory=Counter)  # (tenant, status)
    hits: int = 0  # answered by the cache (x-slipway-cache: hit): no backend saw them
    misses: int = 0  # looked up in the cache and not found (x-slipway-cache: miss)
    backend_ok: int = 0  # backend attempts answered 200
    backend_failed: int = 0  # backend attempts answered 500 (the injected faults)

    @property
    def backend(self) -> int:
        return self.backend_ok + self.backend_failed

    def add(self, tenant: str, status: int, cache: str | None) -> None:
        self.answers[(tenant, status)] += 1
        self.hits += cache == "hit"
        self.misses += cache == "miss"
        if tenant and cache != "hit":  # an authenticated request the cache did not answer
            assert status in (200, 500), (tenant, status)
            self.backend_ok += status == 200
            self.backend_failed += status == 500


def body(tenant: str, i: int) -> dict:
    """Every CACHED_EVERY-th request deterministic and the same (the cache answers repeats);
    the others alternate streamed and not. Every prompt is PROMPT words."""
    if i % CACHED_EVERY == 0:
        content, extra = "the same question", {"temperature": 0}
    else:
        content, extra = f"hello from {tenant}", {"stream": i % 2 == 1}
    messages = [{"role": "user", "content": content}]
    return {"model": MODEL, "messages": messages, "max_tokens": MAX_TOKENS, **extra}


async def drive(base: str, keys: Secrets, rates: dict[str, float], seconds: float) -> Load:
    """Open-loop load: each caller sends at its own steady rate for `seconds`, whatever the
    answers take; tenant "" sends no key."""
    load = Load()
    url = f"{base}/v1/chat/completions"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def send(tenant: str, i: int, at: float) -> None:
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            headers = {"Authorization": f"Bearer {keys.key(tenant)}"} if tenant else {}
            async with session.post(url, json=body(tenant or "nobody", i), headers=headers) as r:
                await r.read()
                load.add(tenant, r.status, r.headers.get("x-slipway-cache"))

        start = time.monotonic() + 0.05
        sends = [
            send(tenant, i, start + i / rate)
            for tenant, rate in rates.items()
            for i in range(round(rate * seconds))
        ]
        await asyncio.gather(*sends)
    return load


def warm_up(base: str, keys: Secrets, upstream: MockUpstream) -> Load:
    """Before the measured load: every (tenant, status) series it will produce is born, so the
    load's span starts at a scrape where each already exists. One at a time, the mock failing
    every second attempt: each tenant gets a 200, then a 500."""
    upstream.faults[SERVED] = Fault(status=500, every=2)
    load = Load()
    with httpx.Client(timeout=10) as client:
        for tenant in RATES:
            for i in (1, 3):  # not cacheable
                r = client.post(
                    f"{base}/v1/chat/completions",
                    json=body(tenant, i),
                    headers={"Authorization": f"Bearer {keys.key(tenant)}"},
                )
                load.add(tenant, r.status_code, r.headers.get("x-slipway-cache"))
        r = client.post(f"{base}/v1/chat/completions", json=body("nobody", 1))
        load.add("", r.status_code, None)
    assert load.answers == {
        **{(t, 200): 1 for t in RATES},
        **{(t, 500): 1 for t in RATES},
        ("", 401): 1,
    }
    upstream.faults[SERVED] = Fault(status=500, every=EVERY)  # counts afresh from the load's first
    return load


def model_regex(values: list[str]) -> str:
    """What Grafana puts for a multi-value variable set to All: its values as an alternation."""
    escaped = [re.sub(r"([.+*?()\[\]{}|^$\\])", r"\\\\\1", v) for v in values]
    return "(" + "|".join(escaped) + ")" if len(escaped) > 1 else escaped[0]


def dashboard_variables(prom: Prometheus, dashboard: dict) -> dict[str, str]:
    """Evaluate the dashboard's query variables as Grafana does (label_values(metric, label))."""
    out = {}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = (
            variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        )
        m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query)
        assert m, f"variable {variable['name']}: {query!r} is not label_values(metric, label)"
        values = prom.get(f"/api/v1/label/{m[2]}/values", **{"match[]": m[1]})
        assert values, f"variable {variable['name']}: {query!r} finds no values"
        out[variable["name"]] = model_regex(values)
    return out


def _load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def targets(dashboard: dict) -> Iterator[tuple[str, str, str]]:
    """(panel title, refId, expr) of every query of every panel."""
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["refId"], target["expr"]


def substitute(expr: str, variables: dict[str, str], window: str) -> str:
    grafana = {"__rate_interval": window, "__interval": window, "__range": window}
    out = re.sub(r"\$\{?(\w+)\}?", lambda m: {**variables, **grafana}.get(m[1], m[0]), expr)
    assert "$" not in out, f"a dashboard variable the test does not know: {out}"
    return out


Series = list[tuple[dict[str, str], float]]


def one(series: Series) -> float:
    assert len(series) == 1, series
    return series[0][1]


def by(series: Series, *labels: str) -> dict[tuple[str, ...], float]:
    return {tuple(s.get(label, "") for label in labels): v for s, v in series}


def close(got: float, want: float, rel: float = 1e-3) -> bool:
    return math.isclose(got, want, rel_tol=rel, abs_tol=1e-9)


def exact_checks(load: Load, span_s: float) -> dict[tuple[str, str], Callable[[Series], None]]:
    """Per (panel title, refId): what its series must be over the load's exact span."""
    backend = (MODEL, "1", "stable")
    ratio = load.backend_failed / load.backend

    def requests(s: Series) -> None:
        assert by(s, "model", "version", "role") == {
            backend: pytest.approx(load.backend / span_s, rel=1e-3)
        }

    def errors(s: Series) -> None:
        assert by(s, "model", "version", "role") == {backend: pytest.approx(ratio, rel=1e-3)}
        # The injected ratio, as exactly as whole requests allow: one attempt in EVERY failed.
        assert load.backend_failed == load.backend // EVERY

    def quantiles(low: float, high: float) -> Callable[[Series], None]:
        def check(s: Series) -> None:
            assert set(by(s, "model", "version", "role")) == {backend}, s
            assert low <= one(s) <= high, s

        return check

    def tokens(s: Series) -> None:
        assert by(s, "kind", "version") == {
            ("prompt", "1"): pytest.approx(PROMPT * load.backend_ok / span_s, rel=1e-3),
            ("completion", "1"): pytest.approx(MAX_TOKENS * load.backend_ok / span_s, rel=1e-3),
        }

    def gauge(value: float) -> Callable[[Series], None]:
        def check(s: Series) -> None:
            assert by(s, "model", "version", "role") == {backend: value}

        return check

    def responses(s: Series) -> None:
        # Every pair the load gave at its count over the span; the warm-up's other pairs at 0.
        got = by(s, "tenant", "code")
        want = {(t, str(c)): n / span_s for (t, c), n in load.answers.items()}
        assert set(want) <= set(got), (got, want)
        assert all(close(v, want.get(k, 0.0)) for k, v in got.items()), (got, want)

    def pending(s: Series) -> None:
        assert one(s) >= 0

    def dropped(s: Series) -> None:
        assert one(s) == 0

    def hit_ratio(s: Series) -> None:
        assert load.hits > 0 and close(one(s), load.hits / (load.hits + load.misses)), s

    def cached_bytes(s: Series) -> None:
        assert one(s) > 0

    def per_replica(value: float) -> Callable[[Series], None]:
        # One server (the mock): idle once the load is over, its circuit closed; the mock keeps
        # no prefix cache, so its readings are 0.
        def check(s: Series) -> None:
            assert by(s, "model", "version") == {(MODEL, "1"): value}, s
            assert all(labels["replica"].startswith("http://127.0.0.1:") for labels, _ in s)

        return check

    return {
        ("Requests / s per backend", "A"): requests,
        ("Error ratio per backend", "A"): errors,
        # The mock answers after 10 ms, 5 ms between events: the latencies are over the 10 ms
        # bucket's lower bound (ITL over 1 ms), under 2 s, and p99 is no lower than p50.
        ("TTFT p50 / p99", "A"): quantiles(0.01, 2.0),
        ("TTFT p50 / p99", "B"): quantiles(0.01, 2.0),
        ("Inter-token latency p50 / p99", "A"): quantiles(0.001, 2.0),
        ("Inter-token latency p50 / p99", "B"): quantiles(0.001, 2.0),
        ("End-to-end latency p50 / p99", "A"): quantiles(0.01, 2.0),
        ("End-to-end latency p50 / p99", "B"): quantiles(0.01, 2.0),
        ("Tokens / s", "A"): tokens,
        ("Weights, in flight and waiting", "A"): gauge(WEIGHT),
        ("Weights, in flight and waiting", "B"): gauge(0),  # the load is over
        ("Weights, in flight and waiting", "C"): gauge(0),
        ("Circuit open", "A"): gauge(0),
        ("Responses / s by tenant and status", "A"): responses,
        ("Usage log: pending and dropped", "A"): pending,
        ("Usage log: pending and dropped", "B"): dropped,
        ("Response cache: hit ratio and bytes held", "A"): hit_ratio,
        ("Response cache: hit ratio and bytes held", "B"): cached_bytes,
        ("Replicas: in flight, engine queue, circuit", "A"): per_replica(0),
        ("Replicas: in flight, engine queue, circuit", "B"): per_replica(0),
        ("Replicas: in flight, engine queue, circuit", "C"): per_replica(0),
        ("Prefix cache per replica: prompt tokens looked up and found / s", "A"): per_replica(0),
        ("Prefix cache per replica: prompt tokens looked up and found / s", "B"): per_replica(0),
    }


def check_dashboard(
    prom: Prometheus, dashboard: dict, load: Load, start: float, end: float
) -> dict[tuple[str, str], Series]:
    """Evaluate every dashboard query at `end` over the span from the scrape at `start`:
    each must be non-empty and as the load says. Returns what each query gave."""
    span_ms = round((end - start) * 1000)
    variables = dashboard_variables(prom, dashboard)
    assert variables == {"model": MODEL}
    checks = exact_checks(load, span_ms / 1000)
    found = set(targets_of(dashboard))
    assert found == set(checks), (
        f"queries without an expectation here: {found - set(checks)}; "
        f"expectations for no query: {set(checks) - found}"
    )
    # 1 ms more than the span, so the scrape at `start` is inside the range whether its start
    # is closed (Prometheus 2) or open (3); the 1 ms of extrapolation is 1e-4 of the span.
    window = f"{span_ms + 1}ms"
    out = {}
    for title, ref, expr in targets(dashboard):
        query = substitute(expr, variables, window)
        series = prom.query(query, end)
        assert series, f"{title} ({ref}) is empty: {query}"
        try:
            checks[(title, ref)](series)
        except AssertionError as e:
            raise AssertionError(f"{title} ({ref}): {query}\n-> {series}\n{e}") from e
        out[(title, ref)] = series
    return out


def targets_of(dashboard: dict) -> list[tuple[str, str]]:
    return [(title, ref) for title, ref, _ in targets(dashboard)]


def check_rates(
    prom: Prometheus, dashboard: dict, at: float, load_s: float, load: Load
) -> dict[str, float]:
    """The request-rate panels over a RATE_WINDOW_S window inside the load, against the rates
    the client sent at: each within 20%."""
    variables = dashboard_variables(prom, dashboard)
    exprs = {(title, ref): expr for title, ref, expr in targets(dashboard)}
    window = f"{RATE_WINDOW_S}s"
    per_tenant = by(
        prom.query(
            substitute(exprs[("Responses / s by tenant and status", "A")], variables, window), at
        ),
        "tenant",
        "code",
    )
    got = Counter()
    for (tenant, _), value in per_tenant.items():
        got[tenant] += value
    for tenant, rate in RATES.items():
        assert got[tenant] == pytest.approx(rate, rel=0.2), (tenant, got[tenant], rate)
    # What reached the backend: every authenticated request but the cache's hits.
    sent_to_backend = load.backend / load_s
    backend = one(
        prom.query(substitute(exprs[("Requests / s per backend", "A")], variables, window), at)
    )
    assert backend == pytest.approx(sent_to_backend, rel=0.2), (backend, sent_to_backend)
    return {**got, "backend": backend, "backend_sent": sent_to_backend}


def test_dashboard_and_slo_rules_read_a_real_scrape(prometheus, tmp_path, home):
    keys = Secrets()
    upstream = MockUpstream(delay_s=0.01, chunk_delay_s=0.005)
    rules = write_rules(SLO, tmp_path / "rules")
    dashboard = _load_dashboard()
    with serve(upstream) as url:
        config = keys.config(
            [],
            tenants=[keys.tenant(t) for t in RATES],
            routes=[{"model": MODEL, "backends": [backend(url, "1", weight=WEIGHT)]}],
            cache={"enabled": True},
            # No circuit opens at 20% errors: every request stays on the one backend.
            breaker={"failures": 1000},
        )
        with (
            serve(build_app(config, home)) as base,
            running_prometheus(prometheus, tmp_path / "prom", base, rules) as prom,
        ):
            # The backend's series are born at 0 in Prometheus' first scrape, before any request.
            prom.scrape_after(0)
            warm = warm_up(base, keys, upstream)
            start = prom.scrape_after(time.time() + 0.05)
            began = time.monotonic()
            load = asyncio.run(drive(base, keys, {**RATES, "": ANONYMOUS_RPS}, LOAD_S))
            load_s = time.monotonic() - began
            ended = time.time()
            end = prom.scrape_after(ended + 0.05)

            exact = check_dashboard(prom, dashboard, load, start, end)
            # A window inside the load: its last scrape at least 0.5 s before the load's end.
            inside = [t for t in prom.scrapes() if start + RATE_WINDOW_S + 1 <= t <= ended - 0.5]
            assert inside, (start, ended, prom.scrapes())
            rates = check_rates(prom, dashboard, inside[-1], LOAD_S, load)

            # The rules, evaluated every second, have read the scrape at `end`.
            prom.scrape_after(end + 1.5)
            recorded = check_slo_rules(prom, warm, load, start, end, time.time())
            firing = {
                (a["labels"]["alertname"], a["labels"]["slo"])
                for a in prom.get("/api/v1/alerts")["alerts"]
                if a["state"] == "firing"
            }
    # 20% errors burn a 99.9% budget at 200x: every availability alert fires (no `for`); the
    # latency SLO, every first token in time, fires nothing.
    burns = ("SloErrorBudgetBurnFast", "SloErrorBudgetBurnSlow", "SloErrorBudgetBurnTicket")
    assert firing == {
        (alert, slo) for alert in burns for slo in ("gateway-availability", f"{MODEL}-availability")
    }
    print(
        f"\nload {load_s:.1f} s: {sum(load.answers.values())} answers, {load.backend} backend "
        f"attempts ({load.backend_failed} failed), {load.hits} cache hits; rates {rates}; "
        f"span {end - start:.3f} s; error ratio "
        f"{one(exact[('Error ratio per backend', 'A')]):.4f}; slo {recorded}"
    )


def sli_ratios(answers: Counter[tuple[str, int]], backend_failed: int, backend: int) -> dict:
    """Each SLO's bad-event ratio as the client counted it."""
    failed = sum(n for (_, code), n in answers.items() if code >= 500)
    asked = sum(n for (_, code), n in answers.items() if code not in (429, 499))
    return {
        "gateway-availability": failed / asked,
        f"{MODEL}-availability": backend_failed / backend,
        f"{MODEL}-latency": 0.0,  # every first token under 1 s
    }


def check_slo_rules(
    prom: Prometheus, warm: Load, load: Load, start: float, end: float, at: float
) -> dict[str, float]:
    """Every recording rule of the rule file, two ways.

    Its expression over the load's exact span (from the scrape at `start` to the one at `end`):
    the ratio the client counted in the load, exactly.

    The series Prometheus recorded from the rule file at `at`, over the rule's own window (all of
    the run, warm-up included): the backend's and TTFT series exist from Prometheus' first scrape
    at 0 and share their scrapes, so Prometheus extrapolates each by the same factor and their
    ratio is exact; the responses series are born at their first answer, mid-range, each then
    extrapolated its own way: that ratio is within 10% of the counted one."""
    span = f"{round((end - start) * 1000) + 1}ms"
    exact = sli_ratios(load.answers, load.backend_failed, load.backend)
    whole = sli_ratios(
        warm.answers + load.answers,
        warm.backend_failed + load.backend_failed,
        warm.backend + load.backend,
    )
    tolerance = {"gateway-availability": 0.1, f"{MODEL}-availability": 1e-3, f"{MODEL}-latency": 0}
    recorded = {}
    for group in rule_file(SLO)["groups"]:
        for rule in group["rules"]:
            if "record" not in rule:
                continue
            slo = rule["labels"]["slo"]
            window = "[" + rule["record"].removeprefix("slo:sli_error:ratio_rate") + "]"
            assert window in rule["expr"], rule
            expr = rule["expr"].replace(window, f"[{span}]")
            value = one(prom.query(expr, end))
            assert value == pytest.approx(exact[slo], rel=1e-3, abs=1e-9), (expr, value, exact)
            selector = f'{rule["record"]}{{slo="{slo}"}}'
            [(labels, value)] = prom.query(selector, at)
            assert labels == {"__name__": rule["record"], **rule["labels"]}, labels
            assert value == pytest.approx(whole[slo], rel=tolerance[slo], abs=1e-9), (
                selector,
                value,
                whole,
            )
            recorded[f"{slo} {window}"] = value
    assert set(exact) == {k.split()[0] for k in recorded}
    return recorded


# The series budget. /metrics exposes:
#   - per backend (a version of a route): 8 counters and gauges and 3 histograms of
#     len(LATENCY_BUCKETS) + 1 buckets, _sum and _count (89), 4 counters for each of its shadow
#     and failover roles once they have traffic (8): at most PER_BACKEND;
#   - per server of a backend (its url and replicas): 5 series: at most PER_SERVER;
#   - a few gateway-wide series (routes version, limits store outages, usage log, cache): FIXED;
#   - responses: one series per (tenant, status code) pair that occurred, the tenant a configured
#     one (tenants are created by admins) or "" for every caller without a valid key.
# So series <= FIXED + PER_BACKEND * backends + PER_SERVER * servers + sum over tenants (and "")
# of the distinct statuses each received, <= ... + (tenants + 1) * statuses: no caller can add a
# label value of its own choosing, and nothing else grows with the tenants.
FIXED = 20
PER_BACKEND = 100
PER_SERVER = 10


def budget(backends: int, servers: int, statuses_per_tenant: dict[str, int]) -> int:
    return FIXED + PER_BACKEND * backends + PER_SERVER * servers + sum(statuses_per_tenant.values())


def series_count(base: str) -> int:
    text = httpx.get(f"{base}/metrics").text
    return sum(len(f.samples) for f in text_string_to_metric_families(text))


def test_series_stay_within_budget_however_many_tenants_call(home):
    """50 tenants each get a 200, a 500 and a 429, and 200 callers with 200 different bad keys a
    401: the series grow by exactly one per (tenant, status) pair, 3 per tenant and 1 for all the
    bad keys together, within the budget."""
    keys = Secrets()
    tenants = [f"tenant-{i:02d}" for i in range(50)]
    upstream = MockUpstream()
    upstream.faults[SERVED] = Fault(status=500, every=2)  # one at a time: 200, then 500
    with serve(upstream) as url:
        config = keys.config(
            [],
            # rpm 2: a tenant's third request in the minute is refused (429)
            tenants=[keys.tenant(t, rpm=2) for t in tenants],
            routes=[
                {
                    "model": MODEL,
                    "backends": [
                        backend(url, "1", weight=90),
                        backend(url, "2", role="canary", weight=10),
                    ],
                }
            ],
            canary_default="out",  # every request on stable: one fault counter, 200 then 500
            breaker={"failures": 1000},
        )
        with serve(build_app(config, home)) as base, httpx.Client(timeout=10) as client:
            before = series_count(base)
            assert before <= budget(2, 2, {}), before
            statuses: dict[str, Counter[int]] = {t: Counter() for t in tenants}
            for tenant in tenants:
                auth = {"Authorization": f"Bearer {keys.key(tenant)}"}
                for i in (1, 3, 5):
                    r = client.post(
                        f"{base}/v1/chat/completions", json=body(tenant, i), headers=auth
                    )
                    statuses[tenant][r.status_code] += 1
            for i in range(200):
                r = client.post(
                    f"{base}/v1/chat/completions",
                    json=body("nobody", 1),
                    headers={"Authorization": f"Bearer sk-made-up-{i}"},
                )
                assert r.status_code == 401
            after = series_count(base)
    assert all(s == {200: 1, 500: 1, 429: 1} for s in statuses.values()), statuses
    codes = {t: len(s) for t, s in statuses.items()} | {"": 1}
    assert after - before == sum(codes.values()) == 50 * 3 + 1
    assert after <= budget(2, 2, codes), (after, budget(2, 2, codes))
    print(f"\nseries: {before} before, {after} after 50 tenants x 3 statuses and 200 bad keys")
