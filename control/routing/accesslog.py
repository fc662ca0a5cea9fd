"""HAProxy's access log (``control.routing.haproxy.ACCESS_LOG_FORMAT``), read back: one parser for the Router's adaptive
limits and the drills' "where the time goes" breakdown, so both read the same fields the same way.

A line: ``%ID %ci:%cp [%tr] %ft %b/%s %Tq/%Tw/%Tc/%Tr/%Tt/%Ta %ST %B %rc %tsc %ac/%fc/%bc/%sc %sq/%bq "request"``
(logs written before ``Ta`` and ``%tsc`` were added have five timers and no termination state: their ``ta`` is
``tt``, their ``termination`` empty). HAProxy writes -1 for a timer
that never started (``Tr`` of a request refused before any server, ``Tw`` of one that never queued); those stay
-1 here and are left out of the percentiles. ``Tq`` and ``Tt`` include the idle time before a request on a
kept-alive connection (an HTTP/2 channel between two calls); ``Ta``, the request's active time, does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

#: Longest stretch read at once (a drill's log at 2,000 requests/s for a minute is ~25 MB).
MAX_READ_BYTES = 64 << 20


@dataclass(frozen=True)
class AccessEntry:
    """One request as HAProxy logged it; times in milliseconds, ``accepted`` in Unix seconds."""

    accepted: float
    backend: str
    server: str
    tq: int
    tw: int
    tc: int
    tr: int
    tt: int
    ta: int
    status: int
    retries: int
    redispatched: bool
    #: HAProxy's termination state (``%tsc``): "----" for a normal end; e.g. "sQ--" a server-side timeout while
    #: queued for a slot, "SC--" the server refused the connection, "PR--" refused by a rule (the front door).
    termination: str = ""

    @property
    def slot(self) -> int | None:
        """The instance slot of a traffic server (``s<k>``); None for the fallback or a refusal."""
        if self.server.startswith("s") and self.server[1:].isdigit():
            return int(self.server[1:])
        return None


def parse(line: str) -> AccessEntry | None:
    """One log line, or None when it is not a request line of this format."""
    parts = line.split()
    if len(parts) < 9 or not parts[2].startswith("[") or "/" not in parts[4]:
        return None
    try:
        accepted = datetime.strptime(parts[2].strip("[]"), "%d/%b/%Y:%H:%M:%S.%f").timestamp()
        backend, server = parts[4].split("/", 1)
        timers = [int(x) for x in parts[5].split("/")]
        if len(timers) not in (5, 6):
            return None
        tq, tw, tc, tr, tt = timers[:5]
        ta = timers[5] if len(timers) == 6 else tt
        status = int(parts[6])
        rc = parts[8]
        retries = int(rc.lstrip("+"))
    except ValueError:
        return None
    term = parts[9] if len(parts) > 9 and len(parts[9]) == 4 and "/" not in parts[9] else ""
    return AccessEntry(accepted, backend, server, tq, tw, tc, tr, tt, ta, status, retries, rc.startswith("+"), term)


def read_from(path: Path, offset: int) -> tuple[list[AccessEntry], int]:
    """Entries written since byte ``offset`` (from the start when the file was truncated since) and the offset
    to read from next time; nothing when the file cannot be read."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            f.seek(offset if offset <= size else 0)
            data = f.read(MAX_READ_BYTES)
            new_offset = f.tell()
    except OSError:
        return [], offset
    cut = data.rfind(b"\n") + 1  # a line still being written (no newline yet) is left for the next read
    new_offset -= len(data) - cut
    entries = [e for e in (parse(ln) for ln in data[:cut].decode(errors="replace").splitlines()) if e is not None]
    return entries, new_offset


def size(path: Path) -> int:
    """Where a reader that wants only what comes next starts (0 when there is no log yet)."""
    try:
        return path.stat().st_size
    except OSError:
        return 0
