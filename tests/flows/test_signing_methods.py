"""Each version carries its own trust: a model signed with the default key or with a certificate
chain is accepted by `make up`'s check and by the rollout's preconditions, verified with exactly
the signer it recorded; a version whose files or recorded signer do not match is refused on both
paths. Keyless Sigstore cannot be verified offline (below)."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import pytest

from configs.models import Signing
from tasks.registry import Registry
from tasks.rollout.plan import RolloutRefused, preconditions
from tasks.servable import NotServable, check_servable, version_of
from tasks.store import writable
from tests.releases import gateway_serving, release, stand_in_model
from tests.serving.conftest import MODEL
from tests.tasks.test_signing import make_chain


def signing_for(method: str, tmp_path: Path) -> Signing:
    if method == "key":
        return Signing()
    if method == "sigstore":
        pytest.skip(
            "keyless Sigstore: verification needs a Fulcio certificate with an embedded SCT "
            "and a Rekor inclusion proof checked against the trust root; sigstore-python has no "
            "offline issuer to make them, and faking Fulcio, Rekor and a CT log is beyond a test"
        )
    key, leaf, ca = make_chain(tmp_path)
    return Signing(
        method="certificate", private_key=key, signing_certificate=leaf, certificate_chain=[ca]
    )


@pytest.mark.parametrize("method", ["key", "certificate", "sigstore"])
def test_make_up_and_the_rollout_verify_each_signing_method(home, tmp_path, method):
    config = signing_for(method, tmp_path)
    registry = Registry(home)
    stable = release(home, MODEL, stand_in_model(tmp_path / "a", b"stable"), signing=config)
    registry.promote(MODEL, stable)
    candidate = release(
        home, MODEL, stand_in_model(tmp_path / "b", b"candidate"), "gptq-w8a8", signing=config
    )
    champion = version_of(registry, MODEL, stable)
    assert champion.tags["signing_method"] == method
    check_servable(champion)  # `make up`'s check
    with ExitStack() as stack:
        admin = gateway_serving(stack, home, stable)
        plan = preconditions(registry, admin, MODEL, candidate)  # the rollout's
        assert plan.candidate.version == candidate and plan.stable.version == stable

        writable(plan.candidate.weights)
        (plan.candidate.weights / "model.safetensors").write_bytes(b"swapped")
        with pytest.raises(RolloutRefused, match="its signature does not verify"):
            preconditions(registry, admin, MODEL, candidate)


def test_a_version_verified_with_another_signer_than_it_records_is_refused(home, tmp_path):
    """Signed with the default key but recorded as certificate-signed: neither path falls back
    to the default key."""
    registry = Registry(home)
    key, leaf, ca = make_chain(tmp_path)
    claimed = Signing(
        method="certificate", private_key=key, signing_certificate=leaf, certificate_chain=[ca]
    )
    other = release(home, MODEL, stand_in_model(tmp_path / "c", b"claims"), signing=claimed)
    forged = release(
        home,
        MODEL,
        stand_in_model(tmp_path / "d", b"forged"),
        signing_method="certificate",
        signing_certificate_subject="CN=release-bot",
        signing_chain_fingerprint=registry.tags(MODEL, other)["signing_chain_fingerprint"],
        signer="certificate:CN=release-bot",
    )
    registry.promote(MODEL, forged)
    with pytest.raises(NotServable, match="was not made by the expected signer"):
        check_servable(version_of(registry, MODEL, forged))
