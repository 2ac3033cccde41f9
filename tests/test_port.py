"""The queue policy every port shares: hold the sender, drop past the queue, let a stalled port go."""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from sevpn.port import IPort, Cable, Port
from tests.support import BROADCAST, frame, mac


class Recorder(Port):
    def __init__(self, name, clock, **kw):
        super().__init__(name, clock, **kw)
        self.got = []
        self.reading = True

    def transmit(self, frames):
        self.got.extend(bytes(f) for f in frames)

    def pause_input(self):
        self.reading = False

    def resume_input(self):
        self.reading = True


class QueuePolicy(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.dest = Recorder("dest", self.clock, queue_limit=1000, stall_time=0.5)
        self.src = Recorder("src", self.clock)
        self.other = Recorder("other", self.clock)

    def test_interface(self):
        verifyObject(IPort, self.dest)

    def test_a_paused_destination_holds_its_source_back(self):
        self.dest.output_paused()
        self.dest.deliver([b"x" * 100], 0, self.src)
        self.assertEqual(len(self.dest.got), 1)  # given to the transport: nothing lost
        self.assertFalse(self.src.reading)
        self.dest.output_resumed()
        self.assertTrue(self.src.reading)

    def test_held_by_two_destinations_reads_when_both_have_room(self):
        self.dest.output_paused()
        self.other.output_paused()
        self.dest.deliver([b"x"], 0, self.src)
        self.other.deliver([b"x"], 0, self.src)
        self.dest.output_resumed()
        self.assertFalse(self.src.reading)
        self.other.output_resumed()
        self.assertTrue(self.src.reading)

    def test_past_the_queue_frames_are_dropped_and_counted(self):
        self.dest.output_paused()
        self.dest.deliver([b"x" * 600], 0, self.src)
        self.dest.deliver([b"x" * 600], 0, self.other)
        self.assertFalse(self.dest.accepting())
        self.dest.deliver([b"x" * 10, b"y" * 10], 0, self.other)
        self.assertEqual(len(self.dest.got), 2)
        self.assertEqual(self.dest.congestion_drops, 2)
        self.dest.output_resumed()
        self.assertTrue(self.dest.accepting())
        self.dest.deliver([b"z"], 0, self.other)
        self.assertEqual(self.dest.got[-1], b"z")

    def test_a_stalled_destination_lets_its_sources_go_and_drops(self):
        self.dest.output_paused()
        self.dest.deliver([b"x"], 0, self.src)
        self.clock.advance(0.5)
        self.assertTrue(self.src.reading)  # let go: a stuck port holds nobody up
        self.dest.deliver([b"y"], 0, self.src)
        self.assertEqual(self.dest.congestion_drops, 1)
        self.assertTrue(self.src.reading)
        self.dest.output_resumed()
        self.dest.deliver([b"z"], 0, self.src)
        self.assertEqual(self.dest.got, [b"x", b"z"])

    def test_a_closed_destination_lets_go(self):
        self.dest.output_paused()
        self.dest.deliver([b"x"], 0, self.src)
        self.dest.close()
        self.assertTrue(self.src.reading)
        self.dest.deliver([b"y"], 0, self.src)
        self.assertEqual(self.dest.got, [b"x"])

    def test_offsets_are_converted_by_the_destination(self):
        plain = Recorder("plain", self.clock)
        offload = Recorder("offload", self.clock, mac_offset=10)
        f = frame(BROADCAST, mac(1))
        offload.deliver([f], 0, plain)
        plain.deliver([b"\0" * 10 + f, b"\x40" + b"\0" * 9 + f], 10, offload)
        self.assertEqual(offload.got, [b"\0" * 10 + f])
        self.assertEqual(plain.got, [f])
        self.assertEqual(plain.bad_frames, 1)  # an invalid offload header never reaches a plain port


class Cables(SynchronousTestCase):
    def test_unplugged_cable_drops_and_counts(self):
        clock = Clock()
        tap, uplink = Recorder("tap", clock), Recorder("uplink", clock)
        cable = Cable(tap)
        cable.forward(tap, [b"a", b"b"])
        self.assertEqual(cable.unplugged_drops, 2)
        cable.plug(uplink)
        cable.forward(tap, [b"c"])
        cable.forward(uplink, [b"d"])
        self.assertEqual((uplink.got, tap.got), ([b"c"], [b"d"]))
        cable.unplug()
        self.assertTrue(uplink.closed)
