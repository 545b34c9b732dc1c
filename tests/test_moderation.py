"""Moderation (docs/PROTOCOL.md section 10) against the real chatserver.py on loopback.

moderation.py's rules (durations, request checks, texts) in process, then the
server end to end: admins named with ``--admin`` and ``--admins FILE``; kick;
timed ban refused at login with its reason, and expiring; ban for good kept
across a restart; unban; mute and its expiry; the listing; another admin only
with confirm; NOTICE to the others; every action in the log. CHAT_TEST_REDIS=1
runs the server tests on a node in Redis mode (conftest.py). Every wait has a
deadline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

import moderation
import protocol
from serverproc import SERVER, redis_mode
from wire import WireClient

PASSWORD = "correct horse"


# --- moderation.py --------------------------------------------------------------------------

@pytest.mark.parametrize("text,seconds", [("30s", 30), ("10m", 600), ("2h", 7200), ("1d", 86400), ("1w", 604800),
                                          ("45", 45), (" 3H ", 10800)])
def test_durations(text, seconds):
    assert moderation.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0m", "m", "1y", "-5m", "1.5h", "9999999d", "10 m"])
def test_not_durations(text):
    with pytest.raises(ValueError):
        moderation.parse_duration(text)


@pytest.mark.parametrize("seconds,text", [(3600, "1 h"), (5400, "90 min"), (172800, "2 d"), (45, "45 s"),
                                          (600, "10 min")])
def test_format_duration(seconds, text):
    assert moderation.format_duration(seconds) == text


def test_notice_texts():
    assert moderation.notice_text("ban", "bob", "alice", 3600.0, "spam", 0.0) == "alice banned bob for 1 h: spam"
    assert moderation.notice_text("ban", "bob", "alice", None, "", 0.0) == "alice banned bob for good"
    assert moderation.notice_text("kick", "bob", "alice", None, "", 0.0) == "alice kicked bob"
    assert moderation.notice_text("unmute", "bob", "alice", None, "", 0.0) == "alice unmuted bob"


def test_request_reason_is_one_line():
    request = moderation.parse_request({"action": "ban", "username": "bob", "reason": "two\nlines\x1b  here"})
    assert request.reason == "two lines\x1b here"


# --- the real server -------------------------------------------------------------------------

def login(port: int, name: str, keys, i: int) -> WireClient:
    client = WireClient(port)
    client.login(name, PASSWORD + name, keys(i))
    return client


def mod(client: WireClient, action: str, username: str = "", **fields) -> dict:
    body = {"op": "MOD", "action": action, **fields}
    if username:
        body["username"] = username
    return client.request(body)


def closing_frames(client: WireClient, timeout: float = 5.0) -> list[dict]:
    """The C frames until the server closes the connection (D frames dropped)."""
    return [f.body for f in client.recv_until_closed(timeout) if f.kind == "C"]


def attempt(port: int, name: str, timeout: float = 5.0) -> tuple[dict, list[dict], WireClient]:
    """LOGIN and the right PASSWORD; the PASSWORD reply, and what followed if the server closed."""
    client = WireClient(port)
    assert client.login_start(name)["ok"]
    reply = client.password(PASSWORD + name)
    after = closing_frames(client, timeout) if not reply["ok"] else []
    return reply, after, client


def wait_until(check, what: str, timeout: float = 10.0, step: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(step)


@pytest.fixture
def room(make_server, tmp_path, keys):
    """A server with alice (--admin) and zed (from an --admins file) as admins; alice, bob, carol
    registered and online, zed registered; every client closed after."""
    admins = tmp_path / "admins.txt"
    admins.write_text("# the moderators\nZed   # night shift\n\n")
    server = make_server("--admin", "alice", "--admins", str(admins))
    clients = [login(server.port, name, keys, i) for i, name in enumerate(("alice", "bob", "carol"))]
    login(server.port, "zed", keys, 3).exit()
    alice, bob, carol = clients
    for i, client in enumerate(clients):
        for other in clients[i + 1:]:
            client.wait_data("PRESENCE", username=other.username, online=True)
    yield server, alice, bob, carol
    for client in clients:
        client.close()


def test_only_admins_moderate(room):
    server, alice, bob, carol = room
    for action, name in (("kick", "alice"), ("ban", "carol"), ("mute", "carol"), ("unban", "carol"), ("bans", "")):
        reply = mod(bob, action, name)
        assert reply["ok"] is False and reply["error"] == "forbidden", reply
    assert mod(alice, "bans")["ok"] is True
    wait_until(lambda: "not an admin" in server.log(), "the refusal in the log")
    assert "admins: alice, zed" in server.log()


def test_kick_says_bye_kicked_and_the_others_see_a_notice(room):
    server, alice, bob, carol = room
    reply = mod(alice, "kick", "Bob", reason="calm down")
    assert reply["ok"] and reply["username"] == "bob"
    assert closing_frames(bob) == [{"op": "BYE", "reason": "kicked", "message": "alice kicked bob: calm down",
                                    "until": None}]
    notice = carol.wait_data("NOTICE")
    assert notice["text"] == "alice kicked bob: calm down" and notice["by"] == "alice"
    carol.wait_data("PRESENCE", username="bob", online=False)
    assert alice.wait_data("NOTICE")["text"] == "alice kicked bob: calm down"
    assert mod(alice, "kick", "bob")["error"] == "not_online"
    wait_until(lambda: "'alice' kicked 'bob'" in server.log(), "the kick in the log with who did it")


def test_timed_ban_is_refused_at_login_with_its_reason_and_expires(room):
    server, alice, bob, carol = room
    reply = mod(alice, "ban", "bob", seconds=3, reason="spam")
    assert reply["ok"] and reply["until"]
    assert closing_frames(bob)[-1]["reason"] == "banned"
    assert carol.wait_data("NOTICE")["text"] == "alice banned bob for 3 s: spam"
    refused, after, _ = attempt(server.port, "bob")
    assert refused["ok"] is False and refused["error"] == "banned"
    assert refused["reason"] == "spam" and refused["until"] == reply["until"]
    assert "banned until" in refused["message"] and "alice" in refused["message"]
    assert after == [{"op": "BYE", "reason": "banned"}]
    wrong = WireClient(server.port)
    wrong.login_start("bob")
    assert wrong.password("not the password")["error"] == "wrong_password"   # nothing said to a guesser
    wrong.close()
    wait_until(lambda: attempt(server.port, "bob")[0]["ok"], "the ban expiring", timeout=10, step=0.5)


def test_ban_for_good_is_kept_across_a_restart_then_unban(room, keys):
    server, alice, bob, carol = room
    assert mod(alice, "ban", "bob")["until"] is None
    closing_frames(bob)
    server.restart()
    refused, after, _ = attempt(server.port, "bob")
    assert refused["error"] == "banned" and refused["until"] is None and "for good" in refused["message"]
    alice = login(server.port, "alice", keys, 0)
    assert mod(alice, "unban", "bob")["ok"]
    assert mod(alice, "unban", "bob")["error"] == "bad_request"
    reply, _, client = attempt(server.port, "bob")
    assert reply["ok"]
    client.close()
    alice.close()


def test_mute_refuses_bms_and_expires(room):
    server, alice, bob, carol = room
    reply = mod(alice, "mute", "bob", seconds=3, reason="shouting")
    assert reply["ok"]
    assert bob.wait_data("NOTICE")["text"] == "alice muted bob for 3 s: shouting"
    refused = bob.bm("LOUD")
    assert refused["ok"] is False and refused["error"] == "muted" and refused["until"] == reply["until"]
    assert bob.request({"op": "CH"})["entries"] == []   # back in READY, nothing stored
    wait_until(lambda: bob.bm("quiet now")["ok"], "the mute expiring", timeout=10, step=0.5)
    assert carol.wait_data("BM", text="quiet now")
    assert mod(alice, "mute", "bob", seconds=600)["ok"]
    assert bob.bm("x")["error"] == "muted"
    assert mod(alice, "unmute", "bob")["ok"]
    assert bob.bm("thanks")["ok"]


def test_bans_lists_who_until_and_why(room):
    server, alice, bob, carol = room
    mod(alice, "ban", "bob", seconds=3600, reason="spam")
    mod(alice, "mute", "carol", seconds=600, reason="caps")
    listing = mod(alice, "bans")
    assert [(b["username"], b["by"], b["reason"]) for b in listing["bans"]] == [("bob", "alice", "spam")]
    assert [(m["username"], m["reason"]) for m in listing["mutes"]] == [("carol", "caps")]
    assert listing["bans"][0]["until"] > protocol.timestamp(time.time() + 3500)


def test_another_admin_only_with_confirm(room, keys):
    server, alice, bob, carol = room
    zed = login(server.port, "zed", keys, 3)
    for action in ("kick", "ban", "mute"):
        refused = mod(alice, action, "zed", **({"seconds": 60} if action != "kick" else {}))
        assert refused["error"] == "confirm_needed" and refused["username"] == "zed", refused
    assert zed.request({"op": "CH"})["ok"]   # still here
    assert mod(alice, "ban", "zed", seconds=60, confirm=True)["ok"]
    assert closing_frames(zed)[-1]["reason"] == "banned"
    assert attempt(server.port, "zed")[0]["error"] == "banned"


def test_no_such_user_and_yourself(room):
    server, alice, bob, carol = room
    assert mod(alice, "ban", "nobody")["error"] == "no_such_user"
    assert mod(alice, "mute", "alice", seconds=5)["error"] == "bad_request"
    assert mod(alice, "ban", "bob", seconds=-1)["error"] == "bad_request"


@pytest.mark.filestore_only
def test_moderation_file_holds_every_action(room):
    server, alice, bob, carol = room
    mod(alice, "mute", "carol", seconds=60, reason="caps")
    mod(alice, "kick", "bob")
    with open(os.path.join(server.data_dir, "moderation.jsonl"), encoding="utf-8") as fh:
        lines = [json.loads(line) for line in fh]
    assert [(r["action"], r["username"], r["by"]) for r in lines] == [("mute", "carol", "alice"),
                                                                      ("kick", "bob", "alice")]
    assert os.stat(os.path.join(server.data_dir, "moderation.jsonl")).st_mode & 0o077 == 0


@pytest.mark.parametrize("args", [["--admin", "bad name"], ["--admins", "/nonexistent/admins"]])
def test_bad_admins_exit_2(args, tmp_path):
    result = subprocess.run([sys.executable, SERVER, "0", "--host", "127.0.0.1", "--data", str(tmp_path), *args],
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 2 and "Traceback" not in result.stderr and "admin" in result.stderr


def test_runs_in_the_mode_asked_for(room):
    server = room[0]
    assert ("--redis" in server.extra) == redis_mode()
