"""TLS on the chat port, server side (docs/PROTOCOL.md section 0): the certificate files and the TLS layer.

Theory of operation. A connection does not know at accept time whether it is
TLS: its first byte says (``TLS_HANDSHAKE_BYTE``). ``connection.Connection``
reads that byte as part of its first ``recv`` and keeps it; if it starts TLS,
every byte read from then on goes through a ``TLSLayer``, an ``ssl.SSLObject``
over two ``ssl.MemoryBIO``s, and plaintext comes out to the frame decoder as
if it had been read from a plain socket. Writing goes the other way: the
connection's queued frames are encrypted when it flushes and given to
``send`` (what does not go waits in ``TLSLayer.pending``). With memory BIOs the TLS object
never touches the socket, so the one ``selectors`` loop stays as it is: an
``SSLWantReadError`` only means "the record is not complete, read more";
writing to a memory BIO never blocks. Before the handshake has finished no
frame can be sent (a BYE at the login deadline is dropped: the connection is
closed without a frame, as section 0 says).

The certificate is self-signed and holds the server key (``x509.py``). It is
made on the first start and kept in the data directory as
``server_cert.pem``; a certificate whose key is not the server key (the
room's key file was given with ``--server-key``, or the key file was replaced)
is made again. When the key presented is not the data directory's own
``server_key.pem`` (a node of several presents the room's key), a copy is
written beside it, mode 0600, as ``room_key.pem``, from which ``ssl`` loads it.
"""

from __future__ import annotations

import logging
import os
import ssl

import pg3lib
import x509

log = logging.getLogger("chat.server")

CERT_FILE = "server_cert.pem"
LOCAL_KEY_FILE = "server_key.pem"   # storage.SERVER_KEY_FILE: the data directory's own key
ROOM_KEY_FILE = "room_key.pem"      # the key this server presents, when it is not the local one
READ_SIZE = 65536                   # plaintext taken from the TLS object per read call


class TLSError(Exception):
    """The certificate cannot be made, stored or loaded."""


def _matches(path: str, keys: pg3lib.KeyPair) -> bool:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return False
    try:
        if path.endswith(CERT_FILE):
            return x509.certificate_key(x509.from_pem(data)) == keys.public
        return pg3lib.KeyPair.from_pem(data).public == keys.public
    except (x509.CertificateError, pg3lib.InvalidKey):
        return False


def certificate_files(directory: str, keys: pg3lib.KeyPair) -> tuple[str, str]:
    """(certificate, private key) files presenting keys, made in directory if need be.

    Raises:
        TLSError: they cannot be read or written.
    """
    cert_path = os.path.join(directory, CERT_FILE)
    key_path = os.path.join(directory, LOCAL_KEY_FILE)
    try:
        if not _matches(key_path, keys):
            key_path = os.path.join(directory, ROOM_KEY_FILE)
            if not _matches(key_path, keys):
                keys.save(key_path)
        if not _matches(cert_path, keys):
            pem = x509.to_pem(x509.self_signed_certificate(keys))
            tmp = cert_path + ".tmp"
            with open(tmp, "wb") as fh:
                fh.write(pem)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, cert_path)
            log.info("made a TLS certificate for the server key %s in %s", keys.fingerprint, cert_path)
    except OSError as exc:
        raise TLSError(f"cannot store the TLS certificate in {directory}: {exc.strerror or exc}") from None
    return cert_path, key_path


def server_context(directory: str, keys: pg3lib.KeyPair) -> ssl.SSLContext:
    """The server's TLS context (TLS 1.2 or later) presenting keys.

    Raises:
        TLSError: see ``certificate_files``, or ``ssl`` refuses them.
    """
    cert_path, key_path = certificate_files(directory, keys)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # Renegotiation would let one client make the loop do handshakes again and again.
    context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    try:
        context.load_cert_chain(cert_path, key_path)
    except (ssl.SSLError, OSError) as exc:
        raise TLSError(f"cannot load the TLS certificate {cert_path}: {exc}") from None
    return context


class TLSPolicy:
    """What a server does with a connection's first byte: its TLS context, and whether plain is refused."""

    __slots__ = ("context", "require")

    def __init__(self, context: ssl.SSLContext, require: bool = False) -> None:
        self.context = context
        self.require = require

    def layer(self) -> TLSLayer:
        return TLSLayer(self.context)


class TLSLayer:
    """One connection's TLS: ciphertext in, plaintext out, and the reverse; never touches the socket."""

    __slots__ = ("_incoming", "_outgoing", "_tls", "ready", "pending", "_said_goodbye")

    def __init__(self, context: ssl.SSLContext) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self.ready = False                 # the handshake has finished
        self.pending = bytearray()         # ciphertext to send
        self._said_goodbye = False

    def receive(self, data: bytes) -> bytes | None:
        """Ciphertext read from the socket -> the plaintext it completes (b"" if none yet);
        None once the peer has closed TLS (close_notify).

        Raises:
            ssl.SSLError: a handshake or record that does not verify: the connection is over.
        """
        self._incoming.write(data)
        try:
            if not self.ready:
                try:
                    self._tls.do_handshake()
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    return b""
                self.ready = True
            chunks = []
            while True:   # until WantRead: every whole record read so far, so no plaintext waits inside the TLS object
                try:
                    chunk = self._tls.read(READ_SIZE)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    break
                except ssl.SSLZeroReturnError:
                    return None
                if not chunk:
                    return None
                chunks.append(chunk)
            return b"".join(chunks) if len(chunks) != 1 else chunks[0]
        finally:
            self._collect()

    def encrypt(self, plaintext: bytes) -> bytes:
        """The TLS records of plaintext (only once ready): returned to be sent now when nothing
        older waits in ``pending``, else added to it (and b"" returned), so records keep their order."""
        self._tls.write(plaintext)
        records = self._outgoing.read()
        if self.pending:
            self.pending += records
            return b""
        return records

    def goodbye(self) -> None:
        """Queue TLS's close_notify (once), so the peer sees a clean end, not a truncation."""
        if self._said_goodbye or not self.ready:
            return
        self._said_goodbye = True
        try:
            self._tls.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, ssl.SSLError):
            pass   # the peer's close_notify is not waited for: the connection lingers, then closes
        self._collect()

    def _collect(self) -> None:
        if self._outgoing.pending:
            self.pending += self._outgoing.read()
