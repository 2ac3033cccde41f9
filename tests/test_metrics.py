"""
The hub's metrics against a hub with cards in memory, on a fake clock:
what a scrape shows after traffic, outages, refusals and floods, in the
Prometheus text format a scraper parses.
"""

from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from sevpn import card as card_states
from sevpn import wire
from sevpn.defaults import MAX_SESSIONS
from sevpn.metrics import read_hub, registry_for
from sevpn.port import Port
from tests.support import BROADCAST, Lab, overflow_during_outage, RawFactory, frame, mac, payloads


class Bridge(Port):
    """A port that is not a session (as a bridge is): records what it is sent."""

    def __init__(self, clock, name="bridge:eth9"):
        super().__init__(name, clock)
        self.written = []

    def transmit(self, frames):
        self.written.extend(bytes(f) for f in frames)

    def sends(self, frames):
        self.sink.forward(self, frames)
        self.sink.flush(self)


class Scrape:
    """One scrape, parsed back from the text format."""

    def __init__(self, lab):
        registry = registry_for(lambda: read_hub(lab.hub, lab.network.server_factory))
        self.text = generate_latest(registry).decode("utf-8")
        self.samples = [s for family in text_string_to_metric_families(self.text) for s in family.samples]

    def series(self, name, **labels):
        """Every sample of C{name} whose labels include C{labels}."""
        return [s for s in self.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]

    def value(self, name, **labels):
        [sample] = self.series(name, **labels)
        return sample.value


class Collector(SynchronousTestCase):
    def setUp(self):
        self.lab = Lab(self)

    def session_of(self, user):
        [session] = [s for s in self.lab.hub.sessions.values() if s.user == user]
        return session

    def test_frames_and_bytes_of_each_session_after_traffic(self):
        a, b = self.lab.card(1), self.lab.card(2)
        sent = [frame(BROADCAST, mac(1), b"%d" % i * 30) for i in range(5)]
        a.lan.tap.os_sends(sent)
        b.lan.tap.os_sends([frame(mac(1), mac(2), b"reply")])
        self.lab.network.pump()
        scrape = Scrape(self.lab)
        sid_a = self.session_of("u1").id
        self.assertEqual(scrape.value("sevpn_session_frames_total", user="u1", session=sid_a, direction="in"), 5)
        self.assertEqual(scrape.value("sevpn_session_frames_total", user="u2", direction="out"), 5)
        self.assertEqual(scrape.value("sevpn_session_frames_total", user="u1", direction="out"), 1)
        self.assertEqual(scrape.value("sevpn_session_bytes_total", user="u1", direction="in"),
                         sum(map(len, sent)))
        self.assertEqual(scrape.value("sevpn_session_bytes_total", user="u2", direction="out"),
                         sum(map(len, sent)))
        self.assertEqual(scrape.value("sevpn_session_connected", user="u1", hub="DEFAULT"), 1)
        self.assertEqual(scrape.value("sevpn_sessions", hub="DEFAULT", state="connected"), 2)
        self.assertEqual(scrape.value("sevpn_sessions", hub="DEFAULT", state="held"), 0)
        self.assertEqual(scrape.value("sevpn_session_macs", user="u1"), 1)

    def test_switch_counters_and_mac_table(self):
        a, b = self.lab.card(1), self.lab.card(2)
        b.lan.tap.os_sends([frame(BROADCAST, mac(2))])
        self.lab.network.pump()
        a.lan.tap.os_sends([frame(mac(2), mac(1)), frame(mac(2), mac(1))])
        self.lab.network.pump()
        bridge = Bridge(self.lab.clock)
        self.lab.hub.vhub("DEFAULT").add_port(bridge)
        bridge.sends([b"runt"])
        scrape = Scrape(self.lab)
        self.assertEqual(scrape.value("sevpn_switch_frames_total", hub="DEFAULT", path="flooded"), 1)
        self.assertEqual(scrape.value("sevpn_switch_frames_total", hub="DEFAULT", path="unicast"), 2)
        self.assertEqual(scrape.value("sevpn_switch_dropped_frames_total", hub="DEFAULT", cause="runt"), 1)
        self.assertEqual(scrape.value("sevpn_mac_table_entries", hub="DEFAULT"), 2)
        self.assertEqual(scrape.value("sevpn_mac_table_limit", hub="DEFAULT"), 2 * MAX_SESSIONS)  # room for twice the sessions

    def test_mac_limit_and_conflict_drops(self):
        a, b = self.lab.card(1), self.lab.card(2)
        self.lab.hub.vhub("DEFAULT").max_macs_per_port = 2
        a.lan.tap.os_sends([frame(BROADCAST, mac(n)) for n in (1, 11, 12)])  # the third MAC is one too many
        b.lan.tap.os_sends([frame(BROADCAST, mac(1))])  # a's MAC, from b
        self.lab.network.pump()
        scrape = Scrape(self.lab)
        self.assertEqual(scrape.value("sevpn_switch_dropped_frames_total", cause="mac_limit"), 1)
        self.assertEqual(scrape.value("sevpn_switch_dropped_frames_total", cause="mac_conflict"), 1)
        self.assertEqual(scrape.value("sevpn_mac_conflicts_active", hub="DEFAULT"), 1)

    def test_sessions_held_during_an_outage_then_resumed(self):
        a, _ = self.lab.card(1), self.lab.card(2)
        self.lab.network.cut()
        self.lab.network.pump()
        scrape = Scrape(self.lab)
        self.assertEqual(scrape.value("sevpn_sessions", hub="DEFAULT", state="held"), 2)
        self.assertEqual(scrape.value("sevpn_sessions", hub="DEFAULT", state="connected"), 0)
        self.assertEqual(scrape.value("sevpn_session_connected", user="u1"), 0)
        self.lab.network.restore()
        self.lab.network.run(5, step=0.5)
        self.assertEqual(a.state, card_states.CONNECTED)
        scrape = Scrape(self.lab)
        self.assertEqual(scrape.value("sevpn_sessions", hub="DEFAULT", state="connected"), 2)
        self.assertEqual(scrape.value("sevpn_session_resumes_total", user="u1"), 1)

    def test_frames_lost_from_the_hubs_resume_buffer_and_resent(self):
        """While a card is away the hub holds its frames; past the buffer it loses the oldest."""
        lab = Lab(self, buffer_limit=4096)
        a = lab.card(1)
        bridge = Bridge(lab.clock)
        lab.hub.vhub("DEFAULT").add_port(bridge)
        a.lan.tap.os_sends([frame(BROADCAST, mac(1))])
        lab.network.pump()
        lab.network.cut()
        for i in range(40):
            bridge.sends([frame(mac(1), mac(9), b"%05d" % i + b"x" * 500)])
        lab.network.restore()
        lab.network.run(3)
        got = len(payloads(a.lan.tap, mac(1)))
        scrape = Scrape(lab)
        dropped = scrape.value("sevpn_session_dropped_frames_total", user="u1", cause="resume_buffer")
        self.assertGreater(dropped, 0)
        self.assertEqual(got + dropped, 40)
        self.assertEqual(scrape.value("sevpn_session_retransmitted_frames_total", user="u1"), got)
        self.assertEqual(scrape.value("sevpn_session_resumes_total", user="u1"), 1)

    def test_frames_the_card_lost_are_counted_inbound(self):
        lab = Lab(self, buffer_limit=4096)
        a, b = lab.card(1), lab.card(2)
        overflow_during_outage(lab, a, b)
        lost = Scrape(lab).value("sevpn_session_dropped_frames_total", user="u1", cause="lost_inbound")
        self.assertGreater(lost, 0)
        self.assertEqual(lost, a.status()["frames_dropped"])

    def test_congestion_drops(self):
        from sevpn.port import STALL_TIME

        a, b = self.lab.card(1), self.lab.card(2)
        b.lan.tap.os_sends([frame(BROADCAST, mac(2))])
        self.lab.network.pump()
        self.session_of("u2").link.pauseProducing()  # b stops reading
        a.lan.tap.os_sends([frame(mac(2), mac(1), b"to b")])
        self.lab.network.pump()
        self.lab.network.run(STALL_TIME * 2)
        a.lan.tap.os_sends([frame(mac(2), mac(1), b"dropped")])
        self.lab.network.pump()
        scrape = Scrape(self.lab)
        self.assertEqual(scrape.value("sevpn_session_dropped_frames_total", user="u2", cause="congestion"), 1)
        self.assertEqual(scrape.value("sevpn_session_dropped_frames_total", user="u1", cause="congestion"), 0)

    def test_refusals_by_reason(self):
        self.lab.user("alice", "right")
        self.lab.card(1, user="alice", password="wrong")
        raw = RawFactory()
        self.lab.network.connect(raw)
        self.lab.network.connections[-1].ct.write(
            wire.encode(wire.HELLO, wire.MAGIC + b'\x01{"hub": "DEFAULT", "user": "alice"}')  # no password
        )
        self.lab.network.pump()
        self.lab.hub.max_sessions = 0
        self.lab.card(2)
        scrape = Scrape(self.lab)
        self.assertEqual(scrape.value("sevpn_refusals_total", reason="auth-failed"), 1)
        self.assertEqual(scrape.value("sevpn_refusals_total", reason="bad-hello"), 1)
        self.assertEqual(scrape.value("sevpn_refusals_total", reason="hub-full"), 1)
        self.assertEqual(scrape.value("sevpn_refusals_total", reason="throttled"), 0)  # every code, counted or not

    def test_handshakes_in_progress_and_turned_away(self):
        self.lab.network.server_factory.admission.total = 2
        raw = RawFactory()
        for _ in range(3):
            self.lab.network.connect(raw)
        self.lab.network.pump()
        scrape = Scrape(self.lab)
        self.assertEqual(scrape.value("sevpn_handshakes_in_progress"), 2)
        self.assertEqual(scrape.value("sevpn_handshakes_limit"), 2)
        self.assertEqual(scrape.value("sevpn_connections_turned_away_total"), 1)

    def test_a_port_that_is_not_a_session(self):
        self.lab.card(1)
        bridge = Bridge(self.lab.clock)
        self.lab.hub.vhub("DEFAULT").add_port(bridge)
        bridge.sends([frame(BROADCAST, mac(9))])
        self.lab.network.pump()
        scrape = Scrape(self.lab)
        self.assertEqual(scrape.value("sevpn_port_macs", hub="DEFAULT", port="bridge:eth9"), 1)
        self.assertEqual(scrape.value("sevpn_port_dropped_frames_total", port="bridge:eth9", cause="congestion"), 0)
        self.assertEqual(scrape.value("sevpn_session_frames_total", user="u1", direction="out"), 1)
        self.assertEqual(len(scrape.series("sevpn_session_connected")), 1)  # the bridge is no session

    def test_an_ended_sessions_series_go_with_it(self):
        a, _ = self.lab.card(1), self.lab.card(2)
        sid = self.session_of("u1").id
        self.assertEqual(len(Scrape(self.lab).series("sevpn_session_frames_total", session=sid)), 2)
        a.disconnect()
        self.lab.network.pump()
        scrape = Scrape(self.lab)
        self.assertEqual(scrape.series("sevpn_session_frames_total", session=sid), [])
        self.assertEqual(scrape.value("sevpn_sessions", hub="DEFAULT", state="connected"), 1)

    def test_each_virtual_hub_apart(self):
        self.lab.state.create_hub("OTHER")
        self.lab.card(1)
        self.lab.card(3, hub="OTHER")
        scrape = Scrape(self.lab)
        self.assertEqual(scrape.value("sevpn_sessions", hub="OTHER", state="connected"), 1)
        [u3] = scrape.series("sevpn_session_connected", user="u3")
        self.assertEqual(u3.labels["hub"], "OTHER")
        self.assertEqual(scrape.value("sevpn_switch_frames_total", hub="OTHER", path="flooded"), 0)

    def test_resume_memory(self):
        lab = Lab(self)
        lab.hub.budget.limit = 8192
        _, b = lab.card(1), lab.card(2)
        b.lan.tap.os_sends([frame(BROADCAST, mac(2))])
        lab.network.pump()
        lab.network.cut()
        lab.network.pump()
        bridge = Bridge(lab.clock)
        lab.hub.vhub("DEFAULT").add_port(bridge)
        for i in range(40):  # for the held sessions, past the hub's budget
            bridge.sends([frame(mac(2), mac(9), b"%05d" % i + b"x" * 500)])
        scrape = Scrape(lab)
        self.assertEqual(scrape.value("sevpn_resume_memory_limit_bytes"), 8192)
        self.assertLessEqual(scrape.value("sevpn_resume_memory_bytes"), 8192)
        self.assertGreater(scrape.value("sevpn_resume_memory_bytes"), 0)
        self.assertGreater(scrape.value("sevpn_resume_memory_reclaimed_bytes_total"), 0)

    def test_process_figures(self):
        scrape = Scrape(self.lab)
        self.assertGreater(scrape.value("process_resident_memory_bytes"), 0)
        self.assertGreaterEqual(scrape.value("process_cpu_seconds_total"), 0)


class Reading(SynchronousTestCase):
    def test_virtual_hubs_without_sessions_are_listed(self):
        lab = Lab(self)
        lab.state.create_hub("EMPTY")
        reading = read_hub(lab.hub, lab.network.server_factory)
        self.assertEqual([v["name"] for v in reading["virtual_hubs"]], ["DEFAULT", "EMPTY"])
        self.assertEqual(reading["virtual_hubs"][1]["sessions"], [])
        self.assertEqual(reading["hub"]["sessions_limit"], lab.hub.max_sessions)
