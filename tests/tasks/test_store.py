"""The model store: entries written once under their digest, a second build of a variant beside
the first, labels that only point, a legacy home migrated, gc that frees only what no registered
version needs, weights fetched from MLflow and verified, and a backup restored into a new home."""

from __future__ import annotations

import json
import shutil
import stat

import pytest

from configs.models import DirSource
from tasks.backup import BackupError, backup, restore
from tasks.fetch import FetchError, fetch
from tasks.gc import GcRefused, collect
from tasks.hub import pull
from tasks.manifest import hash_dir
from tasks.registry import Registry
from tasks.servable import check_servable, version_of
from tasks.signing import default_keys, keygen
from tasks.store import Store, migrate, writable
from tests.conftest import make_home
from tests.releases import release, stand_in_model


def test_a_second_build_of_a_variant_lands_beside_the_first(home, tmp_path):
    store = Store(home, "m")
    first, one = pull(DirSource(path=stand_in_model(tmp_path / "a", b"one")), store, home)
    store.point("gptq-w8a8", first.digest)
    before = hash_dir(first.weights)
    second, _ = pull(DirSource(path=stand_in_model(tmp_path / "b", b"two")), store, home)
    store.point("gptq-w8a8", second.digest)
    assert first.digest != second.digest and first.root != second.root
    assert hash_dir(first.weights) == before == one.files  # untouched by the second release
    assert store.label("gptq-w8a8") == second.digest
    history = json.loads((store.root / "variants" / "gptq-w8a8.json").read_text())["history"]
    assert [h["digest"] for h in history] == [first.digest, second.digest]
    mode = stat.S_IMODE((first.weights / "model.safetensors").stat().st_mode)
    assert not mode & stat.S_IWUSR  # committed entries are read-only


def test_the_same_bytes_are_stored_once(home, tmp_path):
    store = Store(home, "m")
    source = stand_in_model(tmp_path / "a", b"same")
    first, _ = pull(DirSource(path=source), store, home)
    again, _ = pull(DirSource(path=source), store, home)
    assert first == again and store.entries() == [first]


def test_a_killed_write_leaves_only_staging_which_is_cleaned(home, tmp_path):
    store = Store(home, "m")
    leftover = store.root / ".staging" / "killed-run" / "weights"
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"half")
    assert store.entries() == []
    assert store.clean_staging() == [str(store.root / ".staging" / "killed-run")]
    assert not any((store.root / ".staging").iterdir())


def test_a_legacy_home_is_migrated_and_serves_the_same_version(home, tmp_path):
    """A home from before the store: models/<name>/<variant>/{weights, manifest.json, model.sig},
    registered with that digest. After `migrate` the version verifies from its store entry."""
    version = release(home, "m", stand_in_model(tmp_path / "src", b"legacy"))
    registry = Registry(home)
    digest = registry.tags("m", version)["digest"]
    entry = Store(home, "m").entry(digest)
    legacy = home.models / "m" / "bf16"
    writable(entry.root)
    shutil.move(entry.root, legacy)  # the old layout, as an earlier Slipway wrote it
    shutil.rmtree(home.models / "m" / "variants")
    assert migrate(home) == [f"migrated models/m/bf16 -> models/m/{entry.root.name}"]
    assert migrate(home) == []  # idempotent
    assert Store(home, "m").label("bf16") == digest
    registry.promote("m", version)
    check_servable(version_of(registry, "m", version))


def test_migration_of_an_overwritten_legacy_directory_says_so(home, tmp_path):
    legacy = home.models / "m" / "gptq-w8a8"
    stand_in_model(legacy / "weights", b"second release")
    (legacy / "manifest.json").write_text(
        json.dumps(
            {
                "source": "dir://x",
                "revision": "local",
                "digest": "sha256:" + "1" * 64,
                "files": {},
                "license": None,
                "created": "2026-11-01T00:00:00",
            }
        )
    )
    [line] = migrate(home)
    assert "its manifest named sha256:1111" in line and "overwritten" in line


def test_gc_frees_only_unregistered_entries(home, tmp_path):
    registry = Registry(home)
    served = release(home, "m", stand_in_model(tmp_path / "a", b"served"))
    registry.promote("m", served)
    old = release(home, "m", stand_in_model(tmp_path / "b", b"last week"))
    store = Store(home, "m")
    orphan, _ = pull(
        DirSource(path=stand_in_model(tmp_path / "c", b"never registered")), store, home
    )
    store.point("scratch", orphan.digest)
    preview, _ = collect(home, dry_run=True)
    assert [f.digest for f in preview] == [orphan.digest] and orphan.exists()
    freed, cleaned = collect(home)
    assert [f.digest for f in freed] == [orphan.digest] and freed[0].bytes > 0
    assert not orphan.root.exists()
    assert "variant label m/scratch named a removed entry" in cleaned
    for version in (served, old):  # the champion and an older registered version both stay
        assert store.entry(registry.tags("m", version)["digest"]).exists()


def test_gc_refuses_when_the_registry_holds_nothing(home, tmp_path, monkeypatch):
    pull(DirSource(path=stand_in_model(tmp_path / "a", b"x")), Store(home, "m"), home)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
    with pytest.raises(GcRefused, match="holds no registered model"):
        collect(home)
    assert Store(home, "m").entries()


def test_a_node_that_never_ran_the_release_fetches_and_verifies(home, tmp_path):
    registry = Registry(home)
    version = release(home, "m", stand_in_model(tmp_path / "a", b"elsewhere"))
    entry = Store(home, "m").entry(registry.tags("m", version)["digest"])
    writable(entry.root)
    shutil.rmtree(entry.root)  # as on a fresh node: only MLflow has the files
    fetched, now = fetch(registry, "m", version)
    assert now and fetched == entry and entry.signature.is_file()
    registry.promote("m", version)
    check_servable(version_of(registry, "m", version))
    assert fetch(registry, "m", version) == (entry, False)


def test_a_fetched_copy_that_does_not_match_is_refused(home, tmp_path):
    registry = Registry(home)
    version = release(home, "m", stand_in_model(tmp_path / "a", b"true"))
    entry = Store(home, "m").entry(registry.tags("m", version)["digest"])
    writable(entry.root)
    shutil.rmtree(entry.root)
    copy = registry.download("m", version, tmp_path / "peek")
    artifacts = next(p for p in home.artifact_root.rglob("model.safetensors"))
    writable(artifacts.parent)
    artifacts.write_bytes(artifacts.read_bytes()[:-1] + b"!")  # the artifact store was altered
    with pytest.raises(FetchError, match=r"hashes to sha256:.*not the registered"):
        fetch(registry, "m", version)
    assert not entry.root.exists() and copy.is_dir()


def test_a_backup_restores_into_an_empty_home_that_serves_the_same_champion(home, tmp_path):
    registry = Registry(home)
    version = release(home, "m", stand_in_model(tmp_path / "a", b"champion"))
    registry.promote("m", version)
    passphrase = b"correct horse battery staple"
    record = backup(home, tmp_path / "backup", passphrase)
    assert "keys/signing.key.enc" in record["files"] and "mlflow/mlflow.db" in record["files"]
    encrypted = (tmp_path / "backup" / "keys" / "signing.key.enc").read_bytes()
    assert encrypted.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")

    fresh = make_home(tmp_path / "fresh")
    restored = restore(tmp_path / "backup", fresh, passphrase)
    assert "the private signing key" in restored
    again = Registry(fresh)
    assert again.alias("m", "champion") == version
    champion = version_of(again, "m", version)
    check_servable(champion)  # same digest, verified with the restored keyring
    private, _ = default_keys(fresh)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    restored_key = private.read_bytes()
    keygen(fresh)  # the restored key is kept, not replaced
    assert private.read_bytes() == restored_key
    with pytest.raises(BackupError, match="restore into an empty home"):
        restore(tmp_path / "backup", fresh, passphrase)
    with pytest.raises(BackupError, match="not empty: back up into a new folder"):
        backup(home, tmp_path / "backup")
