"""Scenario ``pm``: one pair of users ping-pongs private messages.

Each message is PM+TARGET (sent together), the client's sealing to the peer's key
and signing, SEND, then verifying and opening at the peer, which sends the next
one back. Measures the server's side of each message (PM+TARGET -> TARGET reply,
plus SEND -> D PM at the peer), the round trip with and without the client's
crypto, and server (and Redis) CPU per PM. With several servers the two users are
on different ones (the cross-node PM) unless ``--same-node``.
"""

from __future__ import annotations

import argparse
import base64
import os
import time

import framing
import pg3lib
from loadgen_driver import PM_MARK, PM_OK, PM_REQUEST, SEND_OK, TARGET_OK, Bench, Conn, now_ns, padding
from loadgen_errors import BenchError
from loadgen_options import nonnegative, positive
from loadgen_report import latency_text, loadgen_rows, node_cpu_text, redis_rows, value_text
from loadgen_stats import lat_summary, per
from protocol import PM_ID_BYTES, Op, timestamp

HELP = "one pair ping-pongs private messages"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--count", type=positive(int), default=200, help="round trips (default: %(default)s)")
    p.add_argument("--warmup", type=nonnegative(int), default=5,
                   help="round trips first, not counted (default: %(default)s)")
    p.add_argument("--same-node", action="store_true",
                   help="both users on the first server (default: round-robin, i.e. on two different "
                        "servers when there are several)")


def users_needed(a: argparse.Namespace) -> int:
    return 2


def run(bench: Bench, a: argparse.Namespace, res: dict) -> None:
    """One pair ping-pongs private messages: PM+TARGET (pipelined), seal and sign, SEND, delivery."""
    pingpong = PingPong(bench, a)
    pingpong.log_in(res)
    pingpong.play(res)


class PingPong:
    """One ping-pong run: the pair, the message in flight (a "leg") and the legs measured."""

    def __init__(self, bench: Bench, a: argparse.Namespace) -> None:
        self.bench = bench
        self.a = a
        self.x, self.y = bench.make_users(2)
        if a.same_node:
            self.y.target = self.x.target
        self.legs_total = 2 * (a.count + a.warmup)
        self.warm_legs = 2 * a.warmup
        # per leg: (server_ns, total_ns, send_crypto_ns, receive_crypto_ns, target_ns, delivery_ns)
        self.legs: list = []
        self.n = 0      # legs done; the one in flight has this number
        self.t1 = 0     # PM+TARGET sent
        self.t2 = 0     # TARGET reply read
        self.t3 = 0     # sealed and signed: SEND sent
        self.finished = False
        self.start: dict | None = None   # the mark after the warm-up
        self.pad = padding(a.size, 30)
        for u in (self.x, self.y):
            u.after = (self._on_c, None, self._on_d, False)

    # --- one leg: PM+TARGET, TARGET reply -> SEND, D PM at the peer ------------------
    def _start_leg(self, src: Conn, dst: Conn) -> None:
        self.t1, self.t2, self.t3 = now_ns(), 0, 0
        self.bench.send(src, PM_REQUEST + framing.command({"op": Op.TARGET, "username": dst.username}))

    def _on_c(self, c: Conn, body: bytes) -> None:
        """The TARGET reply: seal the text to the peer and to ourselves, sign, SEND."""
        bench = self.bench
        if body.startswith(PM_OK) or body.startswith(SEND_OK):
            return
        if not body.startswith(TARGET_OK):
            bench.unexpected(c, body, "PM/TARGET/SEND")
            return
        t2 = now_ns()
        msg = bench.decode(body)
        text = f"P {self.n} {self.t1} {self.pad}".encode()
        key = bench.public_key(msg["public_key"])
        ciphertext = key.seal(text).decode("ascii")
        self_copy = bench.keys.public.seal(text).decode("ascii")
        pm_id = base64.b64encode(os.urandom(PM_ID_BYTES)).decode("ascii")
        sent = timestamp(time.time())
        signature = bench.keys.sign(pg3lib.pm2_signed_bytes(pm_id, sent, c.username, msg["username"],
                                                            pg3lib.sealed_digest(ciphertext),
                                                            pg3lib.sealed_digest(self_copy)))
        frame = framing.command({"op": Op.SEND, "id": pm_id, "sent": sent, "ciphertext": ciphertext,
                                 "self_copy": self_copy, "signature": signature})
        self.t2, self.t3 = t2, now_ns()
        bench.send(c, frame)

    def _on_d(self, c: Conn, body: bytes) -> None:
        """The D PM at the peer: verify, open, record the leg, send the next one back."""
        if not body.startswith(PM_MARK):
            return
        bench = self.bench
        t4 = bench.t_rx
        msg = bench.decode(body)
        if msg.get("to") != c.username:
            raise BenchError(f"{c.username} got a PM addressed to {msg.get('to')!r}")
        sender_key = bench.public_key(msg["sender_key"])
        signed = pg3lib.pm2_signed_bytes(msg["id"], msg["sent"], msg["from"], c.username,
                                         pg3lib.sealed_digest(msg["ciphertext"]), msg["self_copy_sha256"])
        if not sender_key.verify(signed, msg["signature"]):
            raise BenchError("a PM signature did not verify at the receiver")
        text = bench.keys.open(msg["ciphertext"]).decode("utf-8")
        if not text.startswith(f"P {self.n} "):
            raise BenchError(f"PM {self.n} expected, got {text[:40]!r}")
        t5 = now_ns()
        t1, t2, t3 = self.t1, self.t2, self.t3
        self.legs.append(((t2 - t1) + (t4 - t3), t4 - t1, t3 - t2, t5 - t4, t2 - t1, t4 - t3))
        self.n += 1
        if self.n >= self.legs_total:
            self.finished = True
            return
        self._start_leg(c, self.x if c is self.y else self.y)

    # --- the phases -------------------------------------------------------------------
    def log_in(self, res: dict) -> None:
        res["login"] = self.bench.login([self.x, self.y], "2 users")
        self.bench.settle(10.0)

    def play(self, res: dict) -> None:
        """The warm-up, then the measured round trips; res["pm"] even when this fails."""
        bench, a = self.bench, self.a
        bench.phase = "PM ping-pong"
        bench.note(f"PM ping-pong: {a.count} round trips (+{a.warmup} warm-up)")
        self._start_leg(self.x, self.y)
        try:
            bench.wait(lambda: self.finished, self._progress, lambda: f"{self.n}/{self.legs_total} messages",
                       poll_s=0.05)
        finally:
            if self.start is None:
                self.start = bench.mark()
            res["pm"] = self._result(self.start)

    def _progress(self) -> int:
        if self.start is None and self.n >= self.warm_legs:
            self.start = self.bench.mark()
        return self.n

    def _result(self, start: dict) -> dict:
        bench, a = self.bench, self.a
        measured = self.legs[self.warm_legs:]
        seconds = time.monotonic() - start["t"]
        fig, cpu, rcpu = bench.figures(start)
        msgs = len(measured)
        rtt_server, rtt_total = _round_trips(measured)
        return {
            "round_trips": len(rtt_server), "messages": msgs, "warmup_round_trips": a.warmup,
            "users_at": [self.x.target[2], self.y.target[2]], "cross_server": self.x.target[2] != self.y.target[2],
            "msg_text_chars": a.size, "pipelined": "PM+TARGET sent together; SEND after sealing and signing",
            "message_server_side": lat_summary([leg[0] for leg in measured]),
            "round_trip_server_side": lat_summary(rtt_server),
            "round_trip_total": lat_summary(rtt_total),
            "client_seal_sign": lat_summary([leg[2] for leg in measured]),
            "client_verify_open": lat_summary([leg[3] for leg in measured]),
            "target_reply": lat_summary([leg[4] for leg in measured]),
            "send_to_delivery": lat_summary([leg[5] for leg in measured]),
            "seconds": round(seconds, 3),
            "server_cpu_us_per_message": per(cpu, msgs),
            "redis_cpu_us_per_message": per(rcpu, msgs),
            **fig,
            "server_rss_kb": bench.stats.mem_kb(),
            "note": "server side = (PM+TARGET sent -> TARGET reply) + (SEND sent -> D PM at the peer); "
                    "the client's sealing, signing, verifying and opening are timed apart and left out",
        }


def _round_trips(measured: list) -> tuple:
    """Pairs of legs (there and back): their server-side times, and their whole times with the
    client's crypto at both ends."""
    msgs = len(measured)
    rtt_server = [measured[i][0] + measured[i + 1][0] for i in range(0, msgs - 1, 2)]
    rtt_total = [measured[i][1] + measured[i][3] + measured[i + 1][1] + measured[i + 1][3]
                 for i in range(0, msgs - 1, 2)]
    return rtt_server, rtt_total


def table_rows(p: dict) -> list:
    rows = [("round trips", f"{p['round_trips']} ({p['messages']} PMs), users at "
                            f"{' and '.join(p['users_at'])}" + (" (cross server)" if p["cross_server"] else "")),
            ("PM server side", latency_text(p["message_server_side"])),
            ("  PM+TARGET->TARGET", latency_text(p.get("target_reply"))),
            ("  SEND->D PM at peer", latency_text(p.get("send_to_delivery"))),
            ("round trip srv side", latency_text(p["round_trip_server_side"])),
            ("round trip total", latency_text(p["round_trip_total"])),
            ("client seal+sign", latency_text(p["client_seal_sign"])),
            ("client verify+open", latency_text(p["client_verify_open"])),
            ("server CPU/PM", value_text(p["server_cpu_us_per_message"], " us") + node_cpu_text(p))]
    rows += redis_rows(p, "PM", "redis_cpu_us_per_message")
    rows += [("server RSS", value_text(p["server_rss_kb"], " KB"))] + loadgen_rows(p)
    return rows
