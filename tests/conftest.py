"""Shared fixtures: a fresh SLIPWAY_HOME per test, the tiny model built once per session, and a
fresh PostgreSQL database per test."""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

import psycopg2
import pytest

from configs.home import REPO, Home
from tests import tinymodel

# The real environments that `make setup` built; tests start vLLM and llmcompressor from them.
ENVS = Path(os.environ.get("SLIPWAY_HOME", REPO / ".slipway")) / "envs"


def make_home(root: Path) -> Home:
    """An empty SLIPWAY_HOME at root, with links to the real environments."""
    (root / "envs").mkdir(parents=True)
    for env in ("core", "quant", "serve"):
        if (ENVS / env).exists():
            (root / "envs" / env).symlink_to((ENVS / env).resolve())
    return Home(root)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Home:
    """An empty SLIPWAY_HOME for one test, with links to the real environments."""
    root = make_home(tmp_path / "slipway").root
    monkeypatch.setenv("SLIPWAY_HOME", str(root))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return Home.from_env()


@pytest.fixture(scope="session")
def tiny_model_source(tmp_path_factory) -> Path:
    """The tiny model, built once per session; copy it (tiny_model) before changing it."""
    return tinymodel.build(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def tiny_model(tiny_model_source, tmp_path) -> Path:
    """A private copy of the tiny model that a test may change."""
    return Path(shutil.copytree(tiny_model_source, tmp_path / "tiny-model"))


@pytest.fixture
def pg_url():
    """A fresh database on the local PostgreSQL (127.0.0.1:5432, trust auth), dropped afterwards."""
    name = f"slipway_usage_{secrets.token_hex(4)}"
    admin = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")
    admin.autocommit = True
    admin.cursor().execute(f"CREATE DATABASE {name}")
    yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    admin.cursor().execute(f"DROP DATABASE {name} WITH (FORCE)")
    admin.close()
