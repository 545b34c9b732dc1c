"""Scenario ``abuse``: what ordinary users see while one account holder abuses the server (issue 14).

The server runs with its production limits (``--limits production``, the
default: none of the load runs' limits-off flags; ``--server-arg`` sets any
one of them, ``--limits off`` shows the same attacks without them) and scrypt
at ``passwords.DEFAULT_SCRYPT_N`` unless ``--scrypt-n`` says otherwise. A
setup run of the server first (limits off, same data directory, same scrypt
cost) registers every account and gives one user a long history; then the
server is started again with its limits and three phases run, each printing
what an ordinary user saw:

1. **login storm of abandoned checks**: ``--storm`` connections at once (in
   waves, a new wave once the last one has hung up, for ``--storm-seconds``),
   spread over ``--storm-addresses`` loopback addresses (127.0.0.3, ...),
   each sends LOGIN and the correct sealed PASSWORD of the attacker's own
   account and hangs up at once (shuts its write side: the server reads EOF
   right after the PASSWORD and drops the connection, as on a close; what was
   already on its way is still read: ``rate_limited`` when the server
   refused the check at once, nothing when the check was taken and then
   abandoned). Meanwhile a victim logs in again and again from 127.0.0.2:
   its login times before and during the storm.
2. **BM flood**: one account floods BMs from ``--flood-conns`` connections
   (4,096-character texts, 4,096 control characters that are over the
   stored-size limit once JSON-escaped, or both in turn), ``--flood-window``
   BMs in flight on each: the SEND answers (accepted, ``rate_limited``,
   ``bad_request``), the data directory's growth, and a bystander's BM round
   trip before and during.
3. **CH of a long history**: the user given ``--history`` BMs at setup asks
   CH with ``limit`` ``--ch-limit`` (``--ch-repeat`` times), then the whole
   history, while the bystanders' BM round trips are sampled: the CH times
   and the bystanders' worst stall.

Bystanders (``--bystanders`` accounts from 127.0.0.2, one BM at a time, in
turn, every ``--interval`` s, each to an observer): round trip = BM+SEND sent
-> both the SEND reply and the observer's D BM, counted by send time. Each
attack runs in a forked process, as another person's would: its sealing and
parsing do not stall the loop that measures. Clients here are plain blocking
sockets: the figures are the latency others see, not throughput. Everything
it starts (children, server) is stopped at the end, on Ctrl-C and SIGTERM too.
"""

from __future__ import annotations

import argparse
import base64
import errno
import json
import os
import random
import select
import selectors
import signal
import socket
import string
import time
from collections import Counter, deque

import framing
import pg3lib
from loadgen_driver import BM_MARK, Bench
from loadgen_errors import BenchError
from loadgen_options import nonnegative, positive
from loadgen_procs import StartedRoom, _die_with_parent
from loadgen_report import latency_text, value_text
from loadgen_stats import lat_summary
from protocol import MAX_TEXT_CHARS, Op

HELP = "what others see under abuse: abandoned-login storm, BM flood, CH of a long history (limits on)"
VICTIM_ADDRESS = "127.0.0.2"     # the victim and the bystanders: not the attacker's addresses
ATTACKER_ADDRESS = "127.0.0.1"   # the flood and the long history's reader
HEADER = framing.HEADER_SIZE
KIND_C, KIND_D = ord(framing.KIND_COMMAND), ord(framing.KIND_DATA)
LONG_TEXT = "x" * MAX_TEXT_CHARS            # accepted: 4,096 characters, 4 KB stored
CONTROL_TEXT = "\x01" * MAX_TEXT_CHARS      # refused: 24.6 KB once JSON-escaped (stored-size limit)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limits", choices=("production", "off"), default="production",
                   help="the server's own limits (default), or the load runs' limits-off flags; --server-arg "
                        "sets any one limit on top (e.g. --server-arg=--bm-rate=20)")
    g = p.add_argument_group("1: login storm")
    g.add_argument("--storm", type=positive(int), default=160, metavar="N",
                   help="connections at once (LOGIN, right sealed PASSWORD, hang up) (default: %(default)s)")
    g.add_argument("--storm-seconds", type=nonnegative(float), default=3.0, metavar="SECONDS",
                   help="keep sending waves of them this long (0: one wave) (default: %(default)s)")
    g.add_argument("--storm-addresses", type=positive(int), default=1, metavar="K",
                   help="loopback addresses they come from, 127.0.0.3 on (default: %(default)s, as in "
                        "tests/test_abuse.py; 4 keeps 160 under the server's 50 per address)")
    g.add_argument("--victim-logins", type=positive(int), default=5, metavar="N",
                   help="the victim's logins before the storm (default: %(default)s)")
    g = p.add_argument_group("2: BM flood")
    g.add_argument("--flood-conns", type=positive(int), default=20, metavar="N",
                   help="the flooding account's connections, in turn: each logs in while the last floods "
                        "(a login replaces the account's last connection) (default: %(default)s)")
    g.add_argument("--flood-seconds", type=positive(float), default=3.0, metavar="SECONDS",
                   help="how long it floods (default: %(default)s)")
    g.add_argument("--flood-window", type=positive(int), default=8, metavar="N",
                   help="BMs in flight on each of its connections (default: %(default)s)")
    g.add_argument("--flood-text", choices=("long", "control", "mixed"), default="mixed",
                   help="4,096 letters, 4,096 control characters (over the stored-size limit), or every "
                        "fourth one control characters (default: %(default)s)")
    g = p.add_argument_group("3: CH of a long history")
    g.add_argument("--history", type=positive(int), default=50000, metavar="BMS",
                   help="BMs in the reader's history, made at setup (default: %(default)s)")
    g.add_argument("--history-chars", type=positive(int), default=1000, metavar="CHARS",
                   help="their text length (default: %(default)s)")
    g.add_argument("--ch-limit", type=positive(int), default=50, metavar="N",
                   help="the limit of the short CH (default: %(default)s)")
    g.add_argument("--ch-repeat", type=positive(int), default=3, metavar="N",
                   help="short CHs, then as many whole ones (default: %(default)s)")
    g = p.add_argument_group("bystanders")
    g.add_argument("--bystanders", type=positive(int), default=4, metavar="N",
                   help="accounts taking turns at one BM round trip (default: %(default)s)")
    g.add_argument("--interval", type=positive(float), default=0.1, metavar="SECONDS",
                   help="between the bystanders' BMs (default: %(default)s: 2.5/s each, under the server's "
                        "5 BMs/s per account and 10 requests/s per connection)")
    g.add_argument("--baseline", type=positive(float), default=2.0, metavar="SECONDS",
                   help="sampling before each attack (default: %(default)s)")


def users_needed(a: argparse.Namespace) -> int:
    return a.storm + a.flood_conns + a.bystanders + 16


def _names(a: argparse.Namespace) -> dict:
    tag = a.prefix
    return {"storm": tag + "storm", "victim": tag + "victim", "observer": tag + "obs", "flood": tag + "flood",
            "reader": tag + "reader", "writer": tag + "writer",
            "bystanders": [f"{tag}by{i}" for i in range(a.bystanders)]}


def password_of(name: str) -> str:
    return f"pw-{name}-bench"


# --- a blocking client --------------------------------------------------------------------

class Peer:
    """One connection from a chosen loopback address: blocking sends, reads with a timeout,
    frames split by framing's header; C bodies decoded, D bodies handed to ``on_data`` as bytes."""

    def __init__(self, port: int, source: str, timeout: float, name: str = "") -> None:
        self.name = name
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock.bind((source, 0))
            self.sock.settimeout(timeout)
            self.sock.connect(("127.0.0.1", port))
        except OSError as exc:
            self.sock.close()
            raise BenchError(f"{name or 'a client'}: cannot connect from {source}: {exc}") from None
        self.buf = b""
        self.replies: deque = deque()
        self.on_data = None
        self.rx_bytes = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, *bodies: dict) -> None:
        self.sock.settimeout(self.timeout)
        self.sock.sendall(b"".join(framing.command(b) for b in bodies))

    def read(self, timeout: float) -> bool:
        """Read once (at most ``timeout`` s; 0: only what is there); False if nothing came."""
        self.sock.settimeout(max(0.0, timeout))
        try:
            data = self.sock.recv(262144)
        except (socket.timeout, BlockingIOError):
            return False
        except OSError as exc:
            raise BenchError(f"{self.name}: {exc}") from None
        if not data:
            raise BenchError(f"{self.name}: the server closed the connection")
        self.rx_bytes += len(data)
        buf = self.buf + data if self.buf else data
        pos, end = 0, len(buf)
        while end - pos >= HEADER:
            stop = pos + HEADER + int.from_bytes(buf[pos + 1:pos + HEADER], "big")
            if stop > end:
                break
            body = buf[pos + HEADER:stop]
            if buf[pos] == KIND_C:
                self.replies.append(json.loads(body))
            elif self.on_data is not None:
                self.on_data(body)
            pos = stop
        self.buf = buf[pos:]
        return True

    def reply(self, timeout: float | None = None) -> dict:
        """The next C frame (a BYE ends the run)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not self.replies:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{self.name}: no reply within {self.timeout:.0f} s")
            self.read(left)
        msg = self.replies.popleft()
        if msg.get("op") == Op.BYE:
            raise BenchError(f"{self.name}: the server said BYE {msg.get('reason')}")
        return msg

    def request(self, body: dict) -> dict:
        self.send(body)
        return self.reply()

    def login(self, name: str, keys: pg3lib.KeyPair) -> float:
        """LOGIN, PASSWORD, KEY; the seconds they took (every step must succeed)."""
        t0 = time.perf_counter()
        self.name = name
        for step in ("LOGIN", "PASSWORD", "KEY"):
            if step == "LOGIN":
                msg = self.request({"op": Op.LOGIN, "username": name})
                if msg.get("ok"):
                    key = pg3lib.PublicKey.from_key_form(msg["server_key"])
                    sealed = key.seal(base64.b64decode(msg["nonce"]) + password_of(name).encode()).decode("ascii")
            elif step == "PASSWORD":
                msg = self.request({"op": Op.PASSWORD, "ciphertext": sealed})
            else:
                msg = self.request({"op": Op.KEY, "public_key": keys.public.key_form})
            if not msg.get("ok"):
                raise BenchError(f"{name}: {step} refused: {json.dumps(msg)[:200]}")
        return time.perf_counter() - t0

    def ch(self, limit: int | None) -> tuple:
        """CH (with ``limit`` if given) to its last page: (entries, seconds)."""
        t0 = time.perf_counter()
        self.send({"op": Op.CH, "limit": limit} if limit else {"op": Op.CH})
        entries = 0
        while True:
            msg = self.reply()
            if msg.get("op") != Op.CH or not msg.get("ok"):
                raise BenchError(f"{self.name}: CH answered {json.dumps(msg)[:200]}")
            entries += len(msg["entries"])
            if not msg.get("more"):
                return entries, time.perf_counter() - t0

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def drain(peers: list, until: float) -> None:
    """Read whatever reaches these peers until the monotonic time ``until``."""
    while True:
        left = until - time.monotonic()
        ready, _, _ = select.select(peers, [], [], max(0.0, left))
        for p in ready:
            p.read(0)
        if left <= 0:
            return


# --- the attacks, each in a forked process -----------------------------------------------

class Child:
    """``fn(*args) -> dict`` in a forked process (another person's client: its CPU is not the
    measuring loop's); the dict comes back as JSON on a pipe. The child dies with the load
    generator (PR_SET_PDEATHSIG) and is killed by ``stop``."""

    def __init__(self, fn, *args) -> None:
        read_fd, write_fd = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:   # the child: never returns
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            _die_with_parent()
            os.close(read_fd)
            try:
                out = {"result": fn(*args)}
            except BaseException as exc:   # noqa: B036 - everything goes back to the parent
                out = {"error": f"{type(exc).__name__}: {exc}"}
            try:
                os.write(write_fd, json.dumps(out).encode() + b"\n")
            finally:
                os._exit(0)
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        self.fd = read_fd
        self.data = b""
        self.eof = False

    def done(self) -> bool:
        while not self.eof:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            self.data += chunk
            self.eof = not chunk
        return self.eof or self.data.endswith(b"\n")

    def result(self) -> dict:
        self.stop()
        try:
            out = json.loads(self.data)
        except ValueError:
            raise BenchError("an attack process ended without a report") from None
        if "error" in out:
            raise BenchError(f"attack process: {out['error']}")
        return out["result"]

    def stop(self) -> None:
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(self.pid, 0)
            os.close(self.fd)
            self.pid = 0


# Storm connection states.
CONNECTING, LOGIN_SENT, HUNG_UP = range(3)


def storm_attack(port: int, name: str, count: int, seconds: float, addresses: list, stall: float) -> dict:
    """Waves of ``count`` connections: LOGIN, the right sealed PASSWORD, write side shut at once;
    what each was answered, counted."""
    password = password_of(name).encode()
    answers: Counter = Counter()
    keys: dict = {}
    sel = selectors.DefaultSelector()
    t_start = time.monotonic()
    end = t_start + seconds
    waves = connections = 0
    while True:
        waves += 1
        live = {}
        for i in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.bind((addresses[i % len(addresses)], 0))
            err = sock.connect_ex(("127.0.0.1", port))
            if err not in (0, errno.EINPROGRESS):
                answers["connect failed: " + os.strerror(err)] += 1
                sock.close()
                continue
            connections += 1
            live[sock] = [CONNECTING, b"", False]   # state, buffer, PASSWORD answered
            sel.register(sock, selectors.EVENT_WRITE)
        wave_end = time.monotonic() + stall
        while live and time.monotonic() < wave_end:
            for key, _mask in sel.select(0.05):
                sock = key.fileobj
                st = live[sock]
                if st[0] == CONNECTING:
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        answers["connect failed: " + os.strerror(err)] += 1
                        _end_storm_conn(sel, live, sock)
                        continue
                    sock.send(framing.command({"op": Op.LOGIN, "username": name}))
                    st[0] = LOGIN_SENT
                    sel.modify(sock, selectors.EVENT_READ)
                    continue
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    if st[2]:
                        pass   # answered already (the PASSWORD reply, or an ERROR to LOGIN)
                    elif st[0] == HUNG_UP:
                        answers["PASSWORD: closed without an answer"] += 1
                    elif st[0] == LOGIN_SENT:
                        answers["LOGIN: closed without an answer"] += 1
                    _end_storm_conn(sel, live, sock)
                    continue
                st[1] += data
                _storm_frames(sock, st, name, password, keys, answers)
        for sock in list(live):
            answers["no end within --stall"] += 1
            _end_storm_conn(sel, live, sock)
        if time.monotonic() >= end:
            break
    t_end = time.monotonic()
    return {"t_start": t_start, "t_end": t_end, "waves": waves, "connections": connections,
            "answers": dict(answers)}


def _storm_frames(sock: socket.socket, st: list, name: str, password: bytes, keys: dict, answers: Counter) -> None:
    buf = st[1]
    while len(buf) >= HEADER:
        stop = HEADER + int.from_bytes(buf[1:HEADER], "big")
        if len(buf) < stop:
            break
        msg = json.loads(buf[HEADER:stop])
        buf = buf[stop:]
        op = msg.get("op")
        if st[0] == LOGIN_SENT and op == Op.LOGIN and msg.get("ok"):
            key = keys.get(msg["server_key"])
            if key is None:
                key = keys[msg["server_key"]] = pg3lib.PublicKey.from_key_form(msg["server_key"])
            sealed = key.seal(base64.b64decode(msg["nonce"]) + password).decode("ascii")
            sock.setblocking(True)
            sock.sendall(framing.command({"op": Op.PASSWORD, "ciphertext": sealed}))
            sock.setblocking(False)
            sock.shutdown(socket.SHUT_WR)   # hang up at once: the server reads EOF next
            st[0] = HUNG_UP
            answers["LOGIN: ok, PASSWORD sent, hung up"] += 1
        elif st[0] == LOGIN_SENT:
            st[2] = True
            answers[f"LOGIN: {op} {msg.get('error') or msg.get('reason')}"] += 1
        elif op == Op.PASSWORD:
            st[2] = True
            answers[f"PASSWORD: {'ok' if msg.get('ok') else msg.get('error')}"] += 1
        elif op != Op.BYE:
            answers[f"after PASSWORD: {op}"] += 1
    st[1] = buf


def _end_storm_conn(sel: selectors.BaseSelector, live: dict, sock: socket.socket) -> None:
    sel.unregister(sock)
    sock.close()
    del live[sock]


def flood_attack(port: int, name: str, keys: pg3lib.KeyPair, conns: int, seconds: float, window: int, mode: str,
                 stall: float) -> dict:
    """One account floods BMs for ``seconds`` from ``conns`` connections in turn, ``window`` BMs in
    flight: each new connection logs in (which replaces the account's last one, whose unanswered
    BMs are dropped: a fresh connection brings a fresh per-connection request bucket, not a fresh
    per-account BM bucket), then floods its share of the time."""
    outcomes: Counter = Counter()
    sent: Counter = Counter()
    owed = 0
    seq = 0
    t_start = time.monotonic()
    end = t_start + seconds
    old: Peer | None = None
    logins = []
    try:
        for i in range(conns):
            p = Peer(port, ATTACKER_ADDRESS, stall, name)
            logins.append(round(1000 * p.login(name, keys), 1))   # the last connection gets BYE replaced
            if old is not None:
                old.close()
            old = p
            inflight: deque = deque()
            last = i == conns - 1
            slice_end = end if last else min(end, time.monotonic() + (end - time.monotonic()) / (conns - i))
            while True:
                now = time.monotonic()
                if now < slice_end:
                    while len(inflight) < window:
                        control = mode == "control" or (mode == "mixed" and seq % 4 == 3)
                        seq += 1
                        bodies = [{"op": Op.BM}, {"op": Op.SEND, "text": CONTROL_TEXT if control else LONG_TEXT}]
                        if control:
                            bodies.append({"op": Op.CANCEL})   # a refused SEND keeps the state: back to READY
                        p.send(*bodies)
                        kind = "control" if control else "long"
                        sent[kind] += 1
                        inflight.append(kind)
                elif not last or not inflight or now > slice_end + 1.0:
                    break   # the next connection takes over; the last one's answers get a second
                p.read(min(0.05, max(0.0, slice_end - now)) if now < slice_end else 0.05)
                while p.replies:
                    msg = p.replies.popleft()
                    op = msg.get("op")
                    if op == Op.SEND and inflight:
                        kind = inflight.popleft()
                        outcomes[f"{kind}: {'accepted' if msg.get('ok') else msg.get('error')}"] += 1
                    elif op == Op.BYE:
                        raise BenchError(f"the flood's connection got BYE {msg.get('reason')}")
                    elif not msg.get("ok") and op != Op.CANCEL:
                        outcomes[f"{op}: {msg.get('error')}"] += 1
            owed += len(inflight)
    finally:
        if old is not None:
            old.close()
    return {"t_start": t_start, "t_end": time.monotonic(), "sent": dict(sent), "answers": dict(outcomes),
            "unanswered": owed, "login_ms": logins}


def ch_reader(port: int, name: str, keys: pg3lib.KeyPair, limit: int, repeat: int, stall: float) -> dict:
    """The long history's owner: CH with ``limit`` ``repeat`` times, then the whole history as often."""
    p = Peer(port, ATTACKER_ADDRESS, stall, name)
    try:
        p.login(name, keys)
        t_start = time.monotonic()
        short = [p.ch(limit) for _ in range(repeat)]
        rx = p.rx_bytes
        full = [p.ch(None) for _ in range(repeat)]
        return {"t_start": t_start, "t_end": time.monotonic(), "short_entries": short[-1][0],
                "short_ms": [round(s * 1000, 2) for _, s in short], "full_entries": full[-1][0],
                "full_ms": [round(s * 1000, 1) for _, s in full], "full_bytes": (p.rx_bytes - rx) // repeat}
    finally:
        p.close()


# --- the bystanders -----------------------------------------------------------------------

class Bystanders:
    """Accounts taking turns at one BM round trip, each seen by an observer."""

    def __init__(self, senders: list, observer: Peer, a: argparse.Namespace, bench: Bench) -> None:
        self.senders = senders
        self.observer = observer
        self.peers = senders + [observer]
        self.a = a
        self.bench = bench
        self.seen: dict = {}
        self.samples: list = []   # (t0 monotonic, round trip ns)
        self.refused: Counter = Counter()
        self.seq = 0
        self.next_t = 0.0
        self.pad = " " + "b" * 40
        observer.on_data = self._seen

    def _seen(self, body: bytes) -> None:
        if body.startswith(BM_MARK) and b'"probe-' in body:
            seq = int(json.loads(body)["text"].split("-", 2)[1])
            self.seen[seq] = time.perf_counter_ns()

    def one(self) -> None:
        s = self.senders[self.seq % len(self.senders)]
        seq = self.seq
        self.seq += 1
        t_mono, t0 = time.monotonic(), time.perf_counter_ns()
        s.send({"op": Op.BM}, {"op": Op.SEND, "text": f"probe-{seq}-{self.pad}"})
        first = s.reply()
        second = s.reply()
        t_reply = time.perf_counter_ns()
        if not first.get("ok") or not second.get("ok"):
            bad = first if not first.get("ok") else second
            self.refused[f"{bad.get('op')}: {bad.get('error')}"] += 1
            return
        deadline = time.monotonic() + self.a.stall
        while seq not in self.seen:
            if time.monotonic() > deadline:
                raise BenchError(f"the observer did not get bystander BM {seq} within {self.a.stall:.0f} s")
            self.observer.read(deadline - time.monotonic())
        self.samples.append((t_mono, max(t_reply, self.seen.pop(seq)) - t0))

    def run(self, until) -> None:
        """Sample every --interval until ``until()``, reading everything meanwhile."""
        while not until():
            self.bench.check()
            now = time.monotonic()
            if now >= self.next_t:
                self.one()
                self.next_t = max(now, self.next_t) + self.a.interval
            drain(self.peers, min(self.next_t, time.monotonic() + 0.02))

    def between(self, t0: float, t1: float) -> list:
        return [rtt for t, rtt in self.samples if t0 <= t <= t1]


# --- setup: accounts and the long history, on a setup run of the server ---------------------

def prepare(room: StartedRoom, a: argparse.Namespace, res: dict) -> pg3lib.KeyPair:
    """A setup run of the server on the data directory (limits off, no send-queue limit, the run's
    scrypt cost): every account registered, the reader online while the writer sends --history BMs
    (the reader does not read: the server queues them). Then it is stopped; main starts it again."""
    a.prefix = a.prefix or "ab" + "".join(random.choice(string.ascii_lowercase) for _ in range(4))
    names = _names(a)
    s = room.servers[0]
    s.limits_off, s.extra = True, ["--send-queue", "0"]
    t0 = time.monotonic()
    s.start()
    keys = pg3lib.KeyPair.generate()   # meanwhile the server makes its own
    s.wait_ready()
    peers = []
    try:
        accounts = [names["storm"], names["victim"], names["observer"], names["flood"], *names["bystanders"]]
        for name in accounts:
            p = Peer(s.port, "127.0.0.1", a.stall)
            p.login(name, keys)
            p.close()
        reader, writer = Peer(s.port, "127.0.0.1", a.stall), Peer(s.port, "127.0.0.1", a.stall)
        peers += [reader, writer]
        reader.login(names["reader"], keys)
        writer.login(names["writer"], keys)
        t_build = time.monotonic()
        _write_history(writer, a.history, a.history_chars)
        build_s = time.monotonic() - t_build
    finally:
        for p in peers:
            p.close()
        s.terminate()
        code = s.reap(time.monotonic() + 15.0)
        s.limits_off, s.extra = a.limits == "off", []
    if code != 0:
        raise BenchError(f"the setup run of the server exited with status {code}:\n{s.log_tail()}")
    res["abuse"] = {"setup": {"accounts": len(accounts) + 2, "history_bms": a.history,
                              "history_chars": a.history_chars, "history_build_s": round(build_s, 2),
                              "seconds": round(time.monotonic() - t0, 2), "data_bytes": dir_bytes(s.data)}}
    return keys


def _write_history(writer: Peer, count: int, chars: int) -> None:
    """count BMs, pipelined (64 in flight), every one confirmed."""
    pad = "h" * max(1, chars - 8)
    sent = done = 0
    while done < count:
        batch = []
        while sent < count and sent - done < 64:
            batch += [{"op": Op.BM}, {"op": Op.SEND, "text": f"{sent:07d} {pad}"}]
            sent += 1
        if batch:
            writer.send(*batch)
        msg = writer.reply()
        if not msg.get("ok"):
            raise BenchError(f"history setup: {json.dumps(msg)[:200]}")
        done += msg.get("op") == Op.SEND


def dir_bytes(path: str) -> int:
    total = 0
    for entry in os.scandir(path):
        if entry.is_file(follow_symlinks=False):
            total += entry.stat().st_size
    return total


# --- the run ------------------------------------------------------------------------------

def run(bench: Bench, a: argparse.Namespace, res: dict) -> None:
    """The three phases on the server with its limits; res["abuse"] grows phase by phase."""
    out = res.setdefault("abuse", {})
    out.update({"limits": a.limits, "scrypt_n": a.scrypt_n_used, "server_args": a.server_arg})
    port = bench.targets[0][1][1]
    names = _names(a)
    peers: list = []
    children: list = []
    try:
        observer = Peer(port, VICTIM_ADDRESS, a.stall)
        peers.append(observer)
        observer.login(names["observer"], bench.keys)
        senders = []
        for name in names["bystanders"]:
            p = Peer(port, VICTIM_ADDRESS, a.stall)
            peers.append(p)
            p.login(name, bench.keys)
            senders.append(p)
        by = Bystanders(senders, observer, a, bench)
        bench.note(f"{len(peers)} bystanders online (from {VICTIM_ADDRESS}); limits: {a.limits}, "
                   f"scrypt N={a.scrypt_n_used}")
        out["storm"] = _phase_storm(bench, a, port, names, by, children)
        out["flood"] = _phase_flood(bench, a, port, names, by, children, bench.room.servers[0].data)
        out["history"] = _phase_history(bench, a, port, names, by, children)
        out["bystander_refused"] = dict(by.refused)
    finally:
        for c in children:
            c.stop()
        for p in peers:
            p.close()


def _wait_child(bench: Bench, by: Bystanders | None, child: Child, what: str, limit: float) -> None:
    end = time.monotonic() + limit
    bench.phase = what
    if by is not None:
        by.run(lambda: child.done() or time.monotonic() > end)
    while not child.done() and time.monotonic() < end:
        bench.check()
        time.sleep(0.02)
    if not child.done():
        raise BenchError(f"the {what} did not end within {limit:.0f} s")


def _victim_login(bench: Bench, a: argparse.Namespace, port: int, name: str, by: Bystanders) -> float:
    p = Peer(port, VICTIM_ADDRESS, a.stall, name)
    try:
        took = p.login(name, bench.keys)
    finally:
        p.close()
    drain(by.peers, time.monotonic())   # presences
    return took


def _phase_storm(bench: Bench, a: argparse.Namespace, port: int, names: dict, by: Bystanders,
                 children: list) -> dict:
    bench.phase = "login storm"
    before = [_victim_login(bench, a, port, names["victim"], by) for _ in range(a.victim_logins)]
    addresses = [f"127.0.0.{3 + i}" for i in range(a.storm_addresses)]
    bench.note(f"login storm: {a.storm} connections at once from {len(addresses)} address(es), LOGIN + right "
               f"PASSWORD + hang up, for {a.storm_seconds} s; the victim logs in meanwhile")
    child = Child(storm_attack, port, names["storm"], a.storm, a.storm_seconds, addresses, a.stall)
    children.append(child)
    during = []
    time.sleep(0.05)   # the first wave is on its way
    while not child.done() or not during:
        during.append(_victim_login(bench, a, port, names["victim"], by))
        bench.check()
    storm = child.result()
    after = _victim_login(bench, a, port, names["victim"], by)
    answers = storm["answers"]
    rate_limited = sum(v for k, v in answers.items() if "rate_limited" in k)
    seconds = storm["t_end"] - storm["t_start"]
    return {"connections": storm["connections"], "waves": storm["waves"], "seconds": round(seconds, 2),
            "connections_per_s": round(storm["connections"] / seconds, 1) if seconds else None,
            "addresses": addresses, "answers": answers, "rate_limited": rate_limited,
            "abandoned_checks": sum(v for k, v in answers.items() if "abandoned" in k),
            "server_busy": sum(v for k, v in answers.items() if "server_busy" in k),
            "victim_login_before": lat_summary([int(x * 1e9) for x in before]),
            "victim_login_during": lat_summary([int(x * 1e9) for x in during]),
            "victim_login_before_ms": round(1000 * sorted(before)[len(before) // 2], 1),
            "victim_login_during_ms": round(1000 * max(during), 1),
            "victim_login_after_ms": round(1000 * after, 1)}


def _phase_flood(bench: Bench, a: argparse.Namespace, port: int, names: dict, by: Bystanders, children: list,
                 data_dir: str) -> dict:
    bench.phase = "BM flood baseline"
    end = time.monotonic() + a.baseline
    by.run(lambda: time.monotonic() >= end)
    base = by.between(end - a.baseline, end)
    size0 = dir_bytes(data_dir)
    bench.note(f"BM flood: {a.flood_conns} connections of one account, {a.flood_text} texts, "
               f"{a.flood_window} in flight each, for {a.flood_seconds} s")
    child = Child(flood_attack, port, names["flood"], bench.keys, a.flood_conns, a.flood_seconds, a.flood_window,
                  a.flood_text, a.stall)
    children.append(child)
    _wait_child(bench, by, child, "BM flood", a.flood_seconds + 2 * a.stall + 10)
    flood = child.result()
    drain(by.peers, time.monotonic() + 0.2)
    grew = dir_bytes(data_dir) - size0
    during = by.between(flood["t_start"], flood["t_end"])
    answers = flood["answers"]
    accepted = sum(v for k, v in answers.items() if k.endswith("accepted"))
    seconds = flood["t_end"] - flood["t_start"]
    return {"connections": a.flood_conns, "text": a.flood_text, "seconds": round(seconds, 2),
            "sent": flood["sent"], "answers": answers, "accepted": accepted,
            "rate_limited": sum(v for k, v in answers.items() if k.endswith("rate_limited")),
            "bad_request": sum(v for k, v in answers.items() if k.endswith("bad_request")),
            "unanswered": flood["unanswered"], "flood_login_ms": flood["login_ms"],
            "accepted_per_s": round(accepted / seconds, 1) if seconds else None,
            "data_dir_bytes_added": grew,
            "bytes_per_accepted_bm": round(grew / accepted) if accepted else None,
            "bm_round_trip_before": lat_summary(base), "bm_round_trip_during": lat_summary(during)}


def _phase_history(bench: Bench, a: argparse.Namespace, port: int, names: dict, by: Bystanders,
                   children: list) -> dict:
    bench.phase = "CH baseline"
    end = time.monotonic() + a.baseline
    by.run(lambda: time.monotonic() >= end)
    base = by.between(end - a.baseline, end)
    bench.note(f"CH: {names['reader']} ({a.history} BMs of {a.history_chars} characters) asks CH limit="
               f"{a.ch_limit} x{a.ch_repeat}, then the whole history x{a.ch_repeat}")
    child = Child(ch_reader, port, names["reader"], bench.keys, a.ch_limit, a.ch_repeat, a.stall)
    children.append(child)
    _wait_child(bench, by, child, "CH of a long history", 3 * a.stall + 60)
    ch = child.result()
    during = by.between(ch["t_start"], ch["t_end"])
    # a sample sent just before the CH began but answered during it counts too
    overlapping = [rtt for t, rtt in by.samples if t < ch["t_start"] and t + rtt / 1e9 > ch["t_start"]]
    worst = max(during + overlapping, default=None)
    return {"history_bms": a.history, "history_chars": a.history_chars, "ch_limit": a.ch_limit,
            "short_entries": ch["short_entries"], "short_ch_ms": ch["short_ms"],
            "full_entries": ch["full_entries"], "full_ch_ms": ch["full_ms"], "full_ch_bytes": ch["full_bytes"],
            "bm_round_trip_before": lat_summary(base), "bm_round_trip_during": lat_summary(during),
            "worst_stall_ms": None if worst is None else round(worst / 1e6, 1),
            "ch_seconds": round(ch["t_end"] - ch["t_start"], 3)}


def table_rows(d: dict) -> list:
    rows = []
    s = d.get("setup")
    if s:
        rows.append(("setup", f"{s['accounts']} accounts, {s['history_bms']:,} BMs of {s['history_chars']} "
                              f"chars in {s['history_build_s']} s; data dir {s['data_bytes']:,} bytes"))
    rows.append(("limits", f"{d.get('limits')} (scrypt N={d.get('scrypt_n')})"
                           + (f", {' '.join(d['server_args'])}" if d.get("server_args") else "")))
    st = d.get("storm")
    if st:
        rows += [("1 storm", f"{st['connections']:,} connections in {st['waves']} waves over {st['seconds']} s "
                             f"({st['connections_per_s']}/s) from {len(st['addresses'])} address(es)"),
                 ("  answered", "; ".join(f"{k} {v:,}" for k, v in sorted(st["answers"].items()))),
                 ("  victim login before", latency_text(st["victim_login_before"])),
                 ("  victim login during", latency_text(st["victim_login_during"])),
                 ("  victim login after", value_text(st["victim_login_after_ms"], " ms"))]
    f = d.get("flood")
    if f:
        rows += [("2 BM flood", f"{f['connections']} connections, {f['text']} texts, {f['seconds']} s: sent "
                                + ", ".join(f"{k} {v:,}" for k, v in sorted(f["sent"].items()))),
                 ("  answered", f"accepted {f['accepted']:,} ({f['accepted_per_s']}/s), rate_limited "
                                f"{f['rate_limited']:,}, bad_request {f['bad_request']:,}; dropped with a "
                                f"replaced connection {f['unanswered']}"),
                 ("  data dir grew", f"{f['data_dir_bytes_added']:,} bytes "
                                     f"({value_text(f['bytes_per_accepted_bm'])} per accepted BM)"),
                 ("  bystander RTT before", latency_text(f["bm_round_trip_before"])),
                 ("  bystander RTT during", latency_text(f["bm_round_trip_during"]))]
    h = d.get("history")
    if h:
        rows += [("3 CH", f"{h['history_bms']:,} BMs of {h['history_chars']} chars: CH limit={h['ch_limit']} "
                          f"({h['short_entries']} entries) {', '.join(str(x) for x in h['short_ch_ms'])} ms; "
                          f"full CH {h['full_entries']:,} entries, {h['full_ch_bytes']:,} bytes, "
                          f"{', '.join(str(x) for x in h['full_ch_ms'])} ms"),
                 ("  bystander RTT before", latency_text(h["bm_round_trip_before"])),
                 ("  bystander RTT during", latency_text(h["bm_round_trip_during"])),
                 ("  worst stall", value_text(h["worst_stall_ms"], " ms"))]
    if d.get("bystander_refused"):
        rows.append(("bystanders refused", json.dumps(d["bystander_refused"])))
    return rows
