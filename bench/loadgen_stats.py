"""The load generator's figures: percentiles, latency summaries and CPU and memory readings.

Owns the arithmetic (nearest-rank percentiles as the anchor's ircbench.py computes
them, latency summaries in ms, CPU per item in us) and the readings: server and
Redis CPU and RSS from /proc (``ServerStats``), the load generator's own CPU
(getrusage) and the machine's description. It starts nothing and opens no socket.
"""

from __future__ import annotations

import os
import platform
import resource

CLK_TCK = os.sysconf("SC_CLK_TCK")


def pct(sorted_vals: list, p: float):
    """Nearest-rank percentile, as the anchor's ircbench.py computes it."""
    if not sorted_vals:
        return None
    i = min(len(sorted_vals) - 1, max(0, int(round(p / 100.0 * (len(sorted_vals) - 1)))))
    return sorted_vals[i]


def lat_summary(values_ns: list) -> dict:
    """n, p50, p90, p99 and max of nanosecond latencies, in ms."""
    v = sorted(values_ns)

    def ms(x):
        return None if x is None else round(x / 1e6, 3)

    return {"n": len(v), "p50_ms": ms(pct(v, 50)), "p90_ms": ms(pct(v, 90)), "p99_ms": ms(pct(v, 99)),
            "max_ms": ms(v[-1] if v else None)}


def per(cpu_s: float | None, count: int, digits: int = 1) -> float | None:
    """Microseconds of CPU per item (None when the CPU is not known or nothing was counted)."""
    return round(1e6 * cpu_s / count, digits) if cpu_s is not None and count else None


def host_ticks() -> tuple[int, int] | None:
    """This machine's CPU ticks so far, (stolen, all), from /proc/stat; None elsewhere.

    Steal is the time a virtual machine's CPUs were ready but the host ran something
    else: on a shared host it is what makes one run's latency tail differ from the next.
    """
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def self_cpu_s() -> float:
    """The load generator's own CPU seconds (user + system)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class ServerStats:
    """CPU and memory of the server processes, from /proc (nothing without pids)."""

    def __init__(self, pids: list) -> None:
        self.pids = list(pids)

    def cpu_s(self, pids: list | None = None) -> float | None:
        """CPU seconds of all server processes (or of ``pids``): the sum over their threads of
        the nanosecond run time in /proc/PID/task/TID/schedstat, or the clock ticks of
        /proc/PID/stat (10 ms steps) where that is missing. A thread that exits takes its
        schedstat time with it, so ``Bench.figures`` falls back to ticks when they disagree."""
        pids = self.pids if pids is None else pids
        if not pids:
            return None
        total = 0.0
        for pid in pids:
            try:
                ns = 0
                for tid in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{tid}/schedstat") as fh:
                        ns += int(fh.read().split()[0])
                total += ns / 1e9
            except (OSError, ValueError, IndexError):
                ticks = self.ticks_s(pids)
                return ticks
        return total

    def ticks_s(self, pids: list | None = None) -> float | None:
        """utime + stime of /proc/PID/stat, in seconds (what the anchor's ircbench.py reads)."""
        pids = self.pids if pids is None else pids
        if not pids:
            return None
        total = 0.0
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as fh:
                    text = fh.read()
            except OSError:
                return None
            rest = text[text.rindex(")") + 2:].split()
            total += (int(rest[11]) + int(rest[12])) / CLK_TCK
        return total

    def mem_kb(self, field: str = "VmRSS") -> int | None:
        if not self.pids:
            return None
        total = 0
        for pid in self.pids:
            try:
                with open(f"/proc/{pid}/status") as fh:
                    for line in fh:
                        if line.startswith(field + ":"):
                            total += int(line.split()[1])
                            break
            except OSError:
                return None
        return total

    def alive(self) -> bool:
        for pid in self.pids:
            try:
                with open(f"/proc/{pid}/stat") as fh:
                    text = fh.read()
            except OSError:
                return False
            if text[text.rindex(")") + 2] in "ZX":
                return False
        return True


def machine_info() -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "implementation": platform.python_implementation(), "loadavg": list(os.getloadavg())}
