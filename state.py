"""The connection state machine and the session logic of the chat room. No I/O.

Everything that affects a connection's state lives here (docs/PROTOCOL.md
section 3). ``TRANSITIONS`` is the one authority: per state, which ``op`` is
accepted, by which handler, where success leads (``next_state``) and where a
refusal leads (``on_fail``; ``None`` leaves the state alone, and so does a
request with a missing or ill-typed member, section 3). ``Room._run`` applies
those edges, in one place; handlers never set the state. A handler answers
success itself and reports a refusal by raising ``Refused(code, message)``;
one path (``_refused``) builds the failure reply. An op the state does not
accept gets ``unexpected``.

Theory of operation ("functional core, imperative shell"): ``Room`` is told
what happened, ``connect``, ``receive(frame)``, ``completed(result)``,
``disconnect``, ``tick(now)``, ``cluster_event(event)``, and answers with a
list of effects, plain data the server carries out in order:

* ``Send(cid, data)``: bytes for one connection (a reply);
* ``Deliver(users, data)`` / ``DeliverAll(data, exclude)``: a data frame for
  online users, encoded once;
* ``Page(cid, data)``: a CH reply frame (or recent BMs), sent as the connection drains;
  ``Pages(cid, frames)``: CH reply frames made as the connection drains (a history read lazily;
  ``b""`` among them is nothing now, ``None`` nothing until the store has read more);
* ``Close(cid)``: close that connection once its output is flushed;
* ``Online(user, cid)`` / ``Offline(user, cid)``: presence changes;
* the store requests of ``store.py`` and the worker job ``CheckPassword``.
  Each one is answered later by ``completed(cid, result)``, in the order they
  were asked for, which is when the reply that depends on it is made: a SEND
  reply waits for its history to be stored.

A handler that needs the store first returns ``Ask(request, then)``; ``then``
gets the result and may ask again, succeed or refuse, and the table's edge is
taken when the chain ends. Two kinds of asking. A login step or a CH (a
*barrier*) makes the connection busy: the server gives it no further request
until it is answered. A SEND only reserves its place in the connection's
reply order (a *slot*): its edge is taken at once, later requests go on, and
their replies queue behind the slot, so replies still come in request order
while many messages share one store write (group commit).

``Room`` is the room of one process: it decides presence and delivery itself.
``SharedRoom`` is one node of several on one store (docs/SCALEOUT.md): the
store claims sessions, puts them online and delivers, and what other nodes do
comes back as ``store`` cluster events. ``make_room`` picks by the store's
node name. Login throttling (registrations per address, the failed-login
delay per account) is ``LoginThrottle``.
"""

from __future__ import annotations

import base64
import collections
import enum
import heapq
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from typing import Callable, NamedTuple, cast

import framing
import moderation
import pg3lib
import pmguard
import store
from passwords import OK, Account, LoginResult
from protocol import (MAX_ATTEMPTS, MAX_SEALED_PASSWORD_CHARS, NONCE_BYTES, PROTOCOL_VERSION, USERNAME_RULE, ByeReason,
                      Error, ModAction, Op, bye, fail, ok, parse_timestamp, text_problem, timestamp,
                      valid_username)

log = logging.getLogger("chat.state")

# Replies one connection may have waiting on the store; past it, its further
# requests wait (memory per connection stays bounded however much it pipelines).
MAX_PIPELINE = 64
# Shared mode: broadcasts remembered for a session whose KEY answer is still on
# its way (its online event may be older than events already read).
RECENT_EVENTS = 1000
REGISTRATION_WINDOW = 3600.0     # --register-rate counts over a sliding hour
FAILURE_MEMORY = 3600.0          # an hour without failures forgets an account's failed logins
# Password checks (RSA and scrypt, tens of ms each) one address may have waiting or
# running at once: enough for a household behind one NAT logging in together.
MAX_CHECKS_PER_ADDRESS = 8
MAX_CHECKS = 256                 # in all: past it the server is busy checking passwords
GUESS_LIMIT = 100                # failed checks an hour per account (--guess-limit), see LoginThrottle
PRUNE_BUCKETS_AT = 4096          # a RateLimit forgets its full buckets when it holds more than this
TRUST_MEMORY = 30 * 86400.0      # an address that logged in to an account is trusted by it this long
TRUSTED_PER_ACCOUNT = 8          # the latest addresses trusted, per account
# BMs per account (--bm-rate, --bm-burst): a paste of 60 lines goes at once, a flood
# is held to 5 a second whatever the number of connections or logins it uses.
BM_RATE = 5.0
BM_BURST = 60.0
OFFLINE_LIMIT = 100              # PMs kept for one offline target (--offline-limit), section 4.5
OFFLINE_PER_SENDER = 25          # of those, at most this many from one sender (--offline-per-sender)
# Section 11: the room's newest BMs shown at login (--recent), and at most this many of
# those since a client's last one when it comes back (--catch-up-limit).
RECENT = 20
CATCH_UP_LIMIT = 500


class State(enum.Enum):
    AWAIT_USERNAME = "AWAIT_USERNAME"
    AWAIT_PASSWORD = "AWAIT_PASSWORD"
    AWAIT_KEY = "AWAIT_KEY"
    READY = "READY"
    AWAIT_BM_TEXT = "AWAIT_BM_TEXT"
    AWAIT_PM_TARGET = "AWAIT_PM_TARGET"
    AWAIT_PM_TEXT = "AWAIT_PM_TEXT"
    CLOSED = "CLOSED"


LOGIN_STATES = (State.AWAIT_USERNAME, State.AWAIT_PASSWORD, State.AWAIT_KEY)


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


class Page(NamedTuple):
    """A CH reply frame: queued behind what the connection already has, and sent as its
    socket drains, so a long history never counts against the client's send queue."""
    cid: int
    data: bytes


class Pages(NamedTuple):
    """CH reply frames made as the socket drains (``history_pages``): a ``b""`` among them is
    nothing yet, the next in a later pass; a ``None``, nothing until the store has read more
    (ask again in a pass after its answer came; do not poll)."""
    cid: int
    frames: Iterator[bytes | None]


class Close(NamedTuple):
    cid: int


class Online(NamedTuple):
    user: str
    cid: int


class Offline(NamedTuple):
    user: str
    cid: int


class CheckPassword(NamedTuple):
    """Worker job: open the sealed password and hash it (passwords.check_login)."""
    cid: int
    sealed: str
    nonce: bytes
    username: str
    account: Account | None
    may_register: bool = True   # False: the address is over its registration rate
    address: str = ""           # the connection's: the pool takes waiting checks in turn by address


class Audit(NamedTuple):
    """A line for the server's log: a moderation action with who did it (``refused``: a warning)."""
    text: str
    refused: bool = False


REQUESTS = frozenset((*store.REQUESTS, CheckPassword))   # effects that are answered by completed()
Effects = list


# --- frames and history lines -------------------------------------------------------

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


def history_pages(lines: Iterable, limit: int) -> Iterator[bytes | None]:
    """CH reply frames holding the given JSON entry texts, each within limit bytes, made as
    they are taken (``lines`` may be read lazily: a history need not fit in memory).

    The entries are JSON already: they are spliced into the page as text, not
    parsed and encoded again. A ``store.PAUSE`` in lines gives ``b""`` (nothing now), a
    ``store.WAIT`` gives ``None`` (nothing until the store has read more); an OSError while
    reading ends the pages there (logged), with ``"more":false``.
    """
    head, tail_more, tail_last = '{"op":"CH","ok":true,"entries":[', '],"more":true}', '],"more":false}'
    budget = (limit or 1 << 62) - framing.HEADER_SIZE - len(head) - len(tail_last)
    page: list[str] = []
    used = 0
    try:
        for text in lines:
            if text is store.PAUSE:
                yield b""
                continue
            if text is store.WAIT:
                yield None
                continue
            size = len(text.encode("utf-8")) + 1
            if size > budget:
                continue  # cannot be sent whole in any frame; our own frames never exceed the limit
            if used + size > budget and page:
                yield framing.encode_raw(framing.KIND_COMMAND, (head + ",".join(page) + tail_more).encode("utf-8"))
                page, used = [], 0
            page.append(text)
            used += size
    except OSError as exc:
        log.error("reading a history for CH failed, its pages end here: %s", exc.strerror or exc)
    finally:   # the pages end (or are dropped with their connection): the read gives back what it holds
        close = getattr(lines, "close", None)
        if close is not None:
            close()
    yield framing.encode_raw(framing.KIND_COMMAND, (head + ",".join(page) + tail_last).encode("utf-8"))


def presence_frame(username: str, online: bool, now: float) -> bytes:
    return framing.data({"op": Op.PRESENCE, "username": username, "online": online, "ts": timestamp(now)})


# --- how handlers answer ---------------------------------------------------------------

class Refused(Exception):
    """A request refused with a section 6 code; ``fields`` join the failure reply.

    ``bye``: after the reply the server says BYE with this reason and closes.
    """

    def __init__(self, code: Error, message: str, *, bye: ByeReason | None = None, **fields) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.bye = bye
        self.fields = fields


class Malformed(Refused):
    """A request with a missing or ill-typed member: ``bad_request``, and the state stays (section 3)."""

    def __init__(self, message: str) -> None:
        super().__init__(Error.BAD_REQUEST, message)


class Ask(NamedTuple):
    """A handler's answer when the store (or a password worker) must answer first.

    ``then(session, result, out)`` continues with the result: it may return
    another ``Ask``, ``None`` (success: the table's edge), or raise ``Refused``.
    ``request`` None: sent later (a password check held by the failed-login delay).
    """
    request: object
    then: Callable
    barrier: bool = True     # False: only a place in the reply order (SEND)
    hold_until: float = 0.0  # a held password check is sent at this time


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


class Session:
    """One connection's protocol state."""

    __slots__ = ("cid", "address", "state", "username", "key", "account", "nonce", "attempts_left",
                 "public_key", "target", "barriers", "deadline", "sealed", "registering", "slots", "online_id",
                 "claimed", "kicked", "checking", "extended", "pm_offline", "since",
                 "wants_recent")

    def __init__(self, cid: int, address: str) -> None:
        self.cid = cid
        self.address = address
        self.state = State.AWAIT_USERNAME
        self.username = ""           # registered spelling once known
        self.key = ""                # lower-case account name
        self.account: Account | None = None
        self.nonce = b""
        self.attempts_left = MAX_ATTEMPTS
        self.public_key: pg3lib.PublicKey = None  # type: ignore[assignment]  # set by KEY, read only after it
        self.target: Session | store.RemoteUser | None = None
        self.slots: list[Slot] = []  # places in the reply order, oldest first (at most MAX_PIPELINE + a few)
        self.barriers = 0            # pending barrier slots (login steps): busy while > 0
        self.deadline = 0.0
        self.sealed = ""             # the PASSWORD ciphertext while it is being checked
        self.registering = False     # holds one of its address's registration slots
        self.checking = False        # holds one of its address's places for a password check
        self.extended = 0.0          # seconds the failed-login delay added to the login deadline
        self.online_id = store.START  # shared mode: where its coming online is in the event order
        self.claimed = False         # shared mode: the store holds this session's token
        self.kicked = False          # shared mode: replaced before its claim was answered
        self.pm_offline = False      # its TARGET asked for "offline":true (section 4.5)
        self.since: str | None = None  # KEY's "since" (section 11): it is catching up from there
        self.wants_recent = False      # KEY's "recent": true (section 11): the room's newest BMs at login


class OfflineTarget(NamedTuple):
    """A PM target that was offline at TARGET (section 4.5): the key it last gave in KEY."""
    key: str
    username: str
    key_form: str
    fingerprint: str


class LoginThrottle:
    """What password checks one address or one account may cost (issue 14's rules).

    * Registrations: at most ``register_rate`` new accounts per address per hour.
    * Checks in hand: at most ``MAX_CHECKS_PER_ADDRESS`` password checks waiting or
      running per address (``--checks-per-ip``), ``MAX_CHECKS`` in all; past either, PASSWORD answers
      ``rate_limited`` at once (not an attempt), so abandoned logins cannot pile
      up work in front of everyone else's.
    * Guessing: after a wrong password, the next check of that account *from that
      address* waits 1, 2, 4, ... seconds (capped at ``delay_cap``), so the real
      user, coming from an address that is not failing, never waits for someone
      else's failures. An account takes at most ``guess_limit`` failed checks an
      hour from addresses that have failed on it; past that, those addresses get
      ``rate_limited`` without a check; a fresh address still gets checked, until
      the account has had ``2 * guess_limit`` failures in the hour: whatever the
      number of addresses, at most that many guesses an hour. Past that bound an
      address the account logged in from lately (``TRUST_MEMORY``, the latest
      ``TRUSTED_PER_ACCOUNT``) that has not failed lately is still checked, so
      a storm of guesses from many addresses cannot lock the real user out.
    """

    def __init__(self, register_rate: int, delay_cap: float, clock: Callable[[], float],
                 guess_limit: int = GUESS_LIMIT, checks_per_address: int = MAX_CHECKS_PER_ADDRESS) -> None:
        self.register_rate = register_rate
        self.checks_per_address = checks_per_address
        self.delay_cap = delay_cap
        self.guess_limit = guess_limit
        self.clock = clock
        self._registered: dict[str, collections.deque] = {}   # address -> times of accounts created
        self._registering: collections.Counter = collections.Counter()   # address -> being created
        self._checks: collections.Counter = collections.Counter()        # address -> checks in hand
        self._checks_total = 0   # their sum, kept beside them: asked at every PASSWORD
        self._delays: dict[tuple[str, str], tuple[int, float]] = {}   # (account, address) -> (failures, last)
        self._guesses: dict[str, collections.deque] = {}   # account -> times of its failed checks
        self._trusted: dict[str, dict[str, float]] = {}    # account -> {address: last login}, oldest first

    # --- registrations ---------------------------------------------------------------
    def reserve_registration(self, address: str) -> bool:
        """Take one of the address's registrations for this hour, if one is left."""
        if self.register_rate <= 0:
            return True
        recent = self._registered.get(address)
        cutoff = self.clock() - REGISTRATION_WINDOW
        while recent and recent[0] <= cutoff:
            recent.popleft()
        used = (len(recent) if recent else 0) + self._registering[address]
        if used >= self.register_rate:
            return False
        self._registering[address] += 1
        return True

    def release_registration(self, address: str, created: bool) -> None:
        """A reserved registration ended: counted for the hour if the account was made."""
        if self.register_rate <= 0:
            return
        self._registering[address] -= 1
        if self._registering[address] <= 0:
            del self._registering[address]
        if created:
            self._registered.setdefault(address, collections.deque()).append(self.clock())

    # --- checks in hand ----------------------------------------------------------------
    def reserve_check(self, address: str) -> bool:
        """Take a place for one password check (waiting, held or running), if the address has one."""
        limit = self.checks_per_address
        if limit and (self._checks[address] >= limit or self._checks_total >= MAX_CHECKS):
            return False
        self._checks[address] += 1
        self._checks_total += 1
        return True

    def release_check(self, address: str) -> None:
        self._checks_total -= 1
        self._checks[address] -= 1
        if self._checks[address] <= 0:
            del self._checks[address]

    # --- guessing ------------------------------------------------------------------------
    def delayed_until(self, key: str, address: str) -> float:
        """Until when the account's next check from this address waits (0: not at all)."""
        entry = self._delays.get((key, address))
        if self.delay_cap <= 0 or entry is None:
            return 0.0
        count, last = entry
        if self.clock() - last >= FAILURE_MEMORY:
            del self._delays[(key, address)]
            return 0.0
        return last + min(self.delay_cap, 2.0 ** (count - 1))

    def refuses_guess(self, key: str, address: str) -> bool:
        """True if the account has had its guesses for this hour from such an address."""
        if self.guess_limit <= 0:
            return False
        recent = self._guesses.get(key)
        if not recent:
            return False
        cutoff = self.clock() - FAILURE_MEMORY
        while recent and recent[0] <= cutoff:
            recent.popleft()
        if len(recent) < self.guess_limit:
            return False
        entry = self._delays.get((key, address))   # has this address failed on the account lately?
        if entry is not None and cutoff < entry[1]:
            return True
        return len(recent) >= 2 * self.guess_limit and not self._is_trusted(key, address)

    def _is_trusted(self, key: str, address: str) -> bool:
        when = self._trusted.get(key, {}).get(address)
        return when is not None and self.clock() - when < TRUST_MEMORY

    def failed(self, key: str, address: str) -> None:
        now = self.clock()
        count, last = self._delays.get((key, address), (0, 0.0))
        if now - last >= FAILURE_MEMORY:
            count = 0
        self._delays[(key, address)] = (count + 1, now)
        if self.guess_limit > 0:
            self._guesses.setdefault(key, collections.deque()).append(now)

    def succeeded(self, key: str, address: str) -> None:
        self._delays.pop((key, address), None)
        trusted = self._trusted.setdefault(key, {})
        trusted.pop(address, None)
        trusted[address] = self.clock()   # the newest last
        if len(trusted) > TRUSTED_PER_ACCOUNT:
            del trusted[next(iter(trusted))]


class RateLimit:
    """A token bucket per account: ``rate`` a second, ``burst`` at once (rate 0: no limit)."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.burst = max(1.0, burst)
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}   # key -> (tokens, when)
        self._prune_at = PRUNE_BUCKETS_AT   # past this many buckets, forget the full ones

    def take(self, key: str) -> bool:
        """Spend one token of key's bucket; False if it is empty."""
        if self.rate <= 0:
            return True
        now = self.clock()
        tokens, at = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        allowed = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
        if len(self._buckets) > self._prune_at:   # bounded: forget the buckets that have filled up again
            full = [k for k, (t, when) in self._buckets.items() if t + (now - when) * self.rate >= self.burst]
            for k in full:
                del self._buckets[k]
            # The next prune when as many again are new: each take costs O(1) on the whole, however
            # many keys are busy at once (an accept per address must not scan them all).
            self._prune_at = max(PRUNE_BUCKETS_AT, 2 * len(self._buckets))
        return allowed


class Room:
    """Session logic for every connection of one server process. Pure: returns effects."""

    def __init__(self, server_keys: pg3lib.KeyPair, *, frame_limit: int = framing.DEFAULT_FRAME_LIMIT,
                 login_timeout: float = 30.0, register_rate: int = 100, login_delay_cap: float = 60.0,
                 guess_limit: int = GUESS_LIMIT, checks_per_ip: int = MAX_CHECKS_PER_ADDRESS,
                 bm_rate: float = BM_RATE, bm_burst: float = BM_BURST,
                 accept_pm1: bool = False, offline_limit: int = OFFLINE_LIMIT,
                 offline_per_sender: int = OFFLINE_PER_SENDER,
                 recent: int = RECENT, catch_up_limit: int = CATCH_UP_LIMIT,
                 clock: Callable[[], float] = time.time,
                 random_bytes: Callable[[int], bytes] = os.urandom, admins=()) -> None:
        self.server_keys = server_keys
        self.server_key_form = server_keys.public.key_form
        self.frame_limit = frame_limit
        self.login_timeout = login_timeout
        self.clock = clock
        self.random_bytes = random_bytes
        self.throttle = LoginThrottle(register_rate, login_delay_cap, clock, guess_limit, checks_per_ip)
        self.bm_limit = RateLimit(bm_rate, bm_burst, clock)   # per account, whatever its connections
        self.sessions: dict[int, Session] = {}
        self.online: dict[str, Session] = {}       # after KEY: key -> session
        self.online_version = 0                     # changes whenever someone comes or goes
        self._snapshot: tuple | None = None         # registered spellings of everyone online
        self.logged_in: dict[str, Session] = {}    # after PASSWORD: key -> session
        self._deadlines: list[tuple[float, int]] = []
        self._held: list[tuple[float, int]] = []   # (until, cid): attempts waiting out a failed-login delay
        # PMs (section 4.5): version 1 (no id) accepted while clients move to PM2 (--accept-pm1).
        self.accept_pm1 = accept_pm1
        self.offline_limit = offline_limit   # PMs kept for one offline target
        self.offline_per_sender = offline_per_sender   # of those, from one sender (0: no share)
        self.recent = recent                 # section 11: BMs shown at login
        self.catch_up_limit = catch_up_limit
        # A CH page with no entries: what every history entry must fit beside (its size is the page's overhead).
        self._page_overhead = len(next(history_pages([], frame_limit)) or b"")
        # Moderation (section 10): admins are named at the server; the mutes of accounts logged in
        # here (loaded at login, changed by MOD) are kept to answer their BMs without a store read.
        self.admins = frozenset(name.lower() for name in admins)
        self.mutes: dict[str, store.ModRecord] = {}

    @property
    def login_delay_cap(self) -> float:
        return self.throttle.delay_cap

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
            self._reply(session, fail(op, Error.BAD_REQUEST, "clients send command (C) frames only"), out)
            return out
        transition = TRANSITIONS[session.state].get(op)
        if transition is None:
            self._reply(session, fail(op, Error.UNEXPECTED, _expected(session.state)), out)
            return out
        body = frame.body
        self._run(session, op, transition, lambda o: transition.handler(self, session, body, o), out)
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
        assert slot.continuation is not None   # only filled slots have none
        slot.continuation(session, result, produced)
        for effect in produced:
            # Requests go out now, so requests are made in the order of their slots.
            (out if type(effect) in REQUESTS else slot.effects).append(effect)
        while slots and slots[0].effects is not None:
            out.extend(slots.pop(0).effects or ())
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
            if session.checking:
                session.checking = False
                self.throttle.release_check(session.address)
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
        """Timers: held password checks whose delay is over; connections that did not
        finish logging in in time (BYE idle)."""
        out: Effects = []
        while self._held and self._held[0][0] <= now:
            _, cid = heapq.heappop(self._held)
            session = self.sessions.get(cid)
            held = [slot for slot in session.slots if slot.held] if session is not None else []
            if session is not None and held and session.state is State.AWAIT_PASSWORD:
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
            self._say_bye(session, ByeReason.IDLE, out)
        return out

    def next_deadline(self) -> float | None:
        times = [heap[0][0] for heap in (self._deadlines, self._held) if heap]
        return min(times) if times else None

    def _extend_deadline(self, session: Session, seconds: float) -> None:
        """Stop the login clock while an attempt waits out the failed-login delay: the one
        pause of the otherwise absolute deadline, at most the delays of its three attempts."""
        seconds = min(seconds, MAX_ATTEMPTS * self.throttle.delay_cap - session.extended)
        if session.deadline and session.state in LOGIN_STATES and seconds > 0:
            session.extended += seconds
            session.deadline += seconds
            heapq.heappush(self._deadlines, (session.deadline, session.cid))

    def cluster_event(self, event: store.ClusterEvent) -> Effects:
        """What another node did (a store of several nodes); one process has none."""
        raise TypeError(f"a room of one process gets no cluster events: {event!r}")

    # --- the table's edges, applied in one place ------------------------------------
    def _run(self, session: Session, op: str, transition: Transition, step: Callable, out: Effects) -> None:
        """Run one step of a request (the handler, or a continuation of it); when the
        request ends, take its edge of the table."""
        try:
            ask = step(out)
        except Refused as refusal:
            self._refused(session, op, refusal, out)
            if transition.on_fail is not None and not isinstance(refusal, Malformed) \
                    and refusal.code not in transition.keeps_on:
                self._enter(session, transition.on_fail)
            return
        if ask is None:
            self._enter(session, transition.next_state)
        elif ask.barrier:
            then = ask.then
            slot = self._wait(session, lambda s, result, o: self._run(s, op, transition,
                                                                      lambda o2: then(s, result, o2), o),
                              None if ask.hold_until else ask.request, out)
            if ask.hold_until:
                # Held, not refused: checked with every other attempt on this account
                # when the delay ends, and the login clock stops meanwhile.
                slot.held = True
                heapq.heappush(self._held, (ask.hold_until, session.cid))
                self._extend_deadline(session, ask.hold_until - self.clock())
        else:
            # A slot: the edge is taken now; the answer only makes the reply, in its place.
            self._enter(session, transition.next_state)
            self._defer(session, lambda s, result, o: self._answer(s, op, ask.then, result, o), ask.request, out)

    def _answer(self, session: Session, op: str, then: Callable, result: object, out: Effects) -> None:
        """A slot's reply (its request's edge was taken when it was made)."""
        try:
            then(session, result, out)
        except Refused as refusal:
            out.append(Send(session.cid, fail(op, refusal.code, refusal.message, **refusal.fields)))

    def _refused(self, session: Session, op: str, refusal: Refused, out: Effects) -> None:
        """The one failure reply; then the BYE the refusal asks for."""
        if session.state is State.CLOSED:
            return
        self._reply(session, fail(op, refusal.code, refusal.message, **refusal.fields), out)
        if refusal.bye is not None:
            self._say_bye(session, refusal.bye, out)

    @staticmethod
    def _enter(session: Session, new_state: State) -> None:
        if session.state is State.CLOSED:
            return   # the connection ended meanwhile: nothing moves it again
        session.state = new_state
        if new_state is State.READY:
            session.target = None
            session.pm_offline = False

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

    def _say_bye(self, session: Session, reason: ByeReason, out: Effects, **fields) -> None:
        """BYE, the session ends, and the connection closes once the BYE is sent."""
        self._reply(session, bye(reason, **fields), out)
        self._end(session, out)
        self._emit(session, Close(session.cid), out)

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
        self._release(session, out)
        if key and self.online.get(key) is session:
            del self.online[key]
            self._online_changed()
            # At once, not behind its pending replies: nothing broadcast from now on is its
            # (not in its history either), though its SEND and CH replies are still to come.
            out.append(Offline(key, session.cid))
            self._announce_offline(session, out)

    def _names_reply(self, op: str, session: Session, **fields) -> bytes:
        names = self._others_online(session)
        if self.frame_limit:
            fixed = len(ok(op, online=[], more_online=len(names), **fields))
            names, left_out = fit_names(names, self.frame_limit - fixed)
            if left_out:
                return ok(op, online=names, more_online=left_out, **fields)
        return ok(op, online=names, **fields)

    # --- what one process decides itself (SharedRoom asks the store instead) ---------
    def _others_online(self, session: Session) -> list[str]:
        return [s.username for k, s in self.online.items() if k != session.key]

    def _find_online(self, key: str) -> Session | store.RemoteUser | None:
        return self.online.get(key)

    def _claim(self, session: Session, new_user: bool, out: Effects) -> Ask | None:
        """The password is right: the account's older session (if any) is replaced."""
        self._take_over(session, new_user, out)
        return None

    def _release(self, session: Session, out: Effects) -> None:
        """The session ended: nothing to give back in one process."""

    def _go_online(self, session: Session, out: Effects) -> Ask | None:
        self._reply(session, self._names_reply(Op.KEY, session, fingerprint=session.public_key.fingerprint), out)
        self.online[session.key] = session
        self._online_changed()
        # Asked for now, not behind the reply: the BMs asked for from here on are in its history.
        out.append(store.MarkOnline(0, session.username, True))
        out.append(Online(session.key, session.cid))
        out.append(DeliverAll(presence_frame(session.username, True, self.clock()), session.key))
        # The PMs kept while it was offline (section 5), right after the KEY reply; asked for in the
        # same pass as it came online, so every PM is either kept before it or delivered live after.
        return Ask(store.TakeOffline(session.cid, session.username, self._recent_count(session),
                                     session.since or ""), self._offline_taken)

    def _offline_taken(self, session: Session, result: store.Result, out: Effects) -> None:
        """Never refused: KEY is answered already (if the PMs cannot be read they stay kept)."""
        if isinstance(result, store.OfflineTaken) and session.state is not State.CLOSED:
            for frame in result.frames:
                self._reply(session, frame, out)
            self._send_recent(session, result.recent, out)

    def _recent_count(self, session: Session) -> int:
        """How many of the room's newest BMs to read for its login (section 11): none unless the
        client asked (a client of the course protocol knows nothing of them)."""
        if session.since is not None:
            return self.catch_up_limit
        return self.recent if session.wants_recent else 0

    def _send_recent(self, session: Session, lines: tuple, out: Effects) -> None:
        """The room's BMs from before it came online, as ``D BM`` with ``"recent": true``, oldest
        first (the store read those since its ``since``, or the newest few). Sent as pages, so
        that a long catch-up never counts against the client's send queue."""
        frames: list[bytes] = []
        size = 0
        for text in lines:
            try:
                entry = json.loads(text)
            except ValueError:
                continue
            if not isinstance(entry, dict) or entry.get("type") != "BM" or not isinstance(entry.get("ts"), str):
                continue
            frame = framing.data({"op": Op.BM, "from": entry.get("from"), "text": entry.get("text"),
                                  "ts": entry["ts"], "recent": True})
            if frames and size + len(frame) > self.frame_limit:
                self._emit(session, Page(session.cid, b"".join(frames)), out)
                frames, size = [], 0
            frames.append(frame)
            size += len(frame)
        if frames:
            self._emit(session, Page(session.cid, b"".join(frames)), out)

    def _announce_offline(self, session: Session, out: Effects) -> None:
        out.append(store.MarkOnline(0, session.username, False))   # now: later BMs are not its history
        self._emit(session, DeliverAll(presence_frame(session.username, False, self.clock()), session.key), out)

    def _bm_stored(self, session: Session, owners: tuple, version: int, frame: bytes, ts: str,
                   result: store.Result, out: Effects) -> None:
        if not isinstance(result, store.Appended):
            raise Refused(Error.INTERNAL, "the message could not be stored")
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
        out.append(Send(session.cid, ok(Op.SEND, recipients=count, ts=ts)))

    def _pm_request(self, session: Session, target, request: store.AppendHistory) -> store.AppendHistory:
        return request

    def _pm_stored(self, session: Session, target, frame: bytes, result: store.Result, out: Effects) -> None:
        _check_id(session, result)
        if not isinstance(result, store.Appended):
            raise Refused(Error.INTERNAL, "the message could not be stored")
        delivered = target.username not in result.failed and self.online.get(target.key) is target
        if delivered:
            out.append(Deliver([target.key], frame))
        out.append(Send(session.cid, ok(Op.SEND, recipients=int(delivered))))

    # --- AWAIT_USERNAME ----------------------------------------------------------
    def _login(self, session: Session, body: dict, out: Effects) -> Ask:
        name = body.get("username")
        if not isinstance(name, str):
            raise Malformed("LOGIN needs a string 'username'")
        if not valid_username(name):
            raise Refused(Error.INVALID_USERNAME, f"a username is {USERNAME_RULE}")
        session.username = name
        session.key = name.lower()
        return Ask(store.LoadAccount(session.cid, session.key), self._login_account)

    def _login_account(self, session: Session, result: store.Result, out: Effects) -> None:
        if session.state is State.CLOSED:
            return
        if not isinstance(result, store.AccountLoaded):
            raise Refused(Error.INTERNAL, "the account could not be read; try again")
        account = session.account = result.account
        if account is not None:
            session.username = account.username
        session.nonce = self.random_bytes(NONCE_BYTES)
        self._reply(session, ok(Op.LOGIN, new_user=account is None, server_key=self.server_key_form,
                                fingerprint=self.server_keys.fingerprint,
                                nonce=base64.b64encode(session.nonce).decode("ascii"), protocol=PROTOCOL_VERSION), out)

    # --- AWAIT_PASSWORD ----------------------------------------------------------
    def _password(self, session: Session, body: dict, out: Effects) -> Ask:
        sealed = body.get("ciphertext")
        if not isinstance(sealed, str) or len(sealed) > MAX_SEALED_PASSWORD_CHARS:
            raise self._failed_attempt(session, Error.BAD_REQUEST, "'ciphertext' must be a sealed string")
        throttle, address = self.throttle, session.address
        if session.account is not None and throttle.refuses_guess(session.key, address):
            raise Refused(Error.RATE_LIMITED, "too many failed logins for this account; try again later")
        if not throttle.reserve_check(address):
            raise Refused(Error.RATE_LIMITED, "too many password checks waiting; try again in a moment")
        session.checking = True
        session.sealed = sealed
        if session.account is None:
            session.registering = throttle.reserve_registration(address)
            return Ask(self._password_job(session), self._password_checked)
        until = throttle.delayed_until(session.key, address)
        if until > self.clock():
            return Ask(None, self._password_checked, hold_until=until)
        return Ask(self._password_job(session), self._password_checked)

    def _password_job(self, session: Session) -> CheckPassword:
        return CheckPassword(session.cid, session.sealed, session.nonce, session.username, session.account,
                             session.account is not None or session.registering, session.address)

    def _release_registration(self, session: Session, created: bool) -> None:
        if session.registering:
            session.registering = False
            self.throttle.release_registration(session.address, created)

    def _failed_attempt(self, session: Session, code: Error, message: str) -> Refused:
        """A failed PASSWORD attempt: it counts, and the last one ends the connection."""
        session.attempts_left -= 1
        return Refused(code, message, attempts_left=session.attempts_left,
                       bye=ByeReason.TOO_MANY_FAILURES if session.attempts_left <= 0 else None)

    def _password_checked(self, session: Session, result: LoginResult, out: Effects) -> Ask | None:
        if session.checking:
            session.checking = False
            self.throttle.release_check(session.address)
        if result.outcome != OK or session.state is State.CLOSED:
            self._release_registration(session, created=False)
        if session.account is not None:
            if result.outcome == Error.WRONG_PASSWORD:
                self.throttle.failed(session.key, session.address)
            elif result.outcome == OK:
                self.throttle.succeeded(session.key, session.address)
        if session.state is State.CLOSED:
            return None
        if result.outcome != OK:
            session.sealed = ""
            if result.outcome in (Error.WEAK_PASSWORD, Error.RATE_LIMITED, Error.INTERNAL):   # not attempts
                raise Refused(Error(result.outcome), result.message)
            raise self._failed_attempt(session, Error(result.outcome), result.message)
        if session.account is None:
            assert result.account is not None   # a new user's OK carries the new account
            return Ask(store.CreateAccount(session.cid, result.account), self._account_created)
        session.sealed = ""
        return self._check_banned(session, out)

    def _account_created(self, session: Session, result: store.Result, out: Effects) -> Ask | None:
        self._release_registration(session, created=result == store.AccountCreated(True))
        if result == store.AccountCreated(False):
            # Someone registered this name while the password was hashed: the
            # password is checked against that account instead.
            session.account = None
            return Ask(store.LoadAccount(session.cid, session.key), self._login_recheck)
        session.sealed = ""
        if not isinstance(result, store.AccountCreated):
            raise Refused(Error.INTERNAL, "the account could not be stored")
        self.throttle.succeeded(session.key, session.address)   # its first login: the address is trusted
        if session.state is State.CLOSED:
            return None
        return self._claim(session, True, out)

    def _login_recheck(self, session: Session, result: store.Result, out: Effects) -> Ask | None:
        if session.state is State.CLOSED:
            return None
        if not isinstance(result, store.AccountLoaded) or result.account is None:
            session.sealed = ""
            raise Refused(Error.INTERNAL, "the account could not be read")
        account = session.account = result.account
        session.username = account.username
        return Ask(CheckPassword(session.cid, session.sealed, session.nonce, session.username, account,
                                 address=session.address), self._password_checked)

    def _take_over(self, session: Session, new_user: bool, out: Effects) -> None:
        """Logged in: an older session of the account gets BYE replaced; PASSWORD ok."""
        old = self.logged_in.get(session.key)
        if old is not None and old is not session:
            self._say_bye(old, ByeReason.REPLACED, out)
        self.logged_in[session.key] = session
        session.account = None   # the hash is not needed any more
        self._reply(session, ok(Op.PASSWORD, new_user=new_user, username=session.username), out)

    # --- AWAIT_KEY ---------------------------------------------------------------
    def _key(self, session: Session, body: dict, out: Effects) -> Ask | None:
        try:
            public_key = pg3lib.PublicKey.from_key_form(cast(str, body.get("public_key"))).compact()
        except (pg3lib.InvalidKey, TypeError, AttributeError) as exc:
            raise Refused(Error.BAD_REQUEST, f"'public_key' must be an RSA public key of at least 2048 bits "
                                             f"in key form ({exc or 'not a string'})") from None
        since, recent = body.get("since"), body.get("recent", False)
        if "since" in body and parse_timestamp(since) is None:
            raise Malformed("'since' must be a time in the form 2026-11-24T15:04:05.123Z")
        if not isinstance(recent, bool):
            raise Malformed("'recent' must be true or false")
        session.public_key = public_key
        session.since = since
        session.wants_recent = recent
        # Its last key, kept durably for offline PMs (section 4.5): the KEY reply waits for it.
        return Ask(store.SaveKey(session.cid, session.key, session.username, public_key.key_form), self._key_saved)

    def _key_saved(self, session: Session, result: store.Result, out: Effects) -> Ask | None:
        if session.state is State.CLOSED:
            return None
        if result is not store.KEY_SAVED:
            raise Refused(Error.INTERNAL, "your key could not be stored; try again")
        return self._go_online(session, out)

    # --- READY -------------------------------------------------------------------
    def _bm(self, session: Session, body: dict, out: Effects) -> None:
        self._reply(session, ok(Op.BM), out)

    def _pm(self, session: Session, body: dict, out: Effects) -> None:
        self._reply(session, self._names_reply(Op.PM, session), out)

    def _ch(self, session: Session, body: dict, out: Effects) -> Ask:
        limit = body.get("limit")
        if "limit" in body and (type(limit) is not int or limit < 1):   # null too: present, not an integer
            raise Malformed("'limit' must be a positive integer")
        # A barrier, not a slot: one history read at a time per connection.
        return Ask(store.ReadHistory(session.cid, session.username, limit),
                   lambda s, result, o: self._history_read(s, result, limit, o))

    def _history_read(self, session: Session, result: store.Result, limit: int | None, out: Effects) -> None:
        if not isinstance(result, store.HistoryRead):
            raise Refused(Error.INTERNAL, "the history could not be read; try again")
        self._emit(session, Pages(session.cid, history_pages(result.lines, self.frame_limit)), out)

    def _ex(self, session: Session, body: dict, out: Effects) -> None:
        self._reply(session, ok(Op.EX), out)
        self._end(session, out)
        self._emit(session, Close(session.cid), out)

    def _cancel(self, session: Session, body: dict, out: Effects) -> None:
        self._reply(session, ok(Op.CANCEL), out)

    # --- AWAIT_BM_TEXT -----------------------------------------------------------
    def _bm_send(self, session: Session, body: dict, out: Effects) -> Ask:
        text = body.get("text")
        problem = text_problem(text)
        if problem:
            raise Refused(Error.BAD_REQUEST, problem)
        self._check_muted(session)
        if not self.bm_limit.take(session.key):
            raise Refused(Error.RATE_LIMITED, "you are sending too fast; wait a moment")
        ts = timestamp(self.clock())
        line = json_line({"ts": ts, "type": "BM", "from": session.username, "to": "*", "text": text})
        owners = self.online_snapshot()   # the sender and everyone it reaches
        frame = framing.data({"op": Op.BM, "from": session.username, "text": text, "ts": ts})
        version = self.online_version
        return Ask(store.AppendHistory(session.cid, [(owners, line)], session.username, "BM", frame,
                                       token=self._token_of(session)),
                   lambda s, result, o: self._bm_stored(s, owners, version, frame, ts, result, o), barrier=False)

    def _token_of(self, session: Session) -> str:
        """The session's name in a shared store ("" in one process)."""
        return ""

    # --- AWAIT_PM_TARGET / AWAIT_PM_TEXT -----------------------------------------
    def _pm_target(self, session: Session, body: dict, out: Effects) -> Ask | None:
        name = body.get("username")
        if not isinstance(name, str):
            raise Malformed("'username' must be a string")
        offline = body.get("offline", False)
        if not isinstance(offline, bool):
            raise Malformed("'offline' must be true or false")
        key = name.lower()
        if key == session.key:
            raise Refused(Error.BAD_REQUEST, "you cannot send a private message to yourself")
        if not valid_username(name):
            raise Refused(Error.NO_SUCH_USER, f"there is no account {name!r}")
        target = self._find_online(key)
        if target is not None:
            self._target_chosen(session, target, offline, True, out)
            return None
        # Not online: does the account exist, and what key did it last give? (section 4.5)
        return Ask(store.LoadLastKey(session.cid, key),
                   lambda s, result, o: self._target_loaded(s, name, offline, result, o))

    def _target_loaded(self, session: Session, name: str, offline: bool, result: store.Result,
                       out: Effects) -> None:
        if session.state is State.CLOSED:
            return
        if not isinstance(result, store.LastKey):
            raise Refused(Error.INTERNAL, "the account could not be read; try again")
        if result.username is None:
            raise Refused(Error.NO_SUCH_USER, f"there is no account {name!r}")
        target = self._find_online(name.lower())   # it may have come online meanwhile
        if target is not None:
            self._target_chosen(session, target, offline, True, out)
            return
        if not offline:
            raise Refused(Error.NOT_ONLINE, f"{result.username!r} is not online")
        try:
            public_key = pg3lib.PublicKey.from_key_form(cast(str, result.key_form)) if result.key_form else None
        except (pg3lib.InvalidKey, TypeError, ValueError, AttributeError):
            public_key = None
        if public_key is None:
            raise Refused(Error.NOT_ONLINE, f"{result.username!r} is not online and has never given a key "
                                            "to seal a message to")
        self._target_chosen(session, OfflineTarget(name.lower(), result.username, public_key.key_form,
                                                   public_key.fingerprint), offline, False, out)

    def _target_chosen(self, session: Session, target, offline: bool, online: bool, out: Effects) -> None:
        session.target = target
        session.pm_offline = offline
        key_form, fingerprint = _key_of(target)
        self._reply(session, ok(Op.TARGET, username=target.username, online=online, public_key=key_form,
                                fingerprint=fingerprint), out)

    def _pm_send(self, session: Session, body: dict, out: Effects) -> Ask:
        ciphertext, self_copy, signature = body.get("ciphertext"), body.get("self_copy"), body.get("signature")
        if not (isinstance(ciphertext, str) and isinstance(self_copy, str) and isinstance(signature, str)
                and ciphertext and self_copy):
            raise Malformed("a private message needs string 'ciphertext', 'self_copy' and 'signature'")
        if "id" not in body and not self.accept_pm1:
            raise Malformed(f"a private message needs 'id' and 'sent' (protocol version {PROTOCOL_VERSION})")
        target = session.target
        if target is None:
            raise Refused(Error.NOT_ONLINE, "the recipient is not online any more")
        # The target's presence now decides (section 4.5): live, or kept if "offline" was asked.
        live = self._find_online(target.key)
        if live is not target:
            if not session.pm_offline:
                raise Refused(Error.NOT_ONLINE, "the recipient is not online any more")
            if live is not None:
                target = live
        keep = live is None or (session.pm_offline and self._store_decides_offline)
        # Their syntax (section 8), against the key TARGET gave out (if it is at hand) and ours.
        for member, sealed, to in (("ciphertext", ciphertext, session.target), ("self_copy", self_copy, session)):
            problem = pg3lib.sealed_form_problem(sealed, _key_bytes(to))
            if problem:
                raise Refused(Error.BAD_REQUEST, f"'{member}': {problem}")
        ts = timestamp(self.clock())
        entry = {"ts": ts, "type": "PM", "from": session.username, "to": target.username}
        if "id" in body:
            signed, pm_id, sent_at = self._pm2_checked(session, target, body, ciphertext, self_copy, signature)
            entry.update(signed)
            frame_fields = {"id": signed["id"], "sent": signed["sent"], "ciphertext": ciphertext,
                            "self_copy_sha256": signed["self_copy_sha256"]}
        else:   # version 1, transitional (--accept-pm1): signed without id or time, so replayable
            pm_id, sent_at = "", 0.0
            if not session.public_key.verify(pg3lib.pm_signed_bytes(session.username, target.username, ciphertext),
                                             signature):
                raise Refused(Error.BAD_REQUEST, "the signature does not verify with your public key")
            frame_fields = {"ciphertext": ciphertext}
        lines = [((session.username,), json_line({**entry, "ciphertext": self_copy})),
                 ((target.username,), json_line({**entry, "ciphertext": ciphertext}))]
        frame_body = {"op": Op.PM, "from": session.username, "to": target.username, **frame_fields,
                      "signature": signature, "sender_key": session.public_key.key_form, "ts": ts}
        frame = framing.data(frame_body)
        offline_frame = framing.data({**frame_body, "offline": True}) if keep else frame
        if self.frame_limit and (len(offline_frame) - framing.HEADER_SIZE > self.frame_limit
                                 or any(len(line) + self._page_overhead > self.frame_limit for _, line in lines)):
            raise Refused(Error.BAD_REQUEST, "this private message is too long to relay in one frame")
        # The store checks the id, for the whole room (section 4.5): a barrier, so that a SEND
        # refused for it leaves the state as it was (section 4.4), like every other bad_request.
        used = store.PmId(session.key, pm_id, sent_at, self.clock()) if pm_id else None
        if keep:
            return Ask(store.StoreOfflinePM(session.cid, lines, session.username, target.username, frame,
                                            offline_frame, self.offline_limit, self._token_of(session), used,
                                            self.offline_per_sender),
                       self._pm_kept, barrier=used is not None)
        request = self._pm_request(session, target, store.AppendHistory(session.cid, lines, session.username, "PM",
                                                                        frame, target.key, pm_id=used))
        return Ask(request, lambda s, result, o: self._pm_stored(s, target, frame, result, o),
                   barrier=used is not None)

    # A store of several nodes decides itself whether a PM that may be kept goes live (SharedRoom).
    _store_decides_offline = False

    def _pm_kept(self, session: Session, result: store.Result, out: Effects) -> None:
        _check_id(session, result)
        if not isinstance(result, store.Appended) or result.failed:
            raise Refused(Error.INTERNAL, "the message could not be stored")
        if result.sender_full:
            raise Refused(Error.RATE_LIMITED, f"{self.offline_per_sender} of your private messages are waiting "
                                              "for the recipient already (the most one sender may leave); try "
                                              "again once they have logged in")
        if result.full:
            raise Refused(Error.RATE_LIMITED, "too many private messages are waiting for the recipient already; "
                                              "try again once they have logged in")
        out.append(Send(session.cid, ok(Op.SEND, recipients=result.recipients or 0)))

    def _pm2_checked(self, session: Session, target, body: dict, ciphertext: str, self_copy: str,
                     signature: str) -> tuple[dict, str, float]:
        """A PM2 SEND's id, time and signature checked (section 4.5): the signed members for
        history, the id, and the time ``sent`` names.

        Raises:
            Refused: bad_request, naming the first problem found.
        """
        pm_id, sent = body.get("id"), body.get("sent")
        if not isinstance(pm_id, str) or not isinstance(sent, str):
            raise Malformed("a private message needs string 'id' and 'sent'")
        problem = pmguard.id_problem(pm_id)
        if problem:
            raise Refused(Error.BAD_REQUEST, problem)
        try:
            sent_at = pmguard.sent_time(sent, self.clock())
            ciphertext_sha256, self_copy_sha256 = pg3lib.sealed_digest(ciphertext), pg3lib.sealed_digest(self_copy)
        except ValueError as exc:   # UnicodeEncodeError too: a sealed text is ASCII
            raise Refused(Error.BAD_REQUEST, str(exc) if not isinstance(exc, UnicodeError)
                          else "sealed texts are ASCII") from None
        signed = pg3lib.pm2_signed_bytes(pm_id, sent, session.username, target.username, ciphertext_sha256,
                                         self_copy_sha256)
        if not session.public_key.verify(signed, signature):
            raise Refused(Error.BAD_REQUEST, "the signature does not verify with your public key "
                                             "(PM2: id, sent, from, to and the digests of both sealed texts)")
        return ({"id": pm_id, "sent": sent, "signature": signature, "ciphertext_sha256": ciphertext_sha256,
                 "self_copy_sha256": self_copy_sha256}, pm_id, sent_at)


    # --- moderation (section 10) ----------------------------------------------------
    def _check_banned(self, session: Session, out: Effects) -> Ask:
        """The password is right: a banned account goes no further; its mute is remembered."""
        return Ask(store.LoadSanctions(session.cid, session.key), self._sanctions_loaded)

    def _sanctions_loaded(self, session: Session, result: store.Result, out: Effects) -> Ask | None:
        if session.state is State.CLOSED:
            return None
        if not isinstance(result, store.SanctionsLoaded):
            raise Refused(Error.INTERNAL, "the account could not be read; try again")
        now = self.clock()
        ban = result.ban
        if ban is not None and moderation.in_force(ban.until, now):
            out.append(Audit(f"refused the login of {session.username!r}: banned by {ban.by!r}", refused=True))
            raise Refused(Error.BANNED, "this account is " + moderation.sanction_text("banned", ban.by, ban.until,
                                                                                       ban.reason),
                          bye=ByeReason.BANNED, until=moderation.until_ts(ban.until), by=ban.by, reason=ban.reason)
        mute = result.mute
        if mute is not None and moderation.in_force(mute.until, now):
            self.mutes[session.key] = mute
        else:
            self.mutes.pop(session.key, None)
        return self._claim(session, False, out)

    def _check_muted(self, session: Session) -> None:
        """Raises: Refused: the account is muted."""
        mute = self.mutes.get(session.key)
        if mute is None:
            return
        if not moderation.in_force(mute.until, self.clock()):
            del self.mutes[session.key]
            return
        raise Refused(Error.MUTED, "you are " + moderation.sanction_text("muted", mute.by, mute.until, mute.reason),
                      until=moderation.until_ts(mute.until), by=mute.by, reason=mute.reason)

    def _mod(self, session: Session, body: dict, out: Effects) -> Ask:
        try:
            request = moderation.parse_request(body)
        except ValueError as exc:
            raise Malformed(str(exc)) from None
        if session.key not in self.admins:
            out.append(Audit(f"refused MOD {request.action.value} {request.username!r} from {session.username!r}: "
                             "not an admin", refused=True))
            raise Refused(Error.FORBIDDEN, "only an admin named at the server can moderate")
        if request.action is ModAction.BANS:
            return Ask(store.ListSanctions(session.cid), self._sanctions_listed)
        key = request.username.lower()
        if key == session.key:
            raise Refused(Error.BAD_REQUEST, f"you cannot {request.action.value} yourself")
        if request.action is ModAction.KICK:
            target = self._find_online(key)
            if target is None:
                raise Refused(Error.NOT_ONLINE, f"{request.username!r} is not online")
            return self._moderate(session, request, target.username)
        return Ask(store.LoadAccount(session.cid, key), lambda s, result, o: self._mod_account(s, request, result))

    def _mod_account(self, session: Session, request: moderation.ModRequest, result: store.Result) -> Ask:
        if not isinstance(result, store.AccountLoaded):
            raise Refused(Error.INTERNAL, "the account could not be read; try again")
        if result.account is None:
            raise Refused(Error.NO_SUCH_USER, f"there is no account {request.username!r}")
        return self._moderate(session, request, result.account.username)

    def _moderate(self, session: Session, request: moderation.ModRequest, spelling: str) -> Ask:
        action = request.action
        if action in moderation.NEEDS_CONFIRM and spelling.lower() in self.admins and not request.confirm:
            raise Refused(Error.CONFIRM_NEEDED, f"{spelling} is an admin: send it again with \"confirm\": true "
                          f"to {action.value} them anyway", username=spelling)
        now = self.clock()
        until = now + request.seconds if action in moderation.TIMED and request.seconds is not None else None
        record = store.ModRecord(action.value, spelling, session.username, until, request.reason, now)
        return Ask(store.Moderate(session.cid, record), lambda s, result, o: self._moderated(s, record, result, o))

    def _moderated(self, session: Session, record: store.ModRecord, result: store.Result, out: Effects) -> None:
        if not isinstance(result, store.ModerationStored):
            raise Refused(Error.INTERNAL, "the action could not be stored; nothing was done")
        if not result.applied:
            what = "banned" if record.action == ModAction.UNBAN else "muted"
            raise Refused(Error.BAD_REQUEST, f"{record.username} is not {what}")
        out.append(Audit(moderation.notice_text(record.action, repr(record.username), repr(record.by), record.until,
                                                repr(record.reason) if record.reason else "", record.at)))
        self._reply(session, ok(Op.MOD, action=record.action, username=record.username,
                                until=moderation.until_ts(record.until), reason=record.reason), out)
        self._enforce(record, out)

    def _enforce(self, record: store.ModRecord, out: Effects) -> None:
        """One process: the action is stored, so it holds now."""
        self._sanction(record, out)

    def _sanction(self, record: store.ModRecord, out: Effects) -> None:
        """Carry a stored action out on this server's users, and tell them (a NOTICE)."""
        action, key = ModAction(record.action), record.key
        target = self.logged_in.get(key)
        text = moderation.notice_text(record.action, record.username, record.by, record.until, record.reason,
                                      record.at)
        if action in (ModAction.KICK, ModAction.BAN) and target is not None:
            reason = ByeReason.KICKED if action is ModAction.KICK else ByeReason.BANNED
            self._say_bye(target, reason, out, message=text, until=moderation.until_ts(record.until))
        elif action is ModAction.MUTE and target is not None:
            self.mutes[key] = record
        elif action is ModAction.UNMUTE:
            self.mutes.pop(key, None)
        out.append(DeliverAll(framing.data({"op": Op.NOTICE, "text": text, "action": record.action,
                                            "username": record.username, "by": record.by,
                                            "until": moderation.until_ts(record.until), "reason": record.reason,
                                            "ts": timestamp(self.clock())}), ""))

    def _sanctions_listed(self, session: Session, result: store.Result, out: Effects) -> None:
        if not isinstance(result, store.SanctionsListed):
            raise Refused(Error.INTERNAL, "the bans could not be read; try again")
        now = self.clock()
        kept = sorted((r for r in result.records if moderation.in_force(r.until, now)),
                      key=lambda r: (r.action, r.key))
        entries: dict[str, list] = {"ban": [], "mute": []}
        budget = (self.frame_limit or 1 << 62) - 200
        left_out = 0
        for record in kept:
            entry = {"username": record.username, "by": record.by, "until": moderation.until_ts(record.until),
                     "reason": record.reason, "since": timestamp(record.at)}
            size = framing.json_size(entry) + 1
            if size > budget or record.action not in entries:
                left_out += record.action in entries
                continue
            budget -= size
            entries[record.action].append(entry)
        fields = {"more": left_out} if left_out else {}
        self._reply(session, ok(Op.MOD, action=ModAction.BANS, bans=entries["ban"], mutes=entries["mute"],
                                **fields), out)


def _key_bytes(target) -> int | None:
    """The size (bytes) of a PM target's key if it is at hand (a session here), else None."""
    return (target.public_key.bits + 7) // 8 if isinstance(target, Session) and target.public_key else None


def _check_id(session: Session, result: store.Result) -> None:
    """A PM2 the store refused for its id: bad_request (the state stays, as for any SEND)."""
    if isinstance(result, store.IdRefused):
        raise Refused(Error.BAD_REQUEST, result.reason)


def _key_of(target: Session | store.RemoteUser) -> tuple[str, str]:
    """A PM target's public key form and fingerprint."""
    if isinstance(target, (store.RemoteUser, OfflineTarget)):
        return target.key_form, target.fingerprint
    return target.public_key.key_form, target.public_key.fingerprint


class SharedRoom(Room):
    """One node of several on one store (docs/SCALEOUT.md).

    One session per account across all nodes: the store swaps the account's
    session token (``ClaimSession``), puts the session online (``GoOnline``)
    and delivers BMs and PMs itself; presence, broadcasts, PMs and kicks from
    every node come back as cluster events, in the store's order. A local user
    gets an event only if it came online before it (``online_id``).
    """

    def __init__(self, server_keys: pg3lib.KeyPair, *, node: str, **options) -> None:
        super().__init__(server_keys, **options)
        self.node = node
        self.remote: dict[str, store.RemoteUser] = {}
        self._store_decides_offline = True   # the pm_offline script delivers live if the target is online
        self._recent_bm: collections.deque = collections.deque(maxlen=RECENT_EVENTS)
        # The latest ``online_id`` given to a local session: an event after it is for everyone
        # online here, so it can share the pass's one chunk per user (DeliverAll).
        self._newest_online: store.Position = store.START

    def _token_of(self, session: Session) -> str:
        """The session's name in the store, ``<node>/<connection>``."""
        return f"{self.node}/{session.cid}"

    def _others_online(self, session: Session) -> list[str]:
        names = super()._others_online(session)
        names.extend(r.username for k, r in self.remote.items() if k != session.key and k not in self.online)
        return names

    def _find_online(self, key: str) -> Session | store.RemoteUser | None:
        return self.online.get(key) or self.remote.get(key)

    # --- logging in and going online ---------------------------------------------
    def _claim(self, session: Session, new_user: bool, out: Effects) -> Ask | None:
        if session.claimed:
            self._take_over(session, new_user, out)
            return None
        return Ask(store.ClaimSession(session.cid, session.key, self._token_of(session)),
                   lambda s, result, o: self._claimed(s, result, new_user, o))

    def _claimed(self, session: Session, result: store.Result, new_user: bool, out: Effects) -> Ask | None:
        if result is not store.CLAIMED:
            raise Refused(Error.INTERNAL, "the session could not be stored; try again")
        session.claimed = True
        if session.kicked:   # replaced elsewhere before this answer came: the token is not ours
            session.claimed = False
            self._say_bye(session, ByeReason.REPLACED, out)
            return None
        if session.state is State.CLOSED:
            out.append(store.Logout(0, session.key, self._token_of(session)))
            session.claimed = False
            return None
        return self._claim(session, new_user, out)

    def _release(self, session: Session, out: Effects) -> None:
        if session.claimed:
            session.claimed = False
            out.append(store.Logout(0, session.key, self._token_of(session)))   # offline on every node

    def _go_online(self, session: Session, out: Effects) -> Ask:
        public_key = session.public_key
        record = framing.encode_body({"username": session.username, "token": self._token_of(session),
                                      "public_key": public_key.key_form,
                                      "fingerprint": public_key.fingerprint}).decode("utf-8")
        return Ask(store.GoOnline(session.cid, session.key, self._token_of(session), record,
                                  self._recent_count(session), session.since or ""), self._went_online)

    def _went_online(self, session: Session, result: store.Result, out: Effects) -> None:
        if session.state is State.CLOSED:
            return
        if not isinstance(result, store.WentOnline):
            raise Refused(Error.INTERNAL, "could not go online; try again")
        if result.position is None:   # replaced by a login elsewhere: its kick is on the way
            session.claimed = False
            self._say_bye(session, ByeReason.REPLACED, out)
            return
        session.online_id = result.position
        if result.position > self._newest_online:
            self._newest_online = result.position
        self._reply(session, self._names_reply(Op.KEY, session, fingerprint=session.public_key.fingerprint), out)
        for pending in result.pending:   # the PMs kept while it was offline (section 5), taken by GoOnline
            self._reply(session, pending, out)
        self._send_recent(session, result.recent, out)
        self.online[session.key] = session
        self.remote.pop(session.key, None)
        self._online_changed()
        out.append(Online(session.key, session.cid))
        # Broadcasts stored after it came online but read before this answer: after the KEY
        # reply and the recent BMs, which are older.
        for bm_position, sender, frame in self._recent_bm:
            if bm_position > session.online_id and sender != session.key:
                self._emit(session, Deliver([session.key], frame), out)

    def _announce_offline(self, session: Session, out: Effects) -> None:
        """Others hear it from the store's presence event."""

    # --- messages: the store delivers ------------------------------------------------
    def _bm_stored(self, session: Session, owners: tuple, version: int, frame: bytes, ts: str,
                   result: store.Result, out: Effects) -> None:
        if not isinstance(result, store.Appended):
            raise Refused(Error.INTERNAL, "the message could not be stored")
        out.append(Send(session.cid, ok(Op.SEND, recipients=result.recipients, ts=ts)))

    def _pm_request(self, session: Session, target, request: store.AppendHistory) -> store.AppendHistory:
        target_token = target.token if isinstance(target, store.RemoteUser) else self._token_of(target)
        return request._replace(token=self._token_of(session), target_token=target_token)

    def _pm_stored(self, session: Session, target, frame: bytes, result: store.Result, out: Effects) -> None:
        _check_id(session, result)
        if not isinstance(result, store.Appended):
            raise Refused(Error.INTERNAL, "the message could not be stored")
        if result.target_gone:
            raise Refused(Error.NOT_ONLINE, "the recipient is not online any more")
        out.append(Send(session.cid, ok(Op.SEND, recipients=result.recipients)))

    # --- what the other nodes did --------------------------------------------------
    def cluster_event(self, event: store.ClusterEvent) -> Effects:
        """One cluster event, in the store's order."""
        out: Effects = []
        if isinstance(event, store.Broadcast):
            self._recent_bm.append((event.position, event.sender, event.frame))
            self._deliver_event(event.position, event.sender, event.frame, out)
        elif isinstance(event, store.Presence):
            self._presence(event, out)
        elif isinstance(event, store.Direct):
            session = self.online.get(event.key)
            if session is not None and self._token_of(session) == event.token:
                out.append(Deliver([session.key], event.frame))
        elif isinstance(event, store.Kick):
            self._kicked(event, out)
        elif isinstance(event, store.Dropped):
            self._drop_all(event.reason, out)
        elif isinstance(event, store.Joined):
            self.node = event.node
            self.remote = dict(event.remote)
        elif isinstance(event, store.ModerationEvent):
            self._sanction(event.record, out)
        return out

    def _enforce(self, record: store.ModRecord, out: Effects) -> None:
        """Every node, this one included, enforces it when the store's event arrives."""

    def _kicked(self, event: store.Kick, out: Effects) -> None:
        session = self.logged_in.get(event.key)
        if session is not None and self._token_of(session) == event.token:
            session.claimed = False   # the token is someone else's now: no logout
            self._say_bye(session, ByeReason.REPLACED, out)
            return
        # The kick can overtake the answer to the session's own claim (two links).
        node, _, cid = event.token.rpartition("/")
        early = self.sessions.get(int(cid)) if node == self.node and cid.isdigit() else None
        if early is not None and early.key == event.key and not early.claimed:
            early.kicked = True

    def _presence(self, event: store.Presence, out: Effects) -> None:
        key, token = event.key, event.token
        local = self.online.get(key)
        mine = local is not None and self._token_of(local) == token
        if event.online:
            if event.user is None:
                return
            if not mine:
                self.remote[key] = event.user
            spelling = event.user.username
        else:
            remote = self.remote.get(key)
            if remote is not None and remote.token == token:
                del self.remote[key]
            spelling = remote.username if remote is not None else (local.username if local else key)
            if mine and local is not None:   # our own session was logged out by another node (a reap)
                local.claimed = False
                self._say_bye(local, ByeReason.SHUTDOWN, out)
        self._deliver_event(event.position, key, presence_frame(spelling, event.online, self.clock()), out)

    def _deliver_event(self, position: store.Position, sender: str, frame: bytes, out: Effects) -> None:
        """An event's frame to every local session but the sender's that came online before it."""
        if position > self._newest_online:   # the common case: all of them
            out.append(DeliverAll(frame, sender))
            return
        users = [k for k, s in self.online.items() if k != sender and s.online_id < position]
        if users:
            out.append(Deliver(users, frame))

    def _drop_all(self, reason: str, out: Effects) -> None:
        """Close every connection (this node lost the store)."""
        for session in list(self.sessions.values()):
            if session.state is State.CLOSED:
                continue
            session.claimed = False   # the store is gone or has reaped us: nothing to log out
            self._say_bye(session, ByeReason(reason), out)
        self.remote.clear()


def make_room(server_keys: pg3lib.KeyPair, *, node: str = "", **options) -> Room:
    """The room for a store: one process (``node`` "") or a node of several."""
    if node:
        return SharedRoom(server_keys, node=node, **options)
    return Room(server_keys, **options)


# --- the transition table -------------------------------------------------------

class Transition(NamedTuple):
    handler: Callable
    next_state: State                # where a successful request leads
    on_fail: State | None = None  # where a refusal leads (None: the state stays)
    keeps_on: frozenset = frozenset()   # refusals with these codes leave the state as it is


_SEND_KEEPS = frozenset({Error.BAD_REQUEST})   # section 4.4: the client may send again or CANCEL

TRANSITIONS: dict[State, dict[str, Transition]] = {
    State.AWAIT_USERNAME: {Op.LOGIN: Transition(Room._login, State.AWAIT_PASSWORD)},
    State.AWAIT_PASSWORD: {Op.PASSWORD: Transition(Room._password, State.AWAIT_KEY)},
    State.AWAIT_KEY: {Op.KEY: Transition(Room._key, State.READY)},
    State.READY: {Op.BM: Transition(Room._bm, State.AWAIT_BM_TEXT),
                  Op.PM: Transition(Room._pm, State.AWAIT_PM_TARGET),
                  Op.CH: Transition(Room._ch, State.READY),
                  Op.EX: Transition(Room._ex, State.CLOSED),
                  Op.MOD: Transition(Room._mod, State.READY)},   # section 10, moderation
    State.AWAIT_BM_TEXT: {Op.SEND: Transition(Room._bm_send, State.READY, State.READY, _SEND_KEEPS),
                          Op.CANCEL: Transition(Room._cancel, State.READY)},
    State.AWAIT_PM_TARGET: {Op.TARGET: Transition(Room._pm_target, State.AWAIT_PM_TEXT, State.READY),
                            Op.CANCEL: Transition(Room._cancel, State.READY)},
    State.AWAIT_PM_TEXT: {Op.SEND: Transition(Room._pm_send, State.READY, State.READY, _SEND_KEEPS),
                          Op.CANCEL: Transition(Room._cancel, State.READY)},
    State.CLOSED: {},
}


def _expected(state: State) -> str:
    ops = sorted(TRANSITIONS[state])
    if not ops:
        return "the connection is closing"
    return "expected " + (ops[0] if len(ops) == 1 else "one of " + ", ".join(ops)) + \
        f" in state {state.value}"


__all__ = [
    "REQUESTS", "TRANSITIONS", "Ask", "Audit", "CheckPassword", "Close", "Deliver", "DeliverAll", "LoginThrottle",
    "Malformed", "Offline", "OfflineTarget", "Online", "Page", "Pages", "Refused", "Room", "Send", "Session",
    "SharedRoom", "State", "Transition",
    "make_room",
]
