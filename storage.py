"""The data directory: accounts, per-user history files, and the server key.

``AccountStore`` keeps every account in memory and in one append-only file,
one JSON line per account, written and fsync'd before a registration is
acknowledged. ``HistoryLog`` keeps ``<Username>.chat`` per account, one JSON
entry per line; a batch of entries is written with one ``os.write`` per file.
``FileStore`` is the ``store.Store`` of one process: it takes the session
logic's store requests, runs appends as a group at the end of a loop pass
(group commit, still before any reply that depends on them), and hands back
typed results. It has no cluster: its cluster methods do nothing.
``ModerationLog`` keeps ``moderation.jsonl``: every moderation action (docs/PROTOCOL.md
section 10), appended and fsync'd like an account, replayed at start into the
bans and mutes in force. ``PmIdLog`` keeps the ids of the last minutes' PMs
(``pm-ids.<N>.log``), so that a restart forgets no id a replay could still use.

Torn tails: a line is complete with its newline. On reading, a last line with
no newline (a crash mid-write) is dropped with a warning, and before the next
append to that file it is cut off, so it can neither join the next line nor
come back complete: a torn line was never acknowledged. A corrupt line in the
middle of the accounts file is fatal at start (accounts are never dropped
silently); in a history file it is skipped with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter, OrderedDict

import framing
import pg3lib
import store
import pmguard
from passwords import Account
from protocol import PM_CLOCK_WINDOW, TS_ORDER_SLACK, ts_before

log = logging.getLogger("chat.storage")

ACCOUNTS_FILE = "accounts.jsonl"
MODERATION_FILE = "moderation.jsonl"
SERVER_KEY_FILE = "server_key.pem"
HISTORY_SUFFIX = ".chat"
KEY_SUFFIX = ".key"          # <Username>.key: the key the account last gave in KEY (offline PMs)
OFFLINE_SUFFIX = ".offline"  # <Username>.offline: the PMs kept for it while offline, one D PM body a line
PM_IDS_PREFIX = "pm-ids."    # pm-ids.<N>.log: "sender id sent" per PM2 stored in the N-th span of PM_IDS_SPAN
PM_IDS_SPAN = 2 * PM_CLOCK_WINDOW   # an id matters until its sent + the window, sent <= stored + the window
# Open history files kept between passes: a broadcast writes to every online
# user's file, so the server sizes this from the descriptor limit (half of it);
# this is the floor.
DEFAULT_MAX_OPEN_HISTORY = 1024


class StorageError(Exception):
    """The data directory cannot be used (unwritable, corrupt accounts file)."""


def complete_lines(data: bytes, name: str) -> list[tuple[int, bytes]]:
    """(line number, line) of each complete line; a torn last line is dropped with a warning."""
    lines = data.split(b"\n")
    torn = lines.pop()
    if torn:
        log.warning("%s: dropping a torn last line (%d bytes, no newline)", name, len(torn))
    return [(number, line) for number, line in enumerate(lines, 1) if line.strip()]


def read_records(path: str) -> list[tuple[int, bytes]]:
    """(line number, line) of a JSON-lines file's complete lines; [] if there is no file.

    Raises:
        StorageError: the file exists but cannot be read.
    """
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror}") from None
    return complete_lines(data, path)


def cut_torn_tail(fd: int, name: str) -> None:
    """Truncate a file after its last newline (drop a torn last line), if it has one.

    Raises:
        OSError: the file cannot be read or truncated.
    """
    size = os.fstat(fd).st_size
    if not size or os.pread(fd, 1, size - 1) == b"\n":
        return
    end = size
    while end > 0:
        start = max(0, end - 65536)
        block = os.pread(fd, end - start, start)
        newline = block.rfind(b"\n")
        if newline >= 0:
            end = start + newline + 1
            break
        end = start
    log.warning("%s: cutting a torn last line (%d bytes)", name, size - end)
    os.ftruncate(fd, end)


class AccountStore:
    """Accounts by lower-case name, loaded at start, appended durably."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._accounts: dict[str, Account] = {}
        self._load()
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            cut_torn_tail(self._fd, path)
        except OSError as exc:
            raise StorageError(f"cannot write {path}: {exc.strerror}") from None

    def _load(self) -> None:
        for number, line in read_records(self.path):
            try:
                account = Account.from_json(line.decode("utf-8"))
            except (ValueError, UnicodeDecodeError) as exc:
                raise StorageError(f"{self.path}, line {number}: corrupt account record ({exc})") from None
            self._accounts[account.key] = account

    def __len__(self) -> int:
        return len(self._accounts)

    def get(self, key: str) -> Account | None:
        return self._accounts.get(key.lower())

    def add(self, account: Account) -> bool:
        """Store a new account durably; False if the name is taken.

        Raises:
            OSError: the write or fsync failed (nothing is acknowledged then).
        """
        if account.key in self._accounts:
            return False
        line = (account.to_json() + "\n").encode("utf-8")
        try:
            written = os.write(self._fd, line)
            if written != len(line):
                raise OSError("short write to the accounts file")
            os.fsync(self._fd)
        except OSError:
            try:
                cut_torn_tail(self._fd, self.path)
            except OSError:
                pass   # cut on the next start
            raise
        self._accounts[account.key] = account
        return True

    def close(self) -> None:
        os.close(self._fd)


# A history file rotates (``.chat`` to ``.chat.1``) at half the history limit,
# and the room log starts a new segment at an eighth of it, so a file is
# bounded by the limit and a rotation costs one rename.
DEFAULT_HISTORY_LIMIT = 512 << 20
DEFAULT_MIN_FREE = 64 << 20      # below this much free disk, new messages are refused (internal)
ROOM_PREFIX, ROOM_SUFFIX = "room.", ".log"
RUNS_FILE = "room.runs"
READ_BLOCK = 65536               # histories are read in blocks of this size
READER_FDS = 3                   # a lazy CH read holds .chat.1, .chat and a room log segment open
HELD_LIMIT = 2000                # CH with a limit up to this: read back and held; past it, read lazily
PAUSE_EVERY = 1000               # a lazily read history gives the loop back after this many entries


class ModerationLog:
    """``moderation.jsonl``: every moderation action, one JSON line each, appended and fsync'd
    before it is acknowledged; replayed at start into the bans and mutes in force.

    Like the accounts file: a torn last line is cut, a corrupt line in the middle stops the
    server at start (a ban is never dropped silently). The file is made by the first action,
    so a room that never moderates has none.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.kept: dict[tuple[str, str], store.ModRecord] = {}   # ("ban"|"mute", key) -> the action
        self._fd: int | None = None
        self._load()
        if os.path.exists(path):
            try:
                self._open()
            except OSError as exc:
                raise StorageError(f"cannot write {path}: {exc.strerror}") from None

    def _open(self) -> int:
        """Raises: OSError: the file cannot be opened or its torn tail cut."""
        if self._fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                cut_torn_tail(fd, self.path)
            except OSError:
                os.close(fd)
                raise
            self._fd = fd
        return self._fd

    def _load(self) -> None:
        for number, line in read_records(self.path):
            try:
                record = store.ModRecord.from_json(line.decode("utf-8"))
            except (ValueError, UnicodeDecodeError) as exc:
                raise StorageError(f"{self.path}, line {number}: corrupt moderation record ({exc})") from None
            self._apply(record)

    def _apply(self, record: store.ModRecord) -> None:
        if record.action in ("ban", "mute"):
            self.kept[(record.action, record.key)] = record
        elif record.action in ("unban", "unmute"):
            self.kept.pop((record.action[2:], record.key), None)

    def get(self, kind: str, key: str) -> store.ModRecord | None:
        return self.kept.get((kind, key))

    def add(self, record: store.ModRecord) -> bool:
        """Journal and apply an action; False (nothing written) for an unban or unmute of nothing in force.

        Raises:
            OSError: the write or fsync failed (nothing is applied then).
        """
        if record.action in ("unban", "unmute"):
            old = self.kept.get((record.action[2:], record.key))
            if old is None or (old.until is not None and old.until <= record.at):
                return False
        line = (record.to_json() + "\n").encode("utf-8")
        fd = self._open()
        try:
            if os.write(fd, line) != len(line):
                raise OSError("short write to the moderation file")
            os.fsync(fd)
        except OSError:
            try:
                cut_torn_tail(fd, self.path)
            except OSError:
                pass   # cut on the next start
            raise
        self._apply(record)
        return True

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None



class PmIdLog:
    """The ids of the PMs stored in the last minutes, on disk: ``pm-ids.<N>.log`` holds those
    stored in the N-th span of PM_IDS_SPAN seconds, one ``sender id sent`` line each. An id
    matters until its ``sent`` plus the clock window, and ``sent`` is at most the window after
    it was stored: this span's file and the last one's hold every id that still matters, and
    older ones are deleted. Written with the pass's histories, before any reply."""

    def __init__(self, directory: str, now: float) -> None:
        self.directory = directory
        self.span = -1
        self._fd = -1
        self.ids = pmguard.UsedIds()
        for span, path in sorted(self._files()):
            if span < self._span_of(now) - 1:
                continue
            for number, line in read_records(path):
                parts = line.split(b" ")
                try:
                    sender, pm_id, sent_at = parts[0].decode("ascii"), parts[1].decode("ascii"), float(parts[2])
                except (IndexError, ValueError, UnicodeDecodeError):
                    log.warning("%s, line %d: skipping a corrupt entry", path, number)
                    continue
                if sent_at + PM_CLOCK_WINDOW >= now:
                    self.ids.use(sender, pm_id, sent_at, now)
        self._roll(now)

    @staticmethod
    def _span_of(now: float) -> int:
        return int(now // PM_IDS_SPAN)

    def _files(self) -> list[tuple[int, str]]:
        found = []
        for name in os.listdir(self.directory):
            middle = name[len(PM_IDS_PREFIX):-len(".log")]
            if name.startswith(PM_IDS_PREFIX) and name.endswith(".log") and middle.isdigit():
                found.append((int(middle), os.path.join(self.directory, name)))
        return found

    def _roll(self, now: float) -> None:
        span = self._span_of(now)
        if span == self.span:
            return
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.span = span
        for old, path in self._files():
            if old < span - 1:
                try:
                    os.remove(path)
                except OSError as exc:
                    log.error("removing %s failed: %s", path, exc.strerror)
        path = os.path.join(self.directory, f"{PM_IDS_PREFIX}{span}.log")
        self._fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        cut_torn_tail(self._fd, path)

    def use(self, pm_id: store.PmId) -> str | None:
        """Why the PM may not use its id, or None (and it is remembered, not yet written)."""
        self.ids.sweep(pm_id.now)
        return self.ids.use(pm_id.sender, pm_id.id, pm_id.sent_at, pm_id.now)

    def write(self, used: list[store.PmId]) -> None:
        """The ids of this pass's stored PMs, in one write (a failure is logged: the memory has them)."""
        if not used:
            return
        try:
            self._roll(used[-1].now)
            _write_all(self._fd, b"".join(b"%s %s %.3f\n" % (u.sender.encode("ascii"), u.id.encode("ascii"),
                                                               u.sent_at) for u in used))
        except OSError as exc:
            log.error("writing PM ids failed (a restart now forgets them): %s", exc.strerror or exc)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _lines_back(fd: int, start: int, end: int):
    """(offset, line) of the lines in bytes [start, end) of a file, newest first (empty ones left out).

    ``start`` and ``end`` are line boundaries.
    """
    tail = b""
    pos = end
    while pos > start:
        lo = max(start, pos - READ_BLOCK)
        block = os.pread(fd, pos - lo, lo) + tail
        pos = lo
        lines = block.split(b"\n")
        tail = lines[0]
        at = pos + len(tail) + 1
        found = []
        for line in lines[1:]:
            found.append((at, line))
            at += len(line) + 1
        for offset, line in reversed(found):
            if line:
                yield offset, line
    if tail:
        yield start, tail


def _lines_forward(fd: int, start: int, end: int):
    """(offset, line) of the lines in bytes [start, end) of a file, oldest first (empty ones left
    out); ``start`` and ``end`` are line boundaries."""
    tail = b""
    pos = start
    while pos < end:
        data = os.pread(fd, min(READ_BLOCK, end - pos), pos)
        if not data:
            break
        at = pos - len(tail)
        pos += len(data)
        lines = (tail + data).split(b"\n")
        tail = lines.pop()
        for line in lines:
            if line:
                yield at, line
            at += len(line) + 1
    if tail:
        yield pos - len(tail), tail


class RoomLog:
    """The room's log of BMs: one line per BM, in segments ``room.<base>.log``.

    A *position* is a byte offset counted over the whole life of the log
    (``base`` of a segment is the position of its first byte), so positions stay
    valid when old segments are deleted. ``end`` is the position after the last
    complete line. Every server start is remembered (``room.runs``), so a
    history whose user was online when the server died knows where that ended.
    """

    def __init__(self, directory: str, limit: int = DEFAULT_HISTORY_LIMIT) -> None:
        self.directory = directory
        self.limit = limit
        self.segment_limit = max(4096, limit // 8) if limit else 0
        self.segments: list[tuple[int, str]] = []
        for name in os.listdir(directory):
            digits = name[len(ROOM_PREFIX):-len(ROOM_SUFFIX)]
            if name.startswith(ROOM_PREFIX) and name.endswith(ROOM_SUFFIX) and digits.isdigit():
                self.segments.append((int(digits), os.path.join(directory, name)))
        self.segments.sort()
        if not self.segments:
            self.segments.append((0, self._segment_path(0)))
        base, path = self.segments[-1]
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            torn_end = os.fstat(self._fd).st_size
            cut_torn_tail(self._fd, path)
            self._size = os.fstat(self._fd).st_size
        except OSError as exc:
            raise StorageError(f"cannot write {path}: {exc.strerror}") from None
        self.end = base + self._size
        if self._size < torn_end:
            # The torn bytes' positions are not given out again: the new lines start a segment after them.
            self.end = base + torn_end
            self._roll()
        earlier = self._read_runs()
        if earlier and max(earlier) >= self.end:
            # The last run stored no BM: this one starts a position later, so that a span
            # opened in that run is told from one opened in this (each run's start is its name).
            self.end = max(earlier) + 1
            self._roll()
        self.run = self.end
        self.runs = self._start_run(earlier)

    def _segment_path(self, base: int) -> str:
        return os.path.join(self.directory, f"{ROOM_PREFIX}{base:015d}{ROOM_SUFFIX}")

    def _read_runs(self) -> list[int]:
        """The start positions of the runs before this one."""
        path = os.path.join(self.directory, RUNS_FILE)
        runs: list[int] = []
        try:
            with open(path, "rb") as fh:
                for _, line in complete_lines(fh.read(), path):
                    try:
                        runs.append(int(json.loads(line)["start"]))
                    except (ValueError, KeyError, TypeError):
                        log.warning("%s: skipping a corrupt line", path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc.strerror}") from None
        return runs

    def _start_run(self, earlier: list[int]) -> list[int]:
        """The start positions of every run so far, this one (``end`` now) last, made durable."""
        path = os.path.join(self.directory, RUNS_FILE)
        runs = earlier + [self.end]
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                cut_torn_tail(fd, path)
                os.write(fd, b'{"start":%d}\n' % self.end)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise StorageError(f"cannot write {path}: {exc.strerror}") from None
        return sorted(runs)

    def run_end(self, run: int) -> int:
        """Where the run that started at ``run`` ended (``end`` for this one)."""
        later = [start for start in self.runs if start > run]
        return min(later) if later else self.end

    def append(self, data: bytes) -> bool:
        """Append complete lines in one write; False (logged, the file as it was) if it failed."""
        try:
            _write_all(self._fd, data)
        except OSError as exc:
            log.error("room log write failed: %s", exc.strerror or exc)
            try:
                os.ftruncate(self._fd, self._size)
            except OSError:
                pass   # cut at the next start (a torn tail)
            return False
        self._size += len(data)
        self.end += len(data)
        if self.segment_limit and self._size >= self.segment_limit:
            self._roll()
        return True

    def _roll(self) -> None:
        """Start a new segment; drop the oldest ones beyond the limit."""
        path = self._segment_path(self.end)
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as exc:
            log.error("cannot start a room log segment: %s", exc.strerror)
            return
        os.close(self._fd)
        if self._size == 0 and len(self.segments) > 1:   # an empty segment (a run that stored nothing)
            _, empty = self.segments.pop()
            try:
                os.unlink(empty)
            except OSError as exc:
                log.warning("cannot delete %s: %s", empty, exc.strerror)
        self._fd, self._size = fd, 0
        self.segments.append((self.end, path))
        while self.limit and len(self.segments) > 1 and self.end - self.segments[1][0] >= self.limit:
            _, old = self.segments.pop(0)
            try:
                os.unlink(old)
            except OSError as exc:
                log.warning("cannot delete %s: %s", old, exc.strerror)

    def read_back(self, lo: int, hi: int):
        """The BM lines (texts) at positions in [lo, hi), newest first."""
        hi = min(hi, self.end)
        segments = self.segments
        for i in range(len(segments) - 1, -1, -1):
            base, path = segments[i]
            top = segments[i + 1][0] if i + 1 < len(segments) else self.end
            if base >= hi:
                continue
            if top <= lo:
                return
            if i == len(segments) - 1:
                yield from self._read_segment(self._fd, base, lo, min(hi, top), path)
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue   # deleted meanwhile (rolled past the limit)
            try:
                yield from self._read_segment(fd, base, lo, min(hi, top), path)
            finally:
                os.close(fd)

    def read_forward(self, lo: int, hi: int, segments: list | None = None):
        """The BM lines (texts) at positions in [lo, hi), oldest first, each segment opened when
        it is reached (a history read lazily: ``segments`` and ``hi`` as they were when it began;
        one deleted meanwhile is gone)."""
        segments = self.segments if segments is None else segments
        for i, (base, path) in enumerate(segments):
            top = segments[i + 1][0] if i + 1 < len(segments) else hi
            if top <= lo or base >= hi:
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                if segments is not self.segments:
                    log.warning("%s was deleted (past the history limit) while a history was read: "
                                "its BMs are missing from that CH", path)
                continue   # deleted meanwhile (rolled past the limit)
            try:
                end = min(min(hi, top) - base, os.fstat(fd).st_size)
                yield from _room_texts(_lines_forward(fd, min(end, max(0, lo - base)), end), path)
            finally:
                os.close(fd)

    @staticmethod
    def _read_segment(fd: int, base: int, lo: int, hi: int, path: str):
        end = min(hi - base, os.fstat(fd).st_size)   # an old segment may end before the next one's base
        yield from _room_texts(_lines_back(fd, min(end, max(0, lo - base)), end), path)

    def close(self) -> None:
        os.close(self._fd)


def _ts_of(text: str) -> str:
    """The ``ts`` of a room log line ("" if it has none): its lines are written ts first."""
    if text.startswith('{"ts":"'):
        return text[7:text.find('"', 7)]
    try:
        ts = json.loads(text).get("ts")
    except (ValueError, AttributeError):
        return ""
    return ts if isinstance(ts, str) else ""


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# User-file lines (each a JSON object; "kind" says which):
#   {"kind":"online","at":P,"run":R}   came online; the room's BMs from position P on are theirs
#   {"kind":"offline","at":P}          went offline; ... up to position P
#   {"kind":"pm","at":P,"entry":{...}} a PM (the PROTOCOL.md 4.6 entry), stored when the room log ended at P
# A line without "kind" is an entry of the older per-recipient layout, shown as it is,
# older than everything after it.
_PM_HEAD = b'{"kind":"pm","at":'
_ENTRY = b',"entry":'


def pm_line(at: int, entry: bytes) -> bytes:
    """A user-file line holding a PM entry (``entry`` without its newline)."""
    return _PM_HEAD + str(at).encode("ascii") + _ENTRY + entry + b"}\n"


def mark_line(online: bool, at: int, run: int) -> bytes:
    if online:
        return b'{"kind":"online","at":%d,"run":%d}\n' % (at, run)
    return b'{"kind":"offline","at":%d}\n' % at


def parse_user_line(line: bytes) -> tuple | None:
    """("pm", at, text), ("online", at, run), ("offline", at) or ("entry", text); None if corrupt."""
    if line.startswith(_PM_HEAD):
        split = line.find(_ENTRY)
        if split > 0 and line.endswith(b"}"):
            try:
                return "pm", int(line[len(_PM_HEAD):split]), line[split + len(_ENTRY):-1].decode("utf-8")
            except (ValueError, UnicodeDecodeError):
                return None
    try:
        text = line.decode("utf-8")
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    kind = obj.get("kind")
    try:
        if kind is None:
            return "entry", text
        if kind == "online":
            return "online", int(obj["at"]), int(obj.get("run", 0))
        if kind == "offline":
            return "offline", int(obj["at"])
        if kind == "pm":
            return "pm", int(obj["at"]), framing.encode_body(obj["entry"]).decode("utf-8")
    except (KeyError, TypeError, ValueError):
        return None
    return None


def _user_items(lines, path: str):
    """``parse_user_line``'s items of (offset, line) pairs of a user's file; corrupt ones skipped (logged)."""
    for offset, line in lines:
        item = parse_user_line(line)
        if item is None:
            log.warning("%s, byte %d: skipping a corrupt entry", path, offset)
            continue
        yield item


def _room_texts(lines, path: str):
    """The BM texts of (offset, line) pairs of a room log segment; corrupt ones skipped (logged)."""
    for offset, line in lines:
        if line.startswith(b"{") and line.endswith(b"}"):
            try:
                yield line.decode("utf-8")
                continue
            except UnicodeDecodeError:
                pass
        log.warning("%s, byte %d: skipping a corrupt entry", path, offset)


def merge_history(items, room, limit: int | None, open_at: int | None = None) -> list[str]:
    """A user's history, oldest first: their file's items (newest first) merged with the room's BMs.

    ``items`` yields what ``parse_user_line`` gives, newest first;
    ``room.read_back(lo, hi)`` yields the room's BM texts at positions in
    [lo, hi), newest first, and ``room.run_end(run)`` says where a run ended. The lines between
    two marks belong to the earlier mark: after "online" they interleave with
    the BMs up to the next mark, after "offline" (or before any mark) they
    stand alone. Reading stops once ``limit`` entries are found. ``open_at``:
    the user is online now, since that position (its last mark), so the newest
    lines are merged as they are read.
    """
    out: list[str] = []
    need = limit if limit else 1 << 62
    later = None          # the mark after the lines in ``between`` (None: none after them)
    between: list = []    # lines since that mark, newest first
    hi = room.end if open_at is not None else -1   # streaming the open span: BMs below hi not yet given
    since = open_at or 0
    for item in items:
        kind = item[0]
        if hi >= 0:
            # The user's span is open (known without reading back to its mark): no buffering.
            if kind == "pm":
                at = max(since, min(item[1], hi))
                if _emit_span(out, need, [], at, hi, room):
                    return out[::-1]
                hi = at
            if kind in ("pm", "entry"):
                out.append(item[-1])
                if len(out) >= need:
                    return out[::-1]
                continue
            if _emit_span(out, need, [], since, hi, room):
                return out[::-1]
            hi, later = -1, item
            continue
        if kind in ("pm", "entry"):
            between.append(item)
            continue
        if kind == "online":
            if later is None:
                top = room.run_end(item[2])
            elif later[0] == "offline":
                top = later[1]
            else:   # a second "online" with no "offline" between: the span ended at most there
                top = min(later[1], room.run_end(item[2]))
            if _emit_span(out, need, between, item[1], top, room):
                return out[::-1]
        elif _emit_alone(out, need, between):
            return out[::-1]
        later, between = item, []
    _emit_alone(out, need, between)
    return out[::-1]


def history_forward(items, room, end: int, segments: list, runs: list):
    """A user's history, oldest first, read as it is taken: ``merge_history`` forwards, for a
    whole history (CH with no limit), which need not fit in memory.

    ``items`` yields ``parse_user_line``'s items oldest first; the room's BMs are read
    forward from ``segments`` (as they were when the read began) below ``end`` (the room
    log's end then); ``runs`` the start positions of the server's runs.
    """
    def run_end(run: int) -> int:
        return min([start for start in runs if start > run] + [end])

    span_run, pos = None, 0   # in a span (after an "online" mark): its run, and the next position
    for item in items:
        kind = item[0]
        if kind == "online":
            if span_run is not None:   # a second "online" with no "offline" between
                yield from room.read_forward(pos, min(item[1], run_end(span_run), end), segments)
            span_run, pos = item[2], item[1]
        elif kind == "offline":
            if span_run is not None:
                yield from room.read_forward(pos, min(item[1], end), segments)
            span_run = None
        else:
            if kind == "pm" and span_run is not None:
                at = max(pos, min(item[1], run_end(span_run)))
                yield from room.read_forward(pos, min(at, end), segments)
                pos = at
            yield item[-1]
    if span_run is not None:
        yield from room.read_forward(pos, run_end(span_run), segments)


def _paused(entries):
    """The entries, with store.PAUSE after every PAUSE_EVERY of them: a long read gives the
    loop back between pages."""
    every, count = PAUSE_EVERY, 0
    for entry in entries:
        yield entry
        count += 1
        if count % every == 0:
            yield store.PAUSE


def _newest(entries, limit: int):
    """The newest ``limit`` of a lazily read history: counted in a first reading (pausing), then
    read again from the one where they start (pausing too). For a ``limit`` too large to hold."""
    total = 0
    for entry in entries():
        if entry is store.PAUSE:
            yield entry   # the counting gives the loop back too
        else:
            total += 1
    skip = total - limit
    for entry in entries():
        if entry is store.PAUSE or skip <= 0:
            yield entry
        else:
            skip -= 1


class _OpenFiles:
    """A user's files opened for a lazy read: closed when the read ends, or when it is dropped
    unread (a connection that closed before its first page)."""

    def __init__(self, opened: list) -> None:
        self.opened = opened

    def close(self) -> None:
        opened, self.opened = self.opened, []
        for fd, _, _ in opened:
            os.close(fd)

    def __del__(self) -> None:
        self.close()


def _lazy_history(history: HistoryLog, files: _OpenFiles, room: RoomLog, limit: int | None):
    """A user's whole history (or its newest ``limit`` entries), oldest first, with pauses, read
    as it is taken: as it was when ``files`` were opened (the room log's end, segments and runs
    are taken then too, by the caller)."""
    end, segments, runs = room.end, list(room.segments), list(room.runs)
    return _lazy_entries(history, files, room, (end, segments, runs), limit)


def _lazy_entries(history: HistoryLog, files: _OpenFiles, room: RoomLog, snapshot: tuple, limit: int | None):
    end, segments, runs = snapshot
    try:
        def entries():
            return _paused(history_forward(history.items_forward(files.opened), room, end, segments, runs))

        yield from entries() if limit is None else _newest(entries, limit)
    finally:
        files.close()


def _emit_alone(out: list, need: int, between: list) -> bool:
    for item in between:
        out.append(item[-1])
        if len(out) >= need:
            return True
    return False


def _emit_span(out: list, need: int, between: list, lo: int, hi: int, room) -> bool:
    for item in between:
        if item[0] == "pm":
            at = max(lo, min(item[1], hi))
            for text in room.read_back(at, hi):
                out.append(text)
                if len(out) >= need:
                    return True
            hi = at
        out.append(item[-1])
        if len(out) >= need:
            return True
    for text in room.read_back(lo, hi):
        out.append(text)
        if len(out) >= need:
            return True
    return False


class HistoryLog:
    """``<Username>.chat`` files (PMs and online marks): append batches, read backwards."""

    def __init__(self, directory: str, max_open: int = DEFAULT_MAX_OPEN_HISTORY,
                 limit: int = DEFAULT_HISTORY_LIMIT) -> None:
        self.directory = directory
        self.max_open = max(1, max_open)
        self.rotate_at = limit // 2 if limit else 0
        self._open: OrderedDict[str, int] = OrderedDict()
        self._maybe_torn: set[str] = set()
        self._checked: set[str] = set()   # files whose tail was looked at since the start

    def path(self, username: str) -> str:
        # Usernames are validated (letters, digits, _ . -, no leading dot) before
        # they reach here, so this stays inside the directory.
        return os.path.join(self.directory, username + HISTORY_SUFFIX)

    def _fd(self, username: str) -> int:
        fd = self._open.get(username)
        if fd is not None:
            self._open.move_to_end(username)
            return fd
        fd = os.open(self.path(username), os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        self._open[username] = fd
        if username not in self._checked:
            self._checked.add(username)
            self._maybe_torn.add(username)   # a crash may have torn the last line: look before writing
        if len(self._open) > self.max_open:
            _, old = self._open.popitem(last=False)
            os.close(old)
        return fd

    def create(self, username: str) -> None:
        """Create the (empty) history file of a new account."""
        self._fd(username)

    def size(self, username: str) -> int:
        try:
            return os.fstat(self._fd(username)).st_size
        except OSError:
            return 0

    def needs_rotation(self, username: str, more: int) -> bool:
        size = self.size(username)
        return bool(self.rotate_at) and size > 0 and size + more > self.rotate_at

    def rotate(self, username: str) -> bool:
        """``.chat`` becomes ``.chat.1`` (the older one is dropped); False if that failed."""
        fd = self._open.pop(username, None)
        if fd is not None:
            os.close(fd)
        try:
            os.replace(self.path(username), self.path(username) + ".1")
        except OSError as exc:
            log.error("rotating the history of %r failed: %s", username, exc.strerror)
            return False
        return True

    def append(self, username: str, data: bytes) -> bool:
        """Append complete lines; False (logged, the file as it was) if the write failed."""
        size = -1
        try:
            fd = self._fd(username)
            if username in self._maybe_torn:
                cut_torn_tail(fd, self.path(username))
                self._maybe_torn.discard(username)
            size = os.fstat(fd).st_size
            _write_all(fd, data)
            return True
        except OSError as exc:
            log.error("history write for %r failed: %s", username, exc.strerror or exc)
            fd = self._open.pop(username, -1)
            if fd >= 0:
                try:
                    if size >= 0:
                        os.ftruncate(fd, size)   # as before the write: a resend cannot duplicate
                except OSError:
                    self._maybe_torn.add(username)
                os.close(fd)
            else:
                self._maybe_torn.add(username)
            return False

    def items_back(self, username: str):
        """The parsed lines of a user's files (``.chat``, then ``.chat.1``), newest first."""
        for path in (self.path(username), self.path(username) + ".1"):
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                size = os.fstat(fd).st_size
                end = size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    end = _last_newline(fd, size)
                    log.warning("%s: dropping a torn last line (%d bytes, no newline)", path, size - end)
                yield from _user_items(_lines_back(fd, 0, end), path)
            finally:
                os.close(fd)

    def open_forward(self, username: str) -> list[tuple[int, str, int]]:
        """A user's files (``.chat.1``, then ``.chat``) opened for ``items_forward``, as they are
        now: (fd, path, the end of their last complete line). A rotation or an append later
        changes nothing of what they give. The caller closes the fds."""
        opened: list[tuple[int, str, int]] = []
        try:
            for path in (self.path(username) + ".1", self.path(username)):
                try:
                    fd = os.open(path, os.O_RDONLY)
                except FileNotFoundError:
                    continue
                opened.append((fd, path, 0))
                size = os.fstat(fd).st_size
                opened[-1] = (fd, path, _last_newline(fd, size) if size else 0)
        except OSError:
            for fd, _, _ in opened:
                os.close(fd)
            raise
        return opened

    @staticmethod
    def items_forward(opened: list):
        """The parsed lines of files from ``open_forward``, oldest first (they stay open)."""
        for fd, path, end in opened:
            yield from _user_items(_lines_forward(fd, 0, end), path)

    def read(self, username: str) -> list[str]:
        """The lines of a user's files as texts, oldest first (what they hold, not the merged history)."""
        items = self.items_back(username)
        return [item[-1] if item[0] in ("pm", "entry") else json.dumps(item) for item in items][::-1]

    def close(self) -> None:
        for fd in self._open.values():
            os.close(fd)
        self._open.clear()


def _last_newline(fd: int, size: int) -> int:
    end = size
    while end > 0:
        start = max(0, end - READ_BLOCK)
        newline = os.pread(fd, end - start, start).rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        end = start
    return 0


def load_server_keys(directory: str, path: str | None = None) -> pg3lib.KeyPair:
    """The server key pair from ``path`` (default: the data directory's ``server_key.pem``),
    created (mode 0600) on first start.

    Raises:
        StorageError: the file exists but is not a key, or cannot be written.
    """
    path = path or os.path.join(directory, SERVER_KEY_FILE)
    try:
        return pg3lib.KeyPair.load(path)
    except FileNotFoundError:
        pass
    except (OSError, pg3lib.InvalidKey) as exc:
        raise StorageError(f"cannot use the server key {path}: {exc}") from None
    keys = pg3lib.KeyPair.generate()
    try:
        keys.save(path)
    except OSError as exc:
        raise StorageError(f"cannot write the server key {path}: {exc.strerror}") from None
    log.info("created a new server key %s", keys.fingerprint)
    return keys


def open_store(directory: str, max_open_history: int = DEFAULT_MAX_OPEN_HISTORY, *,
               history_limit: int = DEFAULT_HISTORY_LIMIT,
               min_free: int = DEFAULT_MIN_FREE, key_file: str | None = None,
               readers: int | None = None) -> tuple[FileStore, pg3lib.KeyPair]:
    """The data directory's store and the server key (``key_file``, default the one kept there; made on
    first start).

    Raises:
        StorageError: the directory, its accounts or its key cannot be used.
    """
    file_store = FileStore(directory, max_open_history, history_limit=history_limit, min_free=min_free,
                           readers=readers)
    try:
        return file_store, load_server_keys(directory, key_file)
    except BaseException:
        file_store.close()
        raise


def read_history(directory: str, username: str, limit: int | None = None) -> list[str]:
    """A user's history entries from a data directory no server is writing (tools, tests), oldest first."""
    room = RoomLog.__new__(RoomLog)   # read only: no torn tail cut, no run recorded
    room.directory, room.limit, room.segment_limit = directory, 0, 0
    room.segments = sorted((int(name[len(ROOM_PREFIX):-len(ROOM_SUFFIX)]), os.path.join(directory, name))
                           for name in os.listdir(directory)
                           if name.startswith(ROOM_PREFIX) and name.endswith(ROOM_SUFFIX)
                           and name[len(ROOM_PREFIX):-len(ROOM_SUFFIX)].isdigit()) or [(0, os.devnull)]
    base, path = room.segments[-1]
    room._fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(room._fd).st_size
        room.end = base + (_last_newline(room._fd, size) if size else 0)
        runs_path = os.path.join(directory, RUNS_FILE)
        runs = []
        if os.path.exists(runs_path):
            with open(runs_path, "rb") as fh:
                runs = [int(json.loads(line)["start"]) for _, line in complete_lines(fh.read(), runs_path)]
        room.runs = sorted(runs)
        room.run = room.end + 1   # a run that has not started: every open span has ended
        return merge_history(HistoryLog(directory).items_back(username), room, limit)
    finally:
        os.close(room._fd)


class _Message:
    """A BM or PM of this pass, until its write decides its result."""

    __slots__ = ("request", "result", "offline")

    def __init__(self, request: store.AppendHistory, offline: tuple | None = None) -> None:
        self.request = request
        self.result: store.Result = _ALL_WRITTEN
        self.offline = offline   # (target, sender, D PM body): a PM kept for an offline target (after its history)


MAX_RETRIED_MARKS = 64   # online marks kept for a file that cannot be written (retried at its next write)


class FileStore:
    """The store seam over the data directory.

    ``submit(request)`` takes a store request from the session logic;
    ``flush()`` carries out what is pending and returns ``(cid, result)``
    completions in the order the requests were submitted. The writes of one
    loop pass go together (group commit), before any completion is returned:
    the pass's BMs are one write to the room log, whatever the room's size;
    each user file touched (PMs, online marks) gets one write. A position in
    the room log is given to each PM and mark in the order they were asked
    for, so a user's history holds exactly the BMs stored while they were
    online. Reads see the writes submitted before them.

    Below ``min_free`` bytes of free disk, new messages are refused (FAILED,
    i.e. ``internal``) before a write can fail half-way; marks still go.
    """

    node = ""   # one process: no cluster

    def __init__(self, directory: str, max_open_history: int = DEFAULT_MAX_OPEN_HISTORY, *,
                 history_limit: int = DEFAULT_HISTORY_LIMIT, min_free: int = DEFAULT_MIN_FREE,
                 readers: int | None = None) -> None:
        self.directory = directory
        # The descriptors for history files: a share for the lazy CH reads (up to READER_FDS each,
        # ``readers`` at once; more wait their turn), the rest kept open for appends.
        self.read_slots = store.ReadSlots(readers or max(4, max_open_history // (4 * READER_FDS)))
        max_open_history = max(16, max_open_history - READER_FDS * self.read_slots.limit)
        if not os.path.isdir(directory):
            try:
                os.makedirs(directory, exist_ok=True)
            except OSError as exc:
                raise StorageError(f"cannot create the data directory {directory}: {exc.strerror}") from None
        if not os.access(directory, os.W_OK | os.X_OK):
            raise StorageError(f"the data directory {directory} is not writable")
        self.accounts = AccountStore(os.path.join(directory, ACCOUNTS_FILE))
        fresh = not os.path.exists(os.path.join(directory, RUNS_FILE))
        self.room = RoomLog(directory, history_limit)
        self.history = HistoryLog(directory, max_open_history, history_limit)
        try:
            self.moderation = ModerationLog(os.path.join(directory, MODERATION_FILE))
            self.pm_ids = PmIdLog(directory, time.time())
        except BaseException:
            self.accounts.close()
            raise
        if fresh and len(self.accounts):
            log.info("%s holds histories of the per-recipient layout (%d accounts): they are read as they "
                     "are, their lines before everything stored from now on; new BMs go to the room log",
                     directory, len(self.accounts))
        self.min_free = min_free
        self._low_disk = False
        self._queue: list[list] = []       # [cid, result, or the _Message that decides it], in order
        self._room_lines: list[bytes] = []  # this pass's BMs
        self._room_bytes = 0
        self._user_ops: list[tuple] = []   # (owner, room bytes before it, line or online flag, _Message or None)
        self._messages: list[_Message] = []
        self._open: dict[str, int] = {}    # user -> start of its open span (this run)
        self._retry: dict[str, list[bytes]] = {}   # marks whose write failed, written before the next lines
        self._kept: dict[str, Counter] = {}   # user -> sender -> PMs kept for it (its .offline file), once counted
        self._last_keys: dict[str, str] = {}   # user -> its last key, as its .key file holds it

    @property
    def pending(self) -> bool:
        return bool(self._queue)

    def submit(self, request: store.Request) -> None:
        """Take one store request; its result comes with this pass's ``flush``."""
        result: store.Result
        if isinstance(request, store.AppendHistory):
            if self._id_refused(request.cid, request.pm_id):
                return
            message = _Message(request)
            self._messages.append(message)
            if request.kind == "PM":
                for owners, line in request.entries:
                    for owner in owners:
                        self._user_ops.append((owner, self._room_bytes, line, message))
            else:
                for _, line in request.entries:
                    self._room_lines.append(line)
                    self._room_bytes += len(line)
            self._queue.append([request.cid, None, message])
            return
        if isinstance(request, store.MarkOnline):
            self._user_ops.append((request.username, self._room_bytes, request.online, None))
            return
        if isinstance(request, store.StoreOfflinePM):
            self._keep_pm(request)
            return
        if isinstance(request, store.LoadAccount):
            result = store.AccountLoaded(self.accounts.get(request.key))
        elif isinstance(request, store.CreateAccount):
            result = self._create(request.account)
        elif isinstance(request, store.ReadHistory):
            result = self._read(request.username, request.limit)
        elif isinstance(request, store.ClaimSession):
            result = store.CLAIMED   # one process: the session logic itself replaces an older session
        elif isinstance(request, store.GoOnline):
            result = store.WentOnline(store.START)
        elif isinstance(request, store.Logout):
            return
        elif isinstance(request, store.LoadSanctions):
            result = store.SanctionsLoaded(self.moderation.get("ban", request.key),
                                           self.moderation.get("mute", request.key))
        elif isinstance(request, store.ListSanctions):
            result = store.SanctionsListed(list(self.moderation.kept.values()))
        elif isinstance(request, store.Moderate):
            result = self._moderate(request.record)
        elif isinstance(request, store.SaveKey):
            result = self._save_key(request.username, request.key_form)
        elif isinstance(request, store.LoadLastKey):
            result = self._last_key(request.key)
        elif isinstance(request, store.TakeOffline):
            result = self._take_offline(request.username, request.recent, request.since)
        else:
            raise TypeError(f"not a store request: {request!r}")
        self._queue.append([request.cid, result, None])

    def _create(self, account: Account) -> store.Result:
        try:
            if not self.accounts.add(account):
                return store.AccountCreated(False)
        except OSError as exc:
            log.error("storing account %r failed: %s", account.username, exc)
            return store.FAILED
        self.history.create(account.username)
        return store.AccountCreated(True)

    def _read(self, username: str, limit: int | None) -> store.Result:
        if self._messages or self._user_ops:
            self._write()   # what was asked for before this read is in it
        try:
            if limit is not None and limit <= HELD_LIMIT:
                return store.HistoryRead(merge_history(self.history.items_back(username), self.room, limit,
                                                       self._open.get(username)))
            # A whole history, or a limit that may hold most of it: read as the pages are taken,
            # once a slot is free (opened now if one is).
            read = store.SlotRead(self.read_slots, lambda: _lazy_history(
                self.history, _OpenFiles(self.history.open_forward(username)), self.room, limit))
            read.open_now()
            return store.HistoryRead(read)
        except OSError as exc:
            log.error("reading the history of %r failed: %s", username, exc.strerror or exc)
            return store.FAILED

    def _moderate(self, record: store.ModRecord) -> store.Result:
        try:
            return store.ModerationStored(self.moderation.add(record))
        except OSError as exc:
            log.error("storing a moderation action on %r failed: %s", record.username, exc)
            return store.FAILED


    # --- offline PMs (docs/PROTOCOL.md sections 4.5 and 5) -----------------------------
    def _path(self, username: str, suffix: str) -> str:
        return os.path.join(self.directory, username + suffix)   # usernames are validated: stays inside

    def _save_key(self, username: str, key_form: str) -> store.Result:
        """``<Username>.key`` holds the key: written whole (temporary file, fsync, rename) when it changes."""
        try:
            if self._read_key(username) == key_form:
                return store.KEY_SAVED
        except OSError:
            pass   # written anew below
        path = self._path(username, KEY_SUFFIX)
        try:
            fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                _write_all(fd, key_form.encode("ascii") + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(path + ".tmp", path)
        except (OSError, UnicodeEncodeError) as exc:
            log.error("storing the key of %r failed: %s", username, exc)
            return store.FAILED
        self._last_keys[username] = key_form
        return store.KEY_SAVED

    def _read_key(self, username: str) -> str | None:
        """Raises: OSError: the file exists but cannot be read."""
        known = self._last_keys.get(username)
        if known is not None:
            return known
        try:
            with open(self._path(username, KEY_SUFFIX), "rb") as fh:
                text = fh.read().decode("ascii", "replace").strip()
        except FileNotFoundError:
            return None
        if text:
            self._last_keys[username] = text
        return text or None

    def _last_key(self, key: str) -> store.Result:
        account = self.accounts.get(key)
        if account is None:
            return store.LastKey(None, None)
        try:
            return store.LastKey(account.username, self._read_key(account.username))
        except OSError as exc:
            log.error("reading the key of %r failed: %s", account.username, exc.strerror or exc)
            return store.FAILED

    def _kept_for(self, username: str) -> Counter:
        """The PMs kept for the user, counted by sender (lower case; "" for a line that names none).

        Raises:
            OSError: the file exists but cannot be read.
        """
        kept = self._kept.get(username)
        if kept is None:
            kept = Counter()
            path = self._path(username, OFFLINE_SUFFIX)
            try:
                with open(path, "rb") as fh:
                    for _, line in complete_lines(fh.read(), path):
                        try:
                            sender = json.loads(line).get("from")
                        except (ValueError, AttributeError):
                            sender = None
                        kept[sender.lower() if isinstance(sender, str) else ""] += 1
            except FileNotFoundError:
                pass
            self._kept[username] = kept
        return kept

    def _keep_pm(self, request: store.StoreOfflinePM) -> None:
        """A PM for an offline target: its history lines go with this pass's PMs, then its kept copy."""
        try:
            kept = self._kept_for(request.target)
        except OSError as exc:
            log.error("reading the kept PMs of %r failed: %s", request.target, exc.strerror or exc)
            self._queue.append([request.cid, store.FAILED, None])
            return
        sender = request.sender.lower()
        if sum(kept.values()) >= request.limit:
            self._queue.append([request.cid, store.Appended(full=True), None])
            return
        if request.sender_limit and kept[sender] >= request.sender_limit:
            self._queue.append([request.cid, store.Appended(full=True, sender_full=True), None])
            return
        if self._id_refused(request.cid, request.pm_id):
            return
        kept[sender] += 1   # reserved now, so one pass cannot pass the bounds
        append = store.AppendHistory(request.cid, request.entries, request.sender, "PM", request.frame,
                                     request.target.lower(), pm_id=request.pm_id)
        message = _Message(append, (request.target, sender, request.offline_frame[framing.HEADER_SIZE:]))
        self._messages.append(message)
        for owners, line in request.entries:
            for owner in owners:
                self._user_ops.append((owner, self._room_bytes, line, message))
        self._queue.append([request.cid, None, message])

    def _id_refused(self, cid: int, pm_id: store.PmId | None) -> bool:
        """A PM2 whose id was used: refused (queued as such) before anything is written."""
        reason = self.pm_ids.use(pm_id) if pm_id is not None else None
        if reason:
            self._queue.append([cid, store.IdRefused(reason), None])
        return bool(reason)

    def _write_kept(self, messages: list) -> None:
        """After the histories: the kept copy of each PM for an offline target (``<Username>.offline``)."""
        for message in messages:
            if message.offline is None:
                continue
            target, sender, body = message.offline
            result = message.result
            if result is store.FAILED or (isinstance(result, store.Appended) and result.failed):
                kept = self._kept.get(target)   # (dropped, to be counted again, by an earlier failure)
                if kept is not None:
                    kept[sender] -= 1
                continue
            path = self._path(target, OFFLINE_SUFFIX)
            try:
                fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    cut_torn_tail(fd, path)
                    _write_all(fd, body + b"\n")
                finally:
                    os.close(fd)
            except OSError as exc:
                log.error("keeping a PM for %r failed: %s", target, exc.strerror or exc)
                self._kept.pop(target, None)   # counted again from the file
                message.result = store.Appended(frozenset({target}))

    def _recent(self, count: int, since: str = "") -> tuple:
        """Those of the room log's newest ``count`` BMs not older than ``since``, oldest first;
        none if they cannot be read. Reading stops at the first one older than ``since`` by more
        than TS_ORDER_SLACK (a clock set back may have stored a few out of order)."""
        if count <= 0:
            return ()
        floor = ts_before(since, TS_ORDER_SLACK) if since else ""
        lines = []
        try:
            for read, text in enumerate(self.room.read_back(0, self.room.end), 1):
                ts = _ts_of(text) if since else ""
                if ts < floor:
                    break
                if ts >= since:
                    lines.append(text)
                if read >= count:
                    break
        except OSError as exc:
            log.error("reading the room log failed: %s", exc.strerror or exc)
            return ()
        return tuple(reversed(lines))

    def _take_offline(self, username: str, recent: int = 0, since: str = "") -> store.Result:
        """The PMs kept for the user, oldest first (the file is removed, so each goes to one
        login), and the room's newest ``recent`` BMs since ``since``."""
        if self._messages or self._user_ops:
            self._write()   # what was asked for before this is in it
        newest = self._recent(recent, since)
        path = self._path(username, OFFLINE_SUFFIX)
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            self._kept[username] = Counter()
            return store.OfflineTaken([], newest)
        except OSError as exc:
            log.error("reading the kept PMs of %r failed: %s", username, exc.strerror or exc)
            return store.FAILED
        frames = []
        for number, line in complete_lines(data, path):
            if line.startswith(b"{") and line.endswith(b"}"):
                frames.append(framing.encode_raw(framing.KIND_DATA, line))
            else:
                log.warning("%s, line %d: skipping a corrupt kept PM", path, number)
        try:
            os.unlink(path)   # delivered: marked so durably before they are sent
            dir_fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            log.error("marking the kept PMs of %r delivered failed: %s", username, exc.strerror or exc)
            return store.FAILED
        self._kept[username] = Counter()
        return store.OfflineTaken(frames, newest)

    def flush(self) -> list[tuple[int, store.Result]]:
        """Write what is pending (one write per file) and return every completion, in order."""
        if self._messages or self._user_ops:
            self._write()
        queue, self._queue = self._queue, []
        return [(cid, result if message is None else message.result) for cid, result, message in queue]

    def _disk_low(self) -> bool:
        if not self.min_free:
            return False
        try:
            info = os.statvfs(self.directory)
        except OSError:
            return False
        low = info.f_bavail * info.f_frsize < self.min_free
        if low != self._low_disk:
            self._low_disk = low
            if low:
                log.error("less than %d bytes free in %s: refusing new messages (internal)",
                          self.min_free, self.directory)
            else:
                log.info("disk space is back in %s: accepting messages again", self.directory)
        return low

    def _write(self) -> None:
        """The group commit: the room log first, then each user file (PM senders' first)."""
        lines, self._room_lines, self._room_bytes = self._room_lines, [], 0
        ops, self._user_ops = self._user_ops, []
        messages, self._messages = self._messages, []
        base = self.room.end
        refused = bool(messages) and self._disk_low()
        room_ok = not refused and (not lines or self.room.append(b"".join(lines)))
        if refused or not room_ok:
            for message in messages:
                if refused or message.request.kind != "PM":
                    message.result = store.FAILED
        chunks: dict[str, list] = {}
        for owner, before, what, message in ops:
            at = base + before if room_ok else base
            if message is None:
                line = mark_line(what, at, self.room.run)
            elif message.result is store.FAILED:
                continue
            else:
                line = pm_line(at, what.rstrip(b"\n"))
            chunks.setdefault(owner, []).append((at, line, message))
        senders = {m.request.sender for m in messages if m.request.kind == "PM" and m.result is not store.FAILED}
        for owner in [o for o in chunks if o in senders]:
            if not self._write_user(owner, chunks.pop(owner)):
                for m in messages:
                    if m.request.kind == "PM" and m.request.sender == owner:
                        m.result = store.FAILED
        for owner, items in chunks.items():
            items = [item for item in items if item[2] is None or item[2].result is not store.FAILED]
            if items and not self._write_user(owner, items):
                for _, _, message in items:
                    if message is not None:
                        message.result = store.Appended(frozenset({owner}))
        self._write_kept(messages)
        self.pm_ids.write([m.request.pm_id for m in messages
                           if m.request.pm_id is not None and m.result is not store.FAILED])

    def _write_user(self, owner: str, items: list) -> bool:
        """One user's lines of this pass in one write (rotating the file first if it is full)."""
        retry = self._retry.pop(owner, [])
        was_open = self._open.get(owner)
        for at, line, message in items:
            if message is None:
                if line.startswith(b'{"kind":"online"'):
                    self._open[owner] = at
                else:
                    self._open.pop(owner, None)
        data = b"".join(retry + [line for _, line, _ in items])
        history = self.history
        if history.needs_rotation(owner, len(data)):
            split = items[0][0]
            if was_open is not None and not retry:
                ok = history.append(owner, mark_line(False, split, self.room.run))
                if ok and history.rotate(owner):
                    data = mark_line(True, split, self.room.run) + data
            else:
                history.rotate(owner)
        if history.append(owner, data):
            return True
        marks = retry + [line for _, line, message in items if message is None]
        self._retry[owner] = marks[-MAX_RETRIED_MARKS:]
        return False

    def events(self) -> list[store.ClusterEvent]:
        return []

    def tick(self, now: float) -> None:
        """No timers: a CH read let in since the last pass is taken up in this one."""
        self.read_slots.woken = False

    def next_tick(self) -> float | None:
        return time.monotonic() if self.read_slots.woken else None

    def send(self) -> None:
        """Nothing to send: a file store answers within the pass."""

    def close(self) -> None:
        self.accounts.close()
        self.room.close()
        self.history.close()
        self.moderation.close()
        self.pm_ids.close()


_ALL_WRITTEN = store.Appended()
