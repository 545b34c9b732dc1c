"""chatclient.py end to end: the real client and the real server on loopback.

Interactive runs go through a real pseudo-terminal and are read with pyte, as
a person sees the screen; the bytes the client writes are kept too, to show
that nothing received reaches the terminal raw. Scripted runs go through pipes.
The other users are often ``WireClient``s (tests/wire.py). Every wait has a
deadline. Each client gets its own ``XDG_CONFIG_HOME``; ``seed_key`` puts one
of the shared test key pairs there so that only the tests about key
generation pay for it.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import select
import signal
import socket
import ssl
import stat
import struct
import subprocess
import sys
import termios
import threading
import time

import pyte
import pytest

import framing
import pg3lib
import protocol
import tlslayer
import wire
from clientstore import ClientStore, server_address, server_id
from serverproc import ServerProcess
from wire import WireClient, verify_pm2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIENT = os.path.join(ROOT, "chatclient.py")
DEADLINE = 10.0
PASSWORD = "password1"
COLS, ROWS = 120, 40
CLOCK = r"\[\d\d:\d\d\]"

_seeded: dict[tuple[str, str], tuple[bytes, dict]] = {}


# --- helpers -------------------------------------------------------------------------------

def seed_key(home, port: int, username: str, key_pair: pg3lib.KeyPair, password: str = PASSWORD) -> None:
    """Install key_pair as username's saved key for the server on port, as the client would save it."""
    cache_key = (key_pair.fingerprint, password)
    if cache_key not in _seeded:
        scratch = ClientStore(str(home / ".seed"))
        scratch.save_key_pair("seed:0", "seed", password, key_pair)
        pem_path, meta_path = scratch.key_files("seed:0", "seed")
        with open(pem_path, "rb") as pem, open(meta_path, encoding="utf-8") as meta:
            _seeded[cache_key] = (pem.read(), json.load(meta))
    pem_bytes, meta = _seeded[cache_key]
    store = ClientStore(str(home / "chatroom"))
    server = server_address("127.0.0.1", port)
    os.makedirs(store.keys_dir, mode=0o700, exist_ok=True)
    pem_path, meta_path = store.key_files(server, username)
    pg3lib.write_private_file(pem_path, pem_bytes)
    meta = dict(meta, server=server, username=username.lower())
    pg3lib.write_private_file(meta_path, json.dumps(meta).encode("utf-8"))


def key_stem(store: ClientStore, port: int, host: str = "127.0.0.1") -> str:
    """Where the key pairs for the server on port are kept: its key's fingerprint (section 9)."""
    pinned = store.server_fingerprint(server_address(host, port))
    assert pinned is not None
    return server_id(pinned)


def client_env(home) -> dict:
    env = dict(os.environ, XDG_CONFIG_HOME=str(home), TERM="xterm", LC_ALL="C.UTF-8")
    env.pop("PYTHONIOENCODING", None)
    return env


def client_command(port: int, username: str, *extra: str) -> list[str]:
    return [sys.executable, CLIENT, "127.0.0.1", str(port), username, *extra]


@pytest.fixture
def home(tmp_path):
    """home(name) -> a fresh configuration directory for one client."""
    def make(name: str):
        path = tmp_path / f"home-{name}"
        path.mkdir(exist_ok=True)
        return path
    return make


class PtyClient:
    """chatclient.py on a pseudo-terminal; ``screen`` is what a person would see."""

    def __init__(self, port: int, username: str, home, argv: list[str] | None = None) -> None:
        self.master, self.slave = os.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
        self.mode_before = termios.tcgetattr(self.slave)
        self.proc = subprocess.Popen(argv or client_command(port, username), stdin=self.slave,
                                     stdout=self.slave, stderr=self.slave, env=client_env(home),
                                     start_new_session=True, cwd=ROOT)
        self.screen = pyte.Screen(COLS, ROWS)
        self.stream = pyte.ByteStream(self.screen)
        self.raw = bytearray()

    @classmethod
    def logged_in(cls, port: int, username: str, home, key_pair: pg3lib.KeyPair, *extra: str) -> PtyClient:
        """A new user, logged in with a seeded key, at the operation prompt (extra: more arguments)."""
        seed_key(home, port, username, key_pair)
        client = cls(port, username, home, client_command(port, username, *extra))
        client.log_in()
        return client

    def log_in(self) -> None:
        """As a new user: the password twice, then wait for the operation prompt."""
        self.wait_prompt("choose a password: ")
        self.type(PASSWORD + "\r")
        self.wait_prompt("repeat the password: ")
        self.type(PASSWORD + "\r")
        self.wait_until(lambda: self.cursor_row().endswith("> "[:-1]) and "logged in as" in self.text(),
                        "the operation prompt")

    def pump(self, timeout: float = 0.05) -> None:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if ready:
            try:
                data = os.read(self.master, 65536)
            except OSError:
                return
            self.raw.extend(data)
            self.stream.feed(data)

    def rows(self) -> list[str]:
        return [line.rstrip() for line in self.screen.display]

    def text(self) -> str:
        return "\n".join(self.rows())

    def cursor_row(self) -> str:
        return self.rows()[self.screen.cursor.y]

    def wait_until(self, check, what: str, timeout: float = DEADLINE):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = check()
            if result:
                return result
            self.pump()
        raise AssertionError(f"no {what} within {timeout} s; the screen:\n{self.text()}")

    def wait_for(self, text: str, timeout: float = DEADLINE) -> None:
        """Wait until text is on the screen (rows have no trailing blanks, so neither has text)."""
        text = text.rstrip(" ")
        self.wait_until(lambda: text in self.text(), repr(text), timeout)

    def wait_line(self, pattern: str, timeout: float = DEADLINE) -> int:
        """The row index of the first line matching the regex."""
        def find():
            for index, row in enumerate(self.rows()):
                if re.fullmatch(pattern, row):
                    return index + 1  # truthy even for row 0
            return 0
        return self.wait_until(find, f"line matching {pattern!r}", timeout) - 1

    def wait_prompt(self, row_text: str, timeout: float = DEADLINE) -> None:
        """Wait until the cursor's row reads row_text and the cursor sits at its end."""
        self.wait_until(lambda: self.cursor_row() == row_text.rstrip()
                        and self.screen.cursor.x == len(row_text), f"prompt {row_text!r}", timeout)

    def type(self, keys: str | bytes) -> None:
        os.write(self.master, keys.encode("utf-8") if isinstance(keys, str) else keys)

    def wait_exit(self, timeout: float = DEADLINE) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.pump()
        if self.proc.poll() is None:
            raise AssertionError(f"the client did not exit within {timeout} s; the screen:\n{self.text()}")
        for _ in range(5):
            self.pump(0.01)
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(DEADLINE)
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture
def ptys():
    """ptys(port, username, home, key_pair) -> a logged-in PtyClient; all are closed after."""
    made: list[PtyClient] = []

    def make(*args, **kwargs) -> PtyClient:
        client = PtyClient.logged_in(*args, **kwargs)
        made.append(client)
        return client

    make.made = made
    yield make
    for client in made:
        client.close()


class PipedClient:
    """chatclient.py with its stdin a pipe we write to and stdout+stderr a pipe we read."""

    def __init__(self, port: int, username: str, home, *extra: str) -> None:
        self.proc = subprocess.Popen(client_command(port, username, *extra), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env=client_env(home), cwd=ROOT)
        self.output = b""

    def write(self, text: str) -> None:
        self.proc.stdin.write(text.encode("utf-8"))
        self.proc.stdin.flush()

    def close_input(self) -> None:
        self.proc.stdin.close()

    def expect(self, pattern: str, timeout: float = DEADLINE) -> re.Match:
        """Wait for a line matching the regex in the output so far."""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while True:
            match = re.search(pattern, self.output.decode("utf-8", "replace"), re.MULTILINE)
            if match:
                return match
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {pattern!r} within {timeout} s; output:\n{self.output.decode()}")
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk and self.proc.poll() is not None:
                    raise AssertionError(f"exited before {pattern!r}; output:\n{self.output.decode()}")
                self.output += chunk

    def wait(self, timeout: float = DEADLINE) -> int:
        """Read the output to its end, then the exit status."""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"the client did not exit within {timeout} s; output:\n"
                                     f"{self.output.decode()}")
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                self.output += chunk
        return self.proc.wait(max(deadline - time.monotonic(), 0.1))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(DEADLINE)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe and not pipe.closed:
                pipe.close()


def run_script(port: int, username: str, home, script: str, *extra: str) -> subprocess.CompletedProcess:
    """Run the client with script as its whole standard input (extra: options such as --register)."""
    return subprocess.run(client_command(port, username, *extra), input=script, capture_output=True, text=True,
                          timeout=DEADLINE, env=client_env(home), cwd=ROOT)


def wire_login(connect, username: str, key_pair: pg3lib.KeyPair):
    client = connect()
    client.login(username, PASSWORD, key_pair)
    return client


# --- through a terminal ----------------------------------------------------------------------

def test_message_arrives_above_a_half_typed_prompt(server, keys, home, ptys):
    alice = ptys(server.port, "alice", home("alice"), keys(0))
    bob = ptys(server.port, "bob", home("bob"), keys(1))
    alice.wait_for("* bob is online")
    bob.type("BM\r")
    bob.wait_prompt("message: ")
    bob.type("half typed réponse")
    bob.wait_prompt("message: half typed réponse")

    alice.type("BM hello from alice\r")
    alice.wait_line(CLOCK + r" alice: hello from alice  \(sent to 1\)")  # as bob sees it, and the count
    message_row = bob.wait_line(CLOCK + " alice: hello from alice")
    bob.wait_prompt("message: half typed réponse")
    assert message_row < bob.screen.cursor.y  # above the prompt, which is intact below it

    bob.type("\r")
    bob.wait_line(CLOCK + r" bob: half typed réponse  \(sent to 1\)")
    alice.wait_line(CLOCK + " bob: half typed réponse")
    alice.wait_prompt("alice> ")


def test_a_pasted_block_is_one_line_of_text_until_enter_and_never_commands(server, keys, home, ptys):
    """The client turns the terminal's bracketed paste on; lines pasted at the message prompt
    (one of them 'ex') stay in the edit line, joined, until Enter sends them as one BM; the
    client does not exit (a helper's paste quit it and sent its last line to the shell)."""
    alice = ptys(server.port, "alice", home("alice"), keys(0))
    assert b"\x1b[?2004h" in alice.raw
    alice.type("BM\r")
    alice.wait_prompt("message: ")
    alice.type("\x1b[200~Notes from the meeting:\nex\nmore text\n\x1b[201~")
    alice.wait_prompt("message: Notes from the meeting: ex more text")
    assert alice.proc.poll() is None
    alice.type("\r")
    alice.wait_line(CLOCK + r" alice: Notes from the meeting: ex more text  \(nobody else is online\)")
    alice.wait_prompt("alice> ")
    alice.type("EX\r")
    assert alice.wait_exit() == 0
    assert b"\x1b[?2004l" in alice.raw   # off again for the shell


def test_recent_messages_are_shown_at_login(server, connect, keys, home, ptys):
    bob = wire_login(connect, "bob", keys(1))
    bob.bm("earlier one")
    bob.bm("earlier two")
    alice = ptys(server.port, "alice", home("alice"), keys(0))
    two = alice.wait_line(CLOCK + " bob: earlier two")
    rows = alice.rows()
    header = rows.index("recent messages:")
    one = rows.index(next(r for r in rows if r.endswith(" bob: earlier one")))
    assert rows.index(next(r for r in rows if r.startswith("logged in as alice"))) < header < one < two
    bob.bm("now")
    alice.wait_line(CLOCK + " bob: now")
    assert alice.rows().count("recent messages:") == 1


def test_private_message_is_decrypted_on_the_other_side(server, keys, home, ptys):
    alice = ptys(server.port, "alice", home("alice"), keys(0))
    bob = ptys(server.port, "bob", home("bob"), keys(1))
    alice.wait_for("* bob is online")
    alice.type("PM\r")
    alice.wait_prompt("to (online: bob): ")
    alice.type("b\t")  # Tab completes the online user
    alice.wait_prompt("to (online: bob): bob ")
    alice.type("\r")
    alice.wait_for(f"first PM with bob: their key is {keys(1).fingerprint}")
    alice.wait_prompt("message to bob: ")
    alice.type("see you at 5\r")
    alice.wait_line(CLOCK + r" you -> bob \(private\): see you at 5")
    bob.wait_line(CLOCK + r" alice -> you \(private\): see you at 5")
    bob.wait_for(f"first private message from alice: remembering their key {keys(0).fingerprint}")

    bob.type("pm Alice on my way\r")  # one-line form, any case
    alice.wait_line(CLOCK + r" bob -> you \(private\): on my way")
    bob.type("ch\r")
    bob.wait_line(r"\[\d{4}-\d\d-\d\d \d\d:\d\d\] PM alice -> bob: see you at 5")
    bob.wait_line(r"\[\d{4}-\d\d-\d\d \d\d:\d\d\] PM bob -> alice: on my way")
    bob.wait_for("(2 entries)")
    assert "UNVERIFIED" not in bob.text()  # both PMs of the history check out (PM2, section 4.6)


def test_ctrl_c_at_a_sub_prompt_cancels(server, connect, keys, home, ptys):
    bob = wire_login(connect, "bob", keys(1))
    alice = ptys(server.port, "alice", home("alice"), keys(0))
    for command, sub_prompt in (("BM", "message: "), ("PM", "to (online: bob): "), ("PM bob", "message to bob: ")):
        alice.type(command + "\r")
        alice.wait_prompt(sub_prompt)
        alice.type("never sent")
        alice.type(b"\x03")
        alice.wait_for(sub_prompt + "never sent^C\ncancelled")  # the dropped text stays visible
        alice.wait_prompt("alice> ")
    alice.type("BM after cancel\r")  # the server is back in READY
    alice.wait_for("after cancel  (sent to 1)")
    assert bob.wait_data("BM")["text"] == "after cancel"
    assert not [d for d in bob.data if d["op"] in ("BM", "PM")]


def test_an_account_without_its_key_here_asks_before_making_a_new_one(server, connect, keys, home):
    """alice exists, but this machine has no key of hers: the client asks before the password.
    No: it stops, and nothing changed (her session elsewhere stays). Yes: a new key, logged in."""
    elsewhere = wire_login(connect, "alice", keys(0))
    alice = PtyClient(server.port, "alice", home("new-machine"))
    try:
        alice.wait_prompt("make a new key pair for alice here? [y/N] ")
        assert "--import-key" in alice.text() and "password for alice" not in alice.text()
        alice.type("\r")   # no (the default)
        assert alice.wait_exit() == 1
        alice.wait_for("no new key made, password not sent")
    finally:
        alice.close()
    assert elsewhere.request({"op": "PM"})["ok"]   # not replaced
    again = PtyClient(server.port, "alice", home("new-machine"))
    try:
        again.type(PASSWORD + "\r")   # typed ahead, for the password prompt it expects: not the answer
        again.wait_prompt("make a new key pair for alice here? [y/N] ")
        time.sleep(0.3)
        again.pump()
        assert again.proc.poll() is None and again.cursor_row() == "make a new key pair for alice here? [y/N]"
        again.type("y\r")
        again.wait_prompt("password for alice: ")
        again.type(PASSWORD + "\r")
        again.wait_prompt("alice> ")
        assert "your key fingerprint is" in again.text() and "a NEW one is made" not in again.text()
    finally:
        again.close()


def test_wrong_password_says_attempts_left_and_asks_again(server, connect, keys, home):
    wire_login(connect, "alice", keys(0)).exit()
    seed_key(home("alice"), server.port, "alice", keys(0))
    alice = PtyClient(server.port, "alice", home("alice"))
    try:
        alice.wait_prompt("password for alice: ")
        alice.type("wrong-password\r")
        alice.wait_for("wrong password; 2 attempts left")
        alice.wait_prompt("password for alice: ")
        alice.type(PASSWORD + "\r")
        alice.wait_prompt("alice> ", timeout=DEADLINE)
        assert "wrong-password" not in alice.text() and PASSWORD not in alice.text()
    finally:
        alice.close()


EVIL = "evil \x1b]0;pwn\x07 title, \u202eeulav\u202c, \x1b[2J cleared? \x9b31m"
EVIL_SHOWN = "evil \\x1b]0;pwn\\x07 title, \\u202eeulav\\u202c, \\x1b[2J cleared? \\x9b31m"


def test_hostile_text_is_shown_inert(server, connect, keys, home, ptys):
    alice = ptys(server.port, "alice", home("alice"), keys(0))
    bob = wire_login(connect, "bob", keys(1))
    bob.bm(EVIL)
    assert bob.pm("alice", EVIL)["ok"]
    alice.wait_line(CLOCK + " bob: " + re.escape(EVIL_SHOWN))
    alice.wait_line(CLOCK + r" bob -> you \(private\): " + re.escape(EVIL_SHOWN))
    alice.type("CH\r")
    alice.wait_for("(2 entries)")
    assert alice.text().count(EVIL_SHOWN) == 4
    raw = bytes(alice.raw)
    for forbidden in (b"\x1b]", b"\x07", "\u202e".encode(), "\u202c".encode(), b"\x1b[2J", "\x9b".encode()):
        assert forbidden not in raw


@pytest.mark.parametrize("way, status", [
    ("EX", 0), ("Ctrl-D", 0), ("Ctrl-C", 0), ("server gone", 1), ("SIGTERM", 128 + signal.SIGTERM),
    ("crash", 70),
])
def test_terminal_mode_is_restored(way, status, server, keys, home, tmp_path):
    argv = None
    if way == "crash":  # a bug inside the loop: make showing a D frame raise
        argv = [sys.executable, "-c",
                "import sys, chatclient\n"
                "def boom(self, body): raise RuntimeError('boom')\n"
                "chatclient.Session.on_data = boom\n"
                f"sys.argv = ['chatclient.py', '127.0.0.1', '{server.port}', 'alice']\n"
                "sys.exit(chatclient.main())\n"]
    seed_key(home("alice"), server.port, "alice", keys(0))
    client = PtyClient(server.port, "alice", home("alice"), argv=argv)
    try:
        client.log_in()
        client.wait_prompt("alice> ")
        during = termios.tcgetattr(client.slave)
        assert not during[3] & (termios.ECHO | termios.ICANON | termios.ISIG)
        client.type("BM half")
        client.wait_prompt("alice> BM half")
        if way == "EX":
            client.type(b"\x15EX\r")
        elif way == "Ctrl-D":
            client.type(b"\x15\x04")
        elif way == "Ctrl-C":  # it drops the half-typed command, as in a shell; it never leaves: Ctrl-D does
            client.type(b"\x03")
            client.wait_for("alice> BM half^C")
            client.wait_prompt("alice> ")
            client.type(b"\x03")
            client.wait_for("alice> ^C\n(Ctrl-C only cancels; to leave, type EX or press Ctrl-D)")
            client.wait_prompt("alice> ")
            assert client.proc.poll() is None
            client.type(b"\x04")
        elif way == "server gone":   # it tries to reconnect (section 11) until Ctrl-C stops it
            server.kill()
            client.wait_for("trying again in")
            client.type(b"\x03")   # drops the half-typed "BM half" (still in the line), as everywhere
            client.wait_until(lambda: "BM half" not in client.cursor_row(), "the line dropped")
            assert client.proc.poll() is None
            client.type(b"\x03")   # on an empty line: stops
        elif way == "SIGTERM":
            client.proc.send_signal(signal.SIGTERM)
        else:  # bob coming online makes a PRESENCE frame, whose display raises
            WireClient(server.port).login("bob", PASSWORD, keys(1))
        assert client.wait_exit() == status
        assert termios.tcgetattr(client.slave) == client.mode_before
        text = client.text()
        assert "Traceback" not in text
        expected = {"EX": "bye", "Ctrl-D": "bye", "Ctrl-C": "bye",
                    "server gone": "chatclient: stopped reconnecting (Ctrl-C): not connected",
                    "SIGTERM": "chatclient: stopped by SIGTERM",
                    "crash": "chatclient: internal error: RuntimeError: boom"}[way]
        assert expected in text
    finally:
        client.close()


def test_resize_redraws_the_line_to_the_new_width(server, keys, home, ptys):
    alice = ptys(server.port, "alice", home("alice"), keys(0))
    alice.type("BM " + "0123456789" * 8 + "END")
    alice.wait_until(lambda: alice.cursor_row().endswith("END"), "the long line")
    fcntl.ioctl(alice.slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, 40, 0, 0))
    alice.screen.resize(ROWS, 40)
    alice.proc.send_signal(signal.SIGWINCH)  # no controlling terminal here, so the kernel would not
    alice.wait_until(lambda: alice.cursor_row().endswith("END") and len(alice.cursor_row()) < 40
                     and alice.screen.cursor.x == len(alice.cursor_row()), "the line redrawn in 40 columns")
    alice.type("\r")
    alice.wait_line(CLOCK + r" alice: 0123456789\d*")  # the echo, wrapped at 40 columns


def test_no_password_on_stdin(server, home):
    result = run_script(server.port, "alice", home("alice"), "", "--register")
    assert result.returncode == 1
    assert result.stderr == "chatclient: no password on standard input (its first line is the password)\n"


# --- server keys -------------------------------------------------------------------------------

def test_changed_server_key_stops_before_the_password(make_server, keys, home, tmp_path):
    first = make_server()
    port = first.port
    alice_home = home("alice")
    seed_key(alice_home, port, "alice", keys(0))
    result = run_script(port, "alice", alice_home, f"{PASSWORD}\nEX\n", "--register")
    assert result.returncode == 0, result.stderr
    store = ClientStore(str(alice_home / "chatroom"))
    remembered = store.server_fingerprint(f"127.0.0.1:{port}")
    assert remembered and remembered in result.stdout
    first.kill()

    other_data = tmp_path / "other-data"
    other_data.mkdir()
    impostor = ServerProcess(str(other_data)).start(port=port)
    try:
        result = run_script(port, "alice", alice_home, f"{PASSWORD}\nBM hi\nEX\n")
        probe = WireClient(port)
        presented = pg3lib.PublicKey.from_key_form(probe.login_start("probe")["server_key"]).fingerprint
        probe.close()
    finally:
        impostor.kill()
    assert result.returncode == 3
    assert "THE SERVER'S KEY HAS CHANGED" in result.stderr
    assert remembered in result.stderr and presented in result.stderr and remembered != presented
    assert "Traceback" not in result.stderr
    assert store.server_fingerprint(f"127.0.0.1:{port}") == remembered  # not overwritten
    leftovers = [name for name in os.listdir(other_data) if name.lower().endswith(".chat")]
    assert leftovers == []  # no account was registered: the password never went out
    accounts = other_data / "accounts.jsonl"
    assert not accounts.exists() or accounts.stat().st_size == 0


def tls_context_for(keys: pg3lib.KeyPair, directory) -> ssl.SSLContext:
    """A server TLS context presenting keys in a self-signed certificate (made with x509.py)."""
    os.makedirs(str(directory), exist_ok=True)
    return tlslayer.server_context(str(directory), keys)


class FakeLoginServer:
    """One TLS connection on loopback, played by a thread: it answers LOGIN with login_reply and
    records the ops it received (never more than that: a test of where the client stops)."""

    def __init__(self, context: ssl.SSLContext | None, login_reply: dict, greeting: bytes = b"") -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(DEADLINE)
        self.port = self.listener.getsockname()[1]
        self.context = context
        self.login_reply = login_reply
        self.greeting = greeting
        self.received: list[str] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        conn.settimeout(DEADLINE)
        with conn:
            try:
                if self.greeting:  # sent before reading, as the server's server_busy
                    conn.sendall(self.greeting)
                    conn.shutdown(socket.SHUT_WR)
                    while conn.recv(65536):
                        pass
                    return
                assert self.context is not None
                tls = self.context.wrap_socket(conn, server_side=True)
                decoder = framing.FrameDecoder()
                while True:
                    data = tls.recv(65536)
                    if not data:
                        return
                    for frame in decoder.feed(data):
                        self.received.append(frame.op)
                        if frame.op == "LOGIN":
                            tls.sendall(framing.command(self.login_reply))
            except (OSError, framing.ProtocolError):
                return

    def close(self) -> None:
        self.thread.join(DEADLINE)
        self.listener.close()


def fake_login(keys_shown: pg3lib.KeyPair, fingerprint: str) -> dict:
    return {"op": "LOGIN", "ok": True, "new_user": False, "server_key": keys_shown.public.key_form,
            "fingerprint": fingerprint, "nonce": base64.b64encode(os.urandom(16)).decode(), "protocol": 2}


def test_login_reply_whose_fingerprint_does_not_match_its_key_stops(keys, home, tmp_path):
    """A fake server (its certificate: keys(3)) answers LOGIN with keys(3)'s key but keys(4)'s fingerprint."""
    fake = FakeLoginServer(tls_context_for(keys(3), tmp_path / "cert"), fake_login(keys(3), keys(4).fingerprint))
    try:
        result = run_script(fake.port, "alice", home("alice"), f"{PASSWORD}\nEX\n")
    finally:
        fake.close()
    assert result.returncode == 3
    assert keys(3).fingerprint in result.stderr and keys(4).fingerprint in result.stderr
    assert fake.received == ["LOGIN"]


def test_login_server_key_other_than_the_certificates_stops_before_the_password(keys, home, tmp_path):
    """The certificate holds keys(3); LOGIN announces keys(4), with keys(4)'s own fingerprint."""
    fake = FakeLoginServer(tls_context_for(keys(3), tmp_path / "cert"), fake_login(keys(4), keys(4).fingerprint))
    try:
        result = run_script(fake.port, "alice", home("alice"), f"{PASSWORD}\nEX\n")
    finally:
        fake.close()
    assert result.returncode == 3, result.stderr
    assert "TLS certificate" in result.stderr
    assert keys(3).fingerprint in result.stderr and keys(4).fingerprint in result.stderr
    assert fake.received == ["LOGIN"]  # no PASSWORD


def test_a_plain_refusal_instead_of_the_handshake_is_shown(home):
    """server_busy comes as a plain C frame before the server reads (section 0): the client shows it."""
    busy = framing.command({"op": "ERROR", "ok": False, "error": "server_busy",
                            "message": "the server is full, try again later"})
    fake = FakeLoginServer(None, {}, greeting=busy)
    try:
        result = run_script(fake.port, "alice", home("alice"), f"{PASSWORD}\nEX\n")
    finally:
        fake.close()
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == \
        "chatclient: the server ended the connection: the server is full, try again later"


class MitmProxy:
    """A TCP proxy on loopback that terminates TLS with its own certificate and forwards the plaintext
    to the real server over plain TCP; it records what the client sent through it."""

    def __init__(self, context: ssl.SSLContext, upstream_port: int, port: int = 0) -> None:
        self.listener = socket.create_server(("127.0.0.1", port))
        self.listener.settimeout(DEADLINE)
        self.port = self.listener.getsockname()[1]
        self.context = context
        self.upstream_port = upstream_port
        self.from_client = bytearray()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        deadline = time.monotonic() + DEADLINE
        try:
            with self.context.wrap_socket(conn, server_side=True) as tls, \
                    socket.create_connection(("127.0.0.1", self.upstream_port), timeout=DEADLINE) as up:
                tls.setblocking(False)
                up.setblocking(False)
                while time.monotonic() < deadline:
                    ready, _, _ = select.select([tls, up], [], [], 0.2)
                    for sock in ready:
                        try:
                            data = sock.recv(65536)
                        except (ssl.SSLWantReadError, BlockingIOError):
                            continue
                        if not data:
                            return
                        if sock is tls:
                            self.from_client += data
                            up.sendall(data)
                        else:
                            tls.sendall(data)
        except (OSError, ssl.SSLError):
            return

    def close(self) -> None:
        self.thread.join(DEADLINE)
        self.listener.close()


def test_a_tls_proxy_with_another_certificate_is_stopped_before_login(make_server, keys, home, tmp_path):
    """A man in the middle at the address the client knows: the server now runs elsewhere, and a proxy
    with its own certificate terminates TLS and forwards to it. The client stops, exit 3, and the proxy
    never sees a LOGIN."""
    data = str(tmp_path / "data-mitm")
    os.makedirs(data)
    first = make_server(data=data)
    port = first.port
    alice_home = home("alice")
    seed_key(alice_home, port, "alice", keys(0))
    result = run_script(port, "alice", alice_home, f"{PASSWORD}\nEX\n", "--register")
    assert result.returncode == 0, result.stderr
    store = ClientStore(str(alice_home / "chatroom"))
    pinned = store.server_fingerprint(f"127.0.0.1:{port}")
    first.kill()
    moved = make_server(data=data)  # the same server (same key), on another port
    proxy = MitmProxy(tls_context_for(keys(5), tmp_path / "mitm"), moved.port, port=port)
    try:
        result = run_script(port, "alice", alice_home, f"{PASSWORD}\nBM hi\nEX\n")
    finally:
        proxy.close()
    assert result.returncode == 3
    assert "THE SERVER'S KEY HAS CHANGED" in result.stderr
    assert pinned in result.stderr and keys(5).fingerprint in result.stderr
    assert b"LOGIN" not in proxy.from_client and bytes(proxy.from_client) == b""
    assert PASSWORD not in result.stdout + result.stderr


def test_a_tls_client_and_a_plain_wire_client_share_the_room(server, connect, keys, home):
    plain = wire_login(connect, "bob", keys(1))  # a version-1 style plain TCP connection
    alice = PipedClient(server.port, "alice", home("alice"), "--register")
    try:
        alice.write(f"{PASSWORD}\n")
        alice.expect("logged in as alice")
        plain.wait_data("PRESENCE", username="alice", online=True)
        alice.write("BM over TLS\n")
        assert plain.wait_data("BM")["text"] == "over TLS"
        plain.bm("over plain TCP")
        alice.expect(CLOCK + " bob: over plain TCP")
        alice.close_input()
        assert alice.wait() == 0
    finally:
        alice.close()


# --- through pipes ------------------------------------------------------------------------------

def test_piped_script_bm_pm_ch_ex(server, connect, keys, home):
    bob = wire_login(connect, "bob", keys(1))
    alice_home = home("alice")
    seed_key(alice_home, server.port, "alice", keys(0))
    script = (f"{PASSWORD}\nCH\nBM\nhello all\nbm one-liner\nPM\nbob\nsecret note\n"
              "pm Bob see you at 5\nCH\nEX\n")
    result = run_script(server.port, "alice", alice_home, script, "--register")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "\x1b" not in result.stdout
    out = result.stdout.splitlines()
    assert out[-1] == "bye"
    assert "your history is empty" in out
    echoes = [line[8:] for line in out if re.match(CLOCK + " ", line)]
    assert echoes == ["alice: hello all  (sent to 1)", "alice: one-liner  (sent to 1)",
                      "you -> bob (private): secret note", "you -> bob (private): see you at 5"]
    history = [line.split("] ", 1)[1] for line in out if re.match(r"\[\d{4}-\d\d-\d\d \d\d:\d\d\] ", line)]
    assert history == ["BM alice -> all: hello all", "BM alice -> all: one-liner",
                       "PM alice -> bob: secret note", "PM alice -> bob: see you at 5"]
    assert "(4 entries)" in out

    assert bob.wait_data("BM")["text"] == "hello all"
    assert bob.wait_data("BM")["text"] == "one-liner"
    for expected in ("secret note", "see you at 5"):
        pm = bob.wait_data("PM")
        sender_key = pg3lib.PublicKey.from_key_form(pm["sender_key"])
        assert sender_key == keys(0).public
        assert verify_pm2(pm, "bob")  # PM2: id and sent under the signature (section 4.5)
        assert len(base64.b64decode(pm["id"])) == protocol.PM_ID_BYTES
        assert keys(1).open(pm["ciphertext"]).decode() == expected


def test_piped_client_shows_messages_as_they_arrive_and_end_of_input_is_ex(server, connect, keys, home):
    bob = wire_login(connect, "bob", keys(1))
    seed_key(home("alice"), server.port, "alice", keys(0))
    alice = PipedClient(server.port, "alice", home("alice"), "--register")
    try:
        alice.write(PASSWORD + "\n")
        alice.expect("^logged in as alice at 127.0.0.1:\\d+. also online: bob$")
        bob.bm("hi alice")
        alice.expect(f"^{CLOCK} bob: hi alice$")
        bob.pm("alice", "just for you")
        alice.expect(f"^{CLOCK} bob -> you \\(private\\): just for you$")
        alice.write("BM\n")  # then the input ends at the message prompt: cancel, then EX
        alice.close_input()
        assert alice.wait() == 0
        assert alice.output.decode().splitlines()[-2:] == ["cancelled", "bye"]
    finally:
        alice.close()
    assert bob.wait_data("PRESENCE", username="alice", online=False)
    assert not [d for d in bob.data if d["op"] == "BM"]


def test_piped_contact_key_change_is_warned_until_trusted(server, connect, keys, home):
    seed_key(home("alice"), server.port, "alice", keys(0))
    alice = PipedClient(server.port, "alice", home("alice"), "--register")
    try:
        alice.write(PASSWORD + "\n")
        alice.expect("^logged in as alice")
        bob = wire_login(connect, "bob", keys(1))
        bob.pm("alice", "one")
        alice.expect(f"^{CLOCK} bob -> you \\(private\\): one$")
        bob.exit()
        bob = wire_login(connect, "bob", keys(2))  # bob comes back with another key
        bob.pm("alice", "two")
        alice.expect(f"bob's key has CHANGED: remembered {re.escape(keys(1).fingerprint)}, "
                     f"now {re.escape(keys(2).fingerprint)}.*message held until then")
        alice.write("PM bob are you really bob?\n")
        alice.expect("CHANGED.*message not sent")
        alice.write("KEYS bob\n")
        alice.expect(f"^bob now presents {re.escape(keys(2).fingerprint)}")
        alice.write("TRUST bob\n")
        alice.expect(f"^now trusting bob's key {re.escape(keys(2).fingerprint)}$")
        alice.expect(f"^{CLOCK} bob -> you \\(private\\): two$")
        alice.write("PM bob welcome back\n")
        alice.expect(f"^{CLOCK} you -> bob \\(private\\): welcome back$")
        assert keys(2).open(bob.wait_data("PM")["ciphertext"]) == b"welcome back"
        alice.close_input()
        assert alice.wait() == 1  # the PM held back by the changed key is a failed line
        assert alice.output.decode().splitlines()[-1] == (
            "chatclient: 1 line of the script failed: PM to bob: their key has changed (TRUST bob accepts it)")
        assert "are you really" not in alice.output.decode()
    finally:
        alice.close()


def test_key_is_generated_once_kept_encrypted_and_a_lost_key_means_unreadable(server, connect, keys, home):
    carol_home = home("carol")
    wire_login(connect, "bob", keys(1))
    first = run_script(server.port, "carol", carol_home, f"{PASSWORD}\nEX\n", "--register")
    assert first.returncode == 0, first.stderr
    assert "generating your key..." in first.stdout
    store = ClientStore(str(carol_home / "chatroom"))
    server_name = f"127.0.0.1:{server.port}"
    stem = key_stem(store, server.port)  # kept per server key, not per address (section 9)
    for path in store.key_files(stem, "carol"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with open(store.key_files(stem, "carol")[0], "rb") as fh:
        assert b"BEGIN ENCRYPTED PRIVATE KEY" in fh.read()
    [own] = store.own_keys()
    fingerprint = own.fingerprint
    assert f"your key fingerprint is {fingerprint}" in first.stdout

    second = run_script(server.port, "carol", carol_home, f"{PASSWORD}\nPM bob kept secret\nKEYS\nEX\n")
    assert second.returncode == 0, second.stderr
    assert "generating" not in second.stdout
    assert f"your key (carol at {server_name}): {fingerprint}" in second.stdout

    for path in store.key_files(stem, "carol"):
        os.remove(path)
    third = run_script(server.port, "carol", carol_home, f"{PASSWORD}\nCH\nEX\n")
    assert third.returncode == 0, third.stderr
    assert "generating your key..." in third.stdout
    # The account existed: what a new key pair costs, and how to bring the old one, is said first.
    assert "a NEW one is made" in third.stderr and "--import-key" in third.stderr
    assert re.search(r"\] PM carol -> bob: \(unreadable: sealed for another key\)$", third.stdout, re.M)


def test_pms_sealed_in_the_old_form_still_read_in_history(server, connect, keys, home):
    """PMs sealed before the course form was fixed (no outer base64) stay in
    history as they were sealed; the client still opens them in CH."""
    bob = connect(legacy_seal=True)
    bob.login("bob", PASSWORD, keys(1))
    alice = wire_login(connect, "alice", keys(0))
    assert bob.pm("alice", "sealed the old way")["ok"]
    stored = alice.wait_data("PM")["ciphertext"]
    assert stored.split(";")[1].startswith("gAAAAA")
    alice.exit()
    seed_key(home("alice"), server.port, "alice", keys(0))
    result = run_script(server.port, "alice", home("alice"), f"{PASSWORD}\nCH\nEX\n")
    assert result.returncode == 0, result.stderr
    assert re.search(r"\] PM bob -> alice: sealed the old way$", result.stdout, re.M), result.stdout


def test_piped_wrong_password_exits_1(server, connect, keys, home):
    wire_login(connect, "alice", keys(0)).exit()
    result = run_script(server.port, "alice", home("alice"), "not-the-password\nBM hi\nEX\n")
    assert result.returncode == 1
    assert result.stderr == "chatclient: wrong password\n"


def test_bye_replaced_is_one_line_and_exit_1(server, connect, keys, home):
    seed_key(home("alice"), server.port, "alice", keys(0))
    alice = PipedClient(server.port, "alice", home("alice"), "--register")
    try:
        alice.write(PASSWORD + "\n")
        alice.expect("^logged in as alice")
        wire_login(connect, "alice", keys(0))  # the same account logs in elsewhere
        assert alice.wait() == 1
        assert alice.output.decode().splitlines()[-1] == \
            "chatclient: the server closed the connection: you logged in somewhere else (replaced)"
    finally:
        alice.close()


# --- what a new user ran into (Tab, Ctrl-C, long messages, echoes, CH, the key box, IGNORE) ------------

ENTRY = r"\[\d{4}-\d\d-\d\d \d\d:\d\d\] "


def existing_user_pty(port: int, username: str, home) -> PtyClient:
    """A PtyClient for an account that exists already (its key seeded): the password once."""
    client = PtyClient(port, username, home)
    client.wait_prompt(f"password for {username}: ")
    client.type(PASSWORD + "\r")
    client.wait_prompt(f"{username}> ")
    return client


def test_tab_completes_commands_first_then_user_names_never_message_text(server, connect, keys, home, ptys):
    wire_login(connect, "bob", keys(1))
    alice_home = home("alice")
    ClientStore(str(alice_home / "chatroom")).remember_contact(server_address("127.0.0.1", server.port),
                                                               "carol", keys(2).fingerprint)
    alice = ptys(server.port, "alice", alice_home, keys(0))
    for typed, row in (("BM e\t!", "alice> BM e!"),  # never "BM EX"
                       ("BM see you at c\t!", "alice> BM see you at c!"),
                       ("TRUST c\t!", "alice> TRUST carol !"),  # a contact, never "TRUST CH"
                       ("pm b\t!", "alice> pm bob !"),  # online now
                       ("PM bob e\t!", "alice> PM bob e!"),
                       ("i\t", "alice> IGNORE "),
                       ("ke\tc\t", "alice> KEYS carol ")):
        alice.type("\x15" + typed)  # Ctrl-U, then the keys; "!" after Tab shows that Tab is done
        alice.wait_prompt(row)
    alice.type("\x15w\t\r")
    alice.wait_for("alice> WHO\nonline: alice (you), bob")


def test_ctrl_c_only_cancels_even_at_the_password_prompt(server, connect, keys, home):
    wire_login(connect, "alice", keys(0)).exit()
    seed_key(home("alice"), server.port, "alice", keys(0))
    alice = PtyClient(server.port, "alice", home("alice"))
    try:
        alice.wait_prompt("password for alice: ")
        alice.type("half a pass\x03")
        alice.wait_for("password for alice: ^C\n(Ctrl-C only cancels; to leave, press Ctrl-D)")
        alice.wait_prompt("password for alice: ")
        alice.type(PASSWORD + "\r")
        alice.wait_prompt("alice> ")
        assert "attempts left" not in alice.text()  # nothing was sent for the dropped text
        for count in (1, 2, 3):
            alice.type(b"\x03")
            alice.wait_until(lambda count=count: alice.text().count("to leave, type EX or press Ctrl-D") == count,
                             f"hint {count}")
        alice.wait_prompt("alice> ")
        assert alice.proc.poll() is None
        alice.type(b"\x04")
        assert alice.wait_exit() == 0
        assert "bye" in alice.text()
    finally:
        alice.close()


def type_slowly(client: PtyClient, text: str, chunk: int = 512) -> None:
    """Type a long text in pieces, reading the screen between them (the pty buffers are small)."""
    for start in range(0, len(text), chunk):
        client.type(text[start:start + chunk])
        client.pump(0.01)


def test_a_message_over_the_limit_stays_in_the_line_and_in_history(server, connect, keys, home, ptys):
    bob = wire_login(connect, "bob", keys(1))
    alice = ptys(server.port, "alice", home("alice"), keys(0))
    limit = protocol.MAX_TEXT_CHARS
    type_slowly(alice, "BM " + "x" * limit + "yz")
    alice.wait_until(lambda: alice.cursor_row().endswith("xyz"), "the long line")
    alice.type("\r")
    alice.wait_for(f"! BM not sent: a message is at most {limit} characters (this one has {limit + 2})\n"
                   "  it is still in the line below")
    transcript = [row for row in alice.rows() if row.startswith("alice> BM xxx")]
    assert len(transcript) == 1 and transcript[0].endswith("x ...")  # one row, not the whole text again
    assert len(transcript[0]) < COLS
    # The line is back for editing, the cursor at its end: two Backspaces make it fit.
    alice.wait_until(lambda: alice.cursor_row().startswith("alice> xxx") and alice.cursor_row().endswith("xyz")
                     and alice.screen.cursor.x == len(alice.cursor_row()), "the line given back")
    alice.type("\x7f\x7f\r")
    alice.wait_line(CLOCK + r" alice: x+")
    assert bob.wait_data("BM")["text"] == "x" * limit
    alice.wait_prompt("alice> ")
    alice.type("\x1b[A\x1b[A")  # Up, Up: the sent line, then the long one
    alice.wait_until(lambda: alice.cursor_row().endswith("xyz"), "the long line in history")
    alice.type("\x15BM\r")
    alice.wait_prompt("message: ")
    type_slowly(alice, "y" * (limit + 1))
    alice.type("\r")
    alice.wait_for(f"(this one has {limit + 1})")
    alice.wait_until(lambda: alice.cursor_row().startswith("message: yyy")
                     and alice.screen.cursor.x == len(alice.cursor_row()), "the message prompt with the text")
    alice.type("\x7f\r")
    alice.wait_prompt("alice> ")
    assert bob.wait_data("BM")["text"] == "y" * limit


def test_ctrl_c_drops_a_message_put_back_for_being_too_long(server, connect, keys, home, ptys):
    bob = wire_login(connect, "bob", keys(1))
    alice = ptys(server.port, "alice", home("alice"), keys(0))
    type_slowly(alice, "BM " + "x" * (protocol.MAX_TEXT_CHARS + 1))
    alice.type("\r")
    alice.wait_for("(Ctrl-C drops it)")
    alice.wait_until(lambda: alice.cursor_row().startswith("alice> xxx"), "the line given back")
    alice.type("\x03")
    alice.wait_prompt("alice> ")                  # dropped, as the hint says
    dropped = [row for row in alice.rows() if row.startswith("alice> BM xxx") and row.endswith("^C")]
    assert len(dropped) == 1 and dropped[0].endswith(" ...^C") and len(dropped[0]) < COLS   # cut, marked dropped
    alice.type("\x03")
    alice.wait_for("to leave, type EX or press Ctrl-D")   # an empty line: how to leave; the line stays empty
    alice.wait_prompt("alice> ")
    alice.type("BM short\r")
    assert bob.wait_data("BM")["text"] == "short"


def test_a_script_with_a_failed_line_exits_1_and_says_why(server, connect, keys, home):
    bob = wire_login(connect, "bob", keys(1))
    seed_key(home("alice"), server.port, "alice", keys(0))
    too_long = "z" * (protocol.MAX_TEXT_CHARS + 1)
    result = run_script(server.port, "alice", home("alice"),
                        f"{PASSWORD}\nBM {too_long}\nPM carol are you there\nBM still here\nbm\n{too_long}\nEX\n",
                        "--register")
    assert result.returncode == 1
    errors = result.stderr.splitlines()
    assert errors[0].startswith("BM not sent: a message is at most 4096 characters (this one has 4097)")
    # carol has no account: no_such_user, or not_online from a server that does not say so yet
    assert errors[1] in ("cannot send to carol: there is no user carol",
                         "cannot send to carol: carol is not online (and the server keeps no message for them)")
    assert errors[2].startswith("BM not sent: a message is at most 4096")
    assert errors[3].startswith("chatclient: 3 lines of the script failed: BM not sent: a message is at most")
    assert len(errors) == 4
    assert re.search(f"^{CLOCK} alice: still here  \\(sent to 1\\)$", result.stdout, re.M)
    assert result.stdout.endswith("bye\n")  # the rest of the script ran
    assert bob.wait_data("BM")["text"] == "still here"
    with pytest.raises(TimeoutError):
        bob.wait_data("BM", timeout=0.3)
    fine = run_script(server.port, "alice", home("alice"), f"{PASSWORD}\nBM all good\n")
    assert fine.returncode == 0 and fine.stderr == ""


def test_a_script_registers_a_new_name_only_with_register(server, connect, keys, home):
    seed_key(home("dave"), server.port, "dave", keys(3))
    result = run_script(server.port, "dave", home("dave"), f"{PASSWORD}\nBM hi\n")
    assert result.returncode == 1
    assert result.stderr == (f"chatclient: there is no account dave at 127.0.0.1:{server.port}; a script "
                             "creates one only when asked: run it with --register (nothing was sent)\n")
    probe = connect()
    assert probe.login_start("dave")["new_user"] is True  # no account was made
    probe.close()
    result = run_script(server.port, "dave", home("dave"), f"{PASSWORD}\nEX\n", "--register")
    assert result.returncode == 0, result.stderr
    assert connect().login_start("dave")["new_user"] is False
    short = run_script(server.port, "erin", home("erin"), "short\n", "--register")
    assert short.returncode == 1
    assert short.stderr == "chatclient: cannot register erin: a password has at least 8 characters\n"


def test_own_bm_echo_who_with_you_and_timed_presence(server, keys, home, ptys):
    alice = ptys(server.port, "alice", home("alice"), keys(0))
    bob = ptys(server.port, "bob", home("bob"), keys(1))
    alice.wait_line(CLOCK + r" \* bob is online")
    alice.type("WHO\r")
    alice.wait_for("alice> WHO\nonline: alice (you), bob")
    alice.type("BM hello bob\r")
    row = alice.wait_line(CLOCK + r" alice: hello bob  \(sent to 1\)")
    mine = alice.rows()[row]
    row = bob.wait_line(CLOCK + r" alice: hello bob")
    theirs = bob.rows()[row]
    assert mine.startswith(theirs)  # the same line, the count after it
    assert "sent to 1 user" not in alice.text()
    bob.type("EX\r")
    alice.wait_line(CLOCK + r" \* bob is offline")
    alice.type("WHO\r")
    alice.wait_for("online: alice (you); nobody else")


def test_a_long_history_shows_the_newest_screenful_on_a_terminal_and_all_when_piped(server, connect, keys, home):
    writer = wire_login(connect, "alice", keys(0))
    for i in range(60):
        assert writer.bm(f"entry {i:02d}")["ok"]
    writer.exit()
    seed_key(home("alice"), server.port, "alice", keys(0))
    alice = existing_user_pty(server.port, "alice", home("alice"))
    try:
        alice.type("CH\r")
        alice.wait_for("(the newest 38 of 60 entries; CH all shows all 60)")
        alice.wait_prompt("alice> ")
        shown = [row for row in alice.rows() if re.match(ENTRY, row)]
        assert len(shown) == ROWS - 2  # one screenful: the summary line and the prompt below it
        assert shown[0].endswith("alice -> all: entry 22") and shown[-1].endswith("alice -> all: entry 59")
        alice.type("CH all\r")
        alice.wait_for("(60 entries)")
        alice.type("CH 5\r")
        alice.wait_for("alice> CH 5\n")
        alice.wait_for("(the newest 5 entries; CH all shows older ones, if any)")
        assert alice.rows()[alice.screen.cursor.y - 6].endswith("entry 55")
    finally:
        alice.close()
    result = run_script(server.port, "alice", home("alice"), f"{PASSWORD}\nCH\n")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if re.match(ENTRY, line)]
    assert len(lines) == 60 and "(60 entries)" in result.stdout


def test_changed_server_key_box_lines_up_on_the_terminal(server, keys, home):
    alice_home = home("alice")
    store = ClientStore(str(alice_home / "chatroom"))
    store.remember_server(server_address("127.0.0.1", server.port), keys(5).fingerprint)  # another key
    alice = PtyClient(server.port, "alice", alice_home)
    try:
        assert alice.wait_exit() == 3
        rows = alice.rows()
        summary = [i for i, row in enumerate(rows) if row.startswith("chatclient: the server's key has changed")]
        assert summary, alice.text()
        box = rows[summary[0] + 1:summary[0] + 4]
        assert box[0] == box[2] == "@" * len(box[0]) and len(box[0]) > 60
        assert box[1].startswith("@  W") and box[1].endswith(".  @") and len(box[1]) == len(box[0])
        assert "WARNING: THE SERVER'S KEY HAS CHANGED" in box[1]
        [remembered] = [row for row in rows if row.startswith("  remembered: ")]
        [presented] = [row for row in rows if row.startswith("  presented: ")]
        assert remembered.index("SHA256:") == presented.index("SHA256:")
        assert keys(5).fingerprint in remembered
    finally:
        alice.close()


def test_ignore_hides_a_user_and_is_remembered_across_runs(server, connect, keys, home):
    bob = wire_login(connect, "bob", keys(1))
    carol = wire_login(connect, "carol", keys(2))
    alice_home = home("alice")
    seed_key(alice_home, server.port, "alice", keys(0))
    first = PipedClient(server.port, "alice", alice_home, "--register")
    try:
        first.write(PASSWORD + "\n")
        first.expect("^logged in as alice")
        first.write("IGNORE Bob\n")
        first.expect("^ignoring Bob: their BMs and PMs are hidden, in CH too")
        assert bob.bm("spam one")["ok"] and bob.pm("alice", "private spam")["ok"]
        assert carol.bm("marker one")["ok"]  # after bob's, on the same connection to alice
        first.expect(f"^{CLOCK} carol: marker one$")
        first.write("IGNORE\n")
        first.expect("^ignoring: bob ")
        first.close_input()
        assert first.wait() == 0
        assert "spam" not in first.output.decode()
    finally:
        first.close()
    store = ClientStore(str(alice_home / "chatroom"))
    with open(store.ignored_path, encoding="utf-8") as fh:
        assert f"{key_stem(store, server.port)}/alice bob\n" in fh.read()   # alice's, in the room (its key)

    second = PipedClient(server.port, "alice", alice_home)  # a new run: still ignoring bob
    try:
        second.write(PASSWORD + "\n")
        second.expect("^logged in as alice")
        assert bob.bm("spam two")["ok"] and carol.bm("marker two")["ok"]
        second.expect(f"^{CLOCK} carol: marker two$")
        second.write("CH\n")
        second.expect(r"^\(2 entries; 3 entries from ignored users not shown\)$")
        second.write("UNIGNORE bob\n")
        second.expect("^no longer ignoring bob$")
        assert bob.bm("welcome back")["ok"]
        second.expect(f"^{CLOCK} bob: welcome back$")
        second.close_input()
        assert second.wait() == 0
        output = second.output.decode()
        assert "spam" not in output and re.search(ENTRY + "BM carol -> all: marker one$", output, re.M)
    finally:
        second.close()


# --- moderation (docs/PROTOCOL.md section 10) --------------------------------------------------

def test_piped_admin_commands_and_notices(make_server, keys, home):
    server = make_server("--admin", "alice")
    seed_key(home("alice"), server.port, "alice", keys(0))
    bob = WireClient(server.port)
    bob.login("bob", PASSWORD, keys(1))
    carol = WireClient(server.port)
    carol.login("carol", PASSWORD, keys(2))
    carol.exit()
    try:
        script = (PASSWORD + "\nMUTE bob 10m shouting\nBANS\nKICK bob bye now\nBAN carol 2h spam\nUNBAN carol\n"
                  "BANS\nMUTE bob\n")
        result = run_script(server.port, "alice", home("alice"), script, "--register")
        out = result.stdout
        assert re.search(r"^done: bob is muted until \d{4}-\d\d-\d\d \d\d:\d\d$", out, re.M), out
        assert re.search(CLOCK + r" \* alice muted bob for 10 min: shouting$", out, re.M), out
        assert re.search(r"^bob: muted until \d{4}-\d\d-\d\d \d\d:\d\d by alice: shouting$", out, re.M), out
        assert "done: bob kicked" in out and "done: carol is banned until" in out and "done: carol unbanned" in out
        assert re.search(CLOCK + r" \* alice banned carol for 2 h: spam$", out, re.M), out
        assert out.count("bob: muted until") == 2 and "carol: banned" not in out
        assert result.returncode == 1   # the last line lacks MUTE's time
        assert "MUTE bob: usage: MUTE user time [reason]" in result.stderr
        frames = [f.body for f in bob.recv_until_closed(DEADLINE) if f.kind == "C"]
        assert frames[-1] == {"op": "BYE", "reason": "kicked", "message": "alice kicked bob: bye now", "until": None}
    finally:
        bob.close()


def test_non_admin_is_refused_and_the_script_says_why(server, connect, keys, home):
    wire_login(connect, "alice", keys(0))
    seed_key(home("bob"), server.port, "bob", keys(1))
    result = run_script(server.port, "bob", home("bob"), PASSWORD + "\nBAN alice 1h\nBANS\n", "--register")
    assert result.returncode == 1
    assert "BAN alice: only an admin named at the server can moderate" in result.stderr
    assert "BANS: only an admin" in result.stderr


def test_kicked_and_banned_are_said_plainly(make_server, keys, home):
    server = make_server("--admin", "zed")
    zed = WireClient(server.port)
    zed.login("zed", PASSWORD, keys(2))
    seed_key(home("alice"), server.port, "alice", keys(0))
    alice = PipedClient(server.port, "alice", home("alice"), "--register")
    try:
        alice.write(PASSWORD + "\n")
        alice.expect("^logged in as alice")
        assert zed.request({"op": "MOD", "action": "kick", "username": "alice", "reason": "test"})["ok"]
        assert alice.wait() == 1
        last = alice.output.decode().splitlines()[-1]
        assert last == "chatclient: zed kicked alice: test: you were removed from the room (you may log in again)"
        assert zed.request({"op": "MOD", "action": "ban", "username": "alice", "reason": "spam"})["ok"]
        result = run_script(server.port, "alice", home("alice"), PASSWORD + "\nBM hi\n")
        assert result.returncode == 1
        assert result.stderr == "chatclient: login refused: this account is banned for good by zed: spam\n"
    finally:
        alice.close()
        zed.close()


def test_acting_on_another_admin_asks_first_on_the_terminal(make_server, keys, home, ptys):
    server = make_server("--admin", "alice", "--admin", "zed")
    zed = WireClient(server.port)
    zed.login("zed", PASSWORD, keys(2))
    try:
        alice = ptys(server.port, "alice", home("alice"), keys(0))
        alice.type("HELP\r")
        alice.wait_for("For admins (named at the server; others are refused):")
        alice.type("BAN zed 1h oops\r")
        alice.wait_prompt("zed is an admin: ban anyway? [y/N] ")
        alice.type("\r")
        alice.wait_for("not done: zed was not banned")
        alice.type("ban zed 1h really\r")
        alice.wait_prompt("zed is an admin: ban anyway? [y/N] ")
        alice.type("y\r")
        alice.wait_line(r"done: zed is banned until \d{4}-\d\d-\d\d \d\d:\d\d")
        alice.wait_line(CLOCK + r" \* alice banned zed for 1 h: really")
        frames = [f.body for f in zed.recv_until_closed(DEADLINE) if f.kind == "C"]
        assert frames[-1]["reason"] == "banned" and frames[-1]["message"] == "alice banned zed for 1 h: really"
        alice.wait_prompt("alice> ")
    finally:
        zed.close()


# --- issue 13: PM2 checks, history checks, one identity per server key, moving the key pair ------------

class FakeRoomServer:
    """A TLS fake server (its certificate: keys) that logs anyone in, sends data frames after the KEY
    reply, and answers EX; for what the real server would refuse to relay (a replay, a stale PM...)."""

    def __init__(self, context: ssl.SSLContext, keys: pg3lib.KeyPair, after_key: list[dict]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(DEADLINE)
        self.port = self.listener.getsockname()[1]
        self.context = context
        self.keys = keys
        self.after_key = after_key
        self.target_key: pg3lib.KeyPair | None = None  # set: TARGET answers as for an offline user
        self.requests: list[dict] = []  # after KEY
        self.thread: threading.Thread | None = None

    def serve_once(self) -> None:
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
            conn.settimeout(DEADLINE)
            tls = self.context.wrap_socket(conn, server_side=True)
        except OSError:
            return
        decoder = framing.FrameDecoder()
        with tls:
            try:
                while True:
                    data = tls.recv(65536)
                    if not data:
                        return
                    for frame in decoder.feed(data):
                        tls.sendall(self._answer(frame.body))
                        if frame.op == "EX":
                            return
            except OSError:
                return

    def _answer(self, body: dict) -> bytes:
        op = body.get("op")
        if op == "LOGIN":
            return framing.command(dict(fake_login(self.keys, self.keys.fingerprint), new_user=False))
        if op == "PASSWORD":
            return framing.command({"op": "PASSWORD", "ok": True, "new_user": False, "username": "alice"})
        if op == "KEY":
            out = framing.command({"op": "KEY", "ok": True, "fingerprint": "x", "online": ["bob"]})
            return out + b"".join(framing.data(frame) for frame in self.after_key)
        self.requests.append(body)
        if op == "TARGET" and self.target_key is not None:
            if body.get("username") == "nobody":
                return framing.command({"op": "TARGET", "ok": False, "error": "no_such_user",
                                        "message": "there is no account 'nobody'"})
            return framing.command({"op": "TARGET", "ok": True, "username": "carol", "online": False,
                                    "public_key": self.target_key.public.key_form,
                                    "fingerprint": self.target_key.fingerprint})
        if op == "SEND":
            return framing.command({"op": "SEND", "ok": True, "recipients": 0})
        return framing.command({"op": op, "ok": True})

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join(DEADLINE)

    def close(self) -> None:
        self.join()
        self.listener.close()


def d_pm(sender: pg3lib.KeyPair, receiver: pg3lib.KeyPair, text: str, *, signer: pg3lib.KeyPair | None = None,
         sent: str | None = None, pm_id: str | None = None) -> dict:
    """A D PM from bob to alice as the server relays it (section 5)."""
    ciphertext = receiver.public.seal(text.encode()).decode()
    self_copy = sender.public.seal(text.encode()).decode()
    send = wire.pm2_send(signer or sender, "bob", "alice", ciphertext, self_copy, pm_id=pm_id, sent=sent)
    return {"op": "PM", "from": "bob", "to": "alice", "id": send["id"], "sent": send["sent"],
            "ciphertext": ciphertext, "self_copy_sha256": pg3lib.sealed_digest(self_copy),
            "signature": send["signature"], "sender_key": sender.public.key_form,
            "ts": protocol.timestamp(time.time())}


def test_a_replay_a_stale_pm_and_a_bad_signature_are_warnings_never_the_words(keys, home, tmp_path):
    good = d_pm(keys(1), keys(0), "the real one")
    frames = [good, dict(good),  # the same id again: a replay
              d_pm(keys(1), keys(0), "from an hour ago", sent=protocol.timestamp(time.time() - 3600)),
              d_pm(keys(1), keys(0), "forged words", signer=keys(2)),
              d_pm(keys(1), keys(0), "the next one")]
    fake = FakeRoomServer(tls_context_for(keys(3), tmp_path / "cert"), keys(3), frames)
    alice_home = home("alice")
    seed_key(alice_home, fake.port, "alice", keys(0))
    try:
        fake.serve_once()
        first = run_script(fake.port, "alice", alice_home, f"{PASSWORD}\nEX\n")
        fake.join()
        fake.after_key = [dict(good)]  # the next run: the id is remembered across runs
        fake.serve_once()
        second = run_script(fake.port, "alice", alice_home, f"{PASSWORD}\nEX\n")
    finally:
        fake.close()
    assert first.returncode == 0, first.stderr
    shown = [line for line in first.stdout.splitlines() if "bob -> you" in line]
    assert [line.split("(private): ")[1] for line in shown] == ["the real one", "the next one"]
    warnings = [line for line in first.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 3
    assert "delivered AGAIN" in warnings[0] and "more than 10 minutes" in warnings[1]
    assert "failed its signature check" in warnings[2]
    for words in ("from an hour ago", "forged words"):
        assert words not in first.stdout + first.stderr
    assert second.returncode == 0, second.stderr
    assert "the real one" not in second.stdout and "delivered AGAIN" in second.stderr


def append_history_line(data_dir: str, username: str, entry: dict) -> None:
    """A PM line written straight into <Username>.chat (README, data directory), as a server could forge it."""
    path = os.path.join(data_dir, f"{username}.chat")
    with open(path, encoding="utf-8") as fh:
        lines = [json.loads(line) for line in fh if line.strip()]
    at = max(line.get("at", 0) for line in lines)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"kind": "pm", "at": at, "entry": entry}) + "\n")


def test_a_forged_history_line_is_marked_unverified_in_ch(server, connect, keys, home):
    bob = wire_login(connect, "bob", keys(1))
    alice_home = home("alice")
    seed_key(alice_home, server.port, "alice", keys(0))
    alice = PipedClient(server.port, "alice", alice_home, "--register")
    try:
        alice.write(f"{PASSWORD}\n")
        alice.expect("logged in as alice")
        bob.wait_data("PRESENCE", username="alice", online=True)
        assert bob.pm("alice", "the genuine one")["ok"]
        alice.expect(r"bob -> you \(private\): the genuine one")  # verified: bob's key is pinned now
        [real] = [e for e in bob.history() if e.get("type") == "PM"]
        forged_text = keys(0).public.seal(b"send me your password").decode()
        forged = dict(real, ciphertext=forged_text, ts=protocol.timestamp(time.time()))  # bob's signature kept
        append_history_line(server.data_dir, "alice", forged)
        v1 = {"ts": protocol.timestamp(time.time()), "type": "PM", "from": "bob", "to": "alice",
              "ciphertext": keys(0).public.seal(b"an old one").decode()}
        append_history_line(server.data_dir, "alice", v1)
        alice.write("CH\n")
        alice.expect(r"\(\d+ entries\)")
        alice.close_input()
        assert alice.wait() == 0
    finally:
        alice.close()
    out = alice.output.decode()
    [genuine] = [line for line in out.splitlines() if "PM bob -> alice: the genuine one" in line]
    assert "UNVERIFIED" not in genuine
    [bad] = [line for line in out.splitlines() if "send me your password" in line]
    assert bad.startswith("[UNVERIFIED: the text is not the one signed]")
    [old] = [line for line in out.splitlines() if "an old one" in line]
    assert old.startswith("[UNVERIFIED: version-1 PM")


def test_localhost_and_127_0_0_1_are_one_identity(server, home):
    alice_home = home("alice")
    first = run_script(server.port, "alice", alice_home, f"{PASSWORD}\nKEYS\nEX\n", "--register")
    assert first.returncode == 0, first.stderr
    assert "generating your key..." in first.stdout
    [mine] = re.findall(r"your key \(alice at [^)]*\): (SHA256:\S+)", first.stdout)
    second = subprocess.run([sys.executable, CLIENT, "localhost", str(server.port), "alice"],
                            input=f"{PASSWORD}\nKEYS\nEX\n", capture_output=True, text=True, timeout=DEADLINE,
                            env=client_env(alice_home), cwd=ROOT)
    assert second.returncode == 0, second.stderr
    assert "generating" not in second.stdout and "NEW" not in second.stderr
    assert f"your key (alice at localhost:{server.port}): {mine}" in second.stdout
    assert len(ClientStore(str(alice_home / "chatroom")).own_keys()) == 1


def pm_to_alice_live(port: int, alice_home, sender, text: str, *extra: str) -> None:
    """alice logs in through a piped client, sender's PM reaches her live, and she leaves."""
    alice = PipedClient(port, "alice", alice_home, *extra)
    try:
        alice.write(PASSWORD + "\n")
        alice.expect("^logged in as alice")
        sender.wait_data("PRESENCE", username="alice", online=True)
        assert sender.pm("alice", text)["ok"]
        alice.expect(text)
        alice.close_input()
        assert alice.wait() == 0
    finally:
        alice.close()


def test_contacts_pinned_at_one_address_are_the_rooms_at_another(server, connect, keys, home):
    """A contact's key is pinned for the room (its server key), not for the address it was reached
    at: another node of the room, or localhost for 127.0.0.1, checks PMs against the same pin."""
    bob = wire_login(connect, "bob", keys(1))
    alice_home = home("alice")
    seed_key(alice_home, server.port, "alice", keys(0))
    pm_to_alice_live(server.port, alice_home, bob, "pinned at one address", "--register")
    second = subprocess.run([sys.executable, CLIENT, "localhost", str(server.port), "alice"],
                            input=f"{PASSWORD}\nCH\nKEYS\nEX\n", capture_output=True, text=True, timeout=DEADLINE,
                            env=client_env(alice_home), cwd=ROOT)
    assert second.returncode == 0, second.stderr
    [line] = [line for line in second.stdout.splitlines() if "pinned at one address" in line]
    assert "UNVERIFIED" not in line and "PM bob -> alice" in line
    assert f"bob: {keys(1).fingerprint}" in second.stdout.splitlines()


def test_two_accounts_on_one_machine_keep_their_own_contacts(server, connect, keys, home):
    """bob's PM pins his key for alice; carol, using the same configuration directory, has not
    met bob: no contact of hers, and his first PM to her is a first meeting."""
    bob = wire_login(connect, "bob", keys(1))
    shared = home("shared")
    seed_key(shared, server.port, "alice", keys(0))
    seed_key(shared, server.port, "carol", keys(2))
    pm_to_alice_live(server.port, shared, bob, "for alice", "--register")
    carol = PipedClient(server.port, "carol", shared, "--register")
    try:
        carol.write(PASSWORD + "\nKEYS\n")
        carol.expect("^logged in as carol")
        carol.expect("^server 127.0.0.1:")
        bob.wait_data("PRESENCE", username="carol", online=True)
        assert bob.pm("carol", "for carol")["ok"]
        carol.expect("for carol")
        carol.close_input()
        assert carol.wait() == 0
    finally:
        carol.close()
    assert f"bob: {keys(1).fingerprint}" not in carol.output.decode()       # KEYS: not her contact before
    assert "first private message from bob" in carol.output.decode()
    alice = run_script(server.port, "alice", shared, f"{PASSWORD}\nKEYS\nEX\n")
    assert f"bob: {keys(1).fingerprint}" in alice.stdout.splitlines() and "carol:" not in alice.stdout


def test_key_files_under_the_old_address_name_are_adopted(server, keys, home):
    alice_home = home("alice")
    seed_key(alice_home, server.port, "alice", keys(0))  # the older layout: keys/127.0.0.1_<port>_alice.*
    store = ClientStore(str(alice_home / "chatroom"))
    old = store.key_files(f"127.0.0.1:{server.port}", "alice")
    result = run_script(server.port, "alice", alice_home, f"{PASSWORD}\nKEYS\nEX\n", "--register")
    assert result.returncode == 0, result.stderr
    assert "generating" not in result.stdout and keys(0).fingerprint in result.stdout
    assert not any(os.path.exists(path) for path in old)
    assert all(os.path.exists(path) for path in store.key_files(key_stem(store, server.port), "alice"))


def test_export_then_import_into_a_fresh_config_dir_reads_old_pms(server, connect, keys, home, tmp_path):
    bob = wire_login(connect, "bob", keys(1))
    first_home = home("first")
    seed_key(first_home, server.port, "alice", keys(0))
    result = run_script(server.port, "alice", first_home, f"{PASSWORD}\nEX\n", "--register")
    assert result.returncode == 0, result.stderr
    pm_to_alice_live(server.port, first_home, bob, "read me on the new machine")
    export = str(tmp_path / "alice-key.json")
    env = dict(client_env(first_home), CHATCLIENT_KEY_PASSPHRASE="move it carefully")
    exported = subprocess.run(client_command(server.port, "alice", "--export-key", export), input=f"{PASSWORD}\n",
                              capture_output=True, text=True, timeout=DEADLINE, env=env, cwd=ROOT)
    assert exported.returncode == 0, exported.stderr
    assert stat.S_IMODE(os.stat(export).st_mode) == 0o600
    with open(export, encoding="utf-8") as fh:
        assert "PRIVATE KEY" in fh.read()  # encrypted PKCS#8 inside
    wrong = subprocess.run(client_command(server.port, "alice", "--import-key", export), input=f"{PASSWORD}\nEX\n",
                           capture_output=True, text=True, timeout=DEADLINE,
                           env=dict(client_env(home("wrong")), CHATCLIENT_KEY_PASSPHRASE="guess"), cwd=ROOT)
    assert wrong.returncode == 1 and "passphrase does not open" in wrong.stderr

    fresh = home("fresh")
    imported = subprocess.run(client_command(server.port, "alice", "--import-key", export),
                              input=f"{PASSWORD}\nCH\nEX\n", capture_output=True, text=True, timeout=DEADLINE,
                              env=dict(client_env(fresh), CHATCLIENT_KEY_PASSPHRASE="move it carefully"), cwd=ROOT)
    assert imported.returncode == 0, imported.stderr
    assert "generating" not in imported.stdout and "NEW" not in imported.stderr
    assert f"imported your key pair {keys(0).fingerprint}" in imported.stdout
    assert re.search(r"\] PM bob -> alice: read me on the new machine", imported.stdout)
    later = run_script(server.port, "alice", fresh, f"{PASSWORD}\nKEYS\nEX\n")  # kept in the fresh config
    assert later.returncode == 0 and keys(0).fingerprint in later.stdout

    elsewhere = run_script(server.port, "alice", home("elsewhere"), f"{PASSWORD}\nCH\nEX\n")
    assert elsewhere.returncode == 0
    assert "a NEW one is made" in elsewhere.stderr and "--import-key" in elsewhere.stderr
    assert re.search(r"\] PM bob -> alice: \(unreadable: sealed for another key\)", elsewhere.stdout)


def test_pm_warnings_on_the_terminal(keys, home, tmp_path):
    """The same checks read off a real pty with pyte: warnings are marked lines, the words never shown."""
    good = d_pm(keys(1), keys(0), "hello from bob")
    frames = [good, dict(good), d_pm(keys(1), keys(0), "stale words", sent=protocol.timestamp(time.time() + 3600)),
              d_pm(keys(1), keys(0), "forged words", signer=keys(2))]
    fake = FakeRoomServer(tls_context_for(keys(3), tmp_path / "cert"), keys(3), frames)
    alice_home = home("alice")
    seed_key(alice_home, fake.port, "alice", keys(0))
    fake.serve_once()
    client = PtyClient(fake.port, "alice", alice_home)
    try:
        client.wait_prompt("password for alice: ")
        client.type(PASSWORD + "\r")
        client.wait_line(CLOCK + r" bob -> you \(private\): hello from bob")
        client.wait_line(r"! WARNING: a private message from bob was delivered AGAIN .*")
        client.wait_line(r"! WARNING: a private message from bob says it was sent at .*")
        client.wait_line(r"! WARNING: a private message claiming to be from bob failed its signature check.*")
        client.wait_prompt("alice> ")
        assert "stale words" not in client.text() and "forged words" not in client.text()
        client.type("EX\r")
        assert client.wait_exit() == 0
    finally:
        client.close()
        fake.close()


def test_pms_kept_while_away_come_after_the_recent_messages_not_scrolled_away(server, connect, keys, home):
    carol = wire_login(connect, "carol", keys(2))   # an account, offline when the PM is sent
    carol.exit()
    bob = wire_login(connect, "bob", keys(1))
    assert bob.request({"op": "PM"})["ok"]
    reply = bob.request({"op": "TARGET", "username": "carol", "offline": True})
    assert reply["ok"] and reply["online"] is False, reply
    assert bob.request(bob.pm_send("carol", pg3lib.PublicKey.from_key_form(reply["public_key"]), "kept"))["ok"]
    for n in range(3):
        bob.bm(f"room talk {n}")
    seed_key(home("carol"), server.port, "carol", keys(2))
    client = existing_user_pty(server.port, "carol", home("carol"))
    try:
        pm = CLOCK + r" bob -> you \(private\): kept  \(sent while you were away, .*\)"
        client.wait_line(pm)
        rows = client.rows()
        header, last_bm = rows.index("recent messages:"), max(
            i for i, row in enumerate(rows) if re.fullmatch(CLOCK + r" bob: room talk \d", row))
        kept = [i for i, row in enumerate(rows) if re.fullmatch(pm, row)]
        notice = [i for i, row in enumerate(rows) if row.startswith("* first private message from bob")]
        assert header < last_bm < rows.index("kept for you while you were away:") == notice[0] - 1 == kept[0] - 2, \
            "\n".join(rows)                     # the notice of a first PM goes with it
        bob.bm("live now")
        client.wait_line(CLOCK + " bob: live now")
        client.type("EX\r")
        assert client.wait_exit() == 0
    finally:
        client.close()


def test_a_long_recent_message_is_shortened_not_a_screenful(server, connect, keys, home, ptys):
    bob = wire_login(connect, "bob", keys(1))
    bob.bm("w" * protocol.MAX_TEXT_CHARS)    # 52 rows whole, before carol comes
    carol = ptys(server.port, "carol", home("carol"), keys(2))
    carol.wait_for("recent messages:")
    carol.wait_until(lambda: any(row.endswith("w ...") for row in carol.rows()), "the shortened recent BM")
    rows = carol.rows()
    assert any(row.startswith("logged in as carol") for row in rows)       # the greeting is still in view
    assert sum(1 for row in rows if "wwww" in row) <= (ROWS - 2) // 4
    bob.bm("v" * 400)                        # live: shown whole
    carol.wait_until(lambda: "bob: " + "v" * 400 + "carol>" in "".join(row.strip() for row in carol.rows()),
                     "the live BM whole")


def test_offline_pms_with_a_server_that_stores_them(keys, home, tmp_path):
    """Against a fake server that stores PMs (section 4.5, 5): a stored PM delivered at login is marked
    as sent while away; PM to someone offline asks for offline and says it was stored; no_such_user."""
    stored = d_pm(keys(1), keys(0), "while you were out", sent=protocol.timestamp(time.time() - 7200))
    stored["offline"] = True
    fake = FakeRoomServer(tls_context_for(keys(3), tmp_path / "cert"), keys(3), [stored])
    fake.target_key = keys(4)
    alice_home = home("alice")
    seed_key(alice_home, fake.port, "alice", keys(0))
    try:
        fake.serve_once()
        result = run_script(fake.port, "alice", alice_home,
                            f"{PASSWORD}\nPM carol see you monday\nPM nobody hi\nEX\n")
    finally:
        fake.close()
    assert re.search(CLOCK + r" bob -> you \(private\): while you were out  \(sent while you were away, ",
                     result.stdout)
    assert "WARNING" not in result.stderr
    assert re.search(CLOCK + r" you -> carol \(private\): see you monday  \(carol is offline: stored, delivered at "
                     r"their next login\)", result.stdout)
    targets = [body for body in fake.requests if body["op"] == "TARGET"]
    assert targets == [{"op": "TARGET", "username": "carol", "offline": True},
                       {"op": "TARGET", "username": "nobody", "offline": True}]
    assert "cannot send to nobody: there is no user nobody" in result.stderr
    assert result.returncode == 1  # the PM to nobody was a failed line
