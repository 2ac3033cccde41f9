#!/usr/bin/env python3
"""
sevpn beside its peers over real lines: the shared peers harness
(peers.sh: SoftEther, OpenVPN, the bare path and sevpn on one topology)
once over each emulated line A, B, C and once on the plain veth, with one
markdown table per run: every system's figures, sevpn's ratios to the best
peer and to the bare path, and over the lines the resilience probe's
result for sevpn.  A system that fails to start is reported as failed; so
is a run that fails as a whole, and the next run goes on.

Run as root on a quiet machine, never beside another run of peers.sh (it
uses fixed namespace names); about an hour with the defaults:

    SEVPN_SRC=$PWD python3 scripts/peers_lines.py

Environment (all optional):
    LINES=A,B,C           the lines to run (0: none)
    VETH=1                also the plain-veth run (0: skip it)
    DUR, REPS             passed to the harness (REPS for the line runs; the veth run has REPS=1)
    LINE_SYSTEMS          default "baseline se-tcp1 se-tcp8 se-default ovpn-udp sevpn"
    LINE_PROBES           default "sevpn"
    VETH_SYSTEMS          default "baseline se-tcp1 sevpn"
    PEERS                 the harness (default /work/shared/bench/peers/peers.sh)
    WORK_DIR              the harness's work dir (default /tmp/sevpn-peers-lines); each run's
                          results go to WORK_DIR/results/<run>/, the tables to WORK_DIR/peers-lines.md
    SEVPN_SRC             the checkout to install (default: this one)

    python3 scripts/peers_lines.py --summarize DIR [DIR...]    tables from existing result dirs only
"""

from __future__ import annotations

import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = os.environ.get("PEERS", "/work/shared/bench/peers/peers.sh")
WORK_DIR = os.environ.get("WORK_DIR", "/tmp/sevpn-peers-lines")

#: The lines as the harness's WAN option (per direction of each segment), as in scripts/wan.py.
LINES = {
    "A": "--delay-ms 10 --rate-mbit 500",
    "B": "--delay-ms 20 --loss 0.5 --rate-mbit 200",
    "C": "--delay-ms 50 --loss 1 --rate-mbit 100",
}
LINE_SYSTEMS = os.environ.get("LINE_SYSTEMS", "baseline se-tcp1 se-tcp8 se-default ovpn-udp sevpn")
LINE_PROBES = os.environ.get("LINE_PROBES", "sevpn")
VETH_SYSTEMS = os.environ.get("VETH_SYSTEMS", "baseline se-tcp1 sevpn")
#: A whole harness run that takes longer than this is stopped and reported as failed.
RUN_TIMEOUT = 90 * 60

NAMES = {
    "baseline": "bare path",
    "se-tcp1": "SoftEther, 1 TCP conn.",
    "se-tcp8": "SoftEther, 8 TCP conns",
    "se-default": "SoftEther, default (UDP accel.)",
    "ovpn-udp": "OpenVPN TAP over UDP",
    "ovpn-tcp": "OpenVPN TAP over TCP",
    "tinc-udp": "tinc switch, UDP",
    "tinc-tcp": "tinc switch, TCP",
    "sevpn": "sevpn",
}
#: Namespaces the harness always uses: one of them existing means a run is going on.
HARNESS_NAMESPACES = ("hubns", "h1", "h2", "wan1", "wan2")


# running the harness ---------------------------------------------------------------


def busy_reason() -> Optional[str]:
    """Why the harness cannot be started now, or None."""
    if os.geteuid() != 0:
        return "the peers harness needs root"
    if not os.access(PEERS, os.X_OK):
        return f"no peers harness at {PEERS} (set PEERS)"
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    taken = [ns for ns in HARNESS_NAMESPACES if ns in listed]
    if taken:
        return (f"namespaces {', '.join(taken)} exist: another run of the peers harness is going on "
                f"(or one was killed; remove them with 'ip netns del' once sure)")
    return None


def run_harness(name: str, systems: str, probes: str, wan: Optional[str], reps: Optional[str]) -> Dict:
    """One run of peers.sh; its result dir and how it ended."""
    out = os.path.join(WORK_DIR, "results", name)
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ)
    env.update({"WORK_DIR": WORK_DIR, "OUT": out, "SYSTEMS": systems,
                # the harness reads an empty PROBES as "use the default probes": a blank means none
                "PROBES": probes or " ",
                "SEVPN_SRC": os.environ.get("SEVPN_SRC", REPO)})
    env.pop("WAN", None)
    if wan:
        env["WAN"] = wan
    if reps:
        env["REPS"] = reps
    else:
        env.pop("REPS", None)
    print(f"\n== {name}: SYSTEMS=\"{systems}\" PROBES=\"{probes}\"" + (f" WAN=\"{wan}\"" if wan else "")
          + f" -> {out}", flush=True)
    started = time.monotonic()
    with open(os.path.join(out, "console.log"), "wb") as log:
        proc = subprocess.Popen(["bash", PEERS], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                cwd=WORK_DIR, start_new_session=True)
        copier = threading.Thread(target=_copy_output, args=(proc.stdout, log), daemon=True)
        copier.start()
        try:
            rc = proc.wait(RUN_TIMEOUT)
            ending = None if rc == 0 else f"the harness exited with status {rc}"
        except (subprocess.TimeoutExpired, KeyboardInterrupt) as e:
            # SIGTERM lets the harness's EXIT trap remove its namespaces
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            if isinstance(e, KeyboardInterrupt):
                raise
            ending = f"stopped after {RUN_TIMEOUT // 60} minutes"
        copier.join(10)
    return {"name": name, "dir": out, "systems": systems.split(), "probes": probes.split(), "wan": wan,
            "ending": ending,
            "minutes": (time.monotonic() - started) / 60}


def _copy_output(stream, log) -> None:
    """The harness's output to its console.log and to ours (without pip's noise about local indexes)."""
    for chunk in iter(stream.readline, b""):
        log.write(chunk)
        log.flush()
        if not chunk.startswith(b"WARNING: Location"):
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()


# reading a run ---------------------------------------------------------------------


def read_results(out: str) -> Dict[str, Dict[str, List[str]]]:
    """results.tsv as {system: {metric: [value per rep]}}."""
    table: Dict[str, Dict[str, List[str]]] = {}
    try:
        with open(os.path.join(out, "results.tsv")) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) == 4:
                    system, metric, _rep, value = parts
                    table.setdefault(system, {}).setdefault(metric, []).append(value)
    except FileNotFoundError:
        pass
    return table


def values(table: Dict, system: str, metric: str) -> List[float]:
    out = []
    for v in table.get(system, {}).get(metric, []):
        try:
            out.append(float(v))
        except ValueError:
            continue
    return out


def mean(xs: List[float]) -> Optional[float]:
    return statistics.mean(xs) if xs else None


def failure(table: Dict, system: str, out: str) -> Optional[str]:
    """Why C{system} has no throughput figures in this run, or None if it has them."""
    if values(table, system, "tcp.mbps"):
        return None
    errors = [f"{m.split('.')[0]}: {v}" for m, vs in table.get(system, {}).items() if m.endswith(".error") for v in vs]
    if errors:
        return "failed (" + "; ".join(errors[:2])[:120] + ")"
    try:
        with open(os.path.join(out, "harness.log"), errors="replace") as f:
            log = f.read()
    except FileNotFoundError:
        log = ""
    m = re.search(rf"{re.escape(system)} did not come up|WAN topology failed", log)
    return f"failed ({m.group(0)})" if m else "failed (no results)"


def read_probe(out: str, system: str = "sevpn") -> Optional[dict]:
    """The resilience probe's summary for C{system}, or None if it did not run."""
    try:
        with open(os.path.join(out, f"probe-{system}", "summary.txt"), errors="replace") as f:
            text = f.read()
    except FileNotFoundError:
        return None

    def find(pattern):
        m = re.search(pattern, text)
        return m.group(1) if m else None

    return {
        "expected": find(r"file_bytes_expected=(\d+)"),
        "received": find(r"received=(\d+) sha_ok"),
        "sha_ok": find(r"sha_ok=(\w+)"),
        "pings_sent": find(r"ping: transmitted=(\d+)"),
        "pings_lost": find(r"lost=(\d+)"),
        "gap_s": find(r"longest gap between ping replies: ([\d.]+) s"),
        "first_reply_s": find(r"first ping reply after outage: ([\d.]+) s"),
        "transport_back_s": find(r"re-established ([\d.]+) s after kill"),
        "sender_cut": "sender still running" in text,
    }


# the tables ------------------------------------------------------------------------


def cell(xs: List[float], digits: int = 0) -> str:
    if not xs:
        return "–"
    return " / ".join(f"{x:.{digits}f}" for x in xs)


def ratio(a: Optional[float], b: Optional[float]) -> str:
    if a is None or not b:
        return "–"
    return f"{a / b:.2f}"


THROUGHPUT = (("TCP Mbit/s", "tcp.mbps"), ("TCP -R Mbit/s", "tcp_rev.mbps"), ("TCP -P4 Mbit/s", "tcp_p4.mbps"))


def run_table(run: Dict) -> str:
    """One run's markdown: a row per system, sevpn's ratios, the probe."""
    out, table = run["dir"], read_results(run["dir"])
    lines = []
    title = f"### {run['name']}: " + (f"WAN=\"{run['wan']}\"" if run["wan"] else "plain veth")
    lines.append(title)
    env = ""
    try:
        with open(os.path.join(out, "env.txt")) as f:
            env = f.read()
    except FileNotFoundError:
        pass
    m = re.search(r"loadavg at start: (\S+ \S+ \S+)", env)
    lines.append(f"\nresults: `{out}`" + (f"; load average at start {m.group(1)}" if m else "")
                 + (f"; {run['minutes']:.0f} min" if run.get("minutes") else "") + (f"; **{run['ending']}**" if run.get("ending") else ""))
    lines.append("")
    lines.append("| system | ping ms | " + " | ".join(c for c, _ in THROUGHPUT)
                 + " | UDP 64 B rcvd pps | ping under load ms (avg / max) | hub CPU % (TCP) |")
    lines.append("|---|---|---|---|---|---|---|---|")
    ok = {}
    for system in run["systems"]:
        name = f"{NAMES.get(system, system)} (`{system}`)"
        why = failure(table, system, out)
        if why:
            lines.append(f"| {name} | {why} | | | | | | |")
            continue
        ok[system] = True
        lp = f"{cell(values(table, system, 'ping_loaded.avg_ms'), 1)} / {cell(values(table, system, 'ping_loaded.max_ms'), 1)}"
        lines.append(f"| {'**' + name + '**' if system == 'sevpn' else name} | "
                     f"{cell(values(table, system, 'ping.avg_ms'), 2)} | "
                     + " | ".join(cell(values(table, system, m)) for _, m in THROUGHPUT)
                     + f" | {cell(values(table, system, 'udp64.rcvd_pps'))} | "
                     + (lp if system != "baseline" else "–")
                     + f" | {cell(values(table, system, 'tcp.cpu_hub_pct'))} |")
    if "sevpn" in ok:
        peers = [s for s in ok if s not in ("sevpn", "baseline")]
        lines.append("")
        lines.append("| sevpn ÷ | ping | " + " | ".join(c.replace(" Mbit/s", "") for c, _ in THROUGHPUT)
                     + " | ping under load |")
        lines.append("|---|---|---|---|---|---|")
        if peers:
            best = []
            for _, metric in THROUGHPUT:
                means = {p: mean(values(table, p, metric)) for p in peers}
                means = {p: v for p, v in means.items() if v}
                top = max(means, key=means.get) if means else None
                best.append(f"{ratio(mean(values(table, 'sevpn', metric)), means.get(top))} ({top})" if top else "–")
            pings = {p: mean(values(table, p, "ping.avg_ms")) for p in peers}
            pings = {p: v for p, v in pings.items() if v}
            low = min(pings, key=pings.get) if pings else None
            loaded = {p: mean(values(table, p, "ping_loaded.avg_ms")) for p in peers}
            loaded = {p: v for p, v in loaded.items() if v}
            low_loaded = min(loaded, key=loaded.get) if loaded else None
            lines.append("| best peer | "
                         + (f"{ratio(mean(values(table, 'sevpn', 'ping.avg_ms')), pings[low])} ({low})" if low else "–")
                         + " | " + " | ".join(best) + " | "
                         + (f"{ratio(mean(values(table, 'sevpn', 'ping_loaded.avg_ms')), loaded[low_loaded])} "
                            f"({low_loaded})" if low_loaded else "–") + " |")
        if "baseline" in ok:
            lines.append("| bare path | " + ratio(mean(values(table, "sevpn", "ping.avg_ms")),
                                                  mean(values(table, "baseline", "ping.avg_ms")))
                         + " | " + " | ".join(ratio(mean(values(table, "sevpn", m)), mean(values(table, "baseline", m)))
                                              for _, m in THROUGHPUT) + " | – |")
    probe = read_probe(out)
    if probe:
        lines.append("")
        got, want = probe["received"], probe["expected"]
        lines.append(
            "Resilience probe (sevpn; 200 MiB at 8 MiB/s and `ping -i 0.2` while the card's transport TCP is "
            f"killed at t = 10 s): received {got or '?'} of {want or '?'} bytes"
            + (" (the sender was stopped 70 s after the kill)" if probe["sender_cut"] else "")
            + f", sha256 match: {probe['sha_ok'] or '?'}, pings lost {probe['pings_lost'] or '?'} of "
            f"{probe['pings_sent'] or '?'}, longest gap between replies {probe['gap_s'] or '?'} s, "
            f"first reply after the kill {probe['first_reply_s'] or '–'} s, transport "
            + (f"back after {probe['transport_back_s']} s." if probe["transport_back_s"]
               else "never seen down by the harness's 0.5 s monitor."))
    elif "sevpn" in run.get("probes", ()):
        lines.append("\nResilience probe: no result (it did not run, or sevpn did not come up).")
    return "\n".join(lines) + "\n"


def write_report(runs: List[Dict], path: Optional[str]) -> None:
    text = ("## sevpn beside its peers over emulated lines (scripts/peers_lines.py)\n\n"
            "Line options apply to each direction of each of the two segments card–hub (card to card crosses "
            "both). Figures per rep (`a / b`); ratios use the mean; best peer = the best of the VPNs run, "
            "named in brackets.\n\n" + "\n".join(run_table(r) for r in runs))
    print("\n" + text)
    if path:
        with open(path, "w") as f:
            f.write(text)
        print(f"tables written to {path}")


def main(argv: List[str]) -> int:
    if argv[1:2] == ["--summarize"]:
        runs = []
        for d in argv[2:]:
            env = open(os.path.join(d, "env.txt")).read() if os.path.exists(os.path.join(d, "env.txt")) else ""
            m = re.search(r"^WAN: (.*?) \(per direction", env, re.M)
            systems = list(read_results(d))
            probes = [s for s in systems if os.path.isdir(os.path.join(d, f"probe-{s}"))]
            runs.append({"name": os.path.basename(d.rstrip("/")), "dir": d, "systems": systems, "probes": probes,
                         "wan": m.group(1) if m else None, "ending": None, "minutes": 0})
        write_report(runs, None)
        return 0
    reason = busy_reason()
    if reason:
        print(f"peers_lines: cannot run: {reason}", file=sys.stderr)
        return 1
    spec = os.environ.get("LINES", "A,B,C").strip()
    names = [] if spec == "0" else [n for n in re.split(r"[,\s]+", spec.upper()) if n]
    unknown = [n for n in names if n not in LINES]
    if unknown:
        print(f"peers_lines: LINES={spec!r}: no line {', '.join(unknown)} (the lines are A, B, C, or 0)",
              file=sys.stderr)
        return 1
    os.makedirs(WORK_DIR, exist_ok=True)
    runs = []
    if os.environ.get("VETH", "1") != "0":
        runs.append(run_harness("veth", VETH_SYSTEMS, "", None, "1"))
    for n in names:
        runs.append(run_harness(f"line{n}", LINE_SYSTEMS, LINE_PROBES, LINES[n], os.environ.get("REPS")))
    write_report(runs, os.path.join(WORK_DIR, "peers-lines.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
