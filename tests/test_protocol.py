"""protocol.py: the vocabulary matches the protocol document, and its rules hold at their edges."""

from __future__ import annotations

import os
import re

import pytest

import framing
import protocol
from protocol import ByeReason, Error, Op

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "PROTOCOL.md")


def section(number: str) -> str:
    with open(DOC, encoding="utf-8") as fh:
        text = fh.read()
    start = text.index(f"\n## {number}.")
    end = text.find("\n## ", start + 1)
    return text[start:end]


def test_error_codes_are_those_of_section_6():
    codes = set(re.findall(r"^\| `([a-z_]+)` \|", section("6"), re.M))
    assert codes == {code.value for code in Error}


def test_bye_reasons_are_those_of_section_4_7():
    text = section("4")
    part = text[text.index("### 4.7"):]
    assert {reason.value for reason in ByeReason} <= set(re.findall(r"`([a-z_]+)`", part))


def test_ops_are_named_in_the_document():
    with open(DOC, encoding="utf-8") as fh:
        text = fh.read()
    for op in Op:
        assert f'"op":"{op.value}"' in text, op


def test_codes_travel_as_their_text():
    frame = framing.FrameDecoder(0).feed(protocol.fail(Op.SEND, Error.NOT_ONLINE, "gone", attempts_left=2))[0]
    assert frame.body == {"op": "SEND", "ok": False, "error": "not_online", "message": "gone", "attempts_left": 2}
    frame = framing.FrameDecoder(0).feed(protocol.bye(ByeReason.TOO_SLOW))[0]
    assert frame.body == {"op": "BYE", "reason": "too_slow"}
    assert framing.FrameDecoder(0).feed(protocol.fatal(Error.BAD_FRAME, "x"))[0].body["op"] == "ERROR"


@pytest.mark.parametrize("name,valid", [
    ("a", True), ("A" * 32, True), ("A" * 33, False), ("0day", True), ("x.y-z_9", True),
    ("", False), ("_x", False), (".x", False), ("-x", False), ("a b", False), ("é", False), ("a\n", False),
    (None, False), (7, False),
])
def test_username_rule(name, valid):
    assert protocol.valid_username(name) is valid


@pytest.mark.parametrize("password,weak", [
    ("1234567", True), ("12345678", False), ("x" * 256, False), ("x" * 257, True),
    ("é" * 128, False), ("é" * 129, True), ("éééééééé", False), ("ééééééé", True),
])
def test_password_rule(password, weak):
    assert (protocol.password_problem(password) is not None) is weak


@pytest.mark.parametrize("text,bad", [
    ("hi", False), ("x" * protocol.MAX_TEXT_CHARS, False), ("x" * (protocol.MAX_TEXT_CHARS + 1), True),
    ("\U0001F600" * protocol.MAX_TEXT_CHARS, False), ("   \n\t", True), ("", True), (None, True), (5, True),
])
def test_text_rule(text, bad):
    assert (protocol.text_problem(text) is not None) is bad


def test_timestamp_format():
    assert protocol.timestamp(1_764_686_645.1234) == "2025-12-02T14:44:05.123Z"
    assert protocol.timestamp(0.0) == "1970-01-01T00:00:00.000Z"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", protocol.timestamp(1e9 + 0.9999))


def test_ts_before():
    assert protocol.ts_before("2026-12-03T00:00:05.250Z", 10) == "2026-12-02T23:59:55.250Z"
    assert protocol.ts_before("1970-01-01T00:00:03.000Z", 10) == "1970-01-01T00:00:00.000Z"
    assert protocol.ts_before("1900-01-01T00:00:00.000Z", 10) == "1900-01-01T00:00:00.000Z"   # never later
