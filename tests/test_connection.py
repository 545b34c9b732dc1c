"""Tests for connection.py's send path: ``offer`` (a fan-out's one send) and ``flush`` over a
real socket pair with a small buffer, so sends are partial and the queue's head is used."""

from __future__ import annotations

import selectors
import socket

import framing
from connection import Connection


class Owner:
    """The server's side of the ConnectionOwner protocol, recording what it is told."""

    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.dirty: list[Connection] = []
        self.cut: list[Connection] = []
        self.lost: list[Connection] = []

    def on_input(self, conn: Connection) -> None:
        pass

    def on_output(self, conn: Connection) -> None:
        self.dirty.append(conn)

    def on_closing(self, conn: Connection) -> None:
        pass

    def on_pacing(self, conn: Connection) -> None:
        pass

    def on_cut_off(self, conn: Connection) -> None:
        self.cut.append(conn)

    def on_lost(self, conn: Connection) -> None:
        self.lost.append(conn)

    def flush_dirty(self) -> None:
        dirty, self.dirty = self.dirty, []
        for conn in dirty:
            if not conn.closed:
                conn.flush()


def pair(send_cap: int = 0) -> tuple[Owner, Connection, socket.socket]:
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    ours.setblocking(False)
    owner = Owner()
    conn = Connection(1, ours, "127.0.0.1", owner, frame_limit=0, send_cap=send_cap, burst=0.0)
    return owner, conn, theirs


def read_all(sock: socket.socket, owner: Owner, conn: Connection, want: int) -> bytes:
    """Read until want bytes came, flushing the connection as a server pass would."""
    got = bytearray()
    sock.settimeout(2)
    while len(got) < want:
        owner.flush_dirty()
        if conn.out:
            conn.flush()
        got += sock.recv(65536)
    return bytes(got)


def test_offer_sends_at_once_when_nothing_waits() -> None:
    owner, conn, peer = pair()
    frame = framing.data({"op": "BM", "from": "a", "text": "hi"})
    conn.offer(frame)
    assert not conn.out and not owner.dirty   # no queue, no flush needed
    peer.settimeout(2)
    assert peer.recv(100) == frame


def test_partial_offers_and_queued_frames_arrive_whole_and_in_order() -> None:
    owner, conn, peer = pair()
    frames = [framing.data({"op": "BM", "from": "a", "text": f"{i} " + "x" * 3000}) for i in range(40)]
    for i, frame in enumerate(frames):   # the buffer fills: later offers find a queue and join it
        (conn.offer if i % 3 else conn.queue)(frame)
    assert conn.out and owner.dirty
    assert conn.out_size == sum(len(f) for f in conn.out) - conn.head
    conn.flush()
    assert conn.events & selectors.EVENT_WRITE   # it waits for the socket to drain
    data = read_all(peer, owner, conn, sum(len(f) for f in frames))
    decoder = framing.FrameDecoder(0)
    decoder.append(data)
    texts = [decoder.next_frame().body["text"].split()[0] for _ in frames]
    assert texts == [str(i) for i in range(40)] and decoder.buffered == 0
    assert not conn.out and conn.head == 0 and conn.out_size == 0


def test_offer_counts_only_the_unsent_part_against_the_cap() -> None:
    owner, conn, peer = pair(send_cap=20_000)
    chunk = b"D" + b"y" * 24_000   # over the cap whole, under it once the socket has taken its part
    conn.offer(chunk)
    taken = conn.head
    assert taken > 4_001, "the socket took less than the test needs"
    assert conn.out == [chunk] and conn.out_size == len(chunk) - taken and owner.cut == []
    owner, conn, peer = pair(send_cap=20_000)
    conn.offer(b"D" + b"y" * 60_000)   # over it even so: cut off, the started frame kept, then BYE
    assert owner.cut == [conn] and conn.head > 0 and len(conn.out) == 2 and b'"BYE"' in conn.out[1]


def test_a_failed_offer_is_closed_by_the_flush_not_during_it() -> None:
    owner, conn, peer = pair()
    peer.close()
    conn.offer(framing.data({"op": "BM", "from": "a", "text": "gone"}))
    assert not conn.closed and not owner.lost and owner.dirty == [conn]   # the caller may be walking a table
    for _ in range(3):   # the first send after a close may still be taken by the kernel
        owner.flush_dirty()
        if conn.closed:
            break
        conn.queue(b"D")
    assert conn.closed and owner.lost == [conn]


def test_pages_that_wait_for_the_store_do_not_poll_the_socket() -> None:
    """A lazily read history whose next piece is on its way from the store (a ``None`` among
    the pages): the connection does not ask for EVENT_WRITE meanwhile (the loop would spin);
    it says ``waiting``, and a flush once the piece has come goes on, in order."""
    owner, conn, peer = pair()
    ready: list = []

    def pages():
        yield b"C1"
        while not ready:
            yield None
        yield from ready
    conn.queue_page(pages())
    conn.queue(b"C4")   # a reply behind the pages
    owner.flush_dirty()
    assert conn.waiting and conn.paced is not None
    assert not conn.events & selectors.EVENT_WRITE
    conn.flush()   # the owner asks again in a later pass: still nothing
    assert conn.waiting and not conn.events & selectors.EVENT_WRITE
    ready += [b"C2", b"C3"]
    conn.flush()
    assert not conn.waiting and conn.paced is None
    assert read_all(peer, owner, conn, 8) == b"C1C2C3C4"
    assert not conn.events & selectors.EVENT_WRITE
