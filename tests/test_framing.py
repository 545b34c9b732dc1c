"""Tests for framing.py: the frame codec of docs/PROTOCOL.md section 1.

Every decoder case runs whole, one byte at a time, and with bytes around it;
hypothesis checks round trips, arbitrary splits, and arbitrary input.
"""

from __future__ import annotations

import json
import struct
from typing import NamedTuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import framing
from framing import DEFAULT_FRAME_LIMIT, HEADER_SIZE, Frame, FrameDecoder, ProtocolError


def raw_frame(kind: bytes, body: bytes, length: int | None = None) -> bytes:
    """A frame built by hand, so that it can be wrong in any way."""
    return kind + struct.pack(">I", len(body) if length is None else length) + body


def decode_all(data: bytes, limit: int = DEFAULT_FRAME_LIMIT) -> list[Frame]:
    return FrameDecoder(limit).feed(data)


# --- the cases -----------------------------------------------------------------

class Good(NamedTuple):
    name: str
    data: bytes
    frame: Frame


class Bad(NamedTuple):
    name: str
    data: bytes
    message: str  # must appear in the error message: it names the offending value
    detect_at: int  # how many bytes of the frame make the error certain
    limit: int = DEFAULT_FRAME_LIMIT


def good(name: str, kind: str, body_text: str, body: dict) -> Good:
    return Good(name, raw_frame(kind.encode(), body_text.encode("utf-8")), Frame(kind, body))


def bad_body(name: str, body: bytes, message: str, limit: int = DEFAULT_FRAME_LIMIT) -> Bad:
    data = raw_frame(b"C", body)
    return Bad(name, data, message, len(data), limit)


GOOD = [
    good("command", "C", '{"op":"LOGIN","username":"alice"}', {"op": "LOGIN", "username": "alice"}),
    good("data", "D", '{"op":"BM","from":"bob","text":"h\u00e9 \U0001f600"}',
         {"op": "BM", "from": "bob", "text": "h\u00e9 \U0001f600"}),
    good("spaces and escapes", "C", ' { "op" : "A\\u00e9\\ud83d\\ude00" , "n" : [1, 2.5, null, true] } ',
         {"op": "A\u00e9\U0001f600", "n": [1, 2.5, None, True]}),
    good("empty op", "D", '{"op":""}', {"op": ""}),
    good("extra members kept", "C", '{"x":{"y":[]},"op":"PING"}', {"x": {"y": []}, "op": "PING"}),
]

BAD = [
    Bad("kind byte X", raw_frame(b"X", b'{"op":"A"}'), "b'X'", 1),
    Bad("kind byte lowercase c", raw_frame(b"c", b'{"op":"A"}'), "b'c'", 1),
    Bad("kind byte NUL", raw_frame(b"\x00", b'{"op":"A"}'), "b'\\x00'", 1),
    Bad("length over the limit", raw_frame(b"C", b"{}", DEFAULT_FRAME_LIMIT + 1),
        str(DEFAULT_FRAME_LIMIT + 1), HEADER_SIZE),
    Bad("length 2**32-1", raw_frame(b"D", b"", 2**32 - 1), str(2**32 - 1), HEADER_SIZE),
    Bad("length over a small limit", raw_frame(b"C", b'{"op":"ABCDEFGHIJKLM"}'), "length 22", HEADER_SIZE, 21),
    bad_body("invalid UTF-8", b'{"op":"\xff"}', "\\xff"),
    bad_body("truncated UTF-8", b'{"op":"\xc3"}', "UTF-8"),
    bad_body("UTF-8 of a surrogate", b'{"op":"\xed\xa0\x80"}', "UTF-8"),
    bad_body("invalid JSON", b'{"op":', "not JSON"),
    bad_body("JSON with trailing data", b'{"op":"A"} {}', "not JSON"),
    bad_body("empty body", b"", "not JSON"),
    bad_body("JSON list", b'["op","A"]', "array"),
    bad_body("JSON string", b'"op"', "string"),
    bad_body("JSON number", b"42", "number"),
    bad_body("JSON null", b"null", "null"),
    bad_body("JSON true", b"true", "boolean"),
    bad_body("missing op", b'{"Op":"A"}', "no 'op'"),
    bad_body("op is a number", b'{"op":7}', "7"),
    bad_body("op is null", b'{"op":null}', "null"),
    bad_body("op is a list", b'{"op":["A"]}', "array"),
    bad_body("deeply nested list", b"[" * 100000, "nested too deeply", limit=200000),
    bad_body("deeply nested object member", b'{"op":"A","x":' + b"[" * 100000 + b"]" * 100000 + b"}",
             "nested too deeply", limit=300000),
    bad_body("NaN", b'{"op":"A","x":NaN}', "NaN"),
    bad_body("Infinity", b'{"op":"A","x":Infinity}', "Infinity"),
    bad_body("-Infinity", b'{"op":"A","x":-Infinity}', "-Infinity"),
    bad_body("number too large for a float", b'{"op":"A","x":1e400}', "1e400"),
    bad_body("lone high surrogate", b'{"op":"\\ud800"}', "surrogate"),
    bad_body("lone low surrogate", b'{"op":"A","x":"a\\uDFFFb"}', "surrogate"),
    bad_body("lone surrogate in a key", b'{"op":"A","\\ud83d":1}', "surrogate"),
    bad_body("UTF-8 BOM", b'\xef\xbb\xbf{"op":"A"}', "BOM"),
]

PREFIX = [Frame("C", {"op": "FIRST"}), Frame("D", {"op": "SECOND", "n": 2})]
PREFIX_BYTES = b"".join(framing.encode(f.kind, f.body) for f in PREFIX)
NEXT_BYTES = framing.command({"op": "NEXT"})


def by_name(cases):
    return pytest.mark.parametrize("case", cases, ids=[c.name for c in cases])


# --- valid frames, three ways --------------------------------------------------

@by_name(GOOD)
def test_good_whole(case: Good) -> None:
    decoder = FrameDecoder()
    assert decoder.feed(case.data) == [case.frame]
    assert decoder.buffered == 0
    assert case.frame.op == case.frame.body["op"]


@by_name(GOOD)
def test_good_byte_at_a_time(case: Good) -> None:
    decoder = FrameDecoder()
    for i in range(len(case.data) - 1):
        assert decoder.feed(case.data[i:i + 1]) == []
        assert decoder.buffered == i + 1  # a partial frame is kept as it came
    assert decoder.feed(case.data[-1:]) == [case.frame]
    assert decoder.buffered == 0


@by_name(GOOD)
@pytest.mark.parametrize("cut", [1, 4, 5, 6, len(NEXT_BYTES) - 1])
def test_good_with_bytes_around(case: Good, cut: int) -> None:
    decoder = FrameDecoder()
    assert decoder.feed(PREFIX_BYTES + case.data + NEXT_BYTES[:cut]) == PREFIX + [case.frame]
    assert decoder.buffered == cut
    assert decoder.feed(NEXT_BYTES[cut:]) == [Frame("C", {"op": "NEXT"})]
    assert decoder.buffered == 0


# --- errors, three ways ----------------------------------------------------------

def check_error(error: ProtocolError, case: Bad) -> None:
    assert error.code == "bad_frame"
    assert case.message in error.message, error.message
    assert str(error) == error.message


@by_name(BAD)
def test_bad_whole(case: Bad) -> None:
    decoder = FrameDecoder(case.limit)
    with pytest.raises(ProtocolError) as info:
        decoder.feed(case.data)
    check_error(info.value, case)
    assert info.value.frames == []
    assert decoder.buffered == 0


@by_name(BAD)
def test_bad_detected_as_soon_as_known(case: Bad) -> None:
    """Only the first detect_at bytes are fed: a bad kind byte or length needs no more."""
    decoder = FrameDecoder(case.limit)
    if case.detect_at > 1:
        assert decoder.feed(case.data[:case.detect_at - 1]) == []
    with pytest.raises(ProtocolError) as info:
        decoder.feed(case.data[case.detect_at - 1:case.detect_at])
    check_error(info.value, case)
    assert decoder.buffered == 0


@by_name([c for c in BAD if len(c.data) < 1000])
def test_bad_byte_at_a_time(case: Bad) -> None:
    decoder = FrameDecoder(case.limit)
    for i in range(case.detect_at - 1):
        assert decoder.feed(case.data[i:i + 1]) == []
    with pytest.raises(ProtocolError) as info:
        decoder.feed(case.data[case.detect_at - 1:case.detect_at])
    check_error(info.value, case)
    assert info.value.frames == []


@by_name(BAD)
def test_bad_with_bytes_around(case: Bad) -> None:
    """Frames before the bad one are handed over in error.frames; nothing after it is."""
    decoder = FrameDecoder(case.limit)
    with pytest.raises(ProtocolError) as info:
        decoder.feed(PREFIX_BYTES + case.data + NEXT_BYTES)
    check_error(info.value, case)
    assert info.value.frames == PREFIX
    assert decoder.buffered == 0


@by_name(BAD)
def test_bad_after_frames_fed_earlier(case: Bad) -> None:
    decoder = FrameDecoder(case.limit)
    assert decoder.feed(PREFIX_BYTES + case.data[:case.detect_at - 1]) == PREFIX
    with pytest.raises(ProtocolError) as info:
        decoder.feed(case.data[case.detect_at - 1:] + NEXT_BYTES)
    check_error(info.value, case)
    assert info.value.frames == []  # PREFIX was already returned


def test_decoder_stays_broken_after_an_error() -> None:
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError) as first:
        decoder.feed(PREFIX_BYTES + b"X")
    assert first.value.frames == PREFIX
    for more in (NEXT_BYTES, b""):
        with pytest.raises(ProtocolError) as again:
            decoder.feed(more)
        assert again.value.code == "bad_frame"
        assert again.value.message == first.value.message
        assert again.value.frames == []  # handed over once, not twice
        assert decoder.buffered == 0


def test_parse_body_directly() -> None:
    assert framing.parse_body(b'{"op":"A","b":1}') == {"op": "A", "b": 1}
    with pytest.raises(ProtocolError) as info:
        framing.parse_body(b"[]")
    assert info.value.code == "bad_frame"


def test_nesting_just_under_the_recursion_limit_is_a_protocol_error_too() -> None:
    """Whatever depth the parser copes with, the surrogate check's re-encoding must not escape."""
    for depth in range(800, 1200, 3):
        body = ('{"op":"\\ud800","a":' + "[" * depth + "]" * depth + "}").encode()
        with pytest.raises(ProtocolError):
            framing.parse_body(body)


# --- limits ------------------------------------------------------------------------

def test_default_limit() -> None:
    assert DEFAULT_FRAME_LIMIT == 65536
    assert FrameDecoder().limit == DEFAULT_FRAME_LIMIT


@pytest.mark.parametrize("limit", [20, 64, DEFAULT_FRAME_LIMIT])
def test_length_exactly_at_the_limit_is_accepted(limit: int) -> None:
    body = b'{"op":"A","p":"' + b"x" * (limit - 17) + b'"}'
    assert len(body) == limit
    assert decode_all(raw_frame(b"C", body), limit) == [Frame("C", json.loads(body))]
    with pytest.raises(ProtocolError) as info:
        FrameDecoder(limit).feed(raw_frame(b"C", body + b" ")[:HEADER_SIZE])
    assert f"{limit + 1}" in info.value.message and f"{limit}" in info.value.message


def test_limit_zero_means_no_limit() -> None:
    body = b'{"op":"BIG","p":"' + b"x" * 200000 + b'"}'
    decoder = FrameDecoder(0)
    assert decoder.feed(raw_frame(b"D", body)) == [Frame("D", json.loads(body))]
    assert decoder.feed(raw_frame(b"C", b"", 2**32 - 1)) == []  # a huge length waits for its body
    assert decoder.buffered == HEADER_SIZE


@pytest.mark.parametrize("limit", [16, 64, 1000])
def test_buffered_never_exceeds_header_plus_limit(limit: int) -> None:
    frames = [framing.data({"op": "M", "t": "y" * n}) for n in range(0, limit - 16)]
    stream = b"".join(frames)
    decoder = FrameDecoder(limit)
    got: list[Frame] = []
    for size in (1, 3, 7, 64, 1000):
        for i in range(0, len(stream), size):
            got += decoder.feed(stream[i:i + size])
            assert decoder.buffered <= HEADER_SIZE + limit
    assert len(got) == 5 * len(frames)
    # A header over the limit is refused before its body could be buffered.
    with pytest.raises(ProtocolError):
        decoder.feed(raw_frame(b"C", b"", limit + 1))
    assert decoder.buffered == 0


def test_partial_header_is_kept() -> None:
    decoder = FrameDecoder()
    data = framing.command({"op": "A"})
    assert decoder.feed(data[:3]) == []
    assert decoder.buffered == 3
    assert decoder.feed(data[3:]) == [Frame("C", {"op": "A"})]


# --- encoding ----------------------------------------------------------------------

def test_encode_exact_bytes() -> None:
    body = '{"op":"BM","text":"h\u00e9 \U0001f600","n":[1,null]}'.encode()
    assert framing.encode("D", {"op": "BM", "text": "h\u00e9 \U0001f600", "n": [1, None]}) == (
        b"D" + len(body).to_bytes(4, "big") + body)
    assert framing.command({"op": "A"}) == b'C\x00\x00\x00\x0a{"op":"A"}'
    assert framing.data({"op": "A"}) == b'D\x00\x00\x00\x0a{"op":"A"}'
    assert framing.encode_body({"op": "A", "b": "\u00e9"}) == '{"op":"A","b":"\u00e9"}'.encode()


@pytest.mark.parametrize("kind, body", [
    ("X", {"op": "A"}), ("c", {"op": "A"}), ("", {"op": "A"}), ("CD", {"op": "A"}),
    ("C", {}), ("C", {"op": 1}), ("D", {"op": None}),
    ("C", {"op": "A", "x": float("nan")}), ("C", {"op": "A", "x": float("inf")}),
    ("C", {"op": "A", "x": "\ud800"}),
])
def test_encode_refuses(kind: str, body: dict) -> None:
    with pytest.raises(ValueError):
        framing.encode(kind, body)


# --- hypothesis --------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(), children, max_size=5),
    max_leaves=20,
)
bodies = st.builds(lambda op, rest: {**rest, "op": op}, st.text(), st.dictionaries(st.text(), json_values, max_size=5))
frames = st.builds(Frame, st.sampled_from(["C", "D"]), bodies)


def encode_frame(frame: Frame) -> bytes:
    return framing.encode(frame.kind, frame.body)


@given(frames)
def test_round_trip(frame: Frame) -> None:
    assert FrameDecoder(0).feed(encode_frame(frame)) == [frame]


@given(st.lists(frames, min_size=1, max_size=6), st.lists(st.integers(min_value=0), max_size=12))
def test_any_split_gives_the_same_frames(sent: list[Frame], cuts: list[int]) -> None:
    stream = b"".join(encode_frame(f) for f in sent)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    decoder = FrameDecoder(0)
    got: list[Frame] = []
    for a, b in zip(points, points[1:]):
        got += decoder.feed(stream[a:b])
    assert got == sent
    assert decoder.buffered == 0


SMALL_LIMIT = 64


def feed_in_chunks(data: bytes, cuts: list[int], limit: int = SMALL_LIMIT) -> tuple[list[Frame], str | None]:
    """Feed data split at cuts; return every frame handed over and the error message, if any."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    decoder = FrameDecoder(limit)
    got: list[Frame] = []
    for a, b in zip(points, points[1:]):
        try:
            got += decoder.feed(data[a:b])
        except ProtocolError as exc:
            assert exc.code == "bad_frame"
            assert decoder.buffered == 0
            return got + exc.frames, exc.message
        assert decoder.buffered <= HEADER_SIZE + limit
        assert decoder.buffered == b - consumed(data, len(got))  # what is not a frame yet is kept
    return got, None


def consumed(data: bytes, count: int) -> int:
    """How many bytes of data the first count frames span."""
    at = 0
    for _ in range(count):
        at += HEADER_SIZE + int.from_bytes(data[at + 1:at + 5], "big")
    return at


def check_frames(got: list[Frame]) -> None:
    for frame in got:
        assert isinstance(frame, Frame)
        assert frame.kind in ("C", "D")
        assert isinstance(frame.body, dict) and isinstance(frame.body["op"], str)
        framing.encode_body(frame.body)  # whatever is accepted can be sent on


def check_any_input(data: bytes, cuts: list[int]) -> None:
    whole = feed_in_chunks(data, [])
    split = feed_in_chunks(data, cuts)
    assert split == whole  # the same frames, and the same error at the same place
    check_frames(whole[0])


@given(st.binary(max_size=400), st.lists(st.integers(min_value=0), max_size=10))
def test_arbitrary_bytes(data: bytes, cuts: list[int]) -> None:
    check_any_input(data, cuts)


@st.composite
def mostly_valid(draw) -> bytes:
    """A few valid frames, then some bytes of one of them mutated."""
    small_bodies = st.builds(lambda op, rest: {**rest, "op": op}, st.text(max_size=8),
                             st.dictionaries(st.text(max_size=4), json_values, max_size=3))
    parts = [bytearray(framing.encode(draw(st.sampled_from("CD")), draw(small_bodies)))
             for _ in range(draw(st.integers(1, 4)))]
    victim = parts[draw(st.integers(0, len(parts) - 1))]
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(["length", "body byte", "insert", "delete", "kind"]))
        if how == "length":
            victim[1:5] = draw(st.binary(min_size=4, max_size=4))
        elif how == "kind":
            victim[0] = draw(st.integers(0, 255))
        elif how == "body byte" and len(victim) > HEADER_SIZE:
            victim[draw(st.integers(HEADER_SIZE, len(victim) - 1))] = draw(st.sampled_from(
                list(b'{}[]",:\\ \x00\x7f\x80\xc3\xed\xef\xff0aeEnNu-+.')))
        elif how == "insert":
            victim.insert(draw(st.integers(0, len(victim))), draw(st.integers(0, 255)))
        elif how == "delete" and len(victim) > 1:
            del victim[draw(st.integers(0, len(victim) - 1))]
    return b"".join(bytes(p) for p in parts)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(mostly_valid(), st.lists(st.integers(min_value=0), max_size=10))
def test_mostly_valid_bytes(data: bytes, cuts: list[int]) -> None:
    check_any_input(data, cuts)
