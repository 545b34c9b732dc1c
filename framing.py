"""Frames <-> bytes for the chat wire protocol (docs/PROTOCOL.md section 1). No sockets.

A frame is one kind byte (``C`` command, ``D`` data), a 4-byte big-endian body
length, and a body that is one UTF-8 JSON object with a string ``op``.

Theory of operation: ``encode`` turns a frame into bytes; ``FrameDecoder`` is fed
whatever bytes arrived and returns the complete frames, keeping the rest. Every
way a byte stream can be malformed ends in one exception, ``ProtocolError`` with
code ``bad_frame``; nothing else escapes the decoder. A declared length over the
limit is refused as soon as the 5-byte header is in, before any body byte is
buffered, so the decoder never holds more than one header plus the limit.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any, NamedTuple

KIND_COMMAND = "C"
KIND_DATA = "D"
_KIND_BYTES = {ord(KIND_COMMAND): KIND_COMMAND, ord(KIND_DATA): KIND_DATA}

HEADER_SIZE = 5
# 64 KiB holds a CH page of dozens of entries or a 4,096-character message
# with its sealed copies, yet bounds what one client can make us buffer.
DEFAULT_FRAME_LIMIT = 65536

_HEADER = struct.Struct(">cI")
_json_decoder = json.JSONDecoder(parse_constant=lambda name: _reject_constant(name),
                                 parse_float=lambda text: _finite_float(text))
_json_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


class ProtocolError(Exception):
    """A violation of the wire protocol, with a stable error code (docs/PROTOCOL.md section 6)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.frames: list[Frame] = []  # frames decoded before the bad one


def _bad_frame(message: str) -> ProtocolError:
    return ProtocolError("bad_frame", message)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    # 1e400 is valid JSON but parses to inf, which no one could encode again.
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


_JSON_TYPE_NAMES = {dict: "object", list: "array", str: "string", int: "number", float: "number",
                    bool: "boolean", type(None): "null"}


def _describe(value: Any) -> str:
    """Name a decoded JSON value for an error message, briefly and without recursing."""
    kind = _JSON_TYPE_NAMES.get(type(value), type(value).__name__)
    if isinstance(value, (dict, list)):
        return f"a JSON {kind} of {len(value)} items"
    text = json.dumps(value, ensure_ascii=True)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"a JSON {kind} ({text})"


class Frame(NamedTuple):
    """One decoded frame: its kind (``"C"`` or ``"D"``) and its JSON body."""

    kind: str
    body: dict

    @property
    def op(self) -> str:
        return self.body["op"]


def encode_body(body: dict) -> bytes:
    """Serialise a body to the compact UTF-8 JSON used on the wire."""
    return _json_encoder.encode(body).encode("utf-8")


def json_size(value: Any) -> int:
    """Bytes of value in the wire's JSON (escapes included), e.g. a text as it is relayed and stored."""
    return len(_json_encoder.encode(value).encode("utf-8"))


def encode(kind: str, body: dict) -> bytes:
    """Return the bytes of one frame.

    Raises:
        ValueError: kind is not ``C``/``D``, or body has no string ``op``.
    """
    if kind not in (KIND_COMMAND, KIND_DATA):
        raise ValueError(f"unknown frame kind {kind!r}")
    if not isinstance(body.get("op"), str):
        raise ValueError("a frame body needs a string 'op'")
    return encode_raw(kind, encode_body(body))


def encode_raw(kind: str, body: bytes) -> bytes:
    """One frame around a body that is JSON already (e.g. a CH page spliced from history lines)."""
    return _HEADER.pack(kind.encode("ascii"), len(body)) + body


def command(body: dict) -> bytes:
    """The bytes of a ``C`` frame."""
    return encode(KIND_COMMAND, body)


def data(body: dict) -> bytes:
    """The bytes of a ``D`` frame."""
    return encode(KIND_DATA, body)


def parse_body(raw: bytes) -> dict:
    """Decode one frame body.

    Raises:
        ProtocolError: ``bad_frame`` if it is not a UTF-8 JSON object with a string op.
    """
    if raw.startswith(b"\xef\xbb\xbf"):
        raise _bad_frame("body starts with a UTF-8 BOM")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _bad_frame(f"body is not UTF-8 (byte {raw[exc.start:exc.start + 1]!r} at {exc.start})") from None
    try:
        body = _json_decoder.decode(text)
    except RecursionError:
        raise _bad_frame("body is JSON nested too deeply") from None
    except ValueError as exc:
        raise _bad_frame(f"body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise _bad_frame(f"body is {_describe(body)}, not an object")
    op = body.get("op")
    if not isinstance(op, str):
        raise _bad_frame("body has no 'op'" if "op" not in body else f"'op' is {_describe(op)}, not a string")
    if "\\u" in text and ("\\ud" in text or "\\uD" in text):
        # A lone surrogate escape parses but is no Unicode text: it could never be
        # relayed as UTF-8, so it is refused here, at the edge.
        try:
            encode_body(body)
        except UnicodeEncodeError:
            raise _bad_frame("body has an unpaired surrogate escape") from None
        except RecursionError:
            # Parsed with a few stack frames to spare, but too deep to write out again.
            raise _bad_frame("body is JSON nested too deeply") from None
    return body


class FrameDecoder:
    """Incremental frame decoder: ``feed(bytes) -> list[Frame]``, or ``append`` then
    ``next_frame`` to decode one frame at a time (a server decodes a request only when
    it can handle it, so what waits is bytes, not parsed bodies).

    After a ``ProtocolError`` the stream is unusable: the decoder stays broken
    and every later ``feed`` or ``next_frame`` raises the same error again (code
    and message), with no frames attached.
    """

    __slots__ = ("limit", "_buf", "_start", "_error")

    def __init__(self, limit: int = DEFAULT_FRAME_LIMIT) -> None:
        self.limit = limit  # 0 means no limit
        self._buf = bytearray()
        self._start = 0     # bytes of _buf already decoded
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """How many bytes are held, not yet decoded."""
        return len(self._buf) - self._start

    def append(self, data: bytes) -> None:
        """Take bytes that arrived; decode them later with ``next_frame``."""
        if self._start:
            del self._buf[:self._start]   # once per arrival, not once per frame
            self._start = 0
        self._buf += data

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None until more bytes arrive.

        Raises:
            ProtocolError: ``bad_frame``: the next bytes are not a frame.
        """
        if self._error is not None:
            raise ProtocolError(self._error.code, self._error.message)
        buf, start = self._buf, self._start
        end = len(buf)
        if end == start:
            return None
        try:
            # Each field is checked as soon as it is in: the kind byte alone, then the length.
            kind = _KIND_BYTES.get(buf[start])
            if kind is None:
                raise _bad_frame(f"unknown frame kind byte {bytes(buf[start:start + 1])!r}")
            if end - start < HEADER_SIZE:
                return None
            length = int.from_bytes(buf[start + 1:start + 5], "big")
            if self.limit and length > self.limit:
                raise _bad_frame(f"frame length {length} is over the limit of {self.limit} bytes")
            if end - start - HEADER_SIZE < length:
                return None
            body_start = start + HEADER_SIZE
            body = parse_body(bytes(buf[body_start:body_start + length]))
        except ProtocolError as exc:
            self._buf = bytearray()
            self._start = 0
            self._error = exc
            raise
        self._start = body_start + length
        if self._start == end:
            buf.clear()
            self._start = 0
        return Frame(kind, body)

    def feed(self, data: bytes) -> list[Frame]:
        """Take the bytes that arrived; return the frames now complete, in order.

        Raises:
            ProtocolError: ``bad_frame``; frames complete before the bad one are
                attached as ``error.frames`` so that nothing sent earlier is lost.
        """
        if self._error is not None:
            # The frames before the bad one were handed over with the first raise.
            raise ProtocolError(self._error.code, self._error.message)
        self.append(data)
        frames: list[Frame] = []
        try:
            while True:
                frame = self.next_frame()
                if frame is None:
                    return frames
                frames.append(frame)
        except ProtocolError as exc:
            exc.frames = frames
            raise
