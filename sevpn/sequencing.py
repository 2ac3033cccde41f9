"""
Sequence numbers, acknowledgements and the resume buffer: the exactness
behind session resumption (a short outage loses not one frame).

Pure state, no reactor.  Each side of a session owns one L{SendLog} (what
it sent or holds for the peer, numbered from 1, kept until acknowledged)
and one L{ReceiveLog} (the highest frame delivered, so a frame is delivered
at most once and in order, also across a resume).  The design follows the
seq/ack scheme of magic-wormhole's Dilation: cumulative acks, the resuming
side states what it received, the other resends what is missing.
"""

from __future__ import annotations

from collections import deque
from typing import Deque, List, Optional, Sequence, Tuple

from sevpn import defaults, wire

DEFAULT_LIMIT = defaults.RESUME_BUFFER


class SequenceError(Exception):
    """The peer acknowledged or resumed from a frame never sent."""


class Budget:
    """
    The bytes all send logs of one hub may hold together.  A log that
    waits for its session to resume draws from it like the others; when it
    is spent, the oldest frames of the largest logs whose sessions are held
    go first (their loss is counted when they resume), then the appending
    log's own.  Reclaiming goes down to nine tenths of the limit, so the
    logs are not scanned for every frame of a flood.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        #: Bytes dropped to stay within the budget.
        self.reclaimed = 0
        self.logs: set = set()

    def reclaim(self, appender: "SendLog") -> None:
        """Free bytes, held logs' oldest first, down to nine tenths of the limit."""
        target = self.limit * 9 // 10
        held = sorted((log for log in self.logs if not log.linked and log.bytes), key=lambda log: -log.bytes)
        for log in held + [appender]:
            if self.used <= target:
                return
            self.reclaimed += log.drop_oldest(self.used - target)


class SendLog:
    """
    Frames toward the peer, each numbered, kept until the peer acks them.

    Frames are kept as the encoded DATA payloads that were (or will be)
    written, so keeping them costs no copy.  When the log exceeds its limit
    the oldest payloads leave it; a frame that left unacknowledged is
    counted as dropped only if a resume shows the peer never got it.
    """

    def __init__(self, limit: int = DEFAULT_LIMIT, budget: Optional[Budget] = None) -> None:
        self.limit = limit
        self.budget = budget
        #: Whether a link carries the session now (the budget spares such logs).
        self.linked = False
        if budget is not None:
            budget.logs.add(self)
        self.next_seq = 1
        self.acked = 0
        self.bytes = 0
        self.dropped = 0
        self.retransmitted = 0
        self._chunks: Deque[Tuple[int, int, bytes]] = deque()

    @property
    def held(self) -> int:
        """Frames sent or held but not yet acknowledged."""
        return sum(count for _, count, _ in self._chunks)

    def append(self, frames: Sequence) -> Tuple[int, bytes]:
        """Number C{frames}; return the first number and the payload."""
        payload = wire.encode_frames(frames)
        first = self.next_seq
        self.next_seq += len(frames)
        self._chunks.append((first, len(frames), payload))
        self._grew(len(payload))
        if self.bytes > self.limit:
            self.drop_oldest(self.bytes - self.limit)
        budget = self.budget
        if budget is not None and budget.used > budget.limit:
            budget.reclaim(self)
        return first, payload

    def _grew(self, delta: int) -> None:
        self.bytes += delta
        if self.budget is not None:
            self.budget.used += delta

    def drop_oldest(self, nbytes: int) -> int:
        """
        Let go of the oldest payloads, at least C{nbytes} of them, keeping
        the newest; return the bytes freed.
        """
        freed = 0
        chunks = self._chunks
        while freed < nbytes and len(chunks) > 1:
            freed += len(chunks.popleft()[2])
        self._grew(-freed)
        return freed

    def close(self) -> None:
        """The session ended: its bytes go back to the budget."""
        self._chunks.clear()
        self._grew(-self.bytes)
        if self.budget is not None:
            self.budget.logs.discard(self)

    def ack(self, seq: int) -> None:
        """The peer has every frame up to C{seq}."""
        if seq >= self.next_seq:
            raise SequenceError(f"the peer acknowledged frame {seq}, but only {self.next_seq - 1} were sent")
        if seq <= self.acked:
            return
        self.acked = seq
        chunks = self._chunks
        freed = 0
        while chunks and chunks[0][0] + chunks[0][1] - 1 <= seq:
            freed += len(chunks.popleft()[2])
        if freed:
            self._grew(-freed)

    def resend_after(self, received: int) -> List[Tuple[int, bytes]]:
        """
        The payloads the peer lacks when it says it received up to
        C{received}; frames no longer held are counted as dropped.
        """
        if received >= self.next_seq:
            raise SequenceError(f"the peer says it received frame {received}, but only {self.next_seq - 1} were sent")
        self.ack(max(received, self.acked))
        expected = max(received, self.acked) + 1
        out = []
        for first, count, payload in self._chunks:
            if first < expected:
                skip = expected - first
                frames = wire.iter_frames(memoryview(payload))[skip:]
                first, count, payload = expected, count - skip, wire.encode_frames(frames)
            elif first > expected:
                self.dropped += first - expected
            out.append((first, payload))
            self.retransmitted += count
            expected = first + count
        self.dropped += self.next_seq - expected
        return out


class ReceiveLog:
    """What arrived from the peer: delivered at most once, in order."""

    def __init__(self) -> None:
        self.received = 0
        self.duplicates = 0
        self.lost = 0

    def accept(self, first_seq: int, count: int) -> int:
        """
        Frames C{first_seq .. first_seq+count-1} arrived; return how many
        leading ones were already delivered (and must be skipped).
        """
        last = first_seq + count - 1
        received = self.received
        if last <= received:
            self.duplicates += count
            return count
        if first_seq > received + 1:
            self.lost += first_seq - received - 1
            skip = 0
        else:
            skip = received + 1 - first_seq
            self.duplicates += skip
        self.received = last
        return skip
