"""Scenario ``storm``: BM round trips among base users, before and during a login storm.

``--base`` users log in (at the server's real scrypt cost) and ``--senders`` of
them each keep one BM in flight to an observer, ``--interval`` apart. After a
``--baseline`` spell, ``--storm`` new accounts log in at once from a forked
process (as other people would: the sealing does not stall the measuring loop).
Round trips are counted by their send time; the ratio is p99 during the storm
over p99 before it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import time

from loadgen_driver import BM_OK, READY, SEND_OK, Bench, Conn, now_ns, padding, send_bm
from loadgen_errors import BenchError
from loadgen_options import nonnegative, positive
from loadgen_report import latency_text, value_text
from loadgen_stats import ServerStats, lat_summary

HELP = "BM round trips before and during a login storm"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", type=positive(int), default=100, help="users online (default: %(default)s)")
    p.add_argument("--senders", type=positive(int), default=10,
                   help="base users sending BMs (default: %(default)s)")
    p.add_argument("--interval", type=nonnegative(float), default=0.1, metavar="SECONDS",
                   help="a sender's pause after each round trip (default: %(default)s)")
    p.add_argument("--baseline", type=positive(float), default=5.0, metavar="SECONDS",
                   help="measuring time before the storm (default: %(default)s)")
    p.add_argument("--storm", type=positive(int), default=200, help="new logins at once (default: %(default)s)")


def users_needed(a: argparse.Namespace) -> int:
    return a.base + a.storm


def run(bench: Bench, a: argparse.Namespace, res: dict) -> None:
    """BM round trips among base users, before and during a storm of new logins."""
    storm = Storm(bench, a)
    storm.log_in(res)
    storm.baseline()
    storm.storm()
    storm.drain()
    storm.report(res)


class StormProcess:
    """Log users in from a forked child process, so the sealing of 200 passwords at once
    (about 0.3 ms each) does not stall the loop that measures the round trips."""

    def __init__(self, bench: Bench, count: int) -> None:
        self.count = count
        self.read_fd, write_fd = os.pipe()
        self.report = b""
        self.eof = False
        self.pid = os.fork()
        if self.pid == 0:
            self._child(bench, count, write_fd)   # never returns
        os.close(write_fd)
        os.set_blocking(self.read_fd, False)

    def _child(self, bench: Bench, count: int, write_fd: int) -> None:
        """The child: its own loop, its own users; reports, then stays online until told."""
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


class Storm:
    """One storm run: the observer, the senders, the samples in flight and done, the phases' times."""

    def __init__(self, bench: Bench, a: argparse.Namespace) -> None:
        b, s_count = a.base, a.senders
        if b < 2 or not 1 <= s_count < b:
            raise BenchError("storm needs at least 2 base users and 1..base-1 senders")
        self.bench = bench
        self.a = a
        self.users = bench.make_users(b)
        self.observer = self.users[0]
        self.senders = self.users[1:1 + s_count]
        self.samples: dict = {}   # in flight: number -> [t0_ns, SEND ok ns, D BM ns, sender]
        self.done: list = []      # (t0_ns, rtt_ns)
        self.seq = 0
        self.interval_ns = int(a.interval * 1e9)
        self.pad = padding(a.size, 40)
        self.sampling = False
        self.base_t0 = self.storm_t0 = self.storm_t1 = 0
        self.base_fig: dict = {}
        self.storm_fig: dict = {}
        self.process: StormProcess | None = None
        for u in self.users:
            u.after = (None, None, None, True)
        self.observer.after = (None, self._observer_bm, None, False)
        for s in self.senders:
            s.after = (self._sender_reply, None, None, False)

    # --- samples: one BM in flight per sender ------------------------------------------
    def _finish(self, rec: list) -> None:
        self.done.append((rec[0], max(rec[1], rec[2]) - rec[0]))
        s = rec[3]
        s.cur = None
        # +-20% jitter, so that the senders do not fall into step and send in bursts
        s.t_mark = now_ns() + int(self.interval_ns * random.uniform(0.8, 1.2))

    def _sender_reply(self, c: Conn, body: bytes) -> None:
        if body.startswith(SEND_OK):
            rec = self.samples.get(c.cur)
            if rec is not None:
                rec[1] = self.bench.t_rx
                if rec[2]:
                    self._finish(self.samples.pop(c.cur))
        elif not body.startswith(BM_OK):
            self.bench.unexpected(c, body, "BM/SEND")

    def _observer_bm(self, c: Conn, body: bytes) -> None:
        parts = self.bench.decode(body).get("text", "").split(" ", 3)
        if parts[0] == "S":
            rec = self.samples.get(int(parts[1]))
            if rec is not None:
                rec[2] = self.bench.t_rx
                if rec[1]:
                    self._finish(self.samples.pop(int(parts[1])))

    def _pump(self) -> None:
        if not self.sampling:
            return
        for s in self.senders:
            if s.cur is None and now_ns() >= s.t_mark and s.state == READY:
                t = now_ns()
                i = self.seq
                self.seq += 1
                self.samples[i] = [t, 0, 0, s]
                s.cur = i
                send_bm(self.bench, s, f"S {i} {t} {self.pad}")

    # --- the phases -------------------------------------------------------------------
    def log_in(self, res: dict) -> None:
        bench, a = self.bench, self.a
        res["login"] = bench.login(self.users, f"{a.base} base users")
        bench.note(f"{a.base} base users logged in ({res['login']['per_s']}/s, scrypt N={a.scrypt_n_used})")
        bench.settle()

    def baseline(self) -> None:
        """Sample for --baseline seconds, the senders staggered over one interval."""
        bench, a = self.bench, self.a
        s_count = len(self.senders)
        bench.phase = "baseline"
        bench.note(f"baseline: {s_count} senders, one BM each in flight, {a.interval} s apart, for {a.baseline} s")
        t = now_ns()
        for j, s in enumerate(self.senders):
            s.t_mark = t + (j * self.interval_ns) // s_count
        self.sampling = True
        start = bench.mark()
        self.base_t0 = now_ns()
        end = time.monotonic() + a.baseline
        bench.wait(lambda: time.monotonic() >= end, lambda: len(self.done), lambda: f"{len(self.done)} samples",
                   tick=self._pump, poll_s=0.005)
        self.base_fig, _, _ = bench.figures(start)

    def storm(self) -> None:
        """Keep sampling while --storm new users log in from the second process."""
        bench, a = self.bench, self.a
        bench.phase = "login storm"
        bench.note(f"storm: {a.storm} new users log in at once (from a second process, as other people would)")
        start = bench.mark()
        self.storm_t0 = now_ns()
        process = self.process = StormProcess(bench, a.storm)
        bench.wait(process.finished, lambda: (len(self.done), process.progress()),
                   lambda: f"{process.progress()}/{a.storm} logged in, {len(self.done)} samples",
                   tick=self._pump, poll_s=0.005)
        self.storm_t1 = now_ns()
        self.storm_fig, _, _ = bench.figures(start)

    def drain(self) -> None:
        """Samples still in flight belong to the storm: let them finish, bounded."""
        end = time.monotonic() + 5.0
        self.sampling = False
        self.bench.wait(lambda: not self.samples or time.monotonic() > end, lambda: len(self.done),
                        lambda: f"{len(self.samples)} samples in flight", poll_s=0.005)

    def report(self, res: dict) -> None:
        """res["storm"]; an error if the storm or the sampling came short."""
        a = self.a
        storm_seconds = (self.storm_t1 - self.storm_t0) / 1e9
        before = [rtt for t0, rtt in self.done if self.base_t0 <= t0 < self.storm_t0]
        during = [rtt for t0, rtt in self.done if self.storm_t0 <= t0 <= self.storm_t1]
        sb, sd = lat_summary(before), lat_summary(during)
        assert self.process is not None
        logged, failed_storm, storm_login_ns = self.process.result()
        res["storm"] = {
            "base_users": a.base, "senders": a.senders, "interval_s": a.interval, "storm_logins": a.storm,
            "scrypt_n": a.scrypt_n_used, "storm_logged_in": logged, "storm_failed": failed_storm,
            "storm_seconds": round(storm_seconds, 3),
            "storm_logins_per_s": round(logged / storm_seconds, 1) if storm_seconds else None,
            "storm_login_time": lat_summary(storm_login_ns),
            "bm_round_trip_before": sb, "bm_round_trip_during": sd,
            "p99_ratio": round(sd["p99_ms"] / sb["p99_ms"], 2) if sb["p99_ms"] and sd["p99_ms"] else None,
            "p50_ratio": round(sd["p50_ms"] / sb["p50_ms"], 2) if sb["p50_ms"] and sd["p50_ms"] else None,
            "baseline": self.base_fig, "during_storm": self.storm_fig,
            "server_rss_kb": self.bench.stats.mem_kb(),
            "note": "round trip = BM+SEND sent -> both the SEND ok and the D BM at an observer; samples are "
                    "counted by their send time; the storm's users are new accounts (scrypt at the server's cost)",
        }
        if logged < a.storm:
            raise BenchError(f"only {logged} of {a.storm} storm users logged in")
        if not before or not during:
            raise BenchError("no BM round trips measured before or during the storm")


def table_rows(s: dict) -> list:
    return [("workload", f"{s['base_users']} online, {s['senders']} senders every {s['interval_s']} s; "
                         f"{s['storm_logins']} new logins at once (scrypt N={s['scrypt_n']})"),
            ("storm", f"{s['storm_logged_in']} logged in in {s['storm_seconds']} s "
                      f"({s['storm_logins_per_s']}/s), login {latency_text(s['storm_login_time'])}"),
            ("BM RTT before", latency_text(s["bm_round_trip_before"])),
            ("BM RTT during", latency_text(s["bm_round_trip_during"])),
            ("p99 ratio", value_text(s["p99_ratio"], "x")),
            ("server CPU", f"before {value_text(s['baseline']['server_cpu_pct'], '%')}, "
                           f"during {value_text(s['during_storm']['server_cpu_pct'], '%')}"),
            ("loadgen CPU", f"before {value_text(s['baseline']['loadgen_cpu_pct'], '%')}, "
                            f"during {value_text(s['during_storm']['loadgen_cpu_pct'], '%')}")]
