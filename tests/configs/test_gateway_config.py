"""Gateway configs: a bad one is refused before the gateway starts, naming the file, field and
rule."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from configs.gateway import load_gateway_config
from configs.loader import ConfigError
from flows.cli import cli
from serving.gateway.auth import key_hash
from tests.serving.conftest import SIGNER

ADMIN = key_hash("admin-token")
KEY = key_hash("tenant-key")


def good() -> dict:
    return {
        "admin_token_sha256": ADMIN,
        "routes": [
            {
                "model": "m",
                "backends": [
                    {
                        "version": "1",
                        "url": "http://127.0.0.1:8001",
                        "served_model": "m-v1",
                        "digest": "sha256:" + "a" * 64,
                        "attestation": SIGNER.attest("sha256:" + "a" * 64),
                        "weight": 100,
                        "role": "stable",
                    }
                ],
            }
        ],
        "tenants": [{"name": "alice", "key_sha256": KEY}],
    }


def write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def backend_with(**fields) -> dict:
    raw = good()
    raw["routes"][0]["backends"][0].update(fields)
    return raw


def vouched_for() -> dict:
    """A backend as configs had it before attestations: `verified: true` on the writer's word."""
    raw = backend_with(verified=True)
    del raw["routes"][0]["backends"][0]["attestation"]
    return raw


@pytest.mark.parametrize(
    ("raw", "field", "words"),
    [
        (
            {**good(), "tenants": [{"name": "alice", "key_sha256": "sk-plaintext-key"}]},
            "tenants.0.key_sha256",
            "never the secret itself",
        ),
        (
            {**good(), "admin_token_sha256": "admin-token"},
            "admin_token_sha256",
            "sha256 hex digest",
        ),
        (vouched_for(), "routes.0.backends.0.attestation", "Field required"),
        (backend_with(digest="md5:abc"), "routes.0.backends.0.digest", "sha256:<64 lowercase hex"),
        (backend_with(url="127.0.0.1:8001"), "routes.0.backends.0.url", "not an http(s) base URL"),
        (backend_with(weight=-1), "routes.0.backends.0.weight", "greater than or equal to 0"),
        (backend_with(role="canary"), "routes.0", "needs at least one backend with role 'stable'"),
        (
            {**good(), "tenants": [{"name": "alice", "key_sha256": ADMIN}]},
            "(top level)",
            "admin tokens must differ from every tenant key",
        ),
        ({**good(), "usage": {"url": "mysql://x"}}, "usage.url", "must start with sqlite:///"),
        (
            {**good(), "state": {"url": "mysql://x"}},
            "state.url",
            "state.url must start with sqlite:///, postgresql://",
        ),
        (
            {**good(), "state": {"poll_interval_s": 0}},
            "state.poll_interval_s",
            "greater than or equal to 0.01",
        ),
        ({**good(), "colour": "red"}, "colour", "Extra inputs"),
    ],
    ids=[
        "plaintext-key",
        "plaintext-admin",
        "vouched-for",
        "digest",
        "url",
        "weight",
        "no-stable",
        "admin-is-tenant",
        "usage-url",
        "state-url",
        "state-poll",
        "extra-field",
    ],
)
def test_bad_gateway_configs_name_the_file_and_field(tmp_path, raw, field, words):
    path = write(tmp_path, raw)
    with pytest.raises(ConfigError) as e:
        load_gateway_config(path)
    message = str(e.value)
    assert str(path) in message and f"  {field}" in message and words in message


def test_the_gateway_refuses_to_start_on_a_bad_config(tmp_path):
    path = write(tmp_path, vouched_for())
    result = CliRunner().invoke(cli, ["gateway", "--config", str(path)])
    assert result.exit_code == 1
    assert "routes.0.backends.0.attestation" in result.output and "Traceback" not in result.output
    assert load_gateway_config(write(tmp_path, good())).routes[0].model == "m"
