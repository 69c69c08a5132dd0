"""A real Prometheus and a real Alertmanager for tests, each on a free loopback port with its data
in a temporary folder: the binaries (a skip where missing, a failure under CI=true), their start
and readiness, and Prometheus' HTTP API. Shared by tests/serving/test_prometheus_scrape.py and
tests/flows/test_incident.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml

from serving.processes import free_port, tail
from serving.stack.monitoring import prometheus_config

SCRAPE_S = 1


def binary(name: str, package: str) -> str:
    """The binary `name`, or a skip; in CI (CI=true) its absence fails (.ci/run installs it)."""
    found = shutil.which(name)
    if found:
        return found
    if os.environ.get("CI") == "true":
        pytest.fail(f"{name} is missing: .ci/run installs it (apt-get install {package})")
    pytest.skip(f"{name} is not installed (apt-get install {package})")


class Prometheus:
    """A running Prometheus' HTTP API."""

    def __init__(self, url: str, log: Path) -> None:
        self.url = url
        self.log = log

    def get(self, path: str, **params: str) -> dict | list:
        r = httpx.get(self.url + path, params=params, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", (path, params, body)
        return body["data"]

    def query(self, expr: str, at: float) -> list[tuple[dict[str, str], float]]:
        """An instant query at `at`: each series' labels and value (a vector, or a scalar)."""
        data = self.get("/api/v1/query", query=expr, time=f"{at:.3f}")
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        assert data["resultType"] == "vector", (expr, data)
        return [(s["metric"], float(s["value"][1])) for s in data["result"]]

    def scrapes(self) -> list[float]:
        """The timestamps of the gateway's scrapes in the last minute, oldest first."""
        data = self.get("/api/v1/query", query='up{job="gateway"}[1m]', time=f"{time.time():.3f}")
        return [float(t) for s in data["result"] for t, up in s["values"] if up == "1"]

    def scrape_after(self, wall: float, timeout_s: float = 10.0) -> float:
        """The first scrape that began after `wall` (a time.time()), once Prometheus stored it."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            later = [t for t in self.scrapes() if t > wall]
            if later:
                return later[0]
            time.sleep(0.1)
        raise AssertionError(f"no scrape of the gateway after {wall}:\n{tail(self.log)}")

    def alerts(self, state: str = "firing") -> list[dict]:
        return [a for a in self.get("/api/v1/alerts")["alerts"] if a["state"] == state]


@contextmanager
def _running(command: list[str], url: str, ready: str, log: Path, what: str) -> Iterator[None]:
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, f"{what} exited:\n{tail(log)}"
            assert time.monotonic() < deadline, f"{what} not ready:\n{tail(log)}"
            try:
                if httpx.get(f"{url}{ready}", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        yield
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def running_prometheus(
    binary: str, root: Path, target: str, rules: Path, alertmanager: str | None = None
) -> Iterator[Prometheus]:
    """Prometheus scraping `target` every second, evaluating `rules` every second, and sending
    its alerts to `alertmanager` (a base URL) where given."""
    root.mkdir(parents=True, exist_ok=True)
    to = alertmanager.split("//")[1] if alertmanager else None
    config = prometheus_config(target.split("//")[1], rules, to, f"{SCRAPE_S}s")
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = root / "prometheus.log"
    command = [
        binary,
        f"--config.file={root / 'prometheus.yml'}",
        f"--storage.tsdb.path={root / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    url = f"http://127.0.0.1:{port}"
    with _running(command, url, "/-/ready", log, "prometheus"):
        yield Prometheus(url, log)


@contextmanager
def running_alertmanager(binary: str, root: Path, config: dict) -> Iterator[str]:
    """Alertmanager on `config` (alertmanager.yml as a dict), clustering off; its base URL."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "alertmanager.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        binary,
        f"--config.file={root / 'alertmanager.yml'}",
        f"--storage.path={root / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address=",  # one instance: no gossip port to collide on
        "--log.level=warn",
    ]
    with _running(command, url, "/-/ready", root / "alertmanager.log", "alertmanager"):
        yield url
