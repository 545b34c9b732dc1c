"""lineeditor.py: keystrokes in, events and the drawn line out (every case whole and byte by byte)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lineeditor import Key, LineEditor, Submit, char_width, is_unsafe, text_width

LEFT, RIGHT, UP, DOWN = b"\x1b[D", b"\x1b[C", b"\x1b[A", b"\x1b[B"
HOME, END, DELETE = b"\x1b[H", b"\x1b[F", b"\x1b[3~"
BACKSPACE, CTRL_U, CTRL_W, CTRL_K = b"\x7f", b"\x15", b"\x17", b"\x0b"


def feed(editor: LineEditor, data: bytes, split: bool) -> list:
    """Feed data whole, or one byte at a time (UTF-8 and escapes split anywhere)."""
    if not split:
        return editor.feed(data)
    events = []
    for i in range(len(data)):
        events.extend(editor.feed(data[i:i + 1]))
    return events


@pytest.fixture(params=[False, True], ids=["whole", "bytewise"])
def split(request):
    return request.param


@pytest.mark.parametrize("keys, text, cursor", [
    (b"hello", "hello", 5),
    ("héllo wörld ✓".encode(), "héllo wörld ✓", 13),
    (b"abc" + LEFT + LEFT + b"X", "aXbc", 2),
    (b"abc" + LEFT + RIGHT + RIGHT + RIGHT + b"!", "abc!", 4),
    (b"abc" + BACKSPACE, "ab", 2),
    (b"abc" + LEFT + BACKSPACE, "ac", 1),
    (b"abc" + HOME + DELETE, "bc", 0),
    (b"abc" + HOME + b"\x05" + b"d", "abcd", 4),
    (b"hello world" + LEFT * 5 + CTRL_U, "world", 0),
    (b"hello world" + LEFT * 5 + CTRL_K, "hello ", 6),
    (b"say hello world" + CTRL_W, "say hello ", 10),
    (b"say hello   " + CTRL_W, "say ", 4),
    (b"ab" + b"\x1bOD" + b"X" + END + b"Y", "aXbY", 4),
    (b"a\x1b[1;5Cb", "ab", 2),  # Ctrl-Right: ignored, not typed
    (b"a\x07b\x00c\x1b\x1bd", "abcd", 4),  # BEL and NUL dropped; a lone Esc (Alt+Esc) too
    (b"a\x1bxb", "ab", 2),  # Alt+x: not typed
    ("a\u202eb\u2066c\u200fd".encode(), "abcd", 4),  # bidi controls are never inserted
    (b"ab\x04", "ab", 2),  # Ctrl-D on a non-empty line: delete forward (nothing here)
    (b"ab" + LEFT + b"\x04", "a", 1),
    # A thumbs-up and its skin tone, a family joined by ZWJs, an e and its accent: one step each.
    ("a\U0001f44d\U0001f3fdb".encode() + LEFT + LEFT + b"X", "aX\U0001f44d\U0001f3fdb", 2),
    ("a\U0001f44d\U0001f3fd".encode() + BACKSPACE, "a", 1),
    ("x\U0001f468\u200d\U0001f469\u200d\U0001f467y".encode() + LEFT + LEFT + b"Z",
     "xZ\U0001f468\u200d\U0001f469\u200d\U0001f467y", 2),
    ("e\u0301z".encode() + HOME + DELETE, "z", 0),
])
def test_editing(keys, text, cursor, split):
    editor = LineEditor()
    assert feed(editor, keys, split) == []
    assert editor.text == text
    assert editor.cursor == cursor


def test_enter_submits_and_clears(split):
    editor = LineEditor()
    events = feed(editor, "BM héllo\r".encode() + b"PM\n" + b"x\r\n" + b"tail", split)
    assert events == [Submit("BM héllo"), Submit("PM"), Submit("x")]
    assert editor.text == "tail"


def test_control_keys_are_events(split):
    editor = LineEditor()
    assert feed(editor, b"\x04", split) == [Key.END_OF_INPUT]
    assert feed(editor, b"half\x03", split) == [Key.INTERRUPT]
    assert editor.text == ""  # Ctrl-C abandons the line
    assert feed(editor, b"\x1a\x0c", split) == [Key.SUSPEND, Key.CLEAR_SCREEN]


def test_a_bracketed_paste_is_text_never_keys(split):
    """Its lines become one line (breaks and tabs as spaces, a trailing break dropped); Enter,
    Ctrl-C, Ctrl-D and arrow keys inside it do nothing; only a real Enter sends it."""
    editor = LineEditor()
    assert feed(editor, b"BM ", split) == []
    pasted = b"\x1b[200~Notes from the meeting:\nex\r\nmore\ttext\x03\x04" + LEFT + b"\n\x1b[201~"
    assert feed(editor, pasted, split) == []
    assert editor.text == "BM Notes from the meeting: ex more text" and editor.cursor == len(editor.text)
    assert feed(editor, LEFT * 4 + b"\x1b[200~\xc3\xa9\x1b[201~" + b"\r", split) == [
        Submit("BM Notes from the meeting: ex more \u00e9text")]


def test_a_paste_ending_in_escape_still_ends(split):
    """A lone ESC before the end marker used to swallow it (taken as Alt+ESC): the editor stayed
    in the paste for good, Enter and Ctrl-C dead (a reviewer's find)."""
    editor = LineEditor()
    assert feed(editor, b"\x1b[200~hello\x1b\x1b[201~", split) == []
    assert feed(editor, b"\r", split) == [Submit("hello")]
    assert feed(editor, b"x\x03", split) == [Key.INTERRUPT]


def test_escape_split_across_reads_waits_for_its_end():
    editor = LineEditor()
    editor.feed(b"ab\x1b")
    editor.feed(b"[")
    assert editor.text == "ab"
    editor.feed(b"DX")
    assert editor.text == "aXb"


def test_invalid_utf8_becomes_replacement_character():
    editor = LineEditor()
    editor.feed(b"a\xffb")
    assert editor.text == "a\ufffdb"


def test_history_up_down_keeps_the_draft(split):
    editor = LineEditor()
    for line in ("first", "second", "second", "  "):
        editor.add_history(line)
    assert editor.history == ["first", "second"]
    feed(editor, b"draft" + UP, split)
    assert editor.text == "second"
    feed(editor, UP + UP, split)
    assert editor.text == "first"
    feed(editor, DOWN, split)
    assert editor.text == "second"
    feed(editor, DOWN, split)
    assert editor.text == "draft"
    feed(editor, DOWN, split)
    assert editor.text == "draft"


def test_secret_mode_has_no_history_and_draws_nothing():
    editor = LineEditor()
    editor.add_history("BM hi")
    editor.secret = True
    editor.feed(b"hunter22" + UP)
    assert editor.text == "hunter22"
    row = editor.render("password: ", 80)
    assert row.text == "password: "
    assert row.cursor == len("password: ")


@pytest.mark.parametrize("typed, completions, result", [
    (b"b\t", ("bob", "carol"), "bob "),
    (b"PM c\t", ("carol", "Charlie"), "PM c"),  # two matches, no longer common prefix
    (b"PM ca\t", ("carol", "carl"), "PM car"),
    (b"x\t", ("bob",), "x"),
    (b"B\t", ("BM", "bob"), "B"),
])
def test_tab_completes_the_current_word(typed, completions, result):
    editor = LineEditor()
    editor.completions = completions
    editor.feed(typed)
    assert editor.text == result


def test_render_short_line():
    editor = LineEditor()
    editor.feed(b"hello" + LEFT)
    assert editor.render("> ", 80) == ("> hello", 6)
    assert editor.redraw("> ", 80) == "\r\x1b[K> hello\r\x1b[6C"


def test_render_long_line_scrolls_to_keep_the_cursor_visible():
    editor = LineEditor()
    editor.feed(b"0123456789" * 5)
    row = editor.render("> ", 21)  # 20 usable columns, 18 for text
    assert text_width(row.text) <= 20
    assert row.text.endswith("9")
    assert row.cursor <= 20
    editor.feed(HOME)
    row = editor.render("> ", 21)
    assert row.text.startswith("> 0123")
    assert row.cursor == 2


def test_render_wide_characters_count_two_columns():
    editor = LineEditor()
    editor.feed("日本語".encode())
    assert editor.render("> ", 80) == ("> 日本語", 8)
    assert char_width("日") == 2 and char_width("a") == 1 and char_width("\u0301") == 0


def test_long_prompt_is_shortened():
    editor = LineEditor()
    row = editor.render("to (" + ", ".join(f"user{i}" for i in range(30)) + "): ", 40)
    assert text_width(row.text) <= 20
    assert row.text.endswith("..: ")


@pytest.mark.parametrize("ch, unsafe", [
    ("\x1b", True), ("\x00", True), ("\x7f", True), ("\x85", True), ("\x9b", True),
    ("\u202e", True), ("\u2066", True), ("\u200e", True), ("\u061c", True), ("\u2028", True),
    ("a", False), ("é", False), ("\u200d", False), ("日", False),
])
def test_unsafe_characters(ch, unsafe):
    assert is_unsafe(ch) is unsafe


def test_a_wider_terminal_shows_the_start_of_a_scrolled_line_again():
    editor = LineEditor()
    editor.feed(b"0123456789" * 5)
    assert editor.render("> ", 21).text == "> " + ("0123456789" * 5)[-17:]
    assert editor.render("> ", 41).text == "> " + ("0123456789" * 5)[-37:]  # the wider row is filled
    assert editor.render("> ", 80) == ("> " + "0123456789" * 5, 52)  # it fits now: all of it
    editor.render("> ", 21)
    editor.feed(BACKSPACE * 40)
    assert editor.render("> ", 21) == ("> 0123456789", 12)  # deleting back also brings the start back


def test_ctrl_c_keeps_the_dropped_text_for_the_transcript():
    editor = LineEditor()
    assert editor.feed(b"half typed\x03") == [Key.INTERRUPT]
    assert editor.text == "" and editor.interrupted == "half typed"


def test_tab_asks_a_completion_function_with_the_text_before_the_word(split):
    seen = []

    def offered(before: str):
        seen.append(before)
        return {"": ("PM",), "PM ": ("bob",)}.get(before, ("PM", "bob"))

    editor = LineEditor()
    editor.completions = offered
    feed(editor, b"p\t", split)
    assert editor.text == "PM "
    feed(editor, b"b\t", split)
    assert editor.text == "PM bob "
    feed(editor, b"hi p\t", split)
    assert editor.text == "PM bob hi PM "  # the function decides, given the text before the word
    assert seen == ["", "PM ", "PM bob hi "]


def _first_shown_by_the_old_loop(chars: list[str], scroll: int, cursor: int, room: int) -> int:
    """The scrolling rule as it was first written (quadratic): the model the linear walk must equal."""
    scroll = min(scroll, cursor)
    while scroll < cursor and text_width("".join(chars[scroll:cursor])) >= room:
        scroll += 1
    return scroll


@given(text=st.text(st.sampled_from("ab日本 é✓"), max_size=120), moves=st.lists(st.integers(0, 120), max_size=6),
       width=st.integers(1, 60))
def test_rendering_scrolls_as_the_first_rule_did(text, moves, width):
    editor = LineEditor()
    editor.set_text(text)
    prompt = "> "
    room = max(max(width - 1, 8) - text_width(prompt), 1)
    for cursor in [len(editor.chars), *(m % (len(editor.chars) + 1) for m in moves)]:
        editor.cursor = cursor
        before = editor._scroll
        row = editor.render(prompt, width)
        expected = _first_shown_by_the_old_loop(editor.chars, before, cursor, room)
        if text_width(editor.text) < room:
            expected = 0
        while expected > 0 and text_width("".join(editor.chars[expected - 1:])) < room:
            expected -= 1
        assert editor._scroll == expected
        assert row.cursor <= max(width - 1, 8)


def test_a_long_paste_renders_at_once():
    editor = LineEditor()
    editor.feed(b"BM " + b"k" * 4100)       # one read of a paste
    row = editor.render("alice> ", 80)      # was quadratic: seconds for this line
    assert row.text == "alice> " + "k" * (79 - 7 - 1) and row.cursor == 78


def test_a_skin_tone_takes_no_column_of_its_own():
    assert text_width("\U0001f44d\U0001f3fd") == 2 == text_width("\U0001f44d")
