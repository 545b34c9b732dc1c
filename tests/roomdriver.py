"""An in-process shell for ``state.Room``: carries out its effects as chatserver.py does, without sockets.

``RoomDriver`` is what ``chatserver.ChatServer.apply``/``_pump``/``_settle`` do,
minus the sockets and the thread pool:

* ``Send`` -> the bytes are decoded (one ``FrameDecoder`` per connection, so a
  malformed reply would fail loudly) and appended to ``inbox[cid]``;
* ``Deliver``/``DeliverAll`` -> to the connections of the named users, looked
  up in ``online``, a map kept only from ``Online``/``Offline`` effects;
* ``DeliverAll`` effects are held and delivered together before the next
  ``Deliver``/``Online``/``Offline`` and at the end of the pass, as the server
  batches a pass's broadcasts;
* ``Close`` -> the connection is marked closed, its queued requests dropped,
  and ``room.disconnect`` is called (the server does that once the output is
  flushed; here the output is already "flushed" into the inbox);
* a framing error (``run_pass`` with raw bytes) -> the frames before it are
  handled, then ``room.refuse`` once the session is not busy;
* store requests -> a real ``storage.FileStore``; ``CheckPassword`` ->
  ``passwords.check_login`` with a tiny scrypt cost, run when the loop
  settles, as the worker pool's completion would be;
* completions go back through ``room.completed``; requests wait in a per
  connection queue while the session is busy (never fed to a busy session).

Every event (``connect``, ``send``, ``run_pass``, ``disconnect``, ``tick``) is
one loop pass: it ends with the store settled and the broadcasts delivered.
Anything sent to a connection after the room closed it, or to an unknown one,
or delivered to a user who is not online, is kept in ``stray`` so that tests
can insist there is none; sends to a connection whose peer went away are
normal and kept in ``dropped``.

Client-side helpers (sealing a password, a signed PM body) are at the end.
"""

from __future__ import annotations

import base64
import collections
import itertools
import json
import os

import framing
import passwords
import pg3lib
import protocol
import state
import storage
import store

FAST_SCRYPT_N = 16


class FakeClock:
    """A clock for ``Room(clock=...)`` that moves only when told."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


class RoomDriver:
    """A Room, a FileStore in data_dir and the effects carried out in process."""

    def __init__(self, data_dir: str, server_keys: pg3lib.KeyPair, *, scrypt_n: int = FAST_SCRYPT_N,
                 login_timeout: float = 30.0, frame_limit: int = framing.DEFAULT_FRAME_LIMIT,
                 clock: FakeClock | None = None, random_bytes=os.urandom, **room_options) -> None:
        self.data_dir = data_dir
        self.server_keys = server_keys
        self.scrypt_n = scrypt_n
        self.frame_limit = frame_limit
        self.clock = clock or FakeClock()
        self.store = storage.FileStore(data_dir)
        self.room = state.make_room(server_keys, frame_limit=frame_limit, login_timeout=login_timeout,
                               clock=self.clock, random_bytes=random_bytes, **room_options)
        self.inbox: dict[int, list[framing.Frame]] = {}
        self.requests: dict[int, list[str]] = {}   # ops handed to room.receive, in order
        self.pending: dict[int, collections.deque] = {}
        self.closed: set[int] = set()          # gone: closed by the room (Close) or by the peer
        self.closed_by_room: set[int] = set()
        self.online: dict[str, int] = {}
        self.stray: list = []                  # effects that should not exist (see the module docstring)
        self.dropped: list = []                # sends to a connection the peer closed (normal)
        self.audits: list = []                 # state.Audit effects (the server logs them)
        self._fatal: dict[int, bytes] = {}
        self._broadcasts: list = []
        self._decoders: dict[int, framing.FrameDecoder] = {}
        self._client_decoders: dict[int, framing.FrameDecoder] = {}
        self._jobs: collections.deque = collections.deque()
        self._cids = itertools.count(1)

    # --- events (each one a whole loop pass) ---------------------------------------------
    def connect(self, address: str = "127.0.0.1") -> int:
        cid = next(self._cids)
        self.inbox[cid] = []
        self.requests[cid] = []
        self.pending[cid] = collections.deque()
        self._decoders[cid] = framing.FrameDecoder(self.frame_limit)
        self._client_decoders[cid] = framing.FrameDecoder(self.frame_limit)
        self.apply(self.room.connect(cid, address))
        self._end_of_pass()
        return cid

    def send(self, cid: int, body: dict, kind: str = framing.KIND_COMMAND) -> list[framing.Frame]:
        """One request from cid; returns the frames cid received meanwhile."""
        return self.send_many(cid, [body], kind)

    def send_many(self, cid: int, bodies: list, kind: str = framing.KIND_COMMAND) -> list[framing.Frame]:
        """Requests that arrived together (pipelined); returns the frames cid received meanwhile."""
        start = len(self.inbox[cid])
        self.run_pass([(cid, b"".join(framing.encode(kind, body) for body in bodies))])
        return self.inbox[cid][start:]

    def run_pass(self, arrivals: list) -> None:
        """One loop pass: each (cid, what) in order, then the store settles and broadcasts go out.

        ``what`` is a request body (dict), raw bytes from the peer, or None: the peer closed.
        """
        for cid, what in arrivals:
            if cid in self.closed:
                raise AssertionError(f"connection {cid} is closed; the server reads nothing more from it")
            if what is None:
                self._abort(cid)
                continue
            data = framing.command(what) if isinstance(what, dict) else what
            try:
                frames = self._decoders[cid].feed(data)
            except framing.ProtocolError as exc:
                self.pending[cid].extend(exc.frames)
                self._fatal[cid] = protocol.fatal(protocol.Error(exc.code), exc.message)
                self._pump(cid)
                continue
            self.pending[cid].extend(frames)
            self._pump(cid)
        self._end_of_pass()

    def disconnect(self, cid: int) -> None:
        """The peer went away."""
        self.run_pass([(cid, None)])

    def tick(self, seconds: float = 0.0) -> None:
        """Move the clock and run the room's timers (a pass with nothing to read)."""
        now = self.clock.advance(seconds)
        self.apply(self.room.tick(now))
        self._end_of_pass()

    def wait_out(self, cid: int, step: float = 0.25, limit: float = 120.0) -> None:
        """Tick the clock while cid waits out a held request (the failed-login delay)."""
        waited = 0.0
        while self.room.busy(cid) and waited < limit:
            self.tick(step)
            waited += step

    # --- the shell (chatserver.apply/_pump/_settle/_deliver_broadcasts) ---------------------
    def _end_of_pass(self) -> None:
        self.settle()
        if self._broadcasts:
            self._deliver_broadcasts()

    def _pump(self, cid: int) -> None:
        pending = self.pending[cid]
        while pending and cid not in self.closed:
            if self.room.busy(cid):
                break
            frame = pending.popleft()
            self.requests[cid].append(frame.body["op"])
            self.apply(self.room.receive(cid, frame))
        if cid in self.closed or pending:
            return
        if cid in self._fatal and not self.room.busy(cid):
            self.apply(self.room.refuse(cid, self._fatal.pop(cid)))

    def settle(self) -> None:
        """Run password checks and store work until nothing is pending; feed completions back."""
        while self.store.pending or self._jobs:
            while self._jobs:
                job = self._jobs.popleft()
                result = passwords.check_login(self.server_keys, job.sealed, job.nonce, job.username,
                                               job.account, self.scrypt_n, job.may_register)
                self._complete(job.cid, result)
            for cid, result in self.store.flush():
                self._complete(cid, result)

    def _complete(self, cid: int, result: object) -> None:
        self.apply(self.room.completed(cid, result))
        if cid in self.pending and cid not in self.closed:
            self._pump(cid)

    def _abort(self, cid: int) -> None:
        if cid not in self.closed:
            self.closed.add(cid)
            self.pending[cid].clear()
            self.apply(self.room.disconnect(cid))

    def _queue(self, cid: int, data: bytes, effect: object) -> None:
        if cid not in self.inbox:
            self.stray.append(effect)
        elif cid in self.closed_by_room:
            self.stray.append(effect)   # nothing may follow a BYE, an ERROR or the EX reply
        elif cid in self.closed:
            self.dropped.append(effect)
        else:
            self.inbox[cid].extend(self._client_decoders[cid].feed(data))

    def _deliver_broadcasts(self) -> None:
        run, self._broadcasts = self._broadcasts, []
        for user, cid in list(self.online.items()):
            for effect in run:
                if effect.exclude != user:
                    self._queue(cid, effect.data, effect)

    def apply(self, effects: list) -> None:
        """Carry out effects in order, as ChatServer.apply does."""
        for effect in effects:
            kind = type(effect)
            if kind is state.Send or kind is state.Page:
                self._queue(effect.cid, effect.data, effect)
            elif kind is state.Pages:   # made as they are taken: all taken at once here
                for frame in effect.frames:
                    if frame:
                        self._queue(effect.cid, frame, state.Page(effect.cid, frame))
            elif kind is state.DeliverAll:
                self._broadcasts.append(effect)
            elif kind is state.Deliver:
                if self._broadcasts:
                    self._deliver_broadcasts()
                for user in effect.users:
                    cid = self.online.get(user)
                    if cid is None:
                        self.stray.append(effect)
                    else:
                        self._queue(cid, effect.data, effect)
            elif kind is state.Close:
                if effect.cid in self.inbox and effect.cid not in self.closed:
                    self.closed_by_room.add(effect.cid)
                    self._abort(effect.cid)
            elif kind is state.Online:
                if self._broadcasts:
                    self._deliver_broadcasts()
                if effect.cid in self.closed:
                    self.stray.append(effect)
                else:
                    self.online[effect.user] = effect.cid
            elif kind is state.Offline:
                if self._broadcasts:
                    self._deliver_broadcasts()
                if self.online.get(effect.user) == effect.cid:
                    del self.online[effect.user]
            elif kind is state.CheckPassword:
                self._jobs.append(effect)
            elif kind is state.Audit:
                self.audits.append(effect)
            elif isinstance(effect, store.REQUESTS):
                self.store.submit(effect)
            else:
                raise AssertionError(f"unknown effect {effect!r}")

    # --- looking at the results ------------------------------------------------------
    def replies(self, cid: int) -> list[dict]:
        """Bodies of the replies cid got (C frames with ``ok``; a BYE has none)."""
        return [f.body for f in self.inbox[cid] if f.kind == framing.KIND_COMMAND and "ok" in f.body]

    def state_of(self, cid: int) -> state.State:
        session = self.room.sessions.get(cid)
        return state.State.CLOSED if session is None else session.state

    def history(self, username: str) -> list[dict]:
        """The user's history entries as the data directory holds them (room log and ``<username>.chat``)."""
        return [json.loads(text) for text in storage.read_history(self.data_dir, username)]

    def close(self) -> None:
        self.store.close()


# --- the client's side ----------------------------------------------------------------

def seal_password(server_key: str, nonce: bytes | str, password: str | bytes) -> str:
    """The PASSWORD ciphertext: nonce || UTF-8 password sealed under the server key."""
    if isinstance(nonce, str):
        nonce = base64.b64decode(nonce)
    if isinstance(password, str):
        password = password.encode("utf-8")
    return pg3lib.PublicKey.from_key_form(server_key).seal(nonce + password).decode("ascii")


def pm_body(sender_keys: pg3lib.KeyPair, sender: str, receiver: str, receiver_key: str, text: str, *,
            now: float | None = None, pm_id: str | None = None, version: int = 2) -> dict:
    """A PM SEND body: text sealed for the receiver and for the sender, signed by the sender.

    Version 2 (section 4.5): a random id (or pm_id) and ``sent`` at now (default: a
    ``FakeClock``'s start), signed with ``pg3lib.pm2_signed_bytes``; version 1: the
    transitional PM1 body (no id), signed over the ciphertext alone.
    """
    ciphertext = pg3lib.PublicKey.from_key_form(receiver_key).seal(text.encode("utf-8")).decode("ascii")
    self_copy = sender_keys.public.seal(text.encode("utf-8")).decode("ascii")
    if version == 1:
        signature = sender_keys.sign(pg3lib.pm_signed_bytes(sender, receiver, ciphertext))
        return {"op": "SEND", "ciphertext": ciphertext, "self_copy": self_copy, "signature": signature}
    pm_id = base64.b64encode(os.urandom(protocol.PM_ID_BYTES)).decode("ascii") if pm_id is None else pm_id
    sent = protocol.timestamp(FakeClock().now if now is None else now)
    return {"op": "SEND", "id": pm_id, "sent": sent, "ciphertext": ciphertext, "self_copy": self_copy,
            "signature": sign_pm2(sender_keys, pm_id, sent, sender, receiver, ciphertext, self_copy)}


def sign_pm2(sender_keys: pg3lib.KeyPair, pm_id: str, sent: str, sender: str, receiver: str, ciphertext: str,
             self_copy: str) -> str:
    """The PM2 signature over these members (docs/PROTOCOL.md section 4.5)."""
    return sender_keys.sign(pg3lib.pm2_signed_bytes(pm_id, sent, sender, receiver, pg3lib.sealed_digest(ciphertext),
                                                    pg3lib.sealed_digest(self_copy)))


def log_in(driver: RoomDriver, cid: int, username: str, password: str, keys: pg3lib.KeyPair) -> list[dict]:
    """LOGIN, PASSWORD and KEY on cid; returns the three replies (which must all be ok)."""
    replies = []
    for step in ("LOGIN", "PASSWORD", "KEY"):
        if step == "LOGIN":
            body = {"op": "LOGIN", "username": username}
        elif step == "PASSWORD":
            login = replies[0]
            body = {"op": "PASSWORD", "ciphertext": seal_password(login["server_key"], login["nonce"], password)}
        else:
            body = {"op": "KEY", "public_key": keys.public.key_form}
        got = [f.body for f in driver.send(cid, body) if "ok" in f.body]
        assert len(got) == 1 and got[0]["op"] == step and got[0]["ok"] is True, (step, got)
        replies.append(got[0])
    return replies
