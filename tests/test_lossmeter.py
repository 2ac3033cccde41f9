"""When an auto UDP channel carries: a lossy line, and UDP not slower on trial."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from sevpn.lossmeter import HOLD, HOLD_MAX, MIN_SEGMENTS, SAMPLE_INTERVAL, TRIAL, CarryPolicy, LossMeter


class LossMeterTests(SynchronousTestCase):
    def test_says_nothing_until_enough_was_sent(self):
        meter = LossMeter()
        meter.sample(0, 0)
        meter.sample(100, MIN_SEGMENTS - 1)
        self.assertIsNone(meter.loss())
        self.assertFalse(meter.lossy())

    def test_the_share_retransmitted_over_the_window(self):
        meter = LossMeter(window=2)
        for n in range(4):  # 2 of 1000 for a while, then 10 of 1000
            meter.sample(2 * n if n < 2 else 2 + 10 * (n - 1), 1000 * n)
        self.assertAlmostEqual(meter.loss(), 20 / 2000)
        self.assertTrue(meter.lossy())

    def test_a_clean_line(self):
        meter = LossMeter()
        for n in range(6):
            meter.sample(n, 1000 * n)  # 0.1%
        self.assertFalse(meter.lossy())

    def test_totals_that_go_back_start_over(self):
        meter = LossMeter()
        meter.sample(50, 10000)
        meter.sample(1, 100)  # a new connection
        self.assertIsNone(meter.loss())


class Line:
    """A line seen from a channel: TCP totals and the session's bytes, sampled every couple of seconds."""

    def __init__(self, policy: CarryPolicy, loss: float = 0.01):
        self.policy = policy
        self.loss = loss
        self.now = 0.0
        self.segments = self.retransmitted = self.bytes = 0

    def tcp(self, seconds: float, rate: float) -> bool:
        """TCP carries C{rate} bytes a second for C{seconds}: whether the policy asked for UDP."""
        asked = False
        for _ in range(int(seconds / SAMPLE_INTERVAL)):
            self.now += SAMPLE_INTERVAL
            self.bytes += int(rate * SAMPLE_INTERVAL)
            self.segments += rate * SAMPLE_INTERVAL / 1400
            self.retransmitted += rate * SAMPLE_INTERVAL / 1400 * self.loss
            asked = self.policy.tcp_sample(self.now, int(self.retransmitted), int(self.segments), self.bytes)
            if asked:
                return True
        return asked

    def udp(self, seconds: float, rate: float, start: bool = True):
        """UDP carries C{rate} bytes a second (from now, if C{start}): the verdicts along the way."""
        if start:
            self.policy.carrying(self.now, self.bytes)
        verdicts = []
        for _ in range(int(seconds / SAMPLE_INTERVAL)):
            self.now += SAMPLE_INTERVAL
            self.bytes += int(rate * SAMPLE_INTERVAL)
            verdict = self.policy.udp_sample(self.now, self.bytes)
            if verdict is not None:
                verdicts.append(verdict)
        return verdicts


class CarryPolicyTests(SynchronousTestCase):
    def test_a_clean_line_stays_on_tcp(self):
        line = Line(CarryPolicy(), loss=0.001)
        self.assertFalse(line.tcp(60, 25e6))

    def test_a_lossy_line_where_udp_is_faster_keeps_udp(self):
        policy = CarryPolicy()
        line = Line(policy)
        self.assertTrue(line.tcp(10, 1e6))  # TCP over a lossy line: 8 Mbit/s
        self.assertEqual(line.udp(TRIAL + SAMPLE_INTERVAL, 4e6), [True])
        self.assertAlmostEqual(policy.tcp_rate, 1e6, delta=1e4)
        self.assertAlmostEqual(policy.udp_rate, 4e6, delta=1e4)
        self.assertEqual(line.udp(60, 4e6, start=False), [])  # decided: no more verdicts until TCP carries again

    def test_a_full_line_where_tcp_is_faster_goes_back_and_holds(self):
        policy = CarryPolicy()
        line = Line(policy, loss=0.02)  # TCP filling a rate-limited queue retransmits too
        self.assertTrue(line.tcp(10, 25e6))
        self.assertEqual(line.udp(TRIAL, 15e6), [False])
        policy.restart()
        # held: a lossy TCP does not ask again until the hold is over
        self.assertFalse(line.tcp(HOLD - 2 * SAMPLE_INTERVAL, 25e6))
        self.assertTrue(line.tcp(4 * SAMPLE_INTERVAL, 25e6))

    def test_holds_grow_with_lost_trials_in_a_row_and_reset_after_a_won_one(self):
        policy = CarryPolicy()
        line = Line(policy, loss=0.02)
        holds = []
        for _ in range(6):
            self.assertTrue(line.tcp(1000, 25e6))
            start = line.now
            line.udp(TRIAL, 10e6)
            policy.restart()
            line.tcp(HOLD_MAX * 2, 25e6)  # until it asks again
            holds.append(line.now - start)
        self.assertEqual([round(h / HOLD) for h in holds[:4]], [1, 2, 4, 8])
        self.assertLessEqual(holds[-1], HOLD_MAX + TRIAL + 4 * SAMPLE_INTERVAL)
        line.udp(TRIAL, 50e6)  # won
        policy.restart()
        start = line.now
        self.assertTrue(line.tcp(1000, 25e6))
        self.assertLess(line.now - start, 6 * SAMPLE_INTERVAL)  # no hold after a won trial

    def test_a_flow_that_starts_within_the_window_is_measured_at_its_pace(self):
        # a transfer begins after seconds of quiet: TCP is as fast as it is once it runs, not its average
        policy = CarryPolicy()
        line = Line(policy, loss=0.02)
        line.policy.meter.min_segments = 0
        line.tcp(6, 10)  # quiet (a few probes' worth, lossy)
        self.assertTrue(line.tcp(4, 25e6))
        self.assertAlmostEqual(policy.tcp_rate, 25e6, delta=1e5)
        # and UDP half as fast, even if the transfer ends within the trial, loses it
        self.assertEqual(line.udp(4, 12e6) + line.udp(TRIAL, 0, start=False), [False])

    def test_little_traffic_keeps_udp(self):
        # nothing to compare (a few pings): UDP costs nothing there and spares them TCP's stalls
        line = Line(CarryPolicy(), loss=0.2)
        line.policy.meter.min_segments = 0
        self.assertTrue(line.tcp(10, 1000))
        self.assertEqual(line.udp(TRIAL, 1000), [True])

    def test_carrying_without_a_trial(self):
        # mode always, or after a restart: nothing to decide
        policy = CarryPolicy()
        policy.carrying(0.0, 0)
        self.assertIsNone(policy.udp_sample(100.0, 10 ** 9))
