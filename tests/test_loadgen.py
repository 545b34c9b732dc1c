"""Smoke runs of bench/loadgen.py: every scenario, tiny, in a subprocess, so the load generator cannot rot.

The --nodes runs (two nodes on one redis-server) need redis-server on PATH, as the Redis tests do.

The figures themselves are not judged here (the machine is shared and noisy); only
that each scenario completes and reports counts that add up.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from serverproc import ServerProcess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOADGEN = os.path.join(ROOT, "bench", "loadgen.py")
sys.path.insert(0, os.path.join(ROOT, "bench"))

import loadgen_driver  # noqa: E402 - the connection driver of bench/loadgen.py


def run(*args: str, timeout: float = 60.0) -> dict:
    proc = subprocess.run([sys.executable, LOADGEN, *args, "--json", "-q", "--deadline", "50", "--stall", "10"],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"loadgen failed ({proc.returncode}):\n{proc.stderr}\n{proc.stdout}"
    res = json.loads(proc.stdout)
    assert not res.get("error"), res
    assert not res.get("failures"), res
    return res


@pytest.mark.parametrize("probes", ["0", "50"])   # every receiver counting raw bytes / every one walking frames
def test_fanout_counts_every_delivery(probes):
    res = run("fanout", "-n", "20", "-k", "2", "-m", "5", "-w", "3", "--probes", probes)
    f = res["fanout"]
    assert f["deliveries"] == f["expected_deliveries"] == 19 * 2 * 5
    assert f["confirmed"] == 10 and f["complete"] and f["dropped_users"] == 0
    assert f["latency"]["n"] == (0 if probes == "0" else 18 * 10)
    if f["latency"]["n"]:
        assert 0 < f["latency"]["p50_ms"] <= f["latency"]["p99_ms"] <= f["latency"]["max_ms"] < 10_000
    assert f["server_cpu_s"] is not None and f["server_cpu_s"] >= 0
    assert f["server_rss_kb"] > 1000
    assert f["deliveries_per_s"] > 0 and f["loadgen_cpu_s"] >= 0
    assert res["server"]["exit_status"] == 0


def test_fanout_over_tls_counts_every_delivery():
    res = run("fanout", "--tls", "-n", "20", "-k", "2", "-m", "5", "-w", "3", "--probes", "5")
    f = res["fanout"]
    assert f["tls"] is True and f["complete"] and f["dropped_users"] == 0
    assert f["deliveries"] == f["expected_deliveries"] == 19 * 2 * 5
    assert res["server"]["exit_status"] == 0


def test_pm_ping_pong():
    res = run("pm", "--count", "5", "--warmup", "1")
    p = res["pm"]
    assert p["round_trips"] == 5 and p["messages"] == 10
    assert 0 < p["message_server_side"]["p50_ms"] <= p["round_trip_total"]["p50_ms"]
    assert p["client_seal_sign"]["n"] == 10


def test_hold_measures_round_trips_and_memory():
    res = run("hold", "-n", "50", "--samples", "10", "--probes", "3")
    h = res["hold"]
    assert h["online_at_end"] == 50 and h["samples"] == 10
    assert h["deliveries"] == 10 * 49
    assert h["bm_round_trip"]["n"] == 10 and h["bm_round_trip"]["p50_ms"] > 0
    assert h["server_rss_kb"] >= h["server_rss_empty_kb"] > 1000
    assert h["server_rss_per_user_kb"] is not None


def test_storm_with_real_scrypt_cost():
    res = run("storm", "--base", "8", "--senders", "3", "--storm", "10", "--baseline", "0.5", "--interval", "0.005")
    s = res["storm"]
    assert s["storm_logged_in"] == 10 and s["storm_failed"] == 0
    assert s["scrypt_n"] >= 16384
    assert s["bm_round_trip_before"]["n"] > 0 and s["bm_round_trip_during"]["n"] > 0
    assert s["p99_ratio"] > 0


def test_abuse_three_phases_with_the_server_limits_on():
    res = run("abuse", "--storm", "12", "--storm-seconds", "0", "--victim-logins", "1", "--flood-conns", "2",
              "--flood-seconds", "0.5", "--flood-window", "4", "--history", "300", "--history-chars", "100",
              "--ch-repeat", "1", "--bystanders", "2", "--baseline", "0.3", "--interval", "0.05")
    ab = res["abuse"]
    assert ab["limits"] == "production" and ab["scrypt_n"] >= 16384
    assert "--flood-rate" not in res["server"]["command"] and "--max-per-ip" not in res["server"]["command"]
    storm, flood, history = ab["storm"], ab["flood"], ab["history"]
    assert storm["connections"] == 12 and sum(storm["answers"].values()) >= 12
    assert isinstance(storm["victim_login_before_ms"], float) and storm["victim_login_before_ms"] > 0
    assert isinstance(storm["victim_login_during_ms"], float) and storm["victim_login_during"]["n"] >= 1
    # At most 8 checks in hand per address: the rest are refused, or dropped when their connection hangs up.
    assert storm["answers"].get("PASSWORD: ok", 0) <= 8, storm["answers"]
    assert flood["accepted"] > 0 and flood["bad_request"] > 0   # every fourth text is over the stored size
    assert flood["data_dir_bytes_added"] >= flood["accepted"] * 4096
    assert flood["bm_round_trip_before"]["n"] > 0 and flood["bm_round_trip_during"]["n"] > 0
    assert history["short_entries"] == 50 and history["full_entries"] >= 300
    assert history["bm_round_trip_before"]["n"] > 0
    assert res["server"]["exit_status"] == 0


def test_abuse_table_names_the_three_phases():
    proc = subprocess.run([sys.executable, LOADGEN, "abuse", "--storm", "4", "--storm-seconds", "0",
                           "--victim-logins", "1", "--flood-conns", "1", "--flood-seconds", "0.3", "--history", "60",
                           "--ch-repeat", "1", "--bystanders", "1", "--baseline", "0.2", "-q", "--deadline", "50"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for row in ("1 storm", "victim login before", "2 BM flood", "data dir grew", "3 CH", "worst stall"):
        assert row in proc.stdout, proc.stdout


def test_connect_spreads_users_over_targets(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    server = ServerProcess(str(data), "--max-per-ip", "0", "--connect-rate", "0", "--flood-rate", "0",
                           "--register-rate", "0", "--checks-per-ip", "0").start()
    try:
        target = f"127.0.0.1:{server.port}"
        res = run("fanout", "--connect", target, "--connect", target, "--server-pid", str(server.proc.pid),
                  "-n", "10", "-k", "1", "-m", "3")
        assert res["fanout"]["deliveries"] == 9 * 3
        assert res["fanout"]["server_cpu_s"] is not None
    finally:
        server.kill()


def test_connect_refuses_other_hosts():
    proc = subprocess.run([sys.executable, LOADGEN, "fanout", "--connect", "192.0.2.1:7000"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "loopback" in proc.stderr


def test_byte_counting_finds_marks_cut_by_reads():
    """A BM body start split over two reads (or three) is counted once."""
    frame = b"D\0\0\0\x10" + loadgen_driver.BM_MARK + b'"x"}'
    stream = frame * 7 + b'D\0\0\0\x11{"op":"PRESENCE"}'
    for cut in range(1, 40):
        bench = loadgen_driver.Bench.__new__(loadgen_driver.Bench)
        bench.bm_delivered = 0
        conn = loadgen_driver.Conn(0, "u", "p", None)
        pieces = [stream[i:i + cut] for i in range(0, len(stream), cut)]
        for piece in pieces:
            bench._count(conn, piece)
        assert bench.bm_delivered == 7, cut


# --- several nodes on one Redis (--nodes): need redis-server on PATH, as the Redis tests do ---

def require_redis_server() -> None:
    """Fail (never skip) without redis-server on PATH. Imported late: other test modules load
    redisproc as a plugin, which an earlier import would keep from being assert-rewritten."""
    from redisproc import require_redis_server as require

    require()


def _gone(pids: list, within: float = 10.0) -> list:
    """The pids still alive (not zombies: our children are reaped) after waiting up to ``within``."""
    end = time.monotonic() + within
    while True:
        alive = []
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as fh:
                    text = fh.read()
            except OSError:
                continue
            if text[text.rindex(")") + 2] not in "ZX":
                alive.append(pid)
        if not alive or time.monotonic() > end:
            return alive
        time.sleep(0.05)


def test_nodes_fanout_spreads_users_and_stops_everything():
    require_redis_server()
    res = run("fanout", "--nodes", "2", "-n", "20", "-k", "2", "-m", "5", "-w", "3", "--probes", "50")
    f, server = res["fanout"], res["server"]
    assert len(server["nodes"]) == 2 and len(server["pids"]) == 2 and server["redis_pid"]
    assert f["deliveries"] == f["expected_deliveries"] == 19 * 2 * 5
    assert f["confirmed"] == 10 and f["complete"] and f["dropped_users"] == 0 and f["servers"] == 2
    # the probes hear senders on their own node and on the other one
    assert f["latency_same_server"]["n"] > 0 and f["latency_cross_server"]["n"] > 0
    assert f["latency_same_server"]["n"] + f["latency_cross_server"]["n"] == f["latency"]["n"] == 18 * 10
    assert f["server_cpu_s"] is not None and len(f["node_cpu_s"]) == 2
    assert f["redis_cpu_s"] is not None and f["redis_cpu_s"] >= 0 and f["redis_rss_kb"] > 1000
    assert f["server_rss_kb"] > 2000
    assert server["exit_status"] == 0 and server["exit_statuses"] == [0, 0]
    assert _gone(server["pids"] + [server["redis_pid"]], 0.5) == []


def test_nodes_pm_crosses_nodes():
    require_redis_server()
    res = run("pm", "--nodes", "2", "--count", "5", "--warmup", "1")
    p = res["pm"]
    assert p["cross_server"] and p["users_at"] == res["server"]["nodes"]
    assert p["round_trips"] == 5 and p["messages"] == 10
    assert 0 < p["message_server_side"]["p50_ms"] <= p["round_trip_total"]["p50_ms"]
    assert p["target_reply"]["n"] == p["send_to_delivery"]["n"] == 10
    assert p["redis_cpu_s"] is not None


def test_nodes_pm_same_node():
    require_redis_server()
    res = run("pm", "--nodes", "2", "--count", "3", "--warmup", "0", "--same-node")
    assert not res["pm"]["cross_server"] and res["pm"]["round_trips"] == 3


def test_failover_sees_every_user_of_the_killed_node_go_offline():
    require_redis_server()
    res = run("failover", "--nodes", "2", "-n", "12", "--limit", "20")
    fo, server = res["failover"], res["server"]
    assert fo["complete"] and fo["users_on_killed_node"] == 6 and fo["observers"] == 6
    assert fo["sightings"] == fo["sightings_expected"] == 36
    assert fo["duplicate_offline"] == 0 and fo["other_offline"] == 0 and fo["dropped_users"] == 0
    o = fo["offline_everywhere_s"]
    assert o["n"] == 6 and 0 < fo["first_offline_s"] <= o["p50_s"] <= o["max_s"] < 20
    assert fo["killed_node"] == server["nodes"][0]
    assert server["exit_status"] == 0 and server["exit_statuses"][0] == -9   # the killed one does not count
    assert _gone(server["pids"] + [server["redis_pid"]], 0.5) == []


def test_failover_needs_started_nodes():
    proc = subprocess.run([sys.executable, LOADGEN, "failover", "-n", "4"], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2 and "--nodes 2" in proc.stderr


def test_nodes_without_redis_server_says_so():
    proc = subprocess.run([sys.executable, LOADGEN, "pm", "--nodes", "2", "--redis-server", "/nonexistent/redis",
                           "--json", "-q"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "redis-server" in json.loads(proc.stdout)["error"]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_ended_loadgen_takes_its_nodes_and_redis_along(sig, tmp_path):
    """SIGKILL of the load generator (e.g. a timeout) leaves no node or Redis running (they die
    with it; their directory stays, here in tmp_path); SIGTERM ends the run in order, with a report."""
    require_redis_server()
    proc = subprocess.Popen([sys.executable, LOADGEN, "hold", "--nodes", "2", "-n", "4", "--samples", "100000",
                             "--gap", "0.01", "--deadline", "60", "--json", "--tmpdir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids: list = []
    try:
        end = time.monotonic() + 20
        while time.monotonic() < end and proc.poll() is None:
            line = proc.stderr.readline()
            if "BM round trips with" in line:
                break
            if "started 2 chatserver.py" in line:
                pids = [int(x) for x in re.findall(r"\(pid (\d+)", line)]
        assert len(pids) == 3, pids   # two nodes and Redis
        assert _gone(pids, 0) == pids
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert _gone(pids, 10.0) == []
    assert len(os.listdir(tmp_path)) == (1 if sig == signal.SIGKILL else 0)   # SIGTERM: cleaned up
    if sig == signal.SIGTERM:
        assert proc.returncode == 143
        res = json.loads(out)
        assert "SIGTERM" in res["error"] and res["server"]["exit_statuses"] == [0, 0]
