"""Deployment environments (configs/environments/): dev, staging and prod, in one registry.

base.yaml holds what every environment shares and <name>.yaml overlays it: a mapping merges field
by field, anything else (a value, a list) replaces. Each environment serves its own registry alias
(`serving.alias`: `dev`, `staging`, `champion` for prod) from its own stack (`stack`: a folder
under the Slipway home for its state, logs, Prefect and gateway, and its own ports), while the
registry, the model store and the signing keys stay the Slipway home's, shared by all.

Parity: every field says whether two environments may differ on it (ports, hostnames, replica
counts, the stack's folder, the serving alias, the promotion rule) or must agree (the model
configs and variants, the signing trust, the gateway's config and so its limits). A difference
in one that must agree is allowed only where one of the two declares it, with a reason, under
`declared` (`field.path: why`); `parity` reports each difference and its verdict.

With no environment named, Slipway runs on the base alone, as it did before environments.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from configs.loader import ConfigError, Strict, describe

# Beside this module, not by configs.home's REPO: Home loads environments, so no import back.
ENVIRONMENTS = Path(__file__).resolve().parent / "environments"
BASE = "base"
PROD = "prod"
MAY_DIFFER = {"may_differ": True}


def may_differ(default: Any, description: str, **rules: Any) -> Any:
    """A field that environments may set differently without declaring it."""
    return Field(default, description=description, json_schema_extra=MAY_DIFFER, **rules)


class Serving(Strict):
    alias: str = may_differ(
        "champion",
        "the registry alias this environment serves and its rollouts promote",
        pattern=r"^[a-z][a-z0-9-]*$",
    )
    replicas: int = may_differ(1, "vLLM processes per served version", ge=1)
    model_configs: str = Field(
        "configs/models", description="model sources, revisions and quantization recipes"
    )
    variants: tuple[str, ...] = Field(
        ("bf16", "gptq-w8a8"), min_length=1, description="quantization variants that may be served"
    )

    @model_validator(mode="after")
    def _alias(self) -> Serving:
        if self.alias == "previous" or self.alias.endswith("-previous"):
            raise ValueError(f"alias {self.alias!r} is the name of a replaced version's alias")
        return self

    @property
    def previous(self) -> str:
        """The alias of the version this environment's last promotion replaced."""
        return "previous" if self.alias == "champion" else f"{self.alias}-previous"


class Stack(Strict):
    home: str | None = may_differ(
        None,
        "the stack's own folder (state, logs, Prefect, gateway) relative to the Slipway home; "
        "null: the Slipway home itself",
    )
    hostname: str = may_differ("127.0.0.1", "where the stack's services answer")
    mlflow_port: int = may_differ(5000, "MLflow's port", ge=1, le=65535)
    prefect_port: int = may_differ(4200, "Prefect's port", ge=1, le=65535)
    gateway_port: int = may_differ(8000, "the gateway's port", ge=1, le=65535)
    # Not Prometheus' and Alertmanager's own 9090 and 9093: Debian's packages start system
    # services there, which `make up` would take for its own.
    prometheus_port: int = may_differ(9190, "Prometheus' port", ge=1, le=65535)
    alertmanager_port: int = may_differ(9193, "Alertmanager's port", ge=1, le=65535)
    webhook_port: int = may_differ(9095, "the incident webhook's port", ge=1, le=65535)
    monitoring: Literal["optional", "required", "off"] = may_differ(
        "optional",
        "Prometheus, Alertmanager, the incident webhook and automations: optional starts what is "
        "installed and says what is not, required refuses to start without all of it",
    )

    @model_validator(mode="after")
    def _distinct(self) -> Stack:
        ports = [
            self.mlflow_port,
            self.prefect_port,
            self.gateway_port,
            self.prometheus_port,
            self.alertmanager_port,
            self.webhook_port,
        ]
        if len(set(ports)) != len(ports):
            raise ValueError(f"the stack's ports must differ from each other, got {ports}")
        if self.home is not None and (
            Path(self.home).is_absolute() or ".." in Path(self.home).parts
        ):
            raise ValueError(f"home {self.home!r} must be a folder inside the Slipway home")
        return self


class Trust(Strict):
    keyring: str = Field("keys/trusted", description="the public keys signatures verify against")
    require_attestation: bool = Field(
        True, description="serve only versions whose signed evaluation attestation verifies"
    )


class Gateway(Strict):
    config: str = Field("configs/gateway.yaml", description="tenants, limits and quotas")


class Promotion(Strict):
    requires: str | None = may_differ(
        None, "an environment a version must have passed (rollout or soak) before a rollout here"
    )


class Environment(Strict):
    name: str = Field(BASE, description="the overlay's file name (set by the loader)")
    serving: Serving = Serving()
    stack: Stack = Stack()
    trust: Trust = Trust()
    gateway: Gateway = Gateway()
    promotion: Promotion = Promotion()
    declared: dict[str, str] = Field(
        default_factory=dict,
        description="field.path: why this environment may differ there although it must agree",
    )

    @model_validator(mode="after")
    def _declared(self) -> Environment:
        known = set(_fields(Environment))
        for path, why in self.declared.items():
            if path not in known:
                raise ValueError(f"declared names {path!r}, which is no field")
            if not why.strip():
                raise ValueError(f"declared {path!r} gives no reason")
        if self.promotion.requires == self.name:
            raise ValueError(f"promotion.requires: {self.name} cannot require itself")
        return self


# ---- loading -------------------------------------------------------------------------------------


def names(folder: Path = ENVIRONMENTS) -> list[str]:
    """The environments that have an overlay, sorted."""
    return sorted(p.stem for p in folder.glob("*.yaml") if p.stem != BASE)


def _read(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of fields, got {type(raw).__name__}")
    return raw


def merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """The overlay over the base: mappings merge key by key, anything else replaces."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_environment(name: str | None, folder: Path = ENVIRONMENTS) -> Environment:
    """The environment `name` (its overlay over base.yaml), or the base alone for None or 'base'.
    ConfigError names the file and each field at fault."""
    base = folder / f"{BASE}.yaml"
    if not base.is_file():
        raise ConfigError(f"{base}: no such config file")
    raw, where = _read(base), str(base)
    if name not in (None, BASE):
        overlay = folder / f"{name}.yaml"
        if not overlay.is_file():
            known = ", ".join(names(folder)) or "none"
            raise ConfigError(f"no environment {name!r} in {folder} (known: {known})")
        layer = _read(overlay)
        if "name" in layer:
            raise ConfigError(f"{overlay} is invalid:\n  name: set by the file's name, not a field")
        raw, where = merge(raw, layer), f"{overlay} (over {base.name})"
    try:
        env = Environment.model_validate({**raw, "name": name or BASE})
    except ValidationError as e:
        raise ConfigError(f"{where} is invalid:\n{describe(e)}") from e
    required = env.promotion.requires
    if required is not None and required not in names(folder):
        raise ConfigError(
            f"{where} is invalid:\n  promotion.requires: no environment {required!r} "
            f"(known: {', '.join(names(folder))})"
        )
    return env


# ---- parity --------------------------------------------------------------------------------------


def _fields(model: type[BaseModel], prefix: str = "") -> dict[str, bool]:
    """Every leaf field's dotted path and whether environments may differ on it."""
    found: dict[str, bool] = {}
    for key, info in model.model_fields.items():
        if key in ("name", "declared"):
            continue
        path = f"{prefix}{key}"
        kind = info.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            found |= _fields(kind, f"{path}.")
        else:
            found[path] = info.json_schema_extra == MAY_DIFFER
    return found


def _value(env: Environment, path: str) -> Any:
    value: Any = env
    for part in path.split("."):
        value = getattr(value, part)
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class Difference:
    field: str
    left: Any
    right: Any
    verdict: str  # "may differ", "declared" or "not allowed"
    why: str = ""

    @property
    def allowed(self) -> bool:
        return self.verdict != "not allowed"


@dataclass(frozen=True)
class ParityReport:
    left: str
    right: str
    differences: tuple[Difference, ...]

    @property
    def ok(self) -> bool:
        return all(d.allowed for d in self.differences)

    @property
    def disallowed(self) -> tuple[Difference, ...]:
        return tuple(d for d in self.differences if not d.allowed)

    def lines(self) -> list[str]:
        head = f"Parity of {self.left} against {self.right} (configs/environments/):"
        if not self.differences:
            return [head, "  no differences"]
        width = max(len(d.field) for d in self.differences)
        body = []
        for d in self.differences:
            said = f"{d.verdict}: {d.why}" if d.why else d.verdict
            body.append(f"  {d.field:<{width}}  {d.left!r} vs {d.right!r}  ({said})")
        verdict = (
            "every difference is allowed"
            if self.ok
            else f"{len(self.disallowed)} difference(s) NOT allowed: these fields must agree "
            "unless an environment declares why under `declared`"
        )
        return [head, *body, f"  {verdict}"]


def parity(left: Environment, right: Environment) -> ParityReport:
    """Each field on which `left` and `right` differ, and whether the difference is allowed: by
    its nature (ports, replicas, ...), because one of them declares it, or not at all."""
    differences = []
    for path, free in _fields(Environment).items():
        a, b = _value(left, path), _value(right, path)
        if a == b:
            continue
        if free:
            differences.append(Difference(path, a, b, "may differ"))
        elif why := left.declared.get(path) or right.declared.get(path):
            differences.append(Difference(path, a, b, "declared", why))
        else:
            differences.append(Difference(path, a, b, "not allowed", "must agree"))
    return ParityReport(left.name, right.name, tuple(differences))


def reference(env: Environment) -> str:
    """What an environment is compared with when its stack starts: prod, or for prod the base."""
    return BASE if env.name == PROD else PROD
