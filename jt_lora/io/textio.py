"""Reading text inputs line by line so that every fault names the file and the line.

Python's text mode raises ``UnicodeDecodeError`` with a byte offset into an internal buffer and
no file name; ``json.loads`` reports a line and column of the one string it was given. Reading
bytes and decoding each line here turns both into ``path:line[:column]: what`` messages.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Tuple

__all__ = ["iter_text_lines", "parse_json_line"]


def iter_text_lines(path, strip_bom: bool = True) -> Iterator[Tuple[int, str]]:
    """``(line number, text)`` for each line of a UTF-8 file (line ends kept).

    Raises:
        ValueError: ``path:line: not valid UTF-8 ...`` with the offending byte and its column.
    """
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if line_no == 1 and strip_bom and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield line_no, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                col = len(raw[:e.start].decode("utf-8", errors="replace")) + 1
                raise ValueError(f"{Path(path)}:{line_no}:{col}: not valid UTF-8 (byte "
                                 f"{raw[e.start:e.start + 1]!r}); convert the file to UTF-8") from None


def parse_json_line(path, line_no: int, text: str):
    """``json.loads(text)``; an error names ``path:line:column`` (the column in that line).

    The line end is cut first: with it, an object left open at the end of a line is reported at
    "line 2 column 1" of the string, i.e. column 1, instead of where the line stops.
    """
    try:
        return json.loads(text.rstrip("\r\n"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{Path(path)}:{line_no}:{e.colno}: invalid JSON ({e.msg})") from None
