"""The gateway's routing table as the Kubernetes Gateway API Inference Extension spells it
(`slipway export k8s`): per served version an InferencePool selecting its vLLM pods and an
InferenceModelRewrite turning the public model name into the name that vLLM answers to, and per
public model an HTTPRoute whose backendRefs carry the route's weights, so a rollout's canary
weights are the HTTPRoute's.

API versions pinned (the Inference Extension moved InferencePool from the alpha group
inference.networking.x-k8s.io/v1alpha2 to inference.networking.k8s.io/v1 at its v1.0 release, with
a new spec: selector.matchLabels, targetPorts, endpointPickerRef): InferencePool
inference.networking.k8s.io/v1 (GA, what current implementations serve); InferenceModelRewrite
inference.networking.x-k8s.io/v1alpha2 (alpha since the Inference Extension v1.2; it has no stable
version); HTTPRoute gateway.networking.k8s.io/v1. configs/k8s_export.schema.json is this project's
schema of exactly these versions, which every export is checked against in the tests.

A public model is matched on the X-Gateway-Model-Name header, which the Inference Extension's
body-based router sets from the request body's `model`. InferenceObjective is not written: it
carries a priority per workload, and Slipway's priorities belong to tenants' tiers, not routes.

What Kubernetes cannot hold is written as `slipway.io/` annotations so that the export reads back
(`parse`): the backend URLs Slipway served from (`url` and `replicas`: in Kubernetes the pool's
selector finds every pod of the version), the weights' digest, the route's audience, mirror and
failover. A Kubernetes gateway ignores them: it mirrors nothing and knows no tenants, so a
route in a tenant-first stage (audience opted_in) is exported with the split that every tenant not
opted in gets (stable only), its Slipway weights kept in an annotation. Not exported at all
(NOT_EXPORTED): a backend's attestation (kilobytes of signed JSON, verified by the gateway when it
admits the backend, not by a cluster), max_concurrency and priority_scheduling.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import yaml

from configs.gateway import RouteSpec, StateSpec
from configs.home import REPO, Home
from serving.gateway.state import store_for
from serving.gateway.table_sync import ROUTES, decode

POOL_GROUP = "inference.networking.k8s.io"
POOL_VERSION = "v1"
POOL_API = f"{POOL_GROUP}/{POOL_VERSION}"  # InferencePool
REWRITE_API = "inference.networking.x-k8s.io/v1alpha2"  # InferenceModelRewrite (alpha)
HTTPROUTE_API = "gateway.networking.k8s.io/v1"  # HTTPRoute
SCHEMA = REPO / "configs" / "k8s_export.schema.json"

MODEL_HEADER = "X-Gateway-Model-Name"  # set by the body-based router from the body's `model`
EPP_PORT = 9002  # the endpoint picker's gRPC port, as the Inference Extension deploys it
MAX_WEIGHT = 1_000_000  # an HTTPRoute backendRef's largest weight
NOT_EXPORTED = ("attestation", "max_concurrency", "priority_scheduling")  # per backend

A = "slipway.io/"  # annotation and label prefix
_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class ExportError(ValueError):
    """The routes cannot be written as Kubernetes objects; the message says which and why."""


@dataclass(frozen=True)
class Target:
    """Where the export points: the namespace of every object, the Gateway the HTTPRoutes attach
    to, and the port vLLM listens on in its pods (configs/k8s/vllm.yaml)."""

    namespace: str = "slipway"
    gateway: str = "inference-gateway"
    target_port: int = 8000

    def __post_init__(self) -> None:
        for what, name in (("namespace", self.namespace), ("gateway", self.gateway)):
            if len(name) > 63 or not _LABEL.match(name):
                raise ExportError(f"{what} '{name}' is not a DNS-1123 label")
        if not 0 < self.target_port < 65536:
            raise ExportError(f"target port {self.target_port} is not a port number")


DEFAULT = Target()


def dns_label(text: str) -> str:
    """`text` as a DNS-1123 label: lowercase, [a-z0-9-], at most 63 characters (a long one is
    cut and ends in a hash of the whole)."""
    label = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"
    if len(label) > 63:
        digest = hashlib.sha256(text.encode()).hexdigest()[:8]
        label = f"{label[:54].rstrip('-')}-{digest}"
    return label


def pool_name(model: str, version: str) -> str:
    """The InferencePool of one version: named as configs/k8s/vllm.yaml names its Service."""
    return dns_label(f"vllm-{model}-v{version}")


def _selector(model: str, version: str) -> dict[str, str]:
    """The labels of a version's vLLM pods (configs/k8s/vllm.yaml)."""
    return {"app": "vllm", "slipway.model": dns_label(model), "slipway.version": dns_label(version)}


def route_weights(spec: RouteSpec) -> dict[str, float]:
    """The weights a Kubernetes gateway can apply: the route's own, except in a tenant-first stage
    (audience opted_in), where it cannot tell tenants apart and gets the split of everyone not
    opted in: stable only (evenly where the stable weights are all 0, as the gateway does)."""
    weights = {b.version: b.weight for b in spec.backends}
    if spec.audience == "everyone":
        return weights
    stable = {b.version: b.weight for b in spec.backends if b.role == "stable"}
    if not any(stable.values()):
        stable = dict.fromkeys(stable, 1.0)
    return {v: stable.get(v, 0.0) for v in weights}


def integer_weights(weights: Mapping[str, float]) -> tuple[dict[str, int], int]:
    """Weights as an HTTPRoute's integers, and the power of ten they were scaled by: the smallest
    that makes every weight whole (a rollout's 25/75 stays 25/75, 47.5 becomes 475 with scale 10),
    so the shares are exact; beyond 4 decimals they are rounded at the largest scale that fits."""
    top = max(weights.values())
    fits = [s for s in (1, 10, 100, 1000, 10000) if top * s <= MAX_WEIGHT] or [1]
    if top > MAX_WEIGHT:
        raise ExportError(f"weight {top:g} exceeds an HTTPRoute's largest, {MAX_WEIGHT}")
    exact = [s for s in fits if all(Decimal(str(w)) * s % 1 == 0 for w in weights.values())]
    scale = exact[0] if exact else fits[-1]
    return {v: round(w * scale) for v, w in weights.items()}, scale


def _meta(name: str, target: Target, model: str, **annotations: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": target.namespace,
        "labels": {"app.kubernetes.io/managed-by": "slipway", "slipway.model": dns_label(model)},
        "annotations": {f"{A}model": model, **{A + k: v for k, v in annotations.items()}},
    }


def render_route(spec: RouteSpec, target: Target = DEFAULT) -> list[dict[str, Any]]:
    """One route's objects: an InferencePool and an InferenceModelRewrite per backend, then the
    HTTPRoute splitting the model's traffic among the pools by the route's weights."""
    objects: list[dict[str, Any]] = []
    refs = []
    weights, scale = integer_weights(route_weights(spec))
    for b in spec.backends:
        name = pool_name(spec.model, b.version)
        pool = {
            "apiVersion": POOL_API,
            "kind": "InferencePool",
            "metadata": _meta(name, target, spec.model, version=b.version, url=b.url),
            "spec": {
                "selector": {"matchLabels": _selector(spec.model, b.version)},
                "targetPorts": [{"number": target.target_port}],
                "endpointPickerRef": {
                    "name": dns_label(f"{name}-epp"),
                    "port": {"number": EPP_PORT},
                    "failureMode": "FailClose",
                },
            },
        }
        pool["metadata"]["labels"] |= {"slipway.version": dns_label(b.version)}
        pool["metadata"]["annotations"] |= {
            f"{A}role": b.role,
            f"{A}digest": b.digest,
            f"{A}replicas": json.dumps(list(b.replicas)),
        }
        rewrite = {
            "apiVersion": REWRITE_API,
            "kind": "InferenceModelRewrite",
            "metadata": _meta(name, target, spec.model, version=b.version),
            "spec": {
                "poolRef": {"group": POOL_GROUP, "kind": "InferencePool", "name": name},
                "rules": [
                    {
                        "matches": [{"model": {"type": "Exact", "value": spec.model}}],
                        "targets": [{"modelRewrite": b.served_model}],
                    }
                ],
            },
        }
        objects += [pool, rewrite]
        refs.append(
            {
                "group": POOL_GROUP,
                "kind": "InferencePool",
                "name": name,
                "weight": weights[b.version],
            }
        )
    annotations = {
        "audience": spec.audience,
        "failover": json.dumps(spec.failover),
        "weight-scale": str(scale),
    }
    if spec.mirror is not None:
        annotations["mirror"] = json.dumps(spec.mirror.model_dump(mode="json"), sort_keys=True)
    if spec.audience != "everyone":  # the Slipway weights the backendRefs cannot carry
        own = {b.version: b.weight for b in spec.backends}
        annotations["weights"] = json.dumps(own, sort_keys=True)
    objects.append(
        {
            "apiVersion": HTTPROUTE_API,
            "kind": "HTTPRoute",
            "metadata": _meta(dns_label(spec.model), target, spec.model, **annotations),
            "spec": {
                "parentRefs": [{"name": target.gateway}],
                "rules": [
                    {
                        "matches": [
                            {
                                "path": {"type": "PathPrefix", "value": "/"},
                                "headers": [
                                    {"type": "Exact", "name": MODEL_HEADER, "value": spec.model}
                                ],
                            }
                        ],
                        "backendRefs": refs,
                    }
                ],
            },
        }
    )
    return objects


def render(routes: Iterable[RouteSpec], target: Target = DEFAULT) -> list[dict[str, Any]]:
    """Every route's objects; two models or versions whose names would collide are an error."""
    ordered = sorted(routes, key=lambda r: r.model)
    objects = [o for spec in ordered for o in render_route(spec, target)]
    seen: dict[tuple[str, str], str] = {}
    for o in objects:
        key = (o["kind"], o["metadata"]["name"])
        notes = o["metadata"]["annotations"]
        who = notes[A + "model"] + (f" v{notes[A + 'version']}" if A + "version" in notes else "")
        if key in seen and seen[key] != who:
            raise ExportError(f"{key[0]} name '{key[1]}' would be shared by {seen[key]} and {who}")
        seen[key] = who
    return objects


def to_yaml(objects: Iterable[Mapping[str, Any]]) -> str:
    return yaml.safe_dump_all(list(objects), sort_keys=False)


def parse(objects: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The routes an export describes, by model, as `comparable` spells a RouteSpec: the weights
    from the HTTPRoute's backendRefs (the annotated ones in a tenant-first stage), the served
    model names from the InferenceModelRewrites, the rest from the pools' annotations."""
    by_kind: dict[str, dict[str, Mapping[str, Any]]] = {}
    for o in objects:
        by_kind.setdefault(o["kind"], {})[o["metadata"]["name"]] = o
    pools, rewrites = by_kind.get("InferencePool", {}), by_kind.get("InferenceModelRewrite", {})
    served = {
        r["spec"]["poolRef"]["name"]: r["spec"]["rules"][0]["targets"][0]["modelRewrite"]
        for r in rewrites.values()
    }
    routes = {}
    for route in by_kind.get("HTTPRoute", {}).values():
        notes = route["metadata"]["annotations"]
        model = notes[A + "model"]
        scale = int(notes[A + "weight-scale"])
        [rule] = route["spec"]["rules"]
        own = json.loads(notes[A + "weights"]) if A + "weights" in notes else None
        backends = []
        for ref in rule["backendRefs"]:
            pool = pools[ref["name"]]["metadata"]["annotations"]
            version = pool[A + "version"]
            backends.append(
                {
                    "version": version,
                    "url": pool[A + "url"],
                    "replicas": json.loads(pool.get(A + "replicas", "[]")),
                    "served_model": served[ref["name"]],
                    "digest": pool[A + "digest"],
                    "weight": float(own[version]) if own else ref["weight"] / scale,
                    "role": pool[A + "role"],
                }
            )
        mirror = notes.get(A + "mirror")
        routes[model] = {
            "model": model,
            "backends": backends,
            "audience": notes[A + "audience"],
            "mirror": json.loads(mirror) if mirror else None,
            "failover": json.loads(notes[A + "failover"]),
        }
    return routes


def comparable(spec: RouteSpec) -> dict[str, Any]:
    """A route without what an export leaves out (NOT_EXPORTED), as `parse` reads one back."""
    raw = spec.model_dump(mode="json")
    raw["backends"] = [
        {k: v for k, v in b.items() if k not in NOT_EXPORTED} for b in raw["backends"]
    ]
    return raw


def merge_patch(before: Any, after: Any) -> Any:
    """The JSON merge patch (RFC 7396) that turns `before` into `after`: changed keys, removed
    ones as null, a changed list whole (as merge patches replace lists)."""
    if not isinstance(before, dict) or not isinstance(after, dict):
        return after
    patch = {k: None for k in before if k not in after}
    for k, v in after.items():
        if k not in before:
            patch[k] = v
        elif before[k] != v:
            patch[k] = merge_patch(before[k], v)
    return patch


def apply_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 applied: what `kubectl patch --type merge` does with `patch`."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = apply_merge_patch(out.get(k), v)
    return out


async def _read(state: StateSpec, home: Home) -> dict[str, RouteSpec]:
    store = store_for(state, home)
    await store.open()
    try:
        return decode(await store.read(ROUTES), store.where)
    finally:
        await store.close()


def read_routes(state: StateSpec, home: Home) -> dict[str, RouteSpec]:
    """The routes the gateway's state store holds, read as every gateway instance reads them
    (serving/gateway/table_sync.py); a record that is not a valid route raises StateError."""
    return asyncio.run(_read(state, home))
