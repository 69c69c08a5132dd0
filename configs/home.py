"""Where Slipway keeps its local state: one folder, `.slipway/` in the checkout, or SLIPWAY_HOME.

Everything Slipway writes on a machine (MLflow database and artifacts, Prefect home, signing keys,
logs, caches, model directories) lives under it, so `make clean` is one `rm -rf`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from configs.settings import Settings

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Home:
    root: Path

    @classmethod
    def from_env(cls) -> Home:
        return cls((Settings().home or REPO / ".slipway").resolve())

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def demo_key(self) -> Path:
        """The demo tenant's API key (mode 0600), written by `make up`."""
        return self.root / "demo-api-key"

    @property
    def admin_token(self) -> Path:
        """The gateway's admin token (mode 0600), written by `make up`."""
        return self.root / "admin-token"

    @property
    def synthetic_key(self) -> Path:
        """The key of the tenant whose traffic the gateway counts as synthetic (rollout load)."""
        return self.root / "synthetic-api-key"

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def prefect(self) -> Path:
        return self.root / "prefect"

    @property
    def mlflow(self) -> Path:
        return self.root / "mlflow"

    @property
    def envs(self) -> Path:
        """Links to the three Python environments that `make setup` built (core, quant, serve)."""
        return self.root / "envs"

    def python(self, env: str) -> Path:
        """The interpreter of one environment; SLIPWAY_<ENV>_PYTHON overrides it (e.g. in an
        image)."""
        return Settings().python(env) or self.envs / env / "bin" / "python"

    @property
    def tracking_uri(self) -> str:
        """MLflow's tracking URI: MLFLOW_TRACKING_URI when set (a server, PostgreSQL), else sqlite
        here."""
        return Settings().tracking_uri or f"sqlite:///{self.mlflow / 'mlflow.db'}"

    @property
    def artifact_root(self) -> Path:
        return self.mlflow / "artifacts"
