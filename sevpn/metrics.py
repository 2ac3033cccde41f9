"""
What an operator watches: one reading of the hub's state, and that
reading as Prometheus metrics.

L{read_hub} reads the counters the hub keeps anyway (sessions, ports,
switches, the handshake gate) into plain data at the moment it is asked:
the data path pays nothing for being watched.  The status page and its
JSON (L{sevpn.web}) show the same reading; L{HubCollector} turns it into
metric families for C{prometheus-client} at scrape time.

Label cardinality: per-session series carry C{hub}, C{session} and
C{user}, so their number is bounded by the hub's session limit; a
session's series end with it.  Other labels take a fixed set of values
(C{direction}, C{cause}, C{path}, C{state}, C{reason}) or name a virtual
hub or a non-session port (a bridge), which the operator configures.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Iterator, List, Tuple

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import CollectorRegistry

from sevpn.hub import Hub
from sevpn.hublink import HubLinkFactory
from sevpn.wire import Refusal

#: A reading: plain data, as L{read_hub} returns it and C{/status.json} serves it.
Reading = dict


def read_hub(hub: Hub, handshakes: HubLinkFactory) -> Reading:
    """
    The hub's state now, as plain data: the hub's own figures, then per
    virtual hub its switch counters, MAC table, sessions and other ports.
    Built from L{Hub.describe_sessions} and L{Hub.describe_macs}, the
    same descriptions C{sevpn hub sessions} and C{sevpn hub macs} show.
    """
    sessions = hub.describe_sessions()
    macs = hub.describe_macs()
    session_ports = {session.port for session in hub.sessions.values()}
    by_vhub: Dict[str, List[dict]] = {}
    for session in sessions:
        by_vhub.setdefault(session["hub"], []).append(session)
    refusals = {code: 0 for code in Refusal.MESSAGES}
    refusals.update(hub.refusals_by_code)
    vhubs = []
    for name in sorted(set(macs) | set(by_vhub)):
        described = macs.get(name, {"macs": [], "conflicts": [], "counters": {}})
        vhub = hub.vhubs.get(name)
        ports = []
        if vhub is not None:
            for port in vhub.ports:
                if port not in session_ports:
                    info = {"name": port.name, "kind": type(port).__name__, "macs": len(port.macs)}
                    info.update(port.counters())
                    ports.append(info)
        vhubs.append({
            "name": name,
            "switch": described["counters"],
            "mac_table_limit": vhub.max_entries if vhub is not None else None,
            "macs": described["macs"],
            "conflicts": described["conflicts"],
            "sessions": by_vhub.get(name, []),
            "ports": ports,
        })
    return {
        "time": hub.clock.seconds(),
        "hub": {
            "sessions": len(sessions),
            "sessions_limit": hub.max_sessions,
            "handshaking": handshakes.handshaking,
            "handshakes_limit": handshakes.admission.total,
            "turned_away": handshakes.turned_away,
            "refusals": refusals,
            "resume_window": hub.resume_window,
            "resume_memory": hub.budget.used,
            "resume_memory_limit": hub.budget.limit,
            "resume_memory_reclaimed": hub.budget.reclaimed,
        },
        "virtual_hubs": vhubs,
    }


# -- what each counter becomes ---------------------------------------------------
#
# (metric name, help, [(key in the description, extra labels)]).  A key a
# description lacks is left out, so a port kind exports what it counts.

_Series = List[Tuple[str, Dict[str, str]]]

SESSION_COUNTERS: List[Tuple[str, str, _Series]] = [
    ("sevpn_session_frames", "Frames of a session: in from its card, out to it.",
     [("frames_in", {"direction": "in"}), ("frames_out", {"direction": "out"})]),
    ("sevpn_session_bytes", "Ethernet bytes of a session: in from its card, out to it.",
     [("bytes_in", {"direction": "in"}), ("bytes_out", {"direction": "out"})]),
    ("sevpn_session_dropped_frames",
     "Frames of a session dropped, by cause: congestion (its queue was full or it stalled), "
     "resume_buffer (lost from the hub's resume buffer during an outage), lost_inbound (lost "
     "from the card's resume buffer), bad_frame (an offload frame that could not be converted).",
     [("congestion_drops", {"cause": "congestion"}), ("frames_dropped", {"cause": "resume_buffer"}),
      ("frames_lost_inbound", {"cause": "lost_inbound"}), ("bad_frames", {"cause": "bad_frame"})]),
    ("sevpn_session_resumes", "Times a session was resumed on a new connection.", [("resumes", {})]),
    ("sevpn_session_retransmitted_frames", "Frames resent to a card after a resume.",
     [("frames_retransmitted", {})]),
]

SESSION_GAUGES: List[Tuple[str, str, _Series]] = [
    ("sevpn_session_buffered_frames", "Frames sent to a card and not yet acknowledged.",
     [("frames_buffered", {})]),
    ("sevpn_session_buffered_bytes", "Bytes held in a session's resume buffer.", [("bytes_buffered", {})]),
    ("sevpn_session_macs", "Source MACs the switch learned on a session.", [("macs", {})]),
    ("sevpn_session_uptime_seconds", "Seconds since a session began.", [("uptime", {})]),
]

PORT_COUNTERS: List[Tuple[str, str, _Series]] = [
    ("sevpn_port_frames", "Frames of a port other than a session (a bridge): in to the switch, out of it.",
     [("frames_in", {"direction": "in"}), ("frames_out", {"direction": "out"})]),
    ("sevpn_port_bytes", "Bytes of a port other than a session: in to the switch, out of it.",
     [("bytes_in", {"direction": "in"}), ("bytes_out", {"direction": "out"})]),
    ("sevpn_port_dropped_frames",
     "Frames a port other than a session dropped, by cause: congestion, bad_frame, tap_write "
     "(its device refused a write).",
     [("congestion_drops", {"cause": "congestion"}), ("bad_frames", {"cause": "bad_frame"}),
      ("tap_write_drops", {"cause": "tap_write"})]),
]

SWITCH_COUNTERS: List[Tuple[str, str, _Series]] = [
    ("sevpn_switch_frames", "Frames a virtual hub switched, by path: unicast (to the one port that owns "
     "the MAC), flooded (broadcast, multicast, unknown unicast), filtered (its destination is "
     "behind the port it came from: not sent).",
     [("unicast", {"path": "unicast"}), ("flooded", {"path": "flooded"}), ("filtered", {"path": "filtered"})]),
    ("sevpn_switch_dropped_frames", "Frames a virtual hub dropped, by cause: mac_limit (a port's "
     "MAC limit), mac_conflict (a MAC another live port owns), runt (shorter than an Ethernet header), "
     "bad_header (an offload port's virtio-net header that does not hold).",
     [("mac_limit_drops", {"cause": "mac_limit"}), ("mac_conflicts", {"cause": "mac_conflict"}),
      ("runts", {"cause": "runt"}), ("bad_headers", {"cause": "bad_header"})]),
    ("sevpn_switch_not_learned", "Frames whose source MAC was not learned because the MAC table was "
     "full (they were still forwarded).", [("not_learned", {})]),
    ("sevpn_switch_port_failures", "Deliveries to a port that failed with an error (a bug; logged).",
     [("port_failures", {})]),
]


def _families(
    specs: List[Tuple[str, str, _Series]], kind, labels: List[str], rows: Iterable[Tuple[List[str], dict]]
) -> Iterator[Metric]:
    rows = list(rows)
    for name, doc, series in specs:
        extra = list(series[0][1])
        family = kind(name, doc, labels=labels + extra)
        for values, described in rows:
            for key, extra_values in series:
                value = described.get(key)
                if value is not None:
                    family.add_metric(values + [extra_values[k] for k in extra], value)
        yield family


class HubCollector:
    """
    A C{prometheus-client} collector: each scrape takes a fresh reading
    (L{read_hub}) and turns it into metric families.  Nothing is counted
    on the data path for it.
    """

    def __init__(self, read: Callable[[], Reading]) -> None:
        self.read = read

    def collect(self) -> Iterator[Metric]:
        """
        The metric families of one fresh reading: the hub's figures (sessions,
        handshakes, resume memory, refusals), each virtual hub's MAC table and
        switch counters, and each session's and port's counters.
        """
        reading = self.read()
        hub = reading["hub"]
        vhubs = reading["virtual_hubs"]

        sessions = GaugeMetricFamily(
            "sevpn_sessions", "Sessions per virtual hub, by state: connected, or held for resumption.",
            labels=["hub", "state"],
        )
        for vhub in vhubs:
            states = {"connected": 0, "held": 0}
            for session in vhub["sessions"]:
                states[session["state"]] = states.get(session["state"], 0) + 1
            for state, n in sorted(states.items()):
                sessions.add_metric([vhub["name"], state], n)
        yield sessions
        yield GaugeMetricFamily("sevpn_sessions_limit", "The most sessions the hub takes.",
                                value=hub["sessions_limit"])
        yield GaugeMetricFamily("sevpn_handshakes_in_progress", "Connections in their handshake now.",
                                value=hub["handshaking"])
        yield GaugeMetricFamily("sevpn_handshakes_limit", "The most connections in their handshake at once.",
                                value=hub["handshakes_limit"])
        yield CounterMetricFamily(
            "sevpn_connections_turned_away",
            "Connections closed at once: too many in their handshake (from their address or in all), "
            "or too many new ones a second from their address.", value=hub["turned_away"],
        )
        yield GaugeMetricFamily("sevpn_resume_memory_bytes",
                                "Bytes all sessions' resume buffers hold together.", value=hub["resume_memory"])
        yield GaugeMetricFamily("sevpn_resume_memory_limit_bytes",
                                "The most bytes all sessions' resume buffers may hold together.",
                                value=hub["resume_memory_limit"])
        yield CounterMetricFamily(
            "sevpn_resume_memory_reclaimed_bytes",
            "Bytes let go from resume buffers (held sessions' first) to stay within the hub's limit.",
            value=hub["resume_memory_reclaimed"],
        )
        refusals = CounterMetricFamily(
            "sevpn_refusals", "Cards turned away, by the refusal's code (auth-failed, bad-hello, hub-full, ...).",
            labels=["reason"],
        )
        for code, n in sorted(hub["refusals"].items()):
            refusals.add_metric([code], n)
        yield refusals

        entries = GaugeMetricFamily("sevpn_mac_table_entries", "MACs a virtual hub's switch knows.", labels=["hub"])
        limit = GaugeMetricFamily("sevpn_mac_table_limit", "The most MACs a virtual hub's switch learns.",
                                  labels=["hub"])
        conflicts = GaugeMetricFamily("sevpn_mac_conflicts_active",
                                      "MACs two live ports of a virtual hub were seen sending from.", labels=["hub"])
        for vhub in vhubs:
            entries.add_metric([vhub["name"]], len(vhub["macs"]))
            if vhub["mac_table_limit"] is not None:
                limit.add_metric([vhub["name"]], vhub["mac_table_limit"])
            conflicts.add_metric([vhub["name"]], len(vhub["conflicts"]))
        yield from (entries, limit, conflicts)
        yield from _families(SWITCH_COUNTERS, CounterMetricFamily, ["hub"],
                             (([v["name"]], v["switch"]) for v in vhubs))

        session_rows = [([s["hub"], s["id"], s["user"]], s) for v in vhubs for s in v["sessions"]]
        session_labels = ["hub", "session", "user"]
        connected = GaugeMetricFamily("sevpn_session_connected",
                                      "1 while a link carries the session, 0 while it is held.", labels=session_labels)
        for values, session in session_rows:
            connected.add_metric(values, 1 if session["state"] == "connected" else 0)
        yield connected
        yield from _families(SESSION_COUNTERS, CounterMetricFamily, session_labels, session_rows)
        yield from _families(SESSION_GAUGES, GaugeMetricFamily, session_labels, session_rows)

        port_rows = [([v["name"], p["name"]], p) for v in vhubs for p in v["ports"]]
        yield from _families(PORT_COUNTERS, CounterMetricFamily, ["hub", "port"], port_rows)
        yield from _families([("sevpn_port_macs", "Source MACs the switch learned on a port other than a session.",
                               [("macs", {})])], GaugeMetricFamily, ["hub", "port"], port_rows)


def registry_for(read: Callable[[], Reading]) -> CollectorRegistry:
    """A registry of the hub's metrics and its process figures (C{process_*}: memory, CPU, files)."""
    registry = CollectorRegistry()
    registry.register(HubCollector(read))
    ProcessCollector(registry=registry)
    return registry
