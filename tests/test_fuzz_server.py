"""Issue 6, bad input live: hypothesis against a running server.

One server for the module. After every example the server process is still
running and a separate, well-behaved pair of clients completes a BM round trip
(SEND ok, and the other one receives the D BM).
"""

from __future__ import annotations

import itertools
import socket
import time

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import framing
import protocol
from conftest import key_pair
from serverproc import ServerProcess
from wire import WireClient

PASSWORD = "correct horse"
# No shrinking: every example costs server round trips, and the examples are small enough
# to read as they are; the failing one is printed.
FUZZ_SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                         database=None, phases=[Phase.explicit, Phase.generate], report_multiple_bugs=False)

_names = itertools.count()


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """(server, sender, receiver): one server for every example; two clients that check it."""
    data = tmp_path_factory.mktemp("fuzz") / "data"
    data.mkdir()
    server = ServerProcess(str(data), "--flood-rate", "0", "--bm-rate", "0", "--max-per-ip", "0", "--connect-rate", "0",
                           "--register-rate", "0", "--login-delay-cap", "0").start()
    sender = WireClient(server.port)
    sender.login("Check.Sender", PASSWORD, key_pair(0))
    receiver = WireClient(server.port)
    receiver.login("Check.Receiver", PASSWORD, key_pair(1))
    yield server, sender, receiver
    sender.close()
    receiver.close()
    server.kill()


def round_trip(live) -> None:
    server, sender, receiver = live
    assert server.proc.poll() is None, f"the server died:\n{server.log()[-3000:]}"
    text = f"check {next(_names)}"
    reply = sender.bm(text)
    assert reply["ok"], reply
    assert receiver.wait_data("BM", timeout=5, text=text)["from"] == "Check.Sender"
    sender.data.clear()
    receiver.data.clear()


def drain(c: WireClient, timeout: float) -> list[framing.Frame]:
    """Frames until the server closes or nothing arrives for a while."""
    frames = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            frames.append(c.recv(timeout=min(0.2, max(0.01, deadline - time.monotonic()))))
        except (TimeoutError, EOFError, OSError):
            break
    return frames


# --- arbitrary bytes -------------------------------------------------------------------------------

def _headed(kind: bytes, body: bytes) -> bytes:
    return kind + len(body).to_bytes(4, "big") + body


raw_bytes = st.one_of(
    st.binary(max_size=300),
    st.builds(_headed, st.sampled_from([b"C", b"D", b"X", b"\x00"]), st.binary(max_size=300)),
    st.builds(lambda kind, length, rest: kind + length.to_bytes(4, "big") + rest,
              st.sampled_from([b"C", b"D"]), st.integers(0, 2 ** 32 - 1), st.binary(max_size=100)),
    st.builds(lambda text: _headed(b"C", text.encode("utf-8", "surrogatepass")), st.text(max_size=200)),
    st.builds(lambda rest: b"\x16" + rest, st.binary(max_size=300)),   # the start of TLS, and junk (section 0)
)


@FUZZ_SETTINGS
@given(prefix_logged_in=st.booleans(), chunks=st.lists(raw_bytes, min_size=1, max_size=4))
def test_arbitrary_bytes(live, prefix_logged_in, chunks):
    server = live[0]
    c = WireClient(server.port, timeout=5)
    try:
        if prefix_logged_in:
            c.login(f"fuzzb{next(_names)}", PASSWORD, key_pair(2))
        for chunk in chunks:
            try:
                c.send_raw(chunk)
            except OSError:
                break
        drain(c, 0.5)
    finally:
        c.close()
    round_trip(live)


# --- arbitrary well-framed requests ---------------------------------------------------------------

OPS = ["LOGIN", "PASSWORD", "KEY", "BM", "PM", "TARGET", "SEND", "CH", "EX", "CANCEL", "ERROR", "BYE"]
MEMBERS = ["username", "ciphertext", "public_key", "text", "limit", "self_copy", "signature", "id", "sent", "ok",
           "op"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)

member_values = st.one_of(
    json_values,
    st.sampled_from(["Check.Sender", "check.receiver", "fuzz", "", " ", "x" * 4097, "a;b", "Zm9v",
                     "AAAAAAAAAAAAAAAAAAAAAA==", protocol.timestamp(time.time()), "2026-02-30T00:00:00.000Z"]),
    st.integers(-3, 3),
)

requests = st.builds(
    lambda op, members: {**members, "op": op},
    st.one_of(st.sampled_from(OPS), st.text(max_size=12)),
    st.dictionaries(st.one_of(st.sampled_from(MEMBERS[:-1]), st.text(max_size=8)), member_values, max_size=4),
)

STATES = ["AWAIT_USERNAME", "AWAIT_PASSWORD", "AWAIT_KEY", "READY", "AWAIT_BM_TEXT", "AWAIT_PM_TARGET",
          "AWAIT_PM_TEXT"]


def _reach(c: WireClient, state: str) -> None:
    if state == "AWAIT_USERNAME":
        return
    name = f"fuzz{next(_names)}"
    assert c.login_start(name)["ok"]
    if state == "AWAIT_PASSWORD":
        return
    assert c.password(PASSWORD)["ok"]
    c.username = name
    if state == "AWAIT_KEY":
        return
    assert c.key(key_pair(2))["ok"]
    if state == "AWAIT_BM_TEXT":
        assert c.request({"op": "BM"})["ok"]
    elif state in ("AWAIT_PM_TARGET", "AWAIT_PM_TEXT"):
        assert c.request({"op": "PM"})["ok"]
        if state == "AWAIT_PM_TEXT":
            assert c.request({"op": "TARGET", "username": "check.receiver"})["ok"]


@FUZZ_SETTINGS
@given(state=st.sampled_from(STATES), bodies=st.lists(requests, min_size=1, max_size=6),
       data_kind=st.lists(st.booleans(), min_size=6, max_size=6))
def test_arbitrary_well_framed_requests(live, state, bodies, data_kind):
    server = live[0]
    c = WireClient(server.port, timeout=5)
    try:
        _reach(c, state)
        frames = []
        for body, as_data in zip(bodies, data_kind):
            frames.append(framing.encode("D" if as_data else "C", body))
        try:
            c.send_raw(b"".join(frames))
        except OSError:
            pass
        replies = []
        closed = False
        deadline = time.monotonic() + 3
        while len(replies) < len(bodies) and time.monotonic() < deadline:
            try:
                frame = c.recv(timeout=max(0.01, deadline - time.monotonic()))
            except EOFError:
                closed = True
                break
            except TimeoutError:
                break
            if frame.kind == "D" or (frame.body["op"] == "BYE" and "ok" not in frame.body):
                continue   # unsolicited: data, or the server's BYE (a reply to a client's "BYE" has "ok")
            if frame.body["op"] == "CH" and frame.body.get("more"):
                continue
            replies.append(frame.body)
        # Requests are answered in order, one reply each, with the same op, until the
        # connection ends (EX, BYE); a request is never silently skipped.
        assert [r["op"] for r in replies] == [b["op"] for b in bodies][:len(replies)], (bodies, replies)
        for r in replies:
            assert isinstance(r.get("ok"), bool), r
            if not r["ok"]:
                assert isinstance(r.get("error"), str) and isinstance(r.get("message"), str), r
        if not closed and len(replies) < len(bodies):
            last = replies[-1]["op"] if replies else None
            assert last == "EX" or c.closed, f"unanswered requests: {bodies[len(replies):]}, replies {replies}"
    except socket.timeout:
        pytest.fail("the server stopped answering")
    finally:
        c.close()
    round_trip(live)
