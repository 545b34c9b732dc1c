"""Redis commands -> bytes and Redis replies <- bytes (RESP2, and RESP3 replies). No sockets.

Theory of operation: ``encode_command(*args)`` returns the bytes of one
command (an array of bulk strings). A reply parser is fed whatever bytes
arrived and returns the replies now complete, in order, keeping the rest;
``RespParser`` is the best one available: ``HiredisParser`` (the C parser of
PyPI ``hiredis`` >= 3.4.2, an optional extra) when it can be imported, else
``PythonParser``. Both take the same arguments and give the same replies:

* simple string, bulk string, verbatim string, big number -> ``bytes``
  (nothing is decoded; a verbatim string loses its ``txt:`` prefix);
* integer -> ``int``; double -> ``float``; boolean -> ``bool``;
* null, null bulk string, null array -> ``None``;
* array, set, push -> ``list``; map -> ``dict`` (built the way hiredis
  builds it, which matters only for a repeated key); an attribute comes out as a
  ``list`` of its keys and values, in the place where it stood (as hiredis
  does; Redis sends attributes only after ``HELLO 3``, which we never send);
* an error reply -> a ``RedisError`` *value* in the list, in its place, so
  that a pipeline's replies stay matched to its commands.

Every way the stream can be malformed ends in one exception,
``ProtocolError``; nothing else escapes ``feed``. The pure-Python parser
follows hiredis exactly (hypothesis checks both on arbitrary bytes): the
same values are accepted, with the same limits (nesting depth 1,024, at most
2**32-1 elements), and an error is certain after the same bytes (the one
exception is the size bound below). The error messages differ; ``code`` is
"bad_reply" or "too_large" in both. After a ``ProtocolError`` a parser stays
broken: the link must be dropped.

Bounds: a bulk string longer than ``max_bulk`` (512 MB by default, Redis's
own limit) is refused. The pure-Python parser refuses it as soon as the
header is in, before buffering any of it; hiredis does not report declared
lengths, so ``HiredisParser`` refuses once it holds more than ``max_bulk``
plus a little of one unfinished reply. Either way a parser holds at most
about ``max_bulk`` bytes of input, plus the replies already built.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

# Redis refuses bulk strings over 512 MB (proto-max-bulk-len); a longer
# declared length is a broken stream, not a reply to wait for.
DEFAULT_MAX_BULK = 512 * 1024 * 1024
MAX_DEPTH = 1024            # nested aggregates, as hiredis (REDIS_READER_MAX_REPLY_DEPTH)
MAX_ELEMENTS = 2**32 - 1    # elements of one aggregate, as hiredis (REDIS_READER_MAX_ARRAY_ELEMENTS)
# What an unfinished reply may hold beyond max_bulk: a bulk header, and the
# up to 1 KiB of consumed input that hiredis compacts away lazily.
_SLACK = 2048

_LLONG_MIN, _LLONG_MAX = -2**63, 2**63 - 1


class ProtocolError(Exception):
    """The reply stream is not RESP (``code`` "bad_reply"), or is over a limit ("too_large").

    Either way the connection must be dropped.
    """

    def __init__(self, message: str, code: str = "bad_reply") -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.replies: list = []   # replies complete before the bad one


def _too_large(message: str) -> ProtocolError:
    return ProtocolError(message, "too_large")


class RedisError(Exception):
    """An error reply (``-ERR ...``), returned as a value in its place among the replies.

    ``code`` is its first word (``ERR``, ``WRONGTYPE``, ``NOSCRIPT``, ``LOADING``...).
    Two errors are equal when their type and message are.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def code(self) -> str:
        return self.message.split(" ", 1)[0]

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.message == self.message   # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.message))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


# --- commands -----------------------------------------------------------------

def encode_command(*args: bytes | str | int) -> bytes:
    """The bytes of one command: an array of bulk strings (str as UTF-8, int in decimal).

    Raises:
        TypeError: an argument is not bytes, str or int (bool is refused: 1 or "1"?).
        ValueError: no arguments.
    """
    if not args:
        raise ValueError("a command needs at least its name")
    parts = [b"*%d\r\n" % len(args)]
    append = parts.append
    for arg in args:
        if type(arg) is bytes:
            data = arg
        elif isinstance(arg, str):
            data = arg.encode("utf-8")
        elif isinstance(arg, int) and not isinstance(arg, bool):
            data = b"%d" % arg
        elif isinstance(arg, (bytes, bytearray, memoryview)):
            data = bytes(arg)
        else:
            raise TypeError(f"a command argument must be bytes, str or int, not {type(arg).__name__}")
        append(b"$%d\r\n" % len(data))
        append(data)
        append(b"\r\n")
    return b"".join(parts)


# --- the pure-Python parser ---------------------------------------------------

_INTEGER = re.compile(rb"(?:0|-?[1-9][0-9]{0,18})\Z")
_DOUBLE = re.compile(rb"-?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\Z")
_MANTISSA_NONZERO = re.compile(rb"-?[0-9.]*[1-9]")
_BIGNUM = re.compile(rb"-?[0-9]*\Z")


def _long_long(text: bytes) -> int | None:
    """hiredis's string2ll: decimal, no sign but '-', no leading zeros, 64-bit signed."""
    if _INTEGER.match(text) is None:
        return None
    value = int(text)
    return value if _LLONG_MIN <= value <= _LLONG_MAX else None


def _bulk_length(text: bytes) -> int:
    length = _long_long(text)
    if length is None or length < -1:
        raise ProtocolError(f"bad bulk length {text[:40]!r}")
    return length


def _aggregate_length(text: bytes) -> int:
    count = _long_long(text)
    if count is None or count < -1 or count > MAX_ELEMENTS:
        raise ProtocolError(f"bad aggregate length {text[:40]!r}")
    return count


def _simple(text: bytes) -> bytes:
    if b"\r" in text or b"\n" in text:
        raise ProtocolError(f"simple string {text[:40]!r} holds a CR or LF")
    return text


def _error(text: bytes) -> RedisError:
    return RedisError(_simple(text).decode("utf-8", "replace"))


def _integer(text: bytes) -> int:
    value = _long_long(text)
    if value is None:
        raise ProtocolError(f"bad integer {text[:40]!r}")
    return value


def _double(text: bytes) -> float:
    # As hiredis: inf/-inf/nan/-nan in any case, else a plain decimal whose value
    # is finite and does not underflow to zero; 326 characters at most.
    if len(text) < 326:
        low = text.lower()
        if low == b"inf":
            return math.inf
        if low == b"-inf":
            return -math.inf
        if low == b"nan" or low == b"-nan":
            return float("nan")    # a new object each time, as hiredis makes (dict keys differ)
        if _DOUBLE.match(text):
            value = float(text)
            if math.isfinite(value) and (value != 0.0 or not _MANTISSA_NONZERO.match(text)):
                return value
    raise ProtocolError(f"bad double {text[:40]!r}")


def _null(text: bytes) -> None:
    if text:
        raise ProtocolError(f"bad null {text[:40]!r}")
    return None


def _boolean(text: bytes) -> bool:
    # hiredis tests the byte with strchr("tTfF"), which also finds the terminating NUL.
    if len(text) != 1 or text not in b"tTfF\x00":
        raise ProtocolError(f"bad boolean {text[:40]!r}")
    return text in b"tT"


def _bignum(text: bytes) -> bytes:
    if _BIGNUM.match(text) is None:
        raise ProtocolError(f"bad big number {text[:40]!r}")
    return text


_LINE_TYPES: dict[int, Callable[[bytes], Any]] = {
    ord("+"): _simple, ord("-"): _error, ord(":"): _integer, ord(","): _double,
    ord("_"): _null, ord("#"): _boolean, ord("("): _bignum,
}
_LIST, _MAP, _PAIRS = 0, 1, 2
_AGGREGATES = {ord("*"): _LIST, ord("~"): _LIST, ord(">"): _LIST, ord("%"): _MAP, ord("|"): _PAIRS}
_BULK, _VERBATIM = ord("$"), ord("=")


class PythonParser:
    """Incremental RESP reply parser in pure Python: ``feed(bytes) -> list`` of replies."""

    implementation = "python"

    def __init__(self, max_bulk: int = DEFAULT_MAX_BULK) -> None:
        self.max_bulk = max_bulk
        self._buf = bytearray()   # the start of a reply not yet complete
        self._need = 0            # bytes _buf must hold before parsing again is worth it (a long bulk)
        # Unfinished aggregates, outermost first: [container, elements left, is map, a key is next].
        self._stack: list[list] = []
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for the reply not yet complete."""
        return len(self._buf)

    def feed(self, data: bytes) -> list:
        """Take the bytes that arrived; return the replies now complete, in order.

        Raises:
            ProtocolError: the stream is broken; replies complete before the bad
                one are attached as ``error.replies``.
        """
        if self._error is not None:
            raise ProtocolError(self._error.message, self._error.code)
        if self._buf:
            self._buf += data
            if len(self._buf) < self._need:
                return []          # a long bulk string still arriving: nothing to parse yet
            data = bytes(self._buf)
        elif type(data) is not bytes:
            data = bytes(data)
        end = len(data)
        pos = 0
        need = 0
        stack = self._stack
        replies: list = []
        find = data.find
        max_bulk = self.max_bulk
        try:
            while pos < end:
                kind = data[pos]
                if kind == _BULK or kind == _VERBATIM:
                    eol = find(b"\r\n", pos + 1)
                    if eol < 0:
                        break
                    text = data[pos + 1:eol]
                    if text.isdigit() and len(text) < 19 and (text[0] != 48 or len(text) == 1):
                        length = int(text)     # the usual case, without the regular expression
                    else:
                        length = _bulk_length(text)
                    if length > max_bulk:
                        raise _too_large(f"bulk length {length} is over the limit of {max_bulk} bytes")
                    if length < 0:
                        value: Any = None
                        pos = eol + 2
                    else:
                        start = eol + 2
                        stop = start + length
                        # Like hiredis, wait for the CRLF after the data but do not check it.
                        if stop + 2 > end:
                            need = stop + 2 - pos
                            break
                        if kind == _VERBATIM:
                            if length < 4 or data[start + 3] != 58:   # "txt:"
                                raise ProtocolError("verbatim string without its 3-letter format and ':'")
                            start += 4
                        value = data[start:stop]
                        pos = stop + 2
                else:
                    mode = _AGGREGATES.get(kind)
                    if mode is not None:
                        if len(stack) >= MAX_DEPTH:
                            raise ProtocolError(f"replies nested more than {MAX_DEPTH} deep")
                        eol = find(b"\r\n", pos + 1)
                        if eol < 0:
                            break
                        text = data[pos + 1:eol]
                        if text.isdigit() and len(text) < 10 and (text[0] != 48 or len(text) == 1):
                            count = int(text)
                        else:
                            count = _aggregate_length(text)
                        pos = eol + 2
                        if count < 0:
                            value = None
                        else:
                            if stack and stack[-1][2] and stack[-1][3]:
                                raise ProtocolError("a map key is an aggregate (unhashable)")
                            container: Any = {} if mode == _MAP else []
                            if count:
                                stack.append([container, count if mode == _LIST else 2 * count, mode == _MAP, True])
                                continue
                            value = container
                    else:
                        line_type = _LINE_TYPES.get(kind)
                        if line_type is None:
                            raise ProtocolError(f"unknown reply type byte {data[pos:pos + 1]!r}")
                        eol = find(b"\r\n", pos + 1)
                        if eol < 0:
                            break
                        value = line_type(data[pos + 1:eol])
                        pos = eol + 2
                # A value is complete: it fills its place, which may complete its parents.
                while stack:
                    frame = stack[-1]
                    if frame[2]:
                        # As hiredis builds a map: the key goes in with None, and its value
                        # replaces the last item. (A repeated key thus ends up odd, the same
                        # odd way in both parsers; Redis never repeats one.)
                        mapping = frame[0]
                        if frame[3]:
                            mapping[value] = None
                        else:
                            mapping[mapping.popitem()[0]] = value
                        frame[3] = not frame[3]
                    else:
                        frame[0].append(value)
                    frame[1] -= 1
                    if frame[1]:
                        break
                    stack.pop()
                    value = frame[0]
                else:
                    replies.append(value)
            if end - pos > max_bulk + _SLACK:
                raise _too_large(f"a reply line of more than {max_bulk} bytes")
        except ProtocolError as exc:
            self._fail(exc, replies)
        self._buf = bytearray(memoryview(data)[pos:]) if pos < end else bytearray()
        self._need = need
        return replies

    def _fail(self, exc: ProtocolError, replies: list) -> None:
        self._buf = bytearray()
        self._need = 0
        self._stack = []
        exc.replies = replies
        self._error = exc
        raise exc


# --- hiredis ------------------------------------------------------------------

_NEED_DATA = object()

# Older hiredis-py releases differ on RESP3 replies (attributes, doubles, the
# nesting limit; 3.0 can crash on some), so only a release checked to parse
# exactly as PythonParser is used.
HIREDIS_MIN_VERSION = (3, 4, 2)

try:
    import hiredis as _hiredis
    if tuple(int(part) for part in _hiredis.__version__.split(".")[:3]) < HIREDIS_MIN_VERSION:
        raise ImportError(f"hiredis {_hiredis.__version__} is older than {HIREDIS_MIN_VERSION}")
except (ImportError, ValueError):   # not installed, too old, or a version we cannot read
    _hiredis = None  # type: ignore[assignment]

HAVE_HIREDIS = _hiredis is not None


class HiredisParser:
    """``hiredis.Reader`` behind the ``PythonParser`` interface: the same replies, errors in the same places."""

    implementation = "hiredis"

    def __init__(self, max_bulk: int = DEFAULT_MAX_BULK) -> None:
        if _hiredis is None:
            raise RuntimeError("hiredis>=3.4.2 is not installed (pip install -r requirements-redis.txt)")
        self.max_bulk = max_bulk
        self._reader = _hiredis.Reader(protocolError=ProtocolError, replyError=RedisError,
                                       notEnoughData=_NEED_DATA)
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for the reply not yet complete (within 1 KiB: hiredis compacts lazily)."""
        return self._reader.len() if self._error is None else 0

    def feed(self, data: bytes) -> list:
        """Take the bytes that arrived; return the replies now complete, in order.

        Raises:
            ProtocolError: as ``PythonParser.feed``.
        """
        if self._error is not None:
            raise ProtocolError(self._error.message, self._error.code)
        reader = self._reader
        replies: list = []
        try:
            reader.feed(data)
            reply = reader.gets()
            while reply is not _NEED_DATA:
                replies.append(reply)
                reply = reader.gets()
            if reader.len() > self.max_bulk + _SLACK:
                raise _too_large(f"a reply of more than {self.max_bulk} bytes")
        except ProtocolError as exc:
            self._fail(exc, replies)
        except TypeError as exc:      # a map key hiredis could not hash
            self._fail(ProtocolError(f"a map key is an aggregate ({exc})"), replies)
        except MemoryError:           # hiredis allocates a declared aggregate length at once
            self._fail(_too_large("an aggregate length too large to allocate"), replies)
        except RecursionError:        # defensive: hiredis stops at depth 1,024 itself
            self._fail(ProtocolError("replies nested too deep"), replies)
        return replies

    def _fail(self, exc: ProtocolError, replies: list) -> None:
        self._reader = None   # type: ignore[assignment]   # unusable after an error
        exc.replies = replies
        self._error = exc
        raise exc


RespParser: type[PythonParser] | type[HiredisParser] = HiredisParser if HAVE_HIREDIS else PythonParser
