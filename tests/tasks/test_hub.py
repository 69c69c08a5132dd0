"""Pull: through the real huggingface_hub code path from a local cache with the Hub unreachable,
from a directory, and from a GGUF file the tests make; every pull lands in the model store under
its digest, with a manifest; a local pull copies only the regular files inside the directory."""

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
from tasks.manifest import Manifest, hash_dir, sha256_file
from tasks.store import Store
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
    entry, manifest = hub.pull(HubSource(repo="acme/tiny", revision="main"), Store(home, "t"), home)
    dest = entry.weights

    assert manifest.revision == COMMIT  # the branch resolved to its commit and recorded
    assert manifest.source == "hf://acme/tiny@main"
    assert "notes.xyz" not in manifest.files  # outside the allow-list
    assert {"model.safetensors", "config.json", "tokenizer.json", "LICENSE"} <= set(manifest.files)
    assert not any(p.is_symlink() for p in dest.iterdir())  # real files, not links into the cache
    assert manifest.files["model.safetensors"] == sha256_file(
        tiny_model_source / "model.safetensors"
    )
    assert manifest.license == "LICENSE"
    assert Manifest.read(entry.manifest) == manifest
    assert entry.root.name == "sha256-" + manifest.digest.removeprefix("sha256:")


def test_pull_hub_refuses_pickled_weights_unless_allowed(
    home, tmp_path, tiny_model_source, offline_hub
):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(tiny_model_source / name, pickled / name)
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    make_hf_cache(offline_hub, "acme/pickled", pickled)
    store = Store(home, "p")
    with pytest.raises(hub.PullError, match=r"pytorch_model.bin.*allow_pickle: true"):
        hub.pull(HubSource(repo="acme/pickled"), store, home)
    assert store.entries() == []
    _, manifest = hub.pull(HubSource(repo="acme/pickled"), store, home, allow_pickle=True)
    assert "pytorch_model.bin" in manifest.files


def test_pull_hub_not_cached_and_unreachable_says_so(home, offline_hub):
    with pytest.raises(
        hub.PullError, match="unreachable and the revision is not in the local HF cache"
    ):
        hub.pull(HubSource(repo="acme/absent"), Store(home, "a"), home)


def test_pull_dir_and_digest(home, tiny_model):
    store = Store(home, "tiny")
    first, manifest = hub.pull(DirSource(path=tiny_model), store, home)
    again, _ = hub.pull(DirSource(path=tiny_model), store, home)
    assert again == first and manifest.digest.startswith("sha256:")
    (tiny_model / "config.json").write_text(json.dumps({"changed": True}))
    changed, _ = hub.pull(DirSource(path=tiny_model), store, home)  # pulled again, not cached
    assert changed.digest != first.digest
    assert {e.digest for e in store.entries()} == {first.digest, changed.digest}
    assert hash_dir(first.weights) == manifest.files  # the first build is untouched


def test_failed_pull_leaves_the_store_as_it_was(home, tiny_model, tmp_path):
    store = Store(home, "tiny")
    good, manifest = hub.pull(DirSource(path=tiny_model), store, home)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(hub.PullError, match="no safetensors weights"):
        hub.pull(DirSource(path=empty), store, home)
    assert store.entries() == [good]
    assert hash_dir(good.weights) == manifest.files
    assert list((store.root / ".staging").iterdir()) == []  # no debris


def test_a_local_pull_refuses_a_symlink_out_of_the_directory(home, tiny_model, tmp_path):
    secret = tmp_path / "host-secret.json"
    secret.write_text('{"password": "hunter2"}')
    (tiny_model / "extra_config.json").symlink_to(secret)
    store = Store(home, "tiny")
    with pytest.raises(hub.PullError, match=r"extra_config\.json is a symlink \(to .*host-secret"):
        hub.pull(DirSource(path=tiny_model), store, home)
    assert store.entries() == []


def test_a_local_pull_refuses_special_files(home, tiny_model):
    os.mkfifo(tiny_model / "tokenizer_pipe.json")
    with pytest.raises(hub.PullError, match=r"tokenizer_pipe\.json is not a regular file"):
        hub.pull(DirSource(path=tiny_model), Store(home, "tiny"), home)


def test_a_hub_pull_sees_a_new_commit_on_its_branch(home, tiny_model_source, offline_hub, tmp_path):
    """`main` is resolved on every pull: when the cached branch moves to a new commit, the next
    pull brings the new files (no cache keyed on the word `main`)."""
    make_hf_cache(offline_hub, "acme/moving", tiny_model_source)
    store = Store(home, "moving")
    first, manifest = hub.pull(HubSource(repo="acme/moving"), store, home)
    assert manifest.revision == COMMIT
    newer = "fedcba9876543210fedcba9876543210fedcba98"
    root = offline_hub / "models--acme--moving"
    shutil.copytree(root / "snapshots" / COMMIT, root / "snapshots" / newer, symlinks=True)
    (root / "snapshots" / newer / "README.md").write_text("license: apache-2.0\n")
    (root / "refs" / "main").write_text(newer)
    second, manifest = hub.pull(HubSource(repo="acme/moving"), store, home)
    assert manifest.revision == newer and second.digest != first.digest


def test_pull_gguf_converts_to_identical_safetensors(home, tiny_model_source, tmp_path):
    from safetensors.torch import load_file

    gguf = tinygguf.write(tiny_model_source, tmp_path / "tiny.gguf")
    store = Store(home, "tiny-gguf")
    entry, manifest = hub.pull(GGUFSource(path=gguf), store, home)
    dest = entry.weights

    assert manifest.revision == "sha256:" + sha256_file(gguf)
    assert hub.pull(GGUFSource(path=gguf), store, home)[0] == entry  # the conversion is reused
    original = load_file(tiny_model_source / "model.safetensors")
    converted = load_file(dest / "model.safetensors")
    assert set(original) == set(converted)
    for name, tensor in original.items():  # q/k were permuted on write and un-permuted on read
        assert converted[name].dtype == tensor.dtype
        assert (converted[name].float() - tensor.float()).abs().max().item() == 0.0, name


def test_pull_gguf_missing_file(home, tmp_path):
    with pytest.raises(hub.PullError, match="no such file"):
        hub.pull(GGUFSource(path=tmp_path / "absent.gguf"), Store(home, "x"), home)


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
    store = Store(home, "tiny")
    good, manifest = hub.pull(DirSource(path=tiny_model), store, home)
    corrupt(tiny_model / "model.safetensors")
    with pytest.raises(
        hub.PullError, match=r"model\.safetensors is not a valid safetensors file"
    ) as e:
        hub.pull(DirSource(path=tiny_model), store, home)
    assert why in str(e.value)
    assert store.entries() == [good]  # nothing of the corrupt checkpoint was kept
    assert hash_dir(good.weights) == manifest.files
    assert list((store.root / ".staging").iterdir()) == []
