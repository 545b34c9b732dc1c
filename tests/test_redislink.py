"""Tests for redislink.py against a real redis-server, driven by a real selectors loop.

Pipelining and reply order, errors in order, a Redis killed mid-pipeline, a
Redis stopped (SIGSTOP) long enough to count as stalled, the handshake
(SELECT, a Redis still loading), scripts with the NOSCRIPT fallback, and the
blocking helper. rediss://: the same pipelining over TLS to a real
redis-server's tls-port (a throwaway CA), the blocking helper, AUTH
(``--requirepass``), a client certificate, and the refusals: a wrong CA, the
system CAs, a wrong host name, a plain Redis answering a TLS hello (never
plain in its place).
"""

from __future__ import annotations

import selectors
import socket
import threading
import time

import pytest

import redislink
import resp
from redislink import STALL_SECONDS, BlockingRedis, LinkError, RedisLink, Script, TLSOptions, parse_url
from redisproc import RedisProcess, make_tls_files
from resp import RedisError


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def drive(sel: selectors.BaseSelector, done, timeout: float = 10.0) -> None:
    """Run the loop as the server does until done() is true; fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not done():
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"not done within {timeout} s")
        for key, mask in sel.select(min(left, 0.05)):
            link = key.data
            if mask & selectors.EVENT_WRITE:
                link.on_writable()
            if mask & selectors.EVENT_READ:
                link.on_readable()


@pytest.fixture
def sel():
    selector = selectors.DefaultSelector()
    yield selector
    selector.close()


def new_link(url: str, sel, **kwargs) -> RedisLink:
    return RedisLink(url, selector=sel, **kwargs)


# --- URLs ------------------------------------------------------------------------

def test_parse_url():
    assert parse_url("redis://127.0.0.1:6380") == ("127.0.0.1", 6380, 0, None, None, None)
    assert parse_url("redis://localhost/3") == ("localhost", 6379, 3, None, None, None)
    assert parse_url("redis://:s%40cret@10.0.0.1:7000/2") == ("10.0.0.1", 7000, 2, "s@cret", None, None)
    assert parse_url("redis://chat:pw@h") == ("h", 6379, 0, "pw", "chat", None)
    assert parse_url("redis://[::1]:6379/") == ("::1", 6379, 0, None, None, None)
    for bad in ("http://127.0.0.1", "redis://", "redis://h:port", "redis://h/db", "redis://h/0?ca=/x.pem"):
        with pytest.raises(ValueError):
            parse_url(bad)


def test_parse_rediss_url():
    assert parse_url("rediss://h") == ("h", 6379, 0, None, None, TLSOptions(None, True, None, None))
    assert parse_url("rediss://:pw@h:6380/2?ca=/etc/ca%20file.pem") == (
        "h", 6380, 2, "pw", None, TLSOptions("/etc/ca file.pem", True, None, None))
    assert parse_url("rediss://u:pw@10.0.0.1/?ca=c.pem&check_hostname=no&cert=me.pem&key=me.key").tls == \
        TLSOptions("c.pem", False, "me.pem", "me.key")
    assert parse_url("rediss://h/0?check_hostname=yes").tls == TLSOptions(None, True, None, None)
    for bad in ("rediss://h/0?cafile=x", "rediss://h/0?ca=x&ca=y", "rediss://h/0?ca=", "rediss://h/0?check_hostname=0",
                "rediss://h/0?key=k.pem", "rediss://h/0?verify=none", "rediss://h/0?ca"):
        with pytest.raises(ValueError):
            parse_url(bad)


# --- pipelining ------------------------------------------------------------------

def test_10000_pipelined_commands_get_10000_replies_in_order(redis_server, sel):
    link = new_link(redis_server.url, sel)
    replies: list = []
    for _ in range(10_000):
        link.call(replies.append, "INCR", "counter")
    assert link.pending == 10_001     # and the handshake's PING
    drive(sel, lambda: len(replies) == 10_000)
    assert replies == list(range(1, 10_001))
    assert link.pending == 0 and link.pending_bytes == 0 and link.ready
    assert not link.wants_write()
    link.close()


def test_error_replies_come_back_in_their_place(redis_server, sel):
    link = new_link(redis_server.url, sel)
    replies: list = []
    for command in (("SET", "s", "text"), ("INCR", "s"), ("GET", "s"), ("NOSUCHCOMMAND",),
                    ("HSET", "s", "f", "v"), ("LPUSH", "l", "x"), ("GET", "l"), ("PING",)):
        link.call(replies.append, *command)
    drive(sel, lambda: len(replies) == 8)
    assert replies[0] == b"OK"
    assert replies[2] == b"text"
    assert replies[5] == 1
    assert replies[7] == b"PONG"
    errors = {i: reply.code for i, reply in enumerate(replies) if isinstance(reply, RedisError)}
    assert errors == {1: "ERR", 3: "ERR", 4: "WRONGTYPE", 6: "WRONGTYPE"}
    assert not link.broken
    link.close()


def test_large_values_go_through_the_write_buffer(redis_server, sel):
    link = new_link(redis_server.url, sel)
    big = bytes(range(256)) * 20_000     # 5 MB: many partial sends
    replies: list = []
    link.call(replies.append, "SET", "big", big)
    link.call(replies.append, "GET", "big")
    link.call(replies.append, "STRLEN", "big")
    drive(sel, lambda: len(replies) == 3)
    assert replies == [b"OK", big, len(big)]
    link.close()


def test_select_db_from_the_url(redis_server, sel):
    in_db3 = new_link(redis_server.url + "/3", sel)
    in_db0 = new_link(redis_server.url, sel)
    replies: list = []
    in_db3.call(replies.append, "SET", "where", "three")
    drive(sel, lambda: len(replies) == 1)
    in_db0.call(replies.append, "GET", "where")
    in_db3.call(replies.append, "GET", "where")
    drive(sel, lambda: len(replies) == 3)
    assert replies[1:] == [None, b"three"] or replies[1:] == [b"three", None]   # two links: either first
    in_db3.close()
    in_db0.close()


def test_auth_from_the_url(redis_server, sel):
    with BlockingRedis(redis_server.url) as admin:
        assert admin.call("CONFIG", "SET", "requirepass", "s3cret") == b"OK"
    refused = new_link(redis_server.url, sel)
    good = new_link(redis_server.url.replace("//", "//:s3cret@"), sel)
    replies: list = []
    refused.call(replies.append, "PING")
    good.call(replies.append, "PING")
    drive(sel, lambda: len(replies) == 2)
    assert b"PONG" in replies
    assert refused.broken and "NOAUTH" in refused.error.message
    good.close()


def test_localhost_connects_over_ipv4(redis_server, sel):
    link = new_link(f"redis://localhost:{redis_server.port}", sel)
    drive(sel, lambda: link.ready or link.broken)
    assert link.ready
    link.close()


def test_flush_sends_without_waiting_for_the_selector(redis_server, sel):
    link = new_link(redis_server.url, sel)
    drive(sel, lambda: link.ready)
    replies: list = []
    link.call(replies.append, "PING")
    link.flush()
    assert link.pending_bytes == 0 and not link.wants_write()
    drive(sel, lambda: replies == [b"PONG"])
    link.close()


def test_without_a_selector_the_owner_polls(redis_server):
    sel = selectors.DefaultSelector()
    link = RedisLink(redis_server.url)
    sel.register(link.fileno(), selectors.EVENT_READ | selectors.EVENT_WRITE)
    replies: list = []
    link.call(replies.append, "ECHO", "hi")
    deadline = time.monotonic() + 5
    while not replies and time.monotonic() < deadline:
        for _key, mask in sel.select(0.05):
            if mask & selectors.EVENT_WRITE:
                link.on_writable()
            if mask & selectors.EVENT_READ:
                link.on_readable()
        sel.modify(link.fileno(), selectors.EVENT_READ | (selectors.EVENT_WRITE if link.wants_write() else 0))
    assert replies == [b"hi"]
    sel.unregister(link.fileno())
    link.close()
    sel.close()


# --- failures ----------------------------------------------------------------------

def test_redis_killed_mid_pipeline_fails_the_pending_callbacks(redis_server, sel):
    downs: list = []
    link = new_link(redis_server.url, sel, on_down=lambda lnk, err: downs.append(err))
    replies: list = []
    for _ in range(1000):
        link.call(replies.append, "INCR", "n")
    drive(sel, lambda: len(replies) == 1000)
    redis_server.pause()          # the next commands are sent, never answered
    for _ in range(1000):
        link.call(replies.append, "INCR", "n")
    drive(sel, lambda: not link.wants_write())
    redis_server.kill()
    drive(sel, lambda: len(replies) == 2000)
    assert replies[:1000] == list(range(1, 1001))
    failures = replies[1000:]
    assert all(type(reply) is LinkError and reply.sent for reply in failures)
    assert failures[0].code == "LINK"
    assert link.broken and not link.ready
    assert len(downs) == 1 and downs[0] is link.error
    # a call on a broken link is answered at once: not sent
    late: list = []
    link.call(late.append, "PING")
    assert len(late) == 1 and type(late[0]) is LinkError and not late[0].sent


def test_redis_killed_while_replies_stream_in(redis_server, sel):
    link = new_link(redis_server.url, sel)
    replies: list = []
    total = 200_000
    for _ in range(total):
        link.call(replies.append, "INCR", "n")
    drive(sel, lambda: len(replies) > 0)
    redis_server.kill()
    drive(sel, lambda: len(replies) == total)
    answered = [reply for reply in replies if not isinstance(reply, RedisError)]
    assert answered == list(range(1, len(answered) + 1))          # a prefix, in order
    assert len(answered) < total
    assert all(type(reply) is LinkError for reply in replies[len(answered):])
    assert link.broken


def test_sigstop_for_2_5_s_makes_the_oldest_command_stalled(redis_server, sel):
    link = new_link(redis_server.url, sel)
    drive(sel, lambda: link.ready)
    replies: list = []
    redis_server.pause()
    try:
        link.call(replies.append, "PING")
        assert link.oldest_pending_age() < 0.5
        started = time.monotonic()
        drive(sel, lambda: time.monotonic() - started >= 2.5, timeout=5)
        assert replies == []
        assert link.oldest_pending_age() > STALL_SECONDS
        assert link.stalled()
    finally:
        redis_server.resume()
    drive(sel, lambda: replies == [b"PONG"])
    assert link.oldest_pending_age() == 0.0 and not link.stalled()
    link.close()


def test_stall_age_counts_from_the_last_byte_and_allows_for_blocking_commands(redis_server, sel):
    now = [1000.0]
    link = new_link(redis_server.url, sel, clock=lambda: now[0])
    drive(sel, lambda: link.ready)
    assert link.oldest_pending_age() == 0.0
    now[0] += 60                       # idle for a minute: nothing pending, nothing stalled
    link.call(lambda reply: None, "XREAD", "BLOCK", "100000", "STREAMS", "nothing", "$", blocks_for=100.0)
    link.call(lambda reply: None, "PING")
    now[0] += 99
    assert link.oldest_pending_age() == 0.0
    now[0] += 3
    assert link.oldest_pending_age() == pytest.approx(2.0)
    link.close()


def test_connection_refused_fails_the_link_with_nothing_sent(sel):
    downs: list = []
    link = new_link(f"redis://127.0.0.1:{free_port()}", sel, on_down=lambda lnk, err: downs.append(err))
    replies: list = []
    link.call(replies.append, "PING")
    drive(sel, lambda: link.broken)
    assert len(replies) == 1 and type(replies[0]) is LinkError and not replies[0].sent
    assert "cannot connect" in replies[0].message
    assert downs == [link.error]


def fake_redis(answer: bytes) -> tuple[int, threading.Thread, list]:
    """A one-connection server that answers anything with ``answer``; returns (port, thread, what it read)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    received: list = []

    def serve() -> None:
        conn, _ = listener.accept()
        with conn, listener:
            conn.settimeout(5)
            try:
                received.append(conn.recv(65536))
                conn.sendall(answer)
                while conn.recv(65536):
                    pass
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener.getsockname()[1], thread, received


def test_a_loading_redis_fails_the_handshake_before_any_command_is_sent(sel):
    port, thread, received = fake_redis(b"-LOADING Redis is loading the dataset in memory\r\n")
    link = new_link(f"redis://127.0.0.1:{port}", sel)
    replies: list = []
    link.call(replies.append, "SET", "k", "v")
    drive(sel, lambda: link.broken)
    assert "LOADING" in link.error.message
    assert len(replies) == 1 and type(replies[0]) is LinkError and not replies[0].sent
    thread.join(5)
    assert received == [resp.encode_command("PING")]     # the SET never left


def test_a_protocol_error_breaks_the_link(sel):
    port, thread, _ = fake_redis(b"+PONG\r\n:1\r\n?garbage\r\n")
    link = new_link(f"redis://127.0.0.1:{port}", sel)
    replies: list = []
    link.call(replies.append, "INCR", "a")
    link.call(replies.append, "INCR", "b")
    drive(sel, lambda: link.broken)
    assert replies[0] == 1
    assert type(replies[1]) is LinkError and "protocol error" in replies[1].message
    thread.join(5)


def test_close_fails_what_is_pending(redis_server, sel):
    link = new_link(redis_server.url, sel)
    replies: list = []
    link.call(replies.append, "PING")
    link.close()
    assert len(replies) == 1 and type(replies[0]) is LinkError and not replies[0].sent
    assert link.broken
    assert sel.get_map() == {}
    link.close()    # twice is fine


def test_a_raising_callback_does_not_lose_the_other_replies(redis_server, sel):
    link = new_link(redis_server.url, sel)
    replies: list = []

    def boom(reply) -> None:
        raise ValueError("callback bug")

    link.call(replies.append, "ECHO", "1")
    link.call(boom, "ECHO", "2")
    link.call(replies.append, "ECHO", "3")
    with pytest.raises(ValueError, match="callback bug"):
        drive(sel, lambda: len(replies) == 2)
    drive(sel, lambda: len(replies) == 2)
    assert replies == [b"1", b"3"]
    assert not link.broken
    link.close()


def test_callbacks_may_queue_more_commands(redis_server, sel):
    link = new_link(redis_server.url, sel)
    replies: list = []

    def chain(reply) -> None:
        replies.append(reply)
        if reply < 5:
            link.call(chain, "INCR", "c")

    link.call(chain, "INCR", "c")
    drive(sel, lambda: len(replies) == 5)
    assert replies == [1, 2, 3, 4, 5]
    link.close()


# --- scripts -------------------------------------------------------------------------

ADD = Script("add", "KEYS[1] += ARGV[1]", "return redis.call('INCRBY', KEYS[1], ARGV[1])")


def test_eval_loads_the_script_ahead_of_its_first_use(redis_server, sel):
    link = new_link(redis_server.url, sel)
    replies: list = []
    for n in (1, 2, 3):
        link.eval(replies.append, ADD, ["sum"], [n])
    drive(sel, lambda: len(replies) == 3)
    assert replies == [1, 3, 6]
    with BlockingRedis(redis_server.url) as other:
        assert other.call("SCRIPT", "EXISTS", ADD.sha) == [1]
    link.close()


def test_noscript_falls_back_to_eval(redis_server, sel):
    link = new_link(redis_server.url, sel)
    replies: list = []
    link.eval(replies.append, ADD, ["sum"], [10])
    drive(sel, lambda: len(replies) == 1)
    with BlockingRedis(redis_server.url) as other:
        assert other.call("SCRIPT", "FLUSH") == b"OK"
    link.eval(replies.append, ADD, ["sum"], [5])      # EVALSHA -> NOSCRIPT -> EVAL
    drive(sel, lambda: len(replies) == 2)
    assert replies == [10, 15]
    link.eval(replies.append, ADD, ["sum"], [1])      # loaded again first
    drive(sel, lambda: len(replies) == 3)
    assert replies[2] == 16
    link.close()


def test_scripts_loaded_in_the_handshake(redis_server, sel):
    link = new_link(redis_server.url, sel, scripts=[ADD])
    replies: list = []
    link.eval(replies.append, ADD, ["x"], [7])
    drive(sel, lambda: len(replies) == 1)
    assert replies == [7]
    link.close()


def test_a_script_error_is_a_reply(redis_server, sel):
    broken = Script("broken", "does not compile", "return +")
    failing = Script("failing", "fails when run", "return redis.call('INCR', KEYS[1])")
    link = new_link(redis_server.url, sel)
    replies: list = []
    link.call(replies.append, "SET", "s", "text")
    link.eval(replies.append, broken)
    link.eval(replies.append, failing, ["s"])
    link.call(replies.append, "PING")
    drive(sel, lambda: len(replies) == 4)
    assert replies[0] == b"OK" and replies[3] == b"PONG"
    assert isinstance(replies[1], RedisError) and "compil" in replies[1].message.lower()
    assert isinstance(replies[2], RedisError)
    assert not link.broken
    link.close()


# --- the blocking helper -------------------------------------------------------------------

def test_blocking_helper(redis_server):
    with BlockingRedis(redis_server.url) as r:
        assert r.call("SET", "a", "1") == b"OK"
        assert r.pipeline([("INCR", "a"), ("INCR", "a"), ("GET", "a")]) == [2, 3, b"3"]
        assert r.call("HSET", "a", "f", "v").code == "WRONGTYPE"
        assert r.eval(ADD, ["b"], [4]) == 4


def test_blocking_helper_times_out(redis_server):
    with BlockingRedis(redis_server.url, timeout=0.3) as r:
        assert r.call("PING") == b"PONG"
        redis_server.pause()
        try:
            with pytest.raises(TimeoutError):
                r.call("PING")
        finally:
            redis_server.resume()
        assert r.link.broken


def test_redisproc_restart_keeps_acknowledged_writes(redis_server):
    with BlockingRedis(redis_server.url) as r:
        assert r.call("SET", "kept", "yes") == b"OK"
    redis_server.kill()
    redis_server.restart()
    with BlockingRedis(redis_server.url) as r:
        assert r.call("GET", "kept") == b"yes"


def test_two_servers_on_different_ports(make_redis):
    one, two = make_redis("one"), make_redis("two")
    assert one.port != two.port
    with BlockingRedis(one.url) as a, BlockingRedis(two.url) as b:
        a.call("SET", "k", "1")
        assert b.call("GET", "k") is None


# --- rediss:// (TLS) ----------------------------------------------------------------------

def test_rediss_link_pipelines_commands_and_gets_replies_in_a_selectors_loop(tls_redis, sel):
    url = tls_redis.rediss_url(db=2)
    link = new_link(url, sel)
    other = new_link(url, sel)
    assert link.tls and not link.ready
    replies: list = []
    for _ in range(10_000):
        link.call(replies.append, "INCR", "counter")
    big = bytes(range(256)) * 20_000     # 5 MB: many records, many partial sends
    link.call(replies.append, "SET", "big", big)
    link.call(replies.append, "GET", "big")
    other_replies: list = []
    other.call(other_replies.append, "PING")
    # while the TLS handshake runs, the link asks for EVENT_WRITE only for handshake bytes (no busy loop)
    writable = 0
    deadline = time.monotonic() + 10
    while not link.ready:
        assert time.monotonic() < deadline and not link.broken
        for key, mask in sel.select(0.05):
            if mask & selectors.EVENT_WRITE:
                writable += key.data is link
                key.data.on_writable()
            if mask & selectors.EVENT_READ:
                key.data.on_readable()
    assert writable <= 3, writable
    drive(sel, lambda: len(replies) == 10_002 and len(other_replies) == 1)
    assert replies[:10_000] == list(range(1, 10_001))
    assert replies[10_000:] == [b"OK", big]
    assert other_replies == [b"PONG"]
    assert link.ready and link.pending == 0 and link.pending_bytes == 0 and not link.wants_write()
    with BlockingRedis(tls_redis.url + "/2") as plain:       # the same data, read over the plain port
        assert plain.call("GET", "counter") == b"10000"
    # the scripts and the NOSCRIPT fallback work over TLS too
    link.eval(replies.append, ADD, ["sum"], [2])
    link.call(replies.append, "SCRIPT", "FLUSH")
    link.eval(replies.append, ADD, ["sum"], [3])
    drive(sel, lambda: len(replies) == 10_005)
    assert replies[10_002:] == [2, b"OK", 5]
    link.close()
    other.close()
    assert sel.get_map() == {}


def test_rediss_killed_mid_pipeline_fails_the_pending_callbacks(tls_redis, sel):
    downs: list = []
    link = new_link(tls_redis.rediss_url(), sel, on_down=lambda lnk, err: downs.append(err))
    replies: list = []
    for _ in range(100):
        link.call(replies.append, "INCR", "n")
    drive(sel, lambda: len(replies) == 100)
    tls_redis.pause()
    for _ in range(100):
        link.call(replies.append, "INCR", "n")
    drive(sel, lambda: not link.wants_write())
    tls_redis.kill()
    drive(sel, lambda: len(replies) == 200)
    assert replies[:100] == list(range(1, 101))
    assert all(type(reply) is LinkError and reply.sent for reply in replies[100:])
    assert len(downs) == 1 and link.broken


def test_rediss_blocking_helper(tls_redis):
    with BlockingRedis(tls_redis.rediss_url()) as r:
        assert r.link.tls
        assert r.call("SET", "a", "1") == b"OK"
        assert r.pipeline([("INCR", "a"), ("INCR", "a"), ("GET", "a")]) == [2, 3, b"3"]
        assert r.eval(ADD, ["b"], [4]) == 4
    with BlockingRedis(tls_redis.rediss_url(host="localhost", db=0)) as r:   # the certificate names localhost too
        assert r.call("GET", "a") == b"3"


def test_rediss_auth_over_tls(tmp_path, tls_files, sel):
    proc = RedisProcess(str(tmp_path / "auth"), tls=tls_files, password="s3cr@t pw").start()
    try:
        with BlockingRedis(proc.rediss_url(password="s3cr@t pw", db=1)) as r:
            assert r.call("SET", "k", "v") == b"OK"
            assert r.call("ACL", "WHOAMI") == b"default"
        user_url = proc.rediss_url(db=1).replace("rediss://", "rediss://default:s3cr%40t%20pw@")
        with BlockingRedis(user_url) as r:                 # user:password -> AUTH user password
            assert r.call("GET", "k") == b"v"
        wrong = new_link(proc.rediss_url(password="nope"), sel)
        none = new_link(proc.rediss_url(), sel)
        wrong_replies: list = []   # one list per link: the two answer in either order
        none_replies: list = []
        wrong.call(wrong_replies.append, "GET", "k")
        none.call(none_replies.append, "GET", "k")
        drive(sel, lambda: wrong.broken and wrong_replies and none_replies)
        assert "refused AUTH" in wrong.error.message and "WRONGPASS" in wrong.error.message
        [held] = wrong_replies
        assert type(held) is LinkError and not held.sent     # held behind the handshake
        [refused] = none_replies
        assert refused != b"v" and isinstance(refused, RedisError) and "NOAUTH" in refused.message
    finally:
        proc.kill()


def test_rediss_with_the_wrong_ca_is_refused_before_anything_is_sent(tls_redis, tmp_path, sel):
    def refused(url: str) -> None:
        downs: list = []
        link = new_link(url, sel, on_down=lambda lnk, err: downs.append(err))
        replies: list = []
        link.call(replies.append, "SET", "k", "v")
        drive(sel, lambda: link.broken)
        assert link.error.code == "LINK"
        assert "refused the server's certificate" in link.error.message, link.error.message
        assert "certificate" in link.error.message.split("certificate:", 1)[1]     # OpenSSL's reason
        assert downs == [link.error]
        assert len(replies) == 1 and type(replies[0]) is LinkError and not replies[0].sent

    stranger = make_tls_files(str(tmp_path / "stranger"), "stranger")
    refused(tls_redis.rediss_url(ca=stranger.ca, password="secret"))    # another CA (AUTH never sent)
    refused(tls_redis.rediss_url().split("?")[0])                       # the system's CAs
    with BlockingRedis(tls_redis.rediss_url(ca=stranger.ca)) as r:
        reply = r.call("PING")
        assert type(reply) is LinkError and "certificate" in reply.message
    with BlockingRedis(tls_redis.url) as plain:
        assert plain.call("EXISTS", "k") == 0        # the SET never ran


def test_rediss_checks_the_host_name_unless_told_not_to(tmp_path, sel):
    files = make_tls_files(str(tmp_path / "elsewhere"), "elsewhere", names="DNS:redis.elsewhere.example")
    proc = RedisProcess(str(tmp_path / "r"), tls=files).start()
    try:
        link = new_link(proc.rediss_url(), sel)
        drive(sel, lambda: link.broken)
        assert "refused the server's certificate" in link.error.message
        assert "mismatch" in link.error.message and "for host 127.0.0.1" in link.error.message, link.error.message
        with BlockingRedis(proc.rediss_url(check_hostname="no")) as r:   # the chain is still verified
            assert r.call("PING") == b"PONG"
        with BlockingRedis(proc.rediss_url(check_hostname="no", ca=make_tls_files(
                str(tmp_path / "other"), "other").ca)) as r:
            assert "refused the server's certificate" in r.call("PING").message
    finally:
        proc.kill()


def test_rediss_client_certificate(tmp_path, tls_files, sel):
    proc = RedisProcess(str(tmp_path / "mtls"), tls=tls_files, tls_auth_clients="yes").start()
    try:
        with BlockingRedis(proc.rediss_url(cert=tls_files.cert, key=tls_files.key)) as r:
            assert r.call("PING") == b"PONG"
        link = new_link(proc.rediss_url(), sel)   # no certificate: Redis ends the handshake
        replies: list = []
        link.call(replies.append, "PING")
        drive(sel, lambda: link.broken)
        assert type(replies[0]) is LinkError and link.error.message.startswith("LINK TLS"), link.error.message
    finally:
        proc.kill()


def test_rediss_never_falls_back_to_plain(redis_server, sel):
    # a plain server answering the TLS hello in RESP: a TLS error, not its +PONG
    port, thread, received = fake_redis(b"+PONG\r\n")
    link = new_link(f"rediss://127.0.0.1:{port}/", sel)
    replies: list = []
    link.call(replies.append, "PING")
    drive(sel, lambda: link.broken)
    assert "TLS handshake" in link.error.message, link.error.message
    assert type(replies[0]) is LinkError and not replies[0].sent
    thread.join(5)
    assert received and received[0][:1] == b"\x16"     # what left was a TLS hello, no command
    # a real Redis's plain port waits for a line that never comes: the handshake stalls, it never goes plain
    stalled = new_link(f"rediss://127.0.0.1:{redis_server.port}/", sel)
    stalled.call(replies.append, "PING")
    started = time.monotonic()
    drive(sel, lambda: time.monotonic() - started >= STALL_SECONDS + 0.3, timeout=5)
    assert stalled.stalled() and not stalled.ready and len(replies) == 1
    stalled.close()
    assert type(replies[1]) is LinkError and not replies[1].sent
    with BlockingRedis(f"rediss://127.0.0.1:{redis_server.port}/", timeout=0.5) as r:
        with pytest.raises(TimeoutError, match="TLS handshake did not finish"):
            r.call("PING")


def test_messages_never_show_the_password():
    assert redislink.redact("redis://:s3cret@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    assert redislink.redact("rediss://bob:pw@localhost/1?ca=/x") == "rediss://bob:***@localhost/1?ca=/x"
    assert redislink.redact("redis://127.0.0.1:6379") == "redis://127.0.0.1:6379"
    link = redislink.RedisLink("redis://:s3cret@127.0.0.1:1/0")   # nothing listens on port 1
    assert "s3cret" not in link.shown
