"""
The operator's listener (C{--metrics}): the status page as a user reads
it (tables parsed back from the HTML), rates on a fake clock, escaping of
what users control; then the real hub on the real reactor scraped by a
plain HTTP client; then the page in a headless Chromium.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import urllib.error
import urllib.request
from html.parser import HTMLParser

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall, deferLater
from twisted.python.failure import Failure
from twisted.internet.error import ConnectionLost
from twisted.python import usage
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from sevpn import hubtap, web
from sevpn.accounts import Account
from sevpn.card import Card, NicSide
from sevpn.cardservice import tls_endpoint_for
from sevpn.metrics import read_hub
from sevpn.users import HubState
from tests.support import BROADCAST, FakeTap, Lab, Raw, frame, mac
from tests.test_metrics import Bridge

#: The tags the page is made of; anything else in it came from a user's string.
PAGE_TAGS = {
    "html", "head", "meta", "title", "style", "body", "header", "h1", "h2", "h3", "p", "section", "table",
    "thead", "tbody", "tr", "th", "td", "span", "br", "footer", "a",
}

IN, OUT = "in (from the card)", "out (to the card)"
HOSTILE_PORT = 'bridge:<script>document.title="pwned"</script><img src=x onerror="alert(1)">'


class Page(HTMLParser):
    """
    The page as a user reads it: per virtual hub, each table as rows of
    {column header: cell text}; and every tag in it.
    """

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags = []
        self.tables = {}
        self.text = []
        self._hub = None
        self._table = None
        self._headers = None
        self._row = None
        self._cell = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if tag == "section":
            self._hub = attrs.get("data-hub")
        elif tag == "table":
            self._table = self.tables.setdefault((self._hub, attrs.get("class")), [])
            self._headers = []
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "br" and self._cell is not None:
            self._cell.append(" ")

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if self._headers:
                self._table.append(dict(zip(self._headers, self._row)))
            else:
                self._headers = self._row
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def rows(self, hub, table):
        return self.tables.get((hub, table), [])


class Rendering(SynchronousTestCase):
    def setUp(self):
        self.lab = Lab(self)

    def reading(self):
        return read_hub(self.lab.hub, self.lab.network.server_factory)

    def test_sessions_states_and_mac_tables(self):
        self.lab.state.create_hub("OTHER")
        a, b = self.lab.card(1, user="alice"), self.lab.card(2, user="bob")
        self.lab.card(3, user="carol", hub="OTHER")
        a.lan.tap.os_sends([frame(BROADCAST, mac(1))])
        b.lan.tap.os_sends([frame(mac(1), mac(2), b"reply")])
        self.lab.network.pump()
        # bob's link breaks while the line is down: the hub holds his session
        self.lab.network.up = False
        [bob_session] = [s for s in self.lab.hub.sessions.values() if s.user == "bob"]
        [bob_link] = [c for c in self.lab.network.connections if c.server is bob_session.link]
        bob_link.close(Failure(ConnectionLost("cut")))
        self.lab.network.pump()
        page = Page(web.render_page(self.reading(), {}).decode("utf-8"))
        sessions = {r["user"]: r for r in page.rows("DEFAULT", "sessions")}
        self.assertEqual(set(sessions), {"alice", "bob"})
        self.assertEqual(sessions["alice"]["state"], "connected")
        self.assertEqual(sessions["bob"]["state"], "held")
        self.assertEqual(sessions["alice"]["card MAC"], "02:00:00:00:00:01")
        # no rate before a second reading; the totals
        self.assertEqual(sessions["alice"][IN], "\u2014 1 frame \u00b7 64 B")
        self.assertEqual(sessions["alice"][OUT], "\u2014 1 frame \u00b7 19 B")
        macs = {r["MAC"]: r["user"] for r in page.rows("DEFAULT", "macs")}
        self.assertEqual(macs, {"02:00:00:00:00:01": "alice", "02:00:00:00:00:02": "bob"})
        self.assertEqual([r["user"] for r in page.rows("OTHER", "sessions")], ["carol"])
        self.assertEqual([(r["MAC"], r["user"]) for r in page.rows("OTHER", "macs")], [("02:00:00:00:00:03", "carol")])
        self.assertLessEqual(set(page.tags), PAGE_TAGS)

    def test_user_controlled_strings_render_as_text(self):
        """Names are checked where they enter, but the page does not rely on it."""
        self.lab.card(1)
        bridge = Bridge(self.lab.clock, name=HOSTILE_PORT)
        self.lab.hub.vhub("DEFAULT").add_port(bridge)
        bridge.sends([frame(BROADCAST, mac(9))])
        reading = self.reading()
        [vhub] = reading["virtual_hubs"]
        [session] = vhub["sessions"]
        session["user"] = "<script>alert('user')</script>"
        session["peer"] = '"><img src=x onerror=alert(1)>'
        vhub["name"] = "<i>hub</i>"
        text = web.render_page(reading, {}).decode("utf-8")
        page = Page(text)
        self.assertLessEqual(set(page.tags), PAGE_TAGS)
        [row] = page.rows("<i>hub</i>", "sessions")
        self.assertEqual(row["user"], "<script>alert('user')</script>")
        self.assertEqual(row["peer"], '"><img src=x onerror=alert(1)>')
        self.assertEqual([r["port"] for r in page.rows("<i>hub</i>", "ports")], [HOSTILE_PORT])
        self.assertIn(HOSTILE_PORT, [r["port"] for r in page.rows("<i>hub</i>", "macs")])
        self.assertIn("Virtual hub <i>hub</i>", "".join(page.text))

    def test_rates_from_the_readings_the_server_keeps(self):
        a, _ = self.lab.card(1), self.lab.card(2)
        meter = web.RateMeter()
        self.assertEqual(meter.rates(self.reading()), {})  # one reading: no rate yet
        sent = [frame(BROADCAST, mac(1), b"x" * 86) for _ in range(10)]  # 100 bytes each
        a.lan.tap.os_sends(sent)
        self.lab.network.pump()
        self.lab.clock.advance(2)
        [sid_a] = [s.id for s in self.lab.hub.sessions.values() if s.user == "u1"]
        rates = meter.rates(self.reading())
        self.assertEqual(rates[sid_a]["frames_in"], 5.0)
        self.assertEqual(rates[sid_a]["bits_in"], 10 * 100 * 8 / 2)
        self.assertEqual(rates[sid_a]["frames_out"], 0.0)
        # a reading soon after (another viewer) keeps the same span
        self.lab.clock.advance(0.2)
        self.assertEqual(meter.rates(self.reading())[sid_a]["frames_in"], 5.0)
        # later, with no traffic, the rate falls to zero
        self.lab.clock.advance(3)
        self.assertEqual(meter.rates(self.reading())[sid_a]["frames_in"], 0.0)

    def test_rates_on_the_page(self):
        a, _ = self.lab.card(1), self.lab.card(2)
        meter = web.RateMeter()
        meter.rates(self.reading())
        a.lan.tap.os_sends([frame(BROADCAST, mac(1), b"x" * 1236) for _ in range(100)])  # 1250 bytes each
        self.lab.network.pump()
        self.lab.clock.advance(1)
        reading = self.reading()
        page = Page(web.render_page(reading, meter.rates(reading)).decode("utf-8"))
        rows = {r["user"]: r for r in page.rows("DEFAULT", "sessions")}
        self.assertEqual(rows["u1"][IN], "1.0 Mbit/s \u00b7 100 frames/s 100 frames \u00b7 122.1 KiB")
        self.assertEqual(rows["u2"][OUT], "1.0 Mbit/s \u00b7 100 frames/s 100 frames \u00b7 122.1 KiB")
        self.assertEqual(rows["u1"][OUT], "0 bit/s \u00b7 0 frames/s 0 frames \u00b7 0 B")

    def test_memory_of_rates_is_bounded_by_the_sessions(self):
        meter = web.RateMeter()
        cards = [self.lab.card(n) for n in range(1, 4)]
        meter.rates(self.reading())
        for card in cards[:2]:
            card.disconnect()
        self.lab.network.pump()
        self.lab.clock.advance(2)
        meter.rates(self.reading())
        self.lab.clock.advance(2)
        self.assertEqual(len(meter.rates(self.reading())), 1)
        self.assertEqual(len(meter._newer[1]), 1)


# -- the real hub on the real reactor ---------------------------------------------


@inlineCallbacks
def eventually(predicate, what, timeout=10.0):
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return
        yield deferLater(reactor, 0.02, lambda: None)
    raise AssertionError(f"timed out waiting for {what}")


def http(url, method="GET", headers=None):
    """A plain HTTP request from a thread (urllib): (status, headers, body)."""

    def fetch():
        request = urllib.request.Request(url, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()

    return threads.deferToThread(fetch)


def samples(text):
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(found, name, **labels):
    [sample] = [s for s in found if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    return sample.value


class RunningHub:
    """A hub started as C{twistd sevpn-hub} would start it, with cards on real TLS."""

    def start_hub(self, *args):
        self.dir = tempfile.mkdtemp(prefix="sevpn-web-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        state = HubState(self.dir)
        state.add_user("DEFAULT", "alice", b"pw")
        state.add_user("DEFAULT", "bob", b"pw")
        config = hubtap.Options()
        config.parseOptions(["--state-dir", self.dir, "--listen", "tcp:0:interface=127.0.0.1", *args])
        self.service = service = hubtap.makeService(config)
        service.startService()
        self.addCleanup(service.stopService)
        return service

    def url(self, path=""):
        return f"http://127.0.0.1:{self.service.metrics_port.getHost().port}/{path}"

    def card(self, n, user):
        card = Card(reactor, NicSide(FakeTap(reactor)), mac(n), tls_endpoint_for(reactor))
        port = self.service.ports[0].getHost().port
        card.connect(Account(name=f"t{n}", hub=f"127.0.0.1:{port}", user=user, password="pw",
                             ca_file=os.path.join(self.dir, "ca.pem")))
        self.addCleanup(card.disconnect)
        return card

    @inlineCallbacks
    def two_cards_talking(self, frames=7):
        alice, bob = self.card(1, "alice"), self.card(2, "bob")
        yield eventually(lambda: alice.state == bob.state == "connected", "both cards to connect")
        alice.lan.tap.os_sends([frame(BROADCAST, mac(1), b"%d" % i * 40) for i in range(frames)])
        yield eventually(lambda: len(bob.lan.tap.written) >= frames, "bob to get alice's frames")
        bob.lan.tap.os_sends([frame(mac(1), mac(2), b"reply")])
        yield eventually(lambda: alice.lan.tap.written, "alice to get bob's reply")
        return alice, bob


class Scraping(RunningHub, TestCase):
    @inlineCallbacks
    def test_a_cards_frames_are_counted_after_traffic(self):
        self.start_hub("--metrics", "tcp:0:interface=127.0.0.1")
        yield self.two_cards_talking(frames=7)
        status, headers, body = yield http(self.url("metrics"))
        self.assertEqual(status, 200)
        self.assertTrue(headers["Content-Type"].startswith("text/plain"))
        found = samples(body.decode("utf-8"))
        self.assertEqual(value(found, "sevpn_session_frames_total", user="alice", direction="in"), 7)
        self.assertEqual(value(found, "sevpn_session_frames_total", user="bob", direction="out"), 7)
        self.assertEqual(value(found, "sevpn_session_frames_total", user="alice", direction="out"), 1)
        self.assertEqual(value(found, "sevpn_sessions", hub="DEFAULT", state="connected"), 2)
        self.assertEqual(value(found, "sevpn_mac_table_entries", hub="DEFAULT"), 2)
        self.assertGreater(value(found, "process_resident_memory_bytes"), 0)

    @inlineCallbacks
    def test_gzip_and_openmetrics_for_scrapers_that_ask(self):
        import gzip

        self.start_hub("--metrics", "tcp:0:interface=127.0.0.1")
        status, headers, body = yield http(
            self.url("metrics"), headers={"Accept": "application/openmetrics-text; version=1.0.0",
                                          "Accept-Encoding": "gzip"},
        )
        self.assertEqual(headers["Content-Encoding"], "gzip")
        self.assertTrue(headers["Content-Type"].startswith("application/openmetrics-text"))
        self.assertTrue(gzip.decompress(body).endswith(b"# EOF\n"))

    @inlineCallbacks
    def test_the_page_and_its_data(self):
        self.start_hub("--metrics", "tcp:0:interface=127.0.0.1")
        yield self.two_cards_talking()
        status, headers, body = yield http(self.url())
        self.assertEqual(status, 200)
        self.assertEqual(headers["Content-Type"], "text/html; charset=utf-8")
        self.assertNotIn("script", headers["Content-Security-Policy"])  # default-src 'none': no script at all
        page = Page(body.decode("utf-8"))
        self.assertEqual(sorted(r["user"] for r in page.rows("DEFAULT", "sessions")), ["alice", "bob"])
        status, headers, body = yield http(self.url("status.json"))
        self.assertEqual(headers["Content-Type"], "application/json")
        data = json.loads(body)
        [vhub] = data["virtual_hubs"]
        self.assertEqual({s["user"]: s["state"] for s in vhub["sessions"]}, {"alice": "connected", "bob": "connected"})
        self.assertEqual(data["hub"]["refusals"]["auth-failed"], 0)

    @inlineCallbacks
    def test_read_only(self):
        self.start_hub("--metrics", "tcp:0:interface=127.0.0.1")
        for path in ("", "metrics", "status.json"):
            status, _, _ = yield http(self.url(path), method="POST")
            self.assertEqual(status, 405, path)
        status, _, body = yield http(self.url("nothing<b>here"))
        self.assertEqual(status, 404)
        self.assertNotIn(b"<b>", body)

    def test_the_public_flag_alone_is_a_usage_error(self):
        config = hubtap.Options()
        with self.assertRaises(usage.UsageError) as raised:
            config.parseOptions(["--metrics-public"])
        self.assertEqual(str(raised.exception), "--metrics-public needs --metrics ENDPOINT")

    def test_off_by_default(self):
        service = self.start_hub()
        self.assertIsNone(service.metrics_port)

    @inlineCallbacks
    def failed_start(self, *args):
        """The sentence a start that fails says; then nothing is left listening."""
        with self.assertRaises(SystemExit) as raised:
            self.start_hub(*args)
        self.assertEqual(self.service.ports, [])
        self.assertIsNone(self.service.metrics_port)
        self.assertIsNone(self.service.control_port)
        control = os.path.join(self.dir, "control.sock")
        yield eventually(lambda: not os.path.exists(control), "the control socket to close")
        return str(raised.exception)

    @inlineCallbacks
    def test_beyond_loopback_is_refused_without_the_flag(self):
        message = yield self.failed_start("--metrics", "tcp:0")
        self.assertIn("--metrics tcp:0 would serve beyond loopback (on 0.0.0.0)", message)
        self.assertIn("--metrics-public", message)

    @inlineCallbacks
    def test_beyond_loopback_with_the_flag(self):
        self.start_hub("--metrics", "tcp:0:interface=0.0.0.0", "--metrics-public")
        status, _, body = yield http(self.url("metrics"))
        self.assertEqual(status, 200)
        self.assertIn(b"sevpn_sessions_limit", body)

    @inlineCallbacks
    def test_a_bad_endpoint_is_a_sentence(self):
        message = yield self.failed_start("--metrics", "nonsense:9100")
        self.assertIn("--metrics nonsense:9100: not an endpoint description", message)

    @inlineCallbacks
    def test_a_port_in_use_is_a_sentence(self):
        self.start_hub("--metrics", "tcp:0:interface=127.0.0.1")
        taken = self.service.metrics_port.getHost().port
        first = self.service
        message = yield self.failed_start("--metrics", f"tcp:{taken}:interface=127.0.0.1")
        self.assertIn(f"--metrics: cannot listen on tcp:{taken}:interface=127.0.0.1", message)
        self.assertIsNotNone(first.metrics_port)

    @inlineCallbacks
    def test_connections_are_bounded(self):
        self.patch(web, "MAX_CONNECTIONS", 2)
        self.start_hub("--metrics", "tcp:0:interface=127.0.0.1")
        port = self.service.metrics_port.getHost().port
        clients = []
        for _ in range(3):
            client = yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Raw())
            clients.append(client)
        yield eventually(lambda: clients[2].lost is not None, "the third connection to be closed")
        first = clients[0]
        first.transport.write(b"GET /metrics HTTP/1.0\r\n\r\n")
        yield eventually(lambda: first.lost is not None, "the first connection's answer")
        self.assertTrue(first.received.startswith(b"HTTP/1.0 200"), first.received[:40])
        self.assertIsNone(clients[1].lost)
        clients[1].transport.loseConnection()
        yield eventually(lambda: clients[1].lost is not None, "the second connection to close")

    @inlineCallbacks
    def test_stopping_closes_open_connections(self):
        """A browser's kept-alive connection does not outlive the hub (nor wait for the idle timeout)."""
        self.patch(web, "IDLE_TIMEOUT", 3600)
        service = self.start_hub("--metrics", "tcp:0:interface=127.0.0.1")
        port = service.metrics_port.getHost().port
        client = yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Raw())
        client.transport.write(b"GET /status.json HTTP/1.1\r\nHost: hub\r\n\r\n")
        yield eventually(lambda: b"virtual_hubs" in client.received, "the answer")
        self.assertIsNone(client.lost)  # kept alive
        yield service.stopService()
        yield eventually(lambda: client.lost is not None, "the connection to be closed")

    test_stopping_closes_open_connections.timeout = 30


# -- the page in a browser ------------------------------------------------------------


class _Collect(ProcessProtocol):
    def __init__(self):
        self.out, self.err = [], []
        self.done = Deferred()

    def outReceived(self, data):
        self.out.append(data)

    def errReceived(self, data):
        self.err.append(data)

    def processEnded(self, reason):
        self.done.callback((reason.value.exitCode, b"".join(self.out), b"".join(self.err)))


def chromium(binary, profile, *args, timeout=60.0):
    """Run headless Chromium without blocking the reactor (the hub serves it meanwhile)."""
    collect = _Collect()
    argv = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", *args]
    process = reactor.spawnProcess(collect, binary, argv, env=dict(os.environ, HOME=profile))
    killer = reactor.callLater(timeout, lambda: process.signalProcess(signal.SIGKILL))

    def ended(result):
        if killer.active():
            killer.cancel()
        return result

    return collect.done.addBoth(ended)


class Browser(RunningHub, TestCase):
    """
    The page in headless Chromium, from a running hub with two cards:
    what it shows, and a port name holding markup shown as text.  With
    C{SEVPN_STATUS_SCREENSHOT=PATH} the screenshot is also kept there
    (docs/status-page.png is made so).
    """

    timeout = 180

    def setUp(self):
        self.binary = shutil.which("chromium") or shutil.which("chromium-browser")
        if self.binary is None:
            raise SkipTest("Chromium is not installed (Debian: apt-get install chromium)")
        self.profile = tempfile.mkdtemp(prefix="sevpn-chromium-")
        self.addCleanup(shutil.rmtree, self.profile, True)

    @inlineCallbacks
    def test_the_status_page_in_chromium(self):
        code, out, err = yield chromium(self.binary, self.profile, "--dump-dom", "about:blank")
        if code != 0 or b"<html" not in out:
            raise SkipTest(f"Chromium cannot run here (exit {code}): {err.decode(errors='replace')[-300:]}")

        self.start_hub("--metrics", "tcp:0:interface=127.0.0.1")
        alice, bob = yield self.two_cards_talking()
        # a first look, then steady traffic from alice to bob: the page shows rates
        yield http(self.url())
        traffic = LoopingCall(lambda: alice.lan.tap.os_sends([frame(mac(2), mac(1), b"y" * 1000)] * 20))
        traffic.start(0.1)
        self.addCleanup(traffic.stop)
        yield deferLater(reactor, web.RATE_INTERVAL + 0.2, lambda: None)

        shot = os.path.join(self.profile, "status-page.png")
        code, _, err = yield chromium(self.binary, self.profile, f"--screenshot={shot}", "--window-size=1200,800",
                                      "--hide-scrollbars", self.url())
        self.assertEqual(code, 0, err[-500:])
        with open(shot, "rb") as f:
            png = f.read()
        self.assertEqual(png[:8], b"\x89PNG\r\n\x1a\n")
        self.assertEqual((int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")), (1200, 800))
        keep = os.environ.get("SEVPN_STATUS_SCREENSHOT")
        if keep:
            shutil.copyfile(shot, keep)

        # a port whose name holds markup (an interface name may hold '<' and '>')
        bridge = Bridge(reactor, name=HOSTILE_PORT)
        self.service.hub.vhub("DEFAULT").add_port(bridge)
        self.addCleanup(self.service.hub.vhub("DEFAULT").remove_port, bridge)
        bridge.sends([frame(BROADCAST, mac(9))])
        code, dom, err = yield chromium(self.binary, self.profile, "--dump-dom", self.url())
        self.assertEqual(code, 0, err[-500:])
        page = Page(dom.decode("utf-8"))
        self.assertLessEqual(set(page.tags), PAGE_TAGS)  # no element came from the port's name
        sessions = {r["user"]: r for r in page.rows("DEFAULT", "sessions")}
        self.assertEqual(set(sessions), {"alice", "bob"})
        self.assertEqual({r["state"] for r in sessions.values()}, {"connected"})
        self.assertRegex(sessions["alice"][IN], r"^[0-9.]+ [kM]bit/s \u00b7 [0-9\u202f]+ frames/s ")
        self.assertRegex(sessions["bob"][OUT], r"^[0-9.]+ [kM]bit/s \u00b7 [0-9\u202f]+ frames/s ")
        macs = {r["MAC"]: r for r in page.rows("DEFAULT", "macs")}
        self.assertEqual(macs["02:00:00:00:00:01"]["user"], "alice")
        self.assertEqual(macs["02:00:00:00:00:02"]["user"], "bob")
        self.assertEqual(macs["02:00:00:00:00:09"]["port"], HOSTILE_PORT)
        self.assertEqual([r["port"] for r in page.rows("DEFAULT", "ports")], [HOSTILE_PORT])
        self.assertNotIn("pwned", "".join(page.text).replace(HOSTILE_PORT, ""))
