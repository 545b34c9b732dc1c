"""Scenario ``hold``: many users online; BM round trips one at a time; server RSS per user.

Logs N users in and lets the server go quiet, then sends ``--samples`` BMs, each
after the last has reached all N-1 others; a round trip ends when both the SEND
reply and the D BM at one of ``--probes`` receivers (in turn) are in. RSS per user
is (VmRSS with N users - VmRSS of the empty server) / N.
"""

from __future__ import annotations

import argparse
import time

from loadgen_driver import BM_OK, READY, SEND_OK, Bench, Conn, now_ns, padding, send_bm
from loadgen_errors import BenchError
from loadgen_options import nonnegative, positive
from loadgen_report import latency_text, loadgen_rows, value_text
from loadgen_stats import lat_summary, per

HELP = "N users online; BM round trips; RSS per user"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--users", type=positive(int), default=10000, help="users online (default: %(default)s)")
    p.add_argument("--samples", type=positive(int), default=200, help="BM round trips (default: %(default)s)")
    p.add_argument("--probes", type=positive(int), default=10,
                   help="receivers the round trips end at, in turn (default: %(default)s)")
    p.add_argument("--gap", type=nonnegative(float), default=0.0, metavar="SECONDS",
                   help="pause between round trips (default: %(default)s)")


def users_needed(a: argparse.Namespace) -> int:
    return a.users


def run(bench: Bench, a: argparse.Namespace, res: dict) -> None:
    """N users online; BM round trips one at a time; server RSS per connection."""
    hold = Hold(bench, a)
    hold.log_in(res)
    hold.round_trips(res)


class Hold:
    """One hold run: the sender, the probes, the sample in flight and the times measured."""

    def __init__(self, bench: Bench, a: argparse.Namespace) -> None:
        n = a.users
        if n < 2:
            raise BenchError("hold needs at least 2 users")
        self.bench = bench
        self.a = a
        self.users = bench.make_users(n)
        self.sender = self.users[0]
        self.nprobe = max(1, min(a.probes, n - 1))
        self.probes = [self.users[1 + ((j + 1) * (n - 1)) // self.nprobe - 1] for j in range(self.nprobe)]
        # the sample in flight: number, send time, SEND ok and D BM read times, its probe,
        # and the deliveries counted once it is fully delivered
        self.cur = {"i": -1, "t0": 0, "ok": 0, "rx": 0, "receiver": None, "target": 0}
        self.rtts: list = []
        self.ok_rtts: list = []
        self.rx_rtts: list = []
        self.rss0 = self.rss1 = self.hwm = None
        for u in self.users:
            u.after = (None, None, None, True)
        for p in self.probes:
            p.after = (None, self._probe_bm, None, False)
        self.sender.after = (self._sender_reply, None, None, False)

    def _sender_reply(self, c: Conn, body: bytes) -> None:
        if body.startswith(SEND_OK):
            self.cur["ok"] = self.bench.t_rx
        elif not body.startswith(BM_OK):
            self.bench.unexpected(c, body, "BM/SEND")

    def _probe_bm(self, c: Conn, body: bytes) -> None:
        cur = self.cur
        if c is cur["receiver"]:
            parts = self.bench.decode(body).get("text", "").split(" ", 3)
            if parts[0] == "H" and int(parts[1]) == cur["i"]:
                cur["rx"] = self.bench.t_rx

    # --- the phases -------------------------------------------------------------------
    def log_in(self, res: dict) -> None:
        """Log everyone in, reading the server's RSS before and after (once it is quiet)."""
        bench, n = self.bench, self.a.users
        self.rss0 = bench.stats.mem_kb()
        res["login"] = bench.login(self.users, f"{n} users")
        bench.note(f"{n} users logged in ({res['login']['per_s']}/s); waiting for the server to go quiet")
        bench.settle(60.0)
        self.rss1 = bench.stats.mem_kb()
        self.hwm = bench.stats.mem_kb("VmHWM")

    def round_trips(self, res: dict) -> None:
        """The measured phase; res["hold"] even when it fails."""
        bench, a = self.bench, self.a
        pad = padding(a.size, 40)
        bench.phase = "BM round trips"
        bench.note(f"{a.samples} BM round trips with {a.users} users online")
        bench.bm_delivered = 0
        start = bench.mark()
        try:
            for i in range(a.samples):
                self._sample(i, pad)
                if a.gap:
                    end = time.monotonic() + a.gap
                    while time.monotonic() < end:
                        bench.step(max(0.0, end - time.monotonic()))
        finally:
            res["hold"] = self._result(start)

    def _sample(self, i: int, pad: str) -> None:
        """One BM to everyone, ended at probe i mod --probes; waits for every delivery."""
        bench, cur = self.bench, self.cur
        receiver = self.probes[i % self.nprobe]
        cur.update({"i": i, "t0": now_ns(), "ok": 0, "rx": 0, "receiver": receiver})
        send_bm(bench, self.sender, f"H {i} {cur['t0']} {pad}")
        cur["target"] = (i + 1) * (self.a.users - 1)
        bench.wait(lambda: cur["ok"] and cur["rx"] and bench.bm_delivered >= cur["target"],
                   lambda: (bench.bm_delivered, cur["ok"], cur["rx"]),
                   lambda: f"sample {cur['i']}: {bench.bm_delivered}/{cur['target']} delivered", poll_s=0.01)
        self.rtts.append(max(cur["ok"], cur["rx"]) - cur["t0"])
        self.ok_rtts.append(cur["ok"] - cur["t0"])
        self.rx_rtts.append(cur["rx"] - cur["t0"])

    def _result(self, start: dict) -> dict:
        bench, a, n = self.bench, self.a, self.a.users
        fig, cpu, rcpu = bench.figures(start)
        delivered = bench.bm_delivered
        online = sum(1 for u in self.users if u.state == READY)
        rss0, rss1 = self.rss0, self.rss1
        return {
            "users": n, "online_at_end": online, "dropped_users": bench.dropped,
            "samples": len(self.rtts), "probes": self.nprobe, "gap_s": a.gap,
            "bm_round_trip": lat_summary(self.rtts),
            "bm_send_ok": lat_summary(self.ok_rtts),
            "bm_at_receiver": lat_summary(self.rx_rtts),
            "deliveries": delivered,
            "server_cpu_us_per_delivery": per(cpu, delivered, 3),
            "redis_cpu_us_per_delivery": per(rcpu, delivered, 3),
            **fig,
            "server_rss_empty_kb": rss0, "server_rss_kb": rss1, "server_hwm_kb": self.hwm,
            "server_rss_per_user_kb": (round((rss1 - rss0) / n, 2) if rss0 is not None and rss1 is not None
                                       else None),
            "note": "round trip = BM+SEND sent -> both the SEND ok and the D BM at a probe receiver "
                    "(probes spread over the login order); one BM at a time, each after the last is fully "
                    "delivered",
        }


def table_rows(h: dict) -> list:
    return [("online", f"{h['online_at_end']} of {h['users']} at the end"),
            ("BM round trip", latency_text(h["bm_round_trip"])),
            ("  SEND ok", latency_text(h["bm_send_ok"])),
            ("  at receiver", latency_text(h["bm_at_receiver"])),
            ("server RSS", f"{value_text(h['server_rss_empty_kb'], ' KB')} empty, "
                           f"{value_text(h['server_rss_kb'], ' KB')} with {h['users']} users "
                           f"(peak {value_text(h['server_hwm_kb'], ' KB')})"),
            ("RSS per user", value_text(h["server_rss_per_user_kb"], " KB")),
            ("server CPU/delivery", value_text(h["server_cpu_us_per_delivery"], " us"))] + loadgen_rows(h)
