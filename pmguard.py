"""What the server checks of a version-2 PM before it relays it (docs/PROTOCOL.md section 4.5). No I/O.

The signature itself is checked by the session logic (``state.py``) with
``pg3lib.pm2_signed_bytes``; this module owns the rest: the shape of ``id``,
the clock window of ``sent``, and the memory of the ids each sender has used.

The memory. A PM whose ``sent`` is more than ``PM_CLOCK_WINDOW`` from the
server's clock is refused anyway, so an id needs remembering only until its
``sent`` plus the window; after that a replay is refused as stale. Memory per
sender is bounded (``PM_IDS_PER_SENDER``): when it is full the id with the
oldest ``sent`` is forgotten and that ``sent`` becomes the sender's *floor*;
a PM sent no later than the floor is refused from then on, so a replay of a
forgotten id is still caught (at the cost of refusing a genuine PM whose
``sent`` is older than the sender's last 256, which a real client never makes).
The memory belongs to the room's store (``store.PmId``): the file store keeps a
``UsedIds`` and fills it again at start from ``pm-ids.<N>.log`` (the ids of the
last minutes' PMs, written with their histories), so it survives a restart; the Redis store keeps the same rule in
Redis (``redis_scripts.py``), shared by every node.
"""

from __future__ import annotations

import heapq

import pg3lib
from protocol import PM_CLOCK_WINDOW, PM_ID_BYTES, PM_IDS_PER_SENDER, parse_timestamp

SWEEP_EVERY = 60.0   # seconds between sweeps of senders whose ids have all expired
USED = "this id was used before: a PM is sent once (a new PM needs a new id)"
BELOW_FLOOR = "'sent' is older than this sender's recent PMs (check this computer's clock)"


def id_problem(pm_id: str) -> str | None:
    """Why ``id`` is not acceptable (not the base64 of 16 bytes), or None."""
    try:
        raw = pg3lib.b64decode_strict(pm_id)
    except (ValueError, UnicodeError, TypeError):
        return "'id' must be standard base64"
    if len(raw) != PM_ID_BYTES:
        return f"'id' must be the base64 of {PM_ID_BYTES} bytes (this one holds {len(raw)})"
    return None


def sent_time(sent: str, now: float) -> float:
    """The time ``sent`` names.

    Raises:
        ValueError: not in the ``ts`` format, or more than the window from ``now``.
    """
    when = parse_timestamp(sent)
    if when is None:
        raise ValueError("'sent' must be UTC in the ts format, e.g. 2026-12-02T15:04:05.123Z")
    if abs(when - now) > PM_CLOCK_WINDOW:
        raise ValueError(f"'sent' is more than {int(PM_CLOCK_WINDOW // 60)} minutes from the server's clock "
                         "(check this computer's clock)")
    return when


class _SenderIds:
    __slots__ = ("ids", "by_time", "floor")

    def __init__(self) -> None:
        self.ids: set[str] = set()
        self.by_time: list[tuple[float, str]] = []   # heap of (sent, id)
        self.floor = float("-inf")                    # PMs sent no later than this are refused


class UsedIds:
    """The PM ids each sender has used, for as long as a replay of them would be accepted."""

    def __init__(self, window: float = PM_CLOCK_WINDOW, per_sender: int = PM_IDS_PER_SENDER) -> None:
        self.window = window
        self.per_sender = per_sender
        self._senders: dict[str, _SenderIds] = {}
        self._next_sweep = 0.0

    def use(self, sender: str, pm_id: str, sent_at: float, now: float) -> str | None:
        """Record that sender (a lower-case account name) used pm_id; why not, if it may not."""
        seen = self._senders.get(sender)
        if seen is None:
            seen = self._senders[sender] = _SenderIds()
        else:
            self._expire(seen, now)
        if pm_id in seen.ids:
            return USED
        if sent_at <= seen.floor:
            return BELOW_FLOOR
        seen.ids.add(pm_id)
        heapq.heappush(seen.by_time, (sent_at, pm_id))
        if len(seen.ids) > self.per_sender:
            oldest, forgotten = heapq.heappop(seen.by_time)
            seen.ids.discard(forgotten)
            seen.floor = max(seen.floor, oldest)
        return None

    def _expire(self, seen: _SenderIds, now: float) -> None:
        heap = seen.by_time
        while heap and heap[0][0] + self.window < now:
            seen.ids.discard(heapq.heappop(heap)[1])

    def sweep(self, now: float) -> None:
        """Forget senders with nothing left to remember (at most once a minute; cheap to call often)."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + SWEEP_EVERY
        for sender in list(self._senders):
            seen = self._senders[sender]
            self._expire(seen, now)
            if not seen.ids and seen.floor + self.window < now:
                del self._senders[sender]

    def __len__(self) -> int:
        """How many ids are remembered, all senders."""
        return sum(len(seen.ids) for seen in self._senders.values())
