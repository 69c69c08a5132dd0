"""A rollout's traffic moves written as Kubernetes objects (tasks/k8s_export.py): the strategy
that lets a Kubernetes gateway carry the canary weights instead of, or beside, Slipway's own.

K8sPatches stands where the rollout's GatewayAdmin stands. Every route or weight change the
rollout makes through it (a canary added, each step's weights, a withdrawal, the hand-over and the
final route) is written to a folder, numbered in order, as
  NNN-<model>.yaml                       the model's objects after the move (InferencePools,
                                         InferenceModelRewrites, the HTTPRoute): `kubectl apply -f`
  NNN-<model>.httproute.merge-patch.json the JSON merge patch from the HTTPRoute before the move:
                                         `kubectl patch httproute <model> --type merge`
apply=True (`slipway rollout run --k8s-patches DIR`): beside; the gateway gets every change as
before, so the rollout is judged on the gateway's statistics as always. apply=False (the dry run,
`slipway export k8s --rollout-steps`): instead; the gateway is never called, the route as the
moves leave it is kept here and read back from here. Without it nothing changes: `with_patches`
returns the admin it was given.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from configs.gateway import RouteSpec
from configs.rollout import RolloutPolicy
from tasks.gateway_admin import GatewayAdmin, GatewayAdminError
from tasks.k8s_export import (
    DEFAULT,
    ExportError,
    Target,
    dns_label,
    merge_patch,
    render_route,
    to_yaml,
)
from tasks.rollout.route import hand_over
from tasks.rollout.steps import step_mirror, step_weights


class K8sPatches(GatewayAdmin):
    """The rollout's admin, writing each move as Kubernetes objects into `folder`; `inner` is the
    gateway's admin (None only for a dry run over `routes`)."""

    def __init__(
        self,
        inner: GatewayAdmin | None,
        folder: Path,
        apply: bool,
        target: Target = DEFAULT,
        routes: dict[str, RouteSpec] | None = None,
    ) -> None:
        # No super().__init__(): every call to a gateway goes through `inner`'s client.
        if apply and inner is None:
            raise ValueError("apply=True needs the gateway's admin")
        self.inner = inner
        self.url = inner.url if inner is not None else "(dry run: no gateway)"
        self.folder = folder
        self.apply = apply
        self.target = target
        self._routes = {m: s.model_dump(mode="json") for m, s in (routes or {}).items()}
        self.written: list[Path] = []

    def _gateway(self) -> GatewayAdmin:
        if self.inner is None:
            raise GatewayAdminError("a dry run calls no gateway")
        return self.inner

    def route(self, model: str) -> dict[str, Any]:
        if not self.apply and model in self._routes:
            return self._routes[model]
        return self._gateway().route(model)

    def put_route(self, model: str, backends: list[dict[str, Any]]) -> dict[str, Any]:
        before = self.route(model)
        after = RouteSpec(  # as the admin API makes it: audience and mirror reset, failover kept
            model=model,
            backends=tuple(
                {k: v for k, v in b.items() if k != "expected_digest"} for b in backends
            ),
            failover=before.get("failover", False),
        )
        self._write(before, after)
        if self.apply:
            return self._gateway().put_route(model, backends)
        self._routes[model] = after.model_dump(mode="json")
        return self._routes[model]

    def set_weights(
        self,
        model: str,
        weights: dict[str, float],
        audience: str | None = None,
        mirror: dict[str, Any] | Literal["keep"] | None = "keep",
    ) -> dict[str, Any]:
        before = self.route(model)
        unknown = set(weights) - {b["version"] for b in before["backends"]}
        if unknown:
            raise GatewayAdminError(f"route '{model}' has no backend {sorted(unknown)}")
        after = RouteSpec.model_validate(
            before
            | {
                "model": model,
                "backends": [
                    b | {"weight": weights.get(b["version"], b["weight"])}
                    for b in before["backends"]
                ],
                "audience": audience or before.get("audience", "everyone"),
                "mirror": before.get("mirror") if mirror == "keep" else mirror,
            }
        )
        self._write(before, after)
        if self.apply:
            return self._gateway().set_weights(model, weights, audience, mirror)
        self._routes[model] = after.model_dump(mode="json")
        return self._routes[model]

    def stats(self, model: str, samples: bool = True) -> dict[str, Any]:
        return self._gateway().stats(model, samples)

    def call(
        self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None
    ) -> dict[str, Any]:
        return self._gateway().call(method, path, body, params)

    def _call(
        self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None
    ) -> dict[str, Any]:
        return self._gateway().call(method, path, body, params)

    def _write(self, before: dict[str, Any], after: RouteSpec) -> None:
        """The model's objects after the move, and the merge patch of its HTTPRoute."""
        was = render_route(RouteSpec.model_validate(before), self.target)[-1]
        objects = render_route(after, self.target)
        self.folder.mkdir(parents=True, exist_ok=True)
        stem = f"{len(self.written) // 2 + 1:03d}-{dns_label(after.model)}"
        full = self.folder / f"{stem}.yaml"
        full.write_text(to_yaml(objects))
        patch = self.folder / f"{stem}.httproute.merge-patch.json"
        patch.write_text(json.dumps(merge_patch(was, objects[-1]), indent=2) + "\n")
        self.written += [full, patch]


def with_patches(admin: GatewayAdmin, folder: Path | None) -> GatewayAdmin:
    """`admin` writing every move also as Kubernetes objects into `folder`; `admin` itself when
    `folder` is None (the default: nothing changes)."""
    return admin if folder is None else K8sPatches(admin, folder, apply=True)


def rollout_steps(
    spec: RouteSpec, policy: RolloutPolicy, folder: Path, target: Target = DEFAULT
) -> list[Path]:
    """The dry run: the patches a rollout of the route's canary under `policy` would apply, step
    by step (the weights each judged step sets, then the hand-over to the canary and the route of
    it alone), written to `folder` and applied nowhere. The route must hold one canary."""
    canaries = [b for b in spec.backends if b.role == "canary"]
    if len(canaries) != 1:
        raise ExportError(
            f"route '{spec.model}' has {len(canaries)} canaries; a rollout's steps need one "
            "(the rollout adds it at weight 0 before its first step)"
        )
    canary = canaries[0].version
    stable = {b.version for b in spec.backends if b.role == "stable"}
    writer = K8sPatches(None, folder, apply=False, target=target, routes={spec.model: spec})
    for stage in policy.stages():
        weights = step_weights(canary, stable, stage)
        writer.set_weights(spec.model, weights, stage.audience, step_mirror(canary, stage))
    hand_over(writer, spec.model, canary)
    kept = next(b for b in writer.route(spec.model)["backends"] if b["version"] == canary)
    writer.put_route(spec.model, [kept | {"role": "stable", "weight": 100.0}])
    return writer.written
