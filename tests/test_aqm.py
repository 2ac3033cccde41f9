"""Queues that stand signal congestion early: CoDel's control law and ECN marks."""

import struct

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from sevpn import ecn
from sevpn.aqm import INTERVAL, TARGET, Codel
from sevpn.offload import checksum
from sevpn.port import Port
from tests.support import BROADCAST, frame, mac


def ipv4(tos: int, payload: bytes = b"x" * 40) -> bytes:
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, tos, 20 + len(payload), 1, 0, 64, 6, 0,
                                   b"\x0a\0\0\x01", b"\x0a\0\0\x02"))
    header[10:12] = checksum(header).to_bytes(2, "big")
    return frame(BROADCAST, mac(1), bytes(header) + payload)


def ipv6(traffic_class: int) -> bytes:
    first = (6 << 28) | (traffic_class << 20)
    header = struct.pack("!IHBB16s16s", first, 40, 6, 64, b"\0" * 15 + b"\1", b"\0" * 15 + b"\2")
    return frame(BROADCAST, mac(1), header + b"y" * 40, ethertype=b"\x86\xdd")


class Marks(SynchronousTestCase):
    def test_ipv4_ect_is_marked_and_its_checksum_stays_right(self):
        for ect in (ecn.ECT0, ecn.ECT1):
            marked = ecn.mark(ipv4(0xB8 | ect))
            self.assertEqual(marked[15] & 3, ecn.CE)
            self.assertEqual(marked[15] >> 2, 0xB8 >> 2)  # the DSCP is kept
            header = bytearray(marked[14:34])
            field = bytes(header[10:12])
            header[10:12] = b"\0\0"
            self.assertEqual(field, checksum(header).to_bytes(2, "big"))  # as if computed afresh

    def test_not_ect_and_non_ip_are_not_marked(self):
        self.assertIsNone(ecn.mark(ipv4(0)))
        self.assertIsNone(ecn.mark(frame(BROADCAST, mac(1), b"z" * 40, ethertype=b"\x08\x06")))
        self.assertIsNone(ecn.mark(b"\0" * 20))

    def test_ipv6_and_offload_headers(self):
        marked = ecn.mark(ipv6(ecn.ECT0))
        self.assertEqual(((marked[14] & 0x0F) << 4 | marked[15] >> 4) & 3, ecn.CE)
        self.assertIsNone(ecn.mark(ipv6(0)))
        offload = b"\0" * 10 + ipv4(ecn.ECT0)
        self.assertEqual(ecn.mark(offload, 10)[25] & 3, ecn.CE)


class ControlLaw(SynchronousTestCase):
    def test_a_short_queue_is_left_alone(self):
        codel = Codel()
        self.assertFalse(any(codel.signal(TARGET / 2, t / 1000) for t in range(1000)))

    def test_a_standing_queue_is_signalled_ever_sooner(self):
        codel = Codel()
        signals = [t / 1000 for t in range(2000) if codel.signal(TARGET * 2, t / 1000)]
        self.assertAlmostEqual(signals[0], INTERVAL, places=2)  # after one whole interval above target
        gaps = [b - a for a, b in zip(signals, signals[1:])]
        # (the clock here ticks in milliseconds)
        self.assertTrue(all(later <= earlier + 0.0015 for earlier, later in zip(gaps, gaps[1:])), gaps)
        self.assertLess(gaps[-1], gaps[0] / 3)
        codel.drained()
        self.assertFalse(codel.signal(TARGET * 2, 2.0))


class Recorder(Port):
    def __init__(self, clock):
        super().__init__("dest", clock, queue_limit=10**9)
        self.got = []

    def transmit(self, frames):
        self.got.extend(bytes(f) for f in frames)


class StandingQueues(SynchronousTestCase):
    def test_a_port_whose_queue_stands_marks_then_drops(self):
        clock = Clock()
        port = Recorder(clock)
        port.output_paused()
        for _ in range(300):  # 300 ms paused, a frame a millisecond
            clock.advance(0.001)
            port.deliver([ipv4(ecn.ECT0)], 0)
        self.assertGreater(port.ecn_marks, 2)
        self.assertEqual(port.congestion_drops, 0)  # ECN-capable: marked, never dropped
        marks = port.ecn_marks
        for _ in range(300):
            clock.advance(0.001)
            port.deliver([ipv4(0)], 0)
        self.assertGreater(port.congestion_drops, 2)  # not ECN-capable: dropped
        self.assertEqual(port.ecn_marks, marks)
        port.output_resumed()
        port.deliver([ipv4(0)], 0)
        self.assertEqual(port.got[-1], ipv4(0))
