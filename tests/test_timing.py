"""Backoff and keepalive policies."""

import random

from twisted.trial.unittest import SynchronousTestCase

from sevpn import wire
from sevpn.timing import Backoff, Keepalive


class BackoffTests(SynchronousTestCase):
    def test_first_retry_is_immediate(self):
        self.assertLessEqual(Backoff(random=lambda: 1.0)(1), 0.05)

    def test_grows_and_is_capped(self):
        high = Backoff(random=lambda: 1.0)
        delays = [high(n) for n in range(2, 12)]
        self.assertEqual(delays[:4], [0.5, 1.0, 2.0, 4.0])
        self.assertEqual(max(delays), 5.0)
        self.assertEqual(delays[-1], 5.0)

    def test_jitter_within_upper_half(self):
        rng = random.Random(4)
        b = Backoff(random=rng.random)
        for attempt in range(2, 200):
            base = min(5.0, 0.5 * 2 ** (attempt - 2))
            d = b(attempt)
            self.assertTrue(base / 2 <= d <= base, (attempt, d))

    def test_never_gives_up(self):
        self.assertEqual(Backoff(random=lambda: 1.0)(10**6), 5.0)


class KeepaliveTests(SynchronousTestCase):
    def test_interval_range(self):
        rng = random.Random(1)
        k = Keepalive(random=rng.random)
        values = [k.next_interval() for _ in range(1000)]
        self.assertTrue(all(5.0 <= v <= 10.0 for v in values))
        self.assertGreater(max(values) - min(values), 4.5)

    def test_null_packets_about_50_bytes_of_varying_size(self):
        rng = random.Random(2)
        k = Keepalive(random=rng.random)
        sizes = {len(wire.encode_null(0, k.padding())) for _ in range(500)}
        self.assertTrue(all(37 <= s <= 61 for s in sizes), sizes)
        self.assertGreater(len(sizes), 10)

    def test_bad_settings_refused(self):
        self.assertRaises(ValueError, Keepalive, (10, 5))
        self.assertRaises(ValueError, Keepalive, (5, 10), timeout=8)


class TokenBuckets(SynchronousTestCase):
    def test_rate_and_burst(self):
        from sevpn.timing import TokenBucket

        bucket = TokenBucket(rate=2, burst=3, now=0)
        self.assertEqual([bucket.take(0) for _ in range(4)], [True, True, True, False])
        self.assertFalse(bucket.take(0.4))
        self.assertTrue(bucket.take(0.5))  # one token a half second
        self.assertFalse(bucket.take(0.5))
        self.assertEqual(sum(bucket.take(100) for _ in range(10)), 3)  # never more than the burst saved up

    def test_taking_several(self):
        from sevpn.timing import TokenBucket

        bucket = TokenBucket(rate=1000, burst=1500, now=0)
        self.assertTrue(bucket.take(0, 1500))
        self.assertFalse(bucket.take(0.5, 600))  # 500 there: nothing spent
        self.assertTrue(bucket.take(0.5, 500))
