"""Signing: a standard bundle the model_signing CLI accepts; every kind of tampering is refused
with a message that names the file; a foreign key is refused; each signature is verified with
the trust it recorded, so a rotated key's versions keep verifying; keygen never replaces a key."""

from __future__ import annotations

import re
import shutil
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from configs.home import Home
from configs.models import Signing
from tasks import signing


@pytest.fixture
def signed(home, tiny_model) -> Path:
    weights = tiny_model.parent / "variant" / "weights"
    weights.parent.mkdir()
    tiny_model.rename(weights)
    signing.keygen(home)
    info = signing.sign(weights, Signing(), home)
    assert info.path == weights.parent / "model.sig" and info.identity.startswith("key:sha256:")
    return weights


def key_trust(home: Home) -> signing.Trust:
    return signing.Trust("key", key_fingerprint=signing.key_fingerprint(home.keys / "signing.pub"))


def test_keygen_is_private_and_idempotent(home):
    private, public = signing.keygen(home)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(home.keys.stat().st_mode) == 0o700
    before = private.read_bytes()
    assert signing.keygen(home) == (private, public)
    assert private.read_bytes() == before  # an existing key is kept, never rotated silently


def test_keygen_derives_a_lost_public_key_and_never_replaces_the_private_one(home):
    private, public = signing.keygen(home)
    before, fingerprint = private.read_bytes(), signing.key_fingerprint(public)
    public.unlink()
    signing.keygen(home)
    assert private.read_bytes() == before and signing.key_fingerprint(public) == fingerprint


def test_keygen_refuses_to_make_a_new_key_when_the_private_one_is_lost(home):
    private, _ = signing.keygen(home)
    private.unlink()
    with pytest.raises(signing.SigningKeyError, match="slipway keys rotate"):
        signing.keygen(home)
    assert not private.exists()


def test_a_rotated_key_still_verifies_what_it_signed(home, signed, tmp_path):
    old = key_trust(home)
    retired, new = signing.rotate(home)
    assert retired == old.key_fingerprint and new != retired
    assert signing.verify(signed, old, home).identity == old.identity  # from the keyring
    other = tmp_path / "later" / "weights"
    other.parent.mkdir()
    shutil.copytree(signed, other)
    later = signing.sign(other, Signing(), home)
    assert later.trust.key_fingerprint == new
    with pytest.raises(signing.SignatureError, match="not made by the expected signer"):
        signing.verify(other, old, home)  # a version verifies only with its own signer


def test_trust_round_trips_through_registry_tags(home, signed):
    trust = key_trust(home)
    assert signing.Trust.from_tags(trust.tags()) == trust
    legacy = {"signer": trust.identity}  # a version registered before trust was recorded
    assert signing.Trust.from_tags(legacy) == trust
    with pytest.raises(signing.SignatureError, match="records no signing method"):
        signing.Trust.from_tags({"signer": "certificate:CN=someone"})


def test_verify_accepts_an_untouched_model(home, signed):
    info = signing.verify(signed, key_trust(home), home)
    assert info.identity == "key:" + signing.key_fingerprint(home.keys / "signing.pub")


def test_model_signing_cli_accepts_the_bundle(home, signed):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "model_signing",
            "verify",
            "key",
            str(signed),
            "--signature",
            str(signed.parent / "model.sig"),
            "--public_key",
            str(home.keys / "signing.pub"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Verification succeeded" in result.stdout + result.stderr


def flip_byte(weights: Path) -> None:
    path = weights / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "tamper, expected",
    [
        (flip_byte, "changed since signing: model.safetensors"),
        (lambda w: (w / "evil.py").write_text("import os"), "added since signing: evil.py"),
        (lambda w: (w / "LICENSE").unlink(), "missing since signing: LICENSE"),
        (
            lambda w: (w / "LICENSE").rename(w / "LICENSE.txt"),
            "added since signing: LICENSE.txt; missing since signing: LICENSE; "
            "(an added and a missing",
        ),
    ],
    ids=["flipped-byte", "added-file", "deleted-file", "renamed-file"],
)
def test_tampering_is_refused_in_plain_words(home, signed, tamper, expected):
    tamper(signed)
    with pytest.raises(signing.SignatureError) as e:
        signing.verify(signed, key_trust(home), home)
    assert expected in str(e.value)
    assert "b'" not in str(e.value)  # no raw digest bytes in what users read


def test_wrong_key_is_refused(home, signed, tmp_path):
    other = Home(tmp_path / "other")
    signing.keygen(other)
    _, public = signing.default_keys(other)
    foreign = signing.Trust("key", key_fingerprint=signing.trust_key(public, home))
    with pytest.raises(signing.SignatureError, match="not made by the expected signer"):
        signing.verify(signed, foreign, home)


def test_unsigned_model_is_refused(home, tiny_model):
    signing.keygen(home)
    with pytest.raises(signing.SignatureError, match="is not signed"):
        signing.verify(tiny_model, key_trust(home), home)


def test_sign_without_key_says_how_to_fix(home, tiny_model):
    with pytest.raises(signing.SignatureError, match="make setup"):
        signing.sign(tiny_model, Signing(), home)


def make_chain(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A CA and a leaf signing certificate (P-256), as a company PKI would issue them."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def cert(subject, issuer, key, signer, ca: bool):
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=not ca,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=ca,
                    crl_sign=ca,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
        )
        if not ca:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False
            ).add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),
                critical=False,
            )
        return builder.sign(signer, hashes.SHA256())

    ca_key, leaf_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    ca = cert("Slipway Test CA", "Slipway Test CA", ca_key, ca_key, ca=True)
    leaf = cert("release-bot", "Slipway Test CA", leaf_key, ca_key, ca=False)
    paths = tmp_path / "leaf.key", tmp_path / "leaf.pem", tmp_path / "ca.pem"
    paths[0].write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return paths


def test_certificate_chain_signing(home, tiny_model, tmp_path):
    key, leaf, ca = make_chain(tmp_path)
    config = Signing(
        method="certificate", private_key=key, signing_certificate=leaf, certificate_chain=[ca]
    )
    weights = tiny_model.parent / "variant" / "weights"
    weights.parent.mkdir()
    tiny_model.rename(weights)
    info = signing.sign(weights, config, home)
    assert info.identity == "certificate:CN=release-bot"
    assert signing.verify(weights, info.trust, home).method == "certificate"
    for path in (key, leaf, ca):  # verification needs only what the keyring kept
        path.unlink()
    assert signing.verify(weights, info.trust, home).identity == "certificate:CN=release-bot"
    impostor = replace(info.trust, certificate_subject="CN=someone-else")
    with pytest.raises(signing.SignatureError, match="signed by CN=release-bot, not by the"):
        signing.verify(weights, impostor, home)
    flip_byte(weights)
    with pytest.raises(
        signing.SignatureError, match=re.escape("changed since signing: model.safetensors")
    ):
        signing.verify(weights, info.trust, home)
