"""The real chatserver.py process over real loopback sockets: the protocol end to end.

CHAT_TEST_REDIS=1 runs these against a node in Redis mode (see conftest.py);
the tests marked ``filestore_only`` (data directory contents, torn .chat
lines, accounts.jsonl) are skipped then.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest

import course_pg3lib
import framing
import pg3lib
import protocol
from serverproc import SERVER, ServerProcess, redis_mode
from wire import WireClient, pm2_send, verify_pm2

PASSWORD = "correct horse"
FILE_STORE = not redis_mode()   # the data directory is the store: its files can be checked


def online(connect, keys, *names: str) -> list[WireClient]:
    """Log each name in (registering it if new) and drain the presence frames."""
    clients = []
    for i, name in enumerate(names):
        client = connect()
        client.login(name, PASSWORD + name, keys(i))
        clients.append(client)
    for i, client in enumerate(clients):
        for other in names[i + 1:]:
            client.wait_data("PRESENCE", username=other, online=True)
    return clients


# --- invocation ----------------------------------------------------------------------

def test_ready_line_names_the_real_port(server):
    assert server.port > 0
    assert f"listening on 127.0.0.1:{server.port}" in server.log()


def test_help_explains_every_option():
    out = subprocess.run([sys.executable, SERVER, "--help"], capture_output=True, text=True, timeout=20).stdout
    for option in ("PORT", "--host", "--data", "--login-timeout", "--max-clients", "--log-level",
                   "--frame-limit", "--send-queue", "--max-per-ip", "--flood-rate", "--flood-burst",
                   "--scrypt-n", "--register-rate", "--login-delay-cap", "--require-tls", "--accept-pm1",
                   "--no-accept-pm1", "--offline-limit", "--offline-per-sender", "--recent", "--catch-up-limit",
                   "--history-readers"):
        assert option in out


def test_port_in_use_is_one_line_and_status_1(server, tmp_path):
    """A port in use is a run-time failure (1), not bad arguments (2, what argparse exits with)."""
    result = subprocess.run([sys.executable, SERVER, str(server.port), "--host", "127.0.0.1",
                             "--data", str(tmp_path / "other")], capture_output=True, text=True, timeout=20)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "cannot listen" in result.stderr


@pytest.mark.filestore_only
def test_unwritable_data_directory_is_one_line_and_status_2(tmp_path):
    target = tmp_path / "file"
    target.write_text("not a directory")
    result = subprocess.run([sys.executable, SERVER, "0", "--host", "127.0.0.1", "--data", str(target / "d")],
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_bad_arguments_exit_2():
    result = subprocess.run([sys.executable, SERVER, "notaport"], capture_output=True, text=True, timeout=20)
    assert result.returncode == 2 and "usage" in result.stderr


# --- login and registration ----------------------------------------------------------

def test_register_then_log_in_again_keeps_spelling(connect, keys, server):
    first = connect()
    reply = first.login_start("Alice")
    assert reply["ok"] and reply["new_user"] is True
    assert reply["fingerprint"] == first.server_key.fingerprint
    assert len(base64.b64decode(reply["nonce"])) == 16
    reply = first.password(PASSWORD)
    assert reply == {"op": "PASSWORD", "ok": True, "new_user": True, "username": "Alice"}
    assert first.key(keys(0))["ok"]
    assert first.exit() == {"op": "EX", "ok": True}
    assert first.recv_until_closed() == []

    second = connect()
    reply = second.login_start("ALICE")
    assert reply["new_user"] is False
    assert second.password(PASSWORD) == {"op": "PASSWORD", "ok": True, "new_user": False, "username": "Alice"}
    if FILE_STORE:
        assert os.path.exists(os.path.join(server.data_dir, "Alice.chat"))


def test_course_helper_and_old_form_passwords_both_log_in(connect, keys):
    """A course-style client seals with the course's pg3lib; a client from before
    the fix seals without the outer base64 (docs/PROTOCOL.md section 8): both get in."""
    course = connect()
    reply = course.login_start("coursey")
    plain = base64.b64decode(reply["nonce"]) + PASSWORD.encode()
    sealed = course_pg3lib.encrypt(plain, reply["server_key"].encode()).decode("ascii")
    assert course.request({"op": "PASSWORD", "ciphertext": sealed})["ok"]
    assert course.key(keys(0))["ok"]
    course.exit()
    old = connect(legacy_seal=True)
    old.login_start("coursey")
    assert old.sealed_password(PASSWORD).split(";")[1].startswith("gAAAAA")
    assert old.password(PASSWORD) == {"op": "PASSWORD", "ok": True, "new_user": False, "username": "coursey"}


def test_each_login_attempt_gets_a_fresh_nonce(connect):
    nonces = {base64.b64decode(connect().login_start("nonce")["nonce"]) for _ in range(3)}
    assert len(nonces) == 3


def test_wrong_password_three_times_then_bye(connect, keys):
    online(connect, keys, "carol")[0].exit()
    client = connect()
    client.login_start("carol")
    for left in (2, 1, 0):
        reply = client.password("not the password")
        assert reply["error"] == "wrong_password" and reply["attempts_left"] == left
    assert client.recv_until_closed() == [framing.Frame("C", {"op": "BYE", "reason": "too_many_failures"})]


def test_replayed_password_from_another_connection_is_refused(connect, keys):
    online(connect, keys, "dave")[0].exit()
    first = connect()
    first.login_start("dave")
    captured = first.sealed_password(PASSWORD + "dave")
    second = connect()
    second.login_start("dave")
    reply = second.request({"op": "PASSWORD", "ciphertext": captured})
    assert reply["error"] == "bad_request" and reply["attempts_left"] == 2
    garbage = second.request({"op": "PASSWORD", "ciphertext": "nonsense;nonsense"})
    assert garbage["error"] == "bad_request" and garbage["attempts_left"] == 1


@pytest.mark.parametrize("password", ["short", "x" * 257, "é" * 129])
def test_weak_password_is_not_an_attempt(connect, password):
    client = connect()
    client.login_start("weakling")
    for _ in range(4):
        reply = client.password(password)
        assert reply["error"] == "weak_password" and "attempts_left" not in reply
    assert client.password("long enough now")["ok"]


@pytest.mark.parametrize("name", ["../x", "a/b", "", "x" * 33, ".hidden", "-dash", "a b", "é", 7, None])
def test_invalid_usernames(connect, server, name):
    client = connect()
    reply = client.request({"op": "LOGIN", "username": name})
    # Not a string is an ill-typed member (section 3); a string off the grammar, not a username.
    assert reply["ok"] is False and reply["error"] == ("invalid_username" if isinstance(name, str) else "bad_request")
    assert client.login_start("fine_name")["ok"]      # the state is unchanged
    if FILE_STORE:
        assert not [name for name in os.listdir(server.data_dir) if name.endswith(".chat")]


def test_longest_username_is_fine(connect):
    assert connect().login_start("a" * 32)["ok"]


def test_bad_key_is_refused(connect, keys):
    client = connect()
    client.login_start("keyless")
    client.password(PASSWORD)
    small = pg3lib.RSA.generate(1024)
    short_form = base64.b64encode(small.public_key().export_key("PEM")).decode()
    for bad in (short_form, "bm9wZQ==", 12, None):
        reply = client.request({"op": "KEY", "public_key": bad})
        assert reply["error"] == "bad_request"
    private_form = base64.b64encode(keys(0).to_pem()).decode()
    assert client.request({"op": "KEY", "public_key": private_form})["error"] == "bad_request"
    assert client.key(keys(0))["ok"]


def test_takeover_by_a_second_login(connect, keys):
    alice, bob = online(connect, keys, "alice", "bob")
    again = connect()
    again.login_start("alice")
    assert again.password(PASSWORD + "alice")["ok"]
    assert alice.recv_until_closed() == [framing.Frame("C", {"op": "BYE", "reason": "replaced"})]
    assert bob.wait_data("PRESENCE", username="alice")["online"] is False
    assert again.key(keys(0))["online"] == ["bob"]
    assert bob.wait_data("PRESENCE", username="alice")["online"] is True


def test_simultaneous_logins_of_one_account_leave_one_session(connect, keys):
    online(connect, keys, "twin")[0].exit()
    clients = [connect() for _ in range(4)]
    for client in clients:
        client.login_start("twin")
    for client in clients:   # all four hash at once
        client.send({"op": "PASSWORD", "ciphertext": client.sealed_password(PASSWORD + "twin")})
    survivors = []
    for client in clients:
        frames = []
        try:
            frames = client.recv_until_closed(timeout=3)
        except TimeoutError:
            survivors.append(client)
        if frames:
            assert frames[0].body["op"] == "PASSWORD" and frames[0].body["ok"]
    assert len(survivors) == 1
    watcher = online(connect, keys, "watcher")[0]
    watcher.request({"op": "PM"})
    assert watcher.request({"op": "TARGET", "username": "twin"})["error"] == "not_online"
    survivor = survivors[0]
    assert survivor.key(keys(1))["ok"]


# --- BM, PM, presence -------------------------------------------------------------------

def test_bm_fans_out_to_everyone_else_with_presence(connect, keys):
    names = ["ann", "ben", "cat", "dan"]
    clients = online(connect, keys, *names)
    reply = clients[0].bm("hello all ☃")
    assert reply == {"op": "SEND", "ok": True, "recipients": 3, "ts": clients[1].wait_data("BM")["ts"]}
    for client in clients[2:]:
        message = client.wait_data("BM")
        assert message["from"] == "ann" and message["text"] == "hello all ☃" and message["ts"] == reply["ts"]
    assert protocol.parse_timestamp(reply["ts"]) is not None   # the SEND reply says when it was stored
    clients[3].exit()
    for client in clients[:3]:
        assert client.wait_data("PRESENCE", username="dan")["online"] is False
    assert clients[1].bm("after dan left")["recipients"] == 2
    with pytest.raises(TimeoutError):
        clients[1].wait_data("BM", timeout=0.3)   # the sender gets no copy


def test_bm_text_limits(connect, keys):
    (client,) = online(connect, keys, "limits")
    assert client.request({"op": "BM"})["ok"]
    for bad in ("", "  \n\t", "x" * 4097, 5, None):
        reply = client.request({"op": "SEND", "text": bad})
        assert reply["error"] == "bad_request"
    assert client.request({"op": "SEND", "text": "😀" * 4096})["ok"]


def test_pm_end_to_end(connect, keys):
    alice, bob = online(connect, keys, "alice", "bob")
    assert alice.request({"op": "PM"}) == {"op": "PM", "ok": True, "online": ["bob"]}
    target = alice.request({"op": "TARGET", "username": "BOB"})
    assert target["username"] == "bob" and target["fingerprint"] == keys(1).fingerprint
    assert pg3lib.PublicKey.from_key_form(target["public_key"]) == keys(1).public
    alice.send({"op": "CANCEL"})
    assert alice.reply("CANCEL")["ok"]
    assert alice.pm("bob", "psst, bob") == {"op": "SEND", "ok": True, "recipients": 1}
    message = bob.wait_data("PM")
    assert keys(1).open(message["ciphertext"]) == b"psst, bob"
    sender = pg3lib.PublicKey.from_key_form(message["sender_key"])
    assert sender == keys(0).public
    assert verify_pm2(message, "bob")


def test_pm_with_a_forged_signature_is_refused(connect, keys):
    alice, bob = online(connect, keys, "alice", "bob")
    alice.request({"op": "PM"})
    alice.request({"op": "TARGET", "username": "bob"})
    sealed = keys(1).public.seal(b"x").decode()
    forged = pm2_send(keys(2), "alice", "bob", sealed, sealed)
    reply = alice.request(forged)
    assert reply["error"] == "bad_request"
    assert alice.request(pm2_send(keys(0), "alice", "bob", sealed, sealed))["ok"]


def test_pm_targets_that_are_not_online(connect, keys):
    alice, bob = online(connect, keys, "alice", "bob")
    alice.request({"op": "PM"})
    assert alice.request({"op": "TARGET", "username": "nobody"})["error"] == "no_such_user"
    alice.request({"op": "PM"})
    assert alice.request({"op": "TARGET", "username": "alice"})["error"] == "bad_request"
    # the target leaves between TARGET and SEND
    alice.request({"op": "PM"})
    assert alice.request({"op": "TARGET", "username": "bob"})["ok"]
    bob.exit()
    alice.wait_data("PRESENCE", username="bob", online=False)
    sealed = keys(1).public.seal(b"x").decode()
    reply = alice.request(pm2_send(keys(0), "alice", "bob", sealed, sealed))
    assert reply["error"] == "not_online"
    assert [e for e in alice.history() if e["type"] == "PM"] == []   # back in READY; nothing stored


# --- offline PMs and no_such_user (docs/PROTOCOL.md sections 4.5 and 5) ----------------------------

def target(client: WireClient, name: str, **extra) -> dict:
    assert client.request({"op": "PM"})["ok"]
    return client.request({"op": "TARGET", "username": name, **extra})


def offline_pm(client: WireClient, name: str, text: str) -> tuple[dict, dict]:
    """PM, TARGET with offline:true, SEND; returns (the SEND body, its reply)."""
    reply = target(client, name, offline=True)
    assert reply["ok"] and reply["online"] is False, reply
    body = client.pm_send(reply["username"], pg3lib.PublicKey.from_key_form(reply["public_key"]), text)
    return body, client.request(body)


def gone(connect, keys, name: str, i: int) -> None:
    """name registered, key i given in KEY, and logged out."""
    client = connect()
    client.login(name, PASSWORD + name, keys(i))
    client.exit()
    client.recv_until_closed()


def kept_after_login(client: WireClient, name: str, keys, i: int, count: int) -> list[dict]:
    """Log in and return the frames right after the KEY reply: the count kept PMs (D PM, offline:true)."""
    client.login(name, PASSWORD + name, keys(i))
    frames = [client.recv() for _ in range(count)]
    assert all(f.kind == "D" and f.body["op"] == "PM" and f.body["offline"] is True for f in frames), frames
    return [f.body for f in frames]


def no_pm_waiting(client: WireClient) -> None:
    client.history(limit=1)   # a round trip: a D PM sent after KEY would have come before its reply
    assert not [d for d in client.data if d["op"] == "PM"], client.data


def test_no_such_user_versus_not_online(connect, keys):
    (alice,) = online(connect, keys, "alice")
    gone(connect, keys, "bob", 1)
    for name in ("nobody", "not a name", "x" * 33):
        assert target(alice, name)["error"] == "no_such_user"
        assert target(alice, name, offline=True)["error"] == "no_such_user"
    assert target(alice, "BOB")["error"] == "not_online"
    assert target(alice, "alice", offline=True)["error"] == "bad_request"
    assert alice.request({"op": "SEND", "text": "x"})["error"] == "unexpected"   # every refusal: READY
    # An account that never completed KEY has no key to seal to.
    carol = connect()
    carol.login_start("carol")
    assert carol.password(PASSWORD)["ok"]
    carol.close()
    assert target(alice, "carol", offline=True)["error"] == "not_online"


def test_target_offline_gives_the_last_key(connect, keys):
    (alice,) = online(connect, keys, "alice")
    gone(connect, keys, "Bob", 1)
    reply = target(alice, "bob", offline=True)
    assert reply == {"op": "TARGET", "ok": True, "username": "Bob", "online": False,
                     "public_key": keys(1).public.key_form, "fingerprint": keys(1).fingerprint}
    alice.send({"op": "CANCEL"})
    alice.reply("CANCEL")
    gone(connect, keys, "Bob", 2)
    assert target(alice, "bob", offline=True)["fingerprint"] == keys(2).fingerprint
    alice.send({"op": "CANCEL"})
    alice.reply("CANCEL")
    bob = connect()
    bob.login("bob", PASSWORD + "Bob", keys(2))
    assert target(alice, "bob", offline=True)["online"] is True   # online: its current key, live


def test_offline_pms_delivered_after_key_once_in_order_and_in_history(connect, keys):
    (alice,) = online(connect, keys, "alice")
    gone(connect, keys, "bob", 1)
    sent = []
    for text in ("one", "two", "three"):
        body, reply = offline_pm(alice, "bob", text)
        assert reply == {"op": "SEND", "ok": True, "recipients": 0}
        sent.append(body)
    assert [e["id"] for e in alice.history() if e["type"] == "PM"] == [b["id"] for b in sent]
    bob = connect()
    got = kept_after_login(bob, "bob", keys, 1, 3)
    assert [g["id"] for g in got] == [b["id"] for b in sent]
    assert [keys(1).open(g["ciphertext"]) for g in got] == [b"one", b"two", b"three"]
    assert all(verify_pm2(g, "bob") for g in got)
    history = [e for e in bob.history() if e["type"] == "PM"]
    assert [e["id"] for e in history] == [b["id"] for b in sent]
    assert [e["ciphertext"] for e in history] == [b["ciphertext"] for b in sent]
    no_pm_waiting(bob)
    bob.exit()
    again = connect()
    again.login("bob", PASSWORD + "bob", keys(1))
    no_pm_waiting(again)


def test_offline_pms_are_bounded(make_server, keys):
    server = make_server("--offline-limit", "2")
    alice = WireClient(server.port)
    alice.login("alice", PASSWORD, keys(0))
    bob = WireClient(server.port)
    bob.login("bob", PASSWORD, keys(1))
    bob.exit()
    alice.wait_data("PRESENCE", username="bob", online=False)
    assert [offline_pm(alice, "bob", t)[1]["ok"] for t in ("a", "b")] == [True, True]
    _, reply = offline_pm(alice, "bob", "c")
    assert reply["error"] == "rate_limited"
    assert alice.request({"op": "CANCEL"})["error"] == "unexpected"   # READY
    assert len([e for e in alice.history() if e["type"] == "PM"]) == 2
    bob = WireClient(server.port)
    bob.login("bob", PASSWORD, keys(1))
    assert [keys(1).open(f.body["ciphertext"]) for f in (bob.recv(), bob.recv())] == [b"a", b"b"]
    bob.exit()
    assert offline_pm(alice, "bob", "d")[1]["ok"]
    alice.close()


def test_one_sender_cannot_fill_an_offline_users_pms_for_everyone_else(make_server, keys):
    """--offline-per-sender: alice's third kept PM for bob is refused (her share), carol can
    still leave one, and then the bound for bob refuses carol's next; once bob has logged in
    and taken them, alice's count starts again."""
    server = make_server("--offline-limit", "3", "--offline-per-sender", "2")
    alice, carol, bob = (WireClient(server.port) for _ in range(3))
    for i, (c, name) in enumerate(((alice, "alice"), (carol, "carol"), (bob, "bob"))):
        c.login(name, PASSWORD, keys(i))
    bob.exit()
    for c in (alice, carol):
        c.wait_data("PRESENCE", username="bob", online=False)
    assert [offline_pm(alice, "bob", t)[1]["ok"] for t in ("a1", "a2")] == [True, True]
    _, reply = offline_pm(alice, "bob", "a3")
    assert reply["error"] == "rate_limited" and "2 of your private messages" in reply["message"], reply
    assert offline_pm(carol, "bob", "c1")[1]["ok"]
    _, reply = offline_pm(carol, "bob", "c2")
    assert reply["error"] == "rate_limited" and reply["message"].startswith("too many"), reply
    bob = WireClient(server.port)
    bob.login("bob", PASSWORD, keys(2))
    assert [keys(2).open(bob.recv().body["ciphertext"]) for _ in range(3)] == [b"a1", b"a2", b"c1"]
    bob.exit()
    alice.wait_data("PRESENCE", username="bob", online=False)
    assert [offline_pm(alice, "bob", t)[1]["ok"] for t in ("a4", "a5")] == [True, True]
    for c in (alice, carol):
        c.close()


def test_offline_pms_and_last_keys_survive_sigkill(connect, keys, server):
    (alice,) = online(connect, keys, "alice")
    gone(connect, keys, "bob", 1)
    body, reply = offline_pm(alice, "bob", "kept")
    assert reply["ok"]
    server.kill()
    server.start(server.port)
    alice = WireClient(server.port)
    alice.login("alice", PASSWORD + "alice", keys(0))
    assert target(alice, "bob", offline=True)["public_key"] == keys(1).public.key_form
    bob = WireClient(server.port)
    assert [g["id"] for g in kept_after_login(bob, "bob", keys, 1, 1)] == [body["id"]]
    for client in (alice, bob):
        client.close()


@pytest.mark.filestore_only
def test_offline_pm_files_in_the_data_directory(connect, keys, server):
    (alice,) = online(connect, keys, "alice")
    gone(connect, keys, "Bob", 1)
    offline_pm(alice, "bob", "x")
    with open(os.path.join(server.data_dir, "Bob.key")) as fh:
        assert fh.read().strip() == keys(1).public.key_form
    with open(os.path.join(server.data_dir, "Bob.offline"), "rb") as fh:
        (line,) = fh.read().splitlines()
    assert json.loads(line)["offline"] is True
    bob = connect()
    kept_after_login(bob, "Bob", keys, 1, 1)
    assert not os.path.exists(os.path.join(server.data_dir, "Bob.offline"))


# --- CH and persistence -------------------------------------------------------------------

def test_history_after_bm_and_pm_and_across_a_restart(connect, keys, server):
    alice, bob = online(connect, keys, "alice", "bob")
    alice.bm("one")
    bob.bm("two")
    alice.pm("bob", "three")
    bob.wait_data("PM")
    entries = alice.history()
    assert [(e["type"], e["from"], e["to"]) for e in entries] == [("BM", "alice", "*"), ("BM", "bob", "*"),
                                                                 ("PM", "alice", "bob")]
    assert [e.get("text") for e in entries[:2]] == ["one", "two"]
    assert keys(0).open(entries[2]["ciphertext"]) == b"three"        # self_copy
    bob_entries = bob.history()
    assert keys(1).open(bob_entries[2]["ciphertext"]) == b"three"    # ciphertext
    assert bob.history(limit=2) == bob_entries[1:]

    server.restart()
    again = WireClient(server.port)
    again.login("alice", PASSWORD + "alice", keys(0))
    assert again.history() == entries
    again.close()


# --- recent broadcasts at login, and catching up (section 11) -------------------------------

def recent_at_login(client: WireClient, name: str, keys, i: int, **key_members) -> list[dict]:
    """LOGIN, PASSWORD, KEY (with key_members): the D frames that came between the KEY reply and
    the reply of a round trip after it (the room's recent BMs, and any live frame)."""
    assert client.login_start(name)["ok"]
    assert client.password(PASSWORD + name)["ok"]
    client.keys = keys(i)
    reply = client.request({"op": "KEY", "public_key": keys(i).public.key_form, "recent": True, **key_members})
    assert reply["ok"], reply
    client.request({"op": "CANCEL"})   # a round trip ("unexpected" in READY): what KEY sent has come
    got, client.data = client.data, []
    return got


def test_recent_broadcasts_at_login(make_server, keys):
    server = make_server("--recent", "3")
    (alice,) = online(lambda: WireClient(server.port), keys, "alice")
    stamps = [alice.bm(f"m{n}")["ts"] for n in range(1, 6)]
    bob = WireClient(server.port)
    got = recent_at_login(bob, "bob", keys, 1)
    assert [(g["op"], g["from"], g["text"], g["ts"], g["recent"]) for g in got] == \
        [("BM", "alice", f"m{n}", stamps[n - 1], True) for n in (3, 4, 5)]
    alice.bm("live")
    live = bob.wait_data("BM")
    assert live["text"] == "live" and "recent" not in live
    assert [e["text"] for e in bob.history()] == ["live"]   # recent BMs are shown, not made its history
    # A client of the course protocol does not ask for them (KEY without "recent"), and gets none.
    dave = WireClient(server.port)
    assert recent_at_login(dave, "dave", keys, 3, recent=False) == []
    for client in (alice, bob, dave):
        client.close()
    server.extra += ["--recent", "0"]   # the last of a repeated option wins
    server.restart()
    carol = WireClient(server.port)
    assert recent_at_login(carol, "carol", keys, 2) == []
    carol.close()


def test_recent_broadcasts_survive_a_restart(connect, keys, server):
    (alice,) = online(connect, keys, "alice")
    for text in ("before", "the restart"):
        alice.bm(text)
    server.restart()
    bob = WireClient(server.port)
    assert [g["text"] for g in recent_at_login(bob, "bob", keys, 1)] == ["before", "the restart"]
    bob.close()


def test_catch_up_since_the_last_broadcast_seen(make_server, keys):
    server = make_server("--catch-up-limit", "3")
    alice, bob = online(lambda: WireClient(server.port), keys, "alice", "bob")
    alice.bm("seen")
    last = bob.wait_data("BM")["ts"]
    bob.close()   # the connection drops
    alice.wait_data("PRESENCE", username="bob", online=False)
    alice.bm("a")
    alice.bm("b")
    again = WireClient(server.port)
    got = recent_at_login(again, "bob", keys, 1, since=last)
    # From its last one on (the client drops the one it has seen: same ts, sender and text).
    assert [(g["text"], g["recent"]) for g in got] == [("seen", True), ("a", True), ("b", True)]
    again.close()
    for text in ("c", "d", "e", "f"):
        alice.bm(text)
    third = WireClient(server.port)
    assert [g["text"] for g in recent_at_login(third, "bob", keys, 1, since=last)] == ["d", "e", "f"]
    third.close()
    fourth = WireClient(server.port)
    assert recent_at_login(fourth, "bob", keys, 1, since="2999-01-01T00:00:00.000Z") == []
    fourth.close()
    alice.close()


@pytest.mark.parametrize("member", [{"since": bad} for bad in (17, None, "yesterday", "2026-13-01T00:00:00.000Z", "")]
                         + [{"recent": bad} for bad in ("yes", 1, None)])
def test_bad_since_or_recent_is_bad_request_and_key_can_be_sent_again(connect, keys, member):
    client = connect()
    assert client.login_start("alice")["ok"] and client.password(PASSWORD + "alice")["ok"]
    reply = client.request({"op": "KEY", "public_key": keys(0).public.key_form, **member})
    assert reply["ok"] is False and reply["error"] == "bad_request"
    assert client.key(keys(0))["ok"]


def test_history_empty_and_bad_limit(connect, keys):
    (client,) = online(connect, keys, "fresh")
    client.send({"op": "CH"})
    assert client.reply("CH") == {"op": "CH", "ok": True, "entries": [], "more": False}
    for bad in (0, -1, "3", 1.5, True):
        assert client.request({"op": "CH", "limit": bad})["error"] == "bad_request"


def test_history_longer_than_one_frame(connect, keys):
    (client,) = online(connect, keys, "writer")
    texts = [f"{i:03d}" + "x" * 3996 for i in range(40)]   # about 160 KB of history
    for text in texts:
        assert client.bm(text)["ok"]
    client.send({"op": "CH"})
    frames = []
    while True:
        frames.append(client.reply("CH"))
        if not frames[-1]["more"]:
            break
    assert len(frames) >= 3
    assert [e["text"] for f in frames for e in f["entries"]] == texts
    assert client.history(limit=5) == [e for f in frames for e in f["entries"]][-5:]


@pytest.mark.filestore_only
def test_torn_last_history_line_is_skipped(connect, keys, server):
    (client,) = online(connect, keys, "torn")
    client.bm("kept")
    server.kill()   # as if it died in the middle of writing a line
    with open(os.path.join(server.data_dir, "torn.chat"), "ab") as fh:
        fh.write(b'{"ts":"2026-11-24T15:04:05.123Z","type":"BM","fr')
    server.start(server.port)
    client = WireClient(server.port)
    client.login("torn", PASSWORD + "torn", keys(0))
    assert [e["text"] for e in client.history()] == ["kept"]
    client.bm("after the tear")
    assert [e["text"] for e in client.history()] == ["kept", "after the tear"]


@pytest.mark.filestore_only
def test_data_directory_contents(connect, keys, server):
    online(connect, keys, "secretive")[0].exit()
    key_file = os.path.join(server.data_dir, "server_key.pem")
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    accounts = open(os.path.join(server.data_dir, "accounts.jsonl")).read()
    record = json.loads(accounts.splitlines()[0])
    assert record["username"] == "secretive" and record["scrypt"]["n"] >= 2 and record["salt"]
    assert (PASSWORD + "secretive") not in accounts and (PASSWORD + "secretive") not in server.log()
    fingerprint = WireClient(server.port).login_start("x")["fingerprint"]
    server.restart()
    assert WireClient(server.port).login_start("x")["fingerprint"] == fingerprint


# --- the state machine over the wire ----------------------------------------------------

def test_unexpected_ops_and_cancel(connect, keys):
    client = connect()
    reply = client.request({"op": "BM"})
    assert reply["error"] == "unexpected" and "LOGIN" in reply["message"]
    assert client.request({"op": "WHATEVER", "x": 1})["error"] == "unexpected"
    client.login("canceller", PASSWORD, keys(0))
    assert client.request({"op": "CANCEL"})["error"] == "unexpected"
    for op in ("BM", "PM"):
        assert client.request({"op": op})["ok"]
        assert client.request({"op": "CANCEL"}) == {"op": "CANCEL", "ok": True}
    assert client.request({"op": "BM"})["ok"]
    assert client.request({"op": "CH"})["error"] == "unexpected"
    assert client.request({"op": "SEND", "text": "still works", "extra": [1, 2]})["ok"]


def test_pipelined_requests_are_answered_in_order(connect, keys):
    (client,) = online(connect, keys, "piper")
    burst = b"".join(framing.command(body) for body in (
        {"op": "BM"}, {"op": "SEND", "text": "a"}, {"op": "BM"}, {"op": "SEND", "text": "b"},
        {"op": "CH"}, {"op": "EX"}))
    client.send_raw(burst)
    ops = [f.body["op"] for f in client.recv_until_closed()]
    assert ops == ["BM", "SEND", "BM", "SEND", "CH", "EX"]


def test_login_pipelined_in_one_write(connect, keys):
    client = connect()
    client.login_start("pipelogin")
    sealed = client.sealed_password(PASSWORD)
    client.send_raw(framing.command({"op": "PASSWORD", "ciphertext": sealed})
                    + framing.command({"op": "KEY", "public_key": keys(0).public.key_form})
                    + framing.command({"op": "BM"}) + framing.command({"op": "SEND", "text": "hi"}))
    assert [client.reply(op)["ok"] for op in ("PASSWORD", "KEY", "BM", "SEND")] == [True] * 4


def test_bytes_arriving_one_at_a_time(connect, keys):
    client = connect()
    for byte in framing.command({"op": "LOGIN", "username": "slowpoke"}):
        client.send_raw(bytes([byte]))
        time.sleep(0.001)
    assert client.reply("LOGIN")["ok"]


@pytest.mark.parametrize("garbage", [b"X\x00\x00\x00\x02{}", b"C\xff\xff\xff\xff", b"C\x00\x00\x00\x02[]",
                                     b"C\x00\x00\x00\x04\xff\xfe{}", b'C\x00\x00\x00\x08{"op":1}'])
def test_garbage_closes_that_client_only(connect, keys, garbage):
    alice, bob = online(connect, keys, "alice", "bob")
    bad = connect()
    bad.send_raw(garbage)
    frames = bad.recv_until_closed()
    assert len(frames) == 1 and frames[0].body["op"] == "ERROR" and frames[0].body["error"] == "bad_frame"
    assert alice.bm("still here")["recipients"] == 1
    assert bob.wait_data("BM")["text"] == "still here"


def test_bad_frame_after_good_requests_loses_nothing(connect, keys):
    (client,) = online(connect, keys, "mixed")
    client.send_raw(framing.command({"op": "BM"}) + framing.command({"op": "SEND", "text": "first"})
                    + b"Z\x00\x00\x00\x00")
    frames = client.recv_until_closed()
    assert [f.body["op"] for f in frames] == ["BM", "SEND", "ERROR"]
    again = connect()
    again.login("mixed", PASSWORD + "mixed", keys(0))
    assert [e["text"] for e in again.history()] == ["first"]


def test_disconnect_mid_operation_goes_offline(connect, keys):
    alice, bob = online(connect, keys, "alice", "bob")
    bob.request({"op": "PM"})
    bob.send_raw(framing.command({"op": "TARGET", "username": "alice"})[:7])   # mid-frame
    bob.close()
    assert alice.wait_data("PRESENCE", username="bob")["online"] is False
    assert alice.bm("alone")["recipients"] == 0


# --- signals and crashes ------------------------------------------------------------------

def test_sigterm_says_bye_and_exits_0(connect, keys, server):
    clients = online(connect, keys, "alice", "bob")
    half = connect()
    half.login_start("halfway")
    code = server.stop()
    assert code == 0
    for client in clients + [half]:
        frames = client.recv_until_closed()
        assert frames[-1] == framing.Frame("C", {"op": "BYE", "reason": "shutdown"})


def test_sigkill_loses_nothing_acknowledged(connect, keys, server):
    alice, bob = online(connect, keys, "alice", "bob")
    acked = []
    for i in range(30):
        if alice.bm(f"m{i}")["ok"]:
            acked.append(f"m{i}")
    server.kill()
    server.start(server.port)
    again = WireClient(server.port)
    again.login("bob", PASSWORD + "bob", keys(1))
    assert [e["text"] for e in again.history()] == acked
    again.close()


def test_slow_login_does_not_delay_others(make_server, keys):
    # A real scrypt cost: four logins at N=2**16 keep the worker pool busy for a while.
    server = make_server(scrypt_n=2 ** 16)
    alice = WireClient(server.port)
    alice.login("alice", PASSWORD, keys(0))
    hashing = [WireClient(server.port) for _ in range(4)]
    for i, client in enumerate(hashing):
        client.login_start(f"newcomer{i}")
    started = time.monotonic()
    for client in hashing:
        client.send({"op": "PASSWORD", "ciphertext": client.sealed_password(PASSWORD)})
    round_trips = []
    while len(round_trips) < 10:
        t0 = time.monotonic()
        assert alice.bm("ping")["ok"]
        round_trips.append(time.monotonic() - t0)
    for client in hashing:
        assert client.reply("PASSWORD", timeout=30)["ok"]
    hashing_time = time.monotonic() - started
    assert max(round_trips) < 0.25, round_trips
    assert sum(round_trips) < hashing_time


def test_many_clients_connect_at_once(make_server):
    server = make_server("--max-per-ip", "0", "--connect-rate", "0")
    sockets = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(300)]
    try:
        client = WireClient(server.port)
        assert client.login_start("still_answering")["ok"]
    finally:
        for sock in sockets:
            sock.close()


def test_concurrent_registrations_of_one_name(make_server):
    server = make_server()
    clients = [WireClient(server.port) for _ in range(3)]
    for client in clients:
        client.login_start("racer")
    results = {}

    def attempt(i: int, client: WireClient) -> None:
        results[i] = client.password(f"password-{i}")

    threads = [threading.Thread(target=attempt, args=(i, c)) for i, c in enumerate(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sum(1 for r in results.values() if r["ok"]) == 1   # different passwords: one account wins
    if FILE_STORE:
        accounts = open(os.path.join(server.data_dir, "accounts.jsonl")).read().splitlines()
        assert len(accounts) == 1


@pytest.mark.filestore_only
def test_server_started_twice_on_one_data_dir_keeps_accounts(tmp_path, keys):
    data = tmp_path / "d"
    data.mkdir()
    first = ServerProcess(str(data)).start()
    client = WireClient(first.port)
    client.login("persist", PASSWORD, keys(0))
    first.signal(signal.SIGINT)
    assert first.proc.wait(10) == 0
    second = ServerProcess(str(data)).start()
    try:
        again = WireClient(second.port)
        assert again.login_start("persist")["new_user"] is False
        assert again.password(PASSWORD)["ok"]
    finally:
        second.kill()


# --- version 2: TLS on the same port (section 0), PM2 (sections 4.5, 4.6, 5) -----------------------

def online_mixed(connect, keys, *names: str, tls: tuple = ()) -> list[WireClient]:
    """As ``online``, with the names in tls connecting over TLS."""
    clients = []
    for i, name in enumerate(names):
        client = connect(tls=name in tls)
        client.login(name, PASSWORD + name, keys(i))
        clients.append(client)
    for i, client in enumerate(clients):
        for other in names[i + 1:]:
            client.wait_data("PRESENCE", username=other, online=True)
    return clients


def test_tls_and_plain_clients_share_one_room(connect, keys):
    alice, bob = online_mixed(connect, keys, "alice", "bob", tls=("alice",))
    assert alice.sock.version() in ("TLSv1.2", "TLSv1.3") and alice.cert_key is not None
    assert alice.bm("over TLS")["recipients"] == 1
    assert bob.wait_data("BM")["text"] == "over TLS"
    assert bob.bm("in plain")["recipients"] == 1
    assert alice.wait_data("BM")["text"] == "in plain"
    assert alice.pm("bob", "sealed, over TLS")["ok"]
    got = bob.wait_data("PM")
    assert keys(1).open(got["ciphertext"]) == b"sealed, over TLS" and verify_pm2(got, "bob")
    assert bob.pm("alice", "sealed, in plain")["ok"]
    got = alice.wait_data("PM")
    assert keys(0).open(got["ciphertext"]) == b"sealed, in plain" and verify_pm2(got, "alice")
    assert [e["type"] for e in alice.history()] == ["BM", "BM", "PM", "PM"]
    assert alice.exit()["ok"] and alice.recv_until_closed() == []


def test_login_reply_says_protocol_2_and_the_certificate_holds_its_key(connect, server):
    client = connect(tls=True)
    reply = client.login_start("alice")   # checks the certificate's key against server_key and fingerprint
    assert reply["protocol"] == 2
    assert client.cert_key == pg3lib.PublicKey.from_key_form(reply["server_key"])
    assert client.cert_key.fingerprint == reply["fingerprint"]
    assert connect().login_start("bob")["protocol"] == 2   # plain too
    if FILE_STORE:
        stored = pg3lib.KeyPair.load(os.path.join(server.data_dir, "server_key.pem"))
        assert stored.public == client.cert_key
    pem = open(os.path.join(server.data_dir, "server_cert.pem"), "rb").read()
    server.restart()
    assert open(os.path.join(server.data_dir, "server_cert.pem"), "rb").read() == pem   # made once, kept
    assert WireClient(server.port, tls=True).cert_key == client.cert_key


def test_require_tls_refuses_plain_at_the_first_byte(make_server, keys):
    server = make_server("--require-tls")
    plain = WireClient(server.port)
    plain.send_raw(b"C")   # one byte: the refusal does not wait for the rest of a frame
    frames = plain.recv_until_closed()
    assert [f.kind for f in frames] == ["C"]
    assert frames[0].body["op"] == "ERROR" and frames[0].body["error"] == "tls_required"
    tls = WireClient(server.port, tls=True)
    tls.login("alice", PASSWORD, keys(0))
    assert tls.bm("only TLS here")["ok"]


def test_server_busy_stays_a_plain_frame(make_server):
    server = make_server("--max-clients", "1")
    first = WireClient(server.port, tls=True)
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    decoder = framing.FrameDecoder()
    frames: list = []
    while not frames:   # refused before any byte is read, so in plain, whatever the client meant to speak
        chunk = raw.recv(4096)
        assert chunk, "closed without the ERROR"
        frames = decoder.feed(chunk)
    raw.close()
    assert frames[0].body["error"] == "server_busy"
    first.close()


def test_tls_handshake_that_never_finishes_is_closed_at_the_login_deadline(make_server):
    server = make_server("--login-timeout", "1")
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    raw.sendall(b"\x16\x03\x01\x02\x00\x01")   # the start of a ClientHello, and no more
    started = time.monotonic()
    data = b""
    while True:
        chunk = raw.recv(4096)
        if not chunk:
            break
        data += chunk
    waited = time.monotonic() - started
    raw.close()
    assert data == b"", "closed without a frame (section 0)"
    assert 0.5 < waited < 6
    # A TLS client that finished its handshake but not its login gets BYE idle, over TLS.
    tls = WireClient(server.port, tls=True)
    (frame,) = tls.recv_until_closed(timeout=6)
    assert frame.body == {"op": "BYE", "reason": "idle"}


def test_tls_garbage_closes_that_connection_only(connect, keys, server):
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    raw.sendall(b"\x16" + b"\xff" * 200)   # not a TLS record
    try:
        while raw.recv(4096):   # perhaps a TLS alert; then the close (within the socket's timeout)
            pass
    except ConnectionResetError:
        pass
    raw.close()
    alice = connect(tls=True)
    alice.login("alice", PASSWORD, keys(0))
    alice.send_raw(b"X\x00\x00\x00\x02{}")   # a framing error inside TLS: answered inside TLS
    (frame,) = alice.recv_until_closed()
    assert frame.body["error"] == "bad_frame"
    assert connect(tls=True).login_start("bob")["ok"]


def test_shutdown_says_bye_over_tls(make_server, keys):
    server = make_server()
    client = WireClient(server.port, tls=True)
    client.login("alice", PASSWORD, keys(0))
    server.signal(signal.SIGTERM)
    assert client.recv_until_closed() == [framing.Frame("C", {"op": "BYE", "reason": "shutdown"})]
    assert server.proc.wait(10) == 0


def test_pm2_members_in_delivery_and_history(connect, keys):
    alice, bob = online_mixed(connect, keys, "alice", "bob", tls=("bob",))
    body, reply = alice.pm_checked("BOB", "hello bob")
    assert reply == {"op": "SEND", "ok": True, "recipients": 1}
    got = bob.wait_data("PM")
    assert sorted(got) == ["ciphertext", "from", "id", "op", "self_copy_sha256", "sender_key", "sent", "signature",
                           "to", "ts"]
    assert (got["id"], got["sent"], got["ciphertext"], got["signature"]) == \
        (body["id"], body["sent"], body["ciphertext"], body["signature"])
    assert got["self_copy_sha256"] == pg3lib.sealed_digest(body["self_copy"]) and verify_pm2(got, "bob")
    signed = {"id": body["id"], "sent": body["sent"], "signature": body["signature"],
              "ciphertext_sha256": pg3lib.sealed_digest(body["ciphertext"]),
              "self_copy_sha256": pg3lib.sealed_digest(body["self_copy"])}
    for client, copy in ((alice, body["self_copy"]), (bob, body["ciphertext"])):
        (entry,) = client.history()
        assert entry == {"ts": got["ts"], "type": "PM", "from": "alice", "to": "bob", "ciphertext": copy, **signed}
        # What the owner checks (section 4.6): the digest of its copy, then the signature.
        assert pg3lib.sealed_digest(copy) == entry["ciphertext_sha256" if client is bob else "self_copy_sha256"]
        assert keys(0).public.verify(pg3lib.pm2_signed_bytes(
            entry["id"], entry["sent"], "alice", "bob", entry["ciphertext_sha256"], entry["self_copy_sha256"]),
            entry["signature"])


def test_pm2_replay_stale_time_and_bad_signature_are_refused(connect, keys):
    alice, bob = online_mixed(connect, keys, "alice", "bob")
    body, reply = alice.pm_checked("bob", "once")
    assert reply["ok"]
    bob.wait_data("PM")
    assert alice.request({"op": "PM"})["ok"] and alice.request({"op": "TARGET", "username": "bob"})["ok"]
    replayed = alice.request(body)
    assert replayed["error"] == "bad_request" and "used before" in replayed["message"]
    stale = alice.pm_send("bob", keys(1).public, "late", sent=protocol.timestamp(time.time() - 11 * 60))
    assert alice.request(stale)["error"] == "bad_request"
    ahead = alice.pm_send("bob", keys(1).public, "early", sent=protocol.timestamp(time.time() + 11 * 60))
    assert alice.request(ahead)["error"] == "bad_request"
    wrong_digest = alice.pm_send("bob", keys(1).public, "tampered")
    wrong_digest["self_copy"] = keys(0).public.seal(b"something else").decode()   # signed over the other one
    assert alice.request(wrong_digest)["error"] == "bad_request"
    short_id = alice.pm_send("bob", keys(1).public, "short id", pm_id=base64.b64encode(bytes(8)).decode())
    assert alice.request(short_id)["error"] == "bad_request"
    # Signed, but not sealed (section 8): refused, not relayed for the receiver to fail on.
    for member in ("ciphertext", "self_copy"):
        sealed = alice.pm_send("bob", keys(1).public, "x")
        unsealed = {**sealed, member: "not sealed at all"}
        unsealed["signature"] = keys(0).sign(pg3lib.pm2_signed_bytes(
            unsealed["id"], unsealed["sent"], "alice", "bob", pg3lib.sealed_digest(unsealed["ciphertext"]),
            pg3lib.sealed_digest(unsealed["self_copy"])))
        refused = alice.request(unsealed)
        assert refused["error"] == "bad_request" and member in refused["message"], refused
    # Each refusal left the state alone (AWAIT_PM_TEXT): a correct SEND still goes, once.
    assert alice.request(alice.pm_send("bob", keys(1).public, "fine"))["ok"]
    assert keys(1).open(bob.wait_data("PM")["ciphertext"]) == b"fine"
    assert [keys(1).open(e["ciphertext"]) for e in bob.history()] == [b"once", b"fine"]


def test_a_pm2_id_is_refused_again_after_the_server_is_killed_and_restarted(server, keys):
    """The server remembers ids as long as their sent would be accepted (section 4.5): a restart,
    even after SIGKILL, forgets none of them (in Redis mode they are in Redis)."""
    alice, bob = online_mixed(lambda tls=False: WireClient(server.port), keys, "alice", "bob")
    body, reply = alice.pm_checked("bob", "once")
    assert reply["ok"]
    bob.wait_data("PM")
    for client in (alice, bob):
        client.close()
    server.kill()
    server.restart()
    alice, bob = online_mixed(lambda tls=False: WireClient(server.port), keys, "alice", "bob")
    assert alice.request({"op": "PM"})["ok"] and alice.request({"op": "TARGET", "username": "bob"})["ok"]
    replayed = alice.request(body)
    assert replayed["error"] == "bad_request" and "used before" in replayed["message"]
    assert alice.request(alice.pm_send("bob", keys(1).public, "a new one"))["ok"]   # the state stayed
    assert keys(1).open(bob.wait_data("PM")["ciphertext"]) == b"a new one"
    assert [keys(1).open(e["ciphertext"]) for e in bob.history()] == [b"once", b"a new one"]


def test_pm1_is_refused_by_default_and_accepted_with_accept_pm1(make_server, keys):
    for options, accepted in ((("--accept-pm1",), True), ((), False), (("--no-accept-pm1",), False)):
        server = make_server(*options)
        alice, bob = WireClient(server.port, pm_version=1), WireClient(server.port)
        alice.login("alice", PASSWORD, keys(0))
        bob.login("bob", PASSWORD, keys(1))
        reply = alice.pm("bob", "the old way")
        assert reply["ok"] is accepted, (options, reply)
        if accepted:
            got = bob.wait_data("PM")
            assert "id" not in got and keys(0).public.verify(
                pg3lib.pm_signed_bytes("alice", "bob", got["ciphertext"]), got["signature"])
        else:
            assert reply["error"] == "bad_request"
            assert alice.request(alice.pm_send("bob", keys(1).public, "the new way", version=2))["ok"]
        server.kill()


def test_tls_client_that_never_reads_is_cut_off_and_a_reading_one_gets_everything(make_server, keys):
    """Partial TLS writes: what the socket does not take waits (EVENT_WRITE) and keeps its order;
    past --send-queue a TLS client is cut off (BYE too_slow) as a plain one is."""
    # Room for a pass's 20 BMs of 4 KB to the reading client (a Redis node may deliver them at once).
    server = make_server("--send-queue", "262144", "--flood-rate", "0", "--bm-rate", "0")
    stuck = WireClient(server.port, tls=True, rcvbuf=4096)
    stuck.login("stuck", PASSWORD, keys(0))
    reader = WireClient(server.port, tls=True)
    reader.login("reader", PASSWORD, keys(1))
    sender = WireClient(server.port)
    sender.login("sender", PASSWORD, keys(2))
    received: list[int] = []

    def drain() -> None:
        try:
            while True:
                frame = reader.recv(timeout=15)
                if frame.kind == "D" and frame.body["op"] == "BM":
                    received.append(int(frame.body["text"][:5]))
        except (EOFError, TimeoutError, OSError):
            pass

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    text, sent, cut = "z" * 4000, 0, False
    while sent < 4000 and not cut:   # 16 MB at most
        sender.send_raw(b"".join(framing.command({"op": "BM"})
                                 + framing.command({"op": "SEND", "text": f"{sent + i:05d}{text}"})
                                 for i in range(20)))
        for _ in range(20):
            assert sender.reply("BM")["ok"] and sender.reply("SEND")["ok"]
        sent += 20
        cut = any(d["op"] == "PRESENCE" and d["username"] == "stuck" and not d["online"] for d in sender.data)
    assert cut, "the TLS client that never reads was never cut off"
    frames = stuck.recv_until_closed(timeout=10)
    assert frames[-1].body == {"op": "BYE", "reason": "too_slow"}
    numbers = [int(f.body["text"][:5]) for f in frames if f.kind == "D" and f.body["op"] == "BM"]
    assert numbers == list(range(len(numbers))), "an unbroken prefix, then BYE"
    deadline = time.monotonic() + 15
    while len(received) < sent and time.monotonic() < deadline:
        time.sleep(0.05)
    assert received == list(range(sent)), "the reading TLS client got every BM, in order"
    reader.close()
    thread.join(20)
