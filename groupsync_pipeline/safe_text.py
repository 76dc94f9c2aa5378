"""Text from outside (group names, file names, errors echoed by servers) made harmless to show.

Anyone who can name a group or a file in a connected app chooses what groupsync prints. In a
terminal, control characters (ESC starts sequences that retitle the window, move the cursor or
rewrite the screen; C1 codes do the same in one character), line breaks and tabs (which forge
rows and columns) and bidirectional overrides (U+202E shows "exe.txt" as "txt.exe") must not
arrive raw. ``for_terminal`` shows each such character as a visible escape (``\\x1b``, ``\\n``,
``\\u202e``), so the investigator sees that it is there without it acting.

Machine formats stay exact: ``json_for_terminal`` only rewrites those characters inside JSON
strings as ``\\uXXXX`` escapes (the parsed value is unchanged), and ``csv_formula_safe``
applies OWASP's rule against spreadsheet formula injection, the one change made to CSV cells.
"""

from __future__ import annotations

import re
import unicodedata

# Cc: C0 controls, DEL, C1 controls. Cf: format characters (bidi embeddings, overrides and
# isolates, LRM/RLM/ALM, zero-width characters, soft hyphen, BOM, tag characters). Zl/Zp: the
# line and paragraph separators, which some terminals break lines on. Cs: lone surrogates
# (undecodable bytes), which cannot be written out at all.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})
_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}

# OWASP (CSV injection): a cell starting with one of these is read as a formula by spreadsheets.
CSV_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def is_unsafe(char: str) -> bool:
    """True for a character that must not reach a terminal raw."""
    return unicodedata.category(char) in _UNSAFE_CATEGORIES


def _escape(char: str) -> str:
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def for_terminal(text: str, *, keep_newlines: bool = False) -> str:
    """``text`` with every control, bidi and invisible format character shown as an escape.

    ``keep_newlines`` keeps line breaks (for multi-line messages); everything else, tabs and
    carriage returns included, is escaped.
    """
    if text.isprintable():  # the common case: nothing to do (isprintable is False for \n)
        return text
    return "".join(
        _escape(char) if is_unsafe(char) and not (keep_newlines and char == "\n") else char
        for char in text
    )


def _json_escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000  # JSON spells characters past the BMP as a UTF-16 surrogate pair
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


_NON_PRINTABLE = re.compile(r"[^\x20-\x7e]")


def json_for_terminal(document: str) -> str:
    """JSON text from ``json.dumps`` with unsafe characters escaped; it parses to the same value.

    ``json.dumps`` already escapes C0 controls; DEL, C1, bidi and other format characters it
    writes raw (with ``ensure_ascii=False``). Outside strings JSON text is plain ASCII, so every
    such character is inside a string, where ``\\uXXXX`` means exactly that character.
    """
    if document.isascii() and "\x7f" not in document:
        return document  # json.dumps escaped every C0 control; the "\n" left are layout
    return _NON_PRINTABLE.sub(_json_replace, document)


def _json_replace(match: re.Match[str]) -> str:
    char = match.group()
    return _json_escape(match) if is_unsafe(char) and char != "\n" else char


def csv_formula_safe(cell: str) -> str:
    """OWASP's rule: a cell a spreadsheet would read as a formula gets a leading ``'``."""
    return "'" + cell if cell.startswith(CSV_FORMULA_STARTS) else cell
