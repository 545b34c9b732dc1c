"""The server's self-signed TLS certificate, written and read in DER by hand (docs/PROTOCOL.md section 0). No I/O.

The certificate only carries the server key to the client: the client pins
that key (section 9) and compares the certificate's key with it, so nothing
else in the certificate is trusted or checked (names, dates, issuer). It is
therefore the smallest X.509 v3 certificate OpenSSL accepts: a random serial,
the subject and issuer ``CN=chatroom``, valid from a day before it was made to
9999-12-31 (RFC 5280's "no well-defined expiration"), the key as the server's
``SubjectPublicKeyInfo``, a ``basicConstraints`` that says it is no CA, and a
PKCS#1 v1.5 SHA-256 signature by that same key (pycryptodome). No new
run-time package: the DER encoder below is the dozen types a certificate needs.

``certificate_key(der)`` is the reverse half a client needs: the public key
of any X.509 certificate (ours or another's), to compare with the pinned one.
"""

from __future__ import annotations

import base64
import os
import time

from Crypto.Hash import SHA256
from Crypto.PublicKey import RSA
from Crypto.Signature import pkcs1_15

import pg3lib

COMMON_NAME = "chatroom"
_SHA256_WITH_RSA = "1.2.840.113549.1.1.11"
_COMMON_NAME_OID = "2.5.4.3"
_BASIC_CONSTRAINTS = "2.5.29.19"
_NOT_AFTER = b"99991231235959Z"    # GeneralizedTime: no expiry (RFC 5280, 4.1.2.5)
_BACKDATE = 86400                  # seconds: a client whose clock is a little behind still accepts it

# DER tags
_BOOLEAN, _INTEGER, _BIT_STRING, _OCTET_STRING, _NULL, _OID = 0x01, 0x02, 0x03, 0x04, 0x05, 0x06
_UTF8_STRING, _UTC_TIME, _GENERALIZED_TIME, _SEQUENCE, _SET = 0x0C, 0x17, 0x18, 0x30, 0x31


class CertificateError(ValueError):
    """Bytes that are not a DER certificate this module can read."""


# --- writing DER -----------------------------------------------------------------

def _tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + content


def _integer(value: int) -> bytes:
    raw = value.to_bytes(value.bit_length() // 8 + 1, "big")   # one spare byte keeps it positive
    while len(raw) > 1 and raw[0] == 0 and raw[1] < 0x80:
        raw = raw[1:]
    return _tlv(_INTEGER, raw)


def _oid(dotted: str) -> bytes:
    arcs = [int(arc) for arc in dotted.split(".")]
    out = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out.extend(reversed(chunk))
    return _tlv(_OID, bytes(out))


def _sequence(*parts: bytes) -> bytes:
    return _tlv(_SEQUENCE, b"".join(parts))


def _name(common_name: str) -> bytes:
    return _sequence(_tlv(_SET, _sequence(_oid(_COMMON_NAME_OID), _tlv(_UTF8_STRING, common_name.encode()))))


def _explicit(number: int, content: bytes) -> bytes:
    return _tlv(0xA0 | number, content)


def self_signed_certificate(keys: pg3lib.KeyPair, *, now: float | None = None, serial: int | None = None) -> bytes:
    """A DER X.509 v3 certificate for keys' public key, signed by keys (PKCS#1 v1.5, SHA-256)."""
    private = RSA.import_key(keys.to_pem())
    if serial is None:
        serial = int.from_bytes(os.urandom(16), "big") >> 1 | 1   # positive, at most 16 bytes, never 0
    start = time.strftime("%y%m%d%H%M%SZ", time.gmtime((time.time() if now is None else now) - _BACKDATE))
    algorithm = _sequence(_oid(_SHA256_WITH_RSA), _tlv(_NULL, b""))
    extensions = _explicit(3, _sequence(
        _sequence(_oid(_BASIC_CONSTRAINTS), _tlv(_BOOLEAN, b"\xff"), _tlv(_OCTET_STRING, _sequence()))))
    tbs = _sequence(
        _explicit(0, _integer(2)),          # v3
        _integer(serial),
        algorithm,
        _name(COMMON_NAME),                 # issuer: itself
        _sequence(_tlv(_UTC_TIME, start.encode()), _tlv(_GENERALIZED_TIME, _NOT_AFTER)),
        _name(COMMON_NAME),
        private.public_key().export_key("DER"),   # already a SubjectPublicKeyInfo
        extensions)
    signature = pkcs1_15.new(private).sign(SHA256.new(tbs))
    return _sequence(tbs, algorithm, _tlv(_BIT_STRING, b"\x00" + signature))


def to_pem(der: bytes) -> bytes:
    """A DER certificate as PEM text (what ``ssl`` loads)."""
    body = base64.b64encode(der).decode("ascii")
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return ("-----BEGIN CERTIFICATE-----\n" + "\n".join(lines) + "\n-----END CERTIFICATE-----\n").encode("ascii")


def from_pem(pem: bytes) -> bytes:
    """The DER of the first certificate in PEM text.

    Raises:
        CertificateError: there is none.
    """
    begin, end = b"-----BEGIN CERTIFICATE-----", b"-----END CERTIFICATE-----"
    start = pem.find(begin)
    stop = pem.find(end, start + 1)
    if start < 0 or stop < 0:
        raise CertificateError("no PEM certificate")
    try:
        return base64.b64decode(b"".join(pem[start + len(begin):stop].split()), validate=True)
    except ValueError:
        raise CertificateError("the PEM certificate is not base64") from None


# --- reading DER -----------------------------------------------------------------

def _read(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of content, end of content) of the element at pos."""
    if pos + 2 > len(data):
        raise CertificateError("truncated DER")
    tag, first = data[pos], data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if not 1 <= count <= 4 or pos + count > len(data):
            raise CertificateError("bad DER length")
        length = int.from_bytes(data[pos:pos + count], "big")
        pos += count
    if pos + length > len(data):
        raise CertificateError("truncated DER")
    return tag, pos, pos + length


def _children(data: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    items, pos = [], start
    while pos < end:
        item = _read(data, pos)
        items.append((item[0], pos, item[2]))   # (tag, start of the whole element, its end)
        pos = item[2]
    return items


def certificate_key(der: bytes) -> pg3lib.PublicKey:
    """The RSA public key an X.509 certificate (DER) holds; compare its ``fingerprint`` with the pinned one.

    Raises:
        CertificateError: not a certificate.
        pg3lib.InvalidKey: its key is not an RSA key the protocol allows (section 8).
    """
    tag, start, end = _read(der, 0)
    if tag != _SEQUENCE:
        raise CertificateError("a certificate is a SEQUENCE")
    tbs_tag, tbs_start, tbs_end = _read(der, start)
    if tbs_tag != _SEQUENCE:
        raise CertificateError("a certificate starts with its TBSCertificate")
    fields = _children(der, tbs_start, tbs_end)
    if fields and fields[0][0] == 0xA0:   # the explicit version
        fields = fields[1:]
    if len(fields) < 6 or fields[5][0] != _SEQUENCE:
        raise CertificateError("no SubjectPublicKeyInfo where a certificate has it")
    _, spki_start, spki_end = fields[5]
    try:
        key = RSA.import_key(der[spki_start:spki_end])
    except (ValueError, IndexError, TypeError):
        raise pg3lib.InvalidKey("the certificate's key is not an RSA public key") from None
    return pg3lib.PublicKey(key)
