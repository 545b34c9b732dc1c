#!/usr/bin/env python3
"""ircbench.py -- single-process, selectors (epoll) IRC load generator.

Standard library only.  Connects ONLY to 127.0.0.1.  Every phase is bounded
in count and in wall time (--timeout per phase, stall detection).

Tests (--test):
  bcast : N clients register + JOIN one channel; K senders send M PRIVMSGs
          each to the channel (closed loop: at most W un-acknowledged messages
          per sender, acked when a designated observer client sees them;
          W=0 means open loop / send everything at once).  Reports deliveries/s
          (fan-out throughput) and end-to-end latency p50/p99 measured on a
          sample of "probe" receivers (timestamp embedded in the message).
  pm    : P pairs of clients ping-pong "PRIVMSG <nick>" R rounds each;
          reports round-trip p50/p99 and PRIVMSG/s.
  conn  : for each count C in --counts: register C clients (no JOIN), check
          they are all served (PING/PONG), read server VmRSS; then close all.

Server-side CPU and memory are read from /proc/<--server-pid>.

--tls: every client connects with TLS (the server's SSLPorts listener): the
TCP connect and the handshake are blocking, with a deadline, when the client
is opened (outside every measured phase); the socket is then a non-blocking
ssl.SSLSocket in the same loop, and each read drains what the TLS object
holds (pending()). The certificate is not checked (a throwaway one).

Copied from the team's benchmark kit (shared/anchors) into bench/ for the TLS
comparison; only --tls is new.
"""
import argparse
import errno
import json
import os
import random
import re
import resource
import selectors
import socket
import ssl
import string
import sys
import time

HOST = "127.0.0.1"          # never anything else
EV_R = selectors.EVENT_READ
EV_W = selectors.EVENT_WRITE
CLK_TCK = os.sysconf("SC_CLK_TCK")
TLS_CONNECT_S = 10.0
WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


def tls_context():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx

S_CONNECTING, S_REG, S_ONLINE, S_JOINING, S_JOINED, S_DEAD = range(6)

RE_B = re.compile(rb" :B (\d+) (\d+) (\d+) ")
RE_PM = re.compile(rb"PRIVMSG \S+ :([PR]) (\d+) (\d+) ")
RE_NICKPFX = re.compile(rb"^:([^!]+)!")


def now_us():
    return time.monotonic_ns() // 1000


# ---------------------------------------------------------------- /proc
class Proc:
    def __init__(self, pid):
        self.pid = pid

    def alive(self):
        if not self.pid:
            return True
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                s = f.read()
            return s[s.rindex(")") + 2] != "Z"
        except OSError:
            return False

    def cpu_s(self):
        if not self.pid:
            return float("nan")
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                s = f.read()
        except OSError:
            return float("nan")
        rest = s[s.rindex(")") + 2:].split()
        return (int(rest[11]) + int(rest[12])) / CLK_TCK

    def mem_kb(self):
        out = {}
        if not self.pid:
            return out
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith(("VmRSS:", "VmHWM:")):
                        k, v = line.split(":")
                        out[k] = int(v.split()[0])
        except OSError:
            pass
        return out

    def wait_quiet(self, max_s=30.0, step=0.25):
        """Wait until the server stops burning CPU (bounded)."""
        if not self.pid:
            time.sleep(0.5)
            return
        end = time.monotonic() + max_s
        last = self.cpu_s()
        quiet = 0
        while time.monotonic() < end and self.alive():
            time.sleep(step)
            cur = self.cpu_s()
            quiet = quiet + 1 if cur - last < 0.011 else 0
            last = cur
            if quiet >= 3:
                return


def self_cpu_s():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def pct(sorted_vals, p):
    if not sorted_vals:
        return None
    i = min(len(sorted_vals) - 1, max(0, int(round(p / 100.0 * (len(sorted_vals) - 1)))))
    return sorted_vals[i]


def lat_summary(vals_us):
    v = sorted(vals_us)
    def ms(x):
        return None if x is None else round(x / 1000.0, 3)
    return {"n": len(v), "p50_ms": ms(pct(v, 50)), "p90_ms": ms(pct(v, 90)),
            "p99_ms": ms(pct(v, 99)), "max_ms": ms(v[-1] if v else None)}


# ---------------------------------------------------------------- client
class Client:
    __slots__ = ("idx", "nick", "sock", "rbuf", "wbuf", "state", "wmask",
                 "probe", "role", "peer", "seq", "rounds_left", "t_sent")

    def __init__(self, idx, nick, sock):
        self.idx = idx
        self.nick = nick
        self.sock = sock
        self.rbuf = b""
        self.wbuf = bytearray()
        self.state = S_CONNECTING
        self.wmask = False
        self.probe = False
        self.role = None
        self.peer = None
        self.seq = 0
        self.rounds_left = 0
        self.t_sent = 0


class Bench:
    def __init__(self, port, proc, verbose=False, tls=False):
        self.port = port
        self.tls = tls_context() if tls else None
        self.proc = proc
        self.verbose = verbose
        self.sel = selectors.DefaultSelector()
        self.clients = []
        self.handler = self.h_setup
        self.pending_reg = 0
        self.pending_join = 0
        self.n_failed = 0
        self.fail_reasons = {}
        self.n_dead = 0
        self.tag = "".join(random.choice(string.ascii_lowercase) for _ in range(2))
        self.pongs = 0
        # bcast state
        self.delivered = 0
        self.lat = []
        self.acked = {}
        self.last_progress = 0.0
        # pm state
        self.rtt = []
        self.pm_done_pairs = 0
        self.pm_msgs = 0

    def log(self, *a):
        if self.verbose:
            print(f"[{time.monotonic():.3f}]", *a, file=sys.stderr, flush=True)

    # ------------------------------------------------------------ socket io
    def open_client(self, idx, nick):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is not None:
            s.settimeout(TLS_CONNECT_S)
            try:
                s.connect((HOST, self.port))
                s = self.tls.wrap_socket(s)
                err = 0
            except OSError as e:
                s.close()
                c = Client(idx, nick, s)
                c.state = S_DEAD
                self._fail("tls-connect:" + str(e))
                return c
            s.setblocking(False)
        else:
            s.setblocking(False)
            err = s.connect_ex((HOST, self.port))
        c = Client(idx, nick, s)
        if err not in (0, errno.EINPROGRESS):
            s.close()
            c.state = S_DEAD
            self._fail("connect:" + errno.errorcode.get(err, str(err)))
            return c
        c.state = S_REG
        c.wbuf += b"NICK %s\r\nUSER %s 0 * :bench\r\n" % (nick, nick)
        self.sel.register(s, EV_R | EV_W, c)
        c.wmask = True
        self.pending_reg += 1
        return c

    def _fail(self, why):
        self.n_failed += 1
        self.fail_reasons[why] = self.fail_reasons.get(why, 0) + 1

    def send(self, c, data):
        if c.state == S_DEAD:
            return
        if c.wbuf:
            c.wbuf += data
            return
        try:
            n = c.sock.send(data)
        except WOULD_BLOCK:
            n = 0
        except OSError as e:
            self.kill(c, "send:" + errno.errorcode.get(e.errno, str(e)))
            return
        if n < len(data):
            c.wbuf += data[n:]
            if not c.wmask:
                self.sel.modify(c.sock, EV_R | EV_W, c)
                c.wmask = True

    def flush(self, c):
        if c.wbuf:
            try:
                n = c.sock.send(c.wbuf)
            except WOULD_BLOCK:
                return
            except OSError as e:
                self.kill(c, "send:" + errno.errorcode.get(e.errno, str(e)))
                return
            del c.wbuf[:n]
        if not c.wbuf and c.wmask:
            self.sel.modify(c.sock, EV_R, c)
            c.wmask = False

    def kill(self, c, why):
        if c.state == S_DEAD:
            return
        if c.state == S_REG:
            self.pending_reg -= 1
            self._fail(why)
        elif c.state == S_JOINING:
            self.pending_join -= 1
            self._fail(why)
        else:
            self.n_dead += 1
            self.fail_reasons["dropped:" + why] = self.fail_reasons.get("dropped:" + why, 0) + 1
        c.state = S_DEAD
        try:
            self.sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        c.sock.close()

    def poll(self, timeout):
        tls = self.tls is not None
        for key, mask in self.sel.select(timeout):
            c = key.data
            if mask & EV_W:
                self.flush(c)
            if mask & EV_R and c.state != S_DEAD:
                try:
                    data = c.sock.recv(65536)
                    if tls and c.sock.pending():   # decrypted, held in the TLS object
                        data += c.sock.recv(c.sock.pending())
                except WOULD_BLOCK:
                    continue
                except OSError as e:
                    self.kill(c, "recv:" + errno.errorcode.get(e.errno, str(e)))
                    continue
                if not data:
                    self.kill(c, "eof")
                    continue
                buf = c.rbuf + data if c.rbuf else data
                i = buf.rfind(b"\n")
                if i < 0:
                    c.rbuf = buf
                    continue
                c.rbuf = buf[i + 1:]
                self.handler(c, buf[:i + 1])

    def close_all(self):
        for c in self.clients:
            if c.state != S_DEAD:
                try:
                    self.sel.unregister(c.sock)
                except (KeyError, ValueError):
                    pass
                c.sock.close()
                c.state = S_DEAD
        self.clients = []

    # ------------------------------------------------------------ handlers
    def pings(self, c, block):
        for line in block.split(b"\n"):
            if line.startswith(b"PING"):
                self.send(c, b"PONG" + line[4:].rstrip(b"\r") + b"\r\n")
            elif b" PONG " in line:
                self.pongs += 1
            elif line.startswith(b"ERROR"):
                self.fail_reasons["ERROR-line"] = self.fail_reasons.get("ERROR-line", 0) + 1

    def h_setup(self, c, block):
        if c.state == S_REG:
            if b" 001 " in block:
                c.state = S_ONLINE
                self.pending_reg -= 1
            elif b" 433 " in block or b" 432 " in block or b" 465 " in block:
                self.kill(c, "nick-rejected")
                return
        if c.state == S_JOINING and b" 366 " in block:
            c.state = S_JOINED
            self.pending_join -= 1
        if b"PING" in block or b"PONG" in block or b"ERROR" in block:
            self.pings(c, block)

    def h_bcast(self, c, block):
        if c.probe:
            t = now_us()
            found = RE_B.findall(block)
            self.delivered += len(found)
            lat = self.lat
            for _sid, _seq, ts in found:
                lat.append(t - int(ts))
            if c.role == "observer":
                acked = self.acked
                for sid, _seq, _ts in found:
                    acked[int(sid)] += 1
        else:
            self.delivered += block.count(b" :B ")
        if b"PING" in block or b"ERROR" in block:
            self.pings(c, block)

    def h_pm(self, c, block):
        t = now_us()
        for kind, seq, ts in RE_PM.findall(block):
            if kind == b"P" and c.role == "B":
                self.send(c, b"PRIVMSG %s :R %s %s x\r\n" % (c.peer.nick, seq, ts))
                self.pm_msgs += 1
            elif kind == b"R" and c.role == "A":
                self.rtt.append(t - int(ts))
                self.pm_msgs += 1
                c.rounds_left -= 1
                if c.rounds_left > 0:
                    c.seq += 1
                    self.send(c, b"PRIVMSG %s :P %d %d x\r\n" % (c.peer.nick, c.seq, now_us()))
                else:
                    self.pm_done_pairs += 1
        if b"PING" in block or b"ERROR" in block:
            self.pings(c, block)

    # ------------------------------------------------------------ phases
    def register(self, n, window, timeout, prefix):
        """Connect + register n clients, at most `window` registrations in flight."""
        t0 = time.monotonic()
        end = t0 + timeout
        out = []
        i = 0
        self.handler = self.h_setup
        fail0 = self.n_failed
        while time.monotonic() < end:
            while i < n and self.pending_reg < window:
                c = self.open_client(i, b"%s%s%d" % (prefix, self.tag.encode(), i))
                out.append(c)
                i += 1
            if i >= n and self.pending_reg <= 0:
                break
            self.poll(0.05)
            if not self.proc.alive():
                self.log("server died during registration")
                break
        dt = time.monotonic() - t0
        self.clients.extend(out)
        ok = [c for c in out if c.state == S_ONLINE]
        return ok, {"requested": n, "registered": len(ok), "failed": self.n_failed - fail0,
                    "attempted": i, "seconds": round(dt, 3),
                    "reg_per_s": round(len(ok) / dt, 1) if dt > 0 else None}

    def join(self, clients, chan, window, timeout):
        t0 = time.monotonic()
        end = t0 + timeout
        i = 0
        n = len(clients)
        while time.monotonic() < end:
            while i < n and self.pending_join < window:
                c = clients[i]
                i += 1
                if c.state != S_ONLINE:
                    continue
                c.state = S_JOINING
                self.pending_join += 1
                self.send(c, b"JOIN %s\r\n" % chan)
            if i >= n and self.pending_join <= 0:
                break
            self.poll(0.05)
            if not self.proc.alive():
                break
        joined = sum(1 for c in clients if c.state == S_JOINED)
        return {"joined": joined, "seconds": round(time.monotonic() - t0, 3)}

    def drain(self, secs):
        end = time.monotonic() + secs
        while time.monotonic() < end:
            self.poll(0.05)


# ---------------------------------------------------------------- tests
def test_bcast(a, b, res):
    chan = b"#b" + b.tag.encode()
    clients, reg = b.register(a.clients, a.reg_window, a.timeout, b"b")
    res["register"] = reg
    if len(clients) < a.clients:
        res["error"] = "not all clients registered"
        return
    res["join"] = b.join(clients, chan, a.join_window, a.timeout)
    b.drain(0.5)   # let JOIN notifications settle
    b.proc.wait_quiet(10)
    b.drain(0.3)
    members = [c for c in clients if c.state == S_JOINED]
    if len(members) < a.clients:
        res["error"] = "not all clients joined"
        return
    n = len(members)
    k = a.senders
    observer = members[0]
    observer.role = "observer"
    senders = members[1:1 + k]
    nprobe = min(a.probes, n)
    for j in range(nprobe):
        members[(j * n) // nprobe].probe = True
    observer.probe = True
    pad = b"x" * max(0, a.size - 30)
    expected = k * a.msgs * (n - 1)
    b.acked = {s.idx: 0 for s in senders}
    sent = {s.idx: 0 for s in senders}
    b.delivered = 0
    b.lat = []
    b.handler = b.h_bcast
    win = a.window if a.window > 0 else a.msgs
    cpu_s0, cpu_me0 = b.proc.cpu_s(), self_cpu_s()
    t0 = time.monotonic()
    end = t0 + a.timeout
    last_deliv, last_change = 0, t0
    t_last = t0
    stalled = False
    while True:
        for s in senders:
            sid = s.idx
            while sent[sid] < a.msgs and sent[sid] - b.acked[sid] < win:
                sent[sid] += 1
                b.send(s, b"PRIVMSG %s :B %d %d %d %s\r\n" % (chan, sid, sent[sid], now_us(), pad))
        b.poll(0.02)
        tn = time.monotonic()
        if b.delivered != last_deliv:
            last_deliv, last_change, t_last = b.delivered, tn, tn
        if b.delivered >= expected:
            break
        if tn > end:
            stalled = True
            break
        if tn - last_change > a.stall:
            stalled = True
            break
        if not b.proc.alive():
            res["error"] = "server died"
            break
    cpu_s1, cpu_me1 = b.proc.cpu_s(), self_cpu_s()
    wall = time.monotonic() - t0
    el = t_last - t0
    res["bcast"] = {
        "members": n, "senders": k, "msgs_per_sender": a.msgs, "window": a.window,
        "msg_text_bytes": a.size,
        "expected_deliveries": expected, "deliveries": b.delivered,
        "complete": b.delivered >= expected, "stalled_or_timeout": stalled,
        "dropped_clients": b.n_dead,
        "seconds": round(el, 3),
        "deliveries_per_s": round(b.delivered / el) if el > 0 else None,
        "input_msgs_per_s": round(sum(sent.values()) / el) if el > 0 else None,
        "latency": lat_summary(b.lat),
        "server_cpu_s": round(cpu_s1 - cpu_s0, 3),
        "server_cpu_pct": round(100 * (cpu_s1 - cpu_s0) / wall, 1),
        "server_cpu_us_per_delivery": (round(1e6 * (cpu_s1 - cpu_s0) / b.delivered, 3)
                                       if b.delivered else None),
        "loadgen_cpu_pct": round(100 * (cpu_me1 - cpu_me0) / wall, 1),
    }


def test_pm(a, b, res):
    clients, reg = b.register(2 * a.pairs, a.reg_window, a.timeout, b"p")
    res["register"] = reg
    if len(clients) < 2 * a.pairs:
        res["error"] = "not all clients registered"
        return
    b.drain(0.3)
    b.proc.wait_quiet(10)
    pairs = []
    for i in range(a.pairs):
        x, y = clients[2 * i], clients[2 * i + 1]
        x.role, y.role = "A", "B"
        x.peer, y.peer = y, x
        x.rounds_left = a.rounds
        pairs.append(x)
    b.handler = b.h_pm
    b.rtt = []
    b.pm_msgs = 0
    b.pm_done_pairs = 0
    cpu_s0, cpu_me0 = b.proc.cpu_s(), self_cpu_s()
    t0 = time.monotonic()
    for x in pairs:
        x.seq = 1
        b.send(x, b"PRIVMSG %s :P %d %d x\r\n" % (x.peer.nick, 1, now_us()))
    end = t0 + a.timeout
    last, last_change = 0, t0
    stalled = False
    while b.pm_done_pairs < a.pairs:
        b.poll(0.02)
        tn = time.monotonic()
        if b.pm_msgs != last:
            last, last_change = b.pm_msgs, tn
        if tn > end or tn - last_change > a.stall or not b.proc.alive():
            stalled = True
            break
    el = time.monotonic() - t0
    cpu_s1, cpu_me1 = b.proc.cpu_s(), self_cpu_s()
    res["pm"] = {
        "pairs": a.pairs, "rounds": a.rounds, "round_trips": len(b.rtt),
        "complete": b.pm_done_pairs == a.pairs, "stalled_or_timeout": stalled,
        "seconds": round(el, 3),
        "privmsg_per_s": round(b.pm_msgs / el) if el > 0 else None,
        "rtt": lat_summary(b.rtt),
        "server_cpu_s": round(cpu_s1 - cpu_s0, 3),
        "server_cpu_pct": round(100 * (cpu_s1 - cpu_s0) / el, 1),
        "server_cpu_us_per_privmsg": (round(1e6 * (cpu_s1 - cpu_s0) / b.pm_msgs, 2)
                                      if b.pm_msgs else None),
        "loadgen_cpu_pct": round(100 * (cpu_me1 - cpu_me0) / el, 1),
    }


def test_conn(a, b, res):
    res["conn"] = []
    for count_i, count in enumerate(a.counts):
        if not b.proc.alive():
            res["conn"].append({"count": count, "error": "server not running"})
            break
        b.proc.wait_quiet(10)
        mem0 = b.proc.mem_kb()
        cpu0 = b.proc.cpu_s()
        b.n_dead = 0
        clients, reg = b.register(count, a.reg_window, a.timeout, b"c%d" % count_i)
        cpu1 = b.proc.cpu_s()
        row = {"count": count, "register": reg, "rss_before_kb": mem0.get("VmRSS")}
        if not b.proc.alive():
            row["error"] = "server died"
            row["fail_reasons"] = dict(b.fail_reasons)
            res["conn"].append(row)
            break
        # liveness: every registered client sends PING and must get PONG
        b.pongs = 0
        b.handler = b.h_setup
        for c in clients:
            b.send(c, b"PING :alive\r\n")
        end = time.monotonic() + min(a.timeout, 30)
        while b.pongs < len(clients) and time.monotonic() < end and b.proc.alive():
            b.poll(0.05)
        b.drain(0.5)
        mem1 = b.proc.mem_kb()
        row.update({
            "alive_pong": b.pongs,
            "still_connected": sum(1 for c in clients if c.state != S_DEAD),
            "rss_kb": mem1.get("VmRSS"), "hwm_kb": mem1.get("VmHWM"),
            "rss_per_client_kb": (round((mem1["VmRSS"] - mem0["VmRSS"]) / max(1, len(clients)), 2)
                                  if mem1 and mem0 else None),
            "server_cpu_s_register": round(cpu1 - cpu0, 3),
            "server_alive": b.proc.alive(),
            "fail_reasons": dict(b.fail_reasons),
        })
        res["conn"].append(row)
        b.close_all()
        b.fail_reasons = {}
        b.proc.wait_quiet(15)
        if len(clients) < count or not b.proc.alive():
            break


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--server-pid", type=int, default=0, help="server PID for /proc CPU/RSS")
    ap.add_argument("--test", choices=["bcast", "pm", "conn"], required=True)
    ap.add_argument("--label", default="")
    ap.add_argument("--clients", "-n", type=int, default=100)
    ap.add_argument("--senders", "-k", type=int, default=10)
    ap.add_argument("--msgs", "-m", type=int, default=200)
    ap.add_argument("--window", "-w", type=int, default=5,
                    help="max un-acked msgs per sender (0 = open loop, send all at once)")
    ap.add_argument("--size", type=int, default=64, help="approx. message text bytes")
    ap.add_argument("--probes", type=int, default=100, help="receivers sampled for latency")
    ap.add_argument("--pairs", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--counts", type=lambda s: [int(x) for x in s.split(",")], default=[1000, 2000, 5000])
    ap.add_argument("--reg-window", type=int, default=4, help="registrations in flight (keep <= server listen backlog)")
    ap.add_argument("--join-window", type=int, default=50)
    ap.add_argument("--timeout", type=float, default=60.0, help="per-phase wall limit (s)")
    ap.add_argument("--stall", type=float, default=5.0, help="abort phase after this many s without progress")
    ap.add_argument("--json", help="append result as one JSON line to this file")
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--tls", action="store_true", help="connect with TLS (the server's SSL port)")
    a = ap.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass
    proc = Proc(a.server_pid)
    b = Bench(a.port, proc, a.verbose, a.tls)
    res = {"label": a.label, "test": a.test, "port": a.port, "server_pid": a.server_pid,
           "server_mem_start_kb": proc.mem_kb(), "args": vars(a)}
    t0 = time.monotonic()
    try:
        {"bcast": test_bcast, "pm": test_pm, "conn": test_conn}[a.test](a, b, res)
    finally:
        b.close_all()
        res["fail_reasons"] = b.fail_reasons if b.fail_reasons else res.get("fail_reasons", {})
        res["server_alive_at_end"] = proc.alive()
        res["server_mem_end_kb"] = proc.mem_kb()
        res["total_seconds"] = round(time.monotonic() - t0, 2)
        out = json.dumps(res)
        print(json.dumps(res, indent=1))
        if a.json:
            with open(a.json, "a") as f:
                f.write(out + "\n")


if __name__ == "__main__":
    main()
