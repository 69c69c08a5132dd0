"""Sign and verify model directories with OpenSSF model signing (sigstore's model_signing).

The signature is a standard Sigstore bundle (model.sig, beside the model directory) that the
`model_signing verify` CLI accepts. Methods: an elliptic key (default; `make setup` generates it
under $SLIPWAY_HOME/keys), a certificate chain, or keyless Sigstore (needs network).
Verification failures are told in plain words: which files changed, appeared or went missing, or
that the signature was not made with the expected key.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from configs.home import Home
from configs.models import Signing

SIGNATURE = "model.sig"


class SignatureError(RuntimeError):
    """A model directory does not verify against its signature; the message says why."""


@dataclass(frozen=True)
class SignatureInfo:
    path: Path
    method: str
    identity: str


def signature_path(model_dir: Path) -> Path:
    """Signatures lie beside the model directory: nothing extra inside what vLLM loads."""
    return model_dir.parent / SIGNATURE


# ---- keys ----------------------------------------------------------------------------------------


def default_keys(home: Home) -> tuple[Path, Path]:
    return home.keys / "signing.key", home.keys / "signing.pub"


def keygen(home: Home) -> tuple[Path, Path]:
    """Create the default P-256 signing key pair once (private key mode 0600); keep an existing
    one."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private, public = default_keys(home)
    if private.exists() and public.exists():
        return private, public
    home.keys.mkdir(parents=True, exist_ok=True)
    os.chmod(home.keys, 0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


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


def identity(config: Signing, home: Home) -> str:
    match config.method:
        case "key":
            return "key:" + key_fingerprint(_keys(config, home)[1])
        case "certificate":
            return "certificate:" + _certificate_subject(config.signing_certificate)
        case "sigstore":
            return f"sigstore:{config.identity} ({config.oidc_issuer})"


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
    return SignatureInfo(target, config.method, identity(config, home))


def verify(model_dir: Path, config: Signing, home: Home) -> SignatureInfo:
    """Raise SignatureError in plain words unless model_dir verifies against its signature."""
    import model_signing

    target = signature_path(model_dir)
    if not target.is_file():
        raise SignatureError(f"{model_dir} is not signed: no {target}")
    verifier = model_signing.verifying.Config()
    match config.method:
        case "key":
            verifier.use_elliptic_key_verifier(public_key=_keys(config, home)[1])
        case "certificate":
            # Trust the CA chain when one is given (any leaf it issued verifies), else the leaf
            # itself.
            verifier.use_certificate_verifier(
                certificate_chain=config.certificate_chain or [config.signing_certificate]
            )
        case "sigstore":
            verifier.use_sigstore_verifier(identity=config.identity, oidc_issuer=config.oidc_issuer)
    try:
        verifier.verify(model_dir, target)
    except ValueError as e:
        raise SignatureError(explain(model_dir, str(e), identity(config, home))) from e
    except Exception as e:  # the crypto layers raise their own types for a foreign signature
        raise SignatureError(
            f"{model_dir}: the signature {target} was not made by the expected signer "
            f"({identity(config, home)}): {e}".rstrip()
        ) from e
    return SignatureInfo(target, config.method, identity(config, home))


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
def verify_task(model_dir: Path, config: Signing, home: Home) -> SignatureInfo:
    return verify(model_dir, config, home)
