"""Coming back after a lost connection, through a real pty (docs/PROTOCOL.md section 11).

The terminal client reaches the server through ``Relay``, a loopback TCP relay
the test controls: it refuses new connections while the test makes things
happen that the client must catch up on, and can be pointed at another node.
A server restart (BYE shutdown), a node killed in Redis mode (the connection
just drops), a takeover (BYE replaced: no reconnect), Ctrl-C while waiting,
and a message that was on its way when the connection went.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import socket
import threading

import pytest

from clientstore import ClientStore, server_address
from pg3lib import PublicKey
from protocol import parse_timestamp, timestamp
from redis_scripts import ChatKeys
from redislink import BlockingRedis
from redisproc import flushall
from serverproc import ServerProcess
import test_client_e2e as e2e
from test_client_e2e import CLOCK, PASSWORD, PtyClient
from wire import WireClient

home, ptys = e2e.home, e2e.ptys   # the pty tests' fixtures: a configuration directory, a logged-in client

BACK_WITHIN = 20.0   # the client's waits between attempts grow to 4 s by the fourth


class Relay:
    """127.0.0.1:port -> 127.0.0.1:upstream, byte for byte (TLS passes through untouched)."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.refusing = False      # accept and close at once (the client sees the connection drop)
        self.dropping = False      # read what the server sends and drop it (lost on the way)
        self.accepted = 0          # connections relayed so far
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._cut = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def cut(self) -> None:
        """Close every relayed connection (both ends), as a network failure would."""
        self._cut.set()

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ, None)
        pairs: dict[socket.socket, socket.socket] = {}
        upstreams: set[socket.socket] = set()

        def close(sock: socket.socket) -> None:
            other = pairs.pop(sock, None)
            for s in (sock, other):
                if s is not None:
                    pairs.pop(s, None)
                    upstreams.discard(s)
                    try:
                        sel.unregister(s)
                    except (KeyError, ValueError):
                        pass
                    s.close()

        while not self._stop.is_set():
            if self._cut.is_set():
                self._cut.clear()
                for sock in list(pairs):
                    close(sock)
            for key, _ in sel.select(0.05):
                if key.data is None:
                    conn, _ = self.listener.accept()
                    if self.refusing:
                        conn.close()
                        continue
                    try:
                        up = socket.create_connection(("127.0.0.1", self.upstream), timeout=2)
                    except OSError:
                        conn.close()
                        continue
                    self.accepted += 1
                    pairs[conn], pairs[up] = up, conn
                    upstreams.add(up)
                    sel.register(conn, selectors.EVENT_READ, "pipe")
                    sel.register(up, selectors.EVENT_READ, "pipe")
                    continue
                sock = key.fileobj
                if sock not in pairs:
                    continue
                try:
                    data = sock.recv(65536)
                    if data:
                        if not (self.dropping and sock in upstreams):
                            pairs[sock].sendall(data)
                        continue
                except OSError:
                    pass
                close(sock)
        for sock in list(pairs):
            close(sock)
        sel.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.listener.close()


@pytest.fixture
def relays():
    made: list[Relay] = []

    def make(upstream: int) -> Relay:
        made.append(Relay(upstream))
        return made[-1]

    yield make
    for relay in made:
        relay.close()


def wire(port: int, name: str, key_pair) -> WireClient:
    client = WireClient(port)
    client.login(name, PASSWORD, key_pair)
    return client


def offline_pm(sender: WireClient, target: str, text: str) -> dict:
    """A PM stored for an offline target (TARGET with "offline": true)."""
    assert sender.request({"op": "PM"})["ok"]
    reply = sender.request({"op": "TARGET", "username": target, "offline": True})
    assert reply["ok"] and reply["online"] is False, reply
    body = sender.pm_send(reply["username"], PublicKey.from_key_form(reply["public_key"]), text)
    reply = sender.request(body)
    assert reply["ok"], reply
    return reply


def rows_matching(client: PtyClient, pattern: str) -> list[int]:
    return [i for i, row in enumerate(client.rows()) if re.fullmatch(pattern, row)]


def test_a_server_restart_is_reconnected_and_what_was_missed_is_shown_once(server, keys, home, ptys, relays):
    relay = relays(server.port)
    alice = ptys(relay.port, "alice", home("alice"), keys(0))
    bob = wire(server.port, "bob", keys(1))
    alice.wait_for("* bob is online")
    bob.bm("before")
    alice.wait_line(CLOCK + " bob: before")
    alice.type("BM half typed")
    alice.wait_prompt("alice> BM half typed")

    relay.refusing = True
    server.stop()      # SIGTERM: BYE shutdown to everyone
    alice.wait_for("the server is shutting down")
    alice.wait_for("trying again in")
    server.restart()   # the same port and data directory
    bob = wire(server.port, "bob", keys(1))
    bob.bm("missed one")
    bob.bm("missed two")
    offline_pm(bob, "alice", "psst, while you were out")
    relay.refusing = False

    alice.wait_for("reconnected as alice", timeout=BACK_WITHIN)
    alice.wait_line(CLOCK + " bob: missed two")
    alice.wait_for("bob -> you (private): psst, while you were out")
    alice.wait_prompt("alice> BM half typed")       # the half-typed line is still there
    text = alice.text()
    assert "the server is shutting down" in text and "while you were away:" in text
    assert len(rows_matching(alice, CLOCK + " bob: before")) == 1          # not shown again
    one, two = (rows_matching(alice, CLOCK + f" bob: missed {n}") for n in ("one", "two"))
    assert len(one) == len(two) == 1 and one[0] < two[0]                   # once each, in order
    assert text.count("psst, while you were out") == 1
    assert len(rows_matching(alice, "choose a password:")) == 1 and "password for alice" not in text  # not again

    alice.type("\r")                                 # Enter sends the kept line on the new connection
    assert bob.wait_data("BM", text="half typed")["from"] == "alice"
    alice.type("EX\r")
    assert alice.wait_exit() == 0


def test_a_dropped_connection_puts_an_unconfirmed_message_back_in_the_line(server, keys, home, ptys, relays):
    relay = relays(server.port)
    alice = ptys(relay.port, "alice", home("alice"), keys(0))
    bob = wire(server.port, "bob", keys(1))
    alice.wait_for("* bob is online")
    server.signal(signal.SIGSTOP)   # the server holds the BM: no SEND reply comes
    try:
        alice.type("BM are you there?\r")
        alice.wait_for("alice> BM are you there?")
        relay.refusing = True
        relay.cut()
        alice.wait_for("not confirmed by the server before the connection dropped")
    finally:
        server.signal(signal.SIGCONT)
    relay.refusing = False
    alice.wait_for("reconnected as alice", timeout=BACK_WITHIN)
    alice.wait_prompt("alice> BM are you there?")   # back in the line, to send again or drop
    bob.close()


def test_a_pm_lost_on_the_way_is_found_in_history_after_reconnecting(server, keys, home, ptys, relays):
    relay = relays(server.port)
    alice = ptys(relay.port, "alice", home("alice"), keys(0))
    bob, carol = wire(server.port, "bob", keys(1)), wire(server.port, "carol", keys(2))
    alice.wait_for("* carol is online")
    assert bob.pm_checked("alice", "first, pins my key")[1]["ok"]
    alice.wait_for("bob -> you (private): first, pins my key")
    relay.dropping = True              # the server delivers these; the client never gets them
    for text in ("lost on the way", "and another"):
        assert bob.pm_checked("alice", text)[1]["ok"]
    assert carol.pm_checked("alice", "from an unknown key")[1]["ok"]
    relay.refusing = True
    relay.cut()
    alice.wait_for("trying again in")
    relay.dropping = relay.refusing = False

    alice.wait_for("reconnected as alice", timeout=BACK_WITHIN)
    kept = r"  \(sent while you were away, \d{4}-\d\d-\d\d \d\d:\d\d\)"   # as a PM kept for us says it
    first, second = (alice.wait_line(CLOCK + rf" bob -> you \(private\): {text}{kept}")
                     for text in ("lost on the way", "and another"))
    assert first < second
    # carol's key was never seen here: the entry cannot be checked (section 4.6), and says so
    alice.wait_for("[UNVERIFIED: no key of carol known here to check it]")
    text = alice.text()
    assert text.count("lost on the way") == text.count("and another") == text.count("from an unknown key") == 1
    alice.type("EX\r")
    assert alice.wait_exit() == 0


def test_replaced_does_not_reconnect(server, keys, home, ptys):
    alice = ptys(server.port, "alice", home("alice"), keys(0))
    wire(server.port, "alice", keys(0))   # the same account logs in elsewhere
    assert alice.wait_exit() == 1
    text = alice.text()
    assert "you logged in somewhere else" in text and "reconnect" not in text


def test_the_status_line_says_why_a_reconnect_failed(server, keys, home, ptys):
    alice = ptys(server.port, "alice", home("alice"), keys(0))
    server.stop()      # nothing listens on the port until the restart
    alice.wait_for("the server is shutting down")
    alice.wait_for("not connected (connection refused); trying again in")
    alice.wait_for("trying again in 4 s (4/10", timeout=BACK_WITHIN)   # and it counts down
    alice.wait_for("trying again in 3 s (4/10", timeout=3)
    alice.wait_for("trying again in 2 s (4/10", timeout=3)
    server.restart()
    alice.wait_for("reconnected as alice", timeout=BACK_WITHIN)


def test_what_is_typed_while_reconnecting_is_shown_and_kept(server, keys, home, ptys, relays):
    relay = relays(server.port)
    alice = ptys(relay.port, "alice", home("alice"), keys(0))
    bob = wire(server.port, "bob", keys(1))
    alice.wait_for("* bob is online")
    relay.refusing = True
    relay.cut()
    alice.wait_for("trying again in")
    alice.type("BM typed while away")
    alice.wait_until(lambda: re.fullmatch(r"\[(not connected; trying again in [\d.]+ s|reconnecting)\] "
                                          r"BM typed while away", alice.cursor_row()), "the line typed, shown")
    alice.type("\r")                  # not queued for later: it stays, and the screen says so
    alice.wait_for("not connected yet: the line stays; Enter sends it once reconnected")
    alice.wait_until(lambda: alice.cursor_row().endswith("] BM typed while away"), "the line still there")
    relay.refusing = False
    alice.wait_for("reconnected as alice", timeout=BACK_WITHIN)
    alice.wait_prompt("alice> BM typed while away")
    alice.type("\r")
    assert bob.wait_data("BM", text="typed while away")["from"] == "alice"


def test_ctrl_c_stops_reconnecting(server, keys, home, ptys, relays):
    relay = relays(server.port)
    alice = ptys(relay.port, "alice", home("alice"), keys(0))
    relay.refusing = True
    relay.cut()
    alice.wait_for("trying again in")
    accepted = relay.accepted
    alice.type("half typed")
    alice.wait_until(lambda: alice.cursor_row().endswith("] half typed"), "the line typed while away")
    alice.type(b"\x03")   # drops the half-typed line only, as everywhere
    alice.wait_until(lambda: "half typed" not in alice.cursor_row()
                     and re.search(r"trying again in|reconnecting", alice.cursor_row()),
                     "the line dropped, still reconnecting")
    assert alice.proc.poll() is None
    alice.type(b"\x03")   # on an empty line: stops
    assert alice.wait_exit() == 1
    assert "stopped reconnecting" in alice.text() and relay.accepted == accepted


@pytest.fixture
def nodes(redis_server, tmp_path):
    """nodes(n) -> n chatserver.py nodes on one emptied Redis, with the room's key file."""
    started: list[ServerProcess] = []

    def make(count: int) -> list[ServerProcess]:
        flushall(redis_server.port)
        key_file = str(tmp_path / "room_server_key.pem")
        for i in range(count):
            data = tmp_path / f"node{i}"
            data.mkdir()
            started.append(ServerProcess(str(data), "--redis", redis_server.url + "/0", "--server-key", key_file)
                           .start())
        return started

    yield make
    for node in started:
        node.kill()


def test_a_killed_node_is_reconnected_through_another_and_the_room_caught_up(nodes, keys, home, ptys, relays):
    a, b = nodes(2)
    relay = relays(a.port)               # as a load balancer in front of the nodes would
    alice = ptys(relay.port, "alice", home("alice"), keys(0))
    bob = wire(b.port, "bob", keys(1))
    alice.wait_for("* bob is online")
    bob.bm("before")
    alice.wait_line(CLOCK + " bob: before")

    relay.refusing = True
    relay.upstream = b.port
    a.kill()                             # SIGKILL: no BYE, the connection just ends
    alice.wait_for("trying again in")
    bob.bm("missed on node B")
    relay.refusing = False

    alice.wait_for("reconnected as alice", timeout=BACK_WITHIN)
    alice.wait_line(CLOCK + " bob: missed on node B")
    assert len(rows_matching(alice, CLOCK + " bob: before")) == 1
    bob.bm("live again")
    alice.wait_line(CLOCK + " bob: live again")
    alice.type("EX\r")
    assert alice.wait_exit() == 0
    assert os.path.exists(a.data_dir)


def test_a_bm_stored_out_of_ts_order_while_away_is_caught_up(nodes, redis_server, keys, home, ptys, relays):
    """Each node stamps BMs by its own clock: a BM from a node whose clock is a little behind can be
    stored after the newest one the client has shown, with an earlier ts (section 11.2)."""
    a, b = nodes(2)
    relay = relays(a.port)
    alice = ptys(relay.port, "alice", home("alice"), keys(0))
    bob = wire(b.port, "bob", keys(1))
    alice.wait_for("* bob is online")
    last = bob.bm("the newest one seen")["ts"]
    alice.wait_line(CLOCK + " bob: the newest one seen")

    relay.refusing = True
    relay.cut()
    alice.wait_for("trying again in")
    behind = timestamp(parse_timestamp(last) - 3)
    line = json.dumps({"ts": behind, "type": "BM", "from": "bob", "to": "*", "text": "from a clock 3 s behind"},
                      separators=(",", ":"))
    with BlockingRedis(redis_server.url) as redis:   # as that node's BM script would store it
        redis.call("XADD", ChatKeys().room, "*", "e", line)
    relay.refusing = False

    alice.wait_for("reconnected as alice", timeout=BACK_WITHIN)
    alice.wait_line(CLOCK + " bob: from a clock 3 s behind")
    assert len(rows_matching(alice, CLOCK + " bob: the newest one seen")) == 1   # the repeat is dropped
    alice.type("EX\r")
    assert alice.wait_exit() == 0


def refusing_port() -> socket.socket:
    """A loopback port bound but not listening: a connect there is refused (close it after)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


def test_a_client_given_the_rooms_other_node_moves_there_when_its_node_dies(nodes, keys, home, ptys):
    a, b = nodes(2)
    alice = ptys(a.port, "alice", home("alice"), keys(0), "--fallback", f"127.0.0.1:{b.port}")
    bob = wire(b.port, "bob", keys(1))
    alice.wait_for("* bob is online")

    a.kill()                             # SIGKILL: its port refuses from now on
    bob.bm("missed while alice moved")
    alice.wait_for(f"reconnected as alice at 127.0.0.1:{b.port}", timeout=BACK_WITHIN)
    alice.wait_line(CLOCK + " bob: missed while alice moved")
    assert f"first connection to 127.0.0.1:{b.port}: the room's key, as at 127.0.0.1:{a.port}" in alice.text()
    bob.bm("live on node B")
    alice.wait_line(CLOCK + " bob: live on node B")
    alice.type("BM from node B\r")
    bob.wait_data("BM", text="from node B")
    alice.type("EX\r")
    assert alice.wait_exit() == 0


def test_a_fallback_with_another_key_is_refused_before_anything_is_sent(server, keys, home, ptys, tmp_path):
    other = ServerProcess(str(tmp_path / "other_room")).start()   # its own data directory: its own key
    try:
        alice = ptys(server.port, "alice", home("alice"), keys(0), "--fallback", f"127.0.0.1:{other.port}")
        server.stop()
        assert alice.wait_exit(timeout=BACK_WITHIN) == 3
        assert f"127.0.0.1:{other.port} presents the key" in alice.text()
        assert "not a node of it" in alice.text()
        assert f":{other.port} " not in (home("alice") / "chatroom" / "known_servers").read_text()
    finally:
        other.kill()


def test_the_client_starts_at_the_first_address_that_answers(server, keys, home):
    dead = refusing_port()
    try:
        bob = wire(server.port, "bob", keys(1))
        fallback = ("--fallback", f"127.0.0.1:{dead.getsockname()[1]}", "--fallback", f"127.0.0.1:{server.port}")
        run = e2e.run_script(dead.getsockname()[1], "carol", home("carol"), PASSWORD + "\nBM hello\n",
                             "--register", *fallback)
        assert run.returncode == 0, run.stdout + run.stderr
        assert f"logged in as carol at 127.0.0.1:{server.port}" in run.stdout
        bob.wait_data("BM", text="hello")

        nobody = e2e.run_script(dead.getsockname()[1], "carol", home("carol"), PASSWORD + "\n",
                                "--fallback", f"127.0.0.1:{dead.getsockname()[1]}")
        assert nobody.returncode == 1
        assert "no node of the room answered" in nobody.stderr
        assert nobody.stderr.count("connection refused") == 2
    finally:
        dead.close()


def test_a_redis_outage_is_waited_out_not_taken_for_a_refusal(nodes, redis_server, keys, home, ptys):
    node, = nodes(1)
    alice = ptys(node.port, "alice", home("alice"), keys(0))
    redis_server.kill()                  # the node closes its connections after 3 s without Redis
    alice.wait_for("the server is shutting down", timeout=BACK_WITHIN)
    alice.wait_for("not connected (the server failed the login: internal); trying again in", timeout=BACK_WITHIN)
    redis_server.restart()
    alice.wait_for("reconnected as alice", timeout=BACK_WITHIN)
    bob = wire(node.port, "bob", keys(1))
    bob.bm("after the outage")
    alice.wait_line(CLOCK + " bob: after the outage")
    alice.type("EX\r")
    assert alice.wait_exit() == 0


def test_a_node_that_takes_connections_and_answers_nothing_is_passed_over(server, keys, home, ptys, relays):
    relay = relays(server.port)
    silent = socket.create_server(("127.0.0.1", 0))     # listens (the kernel completes connects), never reads
    try:
        alice = ptys(relay.port, "alice", home("alice"), keys(0),
                     "--fallback", f"127.0.0.1:{silent.getsockname()[1]}", "--fallback", f"127.0.0.1:{server.port}")
        relay.refusing = True
        relay.cut()
        alice.wait_for(f"reconnected as alice at 127.0.0.1:{server.port}", timeout=BACK_WITHIN)
        alice.type("EX\r")
        assert alice.wait_exit() == 0
    finally:
        silent.close()


def test_a_fallback_remembered_with_another_key_stops_the_start(server, keys, home):
    elsewhere = refusing_port()
    try:
        fallback = server_address("127.0.0.1", elsewhere.getsockname()[1])
        ClientStore(str(home("carol") / "chatroom")).remember_server(fallback, keys(5).fingerprint)
        run = e2e.run_script(server.port, "carol", home("carol"), PASSWORD + "\nBM hello\n", "--register",
                             "--fallback", fallback)
        assert run.returncode == 3, run.stdout + run.stderr
        assert f"but {fallback}, given as a node of the same room, is known by {keys(5).fingerprint}" in run.stderr
        assert "known_servers" in run.stderr
        probe = WireClient(server.port)
        assert probe.login_start("carol")["new_user"] is True     # nothing was registered: nothing was sent
        probe.close()
    finally:
        elsewhere.close()


@pytest.fixture
def impatient(tmp_path):
    """A server that closes a connection not logged in within 1.5 s (--login-timeout)."""
    started = ServerProcess(str(tmp_path / "impatient"), "--login-timeout", "1.5").start()
    yield started
    started.kill()


def test_a_password_typed_after_the_login_timeout_still_logs_in(impatient, keys, home):
    e2e.seed_key(home("erin"), impatient.port, "erin", keys(3))   # no key to make: the login fits in 1.5 s
    erin = PtyClient(impatient.port, "erin", home("erin"))
    try:
        erin.wait_prompt("choose a password: ")
        erin.wait_for("the login took too long (idle); this client connects again when you press Enter")
        erin.wait_prompt("choose a password: ")        # the prompt is still there
        erin.type(PASSWORD + "\r")
        erin.wait_prompt("repeat the password: ")
        erin.type(PASSWORD + "\r")
        erin.wait_for(f"logged in as erin at 127.0.0.1:{impatient.port}")
        erin.type("EX\r")
        assert erin.wait_exit() == 0
    finally:
        erin.close()

    again = PtyClient(impatient.port, "erin", home("erin"))     # an account that exists: asked once
    try:
        again.wait_prompt("password for erin: ")
        again.wait_for("this client connects again when you press Enter")
        again.type(PASSWORD + "\r")
        again.wait_for(f"logged in as erin at 127.0.0.1:{impatient.port}")
        assert PASSWORD not in again.text()             # a secret prompt: never echoed
        again.type("EX\r")
        assert again.wait_exit() == 0
    finally:
        again.close()
