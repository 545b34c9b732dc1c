"""x509.py: the self-signed certificate, checked against cryptography and OpenSSL (ssl), not against itself."""

from __future__ import annotations

import base64
import datetime
import hashlib
import socket
import ssl
import threading

import pytest
from cryptography import x509 as cx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

import pg3lib
import tlslayer
import x509
from conftest import key_pair


def test_certificate_parses_and_verifies_with_cryptography():
    keys = key_pair(0)
    der = x509.self_signed_certificate(keys, now=1_800_000_000.0, serial=12345)
    cert = cx.load_der_x509_certificate(der)
    assert cert.version is cx.Version.v3 and cert.serial_number == 12345
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(cx.NameOID.COMMON_NAME)[0].value == x509.COMMON_NAME
    assert cert.not_valid_before_utc == datetime.datetime(2027, 1, 14, 8, 0, tzinfo=datetime.timezone.utc)
    assert cert.not_valid_after_utc.year == 9999
    assert cert.extensions.get_extension_for_class(cx.BasicConstraints).value.ca is False
    assert cert.signature_hash_algorithm.name == "sha256"
    cert.public_key().verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), hashes.SHA256())
    public_der = cert.public_key().public_bytes(serialization.Encoding.DER,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
    # Section 8's fingerprint of the certificate's key is the server key's.
    digest = base64.b64encode(hashlib.sha256(public_der).digest()).decode().rstrip("=")
    assert "SHA256:" + digest == keys.fingerprint


def test_certificate_key_reads_ours_and_a_foreign_certificate():
    keys = key_pair(1)
    der = x509.self_signed_certificate(keys)
    assert x509.certificate_key(der) == keys.public
    assert x509.from_pem(x509.to_pem(der)) == der
    # A certificate made by cryptography (another encoder): the same key comes out.
    private = serialization.load_pem_private_key(key_pair(2).to_pem(), password=None)
    name = cx.Name([cx.NameAttribute(cx.NameOID.COMMON_NAME, "other")])
    now = datetime.datetime.now(datetime.timezone.utc)
    foreign = (cx.CertificateBuilder().subject_name(name).issuer_name(name).public_key(private.public_key())
               .serial_number(7).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
               .sign(private, hashes.SHA256()))
    assert x509.certificate_key(foreign.public_bytes(serialization.Encoding.DER)) == key_pair(2).public


@pytest.mark.parametrize("junk", [b"", b"\x30", b"\x30\x82\xff\xff", b"\x02\x01\x00", b"\x30\x03\x30\x01\x00"])
def test_certificate_key_refuses_junk(junk):
    with pytest.raises(x509.CertificateError):
        x509.certificate_key(junk)


def test_certificate_files_are_made_once_and_remade_for_another_key(tmp_path):
    keys = key_pair(0)
    keys.save(str(tmp_path / tlslayer.LOCAL_KEY_FILE))
    cert, key = tlslayer.certificate_files(str(tmp_path), keys)
    assert key.endswith(tlslayer.LOCAL_KEY_FILE)
    first = open(cert, "rb").read()
    assert tlslayer.certificate_files(str(tmp_path), keys)[0] == cert and open(cert, "rb").read() == first
    # A node of several presents the room's key: its own key file stays, the room's is written beside it.
    room = key_pair(1)
    cert, key = tlslayer.certificate_files(str(tmp_path), room)
    assert key.endswith(tlslayer.ROOM_KEY_FILE) and (tmp_path / tlslayer.ROOM_KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert x509.certificate_key(x509.from_pem(open(cert, "rb").read())) == room.public
    assert pg3lib.KeyPair.load(str(tmp_path / tlslayer.LOCAL_KEY_FILE)).public == keys.public


def test_ssl_handshakes_with_the_certificate_and_the_client_sees_the_key(tmp_path):
    """OpenSSL (through ssl) accepts the certificate on both ends of a real handshake."""
    keys = key_pair(0)
    context = tlslayer.server_context(str(tmp_path), keys)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    port = listener.getsockname()[1]

    def serve():
        conn, _ = listener.accept()
        with context.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(tls.recv(100).upper())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, client.wrap_socket(raw) as tls:
        assert x509.certificate_key(tls.getpeercert(binary_form=True)).fingerprint == keys.fingerprint
        tls.sendall(b"hello")
        assert tls.recv(100) == b"HELLO"
    thread.join(10)
    listener.close()
    # A TLS 1.1 client is refused (section 0: TLS 1.2 or later).
    assert context.minimum_version is ssl.TLSVersion.TLSv1_2
