"""A message file as POP3 sends it: the stored bytes, dot-stuffed, read a bounded chunk at a time.

RETR sends the file byte for byte except that a line starting with ``.`` gets one more ``.``
(RFC 1939 section 3); the client removes it, so what it keeps is exactly the stored file (which
pecd stores with CRLF line endings, the form S/MIME signatures are computed over). TOP sends the
header, the blank line and at most ``n`` body lines. The terminating ``.`` line is the caller's.

The methods are synchronous file reads; the asyncio adapter runs them with ``asyncio.to_thread``.
"""

from __future__ import annotations

from typing import BinaryIO

__all__ = ["CHUNK", "WireReader"]

#: Bytes read from the file (and so, at most about twice that, sent) per step.
CHUNK = 64 * 1024


class WireReader:
    """Reads ``file`` and returns its wire form in chunks; ``next_chunk`` returns b"" at the end.

    ``top``: None for the whole message, else the number of body lines after the header.
    """

    def __init__(self, file: BinaryIO, top: int | None = None, chunk: int = CHUNK) -> None:
        self._file = file
        self._top = top
        self._chunk = chunk
        self._at_line_start = True
        self._in_header = True
        self._body_lines = 0
        self._done = False
        self._ends_with_newline = True
        self._lone_cr = False  # the current line so far is a lone CR (a tiny chunk split it)

    def next_chunk(self) -> bytes:
        if self._done:
            return b""
        if self._top is None:
            data = self._file.read(self._chunk)
            if not data:
                return self._finish()
            return self._stuff(data)
        return self._next_top()

    def _finish(self) -> bytes:
        self._done = True
        # The terminating ".\r\n" must start a line of its own.
        tail = b"" if self._ends_with_newline else b"\r\n"
        self._ends_with_newline = True
        return tail

    def _stuff(self, data: bytes) -> bytes:
        out = data.replace(b"\n.", b"\n..")
        if self._at_line_start and out.startswith(b"."):
            out = b"." + out
        self._at_line_start = data.endswith(b"\n")
        self._ends_with_newline = self._at_line_start
        return out

    def _next_top(self) -> bytes:
        parts: list[bytes] = []
        size = 0
        while size < self._chunk:
            if not self._in_header and self._top is not None and self._body_lines >= self._top:
                self._done = True
                break
            # A segment is a whole line, or a piece of a longer line (then it has no newline).
            segment = self._file.readline(self._chunk)
            if not segment:
                parts.append(self._finish())
                break
            blank = (self._at_line_start and segment in (b"\r\n", b"\n")) or (
                self._lone_cr and segment.startswith(b"\n")
            )
            self._lone_cr = self._at_line_start and segment == b"\r"
            if blank and self._in_header:
                self._in_header = False
            elif not self._in_header and segment.endswith(b"\n"):
                self._body_lines += 1
            stuffed = self._stuff(segment)
            parts.append(stuffed)
            size += len(stuffed)
        if self._done and not self._ends_with_newline:
            parts.append(b"\r\n")
            self._ends_with_newline = True
        return b"".join(parts)
