"""vLLM's autoscaling in configs/k8s/, beyond the schema (test_k8s_manifests.py validates every
object against Kubernetes' own): each vLLM Deployment is scaled by one HorizontalPodAutoscaler on
what predicts time to first token, its engines' waiting requests and KV-cache use read through the
Prometheus adapter's rules (prometheus-adapter.yaml), never on CPU; the waiting-requests target is
recomputed here from the model's latency SLO (configs/slo.yaml) and the per-replica capacity
figures the HPA carries as annotations, so a change to either fails until the manifest follows;
scale-down waits out a cold start; min/max replicas and the PodDisruptionBudget agree. Every check
is a function returning what is wrong, run on the manifests (nothing) and on copies broken on
purpose (the fault named), so none of them can pass whatever the manifest says."""

from __future__ import annotations

import copy
import json
import re
import statistics
import subprocess
from collections.abc import Callable
from fractions import Fraction
from math import floor
from pathlib import Path

import pytest
import yaml

from configs.home import REPO, Home
from configs.slo import load_slo_config
from tests.configs.test_k8s_manifests import MONITORING, PROMETHEUS_PEER, objects, selects

# vLLM's series (vllm/v1/metrics/loggers.py) and the custom metric names the adapter makes of them.
WAITING = "vllm:num_requests_waiting"
KV_CACHE = "vllm:kv_cache_usage_perc"
METRIC = {WAITING: "vllm_num_requests_waiting", KV_CACHE: "vllm_kv_cache_usage_perc"}
DEFAULT_TOLERANCE = Fraction(1, 10)  # the HPA controller's, where behavior sets none
# The one vLLM latency this repository records: SmolLM2 bf16 on one CPU core at 1 request/s
# (evaluation/datasets/RECORDED.md), engine A of each pair.
CPU_RECORDING = REPO / "evaluation" / "datasets" / "recorded_pairs.jsonl"
CPU_RECORDING_RPS = 1


def quantity(value: object) -> Fraction:
    """A Kubernetes quantity as these manifests write them: a plain number or milli-units."""
    text = str(value)
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(m?)", text)
    assert match, f"quantity {text!r} not understood here"
    return Fraction(match[1]) / (1000 if match[2] else 1)


def waiting_target(
    ttft_s: Fraction, service_rps: Fraction, idle_ttft_s: Fraction, tolerance: Fraction
) -> int:
    """The mean number of waiting requests per replica to scale out above. A request that finds q
    waiting starts after those q and itself are admitted, one per 1 / service_rps when the engine
    is full, then takes the idle TTFT: (q + 1) / service_rps + idle_ttft_s <= ttft_s. The HPA acts
    only once the mean exceeds target x (1 + tolerance), so that is the q that must still hold.
    0 when no queue at all meets the SLO: a replica that slow cannot be scaled into it."""
    room = service_rps * (ttft_s - idle_ttft_s) - 1
    return max(0, floor(room / (1 + tolerance)))


def slo_ttft() -> dict[str, Fraction]:
    """Each model's latency bound from configs/slo.yaml."""
    models = load_slo_config(REPO / "configs" / "slo.yaml").models
    return {m: Fraction(str(o.latency.ttft_s)) for m, o in models.items() if o.latency}


def of_kind(kind: str) -> list[dict]:
    return [o for o in objects() if o["kind"] == kind]


def vllm_deployments() -> list[dict]:
    found = [d for d in of_kind("Deployment") if d["metadata"]["name"].startswith("vllm-")]
    assert found
    return found


def hpa_of(deployment: dict) -> dict:
    name = deployment["metadata"]["name"]
    [hpa] = [
        h
        for h in of_kind("HorizontalPodAutoscaler")
        if h["spec"]["scaleTargetRef"]
        == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
    ]
    return hpa


def budget_of(deployment: dict) -> dict:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    [pdb] = [p for p in of_kind("PodDisruptionBudget") if selects(p["spec"]["selector"], labels)]
    return pdb


def targets(hpa: dict) -> dict[str, Fraction]:
    """The HPA's per-pod mean targets by metric name (scaling_problems flags any other kind)."""
    return {
        m["pods"]["metric"]["name"]: quantity(m["pods"]["target"]["averageValue"])
        for m in hpa["spec"]["metrics"]
        if m["type"] == "Pods" and m["pods"]["target"]["type"] == "AverageValue"
    }


def tolerance(hpa: dict) -> Fraction:
    up = hpa["spec"].get("behavior", {}).get("scaleUp", {})
    return Fraction(str(up["tolerance"])) if "tolerance" in up else DEFAULT_TOLERANCE


# The checks: each returns what is wrong, empty when nothing is.


def scaling_problems(deployment: dict, hpa: dict) -> list[str]:
    """Scaled by the HPA alone, on the engines' queue and KV cache, never on CPU or memory."""
    found = []
    if "replicas" in deployment["spec"]:
        found.append("the Deployment sets replicas: every apply would reset the HPA's count")
    kinds = {
        (m["type"], m.get("pods", {}).get("target", {}).get("type")) for m in hpa["spec"]["metrics"]
    }
    if kinds != {("Pods", "AverageValue")}:
        found.append(f"metrics of kinds {sorted(map(str, kinds))}: only per-pod ones predict TTFT")
    names = {m.get("pods", {}).get("metric", {}).get("name") for m in hpa["spec"]["metrics"]}
    if names != set(METRIC.values()):
        found.append(f"metrics {sorted(map(str, names))}, not {sorted(METRIC.values())}")
    return found


def threshold_problems(hpa: dict, ttft: dict[str, Fraction]) -> list[str]:
    """The waiting target is the one the SLO and the capacity figures give, and at least 1."""
    notes = hpa["metadata"]["annotations"]
    model = notes["slipway.io/slo-model"]
    if model not in ttft:
        return [f"no latency SLO for {model} in configs/slo.yaml"]
    want = waiting_target(
        ttft[model],
        Fraction(notes["slipway.io/replica-service-rps"]),
        Fraction(notes["slipway.io/replica-idle-ttft-s"]),
        tolerance(hpa),
    )
    if want < 1:
        return [f"no queue meets ttft_s {ttft[model]} at this capacity: a faster replica is needed"]
    have = targets(hpa).get(METRIC[WAITING])
    if have != want:
        return [f"waiting target {have}, derived {want} (ttft_s {float(ttft[model]):g})"]
    return []


def kv_problems(hpa: dict) -> list[str]:
    """The KV-cache target sets scaling off before the cache is full (vLLM preempts there)."""
    kv = targets(hpa).get(METRIC[KV_CACHE])
    if kv is None or not 0 < kv * (1 + tolerance(hpa)) < 1:
        return [f"KV-cache target {kv}: scaling must start below a full cache"]
    return []


def behaviour_problems(deployment: dict, hpa: dict) -> list[str]:
    """Scale-down keeps a replica at least as long as a new one may take to start, and sheds one
    at a time; scale-up does not wait longer than scale-down."""
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    probe = container["startupProbe"]
    cold_start = probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)
    behavior = hpa["spec"].get("behavior", {})
    down, up = behavior.get("scaleDown", {}), behavior.get("scaleUp", {})
    found = []
    window = down.get("stabilizationWindowSeconds", 300)
    if window < cold_start:
        found.append(f"scale-down window {window}s shorter than a cold start ({cold_start}s)")
    if up.get("stabilizationWindowSeconds", 0) >= window:
        found.append("scale-up waits as long as scale-down")
    policies = down.get("policies")
    if not policies or any(p["type"] != "Pods" or p["value"] != 1 for p in policies):
        found.append(f"scale-down policies {policies}: one replica at a time")
    return found


def budget_problems(deployment: dict, hpa: dict, pdb: dict) -> list[str]:
    """At minReplicas a drain can still evict one replica and one keeps serving; the budget
    selects exactly the Deployment's pods."""
    low, high = hpa["spec"].get("minReplicas", 1), hpa["spec"]["maxReplicas"]
    found = []
    if pdb["spec"]["selector"] != deployment["spec"]["selector"]:
        found.append("the budget's selector is not the Deployment's")
    if not 2 <= low < high:
        found.append(f"replicas {low}..{high}: at least 2, and room to scale")
    spec = pdb["spec"]
    if "maxUnavailable" in spec:
        evictable = quantity(spec["maxUnavailable"])
    else:
        evictable = low - quantity(spec["minAvailable"])
    if not 1 <= evictable <= low - 1:
        found.append(f"{evictable} of {low} evictable: a drain would stall or empty the version")
    return found


def adapter_rules() -> list[dict]:
    [config_map] = objects([REPO / "configs" / "k8s" / "prometheus-adapter.yaml"])
    return yaml.safe_load(config_map["data"]["config.yaml"])["rules"]


def adapted(rules: list[dict]) -> dict[str, str]:
    """Custom metric name -> vLLM series, as the adapter names them: the series a rule's
    seriesQuery selects, renamed by its name.matches / name.as (Go's $1 or ${1} for a group)."""
    out = {}
    for rule in rules:
        series = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{(.*)\}", rule["seriesQuery"])
        assert series, rule["seriesQuery"]
        name = re.sub(r"\$\{?(\d+)\}?", r"\\\1", rule["name"]["as"])
        out[re.sub(rule["name"]["matches"], name, series[1])] = series[1]
    return out


def adapter_problems(rules: list[dict]) -> list[str]:
    """Each metric the HPAs use comes from the vLLM series it is named after, per pod."""
    found = []
    names = adapted(rules)
    for series, custom in METRIC.items():
        if names.get(custom) != series:
            found.append(f"{custom} is made from {names.get(custom)}, not {series}")
    for rule in rules:
        overrides = rule.get("resources", {}).get("overrides", {})
        if overrides != {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}:
            found.append(f"{rule['seriesQuery']}: not mapped to namespace and pod ({overrides})")
        query = rule["metricsQuery"]
        if not all(f"<<.{part}>>" in query for part in ("Series", "LabelMatchers", "GroupBy")):
            found.append(f"{query}: not restricted to the pods the HPA asks about")
    return found


# The tests.


def test_every_vllm_deployment_is_scaled_by_its_hpa_on_queue_and_kv_cache_not_cpu():
    for deployment in vllm_deployments():
        assert scaling_problems(deployment, hpa_of(deployment)) == []


def test_the_waiting_target_is_derived_from_the_latency_slo_and_a_replicas_capacity():
    ttft = slo_ttft()
    for deployment in vllm_deployments():
        hpa = hpa_of(deployment)
        assert threshold_problems(hpa, ttft) == []
    # The arithmetic, exact: (50 x (1.0 - 0.1) - 1) / 1.1 is 40, where floats give 39.99...
    assert waiting_target(Fraction(1), Fraction(50), Fraction(1, 10), Fraction(1, 10)) == 40


def test_a_changed_slo_or_capacity_figure_fails_until_the_manifest_follows():
    hpa = hpa_of(vllm_deployments()[0])
    model = hpa["metadata"]["annotations"]["slipway.io/slo-model"]
    ttft = slo_ttft()
    for bound in (ttft[model] / 2, ttft[model] * 2):
        assert threshold_problems(hpa, {**ttft, model: bound}) != [], bound
    faster = copy.deepcopy(hpa)
    faster["metadata"]["annotations"]["slipway.io/replica-service-rps"] = "100"
    assert "derived 80" in threshold_problems(faster, ttft)[0]
    assert threshold_problems(hpa, {}) == [f"no latency SLO for {model} in configs/slo.yaml"]


def test_the_one_recorded_vllm_latency_is_a_cpu_cores_and_no_queue_meets_the_slo_on_it():
    """Why the manifest's capacity figure is an assumption: the repository's measured vLLM
    figures (one CPU core) leave no room for any queue under a 1 s TTFT."""
    rows = [json.loads(line) for line in CPU_RECORDING.read_text().splitlines()]
    idle = Fraction(str(statistics.median(r["A"][0] for r in rows))).limit_denominator(1000)
    model = hpa_of(vllm_deployments()[0])["metadata"]["annotations"]["slipway.io/slo-model"]
    ttft = slo_ttft()[model]
    assert 0 < idle < ttft  # the median alone fits
    assert waiting_target(ttft, Fraction(CPU_RECORDING_RPS), idle, DEFAULT_TOLERANCE) == 0


def test_the_kv_cache_target_starts_scaling_before_the_cache_is_full():
    for deployment in vllm_deployments():
        assert kv_problems(hpa_of(deployment)) == []


def test_scale_down_waits_out_a_cold_start_and_sheds_one_replica_at_a_time():
    for deployment in vllm_deployments():
        assert behaviour_problems(deployment, hpa_of(deployment)) == []


def test_min_and_max_replicas_and_the_disruption_budget_agree():
    for deployment in vllm_deployments():
        hpa = hpa_of(deployment)
        assert budget_problems(deployment, hpa, budget_of(deployment)) == []


def test_the_adapter_makes_the_hpas_metrics_from_vllms_series_per_pod():
    assert adapter_problems(adapter_rules()) == []
    assert adapted(adapter_rules()) == {v: k for k, v in METRIC.items()}


def vllm_source() -> str:
    """vLLM's metrics module in the serve environment (serve.lock's vLLM), found without
    importing vLLM."""
    where = subprocess.run(
        [
            str(Home.from_env().python("serve")),
            "-c",
            "import importlib.util; print(importlib.util.find_spec('vllm').origin)",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return (Path(where).parent / "v1" / "metrics" / "loggers.py").read_text()


def test_vllm_exports_the_series_the_adapter_reads_and_prometheus_may_scrape_them():
    source = vllm_source()
    for series in METRIC:
        assert f'name="{series}"' in source, series
    # Prometheus (where the adapter runs) is let in on the port vLLM serves /metrics on, and
    # the pods ask the pod-annotation scrape job for exactly that.
    assert PROMETHEUS_PEER["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": MONITORING
    }
    [adapter] = objects([REPO / "configs" / "k8s" / "prometheus-adapter.yaml"])
    assert adapter["metadata"]["namespace"] == MONITORING
    policies = [o for o in objects() if o["kind"] == "NetworkPolicy"]
    for deployment in vllm_deployments():
        template = deployment["spec"]["template"]
        [container] = template["spec"]["containers"]
        [port] = [p["containerPort"] for p in container["ports"]]
        assert template["metadata"]["annotations"] == {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(port),
            "prometheus.io/path": "/metrics",
        }
        assert any(
            selects(p["spec"]["podSelector"], template["metadata"]["labels"])
            and any(
                PROMETHEUS_PEER in rule.get("from", [])
                and {"protocol": "TCP", "port": port} in rule.get("ports", [])
                for rule in p["spec"].get("ingress", [])
            )
            for p in policies
        )


# Broken on purpose: each check must name the fault.


def _set(path: str, value: object) -> Callable[[dict], None]:
    """A change setting (or with DELETE removing) the value at a dotted path."""

    def change(objs: dict) -> None:
        *parents, last = path.split(".")
        node = objs
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        index = int(last) if isinstance(node, list) else last
        if value is DELETE:
            del node[index]
        else:
            node[index] = value

    return change


DELETE = object()


def _note(key: str, value: str) -> Callable[[dict], None]:
    """A change setting one of the HPA's slipway.io annotations."""
    return lambda objs: objs["hpa"]["metadata"]["annotations"].update({f"slipway.io/{key}": value})


def _require_all(objs: dict) -> None:
    objs["pdb"]["spec"].pop("maxUnavailable")
    objs["pdb"]["spec"]["minAvailable"] = 2


BROKEN = {
    "deployment-sets-replicas": (_set("deployment.spec.replicas", 1), "reset the HPA"),
    "scales-on-cpu": (
        _set(
            "hpa.spec.metrics.0",
            {
                "type": "Resource",
                "resource": {
                    "name": "cpu",
                    "target": {"type": "Utilization", "averageUtilization": 70},
                },
            },
        ),
        "only per-pod ones predict TTFT",
    ),
    "waiting-target-off-by-one": (
        _set("hpa.spec.metrics.0.pods.target.averageValue", "41"),
        "waiting target 41, derived 40",
    ),
    "tolerance-widened": (_set("hpa.spec.behavior.scaleUp.tolerance", 0.5), "derived 29"),
    "slower-replica": (
        _note("replica-service-rps", "5"),
        "derived 3",
    ),
    "replica-too-slow-for-the-slo": (
        _note("replica-idle-ttft-s", "0.99"),
        "no queue meets",
    ),
    "kv-target-at-full": (_set("hpa.spec.metrics.1.pods.target.averageValue", "1"), "full cache"),
    "kv-target-trips-only-past-full": (
        _set("hpa.spec.metrics.1.pods.target.averageValue", "950m"),
        "full cache",
    ),
    "scale-down-within-a-cold-start": (
        _set("hpa.spec.behavior.scaleDown.stabilizationWindowSeconds", 300),
        "shorter than a cold start",
    ),
    "scale-down-default-window": (
        _set("hpa.spec.behavior.scaleDown", DELETE),
        "shorter than a cold start",
    ),
    "scale-down-sheds-half": (
        _set(
            "hpa.spec.behavior.scaleDown.policies.0",
            {"type": "Percent", "value": 50, "periodSeconds": 60},
        ),
        "one replica at a time",
    ),
    "one-replica-minimum": (_set("hpa.spec.minReplicas", 1), "at least 2"),
    "no-room-to-scale": (_set("hpa.spec.maxReplicas", 2), "room to scale"),
    "budget-blocks-drains": (
        _require_all,
        "would stall",
    ),
    "budget-lets-all-go": (_set("pdb.spec.maxUnavailable", 2), "empty the version"),
    "budget-on-other-pods": (
        _set("pdb.spec.selector", {"matchLabels": {"app": "vllm"}}),
        "not the Deployment's",
    ),
}


def all_problems(objs: dict) -> list[str]:
    return [
        *scaling_problems(objs["deployment"], objs["hpa"]),
        *threshold_problems(objs["hpa"], slo_ttft()),
        *kv_problems(objs["hpa"]),
        *behaviour_problems(objs["deployment"], objs["hpa"]),
        *budget_problems(objs["deployment"], objs["hpa"], objs["pdb"]),
    ]


@pytest.mark.parametrize("fault", BROKEN, ids=list(BROKEN))
def test_a_broken_autoscaler_is_caught_naming_its_fault(fault: str):
    deployment = vllm_deployments()[0]
    objs = {"deployment": deployment, "hpa": hpa_of(deployment), "pdb": budget_of(deployment)}
    assert all_problems(objs) == []
    broken = copy.deepcopy(objs)
    change, expected = BROKEN[fault]
    change(broken)
    found = all_problems(broken)
    assert any(expected in problem for problem in found), found


@pytest.mark.parametrize(
    "change",
    [
        lambda r: r[0]["name"].update({"as": "vllm_waiting"}),
        lambda r: r[1].update({"seriesQuery": 'vllm:gpu_cache_usage_perc{namespace!="",pod!=""}'}),
        lambda r: r[0]["resources"].update({"overrides": {"namespace": {"resource": "namespace"}}}),
        lambda r: r[1].update({"metricsQuery": "max(<<.Series>>) by (<<.GroupBy>>)"}),
    ],
    ids=["renamed", "old-kv-series", "no-pod-mapping", "not-per-pod"],
)
def test_broken_adapter_rules_are_caught(change: Callable[[list[dict]], None]):
    rules = copy.deepcopy(adapter_rules())
    change(rules)
    assert adapter_problems(rules) != []
