"""pmguard.py: the PM2 id and clock checks, and the bounded memory of used ids (docs/PROTOCOL.md section 4.5)."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

import pmguard
import protocol

T0 = 1_800_000_000.0


def an_id(n: int) -> str:
    return base64.b64encode(n.to_bytes(protocol.PM_ID_BYTES, "big")).decode()


def test_id_must_be_base64_of_16_bytes():
    assert pmguard.id_problem(an_id(1)) is None
    for bad in ("", "AAAA", base64.b64encode(bytes(15)).decode(), base64.b64encode(bytes(17)).decode(),
                an_id(1).rstrip("="), an_id(1).replace("A", "-"), " " + an_id(1), "é" * 24):
        assert pmguard.id_problem(bad), bad


def test_sent_window_is_ten_minutes_either_way():
    assert protocol.PM_CLOCK_WINDOW == 600
    for offset in (-600, -1, 0, 1, 599.999, 600):
        when = pmguard.sent_time(protocol.timestamp(T0 + offset), T0)
        assert abs(when - (T0 + offset)) < 0.002
    for offset in (-600.01, 600.01, -86400, 1e9):
        with pytest.raises(ValueError, match="minutes"):
            pmguard.sent_time(protocol.timestamp(T0 + offset), T0)
    for bad in ("2026-12-02T15:04:05Z", "2026-12-02T15:04:05.123", "2026-12-02 15:04:05.123Z",
                "2026-13-02T15:04:05.123Z", "2026-02-30T15:04:05.123Z", "2026-12-02T24:00:00.000Z",
                "2026-12-02T15:04:05.123Z\n", "２026-12-02T15:04:05.123Z"):
        with pytest.raises(ValueError, match="ts format"):
            pmguard.sent_time(bad, T0)


@given(st.floats(min_value=0, max_value=4e9))
def test_parse_timestamp_inverts_timestamp(now):
    assert abs(protocol.parse_timestamp(protocol.timestamp(now)) - now) < 0.001


def test_an_id_is_used_once_per_sender():
    ids = pmguard.UsedIds()
    assert ids.use("alice", an_id(1), T0, T0) is None
    assert "used before" in ids.use("alice", an_id(1), T0, T0 + 1)
    assert ids.use("bob", an_id(1), T0, T0 + 1) is None   # another sender's ids are its own


def test_ids_are_remembered_as_long_as_their_sent_is_accepted():
    ids = pmguard.UsedIds()
    ids.use("alice", an_id(1), T0, T0)
    assert ids.use("alice", an_id(1), T0, T0 + protocol.PM_CLOCK_WINDOW) is not None   # still in the window
    # Past the window the id may be forgotten: its sent is refused by the clock check from then on.
    ids.sweep(T0 + protocol.PM_CLOCK_WINDOW + 1)
    assert len(ids) == 0 and not ids._senders


def test_memory_per_sender_is_bounded_and_a_forgotten_id_is_still_refused():
    ids = pmguard.UsedIds(per_sender=4)
    for n in range(10):
        assert ids.use("alice", an_id(n), T0 + n, T0 + n) is None
    assert len(ids) == 4
    # ids 0-5 are forgotten, but their sent is at or below the floor: a replay is refused.
    for n in range(6):
        assert "older" in ids.use("alice", an_id(n), T0 + n, T0 + 10)
    for n in range(6, 10):
        assert "used before" in ids.use("alice", an_id(n), T0 + n, T0 + 10)
    assert ids.use("alice", an_id(99), T0 + 10, T0 + 10) is None   # a new PM still goes


@given(st.lists(st.tuples(st.integers(0, 30), st.sampled_from([-1.0, 0.0, 1.0, 599.0, -599.0]),
                          st.floats(0, 50), st.booleans()), max_size=60))
def test_a_replay_is_never_accepted_within_the_window(events):
    """Whatever the order and the clocks, with a small memory: a PM accepted once (its id with its
    signed sent) is never accepted again; and until the memory first fills, an id is never reused."""
    ids = pmguard.UsedIds(per_sender=3)
    accepted: list = []
    evicted = False   # once an id has been forgotten, only its own sent (or older) is refused
    now = T0
    for n, skew, step, replay in events:
        now += step
        if replay and accepted:
            n, sent_at = accepted[n % len(accepted)]
        else:
            sent_at = now + skew
        if abs(sent_at - now) > protocol.PM_CLOCK_WINDOW:
            continue   # the clock check refuses it before the memory is asked
        ids.sweep(now)
        evicted = evicted or len(ids) >= 3
        if ids.use("alice", an_id(n), sent_at, now) is None:
            assert (n, sent_at) not in accepted
            if not evicted:
                assert n not in {m for m, s in accepted if s + protocol.PM_CLOCK_WINDOW >= now}
            accepted.append((n, sent_at))
        assert len(ids) <= 3
