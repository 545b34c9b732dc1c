"""The shared store: accounts, history, presence and fan-out in Redis, for several nodes.

``RedisStore`` is the ``store.Store`` of a node: the server hands it the
session logic's store requests (``submit``) and collects typed results
(``flush``), which here arrive later, as Redis answers. It also runs this
node's life in the cluster (docs/SCALEOUT.md) and turns what it reads into
``store`` cluster events:

* two links in the server's own selector: one pipelined command link (every
  mutation one Lua script of ``redis_scripts.py``), one reader blocked in
  ``XREAD`` on ``chat:ev`` (BMs, presence) and this node's inbox (PMs, kicks),
  resuming from the last ids it saw, so nothing is delivered twice or missed;
* a lease renewed every second; a node that cannot renew it is fenced: it
  drops its users and joins again under a new id. Every second it also reaps
  nodes whose lease expired, so their users go offline for everyone;
* Redis unreachable or stalled (a command unanswered for 2 s): requests are
  answered ``internal`` (never ``ok`` for what is not stored); after a few
  seconds the node drops its users and joins again when Redis is back.

Stream ids, stream field names and key names live here and in
``redis_scripts.py`` only: the session logic sees ``store.Position`` values
and typed events (``Joined`` when this node (re)joins, ``Dropped`` when it
must close every connection).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable

import json

import framing
import passwords
import pg3lib
import pmguard
import redis_scripts
import storage
import store
from redislink import BlockingRedis, LinkError, RedisLink, redact
from protocol import valid_username
from resp import RedisError

log = logging.getLogger("chat.redis")

TICK = 1.0             # seconds between lease renewals and reaping rounds
STALL = 2.0            # an unanswered command this old means the link is broken
DROP_AFTER = 3.0       # seconds without Redis before the node closes its users' connections
LEAVE_WAIT = 1.0       # seconds a node stopping cleanly waits for Redis to take its leave
XREAD_BLOCK_MS = 1000
XREAD_COUNT = 1000
READERS = 64           # lazy CH reads at once (--history-readers): each holds up to two pieces (512 KiB)
SERVER_KEY = "serverkey"


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def stream_position(text: object) -> store.Position:
    """A Redis stream id ``ms-seq`` as a comparable position; ``store.START`` if it is not one."""
    try:
        ms, _, seq = (text.decode("ascii") if isinstance(text, bytes) else str(text)).partition("-")
        return int(ms), int(seq or 0)
    except (AttributeError, ValueError, UnicodeDecodeError):
        return store.START


def remote_user(key: str, raw: str) -> store.RemoteUser | None:
    """The RemoteUser an online record (JSON) describes, or None if it is not one."""
    try:
        record = json.loads(raw)
        return store.RemoteUser(key, record["username"], record["token"], record["public_key"],
                                record["fingerprint"])
    except (ValueError, KeyError, TypeError):
        return None


def stream_lengths(history_limit: int) -> dict:
    """The MAXLEN of the room stream and of each user's stream for ``--history-limit`` bytes (0: no trim)."""
    if not history_limit:
        return {"room_maxlen": 1 << 62, "hist_maxlen": 1 << 62}
    return {"room_maxlen": max(1000, history_limit // 512), "hist_maxlen": max(1000, history_limit // 4096)}
def _record(raw) -> store.ModRecord | None:
    """A moderation record kept in chat:mod, or None (absent, or not one: logged)."""
    if not raw:
        return None
    try:
        return store.ModRecord.from_json(raw)
    except ValueError:
        log.error("ignoring a malformed moderation record in Redis")
        return None


def _kept_frames(rows) -> list[bytes]:
    """The data frames of kept PMs (their D PM bodies, as chat:off:<name> holds them)."""
    return [framing.encode_raw(framing.KIND_DATA, row) for row in rows or () if isinstance(row, bytes)]


def _id_refused(reply) -> store.IdRefused:
    """A PM script's {-2, 'used' | 'floor'}."""
    return store.IdRefused(pmguard.USED if _text(reply[1]) == "used" else pmguard.BELOW_FLOOR)


class LazyHistory:
    """A history read forwards a piece at a time (the ``history_forward`` script) as the CH
    pages are taken, as the file store reads its files: a node holds about two pieces of it
    (a piece is at most 500 entries and 256 KiB), and Redis never runs one long script for it.
    ``store.WAIT`` while a piece is on its way. With a limit, a counting pass goes first
    (keeping the cursor where each of its pieces began), then the read from the last of those
    at or before the newest ``limit`` entries, skipping the rest of what it passes. The first
    piece is asked for at once, and ``ready(self)`` (or ``ready(None)`` if Redis refused it) is
    called when it comes; every later one on a pull (the next while the last is being taken),
    so a reader that has gone costs nothing more. The read ends where the history stood at
    its first piece; what came later reaches the client live.
    """

    COUNT_ALL = 10**15   # a skip that only counts

    def __init__(self, link: RedisLink, keys: redis_scripts.ChatKeys, name: str, limit: int | None,
                 ready: Callable[[LazyHistory | None], None], work: int = redis_scripts.FORWARD_WORK,
                 slots: store.ReadSlots | None = None) -> None:
        self._link, self._keys, self._name, self._limit, self._work = link, keys, name, limit, work
        self._ready: Callable[[LazyHistory | None], None] | None = ready
        self._lines: collections.deque[str] = collections.deque()
        self._last_piece = 0
        self._cursor: tuple = redis_scripts.FORWARD_START
        self._skip: int | None = self.COUNT_ALL if limit is not None else None
        self._counting = limit is not None
        self._marks: list[tuple[tuple, int]] = []   # counting: (cursor, entries before it) of each piece
        self._counted = 0
        self._asking = self._done = False
        self._error: str | None = None
        self._slots = slots
        self._ticket: list | None = None
        if slots is None:
            self._ask()
        else:   # the first piece is asked for once a slot is free (now, if one is)
            self._ticket = slots.enter(self._ask)

    def __iter__(self) -> LazyHistory:
        return self

    def __next__(self):
        lines = self._lines
        if len(lines) <= self._last_piece // 2 and not (self._asking or self._done or self._error):
            self._ask()   # the next piece is on its way while these are taken
        if lines:
            return lines.popleft()
        if self._error is not None:
            self.close()
            raise OSError(self._error)
        if self._done:
            self.close()
            raise StopIteration
        return store.WAIT

    def close(self) -> None:
        """The pages end here: no more pieces; the slot goes to the next read waiting."""
        self._done = True
        self._lines.clear()
        ticket, self._ticket = self._ticket, None
        if ticket is not None and self._slots is not None:
            self._slots.leave(ticket)

    def __del__(self) -> None:
        self.close()

    def _ask(self) -> None:
        self._asking = True
        call = self._keys.history_forward(self._name, self._cursor, self._skip, work=self._work)
        self._skip = None
        self._link.eval(self._piece, *call)

    def _piece(self, reply) -> None:
        self._asking = False
        ready, self._ready = self._ready, None
        if isinstance(reply, RedisError):
            self._error = f"Redis: {reply.message}"
            if ready is not None:
                ready(None)
            return
        cursor, lines, counted = reply
        over = cursor[0] == b""
        if self._counting:
            if not self._marks:   # the start, now with the ends this read stops at
                self._marks.append(((*redis_scripts.FORWARD_START[:3], cursor[3], cursor[4], "0"), 0))
            self._counted += counted
            if over:   # counted: read on from the last mark before the newest `limit`
                self._counting = False
                first = max(0, self._counted - (self._limit or 0))
                self._cursor, before = next(mark for mark in reversed(self._marks) if mark[1] <= first)
                self._skip, self._marks = first - before, []
            else:
                self._marks.append((cursor, self._counted))
                self._cursor = cursor
        elif self._ticket is None and self._slots is not None:
            self._done = True   # closed meanwhile: the piece is not kept
        else:
            self._lines.extend(_text(line) for line in lines)
            self._last_piece = len(lines)
            self._cursor = cursor
            self._done = over
        if ready is not None:
            ready(self)


def new_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}".replace("/", "_")


def open_store(url: str, selector, directory: str, history_limit: int = storage.DEFAULT_HISTORY_LIMIT,
               key_file: str | None = None, frame_limit: int = 0,
               readers: int | None = None) -> tuple[RedisStore, pg3lib.KeyPair]:
    """A node's store on the Redis at url, and its server key (from its own key file).

    Raises:
        storage.StorageError: Redis cannot be used, the key file cannot be read or made, or
            this node's key is not the room's.
    """
    os.makedirs(directory, exist_ok=True)
    path = key_file or os.path.join(directory, storage.SERVER_KEY_FILE)
    fresh = not os.path.exists(path)
    local = storage.load_server_keys(directory, path)
    try:
        keys = room_server_key(url, local, path, fresh)
        return RedisStore(url, selector, history_limit=history_limit, frame_limit=frame_limit,
                          readers=readers), keys
    except (OSError, TimeoutError, ValueError) as exc:
        if fresh:   # made just now and not taken: leave no key behind to be refused at the next start
            with contextlib.suppress(OSError):
                os.remove(path)
        raise storage.StorageError(f"cannot use Redis at {redact(url)}: {exc}") from None


def room_server_key(url: str, local: pg3lib.KeyPair, path: str, fresh: bool) -> pg3lib.KeyPair:
    """Check that this node's key is the room's (blocking; at start).

    Redis holds only the room key's public key form, so that nodes can check they
    agree; each node reads the private key from its own file (``--server-key``).
    An older release kept the whole private key there: it is replaced by the
    public form, and a node started with no key file of its own adopts it once.

    Raises:
        ValueError: this node's key is not the room's.
        OSError, TimeoutError: Redis cannot be reached.
    """
    name = redis_scripts.ChatKeys().prefix + SERVER_KEY
    with BlockingRedis(url) as redis:
        redis.call("SET", name, local.public.key_form, "NX")
        held = redis.call("GET", name)
        if not isinstance(held, bytes):
            raise OSError(f"cannot read the room's server key from {redact(url)}: {held!r}")
        if held.lstrip().startswith(b"-----BEGIN"):   # an older release's private key, in the clear
            old = pg3lib.KeyPair.from_pem(held)
            if old.fingerprint != local.fingerprint and not fresh:
                raise ValueError(f"this node's server key {local.fingerprint} ({path}) is not the room's "
                                 f"{old.fingerprint}, which an older release kept in Redis")
            if old.fingerprint != local.fingerprint:
                old.save(path)
                log.warning("adopted the room's server key %s from Redis into %s", old.fingerprint, path)
                local = old
            redis.call("SET", name, local.public.key_form)
            log.warning("Redis held the private server key in the clear (an older release); it now holds "
                        "only the public key. Its AOF may still hold the old value: rewrite it "
                        "(BGREWRITEAOF) to be rid of it")
            return local
    room = pg3lib.PublicKey.from_key_form(held)
    if room.fingerprint != local.fingerprint:
        raise ValueError(f"this node's server key {local.fingerprint} ({path}) is not the room's "
                         f"{room.fingerprint}: give every node of a room the same key file (--server-key)")
    return local


class RedisStore:
    """The store seam and the node's membership, over two non-blocking Redis links."""

    def __init__(self, url: str, selector, clock=time.monotonic,
                 history_limit: int = storage.DEFAULT_HISTORY_LIMIT, frame_limit: int = 0,
                 readers: int | None = None) -> None:
        self.url = url
        self.read_slots = store.ReadSlots(readers or READERS)   # lazy CH reads at once (each holds pieces)
        self.frame_limit = frame_limit   # a data frame from a stream must fit it to reach a client
        self.selector = selector
        self.clock = clock
        self.keys = redis_scripts.ChatKeys(**stream_lengths(history_limit))
        self.node = ""
        self.cmd: RedisLink = None  # type: ignore[assignment]  # both made by join_blocking below
        self.reader: RedisLink = None  # type: ignore[assignment]
        self._events: list[store.ClusterEvent] = []   # read, not yet handed over
        self._done: list[tuple[int, store.Result]] = []
        self._last_ev = "$"
        self._last_in = "0"      # the XREAD cursor of the inbox: the last entry read
        self._read_in = "0"      # the last inbox entry read into _events
        self._handed_in = "0"    # the last inbox entry handed to the room (events()): a reap hands on the rest
        self._next_tick = 0.0
        self._down_since: float | None = None
        self._joined = False
        self._reading = False
        self.join_blocking()

    # --- membership ---------------------------------------------------------------
    def join_blocking(self) -> None:
        """Register a fresh node id, note where the event stream is, and who is online (at start)."""
        self.node = new_node_id()
        keys = self.keys
        with BlockingRedis(self.url, scripts=redis_scripts.SCRIPTS) as redis:
            if redis.eval(*keys.register_node(self.node)) != 1:
                raise OSError(f"node id {self.node} is taken")
            last = redis.call("XREVRANGE", keys.ev, "+", "-", "COUNT", 1)
            self._last_ev = _text(last[0][0]) if isinstance(last, list) and last else "0"
            online = redis.call("HGETALL", keys.online)
        self._last_in = self._read_in = self._handed_in = "0"
        remote = {}
        for raw_key, raw in zip(online[::2], online[1::2]) if isinstance(online, list) else ():
            user = remote_user(_text(raw_key), _text(raw))
            if user is not None and not user.token.startswith(self.node + "/"):
                remote[user.key] = user
        self._events.append(store.Joined(self.node, remote))
        self._joined = True
        self._down_since = None
        self._connect()
        log.info("node %s joined %s", self.node, redact(self.url))

    def _connect(self) -> None:
        for link in (self.cmd, self.reader):
            if link is not None and link.error is None:
                link.on_down = None
                link.close()
        self.cmd = RedisLink(self.url, selector=self.selector, scripts=redis_scripts.SCRIPTS,
                             on_down=self._link_down)
        self.reader = RedisLink(self.url, selector=self.selector, on_down=self._link_down)
        self._reading = False
        self._read_events()

    def _link_down(self, link: RedisLink, error: LinkError) -> None:
        if link is self.cmd or link is self.reader:
            if self._down_since is None:
                self._down_since = self.clock()
                log.error("lost Redis (%s)", error.message)
            for other in (self.cmd, self.reader):
                if other is not None and other is not link and other.error is None:
                    other.on_down = None
                    other.close()

    @property
    def up(self) -> bool:
        return self._down_since is None and self.cmd is not None and self.cmd.error is None

    def next_tick(self) -> float | None:
        """Stalls are looked for twice a second, the lease renewed every second."""
        return min(self._next_tick, self.clock() + TICK / 2)

    def tick(self, now: float) -> None:
        """Every pass: stalls; every second: the lease, reaping, reconnecting."""
        for link in (self.cmd, self.reader):
            if link is not None and link.error is None and link.stalled(now, STALL):
                log.error("Redis did not answer for %.0f s", STALL)
                link.close()
        if now < self._next_tick:
            return
        self._next_tick = now + TICK
        if not self.up:
            if self._joined and self._down_since is not None and now - self._down_since > DROP_AFTER:
                self._joined = False
                self._events.append(store.Dropped("shutdown"))
                log.error("no Redis for %.0f s: closing this node's connections", DROP_AFTER)
            self._reconnect()
            return
        self.cmd.eval(self._renewed, *self.keys.renew_lease(self.node, read=self._handed_in))
        self.cmd.eval(self._dead_nodes, *self.keys.dead_nodes())

    def _reconnect(self) -> None:
        try:
            probe = BlockingRedis(self.url, timeout=0.5)
        except OSError:
            return
        try:
            pong = probe.call("PING")
        except (OSError, TimeoutError):
            return
        finally:
            probe.close()
        if pong != b"PONG":   # e.g. -LOADING while Redis reads its AOF
            return
        if not self._joined:
            try:
                self.join_blocking()
            except (OSError, TimeoutError) as exc:
                log.error("joining again failed: %s", exc)
            return
        self._down_since = None
        self._connect()   # the lease is checked at the next renewal; the reader resumes from its ids
        log.info("Redis is back")

    def _renewed(self, reply) -> None:
        if reply == 1 or isinstance(reply, LinkError):
            return
        log.error("node %s lost its lease (fenced): closing its connections, joining again", self.node)
        self._events.append(store.Dropped("shutdown"))
        self._joined = False
        self._down_since = self.clock()   # join again at the next tick

    def _dead_nodes(self, reply) -> None:
        if not isinstance(reply, list):
            return
        for node in reply:
            log.warning("reaping node %s (its lease expired)", _text(node))
            self.cmd.eval(lambda _: None, *self.keys.reap_node(_text(node)))

    # --- events -----------------------------------------------------------------------
    def _read_events(self) -> None:
        if self._reading or self.reader is None or self.reader.error is not None:
            return
        self._reading = True
        self.reader.call(self._events_read, "XREAD", "COUNT", XREAD_COUNT, "BLOCK", XREAD_BLOCK_MS, "STREAMS",
                         self.keys.ev, self.keys.inbox(self.node), self._last_ev, self._last_in,
                         blocks_for=XREAD_BLOCK_MS / 1000)

    def _events_read(self, reply) -> None:
        self._reading = False
        if isinstance(reply, RedisError):
            return   # the link is down (its on_down has it) or Redis refused: read again on reconnect
        for stream, entries in reply or ():
            inbox = _text(stream) != self.keys.ev
            for entry_id, flat in entries:
                ident = _text(entry_id)
                fields = {_text(k): v for k, v in zip(flat[::2], flat[1::2])}
                event = self._event(stream_position(ident), fields)
                if event is not None:
                    self._events.append(event)
                if inbox:
                    self._last_in = self._read_in = ident
                else:
                    self._last_ev = ident
        self._read_events()

    def _event(self, position: store.Position, fields: dict) -> store.ClusterEvent | None:
        """The cluster event of one stream entry (the layout of redis_scripts.py), or None.

        A message's data frame goes to clients as it is, so it is checked first: one
        whole ``D`` frame of the right op from a valid sender, within this node's frame
        limit. Anything else (a bug, or someone writing to Redis) is dropped and logged.
        """
        kind = _text(fields.get("t", b""))
        frame = fields.get("d", b"")
        frame = frame if isinstance(frame, bytes) else b""
        if kind in ("bm", "pm") and not self._relayable(frame, "BM" if kind == "bm" else "PM", fields):
            log.error("dropping a malformed %s entry at %s in the event streams", kind, position)
            return None
        if kind == "bm":
            return store.Broadcast(position, _text(fields.get("from", b"")), frame)
        key, token = _text(fields.get("u", b"")), _text(fields.get("tok", b""))
        if kind == "on":
            user = remote_user(key, _text(fields.get("rec", b"{}")))
            return store.Presence(position, key, user.token, True, user) if user is not None else None
        if kind == "off":
            return store.Presence(position, key, token, False)
        if kind == "pm":
            return store.Direct(_text(fields.get("to", b"")), token, frame)
        if kind == "kick":
            return store.Kick(key, token)
        if kind == "mod":
            try:
                return store.ModerationEvent(store.ModRecord.from_json(frame))
            except ValueError:
                log.error("ignoring a malformed moderation event at %s", position)
                return None
        return None

    def _relayable(self, frame: bytes, op: str, fields: dict) -> bool:
        if self.frame_limit and len(frame) > self.frame_limit + framing.HEADER_SIZE:
            return False
        decoder = framing.FrameDecoder(self.frame_limit)
        decoder.append(frame)
        try:
            parsed = decoder.next_frame()
        except framing.ProtocolError:
            return False
        if parsed is None or decoder.buffered or parsed.kind != framing.KIND_DATA or parsed.body["op"] != op:
            return False
        sender = parsed.body.get("from")
        if not (isinstance(sender, str) and valid_username(sender)):
            return False
        if op == "BM":
            return sender.lower() == _text(fields.get("from", b""))
        return str(parsed.body.get("to", "")).lower() == _text(fields.get("to", b""))

    def events(self) -> list[store.ClusterEvent]:
        """Cluster events read since the last call, in stream order."""
        events, self._events = self._events, []
        self._handed_in = self._read_in
        return events

    # --- the store seam ---------------------------------------------------------------
    @property
    def pending(self) -> bool:
        return bool(self._done)

    def flush(self) -> list[tuple[int, store.Result]]:
        """The completions that have arrived."""
        done, self._done = self._done, []
        return done

    def send(self) -> None:
        """Send what this pass asked of Redis, one write per link."""
        for link in (self.cmd, self.reader):
            if link is not None and link.error is None:
                link.flush()

    def submit(self, request: store.Request) -> None:
        """Take one store request; its completion comes with a later flush."""
        cid = request.cid
        if not self.up:
            if cid:
                self._done.append((cid, store.FAILED))
            return

        def done(result) -> None:
            if cid:
                self._done.append((cid, result))

        def checked(convert):
            def callback(reply) -> None:
                if isinstance(reply, RedisError):
                    if not isinstance(reply, LinkError):
                        log.error("Redis refused %s: %s", type(request).__name__, reply.message)
                    done(store.FAILED)
                else:
                    done(convert(reply))
            return callback

        keys = self.keys
        if isinstance(request, store.LoadAccount):
            self.cmd.call(checked(lambda raw: store.AccountLoaded(passwords.Account.from_json(_text(raw))
                                                                  if raw else None)),
                          "HGET", keys.acct(request.key), "json")
        elif isinstance(request, store.CreateAccount):
            account = request.account
            self.cmd.eval(checked(lambda n: store.AccountCreated(n == 1)),
                          *keys.create_account(account.key, {"username": account.username,
                                                             "json": account.to_json()}))
        elif isinstance(request, store.ReadHistory):
            limit = request.limit
            if limit is not None and limit <= storage.HELD_LIMIT:   # read backwards in one script, held
                self.cmd.eval(checked(lambda rows: store.HistoryRead([_text(line) for line in rows])),
                              *keys.history(request.username.lower(), limit))
            else:   # a whole history, or most of it: read as the pages are taken
                LazyHistory(self.cmd, keys, request.username.lower(), limit,
                            lambda lazy: done(store.HistoryRead(lazy) if lazy is not None else store.FAILED),
                            slots=self.read_slots)
        elif isinstance(request, store.MarkOnline):
            return   # the scripts that put a session online or take it off mark it themselves
        elif isinstance(request, store.ClaimSession):
            self.cmd.eval(checked(lambda reply: store.CLAIMED if reply[0] == 1 else store.FAILED),
                          *keys.login_swap(request.key, request.token))
        elif isinstance(request, store.GoOnline):
            self.cmd.eval(checked(self._went_online),
                          *keys.go_online(request.key, request.token, request.record, recent=request.recent,
                                          since=request.since))
        elif isinstance(request, store.Logout):
            self.cmd.eval(lambda _: None, *keys.logout(request.key, request.token))
        elif isinstance(request, store.AppendHistory):
            self._append(request, checked)
        elif isinstance(request, store.LoadSanctions):
            self.cmd.call(checked(lambda pair: store.SanctionsLoaded(*(_record(raw) for raw in pair))),
                          "HMGET", keys.mod, "ban:" + request.key, "mute:" + request.key)
        elif isinstance(request, store.ListSanctions):
            self.cmd.call(checked(lambda flat: store.SanctionsListed(
                [r for r in (_record(raw) for raw in flat[1::2]) if r is not None])), "HGETALL", keys.mod)
        elif isinstance(request, store.SaveKey):
            self.cmd.call(checked(lambda _: store.KEY_SAVED), "HSET", keys.lastkey, request.key, request.key_form)
        elif isinstance(request, store.LoadLastKey):
            self.cmd.eval(checked(lambda pair: store.LastKey(_text(pair[0]) or None, _text(pair[1]) or None)),
                          *keys.last_key(request.key))
        elif isinstance(request, store.StoreOfflinePM):
            (_, mine), (_, theirs) = request.entries
            self.cmd.eval(checked(self._kept_result),
                          *keys.pm_offline(request.sender.lower(), request.target.lower(), mine.rstrip(b"\n"),
                                           theirs.rstrip(b"\n"), request.frame,
                                           request.offline_frame[framing.HEADER_SIZE:], request.limit,
                                           request.token, pm_id=request.pm_id, sender_limit=request.sender_limit))
        elif isinstance(request, store.TakeOffline):
            self.cmd.eval(checked(lambda rows: store.OfflineTaken(_kept_frames(rows))),
                          *keys.take_offline(request.username.lower()))
        elif isinstance(request, store.Moderate):
            record = request.record
            self.cmd.eval(checked(lambda reply: store.ModerationStored(reply[0] == 1)),
                          *keys.moderate(record.action, record.key, record.to_json(), record.at))
        else:
            raise TypeError(f"not a store request: {request!r}")

    def _append(self, request: store.AppendHistory, checked) -> None:
        keys = self.keys
        sender = request.sender.lower()
        if request.kind == "BM":
            line = request.entries[0][1].rstrip(b"\n")
            self.cmd.eval(checked(self._bm_result), *keys.bm(sender, line, request.frame, request.token))
        elif request.kind == "PM":
            (_, mine), (_, theirs) = request.entries
            self.cmd.eval(checked(self._pm_result),
                          *keys.pm(sender, request.target, request.target_token, mine.rstrip(b"\n"),
                                   theirs.rstrip(b"\n"), request.frame, request.token, pm_id=request.pm_id))
        else:
            raise ValueError(f"an append of unknown kind {request.kind!r}")

    @staticmethod
    def _bm_result(reply) -> store.Result:
        if reply[0] == 1:
            return store.Appended(recipients=int(reply[1]))
        return store.FAILED   # the sender's session is gone

    @staticmethod
    def _went_online(reply) -> store.Result:
        if reply[0] != 1:
            return store.WentOnline(None)
        recent = reply[3] if len(reply) > 3 else ()
        return store.WentOnline(stream_position(reply[1]), tuple(_kept_frames(reply[2] if len(reply) > 2 else ())),
                                tuple(_text(line) for line in reversed(recent)))

    @staticmethod
    def _kept_result(reply) -> store.Result:
        if reply[0] == -2:
            return _id_refused(reply)
        if reply[0] == 1:
            return store.Appended(recipients=1)
        if reply[0] == 2:
            return store.Appended(recipients=0)
        if reply[0] == 4:
            return store.Appended(full=True, sender_full=True)
        return store.Appended(full=True) if reply[0] == 3 else store.FAILED

    @staticmethod
    def _pm_result(reply) -> store.Result:
        if reply[0] == -2:
            return _id_refused(reply)
        if reply[0] == 1:
            return store.Appended(recipients=1)
        return store.Appended(recipients=0, target_gone=True) if reply[0] == 0 else store.FAILED

    def close(self) -> None:
        """Leave: this node's lease is dropped and the node forgotten (``reap_node`` on itself,
        behind the logouts already queued), waiting up to LEAVE_WAIT for it, so the other nodes
        do not reap it later as if it had died; then the links close."""
        cmd = self.cmd
        if cmd is not None and cmd.error is None and self._joined:
            left: list = []
            cmd.call(lambda _: None, "DEL", self.keys.node(self.node))
            cmd.eval(left.append, *self.keys.reap_node(self.node, read=self._handed_in))
            cmd.settle(lambda: bool(left), LEAVE_WAIT)
            if left and isinstance(left[0], list) and left[0][0] == 1:
                log.info("node %s left %s", self.node, redact(self.url))
        for link in (self.cmd, self.reader):
            if link is not None and link.error is None:
                link.on_down = None
                link.close()

