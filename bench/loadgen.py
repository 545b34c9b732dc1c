#!/usr/bin/env python3
"""Load generator for chatserver.py: broadcast fan-out, private messages, many idle users, login storms, abuse.

    python3 bench/loadgen.py fanout -n 1000 -k 10 -m 50 -w 20
    python3 bench/loadgen.py pm --count 200
    python3 bench/loadgen.py hold -n 10000
    python3 bench/loadgen.py storm --base 100 --storm 200
    python3 bench/loadgen.py fanout --connect 127.0.0.1:41001 --server-pid 1234 ...
    python3 bench/loadgen.py fanout --nodes 2 -n 1000          # two nodes on one Redis
    python3 bench/loadgen.py pm --nodes 2                      # cross-node PM round trip
    python3 bench/loadgen.py failover --nodes 2 -n 200         # SIGKILL a node: offline presence
    python3 bench/loadgen.py abuse                             # attacks on a server with its limits on

By default it starts chatserver.py itself on a free 127.0.0.1 port, with a
temporary data directory and the per-address and rate limits turned off
(abuse: on, the server's own), and stops it at the end; ``--connect`` (repeatable: users are spread over the
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

The code, by what it owns (all in bench/; it imports the wire and crypto layers,
never the server, which it only runs as a program):

    loadgen.py            this command line: options, starting or targeting servers, running one scenario
    scenario_fanout.py    fanout: broadcast fan-out, deliveries/s and CPU per delivery
    scenario_pm.py        pm: one pair ping-ponging private messages
    scenario_hold.py      hold: many users online, BM round trips, RSS per user
    scenario_storm.py     storm: BM round trips before and during a login storm
    scenario_failover.py  failover: SIGKILL a node, time its users' offline presences
    scenario_abuse.py     abuse: login storm, BM flood, CH of a long history, limits on; what others saw
    loadgen_driver.py     Conn and Bench: the selectors loop, logins, reading, waiting, phase marks
    loadgen_procs.py      the processes under test: chatserver.py (or N nodes) and redis-server
    loadgen_stats.py      percentiles, latency summaries, CPU and RSS from /proc
    loadgen_report.py     the table printed (--json prints the result dict instead)
    loadgen_options.py    the option types (positive, nonnegative, loopback HOST:PORT)
    loadgen_errors.py     BenchError, which ends a run with a message and exit status 1
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import passwords  # noqa: E402 - for the server's default scrypt cost
import pg3lib  # noqa: E402
import scenario_abuse  # noqa: E402
import scenario_failover  # noqa: E402
import scenario_fanout  # noqa: E402
import scenario_hold  # noqa: E402
import scenario_pm  # noqa: E402
import scenario_storm  # noqa: E402
from loadgen_driver import Bench, raise_fd_limit  # noqa: E402
from loadgen_errors import BenchError  # noqa: E402
from loadgen_options import loopback_target, nonnegative, positive  # noqa: E402
from loadgen_procs import StartedRoom  # noqa: E402
from loadgen_report import table  # noqa: E402
from loadgen_stats import ServerStats, machine_info  # noqa: E402

# Each scenario module has HELP, add_arguments(parser), users_needed(args),
# run(bench, args, result) and table_rows(its part of the result), and may have
# prepare(room, args, result) -> client key pair or None, run on the room before
# it starts (abuse: a setup run of the server); this order is the order of --help.
SCENARIOS = {"fanout": scenario_fanout, "pm": scenario_pm, "hold": scenario_hold, "storm": scenario_storm,
             "failover": scenario_failover, "abuse": scenario_abuse}


# --- command line -------------------------------------------------------------------------

def _common_options() -> argparse.ArgumentParser:
    """The options every scenario takes (after the scenario name)."""
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
                   help="scrypt cost of the started server (default: 16, storm and abuse: the server's default)")
    g.add_argument("--send-queue", type=nonnegative(int), default=None, metavar="BYTES",
                   help="--send-queue of the started server (default: 16 MiB with the limits off, the "
                        "server's own with abuse's production limits; 0 = no limit)")
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
    return common


def parse_args(argv: list | None = None) -> argparse.Namespace:
    common = _common_options()
    parser = argparse.ArgumentParser(prog="loadgen.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Each scenario has --help. Options go after the scenario name.")
    sub = parser.add_subparsers(dest="scenario", metavar="SCENARIO")
    sub.required = True
    for name, scenario in SCENARIOS.items():
        scenario.add_arguments(sub.add_parser(name, parents=[common], help=scenario.HELP))
    a = parser.parse_args(argv)
    if a.server_pid and not a.connect:
        parser.error("--server-pid goes with --connect (a started server is measured anyway)")
    if a.nodes and a.connect:
        parser.error("--nodes starts its own servers; --connect targets running ones: give one of them")
    if a.scenario == "abuse" and (a.connect or a.nodes):
        parser.error("abuse starts its own server (a setup run with the limits off, then its limits on): "
                     "no --connect or --nodes")
    if a.scenario == "failover" and a.nodes < 2:
        parser.error("failover needs --nodes 2 or more (it SIGKILLs one of the nodes it started)")
    return a


# --- the run ------------------------------------------------------------------------------

class Terminated(Exception):
    """SIGTERM reached the load generator: end the run, stopping what it started."""


def _on_sigterm(signum, frame):
    raise Terminated()


class Setup:
    """What a scenario runs against: the targets (family, sockaddr, label), the readers of
    the servers' and Redis's CPU, and the client key pair every user offers."""

    def __init__(self, targets: list, stats: ServerStats, keys: pg3lib.KeyPair,
                 redis_stats: ServerStats | None = None) -> None:
        self.targets = targets
        self.stats = stats
        self.keys = keys
        self.redis_stats = redis_stats


def _running_servers(a: argparse.Namespace, res: dict) -> Setup:
    """--connect: the servers are there already; their CPU and RSS only with --server-pid."""
    a.scrypt_n_used = None
    res["server"] = {"description": "running server(s) " + ", ".join(t[2] for t in a.connect),
                     "pids": a.server_pid}
    return Setup(a.connect, ServerStats(a.server_pid), pg3lib.KeyPair.generate())


def _new_room(a: argparse.Namespace, res: dict, users: int) -> StartedRoom:
    """The servers to start (not started yet): scrypt N=16 unless the scenario is storm or abuse
    (the server's own default) or --scrypt-n says otherwise."""
    scrypt_n = a.scrypt_n or (None if a.scenario in ("storm", "abuse") else 16)
    if scrypt_n is None:   # the server's own default
        scrypt_n = passwords.DEFAULT_SCRYPT_N
    a.scrypt_n_used = scrypt_n
    if a.scenario == "hold" and users // max(1, a.nodes) + 1200 > res["fd_limit"]["hard"]:
        print(f"loadgen: warning: the server's open-file limit (hard {res['fd_limit']['hard']}) leaves "
              f"little room for {users} connections plus its history files", file=sys.stderr)
    return StartedRoom(a, scrypt_n, a.nodes)


def _start_room(room: StartedRoom, res: dict, keys: pg3lib.KeyPair | None = None) -> Setup:
    """Start the room, make the client key pair (unless given) while the servers make theirs, wait for them."""
    room.start()
    keys = keys or pg3lib.KeyPair.generate()   # meanwhile the servers make their own key
    room.wait_ready()
    targets = [(socket.AF_INET, ("127.0.0.1", s.port), s.label) for s in room.servers]
    redis_stats = ServerStats([room.redis.pid]) if room.redis is not None else None
    res["server"] = room.info()
    return Setup(targets, ServerStats(room.pids), keys, redis_stats)


def _stop_room(room: StartedRoom, res: dict) -> bool:
    """Stop what was started and record how it ended; True if a server exited badly and
    nothing else has been reported as the error."""
    codes = room.stop()
    bad = [(s.name, code) for s, code in zip(room.servers, codes) if not s.killed and code not in (0, None)]
    res.setdefault("server", {})["exit_status"] = bad[0][1] if bad else 0
    if len(codes) > 1:
        res["server"]["exit_statuses"] = codes
    res["server_log"] = room.log_summary()
    failed = bool(bad) and not res.get("error")
    if failed:
        res["error"] = ", ".join(f"{name} exited with status {code}" for name, code in bad)
    room.cleanup()
    return failed


def _print_result(a: argparse.Namespace, res: dict) -> None:
    if a.json:
        print(json.dumps(res, indent=1))
    else:
        print(table(res, {name: scenario.table_rows for name, scenario in SCENARIOS.items()}))
    if res.get("error"):
        print(f"loadgen: {res['error']}", file=sys.stderr)


def main(argv: list | None = None) -> int:
    a = parse_args(argv)
    scenario = SCENARIOS[a.scenario]
    res: dict = {"scenario": a.scenario, "machine": machine_info(),
                 "args": {k: v for k, v in vars(a).items() if k not in ("connect", "json", "quiet")},
                 "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    users = scenario.users_needed(a)
    room: StartedRoom | None = None
    bench: Bench | None = None
    status = 0
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        res["fd_limit"] = raise_fd_limit(users + 64)
        if a.connect:
            setup = _running_servers(a, res)
        else:
            room = _new_room(a, res, users)   # assigned before starting: the finally below stops it
            prepare = getattr(scenario, "prepare", None)
            setup = _start_room(room, res, prepare(room, a, res) if prepare else None)
        bench = Bench(a, setup.targets, setup.stats, room, setup.keys, setup.redis_stats)
        bench.note(res["server"]["description"])
        scenario.run(bench, a, res)
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
        if room is not None and _stop_room(room, res):
            status = 1
        signal.signal(signal.SIGTERM, previous)
    _print_result(a, res)
    return status


if __name__ == "__main__":
    sys.exit(main())
