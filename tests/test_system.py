"""
System tests: the real hub and real cards (twistd, TAP devices, TLS over
TCP) in network namespaces these tests make.  Skipped, with the reason,
when not root or without /dev/net/tun.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import stat
import subprocess
import time

from twisted.trial.unittest import SkipTest, TestCase

from scripts.netns import BIN, Topology, env, sevpn, transfer, transfer_result, two_cards, wait_for


class SystemTestCase(TestCase):
    """
    One topology per class, shared by its tests (trial has no
    setUpClass): made before the first test, removed after the last one
    (also when tests fail), or at exit.
    """

    hosts = 2
    timeout = 300
    topo = None
    #: Extra flags for every card (the suite runs with offload on and off).
    card_args = ()

    def setUp(self):
        cls = type(self)
        if "_remaining" not in cls.__dict__:
            cls._remaining = len([n for n in dir(cls) if n.startswith("test_")])
            cls._error = None
            try:
                topo = cls.make_topology()
            except SkipTest:
                raise
            except BaseException as e:
                cls._error = e
                raise
            atexit.register(topo.close)
            try:
                cls.start(topo)
            except BaseException as e:
                topo.close()
                cls._error = e
                raise
            cls.topo = topo
        if cls._error is not None:
            raise AssertionError(f"the topology could not be set up: {cls._error}")
        self.addCleanup(self._done)

    def _done(self):
        cls = type(self)
        cls._remaining -= 1
        if cls._remaining == 0 and cls.topo is not None:
            cls.topo.close()

    @classmethod
    def make_topology(cls) -> Topology:
        return Topology(cls.hosts)

    @classmethod
    def start(cls, topo):
        raise NotImplementedError


class Core(SystemTestCase):
    """Issue: the working core.  Two cards on DEFAULT, one on OTHER."""

    hosts = 5

    @classmethod
    def start(cls, topo):
        topo.add_user("u1")
        topo.add_user("u2")
        topo.add_user("u3", hub="OTHER")
        topo.add_user("u4")
        topo.start_hub()
        for i in (1, 2):
            topo.start_card(i, extra=cls.card_args)
        topo.start_card(3, hub_name="OTHER", extra=cls.card_args)
        for i in (1, 2, 3):
            topo.wait_connected(i)

    def test_ping_both_ways(self):
        self.topo.ping(1, 2)
        self.topo.ping(2, 1)

    def test_tcp_transfer_arrives_intact(self):
        result, expected = transfer_result(self.topo, *transfer(self.topo, 1, 2, 20))
        self.assertIsNone(result["error"])
        self.assertEqual(result["bytes"], 20 << 20)
        self.assertEqual(result["sha256"], expected)

    def test_other_virtual_hub_receives_nothing(self):
        topo = self.topo
        rx = lambda i: int(topo.run(topo.host(i), "cat", "/sys/class/net/sv0/statistics/rx_packets"))  # noqa
        before2 = rx(2)
        topo.ping(1, 2, count=5)
        subprocess.run(["ip", "netns", "exec", topo.host(1), "ping", "-b", "-c", "3", "-i", "0.2",
                        f"192.168.{topo.subnet}.255"], capture_output=True, timeout=30)
        self.assertGreater(rx(2), before2 + 5)  # unicast and broadcasts reached card 2
        self.assertEqual(rx(3), 0)  # card 3, on OTHER, got not one frame
        macs = json.loads(sevpn("hub", "macs", "--json", "--state-dir", topo.hub_state).stdout)
        card_macs = {topo.card_status(i)["mac"] for i in (1, 2)}
        self.assertTrue(card_macs <= {m["mac"] for m in macs["DEFAULT"]["macs"]})
        self.assertFalse(card_macs & {m["mac"] for m in macs["OTHER"]["macs"]})

    def test_hub_shows_sessions(self):
        sessions = self.topo.hub_sessions()
        self.assertEqual(sorted((s["user"], s["hub"]) for s in sessions if s["user"] != "u4"),
                         [("u1", "DEFAULT"), ("u2", "DEFAULT"), ("u3", "OTHER")])
        human = sevpn("hub", "sessions", "--state-dir", self.topo.hub_state).stdout
        self.assertIn("u3", human)

    def test_wrong_password_gets_no_session(self):
        topo = self.topo
        bad = os.path.join(topo.dir, "wrong-password")
        with open(bad, "w") as f:
            f.write("not the password\n")
        topo.start_card(4, user="u4", password_file=bad, extra=self.card_args)
        status = wait_for(lambda: (lambda s: s if s["state"] == "refused" else None)(topo.card_status(4)), 30,
                          "card 4 to be refused")
        self.assertIn("user name or password is wrong", status["last_error"])
        self.assertEqual(topo.carrier(4), "0")
        self.assertIn("refused user u4", topo.log("card4"))
        self.assertIn("refused 'u4'", topo.log("hub"))
        self.assertNotIn("u4", [s["user"] for s in topo.hub_sessions()])

    def test_unverifiable_hub_is_refused(self):
        topo = self.topo
        topo.start_card(5, user="u1", extra=("--server-name", "impostor.example") + self.card_args)
        status = wait_for(lambda: (lambda s: s if s["last_error"] else None)(topo.card_status(5)), 30,
                          "card 5 to report the certificate problem")
        self.assertIn("certificate", status["last_error"].lower() + topo.log("card5").lower())
        self.assertEqual(status["state"], "connecting")
        self.assertEqual(topo.carrier(5), "0")
        self.assertNotIn("Traceback", topo.log("card5"))


class CoreNoOffload(Core):
    """The same, with cards that open their TAP without kernel offload."""

    card_args = ("--no-offload",)


class MixedOffload(SystemTestCase):
    """A card with kernel offload and one without: the hub segments for the latter."""

    @classmethod
    def start(cls, topo):
        topo.add_user("u1")
        topo.add_user("u2")
        topo.start_hub()
        topo.start_card(1)
        topo.start_card(2, extra=("--no-offload",))
        for i in (1, 2):
            topo.wait_connected(i)

    def test_transfers_both_ways(self):
        topo = self.topo
        topo.ping(1, 2)
        self.assertEqual([topo.card_status(i)["offload"] for i in (1, 2)], [True, False])
        for src, dst in ((1, 2), (2, 1)):
            result, expected = transfer_result(topo, *transfer(topo, src, dst, 20))
            self.assertIsNone(result["error"])
            self.assertEqual(result["sha256"], expected, (src, dst))
        self.assertEqual(sum(s["bad_frames"] for s in topo.hub_sessions()), 0)


class CardLife(SystemTestCase):
    """The card's life on a real line: its own MAC, no carrier until connected, reconnecting, keepalive."""

    @classmethod
    def start(cls, topo):
        topo.add_user("u1")
        topo.add_user("u2")
        topo.start_hub()
        topo.start_card(2)
        topo.wait_connected(2)

    def test_a_carrier_and_the_connection_manager(self):
        topo = self.topo
        topo.start_card(1, connect=False)
        self.assertEqual(topo.carrier(1), "0")
        self.assertIn("NO-CARRIER", topo.run(topo.host(1), "ip", "link", "show", "sv0"))
        self.assertEqual(topo.card_status(1)["state"], "disconnected")
        state = topo.card_state(1)
        sevpn("account", "add", "office", "--state-dir", state, "--hub", f"{topo.hub_addr(1)}:5555",
              "--user", "u1", "--password-file", os.path.join(topo.dir, "password"),
              "--ca-file", os.path.join(topo.hub_state, "ca.pem"))
        path = os.path.join(state, "accounts", "office.json")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        listed = json.loads(sevpn("account", "list", "--json", "--state-dir", state).stdout)
        self.assertEqual([a["name"] for a in listed], ["office"])
        self.assertNotIn("password", listed[0])
        sevpn("nic", "connect", "office", "--state-dir", state)
        status = topo.wait_connected(1)
        self.assertEqual(topo.carrier(1), "1")
        self.assertEqual(status["account"], "office")
        self.assertIn(f"connected to hub DEFAULT at {topo.hub_addr(1)}:5555 as u1", topo.log("card1"))
        topo.ping(1, 2)
        sevpn("nic", "disconnect", "--state-dir", state)
        self.assertEqual(topo.carrier(1), "0")
        self.assertEqual(topo.card_status(1)["state"], "disconnected")
        self.assertFalse(topo.ping(1, 2, count=2, check=False))
        time.sleep(2)
        self.assertEqual(topo.card_status(1)["state"], "disconnected")  # no retrying
        sevpn("nic", "connect", "office", "--state-dir", state)
        topo.wait_connected(1)
        self.assertEqual(topo.carrier(1), "1")
        topo.ping(1, 2)

    def test_b_mac_survives_restart(self):
        topo = self.topo
        mac = topo.card_status(2)["mac"]
        topo.stop(topo.cards[2])
        topo.start_card(2)
        topo.wait_connected(2)
        self.assertEqual(topo.card_status(2)["mac"], mac)
        self.assertIn(f"link/ether {mac}", topo.run(topo.host(2), "ip", "link", "show", "sv0"))

    def test_c_hub_restart_while_pinging(self):
        topo = self.topo
        topo.wait_connected(1)
        ping = subprocess.Popen(["ip", "netns", "exec", topo.host(1), "ping", "-i", "0.2", "-c", "75", "-W", "1",
                                 topo.tap_addr(2)], stdout=subprocess.PIPE, text=True)
        try:
            time.sleep(2)
            topo.stop(topo.hub_proc)
            time.sleep(2)
            topo.start_hub()
            for i in (1, 2):
                topo.wait_connected(i, timeout=30)
            out, _ = ping.communicate(timeout=60)
        finally:
            if ping.poll() is None:
                ping.kill()
        replies = [int(n) for n in re.findall(r"icmp_seq=(\d+)", out)]
        self.assertTrue(any(n < 10 for n in replies), out)
        self.assertTrue(any(n > 60 for n in replies), out)  # it resumed by itself
        self.assertIn("closed the session", topo.log("card1"))
        self.assertGreaterEqual(topo.card_status(1)["reconnects"], 1)

    def test_d_bad_mac_is_refused_with_a_sentence(self):
        result = subprocess.run(
            [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "sevpn-nic", "--mac", "01:00:5e:00:00:01"],
            capture_output=True, text=True, env=env(), timeout=60,
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("multicast", result.stdout + result.stderr)
        self.assertNotIn("Traceback", result.stdout + result.stderr)


def cut(topo, i: int, seconds: float, hub_side: bool) -> None:
    """A line failure: the card host's link goes down and its TCP dies."""
    host = topo.host(i)
    topo.run(host, "ip", "link", "set", "eth0", "down")
    topo.run(host, "ss", "-K", "dst", topo.hub_addr(i), check=False)
    if hub_side:
        topo.run(topo.hub_ns, "ss", "-K", "dst", topo.host_addr(i), check=False)
    time.sleep(seconds)
    topo.run(host, "ip", "link", "set", "eth0", "up")


class Resumption(SystemTestCase):
    """Issue: session resumption; a short outage loses not one frame."""

    @classmethod
    def start(cls, topo):
        two_cards(topo, card_args=cls.card_args)

    def test_transfer_survives_three_cuts(self):
        topo = self.topo
        topo.ping(1, 2)
        session = topo.card_status(1)["session"]
        ping = subprocess.Popen(["ip", "netns", "exec", topo.host(1), "ping", "-i", "0.2", "-W", "1",
                                 topo.tap_addr(2)], stdout=subprocess.PIPE, text=True)
        run = transfer(topo, 1, 2, 50, rate=2 << 20)  # still flowing at the third cut
        try:
            time.sleep(2)
            for n, (seconds, hub_side) in enumerate(((1, False), (5, False), (20, True)), 1):
                cut(topo, 1, seconds, hub_side=hub_side)
                # one cut, one resume: the next cut comes after this one healed
                wait_for(lambda n=n: topo.card_status(1)["resumes"] >= n, 30, f"resume {n}")
                time.sleep(1)
            result, expected = transfer_result(topo, *run)
        finally:
            ping.terminate()
        ping.communicate(timeout=10)
        self.assertIsNone(result["error"])  # the TCP connection was never reset
        self.assertEqual(result["bytes"], 50 << 20)
        self.assertEqual(result["sha256"], expected)
        status = topo.wait_connected(1)
        self.assertEqual(status["session"], session)
        self.assertEqual(status["resumes"], 3)
        self.assertEqual(status["frames_dropped"], 0)
        [hub_side] = [s for s in topo.hub_sessions() if s["id"] == session]
        self.assertEqual(hub_side["resumes"], 3)
        self.assertEqual(hub_side["frames_dropped"], 0)
        self.assertEqual(topo.carrier(1), "1")
        self.assertIn("resumed session", topo.log("card1"))


class ResumptionNoOffload(Resumption):
    card_args = ("--no-offload",)


class ResumeWindow(SystemTestCase):
    """After the (here shortened) window: cable unplugged, a fresh session."""

    @classmethod
    def start(cls, topo):
        two_cards(topo, hub_args=("--resume-window", "3"), card_args=("--resume-window", "3"))

    def test_long_cut_ends_the_session(self):
        topo = self.topo
        topo.ping(1, 2)
        before = topo.card_status(1)
        macs = lambda: {m["mac"] for m in json.loads(  # noqa: E731
            sevpn("hub", "macs", "--json", "--state-dir", topo.hub_state).stdout)["DEFAULT"]["macs"]}
        self.assertIn(before["mac"], macs())
        host = topo.host(1)
        topo.run(host, "ip", "link", "set", "eth0", "down")
        topo.run(host, "ss", "-K", "dst", topo.hub_addr(1), check=False)
        topo.run(topo.hub_ns, "ss", "-K", "dst", topo.host_addr(1), check=False)
        try:
            wait_for(lambda: topo.carrier(1) == "0", 15, "the carrier to drop after the window")
            wait_for(lambda: before["session"] not in [s["id"] for s in topo.hub_sessions()], 15,
                     "the hub to end the session")
            self.assertNotIn(before["mac"], macs())
        finally:
            topo.run(host, "ip", "link", "set", "eth0", "up")
        after = topo.wait_connected(1)
        self.assertNotEqual(after["session"], before["session"])
        self.assertEqual(topo.carrier(1), "1")
        topo.ping(1, 2)
        self.assertIn("could not resume within 3 s", topo.log("card1"))


class IPv6Underlay(SystemTestCase):
    """
    Hub and cards that reach each other over IPv6 only: the hub on its
    default listening address, one card dialling an IPv6 literal, one a
    host name that has only an IPv6 address.
    """

    @classmethod
    def start(cls, topo):
        cls.v6 = {}
        for i in (1, 2):
            hub_side = f"{topo.tag}v{i}"[-15:]
            hub6, host6 = f"fd{topo.subnet:02x}:{i}::1", f"fd{topo.subnet:02x}:{i}::2"
            cls.v6[i] = hub6
            topo.ip("-n", topo.hub_ns, "addr", "flush", "dev", hub_side, "scope", "global")
            topo.ip("-n", topo.host(i), "addr", "flush", "dev", "eth0", "scope", "global")
            topo.ip("-n", topo.hub_ns, "addr", "add", f"{hub6}/64", "dev", hub_side, "nodad")
            topo.ip("-n", topo.host(i), "addr", "add", f"{host6}/64", "dev", "eth0", "nodad")
        # a name with only an IPv6 address, as the card's resolver sees it
        cls.hosts_dir = f"/etc/netns/{topo.host(2)}"
        os.makedirs(cls.hosts_dir, exist_ok=True)
        with open(os.path.join(cls.hosts_dir, "hosts"), "w") as f:
            f.write(f"{cls.v6[2]} hub6.sevpn.test\n")
        topo.add_user("u1")
        topo.add_user("u2")
        topo.start_hub("--hostname", cls.v6[1], "--hostname", "hub6.sevpn.test", listen=None)
        topo.start_card(1, hub=f"[{cls.v6[1]}]:5555")
        topo.start_card(2, hub="hub6.sevpn.test:5555")
        for i in (1, 2):
            topo.wait_connected(i)

    def _done(self):
        if type(self)._remaining == 1:
            import shutil

            shutil.rmtree(type(self).hosts_dir, ignore_errors=True)
        super()._done()

    def test_cards_talk_over_an_ipv6_only_underlay(self):
        topo = self.topo
        self.assertNotIn("inet ", topo.run(topo.host(1), "ip", "-4", "addr", "show", "dev", "eth0"))
        topo.ping(1, 2)
        result, expected = transfer_result(topo, *transfer(topo, 1, 2, 5))
        self.assertEqual(result["sha256"], expected)
        peers = sorted(s["peer"] for s in topo.hub_sessions())
        self.assertTrue(all(p.startswith("[fd") for p in peers), peers)
