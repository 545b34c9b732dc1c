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
bans and mutes in force.

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
from collections import OrderedDict

import pg3lib
import store
from passwords import Account

log = logging.getLogger("chat.storage")

ACCOUNTS_FILE = "accounts.jsonl"
MODERATION_FILE = "moderation.jsonl"
SERVER_KEY_FILE = "server_key.pem"
HISTORY_SUFFIX = ".chat"
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
        try:
            with open(self.path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StorageError(f"cannot read {self.path}: {exc.strerror}") from None
        for number, line in complete_lines(data, self.path):
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
        try:
            with open(self.path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StorageError(f"cannot read {self.path}: {exc.strerror}") from None
        for number, line in complete_lines(data, self.path):
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


class HistoryLog:
    """``<Username>.chat`` files: append batches, read whole."""

    def __init__(self, directory: str, max_open: int = DEFAULT_MAX_OPEN_HISTORY) -> None:
        self.directory = directory
        self.max_open = max(1, max_open)
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

    def append(self, username: str, data: bytes) -> bool:
        """Append complete lines; False (and logged) if the write failed."""
        try:
            fd = self._fd(username)
            if username in self._maybe_torn:
                cut_torn_tail(fd, self.path(username))
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            self._maybe_torn.discard(username)
            return True
        except OSError as exc:
            self._maybe_torn.add(username)
            log.error("history write for %r failed: %s", username, exc.strerror or exc)
            if username in self._open:
                os.close(self._open.pop(username))
            return False

    def read(self, username: str) -> list[str]:
        """The complete, valid JSON lines of a user's history, oldest first."""
        try:
            with open(self.path(username), "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return []
        entries = []
        for number, line in complete_lines(data, self.path(username)):
            try:
                text = line.decode("utf-8")
                if not isinstance(json.loads(text), dict):
                    raise ValueError("not an object")
            except ValueError:
                log.warning("%s, line %d: skipping a corrupt entry", self.path(username), number)
                continue
            entries.append(text)
        return entries

    def close(self) -> None:
        for fd in self._open.values():
            os.close(fd)
        self._open.clear()


def load_server_keys(directory: str) -> pg3lib.KeyPair:
    """The server key pair from the data directory, created (mode 0600) on first start.

    Raises:
        StorageError: the file exists but is not a key, or cannot be written.
    """
    path = os.path.join(directory, SERVER_KEY_FILE)
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


def open_store(directory: str, max_open_history: int = DEFAULT_MAX_OPEN_HISTORY) -> tuple[FileStore, pg3lib.KeyPair]:
    """The data directory's store and the server key kept there (made on first start).

    Raises:
        StorageError: the directory, its accounts or its key cannot be used.
    """
    file_store = FileStore(directory, max_open_history)
    try:
        return file_store, load_server_keys(directory)
    except BaseException:
        file_store.close()
        raise


class FileStore:
    """The store seam over the data directory.

    ``submit(request)`` takes a store request from the session logic;
    ``flush()`` carries out what is pending and returns ``(cid, result)``
    completions in the order the requests were submitted. The history appends
    of one loop pass are written together (group commit): consecutive entries
    for the same owners (a BM's online snapshot) are joined once, and each file
    gets one write, before any completion is returned. Reads see the appends
    submitted before them.
    """

    node = ""   # one process: no cluster

    def __init__(self, directory: str, max_open_history: int = DEFAULT_MAX_OPEN_HISTORY) -> None:
        self.directory = directory
        if not os.path.isdir(directory):
            try:
                os.makedirs(directory, exist_ok=True)
            except OSError as exc:
                raise StorageError(f"cannot create the data directory {directory}: {exc.strerror}") from None
        if not os.access(directory, os.W_OK | os.X_OK):
            raise StorageError(f"the data directory {directory} is not writable")
        self.accounts = AccountStore(os.path.join(directory, ACCOUNTS_FILE))
        self.history = HistoryLog(directory, max_open_history)
        try:
            self.moderation = ModerationLog(os.path.join(directory, MODERATION_FILE))
        except BaseException:
            self.accounts.close()
            raise
        self._queue: list[list] = []      # [cid, result or None, append request or None], in order
        self._runs: list[list] = []       # [owners, [lines]]: pending appends, in order

    @property
    def pending(self) -> bool:
        return bool(self._queue)

    def submit(self, request: store.Request) -> None:
        """Take one store request; its result comes with this pass's ``flush``."""
        result: store.Result
        if isinstance(request, store.AppendHistory):
            runs, sender = self._runs, request.sender
            for owners, line in request.entries:
                if runs and runs[-1][0] is owners:
                    runs[-1][1].append(line)
                    runs[-1][2].append(sender)
                else:
                    runs.append([owners, [line], [sender]])
            self._queue.append([request.cid, None, request])
            return
        if isinstance(request, store.LoadAccount):
            result = store.AccountLoaded(self.accounts.get(request.key))
        elif isinstance(request, store.CreateAccount):
            result = self._create(request.account)
        elif isinstance(request, store.ReadHistory):
            result = store.HistoryRead(self._read(request.username))
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

    def _moderate(self, record: store.ModRecord) -> store.Result:
        try:
            return store.ModerationStored(self.moderation.add(record))
        except OSError as exc:
            log.error("storing a moderation action on %r failed: %s", record.username, exc)
            return store.FAILED

    def _read(self, username: str) -> list[str]:
        lines = self.history.read(username)
        for owners, pending, _ in self._runs:   # appends submitted before this read, not yet written
            if username in owners:
                lines.extend(line[:-1].decode("utf-8") for line in pending)
        return lines

    def flush(self) -> list[tuple[int, store.Result]]:
        """Write pending appends (one write per file) and return every completion, in order."""
        queue, self._queue = self._queue, []
        runs, self._runs = self._runs, []
        failed = self._write(runs) if runs else set()
        done = []
        for cid, result, append in queue:
            if append is not None:
                result = _ALL_WRITTEN if not failed else _appended(append, failed)
            done.append((cid, result))
        return done

    def _write(self, runs: list) -> set:
        """Each owner's lines of this pass in one write; returns the owners whose write failed.

        Senders' files go first. A line whose sender's file failed is then left
        out of everyone else's (rare: the chunks are built again without it).
        """
        senders = {sender for _, _, run_senders in runs for sender in run_senders}
        chunks = self._chunks(runs)
        append = self.history.append
        failed = {owner for owner in senders
                  if owner in chunks and not append(owner, _joined(chunks.pop(owner)))}
        if failed:
            kept = [[owners, [line for line, s in zip(lines, run_senders) if s not in failed], run_senders]
                    for owners, lines, run_senders in runs]
            chunks = self._chunks([run for run in kept if run[1]])
            for owner in senders:
                chunks.pop(owner, None)
        failed.update(owner for owner, mine in chunks.items() if not append(owner, _joined(mine)))
        return failed

    @staticmethod
    def _chunks(runs: list) -> dict:
        chunks: dict[str, list[bytes]] = {}
        for owners, lines, _ in runs:
            chunk = lines[0] if len(lines) == 1 else b"".join(lines)
            for owner in owners:
                mine = chunks.get(owner)
                if mine is None:
                    chunks[owner] = [chunk]
                else:
                    mine.append(chunk)
        return chunks

    def events(self) -> list[store.ClusterEvent]:
        return []

    def tick(self, now: float) -> None:
        """No timers."""

    def next_tick(self) -> float | None:
        return None

    def send(self) -> None:
        """Nothing to send: a file store answers within the pass."""

    def close(self) -> None:
        self.accounts.close()
        self.history.close()
        self.moderation.close()


_ALL_WRITTEN = store.Appended()


def _appended(append: store.AppendHistory, failed: set) -> store.Result:
    """The result of one append in a pass where some files could not be written."""
    if append.sender in failed:
        return store.FAILED
    return store.Appended(frozenset(owner for owners, _ in append.entries for owner in owners if owner in failed))


def _joined(chunks: list) -> bytes:
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
