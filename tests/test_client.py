"""chatclient.py without a server: what is shown, the command line, and the PM checks of Session."""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys

import pytest

import chatclient
import pg3lib
from chatclient import (UNREADABLE, Session, format_history_entry, local_time, parse_timestamp,
                        visible)
from clientstore import ClientStore

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
             signer: pg3lib.KeyPair | None = None) -> dict:
    ciphertext = receiver.public.seal(text.encode()).decode()
    signature = (signer or sender).sign(pg3lib.pm_signed_bytes(sender_name, "alice", ciphertext))
    return {"op": "PM", "from": sender_name, "to": "alice", "ciphertext": ciphertext,
            "signature": signature, "sender_key": sender.public.key_form, "ts": "2026-11-24T15:04:05Z"}


def test_pm_is_decrypted_and_the_sender_key_pinned(alice, keys):
    alice.on_data(pm_frame(keys(1), "bob", keys(0), "see you at 5"))
    assert alice.out.shown[-1].endswith("bob -> you (private): see you at 5")
    assert alice.store.contact_fingerprint("h:1", "bob") == keys(1).fingerprint


def test_pm_with_a_bad_signature_is_a_warning_never_the_text(alice, keys):
    alice.on_data(pm_frame(keys(1), "bob", keys(0), "forged words", signer=keys(2)))
    assert not any("forged" in line for line in alice.out.shown)
    assert "failed its signature check" in alice.out.warned[-1]


def test_pm_sealed_for_another_key_is_unreadable(alice, keys):
    alice.on_data(pm_frame(keys(1), "bob", keys(2), "not for alice"))
    assert alice.out.shown[-1].endswith(f"bob -> you (private): {UNREADABLE}")


def test_changed_contact_key_holds_pms_until_trusted(alice, keys):
    alice.store.remember_contact("h:1", "bob", keys(1).fingerprint)
    alice.on_data(pm_frame(keys(2), "bob", keys(0), "new key, who dis"))
    alice.on_data(pm_frame(keys(2), "bob", keys(0), "second"))
    assert not any("who dis" in line for line in alice.out.shown)
    assert len(alice.out.warned) == 2  # warned on every PM
    assert keys(1).fingerprint in alice.out.warned[0] and keys(2).fingerprint in alice.out.warned[0]
    alice.show_keys("bob")
    assert keys(2).fingerprint in alice.out.shown[-1]
    alice.trust("bob")
    assert alice.store.contact_fingerprint("h:1", "bob") == keys(2).fingerprint
    assert alice.out.shown[-2].endswith("bob -> you (private): new key, who dis")
    assert alice.out.shown[-1].endswith("bob -> you (private): second")


def test_changed_contact_key_stops_a_pm_to_them(alice, keys):
    alice.store.remember_contact("h:1", "bob", keys(1).fingerprint)
    reply = {"op": "TARGET", "ok": True, "username": "bob", "public_key": keys(2).public.key_form,
             "fingerprint": keys(2).fingerprint}
    assert alice.target_key("bob", reply) is None
    assert "CHANGED" in alice.out.warned[-1] and "not sent" in alice.out.warned[-1]
    lying = dict(reply, public_key=keys(1).public.key_form)  # fingerprint of another key
    assert alice.target_key("bob", lying) is None
    alice.trust("bob")
    assert alice.target_key("bob", reply) == keys(2).public


def test_presence_updates_who_is_online(alice):
    alice.on_data({"op": "PRESENCE", "username": "bob", "online": True})
    alice.on_data({"op": "PRESENCE", "username": "carol", "online": True})
    alice.on_data({"op": "PRESENCE", "username": "bob", "online": False})
    assert alice.out.shown == ["* bob is online", "* carol is online", "* bob is offline"]
    assert alice.who_text() == "online: carol"


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
    assert chatclient.sent_text(True) == chatclient.sent_text("3") == chatclient.sent_text(-1) == "sent"
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


def test_a_one_line_pm_to_someone_offline_ends_at_once(alice):
    steps, _ = drive(alice.command("PM carol are you there"),
                     [{"op": "PM", "ok": True, "online": ["bob"]}, {"op": "CANCEL", "ok": True}])
    assert [type(s).__name__ for s in steps] == ["Send", "Reply", "Send", "Reply"]  # no "to" prompt
    assert steps[2].body == {"op": "CANCEL"}
    assert alice.out.warned == ["carol is not online (online: bob)"]
    assert "cancelled" not in alice.out.shown


def test_pm_with_nobody_online_says_so_once(alice):
    drive(alice.command("PM"), [{"op": "PM", "ok": True, "online": []}, {"op": "CANCEL", "ok": True}])
    assert alice.out.shown == ["nobody else is online"]


def test_a_trimmed_online_list_is_not_taken_as_everyone(alice):
    alice.set_online(["bob"], 3)
    assert alice.who_text() == "online: bob and 3 more"
    steps, _ = drive(alice.command("PM dave hi"),
                     [{"op": "PM", "ok": True, "online": ["bob"], "more_online": 3},
                      {"op": "TARGET", "ok": False, "error": "not_online", "message": "dave is not online"}])
    assert steps[2].body == {"op": "TARGET", "username": "dave"}  # the server decides
    assert alice.out.warned == ["cannot send to dave: dave is not online"]


def test_an_unknown_command_suggests_bm(alice):
    drive(alice.command("hello there"), [])
    assert alice.out.warned == ["unknown command 'hello' (HELP lists the commands; "
                                "to send this to everyone: BM hello there)"]
