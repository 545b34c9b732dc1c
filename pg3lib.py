"""Crypto helpers: the course's ``pg3lib`` formats on pycryptodome (docs/PROTOCOL.md section 8).

Module functions, drop-in for the course helper, working with this process's
own key pair (made on first use, not at import):

* ``getPubKey() -> bytes``: the key form (base64 of the PEM public key);
* ``encrypt(message, pubkey) -> bytes``: the sealed form
  ``base64(RSA-OAEP-SHA256(K)) ; base64(Fernet(K, message))``, the course
  helper's bytes (the Fernet token's ASCII base64-encoded once more);
* ``decrypt(cipher) -> bytes``: the inverse, with this process's private key.

Opening also accepts the bare-token form ``base64(RSA-OAEP(K)) ; Fernet(K, m)``
that version 1 of the protocol page described and earlier releases of this
project made (histories still hold it); a bare token always starts ``gAAAAA``
(version byte 0x80 and the high bytes of its timestamp), which the extra
base64 layer never does, so the two are told apart by their first bytes.

Beside them, the objects the server and client use: ``PublicKey`` (parse and
check a key form, fingerprint, seal, verify a PM signature) and ``KeyPair``
(generate, save and load as PKCS#8 PEM, open sealed messages, sign).
``Fernet`` is the Fernet token of the Fernet specification, built here from
AES-128-CBC and HMAC-SHA256. Everything that fails to verify or parse raises
``CryptoError`` (``InvalidToken`` or ``InvalidKey``) and never yields a partial
plaintext.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import os
import re
import struct
import tempfile
import threading
import time

from Crypto.Cipher import AES, PKCS1_OAEP
from Crypto.Hash import SHA256
from Crypto.PublicKey import RSA
from Crypto.Signature import pss
from Crypto.Util.Padding import pad, unpad

KEY_BITS = 2048
MIN_KEY_BITS = 2048
# Big enough for any real key, small enough that a hostile key cannot make a
# signature check slow.
MAX_KEY_BITS = 8192
PUBLIC_EXPONENT = 65537
PSS_SALT_BYTES = 32
# Encrypted PKCS#8: scrypt key derivation with AES-256-CBC.
PKCS8_PROTECTION = "scryptAndAES256-CBC"

# Every Fernet token (version 0x80, then a timestamp below 2**40) starts so in
# URL-safe base64; the course's extra base64 layer turns it into ``Z0FBQUFB``.
_BARE_TOKEN_PREFIX = b"gAAAAA"

_STD_B64 = re.compile(rb"\A[A-Za-z0-9+/]*={0,2}\Z")
_URL_B64 = re.compile(rb"\A[A-Za-z0-9_-]*={0,2}\Z")


class CryptoError(Exception):
    """Something did not parse or verify."""


class InvalidToken(CryptoError):
    """A Fernet token or sealed message that is malformed or fails its check."""


class InvalidKey(CryptoError):
    """A key that is malformed, too small, private where public was asked, ..."""


def _as_bytes(value: bytes | str) -> bytes:
    """Text or bytes as bytes.

    Raises:
        UnicodeEncodeError: text that is not ASCII.
        TypeError: anything else; ``bytes(value)`` would turn a JSON number
            into that many zero bytes (``10**12`` of them, from one short frame).
    """
    if isinstance(value, str):
        return value.encode("ascii")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"expected bytes or str, not {type(value).__name__}")


def b64decode_strict(value: bytes | str, *, urlsafe: bool = False) -> bytes:
    """Decode base64, refusing characters outside the alphabet and non-canonical text.

    Raises:
        ValueError: not valid base64 of the chosen alphabet.
    """
    raw = _as_bytes(value)
    if not (_URL_B64 if urlsafe else _STD_B64).match(raw):
        raise ValueError("not base64")
    try:
        if urlsafe:
            decoded = base64.urlsafe_b64decode(raw)
        else:
            decoded = base64.b64decode(raw, validate=True)
    except binascii.Error as exc:
        raise ValueError(str(exc)) from None
    # The last character before '=' padding has spare bits that decoding ignores;
    # refusing them keeps one text per value, so no bit of a token or key can
    # change without it being rejected.
    if (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(decoded) != raw:
        raise ValueError("not canonical base64")
    return decoded


# --- Fernet -----------------------------------------------------------------

_FERNET_VERSION = 0x80
_FERNET_OVERHEAD = 1 + 8 + 16 + 32  # version, timestamp, IV, HMAC
_MAX_CLOCK_SKEW = 60


class Fernet:
    """The Fernet token of the Fernet specification (version 0x80)."""

    __slots__ = ("_signing_key", "_encryption_key")

    def __init__(self, key: bytes | str) -> None:
        try:
            raw = b64decode_strict(key, urlsafe=True)
        except (ValueError, TypeError, UnicodeEncodeError):
            raise InvalidKey("a Fernet key is 32 bytes of URL-safe base64") from None
        if len(raw) != 32:
            raise InvalidKey("a Fernet key is 32 bytes of URL-safe base64")
        self._signing_key = raw[:16]
        self._encryption_key = raw[16:]

    @staticmethod
    def generate_key() -> bytes:
        """A fresh random key, URL-safe base64 of 32 bytes."""
        return base64.urlsafe_b64encode(os.urandom(32))

    def encrypt(self, data: bytes, *, now: int | None = None, iv: bytes | None = None) -> bytes:
        """Return the token for data (``now`` and ``iv`` only for test vectors)."""
        if now is None:
            now = int(time.time())
        if iv is None:
            iv = os.urandom(16)
        ciphertext = AES.new(self._encryption_key, AES.MODE_CBC, iv).encrypt(pad(bytes(data), 16))
        signed = struct.pack(">BQ", _FERNET_VERSION, now) + iv + ciphertext
        tag = hmac.new(self._signing_key, signed, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(signed + tag)

    def decrypt(self, token: bytes | str, *, ttl: int | None = None, now: int | None = None) -> bytes:
        """Verify and decrypt a token. ``ttl`` (seconds) is checked only when given.

        Raises:
            InvalidToken: malformed, wrong key, tampered, or (with ttl) expired.
        """
        try:
            raw = b64decode_strict(token, urlsafe=True)
        except (ValueError, TypeError, UnicodeEncodeError):
            raise InvalidToken("token is not URL-safe base64") from None
        if len(raw) < _FERNET_OVERHEAD + 16 or raw[0] != _FERNET_VERSION:
            raise InvalidToken("token is too short or of an unknown version")
        if (len(raw) - _FERNET_OVERHEAD) % 16:
            raise InvalidToken("token payload is not a whole number of blocks")
        signed, tag = raw[:-32], raw[-32:]
        expected = hmac.new(self._signing_key, signed, hashlib.sha256).digest()
        if not hmac.compare_digest(tag, expected):
            raise InvalidToken("token does not verify")
        if ttl is not None:
            stamp = struct.unpack(">Q", raw[1:9])[0]
            current = int(time.time()) if now is None else now
            if stamp + ttl < current or stamp > current + _MAX_CLOCK_SKEW:
                raise InvalidToken("token has expired or is from the future")
        try:
            return unpad(AES.new(self._encryption_key, AES.MODE_CBC, raw[9:25]).decrypt(raw[25:-32]), 16)
        except ValueError:
            raise InvalidToken("token padding is wrong") from None


# --- keys -------------------------------------------------------------------

def _oaep(key: RSA.RsaKey):
    return PKCS1_OAEP.new(key, hashAlgo=SHA256)


def _mgf1_sha256(seed: bytes, length: int) -> bytes:
    """MGF1 with SHA-256 (RFC 8017 B.2.1)."""
    blocks = (length + 31) // 32
    return b"".join(hashlib.sha256(seed + counter.to_bytes(4, "big")).digest() for counter in range(blocks))[:length]


def _public_op(key: RSA.RsaKey, s: int) -> int:
    """s**e mod n: pycryptodome's own (Montgomery, native), Python's pow if it is gone."""
    try:
        return key._encrypt(s)
    except AttributeError:
        return pow(s, int(key.e), int(key.n))


def pss_sha256_verify(key: RSA.RsaKey, n: int, data: bytes, signature: bytes) -> bool:
    """RSASSA-PSS-VERIFY (RFC 8017 8.1.2, 9.1.2) with SHA-256, MGF1-SHA-256 and a salt of
    PSS_SALT_BYTES: what ``pss.new(key, salt_bytes=32).verify`` decides, in half its time (its MGF1
    and conversions cost more than the exponentiation; the server checks every PM in its loop).
    n is key.n as a Python integer.
    """
    mod_bits = n.bit_length()
    if len(signature) != (mod_bits + 7) // 8:
        return False
    s = int.from_bytes(signature, "big")
    if s >= n:
        return False
    m = _public_op(key, s)
    em_bits = mod_bits - 1
    em_len = (em_bits + 7) // 8
    h_len, s_len = 32, PSS_SALT_BYTES
    # The leftmost 8*em_len - em_bits bits of EM must be zero: m < 2**em_bits.
    if m >> em_bits or em_len < h_len + s_len + 2:
        return False
    em = m.to_bytes(em_len, "big")
    if em[-1] != 0xBC:
        return False
    db_len = em_len - h_len - 1
    masked_db, h = em[:db_len], em[db_len:-1]
    db_int = int.from_bytes(masked_db, "big") ^ int.from_bytes(_mgf1_sha256(h, db_len), "big")
    db_int &= (1 << (8 * db_len - (8 * em_len - em_bits))) - 1   # clear those leftmost bits in DB
    db = db_int.to_bytes(db_len, "big")
    ps_len = em_len - h_len - s_len - 2
    if db[:ps_len + 1] != bytes(ps_len) + b"\x01":
        return False
    salt = db[-s_len:]
    return hmac.compare_digest(h, hashlib.sha256(bytes(8) + hashlib.sha256(data).digest() + salt).digest())


@functools.lru_cache(maxsize=256)
def _parse_public(key_form: str) -> RSA.RsaKey:
    """A key form already checked by PublicKey.from_key_form, parsed again (the busiest stay parsed)."""
    return RSA.import_key(b64decode_strict(key_form))


class PublicKey:
    """An RSA public key (2048+ bits, e=65537) in the key form of section 8."""

    __slots__ = ("_key", "_key_form", "_fingerprint", "_n")

    def __init__(self, key: RSA.RsaKey) -> None:
        if key.has_private():
            raise InvalidKey("a private key was offered where a public key belongs")
        bits = key.size_in_bits()
        if bits < MIN_KEY_BITS or bits > MAX_KEY_BITS:
            raise InvalidKey(f"an RSA key of {bits} bits (allowed: {MIN_KEY_BITS}-{MAX_KEY_BITS})")
        if key.e != PUBLIC_EXPONENT:
            raise InvalidKey(f"an RSA key with exponent {key.e} (expected {PUBLIC_EXPONENT})")
        self._key: RSA.RsaKey | None = key
        self._n = int(key.n)   # the modulus as a Python int, for signature checks (int(key.n) costs 6 µs)
        self._key_form: str | None = None
        self._fingerprint: str | None = None

    @classmethod
    def from_key_form(cls, text: bytes | str) -> PublicKey:
        """Parse the key form (base64 of a PEM ``PUBLIC KEY``).

        Raises:
            InvalidKey: not that form, not RSA, too small, private.
        """
        try:
            pem = b64decode_strict(text)
            if not pem.lstrip().startswith(b"-----BEGIN PUBLIC KEY-----"):
                if b"PRIVATE KEY" in pem:
                    raise InvalidKey("a private key was offered where a public key belongs")
                raise InvalidKey("not a PEM public key")
            key = RSA.import_key(pem)
        except InvalidKey:
            raise
        except (ValueError, IndexError, TypeError, UnicodeError):
            raise InvalidKey("not an RSA public key in key form") from None
        result = cls(key)
        result._key_form = _as_bytes(text).decode("ascii")
        return result

    @property
    def key_form(self) -> str:
        """The key form: standard base64 of the PEM text, one ASCII line."""
        if self._key_form is None:
            # The course helper's PEM (from cryptography) ends with a newline;
            # pycryptodome's does not. Same key, same bytes: add it.
            pem = self._rsa().export_key("PEM").rstrip(b"\n") + b"\n"
            self._key_form = base64.b64encode(pem).decode("ascii")
        return self._key_form

    @property
    def bits(self) -> int:
        return self._rsa().size_in_bits()

    def compact(self) -> PublicKey:
        """Keep only the key form and fingerprint; the key is parsed again (cached) when used.

        A server holds one key per online user: text is a third of a parsed key's size.
        """
        if self._key_form is not None:
            self.fingerprint  # noqa: B018 - computed while the parsed key is at hand
            self._key = None
        return self

    def _rsa(self) -> RSA.RsaKey:
        return self._key if self._key is not None else _parse_public(self._key_form)

    @property
    def fingerprint(self) -> str:
        """``SHA256:`` + unpadded base64 of SHA-256 of the DER SubjectPublicKeyInfo."""
        if self._fingerprint is None:
            digest = hashlib.sha256(self._rsa().export_key("DER")).digest()
            self._fingerprint = "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")
        return self._fingerprint

    def seal(self, message: bytes) -> bytes:
        """The sealed form of message under this key."""
        fernet_key = Fernet.generate_key()
        wrapped = _oaep(self._rsa()).encrypt(fernet_key)
        token = Fernet(fernet_key).encrypt(message)
        return base64.b64encode(wrapped) + b";" + base64.b64encode(token)

    def verify(self, data: bytes, signature: bytes | str) -> bool:
        """True if signature (base64 RSA-PSS SHA-256, salt 32) is this key's over data."""
        try:
            return pss_sha256_verify(self._rsa(), self._n, data, b64decode_strict(signature))
        except (ValueError, TypeError, UnicodeError, OverflowError):   # none expected past the decoding
            return False

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and self.fingerprint == other.fingerprint

    def __hash__(self) -> int:
        return hash(self.fingerprint)


class KeyPair:
    """An RSA key pair: generate, save/load (PKCS#8 PEM), open sealed messages, sign."""

    __slots__ = ("_key", "public")

    def __init__(self, key: RSA.RsaKey) -> None:
        if not key.has_private():
            raise InvalidKey("a key pair needs the private key")
        self._key = key
        self.public = PublicKey(key.public_key())

    @classmethod
    def generate(cls, bits: int = KEY_BITS) -> KeyPair:
        """A fresh key pair (e=65537)."""
        return cls(RSA.generate(bits, e=PUBLIC_EXPONENT))

    def to_pem(self, passphrase: str | None = None) -> bytes:
        """PKCS#8 PEM; encrypted (scrypt + AES-256-CBC) when a passphrase is given."""
        if passphrase is None:
            return self._key.export_key(format="PEM", pkcs=8)
        return self._key.export_key(format="PEM", pkcs=8, passphrase=passphrase,
                                    protection=PKCS8_PROTECTION)

    @classmethod
    def from_pem(cls, pem: bytes, passphrase: str | None = None) -> KeyPair:
        """Parse PKCS#8 PEM.

        Raises:
            InvalidKey: not a private RSA key, or the wrong passphrase.
        """
        try:
            key = RSA.import_key(pem, passphrase=passphrase)
        except (ValueError, IndexError, TypeError):
            raise InvalidKey("not a private RSA key, or the wrong passphrase") from None
        return cls(key)

    def save(self, path: str, passphrase: str | None = None) -> None:
        """Write the private key to path, mode 0600, atomically."""
        write_private_file(path, self.to_pem(passphrase))

    @classmethod
    def load(cls, path: str, passphrase: str | None = None) -> KeyPair:
        """Read a key pair saved by ``save``.

        Raises:
            OSError: the file cannot be read.
            InvalidKey: see ``from_pem``.
        """
        with open(path, "rb") as fh:
            return cls.from_pem(fh.read(), passphrase)

    @property
    def fingerprint(self) -> str:
        return self.public.fingerprint

    def open(self, sealed: bytes | str) -> bytes:
        """Decrypt a sealed message meant for this key pair.

        Raises:
            InvalidToken: it does not parse, or its key or tag does not verify.
        """
        try:
            raw = _as_bytes(sealed)
        except (UnicodeEncodeError, TypeError):
            raise InvalidToken("a sealed message is ASCII text") from None
        wrapped, sep, token = raw.partition(b";")
        if not sep:
            raise InvalidToken("a sealed message is 'key;token'")
        try:
            fernet_key = _oaep(self._key).decrypt(b64decode_strict(wrapped))
        except (ValueError, TypeError):
            raise InvalidToken("the sealed key does not decrypt with this key pair") from None
        try:
            fernet = Fernet(fernet_key)
        except InvalidKey:
            raise InvalidToken("the sealed key is not a Fernet key") from None
        return fernet.decrypt(_fernet_token(token))

    def sign(self, data: bytes) -> str:
        """Base64 RSA-PSS (SHA-256, MGF1-SHA-256, salt 32) signature over data."""
        raw = pss.new(self._key, salt_bytes=PSS_SALT_BYTES).sign(SHA256.new(data))
        return base64.b64encode(raw).decode("ascii")


def _fernet_token(part: bytes) -> bytes:
    """The Fernet token inside a sealed text's second part, in either form.

    Raises:
        InvalidToken: the course form whose outer base64 does not decode.
    """
    if part.startswith(_BARE_TOKEN_PREFIX):
        return part  # the version-1 form: the token itself
    try:
        return b64decode_strict(part)
    except ValueError:
        raise InvalidToken("the sealed token is not base64 of a Fernet token") from None


def sealed_form_problem(sealed: str, key_bytes: int | None = None) -> str | None:
    """Why a text is not the sealed form (either form ``open`` takes), or None: its syntax only,
    nothing is decrypted (the server checks a PM's sealed texts so). ``key_bytes``: the size of
    the key it is sealed to (its modulus, in bytes); None: any size keys may have."""
    try:
        raw = _as_bytes(sealed)
    except (UnicodeEncodeError, TypeError):
        return "sealed texts are ASCII"
    wrapped, sep, token = raw.partition(b";")
    if not sep:
        return "a sealed text is 'key;token' (section 8)"
    try:
        size = len(b64decode_strict(wrapped))
    except ValueError:
        return "the sealed key of a sealed text is not standard base64"
    if size != key_bytes if key_bytes else not MIN_KEY_BITS // 8 <= size <= MAX_KEY_BITS // 8:
        return "the sealed key of a sealed text is not RSA-OAEP under the key it is sealed to (its size)"
    try:
        fernet = b64decode_strict(_fernet_token(token), urlsafe=True)
    except (ValueError, InvalidToken):
        return "the token of a sealed text is not a Fernet token in base64"
    if fernet[:1] != bytes([_FERNET_VERSION]) or len(fernet) < _FERNET_OVERHEAD + 16 \
            or (len(fernet) - _FERNET_OVERHEAD) % 16:
        return "the token of a sealed text is not a Fernet token"
    return None


def pm_signed_bytes(sender: str, receiver: str, ciphertext: str) -> bytes:
    """The bytes a version-1 PM signature covers (no id, no time: replayable; kept for old clients)."""
    return ("PM1\n" + sender + "\n" + receiver + "\n" + ciphertext).encode("utf-8")


def sealed_digest(sealed: str) -> str:
    """``hex(SHA-256(x))`` of a sealed text's ASCII, as PM2 signs it (docs/PROTOCOL.md section 4.5).

    Raises:
        UnicodeEncodeError: the text is not ASCII (so it is not a sealed text).
    """
    return hashlib.sha256(sealed.encode("ascii")).hexdigest()


def pm2_signed_bytes(pm_id: str, sent: str, sender: str, receiver: str, ciphertext_sha256: str,
                     self_copy_sha256: str) -> bytes:
    """The bytes a PM2 signature covers (docs/PROTOCOL.md section 4.5).

    The digests are ``sealed_digest`` of ``ciphertext`` and ``self_copy``: a
    receiver holds only one of the two sealed texts, and the digest of the other.
    """
    return ("PM2\n" + pm_id + "\n" + sent + "\n" + sender + "\n" + receiver + "\n"
            + ciphertext_sha256 + "\n" + self_copy_sha256).encode("utf-8")


def write_private_file(path: str, data: bytes) -> None:
    """Write data to path with mode 0600: temp file, fsync, rename."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# --- the course helper's module functions -------------------------------------

_process_keys: KeyPair | None = None
_process_keys_lock = threading.Lock()


def _keys() -> KeyPair:
    global _process_keys
    with _process_keys_lock:
        if _process_keys is None:
            _process_keys = KeyPair.generate()
        return _process_keys


def getPubKey() -> bytes:
    """This process's public key in key form (base64 of the PEM text)."""
    return _keys().public.key_form.encode("ascii")


def encrypt(message: bytes, pubkey: bytes | str) -> bytes:
    """Seal message for the public key given in key form.

    Raises:
        InvalidKey: pubkey is not an acceptable public key in key form.
    """
    if isinstance(message, str):
        message = message.encode("utf-8")
    return PublicKey.from_key_form(pubkey).seal(message)


def decrypt(cipher: bytes | str) -> bytes:
    """Open a message sealed for this process's public key.

    Raises:
        InvalidToken: see ``KeyPair.open``.
    """
    return _keys().open(cipher)
