"""state.py: the connection state machine and the session logic, in process (no sockets).

Every test runs ``state.Room`` through ``roomdriver.RoomDriver``, which carries
out the effects as chatserver.py does, with a real ``storage.FileStore`` in a
temporary directory, real password checks (tiny scrypt cost), real RSA keys
and a fake clock.
"""

from __future__ import annotations

import base64
import contextlib
import shutil
import tempfile
from typing import NamedTuple

import pytest
from Crypto.PublicKey import RSA
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import framing
import pg3lib
import protocol
import state
import store
from conftest import key_pair
from passwords import Account, LoginResult
from roomdriver import FakeClock, RoomDriver, log_in, pm_body, seal_password, sign_pm2
from state import State

PASSWORD = "correct horse"

# docs/PROTOCOL.md section 3, written out independently of state.TRANSITIONS.
PROTOCOL_NEXT: dict[State, dict[str, State]] = {
    State.AWAIT_USERNAME: {"LOGIN": State.AWAIT_PASSWORD},
    State.AWAIT_PASSWORD: {"PASSWORD": State.AWAIT_KEY},
    State.AWAIT_KEY: {"KEY": State.READY},
    State.READY: {"BM": State.AWAIT_BM_TEXT, "PM": State.AWAIT_PM_TARGET, "CH": State.READY,
                  "EX": State.CLOSED, "MOD": State.READY},   # MOD: section 10, moderation
    State.AWAIT_BM_TEXT: {"SEND": State.READY, "CANCEL": State.READY},
    State.AWAIT_PM_TARGET: {"TARGET": State.AWAIT_PM_TEXT, "CANCEL": State.READY},
    State.AWAIT_PM_TEXT: {"SEND": State.READY, "CANCEL": State.READY},
    State.CLOSED: {},
}
KNOWN_OPS = ["LOGIN", "PASSWORD", "KEY", "BM", "PM", "CH", "EX", "SEND", "TARGET", "CANCEL", "MOD"]
ALL_OPS = KNOWN_OPS + ["FOO", "BYE", "ERROR", "login"]
LOGIN_STATES = (State.AWAIT_USERNAME, State.AWAIT_PASSWORD, State.AWAIT_KEY)
SUB_STATES = (State.AWAIT_BM_TEXT, State.AWAIT_PM_TARGET, State.AWAIT_PM_TEXT)
FAST = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)


def server_keys() -> pg3lib.KeyPair:
    return key_pair(0)


def client_keys(i: int) -> pg3lib.KeyPair:
    """Client key pairs 1..4 of the shared pool (index 0 is the server's)."""
    return key_pair(1 + i)


@contextlib.contextmanager
def fresh_driver(**kwargs):
    """A driver over its own temporary data directory (for hypothesis examples)."""
    directory = tempfile.mkdtemp(prefix="test_state-")
    driver = RoomDriver(directory, server_keys(), **kwargs)
    try:
        yield driver
    finally:
        driver.close()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def driver(tmp_path):
    d = RoomDriver(str(tmp_path), server_keys())
    yield d
    d.close()


def replies(frames: list) -> list[dict]:
    return [f.body for f in frames if f.kind == "C" and "ok" in f.body]


def one_reply(frames: list, op: str) -> dict:
    """The single reply among frames, which must answer op."""
    got = replies(frames)
    assert len(got) == 1, got
    assert got[0]["op"] == op, got
    return got[0]


def assert_error(frames: list, op: str, error: str) -> dict:
    reply = one_reply(frames, op)
    assert reply["ok"] is False and reply["error"] == error, reply
    assert isinstance(reply.get("message"), str) and reply["message"], reply
    return reply


def bm_sent(d: RoomDriver, recipients: int) -> dict:
    """A BM's SEND reply: the recipients and the time it was stored under (section 11)."""
    return {"op": "SEND", "ok": True, "recipients": recipients, "ts": protocol.timestamp(d.clock())}


def data_frames(d: RoomDriver, cid: int, op: str | None = None, since: int = 0) -> list[dict]:
    return [f.body for f in d.inbox[cid][since:] if f.kind == "D" and (op is None or f.body["op"] == op)]


def online_user(d: RoomDriver, name: str, i: int) -> int:
    cid = d.connect()
    log_in(d, cid, name, PASSWORD, client_keys(i))
    return cid


# --- driving a session into a state ---------------------------------------------------

class Ctx(NamedTuple):
    cid: int            # alice, in the state under test
    bob: int            # bob, online throughout
    login: dict | None  # alice's LOGIN reply, once she has one


def drive_to(d: RoomDriver, target: State) -> Ctx:
    """Bob online, and alice's connection brought into target with valid requests."""
    bob = online_user(d, "bob", 1)
    cid = d.connect()
    login = None
    steps = [
        (State.AWAIT_PASSWORD, lambda: {"op": "LOGIN", "username": "alice"}),
        (State.AWAIT_KEY, lambda: {"op": "PASSWORD",
                                   "ciphertext": seal_password(login["server_key"], login["nonce"], PASSWORD)}),
        (State.READY, lambda: {"op": "KEY", "public_key": client_keys(0).public.key_form}),
    ]
    if target in (State.AWAIT_PM_TARGET, State.AWAIT_PM_TEXT):
        steps.append((State.AWAIT_PM_TARGET, lambda: {"op": "PM"}))
    if target is State.AWAIT_PM_TEXT:
        steps.append((State.AWAIT_PM_TEXT, lambda: {"op": "TARGET", "username": "bob"}))
    if target is State.AWAIT_BM_TEXT:
        steps.append((State.AWAIT_BM_TEXT, lambda: {"op": "BM"}))
    if target is State.CLOSED:
        steps.append((State.CLOSED, lambda: {"op": "EX"}))
    assert d.state_of(cid) is State.AWAIT_USERNAME
    for reached, make in steps:
        if d.state_of(cid) is target:
            break
        body = make()
        reply = one_reply(d.send(cid, body), body["op"])
        assert reply["ok"] is True, reply
        if body["op"] == "LOGIN":
            login = reply
        assert d.state_of(cid) is reached
    assert d.state_of(cid) is target
    return Ctx(cid, bob, login)


def valid_body(ctx: Ctx, in_state: State, op: str) -> dict:
    """A well-formed body for op (what would succeed where op is accepted)."""
    if op == "LOGIN":
        return {"op": op, "username": "alice"}
    if op == "PASSWORD":
        nonce = ctx.login["nonce"] if ctx.login else base64.b64encode(bytes(16)).decode()
        return {"op": op, "ciphertext": seal_password(server_keys().public.key_form, nonce, PASSWORD)}
    if op == "KEY":
        return {"op": op, "public_key": client_keys(0).public.key_form}
    if op == "SEND" and in_state is State.AWAIT_PM_TEXT:
        return pm_body(client_keys(0), "alice", "bob", client_keys(1).public.key_form, "psst")
    if op == "SEND":
        return {"op": op, "text": "hello all"}
    if op == "TARGET":
        return {"op": op, "username": "bob"}
    if op == "CH":
        return {"op": op, "limit": 10}
    if op == "MOD":
        return {"op": op, "action": "bans"}   # alice is an admin in check_state_op
    return {"op": op}


# --- the transition table ---------------------------------------------------------------

def test_transition_table_is_the_protocols():
    assert set(state.TRANSITIONS) == set(State)
    for st_, ops in PROTOCOL_NEXT.items():
        assert {op: t.next_state for op, t in state.TRANSITIONS[st_].items()} == ops, st_


def check_state_op(in_state: State, op: str) -> None:
    with fresh_driver(admins=("alice",)) as d:
        ctx = drive_to(d, in_state)
        body = valid_body(ctx, in_state, op)
        if in_state is State.CLOSED:
            # The shell reads nothing more from a closed connection; if it did, nothing is said.
            assert ctx.cid in d.closed and ctx.cid not in d.room.sessions
            assert d.room.receive(ctx.cid, framing.Frame("C", body)) == []
            return
        bob_seen = len(d.inbox[ctx.bob])
        histories = (d.history("alice"), d.history("bob"))
        frames = d.send(ctx.cid, body)
        expected = PROTOCOL_NEXT[in_state].get(op)
        if expected is None:
            assert len(frames) == 1 and frames[0].kind == "C", frames
            reply = frames[0].body
            assert {k: reply[k] for k in ("op", "ok", "error")} == {"op": op, "ok": False, "error": "unexpected"}
            assert isinstance(reply["message"], str) and reply["message"]
            assert d.state_of(ctx.cid) is in_state
            assert ctx.cid not in d.closed
            assert d.inbox[ctx.bob][bob_seen:] == []
            assert (d.history("alice"), d.history("bob")) == histories
            return
        assert state.TRANSITIONS[in_state][op].next_state is expected
        got = replies(frames)
        assert got and all(r["op"] == op and r["ok"] is True for r in got), got
        if op == "CH":
            assert [r["more"] for r in got] == [True] * (len(got) - 1) + [False]
        else:
            assert len(got) == 1, got
        assert d.state_of(ctx.cid) is expected
        assert (ctx.cid in d.closed) == (op == "EX")


@settings(FAST, max_examples=10)
@given(st.sampled_from(list(State)), st.sampled_from(ALL_OPS))
def test_every_state_op_pair(in_state, op):
    """Valid: the documented next state; invalid: one `unexpected` reply, state unchanged."""
    check_state_op(in_state, op)


for _state in State:   # every pair for certain, then whatever hypothesis adds
    for _op in ALL_OPS:
        test_every_state_op_pair = example(_state, _op)(test_every_state_op_pair)


@pytest.mark.parametrize("sub_state", SUB_STATES, ids=lambda s: s.value)
def test_cancel_returns_to_ready_and_forgets_the_target(driver, sub_state):
    ctx = drive_to(driver, sub_state)
    assert one_reply(driver.send(ctx.cid, {"op": "CANCEL"}), "CANCEL")["ok"] is True
    assert driver.state_of(ctx.cid) is State.READY
    assert driver.room.sessions[ctx.cid].target is None
    # A SEND now is out of place: nothing is relayed or stored.
    assert_error(driver.send(ctx.cid, valid_body(ctx, sub_state, "SEND")), "SEND", "unexpected")
    assert driver.history("bob") == [] and data_frames(driver, ctx.bob, "PM") == []


# --- bad requests -------------------------------------------------------------------------

_SMALL_KEY: list[str] = []


def small_key_form() -> str:
    """A 1024-bit RSA public key in key form (too small)."""
    if not _SMALL_KEY:
        pem = RSA.generate(1024).public_key().export_key("PEM")
        _SMALL_KEY.append(base64.b64encode(pem).decode())
    return _SMALL_KEY[0]


def _pm(ctx: Ctx, **changes) -> dict:
    body = valid_body(ctx, State.AWAIT_PM_TEXT, "SEND")
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


def _signed_by(key_index: int, sender: str, receiver: str, self_copy: str | None = None):
    """A PM2 SEND body whose signature is by that key, over those names (and that self_copy's digest)."""
    def make(ctx: Ctx) -> dict:
        body = valid_body(ctx, State.AWAIT_PM_TEXT, "SEND")
        body["signature"] = sign_pm2(client_keys(key_index), body["id"], body["sent"], sender, receiver,
                                     body["ciphertext"], body["self_copy"] if self_copy is None else self_copy)
        return body
    return make


def _pm2(pm_id: str | None = None, sent: str | None = None, **texts: str):
    """A PM2 SEND body with this id, sent, ciphertext or self_copy, correctly signed over them."""
    def make(ctx: Ctx) -> dict:
        body = valid_body(ctx, State.AWAIT_PM_TEXT, "SEND")
        if pm_id is not None:
            body["id"] = pm_id
        if sent is not None:
            body["sent"] = sent
        body.update(texts)
        body["signature"] = sign_pm2(client_keys(0), body["id"], body["sent"], "alice", "bob", body["ciphertext"],
                                     body["self_copy"])
        return body
    return make


_START = FakeClock().now


BAD_REQUESTS = [
    # (id, state, body maker, error, state after)
    ("login-missing", State.AWAIT_USERNAME, lambda c: {"op": "LOGIN"}, "bad_request", None),
    ("login-int", State.AWAIT_USERNAME, lambda c: {"op": "LOGIN", "username": 7}, "bad_request", None),
    ("login-null", State.AWAIT_USERNAME, lambda c: {"op": "LOGIN", "username": None}, "bad_request", None),
    ("login-list", State.AWAIT_USERNAME, lambda c: {"op": "LOGIN", "username": ["alice"]}, "bad_request",
     None),
    ("password-missing", State.AWAIT_PASSWORD, lambda c: {"op": "PASSWORD"}, "bad_request", None),
    ("password-int", State.AWAIT_PASSWORD, lambda c: {"op": "PASSWORD", "ciphertext": 5}, "bad_request", None),
    ("password-list", State.AWAIT_PASSWORD, lambda c: {"op": "PASSWORD", "ciphertext": ["a;b"]}, "bad_request",
     None),
    ("key-missing", State.AWAIT_KEY, lambda c: {"op": "KEY"}, "bad_request", None),
    ("key-int", State.AWAIT_KEY, lambda c: {"op": "KEY", "public_key": 5}, "bad_request", None),
    ("key-garbage", State.AWAIT_KEY, lambda c: {"op": "KEY", "public_key": "not a key"}, "bad_request", None),
    ("key-1024-bits", State.AWAIT_KEY, lambda c: {"op": "KEY", "public_key": small_key_form()}, "bad_request",
     None),
    ("key-raw-pem", State.AWAIT_KEY,
     lambda c: {"op": "KEY", "public_key": base64.b64decode(client_keys(0).public.key_form).decode()},
     "bad_request", None),
    ("key-private", State.AWAIT_KEY,
     lambda c: {"op": "KEY", "public_key": base64.b64encode(client_keys(0).to_pem()).decode()},
     "bad_request", None),
    ("bm-send-missing", State.AWAIT_BM_TEXT, lambda c: {"op": "SEND"}, "bad_request", None),
    ("bm-send-int", State.AWAIT_BM_TEXT, lambda c: {"op": "SEND", "text": 5}, "bad_request", None),
    ("bm-send-list", State.AWAIT_BM_TEXT, lambda c: {"op": "SEND", "text": ["hi"]}, "bad_request", None),
    ("bm-send-empty", State.AWAIT_BM_TEXT, lambda c: {"op": "SEND", "text": ""}, "bad_request", None),
    ("bm-send-blank", State.AWAIT_BM_TEXT, lambda c: {"op": "SEND", "text": " \t\r\n\u3000 "}, "bad_request",
     None),
    ("bm-send-4097", State.AWAIT_BM_TEXT, lambda c: {"op": "SEND", "text": "x" * 4097}, "bad_request", None),
    ("ch-string", State.READY, lambda c: {"op": "CH", "limit": "5"}, "bad_request", None),
    ("ch-zero", State.READY, lambda c: {"op": "CH", "limit": 0}, "bad_request", None),
    ("ch-negative", State.READY, lambda c: {"op": "CH", "limit": -3}, "bad_request", None),
    ("ch-true", State.READY, lambda c: {"op": "CH", "limit": True}, "bad_request", None),
    ("ch-false", State.READY, lambda c: {"op": "CH", "limit": False}, "bad_request", None),
    ("ch-float", State.READY, lambda c: {"op": "CH", "limit": 2.0}, "bad_request", None),
    ("ch-list", State.READY, lambda c: {"op": "CH", "limit": [3]}, "bad_request", None),
    ("ch-null", State.READY, lambda c: {"op": "CH", "limit": None}, "bad_request", None),
    ("target-missing", State.AWAIT_PM_TARGET, lambda c: {"op": "TARGET"}, "bad_request", None),
    ("target-int", State.AWAIT_PM_TARGET, lambda c: {"op": "TARGET", "username": 5}, "bad_request", None),
    ("target-list", State.AWAIT_PM_TARGET, lambda c: {"op": "TARGET", "username": ["bob"]}, "bad_request", None),
    ("target-self", State.AWAIT_PM_TARGET, lambda c: {"op": "TARGET", "username": "alice"}, "bad_request",
     State.READY),
    ("target-self-other-case", State.AWAIT_PM_TARGET, lambda c: {"op": "TARGET", "username": "ALICE"},
     "bad_request", State.READY),
    ("target-offline", State.AWAIT_PM_TARGET, lambda c: {"op": "TARGET", "username": "carol"}, "not_online",
     State.READY),
    ("target-unknown", State.AWAIT_PM_TARGET, lambda c: {"op": "TARGET", "username": "nobody"}, "no_such_user",
     State.READY),
    ("target-invalid-name", State.AWAIT_PM_TARGET, lambda c: {"op": "TARGET", "username": "no body!"},
     "no_such_user", State.READY),
    ("target-offline", State.AWAIT_PM_TARGET, lambda c: {"op": "TARGET", "username": "carol"}, "not_online",
     State.READY),
    ("target-offline-not-bool", State.AWAIT_PM_TARGET,
     lambda c: {"op": "TARGET", "username": "bob", "offline": "yes"}, "bad_request", None),
    ("pm-send-garbage-signature", State.AWAIT_PM_TEXT,
     lambda c: _pm(c, signature=base64.b64encode(b"\1" * 256).decode()), "bad_request", None),
    ("pm-send-not-base64-signature", State.AWAIT_PM_TEXT, lambda c: _pm(c, signature="!!!"), "bad_request", None),
    ("pm-send-signed-by-other-key", State.AWAIT_PM_TEXT, _signed_by(1, "alice", "bob"),
     "bad_request", None),
    ("pm-send-signed-for-other-receiver", State.AWAIT_PM_TEXT, _signed_by(0, "alice", "carol"),
     "bad_request", None),
    ("pm-send-signed-as-other-sender", State.AWAIT_PM_TEXT, _signed_by(0, "bob", "bob"),
     "bad_request", None),
    ("pm-send-no-ciphertext", State.AWAIT_PM_TEXT, lambda c: _pm(c, ciphertext=None), "bad_request", None),
    ("pm-send-empty-ciphertext", State.AWAIT_PM_TEXT, lambda c: _pm(c, ciphertext=""), "bad_request", None),
    ("pm-send-int-self-copy", State.AWAIT_PM_TEXT, lambda c: _pm(c, self_copy=5), "bad_request", None),
    ("pm-send-no-self-copy", State.AWAIT_PM_TEXT, lambda c: _pm(c, self_copy=None), "bad_request", None),
    ("pm-send-no-signature", State.AWAIT_PM_TEXT, lambda c: _pm(c, signature=None), "bad_request", None),
    ("pm-send-text-instead", State.AWAIT_PM_TEXT, lambda c: {"op": "SEND", "text": "hi bob"}, "bad_request",
     None),
    # PM2 (section 4.5)
    ("pm2-signed-over-another-self-copy", State.AWAIT_PM_TEXT, _signed_by(0, "alice", "bob", self_copy="x;y"),
     "bad_request", None),
    ("pm2-id-not-base64", State.AWAIT_PM_TEXT, _pm2(pm_id="not base64!"), "bad_request", None),
    ("pm2-id-15-bytes", State.AWAIT_PM_TEXT, _pm2(pm_id=base64.b64encode(bytes(15)).decode()), "bad_request", None),
    ("pm2-id-17-bytes", State.AWAIT_PM_TEXT, _pm2(pm_id=base64.b64encode(bytes(17)).decode()), "bad_request", None),
    ("pm2-id-unpadded", State.AWAIT_PM_TEXT, _pm2(pm_id=base64.b64encode(bytes(16)).decode().rstrip("=")),
     "bad_request", None),
    ("pm2-id-int", State.AWAIT_PM_TEXT, lambda c: _pm(c, id=7), "bad_request", None),
    ("pm2-no-sent", State.AWAIT_PM_TEXT, lambda c: _pm(c, sent=None), "bad_request", None),
    ("pm2-sent-not-ts", State.AWAIT_PM_TEXT, _pm2(sent=protocol.timestamp(_START).replace("T", " ")),
     "bad_request", None),
    ("pm2-sent-no-millis", State.AWAIT_PM_TEXT, _pm2(sent=protocol.timestamp(_START)[:19] + "Z"),
     "bad_request", None),
    ("pm2-sent-11-minutes-ago", State.AWAIT_PM_TEXT, _pm2(sent=protocol.timestamp(_START - 660)), "bad_request",
     None),
    ("pm2-sent-11-minutes-ahead", State.AWAIT_PM_TEXT, _pm2(sent=protocol.timestamp(_START + 660)), "bad_request",
     None),
    ("pm2-not-ascii", State.AWAIT_PM_TEXT, lambda c: _pm(c, ciphertext="\u00e9;x"), "bad_request", None),
    # The SEND fits the frame limit, the D PM (which adds the sender's key) would not.
    ("pm2-too-big-to-relay", State.AWAIT_PM_TEXT,
     _pm2(ciphertext="A" * (protocol.DEFAULT_FRAME_LIMIT - 900), self_copy="x;y"), "bad_request", None),
]


@pytest.mark.parametrize("in_state, make, error, after", [case[1:] for case in BAD_REQUESTS],
                         ids=[case[0] for case in BAD_REQUESTS])
def test_bad_request_keeps_the_state(driver, in_state, make, error, after):
    if error == "not_online":
        carol = online_user(driver, "carol", 2)   # registered, then gone
        driver.send(carol, {"op": "EX"})
    ctx = drive_to(driver, in_state)
    histories = (driver.history("alice"), driver.history("bob"))
    bob_seen = len(driver.inbox[ctx.bob])
    frames = driver.send(ctx.cid, make(ctx))
    assert len(frames) == 1
    reply = assert_error(frames, frames[0].body["op"], error)
    assert driver.state_of(ctx.cid) is (after or in_state)
    assert ctx.cid not in driver.closed
    assert driver.inbox[ctx.bob][bob_seen:] == [], "nothing reaches anyone else"
    assert (driver.history("alice"), driver.history("bob")) == histories, "nothing is stored"
    if in_state is State.AWAIT_PASSWORD:
        assert reply["attempts_left"] == 2, "an undecryptable PASSWORD counts as an attempt"


def test_refused_send_can_be_retried(driver):
    ctx = drive_to(driver, State.AWAIT_BM_TEXT)
    assert_error(driver.send(ctx.cid, {"op": "SEND", "text": "   "}), "SEND", "bad_request")
    reply = one_reply(driver.send(ctx.cid, {"op": "SEND", "text": "second try"}), "SEND")
    assert reply == bm_sent(driver, 1)
    assert [m["text"] for m in data_frames(driver, ctx.bob, "BM")] == ["second try"]

    ctx2 = drive_to(driver, State.AWAIT_PM_TEXT)  # a second alice connection takes over
    assert_error(driver.send(ctx2.cid, _pm(ctx2, signature="AAAA")), "SEND", "bad_request")
    assert one_reply(driver.send(ctx2.cid, valid_body(ctx2, State.AWAIT_PM_TEXT, "SEND")), "SEND")["ok"]


@pytest.mark.parametrize("text", ["x" * 4096, "\U0001F600" * 4096, " padded\t", "a\nb", "\u00e9t\u00e9"],
                         ids=["4096-ascii", "4096-emoji", "padded", "newline", "accents"])
def test_bm_text_is_relayed_and_stored_as_sent(driver, text):
    ctx = drive_to(driver, State.AWAIT_BM_TEXT)
    assert one_reply(driver.send(ctx.cid, {"op": "SEND", "text": text}), "SEND")["recipients"] == 1
    assert [m["text"] for m in data_frames(driver, ctx.bob, "BM")] == [text]
    assert driver.history("alice")[-1]["text"] == text == driver.history("bob")[-1]["text"]


# --- login ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["", "../x", "a/b", ".x", "-x", "_x", "a" * 33, "al ice", "alice\n", "\u00e5lice",
                                  "a\x00b"])
def test_invalid_username(driver, name):
    cid = driver.connect()
    assert_error(driver.send(cid, {"op": "LOGIN", "username": name}), "LOGIN", "invalid_username")
    assert driver.state_of(cid) is State.AWAIT_USERNAME
    assert cid not in driver.closed


@pytest.mark.parametrize("name", ["a" * 32, "A", "9", "a.b-c_d", "9lives"])
def test_valid_username(driver, name):
    cid = driver.connect()
    reply = one_reply(driver.send(cid, {"op": "LOGIN", "username": name}), "LOGIN")
    assert reply["ok"] is True and reply["new_user"] is True
    assert reply["server_key"] == server_keys().public.key_form
    assert reply["fingerprint"] == server_keys().fingerprint
    assert len(base64.b64decode(reply["nonce"], validate=True)) == 16


def login_only(d: RoomDriver, name: str) -> tuple[int, dict]:
    cid = d.connect()
    reply = one_reply(d.send(cid, {"op": "LOGIN", "username": name}), "LOGIN")
    assert reply["ok"] is True
    return cid, reply


def password(d: RoomDriver, cid: int, login: dict, pw: str | bytes) -> list:
    """A PASSWORD attempt, waiting out a failed-login delay if the room holds it."""
    start = len(d.inbox[cid])
    d.send(cid, {"op": "PASSWORD", "ciphertext": seal_password(login["server_key"], login["nonce"], pw)})
    d.wait_out(cid)
    return d.inbox[cid][start:]


@pytest.mark.parametrize("weak", ["1234567", "\u00e9" * 7, "a" * 257, "\u00e9" * 129],
                         ids=["7-chars", "7-chars-14-bytes", "257-bytes", "258-bytes"])
def test_weak_password_is_not_an_attempt(driver, weak):
    cid, login = login_only(driver, "newbie")
    for _ in range(4):
        reply = assert_error(password(driver, cid, login, weak), "PASSWORD", "weak_password")
        assert "attempts_left" not in reply
        assert driver.state_of(cid) is State.AWAIT_PASSWORD
    assert driver.history("newbie") == [] and driver.store.accounts.get("newbie") is None
    reply = one_reply(password(driver, cid, login, PASSWORD), "PASSWORD")
    assert reply == {"op": "PASSWORD", "ok": True, "new_user": True, "username": "newbie"}


@pytest.mark.parametrize("pw", ["12345678", "\u00e9" * 8, "a" * 256, "\u00e9" * 128, "\U0001F600" * 64],
                         ids=["8-chars", "8-chars-16-bytes", "256-bytes", "256-bytes-accents", "256-bytes-emoji"])
def test_password_limits_accept(driver, pw):
    cid, login = login_only(driver, "newbie")
    assert one_reply(password(driver, cid, login, pw), "PASSWORD")["ok"] is True
    # And the same password opens the account on another connection.
    cid2, login2 = login_only(driver, "newbie")
    assert login2["new_user"] is False
    assert one_reply(password(driver, cid2, login2, pw), "PASSWORD")["ok"] is True


def test_three_wrong_passwords_end_the_connection(driver):
    online_user(driver, "alice", 0)
    cid, login = login_only(driver, "alice")
    assert login["new_user"] is False
    for left in (2, 1, 0):
        reply = assert_error(password(driver, cid, login, "not the password"), "PASSWORD", "wrong_password")
        assert reply["attempts_left"] == left
    assert driver.inbox[cid][-1] == framing.Frame("C", {"op": "BYE", "reason": "too_many_failures"})
    assert driver.inbox[cid][-2].body["attempts_left"] == 0
    assert cid in driver.closed and cid not in driver.room.sessions
    assert "alice" in driver.room.online, "the first connection is untouched"


def test_undecryptable_passwords_are_attempts(driver):
    online_user(driver, "alice", 0)
    other_cid, other_login = login_only(driver, "alice")
    replayed = seal_password(other_login["server_key"], other_login["nonce"], PASSWORD)
    cid, login = login_only(driver, "alice")
    assert login["nonce"] != other_login["nonce"], "a fresh nonce per connection"
    wrong_nonce = seal_password(login["server_key"], b"\0" * 16, PASSWORD)
    for left, ciphertext in ((2, wrong_nonce), (1, replayed), (0, "garbage;garbage")):
        reply = assert_error(driver.send(cid, {"op": "PASSWORD", "ciphertext": ciphertext}), "PASSWORD",
                             "bad_request")
        assert reply["attempts_left"] == left
    assert driver.inbox[cid][-1].body == {"op": "BYE", "reason": "too_many_failures"}
    assert cid in driver.closed
    # The connection whose nonce it was can still use it.
    assert one_reply(driver.send(other_cid, {"op": "PASSWORD", "ciphertext": replayed}), "PASSWORD")["ok"]


def test_new_user_wrong_nonce_is_an_attempt_and_creates_nothing(driver):
    cid, login = login_only(driver, "newbie")
    reply = assert_error(driver.send(cid, {"op": "PASSWORD",
                                           "ciphertext": seal_password(login["server_key"], b"\1" * 16,
                                                                       PASSWORD)}),
                         "PASSWORD", "bad_request")
    assert reply["attempts_left"] == 2
    assert driver.store.accounts.get("newbie") is None


def test_same_nonce_for_every_attempt_on_a_connection(driver):
    online_user(driver, "alice", 0)
    cid, login = login_only(driver, "alice")
    assert_error(password(driver, cid, login, "wrong one"), "PASSWORD", "wrong_password")
    assert one_reply(password(driver, cid, login, PASSWORD), "PASSWORD")["ok"] is True


def test_accounts_are_case_insensitive_with_the_registered_spelling(driver):
    bob = online_user(driver, "bob", 1)
    first = driver.connect()
    login, pw, key = log_in(driver, first, "Alice", PASSWORD, client_keys(0))
    assert login["new_user"] is True and pw["new_user"] is True and pw["username"] == "Alice"
    assert data_frames(driver, bob, "PRESENCE")[-1]["username"] == "Alice"
    driver.send(first, {"op": "EX"})

    cid, login = login_only(driver, "aLICE")
    assert login["new_user"] is False
    reply = one_reply(password(driver, cid, login, PASSWORD), "PASSWORD")
    assert reply == {"op": "PASSWORD", "ok": True, "new_user": False, "username": "Alice"}
    key = one_reply(driver.send(cid, {"op": "KEY", "public_key": client_keys(0).public.key_form}), "KEY")
    assert key["online"] == ["bob"]
    presence = data_frames(driver, bob, "PRESENCE")[-1]
    assert presence["username"] == "Alice" and presence["online"] is True
    assert "alice" in driver.room.online

    # Registering "ALICE" is logging in to Alice; the history file keeps one name.
    cid3, login3 = login_only(driver, "ALICE")
    assert login3["new_user"] is False
    assert_error(password(driver, cid3, login3, "another password"), "PASSWORD", "wrong_password")
    driver.send(bob, {"op": "PM"})
    target = one_reply(driver.send(bob, {"op": "TARGET", "username": "aLiCe"}), "TARGET")
    assert target["username"] == "Alice" and target["public_key"] == client_keys(0).public.key_form
    driver.send(bob, {"op": "CANCEL"})
    driver.send(bob, {"op": "BM"})
    driver.send(bob, {"op": "SEND", "text": "hi"})
    assert driver.history("Alice")[-1]["text"] == "hi"
    assert len(driver.store.accounts) == 2


def test_takeover_replaces_the_older_connection(driver):
    bob = online_user(driver, "bob", 1)
    old = online_user(driver, "alice", 0)
    bob_seen = len(driver.inbox[bob])
    new, login = login_only(driver, "ALICE")
    assert driver.inbox[bob][bob_seen:] == [], "nothing changes before the password is right"
    reply = one_reply(password(driver, new, login, PASSWORD), "PASSWORD")
    assert reply["ok"] is True and reply["username"] == "alice"
    assert driver.inbox[old][-1].body == {"op": "BYE", "reason": "replaced"}
    assert old in driver.closed and old not in driver.room.sessions
    assert "alice" not in driver.room.online and "alice" not in driver.online
    presence = data_frames(driver, bob, "PRESENCE", bob_seen)
    assert [(p["username"], p["online"]) for p in presence] == [("alice", False)]
    key = one_reply(driver.send(new, {"op": "KEY", "public_key": client_keys(0).public.key_form}), "KEY")
    assert key["ok"] is True and key["online"] == ["bob"]
    presence = data_frames(driver, bob, "PRESENCE", bob_seen)
    assert [(p["username"], p["online"]) for p in presence] == [("alice", False), ("alice", True)]
    assert driver.online["alice"] == new and driver.room.online["alice"].cid == new
    # The new connection is the one that gets alice's messages.
    driver.send(bob, {"op": "BM"})
    assert one_reply(driver.send(bob, {"op": "SEND", "text": "to alice"}), "SEND")["recipients"] == 1
    assert [m["text"] for m in data_frames(driver, new, "BM")] == ["to alice"]
    assert driver.stray == []


def test_takeover_before_key_says_no_presence(driver):
    bob = online_user(driver, "bob", 1)
    old, login = login_only(driver, "alice")
    one_reply(password(driver, old, login, PASSWORD), "PASSWORD")
    bob_seen = len(driver.inbox[bob])
    new, login = login_only(driver, "alice")
    assert one_reply(password(driver, new, login, PASSWORD), "PASSWORD")["ok"] is True
    assert driver.inbox[old][-1].body == {"op": "BYE", "reason": "replaced"} and old in driver.closed
    assert driver.inbox[bob][bob_seen:] == []


def test_wrong_password_does_not_take_over(driver):
    old = online_user(driver, "alice", 0)
    new, login = login_only(driver, "alice")
    assert_error(password(driver, new, login, "not it at all"), "PASSWORD", "wrong_password")
    assert old not in driver.closed and driver.room.online["alice"].cid == old


def test_login_timeout_says_bye_idle(driver):
    idle = driver.connect()
    driver.tick(10)
    half, login = login_only(driver, "alice")           # connected 10 s later
    keyless = driver.connect()
    login_k = one_reply(driver.send(keyless, {"op": "LOGIN", "username": "bob"}), "LOGIN")
    one_reply(password(driver, keyless, login_k, PASSWORD), "PASSWORD")
    done = online_user(driver, "carol", 2)
    driver.tick(19.9)
    assert not driver.closed
    driver.tick(0.2)                                     # 30.1 s after the first connect
    assert driver.inbox[idle] == [framing.Frame("C", {"op": "BYE", "reason": "idle"})]
    assert idle in driver.closed and idle not in driver.room.sessions
    assert half not in driver.closed
    driver.tick(10)                                      # 30.1 s after the others
    for cid in (half, keyless):
        assert driver.inbox[cid][-1].body == {"op": "BYE", "reason": "idle"}
        assert cid in driver.closed
    assert "bob" not in driver.room.logged_in
    assert done not in driver.closed and driver.state_of(done) is State.READY
    driver.tick(1000)
    assert done not in driver.closed


# --- what goes to others ---------------------------------------------------------------------

def test_bm_reaches_exactly_the_other_online_users(driver):
    alice = online_user(driver, "alice", 0)
    bob = online_user(driver, "bob", 1)
    carol = online_user(driver, "Carol", 2)
    keyless, login = login_only(driver, "dave")
    one_reply(password(driver, keyless, login, PASSWORD), "PASSWORD")
    fresh = driver.connect()
    seen = {cid: len(driver.inbox[cid]) for cid in (alice, bob, carol, keyless, fresh)}
    one_reply(driver.send(alice, {"op": "BM"}), "BM")
    reply = one_reply(driver.send(alice, {"op": "SEND", "text": "hello all"}), "SEND")
    assert reply == bm_sent(driver, 2)
    for cid in (bob, carol):
        (bm,) = data_frames(driver, cid, "BM", seen[cid])
        assert bm["from"] == "alice" and bm["text"] == "hello all"
    for cid in (keyless, fresh):
        assert driver.inbox[cid][seen[cid]:] == []
    assert data_frames(driver, alice, since=seen[alice]) == []
    entry = driver.history("alice")[-1]
    assert entry == {"ts": bm["ts"], "type": "BM", "from": "alice", "to": "*", "text": "hello all"}
    assert driver.history("bob")[-1] == entry == driver.history("Carol")[-1]
    assert driver.history("dave") == []


def test_pm_end_to_end(driver):
    alice = online_user(driver, "alice", 0)
    bob = online_user(driver, "Bob", 1)
    carol = online_user(driver, "carol", 2)
    pm = one_reply(driver.send(alice, {"op": "PM"}), "PM")
    assert sorted(pm["online"]) == ["Bob", "carol"]
    target = one_reply(driver.send(alice, {"op": "TARGET", "username": "bob"}), "TARGET")
    assert target == {"op": "TARGET", "ok": True, "username": "Bob", "online": True,
                      "public_key": client_keys(1).public.key_form, "fingerprint": client_keys(1).fingerprint}
    body = pm_body(client_keys(0), "alice", "Bob", target["public_key"], "secret \U0001F600")
    reply = one_reply(driver.send(alice, body), "SEND")
    assert reply == {"op": "SEND", "ok": True, "recipients": 1}
    assert driver.state_of(alice) is State.READY
    (got,) = data_frames(driver, bob, "PM")
    assert got["from"] == "alice" and got["to"] == "Bob" and got["ciphertext"] == body["ciphertext"]
    assert got["sender_key"] == client_keys(0).public.key_form
    sender = pg3lib.PublicKey.from_key_form(got["sender_key"])
    digests = {"ciphertext_sha256": pg3lib.sealed_digest(body["ciphertext"]),
               "self_copy_sha256": pg3lib.sealed_digest(body["self_copy"])}
    assert sorted(got) == ["ciphertext", "from", "id", "op", "self_copy_sha256", "sender_key", "sent", "signature",
                           "to", "ts"]
    assert (got["id"], got["sent"], got["self_copy_sha256"]) == (body["id"], body["sent"], digests["self_copy_sha256"])
    assert sender.verify(pg3lib.pm2_signed_bytes(got["id"], got["sent"], "alice", "Bob", *digests.values()),
                         got["signature"])
    signed = {"id": body["id"], "sent": body["sent"], "signature": body["signature"], **digests}
    for owner, copy in (("alice", body["self_copy"]), ("Bob", body["ciphertext"])):   # section 4.6
        assert driver.history(owner)[-1] == {"ts": got["ts"], "type": "PM", "from": "alice", "to": "Bob",
                                             "ciphertext": copy, **signed}
    assert client_keys(1).open(got["ciphertext"]).decode() == "secret \U0001F600"
    assert data_frames(driver, carol, "PM") == []
    assert driver.history("alice")[-1]["ciphertext"] == body["self_copy"]
    assert driver.history("Bob")[-1]["ciphertext"] == body["ciphertext"]
    assert driver.history("carol") == []
    for cid, copy in ((alice, body["self_copy"]), (bob, body["ciphertext"])):
        (page,) = replies(driver.send(cid, {"op": "CH"}))
        assert [(e["type"], e["from"], e["to"], e["ciphertext"]) for e in page["entries"]] == \
            [("PM", "alice", "Bob", copy)]


def _pm_again(driver: RoomDriver, cid: int, body: dict) -> list:
    """PM, TARGET bob, then this SEND body: the SEND's frames."""
    assert one_reply(driver.send(cid, {"op": "PM"}), "PM")["ok"]
    assert one_reply(driver.send(cid, {"op": "TARGET", "username": "bob"}), "TARGET")["ok"]
    return driver.send(cid, body)


def test_pm2_replayed_id_is_refused_even_after_a_new_login(driver):
    ctx = drive_to(driver, State.AWAIT_PM_TEXT)
    body = valid_body(ctx, State.AWAIT_PM_TEXT, "SEND")
    assert one_reply(driver.send(ctx.cid, body), "SEND")["ok"]
    stored = (driver.history("alice"), driver.history("bob"))
    reply = assert_error(_pm_again(driver, ctx.cid, body), "SEND", "bad_request")
    assert "used before" in reply["message"]
    assert driver.state_of(ctx.cid) is State.AWAIT_PM_TEXT   # a refused SEND may be corrected (section 4.4)
    ctx2 = drive_to(driver, State.AWAIT_PM_TEXT)   # alice again, on a new connection: the memory is the room's
    assert_error(driver.send(ctx2.cid, body), "SEND", "bad_request")
    assert (driver.history("alice"), driver.history("bob")) == stored
    assert len(data_frames(driver, ctx.bob, "PM")) == 1 and data_frames(driver, ctx2.bob, "PM") == []
    # The same id from another sender is that sender's own business.
    fresh = pm_body(client_keys(1), "bob", "alice", client_keys(0).public.key_form, "hi", pm_id=body["id"])
    assert one_reply(_pm_again_to(driver, ctx2.bob, "alice", fresh), "SEND")["ok"]


def _pm_again_to(driver: RoomDriver, cid: int, target: str, body: dict) -> list:
    assert one_reply(driver.send(cid, {"op": "PM"}), "PM")["ok"]
    assert one_reply(driver.send(cid, {"op": "TARGET", "username": target}), "TARGET")["ok"]
    return driver.send(cid, body)


def test_pm2_replay_after_the_window_is_refused_as_stale(driver):
    ctx = drive_to(driver, State.AWAIT_PM_TEXT)
    body = valid_body(ctx, State.AWAIT_PM_TEXT, "SEND")
    assert one_reply(driver.send(ctx.cid, body), "SEND")["ok"]
    driver.tick(protocol.PM_CLOCK_WINDOW + 61)
    reply = assert_error(_pm_again(driver, ctx.cid, body), "SEND", "bad_request")
    assert "minutes" in reply["message"]          # its sent is out of the window now ...
    assert one_reply(driver.send(ctx.cid, pm_body(client_keys(0), "alice", "bob", client_keys(1).public.key_form,
                                                  "now", now=driver.clock())), "SEND")["ok"]
    assert len(driver.store.pm_ids.ids) == 1      # ... and the store has forgotten its id


@pytest.fixture
def pm1_driver(tmp_path):
    d = RoomDriver(str(tmp_path), server_keys(), accept_pm1=True)
    yield d
    d.close()


def test_pm1_is_accepted_while_accept_pm1_is_on(pm1_driver):
    driver = pm1_driver
    ctx = drive_to(driver, State.AWAIT_PM_TEXT)
    body = pm_body(client_keys(0), "alice", "bob", client_keys(1).public.key_form, "old client", version=1)
    assert one_reply(driver.send(ctx.cid, body), "SEND") == {"op": "SEND", "ok": True, "recipients": 1}
    (got,) = data_frames(driver, ctx.bob, "PM")
    assert "id" not in got and pg3lib.PublicKey.from_key_form(got["sender_key"]).verify(
        pg3lib.pm_signed_bytes("alice", "bob", got["ciphertext"]), got["signature"])
    assert "id" not in driver.history("bob")[-1]


def test_pm1_is_refused_without_accept_pm1(tmp_path):
    d = RoomDriver(str(tmp_path), server_keys())  # the default since the client speaks PM2
    try:
        ctx = drive_to(d, State.AWAIT_PM_TEXT)
        body = pm_body(client_keys(0), "alice", "bob", client_keys(1).public.key_form, "old client", version=1)
        reply = assert_error(d.send(ctx.cid, body), "SEND", "bad_request")
        assert "version 2" in reply["message"] and d.state_of(ctx.cid) is State.AWAIT_PM_TEXT
        assert d.history("bob") == [] and data_frames(d, ctx.bob, "PM") == []
        assert one_reply(d.send(ctx.cid, valid_body(ctx, State.AWAIT_PM_TEXT, "SEND")), "SEND")["ok"]
    finally:
        d.close()


def test_login_reply_says_protocol_2(driver):
    cid = driver.connect()
    reply = one_reply(driver.send(cid, {"op": "LOGIN", "username": "alice"}), "LOGIN")
    assert reply["protocol"] == protocol.PROTOCOL_VERSION == 2


def test_pm_to_a_target_gone_offline(driver):
    ctx = drive_to(driver, State.AWAIT_PM_TEXT)
    driver.disconnect(ctx.bob)
    assert_error(driver.send(ctx.cid, valid_body(ctx, State.AWAIT_PM_TEXT, "SEND")), "SEND", "not_online")
    assert driver.state_of(ctx.cid) is State.READY
    assert driver.history("alice") == [] and driver.history("bob") == []


def test_pm_to_a_target_that_reconnected(driver):
    ctx = drive_to(driver, State.AWAIT_PM_TEXT)
    online_user(driver, "bob", 1)   # takes over: the session alice targeted is gone
    assert_error(driver.send(ctx.cid, valid_body(ctx, State.AWAIT_PM_TEXT, "SEND")), "SEND", "not_online")
    assert driver.state_of(ctx.cid) is State.READY


# --- offline PMs and no_such_user (docs/PROTOCOL.md sections 4.5 and 5) ------------------------

def _target_of(d: RoomDriver, cid: int, name: str, **extra) -> dict:
    one_reply(d.send(cid, {"op": "PM"}), "PM")
    return one_reply(d.send(cid, {"op": "TARGET", "username": name, **extra}), "TARGET")


def _offline_pm(d: RoomDriver, cid: int, name: str, text: str, sender: str = "alice", key_index: int = 0) -> tuple:
    """PM, TARGET with offline:true, SEND; returns (the SEND body, its reply)."""
    target = _target_of(d, cid, name, offline=True)
    assert target["ok"], target
    body = pm_body(client_keys(key_index), sender, target["username"], target["public_key"], text,
                   now=d.clock())
    return body, one_reply(d.send(cid, body), "SEND")


def _gone(d: RoomDriver, name: str, i: int) -> None:
    """The account exists, has given key i in KEY, and is offline."""
    cid = online_user(d, name, i)
    d.send(cid, {"op": "EX"})


def _after_key(d: RoomDriver, cid: int) -> list:
    """The frames cid got after its KEY reply."""
    frames = d.inbox[cid]
    at = next(i for i, f in enumerate(frames) if f.kind == "C" and f.body.get("op") == "KEY")
    return frames[at + 1:]


def test_target_offline_true_gives_the_last_key_and_online_false(driver):
    alice = online_user(driver, "alice", 0)
    _gone(driver, "Bob", 1)
    assert assert_error([framing.Frame("C", _target_of(driver, alice, "bob"))], "TARGET", "not_online")
    assert driver.state_of(alice) is State.READY
    assert _target_of(driver, alice, "BOB", offline=True) == {
        "op": "TARGET", "ok": True, "username": "Bob", "online": False,
        "public_key": client_keys(1).public.key_form, "fingerprint": client_keys(1).fingerprint}
    assert driver.state_of(alice) is State.AWAIT_PM_TEXT
    one_reply(driver.send(alice, {"op": "CANCEL"}), "CANCEL")
    _gone(driver, "Bob", 2)   # a new key: that one is the last
    assert _target_of(driver, alice, "bob", offline=True)["public_key"] == client_keys(2).public.key_form


def test_no_such_user_for_unknown_and_invalid_names_even_with_offline(driver):
    alice = online_user(driver, "alice", 0)
    for name in ("nobody", "no body", "", "-x", "a" * 33):
        assert_error([framing.Frame("C", _target_of(driver, alice, name, offline=True))], "TARGET", "no_such_user")
        assert driver.state_of(alice) is State.READY
    assert_error([framing.Frame("C", _target_of(driver, alice, "ALICE", offline=True))], "TARGET", "bad_request")
    assert driver.state_of(alice) is State.READY


def test_account_that_never_gave_a_key_is_not_online_even_with_offline(driver):
    alice = online_user(driver, "alice", 0)
    cid, login = login_only(driver, "carol")
    assert replies(password(driver, cid, login, PASSWORD))[0]["ok"] is True   # registered, no KEY
    driver.disconnect(cid)
    assert_error([framing.Frame("C", _target_of(driver, alice, "carol", offline=True))], "TARGET", "not_online")
    assert driver.state_of(alice) is State.READY


def test_offline_pms_are_kept_in_history_and_delivered_after_key_once_in_order(driver):
    alice = online_user(driver, "alice", 0)
    _gone(driver, "Bob", 1)
    sent = []
    for text in ("one", "two", "three"):
        body, reply = _offline_pm(driver, alice, "bob", text)
        assert reply == {"op": "SEND", "ok": True, "recipients": 0}
        assert driver.state_of(alice) is State.READY
        sent.append(body)
    ids = [b["id"] for b in sent]
    # In both histories from SEND ok on, as for a live PM.
    assert [e["id"] for e in driver.history("Bob") if e["type"] == "PM"] == ids
    assert [e["ciphertext"] for e in driver.history("Bob") if e["type"] == "PM"] == [b["ciphertext"] for b in sent]
    assert [e["id"] for e in driver.history("alice") if e["type"] == "PM"] == ids
    bob = driver.connect()
    log_in(driver, bob, "bob", PASSWORD, client_keys(1))
    after = _after_key(driver, bob)
    assert [f.kind for f in after[:3]] == ["D"] * 3
    got = [f.body for f in after[:3]]
    assert [g["id"] for g in got] == ids and all(g["offline"] is True and g["op"] == "PM" for g in got)
    assert [client_keys(1).open(g["ciphertext"]) for g in got] == [b"one", b"two", b"three"]
    assert all(g["from"] == "alice" and g["to"] == "Bob" for g in got)
    assert not [f for f in after[3:] if f.body.get("op") == "PM"]
    driver.send(bob, {"op": "EX"})
    again = driver.connect()
    log_in(driver, again, "bob", PASSWORD, client_keys(1))
    assert not [f for f in _after_key(driver, again) if f.body.get("op") == "PM"], "delivered once"
    assert [e["id"] for e in driver.history("Bob") if e["type"] == "PM"] == ids
    assert driver.stray == []


def test_offline_pms_are_bounded(tmp_path):
    d = RoomDriver(str(tmp_path), server_keys(), offline_limit=2)
    try:
        alice = online_user(d, "alice", 0)
        _gone(d, "bob", 1)
        assert [_offline_pm(d, alice, "bob", t)[1]["ok"] for t in ("a", "b")] == [True, True]
        _, reply = _offline_pm(d, alice, "bob", "c")
        assert reply["ok"] is False and reply["error"] == "rate_limited", reply
        assert d.state_of(alice) is State.READY
        assert len([e for e in d.history("bob") if e["type"] == "PM"]) == 2, "nothing stored past the bound"
        bob = d.connect()
        log_in(d, bob, "bob", PASSWORD, client_keys(1))
        assert len([f for f in _after_key(d, bob) if f.body.get("op") == "PM"]) == 2
        d.send(bob, {"op": "EX"})
        assert _offline_pm(d, alice, "bob", "d")[1]["ok"] is True, "delivered ones no longer count"
    finally:
        d.close()


def test_offline_target_that_is_back_at_send_gets_it_live(driver):
    alice = online_user(driver, "alice", 0)
    _gone(driver, "bob", 1)
    target = _target_of(driver, alice, "bob", offline=True)
    bob = online_user(driver, "bob", 1)
    body = pm_body(client_keys(0), "alice", "bob", target["public_key"], "hi", now=driver.clock())
    assert one_reply(driver.send(alice, body), "SEND") == {"op": "SEND", "ok": True, "recipients": 1}
    (got,) = data_frames(driver, bob, "PM")
    assert got["id"] == body["id"] and "offline" not in got


def test_online_target_with_offline_true_that_leaves_before_send_gets_it_kept(driver):
    alice = online_user(driver, "alice", 0)
    bob = online_user(driver, "bob", 1)
    target = _target_of(driver, alice, "bob", offline=True)
    assert target["online"] is True
    driver.send(bob, {"op": "EX"})
    body = pm_body(client_keys(0), "alice", "bob", target["public_key"], "later", now=driver.clock())
    assert one_reply(driver.send(alice, body), "SEND") == {"op": "SEND", "ok": True, "recipients": 0}
    bob = driver.connect()
    log_in(driver, bob, "bob", PASSWORD, client_keys(1))
    assert [f.body["id"] for f in _after_key(driver, bob) if f.body.get("op") == "PM"] == [body["id"]]


def test_kept_pms_and_the_last_key_survive_a_restart(tmp_path):
    d = RoomDriver(str(tmp_path), server_keys())
    alice = online_user(d, "alice", 0)
    _gone(d, "bob", 1)
    body, reply = _offline_pm(d, alice, "bob", "kept")
    assert reply["ok"]
    d.close()
    d = RoomDriver(str(tmp_path), server_keys())
    try:
        alice = online_user(d, "alice", 0)
        assert _target_of(d, alice, "bob", offline=True)["public_key"] == client_keys(1).public.key_form
        bob = d.connect()
        log_in(d, bob, "bob", PASSWORD, client_keys(1))
        assert [f.body["id"] for f in _after_key(d, bob) if f.body.get("op") == "PM"] == [body["id"]]
    finally:
        d.close()


def test_shared_room_sends_the_pms_go_online_took_right_after_the_key_reply():
    room = state.SharedRoom(server_keys(), node="node1")
    _shared_login(room, 9, "bob")
    room.completed(9, store.CLAIMED)
    out = room.receive(9, framing.Frame("C", {"op": "KEY", "public_key": client_keys(1).public.key_form}))
    assert isinstance(out[-1], store.SaveKey) and out[-1].key_form == client_keys(1).public.key_form
    out = room.completed(9, store.KEY_SAVED)
    assert isinstance(out[-1], store.GoOnline)
    kept = framing.data({"op": "PM", "from": "alice", "to": "bob", "offline": True})
    out = room.completed(9, store.WentOnline((1, 0), (kept,)))
    sent = [e.data for e in out if isinstance(e, state.Send)]
    assert framing.FrameDecoder(0).feed(sent[0])[0].body["op"] == "KEY" and sent[1:] == [kept]


def _shared_online(room: state.SharedRoom, cid: int, name: str, position: tuple) -> None:
    """A local session of ``name`` that came online at ``position`` in the event order."""
    _shared_login(room, cid, name)
    room.completed(cid, store.CLAIMED)
    room.receive(cid, framing.Frame("C", {"op": "KEY", "public_key": client_keys(cid % 4).public.key_form}))
    room.completed(cid, store.KEY_SAVED)
    room.completed(cid, store.WentOnline(position))


def test_shared_room_gives_an_event_to_everyone_online_at_once_unless_someone_came_after_it():
    room = state.SharedRoom(server_keys(), node="node1")
    _shared_online(room, 1, "bob", (10, 0))
    _shared_online(room, 2, "cat", (20, 0))
    assert room.cluster_event(store.Broadcast((15, 0), "zed", b"early")) == [state.Deliver(["bob"], b"early")]
    assert room.cluster_event(store.Broadcast((12, 0), "bob", b"own")) == []   # the sender only is older
    assert room.cluster_event(store.Broadcast((21, 0), "zed", b"later")) == [state.DeliverAll(b"later", "zed")]
    assert room.cluster_event(store.Broadcast((22, 0), "cat", b"mine")) == [state.DeliverAll(b"mine", "cat")]
    (presence,) = room.cluster_event(store.Presence((23, 0), "zed", "node2/5", False))
    assert isinstance(presence, state.DeliverAll) and presence.exclude == "zed"
    assert framing.FrameDecoder(0).feed(presence.data)[0].body["username"] == "zed"
    (presence,) = room.cluster_event(store.Presence((18, 0), "zed", "node2/5", False))
    assert isinstance(presence, state.Deliver) and presence.users == ["bob"]
    # A later login moves the line: events before it go to those online before them only.
    _shared_online(room, 3, "dan", (30, 0))
    assert room.cluster_event(store.Broadcast((25, 0), "zed", b"x")) == [state.Deliver(["bob", "cat"], b"x")]
    assert room.cluster_event(store.Broadcast((31, 0), "zed", b"y")) == [state.DeliverAll(b"y", "zed")]


def test_a_session_ended_with_a_send_pending_is_offline_at_once_its_bye_behind_the_reply():
    room = state.SharedRoom(server_keys(), node="node1")
    _shared_online(room, 1, "bob", (10, 0))
    _shared_online(room, 2, "cat", (20, 0))
    room.receive(1, framing.Frame("C", {"op": "BM"}))
    out = room.receive(1, framing.Frame("C", {"op": "SEND", "text": "my last"}))
    assert any(isinstance(e, store.AppendHistory) for e in out)   # its reply waits for the store
    out = room.cluster_event(store.Kick("bob", "node1/1"))         # replaced on another node meanwhile
    assert state.Offline("bob", 1) in out   # the server delivers it nothing more from now on
    assert not [e for e in out if isinstance(e, (state.Send, state.Close))]   # BYE after the SEND reply
    assert room.cluster_event(store.Broadcast((25, 0), "zed", b"later")) == [state.DeliverAll(b"later", "zed")]
    out = room.completed(1, store.Appended(recipients=1))
    bodies = [framing.FrameDecoder(0).feed(e.data)[0].body for e in out if isinstance(e, state.Send)]
    assert [(b["op"], b.get("reason")) for b in bodies] == [("SEND", None), ("BYE", "replaced")]


def test_a_broadcast_read_before_the_go_online_answer_comes_after_the_key_reply():
    room = state.SharedRoom(server_keys(), node="node1")
    _shared_online(room, 1, "bob", (10, 0))
    _shared_login(room, 5, "dan")
    room.completed(5, store.CLAIMED)
    room.receive(5, framing.Frame("C", {"op": "KEY", "public_key": client_keys(1).public.key_form}))
    room.completed(5, store.KEY_SAVED)
    frame = framing.data({"op": "BM", "from": "zed", "text": "after dan came online", "ts": "t"})
    assert room.cluster_event(store.Broadcast((35, 0), "zed", frame)) == [state.DeliverAll(frame, "zed")]
    out = room.completed(5, store.WentOnline((30, 0)))
    to_dan = [e for e in out if isinstance(e, (state.Send, state.Page, state.Deliver)) and
              (getattr(e, "cid", None) == 5 or getattr(e, "users", None) == ["dan"])]
    assert isinstance(to_dan[0], state.Send) and framing.FrameDecoder(0).feed(to_dan[0].data)[0].body["op"] == "KEY"
    assert to_dan[-1] == state.Deliver(["dan"], frame)   # once, and after the reply


def test_ch_pages_and_limit(tmp_path):
    d = RoomDriver(str(tmp_path), server_keys(), frame_limit=1024)
    try:
        alice = online_user(d, "alice", 0)
        (empty,) = d.send(alice, {"op": "CH"})
        assert empty.body == {"op": "CH", "ok": True, "entries": [], "more": False}
        texts = [f"message {i} " + "x" * 100 for i in range(30)]
        for text in texts:
            d.send(alice, {"op": "BM"})
            d.send(alice, {"op": "SEND", "text": text})
        frames = d.send(alice, {"op": "CH"})
        assert len(frames) > 2
        assert all(len(framing.encode(f.kind, f.body)) - framing.HEADER_SIZE <= 1024 for f in frames)
        assert [f.body["more"] for f in frames] == [True] * (len(frames) - 1) + [False]
        entries = [e for f in frames for e in f.body["entries"]]
        assert [e["text"] for e in entries] == texts
        assert entries == d.history("alice")
        frames = d.send(alice, {"op": "CH", "limit": 3})
        assert [e["text"] for f in frames for e in f.body["entries"]] == texts[-3:]
        frames = d.send(alice, {"op": "CH", "limit": 1000})
        assert len([e for f in frames for e in f.body["entries"]]) == 30
    finally:
        d.close()


def test_ex_goes_offline_and_closes(driver):
    bob = online_user(driver, "bob", 1)
    alice = online_user(driver, "alice", 0)
    seen = len(driver.inbox[bob])
    assert driver.send(alice, {"op": "EX"}) == [framing.Frame("C", {"op": "EX", "ok": True})]
    assert alice in driver.closed and "alice" not in driver.room.online and "alice" not in driver.online
    assert [(p["username"], p["online"]) for p in data_frames(driver, bob, "PRESENCE", seen)] == [("alice", False)]
    assert one_reply(driver.send(bob, {"op": "PM"}), "PM")["online"] == []


def test_disconnect_mid_send_goes_offline(driver):
    bob = online_user(driver, "bob", 1)
    ctx_alice = online_user(driver, "alice", 0)
    driver.send(ctx_alice, {"op": "BM"})
    seen = len(driver.inbox[bob])
    driver.disconnect(ctx_alice)
    assert ctx_alice not in driver.room.sessions and "alice" not in driver.room.online
    assert [(p["username"], p["online"]) for p in data_frames(driver, bob, "PRESENCE", seen)] == [("alice", False)]


def test_pipelined_requests_are_answered_in_order(tmp_path):
    nonce = bytes(range(16))
    d = RoomDriver(str(tmp_path), server_keys(), random_bytes=lambda n: nonce[:n])
    try:
        bob = online_user(d, "bob", 1)
        alice = d.connect()
        key = server_keys().public.key_form
        bodies = [{"op": "BM"},
                  {"op": "LOGIN", "username": "alice"},
                  {"op": "PASSWORD", "ciphertext": seal_password(key, nonce, PASSWORD)},
                  {"op": "KEY", "public_key": client_keys(0).public.key_form},
                  {"op": "BM"}, {"op": "SEND", "text": "one"},
                  {"op": "CH", "limit": 1},
                  {"op": "PM"}, {"op": "TARGET", "username": "bob"}, {"op": "CANCEL"},
                  {"op": "EX"}, {"op": "BM"}]
        frames = d.send_many(alice, bodies)
        got = replies(frames)
        assert [r["op"] for r in got] == [b["op"] for b in bodies[:-1]], "in order; nothing after EX"
        assert [r["ok"] for r in got] == [False] + [True] * 10
        assert got[6]["entries"][0]["text"] == "one"
        assert [m["text"] for m in data_frames(d, bob, "BM")] == ["one"]
        assert alice in d.closed and d.stray == []
    finally:
        d.close()


# --- failed-login delay and registration rate ----------------------------------------------

def wrong_attempt(d: RoomDriver, cid: int, login: dict) -> dict:
    return assert_error(password(d, cid, login, "not the password"), "PASSWORD", "wrong_password")


def test_failed_login_delay_holds_the_next_attempt(driver):
    online_user(driver, "alice", 0)
    cid, login = login_only(driver, "alice")
    wrong_attempt(driver, cid, login)
    other, other_login = login_only(driver, "alice")   # the delay is the account's, not the connection's
    right = seal_password(other_login["server_key"], other_login["nonce"], PASSWORD)
    assert driver.send(other, {"op": "PASSWORD", "ciphertext": right}) == []
    assert driver.room.busy(other)
    driver.tick(0.9)
    assert [r["op"] for r in replies(driver.inbox[other])] == ["LOGIN"], "still held"
    driver.tick(0.2)
    assert replies(driver.inbox[other])[-1] == {"op": "PASSWORD", "ok": True, "new_user": False,
                                                "username": "alice"}


def test_failed_login_delay_doubles(driver):
    online_user(driver, "alice", 0)
    cid, login = login_only(driver, "alice")
    wrong_attempt(driver, cid, login)                      # not held: the first failure
    start = driver.clock()
    wrong_attempt(driver, cid, login)                      # held 1 s
    assert 1.0 <= driver.clock() - start < 1.5
    other, other_login = login_only(driver, "alice")
    start = driver.clock()
    one_reply(password(driver, other, other_login, PASSWORD), "PASSWORD")   # held 2 s, then right
    assert 2.0 <= driver.clock() - start < 2.5
    third, third_login = login_only(driver, "alice")
    assert one_reply(driver.send(third, {"op": "PASSWORD", "ciphertext": seal_password(
        third_login["server_key"], third_login["nonce"], PASSWORD)}), "PASSWORD")["ok"], "a success forgets"


def test_login_clock_stops_while_held(driver):
    online_user(driver, "alice", 0)
    cid, login = login_only(driver, "alice")          # connected at t0, 30 s to log in
    driver.tick(28)
    wrong_attempt(driver, cid, login)                   # t0+28: not held
    wrong_attempt(driver, cid, login)                   # held until t0+29 (1 s)
    assert one_reply(password(driver, cid, login, PASSWORD), "PASSWORD")["ok"] is True   # held until t0+31
    driver.tick(1.5)                                    # t0+32.5: 3 s of it were held
    assert cid not in driver.closed
    key = driver.send(cid, {"op": "KEY", "public_key": client_keys(0).public.key_form})
    assert one_reply(key, "KEY")["ok"] is True


def test_login_deadline_still_applies_after_a_hold(driver):
    online_user(driver, "alice", 0)
    cid, login = login_only(driver, "alice")
    driver.tick(28)
    wrong_attempt(driver, cid, login)
    wrong_attempt(driver, cid, login)                   # held 1 s: the deadline moves to t0+31
    driver.tick(1.5)                                    # t0+30.5
    assert cid not in driver.closed
    driver.tick(0.75)                                   # t0+31.25
    assert cid in driver.closed and driver.inbox[cid][-1].body == {"op": "BYE", "reason": "idle"}


def test_disconnect_while_held_forgets_the_session(driver):
    """A connection that goes away while its PASSWORD is held is forgotten (no leak)."""
    online_user(driver, "alice", 0)
    cid, login = login_only(driver, "alice")
    wrong_attempt(driver, cid, login)
    seal = seal_password(login["server_key"], login["nonce"], PASSWORD)
    assert driver.send(cid, {"op": "PASSWORD", "ciphertext": seal}) == [] and driver.room.busy(cid)
    driver.disconnect(cid)
    driver.tick(120)
    assert cid not in driver.room.sessions


def test_held_attempts_are_answered_in_order_and_the_later_one_takes_over(driver):
    online_user(driver, "alice", 0)
    cid, login = login_only(driver, "alice")
    wrong_attempt(driver, cid, login)
    assert driver.send(cid, {"op": "PASSWORD", "ciphertext": seal_password(
        login["server_key"], login["nonce"], PASSWORD)}) == []
    other, other_login = login_only(driver, "alice")
    one_reply(password(driver, other, other_login, PASSWORD), "PASSWORD")   # both held; cid answered first
    assert driver.inbox[cid][-1].body == {"op": "BYE", "reason": "replaced"} and cid in driver.closed
    driver.tick(120)
    assert sorted(driver.room.sessions) == sorted(c for c in driver.inbox if c not in driver.closed)


def test_registration_rate_per_address(tmp_path):
    d = RoomDriver(str(tmp_path), server_keys(), register_rate=2)
    try:
        for name in ("u1", "u2"):
            cid, login = login_only(d, name)
            assert one_reply(password(d, cid, login, PASSWORD), "PASSWORD")["ok"] is True
        cid, login = login_only(d, "u3")
        assert_error(password(d, cid, login, "short"), "PASSWORD", "weak_password")   # weak comes first
        for _ in range(3):
            reply = assert_error(password(d, cid, login, PASSWORD), "PASSWORD", "rate_limited")
            assert "attempts_left" not in reply, "not an attempt"
        assert d.state_of(cid) is State.AWAIT_PASSWORD and d.store.accounts.get("u3") is None
        # Existing accounts still log in; another address may register.
        old, old_login = login_only(d, "u1")
        assert one_reply(password(d, old, old_login, PASSWORD), "PASSWORD")["ok"] is True
        there = d.connect("192.0.2.7")
        there_login = one_reply(d.send(there, {"op": "LOGIN", "username": "u3"}), "LOGIN")
        assert one_reply(password(d, there, there_login, PASSWORD), "PASSWORD")["ok"] is True
        # An hour later the first address may register again.
        d.tick(state.REGISTRATION_WINDOW + 1)
        later, later_login = login_only(d, "u4")
        assert one_reply(password(d, later, later_login, PASSWORD), "PASSWORD")["ok"] is True
    finally:
        d.close()


def test_registrations_in_flight_count(tmp_path):
    d = RoomDriver(str(tmp_path), server_keys(), register_rate=1)
    try:
        first, first_login = login_only(d, "u1")
        second, second_login = login_only(d, "u2")
        d.run_pass([(first, {"op": "PASSWORD", "ciphertext": seal_password(
                        first_login["server_key"], first_login["nonce"], PASSWORD)}),
                    (second, {"op": "PASSWORD", "ciphertext": seal_password(
                        second_login["server_key"], second_login["nonce"], PASSWORD)})])
        outcomes = sorted(replies(d.inbox[c])[-1].get("error", "ok") for c in (first, second))
        assert outcomes == ["ok", "rate_limited"]
    finally:
        d.close()


# --- several things in one loop pass ----------------------------------------------------------

def test_ch_right_after_send_sees_the_message(driver):
    ctx = drive_to(driver, State.AWAIT_BM_TEXT)
    frames = driver.send_many(ctx.cid, [{"op": "SEND", "text": "just now"}, {"op": "CH"}])
    got = replies(frames)
    assert [r["op"] for r in got] == ["SEND", "CH"]
    assert [e["text"] for e in got[1]["entries"]] == ["just now"]


def test_send_then_exit_in_one_pass(driver):
    ctx = drive_to(driver, State.AWAIT_BM_TEXT)
    seen = len(driver.inbox[ctx.bob])
    frames = driver.send_many(ctx.cid, [{"op": "SEND", "text": "bye all"}, {"op": "EX"}, {"op": "BM"}])
    assert [f.body for f in frames] == [bm_sent(driver, 1), {"op": "EX", "ok": True}]
    assert [(b["op"], b.get("text"), b.get("online")) for b in data_frames(driver, ctx.bob, since=seen)] == \
        [("BM", "bye all", None), ("PRESENCE", None, False)]
    assert driver.history("alice")[-1]["text"] == "bye all" == driver.history("bob")[-1]["text"]
    assert ctx.cid in driver.closed and ctx.cid not in driver.room.sessions
    assert driver.stray == [] and "alice" not in driver.online


@pytest.mark.parametrize("leaver_first", [False, True], ids=["send-first", "exit-first"])
def test_recipient_leaves_in_the_same_pass(driver, leaver_first):
    ctx = drive_to(driver, State.AWAIT_BM_TEXT)
    carol = online_user(driver, "carol", 2)
    seen = {cid: len(driver.inbox[cid]) for cid in (ctx.bob, carol)}
    arrivals = [(ctx.cid, {"op": "SEND", "text": "hello"}), (ctx.bob, {"op": "EX"})]
    driver.run_pass(arrivals[::-1] if leaver_first else arrivals)
    reply = replies(driver.inbox[ctx.cid])[-1]
    assert reply["op"] == "SEND" and reply["ok"] is True
    reached = [cid for cid in (ctx.bob, carol) if data_frames(driver, cid, "BM", seen[cid])]
    assert reply["recipients"] == len(reached)
    assert carol in reached
    assert driver.inbox[ctx.bob][-1].body == {"op": "EX", "ok": True}, "nothing after the EX reply"
    assert driver.history("carol")[-1]["text"] == "hello" == driver.history("alice")[-1]["text"]
    assert driver.stray == []


def test_takeover_while_a_send_is_pending(driver):
    ctx = drive_to(driver, State.AWAIT_BM_TEXT)
    new, login = login_only(driver, "alice")
    seen = len(driver.inbox[ctx.bob])
    driver.run_pass([(ctx.cid, {"op": "SEND", "text": "last words"}),
                     (new, {"op": "PASSWORD", "ciphertext": seal_password(login["server_key"], login["nonce"],
                                                                          PASSWORD)})])
    tail = [f.body for f in driver.inbox[ctx.cid][-2:]]
    assert tail == [bm_sent(driver, 1), {"op": "BYE", "reason": "replaced"}]
    assert ctx.cid in driver.closed and ctx.cid not in driver.room.sessions
    assert replies(driver.inbox[new])[-1]["ok"] is True
    one_reply(driver.send(new, {"op": "KEY", "public_key": client_keys(0).public.key_form}), "KEY")
    assert [(b["op"], b.get("online")) for b in data_frames(driver, ctx.bob, since=seen)] == \
        [("BM", None), ("PRESENCE", False), ("PRESENCE", True)]
    assert driver.online["alice"] == new and driver.stray == []


def test_peer_gone_with_a_send_pending(driver):
    ctx = drive_to(driver, State.AWAIT_BM_TEXT)
    seen = len(driver.inbox[ctx.bob])
    driver.run_pass([(ctx.cid, {"op": "SEND", "text": "and gone"}), (ctx.cid, None)])
    assert [(b["op"], b.get("online")) for b in data_frames(driver, ctx.bob, since=seen)] == \
        [("BM", None), ("PRESENCE", False)]
    assert driver.history("bob")[-1]["text"] == "and gone"
    assert ctx.cid not in driver.room.sessions and "alice" not in driver.room.online
    assert driver.online == {"bob": ctx.bob} and driver.stray == []


def test_bad_frame_after_pipelined_requests(driver):
    ctx = drive_to(driver, State.READY)
    seen = len(driver.inbox[ctx.bob])
    data = framing.command({"op": "BM"}) + framing.command({"op": "SEND", "text": "before"}) + b"X\0\0\0\2{}"
    driver.run_pass([(ctx.cid, data)])
    bodies = [f.body for f in driver.inbox[ctx.cid]][-3:]
    assert bodies[:2] == [{"op": "BM", "ok": True}, bm_sent(driver, 1)]
    assert bodies[2]["op"] == "ERROR" and bodies[2]["error"] == "bad_frame" and bodies[2]["ok"] is False
    assert ctx.cid in driver.closed and ctx.cid not in driver.room.sessions
    assert [(b["op"], b.get("online")) for b in data_frames(driver, ctx.bob, since=seen)] == \
        [("BM", None), ("PRESENCE", False)]


# --- random sessions --------------------------------------------------------------------------

USERS = ["alice", "bob", "carol", "dave"]
SPELLINGS = {u: [u, u.capitalize(), u.upper()] for u in USERS}
PASSWORDS = {u: f"{u} has a long password" for u in USERS}
LONG_TEXT = "y" * (protocol.MAX_TEXT_CHARS + 1)


class Conn:
    """The model of one open connection."""

    def __init__(self, cid: int, user: str, spelling: str, deadline: float) -> None:
        self.cid = cid
        self.user = user              # account key (lower case)
        self.spelling = spelling      # as typed at LOGIN
        self.deadline = deadline
        self.state = State.AWAIT_USERNAME
        self.login: dict = {}
        self.new_at_login = False
        self.attempts = 3
        self.held = ""                # the kind of PASSWORD being held by the failed-login delay
        self.target_cid = 0
        self.target_name = ""
        self.target_key = ""
        self.key_index = -1           # where in the inbox the KEY reply is
        self.key_online: list = []


class RoomMachine(RuleBasedStateMachine):
    """Several users' random requests through one Room; the invariants after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="test_state-machine-")
        self.d = RoomDriver(self.directory, server_keys())
        self.conns: dict[int, Conn] = {}
        self.registered: dict[str, str] = {}     # key -> registered spelling
        self.entries: dict[str, int] = {}        # registered spelling -> history entries
        self.room_bms: list[tuple[str, str]] = []  # (sender, text) of every BM stored, oldest first
        self.logged_in: dict[str, int] = {}      # key -> cid, after PASSWORD
        self.online: dict[str, int] = {}         # key -> cid, after KEY
        self.failed_at: dict[str, float] = {}    # key -> time of the last wrong password

    def teardown(self) -> None:
        self.d.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    # --- model helpers ---
    def _end(self, conn: Conn) -> None:
        """conn is closed now (by the room or the peer)."""
        assert conn.cid in self.d.closed
        del self.conns[conn.cid]
        if self.logged_in.get(conn.user) == conn.cid:
            del self.logged_in[conn.user]
        if self.online.get(conn.user) == conn.cid:
            del self.online[conn.user]

    def _snapshot(self) -> dict[int, int]:
        return {cid: len(self.d.inbox[cid]) for cid in self.d.inbox}

    def _nothing_else(self, seen: dict[int, int], *but: int) -> None:
        for cid, n in seen.items():
            if cid not in but:
                assert self.d.inbox[cid][n:] == [], f"connection {cid} got {self.d.inbox[cid][n:]}"

    def _request(self, conn: Conn, body: dict) -> tuple[dict, dict[int, int]]:
        """Send body from conn; its one reply, and where every inbox stood before."""
        seen = self._snapshot()
        frames = self.d.send(conn.cid, body)
        return one_reply(frames, body["op"]), seen

    # --- login steps, shared by the rules ---
    def _connect(self, user: str, spelling: str) -> Conn:
        cid = self.d.connect()
        conn = self.conns[cid] = Conn(cid, user, spelling, self.d.clock() + self.d.room.login_timeout)
        return conn

    def _login(self, conn: Conn) -> None:
        reply, seen = self._request(conn, {"op": "LOGIN", "username": conn.spelling})
        assert reply["ok"] is True and reply["new_user"] is (conn.user not in self.registered)
        assert reply["server_key"] == server_keys().public.key_form
        conn.login, conn.new_at_login, conn.state = reply, reply["new_user"], State.AWAIT_PASSWORD
        self._nothing_else(seen, conn.cid)

    def _password(self, conn: Conn, kind: str) -> None:
        """A PASSWORD of one kind: right, wrong (weak for an unregistered name), nonce, garbage."""
        key, nonce = conn.login["server_key"], conn.login["nonce"]
        if kind == "wrong" and conn.user not in self.registered:
            kind = "weak"
        ciphertext = {"right": lambda: seal_password(key, nonce, PASSWORDS[conn.user]),
                      "weak": lambda: seal_password(key, nonce, "short"),
                      "wrong": lambda: seal_password(key, nonce, "a wrong password"),
                      "nonce": lambda: seal_password(key, b"\0" * 16, PASSWORDS[conn.user]),
                      "garbage": lambda: "AAAA;AAAA"}[kind]()
        frames = self.d.send(conn.cid, {"op": "PASSWORD", "ciphertext": ciphertext})
        if self.d.room.busy(conn.cid):
            # Held by the failed-login delay: only an existing account with a recent wrong password.
            assert frames == [] and not conn.new_at_login
            assert self.d.clock() - self.failed_at[conn.user] < self.d.room.login_delay_cap
            conn.held = kind
            event("PASSWORD held by the failed-login delay")
            conn.deadline = self.d.room.sessions[conn.cid].deadline   # the login clock stops meanwhile
            return
        if not conn.new_at_login and self.d.clock() - self.failed_at.get(conn.user, -1e9) < 1.0:
            raise AssertionError("an attempt within a second of a wrong password is not held")
        if kind == "wrong" and conn.new_at_login:
            # Registered by another connection since LOGIN: checked against that account,
            # which this session now knows (its next attempts are an existing user's).
            conn.new_at_login = False
        self._password_answered(conn, kind)

    def _password_answered(self, conn: Conn, kind: str) -> None:
        reply = self.d.replies(conn.cid)[-1]
        assert reply["op"] == "PASSWORD", reply
        if kind != "right":
            error = {"weak": "weak_password", "wrong": "wrong_password"}.get(kind, "bad_request")
            assert reply["ok"] is False and reply["error"] == error, reply
            if kind == "weak":
                assert "attempts_left" not in reply
                return
            if kind == "wrong":
                self.failed_at[conn.user] = self.d.clock()
            conn.attempts -= 1
            assert reply["attempts_left"] == conn.attempts
            if conn.attempts == 0:
                assert self.d.inbox[conn.cid][-1].body == {"op": "BYE", "reason": "too_many_failures"}
                event("too_many_failures")
                self._end(conn)
            return
        assert reply["ok"] is True, reply
        new = conn.user not in self.registered
        if new:
            self.registered[conn.user] = conn.spelling
            self.entries[conn.spelling] = 0
        assert reply["new_user"] is new and reply["username"] == self.registered[conn.user]
        old = self.logged_in.get(conn.user)
        if old is not None:
            assert self.d.inbox[old][-1].body == {"op": "BYE", "reason": "replaced"}
            event("takeover")
            self._end(self.conns[old])
        self.logged_in[conn.user] = conn.cid
        self.failed_at.pop(conn.user, None)
        conn.state = State.AWAIT_KEY

    def _key(self, conn: Conn, bad: bool = False) -> None:
        if bad:
            reply, seen = self._request(conn, {"op": "KEY", "public_key": server_keys().public.key_form[:-8]})
            assert reply["ok"] is False and reply["error"] == "bad_request"
            self._nothing_else(seen, conn.cid)
            return
        keys = client_keys(USERS.index(conn.user))
        asks = conn.cid % 2 == 0   # section 11: only a client that asks gets the room's recent BMs
        reply, seen = self._request(conn, {"op": "KEY", "public_key": keys.public.key_form, "recent": asks})
        assert reply["ok"] is True and reply["fingerprint"] == keys.fingerprint
        assert sorted(reply["online"]) == sorted(self.registered[k] for k in self.online)
        assert conn.user not in self.online
        self.online[conn.user] = conn.cid
        conn.state = State.READY
        inbox = self.d.inbox[conn.cid]
        conn.key_index = max(i for i, f in enumerate(inbox) if f.kind == "C" and f.body["op"] == "KEY")
        # Section 11: the room's newest BMs (stored before it came online) follow the KEY reply.
        recent = [(f.body["from"], f.body["text"]) for f in inbox[conn.key_index + 1:]]
        assert recent == (self.room_bms[-state.RECENT:] if asks else [])
        assert all(f.kind == "D" and f.body["op"] == "BM" and f.body["recent"] is True
                   for f in inbox[conn.key_index + 1:])
        conn.key_online = reply["online"]
        for cid in self.online.values():
            if cid != conn.cid:
                new = self.d.inbox[cid][seen[cid]:]
                assert [(f.kind, f.body["op"], f.body["username"], f.body["online"]) for f in new] == \
                    [("D", "PRESENCE", self.registered[conn.user], True)]
        self._nothing_else(seen, *self.online.values())

    def _arrive(self, user: str, spelling: str) -> None:
        conn = self._connect(user, spelling)
        self._login(conn)
        self._password(conn, "right")
        if conn.state is State.AWAIT_KEY:
            self._key(conn)

    # --- actions of one connection ---
    def _start_bm(self, conn: Conn, data) -> None:
        reply, seen = self._request(conn, {"op": "BM"})
        assert reply == {"op": "BM", "ok": True}
        conn.state = State.AWAIT_BM_TEXT
        self._nothing_else(seen, conn.cid)

    def _send_bm(self, conn: Conn, data) -> None:
        text = data.draw(st.one_of(st.text(max_size=20), st.sampled_from(["", " \n", "LONG"])), label="text")
        text = LONG_TEXT if text == "LONG" else text
        reply, seen = self._request(conn, {"op": "SEND", "text": text})
        if not text.strip() or len(text) > protocol.MAX_TEXT_CHARS:
            assert reply["ok"] is False and reply["error"] == "bad_request"
            self._nothing_else(seen, conn.cid)
            return
        sender = self.registered[conn.user]
        others = [k for k in self.online if k != conn.user]
        assert reply == bm_sent(self.d, len(others))
        event(f"BM to {len(others)}")
        conn.state = State.READY
        entry = self.d.history(sender)[-1]
        assert entry == {"ts": entry["ts"], "type": "BM", "from": sender, "to": "*", "text": text}
        self.entries[sender] += 1
        self.room_bms.append((sender, text))
        for k in others:
            cid = self.online[k]
            new = self.d.inbox[cid][seen[cid]:]
            assert [(f.kind, f.body) for f in new] == \
                [("D", {"op": "BM", "from": sender, "text": text, "ts": entry["ts"]})]
            assert self.d.history(self.registered[k])[-1] == entry
            self.entries[self.registered[k]] += 1
        self._nothing_else(seen, conn.cid, *(self.online[k] for k in others))

    def _start_pm(self, conn: Conn, data) -> None:
        reply, seen = self._request(conn, {"op": "PM"})
        assert reply["ok"] is True
        assert sorted(reply["online"]) == sorted(self.registered[k] for k in self.online if k != conn.user)
        conn.state = State.AWAIT_PM_TARGET
        self._nothing_else(seen, conn.cid)

    def _target(self, conn: Conn, data) -> None:
        online_names = [self.registered[k] for k in self.online if k != conn.user]
        names = st.sampled_from([s for u in USERS for s in SPELLINGS[u]] + ["nobody"])
        if online_names:   # mostly someone who is there
            names = st.one_of(st.sampled_from(online_names).map(str.upper), names)
        name = data.draw(names, label="name")
        reply, seen = self._request(conn, {"op": "TARGET", "username": name})
        self._nothing_else(seen, conn.cid)
        key = name.lower()
        if key == conn.user:
            assert reply["ok"] is False and reply["error"] == "bad_request"
            conn.state = State.READY
        elif key not in self.online:   # section 4.5: an account that is offline, or none at all
            assert reply["ok"] is False
            assert reply["error"] == ("not_online" if key in self.registered else "no_such_user"), reply
            conn.state = State.READY
        else:
            keys = client_keys(USERS.index(key))
            assert reply == {"op": "TARGET", "ok": True, "username": self.registered[key], "online": True,
                             "public_key": keys.public.key_form, "fingerprint": keys.fingerprint}
            conn.state = State.AWAIT_PM_TEXT
            conn.target_cid, conn.target_name = self.online[key], reply["username"]
            conn.target_key = reply["public_key"]

    def _send_pm(self, conn: Conn, data) -> None:
        text = data.draw(st.text(min_size=1, max_size=20), label="text")
        good_signature = data.draw(st.sampled_from([True, True, False]), label="good_signature")
        sender = self.registered[conn.user]
        keys = client_keys(USERS.index(conn.user))
        body = pm_body(keys, sender, conn.target_name, conn.target_key, text, now=self.d.clock())
        target_here = self.online.get(conn.target_name.lower()) == conn.target_cid
        if not good_signature and target_here:
            body["signature"] = sign_pm2(keys, body["id"], body["sent"], sender, conn.target_name + "x",
                                         body["ciphertext"], body["self_copy"])
        reply, seen = self._request(conn, body)
        if not target_here:
            assert reply["ok"] is False and reply["error"] == "not_online", reply
            event("PM to a target gone")
            conn.state = State.READY
            self._nothing_else(seen, conn.cid)
            return
        if not good_signature:
            assert reply["ok"] is False and reply["error"] == "bad_request", reply
            self._nothing_else(seen, conn.cid)
            return
        assert reply == {"op": "SEND", "ok": True, "recipients": 1}
        event("PM delivered")
        conn.state = State.READY
        new = self.d.inbox[conn.target_cid][seen[conn.target_cid]:]
        assert len(new) == 1 and new[0].kind == "D" and new[0].body["op"] == "PM"
        got = new[0].body
        assert (got["from"], got["to"], got["ciphertext"], got["sender_key"]) == \
            (sender, conn.target_name, body["ciphertext"], keys.public.key_form)
        target_keys = client_keys(USERS.index(conn.target_name.lower()))
        assert target_keys.open(got["ciphertext"]).decode("utf-8") == text
        assert keys.open(self.d.history(sender)[-1]["ciphertext"]).decode("utf-8") == text
        assert self.d.history(conn.target_name)[-1]["ciphertext"] == body["ciphertext"]
        self.entries[sender] += 1
        self.entries[conn.target_name] += 1
        self._nothing_else(seen, conn.cid, conn.target_cid)

    def _cancel(self, conn: Conn, data) -> None:
        reply, seen = self._request(conn, {"op": "CANCEL"})
        assert reply == {"op": "CANCEL", "ok": True}
        conn.state = State.READY
        self._nothing_else(seen, conn.cid)

    def _history(self, conn: Conn, data) -> None:
        limit = data.draw(st.one_of(st.none(), st.integers(1, 4)), label="limit")
        seen = self._snapshot()
        frames = self.d.send(conn.cid, {"op": "CH"} if limit is None else {"op": "CH", "limit": limit})
        assert frames and all(f.kind == "C" and f.body["op"] == "CH" and f.body["ok"] for f in frames)
        assert [f.body["more"] for f in frames] == [True] * (len(frames) - 1) + [False]
        entries = [e for f in frames for e in f.body["entries"]]
        stored = self.d.history(self.registered[conn.user])
        assert entries == (stored if limit is None else stored[-limit:])
        self._nothing_else(seen, conn.cid)

    def _leave(self, conn: Conn, data) -> None:
        reply, seen = self._request(conn, {"op": "EX"})
        assert reply == {"op": "EX", "ok": True}
        self._end(conn)

    def _disconnect(self, conn: Conn, data) -> None:
        self.d.disconnect(conn.cid)
        self._end(conn)

    def _out_of_place(self, conn: Conn, data) -> None:
        op = data.draw(st.sampled_from([op for op in ALL_OPS if op not in PROTOCOL_NEXT[conn.state]]), label="op")
        body = {"op": op, "username": conn.spelling, "text": "hi", "limit": 2}
        reply, seen = self._request(conn, body)
        assert reply["ok"] is False and reply["error"] == "unexpected", reply
        self._nothing_else(seen, conn.cid)

    # What a connection may do next in each state, the natural steps weighted up.
    ACTIONS = {
        State.AWAIT_USERNAME: ["login"] * 3,
        State.AWAIT_PASSWORD: ["right"] * 4 + ["wrong", "wrong", "nonce", "garbage"],
        State.AWAIT_KEY: ["key"] * 4 + ["bad_key"],
        State.READY: ["start_bm"] * 3 + ["start_pm"] * 3 + ["history", "leave"],
        State.AWAIT_BM_TEXT: ["send_bm"] * 3 + ["cancel"],
        State.AWAIT_PM_TARGET: ["target"] * 3 + ["cancel"],
        State.AWAIT_PM_TEXT: ["send_pm"] * 3 + ["cancel"],
    }

    # --- the one rule: a step of the room ---
    @initialize(first=st.sampled_from(SPELLINGS["alice"]), second=st.sampled_from(SPELLINGS["bob"]))
    def two_online(self, first, second) -> None:
        self._arrive("alice", first)
        self._arrive("bob", second)

    @rule(data=st.data())
    def step(self, data) -> None:
        ready = sorted(cid for cid, c in self.conns.items() if not c.held)
        kinds = ["wait", "out_of_place", "disconnect"] + ["act"] * 8
        if len(self.conns) < 6:
            kinds += ["connect", "arrive", "arrive"]
        kind = data.draw(st.sampled_from(kinds if ready else ["wait", "connect", "arrive"]), label="kind")
        if kind == "wait":
            self._wait(data.draw(st.sampled_from([0.5, 1.5, 4.0, 12.0, 31.0]), label="seconds"))
            return
        if kind in ("connect", "arrive"):
            user = data.draw(st.sampled_from(USERS), label="user")
            spelling = data.draw(st.sampled_from(SPELLINGS[user]), label="spelling")
            if kind == "connect":
                self._connect(user, spelling)
            else:
                self._arrive(user, spelling)
            return
        # A connection whose PASSWORD is held is left alone here, disconnect included:
        # see test_disconnect_while_held_forgets_the_session.
        conn = self.conns[data.draw(st.sampled_from(ready), label="cid")]
        if kind != "act":
            getattr(self, "_" + kind)(conn, data)
            return
        action = data.draw(st.sampled_from(self.ACTIONS[conn.state]), label="action")
        if action in ("right", "wrong", "nonce", "garbage"):
            self._password(conn, action)
        elif action in ("key", "bad_key"):
            self._key(conn, bad=action == "bad_key")
        elif action == "login":
            self._login(conn)
        else:
            getattr(self, "_" + action)(conn, data)

    def _wait(self, seconds: float) -> None:
        now = self.d.clock() + seconds
        if any(abs(c.deadline - now) < 0.01 for c in self.conns.values()):
            seconds += 0.1   # keep clear of the exact deadline
            now += 0.1
        self.d.tick(seconds)
        # Deadlines first: the room ends those connections in the tick, before the checks it
        # releases there are answered (a takeover by one of those finds the old session gone).
        self._idle_ended(now, held=False)
        answered = []
        for conn in sorted(self.conns.values(), key=lambda c: c.cid):   # held attempts go in order
            if conn.held and conn.cid in self.conns and not self.d.room.busy(conn.cid):
                kind, conn.held = conn.held, ""
                self._password_answered(conn, kind)
                answered.append(conn)
        for conn in answered:
            if conn.cid in self.conns:
                # Answered in this very tick: the room gives it a moment more if its
                # (extended) deadline passed while the check ran.
                conn.deadline = self.d.room.sessions[conn.cid].deadline
        self._idle_ended(now)

    def _idle_ended(self, now: float, held: bool = True) -> None:
        """Connections still logging in past their deadline got BYE idle (``held``: those whose
        attempt was held too, else only the others)."""
        for conn in list(self.conns.values()):
            if conn.state in LOGIN_STATES and conn.deadline <= now and (held or not conn.held):
                assert not conn.held
                assert self.d.inbox[conn.cid][-1].body == {"op": "BYE", "reason": "idle"}
                event("idle")
                self._end(conn)

    # --- invariants ---
    @invariant()
    def states_match(self) -> None:
        for cid, conn in self.conns.items():
            assert cid not in self.d.closed
            assert self.d.state_of(cid) is conn.state, cid
        for cid in self.d.closed:
            assert cid not in self.conns and cid not in self.d.room.sessions
        assert set(self.d.room.sessions) == set(self.conns)
        assert {cid for cid in self.d.room.sessions if self.d.room.busy(cid)} == \
            {cid for cid, c in self.conns.items() if c.held}

    @invariant()
    def every_request_has_one_reply(self) -> None:
        for cid, ops in self.d.requests.items():
            final = [r["op"] for r in self.d.replies(cid) if not (r["op"] == "CH" and r.get("more"))]
            conn = self.conns.get(cid)
            assert final == (ops[:-1] if conn is not None and conn.held else ops), cid

    @invariant()
    def online_exactly_between_key_and_the_end(self) -> None:
        assert {k: s.cid for k, s in self.d.room.online.items()} == self.online
        assert self.d.online == self.online
        assert {k: s.cid for k, s in self.d.room.logged_in.items()} == self.logged_in
        assert self.d.stray == []

    @invariant()
    def history_files_hold_what_was_sent(self) -> None:
        for spelling, count in self.entries.items():
            assert len(self.d.history(spelling)) == count, spelling

    @invariant()
    def presence_adds_up(self) -> None:
        for cid, conn in self.conns.items():
            inbox = self.d.inbox[cid]
            before_key = inbox if conn.key_index < 0 else inbox[:conn.key_index]
            assert [f for f in before_key if f.kind == "D"] == [], "no D frame before KEY"
            if conn.key_index < 0:
                continue
            view = set(conn.key_online)
            for f in inbox[conn.key_index:]:
                if f.kind == "D" and f.body["op"] == "PRESENCE":
                    name = f.body["username"]
                    assert name != self.registered[conn.user]
                    if f.body["online"]:
                        assert name not in view, (cid, name)
                        view.add(name)
                    else:
                        assert name in view, (cid, name)
                        view.discard(name)
            assert view == {self.registered[k] for k in self.online if k != conn.user}, cid


RoomMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=50, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow], database=None)
TestRoomMachine = RoomMachine.TestCase


# --- shared mode (a node of several): the session logic without a store ------------

def _shared_login(room: state.Room, cid: int, name: str) -> list:
    """LOGIN and PASSWORD on a shared-mode room, answering the store by hand; returns the
    effects that came with the claim request (the ClaimSession is the last)."""
    room.connect(cid)
    room.receive(cid, framing.Frame("C", {"op": "LOGIN", "username": name}))
    account = Account(name, 16, 8, 1, b"salt", b"hash")
    room.completed(cid, store.AccountLoaded(account))
    out = room.receive(cid, framing.Frame("C", {"op": "PASSWORD", "ciphertext": "x;y"}))
    assert isinstance(out[-1], state.CheckPassword)
    out = room.completed(cid, LoginResult("ok", account=account))
    assert isinstance(out[-1], store.LoadSanctions)   # a banned account goes no further (section 10)
    out = room.completed(cid, store.SanctionsLoaded(None, None))
    assert isinstance(out[-1], store.ClaimSession) and out[-1].token == f"node1/{cid}"
    return out


def test_shared_kick_that_overtakes_the_claim_answer_still_replaces():
    """The kick (reader link) can arrive before this session's own claim answer (command link)."""
    room = state.SharedRoom(server_keys(), node="node1")
    _shared_login(room, 7, "alice")
    assert room.cluster_event(store.Kick("alice", "node1/7")) == []
    out = room.completed(7, store.CLAIMED)
    sent = [framing.FrameDecoder(0).feed(e.data)[0].body for e in out if isinstance(e, state.Send)]
    assert sent == [{"op": "BYE", "reason": "replaced"}]
    assert any(isinstance(e, state.Close) for e in out)
    assert not any(isinstance(e, store.Logout) for e in out)   # the token is someone else's: no logout
    assert "alice" not in room.logged_in


def test_shared_claim_without_a_kick_logs_in():
    room = state.SharedRoom(server_keys(), node="node1")
    _shared_login(room, 8, "bob")
    room.cluster_event(store.Kick("bob", "node1/99"))   # someone else's session
    out = room.completed(8, store.CLAIMED)
    sent = [framing.FrameDecoder(0).feed(e.data)[0].body for e in out if isinstance(e, state.Send)]
    assert sent == [{"op": "PASSWORD", "ok": True, "new_user": False, "username": "bob"}]
    assert room.logged_in["bob"].cid == 8


# --- moderation (docs/PROTOCOL.md section 10) ----------------------------------------------

def mod_driver(tmp_path, clock=None) -> RoomDriver:
    return RoomDriver(str(tmp_path), server_keys(), admins=("alice", "Zed"), clock=clock)


def mod(d: RoomDriver, cid: int, action: str, username: str = "", **fields) -> dict:
    body = {"op": "MOD", "action": action, **({"username": username} if username else {}), **fields}
    return one_reply(d.send(cid, body), "MOD")


def byes(d: RoomDriver, cid: int) -> list[dict]:
    return [f.body for f in d.inbox[cid] if f.kind == "C" and f.body["op"] == "BYE"]


def try_login(d: RoomDriver, name: str, i: int) -> tuple[int, dict]:
    """LOGIN and PASSWORD of an existing account; the PASSWORD reply."""
    cid = d.connect()
    login = one_reply(d.send(cid, {"op": "LOGIN", "username": name}), "LOGIN")
    frames = d.send(cid, {"op": "PASSWORD", "ciphertext": seal_password(login["server_key"], login["nonce"],
                                                                          PASSWORD)})
    return cid, one_reply(frames, "PASSWORD")


def test_mod_from_a_non_admin_is_forbidden_and_logged(tmp_path):
    d = mod_driver(tmp_path)
    alice, bob = online_user(d, "alice", 0), online_user(d, "bob", 1)
    for action, name in (("kick", "alice"), ("ban", "alice"), ("unban", "alice"), ("mute", "alice"),
                         ("unmute", "alice"), ("bans", "")):
        reply = mod(d, bob, action, name)
        assert reply["ok"] is False and reply["error"] == "forbidden", reply
    assert d.state_of(bob) is State.READY and alice not in d.closed
    assert all(a.refused and "'bob'" in a.text for a in d.audits) and len(d.audits) == 6
    d.close()


@pytest.mark.parametrize("body", [{"action": "nuke", "username": "bob"}, {"action": "ban"},
                                  {"action": "ban", "username": "bob", "seconds": 0},
                                  {"action": "ban", "username": "bob", "seconds": "60"},
                                  {"action": "kick", "username": "bob", "seconds": 60},
                                  {"action": "ban", "username": "bob", "reason": "x" * 201},
                                  {"action": "ban", "username": "bob", "confirm": "yes"}])
def test_malformed_mod_is_bad_request(tmp_path, body):
    d = mod_driver(tmp_path)
    alice = online_user(d, "alice", 0)
    assert_error(d.send(alice, {"op": "MOD", **body}), "MOD", "bad_request")
    assert d.state_of(alice) is State.READY
    d.close()


def test_kick_says_bye_kicked_and_tells_the_room(tmp_path):
    d = mod_driver(tmp_path)
    alice, bob, carol = online_user(d, "alice", 0), online_user(d, "bob", 1), online_user(d, "carol", 2)
    seen = len(d.inbox[carol])
    reply = mod(d, alice, "kick", "BOB", reason="calm down")
    assert reply == {"op": "MOD", "ok": True, "action": "kick", "username": "bob", "until": None,
                     "reason": "calm down"}
    assert byes(d, bob) == [{"op": "BYE", "reason": "kicked", "message": "alice kicked bob: calm down",
                             "until": None}]
    assert bob in d.closed and "bob" not in d.room.online
    notices = data_frames(d, carol, "NOTICE", seen)
    assert [n["text"] for n in notices] == ["alice kicked bob: calm down"]
    assert notices[0]["by"] == "alice" and notices[0]["action"] == "kick"
    assert [p["username"] for p in data_frames(d, carol, "PRESENCE", seen)] == ["bob"]
    assert data_frames(d, alice, "NOTICE")[-1]["text"] == "alice kicked bob: calm down"
    assert "'alice' kicked 'bob'" in d.audits[-1].text and not d.audits[-1].refused
    online_user(d, "bob", 1)   # a kick is not a ban
    d.close()


def test_kick_refusals(tmp_path):
    d = mod_driver(tmp_path)
    alice = online_user(d, "alice", 0)
    online_user(d, "bob", 1)
    d.send(online_user(d, "carol", 2), {"op": "EX"})
    assert_error(d.send(alice, {"op": "MOD", "action": "kick", "username": "carol"}), "MOD", "not_online")
    assert_error(d.send(alice, {"op": "MOD", "action": "kick", "username": "Alice"}), "MOD", "bad_request")
    assert_error(d.send(alice, {"op": "MOD", "action": "ban", "username": "nobody"}), "MOD", "no_such_user")
    assert_error(d.send(alice, {"op": "MOD", "action": "mute", "username": "nobody", "seconds": 5}), "MOD",
                 "no_such_user")
    d.close()


def test_timed_ban_kicks_refuses_the_login_with_the_reason_and_expires(tmp_path):
    d = mod_driver(tmp_path)
    alice, bob = online_user(d, "alice", 0), online_user(d, "bob", 1)
    reply = mod(d, alice, "ban", "bob", seconds=3600, reason="spam")
    assert reply["ok"] and reply["until"] == protocol.timestamp(d.clock() + 3600)
    assert byes(d, bob)[0]["reason"] == "banned"
    assert byes(d, bob)[0]["message"] == "alice banned bob for 1 h: spam"
    assert data_frames(d, alice, "NOTICE")[-1]["text"] == "alice banned bob for 1 h: spam"

    cid, refused = try_login(d, "bob", 1)
    assert refused["ok"] is False and refused["error"] == "banned", refused
    assert refused["until"] == reply["until"] and refused["reason"] == "spam"
    assert "banned until" in refused["message"] and "by alice" in refused["message"] and "spam" in refused["message"]
    assert byes(d, cid) == [{"op": "BYE", "reason": "banned"}] and cid in d.closed
    assert "bob" not in d.room.logged_in

    d.clock.advance(3601)
    cid, accepted = try_login(d, "bob", 1)
    assert accepted["ok"] is True
    d.close()


def test_ban_for_good_is_kept_across_a_restart_and_unban_lifts_it(tmp_path):
    d = mod_driver(tmp_path)
    alice = online_user(d, "alice", 0)
    online_user(d, "bob", 1)
    assert mod(d, alice, "ban", "bob")["until"] is None
    assert data_frames(d, alice, "NOTICE")[-1]["text"] == "alice banned bob for good"
    d.close()

    d = mod_driver(tmp_path, clock=d.clock)   # the server again, on the same data directory
    d.clock.advance(10 * 366 * 86400)
    _, refused = try_login(d, "bob", 1)
    assert refused["error"] == "banned" and refused["until"] is None and "for good" in refused["message"]
    alice = online_user(d, "alice", 0)
    assert mod(d, alice, "unban", "Bob")["ok"] is True
    assert data_frames(d, alice, "NOTICE")[-1]["text"] == "alice unbanned bob"
    assert_error(d.send(alice, {"op": "MOD", "action": "unban", "username": "bob"}), "MOD", "bad_request")
    assert try_login(d, "bob", 1)[1]["ok"] is True
    d.close()
    d = mod_driver(tmp_path)
    assert try_login(d, "bob", 1)[1]["ok"] is True   # the unban is kept too
    d.close()


def test_mute_refuses_bms_until_it_expires_or_is_lifted(tmp_path):
    d = mod_driver(tmp_path)
    alice, bob = online_user(d, "alice", 0), online_user(d, "bob", 1)
    assert mod(d, alice, "mute", "bob", seconds=600, reason="shouting")["ok"]
    assert data_frames(d, bob, "NOTICE")[-1]["text"] == "alice muted bob for 10 min: shouting"
    assert one_reply(d.send(bob, {"op": "BM"}), "BM")["ok"]
    refused = assert_error(d.send(bob, {"op": "SEND", "text": "LOUD"}), "SEND", "muted")
    assert refused["until"] == protocol.timestamp(d.clock() + 600) and refused["reason"] == "shouting"
    assert "muted until" in refused["message"]
    assert d.state_of(bob) is State.READY and d.history("bob") == []
    # a mute is the account's: a new login is muted too
    bob = online_user(d, "bob", 1)
    d.send(bob, {"op": "BM"})
    assert_error(d.send(bob, {"op": "SEND", "text": "again"}), "SEND", "muted")
    assert pm_allowed(d, bob)
    d.clock.advance(601)
    d.send(bob, {"op": "BM"})
    assert one_reply(d.send(bob, {"op": "SEND", "text": "quietly"}), "SEND")["ok"]

    assert mod(d, alice, "mute", "bob", seconds=60)["ok"]
    d.send(bob, {"op": "BM"})
    assert_error(d.send(bob, {"op": "SEND", "text": "x"}), "SEND", "muted")
    assert mod(d, alice, "unmute", "bob")["ok"]
    d.send(bob, {"op": "BM"})
    assert one_reply(d.send(bob, {"op": "SEND", "text": "thanks"}), "SEND")["ok"]
    assert_error(d.send(alice, {"op": "MOD", "action": "unmute", "username": "bob"}), "MOD", "bad_request")
    d.close()


def pm_allowed(d: RoomDriver, cid: int) -> bool:
    """A muted user may still send PMs (a mute is about the room)."""
    d.send(cid, {"op": "PM"})
    return one_reply(d.send(cid, {"op": "CANCEL"}), "CANCEL")["ok"]


def test_bans_lists_bans_and_mutes_in_force(tmp_path):
    d = mod_driver(tmp_path)
    alice = online_user(d, "alice", 0)
    for i, name in enumerate(("bob", "carol", "dave")):
        online_user(d, name, 1 + i)
    assert mod(d, alice, "bans") == {"op": "MOD", "ok": True, "action": "bans", "bans": [], "mutes": []}
    mod(d, alice, "ban", "carol", seconds=60, reason="spam")
    mod(d, alice, "ban", "dave")
    mod(d, alice, "mute", "bob", seconds=120)
    listing = mod(d, alice, "bans")
    assert [(b["username"], b["by"], b["reason"]) for b in listing["bans"]] == [("carol", "alice", "spam"),
                                                                              ("dave", "alice", "")]
    assert listing["bans"][0]["until"] == protocol.timestamp(d.clock() + 60) and listing["bans"][1]["until"] is None
    assert [m["username"] for m in listing["mutes"]] == ["bob"]
    d.clock.advance(90)
    listing = mod(d, alice, "bans")
    assert [b["username"] for b in listing["bans"]] == ["dave"] and [m["username"] for m in listing["mutes"]] == ["bob"]
    d.close()


def test_acting_on_another_admin_needs_confirm(tmp_path):
    d = mod_driver(tmp_path)
    alice, zed = online_user(d, "alice", 0), online_user(d, "zed", 1)
    for action, extra in (("kick", {}), ("ban", {"seconds": 60}), ("mute", {"seconds": 60})):
        refused = assert_error(d.send(alice, {"op": "MOD", "action": action, "username": "ZED", **extra}), "MOD",
                               "confirm_needed")
        assert refused["username"] == "zed" and "admin" in refused["message"]
    assert zed not in d.closed and data_frames(d, zed, "NOTICE") == []
    assert mod(d, alice, "ban", "zed", seconds=60, confirm=True)["ok"]
    assert byes(d, zed)[0]["reason"] == "banned"
    assert try_login(d, "zed", 1)[1]["error"] == "banned"   # an admin banned cannot log in either
    assert mod(d, alice, "unban", "zed")["ok"]              # undoing needs no confirmation
    d.close()


def test_shared_room_enforces_a_moderation_event_on_its_own_session():
    room = state.SharedRoom(server_keys(), node="node1")
    _shared_login(room, 9, "bob")
    room.completed(9, store.CLAIMED)
    record = store.ModRecord("ban", "bob", "alice", None, "spam", 1.0)
    out = room.cluster_event(store.ModerationEvent(record))
    sent = [framing.FrameDecoder(0).feed(e.data)[0].body for e in out if isinstance(e, state.Send)]
    assert sent == [{"op": "BYE", "reason": "banned", "message": "alice banned bob for good: spam", "until": None}]
    assert any(isinstance(e, store.Logout) for e in out)   # its session ends on every node
    assert any(isinstance(e, state.DeliverAll) for e in out)
    assert "bob" not in room.logged_in


def test_rate_limit_buckets_stay_bounded_and_each_key_keeps_its_own():
    """RateLimit (per account for BMs, per address for new connections): a key past its burst is
    refused until its rate refills it; buckets that filled up again are forgotten once there are
    many, but not on every take (a prune then waits until as many again are new)."""
    now = [1000.0]
    limit = state.RateLimit(1.0, 2, lambda: now[0])
    assert [limit.take("a") for _ in range(3)] == [True, True, False]
    assert limit.take("b")                      # another key has its own bucket
    now[0] += 1.0
    assert limit.take("a") and not limit.take("a")
    for n in range(state.PRUNE_BUCKETS_AT):     # many keys, each spends one token
        limit.take(f"k{n}")
    # A prune found none full: the next waits until as many again are new.
    assert len(limit._buckets) > state.PRUNE_BUCKETS_AT and limit._prune_at >= 2 * state.PRUNE_BUCKETS_AT
    now[0] += 10.0                              # all full again
    n = 0
    while "k0" in limit._buckets:
        assert n <= 2 * state.PRUNE_BUCKETS_AT, len(limit._buckets)   # it comes within that many more
        limit.take(f"new{n}")
        n += 1
    assert n > 1 and all(key.startswith("new") for key in limit._buckets)   # the full ones were forgotten
