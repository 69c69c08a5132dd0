"""Where Slipway keeps its local state: one folder, `.slipway/` in the checkout, or SLIPWAY_HOME.

Everything Slipway writes on a machine (MLflow database and artifacts, Prefect home, signing keys,
logs, caches, model directories) lives under it, so `make clean` is one `rm -rf`.

An environment (configs/environments.py; SLIPWAY_ENVIRONMENT or `--environment`) runs its stack
from a folder of its own under it (`root`: the stack's state, logs, Prefect, gateway and keys to
call it) and shares the home's registry, model store, signing keys, caches and Python
environments (`shared`); its `alias` is the registry alias it serves in place of `champion`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from configs.settings import Settings

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Home:
    root: Path
    environment: str | None = None  # None: the home itself, serving `champion`, as ever
    alias: str = "champion"  # the registry alias this home's stack serves and promotes
    shared: Path | None = None  # an environment's: the Slipway home whose registry it shares

    @classmethod
    def from_env(cls, environment: str | None = None) -> Home:
        """The Slipway home (SLIPWAY_HOME, default .slipway/), or the home of `environment`
        (default SLIPWAY_ENVIRONMENT) inside it."""
        settings = Settings()
        home = cls((settings.home or REPO / ".slipway").resolve())
        name = environment or settings.environment
        return home.of_environment(name) if name and name != "base" else home

    def of_environment(self, name: str) -> Home:
        """The home of environment `name` (configs/environments/), sharing this one's registry."""
        from configs.environments import load_environment  # when asked: Home is imported early

        env = load_environment(name)
        base = self.base
        root = base / env.stack.home if env.stack.home else base
        return Home(root, env.name, env.serving.alias, base)

    @property
    def base(self) -> Path:
        """The Slipway home: what every environment shares (registry, store, keys, caches)."""
        return self.shared or self.root

    @property
    def previous_alias(self) -> str:
        """The alias of the version this home's last promotion replaced (what a revert puts
        back): `previous` beside `champion`, `<alias>-previous` beside another alias."""
        return "previous" if self.alias == "champion" else f"{self.alias}-previous"

    @property
    def models(self) -> Path:
        return self.base / "models"

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
        return self.base / "keys"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def cache(self) -> Path:
        return self.base / "cache"

    @property
    def prefect(self) -> Path:
        return self.root / "prefect"

    @property
    def mlflow(self) -> Path:
        return self.base / "mlflow"

    @property
    def envs(self) -> Path:
        """Links to the three Python environments that `make setup` built (core, quant, serve)."""
        return self.base / "envs"

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
