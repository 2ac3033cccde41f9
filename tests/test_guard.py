"""Strangers at the door: bounds per address and per user name, and logs that cannot be flooded."""

from twisted.trial.unittest import SynchronousTestCase

from sevpn.guard import Admission, LoginGuard, SourceSummary


class Admissions(SynchronousTestCase):
    def test_one_address_cannot_fill_the_handshake_slots(self):
        admission = Admission(per_address=3, total=10, rate=100, burst=100)
        self.assertEqual([admission.admit("evil", 0) is None for _ in range(5)], [True] * 3 + [False] * 2)
        self.assertIsNone(admission.admit("good", 0))
        self.assertEqual((admission.handshaking, admission.turned_away), (4, 2))
        admission.done("evil")
        self.assertIsNone(admission.admit("evil", 0))

    def test_all_addresses_together_are_bounded(self):
        admission = Admission(per_address=3, total=5, rate=100, burst=100)
        for i in range(5):
            self.assertIsNone(admission.admit(f"a{i}", 0))
        self.assertIn("the hub's limit", admission.admit("a9", 0))

    def test_new_connections_per_second(self):
        admission = Admission(per_address=1000, rate=10, burst=20)
        admitted = sum(admission.admit("evil", t / 17) is None for t in range(17 * 10))  # 17 a second
        self.assertLessEqual(admitted, 20 + 10 * 10)
        self.assertIsNone(admission.admit("other", 10))


class Guessing(SynchronousTestCase):
    def setUp(self):
        self.guard = LoginGuard(allowed=3, window=60, penalty=10, max_penalty=1000, check_rate=100, check_burst=100)

    def fail(self, address, user, now):
        self.assertIsNone(self.guard.begin(address, user, now))
        self.guard.end(address, user, False, now)

    def test_checks_in_progress_count(self):
        """Parallel guesses do not all get a check: those in progress count as failures until done."""
        started = [self.guard.begin("evil", "alice", 0) is None for _ in range(10)]
        self.assertEqual(started, [True] * 3 + [False] * 7)

    def test_a_success_clears_only_its_own_pair(self):
        for _ in range(3):
            self.fail("evil", "alice", 0)
        self.assertIsNone(self.guard.begin("evil", "mallory", 1))  # the guesser's own account
        self.guard.end("evil", "mallory", True, 1)
        self.assertIsNotNone(self.guard.begin("evil", "alice", 2))  # still blocked for alice

    def test_one_guesser_locks_out_nobody_else_behind_the_address(self):
        for _ in range(3):
            self.fail("nat", "alice", 0)
        self.assertIsNotNone(self.guard.begin("nat", "alice", 1))
        self.assertIsNone(self.guard.begin("nat", "bob", 1))
        self.assertIsNone(self.guard.begin("elsewhere", "alice", 1))

    def test_the_penalty_grows(self):
        now = 0.0
        waits = []
        for _ in range(3):
            self.fail("evil", "alice", now)
        for _ in range(7):
            wait = self.guard.begin("evil", "alice", now)
            waits.append(wait)
            now += wait
            self.fail("evil", "alice", now)
        self.assertEqual(waits, [10, 20, 40, 80, 160, 320, 640])
        self.assertEqual(self.guard.begin("evil", "alice", now), 1000)  # capped
        # about how many guesses an hour does that leave? a handful, not hundreds
        guesses, now = 0, 0.0
        guard = LoginGuard(check_rate=100, check_burst=100)
        while now < 3600:
            wait = guard.begin("evil", "alice", now)
            if wait is None:
                guard.end("evil", "alice", False, now)
                guesses += 1
            else:
                now += max(wait, 0.1)
        self.assertLess(guesses, 20)

    def test_quiet_failures_are_forgotten(self):
        for _ in range(2):
            self.fail("a", "alice", 0)
        self.fail("a", "alice", 100)
        self.assertIsNone(self.guard.begin("a", "alice", 100))

    def test_checks_per_address_bound_the_cpu_a_guesser_costs(self):
        guard = LoginGuard(checks_per_address=2, check_rate=1, check_burst=5, max_checks=3)
        started = [guard.begin("evil", f"user{i}", 0) for i in range(5)]
        self.assertEqual([w is None for w in started], [True, True, False, False, False])
        self.assertEqual(started[2], 0.0)  # throttled, not a penalty
        self.assertIsNone(guard.begin("other", "bob", 0))
        self.assertIsNotNone(guard.begin("third", "carol", 0))  # the hub's bound on checks in progress
        for i in range(2):
            guard.end("evil", f"user{i}", False, 0)
        # new checks from that address come at the check rate, whatever the user name
        started = sum(guard.begin("evil", f"x{i}", 10) is None and guard.end("evil", f"x{i}", False, 10) is None
                      for i in range(50))
        self.assertLessEqual(started, 5)

    def test_tables_are_bounded(self):
        guard = LoginGuard(max_entries=100, check_rate=1e9, check_burst=1e9, checks_per_address=1e9,
                           max_checks=1e9)
        for i in range(1000):
            guard.begin(f"10.0.{i // 250}.{i % 250}", "alice", 0)
            guard.end(f"10.0.{i // 250}.{i % 250}", "alice", False, 0)
        self.assertLessEqual(len(guard._pairs), 100)


class Summaries(SynchronousTestCase):
    def test_one_line_per_source_per_interval(self):
        summary = SourceSummary(interval=60)
        logged = [summary.note("evil", t) for t in range(100)]
        self.assertEqual(logged[:2], [True, False])
        self.assertEqual(sum(logged), 2)  # t=0 and t=60
        self.assertTrue(summary.note("other", 5))
        self.assertEqual(summary.due(130), [("evil", 39)])
        self.assertEqual(summary.due(200), [])
