"""The load generator's table: the result dict as aligned ``name  value`` rows.

Owns the frame of the table (scenario, server, machine and login rows first;
failures, server log warnings and the error last) and the formatting every
scenario's rows share: numbers with their unit or ``-``, latency summaries, CPU
as a share of one core, Redis's row. Each scenario module makes its own rows
(``table_rows``) with these helpers; ``--json`` prints the dict instead.
"""

from __future__ import annotations

import json
from typing import Callable


def latency_text(d: dict | None) -> str:
    """A lat_summary as ``p50 .. ms, p99 .. ms, max .. ms (n=..)``, or ``-`` when empty."""
    if not d or not d.get("n"):
        return "-"
    return f"p50 {d['p50_ms']} ms, p99 {d['p99_ms']} ms, max {d['max_ms']} ms (n={d['n']})"


def value_text(value, unit: str = "") -> str:
    """A figure with its unit (integers with thousands separators), or ``-`` when unknown."""
    if value is None:
        return "-"
    return f"{value:,}{unit}" if isinstance(value, int) else f"{value}{unit}"


def core_text(seconds, pct) -> str:
    """CPU seconds and their share of one core: ``0.2 s (70.1% of one core)``."""
    return f"{value_text(seconds, ' s')} ({value_text(pct, '%')} of one core)"


def loadgen_rows(d: dict) -> list:
    """The load generator's CPU, and the host's steal over the phase (a noisy-host warning)."""
    return [("loadgen CPU", core_text(d["loadgen_cpu_s"], d["loadgen_cpu_pct"])),
            ("host steal", value_text(d.get("host_steal_pct"), "% of CPU time")
             + (" (a busy host: read latency tails as the host's)" if (d.get("host_steal_pct") or 0) >= 5 else ""))]


def node_cpu_text(d: dict) -> str:
    """``; per node .. s, .. s`` with several nodes, else nothing."""
    nodes = d.get("node_cpu_s")
    return f"; per node {', '.join(value_text(x, ' s') for x in nodes)}" if nodes else ""


def redis_rows(d: dict, unit: str, per_key: str = "redis_cpu_us_per_delivery") -> list:
    """The Redis CPU row (with the CPU per ``unit`` when unit is given), if Redis was measured."""
    if d.get("redis_cpu_s") is None:
        return []
    text = core_text(d["redis_cpu_s"], d["redis_cpu_pct"])
    if unit:
        text += f", {value_text(d.get(per_key), ' us')} per {unit}"
    return [("Redis CPU", text + f", RSS {value_text(d.get('redis_rss_kb'), ' KB')}")]


def _head_rows(res: dict) -> list:
    rows = [("scenario", res["scenario"]),
            ("server", res["server"].get("description", "")),
            ("machine", "{cpus} CPUs, {cpu_model}, Python {python}".format(**res["machine"]))]
    login = res.get("login")
    if login:
        rows.append(("login", f"{login['users']} users in {login['seconds']} s ({login['per_s']}/s)"))
    return rows


def _tail_rows(res: dict) -> list:
    rows = []
    if res.get("failures"):
        rows.append(("failures", json.dumps(res["failures"])))
    if res.get("server_log", {}).get("warning_lines"):
        rows.append(("server log", f"{res['server_log']['warning_lines']} warning lines, first: "
                                   f"{res['server_log']['first'][0][:100]}"))
    if res.get("error"):
        rows.append(("ERROR", res["error"]))
    return rows


def table(res: dict, scenario_rows: dict[str, Callable[[dict], list]]) -> str:
    """The result as a table; ``scenario_rows`` maps a scenario's name (its key in res)
    to the function that makes its rows."""
    rows = _head_rows(res)
    for name, rows_of in scenario_rows.items():
        if res.get(name):
            rows += rows_of(res[name])
    rows += _tail_rows(res)
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
