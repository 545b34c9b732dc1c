"""chatclient.py without a server: what is shown, the command line, and the PM checks of Session."""

from __future__ import annotations

import base64
import datetime
import os
import re
import socket
import subprocess
import sys
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

import chatclient
import pg3lib
import protocol
import wire
from chatclient import (UNREADABLE, Session, format_history_entry, local_time, parse_timestamp,
                        visible)
from clientstore import ClientStore, contact_book
from lineeditor import text_width

ALICE_BOOK = contact_book("h:1", "alice")   # where the session of alice at h:1 keeps her contacts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIENT = os.path.join(ROOT, "chatclient.py")
DEADLINE = 10.0


# --- what is shown ---------------------------------------------------------------------

@pytest.mark.parametrize("text, shown", [
    ("hello", "hello"),
    ("héllo 日本 ✓ \\x1b", "héllo 日本 ✓ \\x1b"),
    ("\x1b]0;pwn\x07", "\\x1b]0;pwn\\x07"),
    ("a\nb\tc\rd\x00", "a\\x0ab\\x09c\\x0dd\\x00"),
    ("\x7f\x85\x9b", "\\x7f\\x85\\x9b"),
    ("abc\u202edef", "abc\\u202edef"),
    ("\u2066\u2067\u2068\u2069\u200e\u200f\u061c\u202a\u202b\u202c\u202d\u2028\u2029",
     "\\u2066\\u2067\\u2068\\u2069\\u200e\\u200f\\u061c\\u202a\\u202b\\u202c\\u202d\\u2028\\u2029"),
])
def test_visible_escapes_what_a_terminal_would_act_on(text, shown):
    assert visible(text) == shown


def test_a_long_line_wraps_at_spaces_with_its_continuation_indented():
    wrap = chatclient.wrap_rows
    assert wrap("short enough", 40) == ["short enough"]
    assert wrap("[10:19] * first PM with carol: their key is pinned once a PM from them verifies", 40) == [
        "[10:19] * first PM with carol: their key", "  is pinned once a PM from them verifies"]
    assert wrap("[10:00] alice: " + "0123456789" * 5, 40) == [   # a word longer than a row is split
        "[10:00] alice: 0123456789012345678901234", "  5678901234567890123456789"]
    wide = "日本語 日本語 日本語"   # 20 columns
    assert wrap("日本語 " * 10, 24) == [wide, "  " + wide, "  " + wide, "  日本語 "]
    assert wrap("x" * 30, 12) == ["x" * 30]   # too narrow to help: the terminal wraps it


_WRAP_TEXT = st.lists(st.one_of(st.text(st.sampled_from("ab日"), min_size=1, max_size=50),
                                st.sampled_from([" ", "  "])), max_size=30).map(lambda p: "[" + "".join(p))
# (a shown line starts with its time or a mark, never with a space)


@given(_WRAP_TEXT, st.integers(chatclient.WRAP_MIN_WIDTH, 100))
def test_wrapped_rows_fit_lose_nothing_and_split_only_words_longer_than_a_row(line, width):
    rows = chatclient.wrap_rows(line, width)
    indent = chatclient.WRAP_INDENT
    assert all(text_width(row) <= width for row in rows) or rows == [line]
    assert all(row.startswith(indent) for row in rows[1:])
    assert "".join(rows).replace(" ", "") == line.replace(" ", "")   # only spaces go (at breaks) or come
    pieces = [word for row in rows for word in row.split(" ") if word]
    for word in line.split(" "):
        if word and text_width(word) <= width - len(indent):
            assert word in pieces, (word, rows)


def test_parse_timestamp():
    utc = datetime.timezone.utc
    assert parse_timestamp("2026-11-24T15:04:05.123Z") == datetime.datetime(2026, 11, 24, 15, 4, 5, tzinfo=utc)
    assert parse_timestamp("2026-11-24T15:04:05+01:00") == datetime.datetime(2026, 11, 24, 14, 4, 5, tzinfo=utc)
    for bad in (None, 5, "", "yesterday", "2026-13-40T99:00:00Z"):
        assert parse_timestamp(bad) is None


def test_local_time_uses_the_local_zone():
    moment = datetime.datetime(2026, 11, 24, 15, 4, 5, tzinfo=datetime.timezone.utc).astimezone()
    assert local_time("2026-11-24T15:04:05.123Z") == moment.strftime("%H:%M")
    assert local_time("2026-11-24T15:04:05.123Z", with_date=True) == moment.strftime("%Y-%m-%d %H:%M")
    assert len(local_time("garbage")) == 5  # now, rather than nothing


def test_history_entries():
    ts = "2026-11-24T15:04:05.123Z"
    when = local_time(ts, with_date=True)
    bm = {"ts": ts, "type": "BM", "from": "alice", "to": "*", "text": "hello"}
    assert format_history_entry(bm, lambda c: None) == f"[{when}] BM alice -> all: hello"
    pm = {"ts": ts, "type": "PM", "from": "alice", "to": "bob", "ciphertext": "sealed"}
    assert format_history_entry(pm, lambda c: "psst") == f"[{when}] PM alice -> bob: psst"
    assert format_history_entry(pm, lambda c: None) == f"[{when}] PM alice -> bob: {UNREADABLE}"
    assert format_history_entry({}, lambda c: None).startswith("[????-??-?? ??:??] ? ? -> ?: ")


# --- a session's PM checks (no sockets: D frames in, lines out) -------------------------------

class Lines(chatclient.Output):
    def __init__(self) -> None:
        self.shown: list[str] = []
        self.warned: list[str] = []

    def show(self, text: str) -> None:
        self.shown.append(text)

    def warn(self, text: str) -> None:
        self.warned.append(text)


@pytest.fixture
def alice(tmp_path, keys):
    """A logged-in session of alice (keys(0)) on server h:1."""
    session = Session("h:1", "alice", ClientStore(str(tmp_path / "chatroom")), Lines(), interactive=True)
    session.keys = keys(0)
    return session


def pm_frame(sender: pg3lib.KeyPair, sender_name: str, receiver: pg3lib.KeyPair, text: str,
             signer: pg3lib.KeyPair | None = None, pm_id: str | None = None, sent: str | None = None,
             **extra) -> dict:
    """A D PM (PM2, section 5) from sender_name to alice, signed by signer (default: sender)."""
    ciphertext = receiver.public.seal(text.encode()).decode()
    self_copy = sender.public.seal(text.encode()).decode()
    body = wire.pm2_send(signer or sender, sender_name, "alice", ciphertext, self_copy, pm_id=pm_id, sent=sent)
    return {"op": "PM", "from": sender_name, "to": "alice", "id": body["id"], "sent": body["sent"],
            "ciphertext": ciphertext, "self_copy_sha256": pg3lib.sealed_digest(self_copy),
            "signature": body["signature"], "sender_key": sender.public.key_form, "ts": "2026-11-24T15:04:05Z",
            **extra}


def pm1_frame(sender: pg3lib.KeyPair, sender_name: str, receiver: pg3lib.KeyPair, text: str) -> dict:
    """A version-1 D PM: no id, no sent, the PM1 signature."""
    ciphertext = receiver.public.seal(text.encode()).decode()
    signature = sender.sign(pg3lib.pm_signed_bytes(sender_name, "alice", ciphertext))
    return {"op": "PM", "from": sender_name, "to": "alice", "ciphertext": ciphertext,
            "signature": signature, "sender_key": sender.public.key_form, "ts": "2026-11-24T15:04:05Z"}


def test_pm_is_decrypted_and_the_sender_key_pinned(alice, keys):
    alice.on_data(pm_frame(keys(1), "bob", keys(0), "see you at 5"))
    assert alice.out.shown[-1].endswith("bob -> you (private): see you at 5")
    assert alice.store.contact_fingerprint(ALICE_BOOK, "bob") == keys(1).fingerprint


def test_pm_with_a_bad_signature_is_a_warning_never_the_text_and_pins_nothing(alice, keys):
    alice.on_data(pm_frame(keys(1), "bob", keys(0), "forged words", signer=keys(2)))
    assert not any("forged" in line for line in alice.out.shown)
    assert "WARNING" in alice.out.warned[-1] and "failed its signature check" in alice.out.warned[-1]
    assert alice.store.contact_fingerprint(ALICE_BOOK, "bob") is None  # pinned only after a PM verifies
    tampered = pm_frame(keys(1), "bob", keys(0), "real words")
    tampered["sent"] = protocol.timestamp(time.time() + 1)  # a member under the signature changed
    alice.on_data(tampered)
    assert "failed its signature check" in alice.out.warned[-1]
    assert not any("real words" in line for line in alice.out.shown)


def test_a_replayed_pm_id_is_a_warning_also_after_a_restart(alice, keys, tmp_path):
    frame = pm_frame(keys(1), "bob", keys(0), "once only")
    alice.seen = alice.store.seen_ids("srv", "alice")
    alice.on_data(frame)
    assert alice.out.shown[-1].endswith("bob -> you (private): once only")
    alice.on_data(dict(frame))
    assert "delivered AGAIN" in alice.out.warned[-1] and "replay" in alice.out.warned[-1]
    later = Session("h:1", "alice", alice.store, Lines(), interactive=True)  # the next run
    later.keys, later.seen = keys(0), alice.store.seen_ids("srv", "alice")
    later.on_data(dict(frame))
    assert later.out.shown == [] and "delivered AGAIN" in later.out.warned[-1]
    later.out.warned.clear()
    later.on_data(dict(frame, offline=True))   # kept again (a node died before it knew it was shown): quiet
    assert later.out.shown == [] and later.out.warned == []
    other = pm_frame(keys(1), "bob", keys(0), "a new id")  # another id from bob is fine
    later.on_data(other)
    assert later.out.shown[-1].endswith("a new id")


def test_a_live_pm_sent_more_than_10_minutes_away_is_a_warning(alice, keys):
    for shift in (-700, 700):
        alice.on_data(pm_frame(keys(1), "bob", keys(0), f"stale {shift}", sent=protocol.timestamp(time.time() + shift)))
        assert "more than 10 minutes" in alice.out.warned[-1]
    assert not any("stale" in line for line in alice.out.shown)
    alice.on_data(pm_frame(keys(1), "bob", keys(0), "a bit off", sent=protocol.timestamp(time.time() - 300)))
    assert alice.out.shown[-1].endswith("a bit off")
    stored = pm_frame(keys(1), "bob", keys(0), "left for you", sent=protocol.timestamp(time.time() - 86000),
                      offline=True)
    alice.on_data(stored)  # a stored PM (section 5) is old by nature
    assert "bob -> you (private): left for you  (sent while you were away" in alice.out.shown[-1]


def test_a_version_1_pm_is_shown_marked_unverified(alice, keys):
    alice.on_data(pm1_frame(keys(1), "bob", keys(0), "old style"))
    assert alice.out.shown[-1].startswith("[UNVERIFIED: version-1 PM")
    assert alice.out.shown[-1].endswith("bob -> you (private): old style")
    assert alice.store.contact_fingerprint(ALICE_BOOK, "bob") is None


def test_pm_sealed_for_another_key_is_unreadable(alice, keys):
    alice.on_data(pm_frame(keys(1), "bob", keys(2), "not for alice"))
    assert alice.out.shown[-1].endswith(f"bob -> you (private): {UNREADABLE}")


def test_changed_contact_key_holds_pms_until_trusted(alice, keys):
    alice.store.remember_contact(ALICE_BOOK, "bob", keys(1).fingerprint)
    alice.on_data(pm_frame(keys(2), "bob", keys(0), "new key, who dis"))
    alice.on_data(pm_frame(keys(2), "bob", keys(0), "second"))
    assert not any("who dis" in line for line in alice.out.shown)
    assert len(alice.out.warned) == 2  # warned on every PM
    assert keys(1).fingerprint in alice.out.warned[0] and keys(2).fingerprint in alice.out.warned[0]
    alice.show_keys("bob")
    assert keys(2).fingerprint in alice.out.shown[-1]
    alice.trust("bob")
    assert alice.store.contact_fingerprint(ALICE_BOOK, "bob") == keys(2).fingerprint
    assert alice.out.shown[-2].endswith("bob -> you (private): new key, who dis")
    assert alice.out.shown[-1].endswith("bob -> you (private): second")


def test_changed_contact_key_stops_a_pm_to_them(alice, keys):
    alice.store.remember_contact(ALICE_BOOK, "bob", keys(1).fingerprint)
    reply = {"op": "TARGET", "ok": True, "username": "bob", "public_key": keys(2).public.key_form,
             "fingerprint": keys(2).fingerprint}
    assert alice.target_key("bob", reply) is None
    assert "CHANGED" in alice.out.warned[-1] and "not sent" in alice.out.warned[-1]
    lying = dict(reply, public_key=keys(1).public.key_form)  # fingerprint of another key
    assert alice.target_key("bob", lying) is None
    alice.trust("bob")
    assert alice.target_key("bob", reply) == keys(2).public


def test_a_pm_stopped_by_a_changed_key_comes_back_to_the_prompt(alice, keys):
    """Nothing is sent, and the typed message is not lost: it is back in the line, to send once
    the new key is trusted (TRUST), as a message that was too long is."""
    alice.store.remember_contact(ALICE_BOOK, "bob", keys(1).fingerprint)
    target = {"op": "TARGET", "ok": True, "username": "bob", "online": True, "public_key": keys(2).public.key_form,
              "fingerprint": keys(2).fingerprint}
    steps, _ = drive(alice.command("PM bob are you new"), [{"op": "PM", "ok": True, "online": ["bob"]}, target,
                                                          {"op": "CANCEL", "ok": True}])
    assert [s.body["op"] for s in steps if isinstance(s, chatclient.Send)] == ["PM", "TARGET", "CANCEL"]
    assert alice.retry_line == "PM bob are you new"
    assert "back in the line below" in alice.out.warned[-1] and "cancelled" not in alice.out.shown
    alice.retry_line = ""
    lying = dict(target, fingerprint=keys(1).fingerprint)   # not the key it sent: refused, nothing put back
    drive(alice.command("PM bob hm"), [{"op": "PM", "ok": True, "online": ["bob"]}, lying,
                                       {"op": "CANCEL", "ok": True}])
    assert alice.retry_line == "" and "does not match" in alice.out.warned[-1]


def test_presence_updates_who_is_online(alice):
    alice.on_data({"op": "PRESENCE", "username": "bob", "online": True})
    alice.on_data({"op": "PRESENCE", "username": "carol", "online": True})
    alice.on_data({"op": "PRESENCE", "username": "bob", "online": False})
    clock = local_time("2026-11-24T15:04:05.123Z")
    alice.on_data({"op": "PRESENCE", "username": "dave", "online": True, "ts": "2026-11-24T15:04:05.123Z"})
    assert [line[8:] for line in alice.out.shown] == ["* bob is online", "* carol is online", "* bob is offline",
                                                      "* dave is online"]
    assert all(re.match(r"\[\d\d:\d\d\] \* ", line) for line in alice.out.shown)  # the time, as messages
    assert alice.out.shown[-1] == f"[{clock}] * dave is online"
    assert alice.who_text() == "online: alice (you), carol, dave"


# --- the command line ----------------------------------------------------------------------

def run_client(*args: str, home=None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if home is not None:
        env["XDG_CONFIG_HOME"] = str(home)
    return subprocess.run([sys.executable, CLIENT, *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=DEADLINE, env=env)


@pytest.mark.parametrize("args", [
    (), ("localhost",), ("localhost", "41001"), ("localhost", "port", "alice"),
    ("localhost", "70000", "alice"), ("localhost", "41001", "-alice"), ("localhost", "41001", "a" * 33),
    ("--fingerprint", "localhost"), ("localhost", "41001", "alice", "extra"), ("--bogus",),
])
def test_bad_arguments_print_usage_and_exit_2(args):
    result = run_client(*args)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: chatclient.py")
    assert "Traceback" not in result.stderr


def test_connection_refused_is_one_line(unused_port):
    result = run_client("127.0.0.1", str(unused_port), "alice")
    assert result.returncode == 1
    assert result.stderr == f"chatclient: cannot connect to 127.0.0.1:{unused_port}: " \
                            "connection refused (is the server running?)\n"


def test_fingerprint_option(tmp_path, keys):
    result = run_client("--fingerprint", home=tmp_path)
    assert result.returncode == 1 and "no keys yet" in result.stderr
    store = ClientStore(str(tmp_path / "chatroom"))
    store.save_key_pair("127.0.0.1:41001", "alice", "password1", keys(0))
    store.save_key_pair("127.0.0.1:41002", "bob", "password1", keys(1))
    result = run_client("--fingerprint", home=tmp_path)
    assert result.returncode == 0
    assert result.stdout == (f"127.0.0.1:41001 alice {keys(0).fingerprint}\n"
                             f"127.0.0.1:41002 bob {keys(1).fingerprint}\n")
    result = run_client("--fingerprint", "127.0.0.1", "41002", "Bob", home=tmp_path)
    assert result.stdout == f"127.0.0.1:41002 bob {keys(1).fingerprint}\n"


@pytest.fixture
def unused_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_local_time_at_the_ends_of_the_calendar():
    # astimezone() overflows there; the time is shown in its own zone instead of ending the client.
    assert local_time("0001-01-01T00:00:00+01:00", with_date=True) == "0001-01-01 00:00"
    assert local_time("9999-12-31T23:59:59-01:00", with_date=True) == "9999-12-31 23:59"
    assert len(local_time("9999-12-31T23:59:59Z")) == 5


def test_server_text_in_one_line_messages():
    assert chatclient.describe_error({"message": "a\nb\x1b[2J" + "x" * 500}) == \
        "a\\x0ab\\x1b[2J" + "x" * 184 + "..."
    assert chatclient.describe_error({"error": "bad_request"}) == "bad_request"
    assert chatclient.bye_text({"reason": ["idle"]}) == \
        "the server closed the connection: no reason known (['idle'])"
    assert chatclient.recipients_note(True) == chatclient.recipients_note("3") == \
        chatclient.recipients_note(-1) == ""
    assert chatclient.valid_username("Bob.2") and not chatclient.valid_username("bob\n")
    assert not chatclient.valid_username(["bob"]) and not chatclient.valid_username("a b")


# --- flows driven by hand: what the session sends and asks, step by step -----------------------

def drive(flow, answers: list):
    """Run a flow; answer each Reply/Ask with the next item of answers. Returns (steps, result)."""
    steps = []
    value = None
    while True:
        try:
            step = flow.send(value)
        except StopIteration as stop:
            return steps, stop.value
        steps.append(step)
        value = answers.pop(0) if isinstance(step, (chatclient.Reply, chatclient.Ask)) else None


def test_a_new_password_that_is_too_short_is_refused_before_it_is_repeated(alice):
    steps, password = drive(alice.read_password(new_user=True),
                            [chatclient.Submit("short"), chatclient.Submit("long enough"),
                             chatclient.Submit("long enough")])
    assert [s.prompt for s in steps] == ["choose a password: ", "choose a password: ", "repeat the password: "]
    assert alice.out.warned == ["a password has at least 8 characters"]
    assert password == "long enough"


def test_a_one_line_pm_to_someone_offline_asks_to_store_it_and_a_refusal_ends_at_once(alice):
    steps, _ = drive(alice.command("PM carol are you there"),
                     [{"op": "PM", "ok": True, "online": ["bob"]},
                      {"op": "TARGET", "ok": False, "error": "not_online", "message": "carol is not online"}])
    assert [type(s).__name__ for s in steps] == ["Send", "Reply", "Send", "Reply"]  # no "to" prompt
    assert steps[2].body == {"op": "TARGET", "username": "carol", "offline": True}
    assert alice.out.warned == ["cannot send to carol: carol is not online (and the server keeps no message "
                                "for them)"]
    assert "cancelled" not in alice.out.shown


def test_a_pm_to_no_account_says_so(alice):
    drive(alice.command("PM nobody hi"), [{"op": "PM", "ok": True, "online": []},
                                          {"op": "TARGET", "ok": False, "error": "no_such_user"}])
    assert alice.out.warned == ["cannot send to nobody: there is no user nobody"]


def test_a_pm_to_someone_offline_is_stored_and_said_so(alice, keys):
    steps, _ = drive(alice.command("PM carol see you tomorrow"), [
        {"op": "PM", "ok": True, "online": []},
        {"op": "TARGET", "ok": True, "username": "carol", "online": False, "public_key": keys(1).public.key_form,
         "fingerprint": keys(1).fingerprint},
        {"op": "SEND", "ok": True, "recipients": 0}])
    send = steps[4].body
    assert set(send) == {"op", "id", "sent", "ciphertext", "self_copy", "signature"}
    assert alice.out.shown[-1].endswith("you -> carol (private): see you tomorrow  (carol is offline: stored, "
                                        "delivered at their next login)")


def test_a_target_that_left_meanwhile_is_asked_again_offline(alice, keys):
    steps, _ = drive(alice.command("PM bob hi"), [
        {"op": "PM", "ok": True, "online": ["bob"]},
        {"op": "TARGET", "ok": False, "error": "not_online"},
        {"op": "PM", "ok": True, "online": []},
        {"op": "TARGET", "ok": True, "username": "bob", "online": False, "public_key": keys(1).public.key_form,
         "fingerprint": keys(1).fingerprint},
        {"op": "SEND", "ok": True, "recipients": 0}])
    bodies = [s.body for s in steps if isinstance(s, chatclient.Send)]
    assert bodies[1] == {"op": "TARGET", "username": "bob"}
    assert bodies[3] == {"op": "TARGET", "username": "bob", "offline": True}


def test_each_pm_send_is_a_pm2_with_a_fresh_id(alice, keys):
    ids = set()
    for _ in range(2):
        steps, _ = drive(alice.command("PM bob hi"), [
            {"op": "PM", "ok": True, "online": ["bob"]},
            {"op": "TARGET", "ok": True, "username": "bob", "public_key": keys(1).public.key_form,
             "fingerprint": keys(1).fingerprint},
            {"op": "SEND", "ok": True, "recipients": 1}])
        send = steps[4].body
        assert len(base64.b64decode(send["id"])) == 16
        assert abs(protocol.parse_timestamp(send["sent"]) - time.time()) < 5
        signed = pg3lib.pm2_signed_bytes(send["id"], send["sent"], "alice", "bob",
                                         pg3lib.sealed_digest(send["ciphertext"]),
                                         pg3lib.sealed_digest(send["self_copy"]))
        assert keys(0).public.verify(signed, send["signature"])
        ids.add(send["id"])
    assert len(ids) == 2


def test_pm_with_nobody_online_says_so_once(alice):
    drive(alice.command("PM"), [{"op": "PM", "ok": True, "online": []}, {"op": "CANCEL", "ok": True}])
    assert alice.out.warned == ["PM: nobody else is online (PM user message stores one for someone offline)"]
    assert alice.out.shown == []


def test_a_trimmed_online_list_is_not_taken_as_everyone(alice):
    alice.set_online(["bob"], 3)
    assert alice.who_text() == "online: alice (you), bob and 3 more"
    steps, _ = drive(alice.command("PM dave hi"),
                     [{"op": "PM", "ok": True, "online": ["bob"], "more_online": 3},
                      {"op": "TARGET", "ok": False, "error": "not_online", "message": "dave is not online"}])
    assert steps[2].body == {"op": "TARGET", "username": "dave", "offline": True}  # the server decides
    assert alice.out.warned == ["cannot send to dave: dave is not online (and the server keeps no message "
                                "for them)"]


def test_an_unknown_command_suggests_bm(alice):
    drive(alice.command("hello there"), [])
    assert alice.out.warned == ["unknown command 'hello': HELP lists the commands; "
                                "to send this to everyone: BM hello there"]


# --- Tab completes by position -------------------------------------------------------------------

@pytest.mark.parametrize("before, offered", [
    ("", chatclient.COMMANDS),
    ("  ", chatclient.COMMANDS),
    ("PM ", ("bob", "carol")),
    ("pm  ", ("bob", "carol")),
    ("TRUST ", ("bob", "carol")),
    ("KEYS ", ("bob", "carol")),
    ("IGNORE ", ("bob", "carol")),
    ("unignore ", ("bob", "carol")),
    ("BM ", ()),  # a message: nothing
    ("BM hello ", ()),
    ("PM bob ", ()),  # the PM's text
    ("CH ", ()),
    ("WHO ", ()),
    ("hello ", ()),
])
def test_completion_words_depend_on_the_position(before, offered):
    assert chatclient.completion_words(before, ["bob", "carol"]) == offered


@pytest.mark.parametrize("typed, line", [
    (b"b\t", "BM "),
    (b"e\t", "EX "),
    (b"i\t", "IGNORE "),
    (b"BM e\t", "BM e"),  # never BM EX
    (b"BM hello w\t", "BM hello w"),
    (b"TRUST c\t", "TRUST carol "),  # a contact, never TRUST CH
    (b"TRUST x\t", "TRUST x"),
    (b"pm B\t", "pm Bob "),  # online, as the server spells it
    (b"PM Bob c\t", "PM Bob c"),
    (b"KEYS \t", "KEYS "),  # two names: nothing in common to add
    (b"c\t", "CH "),
])
def test_tab_at_the_operation_prompt(alice, typed, line):
    from lineeditor import LineEditor
    alice.online = {"bob": "Bob"}
    alice.store.remember_contact(ALICE_BOOK, "carol", "SHA256:c")
    editor = LineEditor()
    editor.completions = alice.complete
    editor.feed(typed)
    assert editor.text == line


def test_completed_names_are_the_online_users_and_the_contacts_not_yourself(alice):
    alice.online = {"bob": "Bob"}
    alice.store.remember_contact(ALICE_BOOK, "carol", "SHA256:c")
    alice.store.remember_contact(ALICE_BOOK, "alice", "SHA256:a")
    alice.store.remember_contact("other:1", "dave", "SHA256:d")  # another server's contact
    assert alice.user_names() == ["Bob", "carol"]


# --- Ctrl-C cancels, never leaves -------------------------------------------------------------------

def logged_in_run(session: Session):
    """session.run() without the TLS handshake and the login (done by hand in these tests)."""
    session.login = lambda: iter(())
    flow = session.run()
    assert isinstance(next(flow), chatclient.Handshake)  # the first step, before LOGIN
    session.check_certificate = lambda der: None

    def rest():
        return (yield from flow)  # resumes it past the handshake, with no certificate (not checked here)
    return rest()


def test_ctrl_c_on_an_empty_operation_line_says_how_to_leave_and_stays(alice):
    steps, _ = drive(logged_in_run(alice), [chatclient.Key.INTERRUPT, chatclient.Key.INTERRUPT,
                                            chatclient.Key.END_OF_INPUT, {"op": "EX", "ok": True}])
    assert [type(s).__name__ for s in steps] == ["Ask", "Ask", "Ask", "Send", "Reply"]
    assert steps[3].body == {"op": "EX"}  # only Ctrl-D left
    assert alice.out.shown == [chatclient.LEAVE_HINT, chatclient.LEAVE_HINT, "bye"]
    assert "EX" in chatclient.LEAVE_HINT and "Ctrl-D" in chatclient.LEAVE_HINT


def test_ctrl_c_at_a_password_prompt_asks_again(alice):
    steps, password = drive(alice.read_password(new_user=False),
                            [chatclient.Key.INTERRUPT, chatclient.Submit("password1")])
    assert [s.prompt for s in steps] == ["password for alice: "] * 2
    assert alice.out.shown == [chatclient.LEAVE_HINT_LOGIN] and password == "password1"
    steps, password = drive(alice.read_password(new_user=True),
                            [chatclient.Submit("password1"), chatclient.Key.INTERRUPT,
                             chatclient.Submit("password2"), chatclient.Submit("password2")])
    assert [s.prompt for s in steps] == ["choose a password: ", "repeat the password: ",
                                         "choose a password: ", "repeat the password: "]
    assert password == "password2"
    _, password = drive(alice.read_password(new_user=False), [chatclient.Key.END_OF_INPUT])
    assert password is None  # Ctrl-D: the login is cancelled


# --- a message over the limit is kept ------------------------------------------------------------------

LONG = "x" * (chatclient.MAX_TEXT_CHARS + 1)


def test_a_one_line_message_over_the_limit_comes_back_to_the_prompt(alice):
    steps, _ = drive(logged_in_run(alice), [chatclient.Submit("bm " + LONG), chatclient.Key.END_OF_INPUT,
                                            {"op": "EX", "ok": True}])
    assert [type(s).__name__ for s in steps] == ["Ask", "Ask", "Send", "Reply"]  # nothing sent but EX
    assert steps[0].initial == "" and steps[1].initial == "bm " + LONG
    [warning] = alice.out.warned
    assert f"(this one has {len(LONG)})" in warning and "still in the line below" in warning
    steps, _ = drive(alice.command("PM bob " + LONG), [])
    assert steps == [] and alice.retry_line == "PM bob " + LONG


def test_a_message_over_the_limit_at_the_message_prompt_is_asked_again_with_it(alice):
    steps, _ = drive(alice.command("BM"), [{"op": "BM", "ok": True}, chatclient.Submit(LONG),
                                           chatclient.Submit("short"), {"op": "SEND", "ok": True, "recipients": 1}])
    asks = [s for s in steps if isinstance(s, chatclient.Ask)]
    assert [(a.prompt, a.initial) for a in asks] == [("message: ", ""), ("message: ", LONG)]
    assert [s.body for s in steps if isinstance(s, chatclient.Send)] == [{"op": "BM"},
                                                                         {"op": "SEND", "text": "short"}]


def test_a_send_refused_as_bad_request_keeps_the_text_too(alice):
    steps, _ = drive(alice.command("BM hi"), [
        {"op": "BM", "ok": True},
        {"op": "SEND", "ok": False, "error": "bad_request", "message": "no"},
        chatclient.Key.INTERRUPT, {"op": "CANCEL", "ok": True}])
    asks = [s for s in steps if isinstance(s, chatclient.Ask)]
    assert [(a.prompt, a.initial) for a in asks] == [("message: ", "hi")]
    assert alice.out.warned == ["BM not sent: no"]


def test_a_send_refused_otherwise_puts_the_message_back_in_the_line(alice, keys):
    """Not stored (Redis down), rate limited: the state is READY, and the message comes back to the
    next operation prompt, BM or PM (a helper lost a BM's text to 'could not be stored')."""
    drive(alice.command("BM while redis is down"), [
        {"op": "BM", "ok": True}, {"op": "SEND", "ok": False, "error": "internal",
                                   "message": "the message could not be stored"}])
    assert alice.retry_line == "BM while redis is down"
    assert alice.out.warned[-1] == "BM not sent: the message could not be stored; it is back in the line"
    alice.retry_line = ""
    drive(alice.command("PM bob see you"), [
        {"op": "PM", "ok": True, "online": ["bob"]},
        {"op": "TARGET", "ok": True, "username": "bob", "online": True, "public_key": keys(1).public.key_form,
         "fingerprint": keys(1).fingerprint},
        {"op": "SEND", "ok": False, "error": "rate_limited", "message": "slow down"}])
    assert alice.retry_line == "PM bob see you" and alice.out.warned[-1].endswith("; it is back in the line")


# --- scripts: what failed, and --register --------------------------------------------------------------

@pytest.fixture
def script_alice(tmp_path, keys):
    """alice's session when standard input is not a terminal."""
    session = Session("h:1", "alice", ClientStore(str(tmp_path / "chatroom")), Lines(), interactive=False)
    session.keys = keys(0)
    return session


def test_script_lines_that_fail_are_counted(script_alice):
    drive(script_alice.command("BM " + LONG), [])  # not even a BM request
    drive(script_alice.command("PM carol hi"), [{"op": "PM", "ok": True, "online": ["bob"]},
                                                {"op": "TARGET", "ok": False, "error": "not_online"}])
    drive(script_alice.command("BM hi"), [{"op": "BM", "ok": True},
                                          {"op": "SEND", "ok": False, "error": "internal", "message": "disk"}])
    drive(script_alice.command("BM"), [{"op": "BM", "ok": True}, chatclient.Submit(LONG),
                                       {"op": "CANCEL", "ok": True}])
    drive(script_alice.command("hello"), [])
    drive(script_alice.command("BM fine"), [{"op": "BM", "ok": True}, {"op": "SEND", "ok": True, "recipients": 0}])
    failures = script_alice.failures
    assert len(failures) == 5 and script_alice.retry_line == ""
    assert failures[0].startswith("BM not sent: a message is at most 4096 characters")
    assert failures[1] == "cannot send to carol: carol is not online (and the server keeps no message for them)"
    assert failures[2] == "BM not sent: disk"
    assert failures[4].startswith("unknown command 'hello'")
    assert script_alice.out.warned == failures  # each said when it happened (stderr)
    summary = chatclient.script_failures_text(failures)
    assert summary.startswith("5 lines of the script failed: BM not sent: a message")
    assert summary.endswith("; and 2 more")
    assert chatclient.script_failures_text(failures[1:2]) == \
        "1 line of the script failed: " + failures[1]


def login_reply(keys, new_user: bool) -> dict:
    return {"op": "LOGIN", "ok": True, "new_user": new_user, "server_key": keys(2).public.key_form,
            "fingerprint": keys(2).fingerprint, "nonce": "MDEyMzQ1Njc4OWFiY2RlZg=="}


def test_a_script_registers_a_new_name_only_with_register(script_alice, keys):
    with pytest.raises(chatclient.ClientExit, match="--register"):
        drive(script_alice.login(), [login_reply(keys, new_user=True)])
    script_alice.register = True
    with pytest.raises(chatclient.ClientExit, match="cannot register alice: a password has at least 8"):
        drive(script_alice.login(), [login_reply(keys, new_user=True), chatclient.Submit("short")])
    flow = script_alice.login()
    step = flow.send(None)
    assert step == chatclient.Send({"op": "LOGIN", "username": "alice"})
    flow.send(None)
    assert flow.send(login_reply(keys, new_user=True)) == chatclient.Ask("choose a password: ", secret=True)
    assert flow.send(chatclient.Submit("long enough")).body["op"] == "PASSWORD"  # once: no repeat in a script


def test_an_interactive_new_user_is_asked_as_before(alice, keys):
    flow = alice.login()
    flow.send(None)
    flow.send(None)
    assert flow.send(login_reply(keys, new_user=True)) == chatclient.Ask("choose a password: ", secret=True)


# --- what is shown: our own messages, WHO ---------------------------------------------------------------

def test_our_bm_is_echoed_as_the_others_see_it(alice):
    drive(alice.command("BM hello all"), [{"op": "BM", "ok": True}, {"op": "SEND", "ok": True, "recipients": 2}])
    drive(alice.command("BM anyone?"), [{"op": "BM", "ok": True}, {"op": "SEND", "ok": True, "recipients": 0}])
    drive(alice.command("BM odd"), [{"op": "BM", "ok": True}, {"op": "SEND", "ok": True}])
    assert re.fullmatch(r"\[\d\d:\d\d\] alice: hello all  \(sent to 2\)", alice.out.shown[0])
    assert re.fullmatch(r"\[\d\d:\d\d\] alice: anyone\?  \(nobody else is online\)", alice.out.shown[1])
    assert re.fullmatch(r"\[\d\d:\d\d\] alice: odd", alice.out.shown[2])


def test_our_pm_is_echoed(alice, keys):
    drive(alice.command("PM bob see you"), [
        {"op": "PM", "ok": True, "online": ["bob"]},
        {"op": "TARGET", "ok": True, "username": "bob", "public_key": keys(1).public.key_form,
         "fingerprint": keys(1).fingerprint},
        {"op": "SEND", "ok": True, "recipients": 1}])
    assert re.fullmatch(r"\[\d\d:\d\d\] you -> bob \(private\): see you", alice.out.shown[-1])


def test_who_includes_yourself(tmp_path):
    session = Session("h:1", "alice", ClientStore(str(tmp_path)), Lines(), interactive=True)
    assert session.who_text() == "online: alice (you); nobody else"
    session.set_online(["carol", "alice", "Bob"])
    assert session.who_text() == "online: alice (you), Bob, carol"


# --- CH: the newest screenful on a terminal ------------------------------------------------------------

class Screenful(Lines):
    def page_rows(self) -> int:
        return 5


def ch_pages(count: int, per_page: int = 4, sender=lambda i: "bob") -> list[dict]:
    entries = [{"ts": "2026-11-24T15:04:05Z", "type": "BM", "from": sender(i), "to": "*", "text": f"m{i}"}
               for i in range(count)]
    pages = [entries[i:i + per_page] for i in range(0, count, per_page)] or [[]]
    return [{"op": "CH", "ok": True, "entries": page, "more": n < len(pages) - 1} for n, page in enumerate(pages)]


def test_ch_on_a_terminal_shows_the_newest_screenful_and_says_how_to_see_more(alice):
    alice.out = Screenful()
    steps, _ = drive(alice.command("CH"), ch_pages(10))
    assert steps[0].body == {"op": "CH"}  # the whole history, to count it
    assert [line.rsplit(": ", 1)[1] for line in alice.out.shown[:-1]] == ["m5", "m6", "m7", "m8", "m9"]
    assert alice.out.shown[-1] == "(the newest 5 of 10 entries; CH all shows all 10)"
    alice.out = Screenful()
    drive(alice.command("ch ALL"), ch_pages(10))
    assert len(alice.out.shown) == 11 and alice.out.shown[-1] == "(10 entries)"
    alice.out = Screenful()
    steps, _ = drive(alice.command("CH 7"), ch_pages(7))
    assert steps[0].body == {"op": "CH", "limit": 7}
    assert len(alice.out.shown) == 8
    assert alice.out.shown[-1] == "(the newest 7 entries; CH all shows older ones, if any)"
    alice.out = Screenful()
    drive(alice.command("CH 7"), ch_pages(5))   # fewer than asked for: that is all there is
    assert alice.out.shown[-1] == "(5 entries)"
    alice.out = Screenful()
    drive(alice.command("CH"), ch_pages(3))
    assert len(alice.out.shown) == 4 and alice.out.shown[-1] == "(3 entries)"


def test_ch_in_a_script_shows_everything(script_alice):
    drive(script_alice.command("CH"), ch_pages(30))
    assert len(script_alice.out.shown) == 31 and script_alice.out.shown[-1] == "(30 entries)"


def test_history_summary():
    assert chatclient.history_summary(0, 0, 0) == "your history is empty"
    assert chatclient.history_summary(3, 0, 0, capped=True) == "(the newest 3 entries; CH all shows older ones, if any)"
    assert chatclient.history_summary(1, 0, 0, capped=True) == "(the newest 1 entry; CH all shows older ones, if any)"
    assert chatclient.history_summary(1, 0, 0) == "(1 entry)"
    assert chatclient.history_summary(38, 212, 0) == \
        "(the newest 38 of 250 entries; CH all shows all 250, CH 100 the newest 100)"
    assert chatclient.history_summary(4, 0, 1) == "(4 entries; 1 entry from ignored users not shown)"
    assert chatclient.history_summary(0, 0, 2) == "(nothing to show: 2 entries from ignored users hidden)"
    assert chatclient.history_summary(18, 19, 0, 1) == \
        "(the newest 18 of 37 entries, 1 shortened; CH all shows all 37 in full)"
    assert chatclient.history_summary(5, 0, 0, 2) == "(5 entries, 2 shortened; CH all shows them in full)"


# --- the changed server key box -------------------------------------------------------------------------

def test_the_server_key_box_lines_up_whatever_the_names():
    for server in ("h:1", "a-much-longer-host-name.example.org:41001"):
        text = chatclient.server_key_changed_text(server, "SHA256:old", "SHA256:newer", "/x/known_servers")
        first, *lines = text.split("\n")
        assert "@" not in first  # the line that gets the "chatclient: " prefix
        box = lines[:3]
        assert len({len(line) for line in box}) == 1 and all(line[0] == line[-1] == "@" for line in box)
        [old] = [line for line in lines if "SHA256:old" in line]
        [new] = [line for line in lines if "SHA256:newer" in line]
        assert old.index("SHA256:") == new.index("SHA256:")


# --- IGNORE ---------------------------------------------------------------------------------------------

def test_ignore_hides_bms_and_pms_and_is_remembered(alice, keys):
    alice.local_command("IGNORE", "IGNORE", "")
    assert alice.out.shown[-1].startswith("you ignore nobody")
    alice.local_command("IGNORE", "ignore", "Bob")
    assert alice.out.shown[-1] == "ignoring Bob: their BMs and PMs are hidden, in CH too (UNIGNORE Bob undoes it)"
    alice.out = Lines()
    alice.on_data({"op": "BM", "from": "bob", "text": "spam", "ts": "2026-11-24T15:04:05Z"})
    alice.on_data(pm_frame(keys(1), "BOB", keys(0), "private spam"))
    alice.on_data({"op": "BM", "from": "carol", "text": "hi", "ts": "2026-11-24T15:04:05Z"})
    alice.on_data({"op": "PRESENCE", "username": "bob", "online": False})
    assert [line[8:] for line in alice.out.shown] == ["carol: hi", "* bob is offline"]
    assert alice.out.warned == []

    again = Session("h:1", "alice", ClientStore(alice.store.root), Lines(), interactive=True)
    assert again.ignored == {"bob"}  # remembered, per server
    assert Session("h:2", "alice", ClientStore(alice.store.root), Lines(), interactive=True).ignored == set()
    again.keys = keys(0)
    drive(again.command("CH"), ch_pages(4, sender=lambda i: "Bob" if i % 2 else "carol"))
    assert [line.rsplit(": ", 1)[1] for line in again.out.shown[:-1]] == ["m0", "m2"]
    assert again.out.shown[-1] == "(2 entries; 2 entries from ignored users not shown)"
    again.local_command("IGNORE", "IGNORE", "")
    assert again.out.shown[-1] == "ignoring: bob (UNIGNORE user shows them again)"
    again.local_command("UNIGNORE", "UNIGNORE", "bob")
    assert again.out.shown[-1] == "no longer ignoring bob"
    again.on_data({"op": "BM", "from": "bob", "text": "back", "ts": "2026-11-24T15:04:05Z"})
    assert again.out.shown[-1].endswith("bob: back")


def test_ch_count_while_ignoring_shows_that_many_of_the_others(alice):
    """CH 3 with bob ignored, whose BMs are every other entry: asked again with a larger limit,
    the newest 3 of the others are shown (a helper got one), and the ignored ones among them counted."""
    alice.local_command("IGNORE", "ignore", "bob")
    alice.out = Lines()
    pages = ch_pages(10, per_page=10, sender=lambda i: "bob" if i % 2 else "carol")
    newest3 = dict(pages[0], entries=pages[0]["entries"][-3:])
    steps, _ = drive(alice.command("CH 3"), [newest3, pages[0]])
    assert [s.body for s in steps if isinstance(s, chatclient.Send)] == [{"op": "CH", "limit": 3},
                                                                         {"op": "CH", "limit": 12}]
    assert [line.rsplit(": ", 1)[1] for line in alice.out.shown[:-1]] == ["m4", "m6", "m8"]
    assert alice.out.shown[-1] == ("(the newest 3 of 5 entries; CH all shows all 5; "
                                   "3 entries from ignored users not shown)")


def test_ignore_refuses_yourself_and_non_names(alice):
    alice.local_command("IGNORE", "IGNORE", "Alice")
    alice.local_command("IGNORE", "IGNORE", "a b")
    alice.local_command("UNIGNORE", "UNIGNORE", "")
    alice.local_command("UNIGNORE", "UNIGNORE", "zed")
    assert alice.out.warned == ["IGNORE: that is you", "IGNORE: 'a b' is not a user name",
                                "UNIGNORE: usage: UNIGNORE user"]
    assert alice.out.shown == ["you do not ignore zed"]
    assert alice.ignored == set()


def test_the_transcript_of_a_long_line_is_one_row():
    from lineeditor import shorten, text_width
    assert shorten("alice> BM hi", 20) == "alice> BM hi"
    cut = shorten("alice> BM " + "x" * 5000, 79)
    assert text_width(cut) == 79 and cut.endswith("x ...")
    assert text_width(shorten("日本語" * 40, 79)) <= 79


def test_the_ch_screenful_counts_rows_so_long_entries_take_more(alice):
    class Narrow(Screenful):  # 5 rows; a line takes a row per 40 characters
        def rows_of(self, text: str) -> int:
            return -(-len(text) // 40)

    pages = ch_pages(6)
    pages[-1]["entries"][0]["text"] = "w" * 60  # entry 4: three rows, with its date and sender
    alice.out = Narrow()
    drive(alice.command("CH"), pages)
    assert [line.rsplit(": ", 1)[1][:2] for line in alice.out.shown[:-1]] == ["m3", "ww", "m5"]
    assert alice.out.shown[-1] == "(the newest 3 of 6 entries; CH all shows all 6)"
    alice.out = Narrow()
    pages = ch_pages(2)
    pages[0]["entries"][1]["text"] = "w" * 400  # the newest alone is more than a screenful: still shown
    drive(alice.command("CH"), pages)
    assert len(alice.out.shown) == 2 and alice.out.shown[0].endswith("w" * 400)


def test_a_long_entry_in_the_ch_screenful_is_shortened(alice):
    class Tall(Lines):  # 20 rows of 40 columns
        def page_rows(self) -> int:
            return 20

        def rows_of(self, text: str) -> int:
            return -(-len(text) // 40)

        def fit_rows(self, text: str, rows: int) -> str:
            return text[:rows * 40 - 4] + " ..."

    pages = ch_pages(6)
    pages[0]["entries"][2]["text"] = "w" * 4000  # a hundred rows: a quarter of the screen, 5 rows, is shown
    alice.out = Tall()
    drive(alice.command("CH"), list(pages))
    assert len(alice.out.shown) == 7
    assert alice.out.shown[2].endswith("w ...") and len(alice.out.shown[2]) == 5 * 40
    assert alice.out.shown[-1] == "(6 entries, 1 shortened; CH all shows it in full)"
    alice.out = Tall()
    drive(alice.command("CH all"), pages)
    assert alice.out.shown[2].endswith("w" * 4000)


def test_help_names_every_command_and_fits_60_columns():
    text = "\n".join(chatclient.HELP_LINES)
    assert all(len(line) <= 60 for line in chatclient.HELP_LINES)
    for word in chatclient.COMMANDS:
        if word != "HELP":
            assert word + " " in text, word
    assert "CH [count | all]" in text and "Ctrl-D" in text and "leaves only while reconnecting" in text


def test_usage_mentions_register():
    result = run_client("--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "--register" in text and "exit status is 1 if any line failed" in text


# --- moderation commands (docs/PROTOCOL.md section 10) ----------------------------------------------

@pytest.mark.parametrize("line, body", [
    ("BAN bob 2h spam here", {"action": "ban", "username": "bob", "seconds": 7200, "reason": "spam here"}),
    ("ban bob spam", {"action": "ban", "username": "bob", "reason": "spam"}),
    ("BAN bob", {"action": "ban", "username": "bob"}),
    ("MUTE bob 10m", {"action": "mute", "username": "bob", "seconds": 600}),
    ("KICK bob 1 more time", {"action": "kick", "username": "bob", "reason": "1 more time"}),
    ("UNBAN bob", {"action": "unban", "username": "bob"}),
    ("UNMUTE bob", {"action": "unmute", "username": "bob"}),
    ("BANS", {"action": "bans"}),
])
def test_moderation_commands_make_mod_requests(alice, line, body):
    steps, _ = drive(alice.command(line), [{"op": "MOD", "ok": True, "action": body["action"], "bans": [],
                                            "mutes": [], "username": body.get("username"), "until": None}])
    assert steps[0].body == {"op": "MOD", **body}
    assert alice.out.warned == []


@pytest.mark.parametrize("line, warning", [
    ("BAN", "BAN: usage: BAN user [time] [reason]"),
    ("BAN bob 2x", "BAN bob: '2x' is not a duration"),
    ("MUTE bob loud", "MUTE bob: usage: MUTE user time [reason]"),
    ("UNBAN bob please", "UNBAN: usage: UNBAN user"),
])
def test_moderation_command_mistakes_send_nothing(alice, line, warning):
    steps, _ = drive(alice.command(line), [])
    assert steps == [] and alice.out.warned[0].startswith(warning), alice.out.warned


def test_confirmation_for_an_admin_resends_with_confirm(alice):
    need = {"op": "MOD", "ok": False, "error": "confirm_needed", "message": "zed is an admin", "username": "Zed"}
    done = {"op": "MOD", "ok": True, "action": "kick", "username": "Zed", "until": None}
    steps, _ = drive(alice.command("KICK zed"), [need, chatclient.Submit("y"), done])
    assert steps[2].prompt == "Zed is an admin: kick anyway? [y/N] "
    assert steps[3].body == {"op": "MOD", "action": "kick", "username": "zed", "confirm": True}
    assert alice.out.shown[-1] == "done: Zed kicked"
    steps, _ = drive(alice.command("KICK zed"), [need, chatclient.Submit("")])
    assert len(steps) == 3 and alice.out.shown[-1] == "not done: Zed was not kicked"


def test_notice_is_shown_with_its_time(alice):
    alice.on_data({"op": "NOTICE", "text": "zed banned bob for 1 h: spam", "ts": "2026-11-24T15:04:05.000Z"})
    assert re.fullmatch(r"\[\d\d:\d\d\] \* zed banned bob for 1 h: spam", alice.out.shown[-1])
    alice.on_data({"op": "SOMETHING_NEW", "x": 1})   # an unknown D op is ignored
    assert len(alice.out.shown) == 1


def test_a_bm_from_an_invalid_name_is_escaped_and_marked_live_and_in_ch(alice):
    alice.on_data({"op": "BM", "from": "bob\nroot", "text": "hi", "ts": "2026-11-24T15:04:05.123Z"})
    assert alice.out.shown[-1].startswith("[UNVERIFIED: not a valid sender name] [")
    assert "'bob\\nroot': hi" in alice.out.shown[-1]
    drive(alice.command("CH"), [{"op": "CH", "ok": True, "more": False, "entries": [
        {"ts": "2026-11-24T15:04:05.123Z", "type": "BM", "from": "x y", "to": "*", "text": "t"},
        {"ts": "2026-11-24T15:04:05.123Z", "type": "BM", "from": "bob", "to": "*", "text": "fine"}]}])
    assert alice.out.shown[-3].startswith("[UNVERIFIED: not a valid sender name]") and "'x y'" in alice.out.shown[-3]
    assert alice.out.shown[-2].endswith("BM bob -> all: fine") and "UNVERIFIED" not in alice.out.shown[-2]


def test_ch_checks_pm_entries(alice, keys):
    """A received PM2 entry verifies with bob's pinned key; a changed copy, a PM1 entry and an entry of
    a contact whose key is unknown here are marked."""
    frame = pm_frame(keys(1), "bob", keys(0), "in history")
    alice.on_data(frame)  # pins bob (and keeps his key for CH)
    entry = {"ts": frame["ts"], "type": "PM", "from": "bob", "to": "alice", "ciphertext": frame["ciphertext"],
             "id": frame["id"], "sent": frame["sent"], "signature": frame["signature"],
             "ciphertext_sha256": pg3lib.sealed_digest(frame["ciphertext"]),
             "self_copy_sha256": frame["self_copy_sha256"]}
    assert alice.entry_problem(entry) is None
    changed = dict(entry, ciphertext=keys(0).public.seal(b"other").decode())
    assert alice.entry_problem(changed) == "the text is not the one signed"
    resigned = dict(changed, ciphertext_sha256=pg3lib.sealed_digest(changed["ciphertext"]))
    assert alice.entry_problem(resigned) == "the signature does not verify with bob's key"
    # Our own PM, sent with the key we had before this machine made a new one (keys(1)): said so.
    to_bob, old_copy = keys(2).public.seal(b"old").decode(), keys(1).public.seal(b"old").decode()
    body = wire.pm2_send(keys(1), "alice", "bob", to_bob, old_copy)
    mine = {"ts": frame["ts"], "type": "PM", "from": "alice", "to": "bob", "ciphertext": old_copy, "id": body["id"],
            "sent": body["sent"], "signature": body["signature"], "ciphertext_sha256": pg3lib.sealed_digest(to_bob),
            "self_copy_sha256": pg3lib.sealed_digest(old_copy)}
    assert alice.entry_problem(mine) == "signed with a key this machine does not have (an older one of yours?)"
    copy = keys(0).public.seal(b"old").decode()   # our copy readable, yet not our signature: a forgery
    forged = dict(mine, ciphertext=copy, self_copy_sha256=pg3lib.sealed_digest(copy))
    assert alice.entry_problem(forged) == "the signature does not verify"
    old = {k: entry[k] for k in ("ts", "type", "from", "to", "ciphertext")}
    assert alice.entry_problem(old) == "version-1 PM, not signed with an id"
    assert alice.entry_problem(dict(entry, **{"from": "carol"})) == "no key of carol known here to check it"
    drive(alice.command("CH"), [{"op": "CH", "ok": True, "more": False, "entries": [entry, changed]}])
    assert alice.out.shown[-3].endswith("PM bob -> alice: in history")
    assert alice.out.shown[-2].startswith("[UNVERIFIED: the text is not the one signed] [")


def test_after_trust_of_a_new_key_the_pms_signed_with_the_old_one_say_so_in_ch(alice, keys):
    """TRUST bob's new key: his earlier PMs, signed with the key trusted then, are shown as
    signed with his previous key, not as UNVERIFIED (a helper took them for forgeries); a PM
    no key of his ever signed still is."""
    frame = pm_frame(keys(1), "bob", keys(0), "before the change")
    alice.on_data(frame)   # pins keys(1)
    entry = {"ts": frame["ts"], "type": "PM", "from": "bob", "to": "alice", "ciphertext": frame["ciphertext"],
             "id": frame["id"], "sent": frame["sent"], "signature": frame["signature"],
             "ciphertext_sha256": pg3lib.sealed_digest(frame["ciphertext"]),
             "self_copy_sha256": frame["self_copy_sha256"]}
    alice.on_data(pm_frame(keys(2), "bob", keys(0), "after the change"))   # held: the key changed
    alice.trust("bob")
    assert alice.out.shown[-1].endswith("after the change")
    assert alice.history_line(entry).endswith("PM bob -> alice: before the change  (signed with bob's previous key)")
    forged = pm_frame(keys(3), "bob", keys(0), "never his")
    forged_entry = dict(entry, ciphertext=forged["ciphertext"], id=forged["id"], sent=forged["sent"],
                        signature=forged["signature"], ciphertext_sha256=pg3lib.sealed_digest(forged["ciphertext"]),
                        self_copy_sha256=forged["self_copy_sha256"])
    assert alice.history_line(forged_entry).startswith("[UNVERIFIED: the signature does not verify with bob's key]")
    assert alice.store.previous_contact_keys(alice.book, "BOB") == [keys(1).public.key_form]


# --- reconnecting: where and when the next try goes -------------------------------------------

def test_one_address_is_tried_again_after_each_wait_as_before():
    plan = chatclient.ReconnectPlan(["a:1"])
    waits = [plan.lost()]
    while (wait := plan.failed("connection refused")) is not None:
        waits.append(wait)
    assert waits == list(chatclient.RECONNECT_DELAYS)
    assert plan.given_up() == (f"could not reconnect to a:1 ({len(chatclient.RECONNECT_DELAYS)} attempts; "
                               "the last: connection refused); giving up")


@given(count=st.integers(1, 5), start=st.integers(0, 4), delays=st.lists(st.floats(0.1, 30), min_size=1, max_size=6),
       connects=st.lists(st.integers(0, 30), max_size=4))
def test_every_round_tries_each_address_once_in_turn_then_waits(count, start, delays, connects):
    addresses = [f"h:{i}" for i in range(count)]
    plan = chatclient.ReconnectPlan(addresses, start % count, delays)
    tried, waits = [], [plan.lost()]
    # a try that connects and then fails counts as a failed try: the next address goes on
    while True:
        tried.append(plan.current)
        wait = plan.failed(f"failed at {plan.current}")
        if wait is None:
            break
        waits.append(wait)
    assert len(tried) == count * len(delays)
    assert tried == [(start % count + i) % count for i in range(len(tried))]   # in turn, from the one in use
    assert [w for w in waits if w != 0] == list(delays)                        # one wait per round
    assert all(w == 0 for i, w in enumerate(waits) if i % count)               # the rest of a round at once
    text = plan.given_up()
    assert "giving up" in text and all(f"failed at {i}" in text for i in range(count))


def test_a_new_loss_starts_the_waits_again_at_the_address_in_use():
    plan = chatclient.ReconnectPlan(["a:1", "b:2"], 0, (1.0, 2.0))
    assert plan.lost() == 1.0
    assert plan.failed("refused") == 0.0 and plan.current == 1
    assert plan.failed("refused") == 2.0 and plan.current == 0
    assert plan.failed("refused") == 0.0 and plan.current == 1   # b connects: logged in there
    assert plan.lost() == 1.0 and plan.current == 1              # lost again: b first, the waits from the start
    assert plan.failed("refused") == 0.0 and plan.current == 0
