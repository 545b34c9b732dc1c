"""Issue 8: several chatserver.py nodes on one Redis are one chat room.

Two nodes (``--redis``) and one real redis-server (AOF ``always``, tests/redisproc.py),
all on loopback: cross-node BM, PM, PRESENCE, online lists and histories; takeover
across nodes; SIGKILL of a node (its users offline elsewhere within 7 s);
SIGSTOP of a node past its lease (it fences itself); SIGKILL of a node, and of
Redis, in the middle of a stream of messages (nothing acknowledged is lost); a
Redis pause while messages flow (every BM delivered once and in order, ``ok``
only for what is stored); Redis down (``internal``, then BYE shutdown, then the
node rejoins); two nodes on a Redis reached only over rediss:// (TLS, with
AUTH) serve a BM end to end. Every wait has an explicit deadline.
"""

from __future__ import annotations

import random
import signal
import threading
import time

import pytest

import framing
import pg3lib
import redis_scripts
from redislink import BlockingRedis
from redisproc import RedisProcess
from serverproc import ServerProcess
from wire import WireClient, pm2_send, verify_pm2


PASSWORD = "correct horse"
REAP_WITHIN = 7.0          # a dead node's users are shown offline on the others within this
PROMPTLY = 3.0             # a fenced node closes its users' connections within this after SIGCONT
NODE_ARGS = ("--flood-rate", "0", "--bm-rate", "0", "--register-rate", "0")
ALLOWED_AFTER_FAULT = ("internal", "not_online")


def secret(name: str) -> str:
    return PASSWORD + " " + name.lower()


def test_a_node_with_another_key_is_refused_and_redis_holds_no_private_key(cluster, tmp_path):
    first = cluster.node()
    with BlockingRedis(cluster.redis.url) as r:
        held = r.call("GET", "chat:serverkey")
    assert b"PRIVATE" not in held and b"BEGIN" not in held   # the public key form only
    assert pg3lib.PublicKey.from_key_form(held).fingerprint == pg3lib.KeyPair.load(
        str(tmp_path / "room_server_key.pem")).fingerprint
    other = tmp_path / "stranger"
    other.mkdir()
    stranger = ServerProcess(str(other), "--redis", cluster.redis.url + "/0", *NODE_ARGS)   # its own new key
    with pytest.raises(RuntimeError):
        stranger.start(timeout=8)
    assert "is not the room's" in stranger.log() and "--server-key" in stranger.log()
    assert not (other / "server_key.pem").exists()     # the key it made was refused: not left to refuse again
    assert first.proc.poll() is None


def test_an_older_releases_private_key_in_redis_is_replaced_by_the_public_key(redis_server, tmp_path):
    old = pg3lib.KeyPair.generate()
    with BlockingRedis(redis_server.url) as r:
        r.call("FLUSHALL")
        r.call("SET", "chat:serverkey", old.to_pem())
    data = tmp_path / "fresh"
    data.mkdir()
    node = ServerProcess(str(data), "--redis", redis_server.url + "/0", *NODE_ARGS).start()
    try:
        with BlockingRedis(redis_server.url) as r:
            held = r.call("GET", "chat:serverkey")
        assert held == old.public.key_form.encode()          # no private key left in Redis
        assert pg3lib.KeyPair.load(str(data / "server_key.pem")).fingerprint == old.fingerprint   # adopted
    finally:
        node.kill()


class Cluster:
    """Nodes on one Redis, and every client made through it (all closed at teardown)."""

    def __init__(self, tmp_path, redis, keys) -> None:
        self.tmp_path = tmp_path
        self.redis = redis
        self.keys = keys
        self.nodes: list[ServerProcess] = []
        self.clients: list[WireClient] = []

    def node(self, *extra: str) -> ServerProcess:
        data = self.tmp_path / f"node{len(self.nodes)}"   # one data directory each, as on two machines
        data.mkdir()
        # Every node of a room is given the room's key file (Redis holds only its public key).
        key_file = str(self.tmp_path / "room_server_key.pem")
        proc = ServerProcess(str(data), "--redis", self.redis.url + "/0", "--server-key", key_file,
                             *NODE_ARGS, *extra)
        self.nodes.append(proc)
        return proc.start()

    def connect(self, node: ServerProcess, timeout: float = 10.0) -> WireClient:
        client = WireClient(node.port, timeout=timeout)
        self.clients.append(client)
        return client

    def login(self, node: ServerProcess, name: str, key_index: int, **key_members) -> WireClient:
        client = self.connect(node)
        client.login(name, secret(name), self.keys(key_index), **key_members)
        return client

    def login_retry(self, node: ServerProcess, name: str, key_index: int, deadline: float,
                    existing: bool = True) -> WireClient:
        """Log in, retrying while the node (re)joins Redis; an account that should exist must."""
        last: object = None
        while True:
            client = None
            try:
                client = self.connect(node, timeout=5.0)
                reply = client.login_start(name)
                if reply["ok"]:
                    if existing and reply["new_user"]:
                        pytest.fail(f"account {name} was lost: LOGIN on port {node.port} says new_user")
                    reply = client.password(secret(name))
                    if not reply["ok"] and reply["error"] == "wrong_password":
                        pytest.fail(f"{name}: wrong_password for the right password on port {node.port}")
                    if reply["ok"]:
                        client.username = reply["username"]
                        reply = client.key(self.keys(key_index))
                        if reply["ok"]:
                            return client
                last = reply
            except (AssertionError, EOFError, OSError, TimeoutError) as exc:
                last = exc
            if client is not None:
                client.close()
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} could not log in on port {node.port} in time; last: {last!r}")
            time.sleep(0.3)


@pytest.fixture
def cluster(tmp_path, redis_server, keys):
    c = Cluster(tmp_path, redis_server, keys)
    yield c
    for client in c.clients:
        client.close()
    for node in c.nodes:
        node.signal(signal.SIGCONT)
        node.kill()
        print(f"--- node on port {node.port} ({node.log_path}), log tail ---\n{node.log()[-3000:]}")
    print(f"--- redis on port {redis_server.port}, log tail ---\n{redis_server.log()[-1500:]}")


# --- helpers ------------------------------------------------------------------------------------

def settle(clients: list[WireClient], timeout: float = 10.0) -> None:
    """Each client waits for the PRESENCE online of everyone who logged in after it."""
    for i, client in enumerate(clients):
        for other in clients[i + 1:]:
            client.wait_data("PRESENCE", timeout=timeout, username=other.username, online=True)


def wait_presence(client: WireClient, name: str, online: bool, deadline: float, what: str) -> float:
    """Wait for D PRESENCE of name; returns when it came (monotonic). Fails with `what`."""
    try:
        client.wait_data("PRESENCE", timeout=max(0.001, deadline - time.monotonic()), username=name,
                         online=online)
    except TimeoutError:
        pytest.fail(f"{what}: no PRESENCE {name} online:{str(online).lower()} before the deadline")
    return time.monotonic()


def frames_for(client: WireClient, timeout: float) -> tuple[list[framing.Frame], bool]:
    """Every frame that arrives within timeout, and whether the server closed the connection."""
    frames: list[framing.Frame] = []
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return frames, False
        try:
            frames.append(client.recv(remaining))
        except EOFError:
            return frames, True
        except TimeoutError:
            return frames, False
        except OSError:
            return frames, True


def drain(client: WireClient, quiet: float = 1.0, limit: float = 15.0) -> tuple[list[framing.Frame], bool]:
    """Frames until none came for `quiet` seconds (at most `limit` in all); and whether it closed."""
    frames: list[framing.Frame] = []
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        more, closed = frames_for(client, min(quiet, max(0.001, deadline - time.monotonic())))
        frames.extend(more)
        if closed:
            return frames, True
        if not more:
            return frames, False
    return frames, False


def c_frames(frames: list[framing.Frame]) -> list[dict]:
    return [f.body for f in frames if f.kind == "C"]


def sorted_online(reply: dict) -> list[str]:
    return sorted(reply["online"])


def history(client: WireClient) -> list[dict]:
    return client.history()


def bm_texts(entries: list[dict]) -> list[tuple[str, str]]:
    return [(e["from"], e.get("text")) for e in entries if e["type"] == "BM"]


def pm_send(client: WireClient, target: str, text: str) -> tuple[dict, str, str]:
    """PM target: (the TARGET reply if it failed, else the SEND reply; ciphertext; self_copy)."""
    reply = client.request({"op": "PM"})
    if not reply["ok"]:
        return reply, "", ""
    reply = client.request({"op": "TARGET", "username": target})
    if not reply["ok"]:
        return reply, "", ""
    assert client.keys is not None
    their_key = pg3lib.PublicKey.from_key_form(reply["public_key"])
    ciphertext = their_key.seal(text.encode()).decode("ascii")
    self_copy = client.keys.public.seal(text.encode()).decode("ascii")
    reply = client.request(pm2_send(client.keys, client.username, reply["username"], ciphertext, self_copy))
    return reply, ciphertext, self_copy


# --- one room over two nodes --------------------------------------------------------------------

def test_accounts_and_server_key_are_shared(cluster):
    a, b = cluster.node(), cluster.node()
    first = cluster.connect(a)
    reply_a = first.login_start("Alice")
    assert reply_a["ok"] and reply_a["new_user"] is True
    assert first.password(secret("alice"))["ok"]
    first.exit()

    other = cluster.connect(b)
    reply_b = other.login_start("ALICE")
    assert reply_b["new_user"] is False, "an account registered on node A is unknown on node B"
    assert reply_b["fingerprint"] == reply_a["fingerprint"], "the nodes present different server keys"
    assert reply_b["server_key"] == reply_a["server_key"]
    assert other.password("not the password")["error"] == "wrong_password"
    assert other.password(secret("alice")) == {"op": "PASSWORD", "ok": True, "new_user": False,
                                               "username": "Alice"}

    # one name registered at once on both nodes with different passwords: one account wins
    racers = [cluster.connect(a), cluster.connect(b)]
    for racer in racers:
        assert racer.login_start("racer")["new_user"] is True
    for i, racer in enumerate(racers):
        racer.send({"op": "PASSWORD", "ciphertext": racer.sealed_password(f"password-{i}")})
    replies = [racer.reply("PASSWORD") for racer in racers]
    assert sum(1 for r in replies if r["ok"]) == 1, replies


def test_a_pm2_id_used_through_one_node_is_refused_through_the_other(cluster, keys):
    """The room remembers PM ids, not each node (section 4.5): a captured SEND replayed by its
    sender on another node, live or to an offline target, is refused and delivers nothing."""
    a, b = cluster.node(), cluster.node()
    ann = cluster.login(a, "ann", 0)
    bob = cluster.login(b, "bob", 1)
    settle([ann, bob])
    body, reply = ann.pm_checked("bob", "once")
    assert reply["ok"]
    assert keys(1).open(bob.wait_data("PM", timeout=5)["ciphertext"]) == b"once"
    ann.close()
    ann = cluster.login(b, "ann", 0)   # the same account, through the other node
    for offline in (False, True):
        assert ann.request({"op": "PM"})["ok"]
        assert ann.request({"op": "TARGET", "username": "bob", "offline": offline})["ok"]
        replayed = ann.request(body)
        assert replayed["error"] == "bad_request" and "used before" in replayed["message"], replayed
        assert ann.request({"op": "CANCEL"})["ok"]
    assert ann.pm("bob", "a new one")["ok"]
    assert keys(1).open(bob.wait_data("PM", timeout=5)["ciphertext"]) == b"a new one"
    assert [keys(1).open(e["ciphertext"]) for e in bob.history()] == [b"once", b"a new one"]


def test_bm_pm_presence_and_online_list_span_both_nodes(cluster, keys):
    a, b = cluster.node(), cluster.node()
    ann = cluster.login(a, "ann", 0)
    bob_key = cluster.login(b, "Bob", 1)
    assert bob_key.username == "Bob"
    cat = cluster.connect(b)
    cat_key = cat.login("cat", secret("cat"), keys(2))
    assert sorted_online(cat_key) == ["Bob", "ann"], "KEY's online list does not span both nodes"
    bob = bob_key
    settle([ann, bob, cat])

    # the online list in PM's reply spans both nodes; TARGET on A finds a user on B
    assert ann.request({"op": "PM"})["ok"]
    ann.send({"op": "CANCEL"})
    assert ann.reply("CANCEL")["ok"]
    reply = ann.request({"op": "PM"})
    assert sorted_online(reply) == ["Bob", "cat"], reply
    target = ann.request({"op": "TARGET", "username": "BOB"})
    assert target["ok"] and target["username"] == "Bob" and target["fingerprint"] == keys(1).fingerprint, target
    assert ann.request({"op": "CANCEL"})["ok"]

    # BM from A reaches B's users; recipients counts both nodes
    sent = ann.bm("hello from A")
    assert sent == {"op": "SEND", "ok": True, "recipients": 2, "ts": sent["ts"]}
    for client in (bob, cat):
        message = client.wait_data("BM", timeout=5)
        assert message["from"] == "ann" and message["text"] == "hello from A" and message["ts"] == sent["ts"]
    assert cat.bm("hello from B")["recipients"] == 2
    assert ann.wait_data("BM", timeout=5)["text"] == "hello from B"
    assert bob.wait_data("BM", timeout=5)["text"] == "hello from B"

    # PM from A to B decrypts on B, and back
    assert ann.pm("bob", "psst, Bob") == {"op": "SEND", "ok": True, "recipients": 1}
    message = bob.wait_data("PM", timeout=5)
    assert message["from"] == "ann" and message["to"] == "Bob"
    assert keys(1).open(message["ciphertext"]) == b"psst, Bob"
    sender = pg3lib.PublicKey.from_key_form(message["sender_key"])
    assert sender == keys(0).public
    assert verify_pm2(message, "Bob")
    assert bob.pm("ann", "hi ann") == {"op": "SEND", "ok": True, "recipients": 1}
    message = ann.wait_data("PM", timeout=5)
    assert keys(0).open(message["ciphertext"]) == b"hi ann"
    with pytest.raises(TimeoutError):
        cat.wait_data("PM", timeout=0.3)

    # every history has what it should, in order
    ann_h, bob_h, cat_h = history(ann), history(bob), history(cat)
    expected_bms = [("ann", "hello from A"), ("cat", "hello from B")]
    for entries in (ann_h, bob_h, cat_h):
        assert bm_texts(entries) == expected_bms
    assert [(e["type"], e["from"], e["to"]) for e in ann_h] == [
        ("BM", "ann", "*"), ("BM", "cat", "*"), ("PM", "ann", "Bob"), ("PM", "Bob", "ann")]
    assert keys(0).open(ann_h[2]["ciphertext"]) == b"psst, Bob"     # self_copy
    assert keys(0).open(ann_h[3]["ciphertext"]) == b"hi ann"
    assert keys(1).open(bob_h[2]["ciphertext"]) == b"psst, Bob"
    assert [e["type"] for e in cat_h] == ["BM", "BM"]

    # presence on both nodes when a user of B leaves
    cat.exit()
    deadline = time.monotonic() + 5
    wait_presence(ann, "cat", False, deadline, "ann on A after cat's EX on B")
    wait_presence(bob, "cat", False, deadline, "bob on B after cat's EX on B")
    assert ann.bm("cat is gone")["recipients"] == 1
    ann.close()
    wait_presence(bob, "ann", False, time.monotonic() + 5, "bob on B after ann disconnected from A")
    assert bob.bm("alone")["recipients"] == 0


def test_takeover_across_nodes_leaves_one_live_session(cluster, keys):
    a, b = cluster.node(), cluster.node()
    ann = cluster.login(a, "ann", 0)
    bob = cluster.login(b, "bob", 1)
    cat = cluster.login(a, "cat", 2)
    settle([ann, bob, cat])

    # ann logs in again on B: her session on A gets BYE replaced and is closed
    again = cluster.connect(b)
    assert again.login_start("ann")["ok"]
    assert again.password(secret("ann"))["ok"]
    frames, closed = frames_for(ann, 5)
    assert closed and c_frames(frames) == [{"op": "BYE", "reason": "replaced"}], (frames, closed)
    deadline = time.monotonic() + 5
    for watcher, where in ((bob, "B"), (cat, "A")):
        wait_presence(watcher, "ann", False, deadline, f"watcher on {where} after the takeover")
    assert sorted_online(again.key(keys(0))) == ["bob", "cat"]
    for watcher, where in ((bob, "B"), (cat, "A")):
        wait_presence(watcher, "ann", True, deadline, f"watcher on {where} after the new session's KEY")
    assert cat.bm("one ann only")["recipients"] == 2
    assert again.wait_data("BM", timeout=5)["text"] == "one ann only"

    # and back from B to A
    third = cluster.connect(a)
    assert third.login_start("ann")["ok"] and third.password(secret("ann"))["ok"]
    frames, closed = frames_for(again, 5)
    assert closed and c_frames(frames) == [{"op": "BYE", "reason": "replaced"}], (frames, closed)
    assert sorted_online(third.key(keys(0))) == ["bob", "cat"]
    wait_presence(bob, "ann", True, time.monotonic() + 5, "bob on B after the takeover back on A")
    assert bob.bm("still one ann")["recipients"] == 2

    # four logins of one account at once, two on each node: exactly one session survives
    cluster.login(a, "twin", 3).exit()
    twins = [cluster.connect(node) for node in (a, b, a, b)]
    for twin in twins:
        assert twin.login_start("twin")["ok"]
    for twin in twins:
        twin.send({"op": "PASSWORD", "ciphertext": twin.sealed_password(secret("twin"))})
    sent_at = time.monotonic()
    survivors, seen = [], []
    for i, twin in enumerate(twins):
        frames, closed = frames_for(twin, max(0.001, sent_at + 3 - time.monotonic()))
        bodies = c_frames(frames)
        seen.append(f"twin {i} on {'AB'[i % 2]}: {bodies}{' closed' if closed else ''}")
        if closed:
            assert bodies and bodies[-1] == {"op": "BYE", "reason": "replaced"}, seen
            assert all(body["op"] == "PASSWORD" and body["ok"] for body in bodies[:-1]), seen
        else:
            assert [body["op"] for body in bodies] == ["PASSWORD"] and bodies[0]["ok"], seen
            survivors.append(twin)
    if len(survivors) != 1:   # which of them can still go online? (at most one may)
        for i, twin in enumerate(survivors):
            try:
                seen.append(f"open twin {i} then KEY -> {twin.key(keys(3))}")
            except (AssertionError, EOFError, OSError) as exc:
                seen.append(f"open twin {i} then KEY -> {exc!r}")
    assert len(survivors) == 1, f"{len(survivors)} twin sessions still open 3 s after the logins: {seen}"
    for watcher in (bob, cat):
        watcher.request({"op": "PM"})
        assert watcher.request({"op": "TARGET", "username": "twin"})["error"] == "not_online"
    assert survivors[0].key(keys(3))["ok"]
    deadline = time.monotonic() + 5   # the other node hears of it from the store's event
    for watcher in (bob, third):
        while True:
            reply = watcher.request({"op": "PM"})
            assert watcher.request({"op": "CANCEL"})["ok"]
            if "twin" in reply["online"] or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert reply["online"].count("twin") == 1, reply


def test_sigkill_of_a_node_shows_its_users_offline_within_7s(cluster, keys):
    a, b = cluster.node(), cluster.node()
    ann = cluster.login(a, "ann", 0)
    cat = cluster.login(a, "cat", 2)
    bob = cluster.login(b, "bob", 1)
    settle([ann, cat, bob])

    killed_at = time.monotonic()
    a.kill()
    # A comes back at once (a new node id); ann logs in there before the old id's lease runs out
    a.start(a.port)
    ann = cluster.login(a, "ann", 0)
    wait_presence(bob, "ann", True, killed_at + REAP_WITHIN, "bob on B after ann logged in on the restarted A")
    bob.data = [d for d in bob.data if not (d["op"] == "PRESENCE" and d["username"] == "ann")]

    when = wait_presence(bob, "cat", False, killed_at + REAP_WITHIN, "bob on B after SIGKILL of node A")
    print(f"cat shown offline {when - killed_at:.2f} s after the SIGKILL")
    frames, _ = frames_for(bob, 0.5)
    stale = [f.body for f in frames if f.kind == "D" and f.body.get("username") == "ann"] + \
            [d for d in bob.data if d["op"] == "PRESENCE" and d["username"] == "ann"]
    assert not stale, f"the reap of the dead node touched ann's new session: {stale}"
    assert bob.bm("who is left")["recipients"] == 1
    assert ann.wait_data("BM", timeout=5)["text"] == "who is left"

    # cat logs in again, on B
    cat = cluster.connect(b)
    assert sorted_online(cat.login("cat", secret("cat"), keys(2))) == ["ann", "bob"]
    wait_presence(bob, "cat", True, time.monotonic() + 5, "bob after cat logged in again on B")
    wait_presence(ann, "cat", True, time.monotonic() + 5, "ann on A after cat logged in again on B")
    assert ann.bm("all here")["recipients"] == 2


def test_a_pm_to_a_user_of_a_node_that_just_died_is_kept_for_their_next_login(cluster, keys):
    """SIGKILL of node A, then, before its lease runs out, bob (on B) sends carol (still shown
    online, on A) a PM: SEND says delivered, but A never read it. The reap hands it on: carol's
    next login, on B, gets it as a kept PM (a helper saw it only in CH)."""
    a, b = cluster.node(), cluster.node()
    carol = cluster.login(a, "carol", 2)
    bob = cluster.login(b, "bob", 1)
    settle([carol, bob])
    a.kill()
    reply, _, _ = pm_send(bob, "carol", "sent while your node was dying")
    assert reply == {"op": "SEND", "ok": True, "recipients": 1}, reply
    sent_id = next(e["id"] for e in history(bob) if e["type"] == "PM")
    wait_presence(bob, "carol", False, time.monotonic() + REAP_WITHIN, "bob after the SIGKILL of carol's node")
    carol = cluster.connect(b)
    carol.login("carol", secret("carol"), keys(2))
    kept = carol.recv(5.0)
    assert (kept.kind, kept.body["op"], kept.body.get("offline"), kept.body["id"]) == ("D", "PM", True, sent_id)
    assert verify_pm2(kept.body, "carol")
    assert keys(2).open(kept.body["ciphertext"]) == b"sent while your node was dying"


def test_a_node_stopped_cleanly_leaves_and_is_not_reaped(cluster, keys):
    """SIGTERM: the node says BYE, logs its users out and takes its own lease away, so the other
    nodes show them offline at once and never reap it as if it had died."""
    a, b = cluster.node(), cluster.node()
    cat = cluster.login(a, "cat", 2)
    bob = cluster.login(b, "bob", 1)
    settle([cat, bob])
    stopped_at = time.monotonic()
    assert a.stop() == 0
    assert "left redis://" in a.log()
    wait_presence(bob, "cat", False, stopped_at + 2, "bob on B after node A stopped")
    time.sleep(redis_scripts.LEASE_MS / 1000 + 1.5)   # past the lease and a reaping round of B
    assert "reaping node" not in b.log(), b.log()[-2000:]
    assert bob.bm("still here")["recipients"] == 0


def test_sigstop_of_a_node_past_its_lease_fences_it(cluster, keys):
    a, b = cluster.node(), cluster.node()
    old_ann = cluster.login(a, "ann", 0)
    old_cat = cluster.login(a, "cat", 2)
    bob = cluster.login(b, "bob", 1)
    settle([old_ann, old_cat, bob])

    stopped_at = time.monotonic()
    a.signal(signal.SIGSTOP)
    try:
        deadline = stopped_at + REAP_WITHIN
        wait_presence(bob, "ann", False, deadline, "bob on B while node A is stopped")
        wait_presence(bob, "cat", False, deadline, "bob on B while node A is stopped")
        ann = cluster.login(b, "ann", 0)           # the user comes back on B meanwhile
        wait_presence(bob, "ann", True, time.monotonic() + 5, "bob after ann logged in on B")
        reply = bob.request({"op": "PM"})
        assert reply["online"] == ["ann"], f"online list while A is stopped and ann is back on B: {reply}"
        assert bob.request({"op": "CANCEL"})["ok"]
        # the stale session on A tries to speak; it must not be heard once A runs again
        old_ann.send_raw(framing.command({"op": "BM"}) + framing.command({"op": "SEND", "text": "zombie"}))
        time.sleep(max(0.0, stopped_at + 7.5 - time.monotonic()))   # stopped longer than the 5 s lease
    finally:
        a.signal(signal.SIGCONT)
    continued_at = time.monotonic()

    for name, old in (("ann", old_ann), ("cat", old_cat)):
        frames, closed = frames_for(old, max(0.001, continued_at + PROMPTLY - time.monotonic()))
        assert closed, f"{name}'s connection to the fenced node A still open {PROMPTLY} s after SIGCONT: {frames}"
        bodies = c_frames(frames)
        assert all(body["op"] in ("BYE", "BM") or not body.get("ok") for body in bodies), \
            f"{name}'s stale session on A was answered ok after SIGCONT: {bodies}"

    frames, _ = frames_for(bob, 1.0)
    heard = [f.body for f in frames if f.kind == "D"]
    assert not [d for d in heard if d["op"] == "BM" and d.get("text") == "zombie"], heard
    assert not [d for d in heard if d["op"] == "PRESENCE" and d["username"] == "ann" and not d["online"]], \
        f"node A's fencing logged out ann's new session on B: {heard}"
    assert bob.bm("only B's ann")["recipients"] == 1
    assert ann.wait_data("BM", timeout=5)["text"] == "only B's ann"
    assert "zombie" not in [text for _, text in bm_texts(history(ann))]
    assert "zombie" not in [text for _, text in bm_texts(history(bob))]

    # node A rejoins under a new id and serves again
    cat = cluster.login_retry(a, "cat", 2, time.monotonic() + 10)
    assert sorted_online(cat.request({"op": "PM"})) == ["ann", "bob"]
    wait_presence(bob, "cat", True, time.monotonic() + 5, "bob after cat logged in on the rejoined A")


# --- nothing acknowledged is lost: SIGKILL of a node, of Redis ----------------------------------

class Ledger:
    """What the server acknowledged, and what went wrong that should not have."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bm: list[tuple[str, str]] = []                  # (sender, text)
        self.pm: list[tuple[str, str, str, str]] = []        # (sender, target, ciphertext, self_copy)
        self.problems: list[str] = []

    def problem(self, text: str) -> None:
        with self.lock:
            self.problems.append(text)


def stream(client: WireClient, target: str, tag: str, ledger: Ledger, stop: threading.Event,
           fault: threading.Event) -> None:
    """BM and PM in turn until stop; records what got SEND ok; anything odd before the fault is a problem."""
    n = 0
    try:
        while not stop.is_set():
            text = f"{client.username}-{tag}-{n}"
            n += 1
            reply = client.request({"op": "BM"})
            if reply["ok"]:
                reply = client.request({"op": "SEND", "text": text})
            if reply["ok"]:
                with ledger.lock:
                    ledger.bm.append((client.username, text))
            elif not fault.is_set() or reply.get("error") not in ALLOWED_AFTER_FAULT:
                ledger.problem(f"{text}: BM {reply} (fault: {fault.is_set()})")
            reply, ciphertext, self_copy = pm_send(client, target, text)
            if reply["ok"]:
                with ledger.lock:
                    ledger.pm.append((client.username, target, ciphertext, self_copy))
            elif not fault.is_set() or reply.get("error") not in ALLOWED_AFTER_FAULT:
                ledger.problem(f"{text}: PM {reply} (fault: {fault.is_set()})")
    except TimeoutError:    # before OSError: TimeoutError is one
        ledger.problem(f"{client.username}: a request went unanswered for {client.timeout} s")
    except (EOFError, OSError, AssertionError) as exc:   # closed, or a BYE in place of a reply
        if not fault.is_set():
            ledger.problem(f"{client.username} before the fault: {exc!r}")


def run_streams(clients: list[WireClient], targets: list[str], tag: str, ledger: Ledger,
                fault_after: float, fault) -> None:
    """Stream from every client, cause the fault after `fault_after` s, stop, join (bounded)."""
    stop, fault_set = threading.Event(), threading.Event()
    threads = [threading.Thread(target=stream, args=(c, t, tag, ledger, stop, fault_set), daemon=True)
               for c, t in zip(clients, targets)]
    for thread in threads:
        thread.start()
    time.sleep(fault_after)
    fault_set.set()
    fault()
    stop.set()
    for thread in threads:
        thread.join(15)
    assert not any(thread.is_alive() for thread in threads), "a streaming client hung"


def check_ledger(ledger: Ledger, histories: dict[str, list[dict]]) -> None:
    """Every acknowledged BM is in every history (all were online); every PM in sender's and target's."""
    assert not ledger.problems, ledger.problems
    bms = {name: set(bm_texts(entries)) for name, entries in histories.items()}
    pms = {name: {(e["from"], e["to"], e.get("ciphertext")) for e in entries if e["type"] == "PM"}
           for name, entries in histories.items()}
    for sender, text in ledger.bm:
        for name in histories:
            assert (sender, text) in bms[name], f"acknowledged BM {text!r} missing from {name}'s history"
    for sender, target, ciphertext, self_copy in ledger.pm:
        assert (sender, target, self_copy) in pms[sender], f"acknowledged PM missing from {sender}'s history"
        assert (sender, target, ciphertext) in pms[target], f"acknowledged PM missing from {target}'s history"


def test_sigkill_of_a_node_mid_stream_loses_nothing_acknowledged(cluster):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    print(f"\nnode SIGKILL seed {seed}")
    a, b = cluster.node(), cluster.node()
    users = [("ann", a, 0, "bob"), ("ben", a, 1, "cat"), ("bob", b, 2, "ann"), ("cat", b, 3, "ben")]
    ledger = Ledger()
    for rnd in range(3):
        clients = [cluster.login_retry(node, name, k, time.monotonic() + 10, existing=rnd > 0)
                   for name, node, k, _ in users]
        settle(clients)
        run_streams(clients, [t for *_, t in users], str(rnd), ledger, rng.uniform(0.3, 1.2), a.kill)
        for client in clients:
            client.close()
        a.start(a.port)
        deadline = time.monotonic() + 15
        checkers = [cluster.login_retry(node, name, k, deadline) for name, node, k, _ in users]
        check_ledger(ledger, {c.username: history(c) for c in checkers})
        for client in checkers:
            client.close()
    print(f"acknowledged: {len(ledger.bm)} BMs, {len(ledger.pm)} PMs")
    assert len(ledger.bm) > 20 and len(ledger.pm) > 20


def test_sigkill_of_redis_mid_stream_loses_nothing_acknowledged(cluster):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    print(f"\nRedis SIGKILL seed {seed}")
    a, b = cluster.node(), cluster.node()
    redis = cluster.redis
    users = [("ann", a, 0, "bob"), ("ben", a, 1, "cat"), ("bob", b, 2, "ann"), ("cat", b, 3, "ben")]
    ledger = Ledger()
    for rnd in range(3):
        deadline = time.monotonic() + 20
        clients = [cluster.login_retry(node, name, k, deadline, existing=rnd > 0) for name, node, k, _ in users]
        settle(clients)
        for client in clients:
            client.timeout = 8.0     # requests while Redis is gone get `internal` well before this
        run_streams(clients, [t for *_, t in users], str(rnd), ledger, rng.uniform(0.3, 1.2), redis.kill)
        for client in clients:
            client.close()
        redis.restart()              # same port, same directory: the AOF is read back
        deadline = time.monotonic() + 20
        checkers = [cluster.login_retry(node, name, k, deadline) for name, node, k, _ in users]
        check_ledger(ledger, {c.username: history(c) for c in checkers})
        for client in checkers:
            client.close()
    print(f"acknowledged: {len(ledger.bm)} BMs, {len(ledger.pm)} PMs")
    assert len(ledger.bm) > 20 and len(ledger.pm) > 20


# --- Redis pauses and outages ---------------------------------------------------------------------

def collect(client: WireClient, stop: threading.Event, out: list[dict], errors: list[str]) -> None:
    """Read every frame until stop is set and the connection has been quiet for a second."""
    quiet_since = time.monotonic()
    while True:
        try:
            frame = client.recv(0.2)
        except TimeoutError:
            if stop.is_set() and time.monotonic() - quiet_since >= 1.0:
                return
            continue
        except (EOFError, OSError) as exc:
            errors.append(f"{client.username}'s connection closed: {exc!r}")
            return
        quiet_since = time.monotonic()
        if frame.kind == "D":
            out.append(frame.body)
        else:
            errors.append(f"{client.username} got {frame.body}")


def send_bms(client: WireClient, stop: threading.Event, problems: list[str], log: list,
             tolerated: tuple = ()) -> None:
    """BM after BM until stop, each one's (text, outcome, SEND sent, reply read) in log; a reply
    other than ok or a tolerated error is a problem, and so is a failed or closed connection."""
    n = 0
    try:
        while not stop.is_set():
            text = f"{client.username}-{n:05d}"
            n += 1
            reply = client.request({"op": "BM"}, timeout=8)
            if not reply["ok"]:
                problems.append(f"{text}: BM {reply}")
                return
            t0 = time.monotonic()
            reply = client.request({"op": "SEND", "text": text}, timeout=8)
            outcome = "ok" if reply["ok"] else reply.get("error", "?")
            if outcome != "ok" and outcome not in tolerated:
                problems.append(f"{text}: SEND {reply}")
            log.append((text, outcome, t0, time.monotonic()))
            time.sleep(0.003)
    except (EOFError, OSError, AssertionError, TimeoutError) as exc:
        problems.append(f"{client.username}: {exc!r}")


def test_redis_pause_delivers_every_bm_once_and_in_order(cluster):
    a, b = cluster.node(), cluster.node()
    redis = cluster.redis
    ann = cluster.login(a, "ann", 0)     # senders, one per node
    bob = cluster.login(b, "bob", 1)
    cat = cluster.login(a, "cat", 2)     # listeners, one per node
    dan = cluster.login(b, "dan", 3)
    settle([ann, bob, cat, dan])
    for client in (ann, bob, cat, dan):
        client.data.clear()

    sent: dict[str, list[tuple[str, str, float, float]]] = {"ann": [], "bob": []}   # text, outcome, t0, t1
    problems: list[str] = []
    stop = threading.Event()
    received: dict[str, list[dict]] = {"cat": [], "dan": []}
    listen_stop = threading.Event()
    threads = [threading.Thread(target=send_bms, args=(c, stop, problems, sent[c.username], ("internal",)),
                                daemon=True) for c in (ann, bob)]
    threads += [threading.Thread(target=collect, args=(c, listen_stop, received[c.username], problems), daemon=True)
                for c in (cat, dan)]
    for thread in threads:
        thread.start()
    time.sleep(0.6)
    paused_at = time.monotonic()
    redis.pause()
    try:
        time.sleep(2.0)
    finally:
        redis.resume()
    resumed_at = time.monotonic()
    time.sleep(1.5)
    stop.set()
    for thread in threads[:2]:
        thread.join(15)
    listen_stop.set()
    for thread in threads[2:]:
        thread.join(20)
    assert not any(thread.is_alive() for thread in threads), "a client thread hung"
    for sender in (ann, bob):    # the BMs of the other sender still on their way
        frames, closed = drain(sender)
        assert not closed, f"{sender.username}'s connection closed"
        sender.data.extend(f.body for f in frames if f.kind == "D")
    assert not problems, problems
    received["ann"], received["bob"] = ann.data, bob.data

    during = [(text, outcome) for log in sent.values() for text, outcome, t0, t1 in log
              if t0 < resumed_at and t1 > paused_at]
    print(f"sent {[len(v) for v in sent.values()]}; SENDs outstanding during the pause: {during}")
    assert during, "no SEND was outstanding during the pause: the test did not exercise it"

    acked = {name: [text for text, outcome, *_ in log if outcome == "ok"] for name, log in sent.items()}
    all_sent = {name: [text for text, *_ in log] for name, log in sent.items()}
    for receiver, frames in received.items():
        bms = [d for d in frames if d["op"] == "BM"]
        for sender in ("ann", "bob"):
            if sender == receiver:
                assert not [d for d in bms if d["from"] == sender], f"{receiver} got a copy of its own BM"
                continue
            got = [d["text"] for d in bms if d["from"] == sender]
            assert len(got) == len(set(got)), f"{receiver} got some of {sender}'s BMs twice"
            assert got == sorted(got), f"{receiver} got {sender}'s BMs out of order"
            assert set(got) <= set(all_sent[sender]), f"{receiver} got BMs {sender} never sent"
            missing = [t for t in acked[sender] if t not in set(got)]
            assert not missing, f"{receiver} never got acknowledged BMs of {sender}: {missing[:10]}"
    both = [[(d["from"], d["text"]) for d in received[name] if d["op"] == "BM"] for name in ("cat", "dan")]
    assert both[0] == both[1], "the listeners on node A and node B got the BMs in different orders"

    # a message answered ok is in every history; the listeners' histories are what they were sent
    for client in (ann, bob, cat, dan):
        entries = bm_texts(history(client))
        texts = {text for _, text in entries}
        for sender in ("ann", "bob"):
            missing = [t for t in acked[sender] if t not in texts]
            assert not missing, f"BMs answered ok are missing from {client.username}'s history: {missing[:10]}"
    assert bm_texts(history(cat)) == both[0]
    assert bm_texts(history(dan)) == both[1]


def test_users_who_log_in_during_a_stream_get_live_exactly_what_their_history_holds(cluster):
    """Around each login the node switches between delivering an event to everyone online and
    to those online before it: live BMs must still be the history's, none twice, none missing."""
    a, b = cluster.node(), cluster.node()
    ann, bob = cluster.login(a, "ann", 0), cluster.login(b, "bob", 1)
    settle([ann, bob])
    problems: list[str] = []
    stop = threading.Event()
    senders = [threading.Thread(target=send_bms, args=(c, stop, problems, []), daemon=True) for c in (ann, bob)]
    for thread in senders:
        thread.start()
    listen_stop = threading.Event()
    listeners: list[tuple[WireClient, list[dict], threading.Thread]] = []
    for i, name in enumerate(("cat", "dan", "eve", "fay", "gus", "hal")):
        time.sleep(0.15)
        client = cluster.login((a, b)[i % 2], name, 2 + i % 2, recent=True)
        frames: list[dict] = client.data   # D frames read while logging in, then the collector's
        thread = threading.Thread(target=collect, args=(client, listen_stop, frames, problems), daemon=True)
        thread.start()
        listeners.append((client, frames, thread))
    time.sleep(0.3)
    stop.set()
    for thread in senders:
        thread.join(15)
    listen_stop.set()
    for *_, thread in listeners:
        thread.join(20)
    assert not any(t.is_alive() for t in senders + [t for *_, t in listeners]), "a client thread hung"
    assert not problems, problems
    for client, frames, _ in listeners:
        live = [(d["from"], d["text"]) for d in frames if d["op"] == "BM" and not d.get("recent")]
        recent = [d for d in frames if d["op"] == "BM" and d.get("recent")]
        assert live and recent, f"{client.username} did not log in during the stream ({len(live)} live)"
        assert bm_texts(history(client)) == live, f"{client.username}: live BMs are not its history's"


def test_redis_down_gives_internal_then_bye_then_the_nodes_rejoin(cluster):
    a, b = cluster.node(), cluster.node()
    redis = cluster.redis
    ann = cluster.login(a, "ann", 0)
    bob = cluster.login(b, "bob", 1)
    settle([ann, bob])

    killed_at = time.monotonic()
    redis.kill()
    sending = []
    for client in (ann, bob):
        reply = client.request({"op": "BM"}, timeout=8)
        if reply["ok"]:       # BM only changes the connection's state: ok, or already internal
            client.send({"op": "SEND", "text": f"{client.username} while Redis is down"})
            sending.append(client)
        else:
            assert reply["error"] == "internal", f"{client.username}'s BM with Redis down: {reply}"
    for client in sending:
        reply = client.reply("SEND", timeout=8)
        assert reply["ok"] is False and reply["error"] == "internal", \
            f"{client.username}'s SEND with Redis down: {reply}"
    answered = time.monotonic() - killed_at
    print(f"SENDs answered internal {answered:.2f} s after Redis died")

    for client in (ann, bob):
        frames, closed = frames_for(client, max(0.001, killed_at + 15 - time.monotonic()))
        assert closed, f"{client.username}'s node did not close its connections 15 s into the Redis outage"
        assert {"op": "BYE", "reason": "shutdown"} in c_frames(frames), (client.username, frames)
    print(f"connections closed {time.monotonic() - killed_at:.2f} s after Redis died")

    redis.restart()
    deadline = time.monotonic() + 15
    ann = cluster.login_retry(a, "ann", 0, deadline)
    bob = cluster.login_retry(b, "bob", 1, deadline)
    wait_presence(ann, "bob", True, time.monotonic() + 5, "ann on A after both rejoined")
    assert ann.bm("back again")["recipients"] == 1
    assert bob.wait_data("BM", timeout=5)["text"] == "back again"


# --- moderation across nodes (docs/PROTOCOL.md section 10) -------------------------------------

def test_a_ban_on_node_a_kicks_the_user_on_node_b_and_holds_on_both(cluster, keys):
    a, b = cluster.node("--admin", "ann"), cluster.node("--admin", "ann")
    ann = cluster.login(a, "ann", 0)
    bob = cluster.login(b, "bob", 1)
    cat = cluster.login(b, "cat", 2)
    settle([ann, bob, cat])

    reply = ann.request({"op": "MOD", "action": "ban", "username": "bob", "seconds": 600, "reason": "spam"})
    assert reply["ok"] and reply["username"] == "bob", reply
    frames, closed = frames_for(bob, 5)
    assert closed and c_frames(frames)[-1] == {"op": "BYE", "reason": "banned", "message":
                                               "ann banned bob for 10 min: spam", "until": reply["until"]}
    assert cat.wait_data("NOTICE", timeout=5)["text"] == "ann banned bob for 10 min: spam"
    assert ann.wait_data("NOTICE", timeout=5)["text"] == "ann banned bob for 10 min: spam"
    wait_presence(ann, "bob", False, time.monotonic() + 5, "ann on A after bob's ban on B")
    for node in (a, b):
        again = cluster.connect(node)
        assert again.login_start("bob")["ok"]
        refused = again.password(secret("bob"))
        assert refused["error"] == "banned" and refused["reason"] == "spam", refused
        frames, closed = frames_for(again, 5)
        assert closed and c_frames(frames) == [{"op": "BYE", "reason": "banned"}]

    # a kick and a mute reach the other node too
    dan = cluster.login(b, "dan", 3)
    assert ann.request({"op": "MOD", "action": "mute", "username": "cat", "seconds": 600})["ok"]
    assert cat.wait_data("NOTICE", timeout=5)["text"] == "ann muted cat for 10 min"
    assert cat.bm("can I talk?")["error"] == "muted"
    assert ann.request({"op": "MOD", "action": "kick", "username": "dan"})["ok"]
    frames, closed = frames_for(dan, 5)
    assert closed and c_frames(frames)[-1]["reason"] == "kicked"
    listing = ann.request({"op": "MOD", "action": "bans"})
    assert [x["username"] for x in listing["bans"]] == ["bob"] and [x["username"] for x in listing["mutes"]] == ["cat"]
    assert ann.request({"op": "MOD", "action": "unmute", "username": "cat"})["ok"]
    deadline = time.monotonic() + 5
    while (reply := cat.bm("thanks"))["ok"] is not True and time.monotonic() < deadline:
        time.sleep(0.1)   # the unmute reaches B with its event
    assert reply["ok"], reply


def test_stream_payloads_are_checked_before_a_client_gets_them(cluster, keys):
    """Someone with Redis access writes entries into the event stream: a node relays only
    whole D frames of the right op from a valid sender, within its frame limit (issue 14)."""
    node = cluster.node()
    reader = cluster.login(node, "reader", 0)
    good = framing.data({"op": "BM", "from": "mallory", "text": "fine", "ts": "2026-12-02T00:00:00.000Z"})
    bad = [
        b"\x00garbage",                                                      # not a frame
        framing.command({"op": "BM", "from": "mallory", "text": "x"}),       # a C frame
        framing.data({"op": "BYE", "from": "mallory"}),                      # another op
        framing.data({"op": "BM", "from": "not valid!", "text": "x"}),       # not a username
        framing.data({"op": "BM", "from": "mallory", "text": "y" * 70000}),  # past the frame limit
        good + b"C",                                                          # trailing bytes
    ]
    with BlockingRedis(cluster.redis.url) as r:
        for payload in bad + [good]:
            r.call("XADD", "chat:ev", "*", "t", "bm", "from", "mallory", "d", payload)
    frame = reader.recv(timeout=5)
    assert frame.kind == "D" and frame.body["text"] == "fine", frame
    with pytest.raises(TimeoutError):
        reader.recv(timeout=0.5)
    assert node.log().count("dropping a malformed bm entry") == len(bad)


def test_nodes_over_rediss_serve_a_bm_end_to_end(tmp_path, tls_files, keys):
    """Two nodes whose only way to Redis is rediss:// (TLS to its tls-port, verified against
    the test CA, with AUTH) are one room: a BM from a user on A reaches a user on B."""
    redis = RedisProcess(str(tmp_path / "tls-redis"), tls=tls_files, password="node pw").start()
    url = redis.rediss_url(db=0, password="node pw")
    key_file = str(tmp_path / "room_server_key.pem")
    nodes: list[ServerProcess] = []
    clients: list[WireClient] = []
    try:
        for i in range(2):
            data = tmp_path / f"node{i}"
            data.mkdir()
            nodes.append(ServerProcess(str(data), "--redis", url, "--server-key", key_file, *NODE_ARGS).start())
        for i, node in enumerate(nodes):
            client = WireClient(node.port, timeout=10)
            clients.append(client)
            client.login(("ann", "bob")[i], secret(("ann", "bob")[i]), keys(i))
        ann, bob = clients
        settle([ann, bob])
        sent = ann.bm("hello over TLS")
        assert sent == {"op": "SEND", "ok": True, "recipients": 1, "ts": sent["ts"]}
        message = bob.wait_data("BM", timeout=5)
        assert message["from"] == "ann" and message["text"] == "hello over TLS" and message["ts"] == sent["ts"]
        assert bm_texts(history(bob)) == [("ann", "hello over TLS")]
        with BlockingRedis(redis.rediss_url(password="node pw")) as r:
            assert r.call("XLEN", "chat:room") == 1
            clients_seen = r.call("CLIENT", "LIST")
        assert isinstance(clients_seen, bytes) and clients_seen.count(b"laddr=127.0.0.1:%d" % redis.tls_port) >= 5
        assert b"laddr=127.0.0.1:%d" % redis.port not in clients_seen      # nothing came in plain
    finally:
        for client in clients:
            client.close()
        for node in nodes:
            node.kill()
            print(f"--- node on port {node.port}, log tail ---\n{node.log()[-3000:]}")
        redis.kill()


# --- offline PMs across nodes (docs/PROTOCOL.md sections 4.5 and 5) --------------------------------

def offline_target(client: WireClient, name: str) -> dict:
    assert client.request({"op": "PM"})["ok"]
    reply = client.request({"op": "TARGET", "username": name, "offline": True})
    assert reply["ok"], reply
    return reply


def offline_send(client: WireClient, reply: dict, text: str) -> tuple[dict, dict]:
    assert client.keys is not None
    their_key = pg3lib.PublicKey.from_key_form(reply["public_key"])
    body = pm2_send(client.keys, client.username, reply["username"], their_key.seal(text.encode()).decode("ascii"),
                    client.keys.public.seal(text.encode()).decode("ascii"))
    return body, client.request(body)


def test_offline_pm_kept_on_one_node_reaches_the_target_on_the_other_across_a_redis_kill(cluster, keys):
    a, b = cluster.node(), cluster.node()
    alice = cluster.login(a, "alice", 0)
    bob = cluster.login(b, "bob", 1)
    settle([alice, bob])
    bob.exit()
    wait_presence(alice, "bob", False, time.monotonic() + 10, "bob's logout")
    assert alice.request({"op": "PM"})["ok"]
    assert alice.request({"op": "TARGET", "username": "bob"})["error"] == "not_online"
    assert alice.request({"op": "PM"})["ok"]
    assert alice.request({"op": "TARGET", "username": "nobody", "offline": True})["error"] == "no_such_user"
    reply = offline_target(alice, "bob")
    assert reply["online"] is False and reply["fingerprint"] == keys(1).fingerprint
    sent = [offline_send(alice, offline_target(alice, "bob") if i else reply, f"kept {i}") for i in range(2)]
    assert [r for _, r in sent] == [{"op": "SEND", "ok": True, "recipients": 0}] * 2
    # Acknowledged, so it survives Redis's SIGKILL (AOF always).
    cluster.redis.kill()
    cluster.redis.restart()
    deadline = time.monotonic() + 20
    bob = cluster.login_retry(b, "bob", 1, deadline)
    frames = [bob.recv(5.0) for _ in range(2)]
    assert [(f.kind, f.body["op"], f.body.get("offline")) for f in frames] == [("D", "PM", True)] * 2
    assert [f.body["id"] for f in frames] == [body["id"] for body, _ in sent]
    assert all(verify_pm2(f.body, "bob") for f in frames)
    assert [e["id"] for e in history(bob) if e["type"] == "PM"] == [body["id"] for body, _ in sent]
    assert not [d for d in bob.data if d["op"] == "PM"]
    bob.exit()
    again = cluster.login_retry(a, "bob", 1, time.monotonic() + 20)   # the other node: nothing again
    history(again)
    assert not [d for d in again.data if d["op"] == "PM"]


def test_offline_target_that_logs_in_on_another_node_before_send_gets_it_live(cluster, keys):
    a, b = cluster.node(), cluster.node()
    alice = cluster.login(a, "alice", 0)
    cluster.login(b, "bob", 1).exit()
    wait_presence(alice, "bob", False, time.monotonic() + 10, "bob's logout")
    reply = offline_target(alice, "bob")
    assert reply["online"] is False
    bob = cluster.login(b, "bob", 1)
    wait_presence(alice, "bob", True, time.monotonic() + 10, "bob's login")
    body, sent = offline_send(alice, reply, "live after all")
    assert sent == {"op": "SEND", "ok": True, "recipients": 1}
    got = bob.wait_data("PM", timeout=10)
    assert got["id"] == body["id"] and "offline" not in got
