"""The UDP channel's datagrams: sealing, opening, the replay window, what fits."""

import hashlib
import os
import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sevpn import datagram, wire
from sevpn.datagram import Opener, Sealer

CHANNEL = 0x0123456789ABCDEF


def derive_from(secret: bytes):
    """Epoch keys as the TLS exporter would give them: distinct per epoch and direction."""
    calls = []

    def derive(epoch):
        calls.append(epoch)
        tag = secret + epoch.to_bytes(8, "big")
        return datagram.split_keys(hashlib.sha256(tag + b"c").digest() + hashlib.sha256(tag + b"h").digest())

    derive.calls = calls
    return derive


def pair(**kw):
    derive = derive_from(os.urandom(32))
    return Sealer(CHANNEL, derive, 0, **{k: v for k, v in kw.items() if k == "epoch_size"}), \
        Opener(CHANNEL, derive, 0, **kw), derive


class SealAndOpen(SynchronousTestCase):
    def test_round_trip(self):
        sealer, opener, _ = pair()
        for text in (b"", b"x", os.urandom(1400), os.urandom(datagram.MAX_UDP_PAYLOAD - datagram.OVERHEAD)):
            sealed = bytes(sealer.seal(text))
            self.assertEqual(len(sealed), len(text) + datagram.OVERHEAD)
            self.assertEqual(opener.open(sealed), text)
        self.assertEqual((opener.opened, opener.bad, opener.replayed, opener.too_old), (4, 0, 0, 0))

    def test_header_is_the_channel_and_the_counter_in_clear(self):
        sealer, _, _ = pair()
        sealed = bytes(sealer.seal(b"hello"))
        self.assertEqual(datagram.HEADER.unpack_from(sealed), (CHANNEL, 1))
        self.assertEqual(datagram.channel_of(sealed), CHANNEL)
        self.assertNotIn(b"hello", sealed)

    def test_every_tampered_byte_is_rejected(self):
        sealer, opener, _ = pair()
        sealed = bytes(sealer.seal(b"a frame of some length"))
        for i in range(len(sealed)):
            forged = bytearray(sealed)
            forged[i] ^= 0x01
            self.assertIsNone(opener.open(bytes(forged)), i)
        self.assertEqual(opener.bad, len(sealed))
        self.assertEqual(opener.open(sealed), b"a frame of some length")  # the window did not move

    def test_truncated_and_empty_datagrams_are_rejected(self):
        sealer, opener, _ = pair()
        sealed = bytes(sealer.seal(b"frame"))
        for cut in (0, 1, 15, 16, 31, len(sealed) - 1):
            self.assertIsNone(opener.open(sealed[:cut]))
        self.assertEqual(opener.bad, 6)

    def test_other_key_other_direction_other_channel(self):
        derive = derive_from(os.urandom(32))
        sealed = bytes(Sealer(CHANNEL, derive, 0).seal(b"frame"))
        self.assertIsNone(Opener(CHANNEL, derive, 1).open(sealed))  # a reflected datagram
        self.assertIsNone(Opener(CHANNEL, derive_from(os.urandom(32)), 0).open(sealed))
        self.assertIsNone(Opener(CHANNEL + 1, derive, 0).open(sealed))
        self.assertEqual(Opener(CHANNEL, derive, 0).open(sealed), b"frame")

    def test_too_large_a_plaintext_is_refused(self):
        sealer, _, _ = pair()
        self.assertRaises(ValueError, sealer.seal, bytes(datagram.MAX_UDP_PAYLOAD - datagram.OVERHEAD + 1))
        self.assertEqual(sealer.counter, 0)  # no counter spent


class Counters(SynchronousTestCase):
    def test_never_reused(self):
        sealer, _, _ = pair()
        seen = [datagram.HEADER.unpack_from(bytes(sealer.seal(b"x")))[1] for _ in range(5000)]
        self.assertEqual(seen, list(range(1, 5001)))

    def test_exhausted_sealer_stops(self):
        sealer, opener, _ = pair()
        sealer.counter = datagram.MAX_COUNTER - 1
        last = bytes(sealer.seal(b"last"))
        self.assertEqual(datagram.HEADER.unpack_from(last)[1], datagram.MAX_COUNTER)
        self.assertRaises(datagram.SealerExhausted, sealer.seal, b"one more")
        self.assertRaises(datagram.SealerExhausted, sealer.seal, b"one more")
        self.assertEqual(sealer.counter, datagram.MAX_COUNTER)

    def test_counter_zero_is_never_taken(self):
        sealer, opener, _ = pair()
        sealed = bytearray(sealer.seal(b"x"))
        sealed[8:16] = bytes(8)
        self.assertIsNone(opener.open(bytes(sealed)))
        self.assertEqual(opener.bad, 1)


class ReplayWindow(SynchronousTestCase):
    def seal_many(self, n, **kw):
        sealer, opener, derive = pair(**kw)
        return [bytes(sealer.seal(b"%d" % i)) for i in range(n)], opener

    def test_a_replay_is_dropped_and_counted(self):
        sealed, opener = self.seal_many(3)
        self.assertEqual(opener.open(sealed[0]), b"0")
        self.assertIsNone(opener.open(sealed[0]))
        self.assertEqual(opener.open(sealed[2]), b"2")
        self.assertIsNone(opener.open(sealed[2]))
        self.assertEqual(opener.open(sealed[1]), b"1")  # late but new: taken
        self.assertIsNone(opener.open(sealed[1]))
        self.assertEqual((opener.opened, opener.replayed), (3, 3))

    def test_window_edges(self):
        window = datagram.WINDOW
        sealed, opener = self.seal_many(window + 2)
        newest = sealed[window]  # counter window + 1
        self.assertIsNotNone(opener.open(newest))
        self.assertIsNone(opener.open(sealed[0]))  # counter 1: window behind: too old
        self.assertEqual(opener.too_old, 1)
        self.assertEqual(opener.open(sealed[1]), b"1")  # counter 2: the oldest still in the window
        self.assertIsNone(opener.open(sealed[1]))
        self.assertEqual(opener.replayed, 1)
        self.assertIsNotNone(opener.open(sealed[window + 1]))  # the window moves by one
        self.assertIsNone(opener.open(sealed[1]))  # counter 2 fell out of it
        self.assertEqual((opener.too_old, opener.replayed), (2, 1))
        self.assertEqual(opener.open(sealed[2]), b"2")  # counter 3 is now the oldest in it

    def test_a_jump_past_the_window_forgets_the_old_bitmap(self):
        window = datagram.WINDOW
        sealed, opener = self.seal_many(2 * window + 10)
        for i in (0, 1, 5):
            opener.open(sealed[i])
        self.assertIsNotNone(opener.open(sealed[2 * window + 9]))
        self.assertIsNone(opener.open(sealed[5]))
        self.assertEqual(opener.too_old, 1)
        self.assertIsNotNone(opener.open(sealed[2 * window + 8]))

    def test_a_forgery_does_not_move_the_window(self):
        sealed, opener = self.seal_many(10)
        forged = bytearray(sealed[9])
        forged[-1] ^= 0xFF
        self.assertIsNone(opener.open(bytes(forged)))
        self.assertEqual(opener.newest, 0)
        self.assertEqual(opener.open(sealed[0]), b"0")

    @settings(max_examples=50, deadline=None)
    @given(st.lists(st.integers(min_value=0, max_value=299), max_size=400))
    def test_any_order_each_counter_at_most_once(self, order):
        sealed, opener = self.seal_many(300)
        got = [opener.open(sealed[i]) for i in order]
        taken = [g for g in got if g is not None]
        self.assertEqual(len(taken), len(set(taken)))
        self.assertEqual(opener.opened + opener.replayed + opener.too_old + opener.bad, len(order))


class Epochs(SynchronousTestCase):
    def test_keys_change_every_epoch_and_both_ends_follow(self):
        sealer, opener, derive = pair(epoch_size=16, window=8)
        sealed = [bytes(sealer.seal(b"%d" % i)) for i in range(40)]
        self.assertEqual([opener.open(s) for s in sealed], [b"%d" % i for i in range(40)])
        self.assertEqual(sorted(set(derive.calls)), [0, 1, 2])
        # a datagram of epoch 1 under epoch 0's key does not open
        other = Opener(CHANNEL, lambda e: derive(0), 0, epoch_size=16, window=8)
        self.assertIsNone(other.open(sealed[20]))

    def test_late_datagram_of_the_previous_epoch_opens(self):
        sealer, opener, _ = pair(epoch_size=16, window=8)
        sealed = [bytes(sealer.seal(b"%d" % i)) for i in range(20)]
        self.assertEqual(opener.open(sealed[17]), b"17")  # counter 18: epoch 1
        self.assertEqual(opener.open(sealed[13]), b"13")  # counter 14: epoch 0, in the window

    def test_a_datagram_claiming_a_far_epoch_costs_no_key(self):
        sealer, opener, derive = pair(epoch_size=16, window=8)
        opener.open(bytes(sealer.seal(b"first")))
        calls = len(derive.calls)
        forged = bytearray(sealer.seal(b"x"))
        forged[8:16] = struct.pack("!Q", 16 * 5)
        self.assertIsNone(opener.open(bytes(forged)))
        self.assertEqual(len(derive.calls), calls)

    def test_keys_that_cannot_be_had(self):
        def gone(epoch):
            raise datagram.KeysUnavailable("gone")

        self.assertRaises(datagram.SealerExhausted, Sealer(CHANNEL, gone, 0).seal, b"x")
        sealer, _, _ = pair()
        opener = Opener(CHANNEL, gone, 0)
        self.assertIsNone(opener.open(bytes(sealer.seal(b"x"))))
        self.assertEqual(opener.bad, 1)

    def test_an_epoch_shorter_than_the_window_is_refused(self):
        self.assertRaises(ValueError, Opener, CHANNEL, derive_from(b"k" * 32), 0, epoch_size=8, window=16)


class Sizes(SynchronousTestCase):
    def test_a_datagram_fits_a_1500_byte_path(self):
        self.assertEqual(datagram.room(4) + datagram.OVERHEAD + 28, 1500)
        self.assertEqual(datagram.room(6) + datagram.OVERHEAD + 48, 1500)

    def test_data_runs(self):
        frames = [bytes([i]) * n for i, n in enumerate((100, 600, 700, 3000, 50, 50))]
        payload = wire.encode_frames(frames)
        runs = datagram.data_runs(payload, 1420)
        self.assertEqual([r[0] for r in runs], [0, 3, 4])  # 104+604+704 bytes fit 1420, 3004 goes alone
        for index, start, stop in runs:
            self.assertTrue(stop - start <= 1420 or stop - start == 3004)
        # the runs cover the payload, in order, without a gap
        self.assertEqual([(r[1], r[2]) for r in runs][0][0], 0)
        self.assertEqual(runs[-1][2], len(payload))
        for (_, _, stop), (_, start, _) in zip(runs, runs[1:]):
            self.assertEqual(stop, start)
        rebuilt = [bytes(f) for _, a, b in runs for f in wire.iter_frames(memoryview(payload)[a:b])]
        self.assertEqual(rebuilt, frames)
        self.assertEqual(datagram.data_runs(b"", 1420), [])
