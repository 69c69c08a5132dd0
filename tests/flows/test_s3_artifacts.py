"""Artifacts off the box: MLflow's artifact store on an S3-compatible endpoint (moto's server stands
in for S3 or MinIO). A release registered through the MLflow server `make up` starts, with
SLIPWAY_ARTIFACT_ROOT=s3://..., puts the weights in the bucket and none on the box; a fresh home
(empty model store) fetches them through the normal fetch path, verified against the signed
digest, and may serve them; an object altered in the bucket is refused. The same holds without a
server, where the MLflow client writes to the bucket itself."""

from __future__ import annotations

import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from configs.home import Home
from configs.settings import Settings
from serving.processes import free_port, stop
from serving.stack.services import ensure_mlflow
from tasks.fetch import FetchError, fetch
from tasks.registry import Registry
from tasks.servable import check_servable, version_of
from tasks.signing import trusted
from tasks.store import Store
from tests.conftest import make_home
from tests.releases import release, stand_in_model

BUCKET = "slipway-artifacts"


@pytest.fixture
def s3(monkeypatch) -> Iterator:
    """moto's S3 server on a free port with one empty bucket; the client environment (endpoint
    and credentials, by the standard AWS variables) points at it. Yields a boto3 client."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", endpoint)
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=BUCKET)
    assert keys(client) == {}
    try:
        yield client
    finally:
        # moto keeps its buckets in this process, across servers: leave none to the next test.
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"))
        server.stop()


def keys(client) -> dict[str, str]:
    """Every object in the bucket, by key, with its ETag."""
    found = client.list_objects_v2(Bucket=BUCKET).get("Contents", [])
    return {o["Key"]: o["ETag"] for o in found}


def fresh_node(root: Path, releasing: Home) -> Home:
    """A home that never ran the release: an empty model store and the keyring that trusts the
    release's signer (as a node restored from a backup has), nothing else."""
    node = make_home(root)
    shutil.copytree(trusted(releasing), trusted(node))
    assert not node.models.exists()
    return node


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def serves_from_s3(s3, home: Home, tmp_path: Path) -> None:
    """Release into the bucket, then fetch in fresh homes: intact, verified, servable; tampered,
    refused."""
    source = stand_in_model(tmp_path / "model", b"weights kept off the box")
    version = release(home, "m", source)
    digest = Registry(home).tags("m", version)["digest"]
    stored = keys(s3)
    [weights_key] = [k for k in stored if k.endswith("weights/model.safetensors")]
    assert any(k.endswith("model.sig") for k in stored)
    local = home.artifact_root
    assert not (local.is_dir() and [p for p in local.rglob("*") if p.is_file()])

    node = fresh_node(tmp_path / "node", home)
    registry = Registry(node)
    entry, now = fetch(registry, "m", version)
    assert now and entry.digest == digest and entry.exists()
    assert entry.root.is_relative_to(node.models)
    assert files(entry.weights) == files(source)
    registry.promote("m", version)
    check_servable(version_of(registry, "m", version))  # what `up` checks before serving it
    assert fetch(registry, "m", version) == (entry, False)

    original = s3.get_object(Bucket=BUCKET, Key=weights_key)["Body"].read()
    s3.put_object(Bucket=BUCKET, Key=weights_key, Body=original[:-1] + b"!")
    tampered = fresh_node(tmp_path / "tampered", home)
    with pytest.raises(FetchError, match=r"hashes to sha256:.*not the registered sha256:"):
        fetch(Registry(tampered), "m", version)
    assert not Store(tampered, "m").entries()
    assert not Store(tampered, "m").entry(digest).root.exists()


@pytest.mark.slow
def test_make_ups_mlflow_keeps_weights_in_s3_and_a_fresh_home_fetches_them_verified(
    home, s3, tmp_path, monkeypatch
):
    monkeypatch.setenv("SLIPWAY_ARTIFACT_ROOT", f"s3://{BUCKET}/mlflow/")
    port, procs = free_port(), []
    try:
        ensure_mlflow(home, port, procs, print)()  # as `make up` starts it
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
        serves_from_s3(s3, home, tmp_path)
        assert all(k.startswith("mlflow/") for k in keys(s3))
    finally:
        stop(procs, grace_s=10)


def test_without_a_server_the_client_writes_to_s3_and_a_fresh_home_fetches_verified(
    home, s3, tmp_path, monkeypatch
):
    monkeypatch.setenv("SLIPWAY_ARTIFACT_ROOT", f"s3://{BUCKET}/local-store")
    # One registry (sqlite) for both homes, as a shared PostgreSQL registry would be.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'registry.db'}")
    serves_from_s3(s3, home, tmp_path)
    assert all(k.startswith("local-store/") for k in keys(s3))


def test_the_artifact_root_setting_defaults_to_the_home_and_is_checked(monkeypatch, tmp_path):
    monkeypatch.delenv("SLIPWAY_ARTIFACT_ROOT", raising=False)
    monkeypatch.delenv("MLFLOW_S3_ENDPOINT_URL", raising=False)
    default = tmp_path / "mlflow" / "artifacts"
    assert Settings().artifact_uri(default) == default.as_uri()
    assert Settings().s3_endpoint_url is None
    monkeypatch.setenv("SLIPWAY_ARTIFACT_ROOT", "s3://bucket/prefix/")
    assert Settings().artifact_uri(default) == "s3://bucket/prefix"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SLIPWAY_ARTIFACT_ROOT", "elsewhere")
    assert Settings().artifact_uri(default) == (tmp_path / "elsewhere").as_uri()
    monkeypatch.setenv("SLIPWAY_ARTIFACT_ROOT", "s3://")
    with pytest.raises(ValueError, match=r"expected s3://<bucket>"):
        Settings()
    monkeypatch.setenv("SLIPWAY_ARTIFACT_ROOT", "s3://bucket")
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "minio:9000")
    with pytest.raises(ValueError, match=r"expected http\(s\)://host"):
        Settings()
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "http://minio:9000")
    assert Settings().s3_endpoint_url == "http://minio:9000"
