"""Moderation's rules, without I/O (docs/PROTOCOL.md section 10): what a MOD request says, whether
a ban or mute is in force, and the sentences both ends show.

The session logic (``state.Room``) decides who may do what and asks the store
(``store.Moderate``, ``store.LoadSanctions``, ``store.ListSanctions``); this
module holds what it and the client share: checking a request's members,
durations (``10m``, ``2h``, ``1d``) both ways, and the texts of the NOTICE
frame, the BYE message and the refusals, so the server and the client word
them alike. Times are wall-clock seconds (``time.time``); on the wire they are
``ts`` strings (``protocol.timestamp``), ``null`` for good.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from protocol import MAX_REASON_CHARS, MAX_SANCTION_SECONDS, ModAction, timestamp, valid_username

# Actions that act on an account (all but the listing) and those that take a time.
ON_A_USER = (ModAction.KICK, ModAction.BAN, ModAction.UNBAN, ModAction.MUTE, ModAction.UNMUTE)
TIMED = (ModAction.BAN, ModAction.MUTE)
# Acting on another admin this way needs "confirm": true (a typo must not lock an admin out).
NEEDS_CONFIRM = (ModAction.KICK, ModAction.BAN, ModAction.MUTE)
PAST = {ModAction.KICK: "kicked", ModAction.BAN: "banned", ModAction.UNBAN: "unbanned",
        ModAction.MUTE: "muted", ModAction.UNMUTE: "unmuted"}
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(\d{1,9})([smhdw]?)\Z")


class ModRequest(NamedTuple):
    """A checked MOD request."""
    action: ModAction
    username: str          # as typed ("" for bans)
    seconds: int | None    # None: for good (or no time at all)
    reason: str
    confirm: bool


def parse_request(body: dict) -> ModRequest:
    """The MOD request a body holds.

    Raises:
        ValueError: a member is missing, of the wrong type or out of range (the message says which).
    """
    try:
        action = ModAction(body.get("action"))
    except ValueError:
        raise ValueError("'action' must be one of " + ", ".join(a.value for a in ModAction)) from None
    if action is ModAction.BANS:
        return ModRequest(action, "", None, "", False)
    username = body.get("username")
    if not isinstance(username, str) or not valid_username(username):
        raise ValueError("'username' must be a username")
    seconds = body.get("seconds")
    if seconds is not None:
        if action not in TIMED:
            raise ValueError(f"'seconds' is for ban and mute, not {action.value}")
        if type(seconds) is not int or not 0 < seconds <= MAX_SANCTION_SECONDS:
            raise ValueError(f"'seconds' must be a whole number from 1 to {MAX_SANCTION_SECONDS} "
                             "(leave it out for good)")
    reason = body.get("reason", "")
    if reason is None:
        reason = ""
    if not isinstance(reason, str) or len(reason) > MAX_REASON_CHARS:
        raise ValueError(f"'reason' must be a string of at most {MAX_REASON_CHARS} characters")
    confirm = body.get("confirm", False)
    if not isinstance(confirm, bool):
        raise ValueError("'confirm' must be true or false")
    return ModRequest(action, username, seconds, " ".join(reason.split()), confirm)


def in_force(until: float | None, now: float) -> bool:
    """A ban or mute until this time (None: for good) still holds at now."""
    return until is None or until > now


# --- durations ------------------------------------------------------------------------

def parse_duration(text: str) -> int:
    """Seconds in ``30s``, ``10m``, ``2h``, ``1d``, ``1w`` (a bare number is seconds).

    Raises:
        ValueError: not a duration, zero, or over the limit.
    """
    match = _DURATION.match(text.strip().lower())
    if not match:
        raise ValueError(f"{text!r} is not a duration (like 30s, 10m, 2h, 1d, 1w)")
    seconds = int(match.group(1)) * UNITS[match.group(2) or "s"]
    if not 0 < seconds <= MAX_SANCTION_SECONDS:
        raise ValueError(f"a duration is from 1 second to {MAX_SANCTION_SECONDS // 86400} days")
    return seconds


def format_duration(seconds: float) -> str:
    """A duration for people: ``1 h``, ``90 min``, ``2 d``, ``45 s`` (the largest unit that divides it)."""
    whole = max(1, int(round(seconds)))
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if whole % size == 0:
            return f"{whole // size} {unit}"
    return f"{whole} s"


# --- what is said -----------------------------------------------------------------------

def until_ts(until: float | None) -> str | None:
    """The wire form of an end time: a ``ts``, or None (JSON null) for good."""
    return None if until is None else timestamp(until)


def span_text(action: str, until: float | None, at: float) -> str:
    """`` for 1 h`` / `` for good`` after a ban or mute; nothing for the other actions."""
    if action not in TIMED:
        return ""
    return " for good" if until is None else f" for {format_duration(until - at)}"


def notice_text(action: str, username: str, by: str, until: float | None, reason: str, at: float) -> str:
    """The NOTICE text: ``alice banned bob for 1 h: spam``."""
    text = f"{by} {PAST.get(ModAction(action), action)} {username}{span_text(action, until, at)}"
    return f"{text}: {reason}" if reason else text


def sanction_text(kind: str, by: str, until: float | None, reason: str) -> str:
    """Why a login or a BM is refused: ``banned until 2026-12-02T16:04:05.000Z by alice: spam``."""
    when = "for good" if until is None else f"until {timestamp(until)}"
    text = f"{kind} {when} by {by}"
    return f"{text}: {reason}" if reason else text
