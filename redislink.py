"""One pipelined Redis connection for a ``selectors`` loop: no threads, no blocking calls.

A ``RedisLink`` owns a non-blocking socket, a write buffer, a reply parser
(``resp.RespParser``) and a FIFO of callbacks: ``call(callback, *args)``
queues a command and its callback; Redis answers in order, so the n-th reply
goes to the n-th callback, called from ``on_readable`` with the reply as its
one argument. An error reply arrives as a ``resp.RedisError`` value, in its
place; nothing is raised at the caller of ``call``.

Theory of operation.

* Connect: the address is resolved when the link is made (give an IP address
  to avoid a DNS lookup), then the connect runs non-blocking. A handshake is
  queued first: ``AUTH`` (if the URL has a password), ``SELECT db`` (if the
  URL has ``/db``), ``PING``, then ``SCRIPT LOAD`` of the scripts given. The
  caller's commands wait unsent until every handshake reply is good, so a
  Redis still loading its AOF (``-LOADING``) or a wrong password fails the
  link before any command was sent.
* Writes are batched: ``call`` only appends to the write buffer; the bytes go
  out from ``on_writable`` (or an explicit ``flush()``), so the commands of
  one loop pass leave in one ``send``.
* Failure: a closed or reset socket, a protocol error, or ``close()`` breaks
  the link for good: every pending callback gets a ``LinkError`` value (its
  ``sent`` says whether the command may have reached Redis, i.e. may have
  run), ``on_down(link, error)`` is called, and the socket is closed. To
  reconnect, make a new link.
* Stalls: Redis can stop answering without closing (SIGSTOP, a long script,
  a dead machine). ``oldest_pending_age(now)`` is how long the oldest
  unanswered command has waited without any byte arriving; the owner treats
  more than ``STALL_SECONDS`` as a broken link. A command that blocks in
  Redis by design (``XREAD BLOCK``) says so with ``blocks_for``.
* Scripts: ``eval(callback, script, keys, args)`` sends ``EVALSHA``, with a
  ``SCRIPT LOAD`` pipelined ahead of a script's first use on this connection
  (or loaded in the handshake: ``scripts=``). A ``NOSCRIPT`` reply (someone
  ran ``SCRIPT FLUSH``) is answered by sending ``EVAL``; that retry goes
  behind the commands queued meanwhile, so it can run after them.

Callbacks run inside ``on_readable`` (or inside ``close``/a failure); they may
call ``call``/``eval``/``close``. If a callback raises, the other replies of
the batch are still delivered, and the first exception is raised afterwards.

``BlockingRedis`` drives one link with a private selector until each answer
is in: for tests and tools only, never inside the server's loop.

TLS (``rediss://``). The URL forms are::

    redis://[[user]:password@]host[:port][/db]
    rediss://[[user]:password@]host[:port][/db][?option=value&...]

``rediss://`` is TLS 1.2 or later to Redis's ``tls-port``, with the server's
certificate always verified (there is no way to turn verification off). The
query options, each at most once, only with ``rediss://``:

* ``ca=FILE``: verify against the CA certificate(s) in the PEM file FILE
  instead of the system's CAs (a self-signed server certificate can be its
  own CA);
* ``check_hostname=no`` (or ``yes``, the default): whether the certificate
  must name the URL's host (a DNS name, or an IP address in its
  subjectAltName); the chain is verified either way;
* ``cert=FILE`` and ``key=FILE`` (``key`` defaults to ``cert``): a client
  certificate, for a Redis with ``tls-auth-clients yes``.

Any other option, or an option on a ``redis://`` URL, is a ``ValueError``, so
a typo never gives a weaker link than asked for. A ``rediss://`` link never
falls back to plain: a handshake that fails (a certificate that does not
verify, a plain port) fails the link with a ``LinkError`` ("LINK TLS ...")
before any command, AUTH included, has left.

The socket stays non-blocking and no ``ssl.SSLSocket`` is used: an
``ssl.SSLObject`` over two ``ssl.MemoryBIO``s (as in ``tlslayer.py``) sits
between the socket and the RESP buffers. ``on_writable`` starts the
handshake once the connect finishes; ``on_readable`` feeds what arrives to
the TLS object, continues the handshake (``SSLWantReadError`` only means "read
more"), and reads plaintext until the TLS object has none left, so no reply
waits inside it. The handshake commands (AUTH, SELECT, PING, SCRIPT LOAD) are
queued as plaintext and encrypted once the handshake is done; ``flush``
encrypts at most ``TLS_CHUNK`` bytes ahead of what the socket has taken, so a
big value is not held twice. While the TLS handshake is not done the link
does not ask for EVENT_WRITE unless handshake bytes are waiting. A stalled
handshake is a stall like any other (the handshake's PING is pending). The
SSL contexts are made once per set of options and kept.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import os
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any, Callable, NamedTuple
from urllib.parse import parse_qsl, unquote, urlsplit

import resp
from resp import RedisError

STALL_SECONDS = 2.0     # docs/SCALEOUT.md: a command unanswered for 2 s means a broken link
READ_SIZE = 262144      # per recv; a pass reads at most MAX_READS_PER_PASS of them
MAX_READS_PER_PASS = 16  # then other sockets get their turn
DEFAULT_PORT = 6379
TLS_CHUNK = 262144      # plaintext encrypted per step of flush, at most this much ahead of the socket
TLS_OPTIONS = ("ca", "check_hostname", "cert", "key")

Callback = Callable[[Any], Any]


class LinkError(RedisError):
    """The link failed before the reply came (message starts with ``LINK``).

    ``sent`` is False when the command never left this process, so it did not
    run; True when it may have reached Redis and run (or not).
    """

    def __init__(self, message: str, sent: bool = True) -> None:
        super().__init__(message)
        self.sent = sent


class Script:
    """A Lua script: its source and SHA1 (the ``EVALSHA`` name)."""

    __slots__ = ("name", "doc", "source", "sha")

    def __init__(self, name: str, doc: str, source: str) -> None:
        self.name = name
        self.doc = doc
        self.source = source
        self.sha = hashlib.sha1(source.encode("utf-8")).hexdigest()

    def __repr__(self) -> str:
        return f"Script({self.name!r}, sha={self.sha[:12]})"


class TLSOptions(NamedTuple):
    """A rediss:// URL's TLS settings (see the module docstring)."""

    ca: str | None = None          # CA file (PEM); None: the system's CAs
    check_hostname: bool = True
    cert: str | None = None        # client certificate (PEM)
    key: str | None = None         # its private key (PEM); None: in cert


class RedisAddress(NamedTuple):
    """Where a redis:// or rediss:// URL points; ``tls`` is None for plain redis://."""

    host: str
    port: int
    db: int
    password: str | None
    username: str | None = None
    tls: TLSOptions | None = None


def redact(url: str) -> str:
    """The URL with its password (if any) replaced by ``***``, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()


def parse_url(url: str) -> RedisAddress:
    """``redis[s]://[[username]:password@]host[:port][/db][?options]`` -> its parts.

    Raises:
        ValueError: not a redis:// or rediss:// URL, a bad port or db number, or
            an unknown, repeated or misplaced option.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ValueError(f"not a redis[s]://HOST[:PORT][/DB] URL: {url!r}")
    port = parts.port or DEFAULT_PORT       # .port raises ValueError on a bad port
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"the database in {url!r} must be a number")
    password = unquote(parts.password) if parts.password is not None else None
    username = unquote(parts.username) if parts.username else None
    tls = None
    if parts.scheme == "rediss":
        tls = _tls_options(url, parts.query)
    elif parts.query:
        raise ValueError(f"options ({parts.query!r}) are for rediss:// URLs only: {url!r}")
    return RedisAddress(parts.hostname, port, int(path or 0), password, username, tls)


def _tls_options(url: str, query: str) -> TLSOptions:
    options: dict[str, str] = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ValueError(f"bad options in {url!r}: {query!r}") from None
    for name, value in pairs:
        if name not in TLS_OPTIONS:
            raise ValueError(f"unknown option {name!r} in {url!r} (known: {', '.join(TLS_OPTIONS)})")
        if name in options:
            raise ValueError(f"option {name!r} given twice in {url!r}")
        if not value:
            raise ValueError(f"option {name!r} needs a value in {url!r}")
        options[name] = value
    check = options.get("check_hostname", "yes").lower()
    if check not in ("yes", "no"):
        raise ValueError(f"check_hostname must be yes or no in {url!r}")
    if "key" in options and "cert" not in options:
        raise ValueError(f"option 'key' needs 'cert' in {url!r}")
    return TLSOptions(options.get("ca"), check == "yes", options.get("cert"), options.get("key"))


_contexts: dict[TLSOptions, ssl.SSLContext] = {}
_contexts_lock = threading.Lock()   # BlockingRedis may be used from a tool's threads


def tls_context(options: TLSOptions) -> ssl.SSLContext:
    """The client SSL context for these options (made once, then kept).

    Raises:
        OSError: a CA, certificate or key file cannot be read or loaded.
    """
    with _contexts_lock:
        context = _contexts.get(options)
        if context is not None:
            return context
        what = f"the CA file {options.ca}" if options.ca else "the system's CA certificates"
        try:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=options.ca)
            what = f"the client certificate {options.cert}"
            if options.cert:
                context.load_cert_chain(options.cert, options.key)
        except (OSError, ValueError) as exc:     # ssl.SSLError is an OSError
            raise OSError(f"cannot load {what} for rediss://: {exc}") from None
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.check_hostname = options.check_hostname
        context.verify_mode = ssl.CERT_REQUIRED
        _contexts[options] = context
        return context


class _Pending:
    """One command waiting for its reply."""

    __slots__ = ("callback", "queued_at", "blocks_for", "start")

    def __init__(self, callback: Callback, queued_at: float, blocks_for: float, start: int) -> None:
        self.callback = callback
        self.queued_at = queued_at
        self.blocks_for = blocks_for
        self.start = start    # offset of its first byte in the output stream; -1 while held


class RedisLink:
    """A pipelined, non-blocking Redis connection; see the module docstring."""

    def __init__(self, url: str, *, selector: selectors.BaseSelector | None = None, data: Any = None,
                 scripts: Iterable[Script] = (), on_down: Callable[[RedisLink, LinkError], Any] | None = None,
                 max_bulk: int = resp.DEFAULT_MAX_BULK, parser: Any = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """Start connecting to ``url``; with a selector, register there (``data`` defaults to the link).

        Raises:
            ValueError: a bad URL.
            OSError: the host name does not resolve, or (rediss://) a CA or
                certificate file cannot be loaded.
        """
        host, port, db, password, username, tls = parse_url(url)
        self.url = url
        self.shown = redact(url)   # for messages and logs: never the password
        self._tls: ssl.SSLObject | None = None
        self._tls_in = ssl.MemoryBIO()     # TLS: ciphertext from Redis, into the TLS object
        self._tls_out = ssl.MemoryBIO()    # TLS: ciphertext from the TLS object, to Redis
        self._tls_ready = tls is None      # True once the TLS handshake is done (at once for plain)
        self._wire = bytearray()           # TLS: ciphertext waiting to be sent
        self._peer_closed = False          # TLS: Redis sent close_notify
        self._verified_by = ""             # TLS: what the certificate is checked against, for errors
        if tls is not None:
            self._verified_by = (f"verified against {tls.ca or 'the system CAs'}"
                                 + (f" for host {host}" if tls.check_hostname else ", host name not checked"))
            self._tls = tls_context(tls).wrap_bio(self._tls_in, self._tls_out, server_side=False,
                                                  server_hostname=host)
        self.clock = clock
        self.on_down = on_down
        self.error: LinkError | None = None
        self.parser = parser if parser is not None else resp.RespParser(max_bulk)
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        infos.sort(key=lambda info: info[0] != socket.AF_INET)   # "localhost": 127.0.0.1 before ::1
        family, kind, proto, _, address = infos[0]
        self.address = address
        self.sock = socket.socket(family, kind, proto)
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._fd = self.sock.fileno()
        self._pending: collections.deque[_Pending] = collections.deque()
        self._out = bytearray()
        self._queued = 0          # bytes ever put in _out
        self._sent = 0            # bytes ever sent
        self._held: list[tuple[_Pending, bytes]] = []   # the caller's commands until the handshake is done
        self._handshake_left = 0
        self._loaded: set[str] = set()
        self._load_errors: dict[str, RedisError] = {}
        self._last_progress = clock()
        self._selector: selectors.BaseSelector | None = None   # set once registered
        self._data = self if data is None else data
        self._events = 0
        self._connecting = True
        self._connect_errno = 0
        err = self.sock.connect_ex(address)
        if err not in (0, errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
            self._connect_errno = err      # reported from on_writable, like a late failure
        if password is not None:
            self._handshake("AUTH", *([username] if username else []), password)
        if db:
            self._handshake("SELECT", db)
        self._handshake("PING", expect=b"PONG")
        for script in scripts:
            self._handshake("SCRIPT", "LOAD", script.source, expect=script.sha.encode("ascii"))
            self._loaded.add(script.sha)
        if selector is not None:
            self._events = selectors.EVENT_READ | selectors.EVENT_WRITE
            selector.register(self.sock, self._events, self._data)
            self._selector = selector

    # --- the selector side ------------------------------------------------------
    def fileno(self) -> int:
        return self._fd

    @property
    def broken(self) -> bool:
        """True once the link has failed or been closed."""
        return self.error is not None

    @property
    def ready(self) -> bool:
        """True once connected and the handshake is answered."""
        return self.error is None and not self._connecting and self._handshake_left == 0

    @property
    def pending(self) -> int:
        """Commands waiting for their replies (handshake included)."""
        return len(self._pending)

    @property
    def pending_bytes(self) -> int:
        """Bytes queued and not yet sent, held commands included."""
        return len(self._out) + len(self._wire) + sum(len(data) for _, data in self._held)

    @property
    def tls(self) -> bool:
        """True for a rediss:// link."""
        return self._tls is not None

    def wants_write(self) -> bool:
        """True while connecting or while there are bytes to send: register EVENT_WRITE then.

        (Over TLS, commands queued before the handshake is done wait for it, not for the socket.)
        """
        return self.error is None and (self._connecting or bool(self._wire)
                                       or (bool(self._out) and self._tls_ready))

    def on_ready(self, mask: int) -> None:
        """The selector says the socket is ready (``mask``: EVENT_WRITE and/or EVENT_READ)."""
        if mask & selectors.EVENT_WRITE:
            self.on_writable()
        if mask & selectors.EVENT_READ:
            self.on_readable()

    def on_writable(self) -> None:
        """The socket is writable: finish the connect, then send what is queued."""
        if self.error is not None:
            return
        if self._connecting:
            err = self._connect_errno or self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._fail(LinkError(f"LINK cannot connect to {self.shown}: {os.strerror(err)}", sent=False))
                return
            self._connecting = False
            if self._tls is not None:
                self._tls_step()      # the ClientHello
                if self.error is not None:
                    return
        self.flush()

    def on_readable(self) -> int:
        """Read what arrived and hand each reply to its callback; returns how many replies came."""
        count = 0
        for _ in range(MAX_READS_PER_PASS):
            if self.error is not None:
                break
            try:
                data = self.sock.recv(READ_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._fail(LinkError(f"LINK connection to {self.shown} failed: {exc.strerror or exc}"))
                break
            if not data:
                self._fail(LinkError(f"LINK connection to {self.shown} closed by Redis"))
                break
            self._last_progress = self.clock()
            if self._tls is not None:
                more = len(data) == READ_SIZE
                plain = self._decrypt(data)
                if plain is None:
                    break
                if not plain and not self._peer_closed:
                    if not more:
                        break
                    continue
                data = plain
            else:
                more = len(data) == READ_SIZE
            try:
                replies = self.parser.feed(data)
            except resp.ProtocolError as exc:
                try:
                    count += self._dispatch(exc.replies)
                finally:
                    self._fail(LinkError(f"LINK protocol error from {self.shown}: {exc.message}"))
                break
            try:
                count += self._dispatch(replies)
            finally:
                if self._peer_closed:
                    self._fail(LinkError(f"LINK connection to {self.shown} closed by Redis (TLS close_notify)"))
            if not more or self._peer_closed:
                break
        if self._tls is not None and self.error is None:
            self._update_events()    # handshake bytes to send, or commands the handshake let go
        return count

    def settle(self, done: Callable[[], bool], timeout: float) -> bool:
        """Drive this link alone, on a selector of its own, until ``done()`` or ``timeout``
        seconds; True if done. For tools, tests and a node's last commands at shutdown, never
        inside a running loop (it blocks)."""
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as own:   # (a descriptor past 1,023 is fine, unlike select())
            own.register(self.sock, selectors.EVENT_READ)
            while not done():
                left = deadline - time.monotonic()
                if left <= 0 or self.error is not None:
                    return done()
                own.modify(self.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if self.wants_write() else 0))
                for _key, mask in own.select(left):
                    if mask & selectors.EVENT_WRITE:
                        self.on_writable()
                    if mask & selectors.EVENT_READ and self.error is None:
                        self.on_readable()
        return True

    def flush(self) -> None:
        """Send what is queued now, as far as the socket takes it (never blocks)."""
        if self.error is not None or self._connecting:
            return
        if self._tls is None:
            out = self._out
            while out:
                try:
                    sent = self.sock.send(out)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    self._fail(LinkError(f"LINK sending to {self.shown} failed: {exc.strerror or exc}"))
                    return
                del out[:sent]
                self._sent += sent
        else:
            out, wire = self._out, self._wire
            while True:
                if self._tls_ready and out and len(wire) < TLS_CHUNK:
                    chunk = bytes(out[:TLS_CHUNK])
                    try:
                        self._tls.write(chunk)
                    except ssl.SSLError as exc:
                        self._fail(LinkError(f"LINK TLS to {self.shown} failed: {exc}"))
                        return
                    del out[:len(chunk)]
                    self._sent += len(chunk)      # plaintext handed to TLS: counted as (maybe) sent
                    wire += self._tls_out.read()
                if not wire:
                    break
                try:
                    sent = self.sock.send(wire)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    self._fail(LinkError(f"LINK sending to {self.shown} failed: {exc.strerror or exc}"))
                    return
                del wire[:sent]
        self._update_events()

    def oldest_pending_age(self, now: float | None = None) -> float:
        """Seconds the oldest unanswered command has waited with no byte arriving (0 if none).

        A command sent with ``blocks_for`` starts counting that much later.
        """
        if not self._pending:
            return 0.0
        if now is None:
            now = self.clock()
        head = self._pending[0]
        since = max(head.queued_at + head.blocks_for, self._last_progress)
        return max(0.0, now - since)

    def stalled(self, now: float | None = None, limit: float = STALL_SECONDS) -> bool:
        """True if the oldest command has waited more than ``limit`` seconds: treat the link as broken."""
        return self.oldest_pending_age(now) > limit

    # --- commands ---------------------------------------------------------------
    def call(self, callback: Callback, *args: bytes | str | int, blocks_for: float = 0.0) -> None:
        """Queue one command; ``callback(reply)`` runs when its reply (or the link's failure) comes.

        On a link that is already down the callback runs at once with a
        ``LinkError`` whose ``sent`` is False.
        """
        if self.error is not None:
            callback(LinkError(self.error.message, sent=False))
            return
        data = resp.encode_command(*args)
        entry = _Pending(callback, self.clock(), blocks_for, -1)
        self._pending.append(entry)
        if self._handshake_left:
            self._held.append((entry, data))
        else:
            self._write(entry, data)

    def eval(self, callback: Callback, script: Script, keys: Sequence = (), args: Sequence = ()) -> None:
        """Run a Lua script by ``EVALSHA``; ``SCRIPT LOAD`` goes ahead of its first use on this link."""
        sha = script.sha
        if sha not in self._loaded:
            # Pipelined ahead, so the EVALSHA behind it finds the script. (SCRIPT LOAD,
            # unlike EVAL, puts it where Redis 7.4+ never evicts it.)
            self._loaded.add(sha)

            def loaded(reply: Any) -> None:
                if type(reply) is RedisError:      # a compile error: the EVALSHAs behind get it
                    self._load_errors[sha] = reply
                    self._loaded.discard(sha)
                else:
                    self._load_errors.pop(sha, None)

            self.call(loaded, "SCRIPT", "LOAD", script.source)

        def on_reply(reply: Any) -> None:
            if type(reply) is RedisError and reply.code == "NOSCRIPT":
                error = self._load_errors.get(sha)
                if error is not None:
                    callback(error)
                    return
                # SCRIPT FLUSH since it was loaded: run it by its source (behind what was queued since).
                self._loaded.discard(sha)
                self.call(callback, "EVAL", script.source, len(keys), *keys, *args)
            else:
                callback(reply)

        self.call(on_reply, "EVALSHA", sha, len(keys), *keys, *args)

    def close(self) -> None:
        """Close now: every pending callback gets a ``LinkError``; ``on_down`` is called."""
        if self.error is None:
            if self._tls is not None and self._tls_ready and not self._connecting:
                try:   # close_notify, if the socket takes it now; never waited for
                    self._tls.unwrap()
                except ssl.SSLError:
                    pass
                try:
                    self.sock.send(self._wire + self._tls_out.read())
                except OSError:
                    pass
            self._fail(LinkError(f"LINK to {self.shown} closed"))

    # --- inside -----------------------------------------------------------------
    def _tls_step(self) -> None:
        """Advance the TLS handshake with what has arrived; queue what it says back."""
        assert self._tls is not None
        try:
            self._tls.do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass
        except ssl.SSLCertVerificationError as exc:
            self._fail(LinkError(f"LINK TLS to {self.shown} refused the server's certificate: "
                                 f"{exc.verify_message or exc.reason or exc} ({self._verified_by})", sent=False))
            return
        except ssl.SSLError as exc:    # e.g. WRONG_VERSION_NUMBER: not a TLS port
            self._fail(LinkError(f"LINK TLS handshake with {self.shown} failed: {exc.reason or exc}", sent=False))
            return
        else:
            self._tls_ready = True
        self._wire += self._tls_out.read()

    def _decrypt(self, data: bytes) -> bytes | None:
        """Ciphertext read -> the plaintext it completes (b"" if none yet); None once the link failed."""
        assert self._tls is not None
        self._tls_in.write(data)
        if not self._tls_ready:
            self._tls_step()
            if self.error is not None:
                return None
            if not self._tls_ready:
                return b""
        chunks = []
        while True:    # until WantRead: nothing decrypted is left waiting inside the TLS object
            try:
                chunk = self._tls.read(READ_SIZE)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            except ssl.SSLZeroReturnError:
                chunk = b""
            except ssl.SSLError as exc:
                self._fail(LinkError(f"LINK TLS from {self.shown} failed: {exc.reason or exc}"))
                return None
            if not chunk:     # close_notify: what came before it is still delivered, then the link fails
                self._peer_closed = True
                break
            chunks.append(chunk)
        if self._tls_out.pending:
            self._wire += self._tls_out.read()
        return b"".join(chunks)
    def _handshake(self, *args: bytes | str | int, expect: bytes | None = None) -> None:
        def check(reply: Any) -> None:
            if isinstance(reply, LinkError):
                return
            if isinstance(reply, RedisError) or (expect is not None and reply != expect):
                command = args[0].decode() if isinstance(args[0], bytes) else args[0]
                self._fail(LinkError(f"LINK {self.shown} refused {command}: {reply!r}", sent=True))
                return
            self._handshake_left -= 1
            if not self._handshake_left:
                held, self._held = self._held, []
                for entry, data in held:
                    self._write(entry, data)

        self._handshake_left += 1
        entry = _Pending(check, self.clock(), 0.0, -1)
        self._pending.append(entry)
        self._write(entry, resp.encode_command(*args))

    def _write(self, entry: _Pending, data: bytes) -> None:
        entry.start = self._queued
        self._queued += len(data)
        self._out += data
        if not self._events & selectors.EVENT_WRITE:
            self._update_events()

    def _update_events(self) -> None:
        if self._selector is None or self.error is not None:
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.wants_write() else 0)
        if events != self._events:
            self._selector.modify(self.sock, events, self._data)
            self._events = events

    def _dispatch(self, replies: list) -> int:
        pending = self._pending
        problem: BaseException | None = None
        done = 0
        for reply in replies:
            if not pending:
                if self.error is None:
                    self._fail(LinkError(f"LINK {self.shown} sent a reply to no command: {reply!r}"))
                break
            entry = pending.popleft()
            done += 1
            try:
                entry.callback(reply)
            except Exception as exc:   # deliver the rest of the batch first
                problem = problem or exc
            if self.error is not None:
                break
        if problem is not None:
            raise problem
        return done

    def _fail(self, error: LinkError) -> None:
        if self.error is not None:
            return
        self.error = error
        if self._selector is not None and self._events:
            try:
                self._selector.unregister(self.sock)
            except (KeyError, ValueError):
                pass
        self._events = 0
        self.sock.close()
        pending, self._pending = self._pending, collections.deque()
        self._held = []
        self._out = bytearray()
        problem: BaseException | None = None
        for entry in pending:
            sent = entry.start >= 0 and entry.start < self._sent
            try:
                entry.callback(LinkError(error.message, sent=sent))
            except Exception as exc:
                problem = problem or exc
        if self.on_down is not None:
            self.on_down(self, error)
        if problem is not None:
            raise problem


class BlockingRedis:
    """A ``RedisLink`` driven to completion call by call: for tests and tools, never in the server loop."""

    def __init__(self, url: str, *, timeout: float = 5.0, scripts: Iterable[Script] = ()) -> None:
        self.timeout = timeout
        self._sel = selectors.DefaultSelector()
        self.link = RedisLink(url, selector=self._sel, scripts=scripts)

    def call(self, *args: bytes | str | int) -> Any:
        """Send one command and return its reply (an error reply is returned as a ``RedisError``).

        Raises:
            TimeoutError: no reply within the timeout.
        """
        return self.pipeline([args])[0]

    def eval(self, script: Script, keys: Sequence = (), args: Sequence = ()) -> Any:
        """Run a script and return its reply."""
        box: list = []
        self.link.eval(box.append, script, keys, args)
        self.wait_until(lambda: bool(box))
        return box[0]

    def pipeline(self, commands: Iterable[Sequence]) -> list:
        """Send the commands together; return their replies in order."""
        replies: list = []
        expected = 0
        for command in commands:
            self.link.call(replies.append, *command)
            expected += 1
        self.wait_until(lambda: len(replies) >= expected)
        return replies

    def wait_until(self, done: Callable[[], bool]) -> None:
        """Drive the link until ``done()`` (replies to commands queued on ``self.link`` arrive).

        Raises:
            TimeoutError: not done within the timeout (the link is closed).
        """
        link = self.link
        if not link.settle(done, self.timeout):
            handshaking = link.tls and not link._tls_ready
            link.close()
            raise TimeoutError(f"no reply from {link.url} within {self.timeout} s" +
                               (" (the TLS handshake did not finish: is that Redis's tls-port?)"
                                if handshaking else ""))

    def close(self) -> None:
        self.link.close()
        self._sel.close()

    def __enter__(self) -> BlockingRedis:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def ping(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bytes:
    """One raw PING on a fresh blocking connection: the first reply line (b"+PONG",
    b"-LOADING ..."), or b"" if nothing answers. For tools and tests waiting for a Redis to start."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            data = b""
            while not data.endswith(b"\r\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
            return data.strip()
    except OSError:
        return b""
