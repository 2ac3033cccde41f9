"""
make bench over real lines: card-to-card iperf3 TCP (both directions),
idle ping and ping under load over three emulated internet lines
(L{scripts.wan}), for the bare path through the hub's namespace and for
sevpn, with sevpn/bare ratios.  Every sevpn run also records what explains
its figure: the outer TCP as C{ss -tinm} sees it mid-run (cwnd, RTT, send
buffer, unsent bytes, delivery rate, how long it was send-buffer limited),
sevpn's own counters (C{sevpn nic status --json}, C{sevpn hub sessions
--json}), the lines' drops (wanem's counters) and the CPU the hub and
cards used.  A benchmark, not a test: it prints figures and asserts nothing.

    LINES=A,C DUR=10 python scripts/bench_wan.py     (LINES: A, B, C, all; default all)
    BENCH_JSON=out.json                              also write every figure and ss sample
    SEVPN_NIC_ARGS="..."                             extra flags for both cards
"""

from __future__ import annotations

import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts import procstat  # noqa: E402
from scripts.netns import two_cards  # noqa: E402
from scripts.wan import Line, LineTopology, build_wanem, counter_delta, line_skip_reason, select_lines  # noqa: E402

DUR = int(os.environ.get("DUR", "10"))
HUB_PORT = 5555
NAN = float("nan")


# ss -tinm --------------------------------------------------------------------------


def parse_rate(text: str) -> float:
    """C{"33.8Mbps"} -> 33.8 (Mbit/s)."""
    m = re.fullmatch(r"([\d.]+)([KMG]?)bps", text)
    if not m:
        return NAN
    return float(m.group(1)) * {"": 1e-6, "K": 1e-3, "M": 1.0, "G": 1e3}[m.group(2)]


def parse_ss(text: str) -> List[dict]:
    """
    The sockets in C{ss -tinmH} output, one dict each: C{local}, C{peer},
    C{send_q} (bytes unacknowledged or unsent), the C{skmem} fields (C{tb}
    the send buffer's size, C{w} the bytes queued in it), and from the info
    line C{cwnd}, C{unacked} (segments in flight), C{mss}, C{rtt_ms},
    C{notsent}, C{snd_wnd}, C{delivery_mbps}, C{pacing_mbps}, and the
    connection's running totals C{retrans}, C{bytes_acked}, C{busy_ms},
    C{sndbuf_limited_ms}, C{rwnd_limited_ms}.  ss leaves out a figure that
    is zero; so does this.
    """
    sockets: List[dict] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            fields = line.split()
            # State Recv-Q Send-Q Local Peer (no state column with "state established")
            if not fields[0][0].isdigit():
                fields = fields[1:]
            if len(fields) < 4 or not (fields[0].isdigit() and fields[1].isdigit()):
                continue  # a header line
            sockets.append({"recv_q": int(fields[0]), "send_q": int(fields[1]), "local": fields[2], "peer": fields[3]})
            continue
        if not sockets:
            continue
        s = sockets[-1]
        m = re.search(r"skmem:\(([^)]*)\)", line)
        if m:
            for item in m.group(1).split(","):
                km = re.fullmatch(r"([a-z]+)(\d+)", item)
                if km:
                    s[km.group(1)] = int(km.group(2))
        for key in ("cwnd", "notsent", "unacked", "mss", "lost", "snd_wnd", "bytes_acked", "bytes_retrans"):
            m = re.search(rf"\b{key}:(\d+)", line)
            if m:
                s[key] = int(m.group(1))
        m = re.search(r"\brtt:([\d.]+)/([\d.]+)", line)
        if m:
            s["rtt_ms"], s["rttvar_ms"] = float(m.group(1)), float(m.group(2))
        m = re.search(r"\bminrtt:([\d.]+)", line)
        if m:
            s["minrtt_ms"] = float(m.group(1))
        m = re.search(r"\bretrans:\d+/(\d+)", line)
        if m:
            s["retrans"] = int(m.group(1))
        for key, name in (("delivery_rate", "delivery_mbps"), ("pacing_rate", "pacing_mbps"), ("send", "send_mbps")):
            m = re.search(rf"(?:^|\s){key} (\S+)", line)
            if m:
                s[name] = parse_rate(m.group(1))
        m = re.search(r"\bbusy:(\d+)ms", line)
        if m:
            s["busy_ms"] = int(m.group(1))
        for key in ("sndbuf_limited", "rwnd_limited"):
            m = re.search(rf"\b{key}:(\d+)ms", line)
            if m:
                s[f"{key}_ms"] = int(m.group(1))
    return sockets


#: Instantaneous figures (medians over a run) and running totals (differences over a run).
SS_GAUGES = ("cwnd", "unacked", "mss", "rtt_ms", "tb", "w", "notsent", "snd_wnd", "delivery_mbps", "pacing_mbps")
SS_TOTALS = ("retrans", "bytes_acked", "busy_ms", "sndbuf_limited_ms", "rwnd_limited_ms")


def summarize_leg(samples: List[dict], start: float, end: float) -> dict:
    """
    One outer connection over a run: the medians of its gauges over the
    samples from C{start} to C{end} seconds (zero where ss left a figure
    out); its totals' growth from the first sample to the last (of the same
    connection), with the share of busy time it was send-buffer or
    receive-window limited; and the rate it carried (bytes acknowledged)
    from C{start} to C{end}.
    """
    if not samples:
        return {"samples": 0}
    last = samples[-1]
    same = [s for s in samples if (s["local"], s["peer"]) == (last["local"], last["peer"])]
    taken = [s for s in same if start <= s["at_s"] <= end] or same
    out = {"samples": len(taken), "connections": len({(s["local"], s["peer"]) for s in samples})}
    for key in SS_GAUGES:
        out[key] = statistics.median(s.get(key, 0) for s in taken)
    first = same[0]
    for key in SS_TOTALS:
        out[f"{key}_delta"] = last.get(key, 0) - first.get(key, 0)
    busy = out["busy_ms_delta"]
    out["sndbuf_limited_pct"] = 100 * out["sndbuf_limited_ms_delta"] / busy if busy > 0 else NAN
    out["rwnd_limited_pct"] = 100 * out["rwnd_limited_ms_delta"] / busy if busy > 0 else NAN
    seconds = taken[-1]["at_s"] - taken[0]["at_s"]
    acked = taken[-1].get("bytes_acked", 0) - taken[0].get("bytes_acked", 0)
    out["acked_mbps"] = acked * 8 / seconds / 1e6 if seconds > 0 else NAN
    return out


class OuterTcpSampler:
    """
    Samples outer TCP connections with C{ss -tinm} once a second in a
    thread, while a run goes on, and once more when it ends.  C{legs} maps
    a label to (namespace, ss filter); each should match one connection.
    A sample is a L{parse_ss} dict with C{at_s}, seconds since the start.
    """

    def __init__(self, topo, legs: Dict[str, tuple], interval: float = 1.0) -> None:
        self.topo = topo
        self.legs = legs
        self.interval = interval
        self.samples: Dict[str, List[dict]] = {label: [] for label in legs}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._start = 0.0

    def __enter__(self) -> "OuterTcpSampler":
        self._start = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)
        self._sample()  # the totals up to the end of the run

    def _sample(self) -> None:
        t = time.monotonic() - self._start
        for label, (ns, filt) in self.legs.items():
            out = self.topo.run(ns, "ss", "-tinmH", "state", "established", filt, check=False, timeout=10)
            for sock in parse_ss(out):
                sock["at_s"] = round(t, 2)
                self.samples[label].append(sock)

    def _run(self) -> None:
        self._sample()
        while not self._stop.wait(self.interval):
            self._sample()

    def summary(self, start: float, end: float) -> Dict[str, dict]:
        """L{summarize_leg} for each leg."""
        return {label: summarize_leg(samples, start, end) for label, samples in self.samples.items()}


# measurements ----------------------------------------------------------------------


def ping_stats(topo, src: int, addr: str, count: int = 20, interval: str = "0.2") -> dict:
    out = topo.run(topo.host(src), "ping", "-q", "-c", str(count), "-i", interval, "-W", "2", addr,
                   check=False, timeout=count * float(interval) + 30)
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    r = re.search(r"= [\d.]+/([\d.]+)/([\d.]+)", out)
    return {
        "sent": int(m.group(1)) if m else 0,
        "lost": int(m.group(1)) - int(m.group(2)) if m else count,
        "avg_ms": float(r.group(1)) if r else NAN,
        "max_ms": float(r.group(2)) if r else NAN,
    }


def iperf_tcp(topo, addr: str, reverse: bool = False, during: Optional[Callable[[], None]] = None) -> dict:
    """iperf3 TCP from host 1 to host 2 (C{reverse}: 2 to 1) for DUR s; Mbit/s received and sender retransmits."""
    server = topo.spawn(topo.host(2), "iperf3-server", "iperf3", "-s", "-1", "-B", addr)
    time.sleep(0.5)
    args = ["iperf3", "-c", addr, "-t", str(DUR), "-J", "--connect-timeout", "5000"] + (["-R"] if reverse else [])
    out = topo.run(topo.host(1), *args, check=False, timeout=DUR + 60)
    try:
        server.wait(10)
    except subprocess.TimeoutExpired:
        topo.stop(server)
    try:
        end = json.loads(out)["end"]
        return {"mbps": end["sum_received"]["bits_per_second"] / 1e6,
                "retransmits": end["sum_sent"].get("retransmits", 0)}
    except (ValueError, KeyError):
        error = re.search(r'"error":\s*"([^"]*)"', out)
        return {"mbps": NAN, "retransmits": None, "error": error.group(1) if error else out[-200:]}


def loaded_ping(topo, addr: str) -> dict:
    """Ping host 1 to 2 while one iperf3 TCP stream (1 to 2) fills the path."""
    server = topo.spawn(topo.host(2), "iperf3-server", "iperf3", "-s", "-1", "-B", addr)
    time.sleep(0.5)
    load = subprocess.Popen(["ip", "netns", "exec", topo.host(1), "iperf3", "-c", addr, "-t", str(DUR),
                             "--connect-timeout", "5000"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(2)  # past slow start
    result = ping_stats(topo, 1, addr, count=max(5, (DUR - 3) * 5), interval="0.2")
    try:
        load.wait(DUR + 30)
        server.wait(10)
    except subprocess.TimeoutExpired:
        load.kill()
        topo.stop(server)
    return result


# sevpn's side of a run -----------------------------------------------------------

#: The counters that explain a figure (deltas over a run).
SEVPN_COUNTERS = ("congestion_drops", "frames_retransmitted", "frames_dropped", "frames_lost_inbound", "resumes",
                  "reconnects", "tap_write_drops")


def sevpn_counters(topo) -> Dict[str, dict]:
    """Card 1's and 2's status and the hub's sessions (by user), as their --json shows them."""
    out = {f"card{i}": topo.card_status(i) for i in (1, 2)}
    for session in topo.hub_sessions():
        out[f"hub:{session['user']}"] = session
    return out


def counters_delta(after: Dict[str, dict], before: Dict[str, dict]) -> Dict[str, dict]:
    out = {}
    for who, info in after.items():
        prev = before.get(who, {})
        out[who] = {k: info[k] - prev.get(k, 0) for k in SEVPN_COUNTERS if isinstance(info.get(k), int)}
    return out


def sevpn_pids(topo) -> Dict[str, int]:
    pids = {"hub": procstat.find_pid(topo.hub_ns, b"sevpn-hub")}
    for i in (1, 2):
        pids[f"card{i}"] = procstat.find_pid(topo.host(i), b"sevpn-nic")
    return {k: v for k, v in pids.items() if v}


def outer_legs(topo, reverse: bool) -> Dict[str, tuple]:
    """The sending card's connection to the hub, and the hub's to the receiving card."""
    sender, receiver = (2, 1) if reverse else (1, 2)
    return {
        "card→hub": (topo.host(sender), f"( dport = :{HUB_PORT} )"),
        "hub→card": (topo.hub_ns, f"( sport = :{HUB_PORT} and dst {topo.host_addr(receiver)} )"),
    }


def explained_run(topo, addr: str, reverse: bool, is_sevpn: bool) -> dict:
    """One iperf3 run with what explains it: ss samples, sevpn's counters, the lines' drops, CPU."""
    lines_before = topo.wanem_counters()
    counters_before = sevpn_counters(topo) if is_sevpn else {}
    pids = sevpn_pids(topo) if is_sevpn else {}
    cpu_before, t0 = procstat.snapshot(pids), time.monotonic()
    if is_sevpn:
        with OuterTcpSampler(topo, outer_legs(topo, reverse)) as sampler:
            result = iperf_tcp(topo, addr, reverse)
        # iperf3 starts about 0.5 s after the first sample
        result["outer_tcp"] = sampler.summary(start=0.5 + DUR * 0.3, end=0.5 + DUR)
        result["outer_tcp_samples"] = sampler.samples
    else:
        result = iperf_tcp(topo, addr, reverse)
    elapsed = time.monotonic() - t0
    cpu_after = procstat.snapshot(pids)
    result["cpu_pct"] = {k: 100 * (cpu_after[k] - cpu_before[k]) / elapsed for k in pids}
    if is_sevpn:
        result["sevpn"] = counters_delta(sevpn_counters(topo), counters_before)
    result["line"] = {i: counter_delta(after, lines_before.get(i, {})) for i, after in topo.wanem_counters().items()}
    return result


def measure(topo, addr: str, is_sevpn: bool) -> dict:
    return {
        "ping": ping_stats(topo, 1, addr),
        "tcp": explained_run(topo, addr, False, is_sevpn),
        "tcp_reverse": explained_run(topo, addr, True, is_sevpn),
        "loaded_ping": loaded_ping(topo, addr),
    }


def last_error(topo) -> str:
    """The first exception line in the cards' and hub's logs (the cause, as a rule), to say why sevpn failed."""
    for name in ("card1", "card2", "hub"):
        found = re.findall(r"^\s*(\S*(?:Error|Exception|NoTransition)\b.*)$", topo.log(name), re.M)
        if found:
            return f" ({name}: {found[0].strip()[:200]})"
    return ""


def run_line(line: Line, wanem: str) -> Dict[str, dict]:
    """Bare path, then sevpn, over one line; a path that fails is reported with its reason."""
    results: Dict[str, dict] = {}
    print(f"-- {line.describe()}", flush=True)
    topo = LineTopology(line, wanem)
    try:
        try:
            topo.run(topo.hub_ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            topo.run(topo.host(1), "ip", "route", "add", f"10.{topo.subnet}.2.0/24", "via", topo.hub_addr(1))
            topo.run(topo.host(2), "ip", "route", "add", f"10.{topo.subnet}.1.0/24", "via", topo.hub_addr(2))
            ping_stats(topo, 1, topo.host_addr(2), count=2)  # ARP on both segments, not in the figures
            results["bare"] = measure(topo, topo.host_addr(2), is_sevpn=False)
        except Exception as e:  # noqa: BLE001 - a benchmark reports and goes on
            results["bare"] = {"error": str(e)[:300]}
        topo.run(topo.hub_ns, "sysctl", "-qw", "net.ipv4.ip_forward=0")
        try:
            extra = tuple(shlex.split(os.environ.get("SEVPN_NIC_ARGS", "")))
            two_cards(topo, card_args=extra)
            if not topo.ping(1, 2, count=5, check=False):
                raise RuntimeError("the cards connected, but no ping crosses sevpn" + last_error(topo))
            results["sevpn"] = measure(topo, topo.tap_addr(2), is_sevpn=True)
        except Exception as e:  # noqa: BLE001
            results["sevpn"] = {"error": str(e)[:300]}
    finally:
        topo.close()
    return results


# the report ------------------------------------------------------------------------


def _num(value, digits=0) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "–"
    return f"{value:.{digits}f}"


def _ratio(a, b) -> str:
    try:
        r = a / b
    except (TypeError, ZeroDivisionError):
        return "–"
    return "–" if r != r else f"{r:.2f}"


def _ping(p: dict) -> str:
    return f"{_num(p['avg_ms'], 1)} ({p['lost']}/{p['sent']} lost)" if p else "–"


def report(all_results: Dict[str, Dict[str, dict]], lines: List[Line]) -> None:
    print(f"\nsevpn over emulated lines ({DUR} s per iperf3 run; line options per direction of each of the two "
          f"segments card–hub, so card to card crosses both; ping avg ms with lost/sent, "
          f"loaded ping avg / max ms)\n")
    print("| line | path | ping ms | TCP Mbit/s | TCP -R Mbit/s | ping under load ms | iperf3 retransmits TCP / -R |")
    print("|---|---|---|---|---|---|---|")
    for line in lines:
        res = all_results.get(line.name, {})
        label = f"{line.name}: {line.delay_ms:g} ms, {line.loss_pct:g}% loss, {line.rate_mbit:g} Mbit/s"
        for path in ("bare", "sevpn"):
            r = res.get(path, {})
            if "error" in r or not r:
                print(f"| {label} | {path} | failed: {r.get('error', 'not run')} | | | | |")
                continue
            lp = r["loaded_ping"]
            print(f"| {label} | {path} | {_ping(r['ping'])} | {_num(r['tcp']['mbps'])} | "
                  f"{_num(r['tcp_reverse']['mbps'])} | {_num(lp['avg_ms'], 1)} / {_num(lp['max_ms'], 1)} "
                  f"({lp['lost']} lost) | {r['tcp']['retransmits']} / {r['tcp_reverse']['retransmits']} |")
        b, s = res.get("bare", {}), res.get("sevpn", {})
        if "ping" in b and "ping" in s:
            print(f"| {label} | **sevpn/bare** | {_ratio(s['ping']['avg_ms'], b['ping']['avg_ms'])} | "
                  f"**{_ratio(s['tcp']['mbps'], b['tcp']['mbps'])}** | "
                  f"**{_ratio(s['tcp_reverse']['mbps'], b['tcp_reverse']['mbps'])}** | "
                  f"{_ratio(s['loaded_ping']['avg_ms'], b['loaded_ping']['avg_ms'])} | |")
    why(all_results, lines)
    refused = sum(d.get(key, 0)
                  for res in all_results.values() for r in res.values() for run in ("tcp", "tcp_reverse")
                  for line_counters in r.get(run, {}).get("line", {}).values() for d in line_counters.values()
                  for key in ("oversize", "gso"))
    if refused:
        print(f"\nwarning: the lines refused {refused} frames larger than the MTU: offloads were on somewhere, "
              f"and the figures above are not a line's")


def why(all_results: Dict[str, Dict[str, dict]], lines: List[Line]) -> None:
    print("\nWhy: sevpn's outer TCP connections during each run (`ss -tinm` once a second; card→hub is the "
          "sending card's link, hub→card the hub's link to the receiving card; from 30% of the run to its end, "
          "medians of cwnd and in flight in segments, tb = send buffer size, queued = bytes in it (skmem w), "
          "tb÷rtt = the rate that buffer allows, and carried = bytes acknowledged per second; over the whole run: "
          "sndbuf/rwnd-limited = share of the busy time the send buffer / the peer's window held the sender back, "
          "retrans = segments retransmitted)\n")
    print("| line | run | leg | cwnd | in flight | rtt ms | tb KiB | queued KiB | notsent KiB | tb÷rtt Mbit/s | "
          "delivery Mbit/s | carried Mbit/s | sndbuf-limited % | rwnd-limited % | retrans |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for line in lines:
        s = all_results.get(line.name, {}).get("sevpn", {})
        for run, name in (("tcp", "TCP"), ("tcp_reverse", "-R")):
            for leg, o in s.get(run, {}).get("outer_tcp", {}).items():
                if not o.get("samples"):
                    print(f"| {line.name} | {name} | {leg} | no samples |" + " |" * 11)
                    continue
                tb, rtt = o["tb"], o["rtt_ms"]
                bound = tb * 8 / (rtt * 1000) if tb and rtt else None
                print(f"| {line.name} | {name} | {leg} | {_num(o['cwnd'])} | {_num(o['unacked'])} | {_num(rtt, 1)} | "
                      f"{_num(tb / 1024)} | {_num(o['w'] / 1024)} | {_num(o['notsent'] / 1024)} | {_num(bound)} | "
                      f"{_num(o['delivery_mbps'])} | {_num(o['acked_mbps'])} | {_num(o['sndbuf_limited_pct'])} | "
                      f"{_num(o['rwnd_limited_pct'])} | {o['retrans_delta']} |")
    print("\nWhy: counters over each run (sevpn's: deltas of `sevpn nic status --json` and `sevpn hub sessions "
          "--json`; line: wanem's drops, to hub / from hub, summed over both lines; CPU % of one core)\n")
    print("| line | path | run | card congestion_drops | hub congestion_drops | frames_retransmitted | "
          "resumes | line loss drops | line queue drops | CPU % hub / sending card / receiving card |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for line in lines:
        for path in ("bare", "sevpn"):
            r = all_results.get(line.name, {}).get(path, {})
            for run, name in (("tcp", "TCP"), ("tcp_reverse", "-R")):
                x = r.get(run)
                if x:
                    print(f"| {line.name} | {path} | {name} | {_counter_columns(x, run)} |")


def _total(rows: List[dict], key: str) -> int:
    return sum(row.get(key, 0) for row in rows)


def _counter_columns(x: dict, run: str) -> str:
    """The counters table's cells for one run."""
    c = x.get("sevpn")
    if c:
        cards = [c.get(f"card{i}", {}) for i in (1, 2)]
        hubs = [v for k, v in c.items() if k.startswith("hub:")]
        cells = [_total(cards, "congestion_drops"), _total(hubs, "congestion_drops"),
                 _total(cards + hubs, "frames_retransmitted"), _total(cards, "resumes")]
    else:
        cells = ["–"] * 4
    for key in ("dropped_loss", "dropped_queue"):
        to_hub, from_hub = (sum(d.get(dirn, {}).get(key, 0) for d in x["line"].values()) for dirn in ("A->B", "B->A"))
        cells.append(f"{to_hub} / {from_hub}")
    cpu = x.get("cpu_pct")
    sender, receiver = ("card2", "card1") if run == "tcp_reverse" else ("card1", "card2")
    cells.append(f"{_num(cpu.get('hub'))} / {_num(cpu.get(sender))} / {_num(cpu.get(receiver))}" if cpu else "–")
    return " | ".join(str(cell) for cell in cells)


def main(lines: Optional[List[Line]] = None) -> int:
    """Run the lines (default: LINES from the environment); 1 if they cannot be run here."""
    if lines is None:
        try:
            lines = select_lines(os.environ.get("LINES"))
        except ValueError as e:
            print(f"bench: {e}", file=sys.stderr)
            return 1
    if not lines:
        return 0
    reason = line_skip_reason()
    if reason:
        print(f"bench: emulated lines skipped: {reason}", file=sys.stderr)
        return 1
    wanem = build_wanem()
    all_results = {}
    for line in lines:
        all_results[line.name] = run_line(line, wanem)
    report(all_results, lines)
    if os.environ.get("BENCH_JSON"):
        with open(os.environ["BENCH_JSON"], "w") as f:
            json.dump({"dur": DUR, "lines": {ln.name: ln.wanem_args() for ln in lines}, "results": all_results},
                      f, indent=1, default=str)
        print(f"\nall figures and ss samples: {os.environ['BENCH_JSON']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
