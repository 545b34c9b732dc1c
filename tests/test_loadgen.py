"""Smoke runs of bench/loadgen.py: every scenario, tiny, in a subprocess, so the load generator cannot rot.

The figures themselves are not judged here (the machine is shared and noisy); only
that each scenario completes and reports counts that add up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from serverproc import ServerProcess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOADGEN = os.path.join(ROOT, "bench", "loadgen.py")
sys.path.insert(0, os.path.join(ROOT, "bench"))

import loadgen  # noqa: E402


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


def test_connect_spreads_users_over_targets(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    server = ServerProcess(str(data), "--max-per-ip", "0", "--flood-rate", "0", "--register-rate", "0").start()
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
    frame = b"D\0\0\0\x10" + loadgen.BM_MARK + b'"x"}'
    stream = frame * 7 + b'D\0\0\0\x11{"op":"PRESENCE"}'
    for cut in range(1, 40):
        bench = loadgen.Bench.__new__(loadgen.Bench)
        bench.bm_delivered = 0
        conn = loadgen.Conn(0, "u", "p", None)
        pieces = [stream[i:i + cut] for i in range(0, len(stream), cut)]
        for piece in pieces:
            bench._count(conn, piece)
        assert bench.bm_delivered == 7, cut
