"""The client side of the load: one ``Conn`` per user, one ``Bench`` running them all.

Owns the single ``selectors`` loop with every socket non-blocking: connecting
(at most ``--login-window`` logins in flight), the login pipeline (LOGIN, the
password sealed to the server key with the connection's nonce, KEY), buffered
writes, and reads that either walk frames (replies checked by their first bytes,
bodies decoded only when needed) or, once a receiver is logged in, only count BM
bodies in the raw byte stream. Also the bounded waits (``--stall``,
``--deadline``), the progress notes, and the CPU marks around a measured phase.

With ``--tls`` (fanout) every connection is TLS (docs/PROTOCOL.md section 0):
the TCP connect and the handshake are made blocking, with a deadline, when the
connection is opened (simple, and outside every measured phase); from then on
the socket is a non-blocking ``ssl.SSLSocket`` in the same loop, whose reads
drain what the TLS object holds (``pending()``). Each certificate's key is
checked against LOGIN's ``server_key`` (the pin check of section 9).
"""

from __future__ import annotations

import argparse
import base64
import errno
import json
import os
import random
import resource
import selectors
import socket
import ssl
import string
import sys
import time
from collections import Counter, deque
from typing import Callable

import framing
import pg3lib
import protocol
import x509
from loadgen_errors import BenchError
from loadgen_procs import StartedRoom
from loadgen_stats import ServerStats, host_ticks, self_cpu_s
from protocol import Op

EV_R = selectors.EVENT_READ
EV_W = selectors.EVENT_WRITE
READ_SIZE = 65536
TLS_CONNECT_S = 10.0   # seconds a TLS connect and handshake may take
# What a non-blocking socket raises when it cannot go on now (SSLSocket adds its two).
WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
now_ns = time.perf_counter_ns


def tls_client_context() -> ssl.SSLContext:
    """TLS 1.2+ to a self-signed server: no CA check; the certificate's key is compared with LOGIN's instead."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def body_start(op: Op) -> bytes:
    """The first bytes of every body with this op as framing writes it (op first, no
    spaces): ``{"op":"BM",``."""
    return framing.encode_body({"op": op})[:-1] + b","


def ok_start(op: Op) -> bytes:
    """The first bytes of the successful reply to op, as protocol.ok builds it:
    ``{"op":"SEND","ok":true``. Replies are told apart by these, not decoded."""
    return protocol.ok(op)[framing.HEADER_SIZE:-1]


# The start of a BM body. A D BM frame is the only place it can occur unescaped
# in what a receiver gets (a C BM reply reaches only the connection that sent BM).
BM_MARK = body_start(Op.BM)
MARK_TAIL = len(BM_MARK) - 1
OP_MARK = b'{"op":"'     # how every body starts
PM_MARK = body_start(Op.PM)
PRESENCE_MARK = body_start(Op.PRESENCE)
BM_OK = ok_start(Op.BM)
KEY_OK = ok_start(Op.KEY)
PM_OK = ok_start(Op.PM)
SEND_OK = ok_start(Op.SEND)
TARGET_OK = ok_start(Op.TARGET)
BM_REQUEST = framing.command({"op": Op.BM})
PM_REQUEST = framing.command({"op": Op.PM})
# The frame header as framing lays it out: the kind byte, then the 4-byte body length.
HEADER_SIZE = framing.HEADER_SIZE
KIND_DATA = ord(framing.KIND_DATA)
KIND_COMMAND = ord(framing.KIND_COMMAND)

# Login states of a connection.
NEW, LOGIN_SENT, PASSWORD_SENT, KEY_SENT, READY, DEAD = range(6)


# --- connections ------------------------------------------------------------------------

class Conn:
    """One user: its socket, buffers, login state and what to do with its frames."""

    __slots__ = ("idx", "name", "password", "target", "sock", "rbuf", "wbuf", "wmask", "state", "counting",
                 "tail", "on_c", "on_bm", "on_d", "after", "username", "sent", "confirmed", "cur", "t_mark",
                 "expendable", "cert_key")

    def __init__(self, idx: int, name: str, password: str, target: tuple) -> None:
        self.idx = idx
        self.name = name
        self.password = password
        self.target = target          # (family, sockaddr, label)
        self.sock: socket.socket | None = None
        self.rbuf = b""
        self.wbuf = bytearray()
        self.wmask = False
        self.state = NEW
        self.counting = False         # only count BM bodies in the raw stream
        self.tail = b""               # last bytes of the previous read, for a mark cut in two
        self.on_c: Callable | None = None    # (conn, body bytes) for each C frame
        self.on_bm: Callable | None = None   # (conn, body bytes) for each D BM frame, if wanted
        self.on_d: Callable | None = None    # (conn, body bytes) for other D frames, if wanted
        self.after: tuple = (None, None, None, True)   # on_c, on_bm, on_d, counting once logged in
        self.username = name
        self.sent = 0
        self.confirmed = 0
        self.cur = None
        self.t_mark = 0
        self.expendable = False       # its server is killed on purpose: losing it is no failure
        self.cert_key = ""            # TLS: the fingerprint of the key the certificate holds


class Bench:
    """The selectors loop, the login pipeline and the counters every scenario shares."""

    def __init__(self, args: argparse.Namespace, targets: list, stats: ServerStats,
                 room: StartedRoom | None, keys: pg3lib.KeyPair, redis_stats: ServerStats | None = None) -> None:
        self.args = args
        self.targets = targets
        self.stats = stats
        self.room = room
        self.redis_stats = redis_stats or ServerStats([])
        self.keys = keys
        self.key_frame = framing.command({"op": Op.KEY, "public_key": keys.public.key_form})
        self.sel = selectors.DefaultSelector()
        self.deadline = time.monotonic() + args.deadline
        self.tag = args.prefix or "lg" + "".join(random.choice(string.ascii_lowercase) for _ in range(4))
        self.next_idx = 0
        self.open_conns = 0
        self.login_queue: deque = deque()
        self.login_window = args.login_window
        self.pending_login = 0
        self.logged_in = 0
        self.login_failed = 0
        self.login_ns: list = []
        self.failures: Counter = Counter()
        self.dropped = 0
        self.bm_delivered = 0
        self.rx_bytes = 0
        self.t_rx = 0
        self.key_cache: dict = {}
        self.tls = tls_client_context() if getattr(args, "tls", False) else None
        self.phase = "setup"
        self.last_report = time.monotonic()

    # --- users ------------------------------------------------------------------------
    def make_users(self, count: int) -> list:
        users = []
        for _ in range(count):
            i = self.next_idx
            self.next_idx += 1
            name = f"{self.tag}{i}"
            users.append(Conn(i, name, f"pw-{name}-bench", self.targets[i % len(self.targets)]))
        return users

    def public_key(self, key_form: str) -> pg3lib.PublicKey:
        key = self.key_cache.get(key_form)
        if key is None:
            key = self.key_cache[key_form] = pg3lib.PublicKey.from_key_form(key_form)
        return key

    # --- sockets ----------------------------------------------------------------------
    def open(self, c: Conn) -> None:
        family, sockaddr, label = c.target
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
                raise BenchError(f"out of file descriptors after {self.open_conns} connections "
                                 f"(open-file limit {soft}): cannot reach the users asked for") from None
            raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is not None:
            sock = self._tls_connect(c, sock)
            if sock is None:
                return
            err = 0
        else:
            sock.setblocking(False)
            err = sock.connect_ex(sockaddr)
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            c.state = DEAD
            self.login_failed += 1
            self.failures["connect: " + os.strerror(err)] += 1
            if err == errno.EADDRNOTAVAIL:
                raise BenchError(f"no local port left to connect to {label} after {self.open_conns} "
                                 "connections (ip_local_port_range)")
            return
        self.open_conns += 1
        c.sock = sock
        c.state = LOGIN_SENT
        c.on_c = self._login_reply
        c.t_mark = now_ns()
        c.wbuf += framing.command({"op": Op.LOGIN, "username": c.name})
        self.sel.register(sock, EV_R | EV_W, c)   # LOGIN goes out once the connect completes
        c.wmask = True
        self.pending_login += 1

    def _tls_connect(self, c: Conn, sock: socket.socket) -> socket.socket | None:
        """Connect and handshake (blocking, bounded); the TLS socket, non-blocking, or None if it failed."""
        assert self.tls is not None
        sock.settimeout(TLS_CONNECT_S)
        try:
            sock.connect(c.target[1])
            tls = self.tls.wrap_socket(sock)
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            c.cert_key = x509.certificate_key(der).fingerprint
        except (OSError, x509.CertificateError, pg3lib.InvalidKey) as exc:
            sock.close()
            c.state = DEAD
            self.login_failed += 1
            self.failures[f"TLS connect: {exc}"] += 1
            return None
        tls.setblocking(False)
        return tls

    def send(self, c: Conn, data: bytes) -> None:
        if c.state == DEAD:
            return
        if c.wbuf:
            c.wbuf += data
            return
        try:
            n = c.sock.send(data)
        except WOULD_BLOCK:
            n = 0
        except OSError as exc:
            self.lost(c, "send: " + (exc.strerror or str(exc)))
            return
        if n < len(data):
            c.wbuf += data[n:]
            if not c.wmask:
                self.sel.modify(c.sock, EV_R | EV_W, c)
                c.wmask = True

    def _flush(self, c: Conn) -> None:
        if c.wbuf:
            try:
                n = c.sock.send(c.wbuf)
            except WOULD_BLOCK:
                return
            except OSError as exc:
                self.lost(c, "send: " + (exc.strerror or str(exc)))
                return
            del c.wbuf[:n]
        if not c.wbuf and c.wmask:
            self.sel.modify(c.sock, EV_R, c)
            c.wmask = False

    def lost(self, c: Conn, why: str) -> None:
        """The connection is gone or unusable: close it and count why."""
        if c.state == DEAD:
            return
        if c.state in (LOGIN_SENT, PASSWORD_SENT, KEY_SENT):
            self.pending_login -= 1
            self.login_failed += 1
            self.failures["login: " + why] += 1
        elif not c.expendable:
            self.dropped += 1
            self.failures[f"dropped during {self.phase}: {why}"] += 1
        c.state = DEAD
        try:
            self.sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        c.sock.close()
        self.open_conns -= 1

    def close_all(self, conns) -> None:
        for c in conns:
            if c.state != DEAD and c.sock is not None:
                try:
                    self.sel.unregister(c.sock)
                except (KeyError, ValueError):
                    pass
                c.sock.close()
                c.state = DEAD
                self.open_conns -= 1

    # --- reading ----------------------------------------------------------------------
    def poll(self, timeout: float) -> int:
        events = self.sel.select(timeout)
        tls = self.tls is not None
        for key, mask in events:
            c = key.data
            if mask & EV_W:
                self._flush(c)
            if not mask & EV_R or c.state == DEAD:
                continue
            try:
                data = c.sock.recv(READ_SIZE)
                if tls and c.sock.pending():   # decrypted, held in the TLS object: select would not say
                    data += c.sock.recv(c.sock.pending())
            except WOULD_BLOCK:
                continue
            except OSError as exc:
                self.lost(c, "recv: " + (exc.strerror or str(exc)))
                continue
            if not data:
                self.lost(c, "closed by the server")
                continue
            self.rx_bytes += len(data)
            if c.counting:
                self._count(c, data)
            else:
                self.t_rx = now_ns()
                self._frames(c, data)
        return len(events)

    def _count(self, c: Conn, data: bytes) -> None:
        """Count the BM bodies in raw bytes of a receiver that no longer walks frames."""
        n = data.count(BM_MARK)
        if c.tail:
            n += (c.tail + data[:MARK_TAIL]).count(BM_MARK)   # a mark cut by the read boundary
            if len(data) < MARK_TAIL:
                data = c.tail + data
        c.tail = data[-MARK_TAIL:]
        self.bm_delivered += n

    def _frames(self, c: Conn, data: bytes) -> None:
        """Walk the complete frames in what arrived (after what the last read left): D BM
        frames are counted (and given to on_bm), other D frames to on_d, C frames to on_c.
        The header is framing's (kind byte, 4-byte big-endian length), read here rather than
        with framing.FrameDecoder, which would decode every body; bodies are passed as bytes."""
        buf = c.rbuf + data if c.rbuf else data
        end = len(buf)
        pos = 0
        header = HEADER_SIZE
        while end - pos >= header:
            start = pos + header
            stop = start + int.from_bytes(buf[pos + 1:start], "big")
            if stop > end:
                break
            kind = buf[pos]
            if kind == KIND_DATA:
                if buf.startswith(BM_MARK, start):
                    self.bm_delivered += 1
                    if c.on_bm is not None:
                        c.on_bm(c, buf[start:stop])
                elif c.on_d is not None:
                    c.on_d(c, buf[start:stop])
                elif not buf.startswith(OP_MARK, start):
                    self._odd_order(buf[start:stop])
            elif kind == KIND_COMMAND:
                c.on_c(c, buf[start:stop])
                if c.state == DEAD:
                    return
                if c.counting:     # logged in, from here on only counting
                    c.rbuf = b""
                    self._count(c, buf[stop:])
                    return
            else:
                self.lost(c, f"bad frame kind byte {buf[pos:pos + 1]!r} from the server")
                return
            pos = stop
        c.rbuf = buf[pos:] if pos else buf

    def _odd_order(self, body: bytes) -> None:
        try:
            op = json.loads(body).get("op")
        except ValueError:
            op = None
        if op == Op.BM:
            raise BenchError(f"the server sent a BM data frame whose body does not start with {BM_MARK.decode()}: "
                             "the receivers' byte-stream counting relies on that order; fix Bench._count")

    @staticmethod
    def decode(body: bytes) -> dict:
        try:
            msg = json.loads(body)
        except ValueError:
            raise BenchError(f"the server sent a body that is not JSON: {body[:80]!r}") from None
        return msg

    def unexpected(self, c: Conn, body: bytes, what: str) -> None:
        """A reply that should not happen in a load run: stop with the server's words."""
        msg = self.decode(body)
        if msg.get("op") == Op.BYE:
            self.lost(c, f"BYE {msg.get('reason')}")
            return
        raise BenchError(f"{c.name}: {what}: the server answered {json.dumps(msg)[:300]}")

    # --- logging in ---------------------------------------------------------------------
    def queue_logins(self, users: list) -> None:
        self.login_queue.extend(users)

    def _pump_logins(self) -> None:
        queue = self.login_queue
        while queue and self.pending_login < self.login_window:
            self.open(queue.popleft())

    def _login_reply(self, c: Conn, body: bytes) -> None:
        if c.state == KEY_SENT and body.startswith(KEY_OK):
            self._logged_in(c)
            return
        msg = self.decode(body)
        op = msg.get("op")
        if op in (Op.BYE, Op.ERROR) or not msg.get("ok"):
            self.lost(c, f"{op} {msg.get('error') or msg.get('reason')}")
            return
        if c.state == LOGIN_SENT and op == Op.LOGIN:
            key = self.public_key(msg["server_key"])
            if c.cert_key and c.cert_key != key.fingerprint:
                self.lost(c, "the TLS certificate's key is not LOGIN's server_key")
                return
            nonce = base64.b64decode(msg["nonce"])
            sealed = key.seal(nonce + c.password.encode("utf-8")).decode("ascii")
            c.state = PASSWORD_SENT
            self.send(c, framing.command({"op": Op.PASSWORD, "ciphertext": sealed}))
        elif c.state == PASSWORD_SENT and op == Op.PASSWORD:
            c.username = msg.get("username", c.name)
            c.state = KEY_SENT
            self.send(c, self.key_frame)
        else:
            self.lost(c, f"unexpected {op} reply while logging in")

    def _logged_in(self, c: Conn) -> None:
        c.state = READY
        self.pending_login -= 1
        self.logged_in += 1
        self.login_ns.append(now_ns() - c.t_mark)
        c.on_c, c.on_bm, c.on_d, c.counting = c.after

    def login(self, users: list, what: str) -> dict:
        """Connect and log in users (bounded window); every one must make it."""
        self.phase = f"login of {what}"
        before_ok, before_failed = self.logged_in, self.login_failed
        t0 = time.monotonic()
        self.queue_logins(users)
        total = len(users)

        def done() -> bool:
            return self.logged_in - before_ok + self.login_failed - before_failed >= total

        self.wait(done, lambda: self.logged_in + self.login_failed,
                  lambda: f"{self.logged_in - before_ok}/{total} logged in")
        seconds = time.monotonic() - t0
        ok = self.logged_in - before_ok
        if ok < total:
            raise BenchError(f"only {ok} of {total} {what} logged in; failures: {dict(self.failures)}")
        return {"users": total, "seconds": round(seconds, 3), "per_s": round(total / seconds, 1) if seconds else None}

    # --- waiting ----------------------------------------------------------------------
    def check(self) -> None:
        if time.monotonic() > self.deadline:
            raise BenchError(f"the deadline of {self.args.deadline:.0f} s passed during the {self.phase}")
        if self.room is not None:
            dead = self.room.check()
            if dead:
                raise BenchError(f"during the {self.phase}: {dead}")

    def step(self, timeout: float) -> None:
        self._pump_logins()
        self.poll(timeout)
        self.check()

    def wait(self, done: Callable, progress: Callable, describe: Callable, tick: Callable | None = None,
             poll_s: float = 0.02) -> None:
        """Run the loop until done(); stall after --stall seconds without progress."""
        last = progress()
        last_change = time.monotonic()
        while not done():
            if tick is not None:
                tick()
            self.step(poll_s)
            now = time.monotonic()
            value = progress()
            if value != last:
                last, last_change = value, now
            elif now - last_change > self.args.stall:
                raise BenchError(f"no progress for {self.args.stall:.0f} s during the {self.phase} "
                                 f"({describe()}); failures: {dict(self.failures)}")
            if now - self.last_report > 5.0:
                self.last_report = now
                self.note(f"{self.phase}: {describe()}")

    def settle(self, max_s: float = 30.0) -> None:
        """Read until the server has gone quiet (CPU idle when known, no bytes arriving)."""
        self.phase = "settling"
        end = time.monotonic() + max_s
        cpu = self.stats.cpu_s()
        rx = self.rx_bytes
        quiet = 0
        while time.monotonic() < end:
            t = time.monotonic() + 0.2
            while time.monotonic() < t:
                self.step(0.05)
            cpu_now = self.stats.cpu_s()
            busy = cpu is not None and cpu_now is not None and cpu_now - cpu > 0.015
            quiet = 0 if busy or self.rx_bytes != rx else quiet + 1
            cpu, rx = cpu_now, self.rx_bytes
            if quiet >= 3:
                return
        self.note(f"the server did not go quiet within {max_s:.0f} s; measuring anyway")

    def note(self, text: str) -> None:
        if not self.args.quiet:
            print(f"loadgen: {text}", file=sys.stderr, flush=True)

    # --- phase figures --------------------------------------------------------------------
    def mark(self) -> dict:
        """The clocks at the start of a measured phase: wall, server CPU (ns and ticks), the load
        generator's own CPU, Redis's CPU, each node's CPU when there are several, the host's steal."""
        return {"t": time.monotonic(), "cpu": self.stats.cpu_s(), "ticks": self.stats.ticks_s(), "me": self_cpu_s(),
                "redis": self.redis_stats.cpu_s(), "host": host_ticks(),
                "nodes": [self.stats.cpu_s([pid]) for pid in self.stats.pids] if len(self.stats.pids) > 1 else None}

    def figures(self, start: dict, seconds: float | None = None) -> tuple:
        """Server and load generator CPU since the ``mark`` start (seconds: the phase length to
        divide by): (the figures for the result, server CPU seconds, Redis CPU seconds); the
        two CPU figures unrounded, None where not known."""
        end = self.mark()
        wall = seconds if seconds else end["t"] - start["t"]
        cpu = None if start["cpu"] is None or end["cpu"] is None else end["cpu"] - start["cpu"]
        ticks = None
        if cpu is not None and start["ticks"] is not None and end["ticks"] is not None:
            ticks = end["ticks"] - start["ticks"]
            if ticks - cpu > 0.05 + 0.1 * ticks:   # a server thread exited: trust the ticks
                cpu = ticks
        me = end["me"] - start["me"]
        fig = {"server_cpu_s": None if cpu is None else round(cpu, 4),
               "server_cpu_ticks_s": None if ticks is None else round(ticks, 2),
               "server_cpu_pct": None if cpu is None or not wall else round(100 * cpu / wall, 1),
               "loadgen_cpu_s": round(me, 4),
               "loadgen_cpu_pct": round(100 * me / wall, 1) if wall else None,
               "host_steal_pct": None}
        if start["host"] and end["host"] and end["host"][1] > start["host"][1]:
            stolen, ticks_all = (b - a for a, b in zip(start["host"], end["host"]))
            fig["host_steal_pct"] = round(100 * stolen / ticks_all, 1)
        if start["nodes"] and end["nodes"] and len(start["nodes"]) == len(end["nodes"]):
            fig["node_cpu_s"] = [None if a is None or b is None else round(b - a, 4)
                                 for a, b in zip(start["nodes"], end["nodes"])]
        rcpu = None
        if start["redis"] is not None and end["redis"] is not None:
            rcpu = end["redis"] - start["redis"]
            fig.update({"redis_cpu_s": round(rcpu, 4),
                        "redis_cpu_pct": round(100 * rcpu / wall, 1) if wall else None,
                        "redis_rss_kb": self.redis_stats.mem_kb()})
        return fig, cpu, rcpu


def send_bm(bench: Bench, c: Conn, text: str) -> None:
    bench.send(c, BM_REQUEST + framing.command({"op": Op.SEND, "text": text}))


def padding(size: int, used: int) -> str:
    return "x" * max(1, size - used)


def raise_fd_limit(need: int) -> dict:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard or hard == resource.RLIM_INFINITY:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < need:
        raise BenchError(f"cannot reach {need} open files (about one per user plus a few): the open-file "
                         f"limit is {soft} (hard {hard}); raise it (ulimit -n) or ask for fewer users")
    return {"soft": soft, "hard": hard}
