"""Every environment variable Slipway reads, in one typed place.

Read when asked (`Settings()`), not at import, so a process (or a test) that changes its
environment sees the change. Unset values are None and the caller's default applies.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLIPWAY_", frozen=True, extra="ignore")

    home: Path | None = Field(None, description="where all local state lives (default .slipway/)")
    core_python: Path | None = Field(None, description="the core environment's interpreter")
    quant_python: Path | None = Field(None, description="the quant environment's interpreter")
    serve_python: Path | None = Field(None, description="the serve environment's interpreter")
    hardware: str | None = Field(None, description="cpu or cuda: overrides GPU detection")
    # A trial's hold on its accelerator slot (tasks/gpu_slot.py), renewed every 3/4 of it: a
    # worker killed -9 frees its slot this long after its last renewal (plus the server's 15 s
    # sweep). 120 s rides out a brief API outage; Prefect's server takes 60 s to 1 day.
    gpu_slot_lease_s: float = Field(
        120, ge=60, le=86400, description="seconds a trial's accelerator slot is leased for"
    )
    environment: str | None = Field(
        None, description="dev, staging or prod (configs/environments/); unset: the base"
    )
    pypi_index: str = Field("https://pypi.org/simple", description="for models shipped in wheels")
    admin_token: SecretStr | None = Field(None, description="the gateway's admin token")
    synthetic_key: SecretStr | None = Field(None, description="the synthetic-load tenant's key")
    # MLflow's own variable, so that Slipway and the mlflow CLI agree on the store.
    tracking_uri: str | None = Field(None, validation_alias="MLFLOW_TRACKING_URI")
    artifact_root: str | None = Field(
        None,
        description="where MLflow keeps artifacts (the weights): an s3://bucket/prefix URI or a "
        "local folder; unset: $SLIPWAY_HOME/mlflow/artifacts",
    )
    # MLflow's (and its boto3 client's) own variable: an S3-compatible endpoint such as MinIO;
    # unset: AWS S3. Credentials come from the standard AWS chain, never from Slipway's settings.
    s3_endpoint_url: str | None = Field(None, validation_alias="MLFLOW_S3_ENDPOINT_URL")

    @field_validator("hardware")
    @classmethod
    def _hardware(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip().lower()
        if value not in ("cpu", "cuda"):
            raise ValueError(f"SLIPWAY_HARDWARE={value!r}: expected 'cpu' or 'cuda'")
        return value

    @field_validator("environment")
    @classmethod
    def _environment(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None

    @field_validator("artifact_root")
    @classmethod
    def _artifact_root(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        scheme, sep, rest = value.strip().partition("://")
        if not sep:  # a folder: absolute, as the MLflow server runs from another directory
            return str(Path(value.strip()).expanduser().resolve())
        if scheme == "s3" and not rest.split("/")[0]:
            raise ValueError(f"SLIPWAY_ARTIFACT_ROOT={value!r}: expected s3://<bucket>[/prefix]")
        return f"{scheme}://{rest.rstrip('/')}"

    @field_validator("s3_endpoint_url")
    @classmethod
    def _s3_endpoint_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip()
        if not value.startswith(("http://", "https://")):
            raise ValueError(
                f"MLFLOW_S3_ENDPOINT_URL={value!r}: expected http(s)://host[:port] (an S3 API)"
            )
        return value

    def artifact_uri(self, default: Path) -> str:
        """The artifact root as a URI MLflow takes: SLIPWAY_ARTIFACT_ROOT (a folder becomes a
        file:// URI), else `default`."""
        if self.artifact_root is None:
            return default.as_uri()
        if "://" in self.artifact_root:
            return self.artifact_root
        return Path(self.artifact_root).as_uri()

    def python(self, env: str) -> Path | None:
        return {"core": self.core_python, "quant": self.quant_python, "serve": self.serve_python}[
            env
        ]
