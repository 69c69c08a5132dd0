"""Signing: a standard bundle the model_signing CLI accepts; every kind of tampering is refused
with a message that names the file; a foreign key is refused."""

from __future__ import annotations

import re
import stat
import subprocess
import sys
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


def test_keygen_is_private_and_idempotent(home):
    private, public = signing.keygen(home)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(home.keys.stat().st_mode) == 0o700
    before = private.read_bytes()
    assert signing.keygen(home) == (private, public)
    assert private.read_bytes() == before  # an existing key is kept, never rotated silently


def test_verify_accepts_an_untouched_model(home, signed):
    info = signing.verify(signed, Signing(), home)
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
        signing.verify(signed, Signing(), home)
    assert expected in str(e.value)
    assert "b'" not in str(e.value)  # no raw digest bytes in what users read


def test_wrong_key_is_refused(home, signed, tmp_path):
    other = Home(tmp_path / "other")
    signing.keygen(other)
    _, public = signing.default_keys(other)
    with pytest.raises(signing.SignatureError, match="not made by the expected signer"):
        signing.verify(signed, Signing(public_key=public), home)


def test_unsigned_model_is_refused(home, tiny_model):
    with pytest.raises(signing.SignatureError, match="is not signed"):
        signing.verify(tiny_model, Signing(), home)


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
    assert signing.verify(weights, config, home).method == "certificate"
    flip_byte(weights)
    with pytest.raises(
        signing.SignatureError, match=re.escape("changed since signing: model.safetensors")
    ):
        signing.verify(weights, config, home)
