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
    environment: str | None = Field(
        None, description="dev, staging or prod (configs/environments/); unset: the base"
    )
    pypi_index: str = Field("https://pypi.org/simple", description="for models shipped in wheels")
    admin_token: SecretStr | None = Field(None, description="the gateway's admin token")
    synthetic_key: SecretStr | None = Field(None, description="the synthetic-load tenant's key")
    # MLflow's own variable, so that Slipway and the mlflow CLI agree on the store.
    tracking_uri: str | None = Field(None, validation_alias="MLFLOW_TRACKING_URI")

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

    def python(self, env: str) -> Path | None:
        return {"core": self.core_python, "quant": self.quant_python, "serve": self.serve_python}[
            env
        ]
