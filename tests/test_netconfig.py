"""
The card's interface (L{sevpn.netconfig}): parsing and merging settings,
the C{ip} commands, when they run and what is logged, the DHCP client's
life on a fake runner and clock; the process runner on real programs;
the card's options and accounts carrying the settings.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sevpn.accounts import Account, AccountStore
from sevpn.netconfig import (
    CardInterface, CommandFailed, ConfigError, DhcpClient, InterfaceConfig, ProcessRunner, parse_address,
)
from sevpn.nictap import Options as CardOptions
from sevpn.users import StateError


class ParsingTests(SynchronousTestCase):
    def test_addresses(self):
        config = InterfaceConfig.parse(["192.168.30.2/24", "fd00::2/64", "192.168.30.2/24"], 1400, True)
        self.assertEqual([str(a) for a in config.addresses], ["192.168.30.2/24", "fd00::2/64"])
        self.assertEqual((config.mtu, config.dhcp), (1400, True))

    def test_sentences(self):
        for text, words in [
            ("192.168.30.2", "give the prefix length too"),
            ("300.1.1.1/24", "not an IPv4 or IPv6 address"),
            ("224.0.0.5/4", "multicast"),
            ("::1/128", "loopback"),
        ]:
            with self.assertRaises(ConfigError) as caught:
                parse_address(text)
            self.assertIn(words, str(caught.exception))
            self.assertTrue(str(caught.exception).startswith(f"--address {text}"))

    def test_mtu(self):
        for mtu in (67, 65522, True):
            self.assertRaises(ConfigError, InterfaceConfig.parse, [], mtu)
        with self.assertRaises(ConfigError) as caught:
            InterfaceConfig.parse(["fd00::2/64"], 1000)
        self.assertIn("IPv6 addresses need an MTU of at least 1280", str(caught.exception))
        self.assertEqual(InterfaceConfig.parse(["10.0.0.1/8"], 576).mtu, 576)

    def test_an_accounts_settings_join_the_cards(self):
        card = InterfaceConfig.parse(["10.0.0.2/24"], 1400)
        account = InterfaceConfig.parse(["10.0.0.2/24", "10.9.0.2/16"], None, True)
        merged = card.merged(account)
        self.assertEqual([str(a) for a in merged.addresses], ["10.0.0.2/24", "10.9.0.2/16"])
        self.assertEqual((merged.mtu, merged.dhcp), (1400, True))
        self.assertEqual(card.merged(InterfaceConfig.parse([], 1300)).mtu, 1300)

    def test_commands(self):
        config = InterfaceConfig.parse(["10.0.0.2/24", "fd00::2/64"], 1400)
        old = InterfaceConfig.parse(["10.0.0.2/24", "10.5.0.2/24"]).addresses
        self.assertEqual(config.commands("tb0", drop=old), [
            ["ip", "link", "set", "dev", "tb0", "mtu", "1400"],
            ["ip", "addr", "del", "10.5.0.2/24", "dev", "tb0"],
            ["ip", "addr", "replace", "10.0.0.2/24", "dev", "tb0"],
            ["ip", "addr", "replace", "fd00::2/64", "dev", "tb0"],
        ])


class FakeRunner:
    """Records commands; those in C{failing} fail with a sentence, the rest succeed at once."""

    def __init__(self, failing=()):
        self.ran = []
        self.failing = set(failing)
        self.spawned = []
        self.pending = {}

    def run(self, argv):
        self.ran.append(list(argv))
        if argv[-3] in self.failing or " ".join(argv) in self.failing:
            return defer.fail(CommandFailed(f"'{' '.join(argv)}' failed: RTNETLINK answers: Invalid argument"))
        if argv[-1] in self.pending:
            return self.pending[argv[-1]]
        return defer.succeed("")

    def spawn(self, protocol, argv):
        process = FakeProcess(protocol)
        self.spawned.append((list(argv), process))
        return process


class FakeProcess:
    def __init__(self, protocol):
        self.protocol = protocol
        self.signals = []

    def signalProcess(self, name):
        self.signals.append(name)


class FakeDhcp:
    def __init__(self):
        self.started = 0
        self.stopped = 0

    def start(self):
        self.started += 1

    def stop(self):
        self.stopped += 1
        return defer.succeed(None)

    def describe(self):
        return {"state": "fake"}


class CardInterfaceTests(SynchronousTestCase):
    def setUp(self):
        self.runner = FakeRunner(failing={"10.6.0.2/24"})
        self.dhcp = FakeDhcp()
        self.interface = CardInterface("tb0", self.runner, lambda: self.dhcp)
        self.logged = []
        from twisted.logger import globalLogPublisher

        observer = lambda event: self.logged.append(event)  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def sentences(self):
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.logged if e.get("log_namespace", "").startswith("sevpn.netconfig")]

    def test_settings_run_in_order_and_say_so(self):
        self.interface.configure(InterfaceConfig.parse(["10.0.0.2/24"], 1400))
        self.assertEqual(self.runner.ran, [
            ["ip", "link", "set", "dev", "tb0", "mtu", "1400"], ["ip", "addr", "replace", "10.0.0.2/24", "dev", "tb0"]])
        self.assertEqual(self.sentences(), ["card tb0: 10.0.0.2/24, MTU 1400 set"])

    def test_a_failure_is_a_sentence_and_the_rest_still_runs(self):
        self.interface.configure(InterfaceConfig.parse(["10.6.0.2/24", "10.7.0.2/24"]))
        self.assertEqual(len(self.runner.ran), 2)
        self.assertEqual(self.interface.status()["errors"], [
            "card tb0: cannot configure the interface: 'ip addr replace 10.6.0.2/24 dev tb0' failed: "
            "RTNETLINK answers: Invalid argument"])
        self.assertEqual(self.sentences(), self.interface.status()["errors"])

    def test_only_its_own_addresses_are_removed(self):
        self.interface.configure(InterfaceConfig.parse(["10.0.0.2/24", "10.1.0.2/24"]))
        self.runner.ran = []
        self.interface.configure(InterfaceConfig.parse(["10.0.0.2/24"]))
        self.assertEqual(self.runner.ran, [
            ["ip", "addr", "del", "10.1.0.2/24", "dev", "tb0"], ["ip", "addr", "replace", "10.0.0.2/24", "dev", "tb0"]])

    def test_dhcp_waits_for_the_carrier_and_is_released_at_stop(self):
        self.interface.configure(InterfaceConfig.parse([], None, True))
        self.assertEqual(self.dhcp.started, 0)
        self.interface.carrier_changed(True)
        self.assertEqual(self.dhcp.started, 1)
        self.interface.carrier_changed(False)
        self.interface.carrier_changed(True)
        self.assertEqual(self.dhcp.started, 2)  # start() of a running client is a no-op (DhcpClientTests)
        self.successResultOf(self.interface.stop())
        self.assertEqual(self.dhcp.stopped, 1)

    def test_no_dhcp_without_asking(self):
        self.interface.configure(InterfaceConfig.parse(["10.0.0.2/24"]))
        self.interface.carrier_changed(True)
        self.assertEqual(self.dhcp.started, 0)
        self.successResultOf(self.interface.stop())
        self.assertEqual(self.dhcp.stopped, 0)

    def test_an_account_without_dhcp_stops_it(self):
        self.interface.carrier_changed(True)
        self.interface.configure(InterfaceConfig.parse([], None, True))
        self.assertEqual(self.dhcp.started, 1)
        self.interface.configure(InterfaceConfig())
        self.assertEqual(self.dhcp.stopped, 1)


class DhcpClientTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.runner = FakeRunner()
        self.client = DhcpClient("tb0", "/state", self.runner, self.clock)

    def test_runs_as_a_child_with_its_files_in_the_state_dir(self):
        self.client.start()
        self.client.start()
        self.assertEqual([argv for argv, _ in self.runner.spawned], [
            ["dhclient", "-d", "-pf", "/state/dhclient.tb0.pid", "-lf", "/state/dhclient.tb0.leases", "tb0"]])
        self.assertEqual(self.client.describe()["state"], "running")

    def test_the_lease(self):
        self.client.start()
        protocol = self.runner.spawned[0][1].protocol
        protocol.errReceived(b"DHCPACK of 10.77.0.120 from 10.77.0.1\nbound to 10.77.0.120 -- renew")
        protocol.errReceived(b"al in 1632 seconds.\n")
        self.assertEqual(self.client.describe(), {"state": "bound", "address": "10.77.0.120", "error": None})

    def test_stop_releases_and_waits_for_the_client(self):
        self.client.start()
        [(argv, process)] = self.runner.spawned
        done = self.client.stop()
        self.assertEqual(self.runner.ran[-1][:2], ["dhclient", "-r"])
        self.assertNoResult(done)  # the release ran; the client must still end
        self.assertEqual(process.signals, ["TERM"])
        process.protocol.processEnded(_Ended(0))
        self.successResultOf(done)
        self.assertEqual(self.client.describe()["state"], "stopped")

    def test_a_release_that_hangs_does_not_hold_the_card(self):
        self.client.start()
        [(argv, process)] = self.runner.spawned
        self.runner.pending["tb0"] = defer.Deferred()
        done = self.client.stop()
        self.clock.advance(5)
        self.assertEqual(process.signals, ["TERM"])
        self.clock.advance(2)
        self.assertEqual(process.signals, ["TERM", "KILL"])
        self.successResultOf(done)

    def test_a_client_that_exits_by_itself_is_reported(self):
        self.client.start()
        self.runner.spawned[0][1].protocol.processEnded(_Ended(2))
        self.assertEqual(self.client.describe()["error"], "the DHCP client exited (status 2)")
        self.successResultOf(self.client.stop())


class _Ended:
    def __init__(self, code):
        self.value = type("Ended", (), {"exitCode": code})()


class ProcessRunnerTests(TestCase):
    def setUp(self):
        from twisted.internet import reactor

        self.runner = ProcessRunner(reactor)

    @defer.inlineCallbacks
    def test_output(self):
        self.assertEqual((yield self.runner.run(["echo", "hello"])), "hello\n")

    @defer.inlineCallbacks
    def test_failure_is_a_sentence_with_the_last_error_line(self):
        with self.assertRaises(CommandFailed) as caught:
            yield self.runner.run(["sh", "-c", "echo first >&2; echo 'Cannot find device \"tb9\"' >&2; exit 1"])
        self.assertEqual(str(caught.exception),
                         "'sh -c echo first >&2; echo 'Cannot find device \"tb9\"' >&2; exit 1' failed: "
                         "Cannot find device \"tb9\"")

    @defer.inlineCallbacks
    def test_missing_program(self):
        with self.assertRaises(CommandFailed) as caught:
            yield self.runner.run(["no-such-program-tb", "x"])
        self.assertEqual(str(caught.exception), "the no-such-program-tb command is not installed")


class CardOptionTests(SynchronousTestCase):
    def parse(self, *args):
        options = CardOptions()
        options.parseOptions(list(args))
        return options

    def test_interface_options(self):
        options = self.parse("--address", "10.0.0.2/24", "--address", "fd00::2/64", "--mtu", "1400", "--dhcp")
        self.assertEqual(options["interface"], InterfaceConfig.parse(["10.0.0.2/24", "fd00::2/64"], 1400, True))

    def test_sentences_before_anything_is_touched(self):
        for args, words in [
            (["--tap", "tb-a-very-long-name"], "--tap 'tb-a-very-long-name' must be 1 to 15 characters"),
            (["--address", "10.0.0.2"], "--address 10.0.0.2: give the prefix length too"),
            (["--mtu", "20"], "--mtu 20: an MTU is 68 to 65521 bytes"),
        ]:
            with self.assertRaises(usage.UsageError) as caught:
                self.parse(*args)
            self.assertIn(words, str(caught.exception))


class AccountTests(SynchronousTestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.store = AccountStore(self.dir)

    def test_an_old_account_file_loads_without_interface_settings(self):
        os.makedirs(os.path.join(self.dir, "accounts"))
        with open(os.path.join(self.dir, "accounts", "office.json"), "w") as f:
            json.dump({"name": "office", "hub": "vpn:5555", "user": "alice", "password": "pw", "ca_file": "/ca.pem",
                       "hub_name": "DEFAULT", "server_name": None, "auto_reconnect": True}, f)
        account = self.store.get("office")
        self.assertEqual(account.interface(), InterfaceConfig())

    def test_interface_settings_are_kept(self):
        self.store.save(Account("home", "vpn:5555", "alice", "pw", "/ca.pem", address=["10.0.0.2/24"], mtu=1400,
                                dhcp=True))
        self.assertEqual(self.store.get("home").interface(), InterfaceConfig.parse(["10.0.0.2/24"], 1400, True))

    def test_a_bad_address_is_a_sentence(self):
        with self.assertRaises(StateError) as caught:
            Account("home", "vpn:5555", "alice", "pw", "/ca.pem", address=["10.0.0.2"])
        self.assertIn("account home: address 10.0.0.2: give the prefix length too", str(caught.exception))
