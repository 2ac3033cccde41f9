"""
The hub's HTTP listener for operators (C{twistd sevpn-hub --metrics
ENDPOINT}): Prometheus metrics, a status page and its data, read-only.

 - C{/metrics}: the Prometheus exposition of L{sevpn.metrics.HubCollector}
   and the process figures;
 - C{/}: a status page: plain HTML, no scripts and no external assets,
   that reloads itself every few seconds;
 - C{/status.json}: the reading the page shows, with the rates.

Everything is read from the hub when asked (L{sevpn.metrics.read_hub}),
on the reactor thread, so a reading never races the data path and costs
it nothing between requests; the reading is made into bytes in a worker
thread (L{Views}).  Rates come from the readings the server keeps
(L{RateMeter}: the newest two, at least a second apart), so the page
needs no script to compute them.

What came from users (user names, peers, port names) is escaped where
the page is made (L{render_page}), and the page's Content-Security-Policy
allows no script at all.  The page names users and their addresses, so
the listener must be on loopback unless the operator says otherwise
(L{listen}'s C{public}).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import html
import ipaddress
import json
import time
from typing import Callable, Dict, List, Optional, Sequence

from prometheus_client.exposition import choose_encoder, gzip_accepted
from twisted.internet.address import UNIXAddress
from twisted.internet.defer import Deferred, DeferredLock, gatherResults, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from sevpn import metrics
from sevpn.metrics import Reading

#: Seconds between the page's reloads.
REFRESH = 5
#: The newest reading kept for rates must be at least this much older than the next.
RATE_INTERVAL = 1.0
#: Open connections the listener takes at once; more are closed at once.
MAX_CONNECTIONS = 64
#: Seconds an idle HTTP connection is kept.
IDLE_TIMEOUT = 60


log = Logger()


class MetricsError(ValueError):
    """The metrics endpoint cannot be served; the message says why, naming the option."""


# -- rates -------------------------------------------------------------------

_RATE_KEYS = ("frames_in", "frames_out", "bytes_in", "bytes_out")


class RateMeter:
    """
    Per-session rates from the readings the server keeps: the newest two
    that are at least C{min_interval} apart.  Memory: two readings' four
    counters per current session.  Pure: time is the readings' own.
    """

    def __init__(self, min_interval: float = RATE_INTERVAL) -> None:
        self.min_interval = min_interval
        self._older: Optional[tuple] = None
        self._newer: Optional[tuple] = None

    def rates(self, reading: Reading) -> Dict[str, dict]:
        """Per session id: C{frames_in}, C{frames_out} per second, C{bits_in}, C{bits_out} per second."""
        sample = (
            reading["time"],
            {s["id"]: tuple(s[k] for k in _RATE_KEYS) for v in reading["virtual_hubs"] for s in v["sessions"]},
        )
        if self._newer is None or sample[0] - self._newer[0] >= self.min_interval:
            self._older, self._newer = self._newer, sample
        if self._older is None:
            return {}
        (t0, old), (t1, new) = self._older, self._newer
        span = t1 - t0
        rates = {}
        for sid, now in new.items():
            then = old.get(sid)
            if then is not None:
                frames_in, frames_out, bytes_in, bytes_out = ((n - o) / span for n, o in zip(now, then))
                rates[sid] = {
                    "frames_in": frames_in, "frames_out": frames_out,
                    "bits_in": bytes_in * 8, "bits_out": bytes_out * 8,
                }
        return rates


# -- the page ----------------------------------------------------------------

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1d2430;background:#fafbfc}
h1{font-size:1.5em;margin:0 0 .2em}h2{font-size:1.2em;margin:1.6em 0 .3em}h3{font-size:1em;margin:1em 0 .3em}
.meta,.counters{color:#4a5568;margin:.2em 0}
table{border-collapse:collapse;background:#fff;margin:.3em 0}
th,td{border:1px solid #d8dee6;padding:.2em .45em;text-align:left;vertical-align:top;font-size:13px}
th{background:#eef1f5;font-weight:600}td.n{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
.mono{font-family:ui-monospace,monospace}
.connected{color:#176b2c;font-weight:600}.held{color:#a15c00;font-weight:600}
.none,.total{color:#6b7585}.warn{color:#b42318}
footer{margin-top:2em;color:#4a5568}
""".strip()

#: No script may run on the page, whatever a user's name holds; only the style above.
CSP = (
    "default-src 'none'; style-src 'sha256-"
    + base64.b64encode(hashlib.sha256(STYLE.encode("utf-8")).digest()).decode("ascii")
    + "'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def esc(value: object) -> str:
    """C{value} as HTML text: markup in it is shown, never obeyed."""
    return html.escape(str(value), quote=True)


def _count(n: float) -> str:
    return f"{n:,.0f}".replace(",", "\u202f")


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _bits(n: float) -> str:
    for unit in ("bit/s", "kbit/s", "Mbit/s", "Gbit/s"):
        if n < 1000 or unit == "Gbit/s":
            return f"{n:.0f} {unit}" if unit == "bit/s" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, seconds = divmod(seconds, 86400)
    clock = f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    return f"{days} d {clock}" if days else clock


def _traffic(session: dict, rate: Optional[dict], direction: str) -> str:
    """A direction's rate (bit/s, frames/s), then its totals."""
    if rate is None:
        now = '<span class="none">\u2014</span>'
    else:
        now = f"{esc(_bits(rate['bits_' + direction]))} \u00b7 {esc(_count(rate['frames_' + direction]))} frames/s"
    frames = session["frames_" + direction]
    total = f"{_count(frames)} frame{'' if frames == 1 else 's'} \u00b7 {_bytes(session['bytes_' + direction])}"
    return f'{now}<br><span class="total">{esc(total)}</span>'


def _table(css: str, headers: Sequence[str], rows: List[str], empty: str) -> str:
    if not rows:
        return f'<p class="none">{esc(empty)}</p>'
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _session_row(s: dict, rate: Optional[dict]) -> str:
    drops = s.get("congestion_drops", 0) + s.get("frames_dropped", 0) + s.get("bad_frames", 0)
    lost = s.get("frames_lost_inbound", 0)
    drops_text = _count(drops) + (f" (+{_count(lost)} lost by the card)" if lost else "")
    return (
        f'<tr data-session="{esc(s["id"])}">'
        f'<td class="mono">{esc(s["id"])}</td>'
        f'<td class="user">{esc(s["user"])}</td>'
        f'<td class="state {esc(s["state"])}">{esc(s["state"])}</td>'
        f'<td class="mono peer">{esc(s["peer"])}</td>'
        f'<td class="mono">{esc(s["card_mac"] or "")}</td>'
        f'<td class="n">{esc(_duration(s["uptime"]))}</td>'
        f'<td class="n">{_traffic(s, rate, "in")}</td>'
        f'<td class="n">{_traffic(s, rate, "out")}</td>'
        f'<td class="n{" warn" if drops or lost else ""}">{esc(drops_text)}</td>'
        f'<td class="n">{esc(_count(s["resumes"]))}</td>'
        f'<td class="n">{esc(s["macs"])}</td>'
        "</tr>"
    )


def _port_row(p: dict) -> str:
    drops = sum(v for k, v in p.items() if k in ("congestion_drops", "bad_frames", "tap_write_drops"))
    return (
        f'<tr><td class="mono port">{esc(p["name"])}</td><td>{esc(p["kind"])}</td>'
        f'<td class="n">{esc(p["macs"])}</td><td class="n">{esc(_count(drops))}</td></tr>'
    )


def _vhub(v: dict, rates: Dict[str, dict]) -> str:
    users = {s["id"]: s["user"] for s in v["sessions"]}
    c = v["switch"]
    limit = v["mac_table_limit"]
    counters = " \u00b7 ".join(
        f"{label} {_count(c.get(key, 0))}"
        for label, key in (
            ("unicast", "unicast"), ("flooded", "flooded"), ("filtered", "filtered"),
            ("MAC-limit drops", "mac_limit_drops"), ("MAC-conflict drops", "mac_conflicts"),
            ("runts", "runts"), ("bad offload headers", "bad_headers"), ("not learned (table full)", "not_learned"),
            ("port failures", "port_failures"),
        )
    )
    macs = f"{len(v['macs'])}" + (f" of {limit}" if limit is not None else "")
    sessions = _table(
        "sessions",
        ["session", "user", "state", "peer", "card MAC", "uptime", "in (from the card)", "out (to the card)",
         "dropped", "resumes", "MACs"],
        [_session_row(s, rates.get(s["id"])) for s in v["sessions"]],
        "No sessions.",
    )
    parts = [
        f'<section class="vhub" data-hub="{esc(v["name"])}">',
        f"<h2>Virtual hub {esc(v['name'])}</h2>",
        f'<p class="counters">{esc(counters)}</p>',
        "<h3>Sessions</h3>",
        sessions,
    ]
    if v["ports"]:
        parts += ["<h3>Other ports</h3>",
                  _table("ports", ["port", "kind", "MACs", "dropped"], [_port_row(p) for p in v["ports"]], "")]
    parts += [
        f"<h3>MAC table ({esc(macs)} MACs)</h3>",
        _table(
            "macs", ["MAC", "port", "user", "age"],
            [
                f'<tr><td class="mono">{esc(m["mac"])}</td><td class="mono port">{esc(m["port"])}</td>'
                f'<td class="user">{esc(users.get(m["port"], ""))}</td><td class="n">{esc(_duration(m["age"]))}</td></tr>'
                for m in v["macs"]
            ],
            "No MACs learned.",
        ),
    ]
    if v["conflicts"]:
        parts += [
            "<h3>MAC conflicts</h3>",
            _table(
                "conflicts", ["MAC", "ports", "frames"],
                [
                    f'<tr><td class="mono">{esc(c["mac"])}</td><td class="mono">{esc(", ".join(c["ports"]))}</td>'
                    f'<td class="n">{esc(_count(c["count"]))}</td></tr>'
                    for c in v["conflicts"]
                ],
                "",
            ),
        ]
    parts.append("</section>")
    return "".join(parts)


def render_page(reading: Reading, rates: Dict[str, dict], refresh: int = REFRESH) -> bytes:
    """The status page for C{reading}: every value escaped, no script."""
    hub = reading["hub"]
    refused = ", ".join(f"{code} {_count(n)}" for code, n in sorted(hub["refusals"].items()) if n) or "none"
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(reading["time"]))
    summary = (
        f"{_count(hub['sessions'])} of {_count(hub['sessions_limit'])} sessions \u00b7 "
        f"{_count(hub['handshaking'])} handshakes in progress \u00b7 "
        f"{_count(hub['turned_away'])} connections turned away \u00b7 refusals: {refused} \u00b7 "
        f"resume window {hub['resume_window']:g} s \u00b7 "
        f"resume buffers {_bytes(hub['resume_memory'])} of {_bytes(hub['resume_memory_limit'])}"
        + (f" ({_bytes(hub['resume_memory_reclaimed'])} let go)" if hub["resume_memory_reclaimed"] else "")
    )
    body = "".join(_vhub(v, rates) for v in reading["virtual_hubs"])
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="refresh" content="{int(refresh)}">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>sevpn hub</title><style>{STYLE}</style></head><body>"
        f'<header><h1>sevpn hub</h1><p class="meta" id="summary">{esc(summary)}</p>'
        f'<p class="meta">Read at {esc(when)}; this page reloads every {int(refresh)} s. '
        "Rates are over the last few seconds; counters since each session began.</p></header>"
        f"{body}"
        '<footer><a href="/metrics">Prometheus metrics</a> \u00b7 <a href="/status.json">this page as JSON</a>'
        "</footer></body></html>"
    )
    return page.encode("utf-8")


# -- HTTP --------------------------------------------------------------------


def _headers(request, content_type: bytes) -> None:
    request.setHeader(b"content-type", content_type)
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"x-content-type-options", b"nosniff")
    request.setHeader(b"referrer-policy", b"no-referrer")
    request.setHeader(b"x-frame-options", b"DENY")
    request.setHeader(b"content-security-policy", CSP.encode("ascii"))
    request.setHeader(b"server", b"sevpn")


class Views:
    """
    What the listener's pages share: the hub's reading, the rates kept
    between readings, and one lock, so one view is made at a time (its
    memory is one rendering, however many ask).

    A reading is taken on the reactor thread (it reads the hub's live
    objects, cheaply: ~25 ms for 4096 sessions); turning it into bytes is
    the costly part (the Prometheus text of 4096 sessions takes most of a
    second) and runs in a worker thread on that private reading, so the
    data path is not stopped for it.
    """

    def __init__(self, read: Callable[[], Reading], reactor, pool) -> None:
        self.read = read
        self.reactor = reactor
        self.pool = pool
        self.meter = RateMeter()
        self.lock = DeferredLock()

    def make(self, render: Callable, *args) -> Deferred:
        """C{render(reading, rates, *args)} in a worker thread, after the views before it."""

        def rendered(reading):
            rates = self.meter.rates(reading)
            return deferToThreadPool(self.reactor, self.pool, render, reading, rates, *args)

        # a hub with --workers reads every worker: the reading may come later
        return self.lock.run(lambda: maybeDeferred(self.read).addCallback(rendered))


class View(Resource):
    """A read-only view: GET and HEAD only, nothing here changes the hub."""

    isLeaf = True

    def __init__(self, views: Views) -> None:
        super().__init__()
        self.views = views

    def render_bytes(self, reading: Reading, rates: Dict[str, dict], wanted: Dict[bytes, str]) -> tuple:
        """
        C{(content type, body, extra headers)} for C{reading}; runs in a
        worker thread.  C{wanted}: the request's C{accept} and
        C{accept-encoding} headers.
        """
        raise NotImplementedError

    def render_GET(self, request):
        """
        Answer later: the view is made in a worker thread (L{Views.make}) so that
        rendering never holds up the reactor; a client that left meanwhile is
        sent nothing, and a failure is logged and answered with a 500.
        """
        gone: list = []
        request.notifyFinish().addErrback(gone.append)
        wanted = {name: (request.getHeader(name) or b"").decode("latin-1") for name in (b"accept", b"accept-encoding")}

        def made(result) -> None:
            if gone:
                return  # the client left meanwhile
            content_type, body, extra = result
            _headers(request, content_type)
            for name, value in extra.items():
                request.setHeader(name, value)
            request.setHeader(b"content-length", b"%d" % len(body))
            request.write(body)
            request.finish()

        def failed(failure) -> None:
            log.failure("could not make {path}", failure, path=request.path.decode("latin-1"))
            if not gone:
                request.setResponseCode(500)
                request.finish()

        self.views.make(self.render_bytes, wanted).addCallbacks(made, failed)
        return NOT_DONE_YET


class StatusPage(View):
    """C{/}: the page."""

    def render_bytes(self, reading, rates, wanted):
        return b"text/html; charset=utf-8", render_page(reading, rates), {}


class StatusData(View):
    """C{/status.json}: the reading, each session with its C{rates} (absent on the first reading)."""

    def render_bytes(self, reading, rates, wanted):
        for vhub in reading["virtual_hubs"]:
            for session in vhub["sessions"]:
                if session["id"] in rates:
                    session["rates"] = rates[session["id"]]
        return b"application/json", json.dumps(reading, indent=1, sort_keys=True).encode("utf-8"), {}


class MetricsPage(View):
    """
    C{/metrics}: the reading as metrics (L{sevpn.metrics.HubCollector}) and
    the process figures, in the format the scraper asks for (Prometheus
    text or OpenMetrics), gzipped if it takes gzip.
    """

    def render_bytes(self, reading, rates, wanted):
        """
        The metrics in the format of the scraper's C{accept} header, gzipped
        if its C{accept-encoding} takes gzip.
        """
        encoder, content_type = choose_encoder(wanted[b"accept"])
        output = encoder(metrics.registry_for(lambda: reading))
        if gzip_accepted(wanted[b"accept-encoding"]):
            return content_type.encode("ascii"), gzip.compress(output), {b"content-encoding": b"gzip"}
        return content_type.encode("ascii"), output, {}


class StatusSite(Site):
    """The listener's site: no access log (a scrape every few seconds is not an event)."""

    noisy = False

    def log(self, request) -> None:
        pass


def site_for(read: Callable[[], Reading], reactor) -> Site:
    """The site: C{/}, C{/metrics} and C{/status.json} over the readings of C{read}."""
    views = Views(read, reactor, reactor.getThreadPool())
    root = Resource()
    root.putChild(b"", StatusPage(views))
    root.putChild(b"status.json", StatusData(views))
    root.putChild(b"metrics", MetricsPage(views))
    return StatusSite(root, timeout=IDLE_TIMEOUT, reactor=reactor)


class ConnectionLimit(WrappingFactory):
    """At most C{limit} open connections; more are closed at once."""

    noisy = False

    def __init__(self, wrapped, limit: Optional[int] = None) -> None:
        super().__init__(wrapped)
        self.limit = MAX_CONNECTIONS if limit is None else limit
        self.turned_away = 0
        self._closing: Dict[object, Deferred] = {}

    def buildProtocol(self, addr):
        if len(self.protocols) >= self.limit:
            self.turned_away += 1
            return None
        return super().buildProtocol(addr)

    def unregisterProtocol(self, protocol) -> None:
        super().unregisterProtocol(protocol)
        closing = self._closing.pop(protocol, None)
        if closing is not None:
            closing.callback(None)

    def close_all(self) -> Deferred:
        """Close every open connection; fires when they are gone."""
        gone = []
        for protocol in list(self.protocols):
            gone.append(self._closing.setdefault(protocol, Deferred()))
            protocol.transport.abortConnection()
        return gatherResults(gone)


def beyond_loopback(address) -> bool:
    """Whether a listening address can be reached from other hosts."""
    if isinstance(address, UNIXAddress):
        return False
    host = str(getattr(address, "host", "")).split("%")[0]
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


class MetricsListener:
    """The listening port and its connections, stopped together."""

    def __init__(self, port, factory: ConnectionLimit) -> None:
        self.port = port
        self.factory = factory

    def getHost(self):
        return self.port.getHost()

    def stopListening(self) -> Deferred:
        """Stop listening and close the open connections; fires when they are all gone."""
        return gatherResults([maybeDeferred(self.port.stopListening), self.factory.close_all()])


def listen(reactor, description: str, read: Callable[[], Reading], public: bool = False) -> MetricsListener:
    """
    Serve the hub's metrics and status page on the endpoint C{description}.
    A listener reachable beyond loopback is refused unless C{public}: the
    page names users, their addresses and MACs to whoever reaches it, and
    asks nobody who they are.  Raises L{MetricsError}.
    """
    factory = ConnectionLimit(site_for(read, reactor))
    result: list = []
    try:
        serverFromString(reactor, description).listen(factory).addBoth(result.append)
    except (ValueError, TypeError, KeyError) as e:
        raise MetricsError(f"--metrics {description}: not an endpoint description ({e})")
    if not result or not hasattr(result[0], "stopListening"):
        why = result[0].getErrorMessage() if result else "no answer"
        raise MetricsError(f"--metrics: cannot listen on {description}: {why}")
    port = result[0]
    host = port.getHost()
    if beyond_loopback(host) and not public:
        port.stopListening()
        raise MetricsError(
            f"--metrics {description} would serve beyond loopback (on {getattr(host, 'host', host)}): the "
            "status page shows user names, their addresses and MACs to anyone who reaches it; add "
            "interface=127.0.0.1 (or ::1), or add --metrics-public to mean it"
        )
    listener = MetricsListener(port, factory)
    if hasattr(host, "port"):
        where = f"http://{_url_host(host)}/"
    else:
        name = getattr(host, "name", host)
        where = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
    log.info(
        "metrics and status page at {where} (/metrics for Prometheus, /status.json){public}",
        where=where, public=", beyond loopback (--metrics-public)" if beyond_loopback(host) else "",
    )
    return listener


def _url_host(address) -> str:
    host = str(address.host)
    return f"[{host}]:{address.port}" if ":" in host else f"{host}:{address.port}"
