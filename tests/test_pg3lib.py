"""Tests for pg3lib.py: Fernet, keys and sealed messages (docs/PROTOCOL.md section 8).

Fernet is checked against the specification's published vectors, and the
module functions against ``course_pg3lib``, the course's original helper
written with ``cryptography``: ciphertexts, keys, fingerprints and signatures
must cross both ways.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import course_pg3lib
import pytest
from Crypto.Cipher import PKCS1_OAEP
from Crypto.Hash import SHA256
from Crypto.PublicKey import RSA
from Crypto.Signature import pss
from cryptography import fernet as crypto_fernet
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

import pg3lib
from pg3lib import Fernet, InvalidKey, InvalidToken, KeyPair, PublicKey

REPO = Path(__file__).resolve().parent.parent
VECTORS = Path(__file__).resolve().parent / "vectors"

PSS_32 = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
OAEP_SHA256 = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def load_vectors(name: str) -> list[dict]:
    with open(VECTORS / name, encoding="utf-8") as fh:
        return json.load(fh)


def epoch(iso: str) -> int:
    return int(datetime.datetime.fromisoformat(iso).timestamp())


def pem_of(private_key: rsa.RSAPrivateKey) -> bytes:
    return private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())


def key_form(pem: bytes) -> bytes:
    return base64.b64encode(pem)


def flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


# RSA keys come from cryptography (fast); KeyPair.generate runs once, for the process key.

@pytest.fixture(scope="module")
def crypto_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def keypair(crypto_key: rsa.RSAPrivateKey) -> KeyPair:
    return KeyPair.from_pem(pem_of(crypto_key))


@pytest.fixture(scope="module")
def other_keypair() -> KeyPair:
    return KeyPair.from_pem(pem_of(rsa.generate_private_key(public_exponent=65537, key_size=2048)))


@pytest.fixture(scope="module")
def sealed(keypair: KeyPair) -> bytes:
    return keypair.public.seal(b"attack at dawn")


# --- Fernet: the specification's vectors ---------------------------------------------

@pytest.mark.parametrize("vector", load_vectors("fernet_generate.json"))
def test_fernet_generate_vectors(vector: dict) -> None:
    f = Fernet(vector["secret"])
    token = f.encrypt(vector["src"].encode(), now=epoch(vector["now"]), iv=bytes(vector["iv"]))
    assert token == vector["token"].encode()
    assert f.decrypt(token) == vector["src"].encode()


@pytest.mark.parametrize("vector", load_vectors("fernet_verify.json"))
def test_fernet_verify_vectors(vector: dict) -> None:
    f = Fernet(vector["secret"].encode())
    now = epoch(vector["now"])
    src = vector["src"].encode()
    assert f.decrypt(vector["token"], ttl=vector["ttl_sec"], now=now) == src
    assert f.decrypt(vector["token"].encode(), ttl=vector["ttl_sec"], now=now) == src
    # No time-to-live is enforced unless one is asked for: years later it still opens.
    assert f.decrypt(vector["token"]) == src
    assert f.decrypt(vector["token"], now=now + 10**9) == src
    with pytest.raises(InvalidToken):
        f.decrypt(vector["token"], ttl=vector["ttl_sec"], now=now + 10**9)


INVALID = load_vectors("fernet_invalid.json")
CLOCK_CASES = ("far-future TS (unacceptable clock skew)", "expired TTL")


@pytest.mark.parametrize("vector", INVALID, ids=[v["desc"] for v in INVALID])
def test_fernet_invalid_vectors(vector: dict) -> None:
    f = Fernet(vector["secret"])
    with pytest.raises(InvalidToken):
        f.decrypt(vector["token"], ttl=vector["ttl_sec"], now=epoch(vector["now"]))
    if vector["desc"] in CLOCK_CASES:
        # Only a TTL check refuses these: by default (section 8) they open.
        expected = crypto_fernet.Fernet(vector["secret"]).decrypt(vector["token"])
        assert f.decrypt(vector["token"]) == expected
        assert f.decrypt(vector["token"], now=epoch(vector["now"])) == expected
    else:
        with pytest.raises(InvalidToken):
            f.decrypt(vector["token"])


def test_invalid_vectors_cover_the_specification() -> None:
    assert len(INVALID) == 10
    assert set(CLOCK_CASES) <= {v["desc"] for v in INVALID}


def test_fernet_ttl_and_clock_skew_bounds() -> None:
    f = Fernet(Fernet.generate_key())
    token = f.encrypt(b"x", now=1000)
    for now in (940, 1000, 1060):
        assert f.decrypt(token, ttl=60, now=now) == b"x"
    for now in (939, 1061):
        with pytest.raises(InvalidToken):
            f.decrypt(token, ttl=60, now=now)
    # now defaults to the clock, for encrypt and decrypt alike.
    assert f.decrypt(f.encrypt(b"y"), ttl=60) == b"y"
    with pytest.raises(InvalidToken):
        f.decrypt(token, ttl=60)


# --- Fernet: against cryptography, keys, tampering -------------------------------------

@settings(max_examples=50)
@given(st.binary(max_size=300))
def test_fernet_crosses_with_cryptography(data: bytes) -> None:
    key = Fernet.generate_key()
    theirs = crypto_fernet.Fernet(key)
    ours = Fernet(key)
    assert theirs.decrypt(ours.encrypt(data)) == data
    assert ours.decrypt(theirs.encrypt(data)) == data


def test_fernet_generate_key() -> None:
    key = Fernet.generate_key()
    assert isinstance(key, bytes) and len(key) == 44
    assert len(base64.urlsafe_b64decode(key)) == 32
    assert key != Fernet.generate_key()


@pytest.mark.parametrize("key", [
    b"", b"short", base64.urlsafe_b64encode(bytes(31)), base64.urlsafe_b64encode(bytes(33)),
    base64.b64encode(b"\xfb" * 32),  # standard alphabet: '+' and '/' are not URL-safe
    base64.urlsafe_b64encode(bytes(32)).rstrip(b"="), "\u00e9" * 44, b"!" * 44,
])
def test_fernet_refuses_bad_keys(key) -> None:
    with pytest.raises(InvalidKey):
        Fernet(key)


def test_fernet_wrong_key() -> None:
    token = Fernet(Fernet.generate_key()).encrypt(b"secret")
    with pytest.raises(InvalidToken):
        Fernet(Fernet.generate_key()).decrypt(token)


def test_fernet_every_bit_flip_is_rejected() -> None:
    key = Fernet.generate_key()
    token = Fernet(key).encrypt(b"hello world")
    f = Fernet(key)
    for bit in range(len(token) * 8):
        with pytest.raises(InvalidToken):
            f.decrypt(flip(token, bit))


@pytest.mark.parametrize("token", [b"", b"gAAA", "\u00e9\u00e9\u00e9\u00e9", b"gAAAAAAdwJ6w\n", b" " * 100])
def test_fernet_malformed_tokens(token) -> None:
    with pytest.raises(InvalidToken):
        Fernet(Fernet.generate_key()).decrypt(token)


# --- sealed messages ---------------------------------------------------------------------

def test_sealed_form(keypair: KeyPair, crypto_key: rsa.RSAPrivateKey) -> None:
    message = "h\u00e9llo \U0001f600".encode()
    text = keypair.public.seal(message)
    assert isinstance(text, bytes)
    text.decode("ascii")
    wrapped, token = text.split(b";")
    raw = base64.b64decode(wrapped, validate=True)
    assert base64.b64encode(raw) == wrapped and len(raw) == 256
    # RSA-OAEP with SHA-256 and MGF1-SHA-256, no label: pycryptodome and cryptography agree.
    private = RSA.import_key(pem_of(crypto_key))
    fernet_key = PKCS1_OAEP.new(private, hashAlgo=SHA256).decrypt(raw)
    assert fernet_key == crypto_key.decrypt(raw, OAEP_SHA256)
    assert len(fernet_key) == 44 and len(base64.urlsafe_b64decode(fernet_key)) == 32
    # The course's form: the Fernet token's ASCII, base64-encoded once more.
    assert not token.startswith(b"gAAAAA")
    inner = base64.b64decode(token, validate=True)
    assert base64.b64encode(inner) == token and inner.startswith(b"gAAAAA")
    assert base64.urlsafe_b64decode(inner)[0] == 0x80
    assert crypto_fernet.Fernet(fernet_key).decrypt(inner) == message
    # A fresh Fernet key every time.
    other = keypair.public.seal(message)
    assert PKCS1_OAEP.new(private, hashAlgo=SHA256).decrypt(base64.b64decode(other.split(b";")[0])) != fernet_key


@settings(max_examples=60)
@given(st.binary(max_size=5000))
def test_sealed_round_trip(keypair: KeyPair, message: bytes) -> None:
    text = keypair.public.seal(message)
    assert keypair.open(text) == message
    assert keypair.open(text.decode("ascii")) == message


def check_tampered(keypair: KeyPair, text: bytes) -> None:
    with pytest.raises(InvalidToken):
        keypair.open(text)
    with pytest.raises(InvalidToken):
        keypair.open(text.decode("latin-1"))


@settings(max_examples=300)
@given(st.data())
def test_tampered_key_part_is_rejected(keypair: KeyPair, sealed: bytes, data) -> None:
    end = sealed.index(b";") + 1  # the separator itself too
    check_tampered(keypair, flip(sealed, data.draw(st.integers(0, end * 8 - 1))))


@settings(max_examples=300)
@given(st.data())
def test_tampered_token_part_is_rejected(keypair: KeyPair, sealed: bytes, data) -> None:
    start = sealed.index(b";") + 1
    check_tampered(keypair, flip(sealed, data.draw(st.integers(start * 8, len(sealed) * 8 - 1))))


def test_tampered_base64_tails_are_rejected(keypair: KeyPair, sealed: bytes) -> None:
    """The last characters of each base64 part carry spare bits: those flips too must fail."""
    sep = sealed.index(b";")
    positions = list(range(sep - 4, sep + 1)) + list(range(len(sealed) - 4, len(sealed)))
    for byte in positions:
        for bit in range(8):
            check_tampered(keypair, flip(sealed, byte * 8 + bit))


@pytest.mark.parametrize("text", [
    b"", b";", b"abc", b"abc;def", b"a;b;c", "\u00e9;\u00e9", b"%%%%;gAAA",
    b"AAAA" * 86 + b";gAAAAAAdwJ6wAAECAwQFBgcICQoLDA0ODy021cpGVWKZ_eEwCGM4BLLF_5CV9dOPmrhuVUPgJobwOz7JcbmrR64j",
])
def test_malformed_sealed_text(keypair: KeyPair, text) -> None:
    with pytest.raises(InvalidToken):
        keypair.open(text)


def test_sealed_for_another_key(keypair: KeyPair, other_keypair: KeyPair) -> None:
    with pytest.raises(InvalidToken):
        other_keypair.open(keypair.public.seal(b"not for you"))


def test_sealed_with_other_parameters_is_rejected(keypair: KeyPair, crypto_key: rsa.RSAPrivateKey) -> None:
    public = crypto_key.public_key()
    fernet_key = Fernet.generate_key()
    token = crypto_fernet.Fernet(fernet_key).encrypt(b"m")
    sha1 = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)
    labelled = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=b"x")
    for scheme in (sha1, labelled, padding.PKCS1v15()):
        text = base64.b64encode(public.encrypt(fernet_key, scheme)) + b";" + token
        with pytest.raises(InvalidToken):
            keypair.open(text)
    # The right parameters, but what is wrapped is not a Fernet key.
    for wrapped_key in (b"short", base64.b64encode(bytes(32)), base64.urlsafe_b64encode(bytes(31))):
        text = base64.b64encode(public.encrypt(wrapped_key, OAEP_SHA256)) + b";" + token
        with pytest.raises(InvalidToken):
            keypair.open(text)
    text = base64.b64encode(public.encrypt(fernet_key, OAEP_SHA256)) + b";" + token
    assert keypair.open(text) == b"m"


def bare_form(sealed_text: bytes) -> bytes:
    """The version-1 form of a sealed text: the same token without its outer base64."""
    wrapped, token = sealed_text.split(b";")
    return wrapped + b";" + base64.b64decode(token)


@pytest.mark.parametrize("message", [b"", b"old history line", bytes(range(256))])
def test_the_bare_token_form_still_opens(keypair: KeyPair, message: bytes) -> None:
    """Histories and old clients hold ``base64(OAEP(K)) ; token``: it still opens."""
    old = bare_form(keypair.public.seal(message))
    assert old.split(b";")[1].startswith(b"gAAAAA")
    assert keypair.open(old) == message
    assert keypair.open(old.decode("ascii")) == message


def test_a_text_of_neither_form_is_rejected(keypair: KeyPair, sealed: bytes) -> None:
    wrapped, token = sealed.split(b";")
    inner = base64.b64decode(token)
    for text in (
        wrapped + b";" + base64.b64encode(token),            # base64 applied twice
        wrapped + b";" + token[:-4],                          # outer layer cut short
        wrapped + b";" + token + b"\n",                      # outer layer with a newline
        wrapped + b";" + inner[:-1],                          # bare token cut short
        wrapped + b";" + base64.b64encode(b"hAAAAA" + inner[6:]),  # not a token inside
    ):
        with pytest.raises(InvalidToken):
            keypair.open(text)


# --- the course helper: ours and the original must interoperate ---------------------------

MESSAGES = [b"", b"hi", "h\u00e9llo \U0001f600".encode(), bytes(range(256)) * 20]


@pytest.mark.parametrize("message", MESSAGES, ids=["empty", "short", "unicode", "binary"])
def test_ours_to_reference(message: bytes) -> None:
    assert course_pg3lib.decrypt(pg3lib.encrypt(message, course_pg3lib.getPubKey())) == message


@pytest.mark.parametrize("message", MESSAGES, ids=["empty", "short", "unicode", "binary"])
def test_reference_to_ours(message: bytes) -> None:
    assert pg3lib.decrypt(course_pg3lib.encrypt(message, pg3lib.getPubKey())) == message


@pytest.mark.parametrize("message", MESSAGES, ids=["empty", "short", "unicode", "binary"])
def test_ours_has_the_course_shape(keypair: KeyPair, message: bytes) -> None:
    """For one message and key, ours and the course helper's differ only in random bytes."""
    form = keypair.public.key_form.encode()
    theirs, ours = course_pg3lib.encrypt(message, form), pg3lib.encrypt(message, form)
    (their_key, their_token), (our_key, our_token) = theirs.split(b";"), ours.split(b";")
    assert len(our_key) == len(their_key) and len(our_token) == len(their_token)
    assert our_token[:8] == their_token[:8] == b"Z0FBQUFB"  # base64 of "gAAAAA"
    our_inner, their_inner = base64.b64decode(our_token), base64.b64decode(their_token)
    assert len(our_inner) == len(their_inner)
    # The same Fernet key, IV and time give the very same token in both libraries.
    fernet_key, iv, now = Fernet.generate_key(), os.urandom(16), 1_700_000_000
    reference = crypto_fernet.Fernet(fernet_key)._encrypt_from_parts(message, now, iv)
    assert Fernet(fernet_key).encrypt(message, now=now, iv=iv) == reference


def test_course_decrypt_refuses_the_bare_form(keypair: KeyPair) -> None:
    """Why the fix matters: the course's decrypt cannot read the version-1 form."""
    old = bare_form(pg3lib.encrypt(b"m", course_pg3lib.getPubKey()))
    with pytest.raises((binascii.Error, crypto_fernet.InvalidToken)):
        course_pg3lib.decrypt(old)
    assert course_pg3lib.decrypt(pg3lib.encrypt(b"m", course_pg3lib.getPubKey())) == b"m"


def test_reference_to_a_key_pair(keypair: KeyPair) -> None:
    sealed_text = course_pg3lib.encrypt(b"to a saved key", keypair.public.key_form.encode())
    assert keypair.open(sealed_text) == b"to a saved key"


def test_module_functions_take_str() -> None:
    assert pg3lib.decrypt(pg3lib.encrypt("h\u00e9", pg3lib.getPubKey().decode()).decode()) == "h\u00e9".encode()


def test_module_functions_reject() -> None:
    with pytest.raises(InvalidKey):
        pg3lib.encrypt(b"m", b"not a key")
    with pytest.raises(InvalidToken):
        pg3lib.decrypt(b"not;sealed")
    with pytest.raises(InvalidToken):  # sealed for the reference's key, not ours
        pg3lib.decrypt(pg3lib.encrypt(b"m", course_pg3lib.getPubKey()))


def test_get_pub_key_is_the_course_key_form() -> None:
    form = pg3lib.getPubKey()
    assert isinstance(form, bytes) and b"\n" not in form
    assert form == pg3lib.getPubKey()
    pem = base64.b64decode(form, validate=True)
    key = serialization.load_pem_public_key(pem)
    assert isinstance(key, rsa.RSAPublicKey)
    assert key.key_size == 2048 and key.public_numbers().e == 65537
    # The very bytes the course helper would give for this key.
    assert pem == key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert PublicKey.from_key_form(form).key_form.encode() == form


def test_process_key_pair_is_made_by_generate() -> None:
    pg3lib.getPubKey()
    keys = pg3lib._process_keys
    assert isinstance(keys, KeyPair)
    assert keys.public.bits == pg3lib.KEY_BITS == 2048
    assert keys.public.key_form.encode() == pg3lib.getPubKey()


def test_process_key_pair_is_made_on_first_use_not_at_import() -> None:
    code = (
        "import pg3lib\n"
        "assert pg3lib._process_keys is None, 'made at import'\n"
        "first = pg3lib.getPubKey()\n"
        "assert isinstance(pg3lib._process_keys, pg3lib.KeyPair)\n"
        "assert pg3lib.getPubKey() == first\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=str(REPO), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def spki_fingerprint(public_key) -> str:
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "SHA256:" + base64.b64encode(hashlib.sha256(der).digest()).decode().rstrip("=")


def test_fingerprints_match_cryptography(keypair: KeyPair, crypto_key: rsa.RSAPrivateKey) -> None:
    assert keypair.fingerprint == keypair.public.fingerprint == spki_fingerprint(crypto_key.public_key())
    reference = PublicKey.from_key_form(course_pg3lib.getPubKey())
    assert reference.fingerprint == spki_fingerprint(course_pg3lib.public_key)
    assert len(reference.fingerprint) == len("SHA256:") + 43 and not reference.fingerprint.endswith("=")
    ours = serialization.load_pem_public_key(base64.b64decode(pg3lib.getPubKey()))
    assert PublicKey.from_key_form(pg3lib.getPubKey()).fingerprint == spki_fingerprint(ours)


def test_signatures_cross(keypair: KeyPair, crypto_key: rsa.RSAPrivateKey) -> None:
    data = pg3lib.pm_signed_bytes("alice", "bob", "c;t")
    ours = keypair.sign(data)
    assert isinstance(ours, str)
    crypto_key.public_key().verify(base64.b64decode(ours), data, PSS_32, hashes.SHA256())
    with pytest.raises(InvalidSignature):
        crypto_key.public_key().verify(base64.b64decode(ours), data + b"x", PSS_32, hashes.SHA256())
    theirs = base64.b64encode(crypto_key.sign(data, PSS_32, hashes.SHA256()))
    assert keypair.public.verify(data, theirs)
    assert keypair.public.verify(data, theirs.decode())
    assert keypair.public.verify(data, ours)


def test_verify_returns_false_never_raises(keypair: KeyPair, other_keypair: KeyPair,
                                           crypto_key: rsa.RSAPrivateKey) -> None:
    data = b"PM1\nalice\nbob\nxyz"
    signature = keypair.sign(data)
    raw = base64.b64decode(signature)
    assert keypair.public.verify(data, signature)
    assert not keypair.public.verify(data + b"!", signature)
    assert not keypair.public.verify(b"", signature)
    assert not other_keypair.public.verify(data, signature)
    pkcs1v15 = base64.b64encode(crypto_key.sign(data, padding.PKCS1v15(), hashes.SHA256()))
    for garbage in ("", "!!!", "abc", "\u00e9", base64.b64encode(os.urandom(256)), base64.b64encode(raw[:-1]),
                    base64.b64encode(raw + b"\0"), base64.b64encode(bytes(256)), signature + "\n",
                    base64.urlsafe_b64encode(raw) if b"+" in raw or b"/" in raw else "-_-_", pkcs1v15,
                    base64.b64encode(flip(raw, 1000))):
        assert keypair.public.verify(data, garbage) is False


def test_pm_signed_bytes() -> None:
    assert pg3lib.pm_signed_bytes("alice", "Bob", "k;t") == b"PM1\nalice\nBob\nk;t"
    assert pg3lib.pm_signed_bytes("\u00e9", "b", "c") == "PM1\n\u00e9\nb\nc".encode()


# --- public keys ---------------------------------------------------------------------------

def test_key_form_round_trip(keypair: KeyPair, other_keypair: KeyPair) -> None:
    form = keypair.public.key_form
    assert isinstance(form, str)
    parsed = PublicKey.from_key_form(form)
    assert parsed == keypair.public and hash(parsed) == hash(keypair.public)
    assert PublicKey.from_key_form(form.encode()) == keypair.public
    assert PublicKey.from_key_form(bytearray(form.encode())).key_form == form
    assert parsed.bits == 2048
    assert parsed != other_keypair.public and parsed != form


@pytest.fixture(scope="module")
def small_key() -> RSA.RsaKey:
    return RSA.generate(1024)


def test_rejects_small_key(small_key: RSA.RsaKey) -> None:
    with pytest.raises(InvalidKey, match="1024"):
        PublicKey.from_key_form(key_form(small_key.public_key().export_key()))
    with pytest.raises(InvalidKey):
        PublicKey(small_key.public_key())
    with pytest.raises(InvalidKey):
        KeyPair(small_key)


def test_rejects_huge_key() -> None:
    n = (1 << 9000) + 1 + 2 * 3 * 5 * 7  # an odd modulus, too big to be worth checking signatures with
    with pytest.raises(InvalidKey, match="9001"):
        PublicKey.from_key_form(key_form(RSA.construct((n, 65537)).export_key()))


def test_rejects_private_key_in_key_form(crypto_key: rsa.RSAPrivateKey, small_key: RSA.RsaKey) -> None:
    pkcs1 = crypto_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                     serialization.NoEncryption())
    for pem in (pem_of(crypto_key), pkcs1, small_key.export_key(pkcs=8)):
        with pytest.raises(InvalidKey, match="private"):
            PublicKey.from_key_form(key_form(pem))
    with pytest.raises(InvalidKey, match="private"):
        PublicKey(RSA.import_key(pem_of(crypto_key)))


def test_rejects_other_exponent(keypair: KeyPair) -> None:
    n = RSA.import_key(base64.b64decode(keypair.public.key_form)).n
    for e in (3, 17, 65539):
        with pytest.raises(InvalidKey, match=str(e)):
            PublicKey.from_key_form(key_form(RSA.construct((n, e)).export_key()))


@pytest.mark.parametrize("text", [
    b"", b"!!!!", b"abc", b"abcd=", "\u00e9\u00e9\u00e9\u00e9", b"QUJD\n", b" QUJD",
    base64.urlsafe_b64encode(b"-----BEGIN PUBLIC KEY-----\n\xfb\xff\n"),
])
def test_rejects_garbage_base64(text) -> None:
    with pytest.raises(InvalidKey):
        PublicKey.from_key_form(text)


def test_rejects_non_rsa_text(keypair: KeyPair) -> None:
    ec_pem = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    pem = base64.b64decode(keypair.public.key_form)
    texts = [
        b"hello world", b"ssh-rsa AAAA", ec_pem,
        b"-----BEGIN PUBLIC KEY-----\nnot base64 at all\n-----END PUBLIC KEY-----\n",
        b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
        pem[:len(pem) // 2], pem.replace(b"MII", b"MIJ", 1),
        b"\n" + pem,
        RSA.import_key(pem).export_key("DER"),
        RSA.import_key(pem).export_key("OpenSSH"),
    ]
    for text in texts:
        with pytest.raises(InvalidKey):
            PublicKey.from_key_form(key_form(text))
        with pytest.raises(InvalidKey):
            pg3lib.encrypt(b"m", key_form(text))


# --- key pairs: save and load ------------------------------------------------------------------

def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_save_load_with_passphrase(keypair: KeyPair, tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(b"old")
    path.chmod(0o644)
    keypair.save(str(path), "correct horse")
    assert mode(path) == 0o600
    text = path.read_bytes()
    assert text.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----\n")
    assert b"-----BEGIN PRIVATE KEY-----" not in text
    assert os.listdir(tmp_path) == ["key.pem"]  # no temporary file left behind
    loaded = KeyPair.load(str(path), "correct horse")
    assert loaded.fingerprint == keypair.fingerprint
    assert loaded.open(keypair.public.seal(b"m")) == b"m"
    with pytest.raises(InvalidKey):
        KeyPair.load(str(path), "wrong horse")
    with pytest.raises(InvalidKey):
        KeyPair.load(str(path))
    # Standard encrypted PKCS#8: other tools read it.
    other = serialization.load_pem_private_key(text, b"correct horse")
    assert spki_fingerprint(other.public_key()) == keypair.fingerprint


def test_save_load_without_passphrase(keypair: KeyPair, tmp_path: Path) -> None:
    path = tmp_path / "plain.pem"
    keypair.save(str(path), None)
    assert mode(path) == 0o600
    text = path.read_bytes()
    assert text.startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert KeyPair.load(str(path)).fingerprint == keypair.fingerprint
    assert KeyPair.from_pem(keypair.to_pem()).fingerprint == keypair.fingerprint


def test_load_refuses(keypair: KeyPair, tmp_path: Path) -> None:
    with pytest.raises(OSError):
        KeyPair.load(str(tmp_path / "missing.pem"))
    for pem in (b"", b"garbage", base64.b64decode(keypair.public.key_form), keypair.to_pem()[:200]):
        with pytest.raises(InvalidKey):
            KeyPair.from_pem(pem)
    with pytest.raises(InvalidKey):
        KeyPair(RSA.import_key(base64.b64decode(keypair.public.key_form)))


def test_strict_base64() -> None:
    assert pg3lib.b64decode_strict(b"QUJD") == b"ABC"
    assert pg3lib.b64decode_strict("-_8=", urlsafe=True) == b"\xfb\xff"
    for text, urlsafe in [(b"QUJ", False), (b"QU JD", False), (b"-_8=", False), (b"+/8=", True),
                          (b"QR==", False), (b"QUI=\n", False), (b"QQ===", False)]:
        with pytest.raises(ValueError):
            pg3lib.b64decode_strict(text, urlsafe=urlsafe)
    assert base64.b64decode(b"QR==", validate=True) == b"A"  # what the plain decoder lets through


# Values straight out of a JSON body: none may be taken for text, nor make a huge buffer
# (bytes(10**12) would be a terabyte of zeros).
NOT_TEXT = [None, 10**12, 1.5, True, [65, 66, 67, 68], {"a": 1}]


@pytest.mark.parametrize("value", NOT_TEXT, ids=repr)
def test_values_that_are_not_text(keypair: KeyPair, value) -> None:
    with pytest.raises(InvalidKey):
        PublicKey.from_key_form(value)
    with pytest.raises(InvalidKey):
        Fernet(value)
    with pytest.raises(InvalidToken):
        Fernet(Fernet.generate_key()).decrypt(value)
    with pytest.raises(InvalidToken):
        keypair.open(value)
    assert keypair.public.verify(b"data", value) is False


# --- the PSS check: pss_sha256_verify against pycryptodome's and cryptography's ------------

def _key_of_bits(bits: int) -> RSA.RsaKey:
    """A private key whose modulus has exactly this many bits (odd sizes cannot be generated),
    the two highest set: EMs with the leftmost bit that must be zero set are then mostly below n."""
    from Crypto.Util.number import getPrime, inverse
    while True:
        p, q = getPrime(bits - bits // 2), getPrime(bits // 2)
        n = p * q
        if p != q and n >> (bits - 2) == 3 and (p - 1) % 65537 and (q - 1) % 65537:
            return RSA.construct((n, 65537, inverse(65537, (p - 1) * (q - 1)), p, q))


@pytest.fixture(scope="module")
def pss_keys() -> dict[int, RSA.RsaKey]:
    """Moduli of 2048 bits (em_len = k), 2049 (em_len = k - 1) and 2052 (a 4-bit mask)."""
    return {bits: _key_of_bits(bits) for bits in (2048, 2049, 2052)}


def _emsa_pss_encode(m_hash: bytes, em_bits: int, salt: bytes, db_mask_bits: int) -> bytes:
    """EMSA-PSS-ENCODE (RFC 8017 9.1.1) with SHA-256, any salt; db_mask_bits leftmost bits kept."""
    em_len = (em_bits + 7) // 8
    h = hashlib.sha256(bytes(8) + m_hash + salt).digest()
    db = bytes(em_len - len(salt) - 32 - 2) + b"\x01" + salt
    masked = bytes(a ^ b for a, b in zip(db, pg3lib._mgf1_sha256(h, len(db))))
    clear = 8 * em_len - em_bits
    masked = bytes([masked[0] & (0xFF >> clear if not db_mask_bits else 0xFF)]) + masked[1:]
    return masked + h + b"\xbc"


def _raw_sign(key: RSA.RsaKey, em: bytes) -> bytes | None:
    """em**d mod n (CRT) as k bytes, or None if em is not below n."""
    m = int.from_bytes(em, "big")
    if m >= key.n:
        return None
    p, q, d = int(key.p), int(key.q), int(key.d)
    mp, mq = pow(m, d % (p - 1), p), pow(m, d % (q - 1), q)
    s = mq + q * ((mp - mq) * pow(q, -1, p) % p)
    return s.to_bytes((key.n.bit_length() + 7) // 8, "big")


def _verdicts(key: RSA.RsaKey, data: bytes, signature: bytes) -> tuple[bool, bool, bool]:
    ours = PublicKey(key.public_key()).verify(data, base64.b64encode(signature))
    try:
        pss.new(key.public_key(), salt_bytes=32).verify(SHA256.new(data), signature)
        theirs = True
    except ValueError:
        theirs = False
    reference = serialization.load_der_public_key(key.public_key().export_key("DER"))
    try:
        reference.verify(signature, data, PSS_32, hashes.SHA256())
        openssl = True
    except InvalidSignature:
        openssl = False
    return ours, theirs, openssl


# Where a broken encoding is broken: a byte range of EM per part (salt length 32).
_EM_PARTS = ("ps", "one", "salt", "h", "trailer", "anywhere")


def _part_range(part: str, em_len: int, salt_len: int) -> tuple[int, int]:
    db_len = em_len - 33
    ps_len = db_len - salt_len - 1
    return {"ps": (0, ps_len), "one": (ps_len, ps_len + 1), "salt": (ps_len + 1, db_len),
            "h": (db_len, em_len - 1), "trailer": (em_len - 1, em_len), "anywhere": (0, em_len)}[part]


@settings(max_examples=200, deadline=None)
@given(bits=st.sampled_from((2048, 2049, 2052)), data=st.binary(max_size=64),
       salt_len=st.sampled_from((32, 32, 32, 0, 20, 31, 33, 64)),
       broken=st.one_of(st.none(), st.tuples(st.sampled_from(_EM_PARTS), st.integers(0, 255), st.integers(0, 7))),
       high_bits=st.booleans())
def test_pss_check_agrees_with_pycryptodome_and_openssl(pss_keys, bits, data, salt_len, broken,
                                                       high_bits) -> None:
    """Encodings made by hand, right or broken in one bit of one part (PS, the 0x01, the
    salt, H, the trailer, anywhere), with the bits that must be zero set or not and salts
    of other lengths, signed raw: all three verifiers decide alike, and the right ones verify."""
    key = pss_keys[bits]
    em = _emsa_pss_encode(hashlib.sha256(data).digest(), bits - 1, os.urandom(salt_len), high_bits)
    if broken is not None:
        start, end = _part_range(broken[0], len(em), salt_len)
        if start < end:
            em = flip(em, 8 * (start + broken[1] % (end - start)) + broken[2])
    signature = _raw_sign(key, em)
    if signature is None:
        return
    ours, theirs, openssl = _verdicts(key, data, signature)
    assert ours == theirs == openssl
    if salt_len == 32 and broken is None and not high_bits:
        assert ours


@settings(max_examples=50, deadline=None)
@given(data=st.binary(max_size=64), raw=st.binary(min_size=255, max_size=257))
def test_pss_check_rejects_what_the_others_reject(pss_keys, data, raw) -> None:
    """Random signatures (of the right length or one off, some at or above n) are refused alike."""
    for key in pss_keys.values():
        ours, theirs, _ = _verdicts(key, data, raw)
        assert ours == theirs is False
    key = pss_keys[2048]
    n = key.n.to_bytes(256, "big")
    for signature in (n, (key.n + 1).to_bytes(256, "big"), bytes(256), b"\xff" * 256):   # n, above, 0
        assert _verdicts(key, data, signature)[0] is False


@pytest.mark.parametrize("bits", [2048, 2049, 2052])
def test_pss_check_refuses_every_bit_of_the_short_parts(pss_keys, bits) -> None:
    """Each bit of the trailer and of the 0x01; the highest bit of DB that counts (just below
    the ones cleared), a low one and the last one of PS; the first and last of salt and H;
    and the lowest of the leftmost bits of EM that must be zero."""
    key = pss_keys[bits]
    data = b"PM2\nid"
    em_bits = bits - 1

    def encoded() -> bytes:
        return _emsa_pss_encode(hashlib.sha256(data).digest(), em_bits, os.urandom(32), False)

    em = encoded()
    cleared = 8 * len(em) - em_bits
    assert _verdicts(key, data, _raw_sign(key, em)) == (True, True, True)
    for part in ("trailer", "one", "ps", "salt", "h"):
        start, end = _part_range(part, len(em), 32)
        if end - start == 1:
            flips = list(range(8 * start, 8 * end))
        elif part == "ps":   # byte 0 holds the bits that must be zero above the highest DB keeps
            flips = [8 * start + 1, 8 * start + 7 - cleared, 8 * end - 1, 8 * end - 8]
        else:
            flips = [8 * start + 1, 8 * start + 7, 8 * end - 1, 8 * end - 8]
        for bit in flips:
            assert _verdicts(key, data, _raw_sign(key, flip(em, bit))) == (False, False, False), (part, bit)
    if cleared:
        # The lowest bit that must be zero stays below n for half the salts or more (higher
        # ones never do, so no raw signature can be made of them).
        for _ in range(64):
            signature = _raw_sign(key, flip(encoded(), 8 - cleared))
            if signature is not None:
                break
        assert signature is not None and _verdicts(key, data, signature) == (False, False, False)


def test_pss_check_refuses_other_lengths_and_s_plus_n(pss_keys) -> None:
    """A right signature with a zero byte in front, or (when it starts with one) without it;
    s + n, which is the same number mod n: refused, as RFC 8017 and pycryptodome refuse them."""
    key = pss_keys[2049]   # k = 257 bytes: s + n fits in k bytes
    k = 257
    signature = pss.new(key, salt_bytes=32).sign(SHA256.new(b"x"))
    assert _verdicts(key, b"x", signature) == (True, True, True)
    assert _verdicts(key, b"x", b"\0" + signature) == (False, False, False)
    plus_n = (int.from_bytes(signature, "big") + key.n).to_bytes(k, "big")
    assert _verdicts(key, b"x", plus_n) == (False, False, False)
    key = pss_keys[2048]
    for attempt in range(3000):   # about one signature in 128 starts with a zero byte
        data = b"%d" % attempt
        signature = pss.new(key, salt_bytes=32).sign(SHA256.new(data))
        if signature[0] == 0:
            break
    assert signature[0] == 0
    assert _verdicts(key, data, signature) == (True, True, True)
    # RFC 8017 8.1.2 step 1 and pycryptodome: not k bytes, invalid. (OpenSSL takes it.)
    assert _verdicts(key, data, signature[1:])[:2] == (False, False)


def test_pss_check_without_pycryptodomes_exponentiation(pss_keys, monkeypatch) -> None:
    """The fallback (Python's pow) decides the same, should RsaKey._encrypt ever go."""
    key = pss_keys[2052]
    good = pss.new(key, salt_bytes=32).sign(SHA256.new(b"y"))
    public = PublicKey(key.public_key())
    monkeypatch.delattr(RSA.RsaKey, "_encrypt")
    assert public.verify(b"y", base64.b64encode(good))
    assert not public.verify(b"z", base64.b64encode(good))
    assert not public.verify(b"y", base64.b64encode(flip(good, 5)))
    plus_n = (int.from_bytes(good, "big") + key.n).to_bytes(len(good), "big")
    assert not public.verify(b"y", base64.b64encode(plus_n))


def test_pss_check_accepts_real_signatures(pss_keys) -> None:
    for key in pss_keys.values():
        for data in (b"", b"PM2\nx", os.urandom(300)):
            signature = pss.new(key, salt_bytes=32).sign(SHA256.new(data))
            assert _verdicts(key, data, signature) == (True, True, True)


def test_sealed_form_problem_takes_both_forms_and_refuses_what_is_not_sealed(keypair: KeyPair) -> None:
    """The syntax the server checks of a PM's sealed texts: the course helper's form (made by the
    reference implementation too) and the version-1 bare-token form pass; garbage, a key of the
    wrong size, and a token that is not a Fernet token do not."""
    key_bytes = (keypair.public.bits + 7) // 8
    ours = keypair.public.seal(b"hello").decode()
    theirs = course_pg3lib.encrypt(b"hello", keypair.public.key_form.encode()).decode()
    wrapped, _, token = ours.partition(";")
    bare = wrapped + ";" + base64.b64decode(token).decode()
    for sealed in (ours, theirs, bare):
        assert pg3lib.sealed_form_problem(sealed, key_bytes) is None, sealed
        assert pg3lib.sealed_form_problem(sealed) is None
        assert keypair.open(sealed) == b"hello"
    fernet_raw = base64.urlsafe_b64decode(base64.b64decode(token))
    cut_token = base64.b64encode(base64.urlsafe_b64encode(fernet_raw[:-1])).decode()   # not whole blocks
    other_version = base64.b64encode(base64.urlsafe_b64encode(b"\x81" + fernet_raw[1:])).decode()
    for bad in ("not sealed at all", "é;x", wrapped, ";" + token, "AAAA;" + token, wrapped + ";%%%",
                wrapped + ";" + cut_token, wrapped + ";" + other_version, wrapped + "=;" + token):
        assert pg3lib.sealed_form_problem(bad, key_bytes) is not None, bad
    assert pg3lib.sealed_form_problem(ours, key_bytes + 1) is not None   # sealed to another size of key
