"""The session: links attached and detached with one pair of calls, and nothing lost between."""

from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from sevpn import wire
from sevpn.sequencing import SequenceError
from sevpn.session import ILink, IReceiver, Session
from tests.support import BROADCAST, frame, mac


@implementer(ILink)
class RecordingLink:
    def __init__(self):
        self.sent = []
        self.reading = True

    def send_data(self, first_seq, payload):
        self.sent.append((first_seq, [bytes(f) for f in wire.iter_frames(memoryview(payload))]))

    def pause_reading(self):
        self.reading = False

    def resume_reading(self):
        self.reading = True

    def say_goodbye(self, reason):
        pass

    def fail(self, reason):
        pass

    def frames(self):
        return [f for _, batch in self.sent for f in batch]


@implementer(IReceiver)
class RecordingReceiver:
    def __init__(self):
        self.got = []
        self.events = []

    def frames_received(self, frames):
        self.got.extend(bytes(f) for f in frames)

    def input_done(self):
        self.events.append("done")

    def output_paused(self):
        self.events.append("paused")

    def output_resumed(self):
        self.events.append("resumed")


def numbered(n, start=0):
    return [frame(BROADCAST, mac(1), b"%06d" % i) for i in range(start, start + n)]


class Links(SynchronousTestCase):
    def setUp(self):
        self.session = Session(buffer_limit=1 << 20)
        self.receiver = self.session.receiver = RecordingReceiver()

    def test_interfaces(self):
        verifyObject(ILink, RecordingLink())
        verifyObject(IReceiver, self.receiver)

    def test_held_while_no_link_then_sent_on_use(self):
        self.session.send_frames(numbered(3))
        self.assertIsNone(self.session.link)
        link = RecordingLink()
        self.session.use_link(link, 0)
        self.assertEqual(link.frames(), numbered(3))
        self.session.send_frames(numbered(2, 3))
        self.assertEqual(link.frames(), numbered(5))

    def test_resume_sends_exactly_what_the_peer_lacks(self):
        first = RecordingLink()
        self.session.use_link(first, 0)
        self.session.send_frames(numbered(5))
        self.session.ack_received(2)
        self.session.stop_using_link(first)
        self.session.send_frames(numbered(3, 5))  # while held
        second = RecordingLink()
        self.assertTrue(self.session.can_resume_from(3))
        self.session.use_link(second, 3)  # the peer got 1..3
        self.assertEqual(second.frames(), numbered(5, 3))
        self.assertEqual([seq for seq, _ in second.sent], [4, 6])

    def test_an_impossible_resume_point_is_refused(self):
        self.session.send_frames(numbered(2))
        self.assertFalse(self.session.can_resume_from(3))
        self.assertFalse(self.session.can_resume_from(-1))
        self.assertRaises(SequenceError, self.session.use_link, RecordingLink(), 3)

    def test_a_second_link_takes_over_when_the_first_leaves(self):
        a, b = RecordingLink(), RecordingLink()
        self.session.use_link(a, 0)
        self.session.use_link(b, 0)
        self.session.send_frames(numbered(1))
        self.assertEqual((len(a.frames()), len(b.frames())), (0, 1))  # the newest carries
        self.session.stop_using_link(b)
        self.session.send_frames(numbered(1, 1))
        self.assertEqual(a.frames(), numbered(1, 1))

    def test_reading_paused_on_every_link_and_on_links_that_join(self):
        a = RecordingLink()
        self.session.use_link(a, 0)
        self.session.pause_reading()
        b = RecordingLink()
        self.session.use_link(b, 0)
        self.assertEqual((a.reading, b.reading), (False, False))
        self.session.resume_reading()
        self.assertEqual((a.reading, b.reading), (True, True))

    def test_arrivals_delivered_once_in_order(self):
        frames = numbered(4)
        self.session.data_received(1, 0, frames[:2], 100)
        self.session.data_received(1, 0, frames[:3], 150)  # a resend overlapping what arrived
        self.session.data_received(4, 0, frames[3:], 50)
        self.session.input_done()
        self.assertEqual(self.receiver.got, frames)
        self.assertEqual(self.session.delivered, 4)
        self.assertEqual(self.receiver.events, ["done"])

    def test_only_the_carrying_link_pauses_the_output(self):
        a, b = RecordingLink(), RecordingLink()
        self.session.use_link(a, 0)
        self.session.use_link(b, 0)
        self.session.link_paused(a)
        self.session.link_paused(b)
        self.session.link_resumed(b)
        self.assertEqual(self.receiver.events, ["paused", "resumed"])


class BesideALink(SynchronousTestCase):
    """A UDP channel joins beside the TLS link and leaves again (sevpn.channel)."""

    def setUp(self):
        self.session = Session(buffer_limit=1 << 20)
        self.receiver = self.session.receiver = RecordingReceiver()
        self.tcp = RecordingLink()
        self.session.use_link(self.tcp, 0)

    def test_joining_beside_resends_nothing_and_acks_nothing(self):
        self.session.send_frames(numbered(3))
        udp = RecordingLink()
        self.session.use_link(udp, None)
        self.assertEqual(udp.sent, [])
        self.assertEqual(self.session.sent.held, 3)
        self.session.send_frames(numbered(1, 3))
        self.assertEqual(udp.frames(), numbered(1, 3))

    def test_the_output_follows_the_pause_state_of_the_first_link(self):
        self.session.link_paused(self.tcp)
        udp = RecordingLink()
        self.session.use_link(udp, None)  # the channel never pauses
        self.session.stop_using_link(udp)  # back to the paused TLS link
        self.session.link_resumed(self.tcp)
        self.assertEqual(self.receiver.events, ["paused", "resumed", "paused", "resumed"])

    def test_a_shaper_sees_frames_both_ways(self):
        from zope.interface import implementer

        from sevpn.session import IShaper

        @implementer(IShaper)
        class Doubling:
            def outgoing(self, frames):
                return [f for f in frames for _ in (0, 1)]

            def incoming(self, frames):
                return [bytes(f).upper() for f in frames]

        self.session.shaper = Doubling()
        self.session.send_frames(numbered(1))
        self.assertEqual(self.tcp.frames(), numbered(1) * 2)
        self.assertEqual(self.session.frames_out, 2)
        self.session.data_received(1, 0, [b"abc" * 10], 30)
        self.assertEqual(self.receiver.got, [b"ABC" * 10])
