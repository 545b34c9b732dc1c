"""Reference: the course's original ``pg3lib`` helper, rebuilt with ``cryptography``.

Test-only. It behaves as the course's file does (docs/PROTOCOL.md section 8), so our
``pg3lib.py`` is checked against the real bytes: the same three functions,
``encrypt`` returning ``base64(RSA-OAEP(K)) ; base64(Fernet token)`` (the token's
ASCII encoded once more with standard base64) and ``decrypt`` undoing both
layers. Like the original, it makes its RSA key pair when imported, and it
accepts nothing but its own form.
"""

from __future__ import annotations

import base64

from cryptography.fernet import Fernet
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
public_key = private_key.public_key()

_OAEP = padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def getPubKey() -> bytes:  # noqa: N802 - the course helper's name
    """Base64 of this process's PEM SubjectPublicKeyInfo."""
    pem = public_key.public_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PublicFormat.SubjectPublicKeyInfo,
    )
    return base64.b64encode(pem)


def encrypt(message: bytes, pubkey: bytes) -> bytes:
    """Seal message for pubkey (base64 of a PEM public key), in the course's form."""
    key = serialization.load_pem_public_key(base64.b64decode(pubkey))
    fernet_key = Fernet.generate_key()
    wrapped = key.encrypt(fernet_key, _OAEP)
    token = Fernet(fernet_key).encrypt(message)
    return base64.b64encode(wrapped) + b";" + base64.b64encode(token)


def decrypt(cipher: bytes) -> bytes:
    """Open a message sealed for this process's key (the course's form only)."""
    wrapped, token_b64 = cipher.split(b";")
    fernet_key = private_key.decrypt(base64.b64decode(wrapped), _OAEP)
    return Fernet(fernet_key).decrypt(base64.b64decode(token_b64))
