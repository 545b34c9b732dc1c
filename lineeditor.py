"""The chat client's line editor: keystrokes in, the line to draw out. No I/O.

Owns the text being typed (a list of characters and a cursor), the history
of earlier inputs, and how the line looks in a terminal of a given width. It
also owns the rule for which characters are unsafe to hand to a terminal
(``is_unsafe``): the client escapes those on output and the editor never
inserts them.

Theory of operation: the caller puts the terminal in cbreak mode with echo and
signals off, and hands every byte read to ``LineEditor.feed``. ``feed``
decodes UTF-8 and escape sequences incrementally (either may be split across
reads), edits the buffer, and returns the events the caller must act on: a
submitted line (``Submit``) or a ``Key`` (Ctrl-C, Ctrl-D on an empty line,
Ctrl-Z, Ctrl-L). ``render(prompt, width)`` returns what the line looks like;
``redraw(prompt, width)`` the characters that draw it over the current
terminal line. A line longer than the terminal scrolls sideways, so the edit
line is always exactly one terminal row and redrawing it is always correct.
In ``secret`` mode (passwords) the text is kept but never drawn.

Keys: printable text (any script), Backspace, Delete, Left/Right, Home/End
(and Ctrl-A/E/B/F), Up/Down through the history, Ctrl-U (erase to the start),
Ctrl-K (erase to the end), Ctrl-W (erase a word), Tab (complete the word
before the cursor), Enter. A bracketed paste (the terminal marks it when
``PASTE_ON`` was written) is text, never keys: its line breaks and tabs become
spaces (a trailing break is dropped), so a pasted ``EX`` line is not a command
and nothing is sent until Enter is pressed. ``completions`` is either the words Tab may
complete to, or a function that is given the text before the word being
completed and returns them, so that what is offered can depend on where the
word is (a command name first, a user name after it, nothing in a message).
"""

from __future__ import annotations

import codecs
import enum
import re
import unicodedata
from collections.abc import Callable, Sequence
from typing import NamedTuple, Union

# Bidirectional controls (they reorder what follows them on screen, so a
# message could show something other than what it says) and the Unicode line
# and paragraph separators (some terminals break lines on them).
UNSAFE_FORMAT_CHARS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u2028\u2029"
)
_CSI_MAX = 32  # longest escape sequence kept while waiting for its end
_HISTORY_MAX = 200
_PASTE_MAX = 100_000  # characters of one paste kept (a paste past it is cut)
_PASTE_END = "\x1b[201~"
_ESCAPES = re.compile("\x1b(?:\\[[0-?]*[ -/]*[@-~]|O.|.)?", re.S)   # escape sequences in pasted text
PASTE_ON, PASTE_OFF = "\x1b[?2004h", "\x1b[?2004l"   # the terminal's bracketed paste mode


def is_unsafe(ch: str) -> bool:
    """True for a character a terminal could act on: C0, DEL, C1, bidi controls, line separators."""
    code = ord(ch)
    return code < 0x20 or 0x7F <= code <= 0x9F or ch in UNSAFE_FORMAT_CHARS


ZWJ = "\u200d"   # the zero-width joiner: the character after it joins the one before


def extends(ch: str) -> bool:
    """Does ch belong to the character before it on screen (a combining mark, a variation
    selector, an emoji skin tone or tag, a joiner)? Left, Right, Backspace and Delete move over
    such a cluster whole, so that a thumbs-up is never split from its skin tone."""
    code = ord(ch)
    return (0x1F3FB <= code <= 0x1F3FF or 0xE0020 <= code <= 0xE007F or ch == ZWJ
            or bool(unicodedata.combining(ch)) or unicodedata.category(ch) in ("Mn", "Me"))


def char_width(ch: str) -> int:
    """Terminal columns of one character: 0 for combining marks (and skin tones), 2 for wide East
    Asian ones."""
    if unicodedata.combining(ch) or unicodedata.category(ch) in ("Mn", "Me", "Cf") or 0x1F3FB <= ord(ch) <= 0x1F3FF:
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def text_width(text: str) -> int:
    """Terminal columns of a string without control characters."""
    return sum(char_width(ch) for ch in text)


class Key(enum.Enum):
    """A keystroke the caller acts on rather than the editor."""

    INTERRUPT = "Ctrl-C"
    END_OF_INPUT = "Ctrl-D"
    SUSPEND = "Ctrl-Z"
    CLEAR_SCREEN = "Ctrl-L"


class Submit(NamedTuple):
    """Enter was pressed: the line typed."""

    text: str


Event = Union[Submit, Key]
# The words Tab may complete to, or a function of the text before the word that returns them.
Completions = Union[Sequence[str], Callable[[str], Sequence[str]]]


class Rendered(NamedTuple):
    """One terminal row: the text shown (prompt included) and the cursor's column."""

    text: str
    cursor: int


def _common_prefix(words: Sequence[str]) -> str:
    first, last = min(words), max(words)
    size = 0
    while size < min(len(first), len(last)) and first[size] == last[size]:
        size += 1
    return first[:size]


class LineEditor:
    """A buffer, a cursor and a history; ``feed(bytes) -> events``, ``render() -> Rendered``."""

    def __init__(self) -> None:
        self.chars: list[str] = []
        self.cursor = 0
        self.secret = False
        self.completions: Completions = ()
        self.history: list[str] = []
        self._history_index = 0  # == len(history) when not browsing
        self._draft: list[str] = []
        self._scroll = 0  # index of the first character shown
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""  # an escape sequence not yet complete
        self._last_was_cr = False
        self._paste: list[str] | None = None  # inside a bracketed paste: what it has brought so far
        self.interrupted = ""  # the text Ctrl-C dropped last (for the caller's transcript)

    # --- state ---------------------------------------------------------------
    @property
    def text(self) -> str:
        return "".join(self.chars)

    def set_text(self, text: str) -> None:
        """Replace the buffer; the cursor goes to the end."""
        self.chars = [ch for ch in text if not is_unsafe(ch)]
        self.cursor = len(self.chars)

    def clear(self) -> None:
        self.chars = []
        self.cursor = 0
        self._scroll = 0
        self._history_index = len(self.history)

    def add_history(self, line: str) -> None:
        """Remember a line for Up/Down (not blank ones, not a repeat of the last)."""
        if line.strip() and (not self.history or self.history[-1] != line):
            self.history.append(line)
            del self.history[:-_HISTORY_MAX]
        self._history_index = len(self.history)

    # --- input ---------------------------------------------------------------
    def feed(self, data: bytes) -> list[Event]:
        """Take bytes from the terminal; return the events they complete, in order."""
        events: list[Event] = []
        text = self._pending + self._decoder.decode(data)
        self._pending = ""
        i = 0
        while i < len(text):
            if self._paste is not None:   # a paste ends only at its end marker: nothing in it is a key
                marker = text.find(_PASTE_END, i)
                if marker < 0:
                    keep = next((n for n in range(len(_PASTE_END) - 1, 0, -1) if text.endswith(_PASTE_END[:n])), 0)
                    self._take_pasted(text[i:len(text) - keep])
                    self._pending = text[len(text) - keep:]   # perhaps the start of the marker
                    break
                self._take_pasted(text[i:marker])
                self._end_paste()
                i = marker + len(_PASTE_END)
                continue
            ch = text[i]
            if ch == "\x1b":
                end = self._escape_end(text, i)
                if end is None:
                    self._pending = text[i:]
                    break
                self._escape(text[i:end])
                i = end
                self._last_was_cr = False
                continue
            event = self._char(ch)
            if event is not None:
                events.append(event)
            i += 1
        return events

    @staticmethod
    def _escape_end(text: str, start: int) -> int | None:
        """Index after the escape sequence at start, or None if it is not complete yet."""
        if start + 1 >= len(text):
            return None
        intro = text[start + 1]
        if intro == "O":  # SS3: one more character
            return start + 3 if start + 2 < len(text) else None
        if intro != "[":  # Alt+key: ESC and that key
            return start + 2
        for j in range(start + 2, min(len(text), start + _CSI_MAX)):
            if "\x40" <= text[j] <= "\x7e":
                return j + 1
        if len(text) - start >= _CSI_MAX:
            return start + _CSI_MAX  # junk: drop it
        return None

    def _escape(self, seq: str) -> None:
        final = seq[-1]
        params = seq[2:-1]
        if seq == "\x1b[200~":
            self._paste = []
        elif final in "ABCDHF" and params in ("", "1"):
            {"A": self._history_back, "B": self._history_forward, "C": self._right,
             "D": self._left, "H": self._home, "F": self._end}[final]()
        elif final == "~":
            action = {"1": self._home, "7": self._home, "4": self._end, "8": self._end,
                      "3": self._delete_forward}.get(params)
            if action is not None:
                action()

    def _char(self, ch: str) -> Event | None:
        was_cr, self._last_was_cr = self._last_was_cr, ch == "\r"
        if ch in "\r\n":
            if ch == "\n" and was_cr:
                return None  # CR LF is one Enter
            line = self.text
            self.clear()
            return Submit(line)
        control = {
            "\x03": Key.INTERRUPT, "\x1a": Key.SUSPEND, "\x0c": Key.CLEAR_SCREEN,
        }.get(ch)
        if control is not None:
            if control is Key.INTERRUPT:
                self.interrupted = self.text
                self.clear()
            return control
        if ch == "\x04":
            if not self.chars:
                return Key.END_OF_INPUT
            self._delete_forward()
            return None
        action = {
            "\x7f": self._backspace, "\x08": self._backspace, "\x15": self._erase_to_start,
            "\x0b": self._erase_to_end, "\x17": self._erase_word, "\x01": self._home,
            "\x05": self._end, "\x02": self._left, "\x06": self._right, "\t": self._complete,
            "\x10": self._history_back, "\x0e": self._history_forward,
        }.get(ch)
        if action is not None:
            action()
        elif not is_unsafe(ch):
            self.chars.insert(self.cursor, ch)
            self.cursor += 1
        return None

    def _take_pasted(self, text: str) -> None:
        assert self._paste is not None
        room = _PASTE_MAX - sum(len(part) for part in self._paste)
        if room > 0:
            self._paste.append(text[:room])

    def _end_paste(self) -> None:
        pasted, self._paste = _ESCAPES.sub("", "".join(self._paste or ())), None   # its keys are dropped
        pasted = pasted.replace("\r\n", "\n").replace("\r", "\n").rstrip("\n")
        for ch in pasted.replace("\n", " ").replace("\t", " "):
            if not is_unsafe(ch):
                self.chars.insert(self.cursor, ch)
                self.cursor += 1

    # --- editing -------------------------------------------------------------
    def _cluster_start(self, index: int) -> int:
        """Where the screen character that ends before ``index`` starts (one step left)."""
        index = max(0, index - 1)
        while index > 0 and (extends(self.chars[index]) or self.chars[index - 1] == ZWJ):
            index -= 1
        return index

    def _cluster_end(self, index: int) -> int:
        """Where the screen character that starts at ``index`` ends (one step right)."""
        chars = self.chars
        index = min(len(chars), index + 1)
        while index < len(chars) and (extends(chars[index]) or chars[index - 1] == ZWJ):
            index += 1
        return index

    def _backspace(self) -> None:
        if self.cursor > 0:
            start = self._cluster_start(self.cursor)
            del self.chars[start:self.cursor]
            self.cursor = start

    def _delete_forward(self) -> None:
        if self.cursor < len(self.chars):
            del self.chars[self.cursor:self._cluster_end(self.cursor)]

    def _erase_to_start(self) -> None:
        del self.chars[:self.cursor]
        self.cursor = 0

    def _erase_to_end(self) -> None:
        del self.chars[self.cursor:]

    def _erase_word(self) -> None:
        start = self.cursor
        while start > 0 and self.chars[start - 1].isspace():
            start -= 1
        while start > 0 and not self.chars[start - 1].isspace():
            start -= 1
        del self.chars[start:self.cursor]
        self.cursor = start

    def _left(self) -> None:
        self.cursor = self._cluster_start(self.cursor)

    def _right(self) -> None:
        self.cursor = self._cluster_end(self.cursor)

    def _home(self) -> None:
        self.cursor = 0

    def _end(self) -> None:
        self.cursor = len(self.chars)

    def _history_back(self) -> None:
        if self.secret or self._history_index == 0:
            return
        if self._history_index == len(self.history):
            self._draft = list(self.chars)
        self._history_index -= 1
        self.set_text(self.history[self._history_index])

    def _history_forward(self) -> None:
        if self.secret or self._history_index >= len(self.history):
            return
        self._history_index += 1
        if self._history_index == len(self.history):
            self.chars = list(self._draft)
            self.cursor = len(self.chars)
        else:
            self.set_text(self.history[self._history_index])

    def _complete(self) -> None:
        """Complete the word before the cursor from ``completions`` (case-insensitive)."""
        if self.secret:
            return
        start = self.cursor
        while start > 0 and not self.chars[start - 1].isspace():
            start -= 1
        word = "".join(self.chars[start:self.cursor]).lower()
        words = self.completions("".join(self.chars[:start])) if callable(self.completions) else self.completions
        matches = [c for c in words if c.lower().startswith(word)]
        if not matches:
            return
        completed = matches[0] + " " if len(matches) == 1 else _common_prefix(matches)
        if len(completed.rstrip()) < len(word):
            return
        self.chars[start:self.cursor] = list(completed)
        self.cursor = start + len(completed)

    # --- output --------------------------------------------------------------
    def render(self, prompt: str, width: int) -> Rendered:
        """The row to show for prompt + buffer in width columns, scrolled to keep the cursor in view."""
        width = max(width - 1, 8)  # never write the last column: no autowrap surprises
        prompt = _fit_prompt(prompt, width // 2)
        room = max(width - text_width(prompt), 1)
        if self.secret:
            return Rendered(prompt, text_width(prompt))
        chars = self.chars
        if text_width(self.text) < room:
            self._scroll = 0
        # The cursor in view: the first character shown is at least the first of the longest run
        # ending at the cursor that fits (found walking back from it: linear, a paste is long).
        fits, used = self.cursor, 0
        while fits > 0 and used + char_width(chars[fits - 1]) < room:
            fits -= 1
            used += char_width(chars[fits])
        self._scroll = min(max(self._scroll, fits), self.cursor)
        # Wider than before (a resize, or text deleted at the end): show more of the start again.
        while self._scroll > 0 and text_width("".join(chars[self._scroll - 1:])) < room:
            self._scroll -= 1
        shown: list[str] = []
        used = 0
        for ch in chars[self._scroll:]:
            w = char_width(ch)
            if used + w > room:
                break
            shown.append(ch)
            used += w
        cursor = text_width(prompt) + text_width("".join(chars[self._scroll:self.cursor]))
        return Rendered(prompt + "".join(shown), cursor)

    def redraw(self, prompt: str, width: int) -> str:
        """Characters that redraw the line in place: CR, erase line, text, cursor to its column."""
        row = self.render(prompt, width)
        move = f"\x1b[{row.cursor}C" if row.cursor else ""
        return "\r\x1b[K" + row.text + "\r" + move


def shorten(text: str, columns: int, tail: str = " ...") -> str:
    """text cut to fit in columns (tail marking the cut), or text itself if it fits."""
    if text_width(text) <= columns:
        return text
    kept: list[str] = []
    used = 0
    room = max(columns - text_width(tail), 0)
    for ch in text:
        used += char_width(ch)
        if used > room:
            break
        kept.append(ch)
    return "".join(kept) + tail


def _fit_prompt(prompt: str, limit: int) -> str:
    """Shorten a long prompt (e.g. a long list of names) to limit columns."""
    if text_width(prompt) <= limit:
        return prompt
    kept = []
    used = 0
    for ch in prompt:
        used += char_width(ch)
        if used > limit - 4:
            break
        kept.append(ch)
    return "".join(kept) + "..: "
