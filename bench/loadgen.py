#!/usr/bin/env python3
"""Load generator for chatserver.py: broadcast fan-out, private messages, many idle users, login storms.

    python3 bench/loadgen.py fanout -n 1000 -k 10 -m 50 -w 20
    python3 bench/loadgen.py pm --count 200
    python3 bench/loadgen.py hold -n 10000
    python3 bench/loadgen.py storm --base 100 --storm 200
    python3 bench/loadgen.py fanout --connect 127.0.0.1:41001 --server-pid 1234 ...
    python3 bench/loadgen.py fanout --nodes 2 -n 1000          # two nodes on one Redis
    python3 bench/loadgen.py pm --nodes 2                      # cross-node PM round trip
    python3 bench/loadgen.py failover --nodes 2 -n 200         # SIGKILL a node: offline presence

By default it starts chatserver.py itself on a free 127.0.0.1 port, with a
temporary data directory and the per-address and rate limits turned off, and
stops it at the end; ``--connect`` (repeatable: users are spread over the
servers round-robin) targets running servers instead, whose CPU and memory it
reads only when given ``--server-pid``. ``--nodes N`` starts a redis-server
(free loopback port, AOF ``always``, no RDB snapshots) and N chatserver.py
nodes on it (``--redis``, one data directory each), spreads the users over
the nodes round-robin, sums the nodes' CPU and RSS and reports Redis's CPU
apart. Every process it starts is stopped at the end (SIGTERM, then SIGKILL
after a bounded wait) and dies with the load generator if that is killed.
Loopback addresses only.

Theory of operation. One process, one ``selectors`` loop, every socket
non-blocking, no threads. Each user is a ``Conn`` that logs in (LOGIN,
PASSWORD sealed to the server key with the connection's nonce, KEY) with at
most ``--login-window`` logins in flight. Every user offers the same client
public key: one RSA key pair per run, since making one costs half a second.
After login a connection either keeps walking frames (senders and the sampled
receivers: replies are checked by their first bytes, bodies decoded only when
needed) or only *counts*: it looks for ``{"op":"BM",`` in the raw byte stream,
which JSON can contain only at the start of a BM body (a quote inside a string
is escaped), so a receiver costs one ``bytes.count`` per 64 KiB read.

Latency: a sender puts ``time.perf_counter_ns()`` in the text; the receiving
connection, in the same process, subtracts it from the time of the read.
Server CPU (utime+stime of the whole process, from /proc; summed over the
nodes), Redis's CPU and the load generator's own CPU (getrusage) are deltas
over the measured phase only: when the load generator is near 100% of a core,
it, not the server, was the limit. Every wait is bounded: ``--stall`` seconds
without progress or the global ``--deadline`` ends the run with a message and
exit status 1; failover waits ``--limit`` seconds at most for the presences.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import framing  # noqa: E402
from loadgen_options import loopback_target, nonnegative, positive  # noqa: E402
import passwords  # noqa: E402
import pg3lib  # noqa: E402
from loadgen_driver import (BM_REQUEST, PM_REQUEST, READY, Bench, Conn, now_ns, padding,  # noqa: E402
                            raise_fd_limit, send_bm)
from loadgen_errors import BenchError  # noqa: E402
from loadgen_procs import StartedRoom  # noqa: E402
from loadgen_stats import ServerStats, lat_summary, machine_info, pct, per  # noqa: E402

# --- scenarios --------------------------------------------------------------------------

def run_fanout(bench: Bench, a: argparse.Namespace, res: dict) -> None:
    """N users, K senders, M BMs each, at most W unconfirmed per sender."""
    n, k, m, w = a.users, a.senders, a.messages, a.window
    if n < 2 or not 1 <= k <= n:
        raise BenchError("fanout needs at least 2 users and 1..N senders")
    users = bench.make_users(n)
    senders = users[1:1 + k] if k < n else users
    sender_set = set(senders)
    candidates = [u for u in users if u not in sender_set]
    nprobe = min(a.probes, len(candidates))
    probes = [candidates[(j * len(candidates)) // nprobe] for j in range(nprobe)] if nprobe else []
    lat: list = []
    lat_same: list = []    # with several servers: sender and probe on the same one
    lat_cross: list = []   # ... or on different ones
    where = {u.idx: u.target[2] for u in senders}
    several = len({t[2] for t in bench.targets}) > 1
    totals = {"confirmed": 0, "t_last": 0.0}

    def probe_bm(c: Conn, body: bytes) -> None:
        parts = bench.decode(body).get("text", "").split(" ", 4)
        if parts[0] == "B" and len(parts) > 3:
            ns = bench.t_rx - int(parts[3])
            lat.append(ns)
            if several:
                (lat_same if where.get(int(parts[1])) == c.target[2] else lat_cross).append(ns)

    def sender_reply(c: Conn, body: bytes) -> None:
        if body.startswith(b'{"op":"SEND","ok":true'):
            c.confirmed += 1
            totals["confirmed"] += 1
            totals["t_last"] = time.monotonic()
        elif not body.startswith(b'{"op":"BM","ok":true'):
            bench.unexpected(c, body, "BM/SEND")

    for u in users:
        u.after = (None, None, None, True)
    for p in probes:
        p.after = (None, probe_bm, None, False)
    for s in senders:
        s.after = (sender_reply, None, None, False)

    res["login"] = bench.login(users, f"{n} users")
    bench.note(f"{n} users logged in ({res['login']['per_s']}/s); waiting for the server to go quiet")
    bench.settle()

    pad = padding(a.size, 40)
    expected = k * m * (n - 1)
    bench.bm_delivered = 0
    bench.phase = "fan-out"
    bench.note(f"fan-out: {k} senders x {m} messages to {n - 1} others ({expected} deliveries)")

    def pump() -> None:
        for s in senders:
            if s.sent < m and s.sent - s.confirmed < w and s.state == READY:
                chunks = []
                while s.sent < m and s.sent - s.confirmed < w:
                    s.sent += 1
                    chunks.append(BM_REQUEST)
                    chunks.append(framing.command({"op": "SEND", "text": f"B {s.idx} {s.sent} {now_ns()} {pad}"}))
                bench.send(s, b"".join(chunks))

    start = bench.mark()
    totals["t_last"] = start["t"]
    last_count = [0, start["t"]]

    def progress() -> int:
        value = bench.bm_delivered + totals["confirmed"]
        if value != last_count[0]:
            last_count[0], last_count[1] = value, time.monotonic()
        return value

    def done() -> bool:
        return bench.bm_delivered >= expected and totals["confirmed"] >= k * m

    try:
        bench.wait(done, progress, lambda: f"{bench.bm_delivered}/{expected} delivered, "
                   f"{totals['confirmed']}/{k * m} confirmed", tick=pump, poll_s=0.02)
    finally:
        seconds = max(last_count[1], totals["t_last"]) - start["t"]
        fig = bench.figures(start, seconds)
        delivered = bench.bm_delivered
        cpu, rcpu = fig.pop("_cpu"), fig.pop("_redis_cpu")
        res["fanout"] = {
            "users": n, "senders": k, "msgs_per_sender": m, "window": w, "msg_text_chars": a.size,
            "expected_deliveries": expected, "deliveries": delivered, "confirmed": totals["confirmed"],
            "complete": delivered >= expected and totals["confirmed"] >= k * m,
            "dropped_users": bench.dropped,
            "seconds": round(seconds, 3),
            "deliveries_per_s": round(delivered / seconds) if seconds > 0 else None,
            "latency": lat_summary(lat), "latency_probes": len(probes),
            "server_cpu_us_per_delivery": round(1e6 * cpu / delivered, 3) if cpu is not None and delivered else None,
            "redis_cpu_us_per_delivery": per(rcpu, delivered, 3),
            "servers": len(bench.targets),
            **fig,
            "server_rss_kb": bench.stats.mem_kb(),
        }
        if several:
            res["fanout"]["latency_same_server"] = lat_summary(lat_same)
            res["fanout"]["latency_cross_server"] = lat_summary(lat_cross)
    if delivered > expected:
        raise BenchError(f"{delivered} deliveries counted, more than the {expected} expected")


def run_pm(bench: Bench, a: argparse.Namespace, res: dict) -> None:
    """One pair ping-pongs private messages: PM+TARGET (pipelined), seal and sign, SEND, delivery."""
    x, y = bench.make_users(2)
    if a.same_node:
        y.target = x.target
    legs_total = 2 * (a.count + a.warmup)
    legs: list = []   # (server_ns, total_ns, send_crypto_ns, receive_crypto_ns, target_ns, delivery_ns)
    leg = {"from": None, "t1": 0, "t2": 0, "t3": 0, "n": 0}
    done_flag = [False]
    pad = padding(a.size, 30)

    def start_leg(src: Conn, dst: Conn) -> None:
        leg.update({"from": src, "t1": now_ns(), "t2": 0, "t3": 0})
        bench.send(src, PM_REQUEST + framing.command({"op": "TARGET", "username": dst.username}))

    def on_c(c: Conn, body: bytes) -> None:
        if body.startswith(b'{"op":"PM","ok":true') or body.startswith(b'{"op":"SEND","ok":true'):
            return
        if not body.startswith(b'{"op":"TARGET","ok":true'):
            bench.unexpected(c, body, "PM/TARGET/SEND")
            return
        t2 = now_ns()
        msg = bench.decode(body)
        text = f"P {leg['n']} {leg['t1']} {pad}".encode()
        key = bench.public_key(msg["public_key"])
        ciphertext = key.seal(text).decode("ascii")
        self_copy = bench.keys.public.seal(text).decode("ascii")
        signature = bench.keys.sign(pg3lib.pm_signed_bytes(c.username, msg["username"], ciphertext))
        frame = framing.command({"op": "SEND", "ciphertext": ciphertext, "self_copy": self_copy,
                                 "signature": signature})
        leg["t2"], leg["t3"] = t2, now_ns()
        bench.send(c, frame)

    def on_d(c: Conn, body: bytes) -> None:
        if not body.startswith(b'{"op":"PM",'):
            return
        t4 = bench.t_rx
        msg = bench.decode(body)
        if msg.get("to") != c.username:
            raise BenchError(f"{c.username} got a PM addressed to {msg.get('to')!r}")
        sender_key = bench.public_key(msg["sender_key"])
        if not sender_key.verify(pg3lib.pm_signed_bytes(msg["from"], c.username, msg["ciphertext"]),
                                 msg["signature"]):
            raise BenchError("a PM signature did not verify at the receiver")
        text = bench.keys.open(msg["ciphertext"]).decode("utf-8")
        if not text.startswith(f"P {leg['n']} "):
            raise BenchError(f"PM {leg['n']} expected, got {text[:40]!r}")
        t5 = now_ns()
        legs.append(((leg["t2"] - leg["t1"]) + (t4 - leg["t3"]), t4 - leg["t1"], leg["t3"] - leg["t2"], t5 - t4,
                     leg["t2"] - leg["t1"], t4 - leg["t3"]))
        leg["n"] += 1
        if leg["n"] >= legs_total:
            done_flag[0] = True
            return
        start_leg(c, x if c is y else y)

    for u in (x, y):
        u.after = (on_c, None, on_d, False)
    res["login"] = bench.login([x, y], "2 users")
    bench.settle(10.0)
    bench.phase = "PM ping-pong"
    bench.note(f"PM ping-pong: {a.count} round trips (+{a.warmup} warm-up)")
    start = None
    warm_legs = 2 * a.warmup
    start_leg(x, y)

    def progress() -> int:
        nonlocal start
        if start is None and leg["n"] >= warm_legs:
            start = bench.mark()
        return leg["n"]

    try:
        bench.wait(lambda: done_flag[0], progress, lambda: f"{leg['n']}/{legs_total} messages", poll_s=0.05)
    finally:
        measured = legs[warm_legs:]
        if start is None:
            start = bench.mark()
        seconds = time.monotonic() - start["t"]
        fig = bench.figures(start)
        cpu, rcpu = fig.pop("_cpu"), fig.pop("_redis_cpu")
        msgs = len(measured)
        rtt_server = [measured[i][0] + measured[i + 1][0] for i in range(0, msgs - 1, 2)]
        rtt_total = [measured[i][1] + measured[i][3] + measured[i + 1][1] + measured[i + 1][3]
                     for i in range(0, msgs - 1, 2)]
        res["pm"] = {
            "round_trips": len(rtt_server), "messages": msgs, "warmup_round_trips": a.warmup,
            "users_at": [x.target[2], y.target[2]], "cross_server": x.target[2] != y.target[2],
            "msg_text_chars": a.size, "pipelined": "PM+TARGET sent together; SEND after sealing and signing",
            "message_server_side": lat_summary([leg_[0] for leg_ in measured]),
            "round_trip_server_side": lat_summary(rtt_server),
            "round_trip_total": lat_summary(rtt_total),
            "client_seal_sign": lat_summary([leg_[2] for leg_ in measured]),
            "client_verify_open": lat_summary([leg_[3] for leg_ in measured]),
            "target_reply": lat_summary([leg_[4] for leg_ in measured]),
            "send_to_delivery": lat_summary([leg_[5] for leg_ in measured]),
            "seconds": round(seconds, 3),
            "server_cpu_us_per_message": round(1e6 * cpu / msgs, 1) if cpu is not None and msgs else None,
            "redis_cpu_us_per_message": per(rcpu, msgs),
            **fig,
            "server_rss_kb": bench.stats.mem_kb(),
            "note": "server side = (PM+TARGET sent -> TARGET reply) + (SEND sent -> D PM at the peer); "
                    "the client's sealing, signing, verifying and opening are timed apart and left out",
        }


def run_hold(bench: Bench, a: argparse.Namespace, res: dict) -> None:
    """N users online; BM round trips one at a time; server RSS per connection."""
    n = a.users
    if n < 2:
        raise BenchError("hold needs at least 2 users")
    users = bench.make_users(n)
    sender = users[0]
    nprobe = max(1, min(a.probes, n - 1))
    probes = [users[1 + ((j + 1) * (n - 1)) // nprobe - 1] for j in range(nprobe)]
    cur = {"i": -1, "t0": 0, "ok": 0, "rx": 0, "receiver": None, "target": 0}
    rtts: list = []
    ok_rtts: list = []
    rx_rtts: list = []

    def sender_reply(c: Conn, body: bytes) -> None:
        if body.startswith(b'{"op":"SEND","ok":true'):
            cur["ok"] = bench.t_rx
        elif not body.startswith(b'{"op":"BM","ok":true'):
            bench.unexpected(c, body, "BM/SEND")

    def probe_bm(c: Conn, body: bytes) -> None:
        if c is cur["receiver"]:
            parts = bench.decode(body).get("text", "").split(" ", 3)
            if parts[0] == "H" and int(parts[1]) == cur["i"]:
                cur["rx"] = bench.t_rx

    for u in users:
        u.after = (None, None, None, True)
    for p in probes:
        p.after = (None, probe_bm, None, False)
    sender.after = (sender_reply, None, None, False)

    rss0 = bench.stats.mem_kb()
    res["login"] = bench.login(users, f"{n} users")
    bench.note(f"{n} users logged in ({res['login']['per_s']}/s); waiting for the server to go quiet")
    bench.settle(60.0)
    rss1 = bench.stats.mem_kb()
    hwm = bench.stats.mem_kb("VmHWM")
    pad = padding(a.size, 40)
    bench.phase = "BM round trips"
    bench.note(f"{a.samples} BM round trips with {n} users online")
    bench.bm_delivered = 0
    start = bench.mark()
    try:
        for i in range(a.samples):
            receiver = probes[i % nprobe]
            cur.update({"i": i, "t0": now_ns(), "ok": 0, "rx": 0, "receiver": receiver})
            send_bm(bench, sender, f"H {i} {cur['t0']} {pad}")
            cur["target"] = (i + 1) * (n - 1)
            bench.wait(lambda: cur["ok"] and cur["rx"] and bench.bm_delivered >= cur["target"],
                       lambda: (bench.bm_delivered, cur["ok"], cur["rx"]),
                       lambda: f"sample {cur['i']}: {bench.bm_delivered}/{cur['target']} delivered", poll_s=0.01)
            rtts.append(max(cur["ok"], cur["rx"]) - cur["t0"])
            ok_rtts.append(cur["ok"] - cur["t0"])
            rx_rtts.append(cur["rx"] - cur["t0"])
            if a.gap:
                end = time.monotonic() + a.gap
                while time.monotonic() < end:
                    bench.step(max(0.0, end - time.monotonic()))
    finally:
        fig = bench.figures(start)
        cpu, rcpu = fig.pop("_cpu"), fig.pop("_redis_cpu")
        delivered = bench.bm_delivered
        online = sum(1 for u in users if u.state == READY)
        res["hold"] = {
            "users": n, "online_at_end": online, "dropped_users": bench.dropped,
            "samples": len(rtts), "probes": nprobe, "gap_s": a.gap,
            "bm_round_trip": lat_summary(rtts),
            "bm_send_ok": lat_summary(ok_rtts),
            "bm_at_receiver": lat_summary(rx_rtts),
            "deliveries": delivered,
            "server_cpu_us_per_delivery": round(1e6 * cpu / delivered, 3) if cpu is not None and delivered else None,
            "redis_cpu_us_per_delivery": per(rcpu, delivered, 3),
            **fig,
            "server_rss_empty_kb": rss0, "server_rss_kb": rss1, "server_hwm_kb": hwm,
            "server_rss_per_user_kb": (round((rss1 - rss0) / n, 2) if rss0 is not None and rss1 is not None
                                       else None),
            "note": "round trip = BM+SEND sent -> both the SEND ok and the D BM at a probe receiver "
                    "(probes spread over the login order); one BM at a time, each after the last is fully "
                    "delivered",
        }


class StormProcess:
    """Log users in from a forked child process, so the sealing of 200 passwords at once
    (about 0.3 ms each) does not stall the loop that measures the round trips."""

    def __init__(self, bench: Bench, count: int) -> None:
        self.count = count
        self.read_fd, write_fd = os.pipe()
        self.report = b""
        self.eof = False
        self.pid = os.fork()
        if self.pid == 0:   # the child: its own loop, its own users; stays online until told
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.close(self.read_fd)
            code = 0
            try:
                child = Bench(bench.args, bench.targets, ServerStats([]), None, bench.keys)
                child.tag = bench.tag + "s"
                child.login_window = count
                users = child.make_users(count)
                for u in users:
                    u.after = (None, None, None, False)
                try:
                    child.login(users, "storm users")
                except BenchError:
                    code = 1
                os.write(write_fd, json.dumps([child.logged_in, child.login_failed, child.login_ns]).encode()
                         + b"\n")
                time.sleep(30.0)   # keep the users online while the parent measures
            finally:
                os._exit(code)
        os.close(write_fd)
        os.set_blocking(self.read_fd, False)

    def _read(self) -> None:
        while not self.eof:
            try:
                chunk = os.read(self.read_fd, 65536)
            except BlockingIOError:
                return
            if not chunk:
                self.eof = True
            self.report += chunk

    def finished(self) -> bool:
        self._read()
        return self.report.endswith(b"\n") or self.eof

    def progress(self) -> int:
        return self.count if self.finished() else 0

    def result(self) -> tuple:
        """(logged in, failed, login times in ns); ends the child."""
        os.kill(self.pid, signal.SIGTERM)
        os.waitpid(self.pid, 0)
        os.close(self.read_fd)
        if not self.report.endswith(b"\n"):
            raise BenchError("the storm process ended without a report")
        logged, failed, times = json.loads(self.report)
        return logged, failed, times


def run_storm(bench: Bench, a: argparse.Namespace, res: dict) -> None:
    """BM round trips among base users, before and during a storm of new logins."""
    b, s_count = a.base, a.senders
    if b < 2 or not 1 <= s_count < b:
        raise BenchError("storm needs at least 2 base users and 1..base-1 senders")
    users = bench.make_users(b)
    observer = users[0]
    senders = users[1:1 + s_count]
    samples: dict = {}
    done: list = []   # (t0_ns, rtt_ns)
    seq = [0]
    interval_ns = int(a.interval * 1e9)
    pad = padding(a.size, 40)
    sampling = [False]

    def finish(rec: list) -> None:
        done.append((rec[0], max(rec[1], rec[2]) - rec[0]))
        s = rec[3]
        s.cur = None
        # +-20% jitter, so that the senders do not fall into step and send in bursts
        s.t_mark = now_ns() + int(interval_ns * random.uniform(0.8, 1.2))

    def sender_reply(c: Conn, body: bytes) -> None:
        if body.startswith(b'{"op":"SEND","ok":true'):
            rec = samples.get(c.cur)
            if rec is not None:
                rec[1] = bench.t_rx
                if rec[2]:
                    finish(samples.pop(c.cur))
        elif not body.startswith(b'{"op":"BM","ok":true'):
            bench.unexpected(c, body, "BM/SEND")

    def observer_bm(c: Conn, body: bytes) -> None:
        parts = bench.decode(body).get("text", "").split(" ", 3)
        if parts[0] == "S":
            rec = samples.get(int(parts[1]))
            if rec is not None:
                rec[2] = bench.t_rx
                if rec[1]:
                    finish(samples.pop(int(parts[1])))

    def pump() -> None:
        if not sampling[0]:
            return
        for s in senders:
            if s.cur is None and now_ns() >= s.t_mark and s.state == READY:
                t = now_ns()
                i = seq[0]
                seq[0] += 1
                samples[i] = [t, 0, 0, s]
                s.cur = i
                send_bm(bench, s, f"S {i} {t} {pad}")

    for u in users:
        u.after = (None, None, None, True)
    observer.after = (None, observer_bm, None, False)
    for s in senders:
        s.after = (sender_reply, None, None, False)

    res["login"] = bench.login(users, f"{b} base users")
    bench.note(f"{b} base users logged in ({res['login']['per_s']}/s, scrypt N={a.scrypt_n_used})")
    bench.settle()

    bench.phase = "baseline"
    bench.note(f"baseline: {s_count} senders, one BM each in flight, {a.interval} s apart, for {a.baseline} s")
    t = now_ns()
    for j, s in enumerate(senders):   # staggered over one interval
        s.t_mark = t + (j * interval_ns) // s_count
    sampling[0] = True
    base_start = bench.mark()
    base_t0 = now_ns()
    end = time.monotonic() + a.baseline
    bench.wait(lambda: time.monotonic() >= end, lambda: len(done), lambda: f"{len(done)} samples",
               tick=pump, poll_s=0.005)
    base_fig = bench.figures(base_start)
    base_fig.pop("_cpu"), base_fig.pop("_redis_cpu")

    bench.phase = "login storm"
    bench.note(f"storm: {a.storm} new users log in at once (from a second process, as other people would)")
    storm_start = bench.mark()
    storm_t0 = now_ns()
    storm = StormProcess(bench, a.storm)
    bench.wait(storm.finished, lambda: (len(done), storm.progress()),
               lambda: f"{storm.progress()}/{a.storm} logged in, {len(done)} samples", tick=pump, poll_s=0.005)
    storm_t1 = now_ns()
    storm_fig = bench.figures(storm_start)
    storm_fig.pop("_cpu"), storm_fig.pop("_redis_cpu")
    storm_seconds = (storm_t1 - storm_t0) / 1e9
    # Samples still in flight belong to the storm: let them finish, bounded.
    end = time.monotonic() + 5.0
    sampling[0] = False
    bench.wait(lambda: not samples or time.monotonic() > end, lambda: len(done),
               lambda: f"{len(samples)} samples in flight", poll_s=0.005)
    before = [rtt for t0, rtt in done if base_t0 <= t0 < storm_t0]
    during = [rtt for t0, rtt in done if storm_t0 <= t0 <= storm_t1]
    sb, sd = lat_summary(before), lat_summary(during)
    logged, failed_storm, storm_login_ns = storm.result()
    res["storm"] = {
        "base_users": b, "senders": s_count, "interval_s": a.interval, "storm_logins": a.storm,
        "scrypt_n": a.scrypt_n_used, "storm_logged_in": logged, "storm_failed": failed_storm,
        "storm_seconds": round(storm_seconds, 3),
        "storm_logins_per_s": round(logged / storm_seconds, 1) if storm_seconds else None,
        "storm_login_time": lat_summary(storm_login_ns),
        "bm_round_trip_before": sb, "bm_round_trip_during": sd,
        "p99_ratio": round(sd["p99_ms"] / sb["p99_ms"], 2) if sb["p99_ms"] and sd["p99_ms"] else None,
        "p50_ratio": round(sd["p50_ms"] / sb["p50_ms"], 2) if sb["p50_ms"] and sd["p50_ms"] else None,
        "baseline": base_fig, "during_storm": storm_fig,
        "server_rss_kb": bench.stats.mem_kb(),
        "note": "round trip = BM+SEND sent -> both the SEND ok and the D BM at an observer; samples are "
                "counted by their send time; the storm's users are new accounts (scrypt at the server's cost)",
    }
    if logged < a.storm:
        raise BenchError(f"only {logged} of {a.storm} storm users logged in")
    if not before or not during:
        raise BenchError("no BM round trips measured before or during the storm")


PRESENCE_MARK = b'{"op":"PRESENCE",'
OFFLINE_MARK = b'"online":false'
USERNAME_RE = re.compile(rb'"username":"([^"\\]*)"')


def run_failover(bench: Bench, a: argparse.Namespace, res: dict) -> None:
    """N users over the started nodes; SIGKILL node A; time until the users on the other
    nodes have seen PRESENCE online:false for every user of A (bounded by --limit)."""
    room = bench.room
    if room is None or room.redis is None or len(room.servers) < 2:
        raise BenchError("failover needs --nodes 2 or more: it SIGKILLs one of the nodes it started")
    n = a.users
    victim = room.servers[0]
    users = bench.make_users(n)
    on_a = [u for u in users if u.target[2] == victim.label]
    others = [u for u in users if u.target[2] != victim.label]
    if not on_a or not others:
        raise BenchError("failover needs users on the killed node and on the others (-n 2 or more)")
    nobs = min(a.observers, len(others)) if a.observers else len(others)
    observers = [others[(j * len(others)) // nobs] for j in range(nobs)]
    index = {u.name.lower(): i for i, u in enumerate(on_a)}
    seen: dict = {}                  # observer idx -> indices (in on_a) it has seen go offline
    count = [0] * len(on_a)          # observers that have seen each user of A go offline
    all_at = [0] * len(on_a)         # when the last of them did (ns)
    st = {"t_kill": 0, "first": 0, "pairs": 0, "done": 0, "duplicates": 0, "unexpected": 0}

    def on_presence(c: Conn, body: bytes) -> None:
        if not body.startswith(PRESENCE_MARK) or OFFLINE_MARK not in body:
            return
        m = USERNAME_RE.search(body)
        name = m.group(1).decode("utf-8", "replace") if m else str(bench.decode(body).get("username"))
        i = index.get(name.lower())
        if i is None or not st["t_kill"]:
            st["unexpected"] += 1    # a user not on A, or before the kill
            return
        mine = seen.setdefault(c.idx, set())
        if i in mine:
            st["duplicates"] += 1
            return
        mine.add(i)
        st["pairs"] += 1
        st["first"] = st["first"] or bench.t_rx
        count[i] += 1
        if count[i] == nobs:
            all_at[i] = bench.t_rx
            st["done"] += 1

    for u in users:
        u.after = (None, None, None, True)
    for o in observers:
        o.after = (None, None, on_presence, False)
    res["login"] = bench.login(users, f"{n} users")
    bench.note(f"{n} users logged in ({res['login']['per_s']}/s); waiting for the servers to go quiet")
    bench.settle()

    bench.phase = "failover"
    bench.note(f"SIGKILL {victim.name} ({victim.label}, {len(on_a)} users); {nobs} observers on the other "
               f"node(s) wait for them to go offline (at most {a.limit:.0f} s)")
    for u in on_a:
        u.expendable = True
    bench.stats.pids.remove(victim.pid)   # CPU and RSS of the surviving nodes from here on
    start = bench.mark()
    st["t_kill"] = now_ns()
    victim.kill()
    end = time.monotonic() + a.limit
    try:
        while st["done"] < len(on_a) and time.monotonic() < end:
            bench.step(0.01)
            now = time.monotonic()
            if now - bench.last_report > 5.0:
                bench.last_report = now
                bench.note(f"failover: {st['done']}/{len(on_a)} seen offline by every observer, "
                           f"{st['pairs']}/{len(on_a) * nobs} sightings")
    finally:
        fig = bench.figures(start)
        fig.pop("_cpu"), fig.pop("_redis_cpu")
        t0 = st["t_kill"]
        times = sorted((t - t0) / 1e9 for t in all_at if t)

        def sec(x):
            return None if x is None else round(x, 3)

        res["failover"] = {
            "users": n, "nodes": len(room.servers), "killed_node": victim.label,
            "users_on_killed_node": len(on_a), "observers": nobs,
            "observer_nodes": sorted({o.target[2] for o in observers}),
            "limit_s": a.limit, "complete": st["done"] == len(on_a),
            "seen_offline_by_all": st["done"],
            "sightings": st["pairs"], "sightings_expected": len(on_a) * nobs,
            "first_offline_s": sec((st["first"] - t0) / 1e9 if st["first"] else None),
            "offline_everywhere_s": {"n": len(times), "p50_s": sec(pct(times, 50)), "p90_s": sec(pct(times, 90)),
                                     "max_s": sec(times[-1] if times else None)},
            "duplicate_offline": st["duplicates"], "other_offline": st["unexpected"],
            "dropped_users": bench.dropped,
            **fig,
            "server_rss_kb": bench.stats.mem_kb(),
            "note": "time from the SIGKILL of the node to the read of the last observer's PRESENCE "
                    "online:false for each user of that node (max and p50 over those users); "
                    "CPU and RSS are of the surviving nodes from the kill on",
        }
    if st["done"] < len(on_a):
        raise BenchError(f"after {a.limit:.0f} s only {st['done']} of the {len(on_a)} users of the killed node "
                         f"were seen offline by all {nobs} observers ({st['pairs']} of {len(on_a) * nobs} sightings)")


SCENARIOS = {"fanout": run_fanout, "pm": run_pm, "hold": run_hold, "storm": run_storm,
             "failover": run_failover}


# --- output -----------------------------------------------------------------------------

def _lat(d: dict | None) -> str:
    if not d or not d.get("n"):
        return "-"
    return f"p50 {d['p50_ms']} ms, p99 {d['p99_ms']} ms, max {d['max_ms']} ms (n={d['n']})"


def _v(value, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:,}{unit}" if isinstance(value, int) else f"{value}{unit}"


def _nodes_cpu(d: dict) -> str:
    nodes = d.get("node_cpu_s")
    return f"; per node {', '.join(_v(x, ' s') for x in nodes)}" if nodes else ""


def _redis_rows(d: dict, unit: str, per_key: str = "redis_cpu_us_per_delivery") -> list:
    if d.get("redis_cpu_s") is None:
        return []
    text = f"{_v(d['redis_cpu_s'], ' s')} ({_v(d['redis_cpu_pct'], '%')} of one core)"
    if unit:
        text += f", {_v(d.get(per_key), ' us')} per {unit}"
    return [("Redis CPU", text + f", RSS {_v(d.get('redis_rss_kb'), ' KB')}")]


def table(res: dict) -> str:
    rows = [("scenario", res["scenario"]),
            ("server", res["server"].get("description", "")),
            ("machine", "{cpus} CPUs, {cpu_model}, Python {python}".format(**res["machine"]))]
    login = res.get("login")
    if login:
        rows.append(("login", f"{login['users']} users in {login['seconds']} s ({login['per_s']}/s)"))
    f = res.get("fanout")
    if f:
        rows += [("workload", f"{f['users']} users, {f['senders']} senders x {f['msgs_per_sender']} BMs, "
                              f"window {f['window']}, {f['msg_text_chars']}-char texts"),
                 ("deliveries", f"{_v(f['deliveries'])} of {_v(f['expected_deliveries'])} in {f['seconds']} s"),
                 ("deliveries/s", _v(f["deliveries_per_s"])),
                 ("latency", _lat(f["latency"]))]
        if "latency_cross_server" in f:
            rows += [("  same server", _lat(f["latency_same_server"])),
                     ("  cross server", _lat(f["latency_cross_server"]))]
        rows += [("server CPU/delivery", _v(f["server_cpu_us_per_delivery"], " us")),
                 ("server CPU", f"{_v(f['server_cpu_s'], ' s')} ({_v(f['server_cpu_pct'], '%')} of one core)"
                                + _nodes_cpu(f))]
        rows += _redis_rows(f, "delivery")
        rows += [("server RSS", _v(f["server_rss_kb"], " KB")),
                 ("loadgen CPU", f"{_v(f['loadgen_cpu_s'], ' s')} ({_v(f['loadgen_cpu_pct'], '%')} of one core)")]
    p = res.get("pm")
    if p:
        rows += [("round trips", f"{p['round_trips']} ({p['messages']} PMs), users at "
                                 f"{' and '.join(p['users_at'])}" + (" (cross server)" if p["cross_server"] else "")),
                 ("PM server side", _lat(p["message_server_side"])),
                 ("  PM+TARGET->TARGET", _lat(p.get("target_reply"))),
                 ("  SEND->D PM at peer", _lat(p.get("send_to_delivery"))),
                 ("round trip srv side", _lat(p["round_trip_server_side"])),
                 ("round trip total", _lat(p["round_trip_total"])),
                 ("client seal+sign", _lat(p["client_seal_sign"])),
                 ("client verify+open", _lat(p["client_verify_open"])),
                 ("server CPU/PM", _v(p["server_cpu_us_per_message"], " us") + _nodes_cpu(p))]
        rows += _redis_rows(p, "PM", "redis_cpu_us_per_message")
        rows += [("server RSS", _v(p["server_rss_kb"], " KB")),
                 ("loadgen CPU", f"{_v(p['loadgen_cpu_s'], ' s')} ({_v(p['loadgen_cpu_pct'], '%')} of one core)")]
    h = res.get("hold")
    if h:
        rows += [("online", f"{h['online_at_end']} of {h['users']} at the end"),
                 ("BM round trip", _lat(h["bm_round_trip"])),
                 ("  SEND ok", _lat(h["bm_send_ok"])),
                 ("  at receiver", _lat(h["bm_at_receiver"])),
                 ("server RSS", f"{_v(h['server_rss_empty_kb'], ' KB')} empty, {_v(h['server_rss_kb'], ' KB')} "
                                f"with {h['users']} users (peak {_v(h['server_hwm_kb'], ' KB')})"),
                 ("RSS per user", _v(h["server_rss_per_user_kb"], " KB")),
                 ("server CPU/delivery", _v(h["server_cpu_us_per_delivery"], " us")),
                 ("loadgen CPU", f"{_v(h['loadgen_cpu_s'], ' s')} ({_v(h['loadgen_cpu_pct'], '%')} of one core)")]
    s = res.get("storm")
    if s:
        rows += [("workload", f"{s['base_users']} online, {s['senders']} senders every {s['interval_s']} s; "
                              f"{s['storm_logins']} new logins at once (scrypt N={s['scrypt_n']})"),
                 ("storm", f"{s['storm_logged_in']} logged in in {s['storm_seconds']} s "
                           f"({s['storm_logins_per_s']}/s), login {_lat(s['storm_login_time'])}"),
                 ("BM RTT before", _lat(s["bm_round_trip_before"])),
                 ("BM RTT during", _lat(s["bm_round_trip_during"])),
                 ("p99 ratio", _v(s["p99_ratio"], "x")),
                 ("server CPU", f"before {_v(s['baseline']['server_cpu_pct'], '%')}, "
                                f"during {_v(s['during_storm']['server_cpu_pct'], '%')}"),
                 ("loadgen CPU", f"before {_v(s['baseline']['loadgen_cpu_pct'], '%')}, "
                                 f"during {_v(s['during_storm']['loadgen_cpu_pct'], '%')}")]
    fo = res.get("failover")
    if fo:
        o = fo["offline_everywhere_s"]
        rows += [("workload", f"{fo['users']} users over {fo['nodes']} nodes; SIGKILL {fo['killed_node']} "
                              f"({fo['users_on_killed_node']} users); {fo['observers']} observers on "
                              f"{', '.join(fo['observer_nodes'])}"),
                 ("offline everywhere", f"p50 {_v(o['p50_s'], ' s')}, p90 {_v(o['p90_s'], ' s')}, "
                                        f"max {_v(o['max_s'], ' s')} after the kill (n={o['n']}; "
                                        f"first sighting {_v(fo['first_offline_s'], ' s')})"),
                 ("sightings", f"{_v(fo['sightings'])} of {_v(fo['sightings_expected'])}"
                               + (" (complete)" if fo["complete"] else f" (INCOMPLETE after {fo['limit_s']} s)")
                               + f", {fo['duplicate_offline']} duplicates, {fo['other_offline']} other offline"),
                 ("server CPU", f"{_v(fo['server_cpu_s'], ' s')} surviving nodes ({_v(fo['server_cpu_pct'], '%')} "
                                "of one core)")]
        rows += _redis_rows(fo, "")
    if res.get("failures"):
        rows.append(("failures", json.dumps(res["failures"])))
    if res.get("server_log", {}).get("warning_lines"):
        rows.append(("server log", f"{res['server_log']['warning_lines']} warning lines, first: "
                                   f"{res['server_log']['first'][0][:100]}"))
    if res.get("error"):
        rows.append(("ERROR", res["error"]))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


# --- command line -------------------------------------------------------------------------

def parse_args(argv: list | None = None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("server and run")
    g.add_argument("--connect", action="append", type=loopback_target, default=[], metavar="HOST:PORT",
                   help="target a running server (loopback only); repeat to spread users round-robin "
                        "(default: start chatserver.py on a free 127.0.0.1 port)")
    g.add_argument("--server-pid", action="append", type=int, default=[], metavar="PID",
                   help="with --connect: server process(es) whose CPU and RSS to read from /proc")
    g.add_argument("--nodes", type=nonnegative(int), default=0, metavar="N",
                   help="start a redis-server (AOF always) and N chatserver.py nodes on it (--redis), users "
                        "round-robin over them (default: one server on its data directory, no Redis)")
    g.add_argument("--redis-server", default="redis-server", metavar="PATH",
                   help="the redis-server for --nodes (default: %(default)s on PATH)")
    g.add_argument("--redis-fsync", choices=("always", "everysec", "no"), default="always",
                   help="its --appendfsync (default: %(default)s: every acknowledged write is on disk)")
    g.add_argument("--scrypt-n", type=int, default=None, metavar="N",
                   help="scrypt cost of the started server (default: 16, storm: the server's default)")
    g.add_argument("--send-queue", type=nonnegative(int), default=16 << 20, metavar="BYTES",
                   help="--send-queue of the started server (default: %(default)s; 0 = no limit)")
    g.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for the started server (repeat; e.g. --server-arg=--frame-limit=0)")
    g.add_argument("--server-python", default=sys.executable, metavar="PATH",
                   help="interpreter for the started server (default: this one)")
    g.add_argument("--tmpdir", default=None, metavar="DIR",
                   help="where the started server's data directory goes (default: the system temp dir)")
    g.add_argument("--keep-data", action="store_true", help="keep the started server's data directory and log")
    g.add_argument("--prefix", default="", help="username prefix (default: random, 'lg' + 4 letters)")
    g.add_argument("--login-window", type=positive(int), default=200, metavar="N",
                   help="logins in flight at once (default: %(default)s)")
    g.add_argument("--deadline", type=positive(float), default=900.0, metavar="SECONDS",
                   help="the whole run must end within this (default: %(default)s)")
    g.add_argument("--stall", type=positive(float), default=20.0, metavar="SECONDS",
                   help="give up after this long without progress (default: %(default)s)")
    g.add_argument("--size", type=positive(int), default=64, metavar="CHARS",
                   help="message text length (default: %(default)s)")
    g.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")

    parser = argparse.ArgumentParser(prog="loadgen.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Each scenario has --help. Options go after the scenario name.")
    sub = parser.add_subparsers(dest="scenario", metavar="SCENARIO")
    sub.required = True
    p = sub.add_parser("fanout", parents=[common], help="N users, K senders, M BMs each, window W")
    p.add_argument("-n", "--users", type=positive(int), default=1000, help="users online (default: %(default)s)")
    p.add_argument("-k", "--senders", type=positive(int), default=10, help="senders (default: %(default)s)")
    p.add_argument("-m", "--messages", type=positive(int), default=50, help="BMs per sender (default: %(default)s)")
    p.add_argument("-w", "--window", type=positive(int), default=20,
                   help="unconfirmed BMs per sender at most (default: %(default)s)")
    p.add_argument("--probes", type=nonnegative(int), default=50,
                   help="receivers sampled for latency (default: %(default)s)")
    p = sub.add_parser("pm", parents=[common], help="one pair ping-pongs private messages")
    p.add_argument("--count", type=positive(int), default=200, help="round trips (default: %(default)s)")
    p.add_argument("--warmup", type=nonnegative(int), default=5,
                   help="round trips first, not counted (default: %(default)s)")
    p.add_argument("--same-node", action="store_true",
                   help="both users on the first server (default: round-robin, i.e. on two different "
                        "servers when there are several)")
    p = sub.add_parser("hold", parents=[common], help="N users online; BM round trips; RSS per user")
    p.add_argument("-n", "--users", type=positive(int), default=10000, help="users online (default: %(default)s)")
    p.add_argument("--samples", type=positive(int), default=200, help="BM round trips (default: %(default)s)")
    p.add_argument("--probes", type=positive(int), default=10,
                   help="receivers the round trips end at, in turn (default: %(default)s)")
    p.add_argument("--gap", type=nonnegative(float), default=0.0, metavar="SECONDS",
                   help="pause between round trips (default: %(default)s)")
    p = sub.add_parser("storm", parents=[common], help="BM round trips before and during a login storm")
    p.add_argument("--base", type=positive(int), default=100, help="users online (default: %(default)s)")
    p.add_argument("--senders", type=positive(int), default=10,
                   help="base users sending BMs (default: %(default)s)")
    p.add_argument("--interval", type=nonnegative(float), default=0.1, metavar="SECONDS",
                   help="a sender's pause after each round trip (default: %(default)s)")
    p.add_argument("--baseline", type=positive(float), default=5.0, metavar="SECONDS",
                   help="measuring time before the storm (default: %(default)s)")
    p.add_argument("--storm", type=positive(int), default=200, help="new logins at once (default: %(default)s)")
    p = sub.add_parser("failover", parents=[common],
                       help="N users over 2+ started nodes; SIGKILL one; time until the others see its users offline")
    p.add_argument("-n", "--users", type=positive(int), default=1000, help="users in all (default: %(default)s)")
    p.add_argument("--observers", type=nonnegative(int), default=0,
                   help="users on the surviving nodes that check every PRESENCE (default: 0 = all of them)")
    p.add_argument("--limit", type=positive(float), default=30.0, metavar="SECONDS",
                   help="give up waiting for the offline presences after this (default: %(default)s)")
    a = parser.parse_args(argv)
    if a.server_pid and not a.connect:
        parser.error("--server-pid goes with --connect (a started server is measured anyway)")
    if a.nodes and a.connect:
        parser.error("--nodes starts its own servers; --connect targets running ones: give one of them")
    if a.scenario == "failover" and a.nodes < 2:
        parser.error("failover needs --nodes 2 or more (it SIGKILLs one of the nodes it started)")
    return a


class Terminated(Exception):
    """SIGTERM reached the load generator: end the run, stopping what it started."""


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv: list | None = None) -> int:
    a = parse_args(argv)
    res: dict = {"scenario": a.scenario, "machine": machine_info(),
                 "args": {k: v for k, v in vars(a).items() if k not in ("connect", "json", "quiet")},
                 "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    users = {"fanout": getattr(a, "users", 0), "pm": 2, "hold": getattr(a, "users", 0),
             "storm": getattr(a, "base", 0) + getattr(a, "storm", 0), "failover": getattr(a, "users", 0)}[a.scenario]
    room: StartedRoom | None = None
    bench: Bench | None = None
    status = 0
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        res["fd_limit"] = raise_fd_limit(users + 64)
        redis_stats = None
        if a.connect:
            targets = a.connect
            stats = ServerStats(a.server_pid)
            a.scrypt_n_used = None
            res["server"] = {"description": "running server(s) " + ", ".join(t[2] for t in targets),
                             "pids": a.server_pid}
            keys = pg3lib.KeyPair.generate()
        else:
            scrypt_n = a.scrypt_n or (None if a.scenario == "storm" else 16)
            if scrypt_n is None:   # the server's own default
                scrypt_n = passwords.DEFAULT_SCRYPT_N
            a.scrypt_n_used = scrypt_n
            if a.scenario == "hold" and users // max(1, a.nodes) + 1200 > res["fd_limit"]["hard"]:
                print(f"loadgen: warning: the server's open-file limit (hard {res['fd_limit']['hard']}) leaves "
                      f"little room for {users} connections plus its history files", file=sys.stderr)
            room = StartedRoom(a, scrypt_n, a.nodes)
            room.start()
            keys = pg3lib.KeyPair.generate()   # meanwhile the servers make their own key
            room.wait_ready()
            targets = [(socket.AF_INET, ("127.0.0.1", s.port), s.label) for s in room.servers]
            stats = ServerStats(room.pids)
            if room.redis is not None:
                redis_stats = ServerStats([room.redis.pid])
            res["server"] = room.info()
        bench = Bench(a, targets, stats, room, keys, redis_stats)
        bench.note(res["server"]["description"])
        SCENARIOS[a.scenario](bench, a, res)
    except BenchError as exc:
        res["error"] = str(exc)
        status = 1
    except KeyboardInterrupt:
        res["error"] = "interrupted"
        status = 130
    except Terminated:
        res["error"] = "terminated (SIGTERM)"
        status = 143
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)   # the cleanup below runs to its (bounded) end
        if bench is not None:
            res["failures"] = dict(bench.failures)
            bench.close_all([key.data for key in list(bench.sel.get_map().values())])
        if room is not None:
            codes = room.stop()
            bad = [(s.name, code) for s, code in zip(room.servers, codes) if not s.killed and code not in (0, None)]
            res.setdefault("server", {})["exit_status"] = bad[0][1] if bad else 0
            if len(codes) > 1:
                res["server"]["exit_statuses"] = codes
            res["server_log"] = room.log_summary()
            if bad and not res.get("error"):
                res["error"] = ", ".join(f"{name} exited with status {code}" for name, code in bad)
                status = 1
            room.cleanup()
        signal.signal(signal.SIGTERM, previous)
    if a.json:
        print(json.dumps(res, indent=1))
    else:
        print(table(res))
    if res.get("error"):
        print(f"loadgen: {res['error']}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
