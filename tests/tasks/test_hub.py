"""Pull: through the real huggingface_hub code path from a local cache with the Hub unreachable,
from a directory, and from a GGUF file the tests make; every pull writes a manifest."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest

from configs.models import DirSource, GGUFSource, HubSource
from tasks import hub
from tests import tinygguf

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_hf_cache(
    cache: Path, repo: str, files: Path, extra: dict[str, bytes] | None = None
) -> None:
    """Lay `files` out exactly as huggingface_hub caches a repo: blobs, refs/main,
    snapshots/<sha>."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (root / "blobs").mkdir()
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    contents = {p.name: p.read_bytes() for p in files.iterdir() if p.is_file()} | (extra or {})
    for name, data in contents.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """A HF cache in tmp and a Hub endpoint that refuses connections."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return cache


def test_pull_hub_from_cache_when_unreachable(home, tiny_model_source, offline_hub):
    make_hf_cache(offline_hub, "acme/tiny", tiny_model_source, extra={"notes.xyz": b"not allowed"})
    dest = home.models / "tiny" / "bf16" / "weights"
    manifest = hub.pull(HubSource(repo="acme/tiny", revision="main"), dest, home)

    assert manifest.revision == COMMIT  # the branch resolved to its commit and recorded
    assert manifest.source == "hf://acme/tiny@main"
    assert "notes.xyz" not in manifest.files  # outside the allow-list
    assert {"model.safetensors", "config.json", "tokenizer.json", "LICENSE"} <= set(manifest.files)
    assert not any(p.is_symlink() for p in dest.iterdir())  # real files, not links into the cache
    assert manifest.files["model.safetensors"] == hub.sha256_file(
        tiny_model_source / "model.safetensors"
    )
    assert manifest.license == "LICENSE"
    assert hub.Manifest.read(hub.manifest_path(dest)) == manifest


def test_pull_hub_refuses_pickled_weights_unless_allowed(
    home, tmp_path, tiny_model_source, offline_hub
):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(tiny_model_source / name, pickled / name)
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    make_hf_cache(offline_hub, "acme/pickled", pickled)
    dest = home.models / "p" / "weights"
    with pytest.raises(hub.PullError, match=r"pytorch_model.bin.*allow_pickle: true"):
        hub.pull(HubSource(repo="acme/pickled"), dest, home)
    assert not dest.exists()
    manifest = hub.pull(HubSource(repo="acme/pickled"), dest, home, allow_pickle=True)
    assert "pytorch_model.bin" in manifest.files


def test_pull_hub_not_cached_and_unreachable_says_so(home, offline_hub):
    with pytest.raises(
        hub.PullError, match="unreachable and the revision is not in the local HF cache"
    ):
        hub.pull(HubSource(repo="acme/absent"), home.models / "a" / "weights", home)


def test_pull_dir_and_digest(home, tiny_model):
    dest = home.models / "tiny" / "bf16" / "weights"
    first = hub.pull(DirSource(path=tiny_model), dest, home)
    again = hub.pull(DirSource(path=tiny_model), dest, home)
    assert first.digest == again.digest and first.digest.startswith("sha256:")
    (tiny_model / "config.json").write_text(json.dumps({"changed": True}))
    assert hub.pull(DirSource(path=tiny_model), dest, home).digest != first.digest


def test_failed_pull_leaves_the_earlier_model(home, tiny_model, tmp_path):
    dest = home.models / "tiny" / "bf16" / "weights"
    good = hub.pull(DirSource(path=tiny_model), dest, home)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(hub.PullError, match="no safetensors weights"):
        hub.pull(DirSource(path=empty), dest, home)
    assert hub.Manifest.read(hub.manifest_path(dest)) == good
    assert hub.hash_dir(dest) == good.files
    assert sorted(p.name for p in dest.parent.iterdir()) == [
        "manifest.json",
        "weights",
    ]  # no debris


def test_pull_gguf_converts_to_identical_safetensors(home, tiny_model_source, tmp_path):
    from safetensors.torch import load_file

    gguf = tinygguf.write(tiny_model_source, tmp_path / "tiny.gguf")
    dest = home.models / "tiny-gguf" / "bf16" / "weights"
    manifest = hub.pull(GGUFSource(path=gguf), dest, home)

    assert manifest.revision == "sha256:" + hub.sha256_file(gguf)
    original = load_file(tiny_model_source / "model.safetensors")
    converted = load_file(dest / "model.safetensors")
    assert set(original) == set(converted)
    for name, tensor in original.items():  # q/k were permuted on write and un-permuted on read
        assert converted[name].dtype == tensor.dtype
        assert (converted[name].float() - tensor.float()).abs().max().item() == 0.0, name


def test_pull_gguf_missing_file(home, tmp_path):
    with pytest.raises(hub.PullError, match="no such file"):
        hub.pull(GGUFSource(path=tmp_path / "absent.gguf"), home.models / "x" / "weights", home)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _bad_header_length(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:8] = (1 << 40).to_bytes(8, "little")
    path.write_bytes(bytes(data))


def _garbage_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:16] = b"\xff\xfe{not js"
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("corrupt", "why"),
    [
        (_truncate, "the checkpoint is corrupt or truncated"),
        (_bad_header_length, "header claims"),
        (_garbage_header, "not a valid safetensors file"),
        (lambda p: p.write_bytes(b"abc"), "unpack"),
    ],
    ids=["truncated", "header-length", "garbage-header", "tiny-file"],
)
def test_corrupt_checkpoint_is_refused_by_name_and_leaves_the_earlier_model(
    home, tiny_model, corrupt, why
):
    dest = home.models / "tiny" / "bf16" / "weights"
    good = hub.pull(DirSource(path=tiny_model), dest, home)
    corrupt(tiny_model / "model.safetensors")
    with pytest.raises(
        hub.PullError, match=r"model\.safetensors is not a valid safetensors file"
    ) as e:
        hub.pull(DirSource(path=tiny_model), dest, home)
    assert why in str(e.value)
    assert hub.hash_dir(dest) == good.files  # nothing of the corrupt checkpoint was kept
    assert sorted(p.name for p in dest.parent.iterdir()) == ["manifest.json", "weights"]
