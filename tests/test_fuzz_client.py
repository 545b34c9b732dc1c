"""Issue 6, bad input live, client side: chatclient.py against a fake server that answers anything.

The fake server is a listening socket on loopback served by a thread of the
test. It plays a script drawn by hypothesis: for each request the client
sends, a list of things to send back. A thing is the sensible reply to that
request (a real server key, nonce, key of the contact, sealed history...)
with members changed to arbitrary JSON values or removed; an arbitrary body
(any op, any members, C or D); a real-looking D frame (a BM, a properly
sealed and signed PM from bob, a PRESENCE) with members changed; arbitrary
bytes; or the end of the connection. When the script runs out, or the client
sends nothing for ``IDLE`` seconds, the server closes the connection.

The real chatclient.py runs in a subprocess, mostly with piped standard
input, sometimes on a pseudo-terminal, each run with its own
``XDG_CONFIG_HOME`` (a pinned server key, the same or another, or none; a
saved key pair or none). Properties:

* it exits within ``EXIT_DEADLINE`` seconds (else it is killed: failure);
* nothing it prints contains a Python traceback or an "internal error";
* a non-zero status is 1 (or 3, a server key problem; Ctrl-C on the
  terminal never ends the client), and the last line on stderr is the
  one-line reason;
* on a terminal, the terminal attributes after the exit equal those before;
* no password leaves the client when the pinned server key differs;
* every frame the client sends is well formed, and its files
  (known_servers, known_contacts) stay one well-formed line per entry.

The regression tests at the end replay, with explicit scripts, each client bug
found while writing this file (by the fuzzing, or by reading the client with
its inputs in mind).

Longer hunts: ``FUZZ_CLIENT_PIPED=500 FUZZ_CLIENT_PTY=100`` set the numbers of
examples; ``FUZZ_CLIENT_STATS=FILE`` appends each run's exit status, the ops
the client sent and the end of its stderr to FILE, to see how deep the
examples get.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import select
import socket
import ssl
import struct
import subprocess
import tempfile
import termios
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, NamedTuple, Union

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import framing
import pg3lib
import tlslayer
import wire
import test_client_e2e as e2e
from clientstore import ClientStore
from conftest import key_pair

PASSWORD = e2e.PASSWORD
IDLE = 0.4  # the fake server hangs up when the client has sent nothing for this long
KEY_IDLE = 2.0  # ... or this long after a PASSWORD (the client may be making its key pair)
EXIT_DEADLINE = 8.0  # from the start of the client to its exit, whatever happens
USERNAME_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}\Z")
FUZZ = dict(deadline=None, suppress_health_check=list(HealthCheck), database=None,
            phases=[Phase.explicit, Phase.generate], report_multiple_bugs=False)


# --- the keys of the play: the server, alice (the client's user), bob (a contact) ---------------

def server_keys() -> pg3lib.KeyPair:
    return key_pair(2)


def alice_keys() -> pg3lib.KeyPair:
    return key_pair(0)


def bob_keys() -> pg3lib.KeyPair:
    return key_pair(1)


_cache: dict[str, Any] = {}


def _once(name: str, make) -> Any:
    if name not in _cache:
        _cache[name] = make()
    return _cache[name]


NONCE = base64.b64encode(b"0123456789abcdef").decode()
TS = "2026-11-24T15:04:05.123Z"


def sealed_for_alice() -> str:
    return _once("sealed", lambda: alice_keys().public.seal(b"psst").decode())


def bob_pm() -> dict:
    """A D PM (PM2: id, sent, section 5) from bob to alice that a correct client shows (once: its id
    seen again is a replay)."""
    def make() -> dict:
        ciphertext = alice_keys().public.seal("on my way \u202e".encode()).decode()
        self_copy = bob_keys().public.seal("on my way \u202e".encode()).decode()
        send = wire.pm2_send(bob_keys(), "bob", "alice", ciphertext, self_copy)
        return {"op": "PM", "from": "bob", "to": "alice", "id": send["id"], "sent": send["sent"],
                "ciphertext": ciphertext, "self_copy_sha256": pg3lib.sealed_digest(self_copy),
                "signature": send["signature"], "sender_key": bob_keys().public.key_form, "ts": TS}
    return dict(_once("bob_pm", make))


def tls_context() -> ssl.SSLContext:
    """The fake server's TLS: a self-signed certificate of server_keys() (made once, in a temporary directory)."""
    def make() -> ssl.SSLContext:
        return tlslayer.server_context(tempfile.mkdtemp(prefix="fuzz-cert-"), server_keys())
    return _once("tls", make)


def sensible_reply(op: Any, new_user: bool) -> dict:
    """What a correct server would answer to a request with this op."""
    server, bob = server_keys(), bob_keys()
    replies = {
        "LOGIN": {"ok": True, "new_user": new_user, "server_key": server.public.key_form,
                  "fingerprint": server.fingerprint, "nonce": NONCE},
        "PASSWORD": {"ok": True, "new_user": new_user, "username": "alice"},
        "KEY": {"ok": True, "fingerprint": alice_keys().fingerprint, "online": ["bob", "carol"]},
        "PM": {"ok": True, "online": ["bob", "carol"]},
        "TARGET": {"ok": True, "username": "bob", "public_key": bob.public.key_form,
                   "fingerprint": bob.fingerprint},
        "SEND": {"ok": True, "recipients": 1},
        "CH": {"ok": True, "more": False, "entries": [
            {"ts": TS, "type": "BM", "from": "bob", "to": "*", "text": "hi all"},
            {"ts": TS, "type": "PM", "from": "bob", "to": "alice", "ciphertext": sealed_for_alice()}]},
    }
    return {"op": op, **replies.get(op, {"ok": True})}


def sensible_data(op: str) -> dict:
    if op == "PM":
        return bob_pm()
    if op == "PRESENCE":
        return {"op": "PRESENCE", "username": "bob", "online": True, "ts": TS}
    return {"op": "BM", "from": "bob", "text": "hello", "ts": TS}


# --- what the fake server sends ------------------------------------------------------------------

class Answer(NamedTuple):
    """The sensible reply to the request just received, with members changed and removed."""

    kind: str
    changes: dict
    removed: tuple = ()


class Body(NamedTuple):
    """A frame with this body as it is."""

    kind: str
    body: dict


class Data(NamedTuple):
    """A real-looking D frame (BM, PM from bob, PRESENCE), with members changed."""

    op: str
    changes: dict


class Raw(NamedTuple):
    data: bytes


class Hangup(NamedTuple):
    pass


class Pause(NamedTuple):
    """Wait before what follows (explicit scripts only)."""

    seconds: float


Item = Union[Answer, Body, Data, Raw, Hangup, Pause]
GOOD = Answer("C", {})


def frame_bytes(kind: str, body: dict) -> bytes:
    """A frame; the JSON is ASCII with escapes, so lone surrogates and all reach the client."""
    raw = json.dumps(body, ensure_ascii=True, allow_nan=False).encode("ascii")
    return kind.encode("ascii") + len(raw).to_bytes(4, "big") + raw


def item_bytes(item: Item, request: dict | None, new_user: bool) -> bytes | None:
    """The bytes to send for item (None: hang up)."""
    if isinstance(item, Answer):
        op = request.get("op", "?") if request is not None else "LOGIN"
        body = sensible_reply(op, new_user)
        body.update(item.changes)
        for name in item.removed:
            body.pop(name, None)
        return frame_bytes(item.kind, body)
    if isinstance(item, Body):
        return frame_bytes(item.kind, item.body)
    if isinstance(item, Data):
        body = sensible_data(item.op)
        body.update(item.changes)
        return frame_bytes("D", body)
    if isinstance(item, Raw):
        return item.data
    return None


class Script(NamedTuple):
    greeting: list  # items sent as soon as the client connects
    steps: list  # steps[i]: the items sent after the client's i-th frame
    new_user: bool


class FakeServer:
    """One connection, played by a thread from a Script."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.received: list[dict] = []
        self.bad_frames: list[str] = []
        self.first_request = threading.Event()
        self._pending: deque[dict] = deque()
        self._decoder = framing.FrameDecoder()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(EXIT_DEADLINE)
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        finally:
            self.listener.close()
        try:
            conn.settimeout(EXIT_DEADLINE)
            conn = tls_context().wrap_socket(conn, server_side=True)  # the client always speaks TLS
        except (OSError, ssl.SSLError):
            conn.close()
            return
        with conn:
            try:
                if self._send(conn, self.script.greeting, None):
                    request = None
                    for step in self.script.steps:
                        slow = request is not None and request.get("op") == "PASSWORD"
                        request = self._next_request(conn, KEY_IDLE if slow else IDLE)
                        if request is None or not self._send(conn, step, request):
                            break
                self._hang_up(conn)
            except OSError:
                pass

    def _hang_up(self, conn: ssl.SSLSocket) -> None:
        """End TLS (close_notify) and the stream, reading what the client still sends (checked while it is
        inside TLS), so that it can read to the end."""
        while conn.pending() and self._next_request(conn, 0.01) is not None:
            pass
        conn.settimeout(1.0)
        try:
            raw = conn.unwrap()  # the client's own close_notify is not awaited for ever
        except (OSError, ssl.SSLError, ValueError):
            return
        raw.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and select.select([raw], [], [], 0.2)[0]:
            if not raw.recv(65536):
                return

    def _send(self, conn: socket.socket, items: list, request: dict | None) -> bool:
        for item in items:
            if isinstance(item, Pause):
                time.sleep(item.seconds)
                continue
            data = item_bytes(item, request, self.script.new_user)
            if data is None:
                return False
            conn.sendall(data)
        return True

    def _next_request(self, conn: socket.socket, timeout: float) -> dict | None:
        """The client's next frame body, or None when it sent nothing more for timeout seconds."""
        deadline = time.monotonic() + timeout
        while not self._pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not (conn.pending() or select.select([conn], [], [], remaining)[0]):
                return None
            conn.settimeout(max(remaining, 0.01))
            try:
                data = conn.recv(65536)
            except socket.timeout:
                return None
            if not data:
                return None
            try:
                frames = self._decoder.feed(data)
            except framing.ProtocolError as exc:
                self.bad_frames.append(exc.message)
                return None
            for frame in frames:
                if frame.kind != "C":
                    self.bad_frames.append(f"a {frame.kind} frame from the client")
                self.received.append(frame.body)
                self._pending.append(frame.body)
                self.first_request.set()
        return self._pending.popleft()

    def ops(self) -> list[str]:
        return [str(body.get("op")) for body in self.received]

    def close(self) -> None:
        self.thread.join(EXIT_DEADLINE)
        self.listener.close()


# --- running the client against it ----------------------------------------------------------------

class Setup(NamedTuple):
    """The client's configuration directory before the run."""

    pin: str  # "none", "same" (the fake server's key is remembered) or "other" (another key is)
    seeded: bool  # alice's key pair is saved already (else the client makes one)
    contact: str  # "none", "same" (bob's key is pinned) or "other" (another key is pinned for bob)


class Run(NamedTuple):
    status: int | None  # None: killed at the deadline
    output: str  # stdout + stderr (piped), or everything the terminal got
    stderr: str
    server: FakeServer
    home: Path


def prepare_home(home: Path, port: int, setup: Setup) -> None:
    store = ClientStore(str(home / "chatroom"))
    server = f"127.0.0.1:{port}"
    if setup.pin != "none":
        store.remember_server(server, (server_keys() if setup.pin == "same" else bob_keys()).fingerprint)
    if setup.contact != "none":
        store.remember_contact(server, "bob", (bob_keys() if setup.contact == "same" else alice_keys()).fingerprint)
    if setup.seeded:
        e2e.seed_key(home, port, "alice", alice_keys())


def run_piped(script: Script, setup: Setup, lines: list[str], close_input: bool, home: Path) -> Run:
    """The client with its standard input a pipe holding lines (closed after them, or left open)."""
    server = FakeServer(script)
    prepare_home(home, server.port, setup)
    read_end, write_end = os.pipe()
    os.write(write_end, "".join(line + "\n" for line in lines).encode("utf-8", "surrogateescape"))
    if close_input:
        os.close(write_end)
    try:
        # --register: a script drawn with new_user gets past the login as on a terminal
        proc = subprocess.Popen(e2e.client_command(server.port, "alice", "--register"), stdin=read_end,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=e2e.client_env(home), cwd=e2e.ROOT)
        os.close(read_end)
        try:
            out, err = proc.communicate(timeout=EXIT_DEADLINE)
            status: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            status = None
    finally:
        if not close_input:
            os.close(write_end)
        server.close()
    stdout, stderr = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    return Run(status, stdout + stderr, stderr, server, home)


def run_pty(script: Script, setup: Setup, keys: bytes, home: Path) -> tuple[Run, list, list]:
    """The client on a pseudo-terminal; keys are typed once it has sent its first frame."""
    server = FakeServer(script)
    prepare_home(home, server.port, setup)
    master, slave = os.openpty()
    output = bytearray()
    try:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        before = termios.tcgetattr(slave)
        # stderr apart, so that keys echoed by the terminal after the exit do not follow the reason
        proc = subprocess.Popen(e2e.client_command(server.port, "alice"), stdin=slave, stdout=slave,
                                stderr=subprocess.PIPE, env=e2e.client_env(home), start_new_session=True,
                                cwd=e2e.ROOT)
        deadline = time.monotonic() + EXIT_DEADLINE
        typed = stopped = False
        while proc.poll() is None and time.monotonic() < deadline:
            if not typed and server.first_request.is_set():
                os.write(master, keys)
                typed = True
            if not stopped and b"trying again in" in output:   # reconnecting (section 11): Ctrl-C stops it
                os.write(master, b"\x03")
                stopped = True
            if not stopped and b"connects again when you press" in output:   # a login prompt kept: Ctrl-D leaves
                os.write(master, b"\x04")
                stopped = True
            if select.select([master], [], [], 0.05)[0]:
                output += os.read(master, 65536)
        status: int | None = proc.poll()
        if status is None:
            proc.kill()
            proc.wait()
        while select.select([master], [], [], 0.05)[0]:
            chunk = os.read(master, 65536)
            if not chunk:
                break
            output += chunk
        after = termios.tcgetattr(slave)
        stderr = proc.stderr.read().decode("utf-8", "replace")
        proc.stderr.close()
    finally:
        os.close(master)
        os.close(slave)
        server.close()
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", output.decode("utf-8", "replace"))
    return Run(status, text + stderr, stderr, server, home), before, after


def check(run: Run, setup: Setup, statuses: tuple = (0, 1, 3)) -> None:
    """The properties every run has, whatever the server sent."""
    if os.environ.get("FUZZ_CLIENT_STATS"):
        with open(os.environ["FUZZ_CLIENT_STATS"], "a", encoding="utf-8") as fh:
            fh.write(json.dumps([run.status, run.server.ops(), run.stderr[-300:]]) + "\n")
    where = f"\n--- the client's output:\n{run.output[-3000:]}\n--- it sent: {run.server.ops()}"
    assert run.status is not None, "the client did not exit within the deadline" + where
    assert "Traceback" not in run.output, "a traceback" + where
    assert "internal error" not in run.output, "an internal error" + where
    assert run.status in statuses, f"exit status {run.status}" + where
    if run.status == 3:  # the changed-key warning has several lines, like OpenSSH's
        assert "chatclient: " in run.stderr, "no reason given" + where
    elif run.status != 0:
        last = run.stderr.replace("\r", "").rstrip("\n").split("\n")[-1]
        assert last.startswith("chatclient: "), "no one-line reason at the end" + where
    assert not run.server.bad_frames, f"the client sent bad frames: {run.server.bad_frames}" + where
    if setup.pin == "other":
        assert "PASSWORD" not in run.server.ops(), "a password went to a server with another key" + where
    root = run.home / "chatroom"
    for name, fields in (("known_servers", 2), ("known_contacts", 3)):
        path = root / name
        if not path.exists():
            continue
        for line in path.read_text("utf-8").splitlines():
            if line.startswith("#"):
                continue
            parts = line.split(" ")
            assert len(parts) == fields, f"{name} has the line {line!r}" + where
            if fields == 3:
                assert USERNAME_RULE.match(parts[1]), f"{name} has the line {line!r}" + where


# --- strategies ------------------------------------------------------------------------------------

OPS = ["LOGIN", "PASSWORD", "KEY", "BM", "PM", "TARGET", "SEND", "CH", "EX", "CANCEL", "BYE", "ERROR",
       "PRESENCE"]
MEMBERS = ["ok", "error", "message", "new_user", "server_key", "fingerprint", "nonce", "username",
           "attempts_left", "online", "public_key", "recipients", "entries", "more", "reason", "from", "to",
           "text", "ts", "ciphertext", "signature", "sender_key", "type", "op"]

names = st.sampled_from([
    "bob", "Bob", "BOB", "alice", "Alice", "carol", "", " ", "a b", "../../x", "x" * 40,
    "bob\n127.0.0.1:1 carol SHA256:x",
    "\ud800", "b\udfffb", "b\x1b]0;pwn\x07b", "\u202ebob", "b\x00b", "bob ", "-bob", "日本",
])
timestamps = st.sampled_from([
    TS, "2026-11-24T15:04:05+01:00", "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00",
    "0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "2026-11-24T15:04:05+23:59", "2026-11-24T15:04:05-99:99",
    "2026-02-30T00:00:00Z", "\u0662\u0660\u0662\u0666-11-24T15:04:05Z", "garbage", "",
])


def _special_strings() -> st.SearchStrategy:
    return st.sampled_from([
        server_keys().public.key_form, bob_keys().public.key_form, alice_keys().public.key_form,
        server_keys().fingerprint, bob_keys().fingerprint, "SHA256:", NONCE, "AAAA", "", "a;b",
        sealed_for_alice(), bob_pm()["ciphertext"], bob_pm()["signature"], "x" * 5000, "line\nbreak",
        "evil \x1b]0;pwn\x07 \u202e \x9b31m", "\ud800", "wrong_password", "weak_password", "bad_request",
        "not_online", "unexpected", "rate_limited", "shutdown", "replaced", "idle", "too_many_failures",
    ])


def json_values() -> st.SearchStrategy:
    leaves = (st.none() | st.booleans() | st.integers(-3, 3) | st.integers(-(2 ** 70), 2 ** 70)
              | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30)
              | names | timestamps | _special_strings())
    return st.recursive(leaves, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)


def members() -> st.SearchStrategy:
    values = st.one_of(json_values(), names, timestamps, _special_strings(), st.integers(-3, 3))
    return st.dictionaries(st.sampled_from(MEMBERS) | st.text(max_size=6), values, max_size=3)


kinds = st.sampled_from(["C", "C", "D"])


def _headed(kind: bytes, body: bytes) -> bytes:
    return kind + len(body).to_bytes(4, "big") + body


raw_bytes = st.one_of(
    st.binary(min_size=1, max_size=60),
    st.builds(_headed, st.sampled_from([b"C", b"D", b"X", b"\x00"]), st.binary(max_size=60)),
    st.builds(lambda kind, length, rest: kind + length.to_bytes(4, "big") + rest,
              st.sampled_from([b"C", b"D"]), st.integers(0, 2 ** 32 - 1), st.binary(max_size=20)),
    st.sampled_from([b"C\x00\x00\x00\x02{}", b'C\x00\x00\x00\x0a{"op":null}', b"C\x00\x00\x00\x04[1]",
                     b'C\x00\x00\x00\x0c{"op":"CH"}', b"C\x00\x00", b'D\x00\x00\x00\x0d{"op":"\xff"}']),
)


def items() -> st.SearchStrategy:
    answer = st.builds(Answer, kinds, members(), st.lists(st.sampled_from(MEMBERS), max_size=2).map(tuple))
    body = st.builds(lambda kind, op, rest: Body(kind, {**rest, "op": op}), kinds,
                     st.sampled_from(OPS) | st.text(max_size=6), members())
    data = st.builds(Data, st.sampled_from(["BM", "PM", "PRESENCE"]), members())
    return st.one_of(answer, answer, body, data, st.builds(Raw, raw_bytes), st.just(Hangup()))


STEPS = 12  # enough for the login and a few operations


def scripts() -> st.SearchStrategy:
    """A correct conversation of STEPS replies, changed at a few steps (or anywhere, sometimes)."""
    change = st.tuples(st.lists(items(), max_size=3), st.sampled_from(["before", "after", "instead"]))

    def build(greeting: list, changes: dict, new_user: bool) -> Script:
        steps = []
        for index in range(STEPS):
            extra, where = changes.get(index, ([], "instead"))
            if index not in changes:
                steps.append([GOOD])
            elif where == "before":
                steps.append(extra + [GOOD])
            elif where == "after":
                steps.append([GOOD] + extra)
            else:
                steps.append(extra)
        return Script(greeting, steps, new_user)

    return st.builds(build, st.lists(items(), max_size=1) | st.just([]) | st.just([]),
                     st.dictionaries(st.integers(0, STEPS - 1), change, max_size=3), st.booleans())


setups = st.builds(Setup, st.sampled_from(["none", "same", "same", "other"]),
                   st.sampled_from([True, True, True, False]), st.sampled_from(["none", "same", "other"]))
COMMANDS = ["BM hi", "BM", "hello", "PM bob psst", "PM", "bob", "PM carol x", "CH", "CH 2", "WHO", "KEYS",
            "KEYS bob", "TRUST bob", "EX", "", "nonsense"]


# --- the properties ----------------------------------------------------------------------------------

@settings(max_examples=int(os.environ.get("FUZZ_CLIENT_PIPED", 60)), **FUZZ)
@given(script=scripts(), setup=setups, commands=st.lists(st.sampled_from(COMMANDS), min_size=2, max_size=8),
       close_input=st.sampled_from([True, True, False]))
def test_piped_client_survives_any_server(script, setup, commands, close_input):
    with tempfile.TemporaryDirectory() as tmp:
        run = run_piped(script, setup, [PASSWORD, *commands], close_input, Path(tmp))
        check(run, setup)


KEYS = [c + "\r" for c in COMMANDS] + ["\x03", "\x04", "\x1b[A", "\t", "\x7f"]


@settings(max_examples=int(os.environ.get("FUZZ_CLIENT_PTY", 15)), **FUZZ)
@given(script=scripts(), setup=setups, keys=st.lists(st.sampled_from(KEYS), min_size=2, max_size=8))
def test_terminal_client_survives_any_server_and_restores_the_terminal(script, setup, keys):
    typed = (f"{PASSWORD}\r{PASSWORD}\r" + "".join(keys)).encode()
    with tempfile.TemporaryDirectory() as tmp:
        run, before, after = run_pty(script, setup, typed, Path(tmp))
        check(run, setup)
        assert after == before, "the terminal mode was not restored\n" + run.output[-3000:]


# --- regressions ---------------------------------------------------------------

PLAIN = Setup("none", True, "none")


def good_run(changes: dict, lines: list[str], setup: Setup = PLAIN, close_input: bool = True) -> Run:
    """A correct conversation except at the steps in changes (index -> items sent instead)."""
    steps = [changes.get(index, [GOOD]) for index in range(STEPS)]
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        run = run_piped(Script([], steps, False), setup, [PASSWORD, *lines], close_input, home)
        check(run, setup)
        contacts = home / "chatroom" / "known_contacts"
        known = contacts.read_text("utf-8") if contacts.exists() else ""
    return run._replace(home=Path(known))  # the directory is gone: keep what known_contacts held


def test_a_target_reply_for_another_name_is_neither_used_nor_pinned():
    # Found by the fuzzing: a TARGET reply naming someone else (here a timestamp) was pinned as a
    # contact, and a name with a space or a line break corrupted known_contacts.
    for name in ("2026-11-24T15:04:05.123Z", "bob\n127.0.0.1:1 carol SHA256:x", "carol"):
        run = good_run({4: [Answer("C", {"username": name})]}, ["PM bob hi", "EX"])
        assert run.status == 0 and re.search(r"^\[\d\d:\d\d\] you -> bob \(private\): hi$", run.output, re.M)
        # Sending pins nothing (a contact's key is pinned once a PM signed with it verifies, section 9).
        assert str(run.home) == "."
        assert f"first PM with bob: their key is {bob_keys().fingerprint}" in run.output


def test_a_pm_or_presence_from_an_invalid_name_is_refused():
    bad = "bob\n127.0.0.1:1 carol SHA256:x"
    run = good_run({3: [Data("PM", {"from": bad}), Data("PRESENCE", {"username": "a b"}), GOOD]}, ["WHO", "EX"])
    assert run.status == 0
    assert "a private message from an invalid sender name, bob\\x0a127.0.0.1:1 carol SHA256:x; not shown" \
        in run.output
    assert "a b is online" not in run.output and "online: bob, carol" in run.output
    assert str(run.home) == "."  # nothing pinned


def test_timestamps_at_the_ends_of_the_calendar_are_shown():
    # astimezone() overflowed on year 1 and 9999 (an "internal error" that ended the client).
    old, late = "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"
    entries = [{"ts": ts, "type": "BM", "from": "bob", "to": "*", "text": "edge"} for ts in (old, late)]
    run = good_run({3: [Data("BM", {"ts": old, "text": "early"}), Data("BM", {"ts": late, "text": "late"}), GOOD],
                    5: [Answer("C", {"entries": entries})]}, ["BM x", "CH", "EX"])
    assert run.status == 0
    assert re.search(r"^\[\d\d:\d\d\] bob: early$", run.output, re.M)
    assert re.search(r"^\[\d\d:\d\d\] bob: late$", run.output, re.M)
    assert "[0001-01-01 00:00] BM bob -> all: edge" in run.output
    assert "[9999-12-31 23:59] BM bob -> all: edge" in run.output


def test_a_server_message_with_line_breaks_stays_one_line():
    run = good_run({0: [Answer("C", {"ok": False, "error": "x", "message": "no\nway\x1b[2J"})]}, [])
    assert run.status == 1
    assert run.stderr == "chatclient: login refused: no\\x0away\\x1b[2J\n"
    run = good_run({2: [GOOD, Body("C", {"op": "BYE", "reason": "be\ngone"})]}, [], close_input=False)
    assert run.stderr == "chatclient: the server closed the connection: no reason known (be\\x0agone)\n"


def test_only_ok_true_is_success():
    run = good_run({0: [Answer("C", {"ok": "false", "message": "refused"})]}, [])
    assert run.status == 1 and run.stderr == "chatclient: login refused: refused\n"
    run = good_run({3: [Answer("C", {"ok": 1, "message": "nope"})]}, ["BM", "EX"])
    assert run.status == 1 and "BM refused: nope" in run.output  # a script's failed line: status 1
    assert run.stderr.endswith("chatclient: 1 line of the script failed: BM refused: nope\n")


def test_frames_before_a_malformed_one_are_not_lost():
    run = good_run({2: [GOOD, Data("BM", {"text": "last words"}), Body("C", {"op": "BYE", "reason": "shutdown"}),
                        Raw(b"X\x00\x00\x00\x00")]}, [], close_input=False)
    assert re.search(r"^\[\d\d:\d\d\] bob: last words$", run.output, re.M)
    assert run.stderr.endswith("chatclient: the server closed the connection: the server is shutting down "
                               "(shutdown)\n")
    run = good_run({2: [GOOD, Data("BM", {"text": "last words"}), Raw(b"X\x00\x00\x00\x00")]}, [],
                   close_input=False)
    assert re.search(r"^\[\d\d:\d\d\] bob: last words$", run.output, re.M)
    assert run.stderr.endswith("chatclient: the server sent a malformed frame: unknown frame kind byte b'X'\n")


def test_a_slow_reply_is_noted_on_the_terminal():
    steps = [[GOOD], [Pause(1.6), GOOD], [GOOD], [Pause(1.6), GOOD], [GOOD]]
    with tempfile.TemporaryDirectory() as tmp:
        run, before, after = run_pty(Script([], steps, False), PLAIN, f"{PASSWORD}\rBM hi\rEX\r".encode(),
                                     Path(tmp))
    check(run, PLAIN)
    assert after == before and run.status == 0
    assert "checking the password... (Ctrl-D leaves)" in run.output
    assert "waiting for the server... (Ctrl-D leaves)" in run.output


def test_a_script_for_a_new_name_stops_before_the_password_without_register():
    with tempfile.TemporaryDirectory() as tmp:
        server = FakeServer(Script([], [[GOOD]] * 3, True))
        prepare_home(Path(tmp), server.port, PLAIN)
        try:
            result = subprocess.run(e2e.client_command(server.port, "alice"), input=f"{PASSWORD}\nBM hi\n",
                                    capture_output=True, text=True, timeout=EXIT_DEADLINE,
                                    env=e2e.client_env(Path(tmp)), cwd=e2e.ROOT)
        finally:
            server.close()
    assert result.returncode == 1
    assert result.stderr.endswith("a script creates one only when asked: run it with --register "
                                  "(nothing was sent)\n")
    assert server.ops() == ["LOGIN"]


def test_ctrl_d_leaves_while_a_slow_reply_is_awaited():
    steps = [[GOOD], [GOOD], [GOOD], [Pause(3.0)]]  # the BM is not answered while the client waits
    with tempfile.TemporaryDirectory() as tmp:
        server = FakeServer(Script([], steps, False))
        prepare_home(Path(tmp), server.port, PLAIN)
        master, slave = os.openpty()
        try:
            proc = subprocess.Popen(e2e.client_command(server.port, "alice"), stdin=slave, stdout=slave,
                                    stderr=subprocess.PIPE, env=e2e.client_env(Path(tmp)),
                                    start_new_session=True, cwd=e2e.ROOT)
            output = bytearray()
            deadline = time.monotonic() + EXIT_DEADLINE
            typed: list[bytes] = [f"{PASSWORD}\r".encode(), b"BM hi\r", b"\x03", b"\x04"]
            while proc.poll() is None and time.monotonic() < deadline:
                if select.select([master], [], [], 0.05)[0]:
                    output += os.read(master, 65536)
                text = output.decode("utf-8", "replace")
                if typed and ((len(typed) == 4 and "password for alice" in text)
                              or (len(typed) == 3 and "alice> " in text)
                              or (len(typed) <= 2 and "(Ctrl-D leaves)" in text)):
                    os.write(master, typed.pop(0))
            status = proc.poll()
            if status is None:
                proc.kill()
                proc.wait()
            stderr = proc.stderr.read().decode()
            proc.stderr.close()
        finally:
            os.close(master)
            os.close(slave)
            server.close()
    assert status == 1, output.decode("utf-8", "replace")  # Ctrl-C did not end it; Ctrl-D did
    assert stderr == "chatclient: left without the server's reply to BM\n"
