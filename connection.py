"""One client connection of the server: its socket, read side and write side, as asyncio's transport.

The read side is a frame decoder holding the bytes read and not yet handed to
the session logic. A request is decoded only when the server can handle it
(``next_frame``): what waits (a busy session, a client over its flood rate)
is at most one read of raw bytes, never a pile of parsed bodies, and reading
pauses meanwhile. The write side is a queue of whole frames,
sent with one ``send`` per ``flush``; ``EVENT_WRITE`` is registered only while
something is left, and a queue past the cap cuts the client off (``BYE
too_slow``) so that others never wait on it. CH pages are the exception: they
wait in ``paced`` and enter the queue a little at a time as the socket drains
(frames queued after them wait behind them, so replies keep their order), so a
client that reads gets a history of any length and is never cut off for it.

Two ways to end, as asyncio has. ``close_when_flushed``: stop reading, send
what is queued (a BYE, an ERROR, the EX reply), shut the write side, then
linger, dropping input until the peer closes or a grace period ends (closing
a socket with unread input makes the kernel send a reset, which can destroy
the last frame still unread at the peer). ``abort``: now. ``Lifecycle`` is the
one state of all that. The connection tells its owner, the server, what it
needs through ``ConnectionOwner``.

TLS (section 0): the first ``recv`` decides. If its first byte starts a TLS
handshake, the connection gets a ``tlslayer.TLSLayer`` and from then on reads
go through it (``_through_tls``) and flushes encrypt (``_flush_tls``); a plain
connection pays one attribute check per read and per flush. With
``--require-tls`` a plain first byte is refused like a framing error, with
``tls_required``.
"""

from __future__ import annotations

import collections
import enum
import logging
import selectors
import socket
import ssl
import time
from collections.abc import Iterator
from typing import Protocol

import framing
from protocol import TLS_HANDSHAKE_BYTE, ByeReason, Error, bye, fatal
from tlslayer import TLSLayer, TLSPolicy

log = logging.getLogger("chat.server")

READ_SIZE = 65536   # per recv: larger reads cost more per call in CPython than they save
FLUSH_GRACE = 5.0   # seconds a closing connection gets to take its last bytes
LINGER = 2.0        # seconds a closed-for-writing connection waits for the peer's close
# CH pages enter the send queue while it holds less than this (and a quarter of the cap):
# enough to keep a socket busy between passes, far from any cap.
PAGE_LOW_WATER = 65536
# A connection whose socket takes none of its waiting CH pages for this long is
# not reading: it is cut off (BYE too_slow) like any client that does not read.
PACE_STALL = 5.0


class Lifecycle(enum.Enum):
    OPEN = "open"              # reading requests, sending replies
    REFUSED = "refused"        # a framing error: nothing more is read; replies owed go out, then the ERROR
    CLOSING = "closing"        # close when flushed: sending what is queued, reading nothing
    LINGERING = "lingering"    # all sent and the write side shut; input dropped until the peer closes
    CLOSED = "closed"


_ENDING = (Lifecycle.CLOSING, Lifecycle.LINGERING, Lifecycle.CLOSED)
_END = object()   # what next() gives at the end of an iterator of pages


class ConnectionOwner(Protocol):
    """What a connection asks of the server."""

    sel: selectors.BaseSelector

    def on_input(self, conn: Connection) -> None:
        """Requests were decoded (or a framing error found): hand them over."""

    def on_output(self, conn: Connection) -> None:
        """An idle connection has something queued: flush it before the pass ends."""

    def on_closing(self, conn: Connection) -> None:
        """Close-when-flushed started: abort it if it is not done by ``close_by``."""

    def on_pacing(self, conn: Connection) -> None:
        """CH pages wait for the socket to drain: cut it off if it stops taking them."""

    def on_cut_off(self, conn: Connection) -> None:
        """Its queue passed the cap: the session must end."""

    def on_lost(self, conn: Connection) -> None:
        """It is closed: forget it."""


class Connection:
    """One client socket and its buffers."""

    __slots__ = ("cid", "sock", "address", "owner", "send_cap", "decoder", "out", "head",
                 "out_size", "events", "lifecycle", "closed", "ending", "fatal", "close_by", "user", "tokens",
                 "tokens_at", "seen", "paced", "paced_other", "progress_at", "waiting", "tls", "sniff")

    def __init__(self, cid: int, sock: socket.socket, address: str, owner: ConnectionOwner, *,
                 frame_limit: int, send_cap: int, burst: float, tls: TLSPolicy | None = None) -> None:
        self.cid = cid
        self.sock = sock
        self.address = address
        self.owner = owner
        self.send_cap = send_cap  # bytes queued before BYE too_slow (0: no cap)
        self.decoder = framing.FrameDecoder(frame_limit)
        self.out: list[bytes] = []   # whole frames; the first may be partly sent
        self.head = 0                # bytes of out[0] already sent
        self.out_size = 0            # bytes in out not yet sent
        self.paced: collections.deque | None = None   # (frame, is CH page) behind CH pages not yet queued
        self.paced_other = 0         # bytes in paced that are not CH pages (they count against the cap)
        self.progress_at = 0.0       # while pages wait: when the socket last took bytes
        self.waiting = False         # the pages wait for the store (not the socket): the owner asks again
        self.events = 0
        self.lifecycle = Lifecycle.OPEN
        # Read on every queued frame: kept beside the lifecycle (set only by _become) rather than derived.
        self.closed = False   # lifecycle CLOSED
        self.ending = False   # lifecycle CLOSING, LINGERING or CLOSED: nothing more is queued or handed over
        self.fatal: bytes | None = None   # an ERROR to send once the replies owed are sent
        self.close_by = 0.0
        self.user = ""
        self.seen = (0, 0)        # (broadcast run, how many of its frames this connection has been given)
        self.tokens = burst       # the flood limit's bucket (the server's policy)
        self.tokens_at = time.time()
        self.tls: TLSLayer | None = None     # set when the first byte starts TLS
        self.sniff = tls                      # until the first byte is read: what it may start
        self._set_events(selectors.EVENT_READ)

    def _become(self, lifecycle: Lifecycle) -> None:
        self.lifecycle = lifecycle
        self.closed = lifecycle is Lifecycle.CLOSED
        self.ending = lifecycle in _ENDING

    # --- the selector ---------------------------------------------------------------
    def on_ready(self, mask: int) -> None:
        if mask & selectors.EVENT_READ and not self.closed:
            self.read()
        if mask & selectors.EVENT_WRITE and not self.closed:
            self.flush()

    def _set_events(self, events: int) -> None:
        if events == self.events:
            return
        sel = self.owner.sel
        if self.events and events:
            sel.modify(self.sock, events, self)
        elif events:
            sel.register(self.sock, events, self)
        else:
            sel.unregister(self.sock)
        self.events = events

    def pause_reading(self) -> None:
        self._set_events(self.events & ~selectors.EVENT_READ)

    def resume_reading(self) -> None:
        if self.lifecycle is Lifecycle.OPEN:
            self._set_events(self.events | selectors.EVENT_READ)

    # --- reading ------------------------------------------------------------------------
    def read(self) -> None:
        try:
            data = self.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.abort()
            return
        if self.lifecycle is not Lifecycle.OPEN:
            return   # lingering (or refused): read only to be dropped
        if self.tls is not None or self.sniff is not None:
            data = self._through_tls(data)
            if not data:
                return
        self.decoder.append(data)
        if self.decoder.buffered >= READ_SIZE:
            self.pause_reading()   # the owner resumes once what is here is handled
        self.owner.on_input(self)

    def next_frame(self) -> framing.Frame | None:
        """The next request, decoded now; None if none is complete or the bytes are not frames
        (then ``fatal`` holds the ERROR to send once the replies still owed are out)."""
        if self.lifecycle is not Lifecycle.OPEN:
            return None
        try:
            return self.decoder.next_frame()
        except framing.ProtocolError as exc:
            log.info("connection %d: %s", self.cid, exc.message.encode("unicode_escape").decode("ascii"))
            self.fatal = fatal(Error(exc.code), exc.message)
            self._become(Lifecycle.REFUSED)
            self.pause_reading()
            return None

    def _refuse_input(self, error: bytes) -> None:
        """Read nothing more; the replies owed go out, then this ERROR, then the connection closes."""
        self.fatal = error
        self._become(Lifecycle.REFUSED)
        self.pause_reading()
        self.owner.on_input(self)

    def _through_tls(self, data: bytes) -> bytes:
        """Bytes read -> the plaintext for the decoder (b"": nothing for it now)."""
        policy = self.sniff
        if policy is not None:   # the first bytes: TLS, or plain (section 0)
            self.sniff = None
            if data[0] != TLS_HANDSHAKE_BYTE:
                if policy.require:
                    log.info("connection %d: plain connection refused (--require-tls)", self.cid)
                    self._refuse_input(fatal(Error.TLS_REQUIRED, "this server accepts TLS connections only"))
                    return b""
                return data
            self.tls = policy.layer()
        tls = self.tls
        assert tls is not None
        try:
            plaintext = tls.receive(data)
        except ssl.SSLError as exc:
            log.info("connection %d: TLS failed: %s", self.cid, exc.reason or exc)
            self.abort()
            return b""
        if tls.pending:
            self.owner.on_output(self)   # the handshake's answer, or a session ticket
        if plaintext is None:   # close_notify: the peer is done, as at the end of a plain stream
            self.abort()
            return b""
        return plaintext

    # --- writing ------------------------------------------------------------------------
    def queue(self, data: bytes) -> None:
        """Queue one frame (or several, joined); it leaves with the next flush."""
        if self.ending:   # nothing may follow a BYE, an ERROR or the EX reply
            return
        if not self.out:
            self.owner.on_output(self)
        if self.paced is not None:   # behind CH pages still waiting
            self.paced.append((data, False))
            self.paced_other += len(data)
        else:
            self.out.append(data)
            self.out_size += len(data)
        if self.send_cap and self.out_size + self.paced_other > self.send_cap:
            self.too_slow()

    def offer(self, data: bytes) -> None:
        """Send data at once if nothing waits before it, else queue it (a fan-out's one send).

        Never closes the connection here: a failed send queues the data, and the flush
        that follows in this pass meets the error again and closes (the caller may be
        walking the table of connections).
        """
        if self.out or self.paced is not None or self.tls is not None or self.ending:
            self.queue(data)
            return
        try:
            sent = self.sock.send(data)
        except OSError:   # would block, or failed: the flush knows which
            sent = 0
        if sent < len(data):   # the rest waits as the queue's head (no copy: data may be shared)
            self.owner.on_output(self)
            self.out.append(data)
            self.head = sent
            self.out_size = len(data) - sent
            if self.send_cap and self.out_size > self.send_cap:
                self.too_slow()

    def queue_page(self, data: bytes | Iterator[bytes | None]) -> None:
        """Queue a CH page, or CH pages made as they are taken (an iterator; a ``b""`` from it is
        nothing yet: the next comes in a later pass; a ``None``, nothing until the store has read
        more: ``waiting`` is set, EVENT_WRITE is not, and the owner flushes again in a later pass):
        they enter the send queue as the socket drains, never past the cap."""
        if self.ending:
            return
        if not self.out:
            self.owner.on_output(self)
        if self.paced is None:
            self.paced = collections.deque()
            self.progress_at = time.time()
            self.owner.on_pacing(self)
        self.paced.append((data, True))

    def _refill(self) -> bool:
        """Move frames from behind the CH pages into the send queue while it is short;
        True when the last of them has moved."""
        paced, out = self.paced, self.out
        self.waiting = False
        low_water = self.send_cap // 4 if self.send_cap else PAGE_LOW_WATER
        while paced and self.out_size < min(low_water, PAGE_LOW_WATER):
            data, is_page = paced[0]
            if not isinstance(data, bytes):   # pages made as they are taken
                frame = next(data, _END)
                if frame is _END:
                    paced.popleft()
                    continue
                if not frame:
                    self.progress_at = time.time()   # reading, not stalled: go on in a later pass
                    self.waiting = frame is None
                    return False
                data = frame
            else:
                paced.popleft()
            out.append(data)
            self.out_size += len(data)
            if not is_page:
                self.paced_other -= len(data)
        if paced:
            return False
        self.paced = None
        return True

    def too_slow(self) -> None:
        """The client does not read: drop what it has not started, say BYE, close."""
        log.warning("connection %d (%r): send queue over %d bytes, disconnecting", self.cid, self.user,
                    self.send_cap)
        del self.out[1 if self.head else 0:]
        self.paced, self.paced_other = None, 0
        self.out.append(bye(ByeReason.TOO_SLOW))
        self.out_size = sum(len(frame) for frame in self.out) - self.head
        self.close_when_flushed()
        self.owner.on_cut_off(self)   # the session ends after the current effects are applied

    def flush(self) -> None:
        """Send what is queued with one send; keep the rest and wait for EVENT_WRITE."""
        if self.paced is not None and self._refill():
            self.owner.on_input(self)   # the requests held behind the CH go on
        if self.tls is not None:
            self._flush_tls(self.tls)
            return
        out = self.out
        if out:
            if len(out) == 1:
                data = out[0][self.head:] if self.head else out[0]
            else:
                if self.head:
                    out[0] = out[0][self.head:]
                    self.head = 0
                data = b"".join(out)
            try:
                sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self.abort()
                return
            if sent and self.paced is not None:
                self.progress_at = time.time()
            if sent < len(data):
                self.out_size -= sent
                sent += self.head
                done = 0
                while sent >= len(out[done]):
                    sent -= len(out[done])
                    done += 1
                del out[:done]
                self.head = sent
                self._set_events(self.events | selectors.EVENT_WRITE)
                return
            out.clear()
            self.head = 0
            self.out_size = 0
        if self.paced is not None:   # more CH pages: the socket is writable again next pass
            self._set_events(self.events | selectors.EVENT_WRITE if not self.waiting
                             else self.events & ~selectors.EVENT_WRITE)
            return
        if self.lifecycle is Lifecycle.CLOSING:
            self._linger()
        elif self.lifecycle is not Lifecycle.LINGERING:
            self._set_events(self.events & ~selectors.EVENT_WRITE)

    def _flush_tls(self, tls: TLSLayer) -> None:
        """``flush`` through TLS: the queued frames are encrypted whole, then sent as far as they go."""
        out = self.out
        records = b""
        if out:
            data = out[0] if len(out) == 1 else b"".join(out)
            out.clear()
            self.head = 0
            if tls.ready:
                records = tls.encrypt(data)
            # else: before the handshake ends the only frame can be a BYE (idle, shutdown):
            # dropped, so the connection closes without a frame (section 0).
        pending = tls.pending
        if self.lifecycle is Lifecycle.CLOSING:
            pending += records
            records = b""
            tls.goodbye()
        if records or pending:
            chunk = records or pending   # records only when nothing older waits (TLSLayer.encrypt)
            try:
                sent = self.sock.send(chunk)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self.abort()
                return
            if records:
                if sent < len(records):
                    pending += memoryview(records)[sent:]
            else:
                del pending[:sent]
        self.out_size = len(pending)
        if pending or (self.paced is not None and not self.waiting):   # more CH pages: next pass
            self._set_events(self.events | selectors.EVENT_WRITE)
        elif self.paced is not None:   # the pages wait for the store: the owner flushes again
            self._set_events(self.events & ~selectors.EVENT_WRITE)
        elif self.lifecycle is Lifecycle.CLOSING:
            self._linger()
        elif self.lifecycle is not Lifecycle.LINGERING:
            self._set_events(self.events & ~selectors.EVENT_WRITE)

    # --- ending -------------------------------------------------------------------------
    def close_when_flushed(self) -> None:
        """Stop reading, send what is queued, then shut the write side and linger."""
        if self.ending:
            return
        self._become(Lifecycle.CLOSING)
        self.close_by = time.time() + FLUSH_GRACE
        self.owner.on_closing(self)
        self.pause_reading()
        if self.tls is not None:
            self.owner.on_output(self)   # close_notify and any ciphertext left go first (_flush_tls)
        elif not self.out and self.paced is None:
            self._linger()

    def _linger(self) -> None:
        """Everything is sent: shut the write side and drop input until the peer closes."""
        self._become(Lifecycle.LINGERING)
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.abort()
            return
        self.close_by = min(self.close_by, time.time() + LINGER)
        self._set_events(selectors.EVENT_READ)

    def abort(self) -> None:
        """Close now and tell the owner."""
        if self.closed:
            return
        self._become(Lifecycle.CLOSED)
        if self.events:
            self.owner.sel.unregister(self.sock)
            self.events = 0
        self.sock.close()
        self.owner.on_lost(self)
