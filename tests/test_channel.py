"""
The UDP channel in memory: a hub and cards on one clock, TCP and UDP
networks the tests can cut, block, make lossy, and forge into.
"""

import os
import struct

from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from sevpn import channel, offload as vnet, wire
from sevpn.accounts import Account
from tests.support import HUB_ADDRESS, Lab, frame, mac, payloads
from tests.test_mss import MSS, mss_of, syn4, tcp_of
from tests.test_offload import gso, ipv4_tcp, verify_tcp4

PAD = b"." * 1000


def numbered(n, start=0, dst=mac(2), src=mac(1), pad=PAD):
    return [frame(dst, src, b"%06d" % i + pad) for i in range(start, start + n)]


def numbers(tap, dst=mac(2)):
    return [int(p[:6]) for p in payloads(tap, dst)]


def hub_side(lab, card):
    [info] = [s for s in lab.hub.describe_sessions() if s["id"] == card.session.id]
    return info


def card_address(lab, card):
    """Where the card's UDP socket is on the in-memory network."""
    [address] = [a for a, s in lab.datagrams.sockets.items() if getattr(s.receiver, "holder", None) and
                 s.receiver.holder[0].session is card.session]
    return address


class UdpLab(SynchronousTestCase):
    def setUp(self):
        self.lab = Lab(self, udp=True)

    def two_cards(self, **kw):
        a, b = self.lab.card(1, **kw), self.lab.card(2, **kw)
        self.lab.network.run(1)
        return a, b

    def send(self, card, frames, seconds=0.1):
        card.lan.tap.os_sends(frames)
        self.lab.network.run(seconds)

    def states(self, *cards):
        return [(c.status()["udp"], hub_side(self.lab, c)["udp"]) for c in cards]


class Negotiation(UdpLab):
    def test_both_ends_bring_the_channel_up(self):
        a, b = self.two_cards()
        self.assertEqual(self.states(a, b), [("up", "up"), ("up", "up")])
        status = a.status()
        self.assertEqual(status["udp_peer"], "192.0.2.2:5555")
        self.assertEqual(hub_side(self.lab, a)["udp_peer"], "%s:%d" % card_address(self.lab, a))
        self.assertIsNotNone(status["udp_rtt_ms"])
        self.assertEqual(self.lab.channels.counters()["udp_channels"], 2)

    def test_a_card_without_udp_gets_no_channel(self):
        a = self.lab.card(1, udp=None)
        self.lab.network.run(2)
        self.assertEqual(self.states(a), [("off", "off")])
        self.assertEqual(len(self.lab.channels), 0)
        self.assertEqual(self.lab.datagrams.log, [])

    def test_a_hub_without_udp_offers_none(self):
        lab = Lab(self)
        card = lab.card(1, udp=lambda *a: self.fail("the card opened a UDP socket"))
        lab.network.run(2)
        self.assertEqual(card.state, "connected")
        self.assertEqual(card.status()["udp"], "off")

    def test_no_keys_no_channel(self):
        self.lab.network.tls = False  # a transport without a TLS session to export from
        a, b = self.two_cards()
        self.assertEqual(self.states(a, b), [("off", "off"), ("off", "off")])
        self.assertEqual(self.lab.channels.counters()["udp_refused"], 2)
        self.send(a, numbered(10))
        self.assertEqual(numbers(b.lan.tap), list(range(10)))

    def test_no_udp_through_a_proxy(self):
        card = self.lab.card(1, connect=False)
        account = Account(name="p", hub="192.0.2.2:5555", user="u1", password="secret", ca_file="/nonexistent",
                          proxy="http://192.0.2.9:3128")
        card.connect(account)
        self.lab.network.run(2)
        self.assertEqual(card.state, "connected")
        self.assertEqual(self.states(card), [("off", "off")])


class Carrying(UdpLab):
    def test_frames_go_over_udp_when_it_is_up(self):
        a, b = self.two_cards()
        tcp_before, log_before = self.lab.network.carried, len(self.lab.datagrams.log)
        for i in range(10):
            self.send(a, numbered(20, 20 * i), 0.01)
        self.lab.network.run(0.2)
        self.assertEqual(numbers(b.lan.tap), list(range(200)))
        # the frames crossed as datagrams (one per frame of this size), not over TCP
        self.assertGreaterEqual(len(self.lab.datagrams.log) - log_before, 400)
        self.assertLess(self.lab.network.carried - tcp_before, 200)
        self.assertEqual(hub_side(self.lab, a)["frames_in"], 200)
        self.assertGreaterEqual(a.status()["udp_datagrams_out"], 200)
        # every datagram fits a 1500-byte path
        self.assertLessEqual(max(len(d) for _, _, d in self.lab.datagrams.log), 1500 - 28)

    def test_acks_over_udp_empty_the_send_log(self):
        a, b = self.two_cards()
        self.send(a, numbered(300), 2)
        self.assertEqual(a.status()["frames_buffered"], 0)
        self.assertEqual(hub_side(self.lab, b)["frames_buffered"], 0)

    def test_super_frames_are_segmented_while_udp_carries(self):
        a, b = self.two_cards(offload=True)
        self.assertTrue(a.lan.tap.segmenting)  # the kernel cuts the card's own TCP
        eth = ipv4_tcp(os.urandom(9000))
        big = gso(eth, vnet.GSO_TCPV4, 1300, 34)
        self.send(a, [big])
        segments = [f for f in b.lan.tap.written if f[10:16] == mac(2)]
        self.assertEqual(len(segments), 7)
        for segment in segments:
            verify_tcp4(segment[10:])
        self.assertEqual(b"".join(s[10 + 54:] for s in segments), eth[54:])
        self.assertLessEqual(max(len(d) for _, _, d in self.lab.datagrams.log), 1500 - 28)

    def test_the_hub_segments_for_a_udp_card(self):
        a = self.lab.card(1, offload=True, udp=None)  # on TCP: its super-frames cross whole
        b = self.lab.card(2, offload=True)
        self.lab.network.run(1)
        eth = ipv4_tcp(os.urandom(6000))
        self.send(a, [gso(eth, vnet.GSO_TCPV4, 1300, 34)])
        segments = [f for f in b.lan.tap.written if f[10:16] == mac(2)]
        self.assertEqual(len(segments), 5)
        self.assertEqual(b"".join(s[10 + 54:] for s in segments), eth[54:])

    def test_tso_comes_back_when_udp_goes(self):
        a, b = self.two_cards(offload=True)
        self.assertTrue(a.lan.tap.segmenting)
        self.lab.datagrams.blocked = True
        # idle, the card notices at its next probe
        self.lab.network.run(channel.IDLE_PROBE_INTERVAL + channel.DOWN_AFTER + 1)
        self.assertFalse(a.lan.tap.segmenting)

    def test_syn_mss_clamped_both_ways(self):
        a = self.lab.card(1)
        b = self.lab.card(2, udp=None)  # no clamping of its own
        self.lab.network.run(1)
        syn = mac(2) + mac(1) + syn4(MSS)[12:]
        self.send(a, [syn])
        [got] = b.lan.tap.written
        self.assertEqual(mss_of(tcp_of(got)[1]), 1347)
        syn_ack = mac(1) + mac(2) + syn4(MSS, flags=0x12)[12:]
        self.send(b, [syn_ack])
        [got] = [f for f in a.lan.tap.written if f[:6] == mac(1)]
        self.assertEqual(mss_of(tcp_of(got)[1]), 1347)


class Fallback(UdpLab):
    def test_blocked_from_the_start_frames_go_over_tcp(self):
        self.lab.datagrams.blocked = True
        a, b = self.two_cards()
        self.lab.network.run(4)
        self.assertEqual(self.states(a, b), [("down", "probing"), ("down", "probing")])
        self.send(a, numbered(100))
        self.assertEqual(numbers(b.lan.tap), list(range(100)))
        self.assertEqual(b.status()["frames_lost_inbound"], 0)

    def paced(self, card, seconds, start, every=0.05, per=2):
        """The OS sends C{per} frames every C{every} seconds; returns the next number."""
        n = start
        for _ in range(int(seconds / every)):
            card.lan.tap.os_sends(numbered(per, n))
            n += per
            self.lab.network.run(every, step=every)
        return n

    def test_blocked_mid_traffic_falls_back_within_seconds_and_comes_back(self):
        a, b = self.two_cards()
        n = self.paced(a, 1, 0)
        self.assertEqual(numbers(b.lan.tap), list(range(n)))
        self.lab.datagrams.blocked = True
        # card a notices within a probe interval and DOWN_AFTER and sends
        # over TCP; then the hub, sending to b, notices b's silence
        n = self.paced(a, channel.PROBE_INTERVAL + channel.DOWN_AFTER + 0.25, n)
        self.assertEqual(self.states(a)[0][0], "down")
        self.assertFalse(a.lan.tap.segmenting)
        n = self.paced(a, channel.QUIET_AFTER + 0.25, n)
        self.assertEqual(self.states(b)[0][1], "down")
        before = n
        n = self.paced(a, 2, n)
        got = numbers(b.lan.tap)
        self.assertEqual(got[-(n - before):], list(range(before, n)))  # all of them, over TCP
        # the hub's side of a has nothing to send it: it shows the silence later
        self.lab.network.run(channel.SILENCE_LIMIT)
        self.assertEqual(self.states(a, b), [("down", "down"), ("down", "down")])
        # what was lost is what went into the blocked channel, and it is counted
        lost = hub_side(self.lab, a)["frames_lost_inbound"] + b.status()["frames_lost_inbound"]
        self.assertEqual(len(got) + lost, n)
        self.assertEqual(got, sorted(set(got)))
        # it comes back by itself
        self.lab.datagrams.blocked = False
        # blocked this long, the cards probe every IDLE_PROBE_INTERVAL
        self.lab.network.run(channel.IDLE_PROBE_INTERVAL + 1)
        self.assertEqual(self.states(a, b), [("up", "up"), ("up", "up")])
        carried = self.lab.network.carried
        n2 = self.paced(a, 1, n)
        self.assertEqual(numbers(b.lan.tap)[-(n2 - n):], list(range(n, n2)))
        self.assertLess(self.lab.network.carried - carried, 500)  # back on UDP

    def test_one_way_blocks(self):
        for direction in ("to-card", "to-hub"):
            lab = self.lab = Lab(self, udp=True)
            a, b = self.two_cards()
            lab.datagrams.blocked = direction
            sent = 0
            # traffic both ways: the datagrams that still arrive must not
            # bring the channel back up
            for _ in range(int((channel.PROBE_INTERVAL + channel.DOWN_AFTER + 1) / 0.25)):
                self.send(a, numbered(1, sent), 0.125)
                self.send(b, numbered(1, sent, dst=mac(1), src=mac(2)), 0.125)
                sent += 1
            self.assertEqual(self.states(a, b), [("down", "down")] * 2, direction)
            lab.network.run(5)
            self.assertEqual(self.states(a, b), [("down", "down")] * 2, direction)
            self.assertEqual([a.status()["udp_ups"], b.status()["udp_ups"]], [1, 1], direction)
            self.send(a, numbered(5, 100), 0.2)
            self.send(b, numbered(5, 100, dst=mac(1), src=mac(2)), 0.2)
            self.assertEqual(numbers(b.lan.tap)[-5:], list(range(100, 105)), direction)
            self.assertEqual(numbers(a.lan.tap, mac(1))[-5:], list(range(100, 105)), direction)


class Switching(UdpLab):
    def test_frames_over_udp_never_overtake_frames_still_on_their_way_over_tcp(self):
        a, b = self.two_cards()
        self.lab.datagrams.blocked = True
        self.lab.network.run(channel.IDLE_PROBE_INTERVAL + channel.DOWN_AFTER + 1)
        self.assertEqual(self.states(a)[0][0], "down")
        a.lan.tap.os_sends(numbered(20))  # over TCP: written, not yet carried
        self.lab.datagrams.blocked = False
        while a.status()["udp"] == "down":  # UDP only, until the card hears an answer
            self.lab.clock.advance(0.1)
            self.lab.datagrams.pump()
        self.assertEqual(a.status()["udp"], "joining")
        a.lan.tap.os_sends(numbered(20, 20))  # these must wait for the first twenty
        self.lab.network.run(2)
        self.assertEqual(numbers(b.lan.tap), list(range(40)))
        self.assertEqual(hub_side(self.lab, a)["frames_lost_inbound"], 0)
        self.assertEqual(self.states(a), [("up", "up")])

    def test_joining_waits_a_second_at_most(self):
        a, b = self.two_cards()
        self.lab.datagrams.blocked = True
        self.lab.network.run(channel.IDLE_PROBE_INTERVAL + channel.DOWN_AFTER + 1)
        a.lan.tap.os_sends(numbered(5))
        [to_hub] = [c for c in self.lab.network.connections if c.client.card is a]
        to_hub.ct.reading_paused = True  # nothing it writes is acknowledged: the hub does not read it
        to_hub.st.reading_paused = True
        self.lab.datagrams.blocked = False
        self.lab.network.run(channel.PROBE_INTERVAL + channel.JOIN_TIMEOUT + 0.5)
        self.assertEqual(a.status()["udp"], "up")


class Loss(UdpLab):
    def test_one_percent_loss_loses_frames_only_as_a_wire_would(self):
        a, b = self.two_cards()
        self.lab.datagrams.loss = 0.01
        sent = 0
        for _ in range(300):
            self.send(a, numbered(10, sent), 0.01)
            sent += 10
        self.lab.datagrams.loss = 0.0
        self.send(a, numbered(1, sent), 0.5)  # the last one arrives: every gap is counted
        sent += 1
        got = numbers(b.lan.tap)
        # lost on the way to the hub (never numbered for b), then on the way to b
        lost = hub_side(self.lab, a)["frames_lost_inbound"] + b.status()["frames_lost_inbound"]
        self.assertGreater(hub_side(self.lab, a)["frames_lost_inbound"], 0)
        self.assertGreater(b.status()["frames_lost_inbound"], 0)
        self.assertEqual(len(got) + lost, sent)
        self.assertEqual(got, sorted(set(got)))  # in order, each once
        self.assertEqual(got[-1], sent - 1)
        # about the datagrams lost, in both hops (one frame a datagram)
        self.assertLess(abs(lost - 0.02 * sent), 0.012 * sent)
        # the channel never went down
        self.assertEqual((a.status()["udp_ups"], hub_side(self.lab, a)["udp_ups"]), (1, 1))
        self.assertEqual(self.states(a, b), [("up", "up"), ("up", "up")])


class Resume(UdpLab):
    def test_tcp_cut_during_udp_traffic_loses_nothing_unacknowledged(self):
        a, b = self.two_cards()
        self.send(a, numbered(50), 0.2)
        self.send(b, numbered(50, dst=mac(1), src=mac(2)), 0.2)
        # frames on their way as datagrams when the TLS link breaks
        a.lan.tap.os_sends(numbered(30, 50))
        b.lan.tap.os_sends(numbered(30, 50, dst=mac(1), src=mac(2)))
        self.lab.datagrams.pump()  # they reach the hub, not yet the cards
        self.assertTrue(self.lab.datagrams.queue)
        self.lab.network.cut()
        # the channels end with their links: what is still in flight is dropped
        self.assertEqual(self.states(a, b), [("off", "off"), ("off", "off")])
        a.lan.tap.os_sends(numbered(20, 80))  # held while resuming
        self.lab.network.run(0.5)
        self.lab.network.restore()
        self.lab.network.run(3)
        self.assertEqual(a.status()["resumes"], 1)
        self.assertEqual(numbers(b.lan.tap), list(range(100)))
        self.assertEqual(numbers(a.lan.tap, mac(1)), list(range(80)))
        for card in (a, b):
            self.assertEqual(card.status()["frames_lost_inbound"], 0)
            self.assertEqual(card.status()["frames_dropped"], 0)
            self.assertEqual(hub_side(self.lab, card)["frames_dropped"], 0)
            self.assertEqual(hub_side(self.lab, card)["frames_lost_inbound"], 0)
        # and a new channel carries again
        self.assertEqual(self.states(a, b), [("up", "up"), ("up", "up")])
        self.assertEqual(a.status()["udp_ups"], 2)
        tcp = self.lab.network.carried
        self.send(a, numbered(50, 100), 0.2)
        self.assertEqual(numbers(b.lan.tap)[-50:], list(range(100, 150)))
        self.assertLess(self.lab.network.carried - tcp, 200)

    def test_the_hub_taking_the_session_over_ends_the_old_channel(self):
        a, b = self.two_cards()
        old = a._link.channel
        self.lab.network.cut()
        self.lab.network.restore()
        self.lab.network.run(2)
        self.assertEqual(old.state, channel.OFF)
        self.assertEqual(len(self.lab.channels), 2)
        self.assertEqual(self.states(a), [("up", "up")])


class Goodbyes(UdpLab):
    def test_the_hub_shutting_down_says_goodbye_over_tls(self):
        a, b = self.two_cards()
        old = list(self.lab.channels._channels.values())
        sessions = [a.session, b.session]
        links = self.lab.hub.shutdown()  # while the channels carry the sessions
        self.assertEqual(sorted(map(id, links)), sorted(map(id, old)))  # the sessions' first links
        self.lab.network.pump()
        for link in links:
            self.assertTrue(link.when_closed().called)
            self.assertEqual(link.state, channel.OFF)
            self.assertNotIn(link, self.lab.channels._channels.values())
        # the cards heard the goodbye over TLS: they start afresh, no resume
        self.lab.network.run(0.5)
        self.assertNotIn(a.session, sessions)
        self.assertEqual(a.status()["resumes"], 0)

    def test_a_card_disconnecting_ends_its_channel(self):
        a, b = self.two_cards()
        a.disconnect()
        self.lab.network.run(0.5)
        self.assertEqual(len(self.lab.channels), 1)
        self.assertEqual(a.status()["state"], "disconnected")
        self.assertNotIn(a.test_account.user, [s["user"] for s in self.lab.hub.describe_sessions()])


class Hostile(UdpLab):
    def test_a_replayed_datagram_changes_nothing(self):
        a, b = self.two_cards()
        self.send(a, numbered(20))
        from_a = card_address(self.lab, a)
        captured = [d for src, dst, d in self.lab.datagrams.log if src == from_a]
        peer = hub_side(self.lab, a)["udp_peer"]
        for source in (from_a, ("198.51.100.7", 4444)):
            for d in captured:
                self.lab.datagrams.inject(source, HUB_ADDRESS, d)
        self.lab.network.run(0.5)
        self.assertEqual(numbers(b.lan.tap), list(range(20)))
        info = hub_side(self.lab, a)
        self.assertEqual(info["udp_replayed"], 2 * len(captured))
        self.assertEqual(info["udp_peer"], peer)  # a replay does not move the card
        self.assertEqual(info["frames_in"], 20)

    def test_forged_datagrams_change_nothing(self):
        a, b = self.two_cards()
        self.send(a, numbered(5))
        from_a = card_address(self.lab, a)
        channel_id = a._link.channel.id
        forgeries = [struct.pack("!QQ", channel_id, 10 ** 6 + i) + os.urandom(100) for i in range(20)]
        sealer = a._link.channel.sealer  # genuine datagrams of fresh counters, then spoilt
        flipped = bytearray(sealer.seal(wire.encode_ack(0)))
        flipped[-3] ^= 0x40
        forgeries.append(bytes(flipped))
        forgeries.append(bytes(sealer.seal(wire.encode_ack(0)))[:-1])
        for d in forgeries:
            self.lab.datagrams.inject(from_a, HUB_ADDRESS, d)
        unknown = [struct.pack("!QQ", channel_id ^ 1, 1) + os.urandom(64), b"", b"short"]
        for d in unknown:
            self.lab.datagrams.inject(("198.51.100.7", 1), HUB_ADDRESS, d)
        # and toward the card
        self.lab.datagrams.inject(HUB_ADDRESS, from_a, struct.pack("!QQ", channel_id, 5) + os.urandom(80))
        self.lab.network.run(0.5)
        self.assertEqual(numbers(b.lan.tap), list(range(5)))
        self.assertEqual(hub_side(self.lab, a)["udp_bad"], len(forgeries))
        self.assertEqual(a.status()["udp_bad"], 1)
        self.assertEqual(self.lab.channels.counters()["udp_unknown_channel"], len(unknown))
        self.assertEqual(self.states(a, b), [("up", "up"), ("up", "up")])
        self.send(a, numbered(5, 5))
        self.assertEqual(numbers(b.lan.tap), list(range(10)))

    def test_a_source_of_forgeries_is_ignored_and_others_are_not(self):
        a, b = self.two_cards()
        channel_id = a._link.channel.id
        forger = ("198.51.100.7", 4444)
        for i in range(300):
            self.lab.datagrams.inject(forger, HUB_ADDRESS, struct.pack("!QQ", channel_id, i + 1) + bytes(40))
        self.lab.network.run(0.1)
        counters = self.lab.channels.counters()
        self.assertGreater(counters["udp_throttled"], 150)
        self.assertLessEqual(hub_side(self.lab, a)["udp_bad"], self.lab.channels.BAD_BURST + 5)
        self.send(a, numbered(10))
        self.assertEqual(numbers(b.lan.tap), list(range(10)))

    def test_the_address_follows_the_newest_authentic_datagram(self):
        a, b = self.two_cards()
        old = card_address(self.lab, a)
        sock = self.lab.datagrams.sockets.pop(old)
        new = ("203.0.113.9", 61000)  # a NAT gave the card another mapping
        sock.address = new
        self.lab.datagrams.sockets[new] = sock
        self.send(a, numbered(5))
        self.assertEqual(hub_side(self.lab, a)["udp_peer"], "203.0.113.9:61000")
        self.send(b, numbered(5, dst=mac(1), src=mac(2)))
        self.assertEqual(numbers(a.lan.tap, mac(1)), list(range(5)))
        self.assertEqual(self.states(a), [("up", "up")])

    def test_probe_answers_are_bounded(self):
        a, b = self.two_cards()
        self.lab.clock.advance(5)
        card_channel = a._link.channel
        before = hub_side(self.lab, a)["udp_datagrams_out"]
        for i in range(100):
            card_channel._send(wire.Probe(0, 1000 + i, hearing=True).encode(), wire.PROBE)
        self.lab.network.pump()
        answers = hub_side(self.lab, a)["udp_datagrams_out"] - before
        self.assertEqual(answers, int(channel.ANSWER_RATE))


class Liveness(UdpLab):
    def probes_sent(self, card, seconds):
        before = card.status()["udp_datagrams_out"]
        self.lab.network.run(seconds, step=0.5)
        return card.status()["udp_datagrams_out"] - before

    def test_an_idle_channel_probes_every_few_seconds_and_stays_up(self):
        a, b = self.two_cards()
        sent = self.probes_sent(a, 60)
        self.assertLessEqual(sent, 60 / channel.IDLE_PROBE_INTERVAL + 1)
        self.assertGreaterEqual(sent, 60 / channel.IDLE_PROBE_INTERVAL - 1)
        self.assertEqual(self.states(a, b), [("up", "up"), ("up", "up")])

    def test_a_blocked_channel_probes_slower_after_a_while(self):
        self.lab.datagrams.blocked = True
        a = self.lab.card(1)
        first = self.probes_sent(a, channel.SLOW_PROBING_AFTER)
        later = self.probes_sent(a, 60)
        self.assertGreaterEqual(first, channel.SLOW_PROBING_AFTER - 1)
        self.assertLessEqual(later, 60 / channel.IDLE_PROBE_INTERVAL + 1)

    def test_the_hub_shows_a_silent_channel_down(self):
        a, b = self.two_cards()
        self.lab.datagrams.blocked = True
        a._link.channel._tick_call.cancel()  # the card goes quiet: no probes, nothing
        self.lab.network.run(channel.SILENCE_LIMIT + 1)
        self.assertEqual(hub_side(self.lab, a)["udp"], "down")

    def test_the_hub_notices_frames_unanswered(self):
        a, b = self.two_cards()
        self.lab.datagrams.blocked = "to-card"
        b._link.channel._tick_call.cancel()  # card b would say it hears nothing: it says nothing
        for i in range(int(channel.QUIET_AFTER / 0.25) + 2):
            self.send(a, numbered(1, i), 0.25)
        self.assertEqual(hub_side(self.lab, b)["udp"], "down")
        got = numbers(b.lan.tap)
        self.send(a, numbered(3, 100), 0.2)
        self.assertEqual(numbers(b.lan.tap)[len(got):], [100, 101, 102])  # over TCP


class WhenToCarry(SynchronousTestCase):
    """Mode auto: a channel that works stands by on a clean line and carries on a lossy one."""

    def setUp(self):
        self.lab = Lab(self, udp=True)
        self.lab.channels.mode = "auto"

    def test_stands_by_until_the_line_loses_packets(self):
        a, b = self.lab.card(1, udp_mode="auto"), self.lab.card(2, udp_mode="auto")
        self.lab.network.run(3)
        self.assertEqual((a.status()["udp"], b.status()["udp"]), ("ready", "ready"))
        [link] = [c.client for c in self.lab.network.connections if c.client.card is a]
        totals = [0, 0]

        def counters():
            totals[0] += 10  # 1% of the segments retransmitted
            totals[1] += 1000
            return tuple(totals)

        link.tcp_counters = counters
        self.lab.network.run(12)
        self.assertEqual(a.status()["udp"], "up")
        self.assertEqual(b.status()["udp"], "ready")  # the hub's side has its own line to measure

    def test_hands_back_to_tcp_after_a_while(self):
        from sevpn import channel as channels

        a = self.lab.card(1, udp_mode="auto")
        self.lab.network.run(3)
        [link] = [c.client for c in self.lab.network.connections if c.client.card is a]
        totals = [0, 0]

        def counters():
            totals[0] += 10
            totals[1] += 1000
            return tuple(totals)

        link.tcp_counters = counters
        self.lab.network.run(12)
        self.assertEqual(a.status()["udp"], "up")
        link.tcp_counters = lambda: None  # on UDP the TCP link says nothing
        self.lab.network.run(channels.STICKY + 3, step=1)
        self.assertEqual(a.status()["udp"], "ready")


class CarryOnTrial(SynchronousTestCase):
    """Mode auto: a lossy line makes UDP carry on trial; UDP that moves clearly less gives the frames back."""

    def setUp(self):
        self.lab = Lab(self, udp=True)
        self.a = self.lab.card(1, udp_mode="auto")
        self.b = self.lab.card(2, udp_mode="auto")
        self.lab.network.run(3)
        [self.link] = [c.client for c in self.lab.network.connections if c.client.card is self.a]
        totals = [0, 0]

        def lossy():
            totals[0] += 10  # 1% of the segments retransmitted
            totals[1] += 1000
            return tuple(totals)

        self.link.tcp_counters = lossy

    def carry(self, seconds, frames_per_step):
        """Card a sends numbered frames to b every 0.5 s for C{seconds}."""
        start = 0
        for _ in range(int(seconds / 0.5)):
            self.a.lan.tap.os_sends(numbered(frames_per_step, start))
            start += frames_per_step
            self.lab.network.run(0.5, step=0.5)

    def carry_until_up(self, frames_per_step):
        for _ in range(40):
            self.carry(0.5, frames_per_step)
            if self.a.status()["udp"] == "up":
                return
        self.fail("the channel never carried")

    def test_udp_moving_less_gives_the_frames_back_and_tcp_keeps_them_a_while(self):
        from sevpn.lossmeter import HOLD, TRIAL

        with capturedLogs() as events:
            self.carry_until_up(40)  # over TCP
            self.carry(TRIAL + 2, 10)  # over UDP: a quarter of it
        self.assertEqual(self.a.status()["udp"], "ready")
        [line] = [formatEvent(e) for e in events if "frames back on TCP, the faster here" in formatEvent(e)]
        self.assertIn("UDP moved", line)
        self.carry(HOLD - 10, 10)  # the line still loses packets: TCP carries on
        self.assertEqual(self.a.status()["udp"], "ready")
        self.carry(20, 10)
        self.assertEqual(self.a.status()["udp"], "up")  # the next trial

    def test_udp_moving_as_much_stays(self):
        from sevpn.lossmeter import TRIAL

        with capturedLogs() as events:
            self.carry_until_up(20)
            self.carry(TRIAL + 2, 20)
        self.assertEqual(self.a.status()["udp"], "up")
        self.assertTrue([e for e in events if "UDP carries on" in formatEvent(e)])
