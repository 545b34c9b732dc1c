"""The store seam: what the session logic asks of storage, what it gets back, and the interface.

The session logic (``state.Room``) never touches files or Redis. It asks for
storage with the *requests* below, returned among its effects; the server
hands each to its one store (``submit``) and feeds every answer back
(``Room.completed``) in the order the requests were made. A reply that depends
on storage waits for that answer.

Each request has one typed *result*, and every request has the same one
failure value, ``FAILED`` (the store could not do it: a disk or Redis error);
a session answers a ``FAILED`` with ``internal``. ``Logout`` is not answered.
Moderation (docs/PROTOCOL.md section 10) is three requests: ``Moderate`` (journal
and apply an action), ``LoadSanctions`` (an account's ban and mute, at login) and
``ListSanctions``.

Two stores implement ``Store``: ``storage.FileStore`` (the data directory, one
process) and ``redisstore.RedisStore`` (several nodes on one Redis,
docs/SCALEOUT.md). A store of several nodes also reports *cluster events*
(other nodes' broadcasts, presence, private messages and kicks, and changes
in its own membership); the file store has none. Positions in the event order
are opaque, comparable values; only the store that made them knows their
form.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple, Protocol, Union

from passwords import Account

# A place in a store's event order, comparable with <; (0, 0) is before every event.
Position = tuple[int, int]
START: Position = (0, 0)


# --- requests -----------------------------------------------------------------

class LoadAccount(NamedTuple):
    """Read an account. Result: ``AccountLoaded``."""
    cid: int
    key: str   # the lower-case name


class CreateAccount(NamedTuple):
    """Store a new account durably (and create its history). Result: ``AccountCreated``."""
    cid: int
    account: Account


class PmId(NamedTuple):
    """A version-2 PM's id, as a store checks it (docs/PROTOCOL.md section 4.5): the room refuses
    an id its sender has used, for as long as a replay would be accepted, across restarts and
    whichever node it comes through (the rule of ``pmguard.UsedIds``). ``now`` is the session
    logic's clock."""
    sender: str     # lower-case account name
    id: str
    sent_at: float  # the time ``sent`` names
    now: float


class AppendHistory(NamedTuple):
    """Store a message in the history of each of its owners (registered spellings). Result: ``Appended``.

    ``entries`` is a list of ``(owners, line)``; a BM's owners are the room's
    online snapshot (the sender and everyone it reaches). A store keeps a BM
    once, in the room's log, and it is in the history of everyone online then
    (``MarkOnline``); a PM's two lines go to the two histories, the sender's
    first. If the sender's copy cannot be stored the message is stored for
    nobody (the sender is told ``internal`` and may send it again).
    A store of several nodes also delivers the message: ``frame`` is the data
    frame for the recipients, ``target`` the PM target's key, and the tokens
    are the sessions it checks (the sender's, and the target's for a PM).
    A PM2 carries its ``pm_id``: an id used before gets ``IdRefused``, and nothing is stored.
    """
    cid: int
    entries: list
    sender: str
    kind: str = ""          # "BM" or "PM"
    frame: bytes = b""
    target: str = ""
    token: str = ""
    target_token: str = ""
    pm_id: PmId | None = None


class ReadHistory(NamedTuple):
    """Read a user's history entries (JSON texts), oldest first. Result: ``HistoryRead``.

    A history is the user's PMs and the room's BMs stored while the user was
    online (between its ``MarkOnline`` marks, or a store of several nodes' own
    presence), merged in the order they were stored.
    """
    cid: int
    username: str
    limit: int | None = None   # only the newest entries (a store may use it to read less)


class MarkOnline(NamedTuple):
    """Record that the user (registered spelling) came online (``online``) or went offline. Not answered (cid 0).

    The BMs stored between the two marks are in the user's history. A store
    of one process needs this; a store of several nodes marks presence itself
    (``GoOnline``, ``Logout``).
    """
    cid: int
    username: str
    online: bool


class ClaimSession(NamedTuple):
    """Make ``token`` the account's one session everywhere (others are kicked). Result: ``CLAIMED``."""
    cid: int
    key: str
    token: str


class GoOnline(NamedTuple):
    """Put the session online if ``token`` is still the account's session. Result: ``WentOnline``.

    In the same step it takes the PMs kept for the account and reads the room's
    newest ``recent`` BMs (of those, only the ones whose ``ts`` is ``since`` or
    later, if given; BMs are not stored quite in ``ts`` order, see
    ``protocol.TS_ORDER_SLACK``): every BM is either among those or stored
    after the session came online (and so delivered to it live).
    """
    cid: int
    key: str
    token: str
    record: str   # JSON: username, token, public_key, fingerprint (other nodes answer TARGET with it)
    recent: int = 0
    since: str = ""


class Logout(NamedTuple):
    """End the session ``token`` if it is still the account's. Not answered (cid 0)."""
    cid: int
    key: str
    token: str


# --- moderation (docs/PROTOCOL.md section 10) ---------------------------------------

class ModRecord(NamedTuple):
    """One moderation action, as journalled and as a ban or mute is kept: what, on whom, by whom.

    ``until`` is a wall-clock time (``time.time``), None for good (and for the actions
    that last no time: kick, unban, unmute); ``at`` is when the action was taken.
    """
    action: str      # protocol.ModAction value: kick, ban, unban, mute, unmute
    username: str    # the registered spelling of the account acted on
    by: str          # the admin's registered spelling
    until: float | None
    reason: str
    at: float

    @property
    def key(self) -> str:
        return self.username.lower()

    def to_json(self) -> str:
        return json.dumps(self._asdict(), separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> ModRecord:
        """Raises: ValueError: not a record."""
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("not an object")
        until = raw.get("until")
        try:
            record = cls(str(raw["action"]), str(raw["username"]), str(raw["by"]),
                         None if until is None else float(until), str(raw.get("reason", "")), float(raw["at"]))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a moderation record ({exc})") from None
        return record


class LoadSanctions(NamedTuple):
    """The account's ban and mute, if any (expired ones included). Result: ``SanctionsLoaded``."""
    cid: int
    key: str


class ListSanctions(NamedTuple):
    """Every ban and mute kept (expired ones may be included). Result: ``SanctionsListed``."""
    cid: int


class Moderate(NamedTuple):
    """Journal an action durably and apply it: a ban or mute replaces the account's, an unban or
    unmute clears it (only if one is in force at ``record.at``), a kick changes nothing kept.
    A store of several nodes also tells every node (cluster event ``ModerationEvent``).
    Result: ``ModerationStored``."""
    cid: int
    record: ModRecord


# --- offline PMs (docs/PROTOCOL.md sections 4.5 and 5) ----------------------------------

class SaveKey(NamedTuple):
    """Remember durably the key the account (registered spelling) gave in KEY: its *last key*,
    which TARGET gives out for it while it is offline. Result: ``KEY_SAVED``."""
    cid: int
    key: str
    username: str
    key_form: str


class LoadLastKey(NamedTuple):
    """The account's registered spelling and its last key. Result: ``LastKey``."""
    cid: int
    key: str


class StoreOfflinePM(NamedTuple):
    """A PM for a target that is offline: in both histories (as ``AppendHistory``), and kept for
    the target (``offline_frame``, the ``D PM`` with ``"offline":true``) until its next login,
    unless ``limit`` PMs are kept for it already, or ``sender_limit`` (if not 0) of them are
    this sender's. Result: ``Appended`` (``full``: at a bound, nothing stored; ``sender_full``:
    the sender's). A store of several nodes decides presence itself: if the target is online
    after all, it delivers ``frame`` live instead (``recipients`` 1). ``pm_id`` as for
    ``AppendHistory`` (checked after the bound: a PM refused as ``full`` does not use its id).
    """
    cid: int
    entries: list          # (owners, line), the sender's first, as for a PM's AppendHistory
    sender: str
    target: str            # registered spelling
    frame: bytes
    offline_frame: bytes
    limit: int
    token: str = ""        # the sender's session (a store of several nodes checks it)
    pm_id: PmId | None = None
    sender_limit: int = 0  # of the ``limit``, at most this many from one sender (0: no share)


class TakeOffline(NamedTuple):
    """Take the PMs kept for the user (registered spelling), oldest first, once: a store hands
    each to one login only; and read the room's newest ``recent`` BMs (of those, the ones whose
    ``ts`` is ``since`` or later, if given, as in ``GoOnline``), stored before this request (the user is online from its
    ``MarkOnline``, asked for just before, so later BMs reach it live). Result:
    ``OfflineTaken``. (A store of several nodes does both in ``GoOnline`` instead, see
    ``WentOnline``.)"""
    cid: int
    username: str
    recent: int = 0
    since: str = ""


Request = Union[LoadAccount, CreateAccount, AppendHistory, ReadHistory, MarkOnline, ClaimSession, GoOnline, Logout,
                LoadSanctions, ListSanctions, Moderate, SaveKey, LoadLastKey, StoreOfflinePM, TakeOffline]
REQUESTS = (LoadAccount, CreateAccount, AppendHistory, ReadHistory, MarkOnline, ClaimSession, GoOnline, Logout,
            LoadSanctions, ListSanctions, Moderate, SaveKey, LoadLastKey, StoreOfflinePM, TakeOffline)


# --- results ------------------------------------------------------------------

class Failed:
    """The one failure value: the store could not carry the request out."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "FAILED"


FAILED = Failed()


class AccountLoaded(NamedTuple):
    account: Account | None   # None: no such account


class AccountCreated(NamedTuple):
    created: bool   # False: someone registered the name first (nothing was written)


class Appended(NamedTuple):
    """Written. ``failed``: owners whose history could not be written (never the sender).

    A store of several nodes delivers too, and counts the ``recipients``; there,
    ``target_gone`` says that a PM's target had left (nothing was stored).
    ``full``: a ``StoreOfflinePM`` found its bound reached (nothing was stored);
    ``sender_full``: and it was the sender's share of it.
    """
    failed: frozenset = frozenset()
    recipients: int | None = None
    target_gone: bool = False
    full: bool = False
    sender_full: bool = False


class IdRefused(NamedTuple):
    """A PM2 whose id its sender has used (or whose ``sent`` is at or before the sender's
    floor): nothing was stored. ``reason`` is the text for the sender (``bad_request``)."""
    reason: str


PAUSE = None   # in a HistoryRead's lines: nothing now, the rest in a later pass (a long read yields)


class _Wait:
    __slots__ = ()

    def __repr__(self) -> str:
        return "WAIT"


# In a HistoryRead's lines: nothing until the store has read more (a read over the network).
# The store's own answer wakes the loop; the reader is asked again in the pass it comes in,
# and not polled meanwhile.
WAIT = _Wait()


class HistoryRead(NamedTuple):
    """A user's history: its JSON entry texts, oldest first, at most the limit asked for.
    ``lines`` is a list, or an iterator read as the CH pages are taken (in the loop thread;
    a whole history need not fit in memory); an iterator may yield PAUSE or WAIT between
    entries, and may raise OSError (the pages end there). Whoever stops taking from an
    iterator before its end calls its ``close()``, if it has one (it may hold a ``ReadSlots``
    slot)."""
    lines: Iterable


class ReadSlots:
    """How many histories may be read lazily at once (each holds descriptors or buffered
    pieces while its client takes its pages): past ``limit``, a read waits its turn, oldest
    first, and is started when one ends. Both stores gate their lazy reads with it, so many
    clients asking for CH at once cost a bounded number of files and bytes, not one set each.
    """

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self.reading = 0
        self._queue: collections.deque[list] = collections.deque()   # [start] of each read waiting
        self.woken = False   # a waiting read was let in since the owner last looked

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def enter(self, start: Callable[[], None] | None = None) -> list:
        """A read asks for a slot: the ticket returned is ``[True]`` once it has one (at once if
        one is free and nobody waits), and ``start()`` (if given) is called then."""
        if self.reading < self.limit and not self._queue:
            self.reading += 1
            if start is not None:
                start()
            return [True]
        ticket = [False, start]
        self._queue.append(ticket)
        return ticket

    def leave(self, ticket: list) -> None:
        """The read of ``ticket`` has ended (or was dropped while it waited): the next one in."""
        if ticket[0] is False:
            self._queue.remove(ticket)
            ticket[0] = ticket[1] = None
            return
        if ticket[0] is None:
            return   # left already
        ticket[0] = None
        self.reading -= 1
        while self._queue and self.reading < self.limit:
            waiting = self._queue.popleft()
            start, waiting[0], waiting[1] = waiting[1], True, None   # (no cycle through the reader left)
            self.reading += 1
            self.woken = True
            if start is not None:
                start()


class SlotRead:
    """A lazy history read gated by ``ReadSlots``: ``WAIT`` until it has its slot, then the
    lines of ``open_lines()`` (called then; at once if a slot is free, so that a store can
    answer a read it cannot open with ``FAILED``: see ``open_now``). The slot is given back
    at the end, on an error, on ``close()``, or when the read is dropped."""

    def __init__(self, slots: ReadSlots, open_lines: Callable[[], Iterator]) -> None:
        self._slots, self._open = slots, open_lines
        self._ticket: list | None = slots.enter()
        self._lines: Iterator | None = None

    def open_now(self) -> None:
        """Open it now if its slot is free (else it opens when let in).

        Raises:
            OSError: it could not be opened (its slot is given back).
        """
        if self._ticket is not None and self._ticket[0] is True and self._lines is None:
            try:
                self._lines = self._open()
            except BaseException:
                self.close()
                raise

    def __iter__(self) -> SlotRead:
        return self

    def __next__(self):
        if self._lines is None:
            if self._ticket is None:
                raise StopIteration
            if self._ticket[0] is False:
                return WAIT
            self.open_now()
        try:
            return next(self._lines)   # type: ignore[arg-type]
        except BaseException:   # its end (StopIteration), or an error that ends the pages
            self.close()
            raise

    def close(self) -> None:
        lines, self._lines = self._lines, None
        ticket, self._ticket = self._ticket, None
        try:
            close = getattr(lines, "close", None)
            if close is not None:
                close()
        finally:
            if ticket is not None:
                self._slots.leave(ticket)

    def __del__(self) -> None:
        self.close()


class Claimed:
    """The session's token is the account's now."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "CLAIMED"


CLAIMED = Claimed()


class WentOnline(NamedTuple):
    position: Position | None   # where its coming online is in the event order; None: replaced meanwhile
    pending: tuple = ()         # the data frames of the PMs kept for it, taken (a store of several nodes)
    recent: tuple = ()          # the room's newest BMs before it came online (JSON texts), oldest first


class KeySaved:
    """The account's last key is stored."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "KEY_SAVED"


KEY_SAVED = KeySaved()


class LastKey(NamedTuple):
    username: str | None    # the registered spelling; None: no such account
    key_form: str | None    # the last key given in KEY; None: it never completed KEY


class OfflineTaken(NamedTuple):
    frames: list         # the data frames (bytes) of the PMs kept for the user, oldest first
    recent: tuple = ()   # the room's newest BMs (JSON texts), oldest first


class SanctionsLoaded(NamedTuple):
    ban: ModRecord | None
    mute: ModRecord | None


class SanctionsListed(NamedTuple):
    records: list   # ModRecord: bans and mutes, in no particular order


class ModerationStored(NamedTuple):
    applied: bool   # False: an unban or unmute found nothing in force (nothing was written)


Result = Union[Failed, AccountLoaded, AccountCreated, Appended, IdRefused, HistoryRead, Claimed, WentOnline,
               SanctionsLoaded, SanctionsListed, ModerationStored, KeySaved, LastKey, OfflineTaken]


# --- cluster events (stores of several nodes only) -----------------------------------

class RemoteUser(NamedTuple):
    """A user online on another node, as its coming online described it."""
    key: str
    username: str
    token: str
    key_form: str
    fingerprint: str


class Broadcast(NamedTuple):
    """A BM stored by any node: local users online before it get the frame."""
    position: Position
    sender: str   # key
    frame: bytes


class Presence(NamedTuple):
    """A session came online (``user`` describes it) or went offline, on any node."""
    position: Position
    key: str
    token: str
    online: bool
    user: RemoteUser | None = None


class Direct(NamedTuple):
    """A PM for the local session ``token`` of ``key``."""
    key: str
    token: str
    frame: bytes


class Kick(NamedTuple):
    """The local session ``token`` of ``key`` was replaced by a login on another node."""
    key: str
    token: str


class Dropped(NamedTuple):
    """This node lost the store (fenced or cut off): every connection must close."""
    reason: str


class Joined(NamedTuple):
    """This node (again) is ``node`` of the room; ``remote`` is who is online on other nodes."""
    node: str
    remote: dict   # key -> RemoteUser


class ModerationEvent(NamedTuple):
    """A moderation action stored by any node: each node enforces it on its own users and tells them."""
    record: ModRecord


ClusterEvent = Union[Broadcast, Presence, Direct, Kick, Dropped, Joined, ModerationEvent]


# --- the interface ------------------------------------------------------------

class Store(Protocol):
    """What the server calls on its store, whichever it is."""

    # "" for a store of one process; else this node's name (tokens start with it).
    node: str

    @property
    def pending(self) -> bool:
        """True while answers are waiting to be collected with ``flush``."""

    def submit(self, request: Request) -> None:
        """Take one request; its answer comes from a later ``flush`` (or the same pass's)."""

    def flush(self) -> list[tuple[int, Result]]:
        """Carry out what can be done now; the answers ready, ``(cid, result)``, in request order."""

    def events(self) -> list[ClusterEvent]:
        """Cluster events read since the last call, in the store's order (none for one process)."""

    def tick(self, now: float) -> None:
        """Timers (``now`` from ``time.monotonic``): leases, stalls, reconnecting."""

    def next_tick(self) -> float | None:
        """When ``tick`` wants to run next (monotonic), or None."""

    def send(self) -> None:
        """Send what this pass asked for (a store that answers at once has nothing to send)."""

    def close(self) -> None:
        """Release files and connections."""
