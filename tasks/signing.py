"""Sign and verify model directories with OpenSSF model signing (sigstore's model_signing).

The signature is a standard Sigstore bundle (model.sig, beside the model directory) that the
`model_signing verify` CLI accepts. Methods: an elliptic key (default; `make setup` generates it
under $SLIPWAY_HOME/keys), a certificate chain, or keyless Sigstore (needs network).

Each version carries its own trust: signing records the method and the identity (the key's
fingerprint, the certificate's subject and the fingerprint of the CA chain it verifies against,
or the Sigstore identity and issuer) as a `Trust`, and verification uses exactly that. The public
half of every key and chain that signed something is kept in the keyring ($SLIPWAY_HOME/keys/
trusted/), so a version signed before a key rotation still verifies. Verification failures are
told in plain words: which files changed, appeared or went missing, or that the signature was
not made by the expected signer.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

from prefect import task
from prefect.cache_policies import NO_CACHE

from configs.home import Home
from configs.models import Signing

SIGNATURE = "model.sig"
Method = Literal["key", "certificate", "sigstore"]


class SignatureError(RuntimeError):
    """A model directory does not verify against its signature; the message says why."""


class SigningKeyError(RuntimeError):
    """The signing key cannot be made or changed as asked; the message says how to proceed."""


@dataclass(frozen=True)
class Trust:
    """Who signed a version, as recorded with it, and so what its signature is verified with."""

    method: Method
    key_fingerprint: str | None = None  # key: sha256 of the DER public key
    certificate_subject: str | None = None  # certificate: the signing certificate's subject
    chain_fingerprint: str | None = None  # certificate: sha256 of the CA chain's PEM
    sigstore_identity: str | None = None
    sigstore_issuer: str | None = None

    @property
    def identity(self) -> str:
        match self.method:
            case "key":
                return f"key:{self.key_fingerprint}"
            case "certificate":
                return f"certificate:{self.certificate_subject}"
            case "sigstore":
                return f"sigstore:{self.sigstore_identity} ({self.sigstore_issuer})"

    def tags(self) -> dict[str, str]:
        """As registry tags: `signer` (readable) and one `signing_*` tag per recorded field."""
        recorded = {f"signing_{f.name}": getattr(self, f.name) for f in fields(self)}
        return {"signer": self.identity} | {k: v for k, v in recorded.items() if v is not None}

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> Trust:
        """The trust a version's tags record. Versions registered before trust was recorded
        carry only `signer`; a key signer's fingerprint is read from it."""
        if method := tags.get("signing_method"):
            return cls(
                **{f.name: tags.get(f"signing_{f.name}") for f in fields(cls)} | {"method": method}
            )
        signer = tags.get("signer", "")
        if signer.startswith("key:sha256:"):
            return cls("key", key_fingerprint=signer.removeprefix("key:"))
        raise SignatureError(
            f"the version records no signing method it can be verified with (signer={signer!r}); "
            "re-run the release so that it is signed and registered with its trust"
        )


@dataclass(frozen=True)
class SignatureInfo:
    path: Path
    trust: Trust

    @property
    def method(self) -> str:
        return self.trust.method

    @property
    def identity(self) -> str:
        return self.trust.identity


def signature_path(model_dir: Path) -> Path:
    """Signatures lie beside the model directory: nothing extra inside what vLLM loads."""
    return model_dir.parent / SIGNATURE


# ---- keys ----------------------------------------------------------------------------------------


def default_keys(home: Home) -> tuple[Path, Path]:
    return home.keys / "signing.key", home.keys / "signing.pub"


def trusted(home: Home) -> Path:
    """The keyring: public keys and CA chains that signed something, by fingerprint."""
    return home.keys / "trusted"


def _fingerprint_file(folder: Path, fingerprint: str, suffix: str) -> Path:
    return folder / f"{fingerprint.removeprefix('sha256:')}{suffix}"


def _public_pem(private_pem: bytes) -> bytes:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(private_pem, password=None)
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _write_private(path: Path, pem: bytes) -> None:
    """Mode 0600 from the first byte, and never over an existing key."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def _new_private_pem() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def trust_key(public: Path, home: Home) -> str:
    """Keep `public` in the keyring (idempotent); returns its fingerprint."""
    fingerprint = key_fingerprint(public)
    kept = _fingerprint_file(trusted(home), fingerprint, ".pub")
    if not kept.is_file():
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.write_bytes(public.read_bytes())
    return fingerprint


def keygen(home: Home) -> tuple[Path, Path]:
    """The default P-256 signing key pair, made once (private key mode 0600). An existing
    private key is never replaced: a missing public half is derived from it again, and a lost
    private key is refused with the command that starts a new one (`slipway keys rotate`)."""
    private, public = default_keys(home)
    home.keys.mkdir(parents=True, exist_ok=True)
    os.chmod(home.keys, 0o700)
    if private.exists():
        if not public.exists():
            public.write_bytes(_public_pem(private.read_bytes()))
    elif public.exists() or any(trusted(home).glob("*.pub")):
        raise SigningKeyError(
            f"{private} is missing but this home has signed with a key before "
            f"({public if public.exists() else trusted(home)}): restore the private key from "
            "your backup, or start signing with a new key with `slipway keys rotate` (versions "
            "signed by the old key keep verifying)"
        )
    else:
        pem = _new_private_pem()
        _write_private(private, pem)
        public.write_bytes(_public_pem(pem))
    trust_key(public, home)
    return private, public


def rotate(home: Home) -> tuple[str | None, str]:
    """Replace the signing key with a new one. The old public key stays in the keyring, so every
    version it signed keeps verifying; the old private key is deleted. Returns (old, new)
    fingerprints (old is None when there was no key left to retire)."""
    private, public = default_keys(home)
    home.keys.mkdir(parents=True, exist_ok=True)
    old = trust_key(public, home) if public.exists() else None
    pem = _new_private_pem()
    fresh = private.with_suffix(".key.new")
    fresh.unlink(missing_ok=True)
    _write_private(fresh, pem)
    staged_public = public.with_suffix(".pub.new")
    staged_public.write_bytes(_public_pem(pem))
    os.replace(fresh, private)
    os.replace(staged_public, public)
    return old, trust_key(public, home)


def key_fingerprint(public_key: Path) -> str:
    """sha256 of the DER public key: the identity of a key signer, as tags and messages show it."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_public_key(public_key.read_bytes())
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(der).hexdigest()


def _certificate_subject(path: Path) -> str:
    from cryptography import x509

    return x509.load_pem_x509_certificate(path.read_bytes()).subject.rfc4514_string()


def _keys(config: Signing, home: Home) -> tuple[Path, Path]:
    private, public = default_keys(home)
    return config.private_key or private, config.public_key or public


def trust_of(config: Signing, home: Home) -> Trust:
    """The trust a signature made with `config` will carry; its public material goes to the
    keyring, so that verification never depends on the config files still being there."""
    match config.method:
        case "key":
            return Trust("key", key_fingerprint=trust_key(_keys(config, home)[1], home))
        case "certificate":
            chain = b"".join(p.read_bytes() for p in config.certificate_chain) or (
                config.signing_certificate.read_bytes()
            )
            fingerprint = "sha256:" + hashlib.sha256(chain).hexdigest()
            kept = _fingerprint_file(trusted(home), fingerprint, ".chain.pem")
            kept.parent.mkdir(parents=True, exist_ok=True)
            kept.write_bytes(chain)
            subject = _certificate_subject(config.signing_certificate)
            return Trust("certificate", certificate_subject=subject, chain_fingerprint=fingerprint)
        case "sigstore":
            return Trust(
                "sigstore", sigstore_identity=config.identity, sigstore_issuer=config.oidc_issuer
            )


def _kept(home: Home, fingerprint: str | None, suffix: str, what: str) -> Path:
    path = _fingerprint_file(trusted(home), fingerprint or "", suffix)
    if not fingerprint or not path.is_file():
        raise SignatureError(
            f"the {what} {fingerprint} that signed it is not in the keyring ({trusted(home)}): "
            "restore the keyring from a backup (`slipway restore`), or trust it again by copying "
            f"its PEM to {path}"
        )
    return path


# ---- sign / verify -------------------------------------------------------------------------------


def sign(model_dir: Path, config: Signing, home: Home) -> SignatureInfo:
    import model_signing

    private = _keys(config, home)[0]
    if config.method == "key" and not private.exists():
        raise SignatureError(f"no signing key at {private}: run `make setup` (it generates one)")
    signer = model_signing.signing.Config()
    match config.method:
        case "key":
            signer.use_elliptic_key_signer(private_key=private)
        case "certificate":
            signer.use_certificate_signer(
                private_key=config.private_key,
                signing_certificate=config.signing_certificate,
                certificate_chain=config.certificate_chain,
            )
        case "sigstore":
            signer.use_sigstore_signer()
    target = signature_path(model_dir)
    partial = target.with_suffix(".sig.partial")
    signer.sign(model_dir, partial)
    os.replace(partial, target)  # a crash mid-sign never leaves a half-written signature
    return SignatureInfo(target, trust_of(config, home))


def verify(model_dir: Path, trust: Trust, home: Home) -> SignatureInfo:
    """Raise SignatureError in plain words unless model_dir verifies against its signature, made
    by exactly the signer `trust` records."""
    import model_signing

    target = signature_path(model_dir)
    if not target.is_file():
        raise SignatureError(f"{model_dir} is not signed: no {target}")
    verifier = model_signing.verifying.Config()
    match trust.method:
        case "key":
            public = _kept(home, trust.key_fingerprint, ".pub", "public key")
            verifier.use_elliptic_key_verifier(public_key=public)
        case "certificate":
            # The CA chain recorded at signing: any leaf it issued verifies, none other.
            chain = _kept(home, trust.chain_fingerprint, ".chain.pem", "certificate chain")
            verifier.use_certificate_verifier(certificate_chain=[chain])
        case "sigstore":
            verifier.use_sigstore_verifier(
                identity=trust.sigstore_identity, oidc_issuer=trust.sigstore_issuer
            )
    try:
        verifier.verify(model_dir, target)
    except ValueError as e:
        raise SignatureError(explain(model_dir, str(e), trust.identity)) from e
    except Exception as e:  # the crypto layers raise their own types for a foreign signature
        raise SignatureError(
            f"{model_dir}: the signature {target} was not made by the expected signer "
            f"({trust.identity}): {e}".rstrip()
        ) from e
    if trust.method == "certificate" and (subject := _signed_subject(target)) != (
        trust.certificate_subject
    ):
        raise SignatureError(
            f"{model_dir}: signed by {subject}, not by the recorded {trust.certificate_subject}"
        )
    return SignatureInfo(target, trust)


def _signed_subject(bundle: Path) -> str:
    """The subject of the leaf certificate in a model_signing bundle."""
    import base64
    import json

    from cryptography import x509

    material = json.loads(bundle.read_text())["verificationMaterial"]
    leaf = material["x509CertificateChain"]["certificates"][0]["rawBytes"]
    return x509.load_der_x509_certificate(base64.b64decode(leaf)).subject.rfc4514_string()


_LIST = re.compile(
    r"(Extra|Missing) files (?:found )?in model '[^']*': ([^\"\]]+?)(?:['\"],|['\"]\]|$)"
)
# The report is a list's repr, so an item holding digest bytes with a quote has its quotes escaped.
_CHANGED = re.compile(r"Hash mismatch for \\?'([^'\\]+)\\?'")


def explain(model_dir: Path, message: str, signer: str) -> str:
    """Turn model_signing's mismatch report (digests printed as raw bytes) into plain words."""
    if not message.startswith("Signature mismatch"):
        return (
            f"{model_dir}: the signature was not made by the expected signer ({signer}): {message}"
        )
    lists = {kind: [f.strip() for f in files.split(",")] for kind, files in _LIST.findall(message)}
    added, removed = lists.get("Extra", []), lists.get("Missing", [])
    parts = []
    if changed := _CHANGED.findall(message):
        parts.append(f"changed since signing: {', '.join(changed)}")
    if added:
        parts.append(f"added since signing: {', '.join(added)}")
    if removed:
        parts.append(f"missing since signing: {', '.join(removed)}")
    if added and removed:
        parts.append("(an added and a missing file together may be a rename)")
    return f"{model_dir} does not match its signature: " + "; ".join(parts or [message])


# ---- Prefect -------------------------------------------------------------------------------------


@task(name="sign", cache_policy=NO_CACHE)
def sign_task(model_dir: Path, config: Signing, home: Home) -> SignatureInfo:
    return sign(model_dir, config, home)


@task(name="verify", cache_policy=NO_CACHE)
def verify_task(model_dir: Path, trust: Trust, home: Home) -> SignatureInfo:
    return verify(model_dir, trust, home)
