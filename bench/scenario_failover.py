"""Scenario ``failover`` (``--nodes 2`` or more): SIGKILL a node, time the offline presences.

N users go round-robin over the started nodes; ``--observers`` of the users on the
other nodes (default: all of them) walk every frame. After login and a quiet
spell, node 0 is SIGKILLed; for each of its users, the time from the kill to the
read of the *last* observer's PRESENCE online:false for it. Waiting ends after
``--limit`` seconds: fewer than all seen is an error.
"""

from __future__ import annotations

import argparse
import re
import time

from loadgen_driver import PRESENCE_MARK, Bench, Conn, now_ns
from loadgen_errors import BenchError
from loadgen_options import nonnegative, positive
from loadgen_report import redis_rows, value_text
from loadgen_stats import pct

HELP = "N users over 2+ started nodes; SIGKILL one; time until the others see its users offline"

OFFLINE_MARK = b'"online":false'
USERNAME_FIELD = re.compile(rb'"username":"([^"\\]*)"')


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--users", type=positive(int), default=1000, help="users in all (default: %(default)s)")
    p.add_argument("--observers", type=nonnegative(int), default=0,
                   help="users on the surviving nodes that check every PRESENCE (default: 0 = all of them)")
    p.add_argument("--limit", type=positive(float), default=30.0, metavar="SECONDS",
                   help="give up waiting for the offline presences after this (default: %(default)s)")


def users_needed(a: argparse.Namespace) -> int:
    return a.users


def run(bench: Bench, a: argparse.Namespace, res: dict) -> None:
    """N users over the started nodes; SIGKILL node A; time until the users on the other
    nodes have seen PRESENCE online:false for every user of A (bounded by --limit)."""
    failover = Failover(bench, a)
    failover.log_in(res)
    failover.kill_and_watch(res)


class Failover:
    """One failover run: the node to kill, its users, the observers and what they have seen."""

    def __init__(self, bench: Bench, a: argparse.Namespace) -> None:
        room = bench.room
        if room is None or room.redis is None or len(room.servers) < 2:
            raise BenchError("failover needs --nodes 2 or more: it SIGKILLs one of the nodes it started")
        self.bench = bench
        self.a = a
        self.room = room
        self.victim = room.servers[0]
        self.users = bench.make_users(a.users)
        self.on_a = [u for u in self.users if u.target[2] == self.victim.label]
        others = [u for u in self.users if u.target[2] != self.victim.label]
        if not self.on_a or not others:
            raise BenchError("failover needs users on the killed node and on the others (-n 2 or more)")
        self.nobs = min(a.observers, len(others)) if a.observers else len(others)
        self.observers = [others[(j * len(others)) // self.nobs] for j in range(self.nobs)]
        self.index = {u.name.lower(): i for i, u in enumerate(self.on_a)}
        self.seen: dict = {}                 # observer idx -> indices (in on_a) it has seen go offline
        self.count = [0] * len(self.on_a)    # observers that have seen each user of A go offline
        self.all_at = [0] * len(self.on_a)   # when the last of them did (ns)
        self.st = {"t_kill": 0, "first": 0, "pairs": 0, "done": 0, "duplicates": 0, "unexpected": 0}
        for u in self.users:
            u.after = (None, None, None, True)
        for o in self.observers:
            o.after = (None, None, self._on_presence, False)

    def _on_presence(self, c: Conn, body: bytes) -> None:
        if not body.startswith(PRESENCE_MARK) or OFFLINE_MARK not in body:
            return
        bench, st = self.bench, self.st
        m = USERNAME_FIELD.search(body)
        name = m.group(1).decode("utf-8", "replace") if m else str(bench.decode(body).get("username"))
        i = self.index.get(name.lower())
        if i is None or not st["t_kill"]:
            st["unexpected"] += 1    # a user not on A, or before the kill
            return
        mine = self.seen.setdefault(c.idx, set())
        if i in mine:
            st["duplicates"] += 1
            return
        mine.add(i)
        st["pairs"] += 1
        st["first"] = st["first"] or bench.t_rx
        self.count[i] += 1
        if self.count[i] == self.nobs:
            self.all_at[i] = bench.t_rx
            st["done"] += 1

    # --- the phases -------------------------------------------------------------------
    def log_in(self, res: dict) -> None:
        bench, n = self.bench, self.a.users
        res["login"] = bench.login(self.users, f"{n} users")
        bench.note(f"{n} users logged in ({res['login']['per_s']}/s); waiting for the servers to go quiet")
        bench.settle()

    def kill_and_watch(self, res: dict) -> None:
        """SIGKILL the node, read until every observer has seen all its users go offline or
        --limit passes; res["failover"] either way, and an error if some were not seen."""
        bench, a, victim, st = self.bench, self.a, self.victim, self.st
        on_a, nobs = self.on_a, self.nobs
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
                self._note_progress()
        finally:
            res["failover"] = self._result(start)
        if st["done"] < len(on_a):
            raise BenchError(f"after {a.limit:.0f} s only {st['done']} of the {len(on_a)} users of the killed node "
                             f"were seen offline by all {nobs} observers ({st['pairs']} of {len(on_a) * nobs} "
                             "sightings)")

    def _note_progress(self) -> None:
        bench = self.bench
        now = time.monotonic()
        if now - bench.last_report > 5.0:
            bench.last_report = now
            bench.note(f"failover: {self.st['done']}/{len(self.on_a)} seen offline by every observer, "
                       f"{self.st['pairs']}/{len(self.on_a) * self.nobs} sightings")

    def _result(self, start: dict) -> dict:
        bench, a, st = self.bench, self.a, self.st
        on_a, nobs = self.on_a, self.nobs
        fig, _, _ = bench.figures(start)
        t0 = st["t_kill"]
        times = sorted((t - t0) / 1e9 for t in self.all_at if t)

        def sec(x):
            return None if x is None else round(x, 3)

        return {
            "users": a.users, "nodes": len(self.room.servers), "killed_node": self.victim.label,
            "users_on_killed_node": len(on_a), "observers": nobs,
            "observer_nodes": sorted({o.target[2] for o in self.observers}),
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


def table_rows(fo: dict) -> list:
    o = fo["offline_everywhere_s"]
    rows = [("workload", f"{fo['users']} users over {fo['nodes']} nodes; SIGKILL {fo['killed_node']} "
                         f"({fo['users_on_killed_node']} users); {fo['observers']} observers on "
                         f"{', '.join(fo['observer_nodes'])}"),
            ("offline everywhere", f"p50 {value_text(o['p50_s'], ' s')}, p90 {value_text(o['p90_s'], ' s')}, "
                                   f"max {value_text(o['max_s'], ' s')} after the kill (n={o['n']}; "
                                   f"first sighting {value_text(fo['first_offline_s'], ' s')})"),
            ("sightings", f"{value_text(fo['sightings'])} of {value_text(fo['sightings_expected'])}"
                          + (" (complete)" if fo["complete"] else f" (INCOMPLETE after {fo['limit_s']} s)")
                          + f", {fo['duplicate_offline']} duplicates, {fo['other_offline']} other offline"),
            ("server CPU", f"{value_text(fo['server_cpu_s'], ' s')} surviving nodes "
                           f"({value_text(fo['server_cpu_pct'], '%')} of one core)")]
    rows += redis_rows(fo, "")
    return rows
