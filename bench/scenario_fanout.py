"""Scenario ``fanout``: N users online, K of them send M BMs each, at most W unconfirmed.

Measures deliveries per second and server (and Redis) CPU per delivery, counted at
every receiver, and the latency of each BM at ``--probes`` sampled receivers (send
time in the text, read time at the probe; split into sender and probe on the same
server or on different ones when there are several). Receivers that are not probes
only count BM bodies in the raw byte stream, so the load generator stays cheap.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time

import framing
from loadgen_driver import BM_OK, BM_REQUEST, READY, SEND_OK, Bench, Conn, now_ns, padding
from loadgen_errors import BenchError
from loadgen_options import nonnegative, positive
from loadgen_report import core_text, latency_text, loadgen_rows, node_cpu_text, redis_rows, value_text
from loadgen_stats import lat_summary, per
from protocol import Op

HELP = "N users, K senders, M BMs each, window W"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--users", type=positive(int), default=1000, help="users online (default: %(default)s)")
    p.add_argument("-k", "--senders", type=positive(int), default=10, help="senders (default: %(default)s)")
    p.add_argument("-m", "--messages", type=positive(int), default=50, help="BMs per sender (default: %(default)s)")
    p.add_argument("-w", "--window", type=positive(int), default=20,
                   help="unconfirmed BMs per sender at most (default: %(default)s)")
    p.add_argument("--probes", type=nonnegative(int), default=50,
                   help="receivers sampled for latency (default: %(default)s)")
    p.add_argument("--ngircd", action="store_true",
                   help="then run the team's ngircd kit on the same workload and print its figures beside ours "
                   "(e.g. -n 2000 -k 1 -m 30 -w 1: one BM at a time to 2,000 users)")
    p.add_argument("--ngircd-bench", default=NGIRCD_BENCH, metavar="PATH",
                   help="the kit (default: %(default)s)")
    p.add_argument("--tls", action="store_true",
                   help="every user connects with TLS (docs/PROTOCOL.md section 0), the pinned key checked")


NGIRCD_BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ngircd-bench")   # the kit, copied here


def users_needed(a: argparse.Namespace) -> int:
    return a.users


def run(bench: Bench, a: argparse.Namespace, res: dict) -> None:
    """N users, K senders, M BMs each, at most W unconfirmed per sender."""
    fanout = Fanout(bench, a)
    fanout.log_in(res)
    fanout.send_and_count(res)
    if a.ngircd:
        bench.note(f"ngircd: {a.ngircd_bench} {a.users} {a.senders} {a.messages} {a.window}")
        res["fanout"]["ngircd"] = ngircd(a)


def ngircd(a: argparse.Namespace) -> dict:
    """The ngircd kit's figures for the same N K M W (its JSON line), or the error."""
    try:
        done = subprocess.run([a.ngircd_bench, str(a.users), str(a.senders), str(a.messages), str(a.window)],
                              capture_output=True, text=True, timeout=300)
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        return {"error": f"the ngircd kit gave no figures: {exc}"}


def _spread(candidates: list, count: int) -> list:
    """``count`` of the candidates, evenly spaced over the list (none if count is 0)."""
    nprobe = min(count, len(candidates))
    return [candidates[(j * len(candidates)) // nprobe] for j in range(nprobe)] if nprobe else []


class Fanout:
    """One fan-out run: who sends and who is sampled, and what they have counted."""

    def __init__(self, bench: Bench, a: argparse.Namespace) -> None:
        n, k = a.users, a.senders
        if n < 2 or not 1 <= k <= n:
            raise BenchError("fanout needs at least 2 users and 1..N senders")
        self.bench = bench
        self.a = a
        self.users = bench.make_users(n)
        self.senders = self.users[1:1 + k] if k < n else self.users
        sender_set = set(self.senders)
        self.probes = _spread([u for u in self.users if u not in sender_set], a.probes)
        self.expected = k * a.messages * (n - 1)   # deliveries: every BM to every other user
        self.lat: list = []
        self.lat_same: list = []    # with several servers: sender and probe on the same one
        self.lat_cross: list = []   # ... or on different ones
        self.where = {u.idx: u.target[2] for u in self.senders}
        self.several = len({t[2] for t in bench.targets}) > 1
        self.confirmed = 0          # SEND ok replies, all senders
        self.t_last = 0.0           # when the last of them came
        self.last_count = [0, 0.0]  # progress value and when it last changed
        self.pad = padding(a.size, 40)
        self._assign_roles()

    # --- what each connection does with its frames ------------------------------------
    def _assign_roles(self) -> None:
        for u in self.users:
            u.after = (None, None, None, True)
        for p in self.probes:
            p.after = (None, self._probe_bm, None, False)
        for s in self.senders:
            s.after = (self._sender_reply, None, None, False)

    def _probe_bm(self, c: Conn, body: bytes) -> None:
        parts = self.bench.decode(body).get("text", "").split(" ", 4)
        if parts[0] == "B" and len(parts) > 3:
            ns = self.bench.t_rx - int(parts[3])
            self.lat.append(ns)
            if self.several:
                (self.lat_same if self.where.get(int(parts[1])) == c.target[2] else self.lat_cross).append(ns)

    def _sender_reply(self, c: Conn, body: bytes) -> None:
        if body.startswith(SEND_OK):
            c.confirmed += 1
            self.confirmed += 1
            self.t_last = time.monotonic()
        elif not body.startswith(BM_OK):
            self.bench.unexpected(c, body, "BM/SEND")

    # --- the phases -------------------------------------------------------------------
    def log_in(self, res: dict) -> None:
        bench = self.bench
        res["login"] = bench.login(self.users, f"{self.a.users} users")
        bench.note(f"{self.a.users} users logged in ({res['login']['per_s']}/s); waiting for the server to go quiet")
        bench.settle()

    def send_and_count(self, res: dict) -> None:
        """The measured phase: every sender keeps its window full until all BMs are delivered
        and confirmed; the figures go into res["fanout"] even when the phase fails."""
        bench, a = self.bench, self.a
        bench.bm_delivered = 0
        bench.phase = "fan-out"
        bench.note(f"fan-out: {a.senders} senders x {a.messages} messages to {a.users - 1} others "
                   f"({self.expected} deliveries)")
        start = bench.mark()
        self.t_last = start["t"]
        self.last_count = [0, start["t"]]
        try:
            bench.wait(self._done, self._progress, self._describe, tick=self._pump, poll_s=0.02)
        finally:
            seconds = max(self.last_count[1], self.t_last) - start["t"]
            res["fanout"] = self._result(start, seconds)
        delivered = res["fanout"]["deliveries"]
        if delivered > self.expected:
            raise BenchError(f"{delivered} deliveries counted, more than the {self.expected} expected")

    def _pump(self) -> None:
        """Top up every ready sender's window with BM+SEND pairs, in one write each."""
        m, w, pad, send = self.a.messages, self.a.window, self.pad, Op.SEND
        for s in self.senders:
            if s.sent < m and s.sent - s.confirmed < w and s.state == READY:
                chunks = []
                while s.sent < m and s.sent - s.confirmed < w:
                    s.sent += 1
                    chunks.append(BM_REQUEST)
                    chunks.append(framing.command({"op": send, "text": f"B {s.idx} {s.sent} {now_ns()} {pad}"}))
                self.bench.send(s, b"".join(chunks))

    def _progress(self) -> int:
        value = self.bench.bm_delivered + self.confirmed
        if value != self.last_count[0]:
            self.last_count[0], self.last_count[1] = value, time.monotonic()
        return value

    def _done(self) -> bool:
        return self.bench.bm_delivered >= self.expected and self.confirmed >= self.a.senders * self.a.messages

    def _describe(self) -> str:
        return (f"{self.bench.bm_delivered}/{self.expected} delivered, "
                f"{self.confirmed}/{self.a.senders * self.a.messages} confirmed")

    def _result(self, start: dict, seconds: float) -> dict:
        bench, a = self.bench, self.a
        fig, cpu, rcpu = bench.figures(start, seconds)
        delivered = bench.bm_delivered
        k, m = a.senders, a.messages
        result = {
            "tls": bool(a.tls), "users": a.users, "senders": k, "msgs_per_sender": m, "window": a.window,
            "msg_text_chars": a.size,
            "expected_deliveries": self.expected, "deliveries": delivered, "confirmed": self.confirmed,
            "complete": delivered >= self.expected and self.confirmed >= k * m,
            "dropped_users": bench.dropped,
            "seconds": round(seconds, 3),
            "deliveries_per_s": round(delivered / seconds) if seconds > 0 else None,
            "latency": lat_summary(self.lat), "latency_probes": len(self.probes),
            "server_cpu_us_per_delivery": per(cpu, delivered, 3),
            "redis_cpu_us_per_delivery": per(rcpu, delivered, 3),
            "redis_cpu_us_per_bm": per(rcpu, self.confirmed, 1),
            "servers": len(bench.targets),
            **fig,
            "server_rss_kb": bench.stats.mem_kb(),
        }
        if self.several:
            result["latency_same_server"] = lat_summary(self.lat_same)
            result["latency_cross_server"] = lat_summary(self.lat_cross)
        return result


def table_rows(f: dict) -> list:
    rows = [("workload", f"{f['users']} users{' on TLS' if f.get('tls') else ''}, {f['senders']} senders x "
                         f"{f['msgs_per_sender']} BMs, window {f['window']}, {f['msg_text_chars']}-char texts"),
            ("deliveries", f"{value_text(f['deliveries'])} of {value_text(f['expected_deliveries'])} "
                           f"in {f['seconds']} s"),
            ("deliveries/s", value_text(f["deliveries_per_s"])),
            ("latency", latency_text(f["latency"]))]
    if "latency_cross_server" in f:
        rows += [("  same server", latency_text(f["latency_same_server"])),
                 ("  cross server", latency_text(f["latency_cross_server"]))]
    rows += [("server CPU/delivery", value_text(f["server_cpu_us_per_delivery"], " us")),
             ("server CPU", core_text(f["server_cpu_s"], f["server_cpu_pct"]) + node_cpu_text(f))]
    rows += redis_rows(f, "delivery")
    if f.get("redis_cpu_s") is not None:
        rows.append(("  per BM", value_text(f.get("redis_cpu_us_per_bm"), " us")))
    if "ngircd" in f:
        g = f["ngircd"]
        rows.append(("ngircd, same session", g["error"] if "error" in g else
                     f"{value_text(g.get('server_cpu_us_per_delivery'), ' us')} server CPU/delivery, "
                     f"{value_text(g.get('deliveries_per_s'))} deliveries/s, latency "
                     f"p50 {g['latency']['p50_ms']} ms, p99 {g['latency']['p99_ms']} ms"))
    rows += [("server RSS", value_text(f["server_rss_kb"], " KB"))] + loadgen_rows(f)
    return rows
