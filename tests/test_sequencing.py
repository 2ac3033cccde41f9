"""Sequence numbers, acks and the resume buffer."""

from twisted.trial.unittest import SynchronousTestCase

from sevpn import wire
from sevpn.sequencing import ReceiveLog, SendLog, SequenceError


def frames(start, n):
    return [bytes([i % 256]) * 20 + str(i).encode() for i in range(start, start + n)]


def unpack(chunks):
    out = []
    for first, payload in chunks:
        for i, f in enumerate(wire.iter_frames(memoryview(payload))):
            out.append((first + i, bytes(f)))
    return out


class SendLogTests(SynchronousTestCase):
    def test_numbers_from_one(self):
        log = SendLog()
        self.assertEqual(log.append(frames(0, 3))[0], 1)
        self.assertEqual(log.append(frames(3, 2))[0], 4)
        self.assertEqual(log.held, 5)

    def test_ack_trims_whole_chunks(self):
        log = SendLog()
        log.append(frames(0, 3))
        log.append(frames(3, 2))
        log.ack(2)
        self.assertEqual(log.held, 5)  # the first chunk is not fully acked
        log.ack(3)
        self.assertEqual(log.held, 2)
        log.ack(3)  # repeated acks are harmless
        log.ack(5)
        self.assertEqual((log.held, log.bytes), (0, 0))

    def test_ack_of_unsent_frame(self):
        log = SendLog()
        log.append(frames(0, 2))
        self.assertRaises(SequenceError, log.ack, 3)

    def test_resend_exactly_what_is_missing(self):
        log = SendLog()
        sent = frames(0, 10)
        log.append(sent[:4])
        log.append(sent[4:])
        log.ack(2)
        again = unpack(log.resend_after(6))
        self.assertEqual(again, [(i + 1, sent[i]) for i in range(6, 10)])
        self.assertEqual((log.retransmitted, log.dropped), (4, 0))

    def test_resend_inside_a_chunk_and_nothing(self):
        log = SendLog()
        sent = frames(0, 5)
        log.append(sent)
        self.assertEqual(unpack(log.resend_after(3)), [(4, sent[3]), (5, sent[4])])
        self.assertEqual(log.resend_after(5), [])

    def test_resend_after_unsent(self):
        log = SendLog()
        log.append(frames(0, 2))
        self.assertRaises(SequenceError, log.resend_after, 3)

    def test_overflow_drops_oldest_and_counts_what_peer_lacked(self):
        one = len(wire.encode_frames(frames(0, 1)))
        log = SendLog(limit=3 * one)
        for i in range(6):
            log.append(frames(i, 1))
        self.assertEqual(log.held, 3)
        self.assertLessEqual(log.bytes, 3 * one)
        # the peer had received 1; frames 2 and 3 left the buffer
        again = unpack(log.resend_after(1))
        self.assertEqual([s for s, _ in again], [4, 5, 6])
        self.assertEqual(log.dropped, 2)

    def test_overflow_of_acked_frames_is_not_a_drop(self):
        one = len(wire.encode_frames(frames(0, 1)))
        log = SendLog(limit=2 * one)
        for i in range(5):
            log.append(frames(i, 1))
        self.assertEqual(unpack(log.resend_after(5)), [])
        self.assertEqual(log.dropped, 0)


class ReceiveLogTests(SynchronousTestCase):
    def test_in_order(self):
        r = ReceiveLog()
        self.assertEqual(r.accept(1, 3), 0)
        self.assertEqual(r.accept(4, 1), 0)
        self.assertEqual(r.received, 4)

    def test_duplicates_skipped(self):
        r = ReceiveLog()
        r.accept(1, 5)
        self.assertEqual(r.accept(2, 2), 2)  # all old
        self.assertEqual(r.accept(4, 4), 2)  # 4 and 5 old, 6 and 7 new
        self.assertEqual((r.received, r.duplicates), (7, 4))

    def test_gap_counted_as_lost(self):
        r = ReceiveLog()
        r.accept(1, 1)
        self.assertEqual(r.accept(5, 1), 0)
        self.assertEqual((r.received, r.lost), (5, 3))
