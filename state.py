"""The connection state machine and the session logic of the chat room. No I/O.

Everything that affects a connection's state lives here (PROTOCOL.md section 3):
``TRANSITIONS`` says, per state, which ``op`` is accepted, by which handler,
and where success leads. An op the state does not accept gets ``unexpected``
and leaves the state alone; CANCEL returns to READY from the three sub-states.

Theory of operation ("functional core, imperative shell"): ``Room`` is told
what happened, ``connect``, ``receive(frame)``, ``completed(result)``,
``disconnect``, ``tick(now)``, and answers with a list of effects, plain data
the server carries out in order:

* ``Send(cid, data)``: bytes for one connection (a reply);
* ``Deliver(users, data)`` / ``DeliverAll(data, exclude)``: a data frame for
  online users, encoded once;
* ``Close(cid)``: close that connection once its output is flushed;
* ``Online(user, cid)`` / ``Offline(user, cid)``: presence changes;
* store requests: ``LoadAccount``, ``CreateAccount``, ``AppendHistory``,
  ``ReadHistory``, and the worker job ``CheckPassword``. Each one is answered
  later by ``completed(cid, result)``, in the order they were asked for, which
  is when the reply that depends on it is made: a SEND reply waits for its
  history to be stored.

Two kinds of waiting. A login step whose outcome decides the next state
(LOGIN, PASSWORD) makes the connection *busy*: the server gives it no further
request until it is answered. A request whose outcome does not change the
state (SEND, CH) only reserves its place in the connection's reply order (a
*slot*); later requests go on, and their replies queue behind the slot, so
replies still come in request order while many messages share one store
write (group commit).
"""

from __future__ import annotations

import base64
import collections
import enum
import heapq
import json
import os
import re
import time
from typing import Callable, NamedTuple

import framing
import pg3lib
from passwords import Account, LoginResult

MAX_TEXT_CHARS = 4096
MAX_ATTEMPTS = 3
# Replies one connection may have waiting on the store; past it, its further
# requests wait (memory per connection stays bounded however much it pipelines).
MAX_PIPELINE = 64
# Shared mode: broadcasts remembered for a session whose KEY answer is still on
# its way (its online event may be older than events already read).
RECENT_EVENTS = 1000
REGISTRATION_WINDOW = 3600.0     # --register-rate counts over a sliding hour
FAILURE_MEMORY = 3600.0          # an hour without failures forgets an account's failed logins
USERNAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}\Z")


class State(enum.Enum):
    AWAIT_USERNAME = "AWAIT_USERNAME"
    AWAIT_PASSWORD = "AWAIT_PASSWORD"
    AWAIT_KEY = "AWAIT_KEY"
    READY = "READY"
    AWAIT_BM_TEXT = "AWAIT_BM_TEXT"
    AWAIT_PM_TARGET = "AWAIT_PM_TARGET"
    AWAIT_PM_TEXT = "AWAIT_PM_TEXT"
    CLOSED = "CLOSED"


# --- effects ------------------------------------------------------------------

class Send(NamedTuple):
    cid: int
    data: bytes


class Deliver(NamedTuple):
    users: list  # lower-case names
    data: bytes


class DeliverAll(NamedTuple):
    data: bytes
    exclude: str  # lower-case name, or ""


class Close(NamedTuple):
    cid: int


class Online(NamedTuple):
    user: str
    cid: int


class Offline(NamedTuple):
    user: str
    cid: int


class LoadAccount(NamedTuple):
    cid: int
    key: str


class CreateAccount(NamedTuple):
    cid: int
    account: Account


class AppendHistory(NamedTuple):
    """Append each line to the history of each of its owners (registered spellings).

    ``entries`` is a list of ``(owners, line)``; a BM's owners are the room's
    online snapshot, the same tuple for every message until someone comes or
    goes, so the store can write a pass's broadcasts as one chunk per file.
    The sender's file is written first; if that fails the message is stored
    for nobody (the sender is told ``internal`` and may send it again).
    """
    cid: int
    entries: list
    sender: str   # whose file decides: if it cannot be written, nobody's is
    # Shared mode: "BM" or "PM", the data frame for the recipients, the PM target and
    # the session tokens the store checks (the sender's, and the target's for a PM).
    kind: str = ""
    frame: bytes = b""
    target: str = ""
    token: str = ""
    target_token: str = ""


class ReadHistory(NamedTuple):
    cid: int
    username: str
    limit: int | None = None   # only the newest entries (a store may use it to read less)


class ClaimSession(NamedTuple):
    """Shared mode: make ``token`` the account's one session (others are kicked). Answer: "ok"."""
    cid: int
    key: str
    token: str


class GoOnline(NamedTuple):
    """Shared mode: put the session online if ``token`` is still the account's session.

    Answer: the event id of its coming online, or None if it was replaced meanwhile.
    """
    cid: int
    key: str
    token: str
    record: str   # JSON: username, public_key, fingerprint (another node answers TARGET with it)


class Logout(NamedTuple):
    """Shared mode: end the session ``token`` if it is still the account's. Not answered (cid 0)."""
    cid: int
    key: str
    token: str


class AppendResult(NamedTuple):
    """The answer to AppendHistory: owners whose write failed; for a shared store also the count
    of recipients and an error (``not_online``: the PM target's session changed; ``internal``)."""
    failed: frozenset
    recipients: int | None = None
    error: str | None = None


class StoreFailure:
    """The store could not answer (Redis unreachable): the request gets ``internal``."""

    def __repr__(self) -> str:
        return "INTERNAL"


INTERNAL = StoreFailure()


class CheckPassword(NamedTuple):
    """Worker job: open the sealed password and hash it (passwords.check_login)."""
    cid: int
    sealed: str
    nonce: bytes
    username: str
    account: Account | None
    may_register: bool = True   # False: the address is over its registration rate


STORE_REQUESTS = (LoadAccount, CreateAccount, AppendHistory, ReadHistory, ClaimSession, GoOnline, Logout)
REQUESTS = frozenset((*STORE_REQUESTS, CheckPassword))   # effects that are answered by completed()


# --- frames -------------------------------------------------------------------

def ok(op: str, **fields) -> bytes:
    """A successful reply frame."""
    body = {"op": op, "ok": True}
    body.update(fields)
    return framing.command(body)


def fail(op: str, error: str, message: str, **fields) -> bytes:
    """A failed reply frame with a section 6 error code."""
    body = {"op": op, "ok": False, "error": error, "message": message}
    body.update(fields)
    return framing.command(body)


def fatal(error: str, message: str) -> bytes:
    """The ERROR frame sent before closing a connection."""
    return framing.command({"op": "ERROR", "ok": False, "error": error, "message": message})


def bye(reason: str) -> bytes:
    return framing.command({"op": "BYE", "reason": reason})


_ts_cache = [-1, ""]


def timestamp(now: float) -> str:
    """UTC ISO 8601 with milliseconds, e.g. ``2026-11-24T15:04:05.123Z``."""
    second = int(now)
    if _ts_cache[0] != second:
        _ts_cache[0] = second
        _ts_cache[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_ts_cache[1]}.{int((now - second) * 1000):03d}Z"


def json_line(obj: dict) -> bytes:
    """One history line: compact JSON and a newline."""
    return framing.encode_body(obj) + b"\n"


def fit_names(names: list, budget: int) -> tuple[list, int]:
    """As many names as fit in budget bytes of JSON; returns (names, how many left out)."""
    used = 2
    for i, name in enumerate(names):
        used += len(name.encode("utf-8")) + 3
        if used > budget:
            return names[:i], len(names) - i
    return names, 0


def history_pages(lines: list, limit: int) -> list[bytes]:
    """CH reply frames holding the given JSON entry texts, each within limit bytes."""
    head, tail_more, tail_last = '{"op":"CH","ok":true,"entries":[', '],"more":true}', '],"more":false}'
    budget = (limit or 1 << 62) - framing.HEADER_SIZE - len(head) - len(tail_last)
    pages: list[list[str]] = [[]]
    used = 0
    for text in lines:
        size = len(text.encode("utf-8")) + 1
        if size > budget:
            continue  # cannot be sent whole in any frame; our own frames never exceed the limit
        if used + size > budget and pages[-1]:
            pages.append([])
            used = 0
        pages[-1].append(text)
        used += size
    frames = []
    for i, page in enumerate(pages):
        tail = tail_last if i == len(pages) - 1 else tail_more
        body = (head + ",".join(page) + tail).encode("utf-8")
        frames.append(b"C" + len(body).to_bytes(4, "big") + body)
    return frames


def stream_id(text: object) -> tuple:
    """A Redis stream id ``ms-seq`` as a comparable tuple; (0, 0) if it is not one."""
    try:
        ms, _, seq = (text.decode("ascii") if isinstance(text, bytes) else text).partition("-")
        return int(ms), int(seq or 0)
    except (AttributeError, ValueError):
        return (0, 0)


def valid_username(name: object) -> bool:
    return isinstance(name, str) and USERNAME_RE.match(name) is not None


def _text_problem(text: object) -> str | None:
    if not isinstance(text, str):
        return "'text' must be a string"
    if len(text) > MAX_TEXT_CHARS:
        return f"a message is at most {MAX_TEXT_CHARS} characters (this one has {len(text)})"
    if not text.strip():
        return "a message needs at least one character that is not white space"
    return None


# --- sessions -------------------------------------------------------------------

class Slot:
    """A place in a connection's reply order: pending (a continuation) or filled (effects).

    A *barrier* slot (a login step) makes the session busy until it is filled;
    a *held* one has not sent its request yet (a password attempt waiting out
    the failed-login delay). Pending slots are answered in the order their
    requests were made, which is the order the store completes them.
    """

    __slots__ = ("barrier", "continuation", "effects", "held")

    def __init__(self, continuation: Callable | None, effects: list | None = None, barrier: bool = False) -> None:
        self.continuation = continuation
        self.effects = effects
        self.barrier = barrier
        self.held = False


class RemoteUser(NamedTuple):
    """Shared mode: a user online on another node, as its ``on`` event described it."""
    key: str
    username: str
    token: str
    key_form: str
    fingerprint: str


class Session:
    """One connection's protocol state."""

    __slots__ = ("cid", "address", "state", "username", "key", "account", "nonce", "attempts_left",
                 "public_key", "target", "barriers", "deadline", "sealed", "registering", "slots", "online_id",
                 "claimed", "kicked")

    def __init__(self, cid: int, address: str) -> None:
        self.cid = cid
        self.address = address
        self.state = State.AWAIT_USERNAME
        self.username = ""           # registered spelling once known
        self.key = ""                # lower-case account name
        self.account: Account | None = None
        self.nonce = b""
        self.attempts_left = MAX_ATTEMPTS
        self.public_key: pg3lib.PublicKey | None = None
        self.target: Session | None = None
        self.slots: list[Slot] = []  # places in the reply order, oldest first (at most MAX_PIPELINE + a few)
        self.barriers = 0            # pending barrier slots (login steps): busy while > 0
        self.deadline = 0.0
        self.sealed = ""             # the PASSWORD ciphertext while it is being checked
        self.registering = False     # holds one of its address's registration slots
        self.online_id = (0, 0)      # shared mode: stream id of its coming online
        self.claimed = False         # shared mode: the store holds this session's token
        self.kicked = False          # shared mode: replaced before its claim was answered



Effects = list


class Room:
    """Session logic for every connection of one server. Pure: returns effects."""

    def __init__(self, server_keys: pg3lib.KeyPair, *, frame_limit: int = framing.DEFAULT_FRAME_LIMIT,
                 login_timeout: float = 30.0, register_rate: int = 100, login_delay_cap: float = 60.0,
                 node: str = "",
                 clock: Callable[[], float] = time.time,
                 random_bytes: Callable[[int], bytes] = os.urandom) -> None:
        self.server_keys = server_keys
        self.server_key_form = server_keys.public.key_form
        self.frame_limit = frame_limit
        self.login_timeout = login_timeout
        self.clock = clock
        self.random_bytes = random_bytes
        self.sessions: dict[int, Session] = {}
        # Shared mode (a node of several on one store): presence and delivery come
        # back from the store's event streams (``event``); ``node`` names this one.
        self.node = node
        self.shared = bool(node)
        self.remote: dict[str, RemoteUser] = {}
        self._recent_bm: collections.deque = collections.deque(maxlen=RECENT_EVENTS)
        self.online: dict[str, Session] = {}       # after KEY: key -> session
        self.online_version = 0                     # changes whenever someone comes or goes
        self._snapshot: tuple | None = None         # registered spellings of everyone online
        self.logged_in: dict[str, Session] = {}    # after PASSWORD: key -> session
        self._deadlines: list[tuple[float, int]] = []
        self.register_rate = register_rate
        self.login_delay_cap = login_delay_cap
        self._registered: dict[str, collections.deque] = {}   # address -> times of accounts created
        self._registering: collections.Counter = collections.Counter()   # address -> being created
        self._failures: dict[str, tuple[int, float]] = {}   # account -> (failed logins, time of the last)
        self._held: list[tuple[float, int]] = []   # (until, cid): attempts waiting out a failed-login delay

    # --- events from the shell ---------------------------------------------------
    def connect(self, cid: int, address: str = "") -> Effects:
        session = Session(cid, address)
        self.sessions[cid] = session
        if self.login_timeout > 0:
            session.deadline = self.clock() + self.login_timeout
            heapq.heappush(self._deadlines, (session.deadline, cid))
        return []

    def busy(self, cid: int) -> bool:
        """True while the shell must hold this connection's next request back."""
        session = self.sessions.get(cid)
        return session is not None and (session.barriers > 0 or len(session.slots) >= MAX_PIPELINE)

    def receive(self, cid: int, frame: framing.Frame) -> Effects:
        """One request from a connection that is not busy."""
        session = self.sessions.get(cid)
        out: Effects = []
        if session is None or session.state is State.CLOSED:
            return out
        assert session.barriers == 0, "the shell must not feed a busy session"
        op = frame.body["op"]
        if frame.kind != framing.KIND_COMMAND:
            self._reply(session, fail(op, "bad_request", "clients send command (C) frames only"), out)
            return out
        entry = TRANSITIONS[session.state].get(op)
        if entry is None:
            self._reply(session, fail(op, "unexpected", _expected(session.state)), out)
            return out
        entry.handler(self, session, frame.body, out)
        return out

    def completed(self, cid: int, result: object) -> Effects:
        """The answer to a store request or worker job that cid asked for."""
        out: Effects = []
        session = self.sessions.get(cid)
        if session is None:
            return out
        slots = session.slots
        slot = next((slot for slot in slots if slot.effects is None and not slot.held), None)
        if slot is None:
            return out
        if slot.barrier:
            session.barriers -= 1
        slot.effects = []   # filled: what the continuation emits through _emit queues behind it
        produced: Effects = []
        slot.continuation(session, result, produced)
        for effect in produced:
            # Requests go out now, so requests are made in the order of their slots.
            (out if type(effect) in REQUESTS else slot.effects).append(effect)
        while slots and slots[0].effects is not None:
            out.extend(slots.pop(0).effects)
        if session.state is State.CLOSED and not slots:
            self.sessions.pop(cid, None)
        return out

    def disconnect(self, cid: int) -> Effects:
        """The connection is gone (peer closed, error, or we closed it)."""
        out: Effects = []
        session = self.sessions.get(cid)
        if session is None:
            return out
        self._end(session, out)
        for slot in [slot for slot in session.slots if slot.held]:   # never asked for: nothing will answer
            session.slots.remove(slot)
            session.barriers -= 1
        if not session.slots:
            del self.sessions[cid]
        return out

    def refuse(self, cid: int, error: bytes) -> Effects:
        """A fatal error (e.g. bad_frame): sent after the replies still owed, then close."""
        out: Effects = []
        session = self.sessions.get(cid)
        if session is None:
            return [Send(cid, error), Close(cid)]
        if session.state is not State.CLOSED:
            self._reply(session, error, out)
            self._end(session, out)
            self._emit(session, Close(cid), out)
        return out

    def tick(self, now: float) -> Effects:
        """Timers: connections that did not finish logging in in time get BYE idle."""
        out: Effects = []
        while self._held and self._held[0][0] <= now:
            _, cid = heapq.heappop(self._held)
            session = self.sessions.get(cid)
            held = [slot for slot in session.slots if slot.held] if session is not None else []
            if held and session.state is State.AWAIT_PASSWORD:
                held[0].held = False
                out.append(self._password_job(session))
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, cid = heapq.heappop(self._deadlines)
            session = self.sessions.get(cid)
            if session is None or session.deadline != deadline or session.state not in LOGIN_STATES:
                continue
            if session.barriers:
                # A password being checked: look again when it has been answered.
                session.deadline = now + 1.0
                heapq.heappush(self._deadlines, (session.deadline, cid))
                continue
            self._reply(session, bye("idle"), out)
            self._end(session, out)
            self._emit(session, Close(cid), out)
        return out

    def next_deadline(self) -> float | None:
        times = [heap[0][0] for heap in (self._deadlines, self._held) if heap]
        return min(times) if times else None

    def extend_deadline(self, cid: int, seconds: float) -> None:
        """Stop the login clock for a while (the shell held this connection's requests back)."""
        session = self.sessions.get(cid)
        if session is not None and session.deadline and session.state in LOGIN_STATES and seconds > 0:
            session.deadline += seconds
            heapq.heappush(self._deadlines, (session.deadline, cid))

    # --- shared steps ------------------------------------------------------------
    def _wait(self, session: Session, continuation: Callable, request, out: Effects) -> Slot:
        """Ask for request; the session is busy until continuation has the answer."""
        slot = Slot(continuation, barrier=True)
        session.slots.append(slot)
        session.barriers += 1
        if request is not None:
            out.append(request)
        return slot

    def _defer(self, session: Session, continuation: Callable, request, out: Effects) -> None:
        """Ask for request; the reply takes its place in order, later requests go on."""
        session.slots.append(Slot(continuation))
        out.append(request)

    def _emit(self, session: Session, effect, out: Effects) -> None:
        """An effect in this session's reply order: now, or behind its pending slots."""
        if session.slots:
            session.slots.append(Slot(None, [effect]))
        else:
            out.append(effect)

    def _reply(self, session: Session, data: bytes, out: Effects) -> None:
        self._emit(session, Send(session.cid, data), out)

    def _online_changed(self) -> None:
        self.online_version += 1
        self._snapshot = None

    def online_snapshot(self) -> tuple:
        """Registered spellings of everyone online; one shared tuple until someone comes or goes."""
        if self._snapshot is None:
            self._snapshot = tuple(s.username for s in self.online.values())
        return self._snapshot

    def _end(self, session: Session, out: Effects) -> None:
        """Take a session out of the room (it will not be online any more)."""
        if session.state is State.CLOSED:
            return
        session.state = State.CLOSED
        key = session.key
        if key and self.logged_in.get(key) is session:
            del self.logged_in[key]
        if session.claimed:
            session.claimed = False
            out.append(Logout(0, key, self.token(session)))   # the store says offline to every node
        if key and self.online.get(key) is session:
            del self.online[key]
            self._online_changed()
            self._emit(session, Offline(key, session.cid), out)
            if not self.shared:
                self._emit(session, DeliverAll(framing.data({"op": "PRESENCE", "username": session.username,
                                                             "online": False, "ts": timestamp(self.clock())}),
                                               key), out)

    def _others_online(self, session: Session) -> list[str]:
        names = [s.username for k, s in self.online.items() if k != session.key]
        if self.remote:
            names.extend(r.username for k, r in self.remote.items() if k != session.key and k not in self.online)
        return names

    def token(self, session: Session) -> str:
        """Shared mode: the session's name in the store, ``<node>/<connection>``."""
        return f"{self.node}/{session.cid}"

    def _names_reply(self, op: str, session: Session, **fields) -> bytes:
        names = self._others_online(session)
        if self.frame_limit:
            fixed = len(ok(op, online=[], more_online=len(names), **fields))
            names, left_out = fit_names(names, self.frame_limit - fixed)
            if left_out:
                return ok(op, online=names, more_online=left_out, **fields)
        return ok(op, online=names, **fields)

    # --- AWAIT_USERNAME ----------------------------------------------------------
    def _login(self, session: Session, body: dict, out: Effects) -> None:
        name = body.get("username")
        if not valid_username(name):
            self._reply(session, fail("LOGIN", "invalid_username",
                                              "a username is 1-32 letters, digits, '_', '.' or '-', "
                                              "starting with a letter or digit"), out)
            return
        session.username = name
        session.key = name.lower()
        self._wait(session, self._login_account, LoadAccount(session.cid, session.key), out)

    def _login_account(self, session: Session, account: Account | None, out: Effects) -> None:
        if session.state is State.CLOSED:
            return
        if account is INTERNAL:
            self._reply(session, fail("LOGIN", "internal", "the account could not be read; try again"), out)
            return
        session.account = account
        if account is not None:
            session.username = account.username
        session.nonce = self.random_bytes(16)
        session.state = State.AWAIT_PASSWORD
        self._reply(session, ok("LOGIN", new_user=account is None, server_key=self.server_key_form,
                                        fingerprint=self.server_keys.fingerprint,
                                        nonce=base64.b64encode(session.nonce).decode("ascii")), out)

    # --- AWAIT_PASSWORD ----------------------------------------------------------
    def _password(self, session: Session, body: dict, out: Effects) -> None:
        sealed = body.get("ciphertext")
        if not isinstance(sealed, str) or len(sealed) > 4096:
            self._password_failed(session, LoginResult("bad_request", "'ciphertext' must be a sealed string"),
                                  out)
            return
        session.sealed = sealed
        slot = self._wait(session, self._password_checked, None, out)
        if session.account is None:
            self._reserve_registration(session)
        else:
            until = self._delayed_until(session.key)
            now = self.clock()
            if until > now:
                # Held, not refused: checked with every other attempt on this account
                # when the delay ends, and the login clock stops meanwhile.
                slot.held = True
                heapq.heappush(self._held, (until, session.cid))
                self.extend_deadline(session.cid, until - now)
                return
        out.append(self._password_job(session))

    def _password_job(self, session: Session) -> CheckPassword:
        return CheckPassword(session.cid, session.sealed, session.nonce, session.username, session.account,
                             session.account is not None or session.registering)

    # --- registration rate and failed-login delay ---------------------------------
    def _reserve_registration(self, session: Session) -> None:
        if self.register_rate <= 0:
            session.registering = True
            return
        recent = self._registered.get(session.address)
        cutoff = self.clock() - REGISTRATION_WINDOW
        while recent and recent[0] <= cutoff:
            recent.popleft()
        used = (len(recent) if recent else 0) + self._registering[session.address]
        if used < self.register_rate:
            session.registering = True
            self._registering[session.address] += 1

    def _release_registration(self, session: Session, created: bool) -> None:
        if not session.registering:
            return
        session.registering = False
        if self.register_rate <= 0:
            return
        self._registering[session.address] -= 1
        if self._registering[session.address] <= 0:
            del self._registering[session.address]
        if created:
            self._registered.setdefault(session.address, collections.deque()).append(self.clock())

    def _delayed_until(self, key: str) -> float:
        if self.login_delay_cap <= 0 or key not in self._failures:
            return 0.0
        count, last = self._failures[key]
        if self.clock() - last >= FAILURE_MEMORY:
            del self._failures[key]
            return 0.0
        return last + min(self.login_delay_cap, 2.0 ** (count - 1))

    def _count_failure(self, key: str) -> None:
        count, last = self._failures.get(key, (0, 0.0))
        now = self.clock()
        if now - last >= FAILURE_MEMORY:
            count = 0
        self._failures[key] = (count + 1, now)

    def _password_checked(self, session: Session, result: LoginResult, out: Effects) -> None:
        if result.outcome != "ok" or session.state is State.CLOSED:
            self._release_registration(session, created=False)
        if session.account is not None:
            if result.outcome == "wrong_password":
                self._count_failure(session.key)
            elif result.outcome == "ok":
                self._failures.pop(session.key, None)
        if session.state is State.CLOSED:
            return
        if result.outcome != "ok":
            session.sealed = ""
            self._password_failed(session, result, out)
        elif session.account is None:
            self._wait(session, self._account_created, CreateAccount(session.cid, result.account), out)
        else:
            session.sealed = ""
            self._logged_in(session, new_user=False, out=out)
        if session.state is State.AWAIT_KEY:
            session.account = None   # the hash is not needed any more

    def _account_created(self, session: Session, result: str, out: Effects) -> None:
        self._release_registration(session, created=result == "created")
        if result == "exists":
            # Someone registered this name while the password was hashed: the
            # password is checked against that account instead.
            session.account = None
            self._wait(session, self._login_recheck, LoadAccount(session.cid, session.key), out)
            return
        session.sealed = ""
        if result != "created":
            self._reply(session, fail("PASSWORD", "internal", "the account could not be stored"), out)
            return
        if session.state is State.CLOSED:
            return
        self._logged_in(session, new_user=True, out=out)

    def _login_recheck(self, session: Session, account: Account | None, out: Effects) -> None:
        if session.state is State.CLOSED:
            return
        if account is None or account is INTERNAL:
            session.sealed = ""
            self._reply(session, fail("PASSWORD", "internal", "the account could not be read"), out)
            return
        session.account = account
        session.username = account.username
        self._wait(session, self._password_checked,
                   CheckPassword(session.cid, session.sealed, session.nonce, session.username, account), out)

    def _password_failed(self, session: Session, result: LoginResult, out: Effects) -> None:
        if result.outcome in ("weak_password", "rate_limited", "internal"):   # not attempts
            self._reply(session, fail("PASSWORD", result.outcome, result.message), out)
            return
        session.attempts_left -= 1
        self._reply(session, fail("PASSWORD", result.outcome, result.message,
                                          attempts_left=session.attempts_left), out)
        if session.attempts_left <= 0:
            self._reply(session, bye("too_many_failures"), out)
            self._end(session, out)
            self._emit(session, Close(session.cid), out)

    def _logged_in(self, session: Session, *, new_user: bool, out: Effects) -> None:
        if self.shared and not session.claimed:
            # One session per account across all nodes: the store swaps the token.
            self._wait(session, lambda s, result, o: self._claimed(s, result, new_user, o),
                       ClaimSession(session.cid, session.key, self.token(session)), out)
            return
        old = self.logged_in.get(session.key)
        if old is not None and old is not session:
            self._reply(old, bye("replaced"), out)
            self._end(old, out)
            self._emit(old, Close(old.cid), out)
        self.logged_in[session.key] = session
        session.state = State.AWAIT_KEY
        self._reply(session, ok("PASSWORD", new_user=new_user, username=session.username), out)

    def _claimed(self, session: Session, result: object, new_user: bool, out: Effects) -> None:
        if result != "ok":
            self._reply(session, fail("PASSWORD", "internal", "the session could not be stored; try again"), out)
            return
        session.claimed = True
        if session.kicked:   # replaced elsewhere before this answer came: the token is not ours
            session.claimed = False
            self._reply(session, bye("replaced"), out)
            self._end(session, out)
            self._emit(session, Close(session.cid), out)
            return
        if session.state is State.CLOSED:
            out.append(Logout(0, session.key, self.token(session)))
            session.claimed = False
            return
        self._logged_in(session, new_user=new_user, out=out)

    # --- AWAIT_KEY ---------------------------------------------------------------
    def _key(self, session: Session, body: dict, out: Effects) -> None:
        try:
            public_key = pg3lib.PublicKey.from_key_form(body.get("public_key")).compact()
        except (pg3lib.InvalidKey, TypeError, AttributeError) as exc:
            self._reply(session, fail("KEY", "bad_request",
                                              f"'public_key' must be an RSA public key of at least "
                                              f"2048 bits in key form ({exc or 'not a string'})"), out)
            return
        session.public_key = public_key
        if self.shared:
            record = framing.encode_body({"username": session.username, "token": self.token(session),
                                          "public_key": public_key.key_form,
                                          "fingerprint": public_key.fingerprint}).decode("utf-8")
            self._wait(session, self._went_online, GoOnline(session.cid, session.key, self.token(session), record),
                       out)
            return
        session.state = State.READY
        self._reply(session, self._names_reply("KEY", session, fingerprint=public_key.fingerprint), out)
        self.online[session.key] = session
        self._online_changed()
        out.append(Online(session.key, session.cid))
        out.append(DeliverAll(framing.data({"op": "PRESENCE", "username": session.username, "online": True,
                                            "ts": timestamp(self.clock())}), session.key))

    def _went_online(self, session: Session, event_id: object, out: Effects) -> None:
        if session.state is State.CLOSED:
            return
        if event_id is INTERNAL:
            self._reply(session, fail("KEY", "internal", "could not go online; try again"), out)
            return
        if event_id is None:   # replaced by a login elsewhere: its kick is on the way
            self._reply(session, bye("replaced"), out)
            session.claimed = False
            self._end(session, out)
            self._emit(session, Close(session.cid), out)
            return
        session.online_id = stream_id(event_id)
        session.state = State.READY
        self._reply(session, self._names_reply("KEY", session, fingerprint=session.public_key.fingerprint), out)
        self.online[session.key] = session
        self.remote.pop(session.key, None)
        self._online_changed()
        out.append(Online(session.key, session.cid))
        # Broadcasts stored after it came online but read before this answer.
        for bm_id, sender, frame in self._recent_bm:
            if bm_id > session.online_id and sender != session.key:
                out.append(Deliver([session.key], frame))

    # --- events from the shared store -------------------------------------------------
    def event(self, kind: str, event_id: str, fields: dict) -> Effects:
        """Shared mode: one entry of the store's event streams (SCALEOUT.md), in stream order.

        ``bm``: deliver to local users online before it was stored (they have it in
        their history); ``on``/``off``: presence; ``pm``: a private message for a
        local session; ``kick``: a local session was replaced on another node.
        """
        out: Effects = []
        ident = stream_id(event_id)
        if kind == "bm":
            sender = fields.get("from", "")
            frame = fields.get("d", b"")
            self._recent_bm.append((ident, sender, frame))
            users = [k for k, s in self.online.items() if k != sender and s.online_id < ident]
            if users:
                out.append(Deliver(users, frame))
        elif kind in ("on", "off"):
            self._presence_event(kind == "on", ident, fields, out)
        elif kind == "pm":
            session = self.online.get(fields.get("to", ""))
            if session is not None and self.token(session) == fields.get("tok"):
                out.append(Deliver([session.key], fields.get("d", b"")))
        elif kind == "kick":
            session = self.logged_in.get(fields.get("u", ""))
            if session is None or self.token(session) != fields.get("tok"):
                # The kick can overtake the answer to the session's own claim (two links).
                node, _, cid = str(fields.get("tok", "")).rpartition("/")
                early = self.sessions.get(int(cid)) if node == self.node and cid.isdigit() else None
                if early is not None and early.key == fields.get("u") and not early.claimed:
                    early.kicked = True
            elif session is not None:
                session.claimed = False   # the token is someone else's now: no logout
                self._reply(session, bye("replaced"), out)
                self._end(session, out)
                self._emit(session, Close(session.cid), out)
        return out

    def _presence_event(self, online: bool, ident: tuple, fields: dict, out: Effects) -> None:
        key, token = fields.get("u", ""), fields.get("tok", "")
        local = self.online.get(key)
        mine = local is not None and self.token(local) == token
        if online:
            try:
                record = json.loads(fields.get("rec") or "{}")
                user = RemoteUser(key, record["username"], token, record["public_key"], record["fingerprint"])
            except (ValueError, KeyError, TypeError):
                return
            if not mine:
                self.remote[key] = user
            spelling = user.username
        else:
            remote = self.remote.get(key)
            if remote is not None and remote.token == token:
                del self.remote[key]
            spelling = remote.username if remote is not None else (local.username if local else key)
            if mine:   # our own session was logged out by another node (a reap): it cannot stay
                local.claimed = False
                self._reply(local, bye("shutdown"), out)
                self._end(local, out)
                self._emit(local, Close(local.cid), out)
        users = [k for k, s in self.online.items() if k != key and s.online_id < ident]
        if users:
            out.append(Deliver(users, framing.data({"op": "PRESENCE", "username": spelling, "online": online,
                                                    "ts": timestamp(self.clock())})))

    def set_remote(self, records: dict) -> None:
        """Shared mode: who is online elsewhere when this node starts (name -> JSON record)."""
        for key, raw in records.items():
            try:
                record = json.loads(raw)
                token = record["token"]
                if not token.startswith(self.node + "/"):
                    self.remote[key] = RemoteUser(key, record["username"], token, record["public_key"],
                                                  record["fingerprint"])
            except (ValueError, KeyError, TypeError):
                continue

    def drop_all(self, reason: str) -> Effects:
        """Close every connection (shared mode: this node lost the store)."""
        out: Effects = []
        for session in list(self.sessions.values()):
            if session.state is State.CLOSED:
                continue
            session.claimed = False   # the store is gone or has reaped us: nothing to log out
            self._reply(session, bye(reason), out)
            self._end(session, out)
            self._emit(session, Close(session.cid), out)
        self.remote.clear()
        return out

    # --- READY -------------------------------------------------------------------
    def _bm(self, session: Session, body: dict, out: Effects) -> None:
        session.state = State.AWAIT_BM_TEXT
        self._reply(session, ok("BM"), out)

    def _pm(self, session: Session, body: dict, out: Effects) -> None:
        session.state = State.AWAIT_PM_TARGET
        self._reply(session, self._names_reply("PM", session), out)

    def _ch(self, session: Session, body: dict, out: Effects) -> None:
        limit = body.get("limit")
        if limit is not None and (type(limit) is not int or limit < 1):
            self._reply(session, fail("CH", "bad_request", "'limit' must be a positive integer"), out)
            return
        # A barrier, not a slot: a history is read whole, so one read at a time per connection.
        self._wait(session, lambda s, lines, o: self._history_read(s, lines, limit, o),
                   ReadHistory(session.cid, session.username, limit), out)

    def _history_read(self, session: Session, lines: list, limit: int | None, out: Effects) -> None:
        if lines is INTERNAL:
            self._reply(session, fail("CH", "internal", "the history could not be read; try again"), out)
            return
        if limit is not None:
            lines = lines[-limit:]
        for page in history_pages(lines, self.frame_limit):
            self._reply(session, page, out)

    def _ex(self, session: Session, body: dict, out: Effects) -> None:
        self._reply(session, ok("EX"), out)
        self._end(session, out)
        self._emit(session, Close(session.cid), out)

    def _cancel(self, session: Session, body: dict, out: Effects) -> None:
        session.state = State.READY
        session.target = None
        self._reply(session, ok("CANCEL"), out)

    # --- AWAIT_BM_TEXT -----------------------------------------------------------
    def _bm_send(self, session: Session, body: dict, out: Effects) -> None:
        text = body.get("text")
        problem = _text_problem(text)
        if problem:
            self._reply(session, fail("SEND", "bad_request", problem), out)
            return
        session.state = State.READY
        ts = timestamp(self.clock())
        line = json_line({"ts": ts, "type": "BM", "from": session.username, "to": "*", "text": text})
        owners = self.online_snapshot()   # the sender and everyone it reaches
        frame = framing.data({"op": "BM", "from": session.username, "text": text, "ts": ts})
        version = self.online_version
        self._defer(session, lambda s, result, o: self._bm_stored(s, owners, version, frame, result, o),
                    AppendHistory(session.cid, [(owners, line)], session.username, "BM", frame,
                                  token=self.token(session) if self.shared else ""), out)

    def _bm_stored(self, session: Session, owners: tuple, version: int, frame: bytes, result: object,
                   out: Effects) -> None:
        if result is INTERNAL or result.error or session.username in result.failed:
            out.append(Send(session.cid, fail("SEND", "internal", "the message could not be stored")))
            return
        if result.recipients is not None:   # shared: every node delivers it from the event stream
            out.append(Send(session.cid, ok("SEND", recipients=result.recipients)))
            return
        failed = result.failed
        if version == self.online_version and not failed:
            # Nobody came or went since SEND: everyone else online, in one shared effect.
            out.append(DeliverAll(frame, session.key))
            count = len(owners) - 1
        else:
            users = [name.lower() for name in owners
                     if name != session.username and name not in failed and name.lower() in self.online]
            if users:
                out.append(Deliver(users, frame))
            count = len(users)
        out.append(Send(session.cid, ok("SEND", recipients=count)))

    # --- AWAIT_PM_TARGET / AWAIT_PM_TEXT -----------------------------------------
    def _pm_target(self, session: Session, body: dict, out: Effects) -> None:
        name = body.get("username")
        if not isinstance(name, str):
            self._reply(session, fail("TARGET", "bad_request", "'username' must be a string"), out)
            return
        key = name.lower()
        session.state = State.READY
        if key == session.key:
            self._reply(session, fail("TARGET", "bad_request", "you cannot send a private message "
                                                                       "to yourself"), out)
            return
        target = self.online.get(key) or self.remote.get(key)
        if target is None:
            self._reply(session, fail("TARGET", "not_online", f"{name!r} is not online"), out)
            return
        session.target = target
        session.state = State.AWAIT_PM_TEXT
        if isinstance(target, RemoteUser):
            key_form, fingerprint = target.key_form, target.fingerprint
        else:
            key_form, fingerprint = target.public_key.key_form, target.public_key.fingerprint
        self._reply(session, ok("TARGET", username=target.username, public_key=key_form,
                                fingerprint=fingerprint), out)

    def _pm_send(self, session: Session, body: dict, out: Effects) -> None:
        ciphertext, self_copy, signature = body.get("ciphertext"), body.get("self_copy"), body.get("signature")
        if not (isinstance(ciphertext, str) and isinstance(self_copy, str) and isinstance(signature, str)
                and ciphertext and self_copy):
            self._reply(session, fail("SEND", "bad_request", "a private message needs string "
                                                                     "'ciphertext', 'self_copy' and 'signature'"), out)
            return
        target = session.target
        if target is None or (self.online.get(target.key) or self.remote.get(target.key)) is not target:
            session.state = State.READY
            session.target = None
            self._reply(session, fail("SEND", "not_online", "the recipient is not online any more"), out)
            return
        signed = pg3lib.pm_signed_bytes(session.username, target.username, ciphertext)
        if not session.public_key.verify(signed, signature):
            self._reply(session, fail("SEND", "bad_request", "the signature does not verify with "
                                                                     "your public key"), out)
            return
        ts = timestamp(self.clock())
        entry = {"ts": ts, "type": "PM", "from": session.username, "to": target.username}
        lines = [((session.username,), json_line({**entry, "ciphertext": self_copy})),
                 ((target.username,), json_line({**entry, "ciphertext": ciphertext}))]
        frame = framing.data({"op": "PM", "from": session.username, "to": target.username,
                              "ciphertext": ciphertext, "signature": signature,
                              "sender_key": session.public_key.key_form, "ts": ts})
        session.state = State.READY
        session.target = None
        request = AppendHistory(session.cid, lines, session.username, "PM", frame, target.key)
        if self.shared:
            target_token = target.token if isinstance(target, RemoteUser) else self.token(target)
            request = request._replace(token=self.token(session), target_token=target_token)
        self._defer(session, lambda s, result, o: self._pm_stored(s, target, frame, result, o), request, out)

    def _pm_stored(self, session: Session, target, frame: bytes, result: object, out: Effects) -> None:
        if result is INTERNAL or result.error == "internal" or session.username in result.failed:
            out.append(Send(session.cid, fail("SEND", "internal", "the message could not be stored")))
            return
        if result.error == "not_online":
            out.append(Send(session.cid, fail("SEND", "not_online", "the recipient is not online any more")))
            return
        if result.recipients is not None:   # shared: the target's node delivers it
            out.append(Send(session.cid, ok("SEND", recipients=result.recipients)))
            return
        failed = result.failed
        delivered = self.online.get(target.key) is target and target.username not in failed
        if delivered:
            out.append(Deliver([target.key], frame))
        out.append(Send(session.cid, ok("SEND", recipients=int(delivered))))


# --- the transition table -------------------------------------------------------

class Transition(NamedTuple):
    handler: Callable
    next_state: State  # where a successful request leads


TRANSITIONS: dict[State, dict[str, Transition]] = {
    State.AWAIT_USERNAME: {"LOGIN": Transition(Room._login, State.AWAIT_PASSWORD)},
    State.AWAIT_PASSWORD: {"PASSWORD": Transition(Room._password, State.AWAIT_KEY)},
    State.AWAIT_KEY: {"KEY": Transition(Room._key, State.READY)},
    State.READY: {"BM": Transition(Room._bm, State.AWAIT_BM_TEXT),
                  "PM": Transition(Room._pm, State.AWAIT_PM_TARGET),
                  "CH": Transition(Room._ch, State.READY),
                  "EX": Transition(Room._ex, State.CLOSED)},
    State.AWAIT_BM_TEXT: {"SEND": Transition(Room._bm_send, State.READY),
                          "CANCEL": Transition(Room._cancel, State.READY)},
    State.AWAIT_PM_TARGET: {"TARGET": Transition(Room._pm_target, State.AWAIT_PM_TEXT),
                            "CANCEL": Transition(Room._cancel, State.READY)},
    State.AWAIT_PM_TEXT: {"SEND": Transition(Room._pm_send, State.READY),
                          "CANCEL": Transition(Room._cancel, State.READY)},
    State.CLOSED: {},
}

LOGIN_STATES = (State.AWAIT_USERNAME, State.AWAIT_PASSWORD, State.AWAIT_KEY)


def _expected(state: State) -> str:
    ops = sorted(TRANSITIONS[state])
    if not ops:
        return "the connection is closing"
    return "expected " + (ops[0] if len(ops) == 1 else "one of " + ", ".join(ops)) + \
        f" in state {state.value}"


__all__ = [
    "INTERNAL", "STORE_REQUESTS", "TRANSITIONS", "AppendHistory", "AppendResult", "CheckPassword", "ClaimSession",
    "Close", "CreateAccount", "Deliver", "DeliverAll", "GoOnline", "LoadAccount", "Logout", "Offline", "Online",
    "ReadHistory", "RemoteUser", "Room", "Send", "Session", "State", "Transition",
]
