"""The chat protocol's vocabulary, defined once (docs/PROTOCOL.md). No I/O.

Owns what both ends of the wire must agree on: the operation names, the error
codes of section 6 and the BYE reasons, every named limit (each with the reason
for its size), the username and password rules, the timestamp format, and the
builders of the server's reply frames. ``framing.py`` owns the frame layout;
the server, the client, the password workers, the bench and the tests import
their words and numbers from here, so none of them repeats a limit or a code.
"""

from __future__ import annotations

import calendar
import enum
import re
import time

import framing

# The version of docs/PROTOCOL.md this server speaks; the LOGIN reply says it
# (section 4.1), so a client knows PMs must carry id and sent.
PROTOCOL_VERSION = 2


class _Word(str, enum.Enum):
    """A word of the protocol: compares equal to, and prints as, its text on the wire."""

    def __str__(self) -> str:
        return self.value


class Op(_Word):
    """Request and data-frame names (sections 4 and 5)."""

    LOGIN = "LOGIN"
    PASSWORD = "PASSWORD"
    KEY = "KEY"
    BM = "BM"
    PM = "PM"
    TARGET = "TARGET"
    SEND = "SEND"
    CH = "CH"
    EX = "EX"
    CANCEL = "CANCEL"
    BYE = "BYE"
    ERROR = "ERROR"
    PRESENCE = "PRESENCE"
    MOD = "MOD"            # section 10, moderation (an extension)
    NOTICE = "NOTICE"      # section 10: a data frame telling the room what an admin did


class Error(_Word):
    """The stable error codes of section 6."""

    BAD_FRAME = "bad_frame"            # fatal
    BAD_REQUEST = "bad_request"
    UNEXPECTED = "unexpected"
    INVALID_USERNAME = "invalid_username"
    WRONG_PASSWORD = "wrong_password"
    WEAK_PASSWORD = "weak_password"
    NOT_ONLINE = "not_online"
    NO_SUCH_USER = "no_such_user"
    TLS_REQUIRED = "tls_required"      # fatal
    SERVER_BUSY = "server_busy"        # fatal
    RATE_LIMITED = "rate_limited"
    INTERNAL = "internal"
    # Section 10, moderation (an extension).
    FORBIDDEN = "forbidden"            # MOD from someone who is not an admin
    BANNED = "banned"                  # PASSWORD of a banned account (then BYE banned)
    MUTED = "muted"                    # BM SEND of a muted account
    CONFIRM_NEEDED = "confirm_needed"  # MOD on another admin without "confirm": true


class ByeReason(_Word):
    """Why the server says BYE (section 4.7)."""

    SHUTDOWN = "shutdown"
    REPLACED = "replaced"
    IDLE = "idle"
    TOO_SLOW = "too_slow"
    TOO_MANY_FAILURES = "too_many_failures"
    KICKED = "kicked"      # section 10: an admin kicked the user
    BANNED = "banned"      # section 10: an admin banned the account (or a banned account logged in)


class ModAction(_Word):
    """The ``action`` of a MOD request (section 10)."""

    KICK = "kick"
    BAN = "ban"
    UNBAN = "unban"
    MUTE = "mute"
    UNMUTE = "unmute"
    BANS = "bans"


# --- limits -------------------------------------------------------------------

# A message is at most this many characters (code points): a screenful of
# text, and small enough that a PM with both sealed copies fits one frame.
MAX_TEXT_CHARS = 4096
# What a text costs once stored and relayed: JSON escapes included (a control
# character is six bytes). 16 KiB holds 4,096 four-byte characters; it stops
# 4,096 escaped control characters (24 KB) from multiplying every history write.
MAX_STORED_TEXT_BYTES = 16384
# Wrong passwords one connection may try before BYE too_many_failures.
MAX_ATTEMPTS = 3
# The LOGIN nonce: 128 random bits make a captured PASSWORD useless elsewhere.
NONCE_BYTES = 16
# Passwords: eight characters is the usual floor; 256 bytes bounds the hash
# work and the sealed PASSWORD a client can make us open.
MIN_PASSWORD_CHARS = 8
MAX_PASSWORD_BYTES = 256
# A sealed PASSWORD of nonce + 256 bytes is about 620 characters; anything much
# longer is not a password and is refused before any RSA work.
MAX_SEALED_PASSWORD_CHARS = 4096
# Usernames: 1-32 of A-Z a-z 0-9 _ . -, starting with a letter or digit.
USERNAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}\Z")
USERNAME_RULE = "1-32 letters, digits, '_', '.' or '-', starting with a letter or digit"
# Moderation (section 10): a reason is a line, not a letter; a timed sanction is at most
# ten years (longer is "for good", which has no seconds at all).
MAX_REASON_CHARS = 200
MAX_SANCTION_SECONDS = 10 * 366 * 86400
# The frame limit a server uses unless told otherwise (section 1).
DEFAULT_FRAME_LIMIT = framing.DEFAULT_FRAME_LIMIT
# Section 0: a TLS connection starts with a handshake record, content type 22;
# no plain frame starts so (its kind byte is C or D).
TLS_HANDSHAKE_BYTE = 0x16
# PM2 (section 4.5): 128 random bits make an id that no two PMs share by chance.
PM_ID_BYTES = 16
# PM2: how far a PM's ``sent`` may be from the server's (and receiver's) clock,
# in seconds: wide enough for unsynchronised clocks, short enough that the ids
# of the window can be remembered to refuse a replay.
PM_CLOCK_WINDOW = 600.0
# PM2: ids remembered per sender. A sender past it loses its oldest id, and its
# PMs sent no later than that one are refused from then on (a replay of a
# forgotten id is then still caught); 256 is far more PMs than a person sends in
# ten minutes, and about 40 KB per busy sender.
PM_IDS_PER_SENDER = 256


def valid_username(name: object) -> bool:
    """True if name is a username by the rule of section 4.1."""
    return isinstance(name, str) and USERNAME_RE.match(name) is not None


def password_problem(password: str) -> str | None:
    """Why a new password would be refused as weak_password, or None."""
    if len(password.encode("utf-8")) > MAX_PASSWORD_BYTES:
        return f"a password is at most {MAX_PASSWORD_BYTES} bytes"
    if len(password) < MIN_PASSWORD_CHARS:
        return f"a password has at least {MIN_PASSWORD_CHARS} characters"
    return None


def text_problem(text: object) -> str | None:
    """Why a message text would be refused with bad_request, or None."""
    if not isinstance(text, str):
        return "'text' must be a string"
    if len(text) > MAX_TEXT_CHARS:
        return f"a message is at most {MAX_TEXT_CHARS} characters (this one has {len(text)})"
    if not text.strip():
        return "a message needs at least one character that is not white space"
    stored = framing.json_size(text) - 2
    if stored > MAX_STORED_TEXT_BYTES:
        return (f"a message is at most {MAX_STORED_TEXT_BYTES} bytes once stored (this one is {stored}: "
                "control characters take six bytes each)")
    return None


# --- timestamps ---------------------------------------------------------------

_ts_cache = [-1, ""]


def timestamp(now: float) -> str:
    """UTC ISO 8601 with milliseconds, e.g. ``2026-11-24T15:04:05.123Z`` (section 4.6 ``ts``)."""
    second = int(now)
    if _ts_cache[0] != second:
        _ts_cache[0] = second
        _ts_cache[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{_ts_cache[1]}.{int((now - second) * 1000):03d}Z"


# ASCII digits only: \d would take any Unicode digit (int() reads "２０２６").
_TS_RE = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})\.([0-9]{3})Z\Z")


def parse_timestamp(text: object) -> float | None:
    """The time a ``ts``-format text names (``timestamp``'s inverse), or None if it is not one."""
    match = _TS_RE.match(text) if isinstance(text, str) else None
    if match is None:
        return None
    year, month, day, hour, minute, second, millis = (int(part) for part in match.groups())
    if not (year >= 1 and 1 <= month <= 12 and 1 <= day <= calendar.monthrange(year, month)[1] and hour < 24
            and minute < 60 and second < 60):
        return None
    return calendar.timegm((year, month, day, hour, minute, second)) + millis / 1000


# Section 11.2: the room's BMs are not always stored in the order of their ts. Each node stamps
# a BM by its own clock before the store has it, so with several nodes (clocks a little apart, or
# a BM on its way while another node's lands) a BM can be stored after one with a later ts. A
# store reading back for ``since`` goes this far past it before it stops; the client asks from
# this far before the newest BM it has shown, and drops the repeats.
TS_ORDER_SLACK = 10.0


def ts_before(ts: str, seconds: float) -> str:
    """The ts ``seconds`` before the valid ts ``ts`` (``ts`` itself where that would be before 1970)."""
    at = parse_timestamp(ts)
    return ts if at is None else min(ts, timestamp(max(at - seconds, 0.0)))


# --- reply frames (server side) -----------------------------------------------

def ok(op: str, **fields) -> bytes:
    """A successful reply frame."""
    body = {"op": op, "ok": True}
    body.update(fields)
    return framing.command(body)


def fail(op: str, error: Error, message: str, **fields) -> bytes:
    """A failed reply frame with a section 6 error code."""
    body = {"op": op, "ok": False, "error": error, "message": message}
    body.update(fields)
    return framing.command(body)


def fatal(error: Error, message: str) -> bytes:
    """The ERROR frame sent before closing a connection."""
    return framing.command({"op": Op.ERROR, "ok": False, "error": error, "message": message})


def bye(reason: ByeReason, **fields) -> bytes:
    """The unsolicited BYE frame sent before the server closes a connection (``fields``: section 10's
    ``message``, ``until``)."""
    body: dict = {"op": Op.BYE, "reason": reason}
    body.update(fields)
    return framing.command(body)
