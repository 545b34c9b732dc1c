"""A plain protocol client for tests: real sockets, explicit deadlines, no cleverness."""

from __future__ import annotations

import base64
import os
import socket
import ssl
import time

import framing
import pg3lib
import protocol
import x509


def bare_form(sealed_text: str) -> str:
    """A sealed text in the version-1 form (``key;token``, the token without the
    course helper's outer base64), as old clients made it and old histories hold."""
    wrapped, token = sealed_text.split(";")
    return wrapped + ";" + base64.b64decode(token).decode("ascii")


def client_context() -> ssl.SSLContext:
    """A TLS client context for a self-signed server: no CA check, the key is compared with the pin instead."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class WireClient:
    """Speaks docs/PROTOCOL.md over one loopback TCP connection.

    ``legacy_seal`` makes every sealed text in the version-1 form (``bare_form``),
    to play a client from before the course form was fixed. ``tls`` connects
    with TLS (section 0); ``cert_key`` is then the key the server's certificate
    holds, and ``login_start`` checks that LOGIN's ``server_key`` and
    ``fingerprint`` are that key (the pin check of section 9). ``pm_version``
    picks the PM SEND ``pm`` makes: 2 (id, sent, PM2 signature) or 1 (as
    version-1 clients do).
    """

    pm_version = 2

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0,
                 legacy_seal: bool = False, tls: bool = False, pm_version: int | None = None,
                 rcvbuf: int = 0) -> None:
        self.legacy_seal = legacy_seal
        if pm_version is not None:
            self.pm_version = pm_version
        if rcvbuf:   # set before connect, so the window stays small (a client that reads slowly)
            self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.sock.settimeout(timeout)
            self.sock.connect((host, port))
        else:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.cert_key: pg3lib.PublicKey | None = None
        if tls:
            self.sock = client_context().wrap_socket(self.sock)   # handshakes now, within the timeout
            der = self.sock.getpeercert(binary_form=True)
            assert der is not None
            self.cert_key = x509.certificate_key(der)
        self.timeout = timeout
        self.decoder = framing.FrameDecoder(limit=0)
        self.inbox: list[framing.Frame] = []   # frames received, not yet taken
        self.data: list[dict] = []             # D frames seen by request()
        self.username = ""
        self.keys: pg3lib.KeyPair | None = None
        self.server_key: pg3lib.PublicKey | None = None
        self.nonce = b""
        self.closed = False

    # --- raw -----------------------------------------------------------------
    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, body: dict) -> None:
        self.sock.sendall(framing.command(body))

    def _fill(self, deadline: float) -> bool:
        """Read once; False on EOF."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no frame before the deadline")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            raise TimeoutError("no frame before the deadline") from None
        except (ConnectionResetError, ssl.SSLEOFError):
            chunk = b""
        if not chunk:
            self.closed = True
            return False
        self.inbox.extend(self.decoder.feed(chunk))
        return True

    def recv(self, timeout: float | None = None) -> framing.Frame:
        """The next frame of any kind. Raises EOFError when the server closed."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not self.inbox:
            if not self._fill(deadline):
                raise EOFError("server closed the connection")
        return self.inbox.pop(0)

    def recv_until_closed(self, timeout: float | None = None) -> list[framing.Frame]:
        """Every frame until the server closes the connection."""
        frames = []
        while True:
            try:
                frames.append(self.recv(timeout))
            except EOFError:
                return frames

    def reply(self, op: str, timeout: float | None = None) -> dict:
        """The next C frame with this op; D frames on the way go to self.data."""
        while True:
            frame = self.recv(timeout)
            if frame.kind == "D":
                self.data.append(frame.body)
                continue
            if frame.body["op"] == op:
                return frame.body
            raise AssertionError(f"expected a {op} reply, got {frame}")

    def request(self, body: dict, timeout: float | None = None) -> dict:
        self.send(body)
        return self.reply(body["op"], timeout)

    def wait_data(self, op: str, timeout: float | None = None, **match) -> dict:
        """The first D frame with this op (and these members), already seen or next."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            for i, body in enumerate(self.data):
                if body["op"] == op and all(body.get(k) == v for k, v in match.items()):
                    return self.data.pop(i)
            frame = self.recv(max(0.0, deadline - time.monotonic()) or 0.001)
            if frame.kind != "D":
                raise AssertionError(f"expected D {op}, got {frame}")
            self.data.append(frame.body)

    # --- the login dance ------------------------------------------------------
    def login_start(self, username: str) -> dict:
        reply = self.request({"op": "LOGIN", "username": username})
        if reply["ok"]:
            self.server_key = pg3lib.PublicKey.from_key_form(reply["server_key"])
            self.nonce = base64.b64decode(reply["nonce"])
            if self.cert_key is not None:   # the pin check: TLS reached the very key LOGIN announces
                assert self.cert_key == self.server_key, "the certificate's key is not LOGIN's server_key"
                assert reply["fingerprint"] == self.cert_key.fingerprint, "LOGIN's fingerprint is not its key's"
        return reply

    def sealed_password(self, password: str, nonce: bytes | None = None) -> str:
        assert self.server_key is not None
        plain = (self.nonce if nonce is None else nonce) + password.encode("utf-8")
        return self.seal(self.server_key, plain)

    def seal(self, key: pg3lib.PublicKey, plain: bytes) -> str:
        sealed = key.seal(plain).decode("ascii")
        return bare_form(sealed) if self.legacy_seal else sealed

    def password(self, password: str, timeout: float | None = None) -> dict:
        return self.request({"op": "PASSWORD", "ciphertext": self.sealed_password(password)}, timeout)

    def key(self, keys: pg3lib.KeyPair, **members) -> dict:
        self.keys = keys
        return self.request({"op": "KEY", "public_key": keys.public.key_form, **members})

    def login(self, username: str, password: str, keys: pg3lib.KeyPair, **key_members) -> dict:
        """LOGIN, PASSWORD, KEY (with key_members, e.g. recent=True); asserts each succeeds;
        returns the KEY reply."""
        reply = self.login_start(username)
        assert reply["ok"], reply
        reply = self.password(password)
        assert reply["ok"], reply
        self.username = reply["username"]
        reply = self.key(keys, **key_members)
        assert reply["ok"], reply
        return reply

    # --- operations -------------------------------------------------------------
    def bm(self, text: str) -> dict:
        reply = self.request({"op": "BM"})
        assert reply["ok"], reply
        return self.request({"op": "SEND", "text": text})

    def pm(self, target: str, text: str) -> dict:
        """PM the target; returns the SEND reply (or the failed TARGET reply)."""
        reply = self.request({"op": "PM"})
        assert reply["ok"], reply
        reply = self.request({"op": "TARGET", "username": target})
        if not reply["ok"]:
            return reply
        their_key = pg3lib.PublicKey.from_key_form(reply["public_key"])
        return self.request(self.pm_send(reply["username"], their_key, text))

    def pm_send(self, target: str, their_key: pg3lib.PublicKey, text: str, *, pm_id: str | None = None,
                sent: str | None = None, version: int | None = None) -> dict:
        """The SEND body of a PM to target (its registered spelling), sealed and signed."""
        assert self.keys is not None
        ciphertext = self.seal(their_key, text.encode("utf-8"))
        self_copy = self.seal(self.keys.public, text.encode("utf-8"))
        if (version or self.pm_version) == 1:
            signature = self.keys.sign(pg3lib.pm_signed_bytes(self.username, target, ciphertext))
            return {"op": "SEND", "ciphertext": ciphertext, "self_copy": self_copy, "signature": signature}
        return pm2_send(self.keys, self.username, target, ciphertext, self_copy, pm_id=pm_id, sent=sent)

    def pm_checked(self, target: str, text: str, **options) -> tuple[dict, dict]:
        """PM, TARGET and a PM2 SEND built with options (pm_id, sent, ...); returns (SEND body, reply)."""
        reply = self.request({"op": "PM"})
        assert reply["ok"], reply
        reply = self.request({"op": "TARGET", "username": target})
        assert reply["ok"], reply
        body = self.pm_send(reply["username"], pg3lib.PublicKey.from_key_form(reply["public_key"]), text, **options)
        return body, self.request(body)

    def history(self, limit: int | None = None) -> list[dict]:
        """CH: every entry, over as many frames as the server sends."""
        body: dict = {"op": "CH"}
        if limit is not None:
            body["limit"] = limit
        self.send(body)
        entries: list[dict] = []
        while True:
            reply = self.reply("CH")
            assert reply["ok"], reply
            entries.extend(reply["entries"])
            if not reply["more"]:
                return entries

    def exit(self) -> dict:
        return self.request({"op": "EX"})

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def new_pm_id() -> str:
    return base64.b64encode(os.urandom(protocol.PM_ID_BYTES)).decode("ascii")


def pm2_send(keys: pg3lib.KeyPair, sender: str, target: str, ciphertext: str, self_copy: str, *,
             pm_id: str | None = None, sent: str | None = None) -> dict:
    """A PM2 SEND body (docs/PROTOCOL.md section 4.5): a fresh id and the clock now unless given."""
    pm_id = new_pm_id() if pm_id is None else pm_id
    sent = protocol.timestamp(time.time()) if sent is None else sent
    signed = pg3lib.pm2_signed_bytes(pm_id, sent, sender, target, pg3lib.sealed_digest(ciphertext),
                                     pg3lib.sealed_digest(self_copy))
    return {"op": "SEND", "id": pm_id, "sent": sent, "ciphertext": ciphertext, "self_copy": self_copy,
            "signature": keys.sign(signed)}


def verify_pm2(frame: dict, receiver: str) -> bool:
    """What a receiver checks of a D PM (section 4.5): the PM2 signature with the frame's sender key."""
    signed = pg3lib.pm2_signed_bytes(frame["id"], frame["sent"], frame["from"], receiver,
                                     pg3lib.sealed_digest(frame["ciphertext"]), frame["self_copy_sha256"])
    return pg3lib.PublicKey.from_key_form(frame["sender_key"]).verify(signed, frame["signature"])
