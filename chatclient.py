"""The chat room client: ``python3 chatclient.py HOST PORT USERNAME`` (docs/PROTOCOL.md, issue 4).

Owns the client side of the protocol: TLS (section 0; the certificate's key
checked against the one remembered for HOST:PORT before LOGIN, and LOGIN's
``server_key`` against the certificate's before the password goes out), the
operations BM, PM, CH and EX, the admins' MOD commands (KICK, BAN, UNBAN,
MUTE, UNMUTE, BANS: section 10), the local commands (WHO, KEYS, TRUST, IGNORE,
UNIGNORE, HELP), sealing and signing private messages end to end (PM2: a
random id and the clock under the signature), checking received ones and
history entries against the sender's pinned key (and the ids seen before,
across runs), offline PMs, moving the key pair (``--export-key``,
``--import-key``), and showing what arrives (except from the users ignored).

Theory of operation: one ``selectors`` loop waits on the socket and standard
input. The conversation with the server is lock-step, so it is written as a
generator, ``Session.run``, that yields what it needs next: ``Send(body)``
(queue a frame), ``Reply(op)`` (wait for the reply with that op) or
``Ask(prompt)`` (wait for the user's next line); its first step is
``Handshake()`` (wait for TLS; the certificate comes back in). ``Driver`` runs it, feeding
replies and input events back in. Data frames (messages, presence) are shown
the moment they arrive, whatever the session is waiting for. Input that
arrives while a reply is pending waits in a queue, so pasted or piped
commands run one after another, each after the previous reply.

Two front ends: ``TtyScreen`` (stdin is a terminal: cbreak mode, the
``LineEditor``, incoming lines printed above the prompt and the prompt and
the half-typed text redrawn; the terminal mode is restored on every way out)
and ``PlainScreen`` (a pipe or a file: plain lines, no prompts, no escape
codes; the first line is the password; end of input means EX; a line that
fails makes the exit status 1 at the end, each reason said on stderr). Every
line shown passes ``visible()`` at the screen, so nothing received is ever
interpreted by the terminal.
"""

from __future__ import annotations

import argparse
import base64
import atexit
import codecs
import datetime
import errno
import getpass
import io
import logging
import math
import os
import re
import selectors
import signal
import socket
import ssl
import sys
import termios
import time
from collections import deque
from collections.abc import Callable, Generator, Sequence
from typing import Any, NamedTuple, Union

import framing
import pg3lib
import protocol
import x509
from clientstore import ClientStore, KeyLocked, SeenIds, config_root, contact_book, server_address, server_id
from lineeditor import (PASTE_OFF, PASTE_ON, UNSAFE_FORMAT_CHARS, Completions, Event, Key, LineEditor, Submit,
                        shorten, text_width)
from moderation import PAST, parse_duration
from protocol import (MAX_REASON_CHARS, MAX_TEXT_CHARS, MIN_PASSWORD_CHARS, USERNAME_RULE, ByeReason, Error,
                      ModAction, Op, password_problem, text_problem, valid_username)

log = logging.getLogger("chatclient")
log.addHandler(logging.NullHandler())  # nothing on stderr unless --debug-log asks for a file

EXIT_OK = 0
EXIT_ERROR = 1  # also: a script in which something was not carried out (a message not sent...)
EXIT_USAGE = 2
EXIT_SECURITY = 3  # a server key that does not match: the login was stopped
EXIT_INTERRUPTED = 130

CONNECT_TIMEOUT = 10.0
# Larger than the server's default frame limit, so a server configured with a
# bigger one still works, yet bounded.
CLIENT_FRAME_LIMIT = 1 << 20
UNREADABLE = "(unreadable: sealed for another key)"
COMMANDS = ("BM", "PM", "CH", "WHO", "KEYS", "TRUST", "IGNORE", "UNIGNORE", "HELP", "EX")
# Moderation (docs/PROTOCOL.md section 10): for admins only (the server refuses everyone else), so
# they are not offered by Tab as a first word ("b" and Tab stays "BM ").
ADMIN_COMMANDS = ("KICK", "BAN", "UNBAN", "MUTE", "UNMUTE", "BANS")
NAME_COMMANDS = ("PM", "TRUST", "KEYS", "IGNORE", "UNIGNORE",  # their first argument is a user name
                 "KICK", "BAN", "UNBAN", "MUTE", "UNMUTE")
MOD_USAGE = {
    ModAction.KICK: "KICK user [reason]",
    ModAction.BAN: "BAN user [time] [reason] (time like 10m, 2h, 1d; none: for good)",
    ModAction.UNBAN: "UNBAN user",
    ModAction.MUTE: "MUTE user time [reason] (time like 10m, 2h, 1d)",
    ModAction.UNMUTE: "UNMUTE user",
    ModAction.BANS: "BANS",
}
COMMANDS_HINT = "commands: BM PM CH WHO KEYS TRUST IGNORE EX; HELP explains them"
LEAVE_HINT = "(Ctrl-C only cancels; to leave, type EX or press Ctrl-D)"
LEAVE_HINT_LOGIN = "(Ctrl-C only cancels; to leave, press Ctrl-D)"
HELP_LINES = (  # short enough for a terminal of 60 columns
    "BM [message]         message everyone online",
    "PM [user [message]]  private message, encrypted end to end",
    "CH [count | all]     your history: the newest screenful,",
    "                     the newest count entries, or all",
    "WHO                  who is online",
    "KEYS [user]          fingerprints, to compare in person",
    "TRUST user           accept a contact's new key",
    "IGNORE [user]        hide a user's messages (no user: list)",
    "UNIGNORE user        show them again",
    "EX                   leave (or Ctrl-D)",
    "Ctrl-C cancels (it leaves only while reconnecting);",
    "Up/Down recall lines; Tab completes commands, then names",
    "For admins (named at the server; others are refused):",
    "KICK user [reason]   end a user's session",
    "BAN user [time] [reason]",
    "                     refuse their logins; time like 10m,",
    "                     2h, 1d; no time: for good",
    "UNBAN user           lift a ban",
    "MUTE user time [reason]",
    "                     refuse their BMs for that long",
    "UNMUTE user          lift a mute",
    "BANS                 the bans and mutes in force",
)
KEPT_HEADER = "kept for you while you were away:"  # before the kept PMs, after the recent BMs
BURST_QUIET = 0.3  # seconds without a frame after which the login burst counts as over
SLOW_REPLY = 1.0  # seconds without the awaited reply before the terminal says that we are waiting
WAITING_NOTES = {"TLS handshake": "connecting...", Op.LOGIN.value: "connecting...",
                 Op.PASSWORD.value: "checking the password..."}
BYE_REASONS = {
    ByeReason.SHUTDOWN.value: "the server is shutting down",
    ByeReason.REPLACED.value: "you logged in somewhere else",
    ByeReason.IDLE.value: "the login took too long",
    ByeReason.TOO_SLOW.value: "this client did not keep up with the server",
    ByeReason.TOO_MANY_FAILURES.value: "too many failed password attempts",
    ByeReason.KICKED.value: "an admin removed you from the room",
    ByeReason.BANNED.value: "an admin banned this account",
}
NEW_KEY_WARNING = (
    "no key pair for {user} at {server} on this machine: a NEW one is made. Private messages sealed for "
    "your old key (CH) stay unreadable here, and your contacts will be warned that your key changed. "
    "To use the old key instead: chatclient.py --export-key FILE HOST PORT {user} on the machine that has it, "
    "then here chatclient.py --import-key FILE HOST PORT {user} (it replaces the new one)")
NEW_KEY_QUESTION = (
    "there is no key pair for {user} at {server} on this machine. A new one means: private messages "
    "sealed for your old key (CH) stay unreadable here, and your contacts are warned that your key "
    "changed. To use the old key instead: chatclient.py --export-key FILE HOST PORT {user} on the machine "
    "that has it, then here chatclient.py --import-key FILE HOST PORT {user}")
NEW_KEY_DECLINED = "login stopped: no new key made, password not sent (--import-key brings your key)"
UNVERIFIED = "[UNVERIFIED: {}]"
PREVIOUS_KEY = "signed with {}'s previous key"   # a CH entry that checks out with a key trusted before TRUST
PASSPHRASE_ENV = "CHATCLIENT_KEY_PASSPHRASE"  # the export file's passphrase, for scripts and tests
CH_ALL = "all"  # CH all: the whole history, however long, on a terminal too
CH_MAX_LIMIT = 100_000  # CH count while users are ignored: asked again with larger limits up to this
SUMMARY_FAILURES = 3  # failures named in a script's closing line; the rest are counted
# Coming back after a lost connection (section 11): the waits between attempts (then it gives up),
# the BMs remembered as shown (a catch-up repeats those at its start), the newest CH entries
# looked through for PMs that were on their way, and the slack for this clock against the server's.
RECONNECT_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 30.0, 30.0, 30.0)
SHOWN_MEMORY = 2000
CATCH_UP_HISTORY = 200
CLOCK_SLACK = 5.0


class ClientExit(Exception):
    """Stop the client: a message for the user (stderr) and an exit status."""

    def __init__(self, message: str, status: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class ConnectionClosed(Exception):
    """The server closed the connection (or it broke)."""


class PassingFailure(ConnectionClosed):
    """A login after a lost connection met a failure that passes (the server's storage down for a
    moment, too many checks waiting): the connection is dropped and tried again later."""


PASSING_ERRORS = (Error.INTERNAL, Error.RATE_LIMITED, Error.SERVER_BUSY)


class Terminated(Exception):
    """SIGTERM or SIGHUP arrived."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# --- what is shown ---------------------------------------------------------------

_UNSAFE_RE = re.compile("[\x00-\x1f\x7f-\x9f" + "".join(sorted(UNSAFE_FORMAT_CHARS)) + "]")
_TIMESTAMP = re.compile(r"(\d{4})-(\d\d)-(\d\d)[T ](\d\d):(\d\d):(\d\d)(?:\.\d+)?(Z|[+-]\d\d:?\d\d)?\Z")


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def visible(text: str) -> str:
    """Text with every character a terminal could act on written as an escape (``\\x1b``, ``\\u202e``)."""
    return _UNSAFE_RE.sub(_escape, text)


_WORDS = re.compile(r" +|[^ ]+")
WRAP_INDENT = "  "   # the start of a shown line's continuation rows
WRAP_MIN_WIDTH = 20  # narrower than this, the terminal's own wrapping is left to do it


def wrap_rows(line: str, width: int) -> list[str]:
    """One shown line (already ``visible``) as the terminal rows of at most width columns it
    takes, broken at spaces, continuation rows indented; a word longer than a row is split."""
    if width < WRAP_MIN_WIDTH or text_width(line) <= width:
        return [line]
    rows: list[str] = []
    row, used = "", 0
    for word in _WORDS.findall(line):
        size = text_width(word)
        if used + size <= width:
            row, used = row + word, used + size
        elif word[0] == " ":   # a break: the spaces go with it
            rows.append(row)
            row, used = WRAP_INDENT, len(WRAP_INDENT)
        elif row.strip() and len(WRAP_INDENT) + size <= width:   # the word fits a row: start one
            rows.append(row.rstrip(" "))
            row, used = WRAP_INDENT + word, len(WRAP_INDENT) + size
        else:   # longer than a row: split it from where this row is
            for ch in word:
                size = text_width(ch)
                if used + size > width:
                    rows.append(row)
                    row, used = WRAP_INDENT, len(WRAP_INDENT)
                row, used = row + ch, used + size
    if row.strip() or not rows:
        rows.append(row)
    return rows


def parse_timestamp(value: Any) -> datetime.datetime | None:
    """An aware datetime from a protocol timestamp (``2026-11-24T15:04:05.123Z``), or None."""
    match = _TIMESTAMP.match(value) if isinstance(value, str) else None
    if match is None:
        return None
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    zone = match.group(7) or "Z"
    offset = datetime.timedelta(0)
    if zone != "Z":
        sign = -1 if zone[0] == "-" else 1
        digits = zone[1:].replace(":", "")
        offset = sign * datetime.timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
    try:
        return datetime.datetime(year, month, day, hour, minute, second,
                                 tzinfo=datetime.timezone(offset))
    except ValueError:
        return None


def local_time(value: Any, with_date: bool = False) -> str:
    """A timestamp as local ``15:04`` (or ``2026-11-24 15:04``); now if it is missing or bad."""
    moment = parse_timestamp(value) or datetime.datetime.now(datetime.timezone.utc)
    try:
        moment = moment.astimezone()
    except (OverflowError, ValueError, OSError):  # year 1 or 9999 moved out of range: keep its own zone
        pass
    clock = f"{moment.hour:02d}:{moment.minute:02d}"
    return f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d} {clock}" if with_date else clock


def format_broadcast(sender: str, text: str, ts: Any = None) -> str:
    """A BM as everyone sees it, the sender too: ``[15:04] alice: hello``."""
    return f"[{local_time(ts)}] {sender}: {text}"


def format_private(sender: str, text: str, ts: Any = None) -> str:
    return f"[{local_time(ts)}] {sender} -> you (private): {text}"


def kept_private(line: str, sent: Any) -> str:
    """A PM shown after the fact (kept, or missed on the way): when the sender sent it."""
    return f"{line}  (sent while you were away, {local_time(sent, with_date=True)})"


def format_own_private(receiver: str, text: str) -> str:
    """The echo of a PM we sent, beside what the receiver sees (``alice -> you (private)``)."""
    return f"[{local_time(None)}] you -> {receiver} (private): {text}"


def recipients_note(recipients: Any) -> str:
    """The short count after the echo of our own BM; empty if the server gave no usable count."""
    if not isinstance(recipients, int) or isinstance(recipients, bool) or recipients < 0:
        return ""
    if recipients == 0:
        return "(nobody else is online)"
    return f"(sent to {recipients})"


def format_own_broadcast(sender: str, text: str, recipients: Any, ts: Any = None) -> str:
    """Our BM echoed as the others see it, the count folded in after it."""
    note = recipients_note(recipients)
    line = format_broadcast(sender, text, ts)
    return f"{line}  {note}" if note else line


def format_presence(username: str, online: bool, ts: Any = None) -> str:
    return f"[{local_time(ts)}] * {username} is {'online' if online else 'offline'}"


def format_history_entry(entry: dict, open_sealed: Callable[[Any], str | None]) -> str:
    """One CH entry: local date and time, BM/PM, sender -> receiver, the text (PMs decrypted)."""
    kind = str(entry.get("type", "?"))
    sender = str(entry.get("from", "?"))
    receiver = str(entry.get("to", "?"))
    if kind == "BM" or receiver == "*":
        receiver = "all"
    if "ciphertext" in entry:
        text = open_sealed(entry.get("ciphertext"))
        text = UNREADABLE if text is None else text
    else:
        text = str(entry.get("text", ""))
    when = local_time(entry.get("ts"), with_date=True) if parse_timestamp(entry.get("ts")) else "????-??-?? ??:??"
    return f"[{when}] {kind} {sender} -> {receiver}: {text}"


def login_nonce(reply: dict) -> bytes:
    """The nonce of a LOGIN reply (section 4.1); a malformed one stops the login."""
    try:
        return pg3lib.b64decode_strict(str(reply.get("nonce", "")))
    except ValueError:
        raise ClientExit("the server sent a malformed login nonce; password not sent") from None


def succeeded(reply: dict) -> bool:
    """A reply with ``"ok": true`` (not merely something truthy)."""
    return reply.get("ok") is True


def one_line(value: Any, limit: int = 200) -> str:
    """Server-given text for a one-line message: escaped, no line breaks, at most limit characters."""
    text = visible(value if isinstance(value, str) else str(value))
    return text if len(text) <= limit else text[:limit - 3] + "..."


def describe_error(reply: dict) -> str:
    """The human sentence of a failed reply (its message, else its error code), on one line."""
    return one_line(reply.get("message") or reply.get("error") or "unknown error")


def sanction_text(kind: str, reply: dict) -> str:
    """``banned until 2026-12-02 16:04 by alice: spam`` from a refusal's members, in local time."""
    until = reply.get("until")
    when = f"until {local_time(until, with_date=True)}" if parse_timestamp(until) else "for good"
    by, reason = reply.get("by"), reply.get("reason")
    text = f"{kind} {when}" + (f" by {one_line(by, 40)}" if isinstance(by, str) and by else "")
    return text + (f": {one_line(reason)}" if isinstance(reason, str) and reason else "")


def bye_text(body: dict) -> str:
    reason = body.get("reason", "unknown")
    message = body.get("message")
    if reason in (ByeReason.KICKED, ByeReason.BANNED) and isinstance(message, str):
        # Said as what happened, not as a failure of the client (section 10).
        until = body.get("until")
        if reason == ByeReason.KICKED:
            return f"{one_line(message)}: you were removed from the room (you may log in again)"
        end = f"until {local_time(until, with_date=True)}" if parse_timestamp(until) else "for good"
        return f"{one_line(message)}: this account is banned {end}"
    known = BYE_REASONS.get(reason, "no reason known") if isinstance(reason, str) else "no reason known"
    return f"the server closed the connection: {known} ({one_line(reason, 60)})"


def entry_rows(page: int) -> int:
    """The rows one entry of a listing (CH, the recent BMs) may take in a screenful of page rows."""
    return max(3, page // 4)


def history_summary(shown: int, older: int, hidden: int, shortened: int = 0, capped: bool = False) -> str:
    """The line after a CH: how many entries, how many older ones were left out (and how to see
    them), how many long ones were shortened, how many from ignored users were hidden.
    ``capped``: a ``CH count`` got all it asked for, so there may be older entries (not counted)."""
    def entries(count: int) -> str:
        return f"{count} {'entry' if count == 1 else 'entries'}"

    if shown == 0 and older == 0:
        return f"(nothing to show: {entries(hidden)} from ignored users hidden)" if hidden else \
            "your history is empty"
    total = shown + older
    text = f"the newest {shown} of {total} entries" if older else entries(shown)
    if capped and not older:
        text = f"the newest {entries(shown)}"
    if shortened:
        text += f", {shortened} shortened"
    if older:
        text += f"; CH all shows all {total}" + (" in full" if shortened else "")
        if total > 100:
            text += ", CH 100 the newest 100"
    elif capped:
        text += "; CH all shows older ones, if any"
    elif shortened:
        text += "; CH all shows " + ("it" if shortened == 1 else "them") + " in full"
    if hidden:
        text += f"; {entries(hidden)} from ignored users not shown"
    return f"({text})"


def completion_words(before: str, names: Sequence[str]) -> tuple[str, ...]:
    """What Tab may complete a word at the operation prompt to, by where the word is.

    ``before`` is the line before the word. The first word is a command; the
    word after a command that takes a user (PM, TRUST, KEYS, IGNORE, UNIGNORE)
    is one of names; anything else (a message, a second argument) is left alone.
    """
    words = before.split()
    if not words:
        return COMMANDS
    if len(words) == 1 and before[-1:].isspace() and words[0].upper() in NAME_COMMANDS:
        return tuple(names)
    return ()


def script_failures_text(failures: list[str]) -> str:
    """A script's closing line on stderr when something in it was not carried out."""
    count = len(failures)
    named = "; ".join(failures[:SUMMARY_FAILURES])
    more = f"; and {count - SUMMARY_FAILURES} more" if count > SUMMARY_FAILURES else ""
    return f"{count} line{'' if count == 1 else 's'} of the script failed: {named}{more}"


_KEY_CHANGED_TITLE = "WARNING: THE SERVER'S KEY HAS CHANGED. THE LOGIN WAS STOPPED."


def server_key_changed_text(server: str, remembered: str, presented: str, path: str) -> str:
    """The changed-key warning: one line for the ``chatclient:`` prefix, then the box on lines of its own
    (all three of the same width, so that its edges line up)."""
    edge = "@" * (len(_KEY_CHANGED_TITLE) + 6)
    return "\n".join((
        "the server's key has changed; login stopped, password not sent",
        edge,
        f"@  {_KEY_CHANGED_TITLE}  @",
        edge,
        f"The server at {server} presents a key other than the one remembered:",
        f"  remembered: {remembered}",
        f"  presented:  {presented}",
        "Someone may be impersonating the server to capture your password,",
        "or the server's key was replaced. Your password has NOT been sent.",
        "If you know the change is legitimate, delete the line for",
        f"{server} from {path} and connect again.",
    ))


def contact_key_changed_text(name: str, remembered: str, presented: str) -> str:
    return (f"{name}'s key has CHANGED: remembered {remembered}, now {presented}. "
            f"Compare fingerprints with {name} another way (KEYS {name}), then TRUST {name} to accept it.")


# --- what the session asks the driver for --------------------------------------------

class Send(NamedTuple):
    """Queue this command frame."""

    body: dict


class Reply(NamedTuple):
    """Wait for the server's reply with this op; the driver sends it back in."""

    op: str


class Handshake(NamedTuple):
    """Wait for the TLS handshake; the driver sends the server's certificate (DER) back in."""


HANDSHAKE = "TLS handshake"  # what the driver waits for during a Handshake step


class Reconnect(NamedTuple):
    """Connect again now (the first login's connection closed while the user typed); the driver
    sends None back in once there is a new connection to handshake on."""


class Ask(NamedTuple):
    """Wait for the user's next line (or Ctrl-C / Ctrl-D / end of input)."""

    prompt: str
    secret: bool = False
    completions: Completions = ()  # what Tab offers (lineeditor.Completions)
    clear_on_interrupt: bool = False  # Ctrl-C on a half-typed line only drops the line
    initial: str = ""  # text already in the line, to edit (a message that was too long)
    resume: str = ""  # what makes the half-typed answer a command again if the connection drops ("BM ")
    fresh: bool = False  # lines typed before it was asked are dropped, not taken as its answer (a password)


Step = Union[Send, Reply, Handshake, Reconnect, Ask]
Flow = Generator[Step, Any, Any]


class Output:
    """Where the session writes: ``show`` for the conversation, ``warn`` for problems."""

    def show(self, text: str) -> None:
        raise NotImplementedError

    def warn(self, text: str) -> None:
        raise NotImplementedError

    def page_rows(self) -> int | None:
        """How many rows of a long listing fit on the screen (None: no screen, show everything)."""
        return None

    def rows_of(self, text: str) -> int:
        """The screen rows a line takes (a long one wraps)."""
        return 1

    def fit_rows(self, text: str, rows: int) -> str:
        """The line cut to take at most rows screen rows."""
        return text


class HeldOutput(Output):
    """What a kept PM shows, held until the login burst is over: (a warning?, the text)."""

    def __init__(self) -> None:
        self.lines: list[tuple[bool, str]] = []

    def show(self, text: str) -> None:
        self.lines.append((False, text))

    def warn(self, text: str) -> None:
        self.lines.append((True, text))


class Session:
    """The client's side of one connection: login, operations, what arrives (no I/O of its own)."""

    def __init__(self, server: str, username: str, store: ClientStore, out: Output,
                 interactive: bool, register: bool = False, room: Sequence[str] = ()) -> None:
        self.server = server  # the address connected to (host:port)
        self.room = [server, *(a for a in room if a != server)]  # every address given for the room (--fallback)
        self.moved = False  # this login is at another address of the room than the last one
        self.logged_in_at = server  # the address of the last login that reached KEY's reply
        self.username = username  # the registered spelling once logged in
        self.store = store
        self.out = out
        self.interactive = interactive
        self.register = register  # a script may create the account (--register)
        self.keys: pg3lib.KeyPair | None = None
        self.online: dict[str, str] = {}  # lower case -> as shown
        self.more_online = 0  # online users left out of a trimmed list
        self.changed_keys: dict[str, pg3lib.PublicKey] = {}  # contact -> new key, not trusted yet
        self.held: dict[str, list[dict]] = {}  # contact -> PMs waiting for TRUST
        self.failures: list[str] = []  # a script's lines that were not carried out (exit status 1)
        self.retry_line = ""  # put back at the next operation prompt (a message that was too long)
        self.new_key_agreed = False   # asked at login: a new key pair for an account that had one
        self._last_opened: tuple[str, str | None] = ("", None)   # (sealed text, what it opened to)
        self.stopped_by_changed_key = False   # the last target_key refused a contact's changed key
        self.exiting = False
        self.cert_key: pg3lib.PublicKey | None = None  # the key of the server's TLS certificate
        self.import_keys: pg3lib.KeyPair | None = None  # --import-key: the key pair to adopt at this login
        self.import_server = ""  # the server key fingerprint the export file was made for
        self.first_noted: set[str] = set()  # contacts whose unpinned key was shown once
        self.contact_keys: dict[str, pg3lib.PublicKey] = {}  # lower case -> a key seen for the contact
        self.seen: SeenIds | None = None  # the PM ids seen (section 4.5), once logged in
        # Where the key pair, contacts and ignore list are kept: the server key's fingerprint (section 9).
        self.server_key_id = server
        # Lower case: the users whose BMs and PMs are hidden (read again at LOGIN).
        self.ignored = store.ignored(self.book)
        # Coming back after a lost connection (section 11): the password of this run's login (kept
        # in memory only), where the BMs seen end, and which ones were shown (a catch-up repeats some).
        self.password: str | None = None
        self.joined = False  # logged in once in this run: a lost connection is reconnected
        self.online_now = False  # KEY answered on the current connection
        self.last_seen = ""  # the ts of the newest BM shown (else of the login)
        self.shown: deque[tuple] = deque()
        self.shown_set: set[tuple] = set()
        self.recent_header = ""  # said once, before the first recent BM of a login
        self.in_flight: str = ""  # the command of a message sent and not yet answered
        self.login_dropped = False  # the first login's connection closed while the user typed
        # Right after KEY the server sends the kept PMs, then the recent BMs (section 11.1): on a
        # terminal the kept PMs are held and shown after those, so that they are not scrolled away.
        self.burst = False  # that login burst is still arriving
        self.kept_lines: list[tuple[bool, str]] = []  # (a warning?, the text) of the kept PMs held

    def request(self, body: dict) -> Flow:
        yield Send(body)
        return (yield Reply(body["op"]))

    def run(self) -> Flow:
        """Log in, then take operations until EX or Ctrl-D (Ctrl-C only cancels, and says how to leave)."""
        der = yield Handshake()
        self.check_certificate(der)
        yield from self.login()
        return (yield from self.operations())

    def rejoin(self, server: str) -> Flow:
        """After a lost connection (section 11): log in again on the new one (at ``server``, the
        same address or another node of the room) without asking anything, show what was
        missed, then take operations as before."""
        self.moved, self.server = server != self.logged_in_at, server
        der = yield Handshake()
        self.check_certificate(der)
        since = yield from self.login(again=True)
        yield from self.catch_up_private(since)
        return (yield from self.operations())

    def connection_lost(self, asking: Ask | None, typed: str) -> str:
        """The connection dropped: what the edit line should hold when a prompt comes back.

        A message sent but not confirmed comes back to be sent again (it may have
        arrived: the catch-up shows it if so); a half-typed answer to a message
        prompt becomes the whole command."""
        self.online_now = False
        self.online, self.more_online = {}, 0  # told again by the next KEY reply
        if self.in_flight:
            self.out.warn(f"not confirmed by the server before the connection dropped: {shorten(self.in_flight, 50)}"
                          "\n  it is back in the line: Enter sends it again (check the catch-up first), "
                          "Ctrl-C drops it")
            line, self.in_flight = self.in_flight, ""
            return typed or line
        if asking is not None and asking.resume and typed:
            return asking.resume + typed
        return typed

    def operations(self) -> Flow:
        while True:
            initial, self.retry_line = self.retry_line, ""
            event = yield Ask(f"{self.username}> ", completions=self.complete, clear_on_interrupt=True,
                              initial=initial)
            if event is Key.INTERRUPT:  # on an empty line (a half-typed one is only dropped)
                self.out.show(LEAVE_HINT)
                continue
            self.end_burst()
            if not isinstance(event, Submit):
                yield from self.leave()
                return
            if (yield from self.command(event.text)):
                return

    @property
    def book(self) -> str:
        """Where this account's contacts and ignore list are kept: the room's key and the account."""
        return contact_book(self.server_key_id, self.username)

    def complete(self, before: str) -> tuple[str, ...]:
        """What Tab offers at the operation prompt for the word after ``before`` (the text before it)."""
        return completion_words(before, self.user_names())

    def user_names(self) -> list[str]:
        """Names worth completing: the users online now and the contacts remembered (and ignored)."""
        names = {name.lower(): name for name in self.store.contacts(self.book)}
        names.update((name, name) for name in self.ignored)
        names.update((name.lower(), name) for name in self.changed_keys)
        names.update(self.online)  # the spelling the server shows wins
        names.pop(self.username.lower(), None)
        return sorted(names.values(), key=str.lower)

    def failed(self, what: str, reason: str) -> None:
        """Something a line asked for was not done: warn; a script also exits with status 1 at its end."""
        self.out.warn(f"{what}: {reason}")
        if not self.interactive:
            self.failures.append(f"{what}: {reason}")

    # --- login ---------------------------------------------------------------------
    def login(self, again: bool = False) -> Flow:
        """LOGIN, PASSWORD and KEY. ``again``: the same account after a lost connection, with the
        password and key pair of this run's first login, and KEY's ``since`` to catch up (returned)."""
        reply = yield from self.request({"op": Op.LOGIN, "username": self.username})
        if not succeeded(reply):
            self.passing_failure(reply)
            raise ClientExit(f"login refused: {describe_error(reply)}")
        if again:
            return (yield from self.login_again(reply))
        server_key = self.check_server_key(reply)
        self.server_key_id = server_id(server_key.fingerprint)
        # Contacts and the ignore list are this account's in the room (under the room's key, on
        # every node of it); rows of older layouts (by address, by room alone) move here once.
        for older in (self.server, self.server_key_id):
            if self.store.adopt_server_rows(older, self.book):
                log.debug("adopted the contacts and ignore list kept under %s", older)
        self.ignored = self.store.ignored(self.book)
        nonce = login_nonce(reply)
        new_user = bool(reply.get("new_user"))
        if new_user and not self.interactive and not self.register:
            raise ClientExit(f"there is no account {self.username} at {self.server}; a script creates one "
                             "only when asked: run it with --register (nothing was sent)")
        if not new_user and self.interactive and not (yield from self.key_pair_here_or_agreed()):
            raise ClientExit(NEW_KEY_DECLINED)
        if new_user and self.interactive:
            self.out.show(f"new user {self.username}: choose a password (at least {MIN_PASSWORD_CHARS} characters)")
        elif new_user:
            self.out.show(f"registering the new user {self.username} (--register)")
        while True:
            password = yield from self.read_password(new_user)
            if password is None:
                raise ClientExit("login cancelled" if self.interactive else
                                 "no password on standard input (its first line is the password)")
            if self.login_dropped:
                nonce = login_nonce((yield from self.login_anew(new_user)))
            sealed = server_key.seal(nonce + password.encode("utf-8")).decode("ascii")
            reply = yield from self.request({"op": Op.PASSWORD, "ciphertext": sealed})
            if succeeded(reply):
                break
            self.password_refused(reply)
        registered = reply.get("username")
        if valid_username(registered) and registered.lower() == self.username.lower():
            self.username = registered  # the spelling of the registration (docs/PROTOCOL.md 4.2)
        self.keys = self.own_key_pair(password, existed=reply.get("new_user") is False)
        self.seen = self.store.seen_ids(self.server_key_id, self.username)
        self.password = password
        self.last_seen = protocol.timestamp(time.time() - CLOCK_SLACK)
        self.recent_header = "recent messages:"
        yield from self.enter_room({"recent": True}, f"logged in as {self.username} at {self.server}")
        self.joined = True
        if self.interactive:
            self.out.show(COMMANDS_HINT)

    def enter_room(self, members: dict, greeting: str) -> Flow:
        """KEY (with members); then online, and the greeting says who else is."""
        assert self.keys is not None
        reply = yield from self.request({"op": Op.KEY, "public_key": self.keys.public.key_form, **members})
        if not succeeded(reply):
            self.passing_failure(reply)
            raise ClientExit(f"the server refused our key: {describe_error(reply)}")
        self.online_now = True
        self.logged_in_at = self.server
        self.burst = self.interactive
        self.set_online(reply.get("online"), reply.get("more_online"))
        others = f"also online: {self.who_list()}" if self.online or self.more_online else "nobody else is online"
        self.out.show(f"{greeting}. {others}")

    def same_room_key(self, reply: dict) -> pg3lib.PublicKey:
        """The LOGIN reply's server key, checked as always, and the one this run logged in with.

        Raises:
            ClientExit: EXIT_SECURITY if it is another; nothing about the password was sent.
        """
        server_key = self.check_server_key(reply)
        if server_id(server_key.fingerprint) != self.server_key_id:
            raise ClientExit("the server came back with another key; login stopped, password not sent",
                             EXIT_SECURITY)
        return server_key

    def login_anew(self, new_user: bool) -> Flow:
        """The connection closed while the password was typed (the server's login timeout): connect
        again and LOGIN, with the same server key and the account as it was; the new LOGIN reply."""
        yield Reconnect()
        self.login_dropped = False
        der = yield Handshake()
        self.check_certificate(der)
        reply = yield from self.request({"op": Op.LOGIN, "username": self.username})
        if not succeeded(reply):
            raise ClientExit(f"login refused: {describe_error(reply)}")
        self.same_room_key(reply)
        if bool(reply.get("new_user")) != new_user:
            raise ClientExit(f"the account {self.username} was registered by someone else while you chose a "
                             "password; password not sent" if new_user else
                             f"the server no longer knows the account {self.username}; password not sent")
        return reply

    def passing_failure(self, reply: dict) -> None:
        """After a lost connection, an error that passes is a reason to try again later, not to stop.

        Raises:
            PassingFailure: this run has logged in before, and the error is one of PASSING_ERRORS.
        """
        error = reply.get("error")
        if self.joined and error in PASSING_ERRORS:
            raise PassingFailure(f"the server failed the login: {one_line(error, 20)}")

    def login_again(self, reply: dict) -> Flow:
        """PASSWORD and KEY for a login after a lost connection (LOGIN answered ``reply``)."""
        server_key = self.same_room_key(reply)
        if reply.get("new_user") is not False:
            raise ClientExit(f"the server no longer knows the account {self.username}; not registering it again")
        nonce = login_nonce(reply)
        assert self.password is not None
        sealed = server_key.seal(nonce + self.password.encode("utf-8")).decode("ascii")
        reply = yield from self.request({"op": Op.PASSWORD, "ciphertext": sealed})
        if not succeeded(reply):
            if reply.get("error") == Error.BANNED:
                raise ClientExit("login refused: this account is " + sanction_text("banned", reply))
            self.passing_failure(reply)
            raise ClientExit(f"logging in again failed: {describe_error(reply)}")
        since = protocol.ts_before(self.last_seen, protocol.TS_ORDER_SLACK)   # repeats are dropped
        self.recent_header = "while you were away:"
        yield from self.enter_room({"since": since}, f"reconnected as {self.username}"
                                   + (f" at {self.server}" if self.moved else ""))
        return since

    def catch_up_private(self, since: str) -> Flow:
        """The PMs to us stored since ``since`` that this client has not shown (the ones that were
        on their way when the connection dropped): from the newest entries of CH, in order."""
        yield Send({"op": Op.CH, "limit": CATCH_UP_HISTORY})
        while True:
            reply = yield Reply(Op.CH)
            if not succeeded(reply):
                return
            entries = reply.get("entries")
            for entry in entries if isinstance(entries, list) else ():
                if not (isinstance(entry, dict) and entry.get("type") == "PM" and isinstance(entry.get("ts"), str)
                        and entry["ts"] >= since and str(entry.get("to", "")).lower() == self.username.lower()
                        and str(entry.get("from", "")).lower() not in self.ignored):
                    continue
                key = (str(entry.get("from")), str(entry.get("id", "")))
                if self.seen is not None and key in self.seen:
                    continue  # shown live, or just now as kept while we were away
                if self.seen is not None and "id" in entry:
                    self.seen.add(*key)
                self.out.show(self.missed_private_line(entry))
            if reply.get("more") is not True:
                return

    def missed_private_line(self, entry: dict) -> str:
        """A PM to us found in CH after a lost connection: shown as a kept one is, if it verifies."""
        if self.entry_problem(entry) is not None:
            return f"{self.history_line(entry)}  (while you were away)"
        text = self.open_sealed(entry.get("ciphertext"))
        line = format_private(str(entry.get("from")), UNREADABLE if text is None else text, entry.get("ts"))
        return kept_private(line, entry.get("sent"))

    def check_certificate(self, der: Any) -> None:
        """The TLS certificate's key against the one pinned for this server (section 9), before LOGIN.

        Raises:
            ClientExit: EXIT_SECURITY if it is not the pinned key (or not a key at all).
        """
        try:
            if not isinstance(der, bytes):
                raise x509.CertificateError("no certificate")
            key = x509.certificate_key(der)
        except (x509.CertificateError, pg3lib.InvalidKey) as exc:
            raise ClientExit(f"the server's TLS certificate holds no usable key ({one_line(exc, 80)}); "
                             "login stopped, nothing sent", EXIT_SECURITY) from None
        self.check_pin(key)
        self.cert_key = key

    def check_pin(self, key: pg3lib.PublicKey) -> None:
        """TOFU: remember the server's key on first contact; a different one stops (EXIT_SECURITY).

        Every address given for the room must present one key: the one this run logged in
        with, else the one remembered for any of them."""
        remembered = self.store.server_fingerprint(self.server)
        if remembered is not None and remembered != key.fingerprint:
            raise ClientExit(server_key_changed_text(self.server, remembered, key.fingerprint,
                                                     self.store.known_servers_path), EXIT_SECURITY)
        if self.joined and server_id(key.fingerprint) != self.server_key_id:
            raise ClientExit(f"{self.server} presents the key {key.fingerprint}, not the one of the room this "
                             "client logged in to; not a node of it: login stopped, nothing sent", EXIT_SECURITY)
        for other in self.room:
            known = self.store.server_fingerprint(other) if other != self.server else None
            if known is not None and known != key.fingerprint:
                raise ClientExit(f"{self.server} presents the key {key.fingerprint}, but {other}, given as a node "
                                 f"of the same room, is known by {known} (in {self.store.known_servers_path}); "
                                 "login stopped, nothing sent", EXIT_SECURITY)
        if remembered is None:
            self.store.remember_server(self.server, key.fingerprint)
            same = [a for a in self.room if a != self.server and self.store.server_fingerprint(a) == key.fingerprint]
            if same:
                self.out.show(f"first connection to {self.server}: the room's key, as at {same[0]}")
            else:
                self.out.show(f"first connection to {self.server}: remembering its key {key.fingerprint}")

    def check_server_key(self, reply: dict) -> pg3lib.PublicKey:
        """The server's key if it matches its fingerprint, the TLS certificate's key and the remembered one.

        Raises:
            ClientExit: EXIT_SECURITY otherwise; nothing about the password was sent.
        """
        key_form = reply.get("server_key")
        try:
            if not isinstance(key_form, str):
                raise pg3lib.InvalidKey("missing")
            key = pg3lib.PublicKey.from_key_form(key_form)
        except pg3lib.InvalidKey:
            raise ClientExit("the server sent no usable key; password not sent", EXIT_SECURITY) from None
        claimed = reply.get("fingerprint")
        if claimed != key.fingerprint:
            raise ClientExit(f"the server's key {key.fingerprint} does not match the fingerprint it claims, "
                             f"{one_line(claimed, 80)}; login stopped, password not sent", EXIT_SECURITY)
        if self.cert_key is not None:
            if key != self.cert_key:
                raise ClientExit(f"the server's LOGIN announces the key {key.fingerprint}, but its TLS certificate "
                                 f"holds {self.cert_key.fingerprint}; login stopped, password not sent",
                                 EXIT_SECURITY)
        else:
            self.check_pin(key)
        return key

    def read_password(self, new_user: bool) -> Flow:
        """The password typed (twice for a new user on a terminal), or None if cancelled (Ctrl-D).

        Ctrl-C drops what was typed and asks again from the start.
        Raises:
            ClientExit: a script's new password is one the server would refuse.
        """
        prompt = "choose a password: " if new_user else f"password for {self.username}: "
        while True:
            first = yield Ask(prompt, secret=True)
            if first is Key.INTERRUPT:
                self.out.show(LEAVE_HINT_LOGIN)
                continue
            if not isinstance(first, Submit):
                return None
            problem = password_problem(first.text) if new_user else None
            if not self.interactive:
                if problem is not None:
                    raise ClientExit(f"cannot register {self.username}: {problem}")
                return first.text
            if not new_user:
                return first.text
            if problem is not None:  # say so now rather than after typing it twice
                self.out.warn(problem)
                continue
            again = yield Ask("repeat the password: ", secret=True)
            if again is Key.INTERRUPT:
                self.out.show(LEAVE_HINT_LOGIN)
                continue
            if not isinstance(again, Submit):
                return None
            if again.text == first.text:
                return first.text
            self.out.warn("the two passwords differ; try again")

    def password_refused(self, reply: dict) -> None:
        """Say why; raise when asking again is of no use."""
        error = reply.get("error")
        if error == Error.WRONG_PASSWORD:
            left = reply.get("attempts_left")
            if not self.interactive or left == 0:
                raise ClientExit("wrong password")
            counted = isinstance(left, int) and not isinstance(left, bool) and left > 0
            self.out.warn(f"wrong password; {left} attempt{'' if left == 1 else 's'} left" if counted
                          else "wrong password")
        elif error in (Error.WEAK_PASSWORD, Error.BAD_REQUEST) and self.interactive:
            self.out.warn(describe_error(reply))
        elif error == Error.BANNED:
            raise ClientExit("login refused: this account is " + sanction_text("banned", reply))
        else:
            raise ClientExit(f"login failed: {describe_error(reply)}")

    def key_pair_here_or_agreed(self) -> Flow:
        """An account that exists: True if its key pair is on this machine (or comes with
        --import-key), or the person agrees to a new one. Asked before the password, so that
        saying no changes nothing: no session of theirs elsewhere is replaced, no key is made."""
        if self.import_keys is not None:
            return True
        if self.store.adopt_key_pair(self.server, self.server_key_id, self.username):
            log.debug("adopted the key files of %s for the server key", self.server)
        if self.store.has_key_pair(self.server_key_id, self.username):
            return True
        self.out.warn(NEW_KEY_QUESTION.format(user=self.username, server=self.server))
        answer = yield Ask(f"make a new key pair for {self.username} here? [y/N] ", fresh=True)
        self.new_key_agreed = isinstance(answer, Submit) and answer.text.strip().lower() in ("y", "yes")
        return self.new_key_agreed

    def own_key_pair(self, password: str, existed: bool = False) -> pg3lib.KeyPair:
        """The saved key pair for this server key and account (section 9), made on first login.

        Key files kept under this server's address (the older layout) are adopted.
        ``--import-key`` replaces the saved pair. Before a new pair is made for an
        account that existed already (PASSWORD said ``new_user: false``, so PMs may
        be sealed for an older key), the client says what that costs.
        """
        server = self.server_key_id
        if self.store.adopt_key_pair(self.server, server, self.username):
            log.debug("adopted the key files of %s for the server key", self.server)
        if self.import_keys is not None:
            if self.import_server and server_id(self.import_server) != server:
                self.out.warn(f"note: the key file was exported for the server key {self.import_server}, not this "
                              "server's; it is used here all the same")
            if self.store.has_key_pair(server, self.username):
                moved = self.store.retire_key_pair(server, self.username)
                self.out.show(f"the key pair saved here before is kept as {moved}")
            self.store.save_key_pair(server, self.username, password, self.import_keys, self.server)
            self.out.show(f"imported your key pair {self.import_keys.fingerprint}")
            return self.import_keys
        try:
            keys = self.store.load_key_pair(server, self.username, password)
        except KeyLocked:
            moved = self.store.retire_key_pair(server, self.username)
            self.out.warn(f"your saved key does not open with this password; it is kept as {moved} "
                          "and a new one is made (older private messages will be unreadable)")
            keys = None
        if keys is None:
            if existed and not self.new_key_agreed:   # (a script; on a terminal it was asked before)
                self.out.warn(NEW_KEY_WARNING.format(user=self.username, server=self.server))
            self.out.show("generating your key...")
            keys = self.store.create_key_pair(server, self.username, password, self.server)
            self.out.show(f"your key fingerprint is {keys.fingerprint}")
        return keys

    # --- operations ------------------------------------------------------------------
    def command(self, line: str) -> Flow:
        """Carry out one line typed at the operation prompt; True when the session is over."""
        words = line.split(maxsplit=1)
        if not words:
            return False
        name, rest = words[0].upper(), (words[1] if len(words) > 1 else "")
        if name == "BM":
            yield from self.broadcast(rest if rest.strip() else None, line)
        elif name == "PM":
            parts = rest.split(maxsplit=1)
            yield from self.private(parts[0] if parts else None, parts[1] if len(parts) > 1 else None, line)
        elif name == "CH":
            yield from self.history(rest.strip())
        elif name in ("EX", "EXIT", "QUIT"):
            yield from self.leave()
            return True
        elif name in ADMIN_COMMANDS:
            yield from self.moderate(ModAction(name.lower()), rest.strip())
        else:
            self.local_command(name, words[0], rest.strip())
        return False

    def local_command(self, name: str, typed: str, argument: str) -> None:
        if name == "WHO":
            self.out.show(self.who_text())
        elif name == "KEYS":
            self.show_keys(argument)
        elif name == "TRUST":
            self.trust(argument)
        elif name in ("IGNORE", "UNIGNORE"):
            self.ignore(argument, name == "IGNORE")
        elif name in ("HELP", "?"):
            for line in HELP_LINES:
                self.out.show(line)
        else:
            line = f"{typed} {argument}".strip()
            self.failed(f"unknown command {typed!r}",
                        f"HELP lists the commands; to send this to everyone: BM {line}")

    def ask_text(self, prompt: str, initial: str = "", resume: str = "") -> Flow:
        """A message line, or None for Ctrl-C, Ctrl-D, end of input or an empty line."""
        event = yield Ask(prompt, initial=initial, resume=resume)
        if not isinstance(event, Submit) or not event.text.strip():
            return None
        return event.text

    def cancel(self, say: bool = True) -> Flow:
        yield from self.request({"op": Op.CANCEL})
        if say:
            self.out.show("cancelled")

    def too_long(self, what: str, text: str) -> bool:
        """True (and said) if text is over the limit; on a terminal it stays to be shortened."""
        problem = text_problem(text)
        if problem is None:
            return False
        if self.interactive:
            self.out.warn(f"{what} not sent: {problem}\n"
                          f"  it is still in the line below: shorten it to {MAX_TEXT_CHARS} characters "
                          "and press Enter (Ctrl-C drops it)")
        else:
            self.failed(f"{what} not sent", problem)
        return True

    def broadcast(self, text: str | None, line: str = "") -> Flow:
        """BM, then SEND the text (asked for when not given)."""
        self.in_flight = (line or f"BM {text}") if text is not None else ""
        try:
            yield from self._broadcast(text, line)
        finally:
            self.in_flight = ""

    def _broadcast(self, text: str | None, line: str) -> Flow:
        if text is not None and self.too_long("BM", text):
            if self.interactive:
                self.retry_line = line or f"BM {text}"  # nothing was sent: the whole line comes back
            return
        reply = yield from self.request({"op": Op.BM})
        if not succeeded(reply):
            self.failed("BM refused", describe_error(reply))
            return
        retry = ""
        while True:
            if text is None:
                text = yield from self.ask_text("message: ", retry, resume="BM ")
                if text is None:
                    yield from self.cancel()
                    return
            if self.too_long("BM", text):
                if not self.interactive:
                    yield from self.cancel(say=False)
                    return
                retry, text = text, None
                continue
            self.in_flight = f"BM {text}"
            reply = yield from self.send_text("BM", {"op": Op.SEND, "text": text}, f"BM {text}")
            if reply is None:  # refused, and the server still waits for a text
                if not self.interactive:
                    yield from self.cancel(say=False)
                    return
                retry, text = text, None
                continue
            if succeeded(reply):
                ts = reply.get("ts")
                self.remember_shown(ts, self.username, text)
                self.out.show(format_own_broadcast(self.username, text, reply.get("recipients"), ts))
            return

    def send_text(self, what: str, body: dict, again: str) -> Flow:
        """SEND a message; the reply, or None if it was refused and the server still waits for a text.
        Refused otherwise (not stored, rate limited, muted: the state is READY), the command
        ``again`` is put back in the line on a terminal, as a message too long is."""
        reply = yield from self.request(body)
        if succeeded(reply):
            return reply
        if reply.get("error") == Error.BAD_REQUEST:
            self.failed(f"{what} not sent", describe_error(reply))
            return None
        back = "; it is back in the line" if self.interactive else ""
        if self.interactive:
            self.retry_line = again
        if reply.get("error") == Error.MUTED:
            self.failed(f"{what} not sent", "you are " + sanction_text("muted", reply) + back)
        else:
            self.failed(f"{what} not sent", describe_error(reply) + back)
        return reply

    def private(self, target: str | None, text: str | None, line: str = "") -> Flow:
        """PM, TARGET, then SEND the text sealed for the target and signed."""
        self.in_flight = (line or f"PM {target} {text}") if text is not None else ""
        try:
            yield from self._private(target, text, line)
        finally:
            self.in_flight = ""

    def _private(self, target: str | None, text: str | None, line: str) -> Flow:
        if text is not None and self.too_long(f"PM to {target}", text):
            if self.interactive:
                self.retry_line = line or f"PM {target} {text}"
            return
        reply = yield from self.request({"op": Op.PM})
        if not succeeded(reply):
            self.failed("PM refused", describe_error(reply))
            return
        self.set_online(reply.get("online"), reply.get("more_online"))
        given = target is not None
        target = yield from self.choose_target(target)
        if target is None:
            yield from self.cancel(say=not given and bool(self.online))
            return
        reply = yield from self.target(target)
        if reply is None:
            return
        name = reply.get("username")
        if not (valid_username(name) and name.lower() == target.lower()):
            name = target  # the server answers with the registered spelling of the same name, nothing else
        stored = reply.get("online") is False
        keeps = self.interactive and text is not None
        their_key = self.target_key(name, reply, "message not sent: it is back in the line below" if keeps
                                    else "message not sent")
        if their_key is None:
            if keeps and self.stopped_by_changed_key:   # to send once trusted, as a message too long
                self.retry_line = line or f"PM {name} {text}"
            self.in_flight = ""   # not sent, and not to be sent again on a reconnect
            yield from self.cancel(say=False)   # the warning said why
            return
        retry = ""
        while True:
            if text is None:
                text = yield from self.ask_text(f"message to {name}: ", retry, resume=f"PM {name} ")
                if text is None:
                    yield from self.cancel()
                    return
            if self.too_long(f"PM to {name}", text):
                if not self.interactive:
                    yield from self.cancel(say=False)
                    return
                retry, text = text, None
                continue
            self.in_flight = f"PM {name} {text}"
            reply = yield from self.send_text(f"PM to {name}", self.sealed_pm(name, their_key, text),
                                              self.in_flight)
            if reply is None:
                if not self.interactive:
                    yield from self.cancel(say=False)
                    return
                retry, text = text, None
                continue
            if succeeded(reply):
                line = format_own_private(name, text)
                if reply.get("recipients") == 0 or stored:
                    line += f"  ({name} is offline: stored, delivered at their next login)"
                self.out.show(line)
            return

    def target(self, target: str) -> Flow:
        """TARGET (in AWAIT_PM_TARGET); the successful reply, or None (said; the state is READY again).

        A user not known to be online is asked for with ``"offline": true``
        (section 4.5: the PM is stored for them); a ``not_online`` to a plain
        TARGET (they left meanwhile) is asked again so. A server that stores
        no PMs answers ``not_online`` to that too: a clean failure.
        """
        offline = target.lower() not in self.online
        while True:
            body: dict = {"op": Op.TARGET, "username": target}
            if offline:
                body["offline"] = True
            reply = yield from self.request(body)
            if succeeded(reply):
                return reply
            error = reply.get("error")
            if error == Error.NOT_ONLINE and not offline:
                offline = True
                again = yield from self.request({"op": Op.PM})
                if succeeded(again):
                    continue
                reply = again
            if error == Error.NO_SUCH_USER:
                self.failed(f"cannot send to {target}", f"there is no user {target}")
            elif error == Error.NOT_ONLINE:
                self.failed(f"cannot send to {target}", f"{target} is not online"
                            + (" (and the server keeps no message for them)" if offline else ""))
            else:
                self.failed(f"cannot send to {target}", describe_error(reply))
            return None

    def choose_target(self, target: str | None) -> Flow:
        """An online user's name (asked for when not given), or None to cancel.

        A name given on the command line (``PM carol hi``) that is not online
        ends the PM at once; one typed at the "to" prompt is asked again.
        """
        asked = target is None
        while True:
            if target is None and not self.online and not self.more_online:
                self.failed("PM", "nobody else is online (PM user message stores one for someone offline)")
                return None
            names = sorted(self.online.values(), key=str.lower)
            if target is None:
                event = yield Ask(f"to (online: {self.who_list()}): ", completions=tuple(names), resume="PM ")
                if not isinstance(event, Submit) or not event.text.strip():
                    return None
                target = event.text.strip()
            if target.lower() in self.online:
                return self.online[target.lower()]
            if target.lower() == self.username.lower():
                self.failed(f"PM to {target}", "a private message to yourself is not possible")
            elif valid_username(target):
                return target  # not online (or the list is trimmed): the server knows, and may store it
            else:
                self.failed(f"PM to {target}", f"{target!r} is not a user name (online: {self.who_list()})")
            if not (asked and self.interactive):
                return None
            target = None

    def target_key(self, name: str, reply: dict, unsent: str = "message not sent") -> pg3lib.PublicKey | None:
        """The target's key from a TARGET reply if it is consistent and trusted, else None (warned;
        ``unsent`` says what became of the message). ``stopped_by_changed_key``: why it was None."""
        self.stopped_by_changed_key = False
        try:
            key = pg3lib.PublicKey.from_key_form(str(reply.get("public_key", "")))
        except pg3lib.InvalidKey:
            self.failed(f"PM to {name}", "the server sent no usable key for them; not sending")
            return None
        if reply.get("fingerprint") != key.fingerprint:
            self.failed(f"PM to {name}", "the server's fingerprint for them does not match the key it sent; "
                        "not sending")
            return None
        if not self.contact_key_trusted(name, key, unsent):
            self.stopped_by_changed_key = True
            if not self.interactive:
                self.failures.append(f"PM to {name}: their key has changed (TRUST {name} accepts it)")
            return None
        if self.store.contact_fingerprint(self.book, name) is None and name.lower() not in self.first_noted:
            self.first_noted.add(name.lower())
            self.out.show(f"* first PM with {name}: their key is {key.fingerprint} (pinned once a PM from them "
                          "verifies)")
        return key

    def sealed_pm(self, name: str, their_key: pg3lib.PublicKey, text: str) -> dict:
        """The SEND body of a PM2: sealed for them, a copy sealed for us, a fresh id and our clock,
        signed (docs/PROTOCOL.md 4.5). Every attempt gets a new id."""
        assert self.keys is not None
        plain = text.encode("utf-8")
        ciphertext = their_key.seal(plain).decode("ascii")
        self_copy = self.keys.public.seal(plain).decode("ascii")
        pm_id = base64.b64encode(os.urandom(protocol.PM_ID_BYTES)).decode("ascii")
        sent = protocol.timestamp(time.time())
        signed = pg3lib.pm2_signed_bytes(pm_id, sent, self.username, name, pg3lib.sealed_digest(ciphertext),
                                         pg3lib.sealed_digest(self_copy))
        return {"op": Op.SEND, "id": pm_id, "sent": sent, "ciphertext": ciphertext, "self_copy": self_copy,
                "signature": self.keys.sign(signed)}

    def known_key(self, name: str) -> pg3lib.PublicKey | None:
        """The key pinned for a contact, if this client holds it (seen this run or saved), else None."""
        pinned = self.store.contact_fingerprint(self.book, name)
        if pinned is None:
            return None
        key = self.contact_keys.get(name.lower())
        if key is None:
            form = self.store.contact_key(self.book, name)
            try:
                key = pg3lib.PublicKey.from_key_form(form) if form else None
            except pg3lib.InvalidKey:
                key = None
        return key if key is not None and key.fingerprint == pinned else None

    def entry_problem(self, entry: dict) -> str | None:
        """Why a CH entry is not verified (section 4.6), or None if it is."""
        sender, receiver = entry.get("from"), entry.get("to")
        if entry.get("type") == "BM" or receiver == "*":
            return None if valid_username(sender) else "not a valid sender name"
        if not (valid_username(sender) and valid_username(receiver)):
            return "not a valid user name"
        if "id" not in entry:
            return "version-1 PM, not signed with an id"
        names = ("ciphertext", "id", "sent", "ciphertext_sha256", "self_copy_sha256", "signature")
        if not all(isinstance(entry.get(k), str) for k in names):
            return "a PM entry with members missing"
        ciphertext, pm_id, sent, ct_sha, sc_sha, signature = (str(entry[k]) for k in names)
        sender, receiver = str(sender), str(receiver)
        mine = sender.lower() == self.username.lower()
        try:
            digest = pg3lib.sealed_digest(ciphertext)
        except UnicodeEncodeError:
            return "not a sealed text"
        if digest != (sc_sha if mine else ct_sha):
            return "the text is not the one signed"
        if mine:
            key = self.keys.public if self.keys is not None else None
        else:
            if receiver.lower() != self.username.lower():
                return "not a PM to or from you"
            key = self.known_key(sender)
        if key is None:
            return f"no key of {sender} known here to check it"
        signed = pg3lib.pm2_signed_bytes(pm_id, sent, sender, receiver, ct_sha, sc_sha)
        if not key.verify(signed, signature):
            if mine and self._opened(ciphertext) is None:   # our copy is sealed for another key too
                return "signed with a key this machine does not have (an older one of yours?)"
            if not mine and self._previous_key_verifies(sender, signed, signature):
                return PREVIOUS_KEY.format(sender)
            return "the signature does not verify" + ("" if mine else f" with {sender}'s key")
        return None

    def _previous_key_verifies(self, sender: str, signed: bytes, signature: str) -> bool:
        """Does a key the contact was trusted with before its current one check this signature?"""
        for form in self.store.previous_contact_keys(self.book, sender):
            try:
                if pg3lib.PublicKey.from_key_form(form).verify(signed, signature):
                    return True
            except pg3lib.InvalidKey:
                continue
        return False

    def history_line(self, entry: dict) -> str:
        """A CH entry as shown, marked when it does not verify."""
        problem = self.entry_problem(entry)
        if problem is not None and not valid_username(entry.get("from")):
            entry = dict(entry, **{"from": ascii(str(entry.get("from")))})
        line = format_history_entry(entry, lambda sealed: self._opened(sealed) if isinstance(sealed, str) else None)
        if problem is not None and problem == PREVIOUS_KEY.format(entry.get("from")):
            return f"{line}  ({problem})"   # it checks out with the key trusted then
        return line if problem is None else f"{UNVERIFIED.format(problem)} {line}"

    def history(self, argument: str) -> Flow:
        """CH [count | all]: the history, over as many frames as the server sends.

        On a terminal a plain CH shows the newest screenful (counted in rows; an
        entry longer than a quarter of the screen is shortened to that) and
        says how many older entries there are; ``CH count`` and ``CH all`` show what they ask
        for, and so does every CH in a script. Entries from ignored users are
        left out (and counted).
        """
        body: dict = {"op": Op.CH}
        page = None
        if argument.lower() == CH_ALL:
            pass
        elif argument:
            if not argument.isdigit() or int(argument) < 1:
                self.failed("CH", "usage: CH [number of newest entries | all]")
                return
            body["limit"] = int(argument)
        else:
            page = self.out.page_rows()
        if "limit" in body and self.ignored:
            yield from self._newest_not_ignored(body["limit"])
            return
        # With a page, only the newest lines that fill it are kept (the rest is counted): a long
        # history is read to its end yet never held whole.
        lines: deque[tuple[str, int, bool]] = deque()  # the line, its rows, whether it was cut
        rows = total = hidden = 0
        tall = entry_rows(page or 0)

        def take(entry: dict) -> None:
            nonlocal rows, total, hidden
            if str(entry.get("from", "")).lower() in self.ignored:
                hidden += 1
                return
            total += 1
            line = self.history_line(entry)
            if page is None:
                self.out.show(line)
                return
            cut = self.out.rows_of(line) > tall
            if cut:
                line = self.out.fit_rows(line, tall)
            lines.append((line, self.out.rows_of(line), cut))
            rows += lines[-1][1]
            while rows > page and len(lines) > 1:
                rows -= lines.popleft()[1]

        if (yield from self._read_history(body, take)) is None:
            return
        for line, _, _ in lines:
            self.out.show(line)
        shortened = sum(cut for _, _, cut in lines)
        shown = len(lines) if page is not None else total
        capped = "limit" in body and total + hidden >= body["limit"]
        self.out.show(history_summary(shown, total - shown, hidden, shortened, capped))

    def _read_history(self, body: dict, take: Callable[[dict], None]) -> Flow:
        """Send the CH request and hand each entry of its pages to ``take``; how many came, or
        None if it was refused (said)."""
        yield Send(body)
        count = 0
        while True:
            reply = yield Reply(Op.CH)
            if not succeeded(reply):
                self.failed("CH failed", describe_error(reply))
                return None
            entries = reply.get("entries")
            for entry in entries if isinstance(entries, list) else ():
                if isinstance(entry, dict):
                    count += 1
                    take(entry)
            if reply.get("more") is not True:
                return count

    def _newest_not_ignored(self, want: int) -> Flow:
        """CH count while users are ignored: the newest ``count`` entries of the others (asked
        for again with a larger limit while ignored ones took the places), and how many of the
        ignored users' came between them."""
        limit = want
        while True:
            kept: deque[tuple[int, dict]] = deque()   # (its place in the reply, the entry)
            hidden: deque[int] = deque()              # the places of ignored ones, newer than kept[0]
            place = visible = 0

            def take(entry: dict, kept: deque = kept, hidden: deque = hidden) -> None:
                nonlocal place, visible
                place += 1
                if str(entry.get("from", "")).lower() in self.ignored:
                    hidden.append(place)
                    return
                visible += 1
                kept.append((place, entry))
                if len(kept) > want:
                    kept.popleft()
                    while hidden and hidden[0] < kept[0][0]:
                        hidden.popleft()

            count = yield from self._read_history({"op": Op.CH, "limit": limit}, take)
            if count is None:
                return
            if len(kept) >= want or count < limit or limit >= CH_MAX_LIMIT:
                break
            limit = min(limit * 4, CH_MAX_LIMIT)
        for _, entry in kept:
            self.out.show(self.history_line(entry))
        capped = count >= limit   # the history may go on further back
        self.out.show(history_summary(len(kept), 0 if capped else visible - len(kept), len(hidden), 0, capped))

    # --- moderation (admins; docs/PROTOCOL.md section 10) ---------------------------------
    def moderate(self, action: ModAction, argument: str) -> Flow:
        """KICK, BAN, UNBAN, MUTE, UNMUTE or BANS; acting on another admin is asked about first."""
        what = action.value.upper()
        if action is ModAction.BANS:
            reply = yield from self.request({"op": Op.MOD, "action": action.value})
            if succeeded(reply):
                self.show_bans(reply)
            else:
                self.failed(what, describe_error(reply))
            return
        words = argument.split(maxsplit=1)
        target, rest = (words[0], words[1] if len(words) > 1 else "") if words else ("", "")
        if not valid_username(target):
            self.failed(what, f"usage: {MOD_USAGE[action]}")
            return
        body: dict = {"op": Op.MOD, "action": action.value, "username": target}
        if action in (ModAction.BAN, ModAction.MUTE):
            first, _, after = rest.partition(" ")
            if first[:1].isdigit():
                try:
                    body["seconds"] = parse_duration(first)
                except ValueError as exc:
                    self.failed(f"{what} {target}", str(exc))
                    return
                rest = after
            elif action is ModAction.MUTE:
                self.failed(f"{what} {target}", f"usage: {MOD_USAGE[action]}")
                return
        rest = rest.strip()
        if rest and action in (ModAction.UNBAN, ModAction.UNMUTE):
            self.failed(what, f"usage: {MOD_USAGE[action]}")
            return
        if len(rest) > MAX_REASON_CHARS:
            self.failed(f"{what} {target}", f"a reason is at most {MAX_REASON_CHARS} characters")
            return
        if rest:
            body["reason"] = rest
        reply = yield from self.request(body)
        if reply.get("error") == Error.CONFIRM_NEEDED:
            admin = one_line(reply.get("username") or target, 40)
            if not self.interactive:
                self.failed(f"{what} {target}", f"{admin} is an admin; acting on an admin is confirmed "
                            "only at a terminal")
                return
            answer = yield Ask(f"{admin} is an admin: {action.value} anyway? [y/N] ")
            if not (isinstance(answer, Submit) and answer.text.strip().lower() in ("y", "yes")):
                self.out.show(f"not done: {admin} was not {PAST[action]}")
                return
            reply = yield from self.request({**body, "confirm": True})
        if not succeeded(reply):
            self.failed(f"{what} {target}", describe_error(reply))
            return
        name = one_line(reply.get("username") or target, 40)
        until = reply.get("until")
        if action in (ModAction.BAN, ModAction.MUTE):
            end = f"until {local_time(until, with_date=True)}" if parse_timestamp(until) else "for good"
            self.out.show(f"done: {name} is {PAST[action]} {end}")
        else:
            self.out.show(f"done: {name} {PAST[action]}")

    def show_bans(self, reply: dict) -> None:
        """The BANS listing: who, until when, by whom, why."""
        shown = 0
        for kind, label in (("bans", "banned"), ("mutes", "muted")):
            entries = reply.get(kind)
            for entry in entries if isinstance(entries, list) else ():
                if isinstance(entry, dict):
                    self.out.show(f"{one_line(entry.get('username', '?'), 40)}: {sanction_text(label, entry)}")
                    shown += 1
        more = reply.get("more")
        if isinstance(more, int) and not isinstance(more, bool) and more > 0:
            self.out.show(f"(and {more} more not shown)")
        elif not shown:
            self.out.show("nobody is banned or muted")

    def leave(self) -> Flow:
        self.exiting = True
        yield from self.request({"op": Op.EX})
        self.out.show("bye")

    # --- ignoring users ----------------------------------------------------------------
    def ignore(self, name: str, hide: bool) -> None:
        """IGNORE name / UNIGNORE name: hide a user's BMs and PMs here (remembered); IGNORE alone lists."""
        if not name:
            if not hide:
                self.failed("UNIGNORE", "usage: UNIGNORE user")
            elif self.ignored:
                self.out.show("ignoring: " + ", ".join(sorted(self.ignored)) + " (UNIGNORE user shows them again)")
            else:
                self.out.show("you ignore nobody (IGNORE user hides a user's messages)")
            return
        command = "IGNORE" if hide else "UNIGNORE"
        if not valid_username(name):
            self.failed(command, f"{name!r} is not a user name")
            return
        if name.lower() == self.username.lower():
            self.failed(command, "that is you")
            return
        changed = self.store.set_ignored(self.book, name, hide)
        self.ignored = self.store.ignored(self.book)
        if hide:
            self.out.show(f"ignoring {name}: their BMs and PMs are hidden, in CH too (UNIGNORE {name} undoes it)"
                          if changed else f"you already ignore {name}")
        else:
            self.out.show(f"no longer ignoring {name}" if changed else f"you do not ignore {name}")

    def is_ignored(self, sender: Any) -> bool:
        return isinstance(sender, str) and sender.lower() in self.ignored

    # --- keys and trust ----------------------------------------------------------------
    def contact_key_trusted(self, name: str, key: pg3lib.PublicKey, consequence: str) -> bool:
        """True if key is the one pinned for name, or none is pinned yet (it is pinned only once a PM
        signed with it verifies: ``pin_contact``); else warn."""
        lower = name.lower()
        pinned = self.store.contact_fingerprint(self.book, lower)
        if pinned is None or pinned == key.fingerprint:
            self.contact_keys[lower] = key
            return True
        self.changed_keys[lower] = key
        self.out.warn(f"{contact_key_changed_text(name, pinned, key.fingerprint)} ({consequence})")
        return False

    def pin_contact(self, name: str, key: pg3lib.PublicKey) -> None:
        """A PM signed with key verified: remember it for name if nothing is remembered yet."""
        if self.store.contact_fingerprint(self.book, name) is None:
            self.store.remember_contact(self.book, name, key.fingerprint)
            self.out.show(f"* first private message from {name}: remembering their key {key.fingerprint}")
        if self.store.contact_key(self.book, name) != key.key_form:
            self.store.remember_contact_key(self.book, name, key.key_form)

    def trust(self, name: str) -> None:
        """TRUST name: accept the new key the contact presented; show the PMs held back."""
        if not name:
            self.failed("TRUST", "usage: TRUST user")
            return
        key = self.changed_keys.pop(name.lower(), None)
        if key is None:
            pinned = self.store.contact_fingerprint(self.book, name)
            self.out.show(f"no new key from {name} to trust (remembered: {pinned or 'none'})")
            return
        self.store.remember_contact(self.book, name, key.fingerprint)
        self.store.remember_contact_key(self.book, name, key.key_form)
        self.contact_keys[name.lower()] = key
        self.out.show(f"now trusting {name}'s key {key.fingerprint}")
        for body in self.held.pop(name.lower(), []):
            self.receive_private(body)

    def show_keys(self, name: str) -> None:
        """KEYS [name]: fingerprints to compare over another channel."""
        if name:
            pinned = self.store.contact_fingerprint(self.book, name)
            self.out.show(f"{name}: {pinned or 'no key remembered yet'}")
            changed = self.changed_keys.get(name.lower())
            if changed is not None:
                self.out.show(f"{name} now presents {changed.fingerprint} (not trusted; TRUST {name} accepts it)")
            return
        if self.keys is not None:
            self.out.show(f"your key ({self.username} at {self.server}): {self.keys.fingerprint}")
        self.out.show(f"server {self.server}: {self.store.server_fingerprint(self.server) or 'unknown'}")
        for contact, fingerprint in sorted(self.store.contacts(self.book).items()):
            self.out.show(f"{contact}: {fingerprint}")

    def _opened(self, sealed: str) -> str | None:
        """open_sealed, remembered for the last text (CH checks an entry, then shows it)."""
        if self._last_opened[0] != sealed:
            self._last_opened = (sealed, self.open_sealed(sealed))
        return self._last_opened[1]

    def open_sealed(self, sealed: Any) -> str | None:
        """A message sealed for our key, or None if it is not ours to read."""
        if self.keys is None or not isinstance(sealed, str):
            return None
        try:
            return self.keys.open(sealed).decode("utf-8", errors="replace")
        except pg3lib.CryptoError:
            return None

    # --- what arrives ------------------------------------------------------------------
    def end_burst(self) -> None:
        """The login burst is over (a quiet moment, a live frame, a command): show the kept PMs held."""
        self.burst = False
        if self.kept_lines:
            self.out.show(KEPT_HEADER)
            for warning, line in self.kept_lines:
                (self.out.warn if warning else self.out.show)(line)
            self.kept_lines = []

    def on_data(self, body: dict) -> None:
        """A D frame: show it (any time, in any state); BMs and PMs of ignored users are dropped."""
        op = body.get("op")
        if self.burst and not (body.get("recent") is True or body.get("offline") is True):
            self.end_burst()   # a live event: what the burst held comes first
        if op in (Op.BM, Op.PM) and self.is_ignored(body.get("from")):
            log.debug("hiding a %s from an ignored user", op)
        elif op == Op.BM:
            sender, text, ts = body.get("from"), str(body.get("text", "")), body.get("ts")
            if not self.remember_shown(ts, sender, text) and body.get("recent") is True:
                return  # a catch-up repeats the BMs at the moment it starts from: shown already
            if body.get("recent") is True and self.recent_header:
                self.out.show(self.recent_header)
                self.recent_header = ""
            line = format_broadcast(str(sender) if valid_username(sender) else ascii(str(sender)), text, ts)
            if not valid_username(sender):
                line = f"{UNVERIFIED.format('not a valid sender name')} {line}"
            page = self.out.page_rows()
            if body.get("recent") is True and page is not None and self.out.rows_of(line) > entry_rows(page):
                line = self.out.fit_rows(line, entry_rows(page))   # the room's past: a screenful stays one
            self.out.show(line)
        elif op == Op.PM:
            self.receive_private(body)
        elif op == Op.NOTICE:  # what an admin did (section 10)
            self.out.show(f"[{local_time(body.get('ts'))}] * {one_line(body.get('text', ''), 400)}")
        elif op == Op.PRESENCE:
            name = body.get("username")
            online = body.get("online") is True
            if not isinstance(name, str) or not valid_username(name) or name.lower() == self.username.lower():
                log.debug("ignoring a PRESENCE of %r", name)
                return
            if online:
                self.online[name.lower()] = name
            else:
                self.online.pop(name.lower(), None)
            self.out.show(format_presence(name, online, body.get("ts")))
        else:
            log.debug("ignoring a D frame with op %r", op)

    def remember_shown(self, ts: Any, sender: Any, text: str) -> bool:
        """Note a BM as shown (and its time as where the BMs seen end); False if it was shown before."""
        if not isinstance(ts, str) or parse_timestamp(ts) is None:
            return True
        if ts > self.last_seen:
            self.last_seen = ts
        key = (ts, str(sender), text)
        if key in self.shown_set:
            return False
        self.shown.append(key)
        self.shown_set.add(key)
        if len(self.shown) > SHOWN_MEMORY:
            self.shown_set.discard(self.shown.popleft())
        return True

    def receive_private(self, body: dict) -> None:
        """A PM; one kept while we were away, in the login burst, is held whole (its notices too)."""
        if not (self.burst and body.get("offline") is True):
            self.check_private(body)
            return
        held = HeldOutput()
        shown, self.out = self.out, held
        try:
            self.check_private(body)
        finally:
            self.out = shown
        self.kept_lines.extend(held.lines)

    def check_private(self, body: dict) -> None:
        """A PM: check it (section 4.5) with the sender's pinned key, then decrypt and show it.

        A bad signature, an id seen before from that sender, or a live PM whose
        ``sent`` is more than 10 minutes from our clock is a warning, never the
        sender's words. A version-1 PM (no id) is shown marked unverified. A new
        contact's key is pinned only once a PM signed with it verified.
        """
        sender = body.get("from")
        if not isinstance(sender, str) or not valid_username(sender):
            self.out.warn(f"a private message from an invalid sender name, {one_line(sender, 40)}; not shown")
            return
        try:
            key = pg3lib.PublicKey.from_key_form(str(body.get("sender_key", "")))
        except pg3lib.InvalidKey:
            self.out.warn(f"a private message from {sender} came without a usable key; not shown")
            return
        if not self.contact_key_trusted(sender, key, "message held until then"):
            self.held.setdefault(sender.lower(), []).append(body)
            del self.held[sender.lower()][:-20]
            return
        ciphertext, signature = body.get("ciphertext"), body.get("signature")
        offline = body.get("offline") is True
        if "id" not in body:
            if not (isinstance(ciphertext, str) and isinstance(signature, str)
                    and key.verify(pg3lib.pm_signed_bytes(sender, self.username, ciphertext), signature)):
                self.out.warn(f"WARNING: a private message claiming to be from {sender} failed its signature "
                              "check; not shown")
                return
            text = self.open_sealed(ciphertext)
            self.out.show(UNVERIFIED.format("version-1 PM, could be a replay") + " "
                          + format_private(sender, UNREADABLE if text is None else text, body.get("ts")))
            return
        pm_id, sent, sc_sha = (str(body.get(k, "")) for k in ("id", "sent", "self_copy_sha256"))
        verified = False
        if all(isinstance(body.get(k), str) for k in ("id", "sent", "self_copy_sha256", "ciphertext", "signature")):
            ciphertext, signature = str(ciphertext), str(signature)
            try:
                signed = pg3lib.pm2_signed_bytes(pm_id, sent, sender, self.username,
                                                 pg3lib.sealed_digest(ciphertext), sc_sha)
                verified = key.verify(signed, signature)
            except UnicodeEncodeError:
                verified = False
        if not verified:
            self.out.warn(f"WARNING: a private message claiming to be from {sender} failed its signature "
                          "check; not shown")
            return
        self.pin_contact(sender, key)
        if self.seen is not None and (sender, pm_id) in self.seen:
            if offline:
                return   # a kept copy of one shown already: a node of the room died before it knew
            self.out.warn(f"WARNING: a private message from {sender} was delivered AGAIN (id {one_line(pm_id, 30)} "
                          "seen before): a replay, not shown")
            return
        moment = protocol.parse_timestamp(sent)
        if not offline and (moment is None or abs(moment - time.time()) > protocol.PM_CLOCK_WINDOW):
            if self.seen is not None:
                self.seen.add(sender, pm_id)
            self.out.warn(f"WARNING: a private message from {sender} says it was sent at {one_line(sent, 30)}, "
                          "more than 10 minutes from this clock: a replay or a held message, not shown")
            return
        if self.seen is not None:
            self.seen.add(sender, pm_id)
        text = self.open_sealed(ciphertext)
        line = format_private(sender, UNREADABLE if text is None else text, body.get("ts"))
        if offline:
            line = kept_private(line, sent)
        self.out.show(line)

    def set_online(self, names: Any, more: Any = 0) -> None:
        """The online list of a KEY or PM reply; ``more_online`` counts names the server left out."""
        if isinstance(names, list):
            me = self.username.lower()
            self.online = {n.lower(): n for n in names if valid_username(n) and n.lower() != me}
            self.more_online = more if isinstance(more, int) and not isinstance(more, bool) and more > 0 else 0

    def who_list(self) -> str:
        """The other users online (for the PM prompt)."""
        names = ", ".join(sorted(self.online.values(), key=str.lower)) or "nobody else"
        return f"{names} and {self.more_online} more" if self.more_online else names

    def who_text(self) -> str:
        """WHO: everyone online, ourselves first and marked."""
        me = f"{self.username} (you)"
        if not self.online and not self.more_online:
            return f"online: {me}; nobody else"
        return f"online: {me}, {self.who_list()}"


# --- the socket ------------------------------------------------------------------------

class Connection:
    """A non-blocking TCP connection speaking TLS (docs/PROTOCOL.md section 0) over memory BIOs.

    Frames go out through the TLS object into a buffer of ciphertext, and come
    in from the socket through the TLS object into a frame decoder; the one
    ``selectors`` loop of the driver stays as it is (an ``SSLWantReadError`` only
    means "read more"). There is no CA or host name check: the certificate's key
    is compared with the pinned one by the session (section 9). A server that
    answers the handshake with a plain ``C`` frame (``server_busy``, sent before
    it reads) is read as plain frames, so that its error can be shown.
    """

    def __init__(self, sock: socket.socket, tls: bool = True) -> None:
        self.sock = sock
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.decoder = framing.FrameDecoder(limit=CLIENT_FRAME_LIMIT)
        self.outgoing = bytearray()
        self.malformed: str | None = None  # why the stream stopped being frames
        self.handshaken = not tls
        self.plain_refusal = False  # the server answered the handshake with a plain frame
        self.ended = ""  # why TLS ended (close_notify, an error), once it has
        self._first_byte = tls
        self._incoming = ssl.MemoryBIO()
        self._tls_out = ssl.MemoryBIO()
        self.tls: ssl.SSLObject | None = None
        if tls:
            self.tls = tls_context().wrap_bio(self._incoming, self._tls_out, server_side=False)
            self._handshake()

    @classmethod
    def open(cls, host: str, port: int, timeout: float = CONNECT_TIMEOUT) -> Connection:
        """Connect (the TLS handshake then runs in the driver's loop).

        Raises:
            ClientExit: unknown host, refused, unreachable, timed out.
        """
        where = f"{host}:{port}"
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except socket.gaierror as exc:
            raise ClientExit(f"unknown host {host!r} ({exc.strerror})") from None
        except ConnectionRefusedError:
            raise ClientExit(f"cannot connect to {where}: connection refused (is the server running?)") from None
        except socket.timeout:
            raise ClientExit(f"cannot connect to {where}: timed out") from None
        except OSError as exc:
            raise ClientExit(f"cannot connect to {where}: {exc.strerror or exc}") from None
        return cls(sock)

    def peer_certificate(self) -> bytes | None:
        """The server's certificate (DER), once the handshake has finished."""
        return self.tls.getpeercert(binary_form=True) if self.tls is not None and self.handshaken else None

    def _handshake(self) -> None:
        assert self.tls is not None
        try:
            self.tls.do_handshake()
            self.handshaken = True
            log.debug("TLS %s, %s", self.tls.version(), (self.tls.cipher() or ("?",))[0])
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass
        except ssl.SSLError as exc:
            raise ClientExit(f"the TLS handshake with the server failed: {one_line(exc.reason or exc)}") from None
        finally:
            self._collect()

    def _collect(self) -> None:
        if self._tls_out.pending:
            self.outgoing += self._tls_out.read()

    def send(self, body: dict) -> None:
        log.debug("-> %s", body.get("op"))
        data = framing.command(body)
        if self.tls is not None and not self.plain_refusal:
            self.tls.write(data)  # a memory BIO never blocks
            self._collect()
        else:
            self.outgoing += data
        self.flush()

    @property
    def wants_write(self) -> bool:
        return bool(self.outgoing)

    def flush(self) -> None:
        """Send what the kernel takes now; keep the rest.

        Raises:
            ConnectionClosed: the connection broke.
        """
        while self.outgoing:
            try:
                sent = self.sock.send(self.outgoing)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                raise ConnectionClosed(str(exc)) from None
            del self.outgoing[:sent]

    def _plaintext(self, chunk: bytes) -> bytes:
        """What the ciphertext chunk completes (b"" if nothing yet); raises ConnectionClosed at TLS's end."""
        assert self.tls is not None
        if self._first_byte:
            self._first_byte = False
            if chunk[:1] in (framing.KIND_COMMAND.encode(), framing.KIND_DATA.encode()):
                self.plain_refusal = True  # section 0: a refusal before the handshake is a plain frame
                log.debug("the server answered the TLS handshake with a plain frame")
                return chunk
        self._incoming.write(chunk)
        if not self.handshaken:
            self._handshake()
            if not self.handshaken:
                return b""
        parts = []
        try:
            while True:  # every whole record so far: no plaintext waits inside the TLS object
                part = self.tls.read(65536)
                if not part:
                    self.ended = "end of TLS"
                    break
                parts.append(part)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass
        except ssl.SSLZeroReturnError:
            self.ended = "end of TLS"
        except ssl.SSLError as exc:
            self.ended = f"TLS error: {exc}"
        finally:
            self._collect()
        if not parts and self.ended:
            raise ConnectionClosed(self.ended)
        return b"".join(parts)  # the frames before the end are not lost (a BYE, the EX reply)

    def receive(self) -> list[framing.Frame]:
        """The frames completed by what arrived.

        When the stream stops being frames, the ones before the bad one are still
        returned (a BYE or a message is not lost) and ``malformed`` says why; the
        caller ends after them.

        Raises:
            ConnectionClosed: end of stream or a broken connection.
            ClientExit: the server sent something that is not a frame (reported before).
        """
        if self.malformed is not None:
            raise ClientExit(f"the server sent a malformed frame: {self.malformed}")
        if self.ended:
            raise ConnectionClosed(self.ended)
        try:
            chunk = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError as exc:
            raise ConnectionClosed(str(exc)) from None
        if not chunk:
            raise ConnectionClosed("end of stream")
        if self.tls is not None and not self.plain_refusal:
            chunk = self._plaintext(chunk)
            if not chunk:
                return []
        try:
            return self.decoder.feed(chunk)
        except framing.ProtocolError as exc:
            self.malformed = one_line(exc.message)
            return exc.frames

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def tls_context() -> ssl.SSLContext:
    """TLS 1.2 or later, no CA and no host name check: the pin of section 9 is the check."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


# --- the two front ends -------------------------------------------------------------------

def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except InterruptedError:
            continue
        view = view[written:]


class PlainScreen(Output):
    """Stdin is not a terminal: lines in, lines out, no prompts and no escape codes."""

    interactive = False

    def __init__(self, fd_in: int = 0) -> None:
        self.fd_in = fd_in
        self.wakeup_fd: int | None = None
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._partial = ""

    def __enter__(self) -> PlainScreen:
        if isinstance(sys.stdout, io.TextIOWrapper):
            sys.stdout.reconfigure(errors="backslashreplace")
        return self

    def __exit__(self, *exc_info: object) -> None:
        sys.stdout.flush()

    def read_input(self) -> tuple[list[Event], bool]:
        """Whole lines that arrived, and whether input has ended."""
        try:
            data = os.read(self.fd_in, 65536)
        except OSError:
            data = b""
        text = self._partial + self._decoder.decode(data, final=not data)
        lines = text.split("\n")
        self._partial = lines.pop()
        events: list[Event] = [Submit(line[:-1] if line.endswith("\r") else line) for line in lines]
        if not data and self._partial:
            events.append(Submit(self._partial.rstrip("\r")))
            self._partial = ""
        return events, not data

    def show(self, text: str) -> None:
        for line in text.split("\n"):
            sys.stdout.write(visible(line) + "\n")
        sys.stdout.flush()

    def warn(self, text: str) -> None:
        sys.stdout.flush()
        for line in text.split("\n"):
            sys.stderr.write(visible(line) + "\n")
        sys.stderr.flush()

    def busy(self) -> None:
        pass

    def waiting(self, note: str, short: str = "") -> None:
        pass

    def ask(self, ask: Ask) -> None:
        pass

    def answered(self, ask: Ask, event: Event) -> None:
        pass

    def on_wakeup(self) -> None:
        pass


def cbreak_attributes(attrs: list) -> list:
    """Terminal attributes for the editor: no echo, no line buffering, no signal keys, no flow control."""
    new: list = [list(a) if isinstance(a, list) else a for a in attrs]
    new[0] &= ~(termios.ICRNL | termios.INLCR | termios.IGNCR | termios.IXON)
    new[3] &= ~(termios.ECHO | termios.ICANON | termios.ISIG | termios.IEXTEN)
    new[6][termios.VMIN] = 1
    new[6][termios.VTIME] = 0
    return new


class TtyScreen(Output):
    """Stdin is a terminal: the line editor in cbreak mode; incoming lines above the prompt."""

    interactive = True

    def __init__(self, fd_in: int = 0, fd_out: int = 1) -> None:
        self.fd_in = fd_in
        self.fd_out = fd_out
        self.editor = LineEditor()
        self.prompt: str | None = None  # None: waiting for the server, no prompt shown
        self.note = ""  # shown instead of a prompt while a reply is slow to come
        self.offline = False  # reconnecting: what is typed meanwhile is shown, after the note in short
        self.short_note = ""  # the note as the prompt before a line typed while reconnecting
        self.width = 80
        self.height = 24
        self.wakeup_fd: int | None = None
        self._wakeup_write: int | None = None
        self._resized = False
        self._saved: list | None = None
        self._encoding = sys.stdout.encoding or "utf-8"

    # --- terminal mode -------------------------------------------------------------
    def __enter__(self) -> TtyScreen:
        self._saved = termios.tcgetattr(self.fd_in)
        atexit.register(self.restore)
        termios.tcsetattr(self.fd_in, termios.TCSADRAIN, cbreak_attributes(self._saved))
        self._write(PASTE_ON)   # a paste comes marked, so that its lines are text, not commands
        self._measure()
        self.wakeup_fd, self._wakeup_write = os.pipe()
        os.set_blocking(self.wakeup_fd, False)
        os.set_blocking(self._wakeup_write, False)
        signal.set_wakeup_fd(self._wakeup_write)
        signal.signal(signal.SIGWINCH, self._on_resize)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.restore()

    def restore(self) -> None:
        """Put the terminal back as it was (idempotent; safe from atexit)."""
        saved, self._saved = self._saved, None
        if saved is None:
            return
        try:
            self._write("\r\x1b[K" + PASTE_OFF)
            termios.tcsetattr(self.fd_in, termios.TCSADRAIN, saved)
        except OSError:
            pass
        signal.signal(signal.SIGWINCH, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        for fd in (self.wakeup_fd, self._wakeup_write):
            if fd is not None:
                os.close(fd)
        self.wakeup_fd = self._wakeup_write = None

    def _on_resize(self, signum: int, frame: object) -> None:
        self._resized = True

    def on_wakeup(self) -> None:
        """A signal arrived (the wakeup pipe): redraw after a resize."""
        try:
            while os.read(self.wakeup_fd, 512):  # type: ignore[arg-type]
                pass
        except BlockingIOError:
            pass
        if self._resized:
            self._resized = False
            self._measure()
            self._write(self._line())

    def _measure(self) -> None:
        try:
            size = os.get_terminal_size(self.fd_out)
            self.width, self.height = size.columns or 80, size.lines or 24
        except OSError:
            self.width, self.height = 80, 24

    def page_rows(self) -> int:
        """A screenful of a listing: the rows but for its closing line and the prompt."""
        return max(self.height - 2, 5)

    def rows_of(self, text: str) -> int:
        return sum(len(wrap_rows(line, self.width)) for line in visible(text).split("\n"))

    def fit_rows(self, text: str, rows: int) -> str:
        # Cut what will be shown (escapes included); visible() leaves its own output as it is.
        width = max(self.width, 1)
        cut = shorten(visible(text), rows * width - 1)
        while self.rows_of(cut) > rows and text_width(cut) > width:   # breaks at spaces leave columns unused
            cut = shorten(cut, text_width(cut) - width // 2)
        return cut

    def suspend(self) -> None:
        """Ctrl-Z: give the terminal back, stop, and take it again when continued."""
        if self._saved is None:
            return
        self._write("\r\x1b[K" + PASTE_OFF)
        termios.tcsetattr(self.fd_in, termios.TCSADRAIN, self._saved)
        os.kill(os.getpid(), signal.SIGTSTP)
        termios.tcsetattr(self.fd_in, termios.TCSADRAIN, cbreak_attributes(self._saved))
        self._measure()
        self._write(PASTE_ON + self._line())

    # --- input ---------------------------------------------------------------------
    def read_input(self) -> tuple[list[Event], bool]:
        """The events typed, and whether the terminal is gone."""
        try:
            data = os.read(self.fd_in, 4096)
        except OSError:
            data = b""
        if not data:
            return [], True
        events: list[Submit | Key] = []
        for event in self.editor.feed(data):
            if event is Key.SUSPEND:
                self.suspend()
            elif event is Key.CLEAR_SCREEN:
                self._write("\x1b[H\x1b[2J")
            else:
                events.append(event)
        self._write(self._line())
        return events, False

    # --- output --------------------------------------------------------------------
    def _write(self, text: str) -> None:
        _write_all(self.fd_out, text.encode(self._encoding, errors="backslashreplace"))

    def _line(self) -> str:
        if self.prompt is None:
            if self.offline and self.editor.chars:   # what is typed, after the status in short
                return self.editor.redraw(f"[{self.short_note or 'reconnecting'}] ", self.width)
            return "\r\x1b[K" + visible(self.note[:max(self.width - 1, 0)])
        return self.editor.redraw(self.prompt, self.width)

    def show(self, text: str) -> None:
        """Print lines above the edit line (wrapped at spaces to the terminal's width), then
        redraw the prompt and the half-typed text."""
        body = "".join(row + "\r\n" for line in text.split("\n") for row in wrap_rows(visible(line), self.width))
        self._write("\r\x1b[K" + body + self._line())

    def warn(self, text: str) -> None:
        self.show("! " + text)

    def busy(self) -> None:
        self.prompt = None
        self.note = ""
        self.editor.secret = not self.offline  # text typed ahead is kept but not echoed (a short wait)

    def disconnected(self) -> None:
        """Reconnecting (it may take minutes): what is typed is shown, not typed blind."""
        self.offline = True
        self.editor.secret = False
        self._write(self._line())

    def waiting(self, note: str, short: str = "") -> None:
        """The awaited reply is slow: say so on the edit line (until the next prompt); ``short``,
        while reconnecting, goes before a line being typed."""
        self.note, self.short_note = note, short or self.short_note
        if self.prompt is None:
            self._write(self._line())

    def ask(self, ask: Ask) -> None:
        self.note = self.short_note = ""
        self.offline = False
        self.prompt = ask.prompt
        self.editor.secret = ask.secret
        self.editor.completions = ask.completions
        if ask.initial and not self.editor.chars:  # text typed ahead meanwhile is the user's: keep it
            self.editor.set_text(ask.initial)
        self._write(self._line())

    def take_line(self) -> str:
        """The half-typed line, taken out of the editor (a connection dropped under it)."""
        text = self.editor.text
        self.editor.clear()
        return text

    def put_line(self, text: str) -> None:
        """Text for the edit line when the next prompt comes (what take_line took, perhaps more)."""
        if text:
            self.editor.set_text(text)

    def answered(self, ask: Ask, event: Event) -> None:
        """Leave the question and its answer on screen, like a shell's transcript.

        The transcript is one row at most: a long message is shown whole by its
        echo (or kept in the line when it was too long), not twice. A ``^C`` or
        ``^D`` stays at its end when the line is cut, so a dropped line never
        reads like a sent one.
        """
        mark = ""
        if isinstance(event, Submit):
            answer = "" if ask.secret else event.text
            if not ask.secret:
                self.editor.add_history(event.text)
        elif event is Key.INTERRUPT:
            answer, mark = ("" if ask.secret else self.editor.interrupted), "^C"  # what was dropped, as a shell shows
        else:
            answer, mark = "", "^D"
        self.prompt = None
        row = shorten(ask.prompt + answer, max(self.width - 1 - len(mark), 8)) + mark
        self._write("\r\x1b[K" + visible(row) + "\r\n")


Screen = Union[TtyScreen, PlainScreen]


# --- the loop ------------------------------------------------------------------------------

class ReconnectPlan:
    """Where and when the next connect goes after a lost connection (no I/O of its own).

    Tries go in rounds over the room's addresses, starting at the one in use: an
    address that fails is followed at once by the next, and a round that fails by
    the next wait of ``delays``; after the last one, giving up.
    """

    def __init__(self, addresses: Sequence[str], current: int = 0,
                 delays: Sequence[float] = RECONNECT_DELAYS) -> None:
        self.addresses = list(addresses)
        self.current = current  # the address in use, or tried next
        self.delays = delays
        self.rounds = 0  # the waits so far since the loss
        self.left = 0  # the addresses of this round not tried yet
        self.reasons: dict[int, str] = {}  # why each address failed last

    def lost(self) -> float:
        """A new loss: the waits start again, at the address that was in use; the first wait."""
        self.rounds, self.reasons = 0, {}
        wait = self._wait()
        assert wait is not None
        return wait

    def failed(self, why: str) -> float | None:
        """The try at ``current`` failed: the wait before the next try (0: another address at
        once), or None: every round is spent."""
        self.reasons[self.current] = why
        self.current = (self.current + 1) % len(self.addresses)
        self.left -= 1
        return 0.0 if self.left > 0 else self._wait()

    def _wait(self) -> float | None:
        if self.rounds >= len(self.delays):
            return None
        self.rounds, self.left = self.rounds + 1, len(self.addresses)
        return self.delays[self.rounds - 1]

    def given_up(self) -> str:
        """Why the client stops trying (every round spent)."""
        if len(self.addresses) == 1:
            last = self.reasons.get(0)
            return (f"could not reconnect to {self.addresses[0]} ({self.rounds} attempts"
                    f"{f'; the last: {last}' if last else ''}); giving up")
        tried = "; ".join(f"{self.addresses[i]}: {self.reasons.get(i, 'not tried')}"
                          for i in range(len(self.addresses)))
        return (f"could not reconnect ({self.rounds} rounds over {len(self.addresses)} addresses; "
                f"the last: {tried}); giving up")


class Driver:
    """Runs a Session's flow over one selectors loop on the socket and standard input.

    On a terminal, once logged in, a lost connection (it dropped, or BYE ``shutdown`` or
    ``too_slow``) is connected again (section 11): the flow in progress is dropped (the
    half-typed line kept, a message not confirmed put back in it), connects are tried with
    growing waits (``RECONNECT_DELAYS``, non-blocking, so typing and Ctrl-C still work) and
    the session's ``rejoin`` flow runs on the new connection. A script ends instead.
    With several addresses (the room's nodes, ``--fallback``), each attempt goes round
    them: one that fails is followed at once by the next, and the wait comes after a
    whole round has failed.
    """

    def __init__(self, session: Session, connection: Connection, screen: Screen,
                 addresses: Sequence[tuple[str, int]] = (), current: int = 0) -> None:
        self.session = session
        self.connection = connection
        self.screen = screen
        self.addresses = list(addresses)  # where to connect again (none: never)
        self.plan = ReconnectPlan([server_address(host, port) for host, port in addresses] or ["?"], current)
        self.connected = True  # False while a lost connection is being replaced
        self.reconnecting = False  # from a loss until the new login's KEY is answered
        self.login_until: float | None = None  # a reconnect's login must reach KEY's reply by then
        self.burst_until: float | None = None  # the login burst counts as over then (no frame since)
        self.told_not_sent = False  # Enter while reconnecting was answered (once per loss)
        self.wait_why = ""  # why the last try failed, for the status line while waiting
        self.tick_at: float | None = None  # when the status line's countdown is redrawn next
        self.reconnect_at: float | None = None  # when the next connect starts
        self.pending: socket.socket | None = None  # a connect in progress
        self.pending_until = 0.0
        self.flow = session.run()
        self.waiting_for: str | None = None  # the op of the reply the flow waits for
        self.asking: Ask | None = None  # the question the flow waits to have answered
        self.inputs: deque[Event] = deque()
        self.input_closed = False
        self.finished = False
        self.waiting_since: float | None = None  # when the awaited reply was asked for, until noted slow
        self.selector = selectors.DefaultSelector()

    def run(self) -> None:
        """Until the flow ends (EX, or a ClientExit raised from inside)."""
        self.selector.register(self.connection.sock, selectors.EVENT_READ, "socket")
        self._watch_input()
        if self.screen.wakeup_fd is not None:
            self.selector.register(self.screen.wakeup_fd, selectors.EVENT_READ, "wakeup")
        try:
            self._advance(None)
            while not self.finished:
                self._guarded(self._deliver_inputs)
                if self.finished:
                    break
                if self.connected:
                    self._watch_socket()
                for key, mask in self.selector.select(self._timeout()):
                    self._dispatch(key.data, mask)
                    if self.finished:
                        break
                self._timers_due()
        finally:
            self.selector.close()
            if self.pending is not None:
                self.pending.close()

    def _guarded(self, step: Callable[[], None]) -> None:
        """Run a step that may write to the socket; a broken connection is a lost one."""
        try:
            step()
        except PassingFailure as exc:
            self._lost(str(exc))
        except ConnectionClosed as exc:
            self._lost(f"the connection dropped ({one_line(exc, 60)})")

    def _timeout(self) -> float | None:
        waits = [t for t in (self._slow_reply_timeout(),) if t is not None]
        now = time.monotonic()
        if self.reconnect_at is not None:
            waits.append(max(0.0, self.reconnect_at - now))
        if self.pending is not None:
            waits.append(max(0.0, self.pending_until - now))
        if self.login_until is not None:
            waits.append(max(0.0, self.login_until - now))
        if self.burst_until is not None:
            waits.append(max(0.0, self.burst_until - now))
        if self.tick_at is not None:
            waits.append(max(0.0, self.tick_at - now))
        return min(waits) if waits else None

    # --- a lost connection (section 11) -------------------------------------------------
    def _lost(self, reason: str) -> None:
        """The connection is gone: end (a script, before the first login, or while leaving) or reconnect."""
        if self.session.exiting:
            self.finished = True
            return
        if not self.session.joined and self._keep_login_prompt(reason):
            return
        if not self.addresses or not self.session.joined or not self.session.interactive:
            raise ClientExit(reason)
        again = self.reconnecting  # an attempt that failed: the status line says so, no new warning
        self.reconnecting = True
        self.told_not_sent = self.told_not_sent and again
        self.login_until = None
        self._drop_connection()
        asking, self.asking = self.asking, None
        if isinstance(self.screen, TtyScreen):
            if not again:
                self.screen.warn(f"{reason}; reconnecting (Ctrl-C stops, Ctrl-D leaves)")
            self.screen.put_line(self.session.connection_lost(asking, self.screen.take_line()))
            self.screen.disconnected()
        self.flow.close()   # after the session has seen what was in flight
        self.waiting_for = self.waiting_since = None
        if again:   # a try that connected, then failed: the next address
            self._schedule(reason)
        else:       # a new loss: the waits start again, at this address
            self._wait(self.plan.lost(), "")

    def _drop_connection(self) -> None:
        if self.connected:
            self.connected = False
            self.selector.unregister(self.connection.sock)
            self.connection.close()

    def _take_connection(self, connection: Connection) -> None:
        self.connection, self.connected = connection, True
        self.selector.register(connection.sock, selectors.EVENT_READ, "socket")

    def _keep_login_prompt(self, reason: str) -> bool:
        """The connection closed while the first login waits for the user (the server's login
        timeout, while a password is typed): keep the prompt and connect again once it is
        answered (Session.login_anew). False: not at a prompt, so this ends the client."""
        if not self.session.interactive or self.asking is None or not self.addresses:
            return False
        self._drop_connection()
        if not self.session.login_dropped:
            self.session.login_dropped = True
            self.screen.warn(f"{reason}; this client connects again when you press Enter")
        return True

    def _open_again(self) -> None:
        """A Reconnect step: the room's addresses in turn from the one in use (blocking, as at start)."""
        order = [(self.plan.current + i) % len(self.addresses) for i in range(len(self.addresses))]
        self.screen.waiting("connecting...")
        connection, first = open_first([self.addresses[i] for i in order])
        self.plan.current = order[first]
        self.session.server = self.plan.addresses[self.plan.current]
        self._take_connection(connection)

    def _schedule(self, why: str) -> None:
        """The try at the current address failed: the next one, at once or after a wait."""
        failed = self.plan.addresses[self.plan.current]
        wait = self.plan.failed(why)
        if wait is None:
            raise ClientExit(self.plan.given_up())
        if wait == 0:
            self.reconnect_at = time.monotonic()
            self.screen.waiting(f"{failed}: {why}; trying {self.plan.addresses[self.plan.current]}", "reconnecting")
        else:
            self._wait(wait, why)

    def _wait(self, delay: float, why: str) -> None:
        self.reconnect_at = time.monotonic() + delay
        self.screen.busy()
        self.wait_why = why
        self._count_down(delay)

    def _count_down(self, left: float) -> None:
        """The status line while waiting to reconnect, with the seconds left (redrawn each second)."""
        seconds = math.ceil(left - 1e-3)   # as a countdown shows it: 2.4 s left reads 3
        shown = f"{round(left, 1):g}" if left < 1 else str(seconds)
        rounds = f"({self.plan.rounds}/{len(self.plan.delays)}"
        why = self.wait_why
        note = f"not connected{f' ({why})' if why else ''}; trying again in {shown} s {rounds}; Ctrl-C stops)"
        if len(note) >= 80:   # the line must fit: the Ctrl-C hint was in the warning already
            note = f"not connected ({shorten(why, 40)}); trying again in {shown} s {rounds})"
        self.screen.waiting(note, f"not connected; trying again in {shown} s")
        self.tick_at = time.monotonic() + left - (seconds - 1) if left > 1 else None   # when it reads one less

    def _timers_due(self) -> None:
        now = time.monotonic()
        if self.burst_until is not None and now >= self.burst_until:
            self.burst_until = None
            self.session.end_burst()
        if self.login_until is not None and now >= self.login_until and self.connected:
            self._lost(f"no login in {CONNECT_TIMEOUT:g} s")   # a node that takes connections, answers nothing
        if self.pending is not None and now >= self.pending_until:
            self.selector.unregister(self.pending)
            self.pending.close()
            self.pending = None
            self._schedule(f"no answer in {CONNECT_TIMEOUT:g} s")
        if self.tick_at is not None and now >= self.tick_at and self.reconnect_at is not None:
            self._count_down(self.reconnect_at - now)
        if self.reconnect_at is None or now < self.reconnect_at or self.finished:
            return
        self.reconnect_at = self.tick_at = None
        host, port = self.addresses[self.plan.current]
        self.screen.waiting(f"reconnecting to {host}:{port}... (Ctrl-C stops)", "reconnecting")
        try:
            family, kind, proto, _, where = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
            sock = socket.socket(family, kind, proto)
        except OSError as exc:
            log.debug("reconnect: %s", exc)
            self._schedule(one_line(exc.strerror or str(exc), 60).lower())
            return
        sock.setblocking(False)
        error = sock.connect_ex(where)
        if error not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            log.debug("reconnect: %s", os.strerror(error))
            sock.close()
            self._schedule(os.strerror(error).lower())
            return
        self.pending, self.pending_until = sock, now + CONNECT_TIMEOUT
        self.selector.register(sock, selectors.EVENT_WRITE, "connecting")

    def _connected(self) -> None:
        """The connect in progress has finished: log in again on it, or try later."""
        sock, self.pending = self.pending, None
        assert sock is not None
        self.selector.unregister(sock)
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            log.debug("reconnect: %s", os.strerror(error))
            sock.close()
            self._schedule(os.strerror(error).lower())
            return
        self._take_connection(Connection(sock))
        self.login_until = time.monotonic() + CONNECT_TIMEOUT
        self.flow = self.session.rejoin(self.plan.addresses[self.plan.current])
        self._guarded(lambda: self._advance(None))

    def _slow_reply_timeout(self) -> float | None:
        """Seconds until a pending reply counts as slow; when it does, the screen says we wait."""
        if self.waiting_for is None or self.waiting_since is None:
            return None
        left = self.waiting_since + SLOW_REPLY - time.monotonic()
        if left > 0:
            return left
        self.waiting_since = None
        self.screen.waiting(WAITING_NOTES.get(self.waiting_for, "waiting for the server...")
                            + " (Ctrl-D leaves)")
        return None

    def _watch_input(self) -> None:
        try:
            self.selector.register(self.screen.fd_in, selectors.EVENT_READ, "input")
        except (PermissionError, ValueError):
            # A regular file (or /dev/null) cannot be polled, and reading it never blocks.
            while not self.input_closed:
                self._on_input(poll=False)

    def _watch_socket(self) -> None:
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.connection.wants_write else 0)
        self.selector.modify(self.connection.sock, events, "socket")

    def _dispatch(self, source: str, mask: int) -> None:
        if source == "input":
            self._on_input()
        elif source == "wakeup":
            self.screen.on_wakeup()
        elif source == "connecting":
            self._connected()
        elif self.connected:
            try:
                if mask & selectors.EVENT_WRITE:
                    self.connection.flush()
                if mask & selectors.EVENT_READ:
                    self._on_socket()
            except PassingFailure as exc:
                self._lost(str(exc))
            except ConnectionClosed:
                self._lost("the server closed the connection")

    def _on_socket(self) -> None:
        for frame in self.connection.receive():
            body = frame.body
            op = body.get("op")
            log.debug("<- %s %s", frame.kind, op)
            if frame.kind == framing.KIND_DATA:
                self.session.on_data(body)
            elif op == "BYE":
                reason = body.get("reason")
                if reason in (ByeReason.SHUTDOWN, ByeReason.TOO_SLOW) or (
                        reason == ByeReason.IDLE and not self.session.joined):
                    self._lost(bye_text(body))
                    return
                raise ClientExit(bye_text(body))
            elif op == "ERROR":
                if self.reconnecting and body.get("error") == Error.SERVER_BUSY:
                    self._lost(f"the server is busy ({describe_error(body)})")
                    return
                raise ClientExit(f"the server ended the connection: {describe_error(body)}")
            elif op == self.waiting_for:
                self.waiting_for = None
                self._advance(body)
                if self.reconnecting and self.session.online_now:
                    self.reconnecting = False
                    self.login_until = None
            else:
                log.debug("ignoring an unexpected %s reply", op)
            if self.finished or not self.connected:
                return
        if self.session.burst:
            self.burst_until = time.monotonic() + BURST_QUIET
        if self.waiting_for == HANDSHAKE and self.connection.handshaken:
            self.waiting_for = None
            self._advance(self.connection.peer_certificate())
        if self.connection.malformed is not None:
            raise ClientExit(f"the server sent a malformed frame: {self.connection.malformed}")

    def _on_input(self, poll: bool = True) -> None:
        events, ended = self.screen.read_input()
        for event in events:
            if self.reconnecting and event is Key.INTERRUPT:
                if isinstance(self.screen, TtyScreen) and self.screen.editor.interrupted:
                    self.screen.waiting(self.screen.note)   # as anywhere: a half-typed line is only dropped
                    continue
                raise ClientExit("stopped reconnecting (Ctrl-C): not connected")
            if self.reconnecting and not self.connected and event is Key.END_OF_INPUT:
                self.screen.show("left (not connected)")
                self.finished = True
                return
            if self.reconnecting and isinstance(event, Submit) and isinstance(self.screen, TtyScreen):
                # Not sent later to whoever is back by then: the line stays, for Enter once connected.
                self.screen.put_line(event.text)
                if not self.told_not_sent:
                    self.told_not_sent = True
                    self.screen.warn("not connected yet: the line stays; Enter sends it once reconnected")
                self.screen.waiting(self.screen.note)
                continue
            if (event is Key.INTERRUPT and self.asking is not None and self.asking.clear_on_interrupt
                    and isinstance(self.screen, TtyScreen) and self.screen.editor.interrupted):
                # As in a shell: Ctrl-C drops the half-typed command (on an empty line the flow
                # says how to leave; Ctrl-C itself never leaves).
                self.screen.answered(self.asking, event)
                self.asking = self.asking._replace(initial="")   # dropped: a message put back stays out
                self.screen.ask(self.asking)
                continue
            if event is Key.INTERRUPT:
                # Ctrl-C also drops lines typed ahead; several count as one (one prompt cancelled).
                self.inputs = deque(e for e in self.inputs if not isinstance(e, Submit))
                if Key.INTERRUPT in self.inputs:
                    continue
            elif event is Key.END_OF_INPUT and self.waiting_for is not None and self.waiting_since is None:
                # The screen says the reply is slow and how to leave: Ctrl-D leaves now.
                if self.session.exiting:
                    self.finished = True
                    return
                raise ClientExit(f"left without the server's reply to {self.waiting_for}")
            self.inputs.append(event)
        if ended:
            self.input_closed = True
            if poll:
                self.selector.unregister(self.screen.fd_in)

    def _deliver_inputs(self) -> None:
        while self.asking is not None and not self.finished:
            if not self.inputs:
                if not self.input_closed:
                    return
                self.inputs.append(Key.END_OF_INPUT)  # input is over: every question gets "end"
            ask, self.asking = self.asking, None
            event = self.inputs.popleft()
            self.screen.answered(ask, event)
            self._advance(event)

    def _advance(self, value: Any) -> None:
        """Resume the flow with value; carry out Sends until it waits for a reply or an answer."""
        while True:
            try:
                step = self.flow.send(value)
            except StopIteration:
                self.finished = True
                return
            if isinstance(step, Send):
                self.connection.send(step.body)
                value = None
            elif isinstance(step, Reconnect):
                self._open_again()
                value = None
            elif isinstance(step, Handshake):
                der = self.connection.peer_certificate()
                if der is not None:
                    value = der
                    continue
                self.waiting_for = HANDSHAKE
                self.waiting_since = time.monotonic()
                self.screen.busy()
                return
            elif isinstance(step, Reply):
                self.waiting_for = step.op
                self.waiting_since = time.monotonic()
                self.screen.busy()
                return
            else:
                if step.fresh:   # typed ahead for another prompt (the password): never its answer
                    self.inputs = deque(e for e in self.inputs if not isinstance(e, Submit))
                self.asking = step
                self.screen.ask(step)
                return


# --- the program ----------------------------------------------------------------------------

def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"invalid port {text!r} (1-65535)")
    return int(text)


def _username(text: str) -> str:
    if not valid_username(text):
        raise argparse.ArgumentTypeError(f"invalid username {text!r}: {USERNAME_RULE}")
    return text


def _node_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"invalid address {text!r} (HOST:PORT)")
    return host, _port(port)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; exits with status 2 and a usage line when it is wrong."""
    parser = argparse.ArgumentParser(
        prog="chatclient.py", description="Chat room client (type HELP after logging in).",
        usage="%(prog)s [-h] [--register] [--fingerprint] [--export-key FILE | --import-key FILE] "
              "[--fallback HOST:PORT]... [--debug-log FILE] HOST PORT USERNAME",
        epilog="When standard input is not a terminal, its first line is the password and each "
               "further line a command (BM, PM, CH, EX...); the end of input means EX. A new USERNAME "
               "is registered from a script only with --register. The exit status is 1 if any line "
               "failed (a message not sent, an unknown command); the reasons are on stderr.")
    parser.add_argument("host", nargs="?", metavar="HOST", help="server name or address")
    parser.add_argument("port", nargs="?", type=_port, metavar="PORT", help="server port")
    parser.add_argument("username", nargs="?", type=_username, metavar="USERNAME",
                        help="your account; a new name is registered on its first login "
                             "(from a script only with --register)")
    parser.add_argument("--register", action="store_true",
                        help="when standard input is not a terminal: create USERNAME if it is new (the "
                             "first input line is its password); without it a script only logs in. "
                             "On a terminal a new name is always offered registration")
    parser.add_argument("--fingerprint", action="store_true",
                        help="print your key fingerprint(s) (for HOST PORT USERNAME if given) and exit")
    parser.add_argument("--fallback", action="append", default=[], type=_node_address, metavar="HOST:PORT",
                        help="another node of the same room (servers sharing one Redis and one server key; "
                             "repeat for more): at start, the first of HOST PORT and these that takes a "
                             "connection is used; after a lost connection, each try goes round them all. "
                             "Each must present the same server key")
    parser.add_argument("--debug-log", metavar="FILE", help="write a debug log (never secrets) to FILE")
    parser.add_argument("--export-key", metavar="FILE",
                        help="write your key pair for HOST PORT USERNAME to FILE, encrypted under a passphrase "
                             f"(asked on the terminal, or ${PASSPHRASE_ENV}), and exit; asks your password "
                             "(from a script: the first line of standard input)")
    parser.add_argument("--import-key", metavar="FILE",
                        help="log in using the key pair in FILE (made by --export-key elsewhere; its passphrase "
                             f"asked on the terminal, or ${PASSPHRASE_ENV}) and keep it for this account")
    args = parser.parse_args(argv)
    given = [a is not None for a in (args.host, args.port, args.username)]
    if not args.fingerprint and not all(given):
        parser.error("HOST, PORT and USERNAME are required")
    if args.export_key and args.import_key:
        parser.error("--export-key and --import-key do not go together")
    if args.fingerprint and any(given) and not all(given):
        parser.error("--fingerprint takes either HOST PORT USERNAME or nothing")
    return args


def print_fingerprints(store: ClientStore, args: argparse.Namespace) -> int:
    """--fingerprint: the user's own key fingerprints."""
    keys = store.own_keys()
    if args.host is not None:
        server = server_address(args.host, args.port)
        pinned = store.server_fingerprint(server)
        wanted = {server, server_id(pinned)} if pinned else {server}
        keys = [k for k in keys if (k.server in wanted or k.server_key in wanted)
                and k.username == args.username.lower()]
    if not keys:
        print(f"chatclient: no keys yet under {store.root}", file=sys.stderr)
        return EXIT_ERROR
    for key in keys:
        print(visible(f"{key.server} {key.username} {key.fingerprint}"))
    return EXIT_OK


def ask_secret(prompt: str, twice: bool = False) -> str:
    """The export passphrase: $CHATCLIENT_KEY_PASSPHRASE, else asked on the terminal.

    Raises:
        ClientExit: neither is there, or it is empty.
    """
    value = os.environ.get(PASSPHRASE_ENV)
    if value is None:
        try:
            value = getpass.getpass(prompt)
            if twice and getpass.getpass("repeat it: ") != value:
                raise ClientExit("the two passphrases differ")
        except (EOFError, OSError):
            raise ClientExit(f"no terminal to ask the passphrase on: set {PASSPHRASE_ENV}") from None
    if not value:
        raise ClientExit("an empty passphrase is not allowed")
    return value


def export_key(store: ClientStore, args: argparse.Namespace) -> int:
    """--export-key FILE: the saved key pair of this account and server, re-encrypted under a passphrase."""
    server = server_address(args.host, args.port)
    pinned = store.server_fingerprint(server)
    if pinned is None:
        raise ClientExit(f"no server key remembered for {server}: log in there once first")
    stem = server_id(pinned)
    store.adopt_key_pair(server, stem, args.username)
    if not store.has_key_pair(stem, args.username):
        raise ClientExit(f"no key pair for {args.username} at {server} under {store.root}")
    if os.isatty(0):
        password = getpass.getpass(f"password for {args.username}: ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    try:
        keys = store.load_key_pair(stem, args.username, password)
    except KeyLocked:
        raise ClientExit("the password does not open the saved key pair") from None
    assert keys is not None
    passphrase = ask_secret("passphrase for the export file: ", twice=True)
    try:
        store.export_key_pair(args.export_key, keys, passphrase, args.username, pinned)
    except OSError as exc:
        raise ClientExit(f"cannot write {args.export_key}: {exc.strerror or exc}") from None
    print(visible(f"exported the key pair {keys.fingerprint} of {args.username} at {server} to {args.export_key}"))
    return EXIT_OK


def read_import(args: argparse.Namespace) -> tuple[pg3lib.KeyPair, str]:
    """--import-key FILE: the key pair it holds (its passphrase asked before connecting)."""
    passphrase = ask_secret("passphrase of the key file: ")
    try:
        keys, data = ClientStore.read_export(args.import_key, passphrase)
    except OSError as exc:
        raise ClientExit(f"cannot read {args.import_key}: {exc.strerror or exc}") from None
    except KeyLocked as exc:
        raise ClientExit(str(exc)) from None
    if str(data.get("username", "")).lower() != args.username.lower():
        raise ClientExit(f"{args.import_key} holds the key of {one_line(data.get('username'), 40)}, "
                         f"not of {args.username}")
    return keys, str(data.get("server_key", ""))


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(signum)


def open_first(addresses: Sequence[tuple[str, int]]) -> tuple[Connection, int]:
    """A connection to the first of the room's addresses that takes one, and its index.

    Raises:
        ClientExit: none did (each one's reason, in order).
    """
    failures = []
    for index, (host, port) in enumerate(addresses):
        try:
            return Connection.open(host, port), index
        except ClientExit as exc:
            if len(addresses) == 1:
                raise
            failures.append(exc.message)
            log.debug("start: %s", exc.message)
    raise ClientExit("no node of the room answered:\n  " + "\n  ".join(failures))


def run_client(args: argparse.Namespace, store: ClientStore) -> int:
    """Connect, then run the session on a terminal or on plain lines."""
    imported, exported_for = read_import(args) if args.import_key else (None, "")
    addresses = [(args.host, args.port), *args.fallback]
    connection, current = open_first(addresses)
    try:
        screen: Screen = TtyScreen() if os.isatty(0) else PlainScreen()
        room = [server_address(host, port) for host, port in addresses]
        session = Session(room[current], args.username, store, screen, screen.interactive,
                          register=args.register, room=room)
        session.import_keys, session.import_server = imported, exported_for
        with screen:
            Driver(session, connection, screen, addresses, current).run()
    finally:
        connection.close()
    if session.failures:  # a script: every failure was said on stderr when it happened
        raise ClientExit(script_failures_text(session.failures))
    return EXIT_OK


def report(message: str) -> None:
    """A fatal message on stderr: the first line prefixed with the program name."""
    sys.stdout.flush()
    lines = [visible(line) for line in message.split("\n")]
    sys.stderr.write("chatclient: " + "\n".join(lines) + "\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.debug_log:
        logging.basicConfig(filename=args.debug_log, level=logging.DEBUG,
                            format="%(asctime)s %(name)s %(message)s")
    store = ClientStore(config_root())
    if args.fingerprint:
        return print_fingerprints(store, args)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_terminated)
    try:
        if args.export_key:
            return export_key(store, args)
        return run_client(args, store)
    except ClientExit as exc:
        report(exc.message)
        return exc.status
    except Terminated as exc:
        report(f"stopped by {exc}")
        return 128 + exc.signum
    except KeyboardInterrupt:
        report("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_ERROR
    except Exception as exc:  # a bug: one line for the user, the details in the debug log
        log.exception("internal error")
        report(f"internal error: {type(exc).__name__}: {exc}")
        return 70


if __name__ == "__main__":
    sys.exit(main())
