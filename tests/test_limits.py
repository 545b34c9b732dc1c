"""Issue 6, limits: every limit of the table, each broken by a client, and the "precise rules".

Each test starts its own server (``make_server``) with the limit set low enough
to break quickly, and checks both sides: the client that breaks the limit gets
what the table says, and everyone else is unaffected. Timing assertions have
generous margins; each one would fail by a wide margin if the protection were
missing.
"""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import threading
import time
from unittest import mock

import pytest

import connection
import framing
import wire
from wire import WireClient

PASSWORD = "correct horse"


# --- helpers ----------------------------------------------------------------------------

def client(port: int, *, source: str | None = None, rcvbuf: int | None = None, timeout: float = 10.0) -> WireClient:
    """A WireClient whose socket is bound to a source address and/or has a small receive buffer
    (both must be set before connect, so the socket is made here)."""

    def create_connection(address, timeout=None, *args, **kwargs):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if source:
            sock.bind((source, 0))
        sock.settimeout(timeout)
        sock.connect(address)
        return sock

    with mock.patch.object(wire.socket, "create_connection", create_connection):
        return WireClient(port, timeout=timeout)


def log_in(port: int, keys, names, key_index: int = 0, **kwargs) -> list[WireClient]:
    """Log each name in (registering it if new); every client uses keys(key_index + i)."""
    clients = []
    for i, name in enumerate(names):
        c = client(port, **kwargs)
        c.login(name, PASSWORD + name, keys(key_index + i))
        clients.append(c)
    return clients


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def accepted(c: WireClient, name: str = "probe") -> bool:
    """True if the server serves this connection (LOGIN answered), False if it refused it
    with ERROR server_busy and closed it."""
    try:
        c.send({"op": "LOGIN", "username": name})
    except OSError:
        pass   # already closed by a refusal: the ERROR is still readable
    frames = []
    while True:
        try:
            frame = c.recv(timeout=3)
        except EOFError:
            break
        frames.append(frame)
        if frame.body["op"] == "LOGIN":
            assert frame.body["ok"], frame
            return True
    assert frames == [framing.Frame("C", {"op": "ERROR", "ok": False, "error": "server_busy",
                                          "message": frames[0].body.get("message") if frames else None})], frames
    return False


def refused_at_once(port: int, **kwargs) -> bool:
    """Connect and read without sending: True if ERROR server_busy arrives and the server closes."""
    c = client(port, **kwargs)
    try:
        frames = c.recv_until_closed(timeout=3)
    except TimeoutError:
        return False   # served: nothing arrives until we speak
    finally:
        c.close()
    assert len(frames) == 1 and frames[0].body["op"] == "ERROR" and frames[0].body["error"] == "server_busy", frames
    return True


def bm_frames(text: str, count: int) -> bytes:
    """count pipelined BM + SEND pairs with texts text-0, text-1, ..."""
    return b"".join(framing.command({"op": "BM"}) + framing.command({"op": "SEND", "text": f"{text}-{i}"})
                    for i in range(count))


def read_replies(c: WireClient, count: int, timeout: float = 20.0) -> list[dict]:
    """The next count C replies (D frames go to c.data)."""
    deadline = time.monotonic() + timeout
    replies = []
    while len(replies) < count:
        frame = c.recv(max(0.001, deadline - time.monotonic()))
        if frame.kind == "D":
            c.data.append(frame.body)
        else:
            replies.append(frame.body)
    return replies


# --- --frame-limit ---------------------------------------------------------------------------

def _padded_login(size: int) -> bytes:
    """A LOGIN frame whose body is exactly size bytes."""
    empty = len(framing.encode_body({"op": "LOGIN", "username": "padded", "pad": ""}))
    frame = framing.command({"op": "LOGIN", "username": "padded", "pad": "x" * (size - empty)})
    assert len(frame) == size + framing.HEADER_SIZE
    return frame


@pytest.mark.parametrize("args,limit", [((), 65536), (("--frame-limit", "1000"), 1000)])
def test_frame_limit_is_checked_at_the_header(make_server, args, limit):
    server = make_server(*args)
    at_limit = client(server.port)
    at_limit.send_raw(_padded_login(limit))
    assert at_limit.reply("LOGIN", timeout=5)["ok"]          # exactly the limit is fine

    over = client(server.port)
    over.send_raw(b"C" + (limit + 1).to_bytes(4, "big"))       # the header alone, no body byte
    started = time.monotonic()
    frames = over.recv_until_closed(timeout=3)
    assert len(frames) == 1 and frames[0].body["op"] == "ERROR" and frames[0].body["error"] == "bad_frame", frames
    assert time.monotonic() - started < 2
    assert at_limit.request({"op": "LOGIN", "username": "x"})["error"] == "unexpected"   # others unaffected


def test_frame_limit_0_turns_it_off(make_server):
    server = make_server("--frame-limit", "0")
    c = client(server.port)
    c.send_raw(_padded_login(200_000))
    assert c.reply("LOGIN", timeout=5)["ok"]
    huge = client(server.port)
    huge.send_raw(b"C\xff\xff\xff\xff")        # waits for a body, no ERROR
    with pytest.raises(TimeoutError):
        huge.recv(timeout=0.5)


def test_server_frames_respect_the_frame_limit(make_server, keys):
    limit = 2048
    server = make_server("--frame-limit", str(limit), "--max-per-ip", "0", "--connect-rate", "0", "--flood-rate", "0")
    names = [f"u{i:02d}" + "x" * 29 for i in range(60)]   # 32 characters each: 60 do not fit in 2 KB
    crowd = []
    for name in names:
        c = client(server.port)
        c.login(name, PASSWORD, keys(0))
        crowd.append(c)
    assert crowd[0].decoder.buffered == 0
    crowd[0].decoder = framing.FrameDecoder(limit)   # what the server relays fits the limit too
    me = client(server.port)
    me.decoder = framing.FrameDecoder(limit)    # any frame of ours over the limit is a ProtocolError here
    me.login_start("me")
    me.password(PASSWORD)
    key_reply = me.key(keys(1))
    assert key_reply["ok"] and key_reply["more_online"] > 0, key_reply
    assert len(key_reply["online"]) + key_reply["more_online"] == 60
    assert set(key_reply["online"]) <= set(names)
    pm_reply = me.request({"op": "PM"})
    assert pm_reply["ok"] and pm_reply["more_online"] > 0
    assert len(pm_reply["online"]) + pm_reply["more_online"] == 60
    target = me.request({"op": "TARGET", "username": names[0]})
    assert target["ok"]
    me.request({"op": "CANCEL"})

    texts = [f"{i:02d} " + "y" * 600 for i in range(30)]   # about 20 KB of history
    me.send_raw(b"".join(framing.command({"op": "BM"}) + framing.command({"op": "SEND", "text": t}) for t in texts))
    assert all(r["ok"] for r in read_replies(me, 60))
    me.send({"op": "CH"})
    pages = []
    while True:
        pages.append(me.reply("CH"))
        if not pages[-1]["more"]:
            break
    assert len(pages) >= 8
    assert [e["text"] for p in pages for e in p["entries"]] == texts
    relayed = []
    while len(relayed) < len(texts):
        frame = crowd[0].recv(timeout=5)
        if frame.kind == "D" and frame.body["op"] == "BM":
            relayed.append(frame.body["text"])
    assert relayed == texts


# --- --send-queue ------------------------------------------------------------------------------

def test_client_that_never_reads_gets_bye_too_slow_and_nobody_waits(make_server, keys):
    server = make_server("--send-queue", "65536", "--flood-rate", "0", "--bm-rate", "0")
    slow = client(server.port, rcvbuf=4096)
    slow.login("slow", PASSWORD, keys(0))
    reader = client(server.port)
    reader.login("reader", PASSWORD, keys(1))
    sender = client(server.port)
    sender.login("sender", PASSWORD, keys(2))

    received = []

    def drain() -> None:   # a well-behaved client keeps reading everything
        try:
            while True:
                frame = reader.recv(timeout=15)
                if frame.kind == "D" and frame.body["op"] == "BM":
                    received.append(frame.body["text"])
        except (EOFError, TimeoutError, OSError):
            pass

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    text = "z" * 4000
    batch_times, sent, cut_at = [], 0, None
    while sent < 4000 and cut_at is None:     # 4000 x 4 KB = 16 MB at most
        started = time.monotonic()
        sender.send_raw(b"".join(framing.command({"op": "BM"})
                                 + framing.command({"op": "SEND", "text": f"{sent + i:05d}{text}"})
                                 for i in range(20)))
        replies = read_replies(sender, 40)
        batch_times.append(time.monotonic() - started)
        assert all(r["ok"] for r in replies), replies
        sent += 20
        if any(d["op"] == "PRESENCE" and d["username"] == "slow" and not d["online"] for d in sender.data):
            cut_at = sent
    assert cut_at is not None, "the client that never reads was never cut off"
    frames = slow.recv_until_closed(timeout=10)
    assert frames[-1] == framing.Frame("C", {"op": "BYE", "reason": "too_slow"}), frames[-3:]
    numbers = [int(f.body["text"][:5]) for f in frames if f.kind == "D" and f.body["op"] == "BM"]
    assert numbers == list(range(len(numbers))), "the slow client must get an unbroken prefix, then BYE"
    assert len(numbers) < cut_at
    # the senders were never slowed; the reader got every message
    print(f"\nsend queue: slow client cut after {cut_at} BMs; batch of 20 BMs: median "
          f"{statistics.median(batch_times) * 1000:.1f} ms, max {max(batch_times) * 1000:.1f} ms")
    assert max(batch_times) < 1.0, batch_times
    reply = sender.bm("after")
    assert reply["ok"] and reply["recipients"] == 1
    deadline = time.monotonic() + 10
    while len(received) < sent + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(received) == sent + 1
    reader.close()


def test_send_queue_0_turns_it_off(make_server, keys):
    server = make_server("--send-queue", "0", "--flood-rate", "0", "--bm-rate", "0")
    slow = client(server.port, rcvbuf=4096)
    slow.login("slow", PASSWORD, keys(0))
    sender = client(server.port)
    sender.login("sender", PASSWORD, keys(1))
    slow.wait_data("PRESENCE", username="sender")
    text = "z" * 4000
    for _ in range(20):    # 4 MB: far past any send queue the other tests use
        sender.send_raw(b"".join(framing.command({"op": "BM"}) + framing.command({"op": "SEND", "text": text})
                                 for _i in range(50)))
        assert all(r["ok"] and r.get("recipients", 1) == 1 for r in read_replies(sender, 100))
    count = 0
    while count < 1000:
        frame = slow.recv(timeout=10)
        assert frame.kind == "D" and frame.body["op"] == "BM", frame
        count += 1


def test_rss_stays_bounded_while_a_client_that_never_reads_is_sent_100_mb(make_server, keys):
    server = make_server("--flood-rate", "0", "--bm-rate", "0")   # the default send queue, 1 MiB
    pid = server.proc.pid
    slow = client(server.port)
    slow.login("sleeper", PASSWORD, keys(0))
    sender = client(server.port)
    sender.login("sender", PASSWORD, keys(1))
    text = "m" * 4000
    batch = b"".join(framing.command({"op": "BM"}) + framing.command({"op": "SEND", "text": text})
                     for _ in range(100))
    frame_size = len(framing.data({"op": "BM", "from": "sender", "text": text, "ts": "2026-11-24T15:04:05.123Z"}))
    before = rss_kib(pid)
    offered = 0
    started = time.monotonic()
    frames = None
    while offered < 100 * 1000 * 1000:
        sender.send_raw(batch)
        assert all(r["ok"] for r in read_replies(sender, 200, timeout=30))
        offered += 100 * frame_size
        if frames is None and "send queue over" in server.log():
            # Cut off: the server keeps the BYE for a few seconds only, so read it now.
            frames = slow.recv_until_closed(timeout=10)
    elapsed = time.monotonic() - started
    after, peak = rss_kib(pid), rss_kib(pid, "VmHWM")
    print(f"\nserver RSS before {before / 1024:.1f} MiB, after {offered / 1e6:.0f} MB of broadcasts to a client "
          f"that never reads: {after / 1024:.1f} MiB (peak {peak / 1024:.1f} MiB); {elapsed:.1f} s")
    assert after - before < 50 * 1024 and peak - before < 50 * 1024
    assert frames and frames[-1].body == {"op": "BYE", "reason": "too_slow"}
    server.kill()
    for name in ("sender.chat", "sleeper.chat"):   # 100 MB of history: do not keep it around (file store)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(server.data_dir, name))


def test_client_that_never_reads_its_own_replies_is_cut_off(make_server, keys):
    """Amplification: tiny CH requests, big replies, never read. Memory stays bounded, and a
    client whose socket takes none of its CH pages for PACE_STALL seconds is cut off."""
    server = make_server("--send-queue", "262144", "--flood-rate", "0", "--bm-rate", "0")
    pid = server.proc.pid
    c = client(server.port, rcvbuf=4096)
    c.login("hoarder", PASSWORD, keys(0))
    c.send_raw(bm_frames("h" * 4000, 10))            # 40 KB of history: each CH answers with that much
    assert all(r["ok"] for r in read_replies(c, 20))
    before = rss_kib(pid)
    # 2000 CH requests, 32 KB in one write (the server can take them in with one read),
    # asking for 80 MB of replies.
    c.sock.settimeout(5.0)
    sent = 2000
    try:
        c.sock.sendall(framing.command({"op": "CH"}) * sent)
    except OSError:
        pass   # closed early: fine, as long as it did not buffer the replies
    time.sleep(0.5)
    after, peak = rss_kib(pid), rss_kib(pid, "VmHWM")
    print(f"\nCH flood: {sent} requests sent; server RSS {before / 1024:.1f} -> {after / 1024:.1f} MiB "
          f"(peak {peak / 1024:.1f} MiB)")
    assert peak - before < 50 * 1024
    time.sleep(connection.PACE_STALL + 1)              # still not reading
    frames = c.recv_until_closed(timeout=10)
    assert frames[-1].body == {"op": "BYE", "reason": "too_slow"}
    assert log_in(server.port, keys, ["other"])[0].bm("still serving")["ok"]


# --- --login-timeout ---------------------------------------------------------------------------

def test_login_timeout_cuts_every_login_state_but_not_logged_in_clients(make_server, keys):
    server = make_server("--login-timeout", "1")
    off = make_server("--login-timeout", "0")
    started = time.monotonic()
    silent = client(server.port)
    after_login = client(server.port)
    after_login.login_start("halfway")
    after_password = client(server.port)
    after_password.login_start("keyless")
    assert after_password.password(PASSWORD)["ok"]
    done = log_in(server.port, keys, ["done"])[0]
    patient = client(off.port)
    for c in (silent, after_login, after_password):
        assert c.recv_until_closed(timeout=3) == [framing.Frame("C", {"op": "BYE", "reason": "idle"})]
        assert 0.8 < time.monotonic() - started < 2.5
    time.sleep(max(0.0, started + 2.0 - time.monotonic()))
    assert done.bm("still here")["ok"]
    with pytest.raises(TimeoutError):
        patient.recv(timeout=0.1)             # --login-timeout 0: no deadline
    patient.login("patient", PASSWORD, keys(1))


def test_login_timeout_cuts_a_client_trickling_one_byte_at_a_time(make_server):
    server = make_server("--login-timeout", "1")
    c = client(server.port)
    frame = framing.command({"op": "LOGIN", "username": "trickler" + "x" * 20})   # 10 s at 0.3 s a byte
    started = time.monotonic()
    frames = []
    for byte in frame:
        try:
            c.send_raw(bytes([byte]))
        except OSError:
            break
        try:
            frames.append(c.recv(timeout=0.3))
            break
        except TimeoutError:
            continue
        except EOFError:
            break
    try:
        frames.extend(c.recv_until_closed(timeout=3))
    except OSError:
        pass
    elapsed = time.monotonic() - started
    assert frames == [framing.Frame("C", {"op": "BYE", "reason": "idle"})]
    assert elapsed < 2.5


# --- --max-clients and --max-per-ip ------------------------------------------------------------

def accepted_soon(port: int, name: str = "probe", **kwargs) -> WireClient:
    """A served connection, retrying while the server has yet to see earlier ones close."""
    deadline = time.monotonic() + 3
    while True:
        c = client(port, **kwargs)
        if accepted(c, name):
            return c
        assert time.monotonic() < deadline, "a closed connection did not free its place"


def _check_cap(port: int, cap: int, **kwargs) -> None:
    """cap connections are served; more are refused at once and do not count; a closed one frees a place."""
    served = [client(port, **kwargs) for _ in range(cap)]
    for i, c in enumerate(served):
        assert accepted(c, f"in{i}")
    for _ in range(5):
        assert refused_at_once(port, **kwargs)
    served.pop(0).close()
    served.append(accepted_soon(port, "newcomer", **kwargs))
    assert refused_at_once(port, **kwargs)
    for c in served:
        c.close()


def test_the_descriptor_budget_fits_the_limit_with_every_client_reading_its_history(tmp_path):
    """Clients, the history files kept open and the lazy CH reads' files (at the file store's
    share) never add up past the descriptor limit, however low it is (a limit of 1,024 once gave
    1,024 history files and 16 clients)."""
    import chatserver
    import storage
    for fd_limit in (256, 1024, 4096, 65536, 1 << 20):
        history_files, clients = chatserver.descriptor_budget(fd_limit)
        fs = storage.FileStore(str(tmp_path / str(fd_limit)), history_files)
        try:
            held = fs.history.max_open + storage.READER_FDS * fs.read_slots.limit
            assert held <= history_files and clients + history_files + 64 <= fd_limit, (fd_limit, held, clients)
            assert clients >= fd_limit // 2 - 1 and fs.read_slots.limit >= 4
        finally:
            fs.close()


def test_max_clients(make_server):
    server = make_server("--max-clients", "3", "--max-per-ip", "0", "--connect-rate", "0")
    _check_cap(server.port, 3)


def test_max_per_ip(make_server):
    server = make_server("--max-per-ip", "2")
    _check_cap(server.port, 2)
    held = [accepted_soon(server.port) for _ in range(2)]
    assert refused_at_once(server.port)
    other = client(server.port, source="127.0.0.2")      # another address is not affected
    assert accepted(other)
    for c in held + [other]:
        c.close()


def test_max_per_ip_default_is_50(make_server):
    server = make_server("--connect-rate", "0")   # (50 at once is past the default connect burst)
    held = [client(server.port) for _ in range(50)]
    assert accepted(held[-1])
    assert refused_at_once(server.port)


def test_new_connections_per_address_are_rate_limited_and_others_are_not(make_server):
    """A storm of new connections (handshakes, or reconnects after server_busy) from one address
    is refused past --connect-burst at once and --connect-rate a second after; others connect."""
    server = make_server("--connect-rate", "5", "--connect-burst", "4", "--max-per-ip", "0")
    held = [client(server.port) for _ in range(4)]
    assert all(accepted(c, f"c{i}") for i, c in enumerate(held))
    assert refused_at_once(server.port)                   # the fifth at once
    other = client(server.port, source="127.0.0.2")
    assert accepted(other, "other")
    time.sleep(0.25)                                      # a token again (5 a second)
    again = client(server.port)
    assert accepted(again, "again")
    assert refused_at_once(server.port)
    for c in held + [other, again]:
        c.close()
    log = server.log()
    assert log.count("refusing a connection from 127.0.0.1") == 1   # then counted, once a minute


def test_max_clients_and_max_per_ip_0_turn_them_off(make_server):
    server = make_server("--max-clients", "0", "--max-per-ip", "0", "--connect-rate", "0")
    held = [client(server.port) for _ in range(70)]
    for i, c in enumerate(held):
        assert accepted(c, f"c{i}")


# --- --flood-rate / --flood-burst ----------------------------------------------------------------

def test_flooding_client_is_slowed_not_dropped_and_others_stay_fast(make_server, keys):
    server = make_server("--flood-rate", "20", "--flood-burst", "5")
    flooder, calm = log_in(server.port, keys, ["flooder", "calm"])
    time.sleep(0.4)                                     # both buckets full again (5)
    requests = [{"op": "BM"}, {"op": "CANCEL"}] * 50
    arrivals: list[float] = []
    replies: list[dict] = []

    def read() -> None:
        try:
            while len(replies) < len(requests):
                frame = flooder.recv(timeout=15)
                if frame.kind == "C":
                    replies.append(frame.body)
                    arrivals.append(time.monotonic())
        except (EOFError, TimeoutError, OSError):
            pass

    thread = threading.Thread(target=read, daemon=True)
    started = time.monotonic()
    flooder.send_raw(b"".join(framing.command(r) for r in requests))
    thread.start()
    round_trips = []
    while thread.is_alive() and time.monotonic() - started < 12:
        t0 = time.monotonic()
        assert calm.request({"op": "BM"})["ok"] and calm.request({"op": "CANCEL"})["ok"]
        round_trips.append(time.monotonic() - t0)
        time.sleep(0.25)                                # 8 requests a second: within its own rate
    thread.join(5)
    assert [r["op"] for r in replies] == [r["op"] for r in requests]    # every one answered, in order
    assert all(r["ok"] for r in replies)
    expected = (len(requests) - 5) / 20                # 4.75 s
    took = arrivals[-1] - started
    print(f"\nflood: 100 pipelined requests answered in {took:.2f} s (expected {expected:.2f} s); "
          f"other client's round trips max {max(round_trips) * 1000:.0f} ms")
    assert 0.8 * expected < took < expected + 2.5
    assert arrivals[4] - started < 0.5                 # the burst is answered at once
    assert max(round_trips) < 0.25, round_trips


def test_flood_rate_0_turns_it_off(make_server, keys):
    server = make_server("--flood-rate", "0")
    (c,) = log_in(server.port, keys, ["quick"])
    started = time.monotonic()
    c.send_raw(b"".join(framing.command(r) for r in [{"op": "BM"}, {"op": "CANCEL"}] * 100))
    assert len(read_replies(c, 200)) == 200
    assert time.monotonic() - started < 2


def test_login_deadline_runs_on_while_requests_wait_in_the_flood_penalty(make_server, keys):
    """The login deadline is absolute from the connect: a client that floods before
    logging in cannot stretch it by sitting in the flood penalty (issue 14)."""
    server = make_server("--flood-rate", "2", "--flood-burst", "1", "--login-timeout", "2")
    c = client(server.port)
    started = time.monotonic()
    # Twenty requests at 2 a second would take 10 s; the deadline ends it at 2 s.
    c.send_raw(b"".join(framing.command({"op": "LOGIN", "username": "not valid!"}) for _ in range(20)))
    frames = c.recv_until_closed(timeout=8)
    took = time.monotonic() - started
    answered = [f for f in frames if f.body.get("op") == "LOGIN"]
    assert frames[-1].body == {"op": "BYE", "reason": "idle"}, frames[-3:]
    assert 1.8 < took < 3.5, took
    assert 2 <= len(answered) <= 7, len(answered)


def test_frames_before_login_at_20_a_second_do_not_keep_a_connection_open(make_server):
    server = make_server("--login-timeout", "3")
    c = client(server.port)
    started = time.monotonic()
    closed_at = None
    while time.monotonic() - started < 12:
        try:
            c.send({"op": "PM"})
            c.recv(timeout=0.05)
        except TimeoutError:
            continue
        except (EOFError, OSError):
            closed_at = time.monotonic() - started
            break
    assert closed_at is not None and closed_at < 4.5, closed_at


# --- --register-rate ---------------------------------------------------------------------------------

def _register(port: int, name: str, **kwargs) -> dict:
    c = client(port, **kwargs)
    assert c.login_start(name)["new_user"]
    reply = c.password(PASSWORD)
    c.close()
    return reply


def test_register_rate(make_server, keys):
    server = make_server("--register-rate", "2")
    assert _register(server.port, "first")["ok"]
    assert _register(server.port, "second")["ok"]
    third = client(server.port)
    third.login_start("third")
    assert third.password("short")["error"] == "weak_password"      # checked before the rate
    for _ in range(5):                                            # not an attempt: no three strikes
        reply = third.password(PASSWORD)
        assert reply["ok"] is False and reply["error"] == "rate_limited", reply
        assert "attempts_left" not in reply
    assert third.password("short")["error"] == "weak_password"      # the connection is still open
    # existing users are unaffected, and another address may still register
    again = client(server.port)
    again.login("first", PASSWORD, keys(0))
    assert again.bm("hello")["ok"]
    assert _register(server.port, "elsewhere", source="127.0.0.2")["ok"]
    for name, new_user in (("first", False), ("second", False), ("elsewhere", False), ("third", True)):
        assert client(server.port).login_start(name)["new_user"] is new_user, name   # in either store


def test_register_rate_counts_accounts_being_created(make_server):
    # A real hashing cost keeps the three registrations in flight together.
    server = make_server("--register-rate", "2", scrypt_n=2 ** 15)
    clients = [client(server.port) for _ in range(3)]
    for i, c in enumerate(clients):
        c.login_start(f"racer{i}")
    for c in clients:
        c.send({"op": "PASSWORD", "ciphertext": c.sealed_password(PASSWORD)})
    replies = [c.reply("PASSWORD", timeout=30) for c in clients]
    assert sorted(r.get("error", "ok") for r in replies) == ["ok", "ok", "rate_limited"], replies


def test_register_rate_0_turns_it_off(make_server):
    server = make_server("--register-rate", "0")
    for i in range(4):
        assert _register(server.port, f"free{i}")["ok"]


# --- failed-login delay (--login-delay-cap) ---------------------------------------------------------

def _timed_password(c: WireClient, password: str, timeout: float = 10) -> tuple[dict, float]:
    started = time.monotonic()
    reply = c.password(password, timeout=timeout)
    return reply, time.monotonic() - started


def _attacker(port: int, name: str = "victim") -> WireClient:
    c = client(port)
    assert c.login_start(name)["new_user"] is False
    return c


def test_failed_logins_grow_the_delay_up_to_the_cap_and_success_resets(make_server, keys):
    server = make_server("--login-delay-cap", "2")
    log_in(server.port, keys, ["victim"])[0].exit()
    first = _attacker(server.port)
    delays = []
    for _ in range(3):
        reply, took = _timed_password(first, "wrong password")
        assert reply["error"] == "wrong_password"
        delays.append(took)
    second = _attacker(server.port)     # three strikes per connection; the delay is per account
    reply, took = _timed_password(second, "wrong password")
    assert reply["error"] == "wrong_password"
    delays.append(took)
    print(f"\nfailed-login delays: {', '.join(f'{d:.2f}' for d in delays)} s")
    assert delays[0] < 0.5
    assert 0.8 < delays[1] < 1.6
    assert 1.8 < delays[2] < 2.6
    assert 1.7 < delays[3] < 2.6          # capped at 2 s (uncapped it would be 4 s)
    # the real user waits at most the cap, then a success resets the count
    real = _attacker(server.port)
    reply, took = _timed_password(real, PASSWORD + "victim")
    assert reply["ok"] and took < 2.6
    third = _attacker(server.port)
    reply, took = _timed_password(third, "wrong password")
    assert reply["error"] == "wrong_password" and took < 0.5
    reply, took = _timed_password(third, "wrong password")
    assert reply["error"] == "wrong_password" and 0.8 < took < 1.6     # 1 s again, not 2


def test_attempts_during_the_delay_are_checked_together_and_block_nobody_else(make_server, keys):
    server = make_server()
    victim_client, chatter = log_in(server.port, keys, ["victim", "chatter"])
    victim_client.exit()
    log_in(server.port, keys, ["bystander"], key_index=2)[0].exit()
    first = _attacker(server.port)
    assert first.password("wrong password")["error"] == "wrong_password"
    failed_at = time.monotonic()                        # the next attempt on victim waits 1 s from here
    waiting = [_attacker(server.port) for _ in range(3)]
    real = _attacker(server.port)
    for c in waiting:
        c.send({"op": "PASSWORD", "ciphertext": c.sealed_password("wrong password")})
    real.send({"op": "PASSWORD", "ciphertext": real.sealed_password(PASSWORD + "victim")})
    # meanwhile another account logs in and a logged-in client chats, undelayed
    t0 = time.monotonic()
    other = client(server.port)
    other.login("bystander", PASSWORD + "bystander", keys(2))
    assert chatter.bm("not delayed")["ok"]
    assert time.monotonic() - t0 < 0.5
    answered = []
    for c in waiting + [real]:
        c.reply("PASSWORD", timeout=10)
        answered.append(time.monotonic() - failed_at)
    print(f"\nattempts held during the delay answered at {', '.join(f'{a:.2f}' for a in answered)} s")
    assert all(0.8 < a < 1.7 for a in answered), answered       # together, when the 1 s delay ends
    assert real.key(keys(0))["ok"]


def test_login_deadline_does_not_run_while_an_attempt_waits_out_the_delay(make_server, keys):
    server = make_server("--login-timeout", "1.5")
    log_in(server.port, keys, ["victim"])[0].exit()
    attacker = _attacker(server.port)
    assert attacker.password("wrong password")["error"] == "wrong_password"
    assert attacker.password("wrong password")["error"] == "wrong_password"   # held 1 s; now 2 s
    real = _attacker(server.port)
    reply, took = _timed_password(real, PASSWORD + "victim")
    assert reply["ok"], reply
    assert took > 1.5                       # longer than the login deadline
    assert real.key(keys(0))["ok"]


def test_login_delay_cap_0_turns_it_off(make_server, keys):
    server = make_server("--login-delay-cap", "0")
    log_in(server.port, keys, ["victim"])[0].exit()
    for tries in (3, 2):
        c = _attacker(server.port)
        for _ in range(tries):
            reply, took = _timed_password(c, "wrong password")
            assert reply["error"] == "wrong_password" and took < 0.5
    reply, took = _timed_password(_attacker(server.port), PASSWORD + "victim")
    assert reply["ok"] and took < 0.5


def test_bad_request_attempts_do_not_count_for_the_delay(make_server, keys):
    server = make_server()
    log_in(server.port, keys, ["victim"])[0].exit()
    elsewhere = _attacker(server.port)
    replayed = elsewhere.sealed_password(PASSWORD + "victim")   # sealed with another connection's nonce
    for garbage in (["nonsense;nonsense", replayed, "x"], ["", replayed]):
        c = _attacker(server.port)
        for sealed in garbage:
            started = time.monotonic()
            reply = c.request({"op": "PASSWORD", "ciphertext": sealed})
            assert reply["error"] == "bad_request" and time.monotonic() - started < 0.5
    reply, took = _timed_password(_attacker(server.port), PASSWORD + "victim")
    assert reply["ok"] and took < 0.5


# --- TCP keepalive -----------------------------------------------------------------------------------

@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="needs Linux /proc/net/tcp")
def test_client_sockets_have_tcp_keepalive(make_server):
    """/proc/net/tcp shows the timer of each socket: 2 is the keepalive timer, which an
    idle established socket only has with SO_KEEPALIVE on."""
    server = make_server()
    c = client(server.port)
    c.login_start("kept_alive")
    time.sleep(0.3)
    mine = c.sock.getsockname()[1]
    timers = []
    with open("/proc/net/tcp") as fh:
        for line in list(fh)[1:]:
            fields = line.split()
            local, remote, st, timer = fields[1], fields[2], fields[3], fields[5]
            if local.endswith(f":{server.port:04X}") and remote.endswith(f":{mine:04X}") and st == "01":
                timers.append(timer.split(":")[0])
    assert timers == ["02"], timers
