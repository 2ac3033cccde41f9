"""Busy-polling: a window of spinning after sparse traffic, none under a flow."""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from sevpn import busypoll


class Spinning(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.now = 100.0
        self.poll = busypoll.BusyPoll(self.clock, window=0.0005, monotonic=self.tick)

    def tick(self):
        self.now += 0.00001  # each look at the time is 10 µs of spinning
        return self.now

    def test_sparse_traffic_opens_a_window(self):
        self.poll.activity()
        self.clock.advance(0)
        self.assertGreater(self.poll.turns, 20)  # awake for the window
        self.assertLess(self.poll.turns, 60)  # and not longer

    def test_a_flow_does_not_spin(self):
        self.poll.activity()
        self.clock.advance(0)
        spun = self.poll.turns
        for _ in range(100):  # back to back: 10 µs apart
            self.poll.activity()
            self.clock.advance(0)
        self.assertEqual(self.poll.turns, spun)

    def test_traffic_after_quiet_opens_another(self):
        self.poll.activity()
        self.clock.advance(0)
        spun = self.poll.turns
        self.now += busypoll.QUIET * 2
        self.poll.activity()
        self.clock.advance(0)
        self.assertGreater(self.poll.turns, spun + 20)

    def test_installed_only_by_a_service(self):
        busypoll.uninstall()
        busypoll.activity()  # nothing installed: nothing scheduled
        self.assertEqual(self.clock.getDelayedCalls(), [])
        installed = busypoll.install(self.clock, 0.0005)
        self.addCleanup(busypoll.uninstall)
        installed.monotonic = self.tick
        busypoll.activity()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        busypoll.uninstall()
        self.assertEqual(self.clock.getDelayedCalls(), [])
