"""Tests for resp.py: the command encoder and both reply parsers (pure Python and hiredis).

Every parser case runs whole, one byte at a time, and with bytes after it,
against both parsers; hypothesis checks round trips of arbitrary nested
replies, arbitrary splits, and arbitrary bytes (replies or ProtocolError,
nothing else, and the same outcome from both parsers).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import resp
from resp import HiredisParser, ProtocolError, PythonParser, RedisError, encode_command

if not resp.HAVE_HIREDIS:
    pytest.fail("hiredis>=3.4.2 is not installed: pip install -r requirements-redis.txt (both parsers are tested)",
                pytrace=False)

PARSERS = [PythonParser, HiredisParser]
both = pytest.mark.parametrize("parser_class", PARSERS, ids=["python", "hiredis"])


def canon(value: Any) -> Any:
    """A comparable form: keeps bool apart from int, compares floats (nan too) by repr, dicts in order."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, float):
        return ("float", repr(value))
    if isinstance(value, list):
        return ("list", [canon(item) for item in value])
    if isinstance(value, dict):
        return ("dict", [(canon(k), canon(v)) for k, v in value.items()])
    if isinstance(value, RedisError):
        return ("error", type(value).__name__, value.message)
    return (type(value).__name__, value)


def parse(parser_class, chunks, **kwargs) -> tuple[str, Any, str]:
    """Feed the chunks: ("ok", replies, "") or ("error", replies before it, the error's code)."""
    parser = parser_class(**kwargs)
    replies: list = []
    try:
        for chunk in chunks:
            replies.extend(parser.feed(chunk))
    except ProtocolError as exc:
        return "error", canon(replies + exc.replies), exc.code
    return "ok", canon(replies), ""


def one_byte_at_a_time(data: bytes) -> list[bytes]:
    return [data[i:i + 1] for i in range(len(data))]


# --- the cases -----------------------------------------------------------------

class Good(NamedTuple):
    name: str
    data: bytes
    reply: Any


class Bad(NamedTuple):
    name: str
    data: bytes
    detect_at: int   # how many bytes make the error certain (the same for both parsers)


NESTED_XREAD = (b"*1\r\n*2\r\n$7\r\nchat:ev\r\n*2\r\n"
                b"*2\r\n$3\r\n1-0\r\n*4\r\n$1\r\nt\r\n$2\r\nbm\r\n$1\r\nd\r\n$3\r\nabc\r\n"
                b"*2\r\n$3\r\n1-1\r\n*2\r\n$1\r\nt\r\n$2\r\non\r\n")

GOOD = [
    Good("simple string", b"+OK\r\n", b"OK"),
    Good("empty simple string", b"+\r\n", b""),
    Good("simple string with spaces", b"+QUEUED now\r\n", b"QUEUED now"),
    Good("error", b"-ERR unknown command 'FOO'\r\n", RedisError("ERR unknown command 'FOO'")),
    Good("error code only", b"-NOSCRIPT\r\n", RedisError("NOSCRIPT")),
    Good("error not UTF-8", b"-ERR \xff\r\n", RedisError("ERR \ufffd")),
    Good("integer zero", b":0\r\n", 0),
    Good("integer negative", b":-42\r\n", -42),
    Good("integer max", b":9223372036854775807\r\n", 2**63 - 1),
    Good("integer min", b":-9223372036854775808\r\n", -2**63),
    Good("bulk string", b"$5\r\nhello\r\n", b"hello"),
    Good("empty bulk string", b"$0\r\n\r\n", b""),
    Good("bulk string holding CRLF", b"$4\r\na\r\nb\r\n", b"a\r\nb"),
    Good("binary bulk string", b"$4\r\n\x00\xff\r\x80\r\n", b"\x00\xff\r\x80"),
    Good("null bulk string", b"$-1\r\n", None),
    Good("array", b"*2\r\n$3\r\nfoo\r\n:1\r\n", [b"foo", 1]),
    Good("empty array", b"*0\r\n", []),
    Good("null array", b"*-1\r\n", None),
    Good("nested arrays", b"*2\r\n*1\r\n*0\r\n*2\r\n$-1\r\n*-1\r\n", [[[]], [None, None]]),
    Good("error inside an array", b"*3\r\n+OK\r\n-WRONGTYPE no\r\n:3\r\n", [b"OK", RedisError("WRONGTYPE no"), 3]),
    Good("XREAD reply", NESTED_XREAD,
         [[b"chat:ev", [[b"1-0", [b"t", b"bm", b"d", b"abc"]], [b"1-1", [b"t", b"on"]]]]]),
    # RESP3
    Good("null", b"_\r\n", None),
    Good("true", b"#t\r\n", True),
    Good("false", b"#f\r\n", False),
    Good("double", b",1.5\r\n", 1.5),
    Good("double exponent", b",-2.5e-3\r\n", -0.0025),
    Good("double inf", b",inf\r\n", math.inf),
    Good("double -inf", b",-inf\r\n", -math.inf),
    Good("double nan", b",nan\r\n", math.nan),
    Good("big number", b"(3492890328409238509324850943850943825024385\r\n",
         b"3492890328409238509324850943850943825024385"),
    Good("verbatim string", b"=15\r\ntxt:Some string\r\n", b"Some string"),
    Good("map", b"%2\r\n+a\r\n:1\r\n$1\r\nb\r\n*1\r\n:2\r\n", {b"a": 1, b"b": [2]}),
    Good("empty map", b"%0\r\n", {}),
    Good("map with a repeated key, as hiredis builds it", b"%3\r\n:1\r\n:10\r\n:2\r\n:20\r\n:1\r\n:30\r\n",
         {1: None, 2: 30}),
    Good("set", b"~2\r\n:1\r\n+x\r\n", [1, b"x"]),
    Good("push", b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$2\r\nhi\r\n", [b"message", b"ch", b"hi"]),
    Good("attribute", b"|1\r\n+key\r\n:5\r\n", [b"key", 5]),
]

DEEP = b"*1\r\n" * 1024 + b":1\r\n"

BAD = [
    Bad("unknown type byte", b"?x\r\n", 1),
    Bad("blob error (not supported by hiredis)", b"!3\r\nERR\r\n", 1),
    Bad("CR as a type byte", b"\r\n", 1),
    Bad("integer not a number", b":abc\r\n", 6),
    Bad("integer leading zero", b":01\r\n", 5),
    Bad("integer minus zero", b":-0\r\n", 5),
    Bad("integer plus sign", b":+1\r\n", 5),
    Bad("integer empty", b":\r\n", 3),
    Bad("integer over 64 bits", b":9223372036854775808\r\n", 22),
    Bad("bulk length not a number", b"$x\r\nabc\r\n", 4),
    Bad("bulk length -2", b"$-2\r\n", 5),
    Bad("array length -2", b"*-2\r\n", 5),
    Bad("array length over 2**32-1", b"*4294967296\r\n", 13),
    Bad("simple string with a lone LF", b"+a\nb\r\n", 6),
    Bad("error with a lone CR", b"-a\rb\r\n", 6),
    Bad("double with a plus sign", b",+1\r\n", 5),
    Bad("double infinity spelled out", b",infinity\r\n", 11),
    Bad("double overflow", b",1e999\r\n", 8),
    Bad("boolean x", b"#x\r\n", 4),
    Bad("null with data", b"_x\r\n", 4),
    Bad("big number with a letter", b"(12a\r\n", 6),
    Bad("verbatim without format", b"=3\r\nabc\r\n", 9),
    Bad("map key is an array", b"%1\r\n*1\r\n:1\r\n:2\r\n", 8),
    Bad("map key is an empty map", b"%1\r\n%0\r\n:2\r\n", 8),
    Bad("nested 1,025 deep", b"*1\r\n" * 1025 + b":1\r\n", 1024 * 4 + 1),
]


@both
@pytest.mark.parametrize("case", GOOD, ids=[case.name for case in GOOD])
def test_good_whole(parser_class, case):
    assert parse(parser_class, [case.data]) == ("ok", canon([case.reply]), "")


@both
@pytest.mark.parametrize("case", GOOD, ids=[case.name for case in GOOD])
def test_good_one_byte_at_a_time(parser_class, case):
    parser = parser_class()
    replies = []
    for i, byte in enumerate(one_byte_at_a_time(case.data)):
        got = parser.feed(byte)
        assert got == [] or i == len(case.data) - 1, f"a reply before the last byte (at {i})"
        replies.extend(got)
    assert canon(replies) == canon([case.reply])


@both
@pytest.mark.parametrize("case", GOOD, ids=[case.name for case in GOOD])
def test_good_with_trailing_bytes(parser_class, case):
    # A complete reply after it, then the start of another: both come out, the rest waits.
    parser = parser_class()
    replies = parser.feed(case.data + b":7\r\n$10\r\npart")
    assert canon(replies) == canon([case.reply, 7])
    assert canon(parser.feed(b"ial...\r\n")) == canon([b"partial..."])


@both
def test_every_good_case_in_one_stream(parser_class):
    data = b"".join(case.data for case in GOOD)
    expected = canon([case.reply for case in GOOD])
    assert parse(parser_class, [data]) == ("ok", expected, "")
    assert parse(parser_class, one_byte_at_a_time(data)) == ("ok", expected, "")


@both
def test_deepest_nesting_allowed(parser_class):
    reply = parser_class().feed(DEEP)
    depth = 0
    value = reply[0]
    while isinstance(value, list):   # iteratively: == on 1,024 levels would recurse
        assert len(value) == 1
        value = value[0]
        depth += 1
    assert (depth, value) == (1024, 1)


@both
@pytest.mark.parametrize("case", BAD, ids=[case.name for case in BAD])
def test_bad_whole(parser_class, case):
    assert parse(parser_class, [case.data]) == ("error", canon([]), "bad_reply")


@both
@pytest.mark.parametrize("case", BAD, ids=[case.name for case in BAD])
def test_bad_detected_at_the_same_byte(parser_class, case):
    parser = parser_class()
    for i, byte in enumerate(one_byte_at_a_time(case.data)):
        if i + 1 < case.detect_at:
            assert parser.feed(byte) == []
        else:
            with pytest.raises(ProtocolError):
                parser.feed(byte)
            break
    else:
        pytest.fail("no error")
    # broken for good: the same error again, even for good bytes
    with pytest.raises(ProtocolError):
        parser.feed(b"+OK\r\n")


@both
@pytest.mark.parametrize("case", BAD, ids=[case.name for case in BAD])
def test_bad_after_good_replies(parser_class, case):
    outcome, replies, _ = parse(parser_class, [b"+first\r\n:2\r\n" + case.data + b"+after\r\n"])
    assert (outcome, replies) == ("error", canon([b"first", 2]))


# --- limits ----------------------------------------------------------------------

def test_python_parser_refuses_a_long_bulk_at_its_header():
    parser = PythonParser(max_bulk=100)
    assert parser.feed(b"$100\r\n" + b"x" * 100 + b"\r\n") == [b"x" * 100]
    with pytest.raises(ProtocolError, match="101") as caught:
        parser.feed(b"$101\r\n")
    assert caught.value.code == "too_large"


@both
def test_a_long_bulk_is_refused_before_it_is_all_buffered(parser_class):
    parser = parser_class(max_bulk=100)
    assert parser.feed(b"$100\r\n" + b"x" * 100 + b"\r\n") == [b"x" * 100]
    with pytest.raises(ProtocolError) as caught:
        parser.feed(b"$1000000\r\n")
        for _ in range(100):
            parser.feed(b"x" * 1000)
    assert caught.value.code == "too_large"
    assert parser.buffered == 0


@both
def test_a_line_without_end_is_refused_past_the_limit(parser_class):
    parser = parser_class(max_bulk=100)
    parser.feed(b"+" + b"a" * 100)
    with pytest.raises(ProtocolError) as caught:
        for _ in range(100):
            parser.feed(b"a" * 1000)
    assert caught.value.code == "too_large"


@both
def test_default_limit_is_512_mb(parser_class):
    assert parser_class().max_bulk == 512 * 1024 * 1024


@both
def test_a_long_bulk_in_many_pieces(parser_class):
    value = bytes(range(256)) * 4096           # 1 MiB
    data = b"$%d\r\n" % len(value) + value + b"\r\n+next\r\n"
    parser = parser_class()
    replies = []
    for i in range(0, len(data), 1000):
        replies += parser.feed(data[i:i + 1000])
    assert replies == [value, b"next"]


def test_python_parser_buffers_only_the_unfinished_reply():
    parser = PythonParser()
    parser.feed(b"*3\r\n$3\r\nabc\r\n$5\r\nhel")
    assert parser.buffered == len(b"$5\r\nhel")     # the finished element is consumed
    assert parser.feed(b"lo\r\n:1\r\n") == [[b"abc", b"hello", 1]]
    assert parser.buffered == 0


def test_resp_parser_is_hiredis_when_installed():
    assert resp.RespParser is HiredisParser


# --- the encoder -----------------------------------------------------------------

def test_encode_command():
    assert encode_command("SET", b"k\r\n", 42, -1) == b"*4\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$2\r\n42\r\n$2\r\n-1\r\n"
    assert encode_command("GET", "\u00e9") == b"*2\r\n$3\r\nGET\r\n$2\r\n\xc3\xa9\r\n"
    assert encode_command(bytearray(b"PING")) == b"*1\r\n$4\r\nPING\r\n"
    assert encode_command("SET", b"") == b"*2\r\n$3\r\nSET\r\n$0\r\n\r\n"


@pytest.mark.parametrize("bad", [True, 1.5, None, ["x"]])
def test_encode_command_refuses_other_types(bad):
    with pytest.raises(TypeError):
        encode_command("SET", "k", bad)


def test_encode_command_needs_a_name():
    with pytest.raises(ValueError):
        encode_command()


@both
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(args=st.lists(st.one_of(st.binary(max_size=50), st.text(max_size=20),
                               st.integers(min_value=-2**70, max_value=2**70)), min_size=1, max_size=8))
def test_a_command_parses_as_an_array_of_bulk_strings(parser_class, args):
    expected = [a if isinstance(a, bytes) else a.encode() if isinstance(a, str) else str(a).encode() for a in args]
    assert parser_class().feed(encode_command(*args)) == [expected]


# --- hypothesis: round trips, splits, garbage ----------------------------------------

def _line(kind: bytes, text: bytes) -> bytes:
    return kind + text + b"\r\n"


def _bulk(kind: bytes, data: bytes) -> bytes:
    return kind + b"%d\r\n" % len(data) + data + b"\r\n"


line_text = st.binary(max_size=20).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
error_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=20)

# (wire bytes, value) pairs; scalars are hashable, so any can be a map key.
scalars = st.one_of(
    line_text.map(lambda t: (_line(b"+", t), t)),
    error_text.map(lambda t: (_line(b"-", t.encode("utf-8")), RedisError(t))),
    st.integers(min_value=-2**63, max_value=2**63 - 1).map(lambda n: (b":%d\r\n" % n, n)),
    st.binary(max_size=40).map(lambda b: (_bulk(b"$", b), b)),
    st.sampled_from([(b"$-1\r\n", None), (b"*-1\r\n", None), (b"_\r\n", None), (b"%-1\r\n", None)]),
    st.booleans().map(lambda v: (b"#t\r\n" if v else b"#f\r\n", v)),
    st.floats(allow_nan=False).map(lambda f: (_line(b",", repr(f).encode()), f)),
    st.integers().map(lambda n: (_line(b"(", str(n).encode()), str(n).encode())),
    st.binary(max_size=20).map(lambda b: (_bulk(b"=", b"txt:" + b), b)),
)


def _aggregate(kind: bytes, items: list) -> tuple[bytes, list]:
    return kind + b"%d\r\n" % len(items) + b"".join(w for w, _ in items), [v for _, v in items]


def _map(pairs: list) -> tuple[bytes, dict]:
    wire = b"%%%d\r\n" % len(pairs) + b"".join(kw + vw for (kw, _), (vw, _) in pairs)
    mapping: dict = {}
    for (_, key), (_, value) in pairs:
        # hiredis-py: the key goes in with None, then its value replaces the last item
        # (so a repeated key, as 1 after True, comes out oddly, and the same in both parsers)
        mapping[key] = None
        mapping[mapping.popitem()[0]] = value
    return wire, mapping


def _map_pairs(children):
    # Keys equal in Python (1, 1.0 and True) make one entry, in the parsers as in the dict built here.
    return st.lists(st.tuples(scalars, children), max_size=4)


values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5).map(lambda items: _aggregate(b"*", items)),
        st.lists(children, max_size=3).map(lambda items: _aggregate(b"~", items)),
        st.lists(children, max_size=3).map(lambda items: _aggregate(b">", items)),
        _map_pairs(children).map(_map),
    ),
    max_leaves=25,
)


@both
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(replies=st.lists(values, min_size=1, max_size=5))
def test_round_trip(parser_class, replies):
    data = b"".join(wire for wire, _ in replies)
    assert parse(parser_class, [data]) == ("ok", canon([value for _, value in replies]), "")


@both
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(replies=st.lists(values, min_size=1, max_size=5), cuts=st.lists(st.integers(min_value=0), max_size=6))
def test_arbitrary_splits(parser_class, replies, cuts):
    data = b"".join(wire for wire, _ in replies)
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]
    assert parse(parser_class, chunks) == ("ok", canon([value for _, value in replies]), "")


TOKENS = [b"*", b"%", b"~", b">", b"|", b"$", b"=", b"+", b"-", b":", b",", b"_", b"#", b"(", b"!",
          b"\r\n", b"\r", b"\n", b"0", b"1", b"2", b"-1", b"3", b"t", b"f", b"x", b"txt:", b"inf", b"nan",
          b".", b"e", b"\x00", b"\xff"]
garbage = st.one_of(st.binary(max_size=200), st.lists(st.sampled_from(TOKENS), max_size=60).map(b"".join))


@settings(max_examples=400, deadline=None)
@given(data=garbage, cuts=st.lists(st.integers(min_value=0), max_size=4))
def test_garbage_gives_replies_or_the_one_error_and_both_parsers_agree(data, cuts):
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]
    outcomes = []
    for parser_class in PARSERS:
        outcome, replies, code = parse(parser_class, chunks)   # anything but ProtocolError propagates
        # A declared length over 512 MB: refused at once in Python, awaited by hiredis.
        assume(code != "too_large")
        outcomes.append((outcome, replies))
    assert outcomes[0] == outcomes[1]
