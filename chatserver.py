"""The chat room server: one thread, one ``selectors`` loop, every socket non-blocking.

Usage: ``python3 chatserver.py PORT [options]`` (``--help`` lists them).

Theory of operation. The loop owns the listening socket, every client socket
and all state. Each connection (``connection.Connection``, as asyncio's
transport) owns its frame decoder, the bytes read and not yet handed to the
session logic, and its write queue with flush, close-when-flushed and abort;
``EVENT_WRITE`` is registered only while output is pending. The session logic
(``state.Room``) answers each event with effects, which ``apply`` carries out:
bytes queued to connections, store requests handed to the store, password
checks handed to the worker pool. The one piece of work off the loop thread
is a password check (RSA decryption and scrypt): a small pool of worker
processes does it (``hashpool.py``; processes, so there is no GIL for the loop
to wait on), and the result comes back through a socketpair in the loop's own
selector, as Node.js's thread pool wakes its loop.

One loop pass: read what is ready, hand requests to the sessions, let the
store write the pass's history appends together (group commit) and complete
the requests that waited on them, run timers, then send each connection's
queued output with one ``send``.

Whichever way a connection closes (flushed or aborted), the session logic is
told, so presence stays right.

The store (``store.Store``) is the data directory or, with ``--redis``, a
Redis shared by several nodes; the server holds one and never asks which.
Its links, if it has any, sit in the same selector; what other nodes did
comes back as cluster events, handed to ``Room.cluster_event``.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import logging
import os
import resource
import selectors
import signal
import socket
import sys
import time

import framing
import hashpool
import passwords
import state
import storage
import tlslayer
from connection import PACE_STALL, READ_SIZE, Connection, Lifecycle
from protocol import USERNAME_RULE, ByeReason, Error, bye, fatal, valid_username

log = logging.getLogger("chat.server")
mod_log = logging.getLogger("chat.moderation")   # every moderation action, with who did it

LISTEN_BACKLOG = 1024
DEFAULT_SEND_QUEUE = 1 << 20   # 1 MiB, InspIRCd's hard send queue
SHUTDOWN_GRACE = 3.0       # seconds the whole server waits for BYEs to drain on exit
# One core stays free for the loop: a login storm cannot take every core.
REFUSAL_LOG_EVERY = 60.0   # seconds: refused connections are logged once a minute per address
HASH_WORKERS = max(1, (os.cpu_count() or 2) - 1)
# A login storm must not slow the people already chatting: hashing processes run
# at a lower priority, so on a busy machine the loop goes first.
WORKER_NICENESS = 5

class _Source:
    """A selector source the server handles itself (the listening socket, the wake-up pipe)."""

    __slots__ = ("on_ready",)

    def __init__(self, on_ready) -> None:
        self.on_ready = on_ready


class ChatServer:
    """The event loop and everything it owns.

    Every selector source (a connection, the listener, the wake-up socket, a
    password worker, a store link) is dispatched the same way: ``on_ready(mask)``.
    Connections call back through ``connection.ConnectionOwner`` (``on_*``).
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.listener = self._listen(args.host, args.port)   # first: a busy port changes nothing on disk
        self.sel: selectors.BaseSelector = selectors.DefaultSelector()
        try:
            self.store, self.keys = _open_store(args, self.sel)
        except BaseException:
            self.listener.close()
            raise
        try:   # section 0: TLS on the same port, with a certificate holding the server key
            self.tls = tlslayer.TLSPolicy(tlslayer.server_context(args.data, self.keys), args.require_tls)
        except BaseException:
            self.store.close()
            self.listener.close()
            raise
        self.room = state.make_room(self.keys, node=self.store.node, frame_limit=args.frame_limit,
                                    login_timeout=args.login_timeout, register_rate=args.register_rate,
                                    login_delay_cap=args.login_delay_cap, guess_limit=args.guess_limit,
                                    checks_per_ip=args.checks_per_ip,
                                    bm_rate=args.bm_rate, bm_burst=args.bm_burst, accept_pm1=args.accept_pm1,
                                    offline_limit=args.offline_limit,
                                    offline_per_sender=args.offline_per_sender, recent=args.recent,
                                    catch_up_limit=args.catch_up_limit,
                                    admins=getattr(args, "admin_names", ()))
        for event in self.store.events():   # e.g. who is online on the other nodes
            self.room.cluster_event(event)
        self.conns: dict[int, Connection] = {}
        self.online: dict[str, Connection] = {}
        self.per_ip: collections.Counter = collections.Counter()
        # New connections per address (a storm of handshakes or of reconnects after server_busy).
        self.connect_limit = state.RateLimit(args.connect_rate, args.connect_burst, time.monotonic)
        self.refusals: dict[str, tuple[float, int]] = {}   # ip -> (first refusal logged, refused since)
        self.dirty: list[Connection] = []
        self.throttled: set[Connection] = set()
        self.closing: set[Connection] = set()
        self.pacing: set[Connection] = set()      # CH pages waiting for the socket to drain
        self.cut_off: list[Connection] = []
        self.broadcasts: list[state.DeliverAll] = []   # this pass's, not yet queued to everyone
        self.broadcast_run = 1                           # numbers each such run (Connection.seen)
        self.cids = itertools.count(1)
        self.pool = hashpool.HashPool(HASH_WORKERS, self.keys.to_pem(), args.scrypt_n, self.sel, WORKER_NICENESS)
        self.stopping = False
        self.waker_r, self.waker_w = socket.socketpair()
        for sock in (self.waker_r, self.waker_w):
            sock.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, _Source(lambda mask: self._accept()))
        self.sel.register(self.waker_r, selectors.EVENT_READ, _Source(lambda mask: self._drain_waker()))

    @staticmethod
    def _listen(host: str, port: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
        return sock

    @property
    def address(self) -> str:
        host, port = self.listener.getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    # --- the loop ----------------------------------------------------------------
    def serve(self) -> None:
        signal.set_wakeup_fd(self.waker_w.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._on_signal)
        log.info("listening on %s (data in %s, server key %s; TLS %s)", self.address, self.args.data,
                 self.keys.fingerprint, "required" if self.args.require_tls else "or plain")
        admins = sorted(self.room.admins)
        mod_log.info("admins: %s", ", ".join(admins) if admins else "none (--admin NAME names one)")
        while not self.stopping:
            self.run_once(self._timeout())
        self._shutdown()

    def _on_signal(self, signum: int, frame) -> None:
        self.stopping = True

    def _timeout(self) -> float | None:
        """How long select may wait: until the soonest timer (None: no timer)."""
        now = time.time()
        times = [self.room.next_deadline() or now + 3600.0]
        if self.throttled:
            times.append(min(self._token_time(conn) for conn in self.throttled))
        if self.closing:
            times.append(min(conn.close_by for conn in self.closing))
        stall_from = min((conn.progress_at for conn in self.pacing if not conn.ending), default=None)
        if stall_from is not None:   # (a closing one has its close_by instead)
            times.append(stall_from + PACE_STALL)
        store_tick = self.store.next_tick()
        if store_tick is not None:
            times.append(now + store_tick - time.monotonic())
        return max(0.0, min(times) - now)

    def run_once(self, timeout: float | None) -> None:
        """One pass: wait for events, handle them, settle the store, run timers, send."""
        for key, mask in self.sel.select(timeout):
            key.data.on_ready(mask)
        self._settle()
        now = time.time()
        if self.throttled:
            for conn in [c for c in self.throttled if self._token_time(c) <= now]:
                self.throttled.discard(conn)
                self._pump(conn)
        self.apply(self.room.tick(now))
        self.store.tick(time.monotonic())
        if self.closing:
            for conn in [c for c in self.closing if c.close_by <= now]:
                conn.abort()
        if self.pacing:
            for conn in list(self.pacing):
                if conn.paced is None or conn.closed:
                    self.pacing.discard(conn)
                elif conn.waiting:   # its pages wait for the store, whose answer may have come
                    self.dirty.append(conn)
                elif conn.ending:
                    continue   # closing: its last pages have FLUSH_GRACE, not PACE_STALL
                elif conn.progress_at + PACE_STALL <= now:
                    self.pacing.discard(conn)
                    conn.too_slow()
        self._settle()
        while self.dirty or self.cut_off or self.broadcasts or self.store.pending or self.pool.done:
            self._settle()   # a flush can hand over requests (held behind CH pages): answer them now
            if self.broadcasts:
                self._deliver_broadcasts()
            while self.cut_off:
                self.apply(self.room.disconnect(self.cut_off.pop().cid))
                self._settle()
            dirty, self.dirty = self.dirty, []
            for conn in dirty:
                if not conn.closed:
                    conn.flush()
        self.store.send()

    def _settle(self) -> None:
        """Let the store finish what it can now; feed completions and cluster events to the sessions."""
        done_jobs = self.pool.done
        while True:
            events = self.store.events()
            if not (self.store.pending or done_jobs or events):
                return
            while done_jobs:
                cid, result = done_jobs.popleft()
                self._complete(cid, result)
            for cid, result in self.store.flush():
                self._complete(cid, result)
            for event in events:
                self.apply(self.room.cluster_event(event))

    def _complete(self, cid: int, result: object) -> None:
        self.apply(self.room.completed(cid, result))
        conn = self.conns.get(cid)
        if conn is not None and not conn.closed:
            self._pump(conn)

    # --- connections ----------------------------------------------------------------
    def _accept(self) -> None:
        for _ in range(256):   # bounded, so a connection storm cannot starve the others
            try:
                sock, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:   # EMFILE and friends: refuse for now, keep serving
                log.warning("accept failed: %s", exc)
                return
            ip = addr[0]
            limit_all, limit_ip = self.args.max_clients, self.args.max_per_ip
            if (limit_all and len(self.conns) >= limit_all) or (limit_ip and self.per_ip[ip] >= limit_ip) \
                    or not self.connect_limit.take(ip):
                self._refuse(sock, ip)
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for opt, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 6)):
                if hasattr(socket, opt):
                    sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)
            conn = Connection(next(self.cids), sock, ip, self, frame_limit=self.args.frame_limit,
                              send_cap=self.args.send_queue, burst=self.args.flood_burst, tls=self.tls)
            self.conns[conn.cid] = conn
            self.per_ip[ip] += 1
            log.debug("connection %d from %s", conn.cid, ip)
            self.apply(self.room.connect(conn.cid, ip))

    def _refuse(self, sock: socket.socket, ip: str) -> None:
        """server_busy, and close; logged once a minute per address (a storm must not fill the log)."""
        now = time.monotonic()
        since, count = self.refusals.get(ip, (0.0, 0))
        if now - since >= REFUSAL_LOG_EVERY:
            log.warning("refusing a connection from %s: server busy%s", ip,
                        f" ({count} more refused in the last minute)" if count else "")
            if len(self.refusals) > 4096:
                self.refusals = {k: v for k, v in self.refusals.items() if now - v[0] < REFUSAL_LOG_EVERY}
            self.refusals[ip] = (now, 0)
        else:
            self.refusals[ip] = (since, count + 1)
        try:
            sock.setblocking(False)
            sock.send(fatal(Error.SERVER_BUSY, "the server is full; try again later"))
        except OSError:
            pass
        sock.close()

    def _pump(self, conn: Connection) -> None:
        """Hand requests to the session while it is not busy and the flood bucket allows,
        decoding each only then; pause reading while one waits."""
        room, cid = self.room, conn.cid
        rate = self.args.flood_rate
        waiting = False
        while not conn.ending:
            if room.busy(cid) or conn.paced is not None:   # one CH's pages at a time
                waiting = True
                break
            if rate and conn.tokens < 1.0:
                self._refill(conn)
                if conn.tokens < 1.0:
                    self.throttled.add(conn)   # the login deadline runs on meanwhile
                    waiting = True
                    break
            frame = conn.next_frame()
            if frame is None:
                break
            if rate:
                conn.tokens -= 1.0
            self.apply(room.receive(cid, frame))
        if conn.ending:
            return
        if conn.fatal is not None:
            if not room.busy(cid):   # the ERROR follows the replies to everything sent before it
                error, conn.fatal = conn.fatal, None
                self.apply(room.refuse(cid, error))
        elif waiting and conn.decoder.buffered >= READ_SIZE:
            conn.pause_reading()   # bounded memory: read more only when what is here is handled
        else:
            # Reading goes on while a request waits (up to one read's worth), so a client that
            # hangs up is seen at once, and its password check is dropped before a worker runs it.
            conn.resume_reading()

    def _refill(self, conn: Connection) -> None:
        now = time.time()
        conn.tokens = min(self.args.flood_burst, conn.tokens + (now - conn.tokens_at) * self.args.flood_rate)
        conn.tokens_at = now

    def _token_time(self, conn: Connection) -> float:
        return conn.tokens_at + (1.0 - conn.tokens) / self.args.flood_rate

    # --- what connections tell the server (connection.ConnectionOwner) -----------------
    def on_input(self, conn: Connection) -> None:
        self._pump(conn)

    def on_output(self, conn: Connection) -> None:
        self.dirty.append(conn)

    def on_closing(self, conn: Connection) -> None:
        self.closing.add(conn)

    def on_pacing(self, conn: Connection) -> None:
        self.pacing.add(conn)

    def on_cut_off(self, conn: Connection) -> None:
        self.cut_off.append(conn)

    def on_lost(self, conn: Connection) -> None:
        if self.pool.cancel(conn.cid):   # its password check never reached a worker: answer it here
            self.pool.done.append((conn.cid, passwords.LoginResult(Error.INTERNAL, "the connection closed")))
        self.closing.discard(conn)
        self.pacing.discard(conn)
        self.throttled.discard(conn)
        del self.conns[conn.cid]
        self.per_ip[conn.address] -= 1
        if not self.per_ip[conn.address]:
            del self.per_ip[conn.address]
        log.debug("connection %d closed", conn.cid)
        self.apply(self.room.disconnect(conn.cid))

    # --- effects ----------------------------------------------------------------------
    def apply(self, effects: list) -> None:
        """Carry out what the session logic asked for, in order."""
        for effect in effects:
            kind = type(effect)
            if kind is state.Send:
                conn = self.conns.get(effect.cid)
                if conn is not None:
                    if self.broadcasts and conn.user:
                        self._catch_up(conn)   # broadcasts made before this reply come before it
                    conn.queue(effect.data)
            elif kind is state.Page or kind is state.Pages:
                conn = self.conns.get(effect.cid)
                if conn is not None:
                    if self.broadcasts and conn.user:
                        self._catch_up(conn)
                    conn.queue_page(effect.data if kind is state.Page else effect.frames)
            elif kind is state.DeliverAll:
                self.broadcasts.append(effect)
            elif kind is state.Deliver:
                online, data, pending = self.online, effect.data, self.broadcasts
                for user in effect.users:
                    conn = online.get(user)
                    if conn is not None:
                        if pending:
                            self._catch_up(conn)   # keep every recipient's data frames in order
                        conn.queue(data)
            elif kind is state.Close:
                conn = self.conns.get(effect.cid)
                if conn is not None:
                    conn.close_when_flushed()
            elif kind is state.Online:
                conn = self.conns.get(effect.cid)
                if conn is not None:
                    conn.seen = (self.broadcast_run, len(self.broadcasts))   # nothing from before it came
                    conn.user = effect.user
                    self.online[effect.user] = conn
                    log.info("%r is online (connection %d)", effect.user, effect.cid)
            elif kind is state.Offline:
                conn = self.online.get(effect.user)
                if conn is not None and conn.cid == effect.cid:
                    if self.broadcasts:
                        self._catch_up(conn)   # what this pass broadcast before it left is its own
                    del self.online[effect.user]
                    log.info("%r is offline (connection %d)", effect.user, effect.cid)
            elif kind is state.CheckPassword:
                self.pool.submit(effect)
            elif kind is state.Audit:
                (mod_log.warning if effect.refused else mod_log.info)("%s", effect.text)
            else:
                self.store.submit(effect)

    def _deliver_broadcasts(self) -> None:
        """Send the pass's broadcasts: one chunk for each online user, built once for nearly all.

        A run of DeliverAll effects (BMs to everyone else, presence) reaches every
        online user except each effect's own sender, so all but the few senders,
        and those already given part of the run (``_catch_up``), get the same bytes:
        they are joined once and shared.
        """
        run, self.broadcasts = self.broadcasts, []
        generation = self.broadcast_run
        self.broadcast_run += 1
        whole = run[0].data if len(run) == 1 else b"".join(effect.data for effect in run)
        senders = {effect.exclude for effect in run}
        for user, conn in self.online.items():
            start = conn.seen[1] if conn.seen[0] == generation else 0
            if start == 0 and user not in senders:
                conn.offer(whole)
            else:
                mine = b"".join(effect.data for effect in run[start:] if effect.exclude != user)
                if mine:
                    conn.offer(mine)

    def _catch_up(self, conn: Connection) -> None:
        """Give one connection the part of this pass's broadcasts it has not had yet."""
        if self.online.get(conn.user) is not conn:
            return
        run = self.broadcasts
        start = conn.seen[1] if conn.seen[0] == self.broadcast_run else 0
        if start < len(run):
            user = conn.user
            mine = b"".join(effect.data for effect in run[start:] if effect.exclude != user)
            conn.seen = (self.broadcast_run, len(run))
            if mine:
                conn.queue(mine)

    def _drain_waker(self) -> None:
        try:
            while self.waker_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    # --- shutdown -------------------------------------------------------------------
    def _shutdown(self) -> None:
        log.info("shutting down: saying BYE to %d connection%s", len(self.conns), "" if len(self.conns) == 1 else "s")
        self.sel.unregister(self.listener)   # no new connections
        goodbye = bye(ByeReason.SHUTDOWN)
        if self.broadcasts:
            self._deliver_broadcasts()
        for conn in list(self.conns.values()):
            conn.queue(goodbye)
            conn.close_when_flushed()
        deadline = time.time() + SHUTDOWN_GRACE
        for conn in list(self.conns.values()):
            conn.flush()
        while any(c.lifecycle is not Lifecycle.LINGERING for c in self.conns.values()) and time.time() < deadline:
            for key, mask in self.sel.select(max(0.0, deadline - time.time())):
                key.data.on_ready(mask)
            for conn in [c for c in self.pacing if c.waiting and not c.closed]:
                conn.flush()   # CH pages whose next piece the store may have brought
        for conn in list(self.conns.values()):
            conn.abort()
        self.pool.close()
        self._settle()
        self.store.send()   # shared mode: the logouts
        self.store.close()
        self.listener.close()
        log.info("stopped")


def _open_store(args: argparse.Namespace, selector: selectors.BaseSelector):
    """The store the options name, and the server key.

    Raises:
        storage.StorageError: it cannot be used.
    """
    if args.redis:
        import redisstore   # only a node of several needs it (and its Redis modules)
        return redisstore.open_store(args.redis, selector, args.data, history_limit=args.history_limit,
                                     key_file=args.server_key, frame_limit=args.frame_limit,
                                     readers=args.history_readers or None)
    return storage.open_store(args.data, getattr(args, "history_files", storage.DEFAULT_MAX_OPEN_HISTORY),
                              history_limit=args.history_limit, min_free=args.min_free, key_file=args.server_key,
                              readers=args.history_readers or None)


# --- command line -------------------------------------------------------------------

def _power_of_two(text: str) -> int:
    value = int(text)
    if value < 2 or value & (value - 1) or value > passwords.MAX_SCRYPT_N:
        raise argparse.ArgumentTypeError(f"{text} is not a power of two between 2 and {passwords.MAX_SCRYPT_N}")
    return value


def nonnegative(kind):
    """An argparse type: kind(text), refused if negative (0 turns a limit off)."""
    def parse(text: str):
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"{text} is negative")
        return value
    return parse


def descriptor_budget(fd_limit: int) -> tuple[int, int]:
    """(history files, clients) for a descriptor limit: half for history files (kept open for
    appends, and the lazy CH reads'), the rest for clients but 64 spare (the listener, the
    store's own files, Redis, the wake-up pair), so that the server does not run out."""
    history_files = max(16, fd_limit // 2 - 64)
    return history_files, max(16, fd_limit - history_files - 64)


def _raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 65536


def _bucket_options(group, name: str, rate: float, burst: float, rate_help: str, burst_help: str) -> None:
    """A token bucket's two options: --NAME-rate R (a second) and --NAME-burst B (at once)."""
    group.add_argument(f"--{name}-rate", type=nonnegative(float), default=rate, metavar="R", help=rate_help)
    group.add_argument(f"--{name}-burst", type=nonnegative(float), default=burst, metavar="B", help=burst_help)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(
        prog="chatserver.py", description="The chat room server (protocol: docs/PROTOCOL.md).",
        epilog="Every limit can be turned off with 0. Logs go to stderr.")
    parser.add_argument("port", type=int, metavar="PORT", help="TCP port to listen on (0: any free port)")
    parser.add_argument("--host", default="0.0.0.0",
                        help="address to listen on (default: all IPv4 interfaces)")
    parser.add_argument("--data", default=os.path.join(here, "data"), metavar="DIR",
                        help="data directory: accounts, <Username>.chat histories, server key (default: %(default)s)")
    parser.add_argument("--server-key", metavar="FILE", default=None,
                        help="the server's private key (PEM, made on first start, mode 0600; default: "
                        "server_key.pem in the data directory). Every node of a room needs the same one: "
                        "Redis holds only its public key, to check that they agree")
    parser.add_argument("--redis", metavar="URL", default=None,
                        help="run as one node of several sharing a Redis "
                        "(redis://[[USER]:PASSWORD@]HOST[:PORT][/DB], or rediss://... for TLS, the server's "
                        "certificate verified against the system CAs and HOST; rediss:// options: ?ca=FILE "
                        "(verify against this CA file), &check_hostname=no, &cert=FILE&key=FILE (a client "
                        "certificate)): accounts, history, presence and messages go through it; default: the "
                        "data directory alone")
    parser.add_argument("--require-tls", action="store_true",
                        help="refuse plain connections (ERROR tls_required); default: TLS and plain on one port")
    parser.add_argument("--accept-pm1", action=argparse.BooleanOptionalAction, default=False,
                        help="transitional: also accept version-1 PM SENDs (no id, replayable) from clients not "
                        "yet on PM2 (default: off, they are refused with bad_request; --accept-pm1 takes them)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log detail (default: %(default)s)")
    moderation = parser.add_argument_group("moderation (docs/PROTOCOL.md section 10)")
    moderation.add_argument("--admin", action="append", default=[], metavar="NAME",
                            help="an account that may kick, ban, unban, mute and unmute (repeatable; "
                            "names ignore case; give every node of a room the same admins)")
    moderation.add_argument("--admins", metavar="FILE", default=None,
                            help="a file of admin account names, one a line ('#' starts a comment), "
                            "read at start, in addition to --admin")
    limits = parser.add_argument_group("limits")
    limits.add_argument("--frame-limit", type=nonnegative(int), default=framing.DEFAULT_FRAME_LIMIT,
                        metavar="BYTES", help="largest frame body accepted or sent (default: %(default)s); "
                        "a bigger one is bad_frame and the connection is closed")
    limits.add_argument("--send-queue", type=nonnegative(int), default=DEFAULT_SEND_QUEUE, metavar="BYTES",
                        help="output queued for one client before it is cut off with BYE too_slow "
                        "(default: %(default)s)")
    limits.add_argument("--login-timeout", type=nonnegative(float), default=30.0, metavar="SECONDS",
                        help="time to finish LOGIN, PASSWORD and KEY before BYE idle (default: %(default)s)")
    limits.add_argument("--max-clients", type=nonnegative(int), default=None, metavar="N",
                        help="open connections in all (default: from the open-file limit)")
    limits.add_argument("--max-per-ip", type=nonnegative(int), default=50, metavar="N",
                        help="open connections from one address (default: %(default)s)")
    _bucket_options(limits, "connect", 10.0, 30.0,
                    "new connections per second from one address; more get server_busy "
                    "(default: %(default)s; 0: no limit)",
                    "new connections one address may open at once before the rate applies (default: %(default)s)")
    _bucket_options(limits, "flood", 10.0, 20.0,
                    "requests per second one connection may make; more wait (default: %(default)s)",
                    "requests one connection may make at once before the rate applies (default: %(default)s)")
    limits.add_argument("--register-rate", type=nonnegative(int), default=100, metavar="N",
                        help="new accounts per address per hour; past it PASSWORD answers rate_limited "
                        "(default: %(default)s)")
    limits.add_argument("--login-delay-cap", type=nonnegative(float), default=60.0, metavar="SECONDS",
                        help="after wrong passwords an account's next attempt from that address waits 1, 2, 4, ... "
                        "seconds, at most this long (default: %(default)s)")
    _bucket_options(limits, "bm", state.BM_RATE, state.BM_BURST,
                    "broadcasts per second one account may send, whatever its connections; more are "
                    "answered rate_limited (default: %(default)s)",
                    "broadcasts one account may send at once before --bm-rate applies (default: %(default)s)")
    limits.add_argument("--checks-per-ip", type=nonnegative(int), default=state.MAX_CHECKS_PER_ADDRESS, metavar="N",
                        help="password checks one address may have waiting or running at once (256 in all); "
                        "past it PASSWORD answers rate_limited (default: %(default)s)")
    limits.add_argument("--guess-limit", type=nonnegative(int), default=state.GUESS_LIMIT, metavar="N",
                        help="failed password checks an hour per account from addresses that failed on it "
                        "(twice that from all addresses); past it PASSWORD answers rate_limited (default: %(default)s)")
    limits.add_argument("--offline-limit", type=nonnegative(int), default=state.OFFLINE_LIMIT, metavar="N",
                        help="private messages kept for one offline user until its next login (TARGET with "
                        "\"offline\": true); past it SEND answers rate_limited (default: %(default)s)")
    limits.add_argument("--offline-per-sender", type=nonnegative(int), default=state.OFFLINE_PER_SENDER,
                        metavar="N", help="of those, at most N from one sender, so that one account cannot fill "
                        "them for everyone else (0: no share) (default: %(default)s)")
    limits.add_argument("--recent", type=nonnegative(int), default=state.RECENT, metavar="N",
                        help="the room's newest N broadcasts shown to a user at login (0: none) "
                        "(default: %(default)s)")
    limits.add_argument("--catch-up-limit", type=nonnegative(int), default=state.CATCH_UP_LIMIT, metavar="N",
                        help="broadcasts at most sent to a client that comes back after losing its connection "
                        "(KEY with \"since\"): the newest N since its last one (default: %(default)s)")
    limits.add_argument("--scrypt-n", type=_power_of_two, default=passwords.DEFAULT_SCRYPT_N, metavar="N",
                        help="scrypt cost for new accounts, a power of two (default: %(default)s); "
                        "existing accounts keep the cost they were made with")
    limits.add_argument("--history-limit", type=nonnegative(int), default=storage.DEFAULT_HISTORY_LIMIT,
                        metavar="BYTES", help="history kept: the room log keeps about the newest BYTES of BMs and "
                        "each <Username>.chat at most BYTES (two halves); with --redis, streams of about "
                        "BYTES/512 (room) and BYTES/4096 (each user) entries (default: %(default)s)")
    limits.add_argument("--history-readers", type=nonnegative(int), default=0, metavar="N",
                        help="CH reads of a whole history (or a limit past 2,000) served at once; more wait "
                        "their turn, oldest first (default 0: a quarter of the descriptors kept for history "
                        "files, 3 each; with --redis, 64, each holding up to 512 KiB)")
    limits.add_argument("--min-free", type=nonnegative(int), default=storage.DEFAULT_MIN_FREE, metavar="BYTES",
                        help="free disk below which new messages are refused with internal, before a write "
                        "could fail half-way (default: %(default)s)")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"port {args.port} is not between 0 and 65535")
    if args.flood_rate and args.flood_burst < 1:
        args.flood_burst = 1.0
    args.admin_names = _admin_names(parser, args)
    return args


def _admin_names(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The admins of --admin and --admins FILE, each a valid username (else a usage error, status 2)."""
    names = list(args.admin)
    if args.admins:
        try:
            with open(args.admins, encoding="utf-8") as fh:
                lines = fh.read().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            parser.error(f"cannot read the admins file {args.admins}: {getattr(exc, 'strerror', None) or exc}")
        names.extend(word for line in lines for word in line.split("#", 1)[0].split())
    for name in names:
        if not valid_username(name):
            parser.error(f"admin {name!r} is not a username ({USERNAME_RULE})")
    return names


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.history_files, clients = descriptor_budget(_raise_fd_limit())
    if args.max_clients is None:
        args.max_clients = clients
    try:
        server = ChatServer(args)
    except (storage.StorageError, tlslayer.TLSError) as exc:
        print(f"chatserver.py: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:   # a run-time failure (status 1); 2 is for bad arguments, as argparse uses it
        print(f"chatserver.py: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    server.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
