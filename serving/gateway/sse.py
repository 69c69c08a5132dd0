"""Server-sent events as a backend streams them: whole events out of arbitrary byte pieces.

A backend's reads split and join events freely, but a client must only ever get whole events, each
as soon as it is in hand (the first one is never held back for more). An event ends with a blank
line, b"\\n\\n". This module is the only place that knows that, so accepting other line endings is
a change of EventFramer alone.

The gateway's own events (an error when a backend breaks off a stream) are made by data_event.
"""

from __future__ import annotations

_END = b"\n\n"


class EventFramer:
    """Cuts one stream into runs of whole events; it holds back only an incomplete event.

    `events` counts the events handed out so far.
    """

    __slots__ = ("_tail", "events")

    def __init__(self) -> None:
        self._tail = b""
        self.events = 0

    def feed(self, piece: bytes) -> bytes:
        """The whole events in hand once `piece` has arrived, as one run; b"" while there are none.

        Events that arrived together stay one run, so the relay sends once per read, not per event,
        and a read of whole events (the usual case) is passed on without a copy.
        """
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

    @staticmethod
    def split(run: bytes) -> list[bytes]:
        """The events of a run from `feed`, each with its end, so b"".join gives the run back."""
        return [event + _END for event in run.split(_END)[:-1]]


def data_event(data: bytes) -> bytes:
    """One event carrying `data` (a single line, such as compact JSON)."""
    return b"data: " + data + _END
