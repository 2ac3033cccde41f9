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


class LoginThrottleTests(SynchronousTestCase):
    def test_blocks_after_repeated_failures_and_doubles(self):
        from sevpn.timing import LoginThrottle

        t = LoginThrottle(allowed=3, window=60, penalty=10, max_penalty=25)
        for i in range(2):
            t.failed("198.51.100.7", i)
        self.assertEqual(t.blocked_for("198.51.100.7", 2), 0)
        t.failed("198.51.100.7", 2)
        self.assertEqual(t.blocked_for("198.51.100.7", 3), 9)
        self.assertEqual(t.blocked_for("203.0.113.9", 3), 0)  # others unaffected
        self.assertEqual(t.blocked_for("198.51.100.7", 12), 0)
        t.failed("198.51.100.7", 12)
        self.assertEqual(t.blocked_for("198.51.100.7", 12), 20)  # doubled
        t.failed("198.51.100.7", 33)
        self.assertEqual(t.blocked_for("198.51.100.7", 33), 25)  # capped
        t.succeeded("198.51.100.7")
        self.assertEqual(t.blocked_for("198.51.100.7", 34), 0)

    def test_old_failures_are_forgotten(self):
        from sevpn.timing import LoginThrottle

        t = LoginThrottle(allowed=2, window=60)
        t.failed("a", 0)
        t.failed("a", 100)
        self.assertEqual(t.blocked_for("a", 100), 0)

    def test_table_is_bounded(self):
        from sevpn.timing import LoginThrottle

        t = LoginThrottle(max_entries=10)
        for i in range(100):
            t.failed(str(i), 0)
        self.assertEqual(len(t._entries), 10)
