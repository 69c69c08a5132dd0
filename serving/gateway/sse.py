"""Server-sent events as a backend streams them: whole events out of arbitrary byte pieces.

A backend's reads split and join events freely, but a client must only ever get whole events, each
as soon as it is in hand (the first one is never held back for more). An event ends with a blank
line, and SSE lets a line end in LF, CRLF or CR, mixed freely. This module is the only place that
knows that: EventFramer hands out events with LF line ends only, so everything after it (the usage
filter, the event count, the client) sees one framing, b"\\n\\n" between events. A line end is
never part of a field's value in SSE, so rewriting CR and CRLF as LF changes no event.

The gateway's own events (an error when a backend breaks off a stream) are made by data_event.
"""

from __future__ import annotations

_END = b"\n\n"
_CR = b"\r"


class EventFramer:
    """Cuts one stream into runs of whole events; it holds back only an incomplete event.

    `events` counts the events handed out so far.
    """

    __slots__ = ("_after_cr", "_tail", "events")

    def __init__(self) -> None:
        self._tail = b""
        self._after_cr = False  # the last byte read was CR: an LF next completes its CRLF
        self.events = 0

    def feed(self, piece: bytes) -> bytes:
        """The whole events in hand once `piece` has arrived, as one run; b"" while there are none.

        Events that arrived together stay one run, so the relay sends once per read, not per event,
        and a read of whole LF-framed events (the usual case) is passed on without a copy. Only a
        read that holds a CR is rewritten (one pass in C per line-end form).
        """
        if self._after_cr:
            self._after_cr = False
            if piece.startswith(b"\n"):  # the second half of a CRLF split between reads
                piece = piece[1:]
        if _CR in piece:
            self._after_cr = piece.endswith(_CR)
            piece = piece.replace(b"\r\n", b"\n").replace(_CR, b"\n")
        if self._tail:
            piece, self._tail = self._tail + piece, b""
        if not piece.endswith(_END):
            end = piece.rfind(_END)
            if end < 0:
                self._tail = piece
                return b""
            cut = end + len(_END)
            piece, self._tail = piece[:cut], piece[cut:]
        self.events += piece.count(_END)
        return piece

    def flush(self) -> bytes:
        """At the end of the body: the event held back for want of its blank line, completed with
        one, so the client still gets a whole event; b"" when only line ends are left."""
        tail, self._tail = self._tail.rstrip(b"\n"), b""
        if not tail:
            return b""
        self.events += 1
        return tail + _END

    @staticmethod
    def split(run: bytes) -> list[bytes]:
        """The events of a run from `feed`, each with its end, so b"".join gives the run back."""
        return [event + _END for event in run.split(_END)[:-1]]


def data_event(data: bytes) -> bytes:
    """One event carrying `data` (a single line, such as compact JSON)."""
    return b"data: " + data + _END
